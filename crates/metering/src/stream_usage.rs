//! Making sure streamed responses report usage, without showing clients what they did not ask
//! for.
//!
//! OpenAI-compatible servers only send usage on a stream when the request says
//! `stream_options.include_usage: true`. [`ensure_stream_usage`] adds it to a streaming request
//! that lacks it; [`UsageChunkFilter`] then removes the extra usage-only event (`"choices":[]`)
//! from what goes back to the client, after the metering has read it — clients that never
//! asked for it may index `choices[0]` and crash on an empty list.

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Buf, Bytes};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::Value;

use crate::json_walk;

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
///
/// The common cases are settled by one walk over the top-level object ([`top_members`]):
/// strings — the prompt, nearly all of the body — are crossed with a SIMD search for their
/// closing quote, nothing is allocated, and a missing `stream_options` is added as text just
/// before the closing brace, so every other byte the client sent (key order, spacing, the
/// prompt) reaches the replica unchanged. Only the rare shapes the walk does not settle (an
/// escaped key, a duplicated key, a `stream_options` object without `include_usage: true`, a
/// body the walk cannot follow) go through a full parse.
pub fn ensure_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    if !may_name_stream(body) {
        return None;
    }
    let Some(top) = top_members(body) else {
        return ensure_stream_usage_parsed(body);
    };
    if top.ambiguous {
        return ensure_stream_usage_parsed(body);
    }
    if top.stream != Some(b"true") {
        return None;
    }
    match top.stream_options {
        None => {
            let insert = b",\"stream_options\":{\"include_usage\":true}";
            let mut out = Vec::with_capacity(body.len() + insert.len());
            out.extend_from_slice(&body[..top.close]);
            out.extend_from_slice(insert);
            out.extend_from_slice(&body[top.close..]);
            Some(out)
        }
        // What clients that ask send, settled without a parse.
        Some(b"{\"include_usage\":true}" | b"{\"include_usage\": true}") => None,
        Some(options) => match serde_json::from_slice::<ProbeOptions>(options) {
            Ok(ProbeOptions {
                include_usage: Some(true),
            }) => None,
            _ => ensure_stream_usage_parsed(body),
        },
    }
}

static STREAM_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"stream"));
static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));

/// Whether `body` can have a `stream` member at all. A non-streaming request (most of them)
/// is settled by two SIMD searches instead of a walk of its prompt: a key that a JSON parser
/// reads as `stream` is either those bytes in quotes or spelled with a `\u` escape (no other
/// escape makes a letter), so a body with neither has none, and is left alone whatever else
/// it holds, as the walk and the parser would leave it.
fn may_name_stream(body: &[u8]) -> bool {
    STREAM_KEY.find(body).is_some() || UNICODE_ESCAPE.find(body).is_some()
}

/// The full-parse path: every shape of request, at the cost of a tree of the whole body.
fn ensure_stream_usage_parsed(body: &[u8]) -> Option<Vec<u8>> {
    let probe: Probe = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(true)
        || probe.stream_options.and_then(|o| o.include_usage) == Some(true)
    {
        return None;
    }
    let mut request: Value = serde_json::from_slice(body).ok()?;
    let object = request.as_object_mut()?;
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

/// The members of a request's top-level object that decide whether to ask for usage.
#[derive(Debug, Default, PartialEq, Eq)]
struct TopMembers<'a> {
    /// The raw value of `stream`.
    stream: Option<&'a [u8]>,
    /// The raw value of `stream_options`.
    stream_options: Option<&'a [u8]>,
    /// Where the object's closing brace is.
    close: usize,
    /// A key with an escape (it could spell `stream`) or a decisive key seen twice: the walk
    /// cannot tell what a JSON parser would make of it.
    ambiguous: bool,
}

/// Walks the top-level object of `body` ([`json_walk::top_level_members`]), or `None` when
/// it is not one the walk can follow. Values are crossed, not checked: a body that is not JSON
/// reaches the replica, which rejects it, as it would without Tether.
fn top_members(body: &[u8]) -> Option<TopMembers<'_>> {
    let mut top = TopMembers::default();
    top.close = json_walk::top_level_members(body, |key, value| {
        let slot = match key {
            b"stream" => &mut top.stream,
            b"stream_options" => &mut top.stream_options,
            _ => {
                top.ambiguous |= memchr::memchr(b'\\', key).is_some();
                return true;
            }
        };
        top.ambiguous |= slot.is_some();
        *slot = Some(value);
        true
    })?;
    Some(top)
}

