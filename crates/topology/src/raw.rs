//! The file as written: serde types that mirror `tether.yaml` one to one.
//!
//! Everything here is `deny_unknown_fields`, so a misspelt key is an error with its line rather
//! than a silently ignored setting. Defaults live here too; cross-field checks live in
//! [`crate::validate`].

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTopology {
    pub listen: String,
    #[serde(default)]
    pub listen_tls: Vec<RawListenTls>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    pub local_region: String,
    #[serde(default)]
    pub affinity: RawAffinity,
    pub regions: Vec<RawRegion>,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub tenant_limits: RawLimits,
    #[serde(default)]
    pub pricing: Option<RawPricing>,
    #[serde(default)]
    pub usage_log: Option<RawUsageLog>,
    #[serde(default)]
    pub metering: RawMetering,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub failover: RawFailover,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub reload: RawReload,
    #[serde(default)]
    pub sticky_store: Option<RawStickyStore>,
    #[serde(default)]
    pub request_bodies: RawRequestBodies,
}

/// How much of request bodies Tether holds, and for how long a body may take to arrive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawRequestBodies {
    pub memory_mib: u64,
    pub tenant_share: f64,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for RawRequestBodies {
    fn default() -> Self {
        RawRequestBodies {
            memory_mib: 256,
            tenant_share: 0.5,
            deadline: Duration::from_secs(60),
        }
    }
}

/// An HTTPS listener: its default certificate and, optionally, more chosen by server name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenTls {
    pub address: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub sni: Vec<RawCertificate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS to a replica (or every replica of a region).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "yes")]
    pub verify: bool,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStickyStore {
    pub url: String,
    #[serde(default)]
    pub cluster: bool,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    #[serde(default = "default_lookup_timeout", with = "humantime_serde")]
    pub lookup_timeout: Duration,
    #[serde(default = "default_write_queue")]
    pub write_queue: usize,
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default = "default_load_interval", with = "humantime_serde")]
    pub load_interval: Option<Duration>,
}

fn default_load_interval() -> Option<Duration> {
    Some(Duration::from_millis(100))
}

fn default_key_prefix() -> String {
    "tether:s:".into()
}

fn default_channel() -> String {
    "tether:bindings".into()
}

fn default_lookup_timeout() -> Duration {
    Duration::from_millis(5)
}

