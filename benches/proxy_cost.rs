//! What a proxy costs per request, Tether against the floor Pingora sets and against nginx and
//! HAProxy: real processes on loopback, one run, ratios only.
//!
//! - Upstream: one nginx (one worker) listening on 3 ports — 3 instances to hash onto —
//!   answering every chat completion with a fixed OpenAI JSON reply (with usage) or, for
//!   `?stream=1`, a 20-event SSE stream ending with a usage event and `[DONE]`.
//! - Load: wrk (one thread) posting chat requests with `x-session-affinity` tokens drawn from a
//!   pool of 4,096, at 64 and 256 connections.
//! - Rows, every proxy with one worker thread/process:
//!   - direct: wrk to one upstream port;
//!   - bare Pingora: `bare-pingora` (benches/bare_pingora.rs), ketama on the header, keepalive;
//!   - Tether: tenants with API keys, the override table, health probes, metering with a usage
//!     log, metrics;
//!   - Tether over TLS: the same Tether process through its HTTPS listener (`listen_tls`, a
//!     certificate the bench makes; wrk keeps its connections, so the handshake is paid once
//!     per connection and amortised over the run, and what is left is TLS's per-request cost);
//!   - Tether, tokenless: wrk sends no `x-session-affinity` (and no `prompt_cache_key`): a
//!     Tether with the conversation fingerprint on (`affinity.key_sources` ending in
//!     `fingerprint`) reads each body ahead and keys it by its head. The heads come from a pool
//!     of 4,096 (the user message names one of 4,096 conversations, the body the same size as
//!     the header rows'), as the tokens do, so the override table is warm;
//!   - Tether with a sticky store: the same as the header row, with a `sticky_store` (a real redis-server the
//!     bench starts, on the load's CPU), as one instance of a tier runs. The traffic is warm:
//!     every token's binding is in the local table before a run is measured (warm-ups repeat
//!     until one needs no store lookup), so what this row adds is the store's cost on the
//!     path every sticky request takes. The lookups made while measured are printed;
//!   - nginx: `hash $http_x_session_affinity consistent`, upstream keepalive;
//!   - HAProxy: `balance hdr(x-session-affinity)`, `hash-type consistent`,
//!     `hash-balance-factor 125`, `http-reuse always`.
//! - Per row: requests/s, latency p50/p99 (wrk), and the proxy process's CPU time (user +
//!   system, from /proc, the process and its children) per request — the most stable figure
//!   on a shared machine. Ratios to the bare-Pingora row and to nginx.
//!
//! Rows run back to back inside each scenario, in alternating order across rounds (3, or
//! `BENCH_ROUNDS`); each figure is the median round. Bare Pingora and Tether run next to each
//! other in every round, and so do Tether without and with the store, and with and without
//! the header, so Tether ÷ bare, store ÷ no store and tokenless ÷ header are also taken per
//! round (a pair shares whatever the machine was doing)
//! and reported as the median and range of those paired ratios (use an odd number of rounds:
//! with an even one the median is the upper middle value).
//! `BENCH_ROUNDS=0` runs no rounds, only the instruction counts.
//! `BENCH_QUICK=1`: one short round at 64 connections.
//! `BENCH_NO_WORK_STEALING=1`: bare Pingora and Tether both without work stealing (each worker
//! thread its own single-threaded runtime; Tether's `server.work_stealing: false`).
//! With two CPUs or more, every proxy (all its threads) runs on CPU 1 and wrk and the upstream
//! nginx on CPU 0, so the proxy under test has a core to itself; `BENCH_NO_PIN=1` turns that
//! off.
//! Needs nginx, haproxy, wrk and redis-server (`make bench-deps` installs them) and release
//! binaries.

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tether_benches::{
    callgrind_control, callgrind_total, median, median_and_range, nginx_common,
    nginx_hash_proxy_conf, spawn, start_nginx, valgrind_present, wait_listening, which,
};
use tether_e2e::{
    api_key_sha256, binary, free_port, free_ports, ServerOpts, TempDir, Tether, TetherConfig,
};
use tether_sticky_store::testing::RedisServer;

const API_KEY: &str = "sk-bench-proxy-cost";

/// The non-streaming reply: an OpenAI chat completion with usage (cached tokens included).
const JSON_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The KV cache of this conversation is warm on this replica, so this answer came quickly."},"finish_reason":"stop"}],"usage":{"prompt_tokens":1200,"completion_tokens":20,"total_tokens":1220,"prompt_tokens_details":{"cached_tokens":1024}}}"#;

/// The streaming reply: 20 content events, a usage event, `[DONE]`.
fn sse_reply() -> String {
    let mut out = String::new();
    for i in 0..20 {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\"model\":\"bench-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764000000,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":20,\"total_tokens\":1220,\"prompt_tokens_details\":{\"cached_tokens\":1024}}}\n\n");
    out.push_str("data: [DONE]\n\n");
    out
}

