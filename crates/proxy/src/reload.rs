//! Hot reload of the topology file: on a file change (polled), on SIGHUP, or on
//! `POST /admin/reload`.
//!
//! The HTTPS listeners' certificate and key files are read again on every reload, and a
//! change to them alone (a renewed certificate under the same path) is a reload too: new
//! connections get the new certificate, established ones keep theirs.
//!
//! The new file is read, parsed and fully validated first; only then is the routing snapshot
//! swapped, in one atomic store. An invalid file changes nothing: the old topology keeps
//! serving, the error (with its line) is logged and returned, and
//! `tether_config_reloads_total{result="error"}` counts it.
//!
//! The watcher polls the file's metadata (every [`POLL`]) rather than using inotify: it follows
//! symlink swaps (Kubernetes ConfigMaps), editors' write-to-temp-and-rename, and in-place
//! rewrites alike, and costs one `stat` per tick. A change is read only once the metadata has
//! held still for one tick, so a file caught mid-write is not parsed half-written; and a file
//! whose bytes did not change (a `touch`) is not reloaded.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_topology::{diff, Topology, TopologyDiff};

use crate::meter::Meter;
use crate::router::{InstallError, Router};
use crate::tls::{ListenerCerts, TlsFileError};

/// How often the watcher looks at the file.
pub const POLL: Duration = Duration::from_millis(100);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new topology is live.
    Applied(TopologyDiff),
    /// The file's bytes are the ones already running.
    Unchanged,
}

impl ReloadOutcome {
    /// The admin API's answer.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ReloadOutcome::Applied(d) => json!({
                "result": "ok",
                "changes": d.changes,
                "restart_required": d.restart_required,
            }),
            ReloadOutcome::Unchanged => json!({"result": "unchanged"}),
        }
    }
}

#[derive(Debug)]
struct Running {
    /// What the process started with (listeners, threads, usage log are fixed to it).
    started: Topology,
    /// What routing runs on now.
    applied: Topology,
    /// SHA-256 of the file bytes behind `applied`.
    digest: [u8; 32],
}

/// Why a reload was not applied (the previous config keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The config file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not UTF-8.
    #[error("{path}: not UTF-8: {source}")]
    NotUtf8 {
        /// The config file.
        path: String,
        /// Where the encoding breaks.
        source: std::str::Utf8Error,
    },
    /// The topology is invalid (every problem, each naming its key).
    #[error("{0}")]
    Invalid(String),
    /// A listener's certificate or key cannot be used.
    #[error("{path}: {source}")]
    Certificates {
        /// The config file.
        path: String,
        /// Which file, and why.
        source: TlsFileError,
    },
    /// Valid, but this process cannot use it.
    #[error("{path}: {source}")]
    Install {
        /// The config file.
        path: String,
        /// Why.
        source: InstallError,
    },
    /// The reload task itself failed.
    #[error("reload task failed: {0}")]
    Task(String),
}

/// Reloads one topology file into a router.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    router: Arc<Router>,
    meter: Arc<Meter>,
    certs: Arc<ListenerCerts>,
    /// Also serialises reloads: two triggers at once apply one after the other.
    running: Mutex<Running>,
}

impl Reloader {
    /// A reloader for `path`, whose `topology` (read from `bytes`) is running now.
    pub fn new(
        path: &Path,
        bytes: &[u8],
        topology: Topology,
        router: Arc<Router>,
        meter: Arc<Meter>,
        certs: Arc<ListenerCerts>,
    ) -> Self {
        Reloader {
            path: path.to_owned(),
            router,
            meter,
            certs,
            running: Mutex::new(Running {
                started: topology.clone(),
                applied: topology,
                digest: Sha256::digest(bytes).into(),
            }),
        }
    }

