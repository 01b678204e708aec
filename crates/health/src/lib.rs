//! Replica health for Tether.
//!
//! - [`ReplicaStatus`]: the live state of one replica — requests in flight, admin drain, the
//!   active-probe verdict (rise / fall), passive ejection after consecutive failed requests
//!   (with a cooldown that doubles while failures continue), `Retry-After` overload, and the
//!   latest reading of the replica's engine (capacity and load, see `tether_engine`). All
//!   atomics: the selector reads it on every decision without a lock.
//!
//! The state machine takes the time as an argument ([`now_ms`]), so it is tested without
//! sleeping. It does no I/O: the proxy's probe loop and its request hooks feed it.

mod status;

pub use status::{now_ms, HealthPolicy, HealthState, InflightGuard, ReplicaStatus, Transition};
