//! A region-wide shared KV tier, modelled on cluster-wide KV stores such as LMCache and
//! Mooncake: a pool of KV blocks that every replica of a region can read.
//!
//! Writes are write-through, as LMCache's: when a replica ends a prefill it stores the prompt's
//! blocks in its region's tier as well as in its own cache, and the reply's blocks when decoding
//! ends. A lookup continues a replica's local hit: the cached prefix is the run of leading
//! blocks held locally, extended by the blocks that follow it in the tier. Those are fetched
//! instead of computed — they count as cached prompt tokens, as vLLM reports them with an
//! LMCache connector — and cost [`SharedKvConfig::transfer`] of the time computing them would.
//!
//! The tier is a [`PrefixCache`] of its own capacity, so eviction is block-level LRU and, since
//! every write touches a sequence last-block-first, it eats prefixes from the tail. A lookup
//! does not count as a use; the write-through that ends the same prefill does, for every block
//! of the prompt.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use serde::Deserialize;

use crate::cache::PrefixCache;
use crate::engine::DEFAULT_CACHE_TOKENS;

/// Default cost of fetching a block from the shared tier, as a fraction of prefilling it.
pub const DEFAULT_TRANSFER: f64 = 0.2;

/// Which regions share a KV tier, and how it behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedKvConfig {
    /// Regions whose replicas share one tier each. Replicas of other regions, and replicas in
    /// no region, only have their own cache.
    pub regions: BTreeSet<String>,
    /// Capacity of each region's tier, in tokens.
    pub capacity_tokens: usize,
    /// Time to fetch a block from the tier, as a fraction of the time to prefill it.
    pub transfer: f64,
}

impl Default for SharedKvConfig {
    fn default() -> Self {
        SharedKvConfig {
            regions: BTreeSet::new(),
            capacity_tokens: 8 * DEFAULT_CACHE_TOKENS,
            transfer: DEFAULT_TRANSFER,
        }
    }
}

/// One region's shared tier.
#[derive(Debug)]
pub struct SharedTier {
    region: String,
    blocks: Mutex<PrefixCache>,
}

impl SharedTier {
    /// An empty tier for `region` of `capacity_tokens` (whole blocks, at least one).
    pub fn new(region: impl Into<String>, capacity_tokens: usize, block_tokens: usize) -> Self {
        SharedTier {
            region: region.into(),
            blocks: Mutex::new(PrefixCache::new(capacity_tokens, block_tokens)),
        }
    }

    /// The region it serves.
    pub fn region(&self) -> &str {
        &self.region
    }

    fn blocks(&self) -> MutexGuard<'_, PrefixCache> {
        // As for a replica's cache: a panic elsewhere cannot leave the LRU in a state that
        // matters to a simulator.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many of `hashes`, from the first, the tier holds. The caller passes the blocks
    /// that follow its local hit, so this is the continuation it can fetch.
    pub fn leading_blocks(&self, hashes: &[u64]) -> usize {
        self.blocks().leading_blocks(hashes)
    }

    /// Stores blocks (write-through); returns how many were not held before.
    pub fn write(&self, hashes: &[u64]) -> usize {
        self.blocks().admit(hashes)
    }

    /// Drops every block.
    pub fn flush(&self) {
        self.blocks().clear();
    }

    /// `(blocks held, capacity in blocks)`.
    pub fn occupancy(&self) -> (usize, usize) {
        let blocks = self.blocks();
        (blocks.len(), blocks.capacity_blocks())
    }
}

/// How a region keeps KV blocks: `kv_scope` in a Tether topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvScope {
    /// Each replica has only its own cache.
    #[default]
    Replica,
    /// The region's replicas share a KV tier.
    Region,
}

#[derive(Debug, Deserialize)]
struct ScopedTopology {
    #[serde(default)]
    regions: Vec<ScopedRegion>,
}

#[derive(Debug, Deserialize)]
struct ScopedRegion {
    name: String,
    #[serde(default)]
    kv_scope: KvScope,
}

