//! Routing decision time with 1M sessions in the override table. Target: ≤ 200 ns a decision.
//!
//! Every iteration's key depends on the previous iteration's result, so the numbers are
//! latency (what one request pays), not throughput with cache misses overlapped. Two floor
//! rows give the scale: one random read in 32 MiB of memory, and a `std::collections::HashMap`
//! (SwissTable, like dashmap's shards) hit among 1M entries.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tether_affinity::{
    LoadView, OverrideTable, ReplicaIdx, RouteRequest, TagRegistry, TenantScope, TenantWarmth,
    TokenRules, Warmth,
};
use tether_benches::{fleet, key, token, SESSIONS};

/// Index `i` made data-dependent on the previous result (always adds 0).
fn chained(i: usize, previous: u64) -> usize {
    (i + (previous >> 63) as usize) % SESSIONS
}

#[derive(Default)]
struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {}
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Idle replicas that all served the tenant just now: tenant locality scans every replica of
/// the region before it picks one (a walk that asked the ring for more replicas than the region
/// has would scan every ring point here).
struct WarmFleet {
    inflight: Vec<u32>,
    warmth: Vec<TenantWarmth>,
}

impl LoadView for WarmFleet {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.inflight[replica as usize]
    }
    fn tenant_warmth(&self, replica: ReplicaIdx, tenant: TenantScope) -> Option<Warmth> {
        Some(self.warmth[replica as usize].warmth(tenant, 1_000, 30_000))
    }
}

fn routing(c: &mut Criterion) {
    let tags = TagRegistry::new();
    let selector = fleet(&tags);
    let overrides = OverrideTable::new(Duration::from_secs(3600), SESSIONS * 2);
    let idle = vec![0u32; 6];
    let keys: Vec<_> = (0..SESSIONS).map(key).collect();
    // Every session has served a turn: the table holds 1M entries.
    let owners: Vec<_> = keys
        .iter()
        .map(|k| {
            let d = selector
                .decide(
                    &RouteRequest {
                        key: Some(*k),
                        sticky: None,
                        tried: None,
                        tenant: None,
                    },
                    &idle,
                )
                .map(|d| d.replica)
                .unwrap_or(0);
            let tag = selector.replicas()[d as usize].tag;
            overrides.record(*k, tag);
            tag
        })
        .collect();
    let fresh: Vec<_> = (SESSIONS..2 * SESSIONS).map(key).collect();
    let tokens: Vec<String> = (0..SESSIONS).map(token).collect();
    // The owners are over their bound: the walk must skip replicas.
    let busy = vec![40u32, 2, 3, 40, 5, 6];

    // Sessions are visited in order so the benchmark's own arrays stream from memory; the
    // override table is still probed at random (keys are hashes), which is the real cost.
    let mut group = c.benchmark_group("routing_1M_sessions");
    group.throughput(Throughput::Elements(1));

    let decide = |k, view: &Vec<u32>| {
        let req = RouteRequest {
            key: Some(k),
            sticky: overrides.get(k),
            tried: None,
            tenant: None,
        };
        selector
            .decide(&req, view)
            .map_or(0, |d| u64::from(d.replica))
    };

    let (mut i, mut last) = (0usize, 0u64);
    group.bench_function("override_hit", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            last = black_box(decide(keys[i], &idle));
        })
    });
    group.bench_function("ring_walk_new_session", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            last = black_box(decide(fresh[i], &idle));
        })
    });
    group.bench_function("ring_walk_bounded_load_skips", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            last = black_box(decide(fresh[i], &busy));
        })
    });
    let tenant = TenantScope::new("acme");
    let warm = WarmFleet {
        inflight: vec![0; 6],
        warmth: (0..6)
            .map(|_| {
                let w = TenantWarmth::new();
                w.record(tenant, 1_000);
                w
            })
            .collect(),
    };
    group.bench_function("ring_walk_tenant_locality_new_session", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            let k = fresh[i];
            let req = RouteRequest {
                key: Some(k),
                sticky: overrides.get(k),
                tried: None,
                tenant: Some(tenant),
            };
            last = black_box(
                selector
                    .decide(&req, &warm)
                    .map_or(0, |d| u64::from(d.replica)),
            );
        })
    });
    let rules = TokenRules::default();
    group.bench_function("full_path_validate_hash_lookup_decide", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            let k = rules
                .validate(tokens[i].as_bytes())
                .map(|t| tenant.key(t))
                .ok();
            let req = RouteRequest {
                key: k,
                sticky: k.and_then(|k| overrides.get(k)),
                tried: None,
                tenant: None,
            };
            last = black_box(
                selector
                    .decide(&req, &idle)
                    .map_or(0, |d| u64::from(d.replica)),
            );
        })
    });
    // A turn that stays on its replica: the entry already holds the tag, so recording only
    // refreshes its last-touched second under the shard's read lock. Runs before
    // `record_override`, which moves most entries to another replica.
    group.bench_function("record_override_sticky", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            overrides.record(keys[i], owners[i]);
            last = black_box(i as u64);
        })
    });
    // Mostly a move to another replica (5 turns in 6): the shard's write lock.
    group.bench_function("record_override", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            overrides.record(keys[i], selector.replicas()[i % 6].tag);
            last = black_box(i as u64);
        })
    });

    // Floors: what the memory system alone costs for one lookup on this machine.
    let words: Vec<u64> = (0..(32u64 << 20) / 8).collect();
    group.bench_function("floor_one_random_read_in_32MiB", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            last = black_box(words[(keys[i].0 as usize) % words.len()]);
        })
    });
    let map: HashMap<u64, u64, BuildHasherDefault<IdentityHasher>> =
        keys.iter().map(|k| (k.0, 1)).collect();
    group.bench_function("floor_std_hashmap_hit_1M", |b| {
        b.iter(|| {
            i = chained(i + 1, last);
            last = black_box(map.get(&keys[i].0).copied().unwrap_or(0));
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = routing
}
criterion_main!(benches);
