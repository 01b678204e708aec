//! Incremental usage extraction: feed response body chunks as they pass, never buffer a body.
//!
//! - **JSON** bodies go through a byte-at-a-time structural scanner that tracks strings,
//!   escapes and nesting, and captures only the values of the *top-level* members `usage`,
//!   `timings` and `tokens_cached`, each up to a bounded size. Memory is O(captured usage),
//!   whatever the body's size or where in it the usage sits, and the words `"usage":` inside
//!   generated text cannot fool it (they are inside a string).
//! - **SSE** streams put usage in their last events (OpenAI, vLLM, SGLang; Anthropic's
//!   `message_delta`), and Anthropic also in its first (`message_start`). So after the opening
//!   events the extractor does not read the stream at all while it passes: it copies it into
//!   a ring of its last [`Limits::sse_tail`] bytes and, when the body ends, reads back from
//!   the end to the last event that carries usage. The thousands of content deltas cost a
//!   `memcpy` each (a fraction of a search), and the ring bounds the memory. Before that point, and for the
//!   whole of a llama.cpp stream (whose final event can be large), lines are split across
//!   arbitrary chunk boundaries (each bounded) and only `data:` lines that mention `usage`,
//!   `timings` or `tokens_cached` are parsed as JSON.
//!
//! Either way the result is the same however the body is split into chunks (tested at every
//! byte offset), and nothing here can panic on hostile input.

use std::sync::LazyLock;

use aho_corasick::packed;
use arrayvec::ArrayVec;
use memchr::memmem::{Finder, FinderRev};
use serde::de::IgnoredAny;
use serde::Serialize;

use crate::json_walk;
use crate::usage::{Dialect, Usage, UsageBuilder, UsageEvent};

/// How the response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON document.
    Json,
    /// Server-sent events.
    Sse,
}

impl Framing {
    /// The framing a `content-type` implies.
    pub fn from_content_type(content_type: &str) -> Framing {
        const SSE: &[u8] = b"text/event-stream";
        let content_type = content_type.trim_start().as_bytes();
        if content_type
            .get(..SSE.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SSE))
        {
            Framing::Sse
        } else {
            Framing::Json
        }
    }
}

/// Memory bounds of an extractor.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest captured usage value (JSON) or SSE line, in bytes.
    pub window: usize,
    /// How much of the end of an SSE stream is kept (copied) to read its final usage event
    /// from: the usage event and everything after it (`data: [DONE]`) must fit.
    pub sse_tail: usize,
}

/// Default bound: 256 KiB.
pub const DEFAULT_WINDOW: usize = 256 << 10;

/// Default SSE tail: 16 KiB — a usage event is a few hundred bytes.
pub const DEFAULT_SSE_TAIL: usize = 16 << 10;

/// The ring's first allocation; a stream that outgrows it gets the full [`Limits::sse_tail`].
const INITIAL_SSE_TAIL: usize = 4 << 10;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: DEFAULT_WINDOW,
            sse_tail: DEFAULT_SSE_TAIL,
        }
    }
}

/// What became of the usage of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageOutcome {
    /// At least one count was found.
    Found,
    /// The response parsed but carried no usage.
    Missing,
    /// The body was not valid JSON / SSE where usage should have been.
    Malformed,
    /// A usage value or SSE line exceeded the window and was dropped.
    TooLarge,
}

impl UsageOutcome {
    /// Label for the usage log and metrics (see [`crate::UsageStatus`]).
    pub const fn as_str(self) -> &'static str {
        match self {
            UsageOutcome::Found => "found",
            UsageOutcome::Missing => "missing",
            UsageOutcome::Malformed => "malformed",
            UsageOutcome::TooLarge => "too_large",
        }
    }
}

/// The result of [`UsageExtractor::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extraction {
    /// The counts (each `None` when unknown).
    pub usage: Usage,
    /// Why usage is unknown, when it is.
    pub outcome: UsageOutcome,
    /// The model named by the response, if any.
    pub model: Option<String>,
}

const KEYS: [&[u8]; 4] = [b"usage", b"timings", b"tokens_cached", b"model"];
const LONGEST_KEY: usize = 13;

/// Captures top-level members of a JSON object incrementally.
#[derive(Debug, Default)]
struct JsonScanner {
    depth: u32,
    started: bool,
    top_is_object: bool,
    in_string: bool,
    escaped: bool,
    /// At depth 1 of the top object, the next string is a key.
    expect_key: bool,
    /// Recording a key at depth 1 (`None` once longer than any key we want).
    key: Option<Vec<u8>>,
    /// The last completed key at depth 1, waiting for its `:`.
    last_key: Option<usize>,
    /// Index into `KEYS` of the member whose value is being captured.
    capture_key: Option<usize>,
    capture: Vec<u8>,
    capture_open: bool,
    /// The captured value is a container (ends with its bracket) rather than a scalar.
    capture_container: bool,
    malformed: bool,
    too_large: bool,
    completed: Vec<(usize, Vec<u8>)>,
}

