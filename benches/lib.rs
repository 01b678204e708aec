//! Shared fixtures for Tether's benchmarks.
//!
//! - `routing` (criterion): one routing decision with 1M sessions in the override table —
//!   override hit, ring walk, ring walk with bounded-load skips, and the whole per-request path
//!   (validate token, derive key, look up, decide).
//! - `override_memory`: bytes per override-table entry, counted by the allocator.
//!
//! Run with `make bench`; results and how to read them are in `docs/performance.md`.

use tether_affinity::{
    Admission, KvScope, RegionSpec, ReplicaSpec, RoutingKey, Selector, SelectorOptions,
    TagRegistry, TenantScope, TokenRules,
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
        kv_scope: KvScope::Replica,
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

/// Runs `callgrind_control` on a process (`-z` zeroes the counters, `-d` dumps them).
pub fn callgrind_control(flag: &str, pid: u32) {
    let status = std::process::Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("callgrind_control: {e}"));
    assert!(status.success(), "callgrind_control {flag} {pid} failed");
}

/// The instruction total of a callgrind dump file.
pub fn callgrind_total(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("callgrind dump {}: {e}", path.display()));
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no instruction total in {}", path.display()))
}

/// Whether valgrind can be run.
pub fn valgrind_present() -> bool {
    std::process::Command::new("valgrind")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The median (the upper one of an even count); NaN for no values.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median, lowest and highest of per-round values (paired ratios between two rows that ran back
/// to back); NaN for the median and infinities for the range when there are none.
pub fn median_and_range(v: &[f64]) -> (f64, f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v.to_vec()), lo, hi)
}
