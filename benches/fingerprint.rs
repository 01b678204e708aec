//! What naming a session from its request body costs on the request path (criterion): one
//! `BodyKeys::parse` of a chat body and, for the fingerprint, one keyed hash of its head.
//!
//! - `parse_only/<body>`: the body's session fields, what `prompt_cache_key` costs.
//! - `parse_and_fingerprint/<body>`: the same plus the conversation fingerprint.
//! - `token_key`: the header path for comparison (validate a token, derive its key).
//!
//! Bodies: `chat_1k` (a system prompt and three turns, ~1 KiB), `agent_48k` (a 4 KiB system
//! prompt and 20 turns with tool output, ~48 KiB: close to the 64 KiB read-ahead limit).
//!
//! Then the fingerprint against prefix-aware routing (SGLang's cache-aware policy) over the
//! same requests: the tokenless sessions of the policies bench's key-sources scenario
//! replayed in-process ([`request_cost`]), CPU per request of each printed on one line.

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use tether_affinity::{BodyKeys, Fingerprinter, TenantScope, TokenRules};
use tether_loadgen::{ClientProfile, Workload};

#[path = "policies/request_cost.rs"]
mod request_cost;

fn chat_body(system_bytes: usize, turns: usize, tool_output_bytes: usize) -> Vec<u8> {
    let mut messages = vec![
        json!({"role": "system", "content": "You are a careful coding agent. ".repeat(system_bytes / 32)}),
    ];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("step {t}: please continue with the refactor")}));
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": format!("call_{t}"), "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"src/lib.rs\"}"}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{t}"), "content": "fn main() { println!(\"hi\"); }\n".repeat(tool_output_bytes / 32)}));
    }
    serde_json::to_vec(&json!({"model": "qwen3-coder", "stream": true, "messages": messages, "prompt_cache_key": "conv-3f2b8c1e"}))
        .unwrap()
}

fn fingerprint(c: &mut Criterion) {
    let bodies = [
        ("chat_1k", chat_body(512, 3, 64)),
        ("agent_48k", chat_body(4096, 20, 2048)),
    ];
    let fingerprinter = Fingerprinter::new(*b"0123456789abcdef");
    let scope = TenantScope::new("acme");
    let mut group = c.benchmark_group("fingerprint");
    for (name, body) in &bodies {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("parse_only/{name}"), |b| {
            b.iter(|| {
                let keys = BodyKeys::parse(black_box(body)).unwrap();
                black_box(keys.prompt_cache_key.is_some())
            })
        });
        group.bench_function(format!("parse_and_fingerprint/{name}"), |b| {
            b.iter(|| {
                let keys = BodyKeys::parse(black_box(body)).unwrap();
                black_box(fingerprinter.fingerprint(scope, &keys))
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    let rules = TokenRules::default();
    group.bench_function("token_key", |b| {
        b.iter(|| {
            let token = rules
                .validate(black_box(b"3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c"))
                .unwrap();
            black_box(scope.key(token))
        })
    });
    group.finish();
}

/// The fingerprint against SGLang's cache-aware decision, over the tokenless sessions of the
/// policies bench's key-sources scenario (its full-size workload, six replicas).
fn against_prefix_aware(_: &mut Criterion) {
    let workload = Workload {
        profiles: vec![ClientProfile::Nothing],
        ..Workload::default()
    };
    let requests = request_cost::replay_requests(&workload);
    request_cost::print(
        "fingerprint/vs_prefix_aware",
        &request_cost::measure(&requests, 6),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = fingerprint, against_prefix_aware
}
criterion_main!(benches);
