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
//! own template and block hashing, so "cached" means the same thing on both sides.
//!
//! It drives Tether ([`Target::Proxy`]) or the replicas directly with a client-side policy
//! ([`Target::Direct`]: round-robin or random) for comparison.

mod client;
mod report;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use rand::Rng;
use serde_json::json;
use tether_replica_sim::template::{block_hashes, render_prompt, render_reply, ChatMessage};
use tether_replica_sim::PrefixCache;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use client::{send_turn, TurnError, TurnReply};
pub use report::{Outcome, Report, Totals};
pub use workload::{text, SessionPlan, Workload};

/// How requests for replicas are spread when Tether is not in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientPolicy {
    /// Each request to the next replica.
    RoundRobin,
    /// Each request to a random replica.
    Random,
}

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Through a proxy at this base URL (`http://127.0.0.1:8080`).
    Proxy(String),
    /// Straight to these replica base URLs, spread by a client-side policy.
    Direct(Vec<String>, ClientPolicy),
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
}

struct Shared {
    config: RunConfig,
    client: reqwest::Client,
    oracle: Mutex<PrefixCache>,
    outcomes: Mutex<Vec<Outcome>>,
    errors: Mutex<BTreeMap<(usize, usize), u64>>,
    error_samples: Mutex<Vec<String>>,
    next_replica: AtomicUsize,
    progress: Option<ProgressBar>,
}

impl Shared {
    fn url(&self) -> String {
        let base = match &self.config.target {
            Target::Proxy(url) => url.as_str(),
            Target::Direct(urls, policy) => {
                let i = match policy {
                    ClientPolicy::RoundRobin => self.next_replica.fetch_add(1, Ordering::Relaxed),
                    ClientPolicy::Random => rand::thread_rng().gen_range(0..urls.len().max(1)),
                };
                urls.get(i % urls.len().max(1)).map_or("", String::as_str)
            }
        };
        format!("{}/v1/chat/completions", base.trim_end_matches('/'))
    }

    /// What an infinite cache would have served of this prompt; then remembers prompt and reply.
    fn oracle(&self, prompt: &[u8], prompt_tokens: u64, reply: &str) -> u64 {
        let mut oracle = self.oracle.lock().unwrap_or_else(|e| e.into_inner());
        let hashes = block_hashes(prompt, oracle.block_tokens());
        let cached = oracle.cached_tokens(&hashes, prompt_tokens);
        let mut full = prompt.to_vec();
        full.extend(render_reply(reply));
        let block_tokens = oracle.block_tokens();
        oracle.admit(&block_hashes(&full, block_tokens));
        cached
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
        content: w.system_prompt(plan.tenant),
    }];
    for turn in 0..w.turns {
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
        let body = w.request(&messages, shared.config.stream);
        let result = send_turn(
            &shared.client,
            &shared.url(),
            api_key.as_deref(),
            plan.token.as_deref(),
            &body,
            shared.config.stream,
        )
        .await;
        if let Some(p) = &shared.progress {
            p.inc(1);
        }
        match result {
            Ok(reply) => {
                let prompt = render_prompt(&history);
                let oracle_cached_tokens =
                    shared.oracle(&prompt, reply.prompt_tokens, &reply.content);
                shared
                    .outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Outcome {
                        tenant: plan.tenant,
                        turn,
                        prompt_tokens: reply.prompt_tokens,
                        cached_tokens: reply.cached_tokens,
                        oracle_cached_tokens,
                        ttft_ms: reply.ttft_ms,
                        replica: reply.replica,
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
                    p.inc((w.turns - turn - 1) as u64);
                }
                return;
            }
        }
    }
}

/// Runs the workload and reports.
pub async fn run(config: RunConfig, progress: Option<ProgressBar>) -> anyhow::Result<Report> {
    let concurrency = config.workload.concurrency.max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let shared = Arc::new(Shared {
        oracle: Mutex::new(PrefixCache::unbounded(config.block_tokens)),
        client,
        outcomes: Mutex::new(Vec::new()),
        errors: Mutex::new(BTreeMap::new()),
        error_samples: Mutex::new(Vec::new()),
        next_replica: AtomicUsize::new(0),
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
    let mut report = Report::build(&outcomes, &errors, started.elapsed().as_secs_f64());
    report.error_samples = std::mem::take(
        &mut *shared
            .error_samples
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    Ok(report)
}
