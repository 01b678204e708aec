//! Routing state shared by every request: the current [`Snapshot`] (one topology generation,
//! swapped whole on reload) and the [`FleetState`] that outlives generations (override table,
//! replica tags, live per-replica state).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use sha2::{Digest, Sha256};
use tether_affinity::{
    Admission, BindingSink, Fingerprinter, Fleet, FleetPlan, FleetState, KeySecret, KeySource,
    RegionPlan, ReplicaPlan, ReplicaSpec, SelectorOptions, TenantScope, TokenRules,
};
use tether_health::{HealthPolicy, Transition};
use tether_metering::{Dialect, Price};
use tether_topology::{
    FailoverSettings, RequestBodySettings, SecretSource, TenantLimits, Topology, UpstreamAuth,
};

use crate::body_budget::BodyBudget;
use crate::limits::{TenantUsage, TenantUsages};
use crate::probe::{ProbeRound, ProbeSettings, ProbeSource, ProbeTarget};
use crate::upstream_io::{Cut, ReplicaConnector};
use crate::verified_keys::VerifiedKeys;

/// Environment variable that overrides `admin.token`.
pub const ADMIN_TOKEN_ENV: &str = "TETHER_ADMIN_TOKEN";

/// Why a topology could not be installed (it passed validation, but the process cannot use it).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The admin token from the environment is too short to be a secret.
    #[error("{ADMIN_TOKEN_ENV} must be at least 16 characters")]
    AdminTokenTooShort,
    /// `nearest` placement, but no store is running (the `sticky_store` section takes effect
    /// only at start).
    #[error(
        "affinity.placement is nearest but this instance runs without a sticky store (a \
         `sticky_store` section takes effect only at start): set placement: hash, or restart"
    )]
    NearestWithoutStore,
    /// A replica's credential could not be read.
    #[error("{key}.upstream_auth: {reason}")]
    UpstreamAuth {
        /// The replica's id.
        key: String,
        /// Why (never the secret).
        reason: String,
    },
    /// A replica's TLS files cannot be used.
    #[error(transparent)]
    UpstreamTls(#[from] crate::tls::TlsFileError),
    /// The admin API would answer other hosts without asking for a token.
    #[error(
        "admin_listen {0} is not a loopback address, and without a token (admin.token or \
         {ADMIN_TOKEN_ENV}) its endpoints (/metrics, /admin/replicas) would answer anyone who \
         reaches it: set a token (off loopback every admin endpoint but /health then requires \
         it), or listen on 127.0.0.1 or [::1]"
    )]
    OpenAdmin(std::net::SocketAddr),
    /// An agent session header is not a valid HTTP header name.
    #[error("affinity.agent_headers {name:?}: {source}")]
    AgentHeader {
        /// The configured name.
        name: String,
        /// Why it is invalid.
        source: http::header::InvalidHeaderName,
    },
    /// The routing-key secret could not be read, or is too short.
    #[error("affinity.key_secret: {0}")]
    KeySecret(String),
    /// The affinity header is not a valid HTTP header name.
    #[error("affinity.header {name:?}: {source}")]
    Header {
        /// The configured name.
        name: String,
        /// Why it is invalid.
        source: http::header::InvalidHeaderName,
    },
}

/// How Tether reaches one replica: what the fleet carries per replica for the proxy.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The prebuilt Pingora peer (address, timeouts, and the connector below).
    pub peer: HttpPeer,
    /// Makes the peer's connections ones Tether can break off (see [`crate::upstream_io`]);
    /// only with `upstream.watch_connections`.
    pub connector: Option<Arc<ReplicaConnector>>,
    /// The replica's usage dialect, when configured (else inferred from the request path).
    pub dialect: Option<Dialect>,
    /// The replica's own credential, sent on every request to it.
    pub credential: Option<Credential>,
    /// Its engine, whose capacity and load the prober reads.
    pub engine: tether_topology::EngineKind,
}

