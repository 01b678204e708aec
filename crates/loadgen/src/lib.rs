//! An agent-like workload for measuring what session affinity buys.
//!
//! Each session mints a UUIDv4 token (or, for a configurable share, sends none, like clients
//! that never adopted the header) and runs several turns; turn k sends the whole conversation
//! so far — the tenant's shared system prompt, every earlier user message and reply, and a new
//! user message. Sessions arrive over time, think between turns and overlap up to a
//! concurrency limit. Everything random comes from one seed, so two runs (or two routing
//! policies) see the same workload.
//!
//! The report gives, per tenant, per turn and overall: the **token-weighted input cache-hit
//! ratio** (Σ cached / Σ prompt tokens, from the responses' `usage`), the **oracle** ratio for
//! the same requests (what one infinite cache would have hit: the upper bound for any routing
//! policy), TTFT p50/p99 and errors; and requests per replica. The oracle uses the simulator's
//! own template and block hashing, so "cached" means the same thing on both sides. Optionally
//! ([`RunConfig::capacity_bound_tokens`]) a second ceiling, the [capacity bound](bound): an
//! upper bound on what any router could hit on the same requests with the fleet's finite cache.
//!
//! It drives Tether ([`Target::Proxy`]), a tier of Tether edges with each turn sent to an edge
//! chosen by an [`EdgeChoice`] ([`Target::Tier`]; requests per edge in the report), or the
//! replicas directly with a client-side policy ([`Target::Direct`]) for comparison:
//! round-robin, random, least-in-flight, nginx's `hash $http_x_session_affinity consistent`
//! (ketama, via `pingora-ketama`, which is nginx-compatible), and HAProxy's `hash-type
//! consistent` with `hash-balance-factor` (the same ring, skipping replicas over the
//! bounded-load limit), and SGLang router's prefix-aware `cache_aware` policy on the request
//! text ([`cache_aware`]).
//!
//! The report also gives the [warm-follow](follow) rate: how often a turn is answered by the
//! replica (or, given a region map, the region) that answered its session's previous turn,
//! raw and over the turns whose previous replica the caller did not [excuse](Excused).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tether_loadgen::{EdgeChoice, FleetFacts, RunConfig, Target, Workload};
//!
//! let config = RunConfig {
//!     workload: Workload::default(),
//!     target: Target::Tier(
//!         vec!["http://127.0.0.1:8080".into(), "http://127.0.0.1:8081".into()],
//!         EdgeChoice::RoundRobin,
//!     ),
//!     api_keys: vec!["sk-tether-demo".into()],
//!     stream: true,
//!     block_tokens: 16,
//!     capacity_bound_tokens: None,
//!     bound_replicas: None,
//! };
//! let facts = FleetFacts::default();
//! let excused = facts.excused.clone(); // call `excused.excuse("a-2")` when a-2 is stopped
//! let report = tether_loadgen::run_with(config, facts, None).await?;
//! println!("{:.3} of turns followed", report.warm_follow.eligible_rate);
//! # drop(excused);
//! # Ok(()) }
//! ```

pub mod bound;
pub mod cache_aware;
mod client;
mod direct;
pub mod follow;
mod report;
mod tier;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use serde_json::json;
use tether_replica_sim::template::{
    block_hashes, render_prompt, render_reply, token_count, ChatMessage,
};
use tether_replica_sim::PrefixCache;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use bound::TraceStep;
pub use client::{send_turn, TurnError, TurnReply};
use direct::DirectRouter;
pub use direct::{ClientPolicy, BALANCE_FACTOR, SMALL_FLEET_BALANCE_ABS_THRESHOLD};
pub use follow::{Excused, FleetFacts, WarmFollow};
pub use report::{EdgeTotals, Outcome, Report, Totals};
pub use tier::EdgeChoice;
pub use workload::{text, ClientProfile, SessionPlan, Workload, SHARED_SYSTEM_PROMPT};

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Through a proxy at this base URL (`http://127.0.0.1:8080`).
    Proxy(String),
    /// Straight to these replica base URLs, spread by a client-side policy.
    Direct(Vec<String>, ClientPolicy),
    /// Through a tier of proxies at these base URLs (the edges), each turn to the edge the
    /// choice names. One edge behaves as [`Target::Proxy`].
    Tier(Vec<String>, EdgeChoice),
}

