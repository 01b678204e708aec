//! Token-usage metering: how many input tokens of a response were served from the prefix
//! cache, and what the request cost.
//!
//! Tether sees every response body pass through its `response_body_filter`; this crate turns
//! those chunks into a [`Usage`] without buffering the body ([`UsageExtractor`]): a structural
//! JSON scanner for whole responses and a line reader for server-sent events, both in bounded
//! memory, both giving the same answer however the body is split. Three dialects are
//! understood ([`Dialect`]): OpenAI / vLLM / SGLang (`prompt_tokens_details.cached_tokens`),
//! Anthropic Messages (`cache_read_input_tokens`, split across `message_start` and
//! `message_delta` when streaming) and llama.cpp (`timings.cache_n`, `tokens_cached`).
//! Unknown counts stay `None` — never guessed as 0 — and [`UsageOutcome`] says why; a record's
//! [`UsageStatus`] adds the responses that broke off or were never metered.
//!
//! [`Price::cost`] prices a usage in integer micro-dollars, cached tokens at their discount
//! and tokens written to the prompt cache (Anthropic's `cache_creation_input_tokens`) at their
//! premium, alongside what it would have cost without the cache.
//!
//! Each request becomes one [`UsageRecord`] JSON line in the [`UsageLog`], written by its own
//! thread from a bounded queue (a full queue drops and counts, never stalls the proxy).
//!
//! For sticky turns, [`expected_cached_tokens`] says how many cached tokens a warm replica
//! should report, and [`ReplicaCacheLoss`] keeps each replica's ratio of reported to expected
//! over a recent window: the cache-loss detector.
//!
//! Everything but the log writer is pure: no Pingora, no I/O.
//!
//! ```
//! use tether_metering::{Dialect, Framing, Price, UsageExtractor, UsageOutcome};
//!
//! let mut x = UsageExtractor::new(Dialect::Openai, Framing::Sse);
//! x.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usa");
//! x.feed(b"ge\":{\"prompt_tokens\":1000,\"completion_tokens\":10,\"prompt_tokens_details\":{\"cached_tokens\":900}}}\n\ndata: [DONE]\n\n");
//! let found = x.finish();
//! assert_eq!(found.outcome, UsageOutcome::Found);
//! assert_eq!(found.usage.cached_tokens, Some(900));
//!
//! let price = Price::new(500_000, 50_000, 1_500_000);
//! let cost = price.cost(&found.usage).unwrap();
//! assert_eq!((cost.cost_micro_usd, cost.saved_micro_usd()), (110, 405));
//! ```

mod cache_loss;
mod extract;
mod json_walk;
mod pricing;
mod record;
mod report;
mod sink;
mod status;
mod stream_rewrite;
mod stream_usage;
mod usage;

pub use cache_loss::{expected_cached_tokens, CacheLossSettings, Crossing, ReplicaCacheLoss};
pub use extract::{
    Extraction, Framing, Limits, UsageExtractor, UsageOutcome, DEFAULT_SSE_TAIL, DEFAULT_WINDOW,
};
pub use pricing::{Cost, Price};
pub use record::{Limit, SessionHash, Timestamp, UsageRecord};
pub use report::{aggregate, GroupBy, Report, ReportRow};
pub use sink::{SinkError, UsageLog, DEFAULT_QUEUE};
pub use status::{UnknownUsageStatus, UsageStatus};
pub use stream_rewrite::{StreamUsageRewrite, USAGE_OPTION};
pub use stream_usage::{ensure_stream_usage, UsageChunkFilter};
pub use usage::{Dialect, Usage};