/// A header carrying a replica's secret. Its value is marked sensitive and never printed.
#[derive(Clone)]
pub struct Credential {
    /// The header.
    pub name: http::HeaderName,
    /// Its value (`Bearer <secret>` for `authorization`, else the secret).
    pub value: http::HeaderValue,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.name)
    }
}

/// Reads a secret from the environment or a file; the reason for a failure never holds it.
fn read_secret(source: &SecretSource) -> Result<String, String> {
    match source {
        SecretSource::Env(var) => std::env::var(var)
            .map_err(|_| format!("environment variable {var} is not set (or not UTF-8)")),
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display())),
    }
}

/// Reads the deployment's routing-key secret, once per process. Without one, keys are the
/// unkeyed ones every instance and every restart agrees on (a random secret per process would
/// split a tier and move every session at each restart), so the absence is only warned of.
fn key_secret(topology: &Topology) -> Result<Option<KeySecret>, InstallError> {
    let Some(source) = &topology.affinity.key_secret else {
        log::warn!(
            "no affinity.key_secret: routing keys can be computed by anyone who knows a tenant \
             id, so crafted tokens can pile into one probe run of the override table or one arc \
             of the ring; set it (env or file{}), see docs/security.md",
            if topology.sticky_store.is_some() {
                ", the same on every instance of the tier"
            } else {
                ""
            }
        );
        return Ok(None);
    };
    let secret = read_secret(source).map_err(InstallError::KeySecret)?;
    KeySecret::new(secret.trim().as_bytes())
        .map(Some)
        .map_err(|e| InstallError::KeySecret(e.to_string()))
}

/// Reads the secret of `auth` (environment or file) into the header that carries it.
fn credential(auth: &UpstreamAuth) -> Result<Credential, String> {
    let secret = read_secret(&auth.source)?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    let (name, value) = match &auth.header {
        None => (http::header::AUTHORIZATION, format!("Bearer {secret}")),
        Some(h) => (
            http::HeaderName::from_bytes(h.as_bytes()).map_err(|e| format!("header: {e}"))?,
            secret.to_owned(),
        ),
    };
    let mut value = http::HeaderValue::from_str(&value)
        .map_err(|_| "the secret holds characters a header cannot carry".to_owned())?;
    value.set_sensitive(true);
    Ok(Credential { name, value })
}

/// The tenant of every request when no tenants are configured.
const DEFAULT_TENANT: &str = "default";

/// A tenant as the hot path needs it.
#[derive(Debug, Clone)]
pub struct TenantEntry {
    /// Tenant id (for logs and metrics).
    pub id: Arc<str>,
    /// Hashing scope of its routing keys.
    pub scope: TenantScope,
    /// Its limits in this generation.
    pub limits: TenantLimits,
    /// What it is using, shared by every generation.
    pub usage: Arc<TenantUsage>,
}

/// Who may call and how a session is named: what `request_filter` checks.
#[derive(Debug)]
pub struct Access {
    /// SHA-256 of API key → tenant. Empty = no authentication, every request is `default`.
    tenants: HashMap<[u8; 32], TenantEntry>,
    /// The keys already seen to match one of `tenants`' digests.
    verified_keys: VerifiedKeys,
    default_tenant: TenantEntry,
    /// Token validation rules.
    pub token_rules: TokenRules,
    /// Lower-cased name of the token header.
    pub header: http::HeaderName,
    /// Where a session key is looked for, in order (`affinity.key_sources`).
    pub key_sources: Vec<KeySource>,
    /// The agents' own session-id headers, in order (`affinity.agent_headers`).
    pub agent_headers: Vec<http::HeaderName>,
    /// Hashes conversation heads (the `fingerprint` source).
    pub fingerprinter: Fingerprinter,
}

