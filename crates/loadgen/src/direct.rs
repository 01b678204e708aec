//! Client-side routing for [`Target::Direct`](crate::Target::Direct): the policies a fleet
//! without Tether would use, so runs through Tether have a baseline on the same workload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use rand::Rng;

use crate::cache_aware::{CacheAwareConfig, CacheAwareRouter};

/// How requests for replicas are spread when Tether is not in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientPolicy {
    /// Each request to the next replica.
    RoundRobin,
    /// Each request to a random replica.
    Random,
    /// The replica with the fewest requests in flight (nginx `least_conn`).
    LeastInflight,
    /// Consistent hash of the session token (nginx `hash … consistent`); tokenless requests
    /// round-robin, as nginx does with an empty key.
    ConsistentHash,
    /// Consistent hash with bounded loads, `c = 1.25` (HAProxy `hash-balance-factor 125`).
    BoundedHash,
    /// SGLang router's `cache_aware` policy on the request text, with its launcher's
    /// defaults (see the `cache_aware` module); ignores the token.
    PrefixAware,
    /// The same with its load rule scaled to a small fleet: `balance_abs_threshold` 4 instead
    /// of 64, a gap of requests in flight that a fleet running a few requests per replica
    /// never reaches.
    PrefixAwareSmallFleet,
}

/// The `balance_abs_threshold` of [`ClientPolicy::PrefixAwareSmallFleet`] (its help text
/// says 4 too).
pub const SMALL_FLEET_BALANCE_ABS_THRESHOLD: usize = 4;

impl ClientPolicy {
    /// Whether the policy routes on the request's text.
    pub fn reads_text(self) -> bool {
        matches!(
            self,
            ClientPolicy::PrefixAware | ClientPolicy::PrefixAwareSmallFleet
        )
    }

    /// The prefix-aware policies' configuration.
    fn cache_aware_config(self) -> CacheAwareConfig {
        match self {
            ClientPolicy::PrefixAwareSmallFleet => CacheAwareConfig {
                balance_abs_threshold: SMALL_FLEET_BALANCE_ABS_THRESHOLD,
                ..CacheAwareConfig::default()
            },
            _ => CacheAwareConfig::default(),
        }
    }
}

/// The bounded-load factor of [`ClientPolicy::BoundedHash`].
pub const BALANCE_FACTOR: f64 = 1.25;

/// Client-side routing state for [`Target::Direct`].
pub(crate) struct DirectRouter {
    pub(crate) urls: Vec<String>,
    ring: pingora_ketama::Continuum,
    /// Replica index by address on the ring.
    by_addr: BTreeMap<std::net::SocketAddr, usize>,
    pub(crate) inflight: Vec<AtomicU32>,
    /// The prefix-aware policies' tree, and the time their decisions took.
    cache_aware: Mutex<CacheAwareRouter>,
    decision_nanos: AtomicU64,
    decisions: AtomicU64,
}