impl JsonScanner {
    fn push(&mut self, b: u8, window: usize) {
        if self.capture_open {
            if self.capture.len() >= window {
                self.capture_open = false;
                self.capture.clear();
                self.too_large = true;
            } else {
                self.capture.push(b);
            }
        }
    }

    fn push_slice(&mut self, bytes: &[u8], window: usize) {
        if self.capture_open {
            if self.capture.len() + bytes.len() > window {
                self.capture_open = false;
                self.capture.clear();
                self.too_large = true;
            } else {
                self.capture.extend_from_slice(bytes);
            }
        }
    }

    fn end_capture(&mut self) {
        if self.capture_open {
            if let Some(k) = self.capture_key.take() {
                self.completed.push((k, std::mem::take(&mut self.capture)));
            }
        }
        self.capture_open = false;
        self.capture_key = None;
        self.capture.clear();
    }

    fn feed(&mut self, chunk: &[u8], window: usize) {
        let mut i = 0;
        while i < chunk.len() {
            if self.malformed {
                return;
            }
            // Most of a completion is bytes that change no state tracked here: the text of
            // strings (message content) and everything nested below the top-level members.
            // Jump over them with a search instead of a byte at a time (copying them whole
            // into a member being captured).
            let rest = &chunk[i..];
            let skip = if self.in_string {
                if self.key.is_none() && !self.escaped {
                    memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len())
                } else {
                    0
                }
            } else if self.depth >= 2 {
                rest.iter()
                    .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
                    .unwrap_or(rest.len())
            } else {
                0
            };
            if skip > 0 {
                self.push_slice(&rest[..skip], window);
                i += skip;
                continue;
            }
            let b = chunk[i];
            i += 1;
            if self.in_string {
                self.push(b, window);
                if self.escaped {
                    self.escaped = false;
                    if let Some(k) = &mut self.key {
                        k.push(b);
                    }
                } else if b == b'\\' {
                    self.escaped = true;
                    if let Some(k) = &mut self.key {
                        k.push(b);
                    }
                } else if b == b'"' {
                    self.in_string = false;
                    if let Some(k) = self.key.take() {
                        self.last_key = KEYS.iter().position(|want| *want == k.as_slice());
                        self.expect_key = false;
                    } else if self.capture_open && !self.capture_container && self.depth == 1 {
                        // A string value of a captured member ends here.
                        self.end_capture();
                    }
                } else if let Some(k) = &mut self.key {
                    if k.len() >= LONGEST_KEY {
                        self.key = None;
                        self.last_key = None;
                        self.expect_key = false;
                    } else {
                        k.push(b);
                    }
                }
                continue;
            }
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    if self.capture_open && !self.capture.is_empty() {
                        self.push(b, window);
                    }
                }
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.top_is_object && self.expect_key {
                        self.key = Some(Vec::with_capacity(LONGEST_KEY));
                        // A key we do not want still ends as a key (not a value).
                        self.last_key = None;
                    } else {
                        self.push(b, window);
                    }
                }
                b'{' | b'[' => {
                    if !self.started {
                        self.started = true;
                        self.top_is_object = b == b'{';
                        self.expect_key = self.top_is_object;
                    } else if self.capture_open && self.capture.is_empty() {
                        self.capture_container = true;
                        self.push(b, window);
                    } else {
                        self.push(b, window);
                    }
                    self.depth += 1;
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        self.malformed = true;
                        return;
                    }
                    if self.depth == 1 && self.capture_open && !self.capture_container {
                        // A scalar member value ends with its object.
                        self.end_capture();
                    }
                    self.depth -= 1;
                    if self.capture_open && self.depth >= 1 {
                        self.push(b, window);
                        if self.depth == 1 && self.capture_container {
                            self.end_capture();
                        }
                    }
                }
                b':' => {
                    if self.depth == 1 && self.top_is_object {
                        if let Some(k) = self.last_key.take() {
                            self.capture_key = Some(k);
                            self.capture_open = true;
                            self.capture_container = false;
                            self.capture.clear();
                        }
                    } else {
                        self.push(b, window);
                    }
                }
                b',' => {
                    if self.depth == 1 && self.top_is_object {
                        if self.capture_open && !self.capture_container {
                            self.end_capture();
                        }
                        self.expect_key = true;
                    } else {
                        self.push(b, window);
                    }
                }
                _ => {
                    if !self.started {
                        // Not a JSON object or array (garbage, HTML error page, …).
                        self.malformed = true;
                        return;
                    }
                    self.push(b, window);
                }
            }
        }
    }

    fn finish(&mut self) -> bool {
        // Well-formed = one complete top-level value.
        self.started && self.depth == 0 && !self.in_string && !self.malformed
    }
}

/// Splits SSE bytes into lines, each bounded.
#[derive(Debug, Default)]
struct SseReader {
    line: Vec<u8>,
    discarding: bool,
    too_large: bool,
    malformed_events: u32,
}

/// One SIMD multi-pattern searcher (Teddy) for the keys that can carry usage, built once:
/// this runs on every streamed token, and one pass over the bytes for all the keys costs a third
/// of one `memmem` pass per key.
static LLAMACPP_KEYS: LazyLock<Option<packed::Searcher>> =
    LazyLock::new(|| packed::Searcher::new([KEYS[0], KEYS[1], KEYS[2]]));
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEYS[0]));
static USAGE_KEY_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(KEYS[0]));

