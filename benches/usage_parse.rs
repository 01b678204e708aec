//! Usage extraction throughput (criterion): bytes of response body per second through
//! `UsageExtractor`, the code every metered response passes.
//!
//! - `sse_stream`: a 200-event OpenAI stream (content deltas, then the usage event), fed in
//!   chunks of one event — how replicas send it.
//! - `sse_one_chunk`: the same stream in one chunk.
//! - `sse_stream_searched`: the same stream, one event per chunk, read the way llama.cpp
//!   streams are (every event searched for usage keys as it passes) rather than from the ring
//!   of its last bytes: the cost the ring avoids.
//! - `json_completion`: a non-streaming completion with a 4 KiB answer and usage at the end.

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tether_metering::{Dialect, Framing, UsageExtractor, UsageOutcome};

fn sse_events() -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
            )
            .into_bytes()
        })
        .collect();
    events.push(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":200,\"prompt_tokens_details\":{\"cached_tokens\":1024}}}\n\n".to_vec());
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

fn extract(framing: Framing, chunks: &[&[u8]]) -> UsageOutcome {
    extract_as(Dialect::Openai, framing, chunks)
}

fn extract_as(dialect: Dialect, framing: Framing, chunks: &[&[u8]]) -> UsageOutcome {
    let mut x = UsageExtractor::new(dialect, framing);
    for chunk in chunks {
        x.feed(chunk);
    }
    x.finish().outcome
}

fn usage_parse(c: &mut Criterion) {
    let events = sse_events();
    let chunks: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
    let whole = events.concat();
    let answer = "word ".repeat(820);
    let json = format!(
        "{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{answer}\"}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":1200,\"completion_tokens\":820,\"prompt_tokens_details\":{{\"cached_tokens\":1024}}}}}}"
    )
    .into_bytes();
    assert_eq!(extract(Framing::Sse, &chunks), UsageOutcome::Found);
    assert_eq!(extract(Framing::Sse, &[&whole]), UsageOutcome::Found);
    assert_eq!(extract(Framing::Json, &[&json]), UsageOutcome::Found);
    assert_eq!(
        extract_as(Dialect::Llamacpp, Framing::Sse, &chunks),
        UsageOutcome::Found
    );

    let mut group = c.benchmark_group("usage_parse");
    group.throughput(Throughput::Bytes(whole.len() as u64));
    group.bench_function("sse_stream", |b| b.iter(|| extract(Framing::Sse, &chunks)));
    group.bench_function("sse_one_chunk", |b| {
        b.iter(|| extract(Framing::Sse, &[&whole]))
    });
    group.bench_function("sse_stream_searched", |b| {
        b.iter(|| extract_as(Dialect::Llamacpp, Framing::Sse, &chunks))
    });
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("json_completion", |b| {
        b.iter(|| extract(Framing::Json, &[&json]))
    });
    group.finish();
}

criterion_group!(benches, usage_parse);
criterion_main!(benches);
