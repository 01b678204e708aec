//! A simulated OpenAI-compatible inference replica fleet.
//!
//! Tether is measured in cache hits and exercised against failures; neither needs GPUs. This
//! crate serves what a vLLM/SGLang replica serves where Tether cares — `POST
//! /v1/chat/completions` with a filled-in `usage` block, `GET /v1/models`, `GET /health` — and
//! names itself in an `x-replica-id` response header so tests can see where a request landed.
//! Many replicas run in one process, one listener each ([`Fleet::start`]).
//!
//! It is a black box to Tether: it never depends on the proxy crate.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tether_replica_sim::{Fleet, ReplicaConfig};
//!
//! let fleet = Fleet::start(vec![ReplicaConfig::new("eu-1", "127.0.0.1:0".parse()?)]).await?;
//! println!("eu-1 listens on {}", fleet.replicas()[0].1);
//! # Ok(()) }
//! ```

mod chat;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use chat::{count_prompt_tokens, BYTES_PER_TOKEN};

/// Largest request body accepted (a 1M-token prompt is about 4 MiB).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Settings of one simulated replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Replica id (sent back in `x-replica-id`).
    pub id: String,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl ReplicaConfig {
    /// A replica with default behaviour.
    pub fn new(id: impl Into<String>, listen: SocketAddr) -> Self {
        ReplicaConfig {
            id: id.into(),
            listen,
        }
    }
}

/// Why a fleet could not start.
#[derive(Debug, Error)]
pub enum SimError {
    /// A listener could not be bound.
    #[error("replica {id}: cannot listen on {addr}: {source}")]
    Bind {
        /// Replica id.
        id: String,
        /// Requested address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

pub(crate) struct ReplicaState {
    pub id: String,
}

/// A running fleet: every replica's listener is bound when [`Fleet::start`] returns.
#[derive(Debug)]
pub struct Fleet {
    replicas: Vec<(String, SocketAddr)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Binds every replica, then serves them on the current tokio runtime.
    pub async fn start(configs: Vec<ReplicaConfig>) -> Result<Fleet, SimError> {
        let mut bound = Vec::with_capacity(configs.len());
        for config in configs {
            let listener =
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| SimError::Bind {
                        id: config.id.clone(),
                        addr: config.listen,
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| SimError::Bind {
                id: config.id.clone(),
                addr: config.listen,
                source,
            })?;
            bound.push((config, listener, addr));
        }
        let mut replicas = Vec::with_capacity(bound.len());
        let mut tasks = Vec::with_capacity(bound.len());
        for (config, listener, addr) in bound {
            replicas.push((config.id.clone(), addr));
            let state = Arc::new(ReplicaState { id: config.id });
            let app = axum::Router::new()
                .route("/v1/chat/completions", post(chat::completions))
                .route("/v1/models", get(chat::models))
                .route("/health", get(chat::health))
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
                .with_state(state);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    log::error!("replica on {addr} stopped: {e}");
                }
            }));
        }
        Ok(Fleet { replicas, tasks })
    }

    /// `(id, bound address)` of every replica, in start order.
    pub fn replicas(&self) -> &[(String, SocketAddr)] {
        &self.replicas
    }

    /// Stops every replica.
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}