/// Whether SSE bytes can carry usage (the model name rides along in those events).
///
/// OpenAI, vLLM, SGLang and Anthropic streams put every count under `usage`; so does
/// llama.cpp's OpenAI endpoint, whose final event adds `timings` beside it (both are read
/// once the event is parsed). Only the llama.cpp dialect (its native `/completion` stream has
/// `timings` and `tokens_cached` but no `usage`) pays for the three-key search.
#[inline]
fn mentions_usage(dialect: Dialect, data: &[u8]) -> bool {
    find_usage(dialect, data).is_some()
}

/// Where the first key that can carry usage starts in `data`.
#[inline]
fn find_usage(dialect: Dialect, data: &[u8]) -> Option<usize> {
    match dialect {
        Dialect::Openai | Dialect::Anthropic => USAGE_KEY.find(data),
        Dialect::Llamacpp => match &*LLAMACPP_KEYS {
            Some(searcher) => searcher.find(data).map(|m| m.start()),
            // No SIMD searcher on this CPU: one substring search per key.
            None => KEYS[..3]
                .iter()
                .filter_map(|k| memchr::memmem::find(data, k))
                .min(),
        },
    }
}

/// The length of the longest line in `data` (lines end with `\n`).
fn longest_line(data: &[u8]) -> usize {
    let mut longest = 0;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', data).chain(std::iter::once(data.len())) {
        longest = longest.max(end - start);
        start = end + 1;
    }
    longest
}

impl SseReader {
    /// Reads one line; true when it was an event that carried usage. `found` says the line
    /// was found by a search for a usage key, so it need not be searched again.
    fn line(
        &mut self,
        line: &[u8],
        dialect: Dialect,
        builder: &mut UsageBuilder,
        found: bool,
    ) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" || !(found || mentions_usage(dialect, data)) {
            return false;
        }
        let parsed = if data.trim_ascii_start().starts_with(b"{") {
            // The walk first (it skips the choices unparsed); a full parse when the walk cannot
            // follow the data decides whether it is malformed. The walk validates only what it
            // reads, so an event malformed only in the members it skips is read, not counted.
            let event =
                UsageEvent::from_members(data).unwrap_or_else(|| serde_json::from_slice(data));
            event.map(|event| {
                let carries_usage = event.carries_usage();
                builder.observe_event(dialect, event);
                carries_usage
            })
        } else {
            // Valid JSON that is not an object carries no usage, but is not malformed.
            serde_json::from_slice::<IgnoredAny>(data).map(|_| false)
        };
        parsed.unwrap_or_else(|_| {
            self.malformed_events += 1;
            false
        })
    }

    fn line_done(&mut self, dialect: Dialect, builder: &mut UsageBuilder) {
        if self.discarding {
            self.discarding = false;
        } else {
            let line = std::mem::take(&mut self.line);
            self.line(&line, dialect, builder, false);
            self.line = line;
        }
        self.line.clear();
    }

    fn feed(
        &mut self,
        mut chunk: &[u8],
        window: usize,
        dialect: Dialect,
        builder: &mut UsageBuilder,
    ) {
        // First finish the line carried over from earlier chunks.
        if !self.line.is_empty() || self.discarding {
            let Some(i) = memchr::memchr(b'\n', chunk) else {
                self.append(chunk, window);
                return;
            };
            self.append(&chunk[..i], window);
            self.line_done(dialect, builder);
            chunk = &chunk[i + 1..];
        }
        let (whole, tail) = match memchr::memrchr(b'\n', chunk) {
            Some(i) => chunk.split_at(i + 1),
            None => (&[][..], chunk),
        };
        // Nearly every event of a stream is a content delta. One search over all the whole
        // lines of the chunk rules them out together; only a chunk that mentions a usage key
        // (or is longer than the window, so a line in it may be too) is split into lines.
        let lines = whole.strip_suffix(b"\n").unwrap_or(whole);
        if !whole.is_empty() {
            if lines.len() > window && longest_line(lines) > window {
                self.too_large = true;
            }
            // Only the lines that mention a usage key matter: jump from one to the next
            // rather than split every line of the chunk.
            let mut rest = lines;
            while let Some(at) = find_usage(dialect, rest) {
                let start = memchr::memrchr(b'\n', &rest[..at]).map_or(0, |n| n + 1);
                let end = memchr::memchr(b'\n', &rest[at..]).map_or(rest.len(), |n| at + n);
                let line = &rest[start..end];
                if line.len() <= window {
                    self.line(line, dialect, builder, true);
                }
                rest = rest.get(end + 1..).unwrap_or_default();
            }
        }
        self.append(tail, window);
    }

    /// Adds to the unfinished line, or starts discarding it once it exceeds the window.
    fn append(&mut self, part: &[u8], window: usize) {
        if self.discarding {
            return;
        }
        if self.line.len() + part.len() > window {
            // A line longer than any usage event: drop it, keep reading.
            self.discarding = true;
            self.too_large = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(part);
        }
    }
}

