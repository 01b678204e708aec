//! A simulated inference fleet that behaves like vLLM/SGLang where Tether cares.
//!
//! Tether is measured in cache hits and exercised against failures; neither needs GPUs. Each
//! simulated replica serves an OpenAI-compatible API and models what makes affinity matter:
//!
//! - **Tokens** ([`template`]): a deterministic tokenizer stand-in (4 bytes a token) over a
//!   ChatML rendering, so prompt sizes are stable and a turn plus its reply is a prefix of the
//!   next turn.
//! - **Prefix cache** ([`PrefixCache`]): vLLM-style automatic prefix caching — 16-token blocks
//!   whose hashes chain, cached tokens = the longest run of leading blocks held, block-level
//!   LRU within a token capacity. `usage` reports the cached count.
//! - **Latency** ([`SimConfig`]): time to first token = queueing for one of `max_num_seqs`
//!   slots + uncached tokens / prefill rate; then a fixed time per generated token. A
//!   `time_scale` shrinks everything for tests.
//! - **Shared KV tier** ([`shared`]): optionally, a region-wide store of KV blocks in the
//!   manner of LMCache or Mooncake. Replicas write their blocks through to it and fetch the
//!   continuation of their local hit from it, at a fraction of the cost of computing it.
//! - **Faults** ([`Fault`]): 503, refuse connections, hang, slow down, flush the cache — over
//!   the fleet's admin API.
//!
//! Endpoints per replica: `POST /v1/chat/completions` (JSON or SSE; usage in the OpenAI or
//! llama.cpp shape, see [`Dialect`]), `POST /v1/messages` (Anthropic Messages shape),
//! `GET /v1/models`, `GET /health`. Every response names the replica in `x-replica-id`.
//! Many replicas run in one process, one listener each ([`Fleet::start`]). The simulator is a
//! black box to Tether: it never depends on the proxy crate.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tether_replica_sim::{Fleet, ReplicaConfig, SimConfig};
//!
//! let fleet = Fleet::start(
//!     vec![ReplicaConfig::new("eu-1", "127.0.0.1:0".parse()?)],
//!     SimConfig::default(),
//!     Some("127.0.0.1:0".parse()?),
//! )
//! .await?;
//! println!("eu-1 listens on {}", fleet.replicas()[0].1);
//! # Ok(()) }
//! ```

mod admin;
mod anthropic;
pub mod cache;
mod chat;
pub mod engine;
mod engine_api;
mod server;
pub mod shared;
pub mod slots;
pub mod template;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use cache::PrefixCache;
pub use engine::{
    Dialect, EngineMode, EngineSnapshot, Fault, Replica, SimConfig, StatsSnapshot,
    DEFAULT_CACHE_TOKENS,
};
pub use shared::{SharedKvConfig, SharedTier};

/// Largest request body accepted (a 1M-token prompt is about 4 MiB).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// One replica to start.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Replica id (sent back in `x-replica-id`).
    pub id: String,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Its region: replicas of a region listed in [`SharedKvConfig::regions`] share a tier.
    pub region: Option<String>,
}

impl ReplicaConfig {
    /// A replica on `listen`, in no region.
    pub fn new(id: impl Into<String>, listen: SocketAddr) -> Self {
        ReplicaConfig {
            id: id.into(),
            listen,
            region: None,
        }
    }

    /// The same replica in `region`.
    pub fn in_region(self, region: impl Into<String>) -> Self {
        ReplicaConfig {
            region: Some(region.into()),
            ..self
        }
    }
}

/// Why a fleet could not start.
#[derive(Debug, Error)]
pub enum SimError {
    /// A listener could not be bound.
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        /// `replica <id>` or `admin`.
        what: String,
        /// Requested address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Regions given a shared KV tier that no replica belongs to (a misspelt name, say).
    #[error("shared KV tier for regions without replicas: {}", regions.join(", "))]
    SharedKvRegion {
        /// Every such region.
        regions: Vec<String>,
    },
}

async fn bind(what: String, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), SimError> {
    let listener = TcpListener::bind(addr).await;
    let bound = listener.and_then(|l| l.local_addr().map(|a| (l, a)));
    bound.map_err(|source| SimError::Bind { what, addr, source })
}

/// A running fleet: every listener is bound when [`Fleet::start`] returns.
#[derive(Debug)]
pub struct Fleet {
    state: Arc<admin::FleetState>,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
}

