//! Harness for the end-to-end tests: starts the real `tether` and `replica-sim` binaries on
//! loopback, waits for readiness (never a fixed sleep) and stops them by PID when dropped,
//! even if the test fails.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executable.

// Test support: a panic with a message is how a broken environment fails a test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod tls;

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a workspace binary built by cargo (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (or `make test`, which does)",
        path.display()
    );
    path
}

/// A free loopback port. The tiny window between this and the child binding it is the only
/// race left; the sim avoids even that by binding port 0 itself.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free loopback ports. All `N` are held until the last is found: ports taken one
/// `free_port()` at a time can repeat (the kernel may hand a just-released port out again),
/// which once gave a Tether the same `listen` and `admin_listen` port in a clean CI run.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("loopback has free ports"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .map(|a| a.port())
            .expect("a bound listener has an address")
    })
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Guards a spawned child; `name` is for messages.
    pub fn new(child: Child, name: &str) -> ChildGuard {
        ChildGuard {
            child,
            name: name.into(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            if !self.has_exited() {
                eprintln!(
                    "could not kill {} (pid {}): {e}",
                    self.name,
                    self.child.id()
                );
            }
        }
        let _ = self.child.wait();
    }
}

/// A running `replica-sim` process.
#[derive(Debug)]
pub struct SimFleet {
    /// Replica id → bound address.
    pub replicas: BTreeMap<String, SocketAddr>,
    /// The fleet's admin API.
    pub admin: SocketAddr,
    /// The process.
    pub process: ChildGuard,
}

impl SimFleet {
    /// Starts one process serving `ids` with no simulated delays (`--time-scale 0`).
    pub fn start(ids: &[&str]) -> anyhow::Result<SimFleet> {
        Self::start_with(ids, &["--time-scale", "0"])
    }

    /// Starts one process serving `ids`, each on a port it picks, with extra `replica-sim`
    /// arguments, and waits until every listener is bound.
    pub fn start_with(ids: &[&str], args: &[&str]) -> anyhow::Result<SimFleet> {
        let mut cmd = Command::new(binary("replica-sim"));
        for id in ids {
            cmd.arg("--replica").arg(format!("{id}=127.0.0.1:0"));
        }
        cmd.args(["--admin", "127.0.0.1:0"]).args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning replica-sim")?;
        let stdout = child.stdout.take().context("replica-sim stdout")?;
        let process = ChildGuard {
            child,
            name: "replica-sim".into(),
        };
        let mut replicas = BTreeMap::new();
        let mut admin = None;
        // Blocks until the sim prints its ready lines (or exits, which ends the stream).
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("ready"), Some("admin"), Some(addr)) => admin = Some(addr.parse()?),
                (Some("ready"), Some(id), Some(addr)) => {
                    replicas.insert(id.to_owned(), addr.parse()?);
                }
                (Some("ready"), None, None) => {
                    let admin = admin.context("replica-sim printed no admin address")?;
                    return Ok(SimFleet {
                        replicas,
                        admin,
                        process,
                    });
                }
                _ => bail!("unexpected replica-sim output: {line:?}"),
            }
        }
        bail!("replica-sim exited before it was ready")
    }

    /// The address of replica `id`.
    pub fn addr(&self, id: &str) -> SocketAddr {
        self.replicas[id]
    }

    /// YAML for `regions:`: one region per prefix, holding this fleet's replicas whose ids
    /// start with it (`eu` → `eu-1`, `eu-2`…), in id order.
    pub fn regions_by_prefix(&self, prefixes: &[&str]) -> String {
        let regions: Vec<(&str, Vec<ReplicaLine<'_>>)> = prefixes
            .iter()
            .map(|prefix| {
                let replicas = self
                    .replicas
                    .iter()
                    .filter(|(id, _)| id.starts_with(prefix))
                    .map(|(id, addr)| (id.clone(), *addr, ""))
                    .collect();
                (*prefix, replicas)
            })
            .collect();
        regions_yaml(&regions)
    }

    /// `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Empties replica `id`'s prefix cache.
    pub async fn flush(&self, id: &str) {
        let res = reqwest::Client::new()
            .post(self.admin_url(&format!("/replicas/{id}/flush")))
            .send()
            .await
            .expect("the sim admin API answers");
        assert!(res.status().is_success(), "flushing {id}: {}", res.status());
    }

    /// Sets replica `id`'s fault (`{"kind": "refuse"}`, `{"kind": "none"}`, …).
    pub async fn set_fault(&self, id: &str, fault: serde_json::Value) {
        let res = reqwest::Client::new()
            .post(self.admin_url(&format!("/replicas/{id}/fault")))
            .json(&fault)
            .send()
            .await
            .expect("the sim admin API answers");
        assert!(
            res.status().is_success(),
            "setting fault {fault} on {id}: {}",
            res.status()
        );
    }

    /// The admin API's `GET /replicas`: faults, caches and ground-truth counters.
    pub async fn state(&self) -> serde_json::Value {
        reqwest::Client::new()
            .get(self.admin_url("/replicas"))
            .send()
            .await
            .expect("the sim admin API answers")
            .json()
            .await
            .expect("the sim admin API answers JSON")
    }
}

