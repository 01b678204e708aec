//! The shared sticky state of a Tether tier: which replica serves each session, kept in Redis
//! so that every proxy instance routes a conversation to the same replica.
//!
//! Each instance keeps its own override table (in `tether-affinity`) as the fast, local copy.
//! This crate is the copy they share: a [`StickyStore`] looks a routing key up in Redis, records
//! new bindings there, and tells each instance about the bindings the others make.
//!
//! # The contract
//!
//! - **Keys**: `{key_prefix}{key:016x}`, where `key` is the tenant-scoped routing key (a keyed
//!   digest; the session token never reaches this crate). The value is the replica id, at most
//!   [`MAX_REPLICA_ID_LEN`] bytes, with an idle expiry of [`StoreSettings::ttl`].
//! - **Lookups are bounded**: [`StickyStore::lookup`] waits at most
//!   [`StoreSettings::lookup_timeout`] and never fails; a problem is a
//!   [`Lookup::Unavailable`] with its [`StoreErrorKind`], and the proxy routes as if there were
//!   no binding. While Redis is unreachable it answers at once.
//! - **Writes never wait**: [`bind`](StickyStore::bind) and [`touch`](StickyStore::touch)
//!   enqueue on a bounded queue; a background writer pipelines them. A full queue drops the
//!   write and counts it.
//! - **Coherence**: a bind is announced on [`StoreSettings::channel`] as
//!   `{origin:016x}:{key:016x}:{replica}`, or `{origin:016x}:{key:016x}/{group:08x}:{replica}`
//!   with the caller's group tag (the proxy's: the session's tenant, for tenant locality);
//!   every other instance's [`on_remote_bind`](StickyStore::on_remote_bind) callback hears it
//!   (the origin lets an instance skip its own). Announcements are a hint that keeps local
//!   tables fresh; the stored value is the authority, and the group tag is never stored.
//! - **Garbage in Redis** (a value that is not UTF-8, empty, too long, or of the wrong type) is
//!   `Unavailable(Garbage)` and counted, never a panic.
//! - **Own runtime**: the store runs a current-thread tokio runtime on a dedicated thread that
//!   owns every connection, so it can be called from any thread and any runtime (Pingora has
//!   one per worker thread). Connections are re-established with backoff (50 ms doubling to
//!   2 s, jittered) and checked every second; a state change is logged once, not per request.
//! - **Deployments**: one Redis node (`redis://`), TLS (`rediss://`, rustls), or Redis Cluster
//!   ([`StoreSettings::cluster`]: keys spread over slots; pub/sub goes through one node, since
//!   a publish anywhere in a cluster reaches every node).
//!
//! [`stats`](StickyStore::stats) returns counters and a latency histogram in the shape the
//! proxy renders as Prometheus metrics. The `testing` feature adds the `testing` module, which
//! starts real `redis-server` processes (a node, a TLS node, a 3-node cluster) for tests.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tether_sticky_store::{Lookup, StickyStore, StoreSettings};
//!
//! # async fn example() -> Result<(), tether_sticky_store::StoreError> {
//! let store = StickyStore::start(StoreSettings {
//!     ttl: Duration::from_secs(3600),
//!     ..StoreSettings::new("redis://127.0.0.1:6379")
//! })?;
//! store.on_remote_bind(|key, replica, _group| println!("{key:016x} moved to {replica}"));
//!
//! let key = 0x9f3a_5c1e_77d0_2b48;
//! match store.lookup(key).await {
//!     Lookup::Found(replica) => println!("sticky to {replica}"),
//!     Lookup::Missing | Lookup::Unavailable(_) => {
//!         // Pick a replica by the ring; once it has served the turn:
//!         store.bind(key, "eu-2", None);
//!     }
//! }
//! store.shutdown();
//! # Ok(())
//! # }
//! ```

mod backoff;
mod connection;
mod error;
mod message;
mod settings;
mod stats;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod worker;

pub use error::{SettingsProblem, StoreError, StoreErrorKind};
pub use message::{is_storable_replica_id, MAX_LOAD_ENTRIES, MAX_REPLICA_ID_LEN};
pub use settings::{
    StoreSettings, DEFAULT_CHANNEL, DEFAULT_KEY_PREFIX, DEFAULT_LOOKUP_TIMEOUT, DEFAULT_TTL,
    DEFAULT_WRITE_QUEUE,
};
pub use stats::{HistogramBucket, KindCounts, LatencyHistogram, LookupCounts, StoreStats};
pub use store::{Lookup, StickyStore};
