//! The capacity bound: an upper bound on what any router could hit with the fleet's cache.
//!
//! The oracle (one infinite cache) is the ceiling of an unbounded fleet. Under cache pressure no
//! router reaches it, and the question becomes how far below it the best possible one would be.
//! Any fleet of replicas holding `C` tokens between them holds, at every moment, a set of
//! blocks that also fits one pooled cache of `C` tokens (duplicates across replicas only waste
//! room). So the best a pooled cache of `C` could hit bounds every routing policy on that fleet.
//!
//! The best a cache can do on a known request sequence is Belady's MIN with bypass. Here any
//! event may load its block for free — an admit, and (loosening the model, which only raises
//! the bound) a lookup that missed — and on a load into a full cache the block dropped, the
//! new one included, is the one whose next lookup is furthest away. A block whose next event is
//! an admit counts as never needed, since that admit reloads it for free. Counting every block
//! hit (not only a whole-prefix match, as a replica does) can only over-count too. So the
//! result is an upper bound, possibly loose, never low; a brute-force search over every choice
//! on small traces checks that it is the optimum of this model.

use std::collections::{BinaryHeap, HashMap};

/// One request as a cache sees it.
#[derive(Debug, Clone, Default)]
pub struct TraceStep {
    /// The prompt's blocks that could be served from cache, in order.
    pub lookups: Vec<u64>,
    /// The blocks the replica keeps afterwards (prompt and reply).
    pub admits: Vec<u64>,
}

/// The steps as one sequence of `(block, is_lookup)` events.
fn reference_string(steps: &[TraceStep]) -> Vec<(u64, bool)> {
    steps
        .iter()
        .flat_map(|s| {
            s.lookups
                .iter()
                .map(|b| (*b, true))
                .chain(s.admits.iter().map(|b| (*b, false)))
        })
        .collect()
}

/// The room a pooled cache needs to hold everything a fleet of separate caches can: the
/// capacity of the *partitioned* bound, in blocks.
///
/// The pooled bound above lets a router keep each tenant's shared prefix (its system prompt)
/// once for the whole fleet. Separate replicas cannot: a simulated replica's cache is
/// prefix-closed (every admit touches a sequence last-block-first, so a block is never less
/// recent than any block after it, and LRU never strands a suffix), so a replica holding any
/// block of tenant `t`'s conversations beyond their common prefix of `S_t` blocks holds that
/// whole prefix too. Every other replica holds only prefix blocks, which the union already
/// counts. So the distinct blocks of `n` replicas of `c` blocks number at most
/// `n × (c − min S) + Σ S_t` (and never more than `n × c`). A pooled cache of that size, run by
/// Belady's MIN, bounds the hits of every routing policy on that fleet.
///
/// `shared_prefix_blocks[t]` is `S_t`, the leading blocks all of tenant `t`'s prompts share.
pub fn partitioned_capacity_blocks(
    replicas: usize,
    per_replica_blocks: usize,
    shared_prefix_blocks: &[usize],
) -> usize {
    let pooled = replicas.saturating_mul(per_replica_blocks);
    let Some(&smallest) = shared_prefix_blocks.iter().min() else {
        return pooled;
    };
    let prefixes: usize = shared_prefix_blocks.iter().sum();
    replicas
        .saturating_mul(per_replica_blocks.saturating_sub(smallest))
        .saturating_add(prefixes)
        .min(pooled)
}

