//! One simulated replica's engine: prefix cache, concurrency slots, latency model, faults and
//! ground-truth counters.
//!
//! Latency model (vLLM-like, scaled by `time_scale`): a request waits for one of
//! `max_num_seqs` slots (queueing), then prefills its *uncached* tokens at
//! `prefill_tokens_per_sec` — so time to first token = queueing + uncached / prefill rate — and
//! then decodes one token every `1 / decode_tokens_per_sec`. Prompt blocks enter the cache when
//! prefill ends; the reply's blocks when decoding ends.
//!
//! A replica in a region with a shared KV tier ([`crate::shared`]) writes those same blocks to
//! the tier, and on a lookup continues its local hit with the blocks that follow it in the
//! tier: they count as cached but cost `transfer ×` their prefill time to fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cache::PrefixCache;
use crate::shared::{SharedKvConfig, SharedTier};
use crate::slots::SlotTable;
use crate::template::{block_hashes, render_reply, reply_text, token_count, DEFAULT_BLOCK_TOKENS};

/// Which usage shape `/v1/chat/completions` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI / vLLM / SGLang: `usage.prompt_tokens_details.cached_tokens`.
    #[default]
    Openai,
    /// llama.cpp server: `timings.prompt_n` / `timings.cache_n` and `tokens_cached`.
    Llamacpp,
}

/// Which inference server a replica imitates, beyond the OpenAI API they all serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    /// A vLLM-like prefix cache and `max_num_seqs` slots, and no engine endpoints (what a
    /// replica whose engine Tether cannot read looks like).
    #[default]
    Basic,
    /// vLLM: admission limited by KV blocks as well as `max_num_seqs`, preemption of a request
    /// whose reply's blocks do not fit, and `/metrics` with vLLM's metric names.
    Vllm,
    /// llama.cpp server: `slots` sequences, each holding one conversation's cache
    /// ([`crate::slots`]), and `/slots`, `/props`, `/metrics` in llama.cpp's shapes.
    Llamacpp,
}

/// Behaviour shared by every replica of a fleet.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Prefix-cache capacity per replica, in tokens.
    pub cache_tokens: usize,
    /// Prefill speed (uncached prompt tokens per second).
    pub prefill_tokens_per_sec: f64,
    /// Decode speed per sequence (tokens per second).
    pub decode_tokens_per_sec: f64,
    /// Concurrent sequences; further requests queue.
    pub max_num_seqs: usize,
    /// Multiplies every simulated delay (0 = no delays; tests use small values).
    pub time_scale: f64,
    /// Usage shape of chat completions.
    pub dialect: Dialect,
    /// Fixed ids and timestamps, so identical requests get byte-identical responses.
    pub deterministic: bool,
    /// Region-wide shared KV tiers (none by default).
    pub shared_kv: SharedKvConfig,
    /// Which engine the replicas imitate.
    pub engine: EngineMode,
    /// llama.cpp mode: slots per replica (`--parallel`); `cache_tokens` is split among them.
    pub slots: usize,
    /// llama.cpp mode: host-RAM prompt cache per replica, in tokens (0 = none; `--cache-ram`).
    pub host_cache_tokens: usize,
    /// llama.cpp mode: `--slot-prompt-similarity`.
    pub slot_prompt_similarity: f64,
}

