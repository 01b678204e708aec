//! A weighted ketama-style consistent-hash ring and its walk.
//!
//! Each replica owns `points_per_weight × weight` points at `xxh3(id, i)` on a 32-bit circle;
//! a key belongs to the first point at or after its position. Walking on from there visits the
//! other replicas in a per-key order, which is exactly what bounded loads and failover need: the
//! next candidate for a key is stable and independent of which other keys are in flight.
//!
//! Points are packed as `position << 32 | replica index` in one sorted `Vec<u64>`: 8 bytes a
//! point, one binary search per lookup, no pointer chasing.
//!
//! Why ketama rather than Maglev: Maglev's table gives one owner per key, and a per-key fallback
//! order needs a second structure; adding a backend to Maglev also moves a few keys between
//! *other* backends. Ketama's walk gives the fallback order for free and moves only the keys the
//! new replica takes. Ketama's weakness is balance; with enough points it is within a few percent
//! (measured in `docs/architecture.md`), and the bounded-load rule corrects the rest at runtime.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Index of a replica in a [`Selector`](crate::Selector) snapshot.
pub type ReplicaIdx = u32;

/// Default points per unit of weight, chosen from the balance measurements in
/// `docs/architecture.md`: the worst replica's share is within ~5 % (6 replicas) to ~8 %
/// (20 replicas) of its fair share, at 16 KiB of ring per unit of weight.
pub const DEFAULT_POINTS_PER_WEIGHT: u32 = 2048;

/// A sorted set of points, each owned by a replica index.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: Vec<u64>,
}

impl Ring {
    /// Builds a ring over `(replica index, replica id, weight)` members.
    ///
    /// Point positions depend only on the replica's id, never on its index or on the other
    /// members: that is what makes adding or removing a replica move only its own keys.
    pub fn new<'a, I>(members: I, points_per_weight: u32) -> Ring
    where
        I: IntoIterator<Item = (ReplicaIdx, &'a str, u32)>,
    {
        let mut points = Vec::new();
        for (idx, id, weight) in members {
            let n = u64::from(points_per_weight.max(1)) * u64::from(weight);
            points.reserve(n as usize);
            // The point number is hashed with the id's own hash as the seed. Hashing the id
            // with the point number as the seed would not do: for ids of one to three bytes
            // xxh3 mixes the seed in too weakly, and ids such as `a-1`, `a-2`, `a-3` got
            // nearly the same points (one of them owned almost the whole ring).
            let seed = xxh3_64(id.as_bytes());
            for i in 0..n {
                let position = (xxh3_64_with_seed(&i.to_le_bytes(), seed) >> 32) as u32;
                points.push(u64::from(position) << 32 | u64::from(idx));
            }
        }
        // Ties between two replicas' points are broken by index; they are rare (2^-32 per pair)
        // and deterministic for a given topology.
        points.sort_unstable();
        points.dedup();
        Ring { points }
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// True when the ring has no points.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The replica owning `position`, if the ring is not empty.
    pub fn owner(&self, position: u32) -> Option<ReplicaIdx> {
        let start = self.start(position);
        self.points.get(start).map(|p| *p as u32)
    }

    /// Walks the distinct replicas in ring order from `position`.
    pub fn walk(&self, position: u32, replica_count: usize) -> RingWalk<'_> {
        RingWalk {
            points: &self.points,
            next: self.start(position),
            remaining: self.points.len(),
            seen: ReplicaSet::new(replica_count),
        }
    }

    fn start(&self, position: u32) -> usize {
        let first_at_or_after = self
            .points
            .partition_point(|p| ((p >> 32) as u32) < position);
        if first_at_or_after == self.points.len() {
            0
        } else {
            first_at_or_after
        }
    }
}

/// Iterator over distinct replicas in ring order (see [`Ring::walk`]).
#[derive(Debug)]
pub struct RingWalk<'r> {
    points: &'r [u64],
    next: usize,
    remaining: usize,
    seen: ReplicaSet,
}

impl Iterator for RingWalk<'_> {
    type Item = ReplicaIdx;

    fn next(&mut self) -> Option<ReplicaIdx> {
        while self.remaining > 0 {
            let point = self.points[self.next];
            self.next = (self.next + 1) % self.points.len();
            self.remaining -= 1;
            let idx = point as u32;
            if self.seen.insert(idx) {
                return Some(idx);
            }
        }
        None
    }
}

/// A set of replica indices (replicas a walk has visited, or a request has tried). Fleets of
/// up to 128 replicas (every realistic region) use a register-sized bitmap, so a decision
/// allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaSet {
    /// Indices below 128.
    Small(u128),
    /// Any index.
    Large(Vec<u64>),
}

impl Default for ReplicaSet {
    fn default() -> Self {
        ReplicaSet::Small(0)
    }
}

