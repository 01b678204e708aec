//! Token usage, normalized across dialects.

use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Which API shape a response has; also a replica's `dialect` in the topology file
/// (`openai`, `anthropic`, `llamacpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI chat completions, also vLLM and SGLang: `usage.prompt_tokens`,
    /// `usage.prompt_tokens_details.cached_tokens`, `usage.completion_tokens`.
    Openai,
    /// Anthropic Messages: `input_tokens` + `cache_creation_input_tokens` +
    /// `cache_read_input_tokens`, `output_tokens` (split over `message_start` and
    /// `message_delta` when streaming).
    Anthropic,
    /// llama.cpp server: `timings.prompt_n` (uncached), `timings.cache_n`,
    /// `timings.predicted_n`, or `tokens_cached`.
    Llamacpp,
}

impl Dialect {
    /// The dialect a request path implies: `/v1/messages` is Anthropic's; llama.cpp's native
    /// `/completion` (also served as `/completions` without `/v1`) and `/infill` are
    /// llama.cpp's; everything else is read as OpenAI-compatible (which still reads `timings`
    /// found beside `usage`).
    pub fn from_path(path: &str) -> Dialect {
        if path.ends_with("/messages") {
            Dialect::Anthropic
        } else if path.ends_with("/completion") || path == "/completions" || path == "/infill" {
            Dialect::Llamacpp
        } else {
            Dialect::Openai
        }
    }
}

/// Token counts of one response. `None` = the response did not say (never guessed as 0).
///
/// The input parts: `prompt_tokens` counts every input token once; of those,
/// `cached_tokens` were read from the prefix cache and `cache_write_tokens` were computed and
/// written to it (Anthropic's `cache_creation_input_tokens`, billed above plain input). The
/// two never overlap, and what is left is plain uncached input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// All input tokens, cached or not.
    pub prompt_tokens: Option<u64>,
    /// Input tokens served from the prefix cache.
    pub cached_tokens: Option<u64>,
    /// Generated tokens.
    pub completion_tokens: Option<u64>,
    /// Input tokens written to the prompt cache (part of `prompt_tokens`, not of
    /// `cached_tokens`). Only Anthropic reports them; `None` elsewhere.
    pub cache_write_tokens: Option<u64>,
    /// Of `cache_write_tokens`, those written with the 5-minute lifetime, when the response
    /// splits them (Anthropic's `cache_creation.ephemeral_5m_input_tokens`).
    pub cache_write_5m_tokens: Option<u64>,
    /// Of `cache_write_tokens`, those written with the 1-hour lifetime, when the response
    /// splits them (Anthropic's `cache_creation.ephemeral_1h_input_tokens`).
    pub cache_write_1h_tokens: Option<u64>,
}

impl Usage {
    /// True when nothing is known.
    pub fn is_unknown(&self) -> bool {
        self.prompt_tokens.is_none()
            && self.cached_tokens.is_none()
            && self.completion_tokens.is_none()
            && self.cache_write_tokens.is_none()
            && self.cache_write_5m_tokens.is_none()
            && self.cache_write_1h_tokens.is_none()
    }

    /// Input tokens that were not cached, when both counts are known.
    pub fn uncached_tokens(&self) -> Option<u64> {
        Some(self.prompt_tokens?.saturating_sub(self.cached_tokens?))
    }
}

/// Longest model name kept (a hostile upstream could send megabytes).
const MAX_MODEL_LEN: usize = 200;

/// A token count as upstreams send it: a non-negative integer is known; anything else (a
/// float, a string, a negative number, null, an object) is unknown, never 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count(pub(crate) Option<u64>);

/// A member read leniently: a JSON object becomes `T`, any other value `None`. (A strict
/// `Option<T>` would make one odd member fail the whole event.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Obj<T>(pub(crate) Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

/// A model name: a string is kept (cut to [`MAX_MODEL_LEN`] characters), anything else ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Name(pub(crate) Option<String>);

/// Visits any JSON value; `Some` only for the shape wanted, every other value skipped.
struct Lenient<T>(std::marker::PhantomData<T>);