impl Access {
    /// Whether requests must carry a known API key.
    pub fn requires_api_key(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant owning `api_key`.
    pub fn tenant_for_key(&self, api_key: &[u8]) -> Option<&TenantEntry> {
        let digest = self
            .verified_keys
            .digest(api_key, |d| self.tenants.contains_key(d))?;
        self.tenants.get(&digest)
    }

    /// The tenant of every request when no API keys are configured.
    pub fn default_tenant(&self) -> &TenantEntry {
        &self.default_tenant
    }
}

#[cfg(test)]
impl Access {
    /// An access without API keys, with these sources and agent headers.
    pub(crate) fn for_tests(key_sources: &[KeySource], agent_headers: &[&str]) -> Access {
        Access {
            tenants: HashMap::new(),
            verified_keys: VerifiedKeys::new(0),
            default_tenant: TenantEntry {
                id: Arc::from("default"),
                scope: TenantScope::new("default"),
                limits: TenantLimits::default(),
                usage: Arc::default(),
            },
            token_rules: TokenRules::default(),
            header: http::HeaderName::from_static("x-session-affinity"),
            key_sources: key_sources.to_vec(),
            agent_headers: agent_headers
                .iter()
                .map(|h| http::HeaderName::from_bytes(h.as_bytes()).expect("a valid test header"))
                .collect(),
            fingerprinter: Fingerprinter::new([7; 16]),
        }
    }
}

/// Everything a request needs from one topology generation, prebuilt off the hot path.
#[derive(Debug)]
pub struct Snapshot {
    fleet: Arc<Fleet<Upstream>>,
    access: Access,
    probe: Option<ProbeSettings>,
    failover: FailoverSettings,
    admin_token_sha256: Option<[u8; 32]>,
    /// The admin listener is reachable from other hosts: reads need the token too.
    admin_reads_need_token: bool,
    /// Parsed once: each response gets a clone (a reference count) of it.
    outcome_header: Option<http::HeaderName>,
    pricing: tether_topology::Pricing,
    metering: bool,
    inject_stream_usage: bool,
    cache_loss: tether_metering::CacheLossSettings,
    request_bodies: RequestBodySettings,
}

impl Snapshot {
    /// The fleet: replicas, selector, live state.
    pub fn fleet(&self) -> &Arc<Fleet<Upstream>> {
        &self.fleet
    }

    /// API keys, tenants and the token header.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Active probe settings, when probes are on.
    pub fn probe(&self) -> Option<&ProbeSettings> {
        self.probe.as_ref()
    }

    /// Retry and failover limits.
    pub fn failover(&self) -> &FailoverSettings {
        &self.failover
    }

    /// SHA-256 of the admin API's bearer token; `None` = changes through the API are off.
    pub fn admin_token_sha256(&self) -> Option<&[u8; 32]> {
        self.admin_token_sha256.as_ref()
    }

    /// Whether the admin API's read endpoints (all but `/health`) need the token too.
    pub fn admin_reads_need_token(&self) -> bool {
        self.admin_reads_need_token
    }

    /// The response header that tells a client what happened to its session, if any.
    pub fn outcome_header(&self) -> Option<&http::HeaderName> {
        self.outcome_header.as_ref()
    }

    /// Whether responses are metered at all.
    pub fn metering(&self) -> bool {
        self.metering
    }

    /// When a replica's sticky turns count as having lost their prefix cache.
    pub fn cache_loss(&self) -> &tether_metering::CacheLossSettings {
        &self.cache_loss
    }

    /// Whether to add `stream_options.include_usage` to streaming chat requests.
    pub fn inject_stream_usage(&self) -> bool {
        self.inject_stream_usage
    }

    /// Bounds on the request bodies Tether holds (`request_bodies`).
    pub fn request_bodies(&self) -> &RequestBodySettings {
        &self.request_bodies
    }

    /// The price of `model` (the default price when unknown or unnamed).
    pub fn price(&self, model: Option<&str>) -> Price {
        self.pricing.price(model)
    }

