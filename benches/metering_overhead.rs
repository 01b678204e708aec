//! Streaming throughput through Tether with metering on and off, in one run. Target:
//! throughput with metering on within 5 % of off. Two stricter views are reported beside it:
//! the Tether process's CPU per request, and its user-space instructions per request.
//!
//! One simulated fleet (no delays, 100-token SSE replies = 100 events), two Tether instances
//! that differ only in `metering.enabled` (on: usage extraction, a usage log, metrics; the
//! client asks for usage, so no rewriting), and a client keeping 16 streams in flight. Rounds
//! alternate on/off (and which goes first) so the shared machine's noise hits both; the figure
//! is each Tether process's own CPU time (user + system, from /proc) per request, and the ratio
//! of medians.
//!
//! CPU time on a shared machine swings between identical rounds by as much as the effect
//! measured. So a second measurement counts instructions instead: both Tethers run under
//! `valgrind --tool=callgrind`, the counters are zeroed after a warm-up and dumped after
//! `CALLGRIND_REQUESTS` requests, and the ratio of user-space instructions per request is exact
//! and repeatable whatever else the machine does. (It leaves out kernel time, which metering
//! does not change: no extra syscalls on the request path, the log writer batches its writes.)
//! Skipped with `BENCH_NO_CALLGRIND=1` or when valgrind is missing; `BENCH_ROUNDS=0` runs only it.
//!
//! Needs release binaries: `make bench` builds them first.

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde_json::json;
use tether_benches::{
    callgrind_control, callgrind_total, median, median_and_range, valgrind_present,
};
use tether_e2e::{regions_yaml, SimFleet, TempDir, Tether, TetherConfig};

const REQUESTS: usize = 8_000;
const CONCURRENCY: usize = 16;
const ROUNDS: usize = 8;

/// CPU seconds (user, system) the process has used.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields[i].parse::<f64>().unwrap() / 100.0; // USER_HZ
    (ticks(11), ticks(12))
}

const CALLGRIND_WARMUP: usize = 200;
const CALLGRIND_REQUESTS: usize = 1_000;

async fn drive(url: Arc<String>) -> f64 {
    drive_n(url, REQUESTS).await
}

