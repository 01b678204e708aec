//! The validated topology: the only configuration the proxy ever sees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tether_affinity::{Admission, InflightCap, KeySource, KvScope, Placement};
pub use tether_engine::EngineKind;
use tether_metering::{Dialect, Price};

/// A validated topology. Build one with [`Topology::from_yaml`](crate::Topology::from_yaml) or
/// [`Topology::load`](crate::Topology::load); every field has passed the checks in
/// `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Address of the proxy listener (plain HTTP).
    pub listen: SocketAddr,
    /// HTTPS listeners (`listen_tls`), each with its certificates.
    pub listen_tls: Vec<TlsListener>,
    /// Address of the admin/metrics listener, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Index into [`regions`](Self::regions) of the region this edge instance runs in.
    pub local_region: usize,
    /// Session-affinity settings.
    pub affinity: AffinitySettings,
    /// Regions in preference order (after the home and local regions).
    pub regions: Vec<Region>,
    /// API tenants. Empty = every request is tenant `default`.
    pub tenants: Vec<Tenant>,
    /// Limits of the `default` tenant (every request when no tenants are configured), and the
    /// base of every tenant's own.
    pub tenant_limits: TenantLimits,
    /// Token prices.
    pub pricing: Pricing,
    /// Where to write the per-request usage log, if anywhere.
    pub usage_log: Option<UsageLog>,
    /// Metering settings.
    pub metering: MeteringSettings,
    /// Upstream connection settings.
    pub upstream: UpstreamSettings,
    /// Process settings.
    pub server: ServerSettings,
    /// Health checking (`health`).
    pub health: HealthSettings,
    /// Retries and failover (`failover`).
    pub failover: FailoverSettings,
    /// The admin API (`admin`).
    pub admin: AdminSettings,
    /// Hot reload (`reload`).
    pub reload: ReloadSettings,
    /// The shared sticky store, when the instance runs in a tier.
    pub sticky_store: Option<StickyStoreSettings>,
    /// Memory and time bounds on request bodies (`request_bodies`).
    pub request_bodies: RequestBodySettings,
}

/// The `request_bodies` section: bounds on what Tether holds of request bodies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestBodySettings {
    /// The most bytes of request bodies held at once, over all requests (`memory_mib`).
    pub memory_limit: usize,
    /// The most of [`memory_limit`](Self::memory_limit) one tenant's bodies may hold.
    pub tenant_limit: usize,
    /// A request whose body has not fully arrived this long after its header is answered 408.
    pub deadline: Duration,
}

/// The `affinity` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinitySettings {
    /// Lower-cased name of the header carrying the token.
    pub header: String,
    /// Maximum token length in bytes.
    pub max_token_len: usize,
    /// `c` in the bounded-load rule (≥ 1).
    pub balance_factor: f64,
    /// Idle time after which an override entry is forgotten.
    pub override_ttl: Duration,
    /// Maximum number of override entries.
    pub override_capacity: usize,
    /// Ring points per unit of replica weight.
    pub ring_points_per_weight: u32,
    /// How long a replica counts as warm for a tenant after serving it: new sessions prefer
    /// such a replica (tenant locality). `None` = off.
    pub tenant_locality: Option<Duration>,
    /// Sticky shedding: a replica that has served more than this × the fleet's mean recently
    /// gives sticky sessions, one at a time, to the least-loaded replica. `None` = off.
    pub shed_factor: Option<f64>,
    /// How a new session's home region is chosen (default: `nearest` with a sticky store,
    /// `hash` without).
    pub placement: Placement,
    /// Response header telling the client what happened to its session (`warm`, `new`,
    /// `moved`, `none`); `None` = not sent.
    pub outcome_header: Option<String>,
    /// Where a request's session key is looked for, in order; the first present wins.
    pub key_sources: Vec<KeySource>,
    /// Lower-cased names of the agents' own session-id headers (`agent_header` source), in
    /// the order they are tried.
    pub agent_headers: Vec<String>,
    /// Where the deployment's routing-key secret is read at start (the same on every instance
    /// of a tier). `None` = routing keys anyone can compute (see docs/security.md).
    pub key_secret: Option<SecretSource>,
    /// The most of `override_capacity` one tenant of `tenants` may hold, in (0, 1]; 1 = no
    /// limit.
    pub override_share: f64,
}