fn default_write_queue() -> usize {
    65_536
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAffinity {
    pub header: String,
    pub max_token_len: usize,
    pub balance_factor: f64,
    #[serde(with = "humantime_serde")]
    pub override_ttl: Duration,
    pub override_capacity: usize,
    pub ring_points_per_weight: u32,
    #[serde(with = "humantime_serde")]
    pub tenant_locality: Option<Duration>,
    pub shed_factor: Option<f64>,
    pub placement: Option<tether_affinity::Placement>,
    pub outcome_header: Option<String>,
    pub key_sources: Vec<tether_affinity::KeySource>,
    pub agent_headers: Vec<String>,
    pub key_secret: Option<RawSecretSource>,
    pub override_share: f64,
}

/// Where a secret comes from: an environment variable or a file, never the YAML itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecretSource {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// The session ids agent harnesses send of their own accord, each found in the client's
/// source (docs/session-affinity.md cites where).
pub(crate) const DEFAULT_AGENT_HEADERS: &[&str] = &[
    "x-session-id",
    "session_id",
    "x-claude-code-session-id",
    "x-opencode-session",
    "x-litellm-session-id",
];

impl Default for RawAffinity {
    fn default() -> Self {
        RawAffinity {
            header: "x-session-affinity".into(),
            max_token_len: 128,
            balance_factor: 1.25,
            override_ttl: Duration::from_secs(3600),
            override_capacity: 1_000_000,
            ring_points_per_weight: 2048,
            tenant_locality: Some(Duration::from_secs(30)),
            shed_factor: None,
            placement: None,
            outcome_header: Some("x-session-affinity-status".into()),
            // The fingerprint is opt-in: it gives tokenless traffic keys, which changes how
            // that traffic spreads.
            key_sources: vec![
                tether_affinity::KeySource::Header,
                tether_affinity::KeySource::AgentHeader,
                tether_affinity::KeySource::PromptCacheKey,
            ],
            agent_headers: DEFAULT_AGENT_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
            key_secret: None,
            override_share: 0.5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRegion {
    pub name: String,
    #[serde(default)]
    pub replicas: Vec<RawReplica>,
    #[serde(default)]
    pub kv_scope: tether_affinity::KvScope,
    #[serde(default)]
    pub upstream_auth: Option<RawUpstreamAuth>,
    #[serde(default)]
    pub tls: Option<RawUpstreamTls>,
}

/// Where a replica's own credential comes from: never the YAML itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamAuth {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub header: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReplica {
    pub id: String,
    pub address: String,
    #[serde(default = "one")]
    pub weight: NonZeroU32,
    #[serde(default)]
    pub state: tether_affinity::Admission,
    #[serde(default)]
    pub max_inflight: Option<RawInflightCap>,
    #[serde(default)]
    pub dialect: Option<tether_metering::Dialect>,
    #[serde(default)]
    pub engine: tether_engine::EngineKind,
    #[serde(default)]
    pub upstream_auth: Option<RawUpstreamAuth>,
    #[serde(default)]
    pub tls: Option<RawUpstreamTls>,
}

/// `max_inflight`: a number, or `auto` (from the engine's capacity). Deserialized by hand
/// rather than as an untagged enum, whose error would lose the key's path.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawInflightCap {
    Fixed(u32),
    Auto,
}

impl<'de> Deserialize<'de> for RawInflightCap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawInflightCap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of requests (1 or more) or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawInflightCap, E> {
                u32::try_from(v)
                    .map(RawInflightCap::Fixed)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawInflightCap, E> {
                match v {
                    "auto" => Ok(RawInflightCap::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn one() -> NonZeroU32 {
    NonZeroU32::MIN
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub id: String,
    pub api_key_sha256: String,
    #[serde(default)]
    pub limits: RawLimits,
}

/// Per-tenant limits: `tenant_limits` for every tenant, `tenants[].limits` field by field over
/// it. An absent field is no limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawLimits {
    pub requests_per_second: Option<f64>,
    pub request_burst: Option<u32>,
    pub new_sessions_per_second: Option<f64>,
    pub new_session_burst: Option<u32>,
    pub max_concurrent: Option<u32>,
}

impl RawLimits {
    /// `self`'s fields, each falling back to `base`'s.
    pub fn over(&self, base: &RawLimits) -> RawLimits {
        RawLimits {
            requests_per_second: self.requests_per_second.or(base.requests_per_second),
            request_burst: self.request_burst.or(base.request_burst),
            new_sessions_per_second: self
                .new_sessions_per_second
                .or(base.new_sessions_per_second),
            new_session_burst: self.new_session_burst.or(base.new_session_burst),
            max_concurrent: self.max_concurrent.or(base.max_concurrent),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPricing {
    pub default: RawPrice,
    #[serde(default)]
    pub models: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Absent: cache writes cost what plain input costs.
    #[serde(default)]
    pub cache_write_per_mtok: Option<f64>,
    /// Absent: 1-hour cache writes cost what `cache_write_per_mtok` says.
    #[serde(default)]
    pub cache_write_1h_per_mtok: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUsageLog {
    pub path: PathBuf,
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_queue() -> usize {
    65_536
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawMetering {
    pub enabled: bool,
    pub session_key: Option<String>,
    pub inject_stream_usage: bool,
    pub cache_loss: RawCacheLoss,
}

impl Default for RawMetering {
    fn default() -> Self {
        RawMetering {
            enabled: true,
            session_key: None,
            inject_stream_usage: true,
            cache_loss: RawCacheLoss::default(),
        }
    }
}

/// `metering.cache_loss`: when a replica's sticky turns count as having lost their cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawCacheLoss {
    pub threshold: f64,
    pub min_expected_tokens: u64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub block_tokens: u32,
}

impl Default for RawCacheLoss {
    fn default() -> Self {
        let d = tether_metering::CacheLossSettings::default();
        RawCacheLoss {
            threshold: d.threshold,
            min_expected_tokens: d.min_expected_tokens,
            window: d.window,
            block_tokens: d.block_tokens,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawUpstream {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub watch_connections: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Some(Duration::from_secs(300)),
            idle_timeout: Some(Duration::from_secs(60)),
            watch_connections: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawServer {
    pub threads: usize,
    pub work_stealing: bool,
    /// `grace_period` is its former name (a fixed wait, which became a limit).
    #[serde(with = "humantime_serde", alias = "grace_period")]
    pub drain_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub graceful_shutdown_timeout: Duration,
    pub pid_file: Option<PathBuf>,
    pub upgrade_sock: Option<PathBuf>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            threads: 2,
            work_stealing: true,
            drain_timeout: Duration::from_secs(600),
            graceful_shutdown_timeout: Duration::from_secs(5),
            pid_file: None,
            upgrade_sock: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawHealth {
    pub probe: RawProbe,
    pub eject_after: u32,
    #[serde(with = "humantime_serde")]
    pub eject_cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub eject_max_cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub overload_default: Duration,
    #[serde(with = "humantime_serde")]
    pub overload_max: Duration,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            probe: RawProbe::default(),
            eject_after: 3,
            eject_cooldown: Duration::from_secs(5),
            eject_max_cooldown: Duration::from_secs(60),
            overload_default: Duration::from_secs(1),
            overload_max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawProbe {
    pub enabled: bool,
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for RawProbe {
    fn default() -> Self {
        RawProbe {
            enabled: true,
            path: "/health".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawFailover {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    pub retry_unanswered: Vec<String>,
}

impl Default for RawFailover {
    fn default() -> Self {
        RawFailover {
            max_attempts: 3,
            deadline: Duration::from_secs(30),
            retry_unanswered: crate::DEFAULT_RETRY_UNANSWERED
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAdmin {
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawReload {
    pub watch: bool,
}

impl Default for RawReload {
    fn default() -> Self {
        RawReload { watch: true }
    }
}
