//! The override (sticky) table: which replica last served a session.
//!
//! After a successful response the proxy records `key → replica`; on the next turn that replica
//! wins if it is still eligible. This is what makes scale-out free for warm sessions: adding a
//! replica changes the ring, but a session with an entry keeps going where its KV cache is.
//!
//! # Layout
//!
//! A hand-written sharded open-addressing hash table. Each entry is one 16-byte, 16-aligned
//! `Slot` holding the key, the replica tag and the last-touched second inline, so a slot never
//! straddles a 64-byte cache line. The key is already a uniform 64-bit hash, so it is not hashed
//! again: its top 6 bits pick one of 64 shards (each behind its own cache-line-padded `RwLock`),
//! its low bits pick the home slot in that shard (so the two are independent). Beside the slots,
//! a parallel array holds one control byte per slot (0 = empty, else 7 other bits of the key).
//! Collisions use linear probing, so a lookup reads the home slot's control byte and slot and,
//! rarely, their neighbours. A shard doubles when it would pass 3/4 load; deletion shifts the
//! rest of the probe run back (no tombstones); maintenance may shrink a sparse shard.
//! The empty-slot marker is the reserved tag [`MAX_REPLICA_TAG`]` + 1`, which
//! [`TagRegistry`](crate::TagRegistry) never assigns.
//!
//! # The previous turn's prompt size
//!
//! Each entry also keeps how many prompt tokens its replica processed for the session's last
//! turn ([`exchange_prompt_tokens`](OverrideTable::exchange_prompt_tokens)): a warm replica
//! should report about that many cached tokens on the next sticky turn, which is what the
//! cache-loss detector checks. The slot has no spare word (16 bytes, four to a cache line,
//! and 64 bytes an entry at the lowest load maintenance leaves), so the count shares the
//! tag's 32 bits: 20 bits of tag and a 12-bit code rounded down to within 0.4 % (see
//! `prompt_count`). Moving the entry to another replica, or its idling past the TTL,
//! forgets the count: it belonged to the old replica's cache.
//!
//! Why not a general-purpose map: at 1M sessions the slots (32 MiB) are far larger than the
//! caches, so a lookup costs its trip to DRAM, and what matters is that it makes one trip and
//! does not wait on anything before it. A SwissTable (hashbrown, inside each DashMap shard) finds
//! a bucket's index by a SIMD match of its control group, so a hit reads the control bytes and
//! *then* the bucket: two serial reads. Here
//! each shard keeps one control byte per slot as well (1 byte per slot: about 2 MiB at 1M
//! entries, which stays in the last-level cache), and the probe ([`Shard::probe`]) reads the
//! byte and then the slot at an address known from the key alone, so the CPU, predicting the
//! match, issues both loads at once: a hit costs about one random DRAM read
//! (`benches/routing.rs` measures it beside that floor and a `std` `HashMap`). Inline slots
//! without the control bytes would make every *miss* (a new session) a DRAM read too.
//!
//! # Locks
//!
//! The only locks are the 64 shard `RwLock`s. No call holds two of them at once, and none is
//! held while calling out of this module.
//!
//! - **Read lock** of the key's shard: every [`get`](OverrideTable::get), and every
//!   [`record`](OverrideTable::record) first. A record that finds the key already holding that
//!   replica (a sticky turn that changes nothing) ends there: it only moves the entry's
//!   last-touched second forward, an atomic inside the slot, and writes nothing when the
//!   second is already current. A lookup never writes: an entry past its TTL reads as absent
//!   and stays until maintenance removes it (or a record refreshes it).
//! - **Write lock** of the key's shard: a record of a new key or of a different replica (taken
//!   after the read lock is released, and the probe repeated), and
//!   [`remove`](OverrideTable::remove).
//! - **Write lock of every shard, one after another**: [`maintain`](OverrideTable::maintain),
//!   run by a background task, holds each for one pass over that shard's slots (up to three
//!   passes when it sweeps for capacity).
//!
//! So a turn that stays on its replica takes two read locks and no write lock; readers of a
//! shard wait only for a writer of that same shard, and a request thread never runs a pass over
//! the table.
//!
//! # Memory bound
//!
//! - **Idle TTL**: an entry not recorded for `ttl` is dead. Lookups treat it as absent;
//!   [`maintain`](OverrideTable::maintain) removes it.
//! - **Capacity**: when the table holds more than `capacity` entries,
//!   [`needs_maintenance`](OverrideTable::needs_maintenance) turns true, and `maintain` sweeps it
//!   down to 7/8 of capacity, evicting the least recently touched entries (an approximate LRU:
//!   the cut-off second is the 1/8 quantile of a 4,096-entry sample; ties at the cut-off are
//!   split by key bits, so a burst within one second does not empty the table; if the sample
//!   under-estimated, a second pass evicts exactly the rest of the excess). The proxy checks
//!   `needs_maintenance` every 250 ms, off the request path.
//! - **Ceiling** ([`ceiling`](OverrideTable::ceiling), `capacity + capacity / 8`): between
//!   maintenance runs, an insert that would take the table past it instead replaces the least
//!   recently touched of up to 8 entries next to its own home slot, under the write lock of its
//!   own shard that it holds anyway: O(1), never a pass over the table. (Only when that shard
//!   holds no entry at all, which keys spread by a hash leave likely only in a table of a few
//!   hundred entries, does it take the victim from the next shard that holds one, after
//!   releasing its own lock.) So
//!   [`len`](OverrideTable::len) never exceeds the ceiling, with one exception: right after a
//!   reload lowers the capacity the table may already hold more, and then it does not grow
//!   (every insert replaces an entry) until the next `maintain` brings it down. Per entry, the
//!   slots, control bytes and share groups take at most 64 bytes once maintenance has run
//!   (18 bytes a slot at no less than 9/32 load; see [`Shard::retain`]).
//! - **Tenant shares** ([`set_tenant_shares`](OverrideTable::set_tenant_shares)): a tenant
//!   holds at most a set fraction of the capacity. Beside the control bytes each shard keeps
//!   one share-group byte per slot (written under the write lock, never read by a lookup), and
//!   the table counts entries per group. A new entry of a tenant at its share replaces that
//!   tenant's own least recently touched entry among the 32 next to its home slot, so a
//!   tenant minting tokens by the million churns its own share and no one else's; if none of
//!   its own is there, the entry is not made and the session routes by the ring.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::prompt_count;
use crate::{RoutingKey, TenantScope};

/// A replica's stable identity across topology reloads (see [`TagRegistry`](crate::TagRegistry)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaTag(pub u32);

/// Sample size used to estimate the eviction cut-off.
const EVICTION_SAMPLE: usize = 4096;
/// Entries an insert at the ceiling compares to choose the one it replaces (Redis samples 5 for
/// its approximate LRU; these sit in two or three cache lines next to the insert's own).
const VICTIM_CANDIDATES: usize = 8;

/// Entries an insert of a tenant over its share looks through for one of that tenant's own to
/// replace. A tenant at its share holds that fraction of a full table, so 32 neighbours miss
/// all of its entries with probability (1 − share)^32: 0.1 % at a share of 0.2.
const SHARE_CANDIDATES: usize = 32;
/// Share groups: tenants are numbered 1..=255 as they are registered ([`TenantShares`]); 0 is
/// every entry not counted against a share.
const GROUPS: usize = 256;

/// log2 of the number of shards.
const SHARD_BITS: u32 = 6;
/// Number of shards: enough that writers on different sessions rarely share a lock.
const SHARDS: usize = 1 << SHARD_BITS;
/// Slots in an empty shard, and the floor a shard never shrinks below (a power of two).
const MIN_SLOTS: usize = 16;
/// Bits of a slot's tag word that hold the tag; the rest hold the previous turn's prompt
/// size (see `prompt_count`).
const TAG_BITS: u32 = 32 - prompt_count::BITS;
const TAG_MASK: u32 = (1 << TAG_BITS) - 1;
/// The tag of an empty slot.
const EMPTY_TAG: u32 = TAG_MASK;
/// The largest tag the table holds (1,048,574): [`TagRegistry`](crate::TagRegistry) saturates
/// here. A fleet has hundreds of replicas at most, and the registry assigns one tag per replica
/// id the process has seen; the selector keeps a vector entry per tag, so tags run in the
/// thousands long before they near this.
pub const MAX_REPLICA_TAG: u32 = EMPTY_TAG - 1;

/// A slot's contents as a plain value, for moving entries around under the write lock.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    tag: u32,
    touched: u32,
    /// The previous turn's prompt size, as a `prompt_count` code (0: unknown).
    prompt: u16,
    /// The tenant's share group (see [`TenantShares`]); 0 = not counted against a share.
    group: u8,
}

/// One table entry, or an empty slot when its tag is `EMPTY_TAG`.
///
/// 16 bytes aligned to 16, so four slots fill a 64-byte line exactly and none straddles two.
/// `key` and the tag change only under the shard's write lock; `touched` and the prompt size
/// are atomics so that a sticky turn can update them under the read lock.
#[derive(Debug)]
#[repr(C, align(16))]
struct Slot {
    key: u64,
    /// The tag in the low `TAG_BITS`, the previous turn's prompt-size code above it.
    tag_prompt: AtomicU32,
    touched: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16 && std::mem::align_of::<Slot>() == 16);

impl Slot {
    fn empty() -> Slot {
        Slot::new(Entry {
            key: 0,
            tag: EMPTY_TAG,
            touched: 0,
            prompt: 0,
            group: 0,
        })
    }

    fn new(entry: Entry) -> Slot {
        Slot {
            key: entry.key,
            tag_prompt: AtomicU32::new(
                (entry.tag & TAG_MASK) | (u32::from(entry.prompt) << TAG_BITS),
            ),
            touched: AtomicU32::new(entry.touched),
        }
    }

    fn tag(&self) -> u32 {
        self.tag_prompt.load(Ordering::Relaxed) & TAG_MASK
    }

    fn prompt(&self) -> u16 {
        (self.tag_prompt.load(Ordering::Relaxed) >> TAG_BITS) as u16
    }