/// Default prefix-cache capacity per replica: 2,560 tokens (160 blocks). Under loadgen's
/// default workload (16 concurrent agent sessions averaging ~1.9k prompt tokens a turn, over
/// 6 replicas) the fleet holds about half of the active sessions' context, so eviction is
/// real: a routing policy's hit ratio here is lower than with a cache ten times larger.
pub const DEFAULT_CACHE_TOKENS: usize = 2_560;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            block_tokens: DEFAULT_BLOCK_TOKENS,
            cache_tokens: DEFAULT_CACHE_TOKENS,
            prefill_tokens_per_sec: 8_000.0,
            decode_tokens_per_sec: 50.0,
            max_num_seqs: 16,
            time_scale: 1.0,
            dialect: Dialect::Openai,
            deterministic: false,
            shared_kv: SharedKvConfig::default(),
            engine: EngineMode::Basic,
            slots: 4,
            host_cache_tokens: 0,
            slot_prompt_similarity: 0.1,
        }
    }
}

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Normal service.
    #[default]
    None,
    /// Answer every request `503` (with `Retry-After` when set).
    Unavailable {
        /// Seconds for `Retry-After`.
        #[serde(default)]
        retry_after: Option<u32>,
    },
    /// Stop listening and drop every open connection (a crashed process).
    Refuse,
    /// Accept requests and never answer.
    Hang,
    /// Multiply every delay.
    Slow {
        /// The factor (≥ 1 slows down).
        factor: f64,
    },
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer 200 with a JSON body of this many bytes whose `usage` never ends sensibly.
    Huge {
        /// Body size in bytes.
        bytes: u64,
    },
    /// Answer 200 with an SSE stream that never ends and never reports usage.
    Endless,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (counters and slot
/// contents in a simulator).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ground truth a replica keeps about what it served (for the metering tests).
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    shared_cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Completed requests.
    pub requests: u64,
    /// Prompt tokens of those requests.
    pub prompt_tokens: u64,
    /// Of which served from the prefix cache.
    pub cached_tokens: u64,
    /// Of `cached_tokens`, those fetched from the region's shared KV tier.
    #[serde(default)]
    pub shared_cached_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
}

impl Stats {
    /// Current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: self.cached_tokens.load(Ordering::Relaxed),
            shared_cached_tokens: self.shared_cached_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
        }
    }
}

/// A request, tokenized.
#[derive(Debug, Clone)]
pub struct Job {
    /// Rendered prompt (messages + generation prompt).
    pub prompt: Vec<u8>,
    /// Its token count.
    pub prompt_tokens: u64,
    /// Tokens to generate.
    pub completion_tokens: u64,
}

impl Job {
    /// A job for a rendered prompt.
    pub fn new(prompt: Vec<u8>, completion_tokens: u64) -> Job {
        Job {
            prompt_tokens: token_count(prompt.len()),
            prompt,
            completion_tokens,
        }
    }
}

/// A job that has its slot and has been prefilled.
#[derive(Debug)]
pub struct Prefilled {
    /// Prompt tokens served from the cache (local hits and shared-tier fetches).
    pub cached_tokens: u64,
    /// Of `cached_tokens`, those fetched from the region's shared KV tier.
    pub shared_cached_tokens: u64,
    /// Prompt tokens computed by this request and newly written to the local cache.
    pub cache_creation_tokens: u64,
    /// Time spent waiting for a slot.
    pub queued: Duration,
    /// Time from the slot to the first token: fetching from the shared tier plus computing
    /// the uncached tokens.
    pub prefill: Duration,
    /// The part of `prefill` spent fetching from the shared tier.
    pub fetch: Duration,
    /// Delay between generated tokens.
    pub per_token: Duration,
    // Dropped in this order: the llama.cpp slot is released before its permit lets the next
    // request in.
    lease: Option<SlotLease>,
    _running: Gauge,
    _kv: Option<KvLease>,
    _slot: Option<OwnedSemaphorePermit>,
}

/// KV blocks held by one running request, counted in the replica's `kv_held` (the
/// semaphore's free permits do not say: tokio hands free permits to a queued waiter before
/// its whole request can be met).
#[derive(Debug)]
struct KvLease {
    permit: OwnedSemaphorePermit,
    held: Arc<AtomicU64>,
}

impl KvLease {
    fn new(permit: OwnedSemaphorePermit, held: &Arc<AtomicU64>) -> KvLease {
        held.fetch_add(permit.num_permits() as u64, Ordering::Relaxed);
        KvLease {
            permit,
            held: Arc::clone(held),
        }
    }

    fn grow(&mut self, more: OwnedSemaphorePermit) {
        self.held
            .fetch_add(more.num_permits() as u64, Ordering::Relaxed);
        self.permit.merge(more);
    }
}

impl Drop for KvLease {
    fn drop(&mut self) {
        self.held
            .fetch_sub(self.permit.num_permits() as u64, Ordering::Relaxed);
    }
}

/// A counter held up by one request while it lives.
#[derive(Debug)]
struct Gauge(Arc<AtomicU64>);