/// Visitor methods that accept a kind of JSON value and yield `$none` (skipping it whole).
macro_rules! yield_none_for {
    ($ty:ty, $none:expr, scalars) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<$ty, E> {
            Ok($none)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<$ty, E> {
            Ok($none)
        }
        fn visit_unit<E: de::Error>(self) -> Result<$ty, E> {
            Ok($none)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
    ($ty:ty, $none:expr, integers) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<$ty, E> {
            Ok($none)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<$ty, E> {
            Ok($none)
        }
    };
    ($ty:ty, $none:expr, strings) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<$ty, E> {
            Ok($none)
        }
    };
    ($ty:ty, $none:expr, maps) => {
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
}

impl<'de> Visitor<'de> for Lenient<Count> {
    type Value = Count;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a token count")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(v).ok()))
    }
    yield_none_for!(Count, Count(None), strings);
    yield_none_for!(Count, Count(None), maps);
    yield_none_for!(Count, Count(None), scalars);
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient::<Count>(std::marker::PhantomData))
    }
}

impl<'de> Visitor<'de> for Lenient<Name> {
    type Value = Name;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a model name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Name, E> {
        Ok(Name(Some(if v.len() <= MAX_MODEL_LEN {
            // No more bytes than the limit means no more characters.
            v.to_owned()
        } else {
            v.chars().take(MAX_MODEL_LEN).collect()
        })))
    }
    yield_none_for!(Name, Name(None), integers);
    yield_none_for!(Name, Name(None), maps);
    yield_none_for!(Name, Name(None), scalars);
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient::<Name>(std::marker::PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Lenient<Obj<T>> {
    type Value = Obj<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
    }
    yield_none_for!(Obj<T>, Obj(None), integers);
    yield_none_for!(Obj<T>, Obj(None), strings);
    yield_none_for!(Obj<T>, Obj(None), scalars);
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient::<Obj<T>>(std::marker::PhantomData))
    }
}

/// `Deserialize` for a struct of lenient members, read from a JSON object only. Member names
/// are matched as raw bytes (`deserialize_bytes`: serde_json then skips the UTF-8 check a
/// `str` key costs, and every name matched is ASCII); other members are skipped unbuilt; a
/// repeated member overwrites the earlier one, as upstreams are not held to unique names.
macro_rules! lenient_members {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[allow(non_camel_case_types)]
                enum Member {
                    $($field,)+
                    Other,
                }
                struct MemberVisitor;
                impl<'de> Visitor<'de> for MemberVisitor {
                    type Value = Member;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a member name")
                    }
                    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Member, E> {
                        $(if name == stringify!($field).as_bytes() {
                            return Ok(Member::$field);
                        })+
                        Ok(Member::Other)
                    }
                    fn visit_str<E: de::Error>(self, name: &str) -> Result<Member, E> {
                        self.visit_bytes(name.as_bytes())
                    }
                }
                impl<'de> Deserialize<'de> for Member {
                    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        d.deserialize_bytes(MemberVisitor)
                    }
                }
                struct ObjectVisitor;
                impl<'de> Visitor<'de> for ObjectVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        let mut out = $ty::default();
                        while let Some(member) = map.next_key::<Member>()? {
                            match member {
                                $(Member::$field => out.$field = map.next_value()?,)+
                                Member::Other => {
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(ObjectVisitor)
            }
        }
    };
}

/// A `usage` object of any dialect: OpenAI's (also vLLM, SGLang, llama.cpp's OpenAI endpoint)
/// and Anthropic's members side by side; the dialect decides which are read.
#[derive(Debug, Default)]
pub(crate) struct UsageCounts {
    prompt_tokens: Count,
    completion_tokens: Count,
    prompt_tokens_details: Obj<PromptDetails>,
    input_tokens: Count,
    output_tokens: Count,
    cache_read_input_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_creation: Obj<CacheCreation>,
}

#[derive(Debug, Default)]
pub(crate) struct PromptDetails {
    cached_tokens: Count,
}

/// Anthropic's `usage.cache_creation`: the cache writes split by lifetime.
#[derive(Debug, Default)]
pub(crate) struct CacheCreation {
    ephemeral_5m_input_tokens: Count,
    ephemeral_1h_input_tokens: Count,
}

