//! Which edge of a Tether tier each turn goes to ([`Target::Tier`](crate::Target::Tier)).
//!
//! Operators run several Tether instances behind DNS or an L4 balancer, so a conversation's
//! turns may land on a different edge each turn. Whether affinity survives that is the point
//! of running a tier: the edges must agree on the replica without sharing state. The choice is a
//! pure function of `(seed, session, turn)`, so the same workload sends the same turns to the
//! same edges whatever order requests complete in.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a session's turns are spread over the edges of a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EdgeChoice {
    /// A session keeps the edge of its first turn (session `s` uses edge `s mod E`): a
    /// balancer with connection or source-address stickiness.
    #[default]
    Sticky,
    /// Turn `t` of session `s` goes to edge `(s + t) mod E`: every turn moves, the worst case
    /// for per-edge state.
    RoundRobin,
    /// Each turn to an edge drawn uniformly, from the workload's seed: DNS round-robin with
    /// short TTLs, or a balancer that spreads requests.
    Random,
}

impl EdgeChoice {
    /// The edge (`0..edges`) of turn `turn` of session `session`; `0` when there is at most one.
    pub fn edge(self, seed: u64, session: usize, turn: usize, edges: usize) -> usize {
        if edges <= 1 {
            return 0;
        }
        match self {
            EdgeChoice::Sticky => session % edges,
            EdgeChoice::RoundRobin => session.wrapping_add(turn) % edges,
            EdgeChoice::Random => {
                // Odd constants keep (session, turn) pairs apart; `seed_from_u64` then mixes
                // the result, so neighbouring pairs draw independent edges. A salt keeps this
                // stream apart from the workload's own draws from the same seed.
                let mixed = seed
                    ^ 0xED6E_5EED_0000_0000
                    ^ (session as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (turn as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                StdRng::seed_from_u64(mixed).gen_range(0..edges)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(choice: EdgeChoice, seed: u64, session: usize, edges: usize) -> Vec<usize> {
        (0..16)
            .map(|turn| choice.edge(seed, session, turn, edges))
            .collect()
    }

    #[test]
    fn round_robin_moves_one_session_to_the_next_edge_every_turn() {
        assert_eq!(
            path(EdgeChoice::RoundRobin, 42, 5, 2)[..6],
            [1, 0, 1, 0, 1, 0]
        );
        assert_eq!(
            path(EdgeChoice::RoundRobin, 42, 5, 3)[..6],
            [2, 0, 1, 2, 0, 1]
        );
        for session in 0..10 {
            let p = path(EdgeChoice::RoundRobin, 42, session, 4);
            assert!(p.windows(2).all(|w| w[0] != w[1]), "{p:?}");
        }
    }

    #[test]
    fn sticky_never_moves_a_session_and_spreads_sessions() {
        let firsts: Vec<usize> = (0..8)
            .map(|session| {
                let p = path(EdgeChoice::Sticky, 42, session, 3);
                assert!(p.iter().all(|&e| e == p[0]), "{p:?}");
                p[0]
            })
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn random_is_reproducible_from_the_seed_and_uses_every_edge() {
        let a: Vec<_> = (0..50).map(|s| path(EdgeChoice::Random, 7, s, 3)).collect();
        let b: Vec<_> = (0..50).map(|s| path(EdgeChoice::Random, 7, s, 3)).collect();
        let other: Vec<_> = (0..50).map(|s| path(EdgeChoice::Random, 8, s, 3)).collect();
        assert_eq!(a, b);
        assert_ne!(a, other);
        let mut counts = [0u32; 3];
        a.iter().flatten().for_each(|&e| counts[e] += 1);
        // 800 draws: each edge near 267.
        assert!(
            counts.iter().all(|&c| (200..335).contains(&c)),
            "{counts:?}"
        );
        // Random per turn, not per session: sessions do move.
        assert!(a.iter().any(|p| p.iter().any(|&e| e != p[0])));
    }

    #[test]
    fn one_edge_is_always_edge_zero() {
        for choice in [
            EdgeChoice::Sticky,
            EdgeChoice::RoundRobin,
            EdgeChoice::Random,
        ] {
            assert!(path(choice, 1, 9, 1).iter().all(|&e| e == 0));
            assert!(path(choice, 1, 9, 0).iter().all(|&e| e == 0));
        }
    }
}