/// The fleet's regions in order of first appearance, each with its replicas and, if
/// `sim.shared_kv` names it, a fresh shared tier.
fn group_regions(
    configs: &[ReplicaConfig],
    sim: &SimConfig,
) -> Result<Vec<admin::Region>, SimError> {
    let mut regions: Vec<admin::Region> = Vec::new();
    for config in configs {
        let Some(name) = &config.region else {
            continue;
        };
        match regions.iter_mut().find(|r| &r.name == name) {
            Some(region) => region.replicas.push(config.id.clone()),
            None => regions.push(admin::Region {
                name: name.clone(),
                replicas: vec![config.id.clone()],
                tier: sim.shared_kv.regions.contains(name).then(|| {
                    Arc::new(SharedTier::new(
                        name.clone(),
                        sim.shared_kv.capacity_tokens,
                        sim.block_tokens,
                    ))
                }),
            }),
        }
    }
    let missing: Vec<String> = sim
        .shared_kv
        .regions
        .iter()
        .filter(|name| !regions.iter().any(|r| &r.name == *name))
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(regions)
    } else {
        Err(SimError::SharedKvRegion { regions: missing })
    }
}

impl Fleet {
    /// Binds every replica (and the admin API, if asked), then serves them on the current
    /// tokio runtime.
    pub async fn start(
        configs: Vec<ReplicaConfig>,
        sim: SimConfig,
        admin_addr: Option<SocketAddr>,
    ) -> Result<Fleet, SimError> {
        Fleet::start_with_tls(configs, sim, admin_addr, None).await
    }

    /// [`Fleet::start`], every replica serving HTTPS with `tls` when given (the admin API
    /// stays plain HTTP).
    pub async fn start_with_tls(
        configs: Vec<ReplicaConfig>,
        sim: SimConfig,
        admin_addr: Option<SocketAddr>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Fleet, SimError> {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let regions = group_regions(&configs, &sim)?;
        let sim = Arc::new(sim);
        let mut bound = Vec::with_capacity(configs.len());
        for config in configs {
            let (listener, addr) = bind(format!("replica {}", config.id), config.listen).await?;
            bound.push((config, listener, addr));
        }
        let admin_listener = match admin_addr {
            Some(addr) => Some(bind("admin".into(), addr).await?),
            None => None,
        };
        let replicas: Vec<server::Listening> = bound
            .into_iter()
            .map(|(config, listener, addr)| {
                let mut replica = Replica::new(config.id, Arc::clone(&sim));
                if let Some(region) = config.region {
                    let tier = regions
                        .iter()
                        .find(|r| r.name == region)
                        .and_then(|r| r.tier.clone());
                    replica = replica.in_region(region, tier);
                }
                let replica = Arc::new(replica);
                let app = axum::Router::new()
                    .route("/v1/chat/completions", post(chat::completions))
                    .route("/v1/messages", post(anthropic::messages))
                    .route("/v1/models", get(chat::models))
                    .route("/health", get(chat::health))
                    .route("/metrics", get(engine_api::metrics))
                    .route("/slots", get(engine_api::slots))
                    .route("/props", get(engine_api::props))
                    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
                    .with_state(Arc::clone(&replica));
                server::Listening::new(replica, listener, addr, app, tls.clone())
            })
            .collect();
        let state = Arc::new(admin::FleetState { replicas, regions });
        let admin = admin_listener.map(|(listener, addr)| {
            let app = admin::router(Arc::clone(&state));
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    log::error!("admin listener stopped: {e}");
                }
            });
            (addr, task)
        });
        Ok(Fleet { state, admin })
    }

    /// `(id, bound address)` of every replica, in start order.
    pub fn replicas(&self) -> Vec<(String, SocketAddr)> {
        self.state
            .replicas
            .iter()
            .map(|l| (l.replica.id.clone(), l.addr))
            .collect()
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// A replica's engine, for in-process use.
    pub fn replica(&self, id: &str) -> Option<Arc<Replica>> {
        self.state
            .replicas
            .iter()
            .find(|l| l.replica.id == id)
            .map(|l| Arc::clone(&l.replica))
    }

    /// A region's shared KV tier, if it has one.
    pub fn shared_tier(&self, region: &str) -> Option<Arc<SharedTier>> {
        self.state.shared_tier(region).map(Arc::clone)
    }

    /// Stops every listener and connection.
    pub fn stop(self) {
        for l in self.state.replicas.iter() {
            l.stop();
        }
        if let Some((_, task)) = self.admin {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests;
