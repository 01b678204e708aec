//! The capacity bound: the most any router could have hit with the fleet's cache capacity.
//!
//! The oracle (one infinite cache) is the ceiling of an unbounded fleet. Under cache pressure no
//! router reaches it, and the question becomes how far below it the best possible one would be.
//! Any fleet of replicas holding `C` tokens between them holds, at every moment, a set of
//! blocks that also fits one pooled cache of `C` tokens (duplicates across replicas only waste
//! room). So the best a pooled cache of `C` could hit bounds every routing policy on that fleet.
//!
//! The best a cache can do on a known request sequence is Belady's MIN with bypass: on insert
//! into a full cache, drop whichever block (the new one included) is next looked up furthest in
//! the future. It maximizes block hits, and counting every block hit (not only a whole-prefix
//! match, as a replica does) can only over-count — so the result is an upper bound, possibly
//! loose, never low.

use std::collections::{BinaryHeap, HashMap};

/// One request as a cache sees it.
#[derive(Debug, Clone, Default)]
pub struct TraceStep {
    /// The prompt's blocks that could be served from cache, in order.
    pub lookups: Vec<u64>,
    /// The blocks the replica keeps afterwards (prompt and reply).
    pub admits: Vec<u64>,
}

/// Block hits of Belady's MIN with bypass on `steps`, with room for `capacity_blocks` blocks.
pub fn optimal_block_hits(steps: &[TraceStep], capacity_blocks: usize) -> u64 {
    if capacity_blocks == 0 {
        return 0;
    }
    // The flattened reference string: (block, is_lookup).
    let events: Vec<(u64, bool)> = steps
        .iter()
        .flat_map(|s| {
            s.lookups
                .iter()
                .map(|b| (*b, true))
                .chain(s.admits.iter().map(|b| (*b, false)))
        })
        .collect();
    // next_lookup[i]: the index of the next lookup of event i's block after i (MAX = never).
    let mut next_lookup = vec![usize::MAX; events.len()];
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (i, (block, is_lookup)) in events.iter().enumerate().rev() {
        next_lookup[i] = seen.get(block).copied().unwrap_or(usize::MAX);
        if *is_lookup {
            seen.insert(*block, i);
        }
    }

    // Cached blocks with their next lookup; the heap finds the furthest (stale heap entries,
    // whose time no longer matches the map, are skipped when they surface).
    let mut cached: HashMap<u64, usize> = HashMap::new();
    let mut furthest: BinaryHeap<(usize, u64)> = BinaryHeap::new();
    let mut hits = 0u64;
    for (i, (block, is_lookup)) in events.iter().copied().enumerate() {
        let next = next_lookup[i];
        if let Some(at) = cached.get_mut(&block) {
            hits += u64::from(is_lookup);
            *at = next;
            furthest.push((next, block));
            continue;
        }
        if is_lookup || next == usize::MAX {
            // A miss is filled by the step's admits; a block never looked up again is bypassed.
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

    fn step(lookups: &[u64], admits: &[u64]) -> TraceStep {
        TraceStep {
            lookups: lookups.to_vec(),
            admits: admits.to_vec(),
        }
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

    #[test]
    fn never_below_an_lru_cache_of_the_same_size() {
        // Random multi-turn sessions sharing a prefix, through an LRU prefix cache (what a
        // replica does) and through MIN: the bound is never lower.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
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
