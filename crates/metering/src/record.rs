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

impl UsageRecord {
    /// Appends the record as one JSON line (with its `\n`) to `out`: byte for byte what
    /// `serde_json::to_writer` writes, without its per-key escaping and formatting
    /// machinery. The usage log writes one of these per request, so it is worth the lines
    /// (the test below holds the two to the same output).
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":");
        json_str(out, &self.ts);
        out.extend_from_slice(b",\"tenant\":");
        json_str(out, &self.tenant);
        for (key, value) in [
            (&b",\"session\":"[..], &self.session),
            (b",\"model\":", &self.model),
            (b",\"region\":", &self.region),
            (b",\"replica\":", &self.replica),
            (b",\"outcome\":", &self.outcome),
        ] {
            out.extend_from_slice(key);
            match value {
                Some(v) => json_str(out, v),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b",\"status\":");
        json_uint(out, Some(u64::from(self.status)));
        for (key, value) in [
            (&b",\"prompt_tokens\":"[..], self.prompt_tokens),
            (b",\"cached_tokens\":", self.cached_tokens),
            (b",\"completion_tokens\":", self.completion_tokens),
            (b",\"cost_micro_usd\":", self.cost_micro_usd),
            (
                b",\"uncached_cost_micro_usd\":",
                self.uncached_cost_micro_usd,
            ),
            (b",\"latency_ms\":", Some(self.latency_ms)),
            (b",\"ttft_ms\":", self.ttft_ms),
            (b",\"attempts\":", Some(u64::from(self.attempts))),
        ] {
            out.extend_from_slice(key);
            json_uint(out, value);
        }
        out.extend_from_slice(b",\"usage_status\":");
        json_str(out, &self.usage_status);
        out.extend_from_slice(b"}\n");
    }
}

fn json_uint(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string, escaped as serde_json escapes: `"`, `\\` and control characters; other
/// characters (non-ASCII included) as they are.
/// The bytes a JSON string cannot hold as they are: controls, `"` and `\`.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Names and ids almost never need escaping: one pass to find out, then one copy.
    if !bytes.iter().any(|&b| NEEDS_ESCAPE[usize::from(b)]) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// `ts` for a moment.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(tenant: &str) -> UsageRecord {
        UsageRecord {
            ts: timestamp(SystemTime::UNIX_EPOCH),
            tenant: tenant.into(),
            session: Some("9f86d081884c7d65".into()),
            model: Some("llama-3.1-8b".into()),
            region: Some("eu".into()),
            replica: Some("eu-1".into()),
            outcome: Some("sticky".into()),
            status: 200,
            prompt_tokens: Some(1200),
            cached_tokens: Some(1024),
            completion_tokens: Some(u64::MAX),
            cost_micro_usd: Some(0),
            uncached_cost_micro_usd: Some(640),
            latency_ms: 12,
            ttft_ms: Some(3),
            attempts: 2,
            usage_status: "found".into(),
        }
    }

    #[test]
    fn the_hand_written_line_is_serdes_line() {
        let mut nulls = full("acme");
        nulls.session = None;
        nulls.model = None;
        nulls.region = None;
        nulls.replica = None;
        nulls.outcome = None;
        nulls.prompt_tokens = None;
        nulls.cached_tokens = None;
        nulls.completion_tokens = None;
        nulls.cost_micro_usd = None;
        nulls.uncached_cost_micro_usd = None;
        nulls.ttft_ms = None;
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let records = [
            full("acme"),
            nulls,
            full("quote \" backslash \\ slash / del \u{7f} é 雪 🙂"),
            full(&every_control),
            full(""),
        ];
        for record in records {
            let mut mine = Vec::new();
            record.write_json_line(&mut mine);
            let mut serde = serde_json::to_vec(&record).unwrap();
            serde.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&serde)
            );
        }
    }

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
