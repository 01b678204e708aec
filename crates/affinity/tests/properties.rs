//! Ring and selector invariants, checked over random fleets and keys.
//!
//! The seed is fixed so CI is deterministic; set `TETHER_PROPTEST_SEED=<u64>` to search
//! elsewhere.

// Test code: a panic with a message is how a test fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tether_affinity::*;

const SEED: u64 = 0x7e7_4e2;

fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(
            std::env::var("TETHER_PROPTEST_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(SEED),
        ),
        failure_persistence: None,
        ..Config::default()
    }
}

/// 1–3 regions of 1–6 replicas, weights 1–4, ids salted so every case has a different ring.
fn fleet() -> impl Strategy<Value = Vec<RegionSpec>> {
    (
        prop::collection::vec(prop::collection::vec(1u32..=4, 1..=6), 1..=3),
        any::<u32>(),
    )
        .prop_map(|(regions, salt)| {
            regions
                .into_iter()
                .enumerate()
                .map(|(r, weights)| RegionSpec {
                    name: format!("region-{r}"),
                    replicas: weights
                        .into_iter()
                        .enumerate()
                        .map(|(i, weight)| ReplicaSpec {
                            id: format!("r{r}-{i}-{salt:08x}"),
                            weight,
                            admission: Admission::Active,
                            max_inflight: None,
                        })
                        .collect(),
                    kv_scope: KvScope::Replica,
                })
                .collect()
        })
}

fn build(regions: &[RegionSpec], tags: &TagRegistry) -> Selector {
    Selector::new(regions, SelectorOptions::default(), tags)
}

fn key(i: u64) -> RoutingKey {
    TenantScope::new("prop").key(
        TokenRules::default()
            .validate(format!("session-{i}").as_bytes())
            .expect("generated tokens are valid"),
    )
}

fn route(s: &Selector, k: RoutingKey, sticky: Option<ReplicaTag>, load: &[u32]) -> Decision {
    s.decide(
        &RouteRequest {
            key: Some(k),
            sticky,
            tried: None,
            tenant: None,
        },
        load,
    )
    .expect("an idle all-active fleet always has a replica")
}

fn id_of(s: &Selector, d: Decision) -> String {
    s.replicas()[d.replica as usize].id.to_string()
}