impl DirectRouter {
    /// Routing state for `urls`, the prefix-aware tree configured for `policy`.
    pub(crate) fn new(urls: &[String], policy: ClientPolicy) -> anyhow::Result<Self> {
        let mut by_addr = BTreeMap::new();
        let mut buckets = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let host = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            let addr: std::net::SocketAddr = host
                .parse()
                .map_err(|e| anyhow::anyhow!("replica URL {url}: {e} (want http://ip:port)"))?;
            by_addr.insert(addr, i);
            buckets.push(pingora_ketama::Bucket::new(addr, 1));
        }
        Ok(DirectRouter {
            urls: urls.to_vec(),
            ring: pingora_ketama::Continuum::new(&buckets),
            by_addr,
            inflight: urls.iter().map(|_| Default::default()).collect(),
            cache_aware: Mutex::new(CacheAwareRouter::new(
                urls.len(),
                policy.cache_aware_config(),
            )),
            decision_nanos: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
        })
    }

    /// Mean time of a prefix-aware decision (tree match, insert, eviction
    /// when due), nanoseconds; `None` before the first.
    pub(crate) fn mean_decision_nanos(&self) -> Option<f64> {
        let n = self.decisions.load(Ordering::Relaxed);
        (n > 0).then(|| self.decision_nanos.load(Ordering::Relaxed) as f64 / n as f64)
    }

    fn load(&self, i: usize) -> u32 {
        self.inflight[i].load(Ordering::Relaxed)
    }

    /// The replica for one request; `text` is its routing text (needed by
    /// the prefix-aware policies only).
    pub(crate) fn pick(
        &self,
        policy: ClientPolicy,
        token: Option<&str>,
        text: Option<&str>,
        next: &AtomicUsize,
    ) -> usize {
        let n = self.urls.len().max(1);
        let round_robin = || next.fetch_add(1, Ordering::Relaxed) % n;
        match (policy, token) {
            (ClientPolicy::PrefixAware | ClientPolicy::PrefixAwareSmallFleet, _) => {
                let loads: Vec<usize> = (0..self.urls.len())
                    .map(|i| self.load(i) as usize)
                    .collect();
                let mut router = self.cache_aware.lock().unwrap_or_else(|e| e.into_inner());
                let started = std::time::Instant::now();
                let (i, _) = router.select(text.unwrap_or_default(), &loads);
                let took = started.elapsed().as_nanos() as u64;
                drop(router);
                self.decision_nanos.fetch_add(took, Ordering::Relaxed);
                self.decisions.fetch_add(1, Ordering::Relaxed);
                i.min(n - 1)
            }
            (ClientPolicy::RoundRobin, _)
            | (ClientPolicy::ConsistentHash | ClientPolicy::BoundedHash, None) => round_robin(),
            (ClientPolicy::Random, _) => rand::thread_rng().gen_range(0..n),
            (ClientPolicy::LeastInflight, _) => {
                // Ties go round-robin, so an idle fleet is not all sent to replica 0.
                let start = round_robin();
                (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&i| self.load(i))
                    .unwrap_or(0)
            }
            (ClientPolicy::ConsistentHash, Some(t)) => self
                .ring
                .node(t.as_bytes())
                .and_then(|a| self.by_addr.get(&a).copied())
                .unwrap_or(0),
            (ClientPolicy::BoundedHash, Some(t)) => {
                let total: u64 = (0..n).map(|i| u64::from(self.load(i))).sum();
                let bound = (BALANCE_FACTOR * (total + 1) as f64 / n as f64).ceil() as u32;
                let mut first = None;
                for addr in self.ring.node_iter(t.as_bytes()).take(self.ring_len()) {
                    let Some(&i) = self.by_addr.get(addr) else {
                        continue;
                    };
                    first.get_or_insert(i);
                    if self.load(i) < bound {
                        return i;
                    }
                }
                first.unwrap_or(0)
            }
        }
    }

    fn ring_len(&self) -> usize {
        // Every point of the ring, at most: enough to see every replica.
        self.urls.len() * 160 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> DirectRouter {
        let urls: Vec<String> = (1..=6)
            .map(|i| format!("http://127.0.0.1:{}", 9100 + i))
            .collect();
        DirectRouter::new(&urls, ClientPolicy::PrefixAware).unwrap()
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        let (r, next) = (router(), AtomicUsize::new(0));
        let mut counts = [0u32; 6];
        for i in 0..6000 {
            let token = format!("session-{i}");
            let a = r.pick(ClientPolicy::ConsistentHash, Some(&token), None, &next);
            assert_eq!(
                a,
                r.pick(ClientPolicy::ConsistentHash, Some(&token), None, &next)
            );
            counts[a] += 1;
        }
        assert!(counts.iter().all(|&c| c > 600), "{counts:?}");
    }

    #[test]
    fn bounded_hash_skips_replicas_over_the_bound() {
        let (r, next) = (router(), AtomicUsize::new(0));
        let token = Some("session-1");
        let home = r.pick(ClientPolicy::BoundedHash, token, None, &next);
        // Load the home replica far past c × mean.
        r.inflight[home].store(10, Ordering::Relaxed);
        let moved = r.pick(ClientPolicy::BoundedHash, token, None, &next);
        assert_ne!(moved, home);
        assert_eq!(
            r.pick(ClientPolicy::ConsistentHash, token, None, &next),
            home
        );
    }

    #[test]
    fn least_inflight_picks_an_idle_replica_and_tokenless_hashing_round_robins() {
        let (r, next) = (router(), AtomicUsize::new(0));
        for i in 0..6 {
            r.inflight[i].store(if i == 4 { 0 } else { 3 }, Ordering::Relaxed);
        }
        assert_eq!(r.pick(ClientPolicy::LeastInflight, None, None, &next), 4);
        let a = r.pick(ClientPolicy::ConsistentHash, None, None, &next);
        let b = r.pick(ClientPolicy::ConsistentHash, None, None, &next);
        assert_ne!(a, b);
    }

    #[test]
    fn prefix_aware_keeps_a_conversation_and_times_its_decisions() {
        let (r, next) = (router(), AtomicUsize::new(0));
        let first = r.pick(ClientPolicy::PrefixAware, None, Some("head one"), &next);
        let other = r.pick(ClientPolicy::PrefixAware, None, Some("xyz"), &next);
        assert_ne!(first, other);
        let again = r.pick(
            ClientPolicy::PrefixAware,
            None,
            Some("head one reply"),
            &next,
        );
        assert_eq!(again, first);
        assert!(r.mean_decision_nanos().is_some_and(|ns| ns > 0.0));
    }

    #[test]
    fn the_small_fleet_variant_balances_where_the_defaults_do_not() {
        let urls: Vec<String> = (1..=3)
            .map(|i| format!("http://127.0.0.1:{}", 9100 + i))
            .collect();
        let next = AtomicUsize::new(0);
        for (policy, balanced) in [
            (ClientPolicy::PrefixAware, false),
            (ClientPolicy::PrefixAwareSmallFleet, true),
        ] {
            let r = DirectRouter::new(&urls, policy).unwrap();
            let home = r.pick(policy, None, Some("a conversation"), &next);
            // Its home replica 6 requests ahead of the others: over 4, under 64.
            r.inflight[home].store(6, Ordering::Relaxed);
            let again = r.pick(policy, None, Some("a conversation, turn two"), &next);
            assert_eq!(again != home, balanced, "{policy:?}");
        }
    }
}
