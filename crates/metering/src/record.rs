//! One JSON line per request: the usage log's schema.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrayvec::ArrayString;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use tether_affinity::{KeySource, Outcome};

use crate::UsageStatus;

/// A per-tenant limit that refused a request (the record's `limit`, a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `requests_per_second`.
    Requests,
    /// `new_sessions_per_second`.
    NewSessions,
    /// `max_concurrent`.
    Concurrency,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Limit; 3] = [Limit::Requests, Limit::NewSessions, Limit::Concurrency];

    /// Label for the usage log and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::NewSessions => "new_sessions",
            Limit::Concurrency => "concurrency",
        }
    }
}

/// What Tether writes about one request. Unknown values are `null`, never `0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// When the request finished, RFC 3339 UTC with milliseconds.
    pub ts: Timestamp,
    /// Tenant id (shared with the proxy's tenant table, not copied per request).
    pub tenant: Arc<str>,
    /// Keyed hash of the session token (never the token itself); `null` without a token.
    pub session: Option<SessionHash>,
    /// Model that answered, as the response named it.
    pub model: Option<String>,
    /// Region of the replica that served it.
    pub region: Option<Arc<str>>,
    /// Replica that served it.
    pub replica: Option<Arc<str>>,
    /// Routing outcome (`sticky`, `shed`, `ring`, `rebalanced`, `locality`, `failover`,
    /// `cross_region`, `shared_kv`, `none`); `null` when the request was never routed.
    pub outcome: Option<Outcome>,
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
    /// `too_large`, `incomplete`, `not_metered`).
    pub usage_status: UsageStatus,
    // Fields added later go last, so every line starts as it always did; they read as
    // `None` from lines written before them.
    /// Input tokens written to the prompt cache (part of `prompt_tokens`, not of
    /// `cached_tokens`); `null` when the response does not report them (all but Anthropic).
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
    /// Where the session key came from (`header`, `agent_header`, `prompt_cache_key`,
    /// `user`, `fingerprint`), `none` without one.
    #[serde(default, with = "key_source_label")]
    pub key_source: Option<KeySource>,
    /// Of `cache_write_tokens`, those written with the 5-minute lifetime. Written only when the
    /// response splits its writes by lifetime (most lines never do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_5m_tokens: Option<u64>,
    /// Of `cache_write_tokens`, those written with the 1-hour lifetime; written only when
    /// reported, as the 5-minute part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_tokens: Option<u64>,
    /// The tenant limit that refused the request (answered 429 by Tether); written only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// Cached tokens a warm replica should have reported: for a sticky turn, the whole KV
    /// blocks of what the same replica processed for the session's previous turn (see
    /// [`expected_cached_tokens`](crate::expected_cached_tokens)). Written only for sticky
    /// turns whose previous turn this instance served and metered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_cached_tokens: Option<u64>,
}

impl UsageRecord {
    /// Appends the record as one JSON line (with its `\n`) to `out`: byte for byte what
    /// `serde_json::to_writer` writes, without its per-key escaping and formatting
    /// machinery. The usage log writes one of these per request, so it is worth the lines
    /// (the test below holds the two to the same output).
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(&self.ts.text());
        out.push(b'"');
        out.extend_from_slice(b",\"tenant\":");
        json_str(out, &self.tenant);
        for (key, value) in [
            (&b",\"session\":"[..], self.session.as_deref()),
            (b",\"model\":", self.model.as_deref()),
            (b",\"region\":", self.region.as_deref()),
            (b",\"replica\":", self.replica.as_deref()),
            (b",\"outcome\":", self.outcome.map(Outcome::as_str)),
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
        json_str(out, self.usage_status.as_str());
        out.extend_from_slice(b",\"cache_write_tokens\":");
        json_uint(out, self.cache_write_tokens);
        out.extend_from_slice(b",\"key_source\":");
        json_str(out, KeySource::label(self.key_source));
        for (key, value) in [
            (
                &b",\"cache_write_5m_tokens\":"[..],
                self.cache_write_5m_tokens,
            ),
            (b",\"cache_write_1h_tokens\":", self.cache_write_1h_tokens),
        ] {
            if value.is_some() {
                out.extend_from_slice(key);
                json_uint(out, value);
            }
        }
        if let Some(limit) = self.limit {
            out.extend_from_slice(b",\"limit\":");
            json_str(out, limit.as_str());
        }
        if let Some(expected) = self.expected_cached_tokens {
            out.extend_from_slice(b",\"expected_cached_tokens\":");
            json_uint(out, Some(expected));
        }
        out.extend_from_slice(b"}\n");
    }
}

/// `key_source` as its label, `"none"` for no key (and for lines written before the field).
mod key_source_label {
    use serde::{Deserialize, Deserializer, Serializer};
    use tether_affinity::KeySource;