    /// Reads, validates and applies the file; `trigger` names the cause in the log.
    pub fn reload(&self, trigger: &str) -> Result<ReloadOutcome, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(ReloadOutcome::Applied(d)) => {
                self.meter.count_reload("ok");
                log::info!(
                    "config reloaded ({trigger}): {}",
                    if d.changes.is_empty() {
                        "no routing change".to_owned()
                    } else {
                        d.changes.join("; ")
                    }
                );
                if !d.restart_required.is_empty() {
                    log::warn!(
                        "config ({trigger}): {} changed but cannot change while running; \
                         the old values stay until a restart or upgrade",
                        d.restart_required.join(", ")
                    );
                }
            }
            Ok(ReloadOutcome::Unchanged) => {
                log::debug!("config reload ({trigger}): file unchanged");
            }
            Err(e) => {
                self.meter.count_reload("error");
                log::error!(
                    "config reload ({trigger}) failed, still serving the previous config: {e}"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let path = || self.path.display().to_string();
        let bytes = std::fs::read(&self.path).map_err(|source| ReloadError::Read {
            path: path(),
            source,
        })?;
        let certificates = |source| ReloadError::Certificates {
            path: path(),
            source,
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest == running.digest {
            // The same config, but maybe renewed certificates under the same paths.
            let pending = self.certs.prepare(&running.applied).map_err(certificates)?;
            let changed = pending.changed(&self.certs);
            if changed.is_empty() {
                return Ok(ReloadOutcome::Unchanged);
            }
            self.certs.apply(pending);
            return Ok(ReloadOutcome::Applied(TopologyDiff {
                changes: vec![format!("certificates of {} reloaded", changed.join(", "))],
                restart_required: Vec::new(),
            }));
        }
        let text = std::str::from_utf8(&bytes).map_err(|source| ReloadError::NotUtf8 {
            path: path(),
            source,
        })?;
        let topology =
            Topology::from_yaml(text, &path()).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let mut d = diff(&running.started, &running.applied, &topology);
        let pending = self.certs.prepare(&topology).map_err(certificates)?;
        let changed = pending.changed(&self.certs);
        self.router
            .install(&topology)
            .map_err(|source| ReloadError::Install {
                path: path(),
                source,
            })?;
        self.certs.apply(pending);
        if !changed.is_empty() {
            d.changes
                .push(format!("certificates of {} reloaded", changed.join(", ")));
        }
        running.applied = topology;
        running.digest = digest;
        Ok(ReloadOutcome::Applied(d))
    }

    /// The files a change to which is a reload: the config and the listeners' certificates
    /// and keys.
    fn watched(&self) -> Vec<PathBuf> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        std::iter::once(self.path.clone())
            .chain(running.applied.listen_tls.iter().flat_map(|l| {
                l.certificates
                    .iter()
                    .flat_map(|c| [c.cert.clone(), c.key.clone()])
            }))
            .collect()
    }

    /// Whether the running config asks for the file to be watched.
    fn watching(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied
            .reload
            .watch
    }
}

/// What the watcher compares between ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a swapped link target is a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// The stamps of every watched file, in order (the config first).
fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths.iter().map(|p| stamp(p)).collect()
}

/// Polls the config file (and the certificate files it names) and reloads when one changed and
/// all have held still for a tick.
#[derive(Debug)]
pub struct ConfigWatcher {
    reloader: Arc<Reloader>,
}

impl ConfigWatcher {
    /// A watcher for `reloader`'s file.
    pub fn new(reloader: Arc<Reloader>) -> Self {
        ConfigWatcher { reloader }
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let path = self.reloader.path.clone();
        let mut paths = self.reloader.watched();
        let mut seen = stamps(&paths);
        let mut pending: Option<Vec<Option<Stamp>>> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            // A reload by any trigger may have named other certificate files: watch those
            // from their present state on.
            let current = self.reloader.watched();
            if current != paths {
                paths = current;
                seen = stamps(&paths);
                pending = None;
                continue;
            }
            let now = stamps(&paths);
            if !self.reloader.watching() {
                // Off (`reload.watch: false`): remember the file as it is, so turning the
                // watch back on (by SIGHUP or the admin API) does not replay old changes.
                seen = now;
                pending = None;
                continue;
            }
            match pending.take() {
                // Changed on the previous tick and the same now: the writer is done.
                Some(candidate) if candidate == now => {
                    seen = now;
                    if seen.first().is_some_and(Option::is_some) {
                        let reloader = Arc::clone(&self.reloader);
                        // Reading and parsing are blocking file work: keep them off the runtime.
                        let _ = tokio::task::spawn_blocking(move || reloader.reload("file change"))
                            .await;
                    } else {
                        log::warn!(
                            "config {} disappeared; still serving the last good config",
                            path.display()
                        );
                    }
                }
                // Still changing.
                Some(_) => pending = Some(now),
                None if now != seen => pending = Some(now),
                None => {}
            }
        }
    }
}

/// On SIGHUP: reopen the usage log (log rotation) and reload the config.
#[derive(Debug)]
pub struct HangupHandler {
    /// Reopens the usage log.
    pub meter: Arc<Meter>,
    /// Reloads the config.
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl BackgroundService for HangupHandler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}; no reload or log reopen on SIGHUP");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    self.meter.reopen();
                    let reloader = Arc::clone(&self.reloader);
                    let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
                }
            }
        }
    }
}
