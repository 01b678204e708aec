//! Engines that hold few sessions: what reading them is worth.
//!
//! Two fleets of the six replicas, each able to hold two sessions per replica (twelve in all):
//!
//! - **slot-limited**: the simulator in llama.cpp mode, two slots per replica, each slot's
//!   context large enough for a whole conversation; a third session on a replica takes a slot
//!   and its owner's next turn starts cold;
//! - **KV-limited**: the simulator in vLLM mode, each replica's KV cache the size of two whole
//!   conversations; requests wait for blocks and are preempted when they cannot grow.
//!
//! On each, the workload runs with 1.5× and 2× the sessions in flight that the fleet holds,
//! through Tether with `engine:` set (the engines read on every probe round), the same Tether
//! without it, and the client-side policies (nginx consistent hash, least-in-flight,
//! round-robin). Caches are flushed between runs. The table is the policies table: hits as a
//! share of the oracle's and TTFT.

use std::time::{Duration, Instant};

use tether_e2e::{SimFleet, Tether, TetherConfig};
use tether_loadgen::{ClientPolicy, Report, Workload};

use super::{print_table, run_policies, tether_config_with, Tethers, SIX};

/// Sessions each replica holds.
const PER_REPLICA: usize = 2;

/// The client-side rows.
const CLIENT_POLICIES: [(&str, ClientPolicy); 3] = [
    ("round-robin", ClientPolicy::RoundRobin),
    ("least-in-flight", ClientPolicy::LeastInflight),
    ("consistent hash (nginx)", ClientPolicy::ConsistentHash),
];

/// The workload, shortened in quick mode.
fn base_workload(quick: bool) -> Workload {
    Workload {
        turns: if quick { 4 } else { 8 },
        seed: 11,
        ..Workload::default()
    }
}

/// Tokens of a whole conversation of `w` (system prompt, then each turn's message and reply).
fn conversation_tokens(w: &Workload) -> usize {
    // The chat template adds a few tokens per message; a block of slack covers them.
    w.system_tokens + w.turns * (w.user_tokens + w.max_tokens as usize + 8) + 16
}

/// Waits until Tether holds an engine reading for every replica.
async fn engines_read(tether: &Tether) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = client
            .get(tether.admin_url("/admin/replicas"))
            .send()
            .await
            .expect("admin answers")
            .json()
            .await
            .expect("admin JSON");
        let replicas = v["replicas"].as_array().expect("replicas");
        if replicas.iter().all(|r| !r["engine"].is_null()) {
            return;
        }
        assert!(Instant::now() < deadline, "no engine readings: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One fleet: the simulator with `sim_args`, Tether with and without `engine`.
async fn run_fleet(name: &str, engine: &str, sim_args: &[String], quick: bool, scale: &str) {
    let mut args: Vec<&str> = vec!["--time-scale", scale];
    args.extend(sim_args.iter().map(String::as_str));
    let fleet = SimFleet::start_with(&SIX, &args).unwrap();
    let start = |fields: &str| {
        Tether::start(&TetherConfig {
            body: tether_config_with(&fleet, &SIX, true, None, fields),
        })
        .unwrap()
    };
    // The row under test is the default one (printed last); "locality off" is the slot the
    // table has for a variant, used here for the same Tether without engine signals.
    let tethers = Tethers {
        default: start(&format!("engine: {engine}")),
        no_locality: Some(start("")),
        shedding: None,
        hot_config: None,
    };
    engines_read(&tethers.default).await;
    let holds = PER_REPLICA * SIX.len();
    for (load, factor) in [("1.5x", 1.5), ("2x", 2.0)] {
        let in_flight = (holds as f64 * factor).round() as usize;
        let workload = Workload {
            concurrency: in_flight,
            sessions: if quick { in_flight } else { 2 * in_flight },
            arrival_rate: in_flight as f64,
            ..base_workload(quick)
        };
        eprintln!("  {name}, {load} ({in_flight} sessions in flight)");
        let cache = PER_REPLICA * conversation_tokens(&workload);
        let mut rows = run_policies(&fleet, &tethers, &workload, &CLIENT_POLICIES, cache).await;
        for (row, _) in rows.iter_mut() {
            if *row == "tether, locality off" {
                *row = "tether, no engine signals";
            }
        }
        print_table(
            &format!(
                "{name} fleet, {load} the sessions it holds ({in_flight} in flight, {holds} held)"
            ),
            &rows,
        );
        summary(name, load, &rows);
    }
}

fn summary(name: &str, load: &str, rows: &[(&str, Report)]) {
    let of_oracle = |row: &str| {
        rows.iter()
            .find(|(n, _)| *n == row)
            .map_or(0.0, |(_, r)| r.overall.of_oracle)
    };
    let tether = of_oracle("tether");
    let best_other = rows
        .iter()
        .filter(|(n, _)| *n != "tether")
        .map(|(_, r)| r.overall.of_oracle)
        .fold(0.0, f64::max);
    println!(
        "policies/engines/{name}/{load}/tether_of_oracle {tether:.3}, without engine signals {:.3}, best other row {best_other:.3} (target: the best row)",
        of_oracle("tether, no engine signals"),
    );
}

/// Runs both fleets (`scale`: the simulator's time scale).
pub(crate) async fn run_scenario(quick: bool, scale: &str) {
    // BENCH_ENGINES_FLEET=slot-limited (or KV-limited) runs one fleet.
    let only = std::env::var("BENCH_ENGINES_FLEET").ok();
    let runs = |fleet: &str| only.as_deref().is_none_or(|o| o == fleet);
    let conversation = conversation_tokens(&base_workload(quick));
    // A slot holds one whole conversation, rounded up to whole blocks.
    let slot_tokens = conversation.div_ceil(16) * 16;
    eprintln!("engines: slot-limited fleet (llama.cpp mode, {PER_REPLICA} slots per replica):");
    let slots = [
        "--engine".to_string(),
        "llamacpp".into(),
        "--slots".into(),
        PER_REPLICA.to_string(),
        "--cache-tokens".into(),
        (PER_REPLICA * slot_tokens).to_string(),
    ];
    if runs("slot-limited") {
        run_fleet("slot-limited", "llamacpp", &slots, quick, scale).await;
    }
    eprintln!(
        "engines: KV-limited fleet (vLLM mode, KV for {PER_REPLICA} conversations per replica):"
    );
    let kv = [
        "--engine".to_string(),
        "vllm".into(),
        "--cache-tokens".into(),
        (PER_REPLICA * slot_tokens).to_string(),
    ];
    if runs("KV-limited") {
        run_fleet("KV-limited", "vllm", &kv, quick, scale).await;
    }
}
