//! llama.cpp server's slots: a fixed number of sequences, each holding one conversation's KV
//! cache, and an optional host-RAM prompt cache behind them.
//!
//! Modelled on `tools/server` of llama.cpp (`--parallel N`, `--slot-prompt-similarity`,
//! `--cache-ram`):
//!
//! - A request takes an **idle** slot. Among idle slots, the one whose cached prompt shares
//!   the largest fraction of the new prompt wins when that fraction reaches
//!   `slot_prompt_similarity` (llama.cpp's default 0.1); otherwise the least recently used
//!   idle slot. With every slot busy the request waits (llama.cpp *defers* the task until a
//!   slot is released).
//! - The slot reuses the longest common prefix of what it holds and the new prompt; the rest
//!   is computed. A slot given to another conversation therefore loses its cache: the next
//!   turn of the conversation it held starts cold, unless the host cache kept a copy.
//! - With a host cache, a slot's content is saved to it before the slot is overwritten by a
//!   different prompt, and a prompt whose best match is in the host cache (longer than what
//!   the slot holds) restores that copy. The host cache is bounded in tokens, least recently
//!   used first out.
//!
//! The sim counts in KV blocks (the prompt's chained block hashes), not single tokens, like
//! the rest of the simulator: reuse is in whole blocks.

/// A slot's state.
#[derive(Debug, Clone, Default)]
struct Slot {
    busy: bool,
    /// Block hashes of what its KV cache holds, from the first.
    blocks: Vec<u64>,
    /// Logical time of its last assignment (for least-recently-used choice).
    last_used: u64,
}

/// What taking a slot gave a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Slot id.
    pub slot: usize,
    /// Leading blocks of the prompt already in the slot's KV cache (after a host-cache restore,
    /// if there was one).
    pub reused_blocks: usize,
    /// The reused blocks came from the host cache.
    pub restored: bool,
}

