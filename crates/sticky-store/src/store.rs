//! The handle the proxy holds: cheap to clone, callable from any thread or tokio runtime.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::error::{StoreError, StoreErrorKind};
use crate::message::is_storable_replica_id;
use crate::settings::{self, StoreSettings};
use crate::stats::{Counters, StoreStats};
use crate::worker::{LookupRequest, Shared, Worker, WriteOp};

/// Lookups waiting for the store's thread. A lookup lives at most `lookup_timeout`, so this
/// many are only queued when the thread is badly behind; past it lookups fail at once.
const LOOKUP_QUEUE: usize = 4096;

/// The proxy's callback for bindings made by other instances: `(routing key, replica id,
/// group tag)`.
pub(crate) type RemoteBindFn = Box<dyn Fn(u64, &str, Option<u32>) + Send + Sync>;

/// The proxy's callback for other instances' load reports: `(origin, [(replica id, requests
/// in flight)])`.
pub(crate) type RemoteLoadFn = Box<dyn Fn(u64, &[(&str, u32)]) + Send + Sync>;

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The replica bound to the key. Not checked against the fleet: that is the proxy's job.
    Found(Arc<str>),
    /// Redis answered: no binding (never bound, expired, or Redis lost its data).
    Missing,
    /// No usable answer; route as if there were no binding.
    Unavailable(StoreErrorKind),
}