lenient_members!(UsageCounts {
    prompt_tokens,
    completion_tokens,
    prompt_tokens_details,
    input_tokens,
    output_tokens,
    cache_read_input_tokens,
    cache_creation_input_tokens,
    cache_creation,
});
lenient_members!(PromptDetails { cached_tokens });
lenient_members!(CacheCreation {
    ephemeral_5m_input_tokens,
    ephemeral_1h_input_tokens,
});

/// llama.cpp's `timings`.
#[derive(Debug, Default)]
pub(crate) struct Timings {
    prompt_n: Count,
    cache_n: Count,
    predicted_n: Count,
}

lenient_members!(Timings {
    prompt_n,
    cache_n,
    predicted_n
});

/// Anthropic's `message_start.message`.
#[derive(Debug, Default)]
pub(crate) struct Message {
    model: Name,
    usage: Obj<UsageCounts>,
}

lenient_members!(Message { model, usage });

/// A response object or SSE event read for usage: typed members only, so serde skips
/// everything else (the choices, the content) without building it, and builds no tree of
/// what it keeps.
#[derive(Debug, Default)]
pub(crate) struct UsageEvent {
    model: Name,
    usage: Obj<UsageCounts>,
    timings: Obj<Timings>,
    tokens_cached: Count,
    message: Obj<Message>,
}

lenient_members!(UsageEvent {
    model,
    usage,
    timings,
    tokens_cached,
    message,
});

impl UsageEvent {
    /// Whether the event carries counts (not just a `"usage": null` placeholder).
    pub(crate) fn carries_usage(&self) -> bool {
        self.usage.0.is_some()
            || self.timings.0.is_some()
            || self.tokens_cached.0.is_some()
            || self.message.0.as_ref().is_some_and(|m| m.usage.0.is_some())
    }

    /// An event holding one top-level member (`usage`, `timings`, `tokens_cached`, `model` or
    /// `message`) of a JSON body, read from its raw bytes; any other name gives an empty event.
    pub(crate) fn member(name: &[u8], raw: &[u8]) -> serde_json::Result<UsageEvent> {
        let mut event = UsageEvent::default();
        event.set_member(name, raw)?;
        Ok(event)
    }

    /// Reads one top-level member from its raw bytes; other names are ignored.
    pub(crate) fn set_member(&mut self, name: &[u8], raw: &[u8]) -> serde_json::Result<()> {
        match name {
            b"usage" => {
                self.usage = match plain_counts(raw) {
                    Some(counts) => Obj(Some(counts)),
                    None => serde_json::from_slice(raw)?,
                }
            }
            b"timings" => self.timings = serde_json::from_slice(raw)?,
            b"tokens_cached" => self.tokens_cached = serde_json::from_slice(raw)?,
            b"model" => {
                self.model = match plain_string(raw) {
                    Some(model) => Name(Some(model.to_owned())),
                    None => serde_json::from_slice(raw)?,
                }
            }
            b"message" => self.message = serde_json::from_slice(raw)?,
            _ => {}
        }
        Ok(())
    }

    /// An SSE event's data read member by member: the top-level walk crosses what is not
    /// wanted (ids, choices, content) without parsing it, and the members kept are read by the
    /// plain-shape fast paths or serde. `None` when the walk cannot follow the data (the
    /// caller then parses it whole, which also decides whether it is malformed).
    pub(crate) fn from_members(data: &[u8]) -> Option<serde_json::Result<UsageEvent>> {
        let mut event = UsageEvent::default();
        let mut failed = None;
        crate::json_walk::top_level_members(data, |name, raw| {
            // An escaped name might spell a member that matters: leave it to the whole parse.
            if name.contains(&b'\\') {
                return false;
            }
            if let Err(e) = event.set_member(name, raw) {
                failed = Some(e);
            }
            failed.is_none()
        })
        .map(|_| Ok(event))
        .or_else(|| failed.map(Err))
    }
}