/// Extracts token usage from one response body, incrementally and in bounded memory.
#[derive(Debug)]
pub struct UsageExtractor {
    dialect: Dialect,
    framing: Framing,
    limits: Limits,
    builder: UsageBuilder,
    json: JsonScanner,
    sse: SseReader,
    /// The end of an SSE stream, once the extractor stopped reading events as they pass.
    tail: SseTail,
    bytes: u64,
}

/// The last bytes of an SSE stream: a ring of at most `limit` bytes, filled as chunks pass
/// (one or two `memcpy`s per chunk) and put in order once, when the body ends.
#[derive(Debug, Default)]
struct SseTail {
    ring: Vec<u8>,
    /// Where the oldest byte is, once the ring is full (and so where the next byte goes).
    head: usize,
    /// The byte just before the oldest kept one, once bytes have been dropped.
    dropped_last: Option<u8>,
    active: bool,
}

impl SseTail {
    #[inline(always)]
    fn keep(&mut self, chunk: &[u8], limit: usize) {
        // Nearly every call: the ring (allocated at full size) still has room.
        if self.ring.len() + chunk.len() <= self.ring.capacity() && self.ring.capacity() <= limit {
            self.ring.extend_from_slice(chunk);
            return;
        }
        self.keep_slow(chunk, limit);
    }

    #[inline(never)]
    fn keep_slow(&mut self, mut chunk: &[u8], limit: usize) {
        self.active = true;
        let limit = limit.max(1);
        if self.ring.len() < limit {
            let needed = (self.ring.len() + chunk.len()).min(limit);
            if needed > self.ring.capacity() {
                // 4 KiB first, then straight to the limit (one copy of 4 KiB): most streams
                // are short, and a full-size ring for each would spread writes over memory no
                // cache holds (64 streams × 16 KiB). Exact sizes keep the capacity within the
                // limit, which the fast path relies on.
                let first = INITIAL_SSE_TAIL.min(limit);
                let target = if self.ring.capacity() < first && needed <= first {
                    first
                } else {
                    limit
                };
                self.ring.reserve_exact(target - self.ring.len());
            }
            // Filling: plain appends until the ring is full.
            let room = limit - self.ring.len();
            let (now, rest) = chunk.split_at(room.min(chunk.len()));
            self.ring.extend_from_slice(now);
            chunk = rest;
        }
        if chunk.is_empty() {
            return;
        }
        if chunk.len() >= limit {
            // The chunk alone fills the ring.
            let start = chunk.len() - limit;
            self.dropped_last = Some(if start > 0 {
                chunk[start - 1]
            } else {
                self.ring[(self.head + limit - 1) % limit]
            });
            self.head = 0;
            self.ring.copy_from_slice(&chunk[start..]);
            return;
        }
        // Overwrite the oldest bytes; the last one overwritten came just before the new oldest.
        let first = chunk.len().min(limit - self.head);
        let wrapped = chunk.len() - first;
        // The last byte overwritten is the one just before the new oldest byte.
        self.dropped_last = Some(if wrapped > 0 {
            self.ring[wrapped - 1]
        } else {
            self.ring[self.head + first - 1]
        });
        self.ring[self.head..self.head + first].copy_from_slice(&chunk[..first]);
        self.ring[..wrapped].copy_from_slice(&chunk[first..]);
        self.head = if wrapped > 0 {
            wrapped
        } else {
            self.head + first
        };
        if self.head == limit {
            self.head = 0;
        }
    }

    /// The ring, where its oldest byte is, and whether that byte starts a line.
    fn take(&mut self) -> (Vec<u8>, usize, bool) {
        let ring = std::mem::take(&mut self.ring);
        let starts_mid_line = self.dropped_last.is_some_and(|b| b != b'\n');
        (ring, std::mem::take(&mut self.head), starts_mid_line)
    }
}

/// `lines` without its first line when that is only the end of one.
fn whole_lines(lines: &[u8], starts_mid_line: bool) -> &[u8] {
    if starts_mid_line {
        let first = memchr::memchr(b'\n', lines).map_or(lines.len(), |i| i + 1);
        &lines[first..]
    } else {
        lines
    }
}

impl UsageExtractor {
    /// An extractor with the default limits.
    pub fn new(dialect: Dialect, framing: Framing) -> Self {
        Self::with_limits(dialect, framing, Limits::default())
    }

    /// An extractor with explicit limits.
    pub fn with_limits(dialect: Dialect, framing: Framing, limits: Limits) -> Self {
        UsageExtractor {
            dialect,
            framing,
            limits,
            builder: UsageBuilder::default(),
            json: JsonScanner::default(),
            sse: SseReader::default(),
            tail: SseTail::default(),
            bytes: 0,
        }
    }

    /// Whether the stream has reached the point after which only its end matters: a line
    /// boundary, past Anthropic's `message_start` (the one opening event with usage), and not
    /// a llama.cpp stream (its native final event, with settings and timings, can be large).
    fn reads_only_the_tail(&self) -> bool {
        self.tail.active
            || (self.sse.line.is_empty()
                && !self.sse.discarding
                && match self.dialect {
                    Dialect::Openai => true,
                    Dialect::Anthropic => self.builder.anthropic_input_seen(),
                    Dialect::Llamacpp => false,
                })
    }