/// The shared sticky store. See the [crate documentation](crate).
#[derive(Clone)]
pub struct StickyStore {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    lookups: mpsc::Sender<LookupRequest>,
    writes: mpsc::Sender<WriteOp>,
    lookup_timeout: Duration,
    redacted_url: String,
    stopped: AtomicBool,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl StickyStore {
    /// Validates `settings` and starts the store's thread with its own current-thread tokio
    /// runtime, which owns every Redis connection (the proxy calls from many runtimes, and
    /// redis-rs ties a connection's I/O to the runtime that opened it).
    ///
    /// Never touches the network here: connecting happens on that thread, with backoff, so
    /// Redis being down is not an error. Fails only on invalid settings (every problem listed,
    /// by YAML field) or if the thread cannot be created.
    pub fn start(settings: StoreSettings) -> Result<StickyStore, StoreError> {
        let plan = settings::plan(&settings)
            .map_err(|problems| StoreError::InvalidSettings { problems })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        let (lookups, lookup_queue) = mpsc::channel(LOOKUP_QUEUE);
        let (writes, write_queue) = mpsc::channel(plan.write_queue);
        let (stop, stop_signal) = oneshot::channel();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            remote_bind: Default::default(),
            remote_load: Default::default(),
            origin: rand::random(),
            ttl_seconds: std::sync::atomic::AtomicU64::new(plan.ttl_seconds),
        });
        let lookup_timeout = plan.lookup_timeout;
        let redacted_url = plan.redacted_url.clone();
        let worker = Worker {
            plan,
            shared: shared.clone(),
            lookups: lookup_queue,
            writes: write_queue,
            stop: stop_signal,
        };
        let thread = std::thread::Builder::new()
            .name("sticky-store".to_owned())
            .spawn(move || runtime.block_on(worker.run()))
            .map_err(StoreError::Thread)?;
        Ok(StickyStore {
            inner: Arc::new(Handle {
                shared,
                lookups,
                writes,
                lookup_timeout,
                redacted_url,
                stopped: AtomicBool::new(false),
                running: Mutex::new(Some(Running { stop, thread })),
            }),
        })
    }

    /// The replica bound to `key`, waiting at most `lookup_timeout`. Never fails: a problem is
    /// a [`Lookup::Unavailable`] with its reason, and counted. While the store is disconnected
    /// it answers `Unavailable(Connect)` at once, without waiting.
    ///
    /// Await it inside a tokio runtime with time enabled (any Pingora runtime); elsewhere it
    /// cannot bound its wait, so it answers `Unavailable(Timeout)` at once.
    pub async fn lookup(&self, key: u64) -> Lookup {
        let counters = &self.inner.shared.counters;
        let lookup = self.ask(key).await;
        match &lookup {
            Lookup::Found(_) => counters.found(),
            Lookup::Missing => counters.missing(),
            Lookup::Unavailable(kind) => counters.unavailable(*kind),
        }
        lookup
    }

    async fn ask(&self, key: u64) -> Lookup {
        let inner = &self.inner;
        if inner.stopped.load(Relaxed) {
            return Lookup::Unavailable(StoreErrorKind::Stopped);
        }
        if !inner.shared.counters.connected.load(Relaxed) {
            return Lookup::Unavailable(StoreErrorKind::Connect);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Lookup::Unavailable(StoreErrorKind::Timeout);
        }
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        match inner.lookups.try_send(LookupRequest { key, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Lookup::Unavailable(StoreErrorKind::QueueFull),
            Err(TrySendError::Closed(_)) => return Lookup::Unavailable(StoreErrorKind::Stopped),
        }
        let lookup = match tokio::time::timeout(inner.lookup_timeout, answer).await {
            Ok(Ok(lookup)) => lookup,
            // The store's thread ended with the request in hand.
            Ok(Err(_dropped)) => Lookup::Unavailable(StoreErrorKind::Stopped),
            Err(_elapsed) => Lookup::Unavailable(StoreErrorKind::Timeout),
        };
        inner.shared.counters.observe_latency(started.elapsed());
        lookup
    }

    /// Records that `replica` now serves `key`: queued, never waits. The store's thread writes
    /// `SET {key_prefix}{key:016x} replica EX ttl` and then announces it on the channel, so
    /// other instances' [`on_remote_bind`](Self::on_remote_bind) callbacks hear of it. A full
    /// queue drops the write (counted). A replica id that is empty or longer than
    /// [`MAX_REPLICA_ID_LEN`](crate::MAX_REPLICA_ID_LEN) bytes is dropped and counted as
    /// garbage: no instance would accept it back.
    ///
    /// `group` is an opaque tag announced with the binding and never stored (the proxy sends
    /// a tag of the session's tenant, so that other instances learn where each tenant's new
    /// sessions go).
    pub fn bind(&self, key: u64, replica: &str, group: Option<u32>) {
        if !is_storable_replica_id(replica) {
            self.inner.shared.counters.error(StoreErrorKind::Garbage);
            self.inner.shared.counters.writes_dropped(1);
            return;
        }
        self.enqueue(WriteOp::Bind {
            key,
            replica: replica.into(),
            group,
        });
    }

    /// Restarts `key`'s idle TTL, and writes the binding to `replica` back if the store has
    /// none (it restarted empty, the key expired, or a bind was dropped while the store was
    /// down); never overwrites a binding that is there, never announces: queued, never waits.
    pub fn touch(&self, key: u64, replica: &str) {
        if !is_storable_replica_id(replica) {
            self.inner.shared.counters.error(StoreErrorKind::Garbage);
            self.inner.shared.counters.writes_dropped(1);
            return;
        }
        self.enqueue(WriteOp::Touch {
            key,
            replica: replica.into(),
        });
    }

    /// Counts the connections and subscriptions established so far: it changes whenever the
    /// store comes (back) up. Writes made while it was down were dropped and announcements
    /// missed, so a caller that sees it change should write its bindings back
    /// ([`touch_waiting`](Self::touch_waiting)) and re-check the ones it holds.
    pub fn epoch(&self) -> u64 {
        self.inner.shared.counters.established.load(Relaxed)
    }

    /// [`touch`](Self::touch), waiting for room in the write queue instead of dropping: for
    /// writing back a whole table after the store came back. Returns false once the store is
    /// shut down.
    pub async fn touch_waiting(&self, key: u64, replica: &str) -> bool {
        if !is_storable_replica_id(replica) {
            return true;
        }
        let op = WriteOp::Touch {
            key,
            replica: replica.into(),
        };
        self.inner.writes.send(op).await.is_ok()
    }

    /// Changes a binding's idle lifetime for the writes from now on (a reload changed
    /// `affinity.override_ttl`); whole seconds, rounded up, at least one.
    pub fn set_ttl(&self, ttl: Duration) {
        let seconds = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        self.inner.shared.ttl_seconds.store(seconds, Relaxed);
    }

    fn enqueue(&self, op: WriteOp) {
        let counters = &self.inner.shared.counters;
        let failure = match self.inner.writes.try_send(op) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => StoreErrorKind::QueueFull,
            Err(TrySendError::Closed(_)) => StoreErrorKind::Stopped,
        };
        counters.error(failure);
        counters.writes_dropped(1);
    }

    /// Sets the callback for bindings announced by *other* instances (this instance's own are
    /// skipped), replacing any previous one. It runs on the store's thread, one message at a
    /// time: keep it short and non-blocking (update a local table, no I/O). A panic in it is
    /// caught and logged. A callback that holds a clone of this store keeps the store alive
    /// until [`shutdown`](Self::shutdown) is called.
    pub fn on_remote_bind(
        &self,
        callback: impl Fn(u64, &str, Option<u32>) + Send + Sync + 'static,
    ) {
        let callback: RemoteBindFn = Box::new(callback);
        self.inner
            .shared
            .remote_bind
            .store(Some(Arc::new(callback)));
    }

    /// Announces this instance's requests in flight per replica to the others (their
    /// [`on_remote_load`](Self::on_remote_load) callbacks), so that a tier balances by the
    /// load of the whole tier: queued, never waits, nothing stored. Replica ids that are not
    /// storable and entries past [`MAX_LOAD_ENTRIES`](crate::MAX_LOAD_ENTRIES) are
    /// left out.
    pub fn publish_load(&self, entries: &[(&str, u32)]) {
        let kept: Vec<(&str, u32)> = entries
            .iter()
            .copied()
            .filter(|(id, _)| is_storable_replica_id(id))
            .take(crate::message::MAX_LOAD_ENTRIES)
            .collect();
        let payload = crate::message::encode_load(self.inner.shared.origin, &kept);
        self.enqueue(WriteOp::Load {
            payload: payload.into(),
        });
    }

    /// Sets the callback for other instances' load reports (this instance's own are
    /// skipped), replacing any previous one; the same rules as
    /// [`on_remote_bind`](Self::on_remote_bind).
    pub fn on_remote_load(&self, callback: impl Fn(u64, &[(&str, u32)]) + Send + Sync + 'static) {
        let callback: RemoteLoadFn = Box::new(callback);
        self.inner
            .shared
            .remote_load
            .store(Some(Arc::new(callback)));
    }

    /// A snapshot of the counters and the connection state, for metrics.
    pub fn stats(&self) -> StoreStats {
        self.inner.shared.counters.snapshot()
    }

    /// Stops the store's thread, first writing what is still queued (for at most about half a
    /// second beyond a write already in flight). Lookups and writes after it answer `Stopped`.
    /// Idempotent; dropping the last clone does the same.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Handle {
    fn shutdown(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Running { stop, thread }) = running else {
            return;
        };
        self.stopped.store(true, Relaxed);
        let _ = stop.send(());
        // From the callback, on the store's own thread: joining would wait for itself. The
        // thread ends once the callback returns.
        if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
            log::error!("sticky store: its thread panicked");
        }
        self.shared.counters.connected.store(false, Relaxed);
        self.shared.counters.subscribed.store(false, Relaxed);
        // Breaks the cycle of a callback that holds a clone of the store.
        self.shared.remote_bind.store(None);
        self.shared.remote_load.store(None);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for StickyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StickyStore")
            .field("url", &self.inner.redacted_url)
            .field("origin", &format_args!("{:016x}", self.inner.shared.origin))
            .field(
                "connected",
                &self.inner.shared.counters.connected.load(Relaxed),
            )
            .field("stopped", &self.inner.stopped.load(Relaxed))
            .finish()
    }
}