    /// Stores `prompt` if the slot still holds `tag`; returns the code it replaced. The tag
    /// bits only change under the write lock, so under the read lock this races only with
    /// another turn of the same session, and one of the two counts wins whole.
    fn exchange_prompt(&self, tag: u32, prompt: u16) -> Option<u16> {
        self.tag_prompt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                (word & TAG_MASK == tag).then_some(tag | (u32::from(prompt) << TAG_BITS))
            })
            .ok()
            .map(|word| (word >> TAG_BITS) as u16)
    }

    fn is_empty(&self) -> bool {
        self.tag() == EMPTY_TAG
    }

    fn touched(&self) -> u32 {
        self.touched.load(Ordering::Relaxed)
    }

    /// The slot's entry, without its share group (kept beside the slots: use
    /// [`Shard::entry_at`] where the group matters, i.e. wherever the entry moves).
    fn entry(&self) -> Entry {
        Entry {
            key: self.key,
            tag: self.tag(),
            touched: self.touched(),
            prompt: self.prompt(),
            group: 0,
        }
    }

    /// Moves the last-touched second forward to `now`, never back (two turns of one session
    /// may read the clock a second apart and store in either order). No store when it is
    /// already `now`, so a burst of turns does not keep taking the cache line for writing.
    fn touch(&self, now: u32) {
        if self.touched() < now {
            self.touched.fetch_max(now, Ordering::Relaxed);
        }
    }
}

fn empty_slots(n: usize) -> Box<[Slot]> {
    (0..n).map(|_| Slot::empty()).collect()
}

/// One shard: a power-of-two array of slots, linear probing from `key & mask`.
///
/// Invariants: `len` is the number of occupied slots and at most 3/4 of `slots.len()` (so every
/// probe meets an empty slot); every entry sits at the end of an unbroken run of occupied slots
/// starting at its home slot; keys are unique.
#[derive(Debug)]
struct Shard {
    slots: Box<[Slot]>,
    /// One control byte per slot: 0 when the slot is empty, else [`control`] of its key. The
    /// probe reads these first and a slot only when its byte matches; see [`Shard::probe`].
    ctrl: Box<[u8]>,
    /// One share group per slot (0 when empty), written only under the write lock and never
    /// read by a lookup: the sticky path does not touch it.
    groups: Box<[u8]>,
    len: usize,
    /// Entries per share group over the whole table, shared by every shard.
    group_len: Arc<GroupCounts>,
}

/// A key's control byte: 7 bits the shard and home-slot choice do not use, with the high bit
/// set so it is never 0 (empty). Two keys share one with probability 1/128, which only costs
/// a slot read.
fn control(key: u64) -> u8 {
    (key >> 48) as u8 | 0x80
}

/// Smallest shard size (a power of two, at least [`MIN_SLOTS`]) that holds `n` entries within
/// the 3/4 load bound.
fn slots_for(n: usize) -> usize {
    let mut slots = MIN_SLOTS;
    while n.saturating_mul(4) > slots.saturating_mul(3) {
        slots *= 2;
    }
    slots
}

impl Shard {
    fn with_slots(slots: usize, group_len: Arc<GroupCounts>) -> Shard {
        Shard {
            slots: empty_slots(slots),
            ctrl: vec![0; slots].into_boxed_slice(),
            groups: vec![0; slots].into_boxed_slice(),
            len: 0,
            group_len,
        }
    }

    /// Slot `i`'s entry with its share group.
    fn entry_at(&self, i: usize) -> Entry {
        Entry {
            group: self.groups[i],
            ..self.slots[i].entry()
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// `Ok(index)` of `key`'s slot, or `Err(index)` of the empty slot that ends its probe run
    /// (where an insert would put it).
    ///
    /// The walk reads control bytes and touches a slot only where the byte matches. The bytes
    /// (1 per slot: 2 MiB at 1M entries) stay in the last-level cache while the slots (32 MiB)
    /// do not, so a *miss* (a new session) costs a cache hit, not a DRAM read. A *hit* still
    /// reads its slot from DRAM, but that read does not wait for the control byte: the slot's
    /// address is known from the key, and the CPU, predicting the match, issues both loads at
    /// once (a SwissTable's bucket index comes out of a SIMD match of its control group, so
    /// there the two reads are serial).
    fn probe(&self, key: u64) -> Result<usize, usize> {
        let mask = self.mask();
        let want = control(key);
        // Truncation on 32-bit targets is fine: only the low bits are used.
        let mut i = key as usize & mask;
        // Bounded by the array size; the load bound guarantees an empty slot well before that.
        for _ in 0..self.slots.len() {
            let c = self.ctrl[i];
            if c == 0 {
                return Err(i);
            }
            if c == want && self.slots[i].key == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
        Err(i)
    }

    /// How many slots [`probe`](Self::probe) visits for `key`: 1 when its home slot holds it
    /// or is empty, one more for each slot of the run before it.
    fn probe_len(&self, key: u64) -> usize {
        let start = key as usize & self.mask();
        let end = match self.probe(key) {
            Ok(i) | Err(i) => i,
        };
        (end.wrapping_sub(start) & self.mask()) + 1
    }

    /// Fills slot `i` with `entry` and its control byte.
    fn put(&mut self, i: usize, entry: Entry) {
        self.slots[i] = Slot::new(entry);
        self.ctrl[i] = control(entry.key);
        self.groups[i] = entry.group;
    }

    /// Empties slot `i`.
    fn clear(&mut self, i: usize) {
        self.slots[i] = Slot::empty();
        self.ctrl[i] = 0;
        self.groups[i] = 0;
    }

    /// The slot holding `key`, if any (the lookup hot path).
    fn find(&self, key: u64) -> Option<&Slot> {
        self.probe(key).ok().map(|i| &self.slots[i])
    }

    /// Inserts `entry`, whose key is absent and whose probe run ends at the empty slot `at`;
    /// doubles the shard first if the insert would pass 3/4 load.
    fn insert_absent(&mut self, at: usize, entry: Entry) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.rebuild(self.slots.len() * 2);
            self.place(entry);
        } else {
            self.put(at, entry);
        }
        self.len += 1;
        self.group_len.add(entry.group);
    }

    /// Removes the entry in slot `victim` and inserts `entry` (whose key is absent) in its
    /// place in the count: the shard does not grow.
    fn replace(&mut self, victim: usize, entry: Entry) {
        self.delete_at(victim);
        // The deletion may have shifted the new key's probe run: place it afresh.
        self.place(entry);
        self.len += 1;
        self.group_len.add(entry.group);
    }

    /// Puts `entry` in the first empty slot of its probe run (its key is known to be absent).
    fn place(&mut self, entry: Entry) {
        let mask = self.mask();
        let mut i = entry.key as usize & mask;
        // Terminates: the load bound leaves empty slots.
        while !self.slots[i].is_empty() {
            i = (i + 1) & mask;
        }
        self.put(i, entry);
    }

    /// Re-inserts every entry into a fresh array of `slots` slots (which must hold `len`).
    fn rebuild(&mut self, slots: usize) {
        debug_assert!(slots.is_power_of_two() && slots >= slots_for(self.len));
        let old = std::mem::replace(&mut self.slots, empty_slots(slots));
        let old_groups = std::mem::replace(&mut self.groups, vec![0; slots].into_boxed_slice());
        self.ctrl = vec![0; slots].into_boxed_slice();
        for (slot, group) in old.iter().zip(old_groups.iter()) {
            if !slot.is_empty() {
                self.place(Entry {
                    group: *group,
                    ..slot.entry()
                });
            }
        }
    }

    /// Empties slot `hole` by backward-shift deletion: each later entry of the run that may
    /// legally sit earlier (its home is not between the hole and itself) moves into the hole,
    /// until the run ends. No tombstones, so probe runs never lengthen with churn.
    fn delete_at(&mut self, mut hole: usize) {
        let removed_group = self.groups[hole];
        let mask = self.mask();
        let mut j = hole;
        // Bounded by the array size; the load bound guarantees an empty slot well before that.
        for _ in 1..self.slots.len() {
            j = (j + 1) & mask;
            if self.slots[j].is_empty() {
                break;
            }
            let entry = self.entry_at(j);
            let home = entry.key as usize & mask;
            // Distances along the probe direction, modulo the array size (wrap-around).
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.put(hole, entry);
                hole = j;
            }
        }
        self.clear(hole);
        self.len -= 1;
        self.group_len.sub(removed_group);
    }

    /// The slot of the least recently touched of the first [`VICTIM_CANDIDATES`] entries met
    /// walking forward from `key`'s home slot: the neighbourhood an insert of `key` is reading
    /// anyway. `None` when the shard is empty.
    fn oldest_near(&self, key: u64) -> Option<usize> {
        self.oldest_near_where(key, VICTIM_CANDIDATES, |_| true)
    }

    /// The slot of the least recently touched entry of share group `group` among the first
    /// [`SHARE_CANDIDATES`] entries met walking forward from `key`'s home slot. `None` when
    /// none of them is of the group.
    fn oldest_of_group_near(&self, key: u64, group: u8) -> Option<usize> {
        self.oldest_near_where(key, SHARE_CANDIDATES, |i| self.groups[i] == group)
    }

    /// The least recently touched entry that `accept`s, among the first `candidates` entries
    /// from `key`'s home slot.
    fn oldest_near_where(
        &self,
        key: u64,
        candidates: usize,
        accept: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = key as usize & mask;
        let mut oldest: Option<(u32, usize)> = None;
        let mut seen = 0;
        // Bounded by the array size; at most a few times `candidates` steps unless the
        // shard is sparse.
        for _ in 0..self.slots.len() {
            if self.ctrl[i] != 0 {
                let touched = self.slots[i].touched();
                if accept(i) && oldest.is_none_or(|(t, _)| touched < t) {
                    oldest = Some((touched, i));
                }
                seen += 1;
                if seen == candidates {
                    break;
                }
            }
            i = (i + 1) & mask;
        }
        oldest.map(|(_, i)| i)
    }

    /// Removes every entry `keep` refuses; returns how many. When under 3/8 of its slots stay
    /// in use, shrinks the array to the smallest size that holds a third more than what is left
    /// (so the next inserts do not double it straight back), if that is smaller: in effect
    /// below 9/32 load, so at most 64 bytes of slots, control bytes and share groups per
    /// entry, never below [`MIN_SLOTS`].
    fn retain(&mut self, keep: &mut impl FnMut(Entry) -> bool) -> usize {
        let n = self.slots.len();
        let mask = self.mask();
        // Walk the array once, starting just after an empty slot. That slot stays empty (a
        // backward shift only moves entries into slots that were occupied), so no run crosses
        // it, and a deletion only moves entries of the not-yet-visited part of the walk into
        // slots at or after the current one: each entry is judged exactly once.
        let Some(start) = self.slots.iter().position(Slot::is_empty) else {
            return 0; // unreachable: the load bound keeps empty slots
        };
        let mut removed = 0;
        let mut i = (start + 1) & mask;
        let mut left = n - 1;
        while left > 0 {
            if !self.slots[i].is_empty() && !keep(self.entry_at(i)) {
                self.delete_at(i);
                removed += 1;
                // Slot `i` may now hold an entry shifted back from later in the run.
                continue;
            }
            i = (i + 1) & mask;
            left -= 1;
        }
        if removed > 0 && n > MIN_SLOTS && self.len * 8 < n * 3 {
            let slots = slots_for(self.len + self.len / 3);
            if slots < n {
                self.rebuild(slots);
            }
        }
        removed
    }
}