/// A run: workload, target, credentials.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// What the sessions say.
    pub workload: Workload,
    /// Where they say it.
    pub target: Target,
    /// API keys; tenant `i` uses key `i % len` (none = no `Authorization` header).
    pub api_keys: Vec<String>,
    /// Stream responses (needed for a real TTFT).
    pub stream: bool,
    /// Tokens per KV block of the fleet (for the oracle).
    pub block_tokens: usize,
    /// The fleet's total cache capacity in tokens, for the capacity bound; `None` = no bound.
    pub capacity_bound_tokens: Option<usize>,
    /// The fleet's number of replicas (equal caches of `capacity_bound_tokens / n`), for the
    /// tighter partitioned bound ([`bound::partitioned_capacity_blocks`]); `None` = only the
    /// pooled one.
    pub bound_replicas: Option<usize>,
}

struct Shared {
    config: RunConfig,
    client: reqwest::Client,
    oracle: Mutex<PrefixCache>,
    /// The requests as a cache sees them, for the capacity bound (kept only when wanted).
    trace: Option<Mutex<Vec<TraceStep>>>,
    /// Per tenant, the leading blocks all its prompts so far share (for the partitioned bound;
    /// kept only when wanted).
    shared_prefix: Option<Mutex<BTreeMap<usize, Vec<u64>>>>,
    outcomes: Mutex<Vec<Outcome>>,
    errors: Mutex<BTreeMap<(usize, usize), u64>>,
    error_samples: Mutex<Vec<String>>,
    next_replica: AtomicUsize,
    direct: Option<DirectRouter>,
    /// Per edge of a proxy or tier target: its URL, requests answered, requests failed.
    edges: Vec<(String, AtomicU64, AtomicU64)>,
    progress: Option<ProgressBar>,
}

/// Where one request goes.
struct Route {
    url: String,
    /// The replica, when sending straight to replicas (for in-flight counting).
    replica: Option<usize>,
    /// The edge, when sending through proxies.
    edge: Option<usize>,
}

impl Shared {
    /// Where turn `turn` of session `session` goes.
    /// `text` is the request's routing text, when the policy needs one.
    fn route(&self, token: Option<&str>, text: Option<&str>, session: usize, turn: usize) -> Route {
        let (base, replica, edge) = match (&self.config.target, &self.direct) {
            (Target::Direct(_, policy), Some(direct)) => {
                let i = direct.pick(*policy, token, text, &self.next_replica);
                (direct.urls[i].as_str(), Some(i), None)
            }
            (Target::Direct(urls, _), None) => {
                (urls.first().map_or("", String::as_str), None, None)
            }
            (Target::Proxy(url), _) => (url.as_str(), None, Some(0)),
            (Target::Tier(urls, choice), _) => {
                let seed = self.config.workload.seed;
                let e = choice.edge(seed, session, turn, urls.len());
                (urls.get(e).map_or("", String::as_str), None, Some(e))
            }
        };
        Route {
            url: format!("{}/v1/chat/completions", base.trim_end_matches('/')),
            replica,
            edge,
        }
    }

    /// Counts a request to `edge` as answered or failed.
    fn count_edge(&self, edge: Option<usize>, answered: bool) {
        if let Some((_, ok, failed)) = edge.and_then(|e| self.edges.get(e)) {
            let counter = if answered { ok } else { failed };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What an infinite cache would have served of this prompt (whose blocks hash to
    /// `hashes`); then remembers prompt and reply (and traces the reply for the capacity bound).
    fn oracle(&self, prompt: &[u8], hashes: &[u64], prompt_tokens: u64, reply: &str) -> u64 {
        let mut full = prompt.to_vec();
        full.extend(render_reply(reply));
        let full = block_hashes(&full, self.config.block_tokens.max(1));
        let mut oracle = self.oracle.lock().unwrap_or_else(|e| e.into_inner());
        let cached = oracle.cached_tokens(hashes, prompt_tokens);
        oracle.admit(&full);
        drop(oracle);
        self.trace(Vec::new(), full);
        cached
    }

    /// Traces a prompt as it is sent: a replica looks it up and stores it at prefill, before
    /// the reply (traced when it completes), so overlapping requests see each other's prompts
    /// in this order, not in completion order.
    fn trace_sent(&self, tenant: usize, prompt: &[u8], hashes: &[u64]) {
        if self.trace.is_none() {
            return;
        }
        if let Some(shared) = &self.shared_prefix {
            let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
            let common = shared.entry(tenant).or_insert_with(|| hashes.to_vec());
            let n = common
                .iter()
                .zip(hashes)
                .take_while(|(a, b)| a == b)
                .count();
            common.truncate(n);
        }
        let usable =
            PrefixCache::usable_blocks(token_count(prompt.len()), self.config.block_tokens);
        self.trace(hashes[..usable.min(hashes.len())].to_vec(), hashes.to_vec());
    }

    fn trace(&self, lookups: Vec<u64>, admits: Vec<u64>) {
        if let Some(trace) = &self.trace {
            trace
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(TraceStep { lookups, admits });
        }
    }

    fn fail(&self, tenant: usize, turn: usize, error: &TurnError) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant, turn))
            .or_default() += 1;
        let mut samples = self.error_samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < 5 {
            samples.push(format!("tenant-{tenant} turn {}: {error}", turn + 1));
        }
    }
}