/// An nginx quoted string: `\` and `"` escaped, newlines as `\n` (nginx's parser reads them).
fn nginx_quote(s: &str) -> String {
    assert!(!s.contains('$'), "nginx would expand variables in {s}");
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `return 200 <text>` for a text longer than nginx's 4 KiB limit on one config token: the
/// text set into variables in pieces, returned concatenated.
fn nginx_return_long(text: &str) -> String {
    let mut out = String::new();
    let mut names = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, piece) in chars.chunks(2_000).enumerate() {
        let piece: String = piece.iter().collect();
        out.push_str(&format!("set $part{i} {}; ", nginx_quote(&piece)));
        names.push_str(&format!("$part{i}"));
    }
    out.push_str(&format!("return 200 \"{names}\";"));
    out
}

fn upstream_nginx_conf(dir: &Path, ports: &[u16]) -> String {
    let mut conf = nginx_common(dir);
    for port in ports {
        conf.push_str(&format!(
            "  server {{\n    listen 127.0.0.1:{port} reuseport;\n    location = /sse {{ internal; default_type text/event-stream; {sse} }}\n    location / {{\n      default_type application/json;\n      if ($arg_stream) {{ rewrite ^ /sse last; }}\n      return 200 {json};\n    }}\n  }}\n",
            sse = nginx_return_long(&sse_reply()),
            json = nginx_quote(JSON_REPLY),
        ));
    }
    conf.push_str("}\n");
    conf
}

/// `body` with a sticky store at `url`, its keys under `key_prefix` (defaults otherwise).
fn with_store(body: &str, url: &str, key_prefix: &str) -> String {
    format!("{body}sticky_store: {{ url: \"{url}\", key_prefix: \"{key_prefix}\" }}\n")
}

/// Tether's `tether_sticky_store_lookups_total`, every result together, from its `/metrics`.
fn store_lookup_total(admin: SocketAddr) -> f64 {
    metric_total(&metrics_text(admin), "tether_sticky_store_lookups_total")
}

/// Requests Tether's admin listener `admin` counted as keyed by the fingerprint
/// (`tether_session_key_source_total{source="fingerprint"}`).
fn fingerprint_keyed_total(admin: SocketAddr) -> f64 {
    metric_total_where(
        &metrics_text(admin),
        "tether_session_key_source_total",
        "source=\"fingerprint\"",
    )
}

/// The sum of every sample of the counter `name` in a Prometheus text.
fn metric_total(text: &str, name: &str) -> f64 {
    metric_total_where(text, name, "")
}

/// The sum of the samples of the counter `name` whose labels contain `label`.
fn metric_total_where(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Warms the Tether with the sticky store (admin listener `admin`, process `pid`) until its
/// traffic is the steady state the row measures: `warm_up` runs again until a run needed the
/// store for no token (every binding in the local table), then the process is left until it
/// is idle, so that the background work of those first sightings (writes to the store, its
/// own announcements coming back) is not measured; under valgrind it takes seconds.
fn warm_store(admin: SocketAddr, pid: u32, tries: usize, warm_up: impl Fn()) {
    for _ in 0..tries {
        let before = store_lookup_total(admin);
        warm_up();
        if store_lookup_total(admin) == before {
            break;
        }
    }
    let busy = || {
        let (user, sys) = cpu_seconds(pid);
        user + sys
    };
    let mut last = busy();
    for _ in 0..120 {
        std::thread::sleep(Duration::from_millis(500));
        let now = busy();
        // At most one 10 ms tick in half a second.
        if now - last < 0.015 {
            return;
        }
        last = now;
    }
    eprintln!("Tether with the sticky store (pid {pid}) never went idle after its warm-up");
}

/// The body of `GET /metrics` on Tether's admin listener, read up to its `Content-Length`.
fn metrics_text(admin: SocketAddr) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = TcpStream::connect(admin).expect("Tether's admin listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.expect("/metrics answers with a Content-Length")];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).expect("metrics are text")
}

fn haproxy_conf(listen: u16, upstreams: &[u16]) -> String {
    let mut conf = format!(
        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\nfrontend bench\n  bind 127.0.0.1:{listen}\n  default_backend fleet\nbackend fleet\n  balance hdr(x-session-affinity)\n  hash-type consistent\n  hash-balance-factor 125\n"
    );
    for (i, port) in upstreams.iter().enumerate() {
        conf.push_str(&format!("  server u{i} 127.0.0.1:{port}\n"));
    }
    conf
}

fn tether_body(upstreams: &[u16], log: &Path) -> String {
    let replicas: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, port)| format!("      - {{ id: up-{i}, address: \"127.0.0.1:{port}\" }}\n"))
        .collect();
    format!(
        "local_region: bench\nregions:\n  - name: bench\n    replicas:\n{replicas}tenants:\n  - {{ id: bench, api_key_sha256: \"{}\" }}\nusage_log: {{ path: \"{}\" }}\nmetering: {{ session_key: \"bench-session-key-0123456789abcdef\" }}\nhealth:\n  probe: {{ path: /health, interval: 2s, timeout: 1s }}\n",
        api_key_sha256(API_KEY),
        log.display()
    )
}

