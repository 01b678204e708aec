//! One JSON line per request: the usage log's schema.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What Tether writes about one request. Unknown values are `null`, never `0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// When the request finished, RFC 3339 UTC with milliseconds.
    pub ts: String,
    /// Tenant id.
    pub tenant: String,
    /// Keyed hash of the session token (never the token itself); `null` without a token.
    pub session: Option<String>,
    /// Model that answered, as the response named it.
    pub model: Option<String>,
    /// Region of the replica that served it.
    pub region: Option<String>,
    /// Replica that served it.
    pub replica: Option<String>,
    /// Routing outcome (`sticky`, `ring`, `rebalanced`, `failover`, `cross_region`, `none`).
    pub outcome: Option<String>,
    /// HTTP status sent to the client (0 if none was).
    pub status: u16,
    /// All input tokens.
    pub prompt_tokens: Option<u64>,
    /// Input tokens served from the prefix cache.
    pub cached_tokens: Option<u64>,
    /// Generated tokens.
    pub completion_tokens: Option<u64>,
    /// Cost with cached tokens at the cached price, micro-dollars.
    pub cost_micro_usd: Option<u64>,
    /// Cost with every input token at the uncached price, micro-dollars.
    pub uncached_cost_micro_usd: Option<u64>,
    /// Request start to end of response, ms.
    pub latency_ms: u64,
    /// Request start to the first response body byte, ms.
    pub ttft_ms: Option<u64>,
    /// Upstream attempts.
    pub attempts: u32,
    /// Whether usage was found, and if not why (`found`, `missing`, `malformed`,
    /// `too_large`, `not_metered` for responses Tether did not meter, e.g. its own errors).
    pub usage_status: String,
}

/// `ts` for a moment.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_counts_serialize_as_null() {
        let r = UsageRecord {
            ts: timestamp(SystemTime::UNIX_EPOCH),
            tenant: "acme".into(),
            session: None,
            model: None,
            region: None,
            replica: None,
            outcome: None,
            status: 502,
            prompt_tokens: None,
            cached_tokens: Some(0),
            completion_tokens: None,
            cost_micro_usd: None,
            uncached_cost_micro_usd: None,
            latency_ms: 3,
            ttft_ms: None,
            attempts: 1,
            usage_status: "malformed".into(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"prompt_tokens\":null"), "{line}");
        assert!(line.contains("\"cached_tokens\":0"), "{line}");
        assert!(
            line.starts_with("{\"ts\":\"1970-01-01T00:00:00.000Z\""),
            "{line}"
        );
        let back: UsageRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