/// A running `tether` process.
#[derive(Debug)]
pub struct Tether {
    /// Proxy address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Where its config lives.
    pub config: PathBuf,
    /// The process.
    pub process: ChildGuard,
    dir: TempDir,
    server: ServerOpts,
}

/// The `server` settings a test or benchmark varies.
#[derive(Debug, Clone, Copy)]
pub struct ServerOpts {
    /// `server.threads`.
    pub threads: usize,
    /// `server.work_stealing`.
    pub work_stealing: bool,
    /// `server.drain_timeout`: none by default, so that SIGTERM cuts what is in flight.
    pub drain_timeout: Duration,
    /// `RUST_LOG` for the process, its log then going to [`Tether::log_path`] instead of
    /// our stderr.
    pub captured_log: Option<&'static str>,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            threads: 2,
            work_stealing: true,
            drain_timeout: Duration::ZERO,
            captured_log: None,
        }
    }
}

/// The parts of a config a test varies; `Tether::start` adds listeners and server settings.
#[derive(Debug, Clone, Default)]
pub struct TetherConfig {
    /// The YAML of `local_region`, `regions`, `tenants`, `affinity`… (without listeners).
    pub body: String,
}

impl Tether {
    /// Writes the config (with fresh loopback listeners) and starts tether, waiting until both
    /// listeners answer.
    pub fn start(config: &TetherConfig) -> anyhow::Result<Tether> {
        Self::start_wrapped(config, &[])
    }

    /// [`Tether::start`] under a wrapper command (`valgrind --tool=callgrind …`, say); the
    /// wrapper must keep tether's PID (valgrind does) so signals and `/proc` still reach it.
    pub fn start_wrapped(config: &TetherConfig, wrapper: &[String]) -> anyhow::Result<Tether> {
        Self::start_with_threads(config, wrapper, 2)
    }

    /// [`Tether::start_wrapped`] with `server.threads` set (benchmarks compare one-thread
    /// proxies).
    pub fn start_with_threads(
        config: &TetherConfig,
        wrapper: &[String],
        threads: usize,
    ) -> anyhow::Result<Tether> {
        Self::start_with_server(
            config,
            wrapper,
            ServerOpts {
                threads,
                ..ServerOpts::default()
            },
        )
    }