/// Removes usage-only SSE events from a stream, across arbitrary chunk boundaries.
///
/// Holds back at most one unfinished event (bounded by `window`; a longer one is passed
/// through untouched), so the stream is delayed by nothing more than the bytes of an event
/// that has not finished arriving.
///
/// It runs on every chunk of every stream whose usage Tether asked for, so it works on the
/// chunks it is handed: a chunk of whole events that cannot hold a usage-only event goes on as
/// it is, after one search; one that ends mid-event goes on up to its last whole event as a
/// view of the same buffer. Bytes are copied only to carry an unfinished event over to the
/// next chunk, and to join what is kept around a removed event inside one chunk.
#[derive(Debug)]
pub struct UsageChunkFilter {
    /// The start of an event still unfinished: never a whole event.
    pending: Vec<u8>,
    window: usize,
}

static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static NO_CHOICES: LazyLock<[Finder<'static>; 2]> = LazyLock::new(|| {
    [
        Finder::new(b"\"choices\":[]"),
        Finder::new(b"\"choices\": []"),
    ]
});
/// In both spellings of an empty `choices`: a chunk without it holds no usage-only event.
/// (Content events name `usage` too on some servers, as `"usage":null`; they never hold
/// `[]` unless some list in them is empty.)
const EMPTY_LIST: &[u8] = b"[]";
static EMPTY_LIST_SEARCH: LazyLock<EmptyListSearch> = LazyLock::new(EmptyListSearch::new);

/// The search for [`EMPTY_LIST`] that every chunk of a filtered stream gets. Where AVX2 is
/// available its pair search is called directly (and inlines into the caller): `memmem`'s
/// searcher picks that same routine on each call, through a dispatch that on an event of a
/// few hundred bytes costs more than half as much as the search itself. Chunks too short for
/// it, and other CPUs, get `memmem`.
struct EmptyListSearch {
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
    any: Finder<'static>,
}

impl EmptyListSearch {
    fn new() -> Self {
        EmptyListSearch {
            #[cfg(target_arch = "x86_64")]
            avx2: memchr::arch::x86_64::avx2::packedpair::Finder::new(EMPTY_LIST),
            any: Finder::new(EMPTY_LIST),
        }
    }

    #[inline]
    fn is_in(&self, bytes: &[u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = &self.avx2 {
            if bytes.len() >= avx2.min_haystack_len() {
                return avx2.find(bytes, EMPTY_LIST).is_some();
            }
        }
        self.any.find(bytes).is_some()
    }
}

/// Where the first event of `bytes` ends: just past its first blank line (`\n\n` or
/// `\r\n\r\n`, whichever ends first).
fn event_end(bytes: &[u8]) -> Option<usize> {
    // Every blank line starts with a newline, and the first newline that starts one ends the
    // earliest: `\n\n` two bytes on, `\r\n\r\n` (begun just before it) three.
    memchr::memchr_iter(b'\n', bytes).find_map(|i| match bytes.get(i + 1) {
        Some(b'\n') => Some(i + 2),
        Some(b'\r') if i > 0 && bytes[i - 1] == b'\r' && bytes.get(i + 2) == Some(&b'\n') => {
            Some(i + 3)
        }
        _ => None,
    })
}

/// Whether a chunk that starts an event ends one: it ends in `\n\n` that no other blank line
/// overlaps, so however its events are cut, the last one ends with the chunk.
fn ends_an_event(chunk: &[u8]) -> bool {
    match chunk {
        [.., before, b'\n', b'\n'] => !matches!(before, b'\n' | b'\r'),
        [b'\n', b'\n'] => true,
        _ => false,
    }
}

fn is_usage_only(event: &[u8]) -> bool {
    USAGE.find(event).is_some() && NO_CHOICES.iter().any(|f| f.find(event).is_some())
}

/// What one call sends on: one run of the chunk, viewed in place, unless the kept bytes are not
/// one run of it (then they are copied, once, in order).
#[derive(Debug, Default)]
struct Kept {
    copied: Option<Vec<u8>>,
    run: Option<Range<usize>>,
}

impl Kept {
    /// Keeps `range` of the chunk.
    fn run(&mut self, chunk: &[u8], range: Range<usize>) {
        match &mut self.run {
            Some(run) if run.end == range.start => run.end = range.end,
            Some(run) => {
                let earlier = std::mem::replace(run, range);
                self.copied
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&chunk[earlier]);
            }
            None => self.run = Some(range),
        }
    }