/// The slots of one llama.cpp server and its host-RAM prompt cache.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    /// Saved prompts, most recently used last.
    host: Vec<Vec<u64>>,
    host_capacity_blocks: usize,
    ctx_blocks: usize,
    similarity: f64,
    clock: u64,
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SlotTable {
    /// `slots` slots of `ctx_blocks` blocks each (llama.cpp splits `--ctx-size` evenly), a host
    /// cache of `host_capacity_blocks` (0 = none), and the similarity threshold.
    pub fn new(
        slots: usize,
        ctx_blocks: usize,
        host_capacity_blocks: usize,
        similarity: f64,
    ) -> SlotTable {
        SlotTable {
            slots: vec![Slot::default(); slots.max(1)],
            host: Vec::new(),
            host_capacity_blocks,
            ctx_blocks: ctx_blocks.max(1),
            similarity,
            clock: 0,
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: a table has at least one slot.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Context size of one slot, in blocks.
    pub fn ctx_blocks(&self) -> usize {
        self.ctx_blocks
    }

    /// Whether slot `id` is processing a request.
    pub fn is_busy(&self, id: usize) -> bool {
        self.slots.get(id).is_some_and(|s| s.busy)
    }

    /// Busy slots.
    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Blocks held by all slots.
    pub fn held_blocks(&self) -> usize {
        self.slots.iter().map(|s| s.blocks.len()).sum()
    }

    /// Blocks held by the host cache.
    pub fn host_blocks(&self) -> usize {
        self.host.iter().map(Vec::len).sum()
    }

    /// Gives the prompt `hashes` an idle slot, or `None` when every slot is busy (the caller
    /// waits for a release). `usable` caps the reuse (the prompt's last token is always
    /// computed).
    pub fn take(&mut self, hashes: &[u64], usable: usize) -> Option<Taken> {
        let prompt = &hashes[..hashes.len().min(self.ctx_blocks)];
        let idle = || self.slots.iter().enumerate().filter(|(_, s)| !s.busy);
        let mut chosen = None;
        if self.similarity > 0.0 && !prompt.is_empty() {
            let mut best = 0.0;
            for (id, slot) in idle() {
                let similarity = common_prefix(&slot.blocks, prompt) as f64 / prompt.len() as f64;
                if similarity >= self.similarity && similarity > best {
                    (best, chosen) = (similarity, Some(id));
                }
            }
        }
        let id = chosen.or_else(|| idle().min_by_key(|(_, s)| s.last_used).map(|(id, _)| id))?;
        self.clock += 1;
        let old = std::mem::take(&mut self.slots[id].blocks);
        let mut reused = common_prefix(&old, prompt);
        // The slot's content is about to be overwritten past `reused`: keep a copy first.
        if reused < old.len() {
            self.save(old.clone());
        }
        let mut restored = false;
        if let Some((at, len)) = self.best_saved(prompt) {
            if len > reused {
                reused = len;
                restored = true;
                let entry = self.host.remove(at);
                self.host.push(entry);
            }
        }
        let reused = reused.min(usable);
        let slot = &mut self.slots[id];
        slot.busy = true;
        slot.last_used = self.clock;
        slot.blocks = prompt.to_vec();
        Some(Taken {
            slot: id,
            reused_blocks: reused,
            restored,
        })
    }

    /// Frees slot `id`, which now holds `blocks` (prompt and reply), cut to its context.
    pub fn release(&mut self, id: usize, blocks: Option<&[u64]>) {
        let ctx = self.ctx_blocks;
        if let Some(slot) = self.slots.get_mut(id) {
            slot.busy = false;
            if let Some(blocks) = blocks {
                slot.blocks = blocks[..blocks.len().min(ctx)].to_vec();
            }
        }
    }

    /// Empties every slot and the host cache.
    pub fn clear(&mut self) {
        for slot in &mut self.slots {
            slot.blocks.clear();
        }
        self.host.clear();
    }

    fn best_saved(&self, prompt: &[u64]) -> Option<(usize, usize)> {
        self.host
            .iter()
            .enumerate()
            .map(|(i, saved)| (i, common_prefix(saved, prompt)))
            .filter(|(_, len)| *len > 0)
            .max_by_key(|(_, len)| *len)
    }

    fn save(&mut self, blocks: Vec<u64>) {
        if self.host_capacity_blocks == 0 || blocks.is_empty() {
            return;
        }
        // A copy that extends or repeats a saved prompt replaces it.
        self.host
            .retain(|saved| common_prefix(saved, &blocks) < saved.len());
        let mut blocks = blocks;
        blocks.truncate(self.host_capacity_blocks);
        self.host.push(blocks);
        while self.host_blocks() > self.host_capacity_blocks {
            self.host.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(conversation: u64, blocks: usize) -> Vec<u64> {
        (0..blocks as u64).map(|b| conversation << 32 | b).collect()
    }

    #[test]
    fn a_conversation_returns_to_its_own_slot_and_reuses_its_prefix() {
        let mut t = SlotTable::new(2, 100, 0, 0.1);
        let a = t.take(&prompt(1, 10), 10).unwrap();
        t.release(a.slot, Some(&prompt(1, 12)));
        let b = t.take(&prompt(2, 10), 10).unwrap();
        assert_ne!(a.slot, b.slot, "the least recently used idle slot");
        t.release(b.slot, Some(&prompt(2, 12)));
        let again = t.take(&prompt(1, 20), 19).unwrap();
        assert_eq!(again.slot, a.slot, "similarity picks the slot holding it");
        assert_eq!(again.reused_blocks, 12);
        assert!(!again.restored);
    }

    #[test]
    fn with_every_slot_busy_a_request_gets_none_and_a_release_frees_one() {
        let mut t = SlotTable::new(2, 100, 0, 0.1);
        let a = t.take(&prompt(1, 4), 4).unwrap();
        let _b = t.take(&prompt(2, 4), 4).unwrap();
        assert_eq!(t.busy(), 2);
        assert_eq!(t.take(&prompt(3, 4), 4), None);
        t.release(a.slot, None);
        assert!(t.take(&prompt(3, 4), 4).is_some());
    }

    #[test]
    fn a_third_conversation_evicts_one_of_two_slots_without_a_host_cache() {
        let mut t = SlotTable::new(2, 100, 0, 0.1);
        for c in 1..=3 {
            let s = t.take(&prompt(c, 8), 8).unwrap();
            t.release(s.slot, Some(&prompt(c, 8)));
        }
        // Conversation 1's slot went to conversation 3.
        let back = t.take(&prompt(1, 10), 10).unwrap();
        assert_eq!(back.reused_blocks, 0);
    }

    #[test]
    fn the_host_cache_restores_an_evicted_conversation() {
        let mut t = SlotTable::new(1, 100, 64, 0.1);
        let s = t.take(&prompt(1, 8), 8).unwrap();
        t.release(s.slot, Some(&prompt(1, 8)));
        let s = t.take(&prompt(2, 8), 8).unwrap();
        t.release(s.slot, Some(&prompt(2, 8)));
        assert_eq!(t.host_blocks(), 8, "conversation 1 was saved");
        let back = t.take(&prompt(1, 10), 9).unwrap();
        assert_eq!((back.reused_blocks, back.restored), (8, true));
    }

    #[test]
    fn the_host_cache_keeps_to_its_capacity_oldest_out() {
        let mut t = SlotTable::new(1, 100, 10, 0.1);
        for c in 1..=4 {
            let s = t.take(&prompt(c, 6), 6).unwrap();
            t.release(s.slot, Some(&prompt(c, 6)));
        }
        assert!(t.host_blocks() <= 10);
        assert_eq!(t.take(&prompt(1, 6), 6).unwrap().reused_blocks, 0);
    }

    #[test]
    fn reuse_stops_at_the_usable_blocks_and_slots_hold_at_most_their_context() {
        let mut t = SlotTable::new(1, 4, 0, 0.1);
        let s = t.take(&prompt(1, 8), 8).unwrap();
        t.release(s.slot, Some(&prompt(1, 8)));
        assert_eq!(t.held_blocks(), 4);
        assert_eq!(t.take(&prompt(1, 8), 3).unwrap().reused_blocks, 3);
    }
}
