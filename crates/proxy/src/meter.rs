//! Metering glue: per-request usage records, the usage log, and the Prometheus metrics.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher24};
use tether_affinity::{KeySource, Outcome, RoutingKey};
use tether_metering::{
    CacheLossSettings, Crossing, ReplicaCacheLoss, SessionHash, UsageLog, UsageRecord, UsageStatus,
};
use tether_topology::Topology;

use crate::body_budget::OverBudget;
use crate::router::Router;

/// Environment variable that overrides `metering.session_key`.
pub const SESSION_KEY_ENV: &str = "TETHER_SESSION_KEY";

/// The metrics of the design doc, on one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    input_tokens: IntCounterVec,
    output_tokens: IntCounterVec,
    cache_write_tokens: IntCounterVec,
    cost: IntCounterVec,
    saved: IntCounterVec,
    usage_unknown: IntCounterVec,
    duration: Histogram,
    inflight: IntGaugeVec,
    healthy: IntGaugeVec,
    ejections: IntCounterVec,
    retries: IntCounterVec,
    reloads: IntCounterVec,
    limited: IntCounterVec,
    override_entries: IntGauge,
    log_dropped: IntCounter,
    client_disconnects: IntCounter,
    body_bytes: IntGauge,
    body_over_budget: IntCounterVec,
    body_timeouts: IntCounterVec,
    key_sources: IntCounterVec,
    keys_ignored: IntCounterVec,
    cache_expected: IntCounterVec,
    cache_reported: IntCounterVec,
    cache_kept_ratio: GaugeVec,
    cache_loss: IntGaugeVec,
    /// `tether_session_key_source_total` by source, `none` last, each made on first use.
    key_source_by_source: [OnceLock<IntCounter>; KeySource::ALL.len() + 1],
    /// The counters a record adds to, resolved once per tenant (and outcome and status):
    /// `with_label_values` hashes the labels and takes the family's lock on every call. An
    /// immutable map read without a lock; the first record of a new combination replaces it
    /// with a copy that has it (under `handles_write`, so no addition is lost).
    handles: ArcSwap<HashMap<Arc<str>, Arc<TenantCounters>>>,
    handles_write: Mutex<()>,
    /// `tether_usage_unknown_total` by status, in [`UsageStatus::ALL`]'s order, each made on
    /// first use (as `with_label_values` would).
    usage_unknown_by_status: [OnceLock<IntCounter>; UsageStatus::ALL.len()],
}