async fn drive_n(url: Arc<String>, requests: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let body = Arc::new(json!({
        "model": "tether-sim",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 100,
        "messages": [{"role": "system", "content": "s".repeat(2000)}, {"role": "user", "content": "go"}],
    }));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let (client, url, body) = (client.clone(), Arc::clone(&url), Arc::clone(&body));
        tasks.spawn(async move {
            for i in (worker..requests).step_by(CONCURRENCY) {
                let res = client
                    .post(url.as_str())
                    .header("x-session-affinity", format!("bench-{}", i % 64))
                    .json(&*body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                let mut stream = res.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    chunk.unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    requests as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let fleet = SimFleet::start(&["b-1", "b-2", "b-3"]).unwrap();
    let replicas = fleet
        .replicas
        .iter()
        .map(|(id, addr)| (id.clone(), *addr, ""))
        .collect();
    let regions = regions_yaml(&[("r", replicas)]);
    let logs = TempDir::new("tether-bench").unwrap();
    let start = |metering: bool, wrapper: &[String]| {
        let extra = if metering {
            // BENCH_NO_LOG / BENCH_NO_INJECT take those parts out, to see what each costs.
            let log = std::env::var_os("BENCH_NO_LOG").map_or_else(
                || {
                    format!(
                        "usage_log: {{ path: \"{}\" }}\n",
                        logs.path().join("usage.jsonl").display()
                    )
                },
                |_| String::new(),
            );
            let inject = std::env::var_os("BENCH_NO_INJECT").is_none();
            format!("{log}metering: {{ inject_stream_usage: {inject} }}\n")
        } else {
            "metering: { enabled: false }\n".to_owned()
        };
        Tether::start_wrapped(
            &TetherConfig {
                body: format!("local_region: r\n{regions}{extra}"),
            },
            wrapper,
        )
        .unwrap()
    };
    // BENCH_ROUNDS=0 skips the CPU-time rounds (to run only the instruction counts).
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    if rounds > 0 {
        let on = start(true, &[]);
        let off = start(false, &[]);

        let (mut on_us, mut off_us, mut on_rps, mut off_rps) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            // Alternate which goes first, so neither always runs on a warmer or colder machine.
            let order = if round % 2 == 0 {
                [("on", &on), ("off", &off)]
            } else {
                [("off", &off), ("on", &on)]
            };
            for (name, tether) in order {
                let pid = tether.process.pid();
                let before = cpu_split(pid);
                let rps = drive(Arc::new(tether.url("/v1/chat/completions"))).await;
                let after = cpu_split(pid);
                let per = |s: f64| s * 1e6 / REQUESTS as f64;
                let (user, system) = (per(after.0 - before.0), per(after.1 - before.1));
                let us = user + system;
                eprintln!(
                    "round {round} metering {name:<3}: {us:7.1} µs CPU/request \
                     (user {user:5.1}, system {system:5.1}), {rps:7.0} req/s"
                );
                if name == "on" {
                    on_us.push(us);
                    on_rps.push(rps);
                } else {
                    off_us.push(us);
                    off_rps.push(rps);
                }
            }
        }
        let (on_us, off_us) = (median(on_us), median(off_us));
        println!("metering_overhead/cpu_us_per_request_on   {on_us:.1}");
        println!("metering_overhead/cpu_us_per_request_off  {off_us:.1}");
        println!(
            "metering_overhead/ratio_on_over_off       {:.3} (CPU per request; the stricter view)",
            on_us / off_us
        );
        // Each round ran on and off back to back: the loss per round, paired.
        let paired: Vec<f64> = on_rps
            .iter()
            .zip(&off_rps)
            .map(|(on, off)| (1.0 - on / off) * 100.0)
            .collect();
        let (paired, lo, hi) = median_and_range(&paired);
        let (on_rps, off_rps) = (median(on_rps), median(off_rps));
        println!("metering_overhead/req_per_s_on_off        {on_rps:.0} / {off_rps:.0}");
        println!(
            "metering_overhead/throughput_overhead     {:.1} % of medians, {paired:.1} % paired median (rounds {lo:.1} to {hi:.1}) (target <= 5 %)",
            (1.0 - on_rps / off_rps) * 100.0,
        );
    }

    if std::env::var_os("BENCH_NO_CALLGRIND").is_some() || !valgrind_present() {
        eprintln!("instruction counts skipped (BENCH_NO_CALLGRIND set, or no valgrind)");
        return;
    }
    // BENCH_CALLGRIND_DIR keeps the dumps, for callgrind_annotate.
    let dumps = std::env::var_os("BENCH_CALLGRIND_DIR")
        .map_or_else(|| logs.path().to_path_buf(), std::path::PathBuf::from);
    let mut per_request = Vec::new();
    for metering in [true, false] {
        let out = dumps.join(format!("callgrind-{metering}.%p"));
        let wrapper = [
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--quiet".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let tether = start(metering, &wrapper);
        let pid = tether.process.pid();
        let url = Arc::new(tether.url("/v1/chat/completions"));
        drive_n(Arc::clone(&url), CALLGRIND_WARMUP).await;
        callgrind_control("-z", pid);
        drive_n(url, CALLGRIND_REQUESTS).await;
        callgrind_control("-d", pid);
        let dump = dumps.join(format!("callgrind-{metering}.{pid}.1"));
        let total = callgrind_total(&dump);
        let per = total as f64 / CALLGRIND_REQUESTS as f64;
        eprintln!(
            "callgrind metering {}: {per:.0} instructions/request",
            if metering { "on " } else { "off" }
        );
        per_request.push(per);
    }
    println!(
        "metering_overhead/instructions_per_request_on   {:.0}",
        per_request[0]
    );
    println!(
        "metering_overhead/instructions_per_request_off  {:.0}",
        per_request[1]
    );
    println!(
        "metering_overhead/instructions_ratio_on_over_off {:.3} (user space; the stricter view)",
        per_request[0] / per_request[1]
    );
}