impl ReplicaSet {
    /// An empty set sized for `replica_count` replicas (it grows if needed).
    pub fn new(replica_count: usize) -> ReplicaSet {
        if replica_count <= 128 {
            ReplicaSet::Small(0)
        } else {
            ReplicaSet::Large(vec![0; replica_count.div_ceil(64)])
        }
    }

    /// Inserts `idx`; returns true when it was not present.
    pub fn insert(&mut self, idx: ReplicaIdx) -> bool {
        if let ReplicaSet::Small(bits) = self {
            if idx < 128 {
                let bit = 1u128 << idx;
                let fresh = *bits & bit == 0;
                *bits |= bit;
                return fresh;
            }
            let small = *bits;
            *self = ReplicaSet::Large(vec![small as u64, (small >> 64) as u64]);
        }
        let ReplicaSet::Large(words) = self else {
            unreachable!("converted to Large above")
        };
        let word = idx as usize / 64;
        if word >= words.len() {
            words.resize(word + 1, 0);
        }
        let bit = 1u64 << (idx % 64);
        let fresh = words[word] & bit == 0;
        words[word] |= bit;
        fresh
    }

    /// Whether `idx` is in the set.
    pub fn contains(&self, idx: ReplicaIdx) -> bool {
        match self {
            ReplicaSet::Small(bits) => idx < 128 && bits & (1u128 << idx) != 0,
            ReplicaSet::Large(words) => words
                .get(idx as usize / 64)
                .is_some_and(|w| w & (1u64 << (idx % 64)) != 0),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        match self {
            ReplicaSet::Small(bits) => *bits == 0,
            ReplicaSet::Large(words) => words.iter().all(|w| *w == 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> Ring {
        Ring::new(
            ids.iter().enumerate().map(|(i, id)| (i as u32, *id, 1)),
            DEFAULT_POINTS_PER_WEIGHT,
        )
    }

    #[test]
    fn walk_visits_every_replica_exactly_once() {
        let r = ring(&["a", "b", "c", "d"]);
        for pos in [0u32, 1, u32::MAX / 3, u32::MAX] {
            let mut seen: Vec<u32> = r.walk(pos, 4).collect();
            assert_eq!(seen[0], r.owner(pos).unwrap());
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn empty_ring_has_no_owner_and_an_empty_walk() {
        let r = Ring::default();
        assert_eq!(r.owner(42), None);
        assert_eq!(r.walk(42, 0).count(), 0);
    }

    #[test]
    fn large_fleets_walk_without_the_small_bitmap() {
        let ids: Vec<String> = (0..300).map(|i| format!("r{i}")).collect();
        let r = Ring::new(
            ids.iter()
                .enumerate()
                .map(|(i, id)| (i as u32, id.as_str(), 1)),
            4,
        );
        assert_eq!(r.walk(7, 300).count(), 300);
    }

    #[test]
    fn replica_set_grows_past_the_bitmap() {
        let mut s = ReplicaSet::default();
        assert!(s.is_empty());
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert!(s.insert(500));
        assert!(s.contains(3) && s.contains(500) && !s.contains(4));
        assert!(!s.is_empty());
    }

    #[test]
    fn weight_multiplies_points() {
        let r = Ring::new([(0, "a", 1), (1, "b", 3)], 10);
        assert_eq!(r.len(), 40);
    }

    #[test]
    fn positions_depend_on_the_id_not_the_index() {
        let r1 = Ring::new([(0, "a", 1), (1, "b", 1)], 16);
        let r2 = Ring::new([(0, "b", 1), (1, "a", 1)], 16);
        for pos in (0..1000u32).map(|i| i.wrapping_mul(4_294_967)) {
            let o1 = r1.owner(pos).unwrap();
            let o2 = r2.owner(pos).unwrap();
            assert_eq!(["a", "b"][o1 as usize], ["b", "a"][o2 as usize]);
        }
    }

    #[test]
    fn short_ids_that_differ_in_one_character_share_the_ring_fairly() {
        for ids in [
            ["a-1", "a-2", "a-3"],
            ["abc", "abd", "abe"],
            ["a", "b", "c"],
        ] {
            let ring = Ring::new(
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| (i as ReplicaIdx, *id, 1)),
                DEFAULT_POINTS_PER_WEIGHT,
            );
            let mut owned = [0usize; 3];
            let samples = 30_000u32;
            for k in 0..samples {
                let position = k.wrapping_mul(0x9E37_79B9).wrapping_add(k >> 7);
                owned[ring.owner(position).unwrap() as usize] += 1;
            }
            for n in owned {
                let share = n as f64 / f64::from(samples);
                assert!((0.25..0.42).contains(&share), "{ids:?}: {owned:?}");
            }
        }
    }
}