/// CPU seconds (user, system) of `pid` and every descendant (nginx's work is in its worker).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    process_tree(pid)
        .into_iter()
        .fold((0.0, 0.0), |t, (_, secs)| (t.0 + secs.0, t.1 + secs.1))
}

/// `pid` and every descendant, with the CPU seconds (user, system) of each.
fn process_tree(pid: u32) -> Vec<(u32, (f64, f64))> {
    let mut tree = Vec::new();
    let mut stack = vec![pid];
    let procs: Vec<(u32, u32, (f64, f64))> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid = f.get(1)?.parse().ok()?;
            let ticks = |i: usize| Some(f.get(i)?.parse::<f64>().ok()? / 100.0); // USER_HZ
            Some((p, ppid, (ticks(11)?, ticks(12)?)))
        })
        .collect();
    while let Some(p) = stack.pop() {
        for (child, ppid, secs) in &procs {
            if *child == p {
                tree.push((p, *secs));
            }
            if *ppid == p {
                stack.push(*child);
            }
        }
    }
    tree
}

/// The CPU the proxy under test has to itself, and the one wrk and the upstream share: with a
/// proxy sharing a core with its load generator, p99 ratios swing widely between rounds (the
/// scheduler's interleaving, not the proxy; figures in docs/performance.md). `None` with fewer than two
/// CPUs or `BENCH_NO_PIN=1`.
fn pinning() -> Option<(usize, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus >= 2 && std::env::var_os("BENCH_NO_PIN").is_none()).then_some((1, 0))
}

/// Pins `pid`, all its threads and all its descendant processes (nginx's workers) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    for (p, _) in process_tree(pid) {
        let status = Command::new("taskset")
            .args(["-a", "-cp", &cpu.to_string(), &p.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("taskset runs (util-linux)");
        assert!(status.success(), "taskset could not pin {p} to CPU {cpu}");
    }
}

const WRK_SCRIPT: &str = r#"
local tokens = {}
for i = 1, 4096 do
  tokens[i] = string.format("%08x-7e1f-4c2a-9d3b-%012x", (i * 2654435761) % 4294967296, i)
end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer API_KEY"
wrk.body = BODY
request = function()
  n = n + 1
  wrk.headers["x-session-affinity"] = tokens[n % #tokens + 1]
  return wrk.format()
end
"#;

/// The tokenless load: no session header; each body names one of 4,096 conversations in its
/// first user message (16 hex digits where the header rows' body says "our conversation", so
/// the bodies are the same size), so Tether keys it by its head's fingerprint.
const WRK_TOKENLESS_SCRIPT: &str = r#"
local bodies = {}
for i = 1, 4096 do
  bodies[i] = BODY_HEAD .. string.format("%08x%08x", (i * 2654435761) % 4294967296, i) .. BODY_TAIL
end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer API_KEY"
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[n % #bodies + 1])
end
"#;

/// The words of the requests' first user message that the tokenless load replaces with a
/// conversation's name (16 characters, as the name is).
const CONVERSATION_WORDS: &str = "our conversation";

/// The wrk script of the tokenless row for `body`.
fn tokenless_script(body: &str) -> String {
    let (head, tail) = body
        .split_once(CONVERSATION_WORDS)
        .expect("the bench's bodies name the conversation");
    WRK_TOKENLESS_SCRIPT
        .replace("BODY_HEAD", &format!("{head:?}"))
        .replace("BODY_TAIL", &format!("{tail:?}"))
        .replace("API_KEY", API_KEY)
}

#[derive(Debug, Clone, Copy, Default)]
struct WrkResult {
    requests: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn duration_us(text: &str) -> f64 {
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let v: f64 = num.parse().unwrap();
    match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        other => panic!("wrk printed an unknown unit {other}"),
    }
}

fn parse_wrk(out: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_us = duration_us(v),
            ["99%", v] => r.p99_us = duration_us(v),
            ["Requests/sec:", v] => r.rps = v.parse().unwrap(),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap(),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap(),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    assert!(
        r.requests > 0.0,
        "wrk output without a request count:\n{out}"
    );
    r
}

fn wrk(script: &Path, url: &str, connections: usize, seconds: f64) -> WrkResult {
    let mut command = match pinning() {
        Some((_, load_cpu)) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &load_cpu.to_string()]).arg(which("wrk"));
            c
        }
        None => Command::new(which("wrk")),
    };
    let out = command
        .args(["-t1", "--latency", "-s"])
        .arg(script)
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", seconds.max(1.0).round() as u64))
        .arg("--timeout")
        .arg("10s")
        .arg(url)
        .output()
        .expect("wrk runs");
    assert!(out.status.success(), "wrk failed: {:?}", out);
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