impl Gauge {
    fn up(counter: &Arc<AtomicU64>) -> Gauge {
        counter.fetch_add(1, Ordering::Relaxed);
        Gauge(Arc::clone(counter))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A llama.cpp slot held by one request; released when the request ends, holding what
/// [`Replica::finish`] recorded (prompt and reply) or, for a request that ended early, its
/// prompt.
#[derive(Debug)]
struct SlotLease {
    table: Arc<Mutex<SlotTable>>,
    slot: usize,
    blocks: Mutex<Option<Vec<u64>>>,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let blocks = self
            .blocks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.release(self.slot, blocks.as_deref());
    }
}

/// What the engine endpoints report: requests by state and, per mode, slots or KV blocks.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EngineSnapshot {
    /// Requests past admission (decoding or prefilling).
    pub running: u64,
    /// Requests waiting for a slot or for KV blocks.
    pub waiting: u64,
    /// llama.cpp mode: whether each slot is processing.
    pub slots_busy: Vec<bool>,
    /// llama.cpp mode: context tokens per slot.
    pub slot_ctx_tokens: u64,
    /// vLLM mode: KV blocks in all.
    pub kv_total_blocks: u64,
    /// vLLM mode: KV blocks held by running requests.
    pub kv_used_blocks: u64,
    /// vLLM mode: requests preempted for lack of KV blocks, ever.
    pub preemptions: u64,
    /// Requests to the engine endpoints (`/metrics`, `/slots`, `/props`) and `/health`.
    pub probe_requests: u64,
}

impl Prefilled {
    /// Waits until token `index` (from 0) of the reply is generated. The first comes out of
    /// the prefill itself (the prompt's last position yields it, as in vLLM), so time to first
    /// token is queueing + prefill; each later token is one decode step after the one before.
    pub async fn pace(&self, index: usize) {
        if index > 0 && !self.per_token.is_zero() {
            // Even a zero sleep waits for the next timer tick (~1 ms).
            tokio::time::sleep(self.per_token).await;
        }
    }

    /// Decoding a whole reply of `tokens` tokens: one step for each after the first.
    pub fn decode_time(&self, tokens: u64) -> Duration {
        let steps = u32::try_from(tokens.saturating_sub(1)).unwrap_or(u32::MAX);
        self.per_token.saturating_mul(steps)
    }
}

/// One simulated replica.
#[derive(Debug)]
pub struct Replica {
    /// Its id.
    pub id: String,
    config: Arc<SimConfig>,
    region: Option<String>,
    shared: Option<Arc<SharedTier>>,
    cache: Mutex<PrefixCache>,
    slots: Arc<Semaphore>,
    /// vLLM mode: KV blocks, one permit each.
    kv: Option<Arc<Semaphore>>,
    /// llama.cpp mode: the slots' contents.
    slot_table: Option<Arc<Mutex<SlotTable>>>,
    running: Arc<AtomicU64>,
    waiting: Arc<AtomicU64>,
    preemptions: AtomicU64,
    kv_held: Arc<AtomicU64>,
    probe_requests: AtomicU64,
    fault: Mutex<Fault>,
    stats: Stats,
}

impl Replica {
    /// A replica with an empty cache, in no region.
    pub fn new(id: impl Into<String>, config: Arc<SimConfig>) -> Replica {
        let block = config.block_tokens.max(1);
        let sequences = match config.engine {
            EngineMode::Llamacpp => config.slots.max(1),
            EngineMode::Basic | EngineMode::Vllm => config.max_num_seqs.max(1),
        };
        let kv = (config.engine == EngineMode::Vllm)
            .then(|| Arc::new(Semaphore::new((config.cache_tokens / block).max(1))));
        let slot_table = (config.engine == EngineMode::Llamacpp).then(|| {
            Arc::new(Mutex::new(SlotTable::new(
                sequences,
                config.cache_tokens / block / sequences,
                config.host_cache_tokens / block,
                config.slot_prompt_similarity,
            )))
        });
        Replica {
            id: id.into(),
            region: None,
            shared: None,
            cache: Mutex::new(PrefixCache::new(config.cache_tokens, config.block_tokens)),
            slots: Arc::new(Semaphore::new(sequences)),
            kv,
            slot_table,
            running: Arc::default(),
            waiting: Arc::default(),
            preemptions: AtomicU64::new(0),
            kv_held: Arc::default(),
            probe_requests: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            stats: Stats::default(),
            config,
        }
    }