/// Block hits of Belady's MIN with bypass on `steps`, with room for `capacity_blocks` blocks.
pub fn optimal_block_hits(steps: &[TraceStep], capacity_blocks: usize) -> u64 {
    if capacity_blocks == 0 {
        return 0;
    }
    let events = reference_string(steps);
    // need[i]: when the block of event i is next needed from the cache — the index of its next
    // event if that is a lookup; MAX if it is an admit (which reloads it) or there is none.
    let mut need = vec![usize::MAX; events.len()];
    let mut next_event: HashMap<u64, (usize, bool)> = HashMap::new();
    for (i, (block, is_lookup)) in events.iter().enumerate().rev() {
        need[i] = match next_event.get(block) {
            Some(&(at, true)) => at,
            _ => usize::MAX,
        };
        next_event.insert(*block, (i, *is_lookup));
    }

    // Cached blocks with their next lookup; the heap finds the furthest (stale heap entries,
    // whose time no longer matches the map, are skipped when they surface).
    let mut cached: HashMap<u64, usize> = HashMap::new();
    let mut furthest: BinaryHeap<(usize, u64)> = BinaryHeap::new();
    let mut hits = 0u64;
    for (i, (block, is_lookup)) in events.iter().copied().enumerate() {
        let next = need[i];
        if let Some(at) = cached.get_mut(&block) {
            hits += u64::from(is_lookup);
            *at = next;
            furthest.push((next, block));
            continue;
        }
        if next == usize::MAX {
            // Not needed before it is reloaded (or ever): bypass it.
            continue;
        }
        if cached.len() == capacity_blocks {
            let victim = loop {
                match furthest.peek() {
                    Some(&(at, b)) if cached.get(&b) != Some(&at) => {
                        furthest.pop();
                    }
                    top => break top.copied(),
                }
            };
            match victim {
                Some((at, b)) if at > next => {
                    furthest.pop();
                    cached.remove(&b);
                }
                // Every cached block is needed sooner than this one: bypass it.
                _ => continue,
            }
        }
        cached.insert(block, next);
        furthest.push((next, block));
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_replica_sim::PrefixCache;

    /// A seeded xorshift: `next(n)` is in `0..n`.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    fn step(lookups: &[u64], admits: &[u64]) -> TraceStep {
        TraceStep {
            lookups: lookups.to_vec(),
            admits: admits.to_vec(),
        }
    }

    #[test]
    fn the_partitioned_capacity_charges_each_replica_a_prefix() {
        // 6 replicas of 160 blocks, two tenants with 64-block system prompts: each replica
        // holding a conversation spends 64 blocks on a prompt, and two of those are counted
        // once: 6 × 96 + 128 = 704 of the pooled 960.
        assert_eq!(partitioned_capacity_blocks(6, 160, &[64, 64]), 704);
        // Unequal prefixes: every replica is charged the smaller one.
        assert_eq!(partitioned_capacity_blocks(6, 100, &[10, 30]), 6 * 90 + 40);
        // No shared prefix (or no tenants): the pooled capacity.
        assert_eq!(partitioned_capacity_blocks(6, 160, &[0, 0]), 960);
        assert_eq!(partitioned_capacity_blocks(6, 160, &[]), 960);
        // Prefixes longer than a replica's cache: never more than the pooled capacity.
        assert_eq!(partitioned_capacity_blocks(2, 10, &[50, 50]), 20);
    }

    #[test]
    fn a_cache_big_enough_hits_every_repeat() {
        let steps = [
            step(&[], &[1, 2]),
            step(&[1, 2], &[1, 2, 3]),
            step(&[1, 2, 3], &[]),
        ];
        assert_eq!(optimal_block_hits(&steps, 100), 5);
        assert_eq!(optimal_block_hits(&steps, 0), 0);
    }

    #[test]
    fn it_keeps_what_is_needed_next_where_lru_would_thrash() {
        // A cycle over three blocks with room for two: after the first pass LRU always
        // evicts the block needed next; MIN keeps one block across the cycle.
        let mut steps = vec![step(&[], &[1, 2, 3])];
        for _ in 0..4 {
            for b in [1, 2, 3] {
                steps.push(step(&[b], &[b]));
            }
        }
        let mut lru = PrefixCache::new(2, 1);
        let mut lru_hits = 0;
        for s in &steps {
            lru_hits += s
                .lookups
                .iter()
                .filter(|b| lru.cached_tokens(&[**b], 2) > 0)
                .count();
            lru.admit(&s.admits);
        }
        assert_eq!(lru_hits, 2, "only the first pass hits");
        let min = optimal_block_hits(&steps, 2);
        assert!(min >= 6, "MIN hit {min} of 12");
    }

    /// The optimum of the model by trying every choice: on each event whose block is not
    /// cached, load it or not, evicting any one block when full.
    fn brute_force(events: &[(u64, bool)], capacity: usize, cached: &mut Vec<u64>) -> u64 {
        let Some(((block, is_lookup), rest)) = events.split_first() else {
            return 0;
        };
        if cached.contains(block) {
            return u64::from(*is_lookup) + brute_force(rest, capacity, cached);
        }
        let mut best = brute_force(rest, capacity, cached);
        if capacity == 0 {
            return best;
        }
        if cached.len() < capacity {
            cached.push(*block);
            best = best.max(brute_force(rest, capacity, cached));
            cached.pop();
        } else {
            for k in 0..cached.len() {
                let evicted = std::mem::replace(&mut cached[k], *block);
                best = best.max(brute_force(rest, capacity, cached));
                cached[k] = evicted;
            }
        }
        best
    }

    #[test]
    fn it_is_the_optimum_of_its_model_on_small_traces() {
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15u64);
        for _ in 0..300 {
            let steps: Vec<TraceStep> = (0..1 + next(5))
                .map(|_| TraceStep {
                    lookups: (0..next(3)).map(|_| next(4)).collect(),
                    admits: (0..next(3)).map(|_| next(4)).collect(),
                })
                .collect();
            let events = reference_string(&steps);
            for capacity in 0..3 {
                assert_eq!(
                    optimal_block_hits(&steps, capacity),
                    brute_force(&events, capacity, &mut Vec::new()),
                    "{steps:?} capacity {capacity}"
                );
            }
        }
    }

    #[test]
    fn a_partitioned_fleet_never_beats_it() {
        // Two replicas of one block each can hit 3 times here (Y, B, Y on one, X on the
        // other); a bound that ranked blocks by their next lookup alone, ignoring the admit
        // that reloads Y first, would evict X and claim only 2.
        let steps = [
            step(&[], &[2]),
            step(&[], &[1]),
            step(&[], &[3]),
            step(&[3], &[]),
            step(&[], &[2]),
            step(&[2], &[]),
            step(&[1], &[]),
        ];
        assert!(optimal_block_hits(&steps, 2) >= 3);
        // A lookup the trace never re-admits may still be kept from an earlier admit.
        let steps = [
            step(&[], &[1]),
            step(&[], &[2]),
            step(&[2], &[]),
            step(&[1], &[]),
            step(&[1], &[]),
            step(&[1], &[]),
        ];
        assert_eq!(optimal_block_hits(&steps, 1), 3);
    }

    #[test]
    fn never_below_an_lru_cache_of_the_same_size() {
        // Random multi-turn sessions sharing a prefix, through an LRU prefix cache (what a
        // replica does) and through MIN: the bound is never lower.
        let mut next = xorshift(0x2545_F491_4F6C_DD1Du64);
        for capacity in [4, 16, 64, 256] {
            let mut sessions: Vec<Vec<u64>> = (0..12).map(|_| vec![7, 8]).collect();
            let mut steps = Vec::new();
            for _ in 0..300 {
                let s = next(12) as usize;
                let grow = 1 + next(4);
                let history = &mut sessions[s];
                let lookups = history.clone();
                for _ in 0..grow {
                    history.push(next(u64::MAX));
                }
                steps.push(step(&lookups, history));
            }
            let mut lru = PrefixCache::new(capacity, 1);
            let mut lru_hits = 0u64;
            for s in &steps {
                lru_hits += lru.cached_tokens(&s.lookups, s.lookups.len() as u64 + 1);
                lru.admit(&s.admits);
            }
            let min = optimal_block_hits(&steps, capacity);
            assert!(
                min >= lru_hits,
                "capacity {capacity}: MIN {min} < LRU {lru_hits}"
            );
        }
    }
}
