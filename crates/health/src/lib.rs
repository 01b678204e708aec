//! Replica health for Tether.
//!
//! - [`ReplicaStatus`]: the live state of one replica — requests in flight, admin drain, the
//!   active-probe verdict (rise / fall), passive ejection after consecutive failed requests
//!   (with a cooldown that doubles while failures continue), and `Retry-After` overload. All
//!   atomics: the selector reads it on every decision without a lock.
//! - [`Prober`]: the active probe loop, a Pingora background service.
//!
//! The state machine takes the time as an argument ([`now_ms`]), so it is tested without
//! sleeping; only the prober touches the network.

mod probe;
mod status;

pub use probe::{Checkers, ProbeRound, ProbeSettings, ProbeSource, ProbeTarget, Prober};
pub use status::{now_ms, HealthPolicy, HealthState, InflightGuard, ReplicaStatus, Transition};