    /// Whether a request may reach a second replica after the first accepted it and failed
    /// before answering: idempotent methods always; others when their path is listed in
    /// `failover.retry_unanswered` (text generation has no side effects).
    pub fn resend_safe(&self, method: &http::Method, path: &str) -> bool {
        method.is_idempotent() || self.failover.retry_unanswered.iter().any(|p| p == path)
    }

    /// The longest a client is told to wait before retrying when nothing is available.
    pub fn retry_after_hint(&self) -> Duration {
        self.probe
            .as_ref()
            .map_or(self.fleet.health_policy().eject_cooldown, |p| p.interval)
            .max(Duration::from_secs(1))
    }
}

/// The proxy's routing state.
#[derive(Debug)]
pub struct Router {
    snapshot: ArcSwap<Snapshot>,
    state: Arc<FleetState>,
    /// Breaks off every upstream connection of every generation.
    cut: Arc<Cut>,
    /// The routing-key secret, read once at start (reloads keep it: see the topology diff).
    key_secret: Option<KeySecret>,
    /// Each tenant's buckets and requests in flight, across generations.
    usages: TenantUsages,
    /// The bytes of request bodies held, across generations.
    body_budget: Arc<BodyBudget>,
}

impl Router {
    /// Builds the state for `topology`; bindings also go to `sink` (the shared store of a
    /// tier) when there is one.
    pub fn new(
        topology: &Topology,
        sink: Option<Arc<dyn BindingSink>>,
    ) -> Result<Router, InstallError> {
        let state = FleetState::shared(
            topology.affinity.override_ttl,
            topology.affinity.override_capacity,
            sink,
        );
        let cut = Cut::new();
        let key_secret = key_secret(topology)?;
        let usages = TenantUsages::default();
        let snapshot = build_snapshot(topology, &state, &cut, key_secret.as_ref(), &usages)?;
        Ok(Router {
            snapshot: ArcSwap::from_pointee(snapshot),
            state,
            cut,
            key_secret,
            usages,
            body_budget: Arc::default(),
        })
    }

    /// The bytes of request bodies held over all requests.
    pub fn body_budget(&self) -> &Arc<BodyBudget> {
        &self.body_budget
    }

    /// The current snapshot (one atomic load; hold it for the whole request).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The override table.
    pub fn overrides(&self) -> &tether_affinity::OverrideTable {
        self.state.overrides()
    }

    /// What outlives generations: override table, tags, live state.
    pub fn state(&self) -> &Arc<FleetState> {
        &self.state
    }

    /// The signal that breaks off every upstream read (the end of a shutdown's drain).
    pub fn cut(&self) -> &Arc<Cut> {
        &self.cut
    }

    /// Replaces the snapshot (hot reload) in one atomic swap. Override entries carry over, and
    /// so does the live state of every replica whose address did not change. Requests in
    /// flight finish on the snapshot they started with.
    pub fn install(&self, topology: &Topology) -> Result<(), InstallError> {
        let snapshot = build_snapshot(
            topology,
            &self.state,
            &self.cut,
            self.key_secret.as_ref(),
            &self.usages,
        )?;
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }
}

/// The router as the probe loop's source of targets (a fresh list every round).
#[derive(Debug)]
pub struct RouterProbes(pub Arc<Router>);

impl ProbeSource for RouterProbes {
    fn round(&self) -> ProbeRound {
        let snapshot = self.0.snapshot();
        let fleet = snapshot.fleet();
        let targets = fleet
            .replicas()
            .iter()
            // A disabled replica takes no traffic whatever its health: no need to probe it.
            .filter(|r| r.admission() != Admission::Disabled)
            .map(|r| ProbeTarget {
                id: Arc::clone(r.id()),
                address: r.address(),
                peer: r.upstream().peer.clone(),
                status: Arc::clone(r.status()),
                engine: r.upstream().engine,
                credential: r
                    .upstream()
                    .credential
                    .as_ref()
                    .map(|c| (c.name.clone(), c.value.clone())),
            })
            .collect();
        ProbeRound {
            settings: snapshot.probe.clone(),
            policy: fleet.health_policy().clone(),
            targets,
        }
    }

