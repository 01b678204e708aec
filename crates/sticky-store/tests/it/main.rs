//! End-to-end tests of the sticky store against real `redis-server` processes (single node,
//! TLS, 3-node cluster), started on free ports and stopped by PID.

// Helpers outside #[test] functions too: a panic is how a test fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod cluster;
mod coherence;
mod common;
mod faults;
mod single;
mod tls;
