//! Real `redis-server` processes for tests: a node, a TLS node, a 3-node cluster.
//!
//! Each server listens on a free port of 127.0.0.1, keeps its files in a scratch directory,
//! has persistence off (a restart comes back empty), and is killed by PID when its guard is
//! dropped, even when the test fails. Readiness is polled with `PING`, never slept for.
//! Needs `redis-server` (and `redis-cli` for a cluster, `openssl` for TLS) on `PATH`; on
//! Debian: `apt-get install -y redis-server`.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first `PING`.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a new cluster may take to report `cluster_state:ok` on every node.
const CLUSTER_OK_WITHIN: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(10);

/// A port on 127.0.0.1 that was free a moment ago. Redis cannot be handed a bound socket, so
/// a race with another process is possible: [`RedisServer::start`] retries on another port.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` child process; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: ScratchDir,
    extra_args: Vec<String>,
    tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl RedisServer {
    /// Starts a node on a free port and waits until it answers.
    pub fn start() -> io::Result<RedisServer> {
        Self::start_with(Vec::new(), false)
    }

    /// Starts a node on `port` (from [`free_port`]), for a test that starts the store first.
    pub fn start_on(port: u16) -> io::Result<RedisServer> {
        let mut server = RedisServer::new(port, Vec::new())?;
        server.launch()?;
        Ok(server)
    }

    /// Starts a node that speaks only TLS, with a certificate for `127.0.0.1` signed by a
    /// throwaway CA ([`ca_file`](Self::ca_file)). Fails with [`io::ErrorKind::Unsupported`] if
    /// this `redis-server` was built without TLS.
    pub fn start_tls() -> io::Result<RedisServer> {
        Self::start_with(Vec::new(), true)
    }

    fn start_with(extra_args: Vec<String>, tls: bool) -> io::Result<RedisServer> {
        let mut last_error = None;
        for _attempt in 0..5 {
            let mut server = RedisServer::new(free_port()?, extra_args.clone())?;
            if tls {
                server.tls = Some(make_tls_files(&server.dir.path)?);
            }
            match server.launch() {
                Ok(()) => return Ok(server),
                // Lost the port to another process: try another.
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no free port")))
    }

    fn new(port: u16, extra_args: Vec<String>) -> io::Result<RedisServer> {
        Ok(RedisServer {
            child: None,
            port,
            dir: ScratchDir::new()?,
            extra_args,
            tls: None,
        })
    }

    /// The URL to give the store (`rediss://` for a TLS node).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CA certificate (PEM) of a TLS node.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca.as_path())
    }

    /// Freezes the process (`SIGSTOP`): connections stay open but nothing is answered.
    pub fn pause(&self) -> io::Result<()> {
        self.signal("STOP")
    }

    /// Thaws a paused process (`SIGCONT`).
    pub fn resume(&self) -> io::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("redis-server is not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{name} {pid} failed")))
        }
    }

    /// Kills the process now (`SIGKILL`) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills the process and starts a fresh one on the same port: it comes back empty.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill()?;
        self.launch()
    }

    /// A blocking connection, for a test to read or plant values behind the store's back.
    pub fn connection(&self) -> io::Result<redis::Connection> {
        self.client()?
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(io::Error::other)
    }

    /// Runs one command on a blocking connection.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> io::Result<T> {
        cmd.query(&mut self.connection()?).map_err(io::Error::other)
    }

    fn client(&self) -> io::Result<redis::Client> {
        match &self.tls {
            None => redis::Client::open(self.url()),
            Some(tls) => {
                crate::settings::install_tls_crypto();
                redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(std::fs::read(&tls.ca)?),
                    },
                )
            }
        }
        .map_err(io::Error::other)
    }

    fn launch(&mut self) -> io::Result<()> {
        let dir = &self.dir.path;
        let log_file = dir.join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log_file);
        match &self.tls {
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
            Some(tls) => {
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca);
            }
        }
        command
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command.spawn().map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "redis-server is not on PATH (Debian: apt-get install -y redis-server)",
                )
            } else {
                err
            }
        })?;
        self.child = Some(child);
        self.wait_ready(&log_file)
    }

    fn wait_ready(&mut self, log_file: &Path) -> io::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let client = self.client()?;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                let mut log = std::fs::read_to_string(log_file).unwrap_or_default();
                if let Some(mut child) = self.child.take() {
                    if let Some(mut stderr) = child.stderr.take() {
                        let _ = io::Read::read_to_string(&mut stderr, &mut log);
                    }
                }
                let kind = if log.contains("Address already in use") {
                    io::ErrorKind::AddrInUse
                } else if log.contains("Bad directive") && self.tls.is_some() {
                    io::ErrorKind::Unsupported
                } else {
                    io::ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!("redis-server on port {} exited: {log}", self.port),
                ));
            }
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
            if pong.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("redis-server on port {} never answered PING", self.port),
                ));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused process.
        let _ = self.kill();
    }
}

/// A Redis Cluster of three primaries (no replicas) on free ports; killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start() -> io::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let bus_port = free_port()?;
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus_port.to_string(),
                "--cluster-node-timeout",
                "5000",
            ];
            nodes.push(RedisServer::start_with(
                args.iter().map(|arg| arg.to_string()).collect(),
                false,
            )?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|err| io::Error::new(err.kind(), format!("redis-cli: {err}")))?;
        if !created.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}",
                output_text(&created)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn wait_ok(&self) -> io::Result<()> {
        let deadline = Instant::now() + CLUSTER_OK_WITHIN;
        loop {
            let mut all_ok = true;
            for node in &self.nodes {
                let info: String = node.query(redis::cmd("CLUSTER").arg("INFO"))?;
                all_ok &= info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains("cluster_known_nodes:3");
            }
            if all_ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the cluster never reported cluster_state:ok on every node",
                ));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// The URL of the first node, to give the store as its seed.
    pub fn seed_url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes, seed first.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, to kill, pause or restart one.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

/// Generates a throwaway CA and a server certificate for 127.0.0.1 and localhost with the
/// `openssl` command (always on Debian), so the crate needs no certificate library.
fn make_tls_files(dir: &Path) -> io::Result<TlsFiles> {
    let files = TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    let ca_key = dir.join("ca.key");
    let csr = dir.join("server.csr");
    let extensions = dir.join("server.ext");
    std::fs::write(
        &extensions,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(|c| {
        c.args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&files.ca)
            .args(["-days", "2", "-subj", "/CN=tether-test-ca"])
    })?;
    openssl(|c| {
        c.arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(&files.key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", "/CN=localhost"])
    })?;
    openssl(|c| {
        c.args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&files.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-days", "2", "-out"])
            .arg(&files.cert)
            .arg("-extfile")
            .arg(&extensions)
    })?;
    Ok(files)
}

fn openssl(args: impl FnOnce(&mut Command) -> &mut Command) -> io::Result<()> {
    let mut command = Command::new("openssl");
    let output = args(&mut command)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| io::Error::new(err.kind(), format!("openssl: {err}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl failed: {}",
            output_text(&output)
        )))
    }
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A directory under the system temp dir, removed when dropped.
#[derive(Debug)]
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> io::Result<ScratchDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tether-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