/// A `usage` object in its everyday shape — plain member names, counts as unsigned integers,
/// `prompt_tokens_details` as such an object — read without serde. `None` for any other
/// shape (an escaped name, a count that is not a plain integer, a nested value elsewhere):
/// serde then reads it with the lenient rules, so on valid JSON both paths agree. (The walk
/// does not validate the members it does not read, so JSON malformed only there is read
/// rather than refused.)
fn plain_counts(raw: &[u8]) -> Option<UsageCounts> {
    let mut counts = UsageCounts::default();
    let mut plain = true;
    crate::json_walk::top_level_members(raw, |name, value| {
        let count = || plain_count(value).map(|n| Count(Some(n)));
        let slot = match name {
            b"prompt_tokens" => &mut counts.prompt_tokens,
            b"completion_tokens" => &mut counts.completion_tokens,
            b"input_tokens" => &mut counts.input_tokens,
            b"output_tokens" => &mut counts.output_tokens,
            b"cache_read_input_tokens" => &mut counts.cache_read_input_tokens,
            b"cache_creation_input_tokens" => &mut counts.cache_creation_input_tokens,
            b"prompt_tokens_details" => {
                let mut details = PromptDetails::default();
                plain = plain_object(
                    value,
                    &mut [(&b"cached_tokens"[..], &mut details.cached_tokens)],
                );
                counts.prompt_tokens_details = Obj(Some(details));
                return plain;
            }
            b"cache_creation" => {
                let mut split = CacheCreation::default();
                plain = plain_object(
                    value,
                    &mut [
                        (
                            &b"ephemeral_5m_input_tokens"[..],
                            &mut split.ephemeral_5m_input_tokens,
                        ),
                        (
                            &b"ephemeral_1h_input_tokens"[..],
                            &mut split.ephemeral_1h_input_tokens,
                        ),
                    ],
                );
                counts.cache_creation = Obj(Some(split));
                return plain;
            }
            // Other members (`total_tokens`, vendor extras) are not read; an escaped name might
            // spell one that is.
            _ => {
                plain = !name.contains(&b'\\');
                return plain;
            }
        };
        match count() {
            Some(c) => *slot = c,
            None => plain = false,
        }
        plain
    })?;
    plain.then_some(counts)
}

/// A nested object of counts in its everyday shape: the members named in `slots` read as plain
/// counts, every other member skipped; false (leave it to serde) for any other shape.
fn plain_object(raw: &[u8], slots: &mut [(&[u8], &mut Count)]) -> bool {
    crate::json_walk::top_level_members(raw, |name, value| {
        match slots.iter_mut().find(|(want, _)| *want == name) {
            Some((_, count)) => match plain_count(value) {
                Some(n) => **count = Count(Some(n)),
                None => return false,
            },
            None if name.contains(&b'\\') => return false,
            None => {}
        }
        true
    })
    .is_some()
}