    /// Keeps bytes from outside the chunk.
    fn copy(&mut self, chunk: &[u8], bytes: &[u8]) {
        let copied = self.copied.get_or_insert_with(Vec::new);
        if let Some(run) = self.run.take() {
            copied.extend_from_slice(&chunk[run]);
        }
        copied.extend_from_slice(bytes);
    }

    fn into_bytes(self, mut chunk: Bytes) -> Bytes {
        match (self.copied, self.run) {
            (None, None) => Bytes::new(),
            (None, Some(run)) => {
                chunk.truncate(run.end);
                chunk.advance(run.start);
                chunk
            }
            (Some(mut copied), run) => {
                if let Some(run) = run {
                    copied.extend_from_slice(&chunk[run]);
                }
                Bytes::from(copied)
            }
        }
    }
}

impl UsageChunkFilter {
    /// A filter holding back at most `window` bytes.
    pub fn new(window: usize) -> Self {
        UsageChunkFilter {
            pending: Vec::new(),
            window,
        }
    }

    /// Filters one chunk; `end` flushes whatever is held back. What comes back is `chunk`
    /// itself, or a part of it, whenever the bytes to send are one run of it.
    #[inline]
    pub fn filter(&mut self, chunk: Bytes, end: bool) -> Bytes {
        // Nearly every chunk: whole content events.
        if self.pending.is_empty() && ends_an_event(&chunk) && !EMPTY_LIST_SEARCH.is_in(&chunk) {
            return chunk;
        }
        self.filter_events(chunk, end)
    }

    #[inline(never)]
    fn filter_events(&mut self, chunk: Bytes, end: bool) -> Bytes {
        let mut kept = Kept::default();
        let mut at = 0;
        if !self.pending.is_empty() {
            match self.carried_over_end(&chunk) {
                Some(len) => {
                    self.pending.extend_from_slice(&chunk[..len]);
                    if !is_usage_only(&self.pending) {
                        kept.copy(&chunk, &self.pending);
                    }
                    self.pending.clear();
                    at = len;
                }
                None => {
                    self.pending.extend_from_slice(&chunk);
                    at = chunk.len();
                }
            }
        }
        if self.pending.is_empty() {
            while let Some(len) = event_end(&chunk[at..]) {
                if !is_usage_only(&chunk[at..at + len]) {
                    kept.run(&chunk, at..at + len);
                }
                at += len;
            }
            self.pending.extend_from_slice(&chunk[at..]);
        }
        if end || self.pending.len() > self.window {
            kept.copy(&chunk, &self.pending);
            self.pending.clear();
        }
        kept.into_bytes(chunk)
    }