#[derive(Clone, Copy, PartialEq)]
enum Row {
    Direct,
    BarePingora,
    Tether,
    TetherTls,
    /// Tether with the fingerprint on, the load sending no session header: every request keyed
    /// by its conversation head.
    TetherTokenless,
    /// Tether configured with a `sticky_store` (a real redis-server), its traffic warm: every
    /// token's binding already in the local table, so the store is never asked.
    TetherStore,
    Nginx,
    Haproxy,
}

impl Row {
    /// Tether with and without the store next to each other, and tokenless and with the header,
    /// so that their ratios are taken between runs that follow each other in either order
    /// (TLS and bare Pingora one run away).
    const ALL: [Row; 8] = [
        Row::Direct,
        Row::BarePingora,
        Row::TetherTls,
        Row::TetherTokenless,
        Row::Tether,
        Row::TetherStore,
        Row::Nginx,
        Row::Haproxy,
    ];

    fn index(self) -> usize {
        Row::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every row is in Row::ALL")
    }

    fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct to upstream",
            Row::BarePingora => "bare Pingora",
            Row::Tether => "Tether (metering, overrides)",
            Row::TetherTls => "Tether over TLS (keep-alive)",
            Row::TetherTokenless => "Tether tokenless (fingerprint)",
            Row::TetherStore => "Tether + sticky store (Redis)",
            Row::Nginx => "nginx (hash consistent)",
            Row::Haproxy => "HAProxy (bounded hash)",
        }
    }

    /// The row's name in `BENCH_PERF_ROW` and in profile file names.
    fn slug(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::BarePingora => "bare",
            Row::Tether => "tether",
            Row::TetherTls => "tether-tls",
            Row::TetherTokenless => "tether-tokenless",
            Row::TetherStore => "tether-store",
            Row::Nginx => "nginx",
            Row::Haproxy => "haproxy",
        }
    }
}

