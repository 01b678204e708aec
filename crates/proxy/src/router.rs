//! Routing state shared by every request: the current [`Snapshot`] (swapped whole on reload),
//! the override table and the live per-replica status (both outlive snapshots).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use sha2::{Digest, Sha256};
use tether_affinity::{
    Admission, LoadView, OverrideTable, RegionSpec, ReplicaIdx, ReplicaLoad, ReplicaSpec,
    ReplicaTag, Selector, SelectorOptions, TagRegistry, TenantScope, TenantWarmth, TokenRules,
    Warmth,
};
use tether_health::{
    HealthPolicy, InflightGuard, ProbeRound, ProbeSettings, ProbeSource, ProbeTarget,
    ReplicaStatus, Transition,
};
use tether_metering::{Dialect, Price};
use tether_topology::{FailoverSettings, Topology};

/// Environment variable that overrides `admin.token`.
pub const ADMIN_TOKEN_ENV: &str = "TETHER_ADMIN_TOKEN";

/// A tenant as the hot path needs it.
#[derive(Debug, Clone)]
pub struct TenantEntry {
    /// Tenant id (for logs and metrics).
    pub id: Arc<str>,
    /// Hashing scope of its routing keys.
    pub scope: TenantScope,
}

/// Everything a request needs from the topology, prebuilt off the hot path.
#[derive(Debug)]
pub struct Snapshot {
    /// The routing snapshot.
    pub selector: Selector,
    /// One prebuilt peer per replica, indexed like the selector's replicas.
    pub peers: Vec<HttpPeer>,
    /// Live status, indexed like the selector's replicas.
    pub live: Vec<Arc<ReplicaStatus>>,
    /// Tenants each replica served recently, indexed like the selector's replicas.
    pub warmth: Vec<Arc<TenantWarmth>>,
    /// `affinity.tenant_locality` in milliseconds; `None` = off.
    pub tenant_locality_ms: Option<u64>,
    /// Keyed requests sent to each replica recently, for sticky shedding, indexed like the
    /// selector's replicas.
    pub load: Vec<Arc<ReplicaLoad>>,
    /// Whether `affinity.shed_factor` is set (the load records are kept only then).
    pub shedding: bool,
    /// Replica addresses, indexed like the selector's replicas (for probes).
    pub addresses: Vec<SocketAddr>,
    /// How failures, probes and overload change health.
    pub health_policy: HealthPolicy,
    /// Active probes, when enabled.
    pub probe: Option<ProbeSettings>,
    /// Retry and failover limits.
    pub failover: FailoverSettings,
    /// SHA-256 of the admin API's bearer token; `None` = changes through the API are off.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// SHA-256 of API key → tenant. Empty = no authentication, every request is `default`.
    pub tenants: HashMap<[u8; 32], TenantEntry>,
    /// The tenant used when `tenants` is empty.
    pub default_tenant: TenantEntry,
    /// Token validation rules.
    pub token_rules: TokenRules,
    /// Lower-cased name of the token header.
    pub header: http::HeaderName,
    /// Token prices.
    pub pricing: tether_topology::Pricing,
    /// Per replica (indexed like the selector's), a configured usage dialect.
    pub dialects: Vec<Option<Dialect>>,
    /// Whether responses are metered at all.
    pub metering: bool,
    /// Whether to add `stream_options.include_usage` to streaming chat requests.
    pub inject_stream_usage: bool,
}

