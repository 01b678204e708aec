//! End-to-end tests: the real `tether` binary in front of real `replica-sim` processes on
//! loopback. One test binary with modules keeps link time down.

// Test code: a panic with a message is how a test fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod abuse;
mod admission;
mod bodies;
mod cache_hits;
mod cache_loss;
mod cli;
mod client;
mod engines;
mod failover;
mod hostile;
mod key_sources;
mod logs;
mod metering;
mod real_engines;
mod reload;
mod routing;
mod sdk;
mod shutdown;
mod sim;
mod streaming;
mod tier;
mod tls;
