//! Bytes per override-table entry, counted by the allocator. Target: ≤ 64 bytes.
//!
//! Prints the heap held by the table after 1M inserts divided by 1M, and the worst case over
//! table sizes from 50k to 1M in 50k steps (hash tables double, so the cost per entry is highest right
//! after a resize).

use std::alloc::System;
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tether_affinity::{OverrideTable, ReplicaTag};
use tether_benches::{key, SESSIONS};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn held_bytes(entries: usize) -> f64 {
    let keys: Vec<_> = (0..entries).map(key).collect();
    let region = Region::new(GLOBAL);
    let table = OverrideTable::new(Duration::from_secs(3600), SESSIONS * 2);
    for (i, k) in keys.iter().enumerate() {
        table.record(*k, ReplicaTag((i % 6) as u32));
    }
    let stats = region.change();
    let held = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    drop(table);
    held / entries as f64
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let at_1m = held_bytes(SESSIONS);
    let worst = (1..=20)
        .map(|step| held_bytes(SESSIONS * step / 20))
        .fold(0.0f64, f64::max);
    println!("override_memory/bytes_per_entry_at_1M        {at_1m:.1} B (target <= 64)");
    println!("override_memory/bytes_per_entry_worst_50k_1M  {worst:.1} B (target <= 64)");
    if worst > 64.0 {
        eprintln!("override table uses more than 64 bytes per entry");
        std::process::exit(1);
    }
}