    fn on_transition(&self, target: &ProbeTarget, transition: Transition) {
        tether_affinity::log_transition(&target.id, transition);
    }
}

fn build_snapshot(
    topology: &Topology,
    state: &Arc<FleetState>,
    cut: &Arc<Cut>,
    key_secret: Option<&KeySecret>,
    usages: &TenantUsages,
) -> Result<Snapshot, InstallError> {
    let upstream = topology.upstream;
    let mut regions = Vec::with_capacity(topology.regions.len());
    for region in &topology.regions {
        let mut replicas = Vec::with_capacity(region.replicas.len());
        for r in &region.replicas {
            let mut peer = HttpPeer::new(r.address, false, String::new());
            if let Some(tls) = &r.tls {
                crate::tls::configure_peer(&mut peer, tls, &format!("replica {}", r.id))?;
            }
            peer.options.connection_timeout = Some(upstream.connect_timeout);
            peer.options.read_timeout = upstream.read_timeout;
            peer.options.idle_timeout = upstream.idle_timeout;
            // Only when asked for: Pingora does not pool connections made by a custom
            // connector (see `UpstreamSettings::watch_connections`).
            let connector = upstream.watch_connections.then(|| {
                let connector = ReplicaConnector::new(upstream.connect_timeout, Arc::clone(cut));
                peer.options.custom_l4 = Some(connector.clone());
                connector
            });
            let credential = r
                .upstream_auth
                .as_ref()
                .map(credential)
                .transpose()
                .map_err(|reason| InstallError::UpstreamAuth {
                    key: format!("replica {}", r.id),
                    reason,
                })?;
            replicas.push(ReplicaPlan {
                spec: ReplicaSpec {
                    id: r.id.clone(),
                    weight: r.weight,
                    admission: r.state,
                    max_inflight: r.max_inflight,
                },
                address: r.address,
                upstream: Upstream {
                    peer,
                    connector,
                    dialect: r.dialect,
                    credential,
                    engine: r.engine,
                },
            });
        }
        regions.push(RegionPlan {
            name: region.name.clone(),
            kv_scope: region.kv_scope,
            replicas,
        });
    }
    if topology.affinity.placement == tether_affinity::Placement::Nearest && !state.shares() {
        return Err(InstallError::NearestWithoutStore);
    }
    let health = &topology.health;
    let fleet = state.build(FleetPlan {
        regions,
        options: SelectorOptions {
            balance_factor: topology.affinity.balance_factor,
            points_per_weight: topology.affinity.ring_points_per_weight,
            local_region: topology.local_region,
            shed_factor: topology.affinity.shed_factor,
            placement: topology.affinity.placement,
        },
        tenant_locality: topology.affinity.tenant_locality,
        health: HealthPolicy {
            probes: health.probe.is_some(),
            rise: health.probe.as_ref().map_or(1, |p| p.rise),
            fall: health.probe.as_ref().map_or(1, |p| p.fall),
            eject_after: health.eject_after,
            eject_cooldown: health.eject_cooldown,
            eject_max_cooldown: health.eject_max_cooldown,
            overload_default: health.overload_default,
            overload_max: health.overload_max,
            // Three probe rounds: one missed round does not drop the engine's signals.
            engine_max_age: health
                .probe
                .as_ref()
                .map_or(Duration::ZERO, |p| p.interval.saturating_mul(3)),
        },
        override_ttl: topology.affinity.override_ttl,
        override_capacity: topology.affinity.override_capacity,
    });
    for replica in fleet.replicas() {
        if let Some(connector) = &replica.upstream().connector {
            connector.bind(replica.status());
        }
    }

    let header =
        http::HeaderName::from_bytes(topology.affinity.header.as_bytes()).map_err(|source| {
            InstallError::Header {
                name: topology.affinity.header.clone(),
                source,
            }
        })?;
    let agent_headers = topology
        .affinity
        .agent_headers
        .iter()
        .map(|name| {
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|source| {
                InstallError::AgentHeader {
                    name: name.clone(),
                    source,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let admin_token = match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(token) if token.len() < 16 => return Err(InstallError::AdminTokenTooShort),
        Ok(token) => Some(token),
        Err(_) => topology.admin.token.clone(),
    };
    let admin_reads_need_token = topology
        .admin_listen
        .is_some_and(tether_topology::admin_needs_token);
    if let (Some(addr), true, None) = (topology.admin_listen, admin_reads_need_token, &admin_token)
    {
        return Err(InstallError::OpenAdmin(addr));
    }

    // Past every check, so a refused reload changes neither the tenants' usage nor their
    // shares.
    // With tenants configured, `default` is never used (every request needs a key).
    let mut usage = usages
        .renew(
            topology
                .tenants
                .iter()
                .map(|t| t.id.as_str())
                .chain(topology.tenants.is_empty().then_some(DEFAULT_TENANT)),
        )
        .into_iter();
    let tenants: HashMap<[u8; 32], TenantEntry> = topology
        .tenants
        .iter()
        .zip(usage.by_ref())
        .map(|(t, usage)| {
            (
                t.api_key_sha256,
                TenantEntry {
                    id: Arc::from(t.id.as_str()),
                    scope: TenantScope::with_secret(&t.id, key_secret),
                    limits: t.limits,
                    usage,
                },
            )
        })
        .collect();
    let default_usage = usage.next().unwrap_or_default();
    // Only configured tenants hold a share: without them every session is `default`'s.
    state.overrides().set_tenant_shares(
        topology.tenants.iter().map(|t| TenantScope::new(&t.id)),
        topology.affinity.override_share,
    );

    Ok(Snapshot {
        fleet: Arc::new(fleet),
        access: Access {
            verified_keys: VerifiedKeys::new(tenants.len()),
            tenants,
            default_tenant: TenantEntry {
                id: Arc::from(DEFAULT_TENANT),
                scope: TenantScope::with_secret(DEFAULT_TENANT, key_secret),
                limits: topology.tenant_limits,
                usage: default_usage,
            },
            token_rules: TokenRules {
                max_len: topology.affinity.max_token_len,
            },
            header,
            key_sources: topology.affinity.key_sources.clone(),
            agent_headers,
            fingerprinter: fingerprinter(topology),
        },
        probe: health.probe.as_ref().map(|p| ProbeSettings {
            path: p.path.clone(),
            interval: p.interval,
            timeout: p.timeout,
        }),
        failover: topology.failover.clone(),
        admin_token_sha256: admin_token.map(|t| Sha256::digest(t.as_bytes()).into()),
        admin_reads_need_token,
        outcome_header: topology
            .affinity
            .outcome_header
            .as_ref()
            // Validated with the topology; a name that does not parse sends no header.
            .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
        pricing: topology.pricing.clone(),
        metering: topology.metering.enabled,
        inject_stream_usage: topology.metering.enabled && topology.metering.inject_stream_usage,
        cache_loss: topology.metering.cache_loss,
        request_bodies: topology.request_bodies,
    })
}

/// The fingerprint's key: derived from the session key (`metering.session_key` or
/// its environment variable) under a label of its own, so that fingerprints and the usage
/// log's session hashes never share a key. Every instance of a tier derives the same one.
/// Without a session key the label alone keys it: fingerprints stay tenant-scoped and stable
/// across restarts, but anyone who reads this source can compute them.
fn fingerprinter(topology: &Topology) -> Fingerprinter {
    let secret = std::env::var(crate::meter::SESSION_KEY_ENV)
        .ok()
        .or_else(|| topology.metering.session_key.clone())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(b"tether conversation fingerprint\0");
    hasher.update(secret.as_bytes());
    let digest = hasher.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    Fingerprinter::new(key)
}
