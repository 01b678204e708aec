//! Shared fixtures for Tether's benchmarks.
//!
//! - `routing` (criterion): one routing decision with 1M sessions in the override table —
//!   override hit, ring walk, ring walk with bounded-load skips, and the whole per-request path
//!   (validate token, derive key, look up, decide).
//! - `override_memory`: bytes per override-table entry, counted by the allocator.
//!
//! Run with `make bench`; results and how to read them are in `docs/performance.md`.

use tether_affinity::{
    Admission, RegionSpec, ReplicaSpec, RoutingKey, Selector, SelectorOptions, TagRegistry,
    TenantScope, TokenRules,
};

/// Sessions in the override table for every benchmark.
pub const SESSIONS: usize = 1_000_000;

/// The `make run` fleet: 2 regions × 3 replicas.
pub fn fleet(tags: &TagRegistry) -> Selector {
    let region = |name: &str| RegionSpec {
        name: name.into(),
        replicas: (1..=3)
            .map(|i| ReplicaSpec {
                id: format!("{name}-{i}"),
                weight: 1,
                admission: Admission::Active,
                max_inflight: Some(64),
            })
            .collect(),
    };
    Selector::new(
        &[region("eu"), region("us")],
        SelectorOptions::default(),
        tags,
    )
}

/// The UUID-shaped token of session `i`.
pub fn token(i: usize) -> String {
    format!("3f2b8c1e-9a4d-4e7b-8c2a-{i:012x}")
}

/// The routing key of session `i` for tenant `acme`.
pub fn key(i: usize) -> RoutingKey {
    let token = token(i);
    match TokenRules::default().validate(token.as_bytes()) {
        Ok(t) => TenantScope::new("acme").key(t),
        Err(e) => unreachable!("generated tokens are valid: {e}"),
    }
}