/// A JSON number that is a plain unsigned integer (no sign, fraction or exponent) fitting `u64`.
fn plain_count(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 20 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // JSON forbids leading zeros; serde would refuse `01`, so leave it to serde.
    if raw.len() > 1 && raw[0] == b'0' {
        return None;
    }
    raw.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A JSON string without escapes, short enough to keep whole (see [`MAX_MODEL_LEN`]).
fn plain_string(raw: &[u8]) -> Option<&str> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.len() > MAX_MODEL_LEN || inner.iter().any(|b| matches!(b, b'"' | b'\\' | 0..=0x1f)) {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

/// Accumulates usage facts as they are found; later facts win, and a fact never erases a
/// known value with an unknown one.
#[derive(Debug, Clone, Default)]
pub(crate) struct UsageBuilder {
    prompt: Option<u64>,
    cached: Option<u64>,
    completion: Option<u64>,
    // Anthropic's three input parts, and the cache writes split by lifetime.
    anthropic_input: Option<u64>,
    anthropic_creation: Option<u64>,
    anthropic_read: Option<u64>,
    anthropic_creation_5m: Option<u64>,
    anthropic_creation_1h: Option<u64>,
    // llama.cpp's uncached prompt count.
    llama_prompt_n: Option<u64>,
    /// The model that answered, when the response names it.
    pub model: Option<String>,
}

impl UsageBuilder {
    /// An OpenAI-style `usage` object (also llama.cpp's, which lacks details).
    fn openai_usage(&mut self, usage: &UsageCounts) {
        self.prompt = usage.prompt_tokens.0.or(self.prompt);
        let cached = usage.prompt_tokens_details.0.as_ref();
        self.cached = cached.and_then(|d| d.cached_tokens.0).or(self.cached);
        self.completion = usage.completion_tokens.0.or(self.completion);
    }

    /// An Anthropic `usage` object (from the body, `message_start.message` or `message_delta`).
    fn anthropic_usage(&mut self, usage: &UsageCounts) {
        self.anthropic_input = usage.input_tokens.0.or(self.anthropic_input);
        self.anthropic_creation = usage
            .cache_creation_input_tokens
            .0
            .or(self.anthropic_creation);
        self.anthropic_read = usage.cache_read_input_tokens.0.or(self.anthropic_read);
        if let Some(split) = &usage.cache_creation.0 {
            self.anthropic_creation_5m = split
                .ephemeral_5m_input_tokens
                .0
                .or(self.anthropic_creation_5m);
            self.anthropic_creation_1h = split
                .ephemeral_1h_input_tokens
                .0
                .or(self.anthropic_creation_1h);
        }
        self.completion = usage.output_tokens.0.or(self.completion);
    }

    /// One JSON value that may carry usage in `dialect` (a whole body or one SSE event).
    #[cfg(test)]
    pub fn observe(&mut self, dialect: Dialect, v: &serde_json::Value) {
        let event: UsageEvent = serde_json::from_value(v.clone()).unwrap_or_default();
        self.observe_event(dialect, event);
    }

    /// One response object or SSE event, read into just the members that matter.
    pub fn observe_event(&mut self, dialect: Dialect, mut e: UsageEvent) {
        // Moved, not copied: the event is done with once read.
        let model = e.model.0.take().or_else(|| {
            e.message
                .0
                .as_mut()
                .and_then(|m| std::mem::take(&mut m.model.0))
        });
        if model.is_some() {
            self.model = model;
        }
        let message = e.message.0.as_ref();
        match dialect {
            Dialect::Anthropic => {
                if let Some(u) = message.and_then(|m| m.usage.0.as_ref()) {
                    self.anthropic_usage(u);
                }
                if let Some(u) = &e.usage.0 {
                    self.anthropic_usage(u);
                }
            }
            Dialect::Openai | Dialect::Llamacpp => {
                if let Some(u) = &e.usage.0 {
                    self.openai_usage(u);
                }
                if let Some(t) = &e.timings.0 {
                    self.llama_prompt_n = t.prompt_n.0.or(self.llama_prompt_n);
                    self.cached = t.cache_n.0.or(self.cached);
                    self.completion = t.predicted_n.0.or(self.completion);
                }
                self.cached = e.tokens_cached.0.or(self.cached);
            }
        }
    }

    /// Whether an Anthropic `message_start` (input counts) has been read.
    pub(crate) fn anthropic_input_seen(&self) -> bool {
        self.anthropic_input.is_some()
    }

    /// The counts read so far.
    pub fn build(&self) -> Usage {
        let mut usage = Usage {
            completion_tokens: self.completion,
            ..Usage::default()
        };
        if let Some(input) = self.anthropic_input {
            // Anthropic's input_tokens excludes the cache parts; absent parts mean no caching.
            // The total of the writes is `cache_creation_input_tokens`; a response that only
            // splits them is taken at the sum of its split.
            let creation = self.anthropic_creation.or_else(|| {
                Some(
                    self.anthropic_creation_5m?
                        .saturating_add(self.anthropic_creation_1h?),
                )
            });
            usage.prompt_tokens = Some(
                input
                    .saturating_add(creation.unwrap_or(0))
                    .saturating_add(self.anthropic_read.unwrap_or(0)),
            );
            usage.cached_tokens = self.anthropic_read;
            usage.cache_write_tokens = creation;
            usage.cache_write_5m_tokens = self.anthropic_creation_5m;
            usage.cache_write_1h_tokens = self.anthropic_creation_1h;
        } else if let (None, Some(uncached), Some(cached)) =
            (self.prompt, self.llama_prompt_n, self.cached)
        {
            // llama.cpp's prompt_n counts only the tokens it had to process.
            usage.prompt_tokens = Some(uncached.saturating_add(cached));
            usage.cached_tokens = Some(cached);
        } else {
            usage.prompt_tokens = self.prompt;
            usage.cached_tokens = self.cached;
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn observe(dialect: Dialect, values: &[Value]) -> Usage {
        let mut b = UsageBuilder::default();
        for v in values {
            b.observe(dialect, v);
        }
        b.build()
    }

    #[test]
    fn odd_member_values_are_unknown_without_failing_the_event() {
        let event: UsageEvent = serde_json::from_str(
            r#"{"model": 5, "usage": {"prompt_tokens": "12", "completion_tokens": -1,
                "prompt_tokens_details": null, "input_tokens": 1.5, "output_tokens": [1],
                "cache_read_input_tokens": {"n": 1}, "extra": {"deep": [1, {"x": null}]}},
                "timings": "none", "tokens_cached": true, "choices": [{"delta": {}}]}"#,
        )
        .unwrap();
        assert!(event.model.0.is_none());
        assert!(
            event.usage.0.is_some(),
            "an object, whatever its members hold"
        );
        let mut b = UsageBuilder::default();
        b.observe_event(Dialect::Openai, event);
        assert!(b.build().is_unknown(), "{:?}", b.build());
        for odd in [r#"{"usage": "x"}"#, r#"{"usage": null}"#, r#"{"usage": 3}"#] {
            let event: UsageEvent = serde_json::from_str(odd).unwrap();
            assert!(!event.carries_usage(), "{odd}");
        }
        // A long model name is cut to MAX_MODEL_LEN characters (not bytes).
        let long = "é".repeat(MAX_MODEL_LEN + 5);
        let event: UsageEvent =
            serde_json::from_value(serde_json::json!({ "model": long })).unwrap();
        assert_eq!(
            event.model.0.map(|m| m.chars().count()),
            Some(MAX_MODEL_LEN)
        );
    }

    /// Values a usage member may hold: the everyday ones and every odd one.
    const VALUES: [&str; 19] = [
        "0",
        "7",
        "1200",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "1.5",
        "1e3",
        "\"12\"",
        "null",
        "true",
        "[1,2]",
        "{}",
        r#"{"cached_tokens":32}"#,
        r#"{"cached_tokens":null,"x":[{"y":"}"}]}"#,
        r#"{"cach\u0065d_tokens":5}"#,
        r#"{"ephemeral_5m_input_tokens":148,"ephemeral_1h_input_tokens":100}"#,
        r#"{"ephemeral_1h_input_tokens":-1,"ephemeral_5m_input_tokens":"x"}"#,
        r#"{"ephemeral_5m_input_tokens":3,"eph\u0065meral_1h_input_tokens":4}"#,
    ];
    const NAMES: [&str; 11] = [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "extra",
        r"prompt\u005ftokens",
    ];

    fn object(members: &[(usize, usize)], pretty: bool) -> String {
        let sep = if pretty { " ,\n " } else { "," };
        let body = members
            .iter()
            .map(|(n, v)| {
                format!(
                    "\"{}\":{}{}",
                    NAMES[*n],
                    if pretty { " " } else { "" },
                    VALUES[*v]
                )
            })
            .collect::<Vec<_>>()
            .join(sep);
        format!("{{{body}}}")
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x7e7_4e2),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The plain-shape fast path gives exactly what serde's lenient reading gives, or
        /// steps aside.
        #[test]
        fn plain_counts_agree_with_serde(
            members in proptest::collection::vec((0..NAMES.len(), 0..VALUES.len()), 0..7),
            pretty: bool,
        ) {
            let raw = object(&members, pretty);
            let serde: Obj<UsageCounts> = serde_json::from_str(&raw).unwrap();
            if let Some(fast) = plain_counts(raw.as_bytes()) {
                proptest::prop_assert_eq!(format!("{:?}", Obj(Some(fast))), format!("{serde:?}"), "{}", raw);
            }
            let mut event = UsageEvent::default();
            event.set_member(b"usage", raw.as_bytes()).unwrap();
            proptest::prop_assert_eq!(format!("{:?}", event.usage), format!("{serde:?}"));
        }

        /// An event read member by member equals the event parsed whole.
        #[test]
        fn events_read_by_members_equal_whole_parses(
            usage in proptest::collection::vec((0..NAMES.len(), 0..VALUES.len()), 0..5),
            model in proptest::sample::select(vec![r#""m""#, r#""m\"x""#, "5", "null", r#""é""#]),
            order in 0usize..3,
            usage_name in proptest::sample::select(vec!["usage", r"us\u0061ge", "x"]),
        ) {
            let usage = object(&usage, false);
            let mut members = [
                "\"id\":\"chatcmpl-1\",\"choices\":[{\"delta\":{\"content\":\"}\\\"\"}}]".to_owned(),
                format!("\"model\":{model}"),
                format!("\"{usage_name}\":{usage}"),
            ];
            members.rotate_left(order);
            let data = format!("{{{}}}", members.join(","));
            let whole: UsageEvent = serde_json::from_str(&data).unwrap();
            // An escaped name is left to the whole parse (`None`); otherwise the two agree.
            if let Some(walked) = UsageEvent::from_members(data.as_bytes()) {
                proptest::prop_assert_eq!(format!("{:?}", walked.unwrap()), format!("{whole:?}"), "{}", data);
            }
        }
    }

    #[test]
    fn plain_shapes_take_the_fast_path() {
        let counts = plain_counts(
            br#"{"prompt_tokens":1200,"completion_tokens":20,"total_tokens":1220,"prompt_tokens_details":{"cached_tokens":1024}}"#,
        )
        .expect("the everyday shape");
        assert_eq!(counts.prompt_tokens, Count(Some(1200)));
        assert_eq!(
            counts.prompt_tokens_details.0.map(|d| d.cached_tokens),
            Some(Count(Some(1024)))
        );
        assert!(plain_counts(br#"{"prompt_tokens":-1}"#).is_none());
        assert!(plain_counts(br#"{"prompt\u005ftokens":1}"#).is_none());
        assert_eq!(plain_string(br#""bench-model""#), Some("bench-model"));
        assert_eq!(plain_string(br#""a\"b""#), None);
        // Data the walk cannot follow, and escaped top-level names, are left to the whole parse.
        assert!(UsageEvent::from_members(b"{\"usage\":").is_none());
        assert!(
            UsageEvent::from_members(br#"{"usage":{"prompt_tokens":1},"us\u0061ge":null}"#)
                .is_none()
        );
        assert!(UsageEvent::from_members(b"[1]").is_none());
    }

    #[test]
    fn member_names_are_matched_after_unescaping_and_the_last_repeat_wins() {
        // `\u005f` is `_`: the same name, spelled with an escape.
        let event: UsageEvent = serde_json::from_str(
            r#"{"usage": {"prompt\u005ftokens": 7, "completion_tokens": 1,
                "completion_tokens": 2, "caf\u00e9": 1, "\ud83d\ude00": 2}}"#,
        )
        .unwrap();
        let mut b = UsageBuilder::default();
        b.observe_event(Dialect::Openai, event);
        let u = b.build();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(7), Some(2)));
        // Not an object where one is needed: an error (the caller counts it malformed).
        assert!(serde_json::from_str::<UsageEvent>("[1, 2]").is_err());
        assert!(serde_json::from_str::<UsageEvent>(r#"{"usage": {"prompt_tokens": 1}"#).is_err());
    }

    #[test]
    fn openai_usage_with_and_without_cache_details() {
        let u = observe(
            Dialect::Openai,
            &[
                json!({"usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 64}}}),
            ],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (Some(100), Some(64), Some(7))
        );
        assert_eq!(u.uncached_tokens(), Some(36));
        let u = observe(
            Dialect::Openai,
            &[json!({"usage": {"prompt_tokens": 100, "completion_tokens": 7}})],
        );
        assert_eq!(u.cached_tokens, None, "absent details are unknown, not 0");
        assert_eq!(u.uncached_tokens(), None);
    }

    #[test]
    fn anthropic_parts_sum_to_the_prompt_across_start_and_delta() {
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 70, "output_tokens": 1}}}),
                json!({"type": "message_delta", "usage": {"output_tokens": 42}}),
            ],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (Some(100), Some(70), Some(42))
        );
    }

    #[test]
    fn anthropic_cache_writes_are_inside_the_prompt_and_not_cached() {
        // Newer API versions split the writes by lifetime; the total stays the sum.
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"usage": {"input_tokens": 2048, "cache_read_input_tokens": 1800, "cache_creation_input_tokens": 248, "cache_creation": {"ephemeral_5m_input_tokens": 148, "ephemeral_1h_input_tokens": 100}, "output_tokens": 503}}),
            ],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
            (Some(4096), Some(1800), Some(248))
        );
        assert_eq!(
            (u.cache_write_5m_tokens, u.cache_write_1h_tokens),
            (Some(148), Some(100))
        );
        // Without the split: the total alone, the split unknown.
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 70, "output_tokens": 1}}}),
                json!({"type": "message_delta", "usage": {"output_tokens": 42}}),
            ],
        );
        assert_eq!(
            (u.prompt_tokens, u.cache_write_tokens),
            (Some(100), Some(20))
        );
        assert_eq!(
            (u.cache_write_5m_tokens, u.cache_write_1h_tokens),
            (None, None)
        );
        // A split without its total counts once, as the sum of its parts.
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"usage": {"input_tokens": 1, "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 3}, "output_tokens": 1}}),
            ],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
            (Some(6), None, Some(5))
        );
        // No cache members at all: nothing is guessed.
        let u = observe(
            Dialect::Anthropic,
            &[json!({"usage": {"input_tokens": 9, "output_tokens": 1}})],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens),
            (Some(9), None, None)
        );
        // Later events (cumulative message_delta) do not erase the split.
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 4, "cache_creation_input_tokens": 6, "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 6}, "output_tokens": 1}}}),
                json!({"type": "message_delta", "usage": {"input_tokens": 4, "cache_creation_input_tokens": 6, "cache_read_input_tokens": 0, "output_tokens": 9}}),
            ],
        );
        assert_eq!(
            (
                u.prompt_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (Some(10), Some(6), Some(6))
        );
    }

    #[test]
    fn other_dialects_report_no_cache_writes() {
        // Anthropic's members in an OpenAI-dialect body are not read as cache writes.
        let u = observe(
            Dialect::Openai,
            &[
                json!({"usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 64}, "cache_creation_input_tokens": 5}}),
            ],
        );
        assert_eq!(u.cache_write_tokens, None);
        let u = observe(
            Dialect::Llamacpp,
            &[json!({"timings": {"prompt_n": 30, "cache_n": 70, "predicted_n": 5}})],
        );
        assert_eq!(
            (
                u.cache_write_tokens,
                u.cache_write_5m_tokens,
                u.cache_write_1h_tokens
            ),
            (None, None, None)
        );
    }

    #[test]
    fn absurd_anthropic_parts_saturate_instead_of_overflowing() {
        let u = observe(
            Dialect::Anthropic,
            &[
                json!({"usage": {"input_tokens": u64::MAX, "cache_creation_input_tokens": u64::MAX, "cache_read_input_tokens": 1}}),
            ],
        );
        assert_eq!(u.prompt_tokens, Some(u64::MAX));
    }

    #[test]
    fn llamacpp_timings_count_cached_and_uncached() {
        let u = observe(
            Dialect::Llamacpp,
            &[json!({"timings": {"prompt_n": 30, "cache_n": 70, "predicted_n": 5}})],
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (Some(100), Some(70), Some(5))
        );
        let u = observe(
            Dialect::Openai,
            &[
                json!({"usage": {"prompt_tokens": 100, "completion_tokens": 5}, "tokens_cached": 64}),
            ],
        );
        assert_eq!(
            u.cached_tokens,
            Some(64),
            "llama.cpp fields are read in OpenAI mode too"
        );
    }

    #[test]
    fn nothing_known_is_unknown() {
        let u = observe(
            Dialect::Openai,
            &[json!({"choices": []}), json!({"usage": null})],
        );
        assert!(u.is_unknown());
    }

    #[test]
    fn later_unknowns_do_not_erase_known_values() {
        let u = observe(
            Dialect::Openai,
            &[
                json!({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}),
                json!({"usage": {"completion_tokens": 2}}),
            ],
        );
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(5), Some(2)));
    }

    #[test]
    fn dialect_from_path() {
        assert_eq!(Dialect::from_path("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Dialect::from_path("/v1/chat/completions"), Dialect::Openai);
        assert_eq!(Dialect::from_path("/v1/completions"), Dialect::Openai);
        assert_eq!(Dialect::from_path("/completion"), Dialect::Llamacpp);
        assert_eq!(Dialect::from_path("/completions"), Dialect::Llamacpp);
    }
}