    /// Body bytes seen so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes
    }

    /// Feeds the next body chunk.
    #[inline]
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        // Most of a stream: straight into the ring, in a function small enough to inline.
        if self.tail.active {
            self.tail.keep(chunk, self.limits.sse_tail);
            return;
        }
        self.feed_reading(chunk);
    }

    #[inline(never)]
    fn feed_reading(&mut self, chunk: &[u8]) {
        if self.framing == Framing::Sse && self.reads_only_the_tail() {
            self.tail.keep(chunk, self.limits.sse_tail);
            return;
        }
        match self.framing {
            Framing::Json => {
                // Most completions arrive whole, in the first chunk: walk it at SIMD pace.
                if self.bytes == chunk.len() as u64 && self.read_whole_json(chunk) {
                    return;
                }
                self.json.feed(chunk, self.limits.window);
                for (key, value) in std::mem::take(&mut self.json.completed) {
                    match UsageEvent::member(KEYS[key], &value) {
                        Ok(event) => self.builder.observe_event(self.dialect, event),
                        Err(_) => self.json.malformed = true,
                    }
                }
            }
            Framing::Sse => {
                // Nearly every chunk of a stream is one or more whole content-delta events:
                // no line carried over, ends with a newline, no usage key. One search settles
                // it, before any line splitting.
                let whole_events_without_usage = self.sse.line.is_empty()
                    && !self.sse.discarding
                    && chunk.len() <= self.limits.window
                    && chunk.last() == Some(&b'\n')
                    && !mentions_usage(self.dialect, chunk);
                if !whole_events_without_usage {
                    self.sse
                        .feed(chunk, self.limits.window, self.dialect, &mut self.builder);
                }
            }
        }
    }

    /// Reads a JSON body that is complete in one chunk with the top-level walk (strings crossed
    /// by a SIMD search) instead of the byte-at-a-time scanner, which must be able to stop
    /// anywhere. False, with nothing read, when the chunk is not one whole object.
    fn read_whole_json(&mut self, chunk: &[u8]) -> bool {
        let (dialect, window) = (self.dialect, self.limits.window);
        let (builder, json) = (&mut self.builder, &mut self.json);
        // Collected, not observed during the walk: a walk that gives up half-way hands the
        // chunk to the scanner, which must start from nothing observed. On the stack: a body
        // names each key once (one naming them more often goes to the scanner).
        let mut members: ArrayVec<(&[u8], &[u8]), { 2 * KEYS.len() }> = ArrayVec::new();
        let walked = json_walk::top_level_members(chunk, |key, value| {
            !KEYS.contains(&key) || members.try_push((key, value)).is_ok()
        });
        if walked.is_none() {
            return false;
        }
        // What the scanner would have ended in after the whole object.
        json.started = true;
        json.top_is_object = true;
        for (key, value) in members {
            if value.len() > window {
                json.too_large = true;
                continue;
            }
            match UsageEvent::member(key, value) {
                Ok(event) => builder.observe_event(dialect, event),
                Err(_) => json.malformed = true,
            }
        }
        true
    }

    /// Reads the kept end of the stream back to front, up to the last event that carries
    /// usage (every usage event is cumulative or final, so the last one is the answer).
    fn read_tail(&mut self) {
        if !self.tail.active {
            return;
        }
        let (mut ring, head, starts_mid_line) = self.tail.take();
        if head > 0 {
            // The ring has wrapped: its newest bytes are `ring[..head]`, and they nearly always
            // hold the whole usage event. Read them in place before putting the ring in order.
            let (newer, older) = ring.split_at(head);
            if self.read_back(whole_lines(newer, older.last() != Some(&b'\n'))) {
                return;
            }
            ring.rotate_left(head);
        }
        // The first kept line may have begun before the kept bytes: it cannot be read. When
        // what is left of it names `usage`, the usage event was cut off by the ring's limit;
        // otherwise the stream simply carried none we can see (reported as missing).
        // (Streams that name `usage` on every event, as `"usage":null`, are told apart by
        // their whole lines: those mention it too, so a cut-off one was most likely another.)
        let lines = whole_lines(&ring, starts_mid_line);
        if !self.read_back(lines) && starts_mid_line {
            let partial = &ring[..ring.len() - lines.len()];
            if find_usage(self.dialect, partial).is_some()
                && find_usage(self.dialect, lines).is_none()
            {
                self.sse.too_large = true;
            }
        }
    }

    /// Reads `lines` back from the end to the last event that carries usage; true if found.
    fn read_back(&mut self, lines: &[u8]) -> bool {
        let window = self.limits.window;
        let mut end = lines.len();
        while let Some(at) = USAGE_KEY_REV.rfind(&lines[..end]) {
            let start = memchr::memrchr(b'\n', &lines[..at]).map_or(0, |n| n + 1);
            let line_end = memchr::memchr(b'\n', &lines[at..end]).map_or(end, |n| at + n);
            let line = &lines[start..line_end];
            if line.len() > window {
                self.sse.too_large = true;
            } else if self.sse.line(line, self.dialect, &mut self.builder, true) {
                return true;
            }
            end = start;
        }
        false
    }

    /// Ends the body and returns what was found (once: the model name is handed over, not
    /// copied).
    pub fn finish(&mut self) -> Extraction {
        let well_formed = match self.framing {
            Framing::Json => self.json.finish(),
            Framing::Sse => {
                // A last line without its newline still counts.
                if !self.sse.line.is_empty() {
                    self.sse.line_done(self.dialect, &mut self.builder);
                }
                self.read_tail();
                self.sse.malformed_events == 0
            }
        };
        let usage = self.builder.build();
        let too_large = self.json.too_large || self.sse.too_large;
        let outcome = if !usage.is_unknown() {
            UsageOutcome::Found
        } else if too_large {
            UsageOutcome::TooLarge
        } else if !well_formed {
            UsageOutcome::Malformed
        } else {
            UsageOutcome::Missing
        };
        Extraction {
            usage,
            outcome,
            model: self.builder.model.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Extraction {
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Json);
        x.feed(body.as_bytes());
        x.finish()
    }

    #[test]
    fn usage_anywhere_in_the_top_object_is_found() {
        let first = json(r#"{"usage":{"prompt_tokens":3,"completion_tokens":1},"choices":[]}"#);
        let last = json(
            r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        );
        assert_eq!(first, last);
        assert_eq!(first.outcome, UsageOutcome::Found);
        assert_eq!(first.usage.prompt_tokens, Some(3));
    }

    #[test]
    fn usage_words_inside_strings_and_nested_objects_are_ignored() {
        let e = json(
            r#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":999}","usage":{"prompt_tokens":888}}}]}"#,
        );
        assert_eq!(e.outcome, UsageOutcome::Missing);
        assert!(e.usage.is_unknown());
    }

    #[test]
    fn scalar_members_are_captured() {
        let e = json(
            r#"{"tokens_cached": 42, "usage": {"prompt_tokens": 50, "completion_tokens": 2}}"#,
        );
        assert_eq!(e.usage.cached_tokens, Some(42));
        let e = json(r#"{"usage": {"prompt_tokens": 50}, "tokens_cached": 7}"#);
        assert_eq!(e.usage.cached_tokens, Some(7), "a scalar ending the object");
    }

    #[test]
    fn garbage_and_truncation_are_malformed_not_zero() {
        for body in [
            "<html>502</html>",
            "\u{0}\u{1}garbage",
            "{\"choices\":[",
            "",
            "}",
        ] {
            let e = json(body);
            assert_eq!(e.outcome, UsageOutcome::Malformed, "{body:?}");
            assert!(e.usage.is_unknown());
        }
        assert_eq!(json(r#"{"choices":[]}"#).outcome, UsageOutcome::Missing);
        assert_eq!(json(r#"[1,2,3]"#).outcome, UsageOutcome::Missing);
    }

    #[test]
    fn an_oversized_usage_value_is_dropped_and_reported() {
        let mut x = UsageExtractor::with_limits(
            Dialect::Openai,
            Framing::Json,
            Limits {
                window: 64,
                ..Limits::default()
            },
        );
        x.feed(
            format!(
                r#"{{"usage":{{"prompt_tokens":1,"pad":"{}"}}}}"#,
                "x".repeat(200)
            )
            .as_bytes(),
        );
        assert_eq!(x.finish().outcome, UsageOutcome::TooLarge);
    }

    #[test]
    fn sse_usage_chunk_and_done() {
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
        x.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\r\n\r\ndata: [DONE]\n\n");
        let e = x.finish();
        assert_eq!(e.outcome, UsageOutcome::Found);
        assert_eq!(e.usage.cached_tokens, Some(8));
    }

    #[test]
    fn sse_lines_longer_than_the_window_are_dropped_but_reading_goes_on() {
        let mut x = UsageExtractor::with_limits(
            Dialect::Openai,
            Framing::Sse,
            Limits {
                window: 100,
                ..Limits::default()
            },
        );
        x.feed(format!("data: {{\"usage\":\"{}\"}}\n\n", "x".repeat(500)).as_bytes());
        x.feed(b"data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\n");
        let e = x.finish();
        assert_eq!(e.usage.prompt_tokens, Some(4));
    }

    /// A long OpenAI-style stream: `n` content events (each with `"usage":null`, as vLLM
    /// sends them), the usage event, `[DONE]`.
    fn long_openai_stream(n: usize) -> Vec<Vec<u8>> {
        let mut chunks: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"tok{i}\"}}}}],\"usage\":null}}\n\n"
                )
            .into_bytes()
            })
            .collect();
        chunks.push(
            b"data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"prompt_tokens_details\":{\"cached_tokens\":32},\"completion_tokens\":7}}\n\n"
                .to_vec(),
        );
        chunks.push(b"data: [DONE]\n\n".to_vec());
        chunks
    }

    proptest::proptest! {
        /// A JSON body read whole (the top-level walk) gives what the scanner gives when the
        /// same body arrives in two pieces, for every dialect.
        #[test]
        fn whole_json_bodies_read_like_split_ones(
            members in proptest::collection::vec((
                proptest::sample::select(vec!["usage", "model", "timings", "tokens_cached", "choices", "us\\u0061ge", "x"]),
                proptest::sample::select(vec![
                    r#"{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}"#,
                    r#"{"input_tokens":4,"cache_read_input_tokens":6,"output_tokens":2}"#,
                    r#"{"input_tokens":4,"cache_creation_input_tokens":5,"cache_creation":{"ephemeral_5m_input_tokens":2,"ephemeral_1h_input_tokens":3},"output_tokens":2}"#,
                    r#"{"prompt_n":3,"cache_n":9,"predicted_n":1}"#,
                    r#""m\"odel""#, "7", "-1", "null", "[1,{\"a\":\"}\"}]", r#"{"prompt_tokens":"x"}"#,
                ]),
            ), 0..6),
            split in 1usize..64,
            pretty: bool,
        ) {
            let sep = if pretty { ",\n  " } else { "," };
            let body = format!(
                "{{{}}}",
                members.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect::<Vec<_>>().join(sep)
            );
            let body = body.as_bytes();
            let split = split.min(body.len() - 1);
            for dialect in [Dialect::Openai, Dialect::Anthropic, Dialect::Llamacpp] {
                let mut whole = UsageExtractor::new(dialect, Framing::Json);
                whole.feed(body);
                let mut pieces = UsageExtractor::new(dialect, Framing::Json);
                pieces.feed(&body[..split]);
                pieces.feed(&body[split..]);
                proptest::prop_assert_eq!(whole.finish(), pieces.finish());
            }
        }
    }

    proptest::proptest! {
        /// The ring holds exactly the stream's last `limit` bytes, however it is chunked, and
        /// knows whether they start a line.
        #[test]
        fn the_tail_ring_keeps_the_last_bytes(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::sample::select(b"ab\n".to_vec()), 0..40), 0..30),
            limit in 1usize..64,
        ) {
            let mut tail = SseTail::default();
            for chunk in &chunks {
                tail.keep(chunk, limit);
            }
            let stream = chunks.concat();
            let (mut kept, head, mid_line) = tail.take();
            kept.rotate_left(head);
            let start = stream.len().saturating_sub(limit);
            proptest::prop_assert_eq!(&kept[..], &stream[start..]);
            proptest::prop_assert_eq!(mid_line, start > 0 && stream[start - 1] != b'\n');
        }
    }

    #[test]
    fn a_long_stream_is_read_from_its_end_in_bounded_memory() {
        let limits = Limits {
            sse_tail: 4096,
            ..Limits::default()
        };
        let mut x = UsageExtractor::with_limits(Dialect::Openai, Framing::Sse, limits);
        for chunk in long_openai_stream(5_000) {
            x.feed(&chunk);
            assert!(
                x.tail.ring.len() <= 4096,
                "tail holds {} bytes",
                x.tail.ring.len()
            );
        }
        let e = x.finish();
        assert_eq!(e.outcome, UsageOutcome::Found);
        assert_eq!(e.usage.prompt_tokens, Some(40));
        assert_eq!(e.usage.cached_tokens, Some(32));
        assert_eq!(e.usage.completion_tokens, Some(7));
        assert_eq!(e.model.as_deref(), Some("m"));
    }

    #[test]
    fn the_usage_event_is_found_wherever_the_ring_wraps() {
        // Every ring size from "just fits the usage event and [DONE]" up: the wrap point falls
        // before, inside and after the usage event.
        let stream = long_openai_stream(40);
        for sse_tail in 160..1_200 {
            let limits = Limits {
                sse_tail,
                ..Limits::default()
            };
            let mut x = UsageExtractor::with_limits(Dialect::Openai, Framing::Sse, limits);
            for chunk in &stream {
                x.feed(chunk);
            }
            let e = x.finish();
            assert_eq!(e.outcome, UsageOutcome::Found, "sse_tail {sse_tail}");
            assert_eq!(e.usage.completion_tokens, Some(7), "sse_tail {sse_tail}");
        }
    }

    #[test]
    fn a_short_stream_keeps_a_small_ring() {
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
        for chunk in long_openai_stream(10) {
            x.feed(&chunk);
        }
        assert!(
            x.tail.ring.capacity() <= INITIAL_SSE_TAIL,
            "{}",
            x.tail.ring.capacity()
        );
        assert_eq!(x.finish().outcome, UsageOutcome::Found);
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
        for chunk in long_openai_stream(400) {
            x.feed(&chunk);
        }
        assert_eq!(
            x.tail.ring.capacity(),
            DEFAULT_SSE_TAIL,
            "long streams get the full ring"
        );
        assert_eq!(x.finish().outcome, UsageOutcome::Found);
    }

    #[test]
    fn a_long_stream_without_usage_is_missing_not_too_large() {
        for usage_null in [false, true] {
            let mut x = UsageExtractor::with_limits(
                Dialect::Openai,
                Framing::Sse,
                Limits {
                    sse_tail: 1000,
                    ..Limits::default()
                },
            );
            for i in 0..400 {
                let tail = if usage_null { ",\"usage\":null" } else { "" };
                x.feed(
                    format!(
                        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]{tail}}}\n\n"
                    )
                    .as_bytes(),
                );
            }
            x.feed(b"data: [DONE]\n\n");
            assert_eq!(
                x.finish().outcome,
                UsageOutcome::Missing,
                "usage null: {usage_null}"
            );
        }
    }

    #[test]
    fn a_usage_event_cut_off_by_the_tail_limit_is_too_large_not_missing() {
        // Keep the usage key but not the start of its line.
        let stream = long_openai_stream(10).concat();
        let key = memchr::memmem::rfind(&stream, b"\"usage\"").unwrap();
        let limits = Limits {
            sse_tail: stream.len() - key + 3,
            ..Limits::default()
        };
        let mut x = UsageExtractor::with_limits(Dialect::Openai, Framing::Sse, limits);
        // Small chunks, so the tail can drop the start of the usage event.
        for piece in stream.chunks(16) {
            x.feed(piece);
        }
        let e = x.finish();
        assert_eq!(e.outcome, UsageOutcome::TooLarge);
        assert!(e.usage.is_unknown());
    }

    #[test]
    fn the_last_usage_event_wins_and_a_malformed_one_is_reported() {
        // Cumulative usage in every event (vLLM continuous_usage_stats): the last one counts.
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
        for n in 1..=50u64 {
            x.feed(
                format!(
                    "data: {{\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{n}}}}}\n\n"
                )
                .as_bytes(),
            );
        }
        x.feed(b"data: [DONE]\n\n");
        assert_eq!(x.finish().usage.completion_tokens, Some(50));
        // A truncated final usage event: unknown and malformed, never 0.
        let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
        x.feed(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
        x.feed(b"data: {\"usage\":{\"prompt_tokens\":9,\n\n");
        let e = x.finish();
        assert_eq!(e.outcome, UsageOutcome::Malformed);
        assert!(e.usage.is_unknown());
    }

    #[test]
    fn anthropic_reads_message_start_as_it_passes_and_message_delta_from_the_end() {
        let mut x = UsageExtractor::new(Dialect::Anthropic, Framing::Sse);
        x.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n");
        for _ in 0..1_000 {
            x.feed(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n");
        }
        assert!(x.tail.active, "past message_start only the end is kept");
        x.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n");
        x.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let e = x.finish();
        assert_eq!(e.outcome, UsageOutcome::Found);
        assert_eq!(e.usage.prompt_tokens, Some(105));
        assert_eq!(e.usage.cached_tokens, Some(100));
        assert_eq!(e.usage.completion_tokens, Some(42));
        assert_eq!(e.model.as_deref(), Some("claude"));
    }

    fn sse(dialect: Dialect, body: &str) -> Extraction {
        let mut x = UsageExtractor::new(dialect, Framing::Sse);
        x.feed(body.as_bytes());
        x.finish()
    }

    #[test]
    fn sse_events_that_mention_usage_without_carrying_it() {
        // A JSON string, and an OpenAI-style `"usage": null` on every delta.
        let e = sse(
            Dialect::Openai,
            "data: \"usage\"\n\ndata: {\"usage\":null}\n\n",
        );
        assert_eq!(
            e.outcome,
            UsageOutcome::Missing,
            "valid JSON is not malformed"
        );
        let e = sse(
            Dialect::Openai,
            "data: {\"usage\":null}\n\ndata: {\"usage\":{\"prompt_tokens\":5}}\n\n",
        );
        assert_eq!(e.usage.prompt_tokens, Some(5));
        let e = sse(
            Dialect::Openai,
            "data: {\"usage\":{\"prompt_tokens\":5}\n\n",
        );
        assert_eq!(e.outcome, UsageOutcome::Malformed, "a truncated event");
    }

    #[test]
    fn sse_llamacpp_native_stream_without_usage_key() {
        let body = "data: {\"content\":\"hi\"}\n\ndata: {\"tokens_cached\":40,\"timings\":{\"prompt_n\":2,\"cache_n\":40,\"predicted_n\":1}}\n\n";
        let e = sse(Dialect::Llamacpp, body);
        assert_eq!(
            (e.usage.prompt_tokens, e.usage.cached_tokens),
            (Some(42), Some(40))
        );
    }

    #[test]
    fn sse_anthropic_message_start_nests_model_and_usage() {
        let e = sse(
            Dialect::Anthropic,
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":3,\"cache_read_input_tokens\":7,\"output_tokens\":1}}}\n\n",
        );
        assert_eq!(e.model.as_deref(), Some("claude"));
        assert_eq!(
            (e.usage.prompt_tokens, e.usage.cached_tokens),
            (Some(10), Some(7))
        );
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::from_content_type("text/event-stream; charset=utf-8"),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type("application/json"),
            Framing::Json
        );
        assert_eq!(
            Framing::from_content_type(" Text/Event-Stream"),
            Framing::Sse
        );
        assert_eq!(Framing::from_content_type("text/event"), Framing::Json);
        assert_eq!(
            Framing::from_content_type("téxt/event-stream"),
            Framing::Json
        );
    }
}
