//! A block-level prefix KV cache modelled on vLLM's automatic prefix caching.
//!
//! The cache holds chained block hashes (see [`block_hashes`](crate::template::block_hashes)).
//! A request's cached tokens are its longest run of leading blocks present, capped so that at
//! least one prompt token is computed (the model needs logits for the last position, so vLLM
//! recomputes it even on a full hit). Capacity is in blocks; eviction is LRU per block.
//!
//! When a sequence's blocks are touched they are touched last-block-first, so a sequence's
//! early blocks are always more recent than its later ones and eviction eats prefixes from the
//! tail (vLLM frees a finished sequence's blocks in reverse order for the same reason): evicting
//! a prefix's first block would strand every block after it.

use std::num::NonZeroUsize;

use lru::LruCache;

/// A per-replica prefix cache.
#[derive(Debug)]
pub struct PrefixCache {
    blocks: LruCache<u64, ()>,
    block_tokens: usize,
}

impl PrefixCache {
    /// A cache of `capacity_tokens` (rounded down to whole blocks, at least one block).
    pub fn new(capacity_tokens: usize, block_tokens: usize) -> Self {
        let block_tokens = block_tokens.max(1);
        let blocks = NonZeroUsize::new(capacity_tokens / block_tokens).unwrap_or(NonZeroUsize::MIN);
        PrefixCache {
            blocks: LruCache::new(blocks),
            block_tokens,
        }
    }

    /// A cache that never evicts: the oracle of a workload (what an infinite cache would hit).
    pub fn unbounded(block_tokens: usize) -> Self {
        PrefixCache {
            blocks: LruCache::unbounded(),
            block_tokens: block_tokens.max(1),
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Capacity in blocks.
    pub fn capacity_blocks(&self) -> usize {
        self.blocks.cap().get()
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether a block is held (does not count as a use).
    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains(&hash)
    }

    /// How many of a prompt's leading blocks may be served from cache: all but the one holding
    /// its last token, which is always computed (it yields the first output token).
    pub fn usable_blocks(prompt_tokens: u64, block_tokens: usize) -> usize {
        (prompt_tokens.saturating_sub(1) / block_tokens.max(1) as u64) as usize
    }

    /// Cached tokens for a prompt of `prompt_tokens` tokens whose full blocks hash to `hashes`.
    pub fn cached_tokens(&self, hashes: &[u64], prompt_tokens: u64) -> u64 {
        let usable = Self::usable_blocks(prompt_tokens, self.block_tokens).min(hashes.len());
        (self.leading_blocks(&hashes[..usable]) * self.block_tokens) as u64
    }

    /// How many of `hashes`, from the first, are held (does not count as a use).
    pub fn leading_blocks(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.blocks.contains(h))
            .count()
    }

    /// Marks the blocks as computed and just used; returns how many were not held before.
    pub fn admit(&mut self, hashes: &[u64]) -> usize {
        let mut inserted = 0;
        for hash in hashes.iter().rev() {
            if self.blocks.put(*hash, ()).is_none() {
                inserted += 1;
            }
        }
        inserted
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.blocks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::block_hashes;

    const BLOCK: usize = 16;

    fn prompt(bytes: &[u8]) -> (Vec<u64>, u64) {
        (
            block_hashes(bytes, BLOCK),
            crate::template::token_count(bytes.len()),
        )
    }

    fn text(seed: u8, blocks: usize, tail: usize) -> Vec<u8> {
        (0..blocks * 64 + tail)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect()
    }

    #[test]
    fn a_cold_cache_has_no_hits_and_admitting_makes_them() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let (h, n) = prompt(&text(1, 4, 10));
        assert_eq!(c.cached_tokens(&h, n), 0);
        assert_eq!(c.admit(&h), 4);
        assert_eq!(c.cached_tokens(&h, n), 64);
        assert_eq!(c.admit(&h), 0, "re-admitting inserts nothing");
    }

    #[test]
    fn an_extended_prompt_hits_its_whole_old_prefix() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let old = text(1, 3, 0);
        c.admit(&block_hashes(&old, BLOCK));
        let mut longer = old.clone();
        longer.extend(text(9, 5, 7));
        let (h, n) = prompt(&longer);
        assert_eq!(c.cached_tokens(&h, n), 48);
    }

    #[test]
    fn a_diverging_prompt_hits_only_the_shared_leading_blocks() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let a = text(1, 6, 0);
        c.admit(&block_hashes(&a, BLOCK));
        let mut b = a.clone();
        b[64 * 2 + 5] ^= 0xff; // third block differs
        let (h, n) = prompt(&b);
        assert_eq!(c.cached_tokens(&h, n), 32);
    }

    #[test]
    fn a_shared_prefix_serves_two_conversations() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let system = text(3, 4, 0);
        let mut one = system.clone();
        one.extend(text(10, 2, 0));
        c.admit(&block_hashes(&one, BLOCK));
        let mut two = system.clone();
        two.extend(text(20, 2, 0));
        let (h, n) = prompt(&two);
        assert_eq!(c.cached_tokens(&h, n), 64, "the system prompt's 4 blocks");
    }

    #[test]
    fn a_full_hit_still_computes_the_last_token() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let exact = text(1, 4, 0); // exactly 4 blocks = 64 tokens
        let (h, n) = prompt(&exact);
        c.admit(&h);
        assert_eq!(n, 64);
        assert_eq!(c.cached_tokens(&h, n), 48, "the last block is recomputed");
    }

    #[test]
    fn eviction_is_lru_and_takes_a_sequence_from_its_tail() {
        let mut c = PrefixCache::new(4 * BLOCK, BLOCK);
        let a = block_hashes(&text(1, 3, 0), BLOCK);
        c.admit(&a);
        let b = block_hashes(&text(2, 2, 0), BLOCK);
        c.admit(&b);
        // 5 blocks into 4: the least recently used block of `a` is its last one.
        assert_eq!(c.len(), 4);
        assert!(c.contains(a[0]) && c.contains(a[1]) && !c.contains(a[2]));
        assert_eq!(
            c.cached_tokens(&a, 100),
            32,
            "the surviving prefix still hits"
        );
        // Using `a` again makes `b` the older one.
        c.admit(&a[..2]);
        c.admit(&block_hashes(&text(3, 1, 0), BLOCK));
        assert!(!c.contains(b[1]) && c.contains(b[0]));
    }

    #[test]
    fn memory_is_bounded_by_capacity() {
        let mut c = PrefixCache::new(10 * BLOCK, BLOCK);
        for seed in 0..50u8 {
            c.admit(&block_hashes(&text(seed, 3, 0), BLOCK));
            assert!(c.len() <= 10);
        }
        assert_eq!(c.capacity_blocks(), 10);
    }

    #[test]
    fn an_unbounded_cache_never_evicts() {
        let mut c = PrefixCache::unbounded(BLOCK);
        for seed in 0..200u8 {
            c.admit(&block_hashes(&text(seed, 3, 0), BLOCK));
        }
        assert_eq!(c.len(), 600);
    }

    #[test]
    fn clear_flushes_everything() {
        let mut c = PrefixCache::new(1000, BLOCK);
        let h = block_hashes(&text(1, 3, 0), BLOCK);
        c.admit(&h);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.cached_tokens(&h, 100), 0);
    }
}
