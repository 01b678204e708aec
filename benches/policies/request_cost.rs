//! What naming a tokenless request costs in CPU, in-process, over one set of requests: Tether's
//! conversation fingerprint (read the body's session fields, hash the head) against SGLang's
//! cache-aware decision (prefix match and insert in the approximate radix tree,
//! [`tether_loadgen::cache_aware`]).
//!
//! The requests are a workload's conversations replayed without a fleet: every turn's body
//! as loadgen sends it, the replies the simulator would give (`reply_text` of `max_tokens`),
//! sessions interleaved turn by turn in groups of the workload's concurrency, as they overlap
//! in a run. The decision sees an idle fleet (no load imbalance), as the scenario's loads
//! (at most the concurrency, far under `balance_abs_threshold`) never trigger SGLang's
//! load-balancing branch either.
//!
//! Each side is timed over the whole replay (one clock read per pass, not per request), the
//! best of a few passes; the prefix-aware side starts each pass from an empty tree. Not
//! counted on either side: reading the body off the socket. Counted separately for SGLang:
//! what its router does before the decision, parsing the body and joining the messages' text.

use std::hint::black_box;
use std::time::Instant;

use serde_json::{json, Value};
use tether_affinity::{BodyKeys, Fingerprinter, TenantScope};
use tether_loadgen::cache_aware::{routing_text, CacheAwareConfig, CacheAwareRouter};
use tether_loadgen::Workload;
use tether_replica_sim::template::reply_text;

/// Passes per side; the fastest is kept.
const PASSES: usize = 5;

/// One request of the replay: its body, its tenant and SGLang's routing text.
pub struct ReplayRequest {
    pub body: Vec<u8>,
    pub tenant: usize,
    pub text: String,
}

/// CPU per request, nanoseconds.
pub struct RequestCost {
    pub requests: usize,
    /// `BodyKeys::parse` and `Fingerprinter::fingerprint`.
    pub fingerprint_ns: f64,
    /// SGLang's decision: prefix match, threshold, insert.
    pub prefix_aware_ns: f64,
    /// The same plus what SGLang's router does first: parse the body, join the texts.
    pub prefix_aware_with_parse_ns: f64,
}

/// `workload`'s requests, in the order a run interleaves them.
pub fn replay_requests(workload: &Workload) -> Vec<ReplayRequest> {
    let reply = reply_text(workload.max_tokens);
    let group = workload.concurrency.max(1);
    let mut out = Vec::new();
    let sessions: Vec<usize> = (0..workload.sessions).collect();
    for batch in sessions.chunks(group) {
        let plans: Vec<_> = batch.iter().map(|i| workload.plan(*i)).collect();
        let mut histories: Vec<Vec<(&str, String)>> = plans
            .iter()
            .map(|p| vec![("system", workload.system_prompt_of(p))])
            .collect();
        let turns = plans
            .iter()
            .map(|p| p.user_messages.len())
            .max()
            .unwrap_or(0);
        for turn in 0..turns {
            for (plan, history) in plans.iter().zip(histories.iter_mut()) {
                let Some(user) = plan.user_messages.get(turn) else {
                    continue;
                };
                history.push(("user", user.clone()));
                let messages: Vec<Value> = history
                    .iter()
                    .map(|(role, content)| json!({"role": role, "content": content}))
                    .collect();
                out.push(ReplayRequest {
                    body: serde_json::to_vec(&workload.request(&messages, true))
                        .expect("a JSON body"),
                    tenant: plan.tenant,
                    text: routing_text(history.iter().map(|(r, c)| (*r, c.as_str()))),
                });
                history.push(("assistant", reply.clone()));
            }
        }
    }
    out
}

fn best_of(mut pass: impl FnMut() -> f64) -> f64 {
    (0..PASSES).map(|_| pass()).fold(f64::INFINITY, f64::min)
}

/// Times both sides over `requests` for a fleet of `replicas`.
pub fn measure(requests: &[ReplayRequest], replicas: usize) -> RequestCost {
    let n = requests.len().max(1) as f64;
    let fingerprinter = Fingerprinter::new(*b"0123456789abcdef");
    let names: Vec<String> = (0..=requests.iter().map(|r| r.tenant).max().unwrap_or(0))
        .map(|t| format!("tenant-{t}"))
        .collect();
    // Tether derives a tenant's scope once, when it loads its tenants.
    let scopes: Vec<TenantScope> = names.iter().map(|n| TenantScope::new(n)).collect();
    let fingerprint_ns = best_of(|| {
        let started = Instant::now();
        for r in requests {
            let scope = scopes[r.tenant];
            let keys = BodyKeys::parse(black_box(&r.body));
            black_box(keys.and_then(|k| fingerprinter.fingerprint(scope, &k)));
        }
        started.elapsed().as_nanos() as f64 / n
    });
    let idle = vec![0usize; replicas];
    let prefix_aware_ns = best_of(|| {
        let mut router = CacheAwareRouter::new(replicas, CacheAwareConfig::default());
        let started = Instant::now();
        for r in requests {
            black_box(router.select(black_box(&r.text), &idle));
        }
        started.elapsed().as_nanos() as f64 / n
    });
    let prefix_aware_with_parse_ns = best_of(|| {
        let mut router = CacheAwareRouter::new(replicas, CacheAwareConfig::default());
        let started = Instant::now();
        for r in requests {
            let body: Value = serde_json::from_slice(black_box(&r.body)).unwrap_or(Value::Null);
            let text = routing_text(
                body["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| Some((m["role"].as_str()?, m["content"].as_str()?))),
            );
            black_box(router.select(&text, &idle));
        }
        started.elapsed().as_nanos() as f64 / n
    });
    RequestCost {
        requests: requests.len(),
        fingerprint_ns,
        prefix_aware_ns,
        prefix_aware_with_parse_ns,
    }
}

/// Prints the costs under `name` (a `bench/scenario` prefix).
pub fn print(name: &str, cost: &RequestCost) {
    println!(
        "{name}/cpu_per_request over {} requests: tether fingerprint {:.0} ns; SGLang cache-aware \
         decision {:.0} ns ({:.0} ns with its body parse and text join); fingerprint / decision \
         {:.3} (target < 1: a fraction)",
        cost.requests,
        cost.fingerprint_ns,
        cost.prefix_aware_ns,
        cost.prefix_aware_with_parse_ns,
        cost.fingerprint_ns / cost.prefix_aware_ns.max(f64::MIN_POSITIVE),
    );
}