    /// Where in `chunk` the event carried over in `pending` ends, if it does. Its blank line
    /// may begin in the last three bytes of `pending` (`pending` itself holds none).
    fn carried_over_end(&self, chunk: &[u8]) -> Option<usize> {
        let carried = &self.pending[self.pending.len().saturating_sub(3)..];
        let mut seam = [0u8; 6];
        let head = &chunk[..chunk.len().min(3)];
        seam[..carried.len()].copy_from_slice(carried);
        seam[carried.len()..carried.len() + head.len()].copy_from_slice(head);
        let across = event_end(&seam[..carried.len() + head.len()])
            .and_then(|end| end.checked_sub(carried.len()));
        match (across, event_end(chunk)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    fn assert_left_alone(bodies: &[&[u8]]) {
        for body in bodies {
            assert_eq!(
                ensure_stream_usage(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn other_requests_are_left_alone() {
        assert_left_alone(&[
            br#"{"stream":false}"#,
            br#"{"messages":[]}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            b"not json",
            b"[1,2]",
        ]);
    }

    #[test]
    fn a_body_that_cannot_name_stream_is_settled_without_a_walk() {
        assert!(!may_name_stream(
            br#"{"model":"m","messages":[{"content":"a\nb"}]}"#
        ));
        assert!(!may_name_stream(b"not json"));
        assert!(may_name_stream(br#"{"stream":false}"#));
        // Inside a string it still sends the body down the usual path, which settles it.
        assert!(may_name_stream(br#"{"content":"\"stream\": true"}"#));
        assert!(may_name_stream(br#"{"\u0073tream":true}"#));
        assert!(may_name_stream(br#"{"content":"caf\u00e9"}"#));
    }

    #[test]
    fn a_stream_key_spelled_with_an_escape_is_still_seen() {
        // `\u0073` is `s`: the fast path must not take this for a non-streaming request.
        let out = ensure_stream_usage(br#"{"\u0073tream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn the_fast_path_adds_stream_options_as_text_and_keeps_every_other_byte() {
        let body = b" {\"model\": \"m\",\n \"messages\": [{\"content\": \"say \\\"stream\\\": true}\"}],\n \"stream\": true }\n";
        let out = ensure_stream_usage(body).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            " {\"model\": \"m\",\n \"messages\": [{\"content\": \"say \\\"stream\\\": true}\"}],\n \"stream\": true ,\"stream_options\":{\"include_usage\":true}}\n"
        );
    }

    #[test]
    fn stream_keys_below_the_top_level_do_not_count() {
        assert_left_alone(&[
            br#"{"messages":[{"stream":true}],"x":{"stream":true}}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true},"n":[1,{"a":[]}]}"#,
        ]);
    }

    #[test]
    fn shapes_the_walk_cannot_settle_go_through_the_parser() {
        // A duplicated key: serde rejects the probe, so the body is left alone.
        assert_eq!(
            ensure_stream_usage(br#"{"stream":true,"stream":true}"#),
            None
        );
        // Trailing bytes after the object are not JSON.
        assert_eq!(ensure_stream_usage(br#"{"stream":true} x"#), None);
        // Unterminated string / object.
        assert_eq!(ensure_stream_usage(br#"{"stream":true,"a":"#), None);
        assert_eq!(ensure_stream_usage(br#"{"stream":true,"a":"x"#), None);
        assert_eq!(ensure_stream_usage(b"{"), None);
        assert_eq!(ensure_stream_usage(b""), None);
    }

    #[test]
    fn walk_finds_top_level_members_and_the_closing_brace() {
        let body = br#"{ "a" : [1, "]", {"stream": false}], "stream" : true , "stream_options":{"x":"}"} }"#;
        let top = top_members(body).unwrap();
        assert_eq!(top.stream, Some(&b"true"[..]));
        assert_eq!(top.stream_options, Some(&br#"{"x":"}"}"#[..]));
        assert_eq!(body[top.close], b'}');
        assert_eq!(top.close, body.len() - 1);
        assert!(!top.ambiguous);
        assert!(top_members(br#"{"str\u0065am":1}"#).unwrap().ambiguous);
    }

    /// JSON objects whose keys collide with the ones the walk looks for, at every depth.
    fn request_objects() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("stream".to_string()),
            Just("stream_options".to_string()),
            Just("include_usage".to_string()),
            Just("messages".to_string()),
            Just("str\"eam".to_string()),
            "[a-z]{0,3}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\],: ]{0,6}".prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![Just("include_usage".to_string()), "[a-z]{0,3}"],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        // Half the requests stream, so the insert and `stream_options` paths get their share.
        (prop::collection::btree_map(key, value, 0..5), any::<bool>()).prop_map(|(m, stream)| {
            let mut object: serde_json::Map<String, Value> = m.into_iter().collect();
            if stream {
                object.insert("stream".into(), Value::Bool(true));
            }
            Value::Object(object)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// The fast path and the full parse agree on every request, compact or pretty.
        #[test]
        fn fast_path_agrees_with_the_parser(request in request_objects(), pretty: bool, escaped: bool) {
            let mut body = if pretty {
                serde_json::to_vec_pretty(&request).unwrap()
            } else {
                serde_json::to_vec(&request).unwrap()
            };
            if escaped {
                // The same JSON, with `stream` spelled as a parser also reads it.
                body = String::from_utf8(body)
                    .unwrap()
                    .replace("\"stream", "\"\\u0073tream")
                    .into_bytes();
            }
            let fast = ensure_stream_usage(&body)
                .map(|b| serde_json::from_slice::<Value>(&b).expect("fast path wrote JSON"));
            let parsed = ensure_stream_usage_parsed(&body)
                .map(|b| serde_json::from_slice::<Value>(&b).unwrap());
            prop_assert_eq!(fast, parsed);
        }
    }

    const STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
    const WITHOUT: &[u8] =
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n";

    fn filter(f: &mut UsageChunkFilter, chunk: &[u8], end: bool) -> Vec<u8> {
        f.filter(Bytes::copy_from_slice(chunk), end).to_vec()
    }

    #[test]
    fn the_usage_only_event_is_removed_however_the_stream_is_split() {
        for at in 0..=STREAM.len() {
            let mut f = UsageChunkFilter::new(1 << 16);
            let mut out = filter(&mut f, &STREAM[..at], false);
            out.extend(filter(&mut f, &STREAM[at..], false));
            out.extend(filter(&mut f, b"", true));
            assert_eq!(out, WITHOUT, "split at {at}");
        }
    }

    proptest! {
        /// Whichever routine searches, it finds what a substring search finds, at any length
        /// (short chunks go to `memmem`, longer ones to the vector routine where there is one).
        #[test]
        fn the_empty_list_search_agrees_with_a_substring_search(
            bytes in prop::collection::vec(
                prop_oneof![1 => Just(b'['), 1 => Just(b']'), 6 => Just(b'x'), 1 => Just(b'{')],
                0..160,
            ),
        ) {
            prop_assert_eq!(
                EMPTY_LIST_SEARCH.is_in(&bytes),
                memchr::memmem::find(&bytes, EMPTY_LIST).is_some()
            );
        }
    }

    #[test]
    fn content_that_mentions_usage_is_kept() {
        let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n";
        let mut f = UsageChunkFilter::new(1 << 16);
        assert_eq!(filter(&mut f, event, true), event);
    }

    #[test]
    fn an_oversized_unfinished_event_is_passed_through() {
        let mut f = UsageChunkFilter::new(8);
        assert_eq!(
            filter(&mut f, b"data: 0123456789", false),
            b"data: 0123456789"
        );
    }

    #[test]
    fn whole_events_pass_as_the_same_buffer() {
        let mut f = UsageChunkFilter::new(1 << 16);
        let chunk = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
        let out = f.filter(chunk.clone(), false);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
        // Up to the last whole event: a view of the chunk, the rest held back.
        let chunk =
            Bytes::from_static(b"data: 1\n\ndata: {\"choices\":[],\"usage\":{}}\n\ndata: 2");
        let out = f.filter(chunk.clone(), false);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(&out[..], b"data: 1\n\n");
        assert_eq!(
            &f.filter(Bytes::from_static(b"\n\n"), true)[..],
            b"data: 2\n\n"
        );
    }

    /// The filter as it was first written (a buffer of everything unsent, events cut off its
    /// front one at a time): what the in-place filter must send, call for call.
    struct Reference {
        pending: Vec<u8>,
        window: usize,
    }

    impl Reference {
        fn filter(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
            fn first_end(bytes: &[u8]) -> Option<usize> {
                let lf = memchr::memmem::find(bytes, b"\n\n").map(|i| i + 2);
                let crlf = memchr::memmem::find(bytes, b"\r\n\r\n").map(|i| i + 4);
                match (lf, crlf) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            self.pending.extend_from_slice(chunk);
            let mut out = Vec::new();
            while let Some(len) = first_end(&self.pending) {
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

    /// Streams built from the pieces that matter: line ends of both kinds (runs of them too),
    /// usage-only events in both spellings, content that names `usage` or holds `[]`.
    fn streams() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(&b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}"[..]),
            Just(&b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}"[..]),
            Just(&b"data: {\"choices\": [],\"usage\":null}"[..]),
            Just(&b"data: {\"usage\":null,\"choices\":[{\"x\":[]}]}"[..]),
            Just(&b"data: [DONE]"[..]),
            Just(&b"event: e"[..]),
            Just(&b"\n"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"\r"[..]),
            Just(&b"\n\n"[..]),
            Just(&b"\r\n\r\n"[..]),
            Just(&b"x"[..]),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Whatever the stream and wherever it is cut, the filter sends what the buffering
        /// filter sent, call for call.
        #[test]
        fn the_in_place_filter_sends_what_the_buffering_one_did(
            stream in streams(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            window in prop_oneof![Just(4usize), Just(16), Just(1 << 16)],
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut reference = Reference { pending: Vec::new(), window };
            let mut filter = UsageChunkFilter::new(window);
            let mut from = 0;
            for (i, &to) in cuts.iter().enumerate() {
                let end = i + 1 == cuts.len();
                let want = reference.filter(&stream[from..to], end);
                let got = filter.filter(Bytes::copy_from_slice(&stream[from..to]), end);
                prop_assert_eq!(&got[..], &want[..], "chunk {}..{}", from, to);
                from = to;
            }
        }
    }
}