/// The regions of a Tether topology that declare `kv_scope: region`.
///
/// Only `regions[].name` and `regions[].kv_scope` are read and every other key is ignored, so
/// this works on files written before `kv_scope` existed (every region is then
/// `kv_scope: replica`). A `kv_scope` other than `replica` or `region` is an error.
pub fn regions_with_shared_kv(yaml: &str) -> Result<BTreeSet<String>, serde_yaml::Error> {
    let topology: ScopedTopology = serde_yaml::from_str(yaml)?;
    Ok(topology
        .regions
        .into_iter()
        .filter(|r| r.kv_scope == KvScope::Region)
        .map(|r| r.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::engine::{Job, Replica, SimConfig};
    use crate::template::{render_prompt, render_reply, reply_text, token_count, ChatMessage};

    const BLOCK: usize = 16;
    const REPLY: u64 = 20;

    /// The prompt of turn `turns` of one conversation; each reply is what the simulator
    /// generates for `REPLY` tokens, so turn k + its reply is a prefix of turn k + 1.
    fn turn(turns: usize) -> Job {
        let mut m = vec![ChatMessage {
            role: "system".into(),
            content: "s".repeat(400),
        }];
        for t in 0..turns {
            if t > 0 {
                m.push(ChatMessage {
                    role: "assistant".into(),
                    content: reply_text(REPLY),
                });
            }
            m.push(ChatMessage {
                role: "user".into(),
                content: format!("question {t} ").repeat(20),
            });
        }
        Job::new(render_prompt(&m), REPLY)
    }

    /// Tokens in whole blocks of a turn's prompt and its reply: what the next turn can reuse.
    fn reusable(job: &Job) -> u64 {
        let tokens = token_count(job.prompt.len() + render_reply(&reply_text(REPLY)).len());
        tokens / BLOCK as u64 * BLOCK as u64
    }

    /// Replicas `a` and `b` of region `eu`, sharing one tier.
    fn pair(config: SimConfig) -> (Replica, Replica, Arc<SharedTier>) {
        let config = Arc::new(config);
        let tier = Arc::new(SharedTier::new(
            "eu",
            config.shared_kv.capacity_tokens,
            BLOCK,
        ));
        let a = Replica::new("a", Arc::clone(&config)).in_region("eu", Some(Arc::clone(&tier)));
        let b = Replica::new("b", config).in_region("eu", Some(Arc::clone(&tier)));
        (a, b, tier)
    }

    fn instant() -> SimConfig {
        SimConfig {
            time_scale: 0.0,
            ..SimConfig::default()
        }
    }

    async fn serve(r: &Replica, job: &Job) -> (u64, u64) {
        let (p, _) = r.complete(job).await;
        (p.cached_tokens, p.shared_cached_tokens)
    }

    #[tokio::test]
    async fn a_turn_on_another_replica_fetches_the_conversation_from_the_shared_tier() {
        let (a, b, tier) = pair(instant());
        let (t1, t2) = (turn(1), turn(2));
        assert_eq!(serve(&a, &t1).await, (0, 0));
        let expected = reusable(&t1);
        assert_eq!(
            serve(&b, &t2).await,
            (expected, expected),
            "all of it from the tier"
        );
        let stats = b.stats();
        assert_eq!(
            (stats.cached_tokens, stats.shared_cached_tokens),
            (expected, expected)
        );
        assert_eq!(a.stats().shared_cached_tokens, 0);
        // The fetched blocks entered b's own cache: without the tier, the same prompt is a
        // local hit of every block but the last.
        tier.flush();
        let again = b.prefill(&t2).await;
        let whole = PrefixCache::usable_blocks(t2.prompt_tokens, BLOCK) as u64 * BLOCK as u64;
        assert!(whole > expected);
        assert_eq!(
            (again.cached_tokens, again.shared_cached_tokens),
            (whole, 0)
        );
    }

    #[tokio::test]
    async fn the_shared_tier_continues_where_the_local_hit_stops() {
        let (a, b, _) = pair(instant());
        serve(&b, &turn(1)).await; // b holds turn 1 and its reply
        serve(&a, &turn(1)).await;
        serve(&a, &turn(2)).await; // a writes turn 2 and its reply through to the tier
        let local = reusable(&turn(1));
        let total = reusable(&turn(2));
        assert!(total > local);
        assert_eq!(serve(&b, &turn(3)).await, (total, total - local));
    }

    #[tokio::test]
    async fn the_tier_serves_only_the_continuation_it_still_holds() {
        let config = SimConfig {
            shared_kv: SharedKvConfig {
                capacity_tokens: 4 * BLOCK,
                ..SharedKvConfig::default()
            },
            ..instant()
        };
        let (a, b, tier) = pair(config);
        let t1 = turn(1);
        serve(&a, &t1).await;
        assert_eq!(tier.occupancy(), (4, 4));
        // Write-through touches a sequence last-block-first, so the tier kept its first blocks.
        assert_eq!(
            serve(&b, &turn(2)).await,
            (4 * BLOCK as u64, 4 * BLOCK as u64)
        );
        tier.flush();
        b.flush();
        assert_eq!(serve(&b, &turn(2)).await, (0, 0), "both flushed");
    }

    #[tokio::test]
    async fn a_replica_in_a_region_without_a_tier_behaves_exactly_as_before() {
        // A small local cache so eviction plays a part too.
        let config = Arc::new(SimConfig {
            cache_tokens: 24 * BLOCK,
            ..instant()
        });
        let plain = Replica::new("plain", Arc::clone(&config));
        let placed = Replica::new("placed", config).in_region("us", None);
        let jobs = [turn(1), turn(2), turn(1), turn(3), turn(2), turn(3)];
        for job in &jobs {
            let (p, reply) = plain.complete(job).await;
            let (q, _) = placed.complete(job).await;
            let facts = |p: &crate::engine::Prefilled| {
                (
                    p.cached_tokens,
                    p.shared_cached_tokens,
                    p.cache_creation_tokens,
                    p.fetch,
                )
            };
            assert_eq!(facts(&p), facts(&q), "{reply}");
        }
        assert_eq!(plain.stats(), placed.stats());
        assert_eq!(plain.cache_occupancy(), placed.cache_occupancy());
        assert_eq!(placed.stats().shared_cached_tokens, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_hit_costs_the_transfer_fraction_of_its_prefill() {
        let rate = 1_000.0;
        let config = SimConfig {
            prefill_tokens_per_sec: rate,
            shared_kv: SharedKvConfig {
                transfer: 0.25,
                ..SharedKvConfig::default()
            },
            ..SimConfig::default()
        };
        let (a, b, _) = pair(config.clone());
        let lone = Replica::new("lone", Arc::new(config));
        let (t1, t2) = (turn(1), turn(2));
        a.complete(&t1).await;

        let started = Instant::now();
        let p = b.prefill(&t2).await;
        let took = started.elapsed();
        let shared = reusable(&t1);
        assert_eq!(p.shared_cached_tokens, shared);
        let secs = |tokens: f64| Duration::from_secs_f64(tokens / rate);
        let close = |x: Duration, y: Duration, within: Duration| x.abs_diff(y) <= within;
        let micro = Duration::from_micros(1);
        assert!(close(p.fetch, secs(0.25 * shared as f64), micro), "{p:?}");
        let computed = secs((t2.prompt_tokens - shared) as f64);
        assert!(close(p.prefill, p.fetch + computed, micro), "{p:?}");
        // The timer counts whole milliseconds, rounding the sleep up.
        assert!(close(took, p.prefill, Duration::from_millis(1)), "{took:?}");

        // Without the tier the same request computes every token.
        let cold = lone.prefill(&t2).await;
        assert_eq!(cold.cached_tokens, 0);
        assert!(close(cold.prefill, secs(t2.prompt_tokens as f64), micro));
        assert!(cold.prefill > p.prefill);
    }

    #[test]
    fn the_tier_holds_what_is_written_and_continues_from_any_block() {
        let tier = SharedTier::new("eu", 100 * BLOCK, BLOCK);
        assert_eq!(tier.write(&[1, 2, 3, 4]), 4);
        assert_eq!(tier.write(&[1, 2]), 0, "rewriting inserts nothing");
        assert_eq!(tier.leading_blocks(&[1, 2, 3, 4, 5]), 4);
        assert_eq!(
            tier.leading_blocks(&[3, 4, 5]),
            2,
            "a continuation after a local hit"
        );
        assert_eq!(
            tier.leading_blocks(&[9, 3, 4]),
            0,
            "the run stops at the first miss"
        );
        assert_eq!(tier.leading_blocks(&[]), 0);
    }

    #[test]
    fn the_tier_is_lru_within_its_own_capacity() {
        let tier = SharedTier::new("eu", 4 * BLOCK, BLOCK);
        tier.write(&[1, 2, 3]);
        tier.write(&[10, 11]);
        // Five blocks into four: the oldest is the tail of the first sequence.
        assert_eq!(tier.occupancy(), (4, 4));
        assert_eq!(tier.leading_blocks(&[1, 2, 3]), 2);
        assert_eq!(tier.leading_blocks(&[10, 11]), 2);
        // Reading does not refresh; writing does. Rewrite the first sequence's head, then a
        // new block evicts the second sequence's tail.
        tier.write(&[1, 2]);
        tier.write(&[20]);
        assert_eq!(tier.leading_blocks(&[10, 11]), 1);
        assert_eq!(tier.leading_blocks(&[1, 2]), 2);
        for seed in 0..100u64 {
            tier.write(&[1000 + seed]);
            assert!(tier.occupancy().0 <= 4);
        }
    }

    #[test]
    fn flush_empties_the_tier() {
        let tier = SharedTier::new("eu", 10 * BLOCK, BLOCK);
        tier.write(&[1, 2]);
        tier.flush();
        assert_eq!(tier.occupancy(), (0, 10));
        assert_eq!(tier.leading_blocks(&[1, 2]), 0);
    }

    #[test]
    fn kv_scope_is_read_where_present_and_defaults_to_replica() {
        let yaml = r#"
listen: 127.0.0.1:8080
local_region: eu
regions:
  - name: eu
    kv_scope: region
    replicas: [{ id: eu-1, address: "127.0.0.1:9101" }]
  - name: us
    kv_scope: replica
    replicas: [{ id: us-1, address: "127.0.0.1:9201" }]
  - name: ap
    replicas: [{ id: ap-1, address: "127.0.0.1:9301" }]
"#;
        let shared = regions_with_shared_kv(yaml).unwrap();
        assert_eq!(shared, BTreeSet::from(["eu".to_owned()]));
        let without = yaml.replace("    kv_scope: region\n", "");
        assert!(regions_with_shared_kv(&without).unwrap().is_empty());
    }

    #[test]
    fn an_unknown_kv_scope_is_an_error_with_its_line() {
        let yaml = "regions:\n  - name: eu\n    kv_scope: cluster\n";
        let err = regions_with_shared_kv(yaml).unwrap_err();
        assert_eq!(err.location().map(|l| l.line()), Some(3), "{err}");
        assert!(err.to_string().contains("cluster"), "{err}");
    }
}