/// The shared sticky store (Redis protocol) that lets every instance of a tier follow every
/// session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyStoreSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS).
    pub url: String,
    /// Redis Cluster: `url` is a seed node.
    pub cluster: bool,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Pub/sub channel for binding changes.
    pub channel: String,
    /// Longest a request waits for the store; a timeout routes as if it had no entry.
    pub lookup_timeout: Duration,
    /// Writes queued for the store at most; more are dropped (and counted).
    pub write_queue: usize,
    /// PEM file of the CA that signed the store's certificate (`rediss://` with a private
    /// CA); without it the system's roots are used.
    pub tls_ca_file: Option<PathBuf>,
    /// How often each instance tells the others its requests in flight per replica, so that
    /// bounded loads balance the tier's load; `None`: each balances its own.
    pub load_interval: Option<Duration>,
}

/// A region and its replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Unique name.
    pub name: String,
    /// At least one replica.
    pub replicas: Vec<Replica>,
    /// Where its KV cache lives.
    pub kv_scope: KvScope,
}

/// One inference replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Unique id across all regions.
    pub id: String,
    /// Where it listens (HTTP/1.1, plain text).
    pub address: SocketAddr,
    /// Relative share of sessions, 1..=100.
    pub weight: u32,
    /// Whether it takes work (`state`).
    pub state: Admission,
    /// Hard cap on requests in flight (`None` = no cap).
    pub max_inflight: Option<InflightCap>,
    /// Which engine serves it, and so which endpoint the prober reads for its capacity and
    /// load (`none`: not read).
    pub engine: EngineKind,
    /// How to read its usage; `None` = from the request path.
    pub dialect: Option<Dialect>,
    /// The replica's own credential (its `upstream_auth`, else its region's).
    pub upstream_auth: Option<UpstreamAuth>,
    /// TLS to the replica (its `tls`, else its region's); `None` = plain HTTP.
    pub tls: Option<UpstreamTls>,
}

/// An HTTPS listener (`listen_tls[i]`). The files are read when the proxy starts and on every
/// reload, so a renewed certificate is served to new connections without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its certificates: the first is served when the client names no server (or one that no
    /// certificate covers); the others are chosen by the server name (SNI) their own
    /// subject-alternative names cover.
    pub certificates: Vec<CertificateFiles>,
}

/// A PEM certificate chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain.
    pub cert: PathBuf,
    /// The key.
    pub key: PathBuf,
}

/// How Tether speaks TLS to a replica (`tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The server name sent (SNI) and checked against the replica's certificate: `tls.sni`,
    /// else the replica's IP.
    pub sni: String,
    /// PEM file of the CAs that may sign the replica's certificate; `None` = the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Check the replica's certificate (chain and name). Off only for a test bed.
    pub verify: bool,
    /// A client certificate for mutual TLS.
    pub client_cert: Option<CertificateFiles>,
}

/// A replica's own credential (vLLM or llama-server `--api-key`, a hosted endpoint): where to
/// read it and how to send it. The secret itself is never in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAuth {
    /// Where the secret is.
    pub source: SecretSource,
    /// The header that carries it: `None` = `Authorization: Bearer <secret>`; otherwise the
    /// secret is sent as this header's value (`x-api-key`, say).
    pub header: Option<String>,
}

/// Where a secret is read from when the proxy starts or reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file (its content, trailing whitespace trimmed).
    File(PathBuf),
}

/// An API tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Tenant id (appears in logs and metrics).
    pub id: String,
    /// SHA-256 of the tenant's API key. The key itself is never stored.
    pub api_key_sha256: [u8; 32],
    /// Its limits (`tenant_limits`, with its own `limits` over them).
    pub limits: TenantLimits,
}

/// What one tenant may send (`tenant_limits`, `tenants[].limits`). `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantLimits {
    /// Requests admitted.
    pub requests: Option<Rate>,
    /// Requests that start a session: a token no instance has a live binding for.
    pub new_sessions: Option<Rate>,
    /// Requests in flight at once (on this instance).
    pub max_concurrent: Option<std::num::NonZeroU32>,
}

/// A token-bucket rate: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate, > 0.
    pub per_second: f64,
    /// Bucket size, ≥ 1.
    pub burst: u32,
}

/// The `pricing` section, converted from the file's dollars per million tokens to
/// [`Price`]'s integer micro-dollars (no float drift when summing).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pricing {
    /// Price for models without their own entry.
    pub default: Price,
    /// Per-model prices.
    pub models: BTreeMap<String, Price>,
}

