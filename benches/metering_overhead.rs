//! Streaming throughput through Tether with metering on and off, in one run. Targets: with
//! metering on, throughput within 3 % of off (paired per round) and the Tether process's CPU
//! per request within 1.03 × off's. Its user-space instructions per request are reported beside
//! them.
//!
//! One simulated fleet (no delays, 100-token SSE replies = 100 events), two Tether instances
//! that differ only in `metering.enabled` (on: usage extraction, a usage log, metrics), and a
//! client keeping 16 streams in flight. Two rows, each measured against the same "off":
//!
//! - `asked`: the client sends `stream_options.include_usage`, so Tether only reads the usage
//!   event on its way through.
//! - `injected`: the client does not (what most clients do). Tether adds the option to the
//!   request, reads the usage event and removes it from what the client receives
//!   (`UsageChunkFilter`); with metering off the replica sends no usage event at all, so the
//!   client receives the same bytes from both instances.
//!
//! Rounds alternate on/off (and which goes first) so the shared machine's noise hits both; the
//! figures are each Tether process's own CPU time (user + system, from /proc) per request,
//! the ratio of medians, and the throughput lost, paired per round.
//!
//! CPU time on a shared machine swings between identical rounds by as much as the effect
//! measured. So a second measurement counts instructions instead: both Tethers run under
//! `valgrind --tool=callgrind`, the counters are zeroed after a warm-up and dumped after
//! `CALLGRIND_REQUESTS` requests, and the ratio of user-space instructions per request is exact
//! and repeatable whatever else the machine does. (It leaves out kernel time, which metering
//! does not change: no extra syscalls on the request path, the log writer batches its writes.)
//! Skipped with `BENCH_NO_CALLGRIND=1` or when valgrind is missing; `BENCH_ROUNDS=0` runs only it.
//! `BENCH_ROW=asked` or `BENCH_ROW=injected` runs one row only.
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

/// Whether the client asks for usage itself (`asked`) or leaves it to Tether (`injected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Asked,
    Injected,
}

impl Row {
    const ALL: [Row; 2] = [Row::Asked, Row::Injected];

    fn name(self) -> &'static str {
        match self {
            Row::Asked => "asked",
            Row::Injected => "injected",
        }
    }

    fn body(self) -> serde_json::Value {
        let mut body = json!({
            "model": "tether-sim",
            "stream": true,
            "max_tokens": 100,
            "messages": [{"role": "system", "content": "s".repeat(2000)}, {"role": "user", "content": "go"}],
        });
        if self == Row::Asked {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }
}

async fn drive(url: Arc<String>, row: Row) -> f64 {
    drive_n(url, row, REQUESTS).await
}

async fn drive_n(url: Arc<String>, row: Row, requests: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let body = Arc::new(row.body());
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
    let rows: Vec<Row> = match std::env::var("BENCH_ROW").ok().as_deref() {
        None | Some("") => Row::ALL.to_vec(),
        Some(name) => vec![Row::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .unwrap_or_else(|| panic!("BENCH_ROW={name}: asked or injected"))],
    };
    if rounds > 0 {
        let on = start(true, &[]);
        let off = start(false, &[]);

        // Per row: CPU µs per request on and off, requests per second on and off.
        let mut samples: Vec<[Vec<f64>; 4]> = rows.iter().map(|_| Default::default()).collect();
        for round in 0..rounds {
            for (row, sample) in rows.iter().zip(&mut samples) {
                // Alternate which goes first, so neither always runs on a warmer or colder
                // machine.
                let order = if round % 2 == 0 {
                    [("on", &on), ("off", &off)]
                } else {
                    [("off", &off), ("on", &on)]
                };
                for (name, tether) in order {
                    let pid = tether.process.pid();
                    let before = cpu_split(pid);
                    let rps = drive(Arc::new(tether.url("/v1/chat/completions")), *row).await;
                    let after = cpu_split(pid);
                    let per = |s: f64| s * 1e6 / REQUESTS as f64;
                    let (user, system) = (per(after.0 - before.0), per(after.1 - before.1));
                    let us = user + system;
                    eprintln!(
                        "round {round} {:<8} metering {name:<3}: {us:7.1} µs CPU/request \
                         (user {user:5.1}, system {system:5.1}), {rps:7.0} req/s",
                        row.name()
                    );
                    let at = if name == "on" { 0 } else { 1 };
                    sample[at].push(us);
                    sample[at + 2].push(rps);
                }
            }
        }
        for (row, [on_us, off_us, on_rps, off_rps]) in rows.iter().zip(samples) {
            let row = row.name();
            let (on_us, off_us) = (median(on_us), median(off_us));
            println!("metering_overhead/{row}/cpu_us_per_request_on   {on_us:.1}");
            println!("metering_overhead/{row}/cpu_us_per_request_off  {off_us:.1}");
            println!(
                "metering_overhead/{row}/ratio_on_over_off       {:.3} (CPU per request; target <= 1.03)",
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
            println!("metering_overhead/{row}/req_per_s_on_off        {on_rps:.0} / {off_rps:.0}");
            println!(
                "metering_overhead/{row}/throughput_overhead     {:.1} % of medians, {paired:.1} % paired median (rounds {lo:.1} to {hi:.1}) (target <= 3 %)",
                (1.0 - on_rps / off_rps) * 100.0,
            );
        }
    }

    if std::env::var_os("BENCH_NO_CALLGRIND").is_some() || !valgrind_present() {
        eprintln!("instruction counts skipped (BENCH_NO_CALLGRIND set, or no valgrind)");
        return;
    }
    // BENCH_CALLGRIND_DIR keeps the dumps, for callgrind_annotate.
    let dumps = std::env::var_os("BENCH_CALLGRIND_DIR")
        .map_or_else(|| logs.path().to_path_buf(), std::path::PathBuf::from);
    for row in rows {
        let mut per_request = Vec::new();
        for metering in [true, false] {
            let out = dumps.join(format!("callgrind-{}-{metering}.%p", row.name()));
            let wrapper = [
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                "--quiet".to_owned(),
                format!("--callgrind-out-file={}", out.display()),
            ];
            let tether = start(metering, &wrapper);
            let pid = tether.process.pid();
            let url = Arc::new(tether.url("/v1/chat/completions"));
            drive_n(Arc::clone(&url), row, CALLGRIND_WARMUP).await;
            callgrind_control("-z", pid);
            drive_n(url, row, CALLGRIND_REQUESTS).await;
            callgrind_control("-d", pid);
            let dump = dumps.join(format!("callgrind-{}-{metering}.{pid}.1", row.name()));
            let total = callgrind_total(&dump);
            let per = total as f64 / CALLGRIND_REQUESTS as f64;
            eprintln!(
                "callgrind {:<8} metering {}: {per:.0} instructions/request",
                row.name(),
                if metering { "on " } else { "off" }
            );
            per_request.push(per);
        }
        let row = row.name();
        println!(
            "metering_overhead/{row}/instructions_per_request_on   {:.0}",
            per_request[0]
        );
        println!(
            "metering_overhead/{row}/instructions_per_request_off  {:.0}",
            per_request[1]
        );
        println!(
            "metering_overhead/{row}/instructions_ratio_on_over_off {:.3} (user space; the stricter view)",
            per_request[0] / per_request[1]
        );
    }
}