    /// Puts the replica in `region`, reading and writing `shared` if the region has a tier.
    pub fn in_region(self, region: impl Into<String>, shared: Option<Arc<SharedTier>>) -> Replica {
        Replica {
            region: Some(region.into()),
            shared,
            ..self
        }
    }

    /// The fleet's configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Its region, if it has one.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Its region's shared KV tier, if the region has one.
    pub fn shared_tier(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref()
    }

    fn cache(&self) -> MutexGuard<'_, PrefixCache> {
        // A panic while holding the lock cannot leave the LRU half-updated in a way that
        // matters to a simulator; keep serving.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the fault (listener-level faults are applied by the fleet).
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Empties the replica's own prefix cache (not its region's shared tier).
    pub fn flush(&self) {
        self.cache().clear();
        if let Some(table) = &self.slot_table {
            lock(table).clear();
        }
    }

    /// `(blocks held, capacity in blocks)`.
    pub fn cache_occupancy(&self) -> (usize, usize) {
        if let Some(table) = &self.slot_table {
            let table = lock(table);
            return (table.held_blocks(), table.len() * table.ctx_blocks());
        }
        let cache = self.cache();
        (cache.len(), cache.capacity_blocks())
    }

    /// Counts one request to an engine endpoint or `/health` (what a prober costs).
    pub fn count_probe(&self) {
        self.probe_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// What the engine endpoints report now.
    pub fn engine_snapshot(&self) -> EngineSnapshot {
        let block = self.config.block_tokens.max(1) as u64;
        let mut snapshot = EngineSnapshot {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            preemptions: self.preemptions.load(Ordering::Relaxed),
            probe_requests: self.probe_requests.load(Ordering::Relaxed),
            ..EngineSnapshot::default()
        };
        if let Some(table) = &self.slot_table {
            let table = lock(table);
            snapshot.slots_busy = (0..table.len()).map(|i| table.is_busy(i)).collect();
            snapshot.slot_ctx_tokens = table.ctx_blocks() as u64 * block;
        }
        if self.kv.is_some() {
            snapshot.kv_total_blocks = (self.config.cache_tokens as u64 / block).max(1);
            snapshot.kv_used_blocks = self.kv_held.load(Ordering::Relaxed);
        }
        snapshot
    }

    /// Ground-truth counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn scaled(&self, seconds: f64) -> Duration {
        let slow = match self.fault() {
            Fault::Slow { factor } if factor.is_finite() && factor > 0.0 => factor,
            _ => 1.0,
        };
        let secs = seconds * self.config.time_scale.max(0.0) * slow;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
    }

    /// `(local, shared)`: how many of a prompt's leading blocks the replica holds, then how
    /// many of the blocks after those its region's tier holds. Both stop short of the block
    /// holding the prompt's last token, which is always computed.
    fn lookup(&self, hashes: &[u64], prompt_tokens: u64) -> (usize, usize) {
        let usable = PrefixCache::usable_blocks(prompt_tokens, self.config.block_tokens);
        let usable = &hashes[..usable.min(hashes.len())];
        // One lock at a time: a replica never holds its own cache's lock while taking the
        // tier's, which every replica of the region contends for.
        let local = self.cache().leading_blocks(usable);
        let shared = self
            .shared
            .as_ref()
            .map_or(0, |tier| tier.leading_blocks(&usable[local..]));
        (local, shared)
    }

    /// Waits for a slot, looks the prompt up in the cache and the region's shared tier, sleeps
    /// for fetching the shared part and computing the rest, then admits the prompt's blocks —
    /// fetched and computed — to the local cache and writes them through to the shared tier.
    pub async fn prefill(&self, job: &Job) -> Prefilled {
        let started = Instant::now();
        let block = self.config.block_tokens;
        let hashes = block_hashes(&job.prompt, block);
        let waiting = Gauge::up(&self.waiting);
        // The semaphores are never closed, so these are always `Some`.
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        // vLLM admits a request once its prompt's blocks fit (a request larger than the whole
        // cache runs alone); its reply's blocks are allocated as it decodes.
        let kv_blocks = self.kv.as_ref().map(|kv| {
            let total = (self.config.cache_tokens / block.max(1)).max(1) as u64;
            let blocks = |tokens: u64| tokens.div_ceil(block as u64).min(total);
            let prompt = blocks(job.prompt_tokens);
            let all = blocks(job.prompt_tokens + job.completion_tokens);
            let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            (Arc::clone(kv), small(prompt), small(all - prompt))
        });
        let mut kv = match &kv_blocks {
            Some((kv, prompt, _)) => {
                let permit = Arc::clone(kv).acquire_many_owned(*prompt).await.ok();
                permit.map(|p| KvLease::new(p, &self.kv_held))
            }
            None => None,
        };
        drop(waiting);
        let mut running = Gauge::up(&self.running);
        let queued = started.elapsed();
        let (lease, (local, shared)) = match &self.slot_table {
            Some(table) => {
                let usable = PrefixCache::usable_blocks(job.prompt_tokens, block);
                let taken = lock(table).take(&hashes, usable);
                let lease = taken.map(|t| SlotLease {
                    table: Arc::clone(table),
                    slot: t.slot,
                    blocks: Mutex::new(None),
                });
                (lease, (taken.map_or(0, |t| t.reused_blocks), 0))
            }
            None => (None, self.lookup(&hashes, job.prompt_tokens)),
        };
        let shared_cached_tokens = (shared * block) as u64;
        let cached_tokens = ((local + shared) * block) as u64;
        let uncached = job.prompt_tokens - cached_tokens;
        let rate = self.config.prefill_tokens_per_sec.max(1.0);
        let transfer = self.config.shared_kv.transfer.max(0.0);
        let fetch = self.scaled(transfer * shared_cached_tokens as f64 / rate);
        let mut prefill = fetch.saturating_add(self.scaled(uncached as f64 / rate));
        if !prefill.is_zero() {
            tokio::time::sleep(prefill).await;
        }
        let inserted = if self.slot_table.is_some() {
            hashes.len().saturating_sub(local)
        } else {
            self.cache().admit(&hashes)
        };
        if let (Some((pool, prompt, reply)), Some(held)) = (&kv_blocks, kv.as_mut()) {
            match Arc::clone(pool).try_acquire_many_owned(*reply) {
                Ok(more) => held.grow(more),
                Err(_) => {
                    // No room to decode: preempted (vLLM's recompute mode). Its blocks go
                    // back, it waits for room for the whole sequence, then recomputes what
                    // the prefix cache no longer holds. Usage still reports the first lookup,
                    // as vLLM does.
                    let preempted_at = Instant::now();
                    self.preemptions.fetch_add(1, Ordering::Relaxed);
                    drop(kv.take());
                    drop(running);
                    let waiting = Gauge::up(&self.waiting);
                    kv = Arc::clone(pool)
                        .acquire_many_owned(prompt + reply)
                        .await
                        .ok()
                        .map(|p| KvLease::new(p, &self.kv_held));
                    drop(waiting);
                    running = Gauge::up(&self.running);
                    let (held_now, _) = self.lookup(&hashes, job.prompt_tokens);
                    let recompute = job.prompt_tokens - (held_now * block) as u64;
                    let recompute = self.scaled(recompute as f64 / rate);
                    if !recompute.is_zero() {
                        tokio::time::sleep(recompute).await;
                    }
                    self.cache().admit(&hashes);
                    prefill = prefill.saturating_add(preempted_at.elapsed());
                }
            }
        }
        if let Some(tier) = &self.shared {
            tier.write(&hashes);
        }
        Prefilled {
            cached_tokens,
            shared_cached_tokens,
            // Fetched blocks are new to the local cache but were read, not computed.
            cache_creation_tokens: (inserted.saturating_sub(shared) * block) as u64,
            queued,
            prefill,
            fetch,
            per_token: self.scaled(1.0 / self.config.decode_tokens_per_sec.max(0.001)),
            lease,
            _running: running,
            _kv: kv,
            _slot: slot,
        }
    }

    /// Serves a whole non-streaming request: prefill, decode every token, record. Returns the
    /// prefill facts (for usage) and the reply text.
    pub async fn complete(&self, job: &Job) -> (Prefilled, String) {
        let prefilled = self.prefill(job).await;
        let decode = prefilled.decode_time(job.completion_tokens);
        if !decode.is_zero() {
            tokio::time::sleep(decode).await;
        }
        let reply = reply_text(job.completion_tokens);
        self.finish(job, &reply, &prefilled);
        (prefilled, reply)
    }

    /// Records a finished request: the reply's blocks enter the cache and the shared tier
    /// (the next turn's prompt starts with prompt + reply) and the counters move.
    pub fn finish(&self, job: &Job, reply: &str, prefilled: &Prefilled) {
        let mut full = job.prompt.clone();
        full.extend(render_reply(reply));
        let hashes = block_hashes(&full, self.config.block_tokens);
        match &prefilled.lease {
            Some(lease) => *lock(&lease.blocks) = Some(hashes.clone()),
            None => {
                self.cache().admit(&hashes);
            }
        }
        if let Some(tier) = &self.shared {
            tier.write(&hashes);
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prompt_tokens
            .fetch_add(job.prompt_tokens, Ordering::Relaxed);
        self.stats
            .cached_tokens
            .fetch_add(prefilled.cached_tokens, Ordering::Relaxed);
        self.stats
            .shared_cached_tokens
            .fetch_add(prefilled.shared_cached_tokens, Ordering::Relaxed);
        self.stats
            .completion_tokens
            .fetch_add(job.completion_tokens, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{render_prompt, ChatMessage};

    fn config() -> Arc<SimConfig> {
        Arc::new(SimConfig {
            time_scale: 0.0,
            ..SimConfig::default()
        })
    }

    fn conversation(turns: usize) -> Vec<ChatMessage> {
        let mut m = vec![ChatMessage {
            role: "system".into(),
            content: "s".repeat(400),
        }];
        for t in 0..turns {
            if t > 0 {
                m.push(ChatMessage {
                    role: "assistant".into(),
                    content: reply_text(20),
                });
            }
            m.push(ChatMessage {
                role: "user".into(),
                content: format!("question {t} ").repeat(20),
            });
        }
        m
    }

    #[tokio::test]
    async fn the_second_turn_hits_the_first_turn_and_its_reply() {
        let r = Replica::new("r", config());
        let turn1 = Job::new(render_prompt(&conversation(1)), 20);
        let p = r.prefill(&turn1).await;
        assert_eq!(p.cached_tokens, 0);
        r.finish(&turn1, &reply_text(20), &p);

        let turn2 = Job::new(render_prompt(&conversation(2)), 20);
        let p2 = r.prefill(&turn2).await;
        let reusable = token_count(turn1.prompt.len() + render_reply(&reply_text(20)).len());
        // Every full block of turn 1 + reply hits.
        assert_eq!(p2.cached_tokens, reusable / 16 * 16);
        assert!(p2.cached_tokens as f64 / turn2.prompt_tokens as f64 > 0.6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cold_prefill_takes_longer_than_a_warm_one() {
        let r = Replica::new(
            "r",
            Arc::new(SimConfig {
                prefill_tokens_per_sec: 1000.0,
                ..SimConfig::default()
            }),
        );
        let job = Job::new(render_prompt(&conversation(3)), 1);
        let cold = r.prefill(&job).await;
        let cold_prefill = cold.prefill;
        r.finish(&job, "", &cold);
        drop(cold);
        let warm = r.prefill(&job).await;
        assert!(
            cold_prefill > warm.prefill * 10,
            "{cold_prefill:?} vs {:?}",
            warm.prefill
        );
        assert_eq!(
            cold_prefill,
            Duration::from_secs_f64(job.prompt_tokens as f64 / 1000.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_max_num_seqs_queue() {
        let r = Arc::new(Replica::new(
            "r",
            Arc::new(SimConfig {
                max_num_seqs: 1,
                ..SimConfig::default()
            }),
        ));
        let job = Job::new(render_prompt(&conversation(1)), 1);
        let first = r.prefill(&job).await;
        let (r2, job2) = (Arc::clone(&r), job.clone());
        let second = tokio::spawn(async move { r2.prefill(&job2).await.queued });
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(first);
        let queued = second.await.unwrap();
        assert!(queued >= Duration::from_secs(3), "{queued:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_fault_multiplies_every_delay() {
        let r = Replica::new(
            "r",
            Arc::new(SimConfig {
                prefill_tokens_per_sec: 1_000.0,
                decode_tokens_per_sec: 100.0,
                ..SimConfig::default()
            }),
        );
        let job = Job::new(render_prompt(&conversation(1)), 10);
        // (prefill, per-token delay, time the whole request took), from a cold cache.
        let serve = || async {
            r.flush();
            let started = Instant::now();
            let (p, _) = r.complete(&job).await;
            (p.prefill, p.per_token, started.elapsed())
        };
        let normal = serve().await;
        r.set_fault(Fault::Slow { factor: 5.0 });
        let slow = serve().await;
        r.set_fault(Fault::None);
        assert_eq!(serve().await, normal, "back to normal");

        let close = |a: Duration, b: Duration, within: Duration| a.abs_diff(b) <= within;
        assert_eq!(normal.1, Duration::from_millis(10));
        assert_eq!(slow.1, Duration::from_millis(50));
        assert!(
            close(slow.0, normal.0 * 5, Duration::from_micros(1)),
            "{slow:?} vs {normal:?}"
        );
        // The timer counts whole milliseconds, rounding the prefill's sleep up.
        assert!(
            close(slow.2, normal.2 * 5, Duration::from_millis(6)),
            "{slow:?} vs {normal:?}"
        );
        assert!(
            close(slow.2, slow.0 + slow.1 * 9, Duration::from_millis(1)),
            "{slow:?}"
        );
    }

    #[tokio::test]
    async fn flush_empties_the_cache_and_stats_count_the_ground_truth() {
        let r = Replica::new("r", config());
        let job = Job::new(render_prompt(&conversation(2)), 5);
        for _ in 0..2 {
            let p = r.prefill(&job).await;
            r.finish(&job, &reply_text(5), &p);
        }
        let s = r.stats();
        assert_eq!(s.requests, 2);
        assert_eq!(s.prompt_tokens, 2 * job.prompt_tokens);
        assert_eq!(s.completion_tokens, 10);
        assert!(s.cached_tokens > 0);
        r.flush();
        assert_eq!(r.cache_occupancy().0, 0);
    }

    fn llamacpp(slots: usize, host_cache_tokens: usize) -> Arc<SimConfig> {
        Arc::new(SimConfig {
            engine: EngineMode::Llamacpp,
            slots,
            cache_tokens: 16 * 1024,
            host_cache_tokens,
            time_scale: 0.0,
            ..SimConfig::default()
        })
    }

    /// A different conversation per `n`: its own system prompt.
    fn other_conversation(n: usize, turns: usize) -> Vec<ChatMessage> {
        let mut m = conversation(turns);
        m[0].content = format!("agent {n} ").repeat(60);
        m
    }

    /// Serves turns 1 and 2 of conversation `n` back to back; the cached tokens of turn 2.
    async fn second_turn(r: &Replica, n: usize) -> u64 {
        let first = Job::new(render_prompt(&other_conversation(n, 1)), 20);
        let p = r.prefill(&first).await;
        r.finish(&first, &reply_text(20), &p);
        drop(p);
        let second = Job::new(render_prompt(&other_conversation(n, 2)), 20);
        let p = r.prefill(&second).await;
        r.finish(&second, &reply_text(20), &p);
        p.cached_tokens
    }

    #[tokio::test]
    async fn llamacpp_a_conversation_that_keeps_its_slot_keeps_its_cache() {
        let r = Replica::new("r", llamacpp(2, 0));
        assert!(second_turn(&r, 1).await > 0);
        assert_eq!(r.engine_snapshot().slots_busy, [false, false]);
        assert_eq!(r.engine_snapshot().running, 0);
    }

    #[tokio::test]
    async fn llamacpp_a_conversation_whose_slot_was_taken_starts_cold_unless_the_host_caches_it() {
        for (host, expect_hit) in [(0, false), (64 * 1024, true)] {
            let r = Replica::new("r", llamacpp(1, host));
            let first = Job::new(render_prompt(&other_conversation(1, 1)), 20);
            let p = r.prefill(&first).await;
            r.finish(&first, &reply_text(20), &p);
            drop(p);
            // Another conversation takes the only slot.
            second_turn(&r, 2).await;
            let back = Job::new(render_prompt(&other_conversation(1, 2)), 20);
            let p = r.prefill(&back).await;
            assert_eq!(p.cached_tokens > 0, expect_hit, "host cache {host}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn llamacpp_a_request_waits_while_every_slot_is_busy_and_counts_as_deferred() {
        let r = Arc::new(Replica::new("r", llamacpp(2, 0)));
        let job = Job::new(render_prompt(&other_conversation(1, 1)), 1);
        let a = r.prefill(&job).await;
        let b = r.prefill(&job).await;
        assert_eq!(r.engine_snapshot().slots_busy, [true, true]);
        let (r2, job2) = (Arc::clone(&r), job.clone());
        let third = tokio::spawn(async move { r2.prefill(&job2).await.queued });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let snapshot = r.engine_snapshot();
        assert_eq!((snapshot.running, snapshot.waiting), (2, 1));
        drop(a);
        assert!(third.await.unwrap() >= Duration::from_secs(2));
        drop(b);
        assert_eq!(r.engine_snapshot().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn vllm_admits_a_request_once_its_kv_blocks_fit() {
        // 64 blocks; each request needs 40 (its prompt and reply).
        let r = Arc::new(Replica::new(
            "r",
            Arc::new(SimConfig {
                engine: EngineMode::Vllm,
                cache_tokens: 64 * 16,
                time_scale: 0.0,
                ..SimConfig::default()
            }),
        ));
        let job = Job::new(vec![b'x'; 4 * 16 * 30], 10 * 16);
        let a = r.prefill(&job).await;
        let snapshot = r.engine_snapshot();
        assert_eq!(
            (snapshot.kv_total_blocks, snapshot.kv_used_blocks),
            (64, 40)
        );
        let (r2, job2) = (Arc::clone(&r), job.clone());
        let second = tokio::spawn(async move { r2.prefill(&job2).await.queued });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(r.engine_snapshot().waiting, 1);
        drop(a);
        assert!(second.await.unwrap() >= Duration::from_secs(1));
        assert_eq!(r.engine_snapshot().kv_used_blocks, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn vllm_preempts_a_request_that_has_no_blocks_to_decode_into() {
        // 64 blocks; each request: a 20-block prompt, 20 blocks of reply. Both prompts fit at
        // once; the first to finish its prefill takes its reply's blocks, the second is
        // preempted and runs once the first is done.
        let r = Arc::new(Replica::new(
            "r",
            Arc::new(SimConfig {
                engine: EngineMode::Vllm,
                cache_tokens: 64 * 16,
                prefill_tokens_per_sec: 1_000.0,
                ..SimConfig::default()
            }),
        ));
        let job = |n: u8| Job::new(vec![b'a' + n; 4 * 16 * 20 - 4], 20 * 16);
        let first = r.prefill(&job(0)).await;
        let (r2, second_job) = (Arc::clone(&r), job(1));
        let second = tokio::spawn(async move { r2.prefill(&second_job).await.prefill });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snapshot = r.engine_snapshot();
        assert_eq!(snapshot.preemptions, 1);
        assert_eq!((snapshot.running, snapshot.waiting), (1, 1));
        assert_eq!(
            snapshot.kv_used_blocks, 40,
            "the preempted request's blocks went back"
        );
        drop(first);
        let second_prefill = second.await.unwrap();
        // Its prefill, the wait, and the recompute of what the cache kept (little: the
        // prompt's blocks are cached, so mostly the wait).
        assert!(
            second_prefill >= Duration::from_secs(1),
            "{second_prefill:?}"
        );
        assert_eq!(r.engine_snapshot().kv_used_blocks, 0);
    }

    #[test]
    fn faults_parse_from_json() {
        let f: Fault = serde_json::from_str(r#"{"kind":"unavailable","retry_after":2}"#).unwrap();
        assert_eq!(
            f,
            Fault::Unavailable {
                retry_after: Some(2)
            }
        );
        let f: Fault = serde_json::from_str(r#"{"kind":"slow","factor":3.5}"#).unwrap();
        assert_eq!(f, Fault::Slow { factor: 3.5 });
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"explode"}"#).is_err());
    }
}