impl Snapshot {
    /// Whether requests must carry a known API key.
    pub fn requires_api_key(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant owning `api_key`.
    pub fn tenant_for_key(&self, api_key: &[u8]) -> Option<&TenantEntry> {
        let digest: [u8; 32] = Sha256::digest(api_key).into();
        self.tenants.get(&digest)
    }

    /// The price of `model` (the default price when unknown or unnamed).
    pub fn price(&self, model: Option<&str>) -> Price {
        self.pricing.price(model)
    }

    /// Takes an in-flight slot on replica `idx`.
    pub fn acquire(&self, idx: ReplicaIdx) -> Option<InflightGuard> {
        self.live.get(idx as usize).map(ReplicaStatus::acquire)
    }

    /// Notes that replica `idx` serves `tenant` at `now`, for a session `placed` there (not
    /// sticky) or not: what tenant locality reads.
    pub fn serving(&self, idx: ReplicaIdx, tenant: TenantScope, placed: bool, now: u64) {
        let (Some(window), Some(w)) = (self.tenant_locality_ms, self.warmth.get(idx as usize))
        else {
            return;
        };
        w.record(tenant, now);
        if placed {
            w.record_placement(now, window);
        }
    }

    /// Notes a keyed request sent to replica `idx` at `now` (an attempt: a retry counts
    /// again), when sticky shedding reads it. Tokenless requests are not counted: they all go
    /// to the edge's local region, so counting them would make that region look hot to a
    /// fleet-wide limit and shed its sessions to other regions without end.
    pub fn sent(&self, idx: ReplicaIdx, now: u64) {
        if let (true, Some(load)) = (self.shedding, self.load.get(idx as usize)) {
            load.record_sent(now);
        }
    }

    /// The live status of replica `idx`.
    pub fn status(&self, idx: ReplicaIdx) -> Option<&Arc<ReplicaStatus>> {
        self.live.get(idx as usize)
    }

    /// What the selector sees at time `now` (milliseconds on [`tether_health::now_ms`]).
    pub fn view(&self, now: u64) -> RouteView<'_> {
        RouteView {
            snapshot: self,
            now,
        }
    }
}

/// The selector's view of the fleet at one instant: in-flight counts and health, read from
/// atomics without a lock.
#[derive(Debug, Clone, Copy)]
pub struct RouteView<'a> {
    snapshot: &'a Snapshot,
    now: u64,
}

impl LoadView for RouteView<'_> {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.snapshot
            .live
            .get(replica as usize)
            .map_or(0, |l| l.inflight())
    }

    fn is_healthy(&self, replica: ReplicaIdx) -> bool {
        let Some(status) = self.snapshot.live.get(replica as usize) else {
            return false;
        };
        if let Some(t) = status.expire_ejection(self.now, &self.snapshot.health_policy) {
            log_transition(self.snapshot.replica_id(replica), t);
        }
        status.usable(self.now)
    }

    fn tenant_warmth(&self, replica: ReplicaIdx, tenant: TenantScope) -> Option<Warmth> {
        let window = self.snapshot.tenant_locality_ms?;
        let record = self.snapshot.warmth.get(replica as usize)?;
        Some(record.warmth(tenant, self.now, window))
    }

    fn recent_sent(&self, replica: ReplicaIdx) -> Option<f64> {
        if !self.snapshot.shedding {
            return None;
        }
        let load = self.snapshot.load.get(replica as usize)?;
        Some(load.recent_sent(self.now))
    }

    fn claim_shed(&self, replica: ReplicaIdx, over: bool) -> bool {
        self.snapshot
            .load
            .get(replica as usize)
            .is_some_and(|load| load.claim_shed(over, self.now))
    }
}

impl Snapshot {
    /// The id of replica `idx` (`"?"` if out of range).
    pub fn replica_id(&self, idx: ReplicaIdx) -> &str {
        self.selector.replica(idx).map_or("?", |r| &r.id)
    }
}

/// Logs a health change at the level it deserves.
pub fn log_transition(replica: &str, t: Transition) {
    match t {
        Transition::ProbeDown => log::warn!("replica {replica} failed its health probes: out"),
        Transition::ProbeUp => log::info!("replica {replica} passes its health probes again: in"),
        Transition::Ejected(d) => log::warn!(
            "replica {replica} ejected for {} after consecutive failed requests",
            humantime::format_duration(d)
        ),
        Transition::EjectionExtended(d) => log::warn!(
            "replica {replica} still failing its probe: ejected for another {}",
            humantime::format_duration(d)
        ),
        Transition::Returned => log::info!("replica {replica} returns from ejection"),
    }
}

