//! Heap allocations per metered request, counted by the allocator (`stats_alloc`), on the path
//! metering adds to a request: usage extraction as the body passes, the filter that hides an
//! injected usage event, the usage record, the metrics and the usage log's queue.
//!
//! Its own test binary: the counting allocator is global, so nothing else may run beside it.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tether::meter::Meter;
use tether_affinity::{Outcome, RoutingKey};
use tether_metering::{
    Dialect, Framing, Timestamp, UsageChunkFilter, UsageExtractor, UsageRecord, UsageStatus,
    DEFAULT_WINDOW,
};
use tether_topology::Topology;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations allowed per metered request: a JSON response, an SSE stream (asked or injected).
/// Half an allocation above what is counted, for the log writer's occasional own.
const BOUND_JSON: f64 = 2.5;
const BOUND_SSE: f64 = 4.5;

/// Requests counted per case, after as many to warm up (first-use label children, lazily
/// built searchers).
const REQUESTS: usize = 200;

/// What the replicas in the benchmarks send: one event per chunk, as Pingora hands them over.
fn sse_chunks() -> Vec<Bytes> {
    let event = |choices: &str, extra: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
             \"model\":\"tether-sim\",\"choices\":{choices}{extra}}}\n\n"
        )
    };
    let mut chunks = vec![event(
        r#"[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]"#,
        "",
    )];
    for i in 0..100 {
        chunks.push(event(
            &format!(r#"[{{"index":0,"delta":{{"content":"tok{i:03} "}},"finish_reason":null}}]"#),
            "",
        ));
    }
    chunks.push(event(
        r#"[{"index":0,"delta":{},"finish_reason":"length"}]"#,
        "",
    ));
    chunks.push(event(
        "[]",
        r#","usage":{"prompt_tokens":1210,"completion_tokens":100,"total_tokens":1310,"prompt_tokens_details":{"cached_tokens":1024}}"#,
    ));
    chunks.push("data: [DONE]\n\n".to_owned());
    chunks.into_iter().map(Bytes::from).collect()
}

fn json_chunks() -> Vec<Bytes> {
    vec![Bytes::from(format!(
        "{{\"id\":\"chatcmpl-7\",\"object\":\"chat.completion\",\"created\":1700000000,\
         \"model\":\"tether-sim\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\
         \"content\":\"{}\"}},\"finish_reason\":\"length\"}}],\"usage\":{{\"prompt_tokens\":1210,\
         \"completion_tokens\":100,\"total_tokens\":1310,\"prompt_tokens_details\":\
         {{\"cached_tokens\":1024}}}}}}",
        "tok ".repeat(100)
    ))]
}

#[derive(Debug, Clone, Copy)]
enum Case {
    Json,
    SseAsked,
    SseInjected,
}

/// One request's metering, as the proxy's hooks do it: `response_filter` builds the extractor
/// (and the filter when usage was injected), `response_body_filter` feeds each chunk,
/// `logging` finishes, builds the record and hands it to the meter.
fn meter_one(
    meter: &Meter,
    tenant: &Arc<str>,
    ids: &(Arc<str>, Arc<str>),
    case: Case,
    chunks: Vec<Bytes>,
) {
    let framing = match case {
        Case::Json => Framing::Json,
        Case::SseAsked | Case::SseInjected => Framing::Sse,
    };
    let mut extractor = UsageExtractor::new(Dialect::Openai, framing);
    let mut strip =
        matches!(case, Case::SseInjected).then(|| UsageChunkFilter::new(DEFAULT_WINDOW));
    let last = chunks.len() - 1;
    let mut sent = 0;
    for (i, chunk) in chunks.into_iter().enumerate() {
        extractor.feed(&chunk);
        let mut body = Some(chunk);
        if let Some(filter) = &mut strip {
            body = Some(filter.filter(body.take().unwrap_or_default(), i == last));
        }
        sent += body.map_or(0, |b| b.len());
    }
    assert!(sent > 0);
    let mut extraction = extractor.finish();
    assert_eq!(extraction.usage.cached_tokens, Some(1024));
    let usage = extraction.usage;
    let model = extraction.model.take();
    let record = UsageRecord {
        ts: Timestamp::now(),
        tenant: Arc::clone(tenant),
        session: Some(meter.session_hash(RoutingKey(42))),
        model,
        region: Some(Arc::clone(&ids.0)),
        replica: Some(Arc::clone(&ids.1)),
        outcome: Some(Outcome::Sticky),
        status: 200,
        prompt_tokens: usage.prompt_tokens,
        cached_tokens: usage.cached_tokens,
        completion_tokens: usage.completion_tokens,
        cost_micro_usd: Some(1),
        uncached_cost_micro_usd: Some(2),
        latency_ms: 3,
        ttft_ms: Some(1),
        attempts: 1,
        usage_status: UsageStatus::of(Some(&extraction), false),
        cache_write_tokens: usage.cache_write_tokens,
        key_source: None,
        cache_write_5m_tokens: usage.cache_write_5m_tokens,
        cache_write_1h_tokens: usage.cache_write_1h_tokens,
        limit: None,
        expected_cached_tokens: None,
    };
    meter.finish(record, Duration::from_millis(3));
}

#[test]
fn a_metered_request_allocates_at_most_a_few_times() {
    let dir = std::env::temp_dir().join(format!("tether-alloc-{}", std::process::id()));
    let yaml = format!(
        "listen: 127.0.0.1:9\nlocal_region: r\nregions:\n  - name: r\n    replicas:\n      - {{ id: r-1, address: \"127.0.0.1:9\" }}\n\
         usage_log: {{ path: \"{}\" }}\nmetering: {{ session_key: \"a test session key, long enough\" }}\n",
        dir.join("usage.jsonl").display()
    );
    let topology = Topology::from_yaml(&yaml, "test.yaml").expect("test topology");
    let meter = Meter::new(&topology).expect("meter");
    let tenant: Arc<str> = Arc::from("demo");
    let ids: (Arc<str>, Arc<str>) = (Arc::from("r"), Arc::from("r-1"));
    let mut report = Vec::new();
    for (case, make) in [
        (Case::Json, json_chunks as fn() -> Vec<Bytes>),
        (Case::SseAsked, sse_chunks as fn() -> Vec<Bytes>),
        (Case::SseInjected, sse_chunks as fn() -> Vec<Bytes>),
    ] {
        for _ in 0..REQUESTS {
            meter_one(&meter, &tenant, &ids, case, make());
        }
        // The chunks are Pingora's allocations, not metering's: made before counting.
        let bodies: Vec<Vec<Bytes>> = (0..REQUESTS).map(|_| make()).collect();
        let region = Region::new(GLOBAL);
        for chunks in bodies {
            meter_one(&meter, &tenant, &ids, case, chunks);
        }
        let stats = region.change();
        let per_request = (stats.allocations + stats.reallocations) as f64 / REQUESTS as f64;
        report.push((case, per_request));
    }
    meter.close();
    let _ = std::fs::remove_dir_all(&dir);
    for (case, per_request) in &report {
        println!("{case:?}: {per_request:.2} allocations per request");
    }
    // What is left: the boxed record on its way to the log writer's queue, the model name,
    // and for a stream the tail ring (4 KiB, grown once to 16 KiB for streams longer than
    // that). docs/metering.md quotes these figures.
    for ((case, per_request), bound) in report.iter().zip([BOUND_JSON, BOUND_SSE, BOUND_SSE]) {
        assert!(
            *per_request <= bound,
            "{case:?}: {per_request} allocations per request, more than {bound}"
        );
    }
}