fn total_replicas(regions: &[RegionSpec]) -> usize {
    regions.iter().map(|r| r.replicas.len()).sum()
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn same_key_maps_to_the_same_replica_for_a_fixed_topology(
        regions in fleet(),
        keys in prop::collection::vec(any::<u64>(), 1..300),
    ) {
        let tags = TagRegistry::new();
        let a = build(&regions, &tags);
        let b = build(&regions, &TagRegistry::new());
        let idle = vec![0u32; total_replicas(&regions)];
        for k in keys {
            let k = RoutingKey(k);
            let first = route(&a, k, None, &idle);
            prop_assert_eq!(first, route(&a, k, None, &idle));
            // A rebuild (another edge instance, or a restart) agrees.
            prop_assert_eq!(id_of(&a, first), id_of(&b, route(&b, k, None, &idle)));
        }
    }

    #[test]
    fn adding_a_replica_moves_no_overridden_key_and_about_one_in_n_plus_one_of_the_rest(
        regions in fleet(),
        new_weight in 1u32..=4,
        target_region in any::<prop::sample::Index>(),
    ) {
        const KEYS: u64 = 20_000;
        let tags = TagRegistry::new();
        let before = build(&regions, &tags);
        let overrides = OverrideTable::new(std::time::Duration::from_secs(3600), 1 << 20);
        let idle = vec![0u32; total_replicas(&regions) + 1];

        let mut placed = HashMap::new();
        for i in 0..KEYS {
            let d = route(&before, key(i), None, &idle);
            // Every other key has served a turn and holds an override entry.
            if i % 2 == 0 {
                overrides.record(key(i), before.replicas()[d.replica as usize].tag);
            }
            placed.insert(i, id_of(&before, d));
        }

        let mut grown = regions.clone();
        let r = target_region.index(grown.len());
        grown[r].replicas.push(ReplicaSpec {
            id: "the-new-one".into(),
            weight: new_weight,
            admission: Admission::Active,
            max_inflight: None,
        });
        let after = build(&grown, &tags);

        let (mut moved, mut free_keys) = (0u64, 0u64);
        for i in 0..KEYS {
            let d = route(&after, key(i), overrides.get(key(i)), &idle);
            let now = id_of(&after, d);
            if i % 2 == 0 {
                prop_assert_eq!(&now, &placed[&i], "a key with an override entry moved");
                prop_assert_eq!(d.outcome, Outcome::Sticky);
            } else {
                free_keys += 1;
                if now != placed[&i] {
                    moved += 1;
                    prop_assert_eq!(&now, "the-new-one", "a key moved between old replicas");
                }
            }
        }
        let total_weight: u32 = grown.iter().flat_map(|r| &r.replicas).map(|r| r.weight).sum();
        let fair = f64::from(new_weight) / f64::from(total_weight);
        let share = moved as f64 / free_keys as f64;
        // Ketama's per-replica share is within ~10 % of fair (see the weights property), plus
        // sampling noise on 10k keys.
        prop_assert!(share <= fair * 1.15 + 0.01, "moved {share:.4}, fair share {fair:.4}");
    }

    #[test]
    fn removing_a_replica_moves_only_the_keys_it_held(
        regions in fleet().prop_filter("needs two replicas", |r| total_replicas(r) >= 2),
        victim in any::<prop::sample::Index>(),
    ) {
        let tags = TagRegistry::new();
        let before = build(&regions, &tags);
        let idle = vec![0u32; total_replicas(&regions)];
        let all: Vec<(usize, usize)> = regions
            .iter()
            .enumerate()
            .flat_map(|(r, reg)| (0..reg.replicas.len()).map(move |i| (r, i)))
            .collect();
        let (vr, vi) = all[victim.index(all.len())];
        let mut shrunk = regions.clone();
        let gone = shrunk[vr].replicas.remove(vi).id;
        let after = build(&shrunk, &tags);
        for i in 0..5_000 {
            let was = id_of(&before, route(&before, key(i), None, &idle));
            let now = id_of(&after, route(&after, key(i), None, &idle));
            if was != gone {
                prop_assert_eq!(was, now);
            } else {
                prop_assert_ne!(now, gone.clone());
            }
        }
    }

    #[test]
    fn the_load_bound_is_never_exceeded_while_an_eligible_replica_is_under_it(
        regions in fleet(),
        ops in prop::collection::vec((any::<u64>(), any::<bool>()), 1..400),
    ) {
        let s = build(&regions, &TagRegistry::new());
        let c = SelectorOptions::default().balance_factor;
        let mut load = vec![0u32; total_replicas(&regions)];
        let mut live: Vec<u32> = Vec::new();
        for (k, assign) in ops {
            if !assign && !live.is_empty() {
                let done = live.swap_remove((k % live.len() as u64) as usize);
                load[done as usize] -= 1;
                continue;
            }
            let d = route(&s, RoutingKey(k), None, &load);
            let chosen = &s.replicas()[d.replica as usize];
            // Every replica is active, so the home region always has one under its bound and
            // the bound must hold for the chosen one.
            prop_assert_ne!(d.outcome, Outcome::CrossRegion);
            let members: Vec<usize> = (0..load.len())
                .filter(|i| s.replicas()[*i].region == chosen.region)
                .collect();
            let total: u64 = members.iter().map(|i| u64::from(load[*i])).sum();
            let weight: u64 = members.iter().map(|i| u64::from(s.replicas()[*i].weight)).sum();
            let bound = (c * (total + 1) as f64 * f64::from(chosen.weight) / weight as f64).ceil();
            prop_assert!(
                f64::from(load[d.replica as usize]) < bound,
                "chose {} at {} in flight, bound {bound}",
                chosen.id,
                load[d.replica as usize]
            );
            load[d.replica as usize] += 1;
            live.push(d.replica);
        }
    }
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn weights_are_honoured_within_ten_percent_over_100k_keys(regions in fleet()) {
        const KEYS: u64 = 100_000;
        let s = build(&regions, &TagRegistry::new());
        let idle = vec![0u32; total_replicas(&regions)];
        let mut counts = vec![0u64; idle.len()];
        for i in 0..KEYS {
            counts[route(&s, RoutingKey(xorshift(i)), None, &idle).replica as usize] += 1;
        }
        let total_weight: u64 = s.replicas().iter().map(|r| u64::from(r.weight)).sum();
        for (r, count) in s.replicas().iter().zip(&counts) {
            let fair = KEYS as f64 * f64::from(r.weight) / total_weight as f64;
            let deviation = *count as f64 / fair - 1.0;
            prop_assert!(
                deviation.abs() <= 0.10,
                "{} (weight {}) got {count} keys, fair {fair:.0} ({:+.1} %)",
                r.id, r.weight, deviation * 100.0
            );
        }
    }
}

/// Spreads sequential integers over the key space (a stand-in for hashed tokens).
fn xorshift(i: u64) -> u64 {
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
