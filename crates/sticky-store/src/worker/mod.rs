//! The store's side of the channels: the tasks on its own runtime thread that own every Redis
//! connection.
//!
//! - the supervisor ([`supervisor`]) keeps one command connection up, health-checks it and
//!   reconnects with backoff, publishing it in the [`Link`];
//! - the lookup dispatcher ([`lookups`]) runs each `GET` as its own task on that connection;
//! - the writer ([`writer`]) batches binds and touches into pipelines;
//! - the subscriber ([`subscriber`]) listens for other instances' bindings on a connection of
//!   its own (a subscribed connection can send nothing else).

mod lookups;
mod state_log;
mod subscriber;
mod supervisor;
mod writer;

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::{mpsc, oneshot, watch};

use crate::connection::RedisConnection;
use crate::error::StoreErrorKind;
use crate::settings::Plan;
use crate::stats::Counters;
use crate::store::{Lookup, RemoteBindFn, RemoteLoadFn};

/// State shared by the handle (any thread) and the store's thread.
pub(crate) struct Shared {
    pub counters: Counters,
    pub remote_bind: ArcSwapOption<RemoteBindFn>,
    pub remote_load: ArcSwapOption<RemoteLoadFn>,
    /// This instance's id in published messages, so it can skip its own.
    pub origin: u64,
    /// A binding's idle lifetime in whole seconds; follows the proxy's reloads.
    pub ttl_seconds: std::sync::atomic::AtomicU64,
}

/// A lookup on its way to the store's thread; the answer goes back on `reply`.
pub(crate) struct LookupRequest {
    pub key: u64,
    pub reply: oneshot::Sender<Lookup>,
}

/// A queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteOp {
    /// `SET key replica EX ttl`, then announce it.
    Bind {
        key: u64,
        replica: Box<str>,
        /// Announced with the binding (see [`StickyStore::bind`](crate::StickyStore::bind)).
        group: Option<u32>,
    },
    /// `SET key replica NX EX ttl` then `EXPIRE key ttl`: restarts the idle TTL of the
    /// stored binding, and writes it back if the store lost it (restarted empty, expired,
    /// a bind dropped while it was down), without overwriting a newer binding and without
    /// announcing anything.
    Touch { key: u64, replica: Box<str> },
    /// `PUBLISH` of a load report ([`encode_load`](crate::message::encode_load)); nothing is
    /// stored.
    Load { payload: Box<str> },
}

/// The command connection as the supervisor last published it.
pub(crate) struct Link {
    current: ArcSwapOption<Connected>,
    /// The highest connection generation found broken by a request; the supervisor replaces
    /// that connection. A generation, not a flag, so a late report about an old connection
    /// cannot tear down its replacement.
    broken: watch::Sender<u64>,
}

pub(crate) struct Connected {
    pub generation: u64,
    pub conn: RedisConnection,
}

impl Link {
    fn new() -> Self {
        Link {
            current: ArcSwapOption::empty(),
            broken: watch::Sender::new(0),
        }
    }

    /// The connection to use now, if any.
    pub(crate) fn current(&self) -> Option<Arc<Connected>> {
        self.current.load_full()
    }

    /// A request on connection `generation` failed in a way that means the connection is gone.
    pub(crate) fn report_broken(&self, generation: u64) {
        self.broken.send_if_modified(|highest| {
            let newer = generation > *highest;
            if newer {
                *highest = generation;
            }
            newer
        });
    }
}

/// Everything the store's thread runs with.
pub(crate) struct Worker {
    pub plan: Plan,
    pub shared: Arc<Shared>,
    pub lookups: mpsc::Receiver<LookupRequest>,
    pub writes: mpsc::Receiver<WriteOp>,
    pub stop: oneshot::Receiver<()>,
}

impl Worker {
    /// Runs until stopped, then flushes the write queue (bounded) and returns. Tasks still
    /// running then end with the runtime.
    pub(crate) async fn run(self) {
        let Worker {
            plan,
            shared,
            lookups,
            writes,
            stop,
        } = self;
        let plan = Arc::new(plan);
        let link = Arc::new(Link::new());
        log::info!(
            "sticky store: using {} ({}{}), channel {:?}",
            plan.redacted_url,
            if plan.target.is_cluster() {
                "cluster"
            } else {
                "single node"
            },
            if plan.target.uses_tls() { ", TLS" } else { "" },
            plan.channel
        );
        tokio::spawn(supervisor::run(plan.clone(), link.clone(), shared.clone()));
        tokio::spawn(subscriber::run(plan.clone(), link.clone(), shared.clone()));
        tokio::spawn(lookups::run(plan.clone(), link.clone(), lookups));
        writer::run(plan, link, shared, writes, stop).await;
    }
}

/// The kind of a failed request, for the caller and the counters.
pub(crate) fn classify(err: &redis::RedisError) -> StoreErrorKind {
    if err.is_timeout() {
        StoreErrorKind::Timeout
    } else if err.is_connection_refusal() {
        StoreErrorKind::Connect
    } else if err.code() == Some("WRONGTYPE") {
        // Someone stored a list or a hash under our key.
        StoreErrorKind::Garbage
    } else {
        StoreErrorKind::Io
    }
}

/// Whether the failure means the connection itself is gone (as opposed to one bad answer).
pub(crate) fn connection_lost(err: &redis::RedisError) -> bool {
    err.is_connection_dropped() || err.is_unrecoverable_error()
}