async fn run_session(shared: Arc<Shared>, index: usize) {
    let w = &shared.config.workload;
    let plan = w.plan(index);
    let api_key = (!shared.config.api_keys.is_empty())
        .then(|| shared.config.api_keys[plan.tenant % shared.config.api_keys.len()].clone());
    let mut history = vec![ChatMessage {
        role: "system".into(),
        content: w.system_prompt_of(&plan),
    }];
    let turns = plan.user_messages.len();
    for turn in 0..turns {
        if turn > 0 && plan.think_ms[turn] > 0 {
            tokio::time::sleep(Duration::from_millis(plan.think_ms[turn])).await;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: plan.user_messages[turn].clone(),
        });
        let messages: Vec<_> = history
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        let mut body = w.request(&messages, shared.config.stream);
        let session_header = match (plan.profile, plan.token.as_deref()) {
            (ClientProfile::Header, Some(token)) => Some(("x-session-affinity", token)),
            (ClientProfile::AgentHeader, Some(token)) => Some(("x-claude-code-session-id", token)),
            (ClientProfile::PromptCacheKey, Some(token)) => {
                body["prompt_cache_key"] = json!(token);
                None
            }
            _ => None,
        };
        // Only a prefix-aware router reads the request text (built as SGLang's router does).
        let text =
            matches!(shared.config.target, Target::Direct(_, p) if p.reads_text()).then(|| {
                cache_aware::routing_text(
                    history
                        .iter()
                        .map(|m| (m.role.as_str(), m.content.as_str())),
                )
            });
        let route = shared.route(plan.token.as_deref(), text.as_deref(), plan.index, turn);
        // Rendered and hashed once: traced now, scored against the oracle when answered.
        let prompt = render_prompt(&history);
        let hashes = block_hashes(&prompt, shared.config.block_tokens.max(1));
        shared.trace_sent(plan.tenant, &prompt, &hashes);
        let counter = shared
            .direct
            .as_ref()
            .zip(route.replica)
            .map(|(d, i)| &d.inflight[i]);
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let sent_at = std::time::Instant::now();
        let result = send_turn(
            &shared.client,
            &route.url,
            api_key.as_deref(),
            session_header,
            &body,
            shared.config.stream,
        )
        .await;
        let answered_at = std::time::Instant::now();
        shared.count_edge(route.edge, result.is_ok());
        if let Some(c) = counter {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(p) = &shared.progress {
            p.inc(1);
        }
        match result {
            Ok(reply) => {
                let oracle_cached_tokens =
                    shared.oracle(&prompt, &hashes, reply.prompt_tokens, &reply.content);
                shared
                    .outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Outcome {
                        session: plan.index,
                        tenant: plan.tenant,
                        turn,
                        prompt_tokens: reply.prompt_tokens,
                        cached_tokens: reply.cached_tokens,
                        oracle_cached_tokens,
                        ttft_ms: reply.ttft_ms,
                        replica: reply.replica,
                        sent_at,
                        answered_at,
                    });
                history.push(ChatMessage {
                    role: "assistant".into(),
                    content: reply.content,
                });
            }
            Err(error) => {
                // Without the reply the conversation cannot go on; the rest of its turns are
                // not sent (and not counted as requests).
                shared.fail(plan.tenant, turn, &error);
                if let Some(p) = &shared.progress {
                    p.inc((turns - turn - 1) as u64);
                }
                return;
            }
        }
    }
}

/// Runs the workload and reports, with no replica excused and no regions.
pub async fn run(config: RunConfig, progress: Option<ProgressBar>) -> anyhow::Result<Report> {
    run_with(config, FleetFacts::default(), progress).await
}

