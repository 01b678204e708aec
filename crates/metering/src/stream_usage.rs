//! Making sure streamed responses report usage, without showing clients what they did not ask
//! for.
//!
//! OpenAI-compatible servers only send usage on a stream when the request says
//! `stream_options.include_usage: true`. [`ensure_stream_usage`] adds it to a streaming request
//! that lacks it; [`UsageChunkFilter`] then removes the extra usage-only event (`"choices":[]`)
//! from what goes back to the client, after the metering has read it — clients that never
//! asked for it may index `choices[0]` and crash on an empty list.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::Value;

/// The two fields that decide; serde skips everything else without allocating it.
#[derive(Deserialize)]
struct Probe {
    stream: Option<bool>,
    stream_options: Option<ProbeOptions>,
}

#[derive(Deserialize)]
struct ProbeOptions {
    include_usage: Option<bool>,
}

/// The rewritten body of a streaming chat request that did not ask for usage, or `None` when
/// the body needs no change (not JSON, not streaming, or already asking).
pub fn ensure_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    // Most requests need no change; find that out without building a tree of the prompt.
    // Without the bytes `"stream"` anywhere (and no `\u` escape that could spell the key
    // another way) the request cannot be streaming: a SIMD search settles it before parsing.
    if STREAM_KEY.find(body).is_none() && UNICODE_ESCAPE.find(body).is_none() {
        return None;
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(true)
        || probe.stream_options.and_then(|o| o.include_usage) == Some(true)
    {
        return None;
    }
    let mut request: Value = serde_json::from_slice(body).ok()?;
    let object = request.as_object_mut()?;
    if object.get("stream").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    if object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return None;
    }
    match object.get_mut("stream_options") {
        Some(Value::Object(options)) => {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        _ => {
            object.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
    }
    serde_json::to_vec(&request).ok()
}

/// Removes usage-only SSE events from a stream, across arbitrary chunk boundaries.
///
/// Holds back at most one unfinished event (bounded by `window`; a longer one is passed
/// through untouched), so the stream is delayed by nothing more than the bytes of an event
/// that has not finished arriving.
#[derive(Debug)]
pub struct UsageChunkFilter {
    pending: Vec<u8>,
    window: usize,
}

static STREAM_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"stream\""));
static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));
static LF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static NO_CHOICES: LazyLock<[Finder<'static>; 2]> = LazyLock::new(|| {
    [
        Finder::new(b"\"choices\":[]"),
        Finder::new(b"\"choices\": []"),
    ]
});

fn event_end(bytes: &[u8]) -> Option<usize> {
    let lf = LF.find(bytes).map(|i| i + 2);
    let crlf = CRLF.find(bytes).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_usage_only(event: &[u8]) -> bool {
    USAGE.find(event).is_some() && NO_CHOICES.iter().any(|f| f.find(event).is_some())
}

impl UsageChunkFilter {
    /// A filter holding back at most `window` bytes.
    pub fn new(window: usize) -> Self {
        UsageChunkFilter {
            pending: Vec::new(),
            window,
        }
    }

    /// Filters one chunk; `end` flushes whatever is held back.
    pub fn filter(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some(len) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..len).collect();
            if !is_usage_only(&event) {
                out.extend_from_slice(&event);
            }
        }
        if end || self.pending.len() > self.window {
            out.append(&mut self.pending);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streaming_request_without_usage_gets_it() {
        let out = ensure_stream_usage(br#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = ensure_stream_usage(
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn other_requests_are_left_alone() {
        for body in [
            &br#"{"stream":false}"#[..],
            br#"{"messages":[]}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            b"not json",
            b"[1,2]",
        ] {
            assert_eq!(
                ensure_stream_usage(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_stream_key_spelled_with_an_escape_is_still_seen() {
        // `\u0073` is `s`: the fast path must not take this for a non-streaming request.
        let out = ensure_stream_usage(br#"{"\u0073tream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    const STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
    const WITHOUT: &[u8] =
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n";

    #[test]
    fn the_usage_only_event_is_removed_however_the_stream_is_split() {
        for at in 0..=STREAM.len() {
            let mut f = UsageChunkFilter::new(1 << 16);
            let mut out = f.filter(&STREAM[..at], false);
            out.extend(f.filter(&STREAM[at..], false));
            out.extend(f.filter(b"", true));
            assert_eq!(out, WITHOUT, "split at {at}");
        }
    }

    #[test]
    fn content_that_mentions_usage_is_kept() {
        let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n";
        let mut f = UsageChunkFilter::new(1 << 16);
        assert_eq!(f.filter(event, true), event);
    }

    #[test]
    fn an_oversized_unfinished_event_is_passed_through() {
        let mut f = UsageChunkFilter::new(8);
        assert_eq!(f.filter(b"data: 0123456789", false), b"data: 0123456789");
    }
}