/// The proxy's routing state.
#[derive(Debug)]
pub struct Router {
    snapshot: ArcSwap<Snapshot>,
    overrides: OverrideTable,
    tags: TagRegistry,
    live: Mutex<HashMap<ReplicaTag, LiveReplica>>,
}

/// What the proxy keeps about a replica across reloads (while its address stays the same).
#[derive(Debug, Default, Clone)]
struct LiveReplica {
    status: Arc<ReplicaStatus>,
    warmth: Arc<TenantWarmth>,
    load: Arc<ReplicaLoad>,
}

impl Router {
    /// Builds the state for `topology`.
    pub fn new(topology: Topology) -> anyhow::Result<Router> {
        let tags = TagRegistry::new();
        let live = Mutex::new(HashMap::new());
        let overrides = OverrideTable::new(
            topology.affinity.override_ttl,
            topology.affinity.override_capacity,
        );
        let snapshot = build_snapshot(&topology, &tags, &live)?;
        Ok(Router {
            snapshot: ArcSwap::from_pointee(snapshot),
            overrides,
            tags,
            live,
        })
    }

    /// The current snapshot (one atomic load; hold it for the whole request).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The override table.
    pub fn overrides(&self) -> &OverrideTable {
        &self.overrides
    }

    /// Replaces the snapshot (hot reload) in one atomic swap. Override entries carry over, and
    /// so does the live status (in-flight counts, health, admin drain, tenants served) of every
    /// replica whose address did not change; a replica at a new address starts afresh. Requests in flight
    /// finish on the snapshot they started with.
    pub fn install(&self, topology: &Topology) -> anyhow::Result<()> {
        let current = self.snapshot();
        {
            let mut registry = self.live.lock().unwrap_or_else(|e| e.into_inner());
            for (_, replica) in topology.replicas() {
                let moved = current
                    .selector
                    .replicas()
                    .iter()
                    .zip(&current.addresses)
                    .any(|(r, addr)| *r.id == *replica.id && *addr != replica.address);
                if moved {
                    registry.remove(&self.tags.tag(&replica.id));
                }
            }
        }
        let snapshot = build_snapshot(topology, &self.tags, &self.live)?;
        self.overrides.set_limits(
            topology.affinity.override_ttl,
            topology.affinity.override_capacity,
        );
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
        let targets = snapshot
            .selector
            .replicas()
            .iter()
            .zip(&snapshot.live)
            .zip(&snapshot.addresses)
            // A disabled replica takes no traffic whatever its health: no need to probe it.
            .filter(|((r, _), _)| r.admission != Admission::Disabled)
            .map(|((r, status), address)| ProbeTarget {
                id: Arc::clone(&r.id),
                address: *address,
                status: Arc::clone(status),
            })
            .collect();
        ProbeRound {
            settings: snapshot.probe.clone(),
            policy: snapshot.health_policy.clone(),
            targets,
        }
    }

    fn on_transition(&self, target: &ProbeTarget, transition: Transition) {
        log_transition(&target.id, transition);
    }
}

/// The longest a client is told to wait before retrying when nothing is available.
pub fn retry_after_hint(snapshot: &Snapshot) -> Duration {
    snapshot
        .probe
        .as_ref()
        .map_or(snapshot.health_policy.eject_cooldown, |p| p.interval)
        .max(Duration::from_secs(1))
}