/// A shard's lock, alone on its cache lines so threads working in neighbouring shards do not
/// contend on one line (128 bytes: x86 prefetches 64-byte lines in adjacent pairs).
#[derive(Debug)]
#[repr(align(128))]
struct ShardLock {
    lock: RwLock<Shard>,
    /// Write-lock acquisitions, so tests can prove which calls take none.
    #[cfg(test)]
    writes: AtomicUsize,
}

impl ShardLock {
    fn new(shard: Shard) -> ShardLock {
        ShardLock {
            lock: RwLock::new(shard),
            #[cfg(test)]
            writes: AtomicUsize::new(0),
        }
    }
}

/// Entries per share group, over every shard. Changed under a shard's write lock; read
/// relaxed (an insert judging its tenant's share may be off by the inserts in flight).
#[derive(Debug)]
struct GroupCounts([AtomicUsize; GROUPS]);

impl GroupCounts {
    fn new() -> Self {
        GroupCounts(std::array::from_fn(|_| AtomicUsize::new(0)))
    }

    fn add(&self, group: u8) {
        if group != 0 {
            self.0[usize::from(group)].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sub(&self, group: u8) {
        if group != 0 {
            self.0[usize::from(group)].fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn get(&self, group: u8) -> usize {
        self.0[usize::from(group)].load(Ordering::Relaxed)
    }
}

/// Which tenants hold a share of the table, and how large it is.
///
/// Each registered tenant gets its own group number, kept for the life of the table (reloads
/// add tenants; a removed tenant's entries age out). Past 255 tenants the rest share no
/// group and are not limited: the share guards against one tenant among a few, and a
/// deployment of thousands of tenants wants the new-session rate limit instead.
#[derive(Debug, Default)]
struct TenantShares {
    groups: RwLock<std::collections::HashMap<u64, u8>>,
    /// The share in millionths of the capacity; 0 = no limit.
    share_ppm: AtomicU32,
}

/// A poisoned lock only means another thread panicked while holding it. No code path here can
/// panic between mutations of a shard, so its contents are consistent: keep routing.
fn read(lock: &ShardLock) -> RwLockReadGuard<'_, Shard> {
    lock.lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(lock: &ShardLock) -> RwLockWriteGuard<'_, Shard> {
    #[cfg(test)]
    lock.writes.fetch_add(1, Ordering::Relaxed);
    lock.lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// What one [`OverrideTable::maintain`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Entries idle past the TTL.
    pub expired: usize,
    /// Live entries the capacity sweep evicted, least recently touched first.
    pub evicted: usize,
    /// Entries that inserts replaced at the [ceiling](OverrideTable::ceiling) since the
    /// previous maintenance (not removed by this one): more than zero means inserts outran
    /// maintenance and the table worked as a per-neighbourhood LRU meanwhile.
    pub evicted_on_insert: usize,
    /// New entries of tenants holding their whole share, since the previous maintenance:
    /// each replaced one of its own tenant's entries, or was not made.
    pub over_share: usize,
}

impl Maintenance {
    /// Every entry counted here.
    pub fn removed(&self) -> usize {
        self.expired + self.evicted + self.evicted_on_insert
    }
}

/// What [`OverrideTable::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The key had no entry.
    New,
    /// The key's entry named another replica (or was removed).
    Moved,
    /// The key had no entry, and none was made: its tenant holds its whole share of the table
    /// and no entry of its own was near enough to replace. Routing falls back to the ring.
    OverShare,
    /// The entry already named this replica: only its idle time was refreshed, from
    /// `last_touched` to `now` (seconds on the table's clock).
    Kept {
        /// When it was touched before.
        last_touched: u32,
        /// Now.
        now: u32,
    },
}

/// Key → replica that last served it, with idle TTL and a capacity bound.
///
/// Locks: [`get`](Self::get), and a [`record`](Self::record) that finds the key already on
/// that replica, take only the read lock of the key's shard (one of 64). A record of a new key
/// or of a different replica, and [`remove`](Self::remove), take that shard's write lock.
/// [`maintain`](Self::maintain) takes every shard's write lock in turn and belongs on a
/// background task: call it soon after [`needs_maintenance`](Self::needs_maintenance) turns
/// true, and periodically for the idle purge. Between its runs the table holds at most
/// [`ceiling`](Self::ceiling) entries.
pub struct OverrideTable<C: Clock = MonotonicClock> {
    shards: Box<[ShardLock]>,
    // Atomics so a reload can change them under traffic (relaxed: each is read on its own).
    ttl_secs: AtomicU32,
    capacity: AtomicUsize,
    /// Sum of the shards' `len`, plus inserts in flight. An insert counts itself, only while
    /// that keeps `len` within the ceiling, before it adds its entry under its shard's write
    /// lock; a removal subtracts after its shard's count shrank. So it never underflows, never
    /// exceeds the ceiling through an insert, and equals the sum whenever no insert is in
    /// flight.
    len: AtomicUsize,
    /// Set while one thread runs [`maintain`](Self::maintain).
    maintaining: AtomicBool,
    /// Entries replaced by inserts at the ceiling since the last maintenance.
    evicted_on_insert: AtomicUsize,
    /// Entries per share group (also held by every shard, which keeps them current).
    group_len: Arc<GroupCounts>,
    shares: TenantShares,
    /// New entries that replaced an entry of their own tenant, or were not made, because
    /// their tenant held its whole share, since the last maintenance.
    over_share: AtomicUsize,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for OverrideTable<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverrideTable")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl OverrideTable<MonotonicClock> {
    /// A table on the monotonic clock.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self::with_clock(ttl, capacity, MonotonicClock::new())
    }
}

impl<C: Clock> OverrideTable<C> {
    /// A table on an injected clock (tests use [`ManualClock`](crate::ManualClock)).
    ///
    /// `ttl` is rounded up to whole seconds (minimum 1); `capacity` is at least 1.
    pub fn with_clock(ttl: Duration, capacity: usize, clock: C) -> Self {
        let (ttl_secs, capacity) = Self::limits(ttl, capacity);
        let group_len = Arc::new(GroupCounts::new());
        OverrideTable {
            shards: (0..SHARDS)
                .map(|_| ShardLock::new(Shard::with_slots(MIN_SLOTS, Arc::clone(&group_len))))
                .collect(),
            group_len,
            shares: TenantShares::default(),
            over_share: AtomicUsize::new(0),
            ttl_secs: AtomicU32::new(ttl_secs),
            capacity: AtomicUsize::new(capacity),
            len: AtomicUsize::new(0),
            maintaining: AtomicBool::new(false),
            evicted_on_insert: AtomicUsize::new(0),
            clock,
        }
    }

    /// Number of entries, live or expired but not yet removed by maintenance. At most
    /// [`ceiling`](Self::ceiling) (see the module docs for the one exception).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when the table holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `ttl` rounded up to whole seconds (minimum 1), and `capacity` (minimum 1).
    fn limits(ttl: Duration, capacity: usize) -> (u32, usize) {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        (
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
            capacity.max(1),
        )
    }