    /// [`Tether::start_wrapped`] with the `server` settings given.
    pub fn start_with_server(
        config: &TetherConfig,
        wrapper: &[String],
        server: ServerOpts,
    ) -> anyhow::Result<Tether> {
        let dir = TempDir::new("tether-e2e")?;
        let [port, admin_port] = free_ports();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
        let yaml = render_config(addr, admin, dir.path(), &config.body, server);
        let path = dir.path().join("tether.yaml");
        std::fs::write(&path, yaml)?;
        let log = server
            .captured_log
            .map(|level| (level, dir.path().join("tether.log")));
        let mut process = spawn_tether(wrapper, &["run", "-c"], &path, "tether", log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if process.has_exited() {
                bail!("tether exited during start-up (config {})", path.display());
            }
            if http_get_ok(admin, "/health") && TcpStream::connect(addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("tether not ready after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Tether {
            addr,
            admin,
            config: path,
            process,
            dir,
            server,
        })
    }

    /// Stops tether gracefully (SIGTERM) and waits until it exits; returns whether it exited
    /// successfully.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        let pid = self.process.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                bail!("tether did not exit within {READY_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Zero-downtime upgrade: starts a second tether with `run -u` on the same config, which
    /// waits on the upgrade socket; SIGQUIT makes this one hand over its listening sockets and
    /// drain. Returns once the old process has exited and the new one answers; `self` is then
    /// the new process.
    pub fn upgrade(&mut self) -> anyhow::Result<()> {
        let sock = self.dir.path().join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let mut new = spawn_tether(
            &[],
            &["run", "-u", "-c"],
            &self.config,
            "tether (upgraded)",
            None,
        )?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !sock.exists() {
            if new.has_exited() || Instant::now() > deadline {
                bail!("the new tether never opened {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = self.process.pid().to_string();
        if !Command::new("kill")
            .args(["-QUIT", &pid])
            .status()?
            .success()
        {
            bail!("kill -QUIT {pid} failed");
        }
        // The old process keeps serving for Pingora's close timeout (5 s), then drains.
        while !self.process.has_exited() {
            if Instant::now() > deadline {
                bail!("the old tether did not exit within {READY_TIMEOUT:?} of SIGQUIT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        while !(http_get_ok(self.admin, "/health") && TcpStream::connect(self.addr).is_ok()) {
            if new.has_exited() || Instant::now() > deadline {
                bail!("the new tether does not answer after the upgrade");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = new;
        Ok(())
    }

    /// Where its log goes when started with [`ServerOpts::captured_log`].
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tether.log")
    }

    /// Sends SIGHUP (reload the config, reopen the usage log).
    pub fn hangup(&self) -> anyhow::Result<()> {
        let pid = self.process.pid().to_string();
        if !Command::new("kill")
            .args(["-HUP", &pid])
            .status()?
            .success()
        {
            bail!("kill -HUP {pid} failed");
        }
        Ok(())
    }

    /// Replaces the config body (listeners and server settings stay), the way editors and
    /// config management do: written to a temporary file, then renamed over the config.
    pub fn rewrite_config(&self, body: &str) -> anyhow::Result<()> {
        let yaml = render_config(self.addr, self.admin, self.dir.path(), body, self.server);
        let tmp = self.dir.path().join(".tether.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Replaces the config body by rewriting the file in place (truncate, then write).
    pub fn rewrite_config_in_place(&self, body: &str) -> anyhow::Result<()> {
        let yaml = render_config(self.addr, self.admin, self.dir.path(), body, self.server);
        std::fs::write(&self.config, yaml)?;
        Ok(())
    }

    /// The Prometheus text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("the admin listener answers")
            .text()
            .await
            .expect("metrics are text")
    }

    /// `http://<proxy addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// Starts `tether <args> <config>` (under `wrapper`, if any), its log on our stderr.
fn spawn_tether(
    wrapper: &[String],
    args: &[&str],
    config: &Path,
    name: &str,
    log: Option<(&str, PathBuf)>,
) -> anyhow::Result<ChildGuard> {
    let tether = binary("tether");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&tether);
            c
        }
        None => Command::new(&tether),
    };
    let (level, stderr) = match log {
        Some((level, path)) => (level.to_owned(), Stdio::from(std::fs::File::create(path)?)),
        None => (
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            Stdio::inherit(),
        ),
    };
    let child = command
        .args(args)
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    Ok(ChildGuard {
        child,
        name: name.into(),
    })
}

/// The full config file of a test instance: its listeners, `body`, and server settings that
/// keep every file of the instance inside `dir`.
fn render_config(
    addr: SocketAddr,
    admin: SocketAddr,
    dir: &Path,
    body: &str,
    server: ServerOpts,
) -> String {
    let ServerOpts {
        threads,
        work_stealing,
        drain_timeout,
        captured_log: _,
    } = server;
    format!(
        "listen: {addr}\nadmin_listen: {admin}\n{body}\nserver:\n  threads: {threads}\n  work_stealing: {work_stealing}\n  drain_timeout: {}ms\n  graceful_shutdown_timeout: 1s\n  pid_file: {}\n  upgrade_sock: {}\n",
        drain_timeout.as_millis(),
        dir.join("tether.pid").display(),
        dir.join("upgrade.sock").display(),
    )
}

/// A minimal blocking readiness probe: `GET path` answered with 200.
fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The SHA-256 hex of an API key, as the config stores it.
pub fn api_key_sha256(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A replica line of a test config: id, address, extra YAML fields (`state: draining`).
pub type ReplicaLine<'a> = (String, SocketAddr, &'a str);

/// YAML for regions of sim replicas: `[(region, [replica lines])]`.
pub fn regions_yaml(regions: &[(&str, Vec<ReplicaLine<'_>>)]) -> String {
    let mut out = String::from("regions:\n");
    for (name, replicas) in regions {
        out.push_str(&format!("  - name: {name}\n    replicas:\n"));
        for (id, addr, extra) in replicas {
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(", {extra}")
            };
            out.push_str(&format!(
                "      - {{ id: {id}, address: \"{addr}\"{extra} }}\n"
            ));
        }
    }
    out
}