fn build_snapshot(
    topology: &Topology,
    tags: &TagRegistry,
    live: &Mutex<HashMap<ReplicaTag, LiveReplica>>,
) -> anyhow::Result<Snapshot> {
    let regions: Vec<RegionSpec> = topology
        .regions
        .iter()
        .map(|region| RegionSpec {
            name: region.name.clone(),
            replicas: region
                .replicas
                .iter()
                .map(|r| ReplicaSpec {
                    id: r.id.clone(),
                    weight: r.weight,
                    admission: r.state,
                    max_inflight: r.max_inflight,
                })
                .collect(),
        })
        .collect();
    let selector = Selector::new(
        &regions,
        SelectorOptions {
            balance_factor: topology.affinity.balance_factor,
            points_per_weight: topology.affinity.ring_points_per_weight,
            local_region: topology.local_region,
            shed_factor: topology.affinity.shed_factor,
        },
        tags,
    );

    let upstream = topology.upstream;
    let peers = topology
        .replicas()
        .map(|(_, replica)| {
            let mut peer = HttpPeer::new(replica.address, false, String::new());
            peer.options.connection_timeout = Some(upstream.connect_timeout);
            peer.options.read_timeout = upstream.read_timeout;
            peer.options.idle_timeout = upstream.idle_timeout;
            peer
        })
        .collect();

    let (live, warmth, load) = {
        // A poisoned lock means a panic mid-insert elsewhere; the map itself is still sound.
        let mut registry = live.lock().unwrap_or_else(|e| e.into_inner());
        let entries: Vec<LiveReplica> = selector
            .replicas()
            .iter()
            .map(|r| registry.entry(r.tag).or_default().clone())
            .collect();
        (
            entries.iter().map(|e| Arc::clone(&e.status)).collect(),
            entries.iter().map(|e| Arc::clone(&e.warmth)).collect(),
            entries.into_iter().map(|e| e.load).collect(),
        )
    };

    let tenants = topology
        .tenants
        .iter()
        .map(|t| {
            (
                t.api_key_sha256,
                TenantEntry {
                    id: Arc::from(t.id.as_str()),
                    scope: TenantScope::new(&t.id),
                },
            )
        })
        .collect();
    let header = http::HeaderName::from_bytes(topology.affinity.header.as_bytes())
        .map_err(|e| anyhow::anyhow!("affinity.header {:?}: {e}", topology.affinity.header))?;

    let dialects = topology.replicas().map(|(_, r)| r.dialect).collect();

    let health = &topology.health;
    let health_policy = HealthPolicy {
        probes: health.probe.is_some(),
        rise: health.probe.as_ref().map_or(1, |p| p.rise),
        fall: health.probe.as_ref().map_or(1, |p| p.fall),
        eject_after: health.eject_after,
        eject_cooldown: health.eject_cooldown,
        eject_max_cooldown: health.eject_max_cooldown,
        overload_default: health.overload_default,
        overload_max: health.overload_max,
    };
    let probe = health.probe.as_ref().map(|p| ProbeSettings {
        path: p.path.clone(),
        interval: p.interval,
        timeout: p.timeout,
    });

    let admin_token = match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(token) if token.len() < 16 => {
            anyhow::bail!("{ADMIN_TOKEN_ENV} must be at least 16 characters")
        }
        Ok(token) => Some(token),
        Err(_) => topology.admin.token.clone(),
    };

    Ok(Snapshot {
        admin_token_sha256: admin_token.map(|t| Sha256::digest(t.as_bytes()).into()),
        addresses: topology.replicas().map(|(_, r)| r.address).collect(),
        health_policy,
        probe,
        failover: topology.failover.clone(),
        metering: topology.metering.enabled,
        inject_stream_usage: topology.metering.enabled && topology.metering.inject_stream_usage,
        pricing: topology.pricing.clone(),
        dialects,
        token_rules: TokenRules {
            max_len: topology.affinity.max_token_len,
        },
        header,
        selector,
        peers,
        live,
        warmth,
        load,
        shedding: topology.affinity.shed_factor.is_some(),
        tenant_locality_ms: topology
            .affinity
            .tenant_locality
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        tenants,
        default_tenant: TenantEntry {
            id: Arc::from("default"),
            scope: TenantScope::new("default"),
        },
    })
}