/// With `BENCH_PERF_DIR` (and optionally `BENCH_PERF_ROW=tether|tether-store|bare|nginx|haproxy`), a
/// `perf record -g` of the proxy process during each measured run, for profiling.
/// With `BENCH_STRACE_DIR` instead, `strace -c -f` of it (syscalls per request: divide by
/// the run's requests; strace slows the process, so its CPU figures are off for that run).
fn perf_record(pid: u32, row: Row, kind: &str, connections: usize) -> Option<std::process::Child> {
    let (dir, strace) = match std::env::var_os("BENCH_STRACE_DIR") {
        Some(dir) => (dir, true),
        None => (std::env::var_os("BENCH_PERF_DIR")?, false),
    };
    let wanted = std::env::var("BENCH_PERF_ROW").unwrap_or_default();
    if !wanted.is_empty() && row.slug() != wanted {
        return None;
    }
    let slug = row.slug();
    let out = Path::new(&dir).join(format!(
        "{kind}-c{connections}-{slug}.{}",
        if strace { "strace" } else { "data" }
    ));
    let mut command = if strace {
        let mut c = Command::new("strace");
        c.args(["-c", "-f", "-p", &pid.to_string(), "-o"]);
        c
    } else {
        let mut c = Command::new("perf");
        c.args([
            "record",
            "-q",
            "-g",
            "-F",
            "999",
            "-p",
            &pid.to_string(),
            "-o",
        ]);
        c
    };
    command
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

#[derive(Clone, Copy, Default)]
struct Sample {
    wrk: WrkResult,
    cpu_us_per_req: f64,
    user_share: f64,
}

/// Pingora's default (on) unless `BENCH_NO_WORK_STEALING` is set.
fn work_stealing() -> bool {
    std::env::var_os("BENCH_NO_WORK_STEALING").is_none()
}

/// Tether's server settings: one worker, like every proxy here.
fn one_thread() -> ServerOpts {
    ServerOpts {
        threads: 1,
        work_stealing: work_stealing(),
        ..ServerOpts::default()
    }
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    if !work_stealing() {
        eprintln!("work stealing off for bare Pingora and Tether");
    }
    // BENCH_CALLGRIND_ONLY=1: only the instruction counts.
    let rounds = if std::env::var_os("BENCH_CALLGRIND_ONLY").is_some() {
        0
    } else if quick {
        1
    } else {
        std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(3)
    };
    // 3 s rounds keep `make bench` within its 15-minute budget; three of them alternate order.
    // A verdict takes more rounds (`BENCH_ROUNDS=7`), not longer ones.
    let seconds = if quick { 2.0 } else { 3.0 };
    let dir = TempDir::new("tether-proxy-cost").unwrap();

    let upstreams: [u16; 3] = free_ports();
    let upstream = start_nginx(
        dir.path(),
        &upstream_nginx_conf(dir.path(), &upstreams),
        "upstream-nginx",
        &upstreams,
    );

    // Proxies: each started once, kept for the whole run.
    let bare_port = free_port();
    let bare_listen = format!("127.0.0.1:{bare_port}");
    let mut bare_args = vec!["--listen", &bare_listen, "--threads", "1"];
    if !work_stealing() {
        bare_args.extend(["--work-stealing", "false"]);
    }
    let upstream_addrs: Vec<String> = upstreams.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for a in &upstream_addrs {
        bare_args.extend(["--upstream", a.as_str()]);
    }
    let mut bare = spawn(&binary("bare-pingora"), &bare_args, "bare-pingora");
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], bare_port)),
        "bare-pingora",
        &mut bare,
    );

    // The plain and the TLS rows are one process: its HTTPS listener serves a certificate
    // made here.
    let tls_port = free_port();
    let ca = tether_e2e::tls::TestCa::new("bench CA").unwrap();
    let cert = ca
        .server(dir.path(), "bench-edge", "bench-edge", &["127.0.0.1"])
        .unwrap();
    let tether = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                "{}listen_tls:\n  - {{ address: \"127.0.0.1:{tls_port}\", cert: \"{}\", key: \"{}\" }}\n",
                tether_body(&upstreams, &dir.path().join("usage.jsonl")),
                cert.cert.display(),
                cert.key.display()
            ),
        },
        &[],
        one_thread(),
    )
    .unwrap();
    // The tokenless row's Tether: the fingerprint on, everything else as the header row's.
    let tether_tokenless = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                "{}affinity: {{ key_sources: [header, agent_header, prompt_cache_key, fingerprint] }}\n",
                tether_body(&upstreams, &dir.path().join("usage-tokenless.jsonl"))
            ),
        },
        &[],
        one_thread(),
    )
    .unwrap();
    let redis = RedisServer::start()
        .expect("redis-server starts (`make deps` installs it) for the sticky-store row");
    let tether_store = Tether::start_with_server(
        &TetherConfig {
            body: with_store(
                &tether_body(&upstreams, &dir.path().join("usage-store.jsonl")),
                &redis.url(),
                "tether:bench:",
            ),
        },
        &[],
        one_thread(),
    )
    .unwrap();

    let nginx_port = free_port();
    let nginx_dir = dir.path().join("proxy-nginx");
    let nginx = start_nginx(
        &nginx_dir,
        &nginx_hash_proxy_conf(
            &nginx_dir,
            nginx_port,
            &upstreams.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        ),
        "proxy-nginx",
        &[nginx_port],
    );

    let haproxy_port = free_port();
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_conf(haproxy_port, &upstreams)).unwrap();
    let mut haproxy = spawn(
        &which("haproxy"),
        &["-f", haproxy_cfg.to_str().unwrap(), "-db"],
        "haproxy",
    );
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], haproxy_port)),
        "haproxy",
        &mut haproxy,
    );

    if let Some((proxy_cpu, load_cpu)) = pinning() {
        eprintln!("proxies pinned to CPU {proxy_cpu}; wrk and the upstream to CPU {load_cpu}");
        pin(upstream.pid(), load_cpu);
        // The store answers only first sightings and rare refreshes; it sits with the load.
        pin(redis.pid().expect("redis-server runs"), load_cpu);
        for pid in [
            bare.pid(),
            tether.process.pid(),
            tether_tokenless.process.pid(),
            tether_store.process.pid(),
            nginx.pid(),
            haproxy.pid(),
        ] {
            pin(pid, proxy_cpu);
        }
    }

    let target = |row: Row| -> (String, Option<u32>) {
        let http = |port: u16| format!("http://127.0.0.1:{port}");
        match row {
            Row::Direct => (http(upstreams[0]), None),
            Row::BarePingora => (http(bare_port), Some(bare.pid())),
            Row::Tether => (http(tether.addr.port()), Some(tether.process.pid())),
            Row::TetherTls => (
                format!("https://127.0.0.1:{tls_port}"),
                Some(tether.process.pid()),
            ),
            Row::TetherTokenless => (
                http(tether_tokenless.addr.port()),
                Some(tether_tokenless.process.pid()),
            ),
            Row::TetherStore => (
                http(tether_store.addr.port()),
                Some(tether_store.process.pid()),
            ),
            Row::Nginx => (http(nginx_port), Some(nginx.pid())),
            Row::Haproxy => (http(haproxy_port), Some(haproxy.pid())),
        }
    };

    let json_body = r#"{"model":"bench-model","max_tokens":20,"messages":[{"role":"system","content":"You are a careful assistant."},{"role":"user","content":"Summarise our conversation so far in one sentence."}]}"#;
    let sse_body = r#"{"model":"bench-model","max_tokens":20,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"You are a careful assistant."},{"role":"user","content":"Summarise our conversation so far in one sentence."}]}"#;
    let mut scenarios = vec![
        ("JSON", json_body, "", 64),
        ("JSON", json_body, "", 256),
        ("SSE", sse_body, "?stream=1", 64),
        ("SSE", sse_body, "?stream=1", 256),
    ];
    if quick {
        scenarios.retain(|s| s.3 == 64);
    }
    let total_runs = (scenarios.len() * Row::ALL.len() * rounds) as u64;
    let progress = indicatif::ProgressBar::new(total_runs)
        .with_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").unwrap());

    let mut results = Vec::new();
    let mut pairs: Vec<Paired> = Vec::new();
    let mut scripts: Vec<(&str, std::path::PathBuf, &str)> = Vec::new();
    for (kind, body, query, connections) in scenarios {
        let script = dir.path().join(format!("{kind}.lua"));
        let lua_body = format!("{body:?}"); // a Rust debug string is a valid Lua string here
        std::fs::write(
            &script,
            WRK_SCRIPT
                .replace("BODY", &lua_body)
                .replace("API_KEY", API_KEY),
        )
        .unwrap();
        let tokenless = dir.path().join(format!("{kind}-tokenless.lua"));
        std::fs::write(&tokenless, tokenless_script(body)).unwrap();
        if !scripts.iter().any(|(k, _, _)| *k == kind) {
            scripts.push((kind, script.clone(), query));
        }
        if rounds == 0 {
            continue;
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Row::ALL.len()];
        // Store lookups while the store row was measured: 0 when every token's binding was in
        // the local table, as intended.
        let mut store_lookups = 0.0;
        // Requests of the tokenless row keyed by the fingerprint while measured: all of them,
        // as intended.
        let mut fingerprint_keyed = 0.0;
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..Row::ALL.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let row = Row::ALL[i];
                progress.set_message(format!("{kind} c={connections} {}", row.name()));
                let (base, pid) = target(row);
                let url = format!("{base}/v1/chat/completions{query}");
                let script = if row == Row::TetherTokenless {
                    &tokenless
                } else {
                    &script
                };
                // Warm-up: connections, pools, caches, and every token's (or head's) binding.
                wrk(script, &url, connections, 1.0);
                let lookups = || store_lookup_total(tether_store.admin);
                if row == Row::TetherStore {
                    warm_store(tether_store.admin, tether_store.process.pid(), 5, || {
                        wrk(script, &url, connections, 1.0);
                    });
                }
                let lookups_before = (row == Row::TetherStore).then(lookups);
                let keyed = || fingerprint_keyed_total(tether_tokenless.admin);
                let keyed_before = (row == Row::TetherTokenless).then(keyed);
                let cpu_before = pid.map(cpu_seconds);
                let perf = pid.and_then(|p| perf_record(p, row, kind, connections));
                let result = wrk(script, &url, connections, seconds);
                if let Some(mut perf) = perf {
                    // SIGINT makes perf write its data file and exit.
                    let _ = Command::new("kill")
                        .args(["-INT", &perf.id().to_string()])
                        .status();
                    let _ = perf.wait();
                }
                let (user, sys) = pid.map_or((f64::NAN, f64::NAN), |p| {
                    let (u, s) = cpu_seconds(p);
                    let (u0, s0) = cpu_before.unwrap_or_default();
                    (u - u0, s - s0)
                });
                if let Some(before) = lookups_before {
                    store_lookups += lookups() - before;
                }
                if let Some(before) = keyed_before {
                    fingerprint_keyed += keyed() - before;
                }
                samples[i].push(Sample {
                    wrk: result,
                    cpu_us_per_req: (user + sys) * 1e6 / result.requests,
                    user_share: user / (user + sys),
                });
                progress.inc(1);
            }
        }
        // Tether ÷ bare and store ÷ no store per round: each pair ran back to back, under the
        // same conditions.
        let paired = |over: Row, under: Row, f: fn(&Sample) -> f64| -> Vec<f64> {
            samples[under.index()]
                .iter()
                .zip(&samples[over.index()])
                .map(|(u, o)| f(o) / f(u))
                .collect()
        };
        pairs.push(Paired {
            kind,
            connections,
            cpu: paired(Row::Tether, Row::BarePingora, |s| s.cpu_us_per_req),
            p99: paired(Row::Tether, Row::BarePingora, |s| s.wrk.p99_us),
            tls_cpu: paired(Row::TetherTls, Row::Tether, |s| s.cpu_us_per_req),
            tls_p99: paired(Row::TetherTls, Row::Tether, |s| s.wrk.p99_us),
            tokenless_cpu: paired(Row::TetherTokenless, Row::Tether, |s| s.cpu_us_per_req),
            tokenless_p99: paired(Row::TetherTokenless, Row::Tether, |s| s.wrk.p99_us),
            fingerprint_keyed,
            tokenless_requests: samples[Row::TetherTokenless.index()]
                .iter()
                .map(|s| s.wrk.requests)
                .sum(),
            store_cpu: paired(Row::TetherStore, Row::Tether, |s| s.cpu_us_per_req),
            store_p99: paired(Row::TetherStore, Row::Tether, |s| s.wrk.p99_us),
            store_lookups,
            store_requests: samples[Row::TetherStore.index()]
                .iter()
                .map(|s| s.wrk.requests)
                .sum(),
        });
        for (i, row) in Row::ALL.iter().enumerate() {
            let s = &samples[i];
            let pick = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
            results.push(Line {
                kind,
                connections,
                row: *row,
                rps: pick(|s| s.wrk.rps),
                p50_us: pick(|s| s.wrk.p50_us),
                p99_us: pick(|s| s.wrk.p99_us),
                cpu_us: pick(|s| s.cpu_us_per_req),
                user_share: pick(|s| s.user_share),
                errors: s.iter().map(|s| s.wrk.errors).sum::<u64>(),
            });
        }
    }
    progress.finish_and_clear();

    let upstream_args: Vec<String> = upstream_addrs
        .iter()
        .flat_map(|a| ["--upstream".to_owned(), a.clone()])
        .collect();
    if results.is_empty() {
        instruction_counts(
            dir.path(),
            &upstreams,
            &upstream_args,
            &scripts,
            &redis.url(),
        );
        return;
    }
    println!(
        "\n{:<5} {:>5}  {:<30} {:>9} {:>9} {:>9} {:>10} {:>6} {:>7} {:>7} {:>7}",
        "body",
        "conns",
        "row",
        "req/s",
        "p50",
        "p99",
        "CPU µs/req",
        "user",
        "÷ bare",
        "÷ nginx",
        "errors"
    );
    for (chunk, pair) in results.chunks(Row::ALL.len()).zip(&pairs) {
        let (bare, nginx) = (&chunk[Row::BarePingora.index()], &chunk[Row::Nginx.index()]);
        for l in chunk {
            let shown = |v: f64, digits: usize| {
                if v.is_nan() {
                    "-".to_owned()
                } else {
                    format!("{v:.digits$}")
                }
            };
            println!(
                "{:<5} {:>5}  {:<30} {:>9.0} {:>7.2}ms {:>7.2}ms {:>10} {:>6} {:>7} {:>7} {:>7}",
                l.kind,
                l.connections,
                l.row.name(),
                l.rps,
                l.p50_us / 1e3,
                l.p99_us / 1e3,
                shown(l.cpu_us, 1),
                shown(l.user_share * 100.0, 0) + "%",
                shown(l.cpu_us / bare.cpu_us, 2),
                shown(l.cpu_us / nginx.cpu_us, 2),
                l.errors,
            );
        }
        let spread = |v: &[f64]| {
            let (median, lo, hi) = median_and_range(v);
            format!("{median:.3} (rounds {lo:.2}-{hi:.2})")
        };
        println!(
            "proxy_cost/{}/c{}/tether_over_bare cpu {} (target <= 1.10) p99 {} (target <= 1.15); paired per round, {} rounds\n",
            pair.kind,
            pair.connections,
            spread(&pair.cpu),
            spread(&pair.p99),
            pair.cpu.len(),
        );
        println!(
            "proxy_cost/{}/c{}/tls_over_plain cpu {} p99 {}; paired per round (keep-alive: the handshake amortised over the run)",
            pair.kind,
            pair.connections,
            spread(&pair.tls_cpu),
            spread(&pair.tls_p99),
        );
        println!(
            "proxy_cost/{}/c{}/tokenless_over_header cpu {} (target <= 1.05) p99 {}; paired per round (the fingerprint on, no session header, heads from a pool of 4,096); keyed by the fingerprint while measured: {:.0} of {:.0} requests",
            pair.kind,
            pair.connections,
            spread(&pair.tokenless_cpu),
            spread(&pair.tokenless_p99),
            pair.fingerprint_keyed,
            pair.tokenless_requests,
        );
        println!(
            "proxy_cost/{}/c{}/store_over_no_store cpu {} (target <= 1.05) p99 {}; paired per round; store lookups while measured: {:.0} of {:.0} requests\n",
            pair.kind,
            pair.connections,
            spread(&pair.store_cpu),
            spread(&pair.store_p99),
            pair.store_lookups,
            pair.store_requests,
        );
    }
    instruction_counts(
        dir.path(),
        &upstreams,
        &upstream_args,
        &scripts,
        &redis.url(),
    );
}