impl Pricing {
    /// The price of `model`: its own entry, else the default (also for a response that named
    /// no model).
    pub fn price(&self, model: Option<&str>) -> Price {
        model
            .and_then(|m| self.models.get(m))
            .copied()
            .unwrap_or(self.default)
    }
}

/// The `usage_log` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLog {
    /// JSONL file path.
    pub path: PathBuf,
    /// Records queued for the writer before new ones are dropped (and counted).
    pub queue: usize,
}

/// The `metering` section.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteringSettings {
    /// Meter responses at all (off: no usage parsing, records or token metrics).
    pub enabled: bool,
    /// Secret for the keyed session hash in usage records (`TETHER_SESSION_KEY` overrides).
    pub session_key: Option<String>,
    /// Add `stream_options.include_usage` to streaming chat requests that lack it (and hide
    /// the extra usage event from the client), so streamed usage is always known.
    pub inject_stream_usage: bool,
    /// When a replica's sticky turns count as having lost their prefix cache.
    pub cache_loss: tether_metering::CacheLossSettings,
}

/// The `upstream` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest gap between two reads from a replica (time to first token, inter-token gap).
    pub read_timeout: Option<Duration>,
    /// How long a pooled idle connection is kept.
    pub idle_timeout: Option<Duration>,
    /// Replica connections go through Tether's own connector, whose reads Tether can break
    /// off: requests waiting on a replica that leaves rotation move at once, and streams
    /// still running at the end of a shutdown's drain are cut and logged. Pingora 0.9 never
    /// reuses such a connection (it cannot check a virtual socket's peer), so every request
    /// opens one: off by default.
    pub watch_connections: bool,
}

/// The `server` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Proxy worker threads.
    pub threads: usize,
    /// Whether idle worker threads steal tasks from busy ones (Pingora's default). Off, each
    /// thread runs its own single-threaded runtime: cheaper per request, no rebalancing.
    pub work_stealing: bool,
    /// After SIGTERM (or the hand-over of an upgrade) the listeners close and requests in
    /// flight get up to this long to finish; the process exits as soon as none is left.
    /// Those still running then are cut, and logged as incomplete.
    pub drain_timeout: Duration,
    /// Hard limit on stopping the runtimes once the drain is over.
    pub graceful_shutdown_timeout: Duration,
    /// PID file (Pingora's, for upgrades).
    pub pid_file: Option<PathBuf>,
    /// Socket for zero-downtime upgrades.
    pub upgrade_sock: Option<PathBuf>,
}

/// Paths whose requests are resent to another replica when the first accepted them but failed
/// before answering: text generation has no side effects, so a second replica may redo it.
pub const DEFAULT_RETRY_UNANSWERED: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/embeddings",
];

/// The `health` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Active probes; `None` when `probe.enabled: false`.
    pub probe: Option<ProbeSettings>,
    /// Consecutive failed requests (connect error, timeout, 5xx) that eject a replica.
    pub eject_after: u32,
    /// First ejection; doubles while failures continue.
    pub eject_cooldown: Duration,
    /// Longest ejection.
    pub eject_max_cooldown: Duration,
    /// How long a 429/503 without `Retry-After` marks a replica overloaded.
    pub overload_default: Duration,
    /// Longest `Retry-After` honoured.
    pub overload_max: Duration,
}

/// The `health.probe` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// `GET` path a healthy replica answers `200`.
    pub path: String,
    /// Time between probe rounds.
    pub interval: Duration,
    /// Limit on one probe.
    pub timeout: Duration,
    /// Good probes in a row that bring a replica back.
    pub rise: u32,
    /// Bad probes in a row that take it out.
    pub fall: u32,
}

/// The `failover` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverSettings {
    /// Replicas tried per request, the first included.
    pub max_attempts: u32,
    /// No new attempt starts later than this after the request arrived.
    pub deadline: Duration,
    /// Paths safe to resend after a replica accepted the request and failed before answering.
    pub retry_unanswered: Vec<String>,
}

/// The `admin` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdminSettings {
    /// Bearer token for the admin API's changes (`TETHER_ADMIN_TOKEN` overrides); without
    /// one, only the read-only endpoints answer. Required when `admin_listen` is off loopback.
    pub token: Option<String>,
}

/// The `reload` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSettings {
    /// Reload when the file changes (SIGHUP and `POST /admin/reload` always work).
    pub watch: bool,
}
