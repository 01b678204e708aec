//! Routing state shared by every request: the current [`Snapshot`] (swapped whole on reload),
//! the override table and the live per-replica counters (both outlive snapshots).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use sha2::{Digest, Sha256};
use tether_affinity::{
    Admission, LoadView, OverrideTable, RegionSpec, ReplicaIdx, ReplicaSpec, ReplicaTag, Selector,
    SelectorOptions, TagRegistry, TenantScope, TokenRules,
};
use tether_metering::{Dialect, Price};
use tether_topology::{ReplicaState, Topology, UsageDialect};

/// Live counters of one replica. Keyed by tag, so they survive topology reloads.
#[derive(Debug, Default)]
pub struct ReplicaLive {
    inflight: AtomicU32,
}

impl ReplicaLive {
    /// Requests in flight now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// Holds one in-flight slot of a replica; releases it when dropped, so no error path can leak
/// a count (the proxy also drops it explicitly in `logging`).
#[derive(Debug)]
pub struct InflightGuard(Arc<ReplicaLive>);

impl InflightGuard {
    fn acquire(live: &Arc<ReplicaLive>) -> Self {
        live.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(Arc::clone(live))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

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
    /// Live counters, indexed like the selector's replicas.
    pub live: Vec<Arc<ReplicaLive>>,
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
        let p = model.map_or(&self.pricing.default, |m| self.pricing.for_model(m));
        Price {
            input: p.input_micro_usd_per_mtok,
            cached_input: p.cached_input_micro_usd_per_mtok,
            output: p.output_micro_usd_per_mtok,
        }
    }

    /// Takes an in-flight slot on replica `idx`.
    pub fn acquire(&self, idx: ReplicaIdx) -> Option<InflightGuard> {
        self.live.get(idx as usize).map(InflightGuard::acquire)
    }
}

impl LoadView for Snapshot {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.live.get(replica as usize).map_or(0, |l| l.inflight())
    }
}

/// The proxy's routing state.
#[derive(Debug)]
pub struct Router {
    snapshot: ArcSwap<Snapshot>,
    overrides: OverrideTable,
    tags: TagRegistry,
    live: Mutex<HashMap<ReplicaTag, Arc<ReplicaLive>>>,
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

    /// Replaces the snapshot (hot reload). Override entries and in-flight counts carry over.
    #[allow(dead_code)] // used by hot reload (next issue) and by tests
    pub fn install(&self, topology: Topology) -> anyhow::Result<()> {
        let snapshot = build_snapshot(&topology, &self.tags, &self.live)?;
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }
}

fn build_snapshot(
    topology: &Topology,
    tags: &TagRegistry,
    live: &Mutex<HashMap<ReplicaTag, Arc<ReplicaLive>>>,
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
                    admission: match r.state {
                        ReplicaState::Active => Admission::Active,
                        ReplicaState::Draining => Admission::Draining,
                        ReplicaState::Disabled => Admission::Disabled,
                    },
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

    let live = {
        // A poisoned lock means a panic mid-insert elsewhere; the map itself is still sound.
        let mut registry = live.lock().unwrap_or_else(|e| e.into_inner());
        selector
            .replicas()
            .iter()
            .map(|r| Arc::clone(registry.entry(r.tag).or_default()))
            .collect()
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

    let dialects = topology
        .replicas()
        .map(|(_, r)| {
            r.dialect.map(|d| match d {
                UsageDialect::Openai => Dialect::Openai,
                UsageDialect::Anthropic => Dialect::Anthropic,
                UsageDialect::Llamacpp => Dialect::Llamacpp,
            })
        })
        .collect();

    Ok(Snapshot {
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
        tenants,
        default_tenant: TenantEntry {
            id: Arc::from("default"),
            scope: TenantScope::new("default"),
        },
    })
}