    /// Changes the idle TTL and the capacity (a reload). Entries are judged by the new TTL
    /// from the next lookup. A smaller capacity takes effect at the next
    /// [`maintain`](Self::maintain) ([`needs_maintenance`](Self::needs_maintenance) turns true);
    /// until then an insert into a table past the new ceiling replaces an entry.
    pub fn set_limits(&self, ttl: Duration, capacity: usize) {
        let (ttl_secs, capacity) = Self::limits(ttl, capacity);
        self.ttl_secs.store(ttl_secs, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// The configured capacity: [`maintain`](Self::maintain) keeps the table at or below it.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// The most entries the table holds between maintenance runs: `capacity + capacity / 8`.
    /// An insert that would pass it replaces an old entry of its neighbourhood instead.
    pub fn ceiling(&self) -> usize {
        let capacity = self.capacity();
        capacity.saturating_add(capacity / 8)
    }

    /// True when the table is over capacity, so [`maintain`](Self::maintain) should run now
    /// rather than at its next periodic turn. Two relaxed loads.
    pub fn needs_maintenance(&self) -> bool {
        self.len() > self.capacity()
    }

    /// The shard owning `key`: its top bits (the home slot uses the low bits).
    fn shard_index(key: u64) -> usize {
        (key >> (u64::BITS - SHARD_BITS)) as usize
    }

    fn shard(&self, key: u64) -> &ShardLock {
        &self.shards[Self::shard_index(key)]
    }

    fn expired(&self, touched: u32, now: u32) -> bool {
        now.saturating_sub(touched) >= self.ttl_secs.load(Ordering::Relaxed)
    }

    /// The replica that last served `key`, unless the entry has idled past the TTL.
    ///
    /// Takes the shard's read lock and writes nothing: a dead entry is left for
    /// [`maintain`](Self::maintain).
    pub fn get(&self, key: RoutingKey) -> Option<ReplicaTag> {
        let now = self.clock.now_secs();
        let shard = read(self.shard(key.0));
        let slot = shard.find(key.0)?;
        (!self.expired(slot.touched(), now)).then_some(ReplicaTag(slot.tag()))
    }

    /// How many slots a lookup of `key` reads: 1 when its home slot holds it or is empty, more
    /// when it sits further along a probe run. With keys spread by a hash this stays a few
    /// slots; the measure of what keys crafted to collide cost (see [`KeySecret`](crate::KeySecret)).
    pub fn probe_len(&self, key: RoutingKey) -> usize {
        read(self.shard(key.0)).probe_len(key.0)
    }

    /// Records that `tag` served `key` now (inserting or refreshing the entry).
    ///
    /// When the entry already holds `tag` (a sticky turn) this only refreshes its last-touched
    /// second, under the shard's read lock. A new key or a different tag takes the shard's
    /// write lock; a new key that would take the table past the [ceiling](Self::ceiling)
    /// replaces the least recently touched of a few entries near its home slot.
    ///
    /// Tags above [`MAX_REPLICA_TAG`] are reserved (one marks empty slots, and
    /// [`TagRegistry`](crate::TagRegistry) never assigns them): recording one is a bug, caught
    /// by a debug assertion; release builds treat it as [`remove`](Self::remove) so the table
    /// stays sound.
    pub fn record(&self, key: RoutingKey, tag: ReplicaTag) -> Recorded {
        self.record_for(key, tag, None)
    }

    /// [`record`](Self::record) for a session of `tenant`: a new entry counts against the
    /// tenant's share of the table ([`set_tenant_shares`](Self::set_tenant_shares)). A tenant
    /// holding its whole share replaces its own least recently touched entry near the new
    /// key's home slot, never another tenant's; with none of its own there, the new entry is
    /// not made ([`Recorded::OverShare`]). A sticky turn costs nothing more than in `record`.
    pub fn record_for(
        &self,
        key: RoutingKey,
        tag: ReplicaTag,
        tenant: Option<TenantScope>,
    ) -> Recorded {
        debug_assert!(tag.0 <= MAX_REPLICA_TAG, "{tag:?} is reserved");
        if tag.0 > MAX_REPLICA_TAG {
            self.remove(key);
            return Recorded::Moved;
        }
        let now = self.clock.now_secs();
        let lock = self.shard(key.0);
        {
            let shard = read(lock);
            if let Some(slot) = shard.find(key.0) {
                if slot.tag() == tag.0 {
                    let last_touched = slot.touched();
                    slot.touch(now);
                    // An entry past its TTL (not yet purged) had been forgotten: its return
                    // is a new binding, which a shared store may have lost meanwhile, and
                    // the replica may rightly have evicted the prefix of its last turn.
                    if self.expired(last_touched, now) {
                        slot.exchange_prompt(tag.0, 0);
                        return Recorded::New;
                    }
                    return Recorded::Kept { last_touched, now };
                }
            }
        }
        self.write_entry(
            lock,
            Entry {
                key: key.0,
                tag: tag.0,
                touched: now,
                prompt: 0,
                group: tenant.map_or(0, |t| self.group_of(t)),
            },
        )
    }

    /// Gives each of `tenants` a share of the table: at most `share` × capacity entries
    /// (`share` in (0, 1]; 1 = no limit). Tenants registered before keep their group;
    /// sessions of tenants never registered are not counted.
    pub fn set_tenant_shares(&self, tenants: impl IntoIterator<Item = TenantScope>, share: f64) {
        // Truncation is intended: millionths of a share in (0, 1].
        let ppm = if share > 0.0 && share < 1.0 {
            // At least one millionth: a share too small to count is still a share.
            ((share * 1e6) as u32).max(1)
        } else {
            0
        };
        self.shares.share_ppm.store(ppm, Ordering::Relaxed);
        let mut groups = self
            .shares
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for tenant in tenants {
            let next = groups.len() + 1;
            if next < GROUPS {
                // Never 0, never past 255: checked just above.
                groups.entry(tenant.hash()).or_insert(next as u8);
            }
        }
    }

    /// The share group of `tenant`: 0 when it holds no share.
    fn group_of(&self, tenant: TenantScope) -> u8 {
        if self.shares.share_ppm.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let groups = self
            .shares
            .groups
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        groups.get(&tenant.hash()).copied().unwrap_or(0)
    }

    /// Whether share group `group` holds all it may.
    fn over_share(&self, group: u8) -> bool {
        let ppm = self.shares.share_ppm.load(Ordering::Relaxed);
        if group == 0 || ppm == 0 {
            return false;
        }
        let cap = (self.capacity() as u128 * u128::from(ppm) / 1_000_000).max(1);
        self.group_len.get(group) as u128 >= cap
    }

    /// Entries counted against `tenant`'s share (live or not yet purged).
    pub fn tenant_len(&self, tenant: TenantScope) -> usize {
        match self.group_of(tenant) {
            0 => 0,
            group => self.group_len.get(group),
        }
    }

    /// The idle TTL in seconds.
    pub fn ttl_secs(&self) -> u32 {
        self.ttl_secs.load(Ordering::Relaxed)
    }

    /// The write-locked part of [`record`](Self::record): a new key, or a key that moved.
    fn write_entry(&self, lock: &ShardLock, entry: Entry) -> Recorded {
        // Set when an entry was evicted from another shard to make room for this insert: its
        // count in `len` now belongs to this insert.
        let mut carried = false;
        loop {
            let mut shard = write(lock);
            let at = match shard.probe(entry.key) {
                // Recorded meanwhile by another thread, or a different tag: update in place.
                Ok(i) => {
                    let slot = &mut shard.slots[i];
                    let moved = slot.tag() != entry.tag;
                    if moved {
                        // The previous turn's size was the old replica's cache.
                        *slot.tag_prompt.get_mut() = entry.tag;
                    }
                    let touched = slot.touched.get_mut();
                    let last_touched = *touched;
                    *touched = (*touched).max(entry.touched);
                    if carried {
                        self.len.fetch_sub(1, Ordering::Relaxed);
                    }
                    return if moved {
                        Recorded::Moved
                    } else {
                        Recorded::Kept {
                            last_touched,
                            now: entry.touched,
                        }
                    };
                }
                Err(at) => at,
            };
            if !carried && self.over_share(entry.group) {
                self.over_share.fetch_add(1, Ordering::Relaxed);
                return match shard.oldest_of_group_near(entry.key, entry.group) {
                    Some(own) => {
                        shard.replace(own, entry);
                        Recorded::New
                    }
                    None => Recorded::OverShare,
                };
            }
            if carried || self.reserve() {
                shard.insert_absent(at, entry);
                return Recorded::New;
            }
            if let Some(victim) = shard.oldest_near(entry.key) {
                shard.replace(victim, entry);
                self.evicted_on_insert.fetch_add(1, Ordering::Relaxed);
                return Recorded::New;
            }
            // This shard holds nothing to evict, which takes a tiny table: evict from another
            // shard, never holding two locks, then try again.
            drop(shard);
            carried = self.evict_elsewhere(entry.key);
            if !carried {
                // Every entry counted is an insert in flight; it completes under its own lock.
                std::thread::yield_now();
            }
        }
    }

    /// Counts one more entry in `len` if that keeps it within the ceiling.
    fn reserve(&self) -> bool {
        let ceiling = self.ceiling();
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < ceiling).then_some(n + 1)
            })
            .is_ok()
    }

