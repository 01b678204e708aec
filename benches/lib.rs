//! Shared fixtures for Tether's benchmarks.
//!
//! - `routing` (criterion): one routing decision with 1M sessions in the override table —
//!   override hit, ring walk, ring walk with bounded-load skips, and the whole per-request path
//!   (validate token, derive key, look up, decide).
//! - `override_memory`: bytes per override-table entry, counted by the allocator.
//! - the scenario benchmarks (`proxy_cost`, `policies`): nginx and other child processes,
//!   started on loopback and stopped when their guard is dropped.
//!
//! Run with `make bench`; results and how to read them are in `docs/performance.md`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_affinity::{
    Admission, KvScope, RegionSpec, ReplicaSpec, RoutingKey, Selector, SelectorOptions,
    TagRegistry, TenantScope, TokenRules,
};
use tether_e2e::ChildGuard;

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
                max_inflight: Some(tether_affinity::InflightCap::Fixed(64)),
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

/// Waits until `addr` accepts connections; panics if `process` exits first or 30 s pass.
pub fn wait_listening(addr: SocketAddr, what: &str, process: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(!process.has_exited(), "{what} exited during start-up");
        assert!(Instant::now() < deadline, "{what} not listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `program` with its stdout discarded and its stderr on ours.
pub fn spawn(program: &Path, args: &[&str], what: &str) -> ChildGuard {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what} ({}): {e}", program.display()));
    ChildGuard::new(child, what)
}

/// The path of a system program the benchmarks compare against or drive (nginx, haproxy,
/// wrk), looked up in the `sbin` directories too, which a user's `PATH` may lack.
pub fn which(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(program);
        if path.exists() {
            return path;
        }
    }
    panic!("{program} is missing: `make bench-deps` installs nginx, haproxy and wrk");
}

/// An nginx master process. Killing the master outright (what [`ChildGuard`] does) leaves its
/// workers running, orphaned, with the listening sockets; so the master gets SIGTERM, which
/// stops the workers too, and the guard's kill only follows if it has not exited in 5 s.
#[derive(Debug)]
pub struct NginxGuard(ChildGuard);

impl NginxGuard {
    /// The master's process id.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }
}

impl Drop for NginxGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.0.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The start of an nginx config whose every file lives under `dir` (one worker, no access
/// log, long keep-alive); the caller adds its `server` and `upstream` blocks and closes the
/// `http` block.
pub fn nginx_common(dir: &Path) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n",
        d = dir.display()
    )
}

/// nginx as a session-affinity proxy: `hash $http_x_session_affinity consistent` over
/// `upstreams`, upstream keep-alive, no response buffering (streams pass through as they
/// come). A failed upstream is handled by nginx's defaults: the request goes to the next
/// server on the ring (`proxy_next_upstream error timeout`) and the server is skipped for
/// 10 s (`max_fails=1 fail_timeout=10s`).
pub fn nginx_hash_proxy_conf(dir: &Path, listen: u16, upstreams: &[SocketAddr]) -> String {
    let mut conf = nginx_common(dir);
    conf.push_str("  upstream fleet {\n    hash $http_x_session_affinity consistent;\n");
    for addr in upstreams {
        conf.push_str(&format!("    server {addr};\n"));
    }
    conf.push_str(&format!(
        "    keepalive 256;\n    keepalive_requests 1000000;\n  }}\n  server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://fleet;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
    ));
    conf
}

/// Writes `conf` to `dir/{name}.conf` (creating the temporary directories [`nginx_common`]
/// names), starts nginx on it and waits until it listens on every port of `listen`.
pub fn start_nginx(dir: &Path, conf: &str, name: &str, listen: &[u16]) -> NginxGuard {
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(sub))
            .unwrap_or_else(|e| panic!("creating {}: {e}", dir.join(sub).display()));
    }
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let (Some(conf_path), Some(prefix)) = (path.to_str(), dir.to_str()) else {
        panic!("nginx needs UTF-8 paths: {}", path.display());
    };
    let mut guard = spawn(&which("nginx"), &["-c", conf_path, "-p", prefix], name);
    for port in listen {
        wait_listening(SocketAddr::from(([127, 0, 0, 1], *port)), name, &mut guard);
    }
    NginxGuard(guard)
}
