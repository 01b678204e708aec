//! How clients name their sessions: the steady workload on the 2,560-token fleet through one
//! Tether whose `key_sources` include the conversation fingerprint, once per client profile
//! (every session sending the affinity header; an agent's own session header;
//! `prompt_cache_key`; nothing at all), then with 30 % of the sessions opening with one
//! shared head ("You are a helpful assistant." and "hi"), which the fingerprint cannot tell
//! apart: what the fingerprint's weakness costs.
//!
//! The server-side alternative for clients that send nothing is prefix-aware routing: the
//! tokenless sessions also go straight to the replicas through SGLang router's `cache_aware`
//! policy ([`tether_loadgen::cache_aware`], its launcher's defaults), and both ways of routing
//! them are timed in-process over the same requests ([`super::request_cost`]).

use tether_e2e::{SimFleet, Tether, TetherConfig};
use tether_loadgen::{
    ClientPolicy, ClientProfile, Report, Target, Workload, SMALL_FLEET_BALANCE_ABS_THRESHOLD,
};

use super::{flush, print_table, request_cost, run, tether_config, CACHE_TOKENS, SIX};

/// The rows the verdict compares.
const FINGERPRINT_ROW: &str = "nothing (fingerprint)";
const PREFIX_AWARE_ROW: &str = "prefix-aware (SGLang)";
/// SGLang's policy with its load rule scaled to this fleet, for what the rule does when it
/// bites (the launcher's gap of 64 requests in flight is never reached by 16 sessions).
const PREFIX_AWARE_SMALL_FLEET_ROW: &str = "prefix-aware, balance_abs 4";

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
        (FINGERPRINT_ROW, ClientProfile::Nothing),
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
    // The same tokenless sessions, routed on their text by the client (no Tether).
    let tokenless = Workload {
        profiles: vec![ClientProfile::Nothing],
        ..workload.clone()
    };
    let urls: Vec<String> = SIX
        .iter()
        .map(|id| format!("http://{}", fleet.addr(id)))
        .collect();
    for (name, policy) in [
        (PREFIX_AWARE_ROW, ClientPolicy::PrefixAware),
        (
            PREFIX_AWARE_SMALL_FLEET_ROW,
            ClientPolicy::PrefixAwareSmallFleet,
        ),
    ] {
        eprintln!("  {name}");
        flush(&fleet, &SIX).await;
        let target = Target::Direct(urls.clone(), policy);
        rows.push((name, run(&tokenless, target, CACHE_TOKENS).await));
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
        of_oracle(FINGERPRINT_ROW) / of_oracle("header").max(f64::MIN_POSITIVE),
        max_over_mean(FINGERPRINT_ROW),
        of_oracle("nothing, 30 % shared head")
            / of_oracle("header, 30 % shared head").max(f64::MIN_POSITIVE),
        max_over_mean("nothing, 30 % shared head"),
    );
    let points = (of_oracle(FINGERPRINT_ROW) - of_oracle(PREFIX_AWARE_ROW)) * 100.0;
    let row = |name: &str| rows.iter().find(|(n, _)| *n == name).map(|(_, r)| r);
    let live_decision = row(PREFIX_AWARE_ROW).and_then(|r| r.router_decision_ns);
    // max/mean is over the replicas that answered: say how many did.
    let answering = |name: &str| row(name).map_or(0, |r| r.by_replica.len());
    println!(
        "policies/key_sources/fingerprint_vs_prefix_aware: of oracle {:.3} vs {:.3}, {points:+.1} points \
         (target >= -2); replicas answering {} vs {} of {}; prefix-aware decision in the run {}; \
         with balance_abs_threshold {SMALL_FLEET_BALANCE_ABS_THRESHOLD}: of oracle {:.3}, {:+.1} points, {} replicas answering",
        of_oracle(FINGERPRINT_ROW),
        of_oracle(PREFIX_AWARE_ROW),
        answering(FINGERPRINT_ROW),
        answering(PREFIX_AWARE_ROW),
        SIX.len(),
        live_decision.map_or("not timed".to_owned(), |ns| format!("{ns:.0} ns")),
        of_oracle(PREFIX_AWARE_SMALL_FLEET_ROW),
        (of_oracle(FINGERPRINT_ROW) - of_oracle(PREFIX_AWARE_SMALL_FLEET_ROW)) * 100.0,
        answering(PREFIX_AWARE_SMALL_FLEET_ROW),
    );
    let cost = request_cost::measure(&request_cost::replay_requests(&tokenless), SIX.len());
    request_cost::print("policies/key_sources", &cost);
    let cpu_ratio = cost.fingerprint_ns / cost.prefix_aware_ns.max(f64::MIN_POSITIVE);
    let yes = |met: bool| if met { "met" } else { "missed" };
    println!(
        "policies/key_sources/verdict: the fingerprint's share of the oracle {points:+.1} points from \
         prefix-aware routing's (within 2: {}), at {cpu_ratio:.3} of its CPU per request (a fraction: {})",
        yes(points >= -2.0),
        yes(cpu_ratio < 1.0),
    );
}