    /// Evicts the least recently touched of a few entries near `key`'s home slot in the first
    /// shard after `key`'s own that holds any; false if none does. Leaves `len` unchanged: the
    /// caller's insert takes over the count.
    fn evict_elsewhere(&self, key: u64) -> bool {
        let own = Self::shard_index(key);
        for n in 1..SHARDS {
            let mut shard = write(&self.shards[(own + n) % SHARDS]);
            if let Some(victim) = shard.oldest_near(key) {
                shard.delete_at(victim);
                self.evicted_on_insert.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Forgets `key`.
    pub fn remove(&self, key: RoutingKey) -> Option<ReplicaTag> {
        let mut shard = write(self.shard(key.0));
        let i = shard.probe(key.0).ok()?;
        let tag = shard.slots[i].tag();
        shard.delete_at(i);
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(ReplicaTag(tag))
    }

    /// Removes every entry idle past the TTL and, when the table is over capacity, sweeps it
    /// down to 7/8 of capacity, least recently touched first. O(capacity): each shard's write
    /// lock in turn, so run it off the request path: periodically for the TTL, and soon after
    /// [`needs_maintenance`](Self::needs_maintenance) turns true. One thread at a time: a call
    /// made while another runs returns at once, reporting nothing.
    pub fn maintain(&self) -> Maintenance {
        if self
            .maintaining
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Maintenance::default();
        }
        let now = self.clock.now_secs();
        let capacity = self.capacity();
        let (expired, evicted) = if self.len() > capacity {
            self.sweep_to(capacity - capacity / 8, now)
        } else {
            (self.retain(|e| !self.expired(e.touched, now)), 0)
        };
        let done = Maintenance {
            expired,
            evicted,
            evicted_on_insert: self.evicted_on_insert.swap(0, Ordering::Relaxed),
            over_share: self.over_share.swap(0, Ordering::Relaxed),
        };
        self.maintaining.store(false, Ordering::Release);
        done
    }

    /// Calls `f` on every entry, one shard (read-locked) at a time.
    fn for_each(&self, mut f: impl FnMut(Entry)) {
        for lock in self.shards.iter() {
            read(lock)
                .slots
                .iter()
                .filter(|s| !s.is_empty())
                .for_each(|s| f(s.entry()));
        }
    }

    /// Number of live entries per replica tag, in one O(n) scan (for the admin API).
    /// Every live entry as `(key, replica)`, read one shard (read-locked) at a time: what a
    /// tier writes back to its shared store after the store lost data.
    pub fn entries(&self) -> Vec<(RoutingKey, ReplicaTag)> {
        let now = self.clock.now_secs();
        let mut entries = Vec::with_capacity(self.len());
        self.for_each(|e| {
            if !self.expired(e.touched, now) {
                entries.push((RoutingKey(e.key), ReplicaTag(e.tag)));
            }
        });
        entries
    }

    /// The entry of `key` and the second it was last touched, if live.
    pub fn get_touched(&self, key: RoutingKey) -> Option<(ReplicaTag, u32)> {
        let now = self.clock.now_secs();
        let shard = read(self.shard(key.0));
        let slot = shard.find(key.0)?;
        let touched = slot.touched();
        (!self.expired(touched, now)).then_some((ReplicaTag(slot.tag()), touched))
    }

    /// Stores the prompt size of the turn `tag` just served for `key`, and returns the size
    /// stored by the session's turn before it on the same replica, if known.
    ///
    /// A warm replica should now hold about the returned number of tokens of this session's
    /// prefix: the cache-loss detector's expectation. Does nothing, and returns `None`, when
    /// the entry is absent, idle past its TTL or held by another replica (the turn was not
    /// recorded, or another turn moved the session since). `None` for `tokens` (usage not
    /// read) stores "unknown". The stored size is rounded down to within 0.4 % and
    /// saturates at [`MAX_PROMPT_COUNT`](crate::MAX_PROMPT_COUNT).
    ///
    /// Takes the shard's read lock only: a sticky turn still takes no write lock.
    pub fn exchange_prompt_tokens(
        &self,
        key: RoutingKey,
        tag: ReplicaTag,
        tokens: Option<u64>,
    ) -> Option<u64> {
        if tag.0 > MAX_REPLICA_TAG {
            return None;
        }
        let now = self.clock.now_secs();
        let shard = read(self.shard(key.0));
        let slot = shard.find(key.0)?;
        if self.expired(slot.touched(), now) {
            return None;
        }
        let previous = slot.exchange_prompt(tag.0, prompt_count::encode(tokens.unwrap_or(0)))?;
        (previous != 0).then(|| prompt_count::decode(previous))
    }

    /// Now, in the table's seconds.
    pub fn now_secs(&self) -> u32 {
        self.clock.now_secs()
    }

    pub fn counts_by_tag(&self) -> std::collections::HashMap<ReplicaTag, usize> {
        let now = self.clock.now_secs();
        let mut counts = std::collections::HashMap::new();
        self.for_each(|e| {
            if !self.expired(e.touched, now) {
                *counts.entry(ReplicaTag(e.tag)).or_insert(0) += 1;
            }
        });
        counts
    }

    /// Removes every entry `keep` refuses, one shard (write-locked) at a time; returns how many.
    fn retain(&self, mut keep: impl FnMut(Entry) -> bool) -> usize {
        let mut removed = 0;
        for lock in self.shards.iter() {
            let mut shard = write(lock);
            let n = shard.retain(&mut keep);
            if n > 0 {
                self.len.fetch_sub(n, Ordering::Relaxed);
                removed += n;
            }
        }
        removed
    }

    /// Removes the expired entries and sweeps the table down to about `target` entries, oldest
    /// first; returns how many (expired, evicted). Run by the one maintainer.
    fn sweep_to(&self, target: usize, now: u32) -> (usize, usize) {
        let len = self.len().max(1);
        let excess = len.saturating_sub(target);
        if excess == 0 {
            return (self.retain(|e| !self.expired(e.touched, now)), 0);
        }

        // Keys are uniform hashes and slots are ordered by the key's low bits, so the first
        // entries of the first shards are a random sample of the table.
        let mut sample: Vec<u32> = Vec::with_capacity(EVICTION_SAMPLE);
        for lock in self.shards.iter() {
            let room = EVICTION_SAMPLE - sample.len();
            if room == 0 {
                break;
            }
            let shard = read(lock);
            let entries = shard.slots.iter().filter(|s| !s.is_empty());
            sample.extend(entries.take(room).map(Slot::touched));
        }
        sample.sort_unstable();
        let want = ((excess as u128 * sample.len() as u128).div_ceil(len as u128) as usize)
            .clamp(1, sample.len().max(1));
        let cutoff = sample.get(want - 1).copied().unwrap_or(u32::MAX);
        let older = sample.partition_point(|t| *t < cutoff);
        let at_cutoff = sample[older..].partition_point(|t| *t <= cutoff).max(1) as u64;
        // Of the entries touched exactly at the cut-off second, evict this fraction, chosen by
        // key bits (uniform) rather than all of them: under a burst every entry may share one
        // second, and evicting all would empty the table.
        let evict_at_cutoff = (want - older) as u64;

        let (mut expired, mut evicted) = (0, 0);
        self.retain(|e| {
            if self.expired(e.touched, now) {
                expired += 1;
                return false;
            }
            let evict = e.touched < cutoff
                || (e.touched == cutoff && (e.key >> 40) % at_cutoff < evict_at_cutoff);
            evicted += usize::from(evict);
            !evict
        });
        if self.len() > self.capacity() {
            // The sample under-estimated the old entries (or the key-bit split at the cut-off
            // fell short, as it can on a small table). Evict exactly the rest of the excess:
            // what is left of the cut-off second first, then, only if that is too little, any
            // entries. Never the whole cut-off second: in a burst that is the whole table.
            let mut left = self.len().saturating_sub(target);
            for oldest in [cutoff, u32::MAX] {
                if left == 0 {
                    break;
                }
                evicted += self.retain(|e| {
                    let evict = left > 0 && e.touched <= oldest;
                    left -= usize::from(evict);
                    !evict
                });
            }
        }
        (expired, evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};
    use std::collections::HashMap;

    fn table(ttl_secs: u64, capacity: usize) -> OverrideTable<ManualClock> {
        OverrideTable::with_clock(
            Duration::from_secs(ttl_secs),
            capacity,
            ManualClock::default(),
        )
    }

    impl<C: Clock> OverrideTable<C> {
        /// Write-lock acquisitions so far, over every shard.
        fn writes(&self) -> usize {
            self.shards
                .iter()
                .map(|lock| lock.writes.load(Ordering::Relaxed))
                .sum()
        }

        /// What the proxy's background task does on each tick.
        fn maintain_if_needed(&self) -> Maintenance {
            if self.needs_maintenance() {
                self.maintain()
            } else {
                Maintenance::default()
            }
        }

        /// Entries counted shard by shard (compare with the `len` counter).
        fn counted_len(&self) -> usize {
            self.shards.iter().map(|lock| read(lock).len).sum()
        }

        /// Asserts every shard's structural invariants; returns the number of entries.
        fn check_invariants(&self) -> usize {
            let mut total = 0;
            let mut groups = [0usize; GROUPS];
            for (s, lock) in self.shards.iter().enumerate() {
                let shard = read(lock);
                let n = shard.slots.len();
                let mask = n - 1;
                assert!(
                    n.is_power_of_two() && n >= MIN_SLOTS,
                    "shard {s}: {n} slots"
                );
                let occupied = shard.slots.iter().filter(|e| !e.is_empty()).count();
                assert_eq!(occupied, shard.len, "shard {s}: len counter");
                assert!(shard.len * 4 <= n * 3, "shard {s}: load {}/{n}", shard.len);
                assert_eq!(shard.ctrl.len(), n, "shard {s}: one control byte per slot");
                assert_eq!(shard.groups.len(), n, "shard {s}: one group per slot");
                for (i, g) in shard.groups.iter().enumerate() {
                    assert!(
                        *g == 0 || !shard.slots[i].is_empty(),
                        "group on an empty slot"
                    );
                    groups[usize::from(*g)] += 1;
                }
                for (i, e) in shard.slots.iter().enumerate() {
                    let expected = if e.is_empty() { 0 } else { control(e.key) };
                    assert_eq!(shard.ctrl[i], expected, "shard {s}: control byte {i}");
                    if e.is_empty() {
                        continue;
                    }
                    assert_eq!(
                        (e.key >> (64 - SHARD_BITS)) as usize,
                        s,
                        "key in wrong shard"
                    );
                    // An unbroken run from the home slot to the entry.
                    let mut j = e.key as usize & mask;
                    while j != i {
                        assert!(
                            !shard.slots[j].is_empty(),
                            "hole in the run of {:#x}",
                            e.key
                        );
                        j = (j + 1) & mask;
                    }
                    // Found where it is (so keys are unique too).
                    assert_eq!(shard.probe(e.key), Ok(i));
                }
                total += shard.len;
            }
            assert_eq!(total, self.counted_len());
            for (g, n) in groups.iter().enumerate().skip(1) {
                assert_eq!(self.group_len.get(g as u8), *n, "group {g} count");
            }
            total
        }
    }

    /// Key `k` spread over the whole 64-bit space (every shard and slot), as real keys are.
    fn spread(k: u64) -> RoutingKey {
        RoutingKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // Fixed seed: deterministic CI; no regression files written into the tree.
            rng_seed: RngSeed::Fixed(0x0_5107),
            failure_persistence: None,
            ..Config::default()
        }
    }

    #[test]
    fn recorded_entry_is_returned() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
        assert_eq!(t.get(RoutingKey(2)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn re_recording_moves_the_session_and_does_not_grow_the_table() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.record(RoutingKey(1), ReplicaTag(8));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(8)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn entry_expires_after_idle_ttl() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(59);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
        t.clock.advance(1);
        assert_eq!(t.get(RoutingKey(1)), None);
        assert_eq!(t.len(), 1, "a lookup leaves the dead entry to maintenance");
        assert_eq!(t.counts_by_tag().get(&ReplicaTag(7)), None);
        assert_eq!(
            t.maintain(),
            Maintenance {
                expired: 1,
                ..Maintenance::default()
            }
        );
        assert_eq!(t.len(), 0);
        assert_eq!(t.get(RoutingKey(1)), None);
    }

    #[test]
    fn a_dead_entry_comes_back_when_recorded_again() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(60);
        assert_eq!(t.get(RoutingKey(1)), None);
        t.record(RoutingKey(1), ReplicaTag(7));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
        assert_eq!(t.maintain().expired, 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn touching_an_entry_restarts_its_ttl() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(50);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(50);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
    }

    #[test]
    fn purge_removes_only_expired_entries() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.clock.advance(30);
        t.record(RoutingKey(2), ReplicaTag(2));
        t.clock.advance(30);
        assert_eq!(t.maintain().expired, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(RoutingKey(2)), Some(ReplicaTag(2)));
    }

    #[test]
    fn maintenance_keeps_the_capacity_and_the_oldest_go_first() {
        let t = table(3600, 1000);
        for k in 0..1000u64 {
            t.record(spread(k), ReplicaTag(0));
        }
        t.clock.advance(1);
        let mut replaced = 0;
        for k in 1000..5000u64 {
            t.record(spread(k), ReplicaTag(1));
            replaced += t.maintain_if_needed().evicted_on_insert;
            assert!(t.len() <= 1000, "len {} at insert {k}", t.len());
        }
        assert_eq!(
            replaced, 0,
            "maintenance kept up: no insert met the ceiling"
        );
        // Everything from the first second is older than anything after it.
        let old_left = (0..1000u64).filter(|k| t.get(spread(*k)).is_some()).count();
        assert_eq!(old_left, 0);
        assert_eq!(t.len(), t.counted_len());
        t.check_invariants();
    }

    #[test]
    fn maintenance_brings_an_over_capacity_table_to_seven_eighths_oldest_first() {
        let t = table(3600, 1000);
        // 1,100 entries, each touched in its own second: over capacity, under the ceiling.
        for k in 0..1100u64 {
            t.record(spread(k), ReplicaTag(0));
            t.clock.advance(1);
        }
        assert_eq!(t.len(), 1100, "no insert evicts below the ceiling");
        assert!(t.needs_maintenance());
        assert_eq!(
            t.maintain(),
            Maintenance {
                evicted: 225,
                ..Maintenance::default()
            }
        );
        assert_eq!(t.len(), 875);
        assert!(!t.needs_maintenance());
        let kept: Vec<u64> = (0..1100u64)
            .filter(|k| t.get(spread(*k)).is_some())
            .collect();
        assert_eq!(
            kept,
            (225..1100).collect::<Vec<_>>(),
            "exactly the oldest went"
        );
        assert_eq!(
            t.maintain(),
            Maintenance::default(),
            "under capacity: nothing to do"
        );
        assert_eq!(t.check_invariants(), 875);
    }

    #[test]
    fn maintenance_removes_expired_entries_before_evicting_live_ones() {
        let t = table(100, 1000);
        for k in 0..600u64 {
            t.record(spread(k), ReplicaTag(0));
        }
        t.clock.advance(50);
        for k in 600..1100u64 {
            t.record(spread(k), ReplicaTag(1));
        }
        t.clock.advance(60);
        // 1,100 entries, over capacity; the first 600 are dead.
        assert_eq!(
            t.maintain(),
            Maintenance {
                expired: 600,
                ..Maintenance::default()
            }
        );
        assert_eq!(t.counts_by_tag(), HashMap::from([(ReplicaTag(1), 500)]));
        assert_eq!(t.check_invariants(), 500);
    }

    #[test]
    fn a_burst_in_one_second_evicts_a_fraction_not_everything() {
        let t = table(3600, 10_000);
        for k in 0..10_001u64 {
            t.record(spread(k), ReplicaTag(0));
        }
        assert_eq!(t.len(), 10_001, "inserts do not sweep");
        let done = t.maintain();
        let len = t.len();
        assert!(
            (8000..=9500).contains(&len),
            "a sweep should leave about 7/8 of capacity, left {len}"
        );
        assert_eq!(done.evicted, 10_001 - len);
        assert_eq!(len, t.counted_len());
        t.check_invariants();
    }

    #[test]
    fn a_burst_never_empties_a_small_table() {
        // On a small table the key-bit split at the cut-off second can evict too few; the
        // fallback must evict exactly the rest, never that whole second (i.e. everything).
        for capacity in 1..=64usize {
            let t = table(3600, capacity);
            let inserts = 20 * capacity as u64;
            let mut held = 0;
            for k in 0..inserts {
                t.record(spread(k), ReplicaTag(0));
                let len = t.len();
                assert!(
                    (1..=t.ceiling()).contains(&len),
                    "capacity {capacity}: {len} entries after insert {k}"
                );
                t.maintain_if_needed();
                let len = t.len();
                assert!(
                    (1..=capacity).contains(&len),
                    "capacity {capacity}: {len} entries after maintenance at insert {k}"
                );
                held += len;
            }
            // The split at the cut-off is random (key bits), so one sweep may take a little
            // more than 1/8 on a tiny table; on average the table stays about full.
            let mean = held as f64 / inserts as f64;
            assert!(
                mean >= 0.75 * capacity as f64,
                "capacity {capacity}: {mean:.1} entries on average"
            );
            assert_eq!(t.len(), t.counted_len());
            t.check_invariants();
        }
    }

    #[test]
    fn a_purge_shrinks_sparse_shards_to_at_most_64_bytes_an_entry() {
        let t = table(10, 1_000_000);
        for k in 0..200_000u64 {
            t.record(spread(k), ReplicaTag(0));
        }
        t.clock.advance(5);
        // Every 16th session stays active; the rest expire.
        for k in (0..200_000u64).step_by(16) {
            t.record(spread(k), ReplicaTag(1));
        }
        t.clock.advance(6);
        assert_eq!(t.maintain().expired, 200_000 - 12_500);
        let live = t.check_invariants();
        assert_eq!(live, 12_500);
        let bytes: usize = t
            .shards
            .iter()
            .map(|lock| read(lock).slots.len() * 17)
            .sum();
        let per_entry = bytes as f64 / live as f64;
        assert!(
            per_entry <= 64.0,
            "{per_entry:.1} bytes an entry after the purge"
        );
        for k in (0..200_000u64).step_by(16) {
            assert_eq!(t.get(spread(k)), Some(ReplicaTag(1)), "key {k}");
        }
    }

    #[test]
    fn counts_by_tag_counts_live_entries_of_each_replica() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.record(RoutingKey(2), ReplicaTag(1));
        t.record(RoutingKey(3), ReplicaTag(2));
        assert_eq!(t.counts_by_tag().get(&ReplicaTag(1)), Some(&2));
        assert_eq!(t.remove(RoutingKey(1)), Some(ReplicaTag(1)));
        let counts = t.counts_by_tag();
        assert_eq!(counts.get(&ReplicaTag(1)), Some(&1));
        assert_eq!(counts.get(&ReplicaTag(2)), Some(&1));
        assert_eq!(counts.get(&ReplicaTag(3)), None);
        t.clock.advance(30);
        t.record(RoutingKey(4), ReplicaTag(3));
        t.clock.advance(30);
        let live = t.counts_by_tag();
        assert_eq!(
            live,
            HashMap::from([(ReplicaTag(3), 1)]),
            "dead entries are not counted"
        );
    }

    #[test]
    fn limits_change_live() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.clock.advance(30);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(1)));
        t.set_limits(Duration::from_secs(10), 50);
        assert_eq!(t.capacity(), 50);
        t.clock.advance(11);
        assert_eq!(t.get(RoutingKey(1)), None, "judged by the new TTL");
    }

    #[test]
    fn zero_ttl_and_capacity_are_clamped_to_one() {
        let t = table(0, 0);
        assert_eq!(t.capacity(), 1);
        t.record(RoutingKey(1), ReplicaTag(1));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(1)));
    }

    // ---- The open-addressing layout. ----

    #[test]
    fn the_table_is_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<OverrideTable>();
        send_sync::<OverrideTable<ManualClock>>();
    }

    #[test]
    fn a_smaller_capacity_applies_at_the_next_maintenance() {
        let t = table(3600, 1000);
        for k in 0..500u64 {
            t.record(spread(k), ReplicaTag(0));
            t.clock.advance(1);
        }
        t.set_limits(Duration::from_secs(3600), 100);
        assert_eq!(t.len(), 500, "nothing is evicted until maintenance");
        assert!(t.needs_maintenance());
        t.record(RoutingKey(u64::MAX), ReplicaTag(1));
        assert_eq!(
            t.len(),
            500,
            "past the new ceiling an insert replaces an entry"
        );
        let done = t.maintain();
        assert_eq!((done.evicted, done.evicted_on_insert), (500 - 88, 1));
        assert_eq!(t.len(), 88, "7/8 of the new capacity");
        assert_eq!(
            t.get(RoutingKey(u64::MAX)),
            Some(ReplicaTag(1)),
            "newest entry kept"
        );
        let kept = (0..500u64).filter(|k| t.get(spread(*k)).is_some()).count();
        let newest = (500 - 87..500u64)
            .filter(|k| t.get(spread(*k)).is_some())
            .count();
        assert_eq!(
            (kept, newest),
            (87, 87),
            "the newest entries are the ones kept"
        );
        assert_eq!(t.len(), t.check_invariants());
    }

    #[test]
    fn a_sticky_turn_takes_no_write_lock() {
        let t = table(60, 100);
        let k = RoutingKey(1);
        let writes = || t.shard(k.0).writes.load(Ordering::Relaxed);
        t.record(k, ReplicaTag(7));
        assert_eq!(writes(), 1, "a new key takes the write lock once");
        for _ in 0..3 {
            t.clock.advance(50);
            assert_eq!(t.get(k), Some(ReplicaTag(7)));
            t.record(k, ReplicaTag(7));
        }
        assert_eq!(
            writes(),
            1,
            "lookups and same-replica records take only the read lock"
        );
        // The refreshes under the read lock count: 150 s after the insert, with a 60 s TTL.
        t.clock.advance(59);
        assert_eq!(t.get(k), Some(ReplicaTag(7)));
        t.record(k, ReplicaTag(8));
        assert_eq!(writes(), 2, "moving to another replica takes it");
        assert_eq!(t.get(k), Some(ReplicaTag(8)));
        t.clock.advance(60);
        assert_eq!(t.get(k), None);
        assert_eq!(
            t.writes(),
            2,
            "nor does a lookup of a dead entry, in any shard"
        );
    }

    #[test]
    fn a_flood_without_maintenance_never_passes_the_ceiling() {
        const INSERTS: u64 = 50_000;
        let t = table(3600, 1000);
        assert_eq!(t.ceiling(), 1125);
        for k in 0..INSERTS {
            let before = t.writes();
            t.record(spread(k), ReplicaTag(0));
            assert!(t.len() <= 1125, "len {} at insert {k}", t.len());
            assert_eq!(t.writes(), before + 1, "one write lock, its own shard's");
            if k % 100 == 99 {
                t.clock.advance(1);
            }
        }
        assert_eq!(t.len(), 1125);
        assert_eq!(t.check_invariants(), 1125);
        // Each insert replaced the oldest of its neighbours: the table holds mostly the most
        // recent inserts, not a random sample of all 50,000.
        let recent = (INSERTS - 1125..INSERTS)
            .filter(|k| t.get(spread(*k)).is_some())
            .count();
        assert!(recent >= 1000, "{recent} of the newest 1,125 kept");
        let done = t.maintain();
        assert_eq!(done.evicted_on_insert, INSERTS as usize - 1125);
        // About 7/8 of capacity: the cut-off second is split by key bits, so not exactly.
        assert!((850..=900).contains(&t.len()), "len {}", t.len());
        assert_eq!(t.check_invariants(), t.len());
    }

    #[test]
    fn an_insert_into_a_tiny_full_table_takes_room_from_another_shard() {
        let t = table(3600, 1);
        t.record(RoutingKey(1), ReplicaTag(1)); // shard 0
        t.clock.advance(1);
        t.record(RoutingKey(u64::MAX), ReplicaTag(2)); // shard 63, empty
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(RoutingKey(u64::MAX)), Some(ReplicaTag(2)));
        assert_eq!(t.get(RoutingKey(1)), None);
        assert_eq!(t.maintain().evicted_on_insert, 1);
        assert_eq!(t.check_invariants(), 1);
    }

    /// A key in shard 0 whose home slot is `home` in any shard of up to 256 slots.
    fn homed(home: u64, n: u64) -> RoutingKey {
        RoutingKey((n << 8) | home)
    }

    #[test]
    fn deleting_from_the_middle_of_a_probe_run_keeps_every_other_key() {
        // Twelve keys (the most a 16-slot shard holds) in shard 0. Slots after inserting in
        // order (slot:key index):
        //   0:2  1:3  2:4  3:5  4:6  5:7  6:8  7:10  8:11  13:9  14:0  15:1
        // The run 13..=15,0..=8 wraps past the end of the array; key 10 sits at its home (7), so
        // removing key 8 (slot 6) must skip it and shift key 11 (home 4, slot 8) back over it.
        let homes = [14u64, 14, 14, 15, 14, 0, 2, 3, 3, 13, 7, 4];
        let keys: Vec<RoutingKey> = homes
            .iter()
            .enumerate()
            .map(|(n, h)| homed(*h, n as u64))
            .collect();
        let build = || {
            let t = table(3600, 1000);
            for (n, k) in keys.iter().enumerate() {
                t.record(*k, ReplicaTag(n as u32));
            }
            t
        };
        {
            let t = build();
            let shard = read(&t.shards[0]);
            assert_eq!(
                shard.slots.len(),
                16,
                "the run stays in one minimum-size shard"
            );
            let at: Vec<usize> = keys.iter().filter_map(|k| shard.probe(k.0).ok()).collect();
            assert_eq!(at, [14, 15, 0, 1, 2, 3, 4, 5, 6, 13, 7, 8]);
        }
        for victim in 0..keys.len() {
            let t = build();
            assert_eq!(t.remove(keys[victim]), Some(ReplicaTag(victim as u32)));
            assert_eq!(t.get(keys[victim]), None);
            for (n, k) in keys.iter().enumerate().filter(|(n, _)| *n != victim) {
                assert_eq!(
                    t.get(*k),
                    Some(ReplicaTag(n as u32)),
                    "key {n} after removing {victim}"
                );
            }
            assert_eq!(t.check_invariants(), keys.len() - 1);
            assert_eq!(t.len(), keys.len() - 1);
            // Then empty it in an order that keeps cutting runs in the middle.
            for (step, n) in (0..keys.len())
                .map(|i| (i * 7 + 3) % keys.len())
                .enumerate()
            {
                if n != victim {
                    assert_eq!(t.remove(keys[n]), Some(ReplicaTag(n as u32)), "step {step}");
                    t.check_invariants();
                }
            }
            assert!(t.is_empty());
        }
    }

    #[test]
    fn shards_grow_under_load_and_shrink_when_purged() {
        let t = table(10, 1 << 20);
        let keys: Vec<RoutingKey> = (0..200).map(|n| homed(n % 5, n)).collect();
        for k in &keys {
            t.record(*k, ReplicaTag(1));
        }
        assert!(
            read(&t.shards[0]).slots.len() >= 256,
            "grew to hold 200 entries at ≤ 3/4"
        );
        assert!(keys.iter().all(|k| t.get(*k) == Some(ReplicaTag(1))));
        t.check_invariants();
        t.clock.advance(5);
        t.record(keys[0], ReplicaTag(2));
        t.record(keys[1], ReplicaTag(2));
        t.clock.advance(5);
        assert_eq!(t.maintain().expired, 198);
        let slots = read(&t.shards[0]).slots.len();
        assert_eq!(
            slots, MIN_SLOTS,
            "a sparse shard shrinks, down to the minimum"
        );
        assert_eq!(t.get(keys[0]), Some(ReplicaTag(2)));
        assert_eq!(t.get(keys[1]), Some(ReplicaTag(2)));
        assert_eq!(t.check_invariants(), 2);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "reserved"))]
    fn the_empty_marker_tag_cannot_be_recorded() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(5));
        // Debug builds assert; release builds forget the key.
        t.record(RoutingKey(1), ReplicaTag(MAX_REPLICA_TAG + 1));
        assert_eq!(t.get(RoutingKey(1)), None);
        t.record(RoutingKey(2), ReplicaTag(u32::MAX));
        assert_eq!(t.get(RoutingKey(2)), None);
        assert_eq!(t.len(), 0);
        assert_eq!(t.check_invariants(), 0);
    }

    #[test]
    fn the_previous_turns_prompt_size_is_kept_per_replica_and_forgotten_on_a_move() {
        let t = table(60, 100);
        let (key, a, b) = (RoutingKey(7), ReplicaTag(1), ReplicaTag(2));
        assert_eq!(t.exchange_prompt_tokens(key, a, Some(10)), None, "no entry");
        t.record(key, a);
        assert_eq!(
            t.exchange_prompt_tokens(key, a, Some(1_000)),
            None,
            "first turn"
        );
        t.record(key, a);
        assert_eq!(t.exchange_prompt_tokens(key, a, Some(1_500)), Some(1_000));
        // Another replica's turn neither reads nor writes this replica's count.
        assert_eq!(t.exchange_prompt_tokens(key, b, Some(9)), None);
        assert_eq!(t.exchange_prompt_tokens(key, a, Some(2_000)), Some(1_500));
        // An unread usage stores "unknown".
        assert_eq!(t.exchange_prompt_tokens(key, a, None), Some(2_000));
        assert_eq!(t.exchange_prompt_tokens(key, a, Some(2_100)), None);
        // Moving the session forgets the old replica's count.
        assert_eq!(t.record(key, b), Recorded::Moved);
        assert_eq!(t.get(key), Some(b));
        assert_eq!(t.exchange_prompt_tokens(key, b, Some(3_000)), None);
        assert_eq!(t.exchange_prompt_tokens(key, b, Some(3_100)), Some(3_000));
        t.check_invariants();
    }

    #[test]
    fn the_prompt_size_survives_growth_and_is_forgotten_past_the_ttl() {
        let t = table(10, 1_000_000);
        t.record(RoutingKey(3), ReplicaTag(MAX_REPLICA_TAG));
        t.exchange_prompt_tokens(RoutingKey(3), ReplicaTag(MAX_REPLICA_TAG), Some(300));
        // Enough inserts to rebuild every shard a few times.
        for k in 0..20_000u64 {
            t.record(spread(k), ReplicaTag(0));
        }
        assert_eq!(t.get(RoutingKey(3)), Some(ReplicaTag(MAX_REPLICA_TAG)));
        let tag = ReplicaTag(MAX_REPLICA_TAG);
        assert_eq!(
            t.exchange_prompt_tokens(RoutingKey(3), tag, Some(400)),
            Some(300)
        );
        t.clock.advance(11);
        assert_eq!(t.exchange_prompt_tokens(RoutingKey(3), tag, Some(1)), None);
        // The session returns after its TTL: the count from before is gone.
        assert_eq!(t.record(RoutingKey(3), tag), Recorded::New);
        assert_eq!(
            t.exchange_prompt_tokens(RoutingKey(3), tag, Some(500)),
            None
        );
        t.check_invariants();
    }

    #[test]
    fn a_poisoned_shard_keeps_routing() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        let lock = t.shard(1);
        let panicked = std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = lock.lock.write();
                panic!("a panic while holding the shard lock (expected by this test)");
            })
            .join()
        });
        assert!(panicked.is_err() && lock.lock.is_poisoned());
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(1)));
        t.record(RoutingKey(2), ReplicaTag(2));
        assert_eq!(t.remove(RoutingKey(1)), Some(ReplicaTag(1)));
        assert_eq!(t.counts_by_tag().get(&ReplicaTag(2)), Some(&1));
        assert_eq!(t.maintain(), Maintenance::default());
        assert_eq!(t.check_invariants(), 1);
    }

    // ---- Tenant shares. ----

    #[test]
    fn a_tenant_over_its_share_replaces_its_own_entries_and_never_anothers() {
        let t = table(3600, 1000);
        let (flood, quiet) = (TenantScope::new("flood"), TenantScope::new("quiet"));
        t.set_tenant_shares([flood, quiet], 0.25);
        let quiet_keys: Vec<_> = (0..100).map(|n| spread(1 << 40 | n)).collect();
        for k in &quiet_keys {
            assert_eq!(t.record_for(*k, ReplicaTag(1), Some(quiet)), Recorded::New);
        }
        let mut not_made = 0;
        for n in 0..20_000 {
            if n % 500 == 0 {
                t.clock.advance(1);
            }
            let r = t.record_for(spread(2 << 40 | n), ReplicaTag(2), Some(flood));
            not_made += usize::from(r == Recorded::OverShare);
        }
        assert!(quiet_keys.iter().all(|k| t.get(*k) == Some(ReplicaTag(1))));
        assert_eq!(t.tenant_len(flood), 250, "a quarter of the capacity");
        assert_eq!(t.tenant_len(quiet), 100);
        assert_eq!(t.len(), 350);
        assert!(
            not_made < 200,
            "{not_made} of 20,000 inserts found none of their own"
        );
        assert_eq!(t.check_invariants(), 350);
        // The flood's newest entries are the ones it keeps.
        assert_eq!(t.get(spread(2 << 40 | 19_999)), Some(ReplicaTag(2)));
        assert_eq!(t.maintain().over_share, 20_000 - 250);
    }

    #[test]
    fn shares_count_only_registered_tenants_and_a_share_of_one_is_no_limit() {
        let t = table(3600, 100);
        let (known, other) = (TenantScope::new("known"), TenantScope::new("other"));
        t.set_tenant_shares([known], 1.0);
        for n in 0..100 {
            t.record_for(spread(n), ReplicaTag(1), Some(known));
        }
        assert_eq!(t.len(), 100, "share 1: the whole table");
        t.set_tenant_shares([known], 0.1);
        for n in 100..200 {
            t.record_for(spread(n), ReplicaTag(1), Some(other));
        }
        assert_eq!(t.tenant_len(other), 0, "never registered: not counted");
        // Counted from the moment shares are on: its first 100 entries are not, and of the
        // next 100 it keeps its share.
        for n in 200..300 {
            t.record_for(spread(n), ReplicaTag(1), Some(known));
        }
        assert_eq!(t.tenant_len(known), 10);
        assert_eq!(t.check_invariants(), t.len());
    }

    #[test]
    fn group_counts_follow_removals_expiry_and_sweeps() {
        let t = table(10, 200);
        let tenants: Vec<_> = ["a", "b", "c"].into_iter().map(TenantScope::new).collect();
        t.set_tenant_shares(tenants.clone(), 0.5);
        for n in 0..600u64 {
            let tenant = tenants[(n % 3) as usize];
            t.record_for(spread(n), ReplicaTag(n as u32 % 4), Some(tenant));
            if n % 7 == 0 {
                t.remove(spread(n / 2));
            }
            if n % 50 == 0 {
                t.clock.advance(3);
                t.maintain_if_needed();
            }
            t.check_invariants();
        }
        t.clock.advance(20);
        t.maintain();
        assert_eq!(t.check_invariants(), 0);
        assert!(tenants.iter().all(|s| t.tenant_len(*s) == 0));
    }

    // ---- Against a model. ----

    const TTL: u32 = 10;

    /// Keys that collide on purpose: the same home slot in one shard (differing only in middle
    /// bits), homes at the end of the array (runs wrap), neighbouring homes (runs merge), the
    /// same home in different shards (differing only in the top bits), and small integers.
    fn key_pool() -> Vec<u64> {
        let mut keys = Vec::new();
        for i in 0..8u64 {
            keys.push((i << 32) | 0xF); // shard 0, home 15 (last slot of a minimum shard)
            keys.push((i << 40) | 0xE); // shard 0, home 14
            keys.push(0x1000 + i); // shard 0, homes 0..8
            keys.push(i); // shard 0, homes 0..8
            keys.push((i << 58) | 0xE); // shards 0..8, home 14
            keys.push(u64::MAX - i); // shard 63, homes at the end
            keys.push((i << 20) | 0xD); // shard 0, home 13 (enough shard-0 keys to grow twice)
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record(u64, u32),
        Get(u64),
        Remove(u64),
        Advance(u32),
        Maintain,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let key = prop_oneof![9 => prop::sample::select(key_pool()), 1 => any::<u64>()];
        let op = prop_oneof![
            5 => (key.clone(), 0..4u32).prop_map(|(k, t)| Op::Record(k, t)),
            3 => key.clone().prop_map(Op::Get),
            2 => key.prop_map(Op::Remove),
            1 => (0..=TTL).prop_map(Op::Advance),
            1 => Just(Op::Maintain),
        ];
        prop::collection::vec(op, 1..400)
    }

    /// The model: key → (tag, touched), with the table's TTL rule.
    #[derive(Default)]
    struct Model {
        map: HashMap<u64, (u32, u32)>,
        now: u32,
    }

    impl Model {
        fn live(&self, touched: u32) -> bool {
            self.now - touched < TTL
        }
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn matches_a_hash_map_model(ops in ops()) {
            // Large enough that no insert meets the ceiling and no sweep runs: exact agreement.
            let t = table(u64::from(TTL), 1 << 20);
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Record(k, tag) => {
                        t.record(RoutingKey(k), ReplicaTag(tag));
                        m.map.insert(k, (tag, m.now));
                    }
                    Op::Get(k) => {
                        // A dead entry reads as absent but stays until maintenance.
                        let want = m
                            .map
                            .get(&k)
                            .filter(|(_, touched)| m.live(*touched))
                            .map(|(tag, _)| ReplicaTag(*tag));
                        prop_assert_eq!(t.get(RoutingKey(k)), want);
                    }
                    Op::Remove(k) => {
                        let want = m.map.remove(&k).map(|(tag, _)| ReplicaTag(tag));
                        prop_assert_eq!(t.remove(RoutingKey(k)), want);
                    }
                    Op::Advance(s) => {
                        t.clock.advance(s);
                        m.now += s;
                    }
                    Op::Maintain => {
                        let before = m.map.len();
                        let now = m.now;
                        m.map.retain(|_, (_, touched)| now - *touched < TTL);
                        let expired = before - m.map.len();
                        prop_assert_eq!(t.maintain(), Maintenance { expired, ..Maintenance::default() });
                    }
                }
                prop_assert_eq!(t.len(), m.map.len());
                prop_assert_eq!(t.check_invariants(), m.map.len());
            }
            let mut counts = HashMap::new();
            for (tag, touched) in m.map.values() {
                if m.live(*touched) {
                    *counts.entry(ReplicaTag(*tag)).or_insert(0) += 1;
                }
            }
            prop_assert_eq!(t.counts_by_tag(), counts);
            for k in key_pool() {
                let want = m
                    .map
                    .get(&k)
                    .filter(|(_, touched)| m.live(*touched))
                    .map(|(tag, _)| ReplicaTag(*tag));
                prop_assert_eq!(t.get(RoutingKey(k)), want);
            }
        }

        #[test]
        fn small_capacities_stay_within_the_ceiling(capacity in 1usize..=40, ops in ops()) {
            // Evictions drop entries the model still has, so the table must only ever agree
            // with the model where it answers: never a stale tag, never a dead entry.
            let t = table(u64::from(TTL), capacity);
            let ceiling = capacity + capacity / 8;
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Record(k, tag) => {
                        t.record(RoutingKey(k), ReplicaTag(tag));
                        m.map.insert(k, (tag, m.now));
                    }
                    Op::Get(k) => {
                        if let Some(tag) = t.get(RoutingKey(k)) {
                            let (want, touched) = m.map[&k];
                            prop_assert!(m.live(touched), "a dead entry was returned");
                            prop_assert_eq!(tag, ReplicaTag(want));
                        }
                    }
                    Op::Remove(k) => {
                        let model = m.map.remove(&k).map(|(tag, _)| ReplicaTag(tag));
                        if let Some(tag) = t.remove(RoutingKey(k)) {
                            prop_assert_eq!(Some(tag), model);
                        }
                    }
                    Op::Advance(s) => {
                        t.clock.advance(s);
                        m.now += s;
                    }
                    Op::Maintain => {
                        let now = m.now;
                        let expired = m.map.values().filter(|(_, t)| now - *t >= TTL).count();
                        prop_assert!(t.maintain().expired <= expired);
                        m.map.retain(|_, (_, touched)| now - *touched < TTL);
                        prop_assert!(t.len() <= capacity, "len {} > capacity {capacity}", t.len());
                    }
                }
                prop_assert!(t.len() <= ceiling, "len {} > ceiling {ceiling}", t.len());
                prop_assert_eq!(t.check_invariants(), t.len());
            }
        }
    }

    // ---- Concurrency. ----

    /// splitmix64: a deterministic stream of uniform keys and choices.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn concurrent_threads_keep_their_own_writes_and_the_count() {
        const THREADS: u64 = 4;
        const OPS: u64 = 50_000;
        const OWN: u64 = 2_000;
        const SHARED: u64 = 64;
        let t = table(3600, 1 << 20);
        // Disjoint keys per thread, and keys all threads fight over.
        let own_key = |th: u64, i: u64| RoutingKey(mix((th << 32) | i));
        let shared_key = |i: u64| RoutingKey(mix(u64::MAX - i));
        let models: Vec<HashMap<u64, u32>> = std::thread::scope(|s| {
            let t = &t;
            let handles: Vec<_> = (0..THREADS)
                .map(|th| {
                    s.spawn(move || {
                        let mut own: HashMap<u64, u32> = HashMap::new();
                        for n in 0..OPS {
                            let r = mix((th << 48) ^ n);
                            let i = (r >> 8) % OWN;
                            let tag = (th as u32) * 1000 + (r >> 40) as u32 % 1000;
                            match r % 8 {
                                0..=2 => {
                                    t.record(own_key(th, i), ReplicaTag(tag));
                                    own.insert(own_key(th, i).0, tag);
                                }
                                3 | 4 => {
                                    let want = own.get(&own_key(th, i).0).map(|t| ReplicaTag(*t));
                                    assert_eq!(t.get(own_key(th, i)), want);
                                }
                                5 => {
                                    let want = own.remove(&own_key(th, i).0).map(ReplicaTag);
                                    assert_eq!(t.remove(own_key(th, i)), want);
                                }
                                6 => {
                                    t.record(shared_key(i % SHARED), ReplicaTag(tag));
                                }
                                _ => {
                                    if r & 0x100 == 0 {
                                        t.remove(shared_key(i % SHARED));
                                    } else if let Some(got) = t.get(shared_key(i % SHARED)) {
                                        assert!(got.0 / 1000 < THREADS as u32, "{got:?}");
                                    }
                                }
                            }
                        }
                        own
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (th, own) in models.iter().enumerate() {
            for i in 0..OWN {
                let k = own_key(th as u64, i);
                assert_eq!(
                    t.get(k),
                    own.get(&k.0).map(|t| ReplicaTag(*t)),
                    "thread {th} key {i}"
                );
            }
        }
        let shared = (0..SHARED)
            .filter(|i| t.get(shared_key(*i)).is_some())
            .count();
        let own: usize = models.iter().map(HashMap::len).sum();
        assert_eq!(t.len(), own + shared);
        assert_eq!(t.check_invariants(), t.len());
    }

    #[test]
    fn concurrent_inserts_and_maintenance_keep_the_count_within_the_ceiling() {
        const THREADS: u64 = 4;
        const CAPACITY: usize = 2_000;
        let t = table(3600, CAPACITY);
        let inserting = AtomicUsize::new(THREADS as usize);
        std::thread::scope(|s| {
            let (t, inserting) = (&t, &inserting);
            for th in 0..THREADS {
                s.spawn(move || {
                    for n in 0..20_000u64 {
                        let k = RoutingKey(mix((th << 40) | n));
                        t.record(k, ReplicaTag(th as u32));
                        assert!(t.len() <= t.ceiling(), "len {}", t.len());
                        if n % 4 == 0 {
                            t.get(k);
                        }
                        if n % 1000 == 0 {
                            t.clock.advance(1);
                        }
                    }
                    inserting.fetch_sub(1, Ordering::Relaxed);
                });
            }
            // The background task.
            s.spawn(move || {
                while inserting.load(Ordering::Relaxed) > 0 {
                    t.maintain_if_needed();
                    std::thread::yield_now();
                }
            });
        });
        assert_eq!(t.check_invariants(), t.len());
        t.maintain();
        assert!(t.len() <= CAPACITY, "len {}", t.len());
        assert_eq!(t.check_invariants(), t.len());
    }

    #[test]
    fn concurrent_inserts_into_a_tiny_table_stay_within_it() {
        const THREADS: u64 = 4;
        let t = table(3600, 2);
        std::thread::scope(|s| {
            for th in 0..THREADS {
                let t = &t;
                s.spawn(move || {
                    for n in 0..5_000u64 {
                        t.record(RoutingKey(mix((th << 40) | n)), ReplicaTag(th as u32));
                        assert!(t.len() <= 2, "len {}", t.len());
                    }
                });
            }
        });
        assert_eq!(t.len(), 2);
        assert_eq!(t.check_invariants(), 2);
    }
}
