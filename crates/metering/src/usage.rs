//! Token usage, normalized across dialects.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which API shape a response has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// All input tokens, cached or not.
    pub prompt_tokens: Option<u64>,
    /// Input tokens served from the prefix cache.
    pub cached_tokens: Option<u64>,
    /// Generated tokens.
    pub completion_tokens: Option<u64>,
}

impl Usage {
    /// True when nothing is known.
    pub fn is_unknown(&self) -> bool {
        self.prompt_tokens.is_none()
            && self.cached_tokens.is_none()
            && self.completion_tokens.is_none()
    }

    /// Input tokens that were not cached, when both counts are known.
    pub fn uncached_tokens(&self) -> Option<u64> {
        Some(self.prompt_tokens?.saturating_sub(self.cached_tokens?))
    }
}

/// Longest model name kept (a hostile upstream could send megabytes).
const MAX_MODEL_LEN: usize = 200;

/// The value at `path` (object keys). `Value::pointer` would do, but it allocates a string per
/// segment, on every usage event.
fn at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

fn count(v: &Value, path: &[&str]) -> Option<u64> {
    at(v, path).and_then(Value::as_u64)
}

/// The top-level members of a response object that can carry usage or the model.
#[derive(Clone, Copy)]
struct Members<'v> {
    model: Option<&'v Value>,
    usage: Option<&'v Value>,
    timings: Option<&'v Value>,
    tokens_cached: Option<&'v Value>,
    /// Anthropic's `message_start` nests the model and usage here.
    message: Option<&'v Value>,
}

/// An SSE event object read for usage: serde skips every other member (the choices, the
/// content) without building it, which is most of the cost of reading the event as a `Value`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UsageEvent {
    model: Option<Value>,
    usage: Option<Value>,
    timings: Option<Value>,
    tokens_cached: Option<Value>,
    message: Option<Value>,
}

impl UsageEvent {
    /// An event holding one top-level member (`usage`, `timings`, `tokens_cached`, `model` or
    /// `message`) of a JSON body; any other name gives an empty event.
    pub(crate) fn member(name: &[u8], value: Value) -> UsageEvent {
        let mut event = UsageEvent::default();
        let slot = match name {
            b"usage" => &mut event.usage,
            b"timings" => &mut event.timings,
            b"tokens_cached" => &mut event.tokens_cached,
            b"model" => &mut event.model,
            b"message" => &mut event.message,
            _ => return event,
        };
        *slot = Some(value);
        event
    }
}

/// Accumulates usage facts as they are found; later facts win, and a fact never erases a
/// known value with an unknown one.
#[derive(Debug, Clone, Default)]
pub(crate) struct UsageBuilder {
    prompt: Option<u64>,
    cached: Option<u64>,
    completion: Option<u64>,
    // Anthropic's three input parts.
    anthropic_input: Option<u64>,
    anthropic_creation: Option<u64>,
    anthropic_read: Option<u64>,
    // llama.cpp's uncached prompt count.
    llama_prompt_n: Option<u64>,
    /// The model that answered, when the response names it.
    pub model: Option<String>,
}

impl UsageBuilder {
    /// An OpenAI-style `usage` object (also llama.cpp's, which lacks details).
    pub fn openai_usage(&mut self, usage: &Value) {
        self.prompt = count(usage, &["prompt_tokens"]).or(self.prompt);
        self.cached = count(usage, &["prompt_tokens_details", "cached_tokens"]).or(self.cached);
        self.completion = count(usage, &["completion_tokens"]).or(self.completion);
    }

    /// An Anthropic `usage` object (from the body, `message_start.message` or `message_delta`).
    pub fn anthropic_usage(&mut self, usage: &Value) {
        self.anthropic_input = count(usage, &["input_tokens"]).or(self.anthropic_input);
        self.anthropic_creation =
            count(usage, &["cache_creation_input_tokens"]).or(self.anthropic_creation);
        self.anthropic_read = count(usage, &["cache_read_input_tokens"]).or(self.anthropic_read);
        self.completion = count(usage, &["output_tokens"]).or(self.completion);
    }

    /// llama.cpp `timings`.
    pub fn llamacpp_timings(&mut self, timings: &Value) {
        self.llama_prompt_n = count(timings, &["prompt_n"]).or(self.llama_prompt_n);
        self.cached = count(timings, &["cache_n"]).or(self.cached);
        self.completion = count(timings, &["predicted_n"]).or(self.completion);
    }

    /// llama.cpp `tokens_cached`.
    pub fn llamacpp_tokens_cached(&mut self, n: &Value) {
        self.cached = n.as_u64().or(self.cached);
    }

    /// One JSON value that may carry usage in `dialect` (a whole body or one SSE event).
    #[cfg(test)]
    pub fn observe(&mut self, dialect: Dialect, v: &Value) {
        self.observe_members(
            dialect,
            Members {
                model: v.get("model"),
                usage: v.get("usage"),
                timings: v.get("timings"),
                tokens_cached: v.get("tokens_cached"),
                message: v.get("message"),
            },
        );
    }

    /// One SSE event, read into just the members that matter.
    pub fn observe_event(&mut self, dialect: Dialect, e: &UsageEvent) {
        self.observe_members(
            dialect,
            Members {
                model: e.model.as_ref(),
                usage: e.usage.as_ref(),
                timings: e.timings.as_ref(),
                tokens_cached: e.tokens_cached.as_ref(),
                message: e.message.as_ref(),
            },
        );
    }

    fn observe_members(&mut self, dialect: Dialect, m: Members<'_>) {
        let model = m
            .model
            .or_else(|| m.message.and_then(|msg| msg.get("model")))
            .and_then(Value::as_str);
        if let Some(model) = model {
            if self.model.as_deref() != Some(model) {
                self.model = Some(model.chars().take(MAX_MODEL_LEN).collect());
            }
        }
        match dialect {
            Dialect::Anthropic => {
                if let Some(u) = m.message.and_then(|msg| msg.get("usage")) {
                    self.anthropic_usage(u);
                }
                if let Some(u) = m.usage {
                    self.anthropic_usage(u);
                }
            }
            Dialect::Openai | Dialect::Llamacpp => {
                if let Some(u) = m.usage.filter(|u| u.is_object()) {
                    self.openai_usage(u);
                }
                if let Some(t) = m.timings.filter(|t| t.is_object()) {
                    self.llamacpp_timings(t);
                }
                if let Some(n) = m.tokens_cached {
                    self.llamacpp_tokens_cached(n);
                }
            }
        }
    }

    pub fn build(&self) -> Usage {
        let (prompt, cached) = if let Some(input) = self.anthropic_input {
            // Anthropic's input_tokens excludes the cache parts; absent parts mean no caching.
            let prompt =
                input + self.anthropic_creation.unwrap_or(0) + self.anthropic_read.unwrap_or(0);
            (Some(prompt), self.anthropic_read)
        } else if let (None, Some(uncached), Some(cached)) =
            (self.prompt, self.llama_prompt_n, self.cached)
        {
            // llama.cpp's prompt_n counts only the tokens it had to process.
            (Some(uncached + cached), Some(cached))
        } else {
            (self.prompt, self.cached)
        };
        Usage {
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: self.completion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn observe(dialect: Dialect, values: &[Value]) -> Usage {
        let mut b = UsageBuilder::default();
        for v in values {
            b.observe(dialect, v);
        }
        b.build()
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
