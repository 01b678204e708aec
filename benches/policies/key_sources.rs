//! How clients name their sessions: the steady workload on the 2,560-token fleet through one
//! Tether whose `key_sources` include the conversation fingerprint, once per client profile
//! (every session sending the affinity header; an agent's own session header;
//! `prompt_cache_key`; nothing at all), then with 30 % of the sessions opening with one
//! shared head ("You are a helpful assistant." and "hi"), which the fingerprint cannot tell
//! apart: what the fingerprint's weakness costs.

use tether_e2e::{SimFleet, Tether, TetherConfig};
use tether_loadgen::{ClientProfile, Report, Target, Workload};

use super::{flush, print_table, run, tether_config, CACHE_TOKENS, SIX};

/// Share of sessions opening with the shared head in the last rows.
const SHARED_HEAD_FRACTION: f64 = 0.3;

pub async fn run_scenario(workload: &Workload, scale: &str) {
    let fleet = SimFleet::start_with(
        &SIX,
        &[
            "--time-scale",
            scale,
            "--cache-tokens",
            &CACHE_TOKENS.to_string(),
        ],
    )
    .unwrap();
    let config = tether_config(&fleet, &SIX, true, None).replace(
        "affinity: {",
        "affinity: { key_sources: [header, agent_header, prompt_cache_key, fingerprint],",
    );
    let tether = Tether::start(&TetherConfig { body: config }).unwrap();
    let target = || Target::Proxy(format!("http://{}", tether.addr));
    let mut rows: Vec<(&str, Report)> = Vec::new();
    let profiles = [
        ("header", ClientProfile::Header),
        ("agent header", ClientProfile::AgentHeader),
        ("prompt_cache_key", ClientProfile::PromptCacheKey),
        ("nothing (fingerprint)", ClientProfile::Nothing),
    ];
    for (name, profile) in profiles {
        eprintln!("  {name}");
        flush(&fleet, &SIX).await;
        let w = Workload {
            profiles: vec![profile],
            ..workload.clone()
        };
        rows.push((name, run(&w, target(), CACHE_TOKENS).await));
    }
    for (name, profile) in [
        ("header, 30 % shared head", ClientProfile::Header),
        ("nothing, 30 % shared head", ClientProfile::Nothing),
    ] {
        eprintln!("  {name}");
        flush(&fleet, &SIX).await;
        let w = Workload {
            profiles: vec![profile],
            shared_head_fraction: SHARED_HEAD_FRACTION,
            ..workload.clone()
        };
        rows.push((name, run(&w, target(), CACHE_TOKENS).await));
    }
    print_table(
        "key sources: the steady workload, every session naming itself one way (fingerprint on)",
        &rows,
    );
    let of_oracle = |name: &str| {
        rows.iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, r)| r.overall.of_oracle)
    };
    let max_over_mean = |name: &str| {
        rows.iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, r)| r.replica_max_over_mean)
    };
    println!(
        "policies/key_sources/nothing_over_header {:.3} (target >= 0.9); max/mean nothing {:.2} (target <= 1.25); \
         with 30 % shared heads: nothing_over_header {:.3}, max/mean {:.2}",
        of_oracle("nothing (fingerprint)") / of_oracle("header").max(f64::MIN_POSITIVE),
        max_over_mean("nothing (fingerprint)"),
        of_oracle("nothing, 30 % shared head")
            / of_oracle("header, 30 % shared head").max(f64::MIN_POSITIVE),
        max_over_mean("nothing, 30 % shared head"),
    );
}
