//! Loadgen against simulated replicas in this process (no proxy: loadgen never depends on it).

// Test helpers panic on failure; that is how a test fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod tier;