/// One tenant's children of the request, token and cost counter families.
#[derive(Debug, Clone)]
struct TenantCounters {
    /// `tether_requests_total` by outcome and status: a handful per tenant, so a list.
    requests: Vec<(Option<Outcome>, u16, IntCounter)>,
    cached: IntCounter,
    uncached: IntCounter,
    output: IntCounter,
    cache_write: IntCounter,
    cost: IntCounter,
    saved: IntCounter,
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let requests = counter_vec(
            "tether_requests_total",
            "Requests by tenant, routing outcome and status.",
            &["tenant", "outcome", "status"],
        )?;
        let input_tokens = counter_vec(
            "tether_input_tokens_total",
            "Input tokens by tenant, cached (served from the prefix cache) or not.",
            &["tenant", "cached"],
        )?;
        let output_tokens = counter_vec(
            "tether_output_tokens_total",
            "Generated tokens by tenant.",
            &["tenant"],
        )?;
        let cache_write_tokens = counter_vec(
            "tether_cache_write_tokens_total",
            "Input tokens written to the prompt cache, by tenant (counted in \
             tether_input_tokens_total as cached=\"false\"); only responses that report them.",
            &["tenant"],
        )?;
        let cost = counter_vec(
            "tether_cost_micro_usd_total",
            "Cost in micro-dollars by tenant, cached tokens at their discount and cache writes \
             at their premium.",
            &["tenant"],
        )?;
        let saved = counter_vec(
            "tether_saved_micro_usd_total",
            "What the prefix cache saved, in micro-dollars, by tenant.",
            &["tenant"],
        )?;
        let usage_unknown = counter_vec(
            "tether_usage_unknown_total",
            "Responses whose usage could not be read, by reason.",
            &["reason"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "tether_request_duration_seconds",
                "Request start to end of response.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
        )?;
        registry.register(Box::new(duration.clone()))?;
        let inflight = IntGaugeVec::new(
            Opts::new("tether_replica_inflight", "Requests in flight per replica."),
            &["replica"],
        )?;
        registry.register(Box::new(inflight.clone()))?;
        let healthy = IntGaugeVec::new(
            Opts::new(
                "tether_replica_healthy",
                "1 when the replica takes traffic (not drained, probes passing, not ejected or \
                 overloaded), else 0.",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(healthy.clone()))?;
        let ejections = counter_vec(
            "tether_replica_ejections_total",
            "Times a replica was ejected after failed requests or failed probes.",
            &["replica"],
        )?;
        let retries = counter_vec(
            "tether_upstream_retries_total",
            "Requests sent to another replica, by why: connect (refused or timed out), timeout \
             (accepted, never answered), departed (the replica left rotation while the request \
             waited), error (reset before answering), status (429/502/503/504).",
            &["reason"],
        )?;
        let reloads = counter_vec(
            "tether_config_reloads_total",
            "Config reloads by result: ok (applied) or error (the previous config kept serving).",
            &["result"],
        )?;
        let limited = counter_vec(
            "tether_limited_total",
            "Requests answered 429 by a tenant limit, by tenant and limit: requests (rate), \
             new_sessions (rate of sessions no instance knew), concurrency (in flight).",
            &["tenant", "limit"],
        )?;
        let override_entries =
            IntGauge::new("tether_override_entries", "Sessions in the override table.")?;
        registry.register(Box::new(override_entries.clone()))?;
        let log_dropped = IntCounter::new(
            "tether_usage_log_dropped_total",
            "Usage records dropped because the log writer could not keep up.",
        )?;
        registry.register(Box::new(log_dropped.clone()))?;
        let client_disconnects = IntCounter::new(
            "tether_client_disconnects_total",
            "Requests whose client closed the connection before the response was complete \
             (logged at debug level: an expected thing for clients to do).",
        )?;
        registry.register(Box::new(client_disconnects.clone()))?;
        let body_bytes = IntGauge::new(
            "tether_request_body_bytes",
            "Bytes of request bodies Tether holds now (small bodies read ahead), within \
             request_bodies.memory_mib.",
        )?;
        registry.register(Box::new(body_bytes.clone()))?;
        let body_over_budget = counter_vec(
            "tether_request_body_over_budget_total",
            "Small request bodies not read ahead because holding them would go over the \
             memory budget (they stream on instead), by tenant and limit: total or tenant \
             (its share).",
            &["tenant", "limit"],
        )?;
        let body_timeouts = counter_vec(
            "tether_request_body_timeouts_total",
            "Requests answered 408 because their body had not arrived within \
             request_bodies.deadline, by tenant.",
            &["tenant"],
        )?;
        let key_sources = counter_vec(
            "tether_session_key_source_total",
            "Metered requests by where their session key came from: header, agent_header, \
             prompt_cache_key, user, fingerprint, or none.",
            &["source"],
        )?;
        let keys_ignored = counter_vec(
            "tether_session_keys_ignored_total",
            "Session ids Tether ignored because they were not valid tokens (an agent's own \
             header, a body field), by source: the request fell back to the next source.",
            &["source"],
        )?;
        let cache_expected = counter_vec(
            "tether_cache_expected_tokens_total",
            "Cached tokens sticky turns should have reported, by replica: the whole KV blocks \
             of what the same replica processed for the session's previous turn.",
            &["replica"],
        )?;
        let cache_reported = counter_vec(
            "tether_cache_reported_tokens_total",
            "Cached tokens those sticky turns reported, by replica, each turn's capped at its \
             expectation (so reported / expected is at most 1).",
            &["replica"],
        )?;
        let cache_kept_ratio = GaugeVec::new(
            Opts::new(
                "tether_cache_kept_ratio",
                "Reported / expected cached tokens of the replica's sticky turns over \
                 metering.cache_loss.window; absent until the window holds \
                 min_expected_tokens of expectation.",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(cache_kept_ratio.clone()))?;
        let cache_loss = IntGaugeVec::new(
            Opts::new(
                "tether_cache_loss",
                "1 while the replica's kept ratio is below metering.cache_loss.threshold \
                 (its sticky turns miss the prefix they should find), else 0.",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(cache_loss.clone()))?;
        Ok(Metrics {
            registry,
            cache_expected,
            cache_reported,
            cache_kept_ratio,
            cache_loss,
            key_sources,
            keys_ignored,
            key_source_by_source: Default::default(),
            requests,
            input_tokens,
            output_tokens,
            cache_write_tokens,
            cost,
            saved,
            usage_unknown,
            duration,
            inflight,
            healthy,
            ejections,
            retries,
            reloads,
            limited,
            override_entries,
            log_dropped,
            client_disconnects,
            body_bytes,
            body_over_budget,
            body_timeouts,
            handles: ArcSwap::default(),
            handles_write: Mutex::new(()),
            usage_unknown_by_status: Default::default(),
        })
    }

    /// The counters of a record: from the map as it is, or added to a copy of it.
    fn counters(&self, r: &UsageRecord) -> (Arc<TenantCounters>, IntCounter) {
        let find = |map: &HashMap<Arc<str>, Arc<TenantCounters>>| {
            let tenant = map.get(&*r.tenant)?;
            let (_, _, requests) = tenant
                .requests
                .iter()
                .find(|(outcome, status, _)| (*outcome, *status) == (r.outcome, r.status))?;
            Some((Arc::clone(tenant), requests.clone()))
        };
        if let Some(found) = find(&self.handles.load()) {
            return found;
        }
        let _writing = self.handles_write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.handles.load_full();
        if let Some(found) = find(&current) {
            return found;
        }
        let tenant = &*r.tenant;
        let mut counters = current.get(tenant).map_or_else(
            || TenantCounters {
                requests: Vec::new(),
                cached: self.input_tokens.with_label_values(&[tenant, "true"]),
                uncached: self.input_tokens.with_label_values(&[tenant, "false"]),
                output: self.output_tokens.with_label_values(&[tenant]),
                cache_write: self.cache_write_tokens.with_label_values(&[tenant]),
                cost: self.cost.with_label_values(&[tenant]),
                saved: self.saved.with_label_values(&[tenant]),
            },
            |c| TenantCounters::clone(c),
        );
        let requests = self.requests.with_label_values(&[
            tenant,
            r.outcome.map_or("-", Outcome::as_str),
            &r.status.to_string(),
        ]);
        counters
            .requests
            .push((r.outcome, r.status, requests.clone()));
        let counters = Arc::new(counters);
        let mut next = HashMap::clone(&current);
        next.insert(Arc::clone(&r.tenant), Arc::clone(&counters));
        self.handles.store(Arc::new(next));
        (counters, requests)
    }

    fn observe(&self, r: &UsageRecord, latency: Duration) {
        let (tenant, requests) = self.counters(r);
        requests.inc();
        let at = r.key_source.map_or(KeySource::ALL.len(), |source| {
            KeySource::ALL
                .iter()
                .position(|s| *s == source)
                .unwrap_or_default()
        });
        self.key_source_by_source[at]
            .get_or_init(|| {
                self.key_sources
                    .with_label_values(&[KeySource::label(r.key_source)])
            })
            .inc();
        self.duration.observe(latency.as_secs_f64());
        if let (Some(prompt), Some(cached)) = (r.prompt_tokens, r.cached_tokens) {
            tenant.cached.inc_by(cached);
            tenant.uncached.inc_by(prompt.saturating_sub(cached));
        }
        if let Some(out) = r.completion_tokens {
            tenant.output.inc_by(out);
        }
        if let Some(written) = r.cache_write_tokens {
            tenant.cache_write.inc_by(written);
        }
        if let (Some(cost), Some(uncached)) = (r.cost_micro_usd, r.uncached_cost_micro_usd) {
            tenant.cost.inc_by(cost);
            tenant.saved.inc_by(uncached.saturating_sub(cost));
        }
        if !r.usage_status.is_found() {
            let at = UsageStatus::ALL
                .iter()
                .position(|s| *s == r.usage_status)
                .unwrap_or_default();
            self.usage_unknown_by_status[at]
                .get_or_init(|| {
                    self.usage_unknown
                        .with_label_values(&[r.usage_status.as_str()])
                })
                .inc();
        }
    }
}

/// Usage records, the usage log and the metrics of one process.
#[derive(Debug)]
pub struct Meter {
    log: Option<UsageLog>,
    /// SipHash-2-4 (128-bit output) keyed with the session key: a keyed PRF built for short
    /// inputs, far cheaper than HMAC-SHA256, which needs two compressions of a 64-byte block
    /// for an 8-byte input.
    session_hasher: SipHasher24,
    metrics: Metrics,
    /// The cache-loss detector's state per replica id. Only sticky turns with an expectation
    /// take the lock, once, for a few additions; the metrics read it at scrape time.
    cache_loss: DashMap<Arc<str>, ReplicaCacheLoss>,
}

/// What the cache-loss detector says about one replica (for `/admin/replicas`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheLossView {
    /// Every expected cached token counted.
    pub expected_tokens: u64,
    /// Every reported cached token counted (capped at each turn's expectation).
    pub reported_tokens: u64,
    /// Reported / expected over the window, once it holds enough expectation.
    pub kept_ratio: Option<f64>,
    /// Whether the replica is flagged.
    pub loss: bool,
}

impl Meter {
    /// Opens the usage log (if configured) and builds the metrics.
    pub fn new(topology: &Topology) -> anyhow::Result<Meter> {
        let log = match &topology.usage_log {
            Some(l) => Some(UsageLog::open(&l.path, l.queue)?),
            None => None,
        };
        let session_key = match std::env::var(SESSION_KEY_ENV)
            .ok()
            .or_else(|| topology.metering.session_key.clone())
        {
            Some(key) if key.len() >= 16 => key.into_bytes(),
            Some(_) => anyhow::bail!("{SESSION_KEY_ENV} must be at least 16 characters"),
            None => {
                if log.is_some() {
                    log::warn!(
                        "no metering.session_key or {SESSION_KEY_ENV}: session hashes in the usage log \
                         use a random key and will not match across restarts"
                    );
                }
                rand::random::<[u8; 32]>().to_vec()
            }
        };
        Ok(Meter {
            log,
            session_hasher: session_hasher(&session_key),
            metrics: Metrics::new()?,
            cache_loss: DashMap::new(),
        })
    }

    /// The keyed hash that stands for a session in records: SipHash-2-4 of its routing key,
    /// 128 bits in hex. Without the key it reveals nothing about the token.
    pub fn session_hash(&self, key: RoutingKey) -> SessionHash {
        session_hash(self.session_hasher, key)
    }

    /// Counts a finished request and queues its record.
    pub fn finish(&self, record: UsageRecord, latency: Duration) {
        self.metrics.observe(&record, latency);
        if let Some(log) = &self.log {
            log.record(record);
        }
    }

    /// Counts a sticky turn of `replica` that should have found `expected` cached tokens and
    /// reported `reported`, and logs the replica's verdict when it changes (once per crossing,
    /// not per request).
    pub fn observe_cache(
        &self,
        replica: &Arc<str>,
        expected: u64,
        reported: u64,
        settings: &CacheLossSettings,
    ) {
        // A shard's lock, held for one replica's update: threads judging turns of different
        // replicas rarely meet.
        let crossing = {
            let mut state = match self.cache_loss.get_mut(replica) {
                Some(state) => state,
                None => self.cache_loss.entry(Arc::clone(replica)).or_default(),
            };
            state.observe(tether_health::now_ms(), expected, reported, settings)
        };
        match crossing {
            Some(Crossing::Lost { ratio, expected }) => log::warn!(
                "replica {replica}: sticky turns report {:.0} % of the cached tokens they should \
                 find ({expected} expected over the last {}; threshold {:.0} %): its prefix cache \
                 is off, flushed or evicting (see operations.md, \"Cache loss\")",
                ratio * 100.0,
                humantime::format_duration(settings.window),
                settings.threshold * 100.0,
            ),
            Some(Crossing::Recovered { ratio }) => log::info!(
                "replica {replica}: sticky turns report {:.0} % of the expected cached tokens \
                 again; cache loss cleared",
                ratio * 100.0
            ),
            None => {}
        }
    }

    /// The cache-loss detector's view of `replica` (`None` before its first judged turn).
    pub fn cache_loss(&self, replica: &str, settings: &CacheLossSettings) -> Option<CacheLossView> {
        let state = self.cache_loss.get(replica)?;
        Some(view(&state, settings))
    }

    /// Counts a session id that was present but not a valid token (the request fell back to
    /// the next source).
    pub fn count_ignored_key(&self, source: KeySource) {
        self.metrics
            .keys_ignored
            .with_label_values(&[source.as_str()])
            .inc();
    }

    /// Counts a request sent to another replica.
    pub fn count_retry(&self, reason: &str) {
        self.metrics.retries.with_label_values(&[reason]).inc();
    }

    /// Counts a request whose client left before its response was complete.
    pub fn count_client_disconnect(&self) {
        self.metrics.client_disconnects.inc();
    }

    /// Counts a request body not read ahead because the memory budget was spent.
    pub fn count_body_over_budget(&self, tenant: &str, limit: OverBudget) {
        self.metrics
            .body_over_budget
            .with_label_values(&[tenant, limit.as_str()])
            .inc();
    }

    /// Counts a request answered 408 because its body did not arrive in time.
    pub fn count_body_timeout(&self, tenant: &str) {
        self.metrics
            .body_timeouts
            .with_label_values(&[tenant])
            .inc();
    }

    /// Counts a request refused by a tenant limit.
    pub fn count_limited(&self, tenant: &str, limit: tether_metering::Limit) {
        self.metrics
            .limited
            .with_label_values(&[tenant, limit.as_str()])
            .inc();
    }

    /// Counts a config reload by its result.
    pub fn count_reload(&self, result: &str) {
        self.metrics.reloads.with_label_values(&[result]).inc();
    }

    /// Reopens the usage log (after rotation).
    pub fn reopen(&self) {
        if let Some(log) = &self.log {
            log.reopen();
        }
    }

    /// Flushes and closes the usage log; returns `(written, dropped)`.
    pub fn close(&self) -> (u64, u64) {
        match &self.log {
            Some(log) => {
                log.close();
                (log.written(), log.dropped())
            }
            None => (0, 0),
        }
    }

    /// The Prometheus text exposition, with gauges read now.
    pub fn render(&self, router: &Router) -> String {
        let m = &self.metrics;
        let snapshot = router.snapshot();
        let now = tether_health::now_ms();
        for replica in snapshot.fleet().replicas() {
            let id = &**replica.id();
            let live = replica.status();
            m.inflight
                .with_label_values(&[id])
                .set(i64::from(live.inflight()));
            let takes_traffic =
                replica.admission() == tether_affinity::Admission::Active && live.usable(now);
            m.healthy
                .with_label_values(&[id])
                .set(i64::from(takes_traffic));
            let ejections = m.ejections.with_label_values(&[id]);
            ejections.inc_by(live.ejections_total().saturating_sub(ejections.get()));
        }
        // A replica removed from the topology leaves every per-replica family (a stale
        // `tether_replica_healthy 1` would say it still takes traffic), and is judged no more:
        // its cache-loss window goes too.
        let in_topology = |id: &str| snapshot.fleet().find(id).is_some();
        drop_removed_replicas(&m.inflight, in_topology);
        drop_removed_replicas(&m.healthy, in_topology);
        drop_removed_replicas(&m.ejections, in_topology);
        drop_removed_replicas(&m.cache_expected, in_topology);
        drop_removed_replicas(&m.cache_reported, in_topology);
        drop_removed_replicas(&m.cache_kept_ratio, in_topology);
        drop_removed_replicas(&m.cache_loss, in_topology);
        self.cache_loss.retain(|id, _| in_topology(id));
        {
            let settings = snapshot.cache_loss();
            for entry in self.cache_loss.iter() {
                let (id, state) = entry.pair();
                let v = view(state, settings);
                let expected = m.cache_expected.with_label_values(&[id]);
                expected.inc_by(v.expected_tokens.saturating_sub(expected.get()));
                let reported = m.cache_reported.with_label_values(&[id]);
                reported.inc_by(v.reported_tokens.saturating_sub(reported.get()));
                match v.kept_ratio {
                    Some(ratio) => m.cache_kept_ratio.with_label_values(&[id]).set(ratio),
                    // Not judged (yet, or no longer: the window emptied): no value, not 0.
                    None => {
                        let _ = m.cache_kept_ratio.remove_label_values(&[id]);
                    }
                }
                m.cache_loss.with_label_values(&[id]).set(i64::from(v.loss));
            }
        }
        m.body_bytes
            .set(i64::try_from(router.body_budget().held()).unwrap_or(i64::MAX));
        m.override_entries
            .set(i64::try_from(router.overrides().len()).unwrap_or(i64::MAX));
        if let Some(log) = &self.log {
            let dropped = log.dropped();
            m.log_dropped
                .inc_by(dropped.saturating_sub(m.log_dropped.get()));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
            log::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

fn view(state: &ReplicaCacheLoss, settings: &CacheLossSettings) -> CacheLossView {
    CacheLossView {
        expected_tokens: state.expected_total(),
        reported_tokens: state.reported_total(),
        kept_ratio: state.ratio(tether_health::now_ms(), settings),
        loss: state.flagged(),
    }
}

/// The session hasher for a secret: SipHash-2-4 keyed with the first 128 bits of the secret's
/// SHA-256, so every byte of a long secret counts.
fn session_hasher(secret: &[u8]) -> SipHasher24 {
    let digest = Sha256::digest(secret);
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    SipHasher24::new_with_key(&key)
}

fn session_hash(mut hasher: SipHasher24, key: RoutingKey) -> SessionHash {
    hasher.write(&key.0.to_be_bytes());
    // Hex by table: `hex::encode` goes through a char iterator, five times the instructions.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = SessionHash::new();
    for b in hasher.finish128().as_bytes() {
        // 16 bytes, two digits each: exactly the 32 the hash holds.
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// Removes from the per-replica `family` the series of every replica `in_topology` rejects.
fn drop_removed_replicas<B: prometheus::core::MetricVecBuilder>(
    family: &prometheus::core::MetricVec<B>,
    in_topology: impl Fn(&str) -> bool,
) {
    use prometheus::core::Collector;
    for metrics in family.collect() {
        for metric in metrics.get_metric() {
            for label in metric.get_label() {
                if label.name() == "replica" && !in_topology(label.value()) {
                    let _ = family.remove_label_values(&[label.value()]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_metering::Timestamp;

    fn record(tenant: &str, prompt: u64, cached: u64, written: Option<u64>) -> UsageRecord {
        UsageRecord {
            ts: Timestamp::now(),
            tenant: tenant.into(),
            session: None,
            model: None,
            region: None,
            replica: None,
            outcome: Some(Outcome::Sticky),
            status: 200,
            prompt_tokens: Some(prompt),
            cached_tokens: Some(cached),
            completion_tokens: Some(1),
            cost_micro_usd: Some(2),
            uncached_cost_micro_usd: Some(3),
            latency_ms: 1,
            ttft_ms: None,
            attempts: 1,
            usage_status: UsageStatus::FOUND,
            cache_write_tokens: written,
            key_source: None,
            cache_write_5m_tokens: None,
            cache_write_1h_tokens: written,
            limit: None,
            expected_cached_tokens: None,
        }
    }

    #[test]
    fn cache_writes_are_counted_per_tenant_inside_the_uncached_input() {
        let m = Metrics::new().unwrap();
        m.observe(&record("acme", 100, 30, Some(50)), Duration::ZERO);
        m.observe(&record("acme", 10, 0, Some(4)), Duration::ZERO);
        // Other dialects do not report writes: the tenant counts nothing for them.
        m.observe(&record("globex", 100, 30, None), Duration::ZERO);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "tether_cache_write_tokens_total{tenant=\"acme\"} 54",
            "tether_cache_write_tokens_total{tenant=\"globex\"} 0",
            "tether_input_tokens_total{cached=\"false\",tenant=\"acme\"} 80",
            "tether_input_tokens_total{cached=\"true\",tenant=\"acme\"} 30",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn sticky_turns_that_miss_flag_their_replica_and_no_other() {
        let meter = Meter {
            log: None,
            session_hasher: session_hasher(b"a secret of sixteen+ bytes"),
            metrics: Metrics::new().unwrap(),
            cache_loss: DashMap::new(),
        };
        let settings = CacheLossSettings {
            min_expected_tokens: 3_000,
            ..CacheLossSettings::default()
        };
        let (cold, warm): (Arc<str>, Arc<str>) = ("eu-1".into(), "eu-2".into());
        assert_eq!(meter.cache_loss(&cold, &settings), None);
        for _ in 0..3 {
            meter.observe_cache(&cold, 1_024, 0, &settings);
            meter.observe_cache(&warm, 1_024, 2_000, &settings);
        }
        let cold = meter.cache_loss(&cold, &settings).unwrap();
        assert_eq!(
            cold,
            CacheLossView {
                expected_tokens: 3_072,
                reported_tokens: 0,
                kept_ratio: Some(0.0),
                loss: true
            }
        );
        let warm = meter.cache_loss(&warm, &settings).unwrap();
        assert_eq!((warm.reported_tokens, warm.kept_ratio), (3_072, Some(1.0)));
        assert!(!warm.loss);
    }

    #[test]
    fn session_hashes_are_128_bit_hex_stable_per_key_and_secret() {
        let a = session_hasher(b"a secret of sixteen+ bytes");
        let b = session_hasher(b"another secret, also long");
        let h = session_hash(a, RoutingKey(42));
        assert_eq!(h.len(), 32);
        assert!(h.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            h,
            session_hash(a, RoutingKey(42)),
            "same secret, same session"
        );
        let mut reference = a;
        reference.write(&42u64.to_be_bytes());
        let reference = u128::from_be_bytes(reference.finish128().as_bytes());
        assert_eq!(
            h.as_str(),
            format!("{reference:032x}"),
            "the 128 bits, in order"
        );
        assert_ne!(h, session_hash(a, RoutingKey(43)), "another session");
        assert_ne!(h, session_hash(b, RoutingKey(42)), "another secret");
    }
}