    pub fn serialize<S: Serializer>(source: &Option<KeySource>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(KeySource::label(*source))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<KeySource>, D::Error> {
        let label = Option::<String>::deserialize(d)?;
        match label.as_deref() {
            None | Some("none") => Ok(None),
            Some(label) => KeySource::ALL
                .into_iter()
                .find(|s| s.as_str() == label)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown key_source {label:?}"))),
        }
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

/// Whether any byte needs escaping, eight bytes at a time (the classic SWAR tests: a byte
/// below 0x20, or equal to `"` or `\`, in a 64-bit word).
fn needs_escape(bytes: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(LO) & !v & HI != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let v = u64::from_le_bytes(w);
        // Below 0x20: exact for every byte, since bytes >= 0x80 have their high bit cleared
        // by `!v`.
        let control = v.wrapping_sub(LO * 0x20) & !v & HI != 0;
        if control || has_zero(v ^ (LO * u64::from(b'"'))) || has_zero(v ^ (LO * u64::from(b'\\')))
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| NEEDS_ESCAPE[usize::from(b)])
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Names and ids almost never need escaping: one pass to find out, then one copy.
    if !needs_escape(bytes) {
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

/// A session's keyed hash as records hold it: 32 hex digits, inline rather than on the heap.
pub type SessionHash = ArrayString<32>;

/// A record's `ts`: a moment to the millisecond, written as RFC 3339 UTC
/// (`2026-12-07T18:59:49.123Z`). Held as a number, so a record costs no string; the text is
/// made when the line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    millis: u64,
}

/// The last moment RFC 3339's four-digit years can write: later ones are clamped to it.
const LAST_MILLIS: u64 = 253_402_300_799_999;

impl Timestamp {
    /// Now.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.millis
    }

    /// The RFC 3339 text, 24 ASCII bytes.
    pub fn text(self) -> [u8; 24] {
        let secs = self.millis / 1000;
        let (year, month, day) = civil_from_days(secs / 86_400);
        // Written by hand: one per request, and `humantime`'s `Display` (through a formatter
        // and a growing `String`) costs three times as much.
        let time = secs % 86_400;
        let fields = [
            (u64::from(year), 4),
            (u64::from(month), 2),
            (u64::from(day), 2),
            (time / 3600, 2),
            (time / 60 % 60, 2),
            (time % 60, 2),
            (self.millis % 1000, 3),
        ];
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut at = 0;
        for (value, width) in fields {
            let mut v = value;
            for i in (at..at + width).rev() {
                out[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
            at += width + 1;
        }
        out
    }
}

impl From<SystemTime> for Timestamp {
    fn from(at: SystemTime) -> Timestamp {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        // RFC 3339 has four-digit years (humantime's formatter errors past them): clamp rather
        // than fail a log line.
        let millis = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        Timestamp {
            millis: millis.min(LAST_MILLIS),
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(ts: Timestamp) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ts.millis)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digits, dashes, colons and letters only.
        f.write_str(std::str::from_utf8(&self.text()).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp::from)
            .map_err(de::Error::custom)
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (
        u32::try_from(year).unwrap_or(u32::MAX),
        month as u32,
        day as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Strings are written exactly as serde_json writes them, escapes and all.
        #[test]
        fn strings_are_escaped_like_serde(text in "[\\x00-\\x7f\"\\\\é€😀]{0,40}") {
            let mut out = Vec::new();
            json_str(&mut out, &text);
            proptest::prop_assert_eq!(out, serde_json::to_vec(&text).unwrap());
        }
    }

    #[test]
    fn timestamps_match_humantime() {
        let mut secs: u64 = 0;
        // Every day boundary of leap and non-leap years, and a spread of times up to 9999.
        while secs < 253_402_300_799 {
            for millis in [0, 1, 999] {
                let at = UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
                let ts = Timestamp::from(at);
                let text = humantime::format_rfc3339_millis(at).to_string();
                assert_eq!(ts.to_string(), text, "{secs}");
                assert_eq!(humantime::parse_rfc3339(&text).map(Timestamp::from), Ok(ts));
            }
            secs += if secs < 4_200_000_000 {
                86_399
            } else {
                7_777_777
            };
        }
        assert_eq!(
            Timestamp::from(UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(
            Timestamp::from(far).to_string(),
            "9999-12-31T23:59:59.999Z",
            "clamped"
        );
    }

    fn full(tenant: &str) -> UsageRecord {
        UsageRecord {
            ts: Timestamp::from(SystemTime::UNIX_EPOCH),
            tenant: tenant.into(),
            session: Some(SessionHash::from("9f86d081884c7d65").unwrap()),
            model: Some("llama-3.1-8b".into()),
            region: Some("eu".into()),
            replica: Some("eu-1".into()),
            outcome: Some(Outcome::Sticky),
            status: 200,
            prompt_tokens: Some(1200),
            cached_tokens: Some(1024),
            completion_tokens: Some(u64::MAX),
            cost_micro_usd: Some(0),
            uncached_cost_micro_usd: Some(640),
            latency_ms: 12,
            ttft_ms: Some(3),
            attempts: 2,
            usage_status: UsageStatus::FOUND,
            cache_write_tokens: None,
            key_source: None,
            cache_write_5m_tokens: None,
            cache_write_1h_tokens: None,
            limit: None,
            expected_cached_tokens: None,
        }
    }

    /// An Anthropic record: cache writes reported, split by lifetime.
    fn anthropic(tenant: &str) -> UsageRecord {
        UsageRecord {
            model: Some("claude-sonnet-4-5".into()),
            prompt_tokens: Some(4096),
            cached_tokens: Some(1800),
            completion_tokens: Some(503),
            cost_micro_usd: Some(15_384),
            uncached_cost_micro_usd: Some(19_833),
            cache_write_tokens: Some(248),
            key_source: Some(KeySource::Fingerprint),
            cache_write_5m_tokens: Some(148),
            cache_write_1h_tokens: Some(100),
            ..full(tenant)
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
            anthropic("acme"),
            UsageRecord {
                cache_write_tokens: Some(u64::MAX),
                key_source: None,
                cache_write_1h_tokens: Some(0),
                ..nulls.clone()
            },
            UsageRecord {
                cache_write_5m_tokens: Some(7),
                ..nulls.clone()
            },
            UsageRecord {
                status: 429,
                limit: Some(Limit::NewSessions),
                ..nulls.clone()
            },
            UsageRecord {
                expected_cached_tokens: Some(1_008),
                ..full("acme")
            },
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

    /// How a line ends when the response reported no cache writes.
    const NO_CACHE_WRITES: &str = r#","cache_write_tokens":null,"key_source":"none"}"#;

    /// The usage log's format is a contract with `tether report` and whatever else reads the
    /// files: these lines are what it has always been, byte for byte, up to the fields added
    /// since (which come last), and they read back as the records that wrote them. Lines
    /// written before those fields existed read back too, with them `null`.
    #[test]
    fn the_log_line_format_is_unchanged_and_reads_back() {
        let bare = UsageRecord {
            session: None,
            model: None,
            region: None,
            replica: None,
            outcome: None,
            prompt_tokens: None,
            cached_tokens: None,
            completion_tokens: None,
            cost_micro_usd: None,
            uncached_cost_micro_usd: None,
            ttft_ms: None,
            status: 0,
            attempts: 0,
            usage_status: UsageStatus::NotMetered,
            ..full("-")
        };
        let spilled = UsageRecord {
            outcome: Some(Outcome::CrossRegion),
            usage_status: UsageStatus::Extracted(crate::UsageOutcome::TooLarge),
            ..full("acme")
        };
        let tokenless = UsageRecord {
            outcome: Some(Outcome::NoToken),
            usage_status: UsageStatus::Incomplete,
            ..full("acme")
        };
        let cases = [
            (
                full("acme"),
                concat!(
                    r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","#,
                    r#""session":"9f86d081884c7d65","model":"llama-3.1-8b","region":"eu","#,
                    r#""replica":"eu-1","outcome":"sticky","status":200,"prompt_tokens":1200,"#,
                    r#""cached_tokens":1024,"completion_tokens":18446744073709551615,"#,
                    r#""cost_micro_usd":0,"uncached_cost_micro_usd":640,"latency_ms":12,"#,
                    r#""ttft_ms":3,"attempts":2,"usage_status":"found"}"#,
                    "\n"
                ),
            ),
            (
                bare,
                concat!(
                    r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"-","session":null,"#,
                    r#""model":null,"region":null,"replica":null,"outcome":null,"status":0,"#,
                    r#""prompt_tokens":null,"cached_tokens":null,"completion_tokens":null,"#,
                    r#""cost_micro_usd":null,"uncached_cost_micro_usd":null,"latency_ms":12,"#,
                    r#""ttft_ms":null,"attempts":0,"usage_status":"not_metered"}"#,
                    "\n"
                ),
            ),
            (
                spilled,
                concat!(
                    r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","#,
                    r#""session":"9f86d081884c7d65","model":"llama-3.1-8b","region":"eu","#,
                    r#""replica":"eu-1","outcome":"cross_region","status":200,"#,
                    r#""prompt_tokens":1200,"cached_tokens":1024,"#,
                    r#""completion_tokens":18446744073709551615,"cost_micro_usd":0,"#,
                    r#""uncached_cost_micro_usd":640,"latency_ms":12,"ttft_ms":3,"attempts":2,"#,
                    r#""usage_status":"too_large"}"#,
                    "\n"
                ),
            ),
            (
                tokenless,
                concat!(
                    r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","#,
                    r#""session":"9f86d081884c7d65","model":"llama-3.1-8b","region":"eu","#,
                    r#""replica":"eu-1","outcome":"none","status":200,"prompt_tokens":1200,"#,
                    r#""cached_tokens":1024,"completion_tokens":18446744073709551615,"#,
                    r#""cost_micro_usd":0,"uncached_cost_micro_usd":640,"latency_ms":12,"#,
                    r#""ttft_ms":3,"attempts":2,"usage_status":"incomplete"}"#,
                    "\n"
                ),
            ),
        ];
        for (record, old_literal) in cases {
            let literal = old_literal.replace("}\n", &format!("{NO_CACHE_WRITES}\n"));
            let mut line = Vec::new();
            record.write_json_line(&mut line);
            assert_eq!(String::from_utf8_lossy(&line), literal);
            let back: UsageRecord = serde_json::from_str(&literal).unwrap();
            assert_eq!(back, record);
            let old: UsageRecord = serde_json::from_str(old_literal).unwrap();
            assert_eq!(old, record, "a line from before the cache-write fields");
        }
        let split = concat!(
            r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","#,
            r#""session":"9f86d081884c7d65","model":"claude-sonnet-4-5","region":"eu","#,
            r#""replica":"eu-1","outcome":"sticky","status":200,"prompt_tokens":4096,"#,
            r#""cached_tokens":1800,"completion_tokens":503,"#,
            r#""cost_micro_usd":15384,"uncached_cost_micro_usd":19833,"latency_ms":12,"#,
            r#""ttft_ms":3,"attempts":2,"usage_status":"found","cache_write_tokens":248,"#,
            r#""key_source":"fingerprint","cache_write_5m_tokens":148,"cache_write_1h_tokens":100}"#,
            "\n"
        );
        let unsplit = UsageRecord {
            cache_write_5m_tokens: None,
            cache_write_1h_tokens: None,
            ..anthropic("acme")
        };
        let cut = split.find(r#","cache_write_5m_tokens""#).unwrap();
        for (record, literal) in [
            (anthropic("acme"), split.to_owned()),
            (unsplit, format!("{}}}\n", &split[..cut])),
            (
                UsageRecord {
                    status: 429,
                    limit: Some(Limit::Concurrency),
                    ..full("acme")
                },
                concat!(
                    r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","#,
                    r#""session":"9f86d081884c7d65","model":"llama-3.1-8b","region":"eu","#,
                    r#""replica":"eu-1","outcome":"sticky","status":429,"prompt_tokens":1200,"#,
                    r#""cached_tokens":1024,"completion_tokens":18446744073709551615,"#,
                    r#""cost_micro_usd":0,"uncached_cost_micro_usd":640,"latency_ms":12,"#,
                    r#""ttft_ms":3,"attempts":2,"usage_status":"found","#,
                    r#""cache_write_tokens":null,"key_source":"none","limit":"concurrency"}"#,
                    "\n"
                )
                .to_owned(),
            ),
        ] {
            let mut line = Vec::new();
            record.write_json_line(&mut line);
            assert_eq!(String::from_utf8_lossy(&line), literal);
            let back: UsageRecord = serde_json::from_str(&literal).unwrap();
            assert_eq!(back, record);
        }
        for source in tether_affinity::KeySource::ALL {
            let record = UsageRecord {
                key_source: Some(source),
                ..full("acme")
            };
            let mut line = Vec::new();
            record.write_json_line(&mut line);
            let line = String::from_utf8(line).unwrap();
            assert!(
                line.ends_with(&format!(
                    r#""cache_write_tokens":null,"key_source":"{source}"}}{}"#,
                    "\n"
                )),
                "{line}"
            );
            let back: UsageRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(back, record);
        }
    }

    #[test]
    fn unknown_counts_serialize_as_null() {
        let r = UsageRecord {
            ts: Timestamp::from(SystemTime::UNIX_EPOCH),
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
            usage_status: UsageStatus::Extracted(crate::UsageOutcome::Malformed),
            cache_write_tokens: None,
            key_source: None,
            cache_write_5m_tokens: None,
            cache_write_1h_tokens: None,
            limit: None,
            expected_cached_tokens: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"prompt_tokens\":null"), "{line}");
        assert!(line.contains("\"cached_tokens\":0"), "{line}");
        assert!(line.contains("\"cache_write_tokens\":null"), "{line}");
        assert!(
            !line.contains("cache_write_1h"),
            "no split reported: {line}"
        );
        assert!(
            line.starts_with("{\"ts\":\"1970-01-01T00:00:00.000Z\""),
            "{line}"
        );
        let back: UsageRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