/// Runs the workload and reports, scoring warm-follow with the caller's `facts` (whose
/// [`Excused`] handle may still be written while the run goes on).
pub async fn run_with(
    config: RunConfig,
    facts: FleetFacts,
    progress: Option<ProgressBar>,
) -> anyhow::Result<Report> {
    let concurrency = config.workload.concurrency.max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let direct = match &config.target {
        Target::Direct(urls, policy) => Some(DirectRouter::new(urls, *policy)?),
        Target::Proxy(_) | Target::Tier(..) => None,
    };
    let edges = match &config.target {
        Target::Proxy(url) => std::slice::from_ref(url),
        Target::Tier(urls, _) if urls.is_empty() => anyhow::bail!("a tier needs an edge"),
        Target::Tier(urls, _) => urls.as_slice(),
        Target::Direct(..) => &[],
    };
    let edges = edges
        .iter()
        .map(|url| (url.clone(), AtomicU64::new(0), AtomicU64::new(0)))
        .collect();
    let shared = Arc::new(Shared {
        direct,
        oracle: Mutex::new(PrefixCache::unbounded(config.block_tokens)),
        trace: config.capacity_bound_tokens.map(|_| Mutex::new(Vec::new())),
        shared_prefix: config
            .capacity_bound_tokens
            .and(config.bound_replicas)
            .map(|_| Mutex::new(BTreeMap::new())),
        client,
        outcomes: Mutex::new(Vec::new()),
        errors: Mutex::new(BTreeMap::new()),
        error_samples: Mutex::new(Vec::new()),
        next_replica: AtomicUsize::new(0),
        edges,
        progress,
        config,
    });
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let rate = shared.config.workload.arrival_rate;
    let mut sessions = tokio::task::JoinSet::new();
    for index in 0..shared.config.workload.sessions {
        if rate > 0.0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(index as f64 / rate)).await;
        }
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let shared = Arc::clone(&shared);
        sessions.spawn(async move {
            run_session(shared, index).await;
            drop(slot);
        });
    }
    while let Some(done) = sessions.join_next().await {
        done?;
    }
    if let Some(p) = &shared.progress {
        p.finish_and_clear();
    }
    let outcomes = std::mem::take(&mut *shared.outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap_or_else(|e| e.into_inner()));
    let elapsed = started.elapsed().as_secs_f64();
    let mut report = Report::build_with(&outcomes, &errors, elapsed, &facts);
    let workload = &shared.config.workload;
    report.set_profiles(&outcomes, |session| workload.plan(session).profile.as_str());
    report.router_decision_ns = shared
        .direct
        .as_ref()
        .and_then(DirectRouter::mean_decision_nanos);
    report.by_edge = shared
        .edges
        .iter()
        .map(|(url, ok, failed)| EdgeTotals {
            url: url.clone(),
            requests: ok.load(Ordering::Relaxed),
            errors: failed.load(Ordering::Relaxed),
        })
        .collect();
    report.error_samples = std::mem::take(
        &mut *shared
            .error_samples
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    if let (Some(trace), Some(tokens)) = (&shared.trace, shared.config.capacity_bound_tokens) {
        let trace = trace.lock().unwrap_or_else(|e| e.into_inner());
        let block_tokens = shared.config.block_tokens.max(1);
        // At least one block, as a simulated replica's cache holds at least one. (Prompts of
        // requests that then failed are in the trace too: a few more possible hits, so the
        // bound is only looser.)
        let hits = bound::optimal_block_hits(&trace, (tokens / block_tokens).max(1));
        report.set_capacity_bound(hits * block_tokens as u64);
        let wanted = shared.config.bound_replicas.filter(|n| *n > 0);
        if let (Some(replicas), Some(prefix)) = (wanted, &shared.shared_prefix) {
            let prefixes: Vec<usize> = prefix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(Vec::len)
                .collect();
            let per_replica = (tokens / replicas / block_tokens).max(1);
            let room = bound::partitioned_capacity_blocks(replicas, per_replica, &prefixes);
            let hits = bound::optimal_block_hits(&trace, room.max(1));
            report.set_partitioned_bound(hits * block_tokens as u64);
        }
        if report.overall.hit_ratio > report.capacity_bound_ratio.unwrap_or(1.0) {
            eprintln!(
                "warning: measured hit ratio {:.3} is above the capacity bound {:.3}: the bound's \
                 trace order differs from what the replicas saw",
                report.overall.hit_ratio,
                report.capacity_bound_ratio.unwrap_or(0.0)
            );
        }
    }
    Ok(report)
}