/// User-space instructions per request of bare Pingora and Tether, counted by callgrind: exact
/// and repeatable whatever else the machine does, so small differences are real (kernel time,
/// the same syscalls for both, is left out). Prints one line per body kind.
fn instruction_counts(
    dir: &Path,
    upstreams: &[u16],
    upstream_args: &[String],
    scripts: &[(&str, std::path::PathBuf, &str)],
    store_url: &str,
) {
    if std::env::var_os("BENCH_NO_CALLGRIND").is_some() || !valgrind_present() {
        eprintln!("instruction counts skipped (BENCH_NO_CALLGRIND set, or no valgrind)");
        return;
    }
    let dumps = std::env::var_os("BENCH_CALLGRIND_DIR")
        .map_or_else(|| dir.to_path_buf(), std::path::PathBuf::from);
    let wrapper = |name: &str| {
        vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--quiet".to_owned(),
            format!(
                "--callgrind-out-file={}",
                dumps.join(format!("callgrind-{name}.%p")).display()
            ),
        ]
    };
    let bare_port = free_port();
    let listen = format!("127.0.0.1:{bare_port}");
    let mut args: Vec<String> = wrapper("bare")[1..].to_vec();
    args.push(binary("bare-pingora").display().to_string());
    args.extend([
        "--listen".to_owned(),
        listen,
        "--threads".to_owned(),
        "1".to_owned(),
        "--work-stealing".to_owned(),
        work_stealing().to_string(),
    ]);
    args.extend(upstream_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bare = spawn(Path::new("valgrind"), &args, "bare-pingora under callgrind");
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], bare_port)),
        "bare-pingora under callgrind",
        &mut bare,
    );
    let tether = Tether::start_with_server(
        &TetherConfig {
            body: tether_body(upstreams, &dir.join("usage-callgrind.jsonl")),
        },
        &wrapper("tether"),
        one_thread(),
    )
    .unwrap();
    // Its own key prefix: the bindings the measured rows left in the store stay out of it.
    let tether_store = Tether::start_with_server(
        &TetherConfig {
            body: with_store(
                &tether_body(upstreams, &dir.join("usage-callgrind-store.jsonl")),
                store_url,
                "tether:callgrind:",
            ),
        },
        &wrapper("tether-store"),
        one_thread(),
    )
    .unwrap();
    let rows = [
        ("bare", bare_port, bare.pid(), None),
        ("tether", tether.addr.port(), tether.process.pid(), None),
        (
            "tether-store",
            tether_store.addr.port(),
            tether_store.process.pid(),
            Some(tether_store.admin),
        ),
    ];
    let mut per_request = std::collections::BTreeMap::new();
    for (name, port, pid, store_admin) in rows {
        for (dump, (kind, script, query)) in scripts.iter().enumerate() {
            let url = format!("http://127.0.0.1:{port}/v1/chat/completions{query}");
            // Warm-up. Each wrk run starts again from the pool's first token, so it lasts
            // long enough, at valgrind's speed, to reach every token: Tether's rows are then
            // measured on sessions it knows, as the rounds above are.
            wrk(script, &url, 16, 6.0);
            if let Some(admin) = store_admin {
                warm_store(admin, pid, 5, || {
                    wrk(script, &url, 16, 6.0);
                });
            }
            callgrind_control("-z", pid);
            let result = wrk(script, &url, 16, 3.0);
            callgrind_control("-d", pid);
            let file = dumps.join(format!("callgrind-{name}.{pid}.{}", dump + 1));
            let per = callgrind_total(&file) as f64 / result.requests;
            per_request.insert((*kind, name), per);
        }
    }
    for (kind, _, _) in scripts {
        let (bare, tether, store) = (
            per_request[&(*kind, "bare")],
            per_request[&(*kind, "tether")],
            per_request[&(*kind, "tether-store")],
        );
        println!(
            "proxy_cost/{kind}/instructions_per_request bare {bare:.0} tether {tether:.0} ratio {:.3}; with the sticky store {store:.0}, {:.3} x without",
            tether / bare,
            store / tether
        );
    }
}

/// Tether ÷ bare Pingora, over TLS ÷ plain, tokenless ÷ with the header, and with the sticky
/// store ÷ without, one value per round.
struct Paired {
    kind: &'static str,
    connections: usize,
    cpu: Vec<f64>,
    p99: Vec<f64>,
    tls_cpu: Vec<f64>,
    tls_p99: Vec<f64>,
    /// Tokenless (fingerprint) ÷ the header row.
    tokenless_cpu: Vec<f64>,
    tokenless_p99: Vec<f64>,
    /// Requests the tokenless row's Tether keyed by the fingerprint while measured, and the
    /// requests of those runs.
    fingerprint_keyed: f64,
    tokenless_requests: f64,
    store_cpu: Vec<f64>,
    store_p99: Vec<f64>,
    /// Store lookups during the store row's measured runs, and the requests of those runs.
    store_lookups: f64,
    store_requests: f64,
}

/// One row of the results table: medians over the rounds.
struct Line {
    kind: &'static str,
    connections: usize,
    row: Row,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us: f64,
    user_share: f64,
    errors: u64,
}
