//! Serving: builds the Pingora server (proxy, admin listener, background services) from a
//! topology file and runs it until shutdown.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tether_topology::Topology;

use crate::drain::{DrainOnShutdown, Finish, AFTER_CUT};
use crate::router::Router;
use crate::tier::Tier;
use crate::{admin, meter, probe, proxy, reload, router};

/// Fails early, with the address in the message, when a listener's port is taken: Pingora
/// would otherwise retry for 30 s and then keep running without the listener.
fn ensure_bindable(what: &str, addr: SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{what} {addr}: cannot listen"))
}

/// Serves the topology in `config` until shutdown. `upgrade` takes over the listeners of a
/// running instance; `daemon` detaches.
pub fn run(config: &std::path::Path, upgrade: bool, daemon: bool) -> anyhow::Result<()> {
    // Absolute but not resolved: a symlinked config (a Kubernetes ConfigMap) must be watched
    // through its link, which is what gets swapped.
    let config = &std::path::absolute(config)
        .with_context(|| format!("{}: cannot resolve", config.display()))?;
    // Read once: the reloader keeps the digest of exactly these bytes.
    let bytes =
        std::fs::read(config).with_context(|| format!("{}: cannot read", config.display()))?;
    let text =
        std::str::from_utf8(&bytes).with_context(|| format!("{}: not UTF-8", config.display()))?;
    let topology = Topology::from_yaml(text, &config.display().to_string())?;
    // Read before anything starts: a missing or wrong file fails the start, naming its key.
    let certs = Arc::new(crate::tls::ListenerCerts::load(&topology)?);
    if !upgrade {
        ensure_bindable("listen", topology.listen)?;
        for (i, l) in topology.listen_tls.iter().enumerate() {
            ensure_bindable(&format!("listen_tls[{i}]"), l.address)?;
        }
        if let Some(admin) = topology.admin_listen {
            ensure_bindable("admin_listen", admin)?;
        }
    }
    let listen = topology.listen;
    let admin_listen = topology.admin_listen;
    let settings = topology.server.clone();

    let mut conf = ServerConf {
        threads: settings.threads,
        work_stealing: settings.work_stealing,
        // A backstop only: the drain service ends the process when its drain is over, which
        // is before this (see `drain`).
        grace_period_seconds: Some(backstop(settings.drain_timeout).as_secs()),
        graceful_shutdown_timeout_seconds: Some(settings.graceful_shutdown_timeout.as_secs()),
        ..ServerConf::default()
    };
    // Unique per listener, so several instances (tests, regions on one host) never share them.
    conf.pid_file = settings.pid_file.map_or_else(
        || format!("/tmp/tether-{}.pid", listen.port()),
        |p| p.display().to_string(),
    );
    conf.upgrade_sock = settings.upgrade_sock.map_or_else(
        || format!("/tmp/tether-{}-upgrade.sock", listen.port()),
        |p| p.display().to_string(),
    );
    if daemon {
        // Relative paths in the config (the usage log) keep meaning what they meant.
        conf.working_directory = std::env::current_dir().ok();
    }
    let opt = Opt {
        upgrade,
        daemon,
        ..Opt::default()
    };

    let meter = Arc::new(meter::Meter::new(&topology)?);
    let tier = Tier::start(&topology)?;
    let router = Arc::new(Router::new(&topology, tier.as_ref().map(Tier::sink))?);
    if let Some(tier) = &tier {
        tier.follow(Arc::clone(&router));
    }
    let reloader = Arc::new(reload::Reloader::new(
        config,
        &bytes,
        topology,
        Arc::clone(&router),
        Arc::clone(&meter),
        Arc::clone(&certs),
    ));
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let draining = Arc::new(AtomicBool::new(false));
    server.add_service(background_service(
        "drain on upgrade",
        DrainOnUpgrade {
            phases: std::sync::Mutex::new(Some(server.watch_execution_phase())),
            draining: Arc::clone(&draining),
        },
    ));

    let tether = proxy::TetherProxy::new(
        Arc::clone(&router),
        Arc::clone(&meter),
        tier.clone(),
        Arc::clone(&draining),
    );
    let finish = {
        let (meter, tier) = (Arc::clone(&meter), tier.clone());
        Finish::new(move || {
            if let Some(tier) = &tier {
                tier.shutdown();
            }
            let (written, dropped) = meter.close();
            log::info!("usage log closed: {written} records written, {dropped} dropped");
        })
    };
    server.add_service(background_service(
        "drain on shutdown",
        DrainOnShutdown {
            in_flight: Arc::clone(tether.in_flight()),
            cut: Arc::clone(router.cut()),
            limit: settings.drain_timeout,
            finish: Arc::clone(&finish),
        },
    ));
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, tether);
    proxy.add_tcp(&listen.to_string());
    for (addr, resolver) in certs.listeners() {
        let settings = crate::tls::listener_settings(resolver)
            .map_err(|e| anyhow::anyhow!("listen_tls {addr}: {e}"))?;
        proxy.add_tls_with_settings(&addr.to_string(), None, settings);
    }
    server.add_service(proxy);

    if let Some(addr) = admin_listen {
        let mut admin = Service::new(
            "tether admin".into(),
            admin::AdminApp::new(
                Arc::clone(&router),
                Arc::clone(&meter),
                tier.clone(),
                Arc::clone(&reloader),
            ),
        );
        admin.add_tcp(&addr.to_string());
        admin.threads = Some(1);
        server.add_service(admin);
    }
    server.add_service(background_service(
        "override table maintenance",
        OverridePurge {
            router: Arc::clone(&router),
            every: Duration::from_secs(30),
        },
    ));

    if let Some(tier) = &tier {
        server.add_service(background_service(
            "sticky store resync",
            StoreResync {
                tier: tier.clone(),
                router: Arc::clone(&router),
            },
        ));
        if let Some(every) = tier.load_interval() {
            server.add_service(background_service(
                "sticky store: share load",
                ShareLoad {
                    tier: tier.clone(),
                    router: Arc::clone(&router),
                    every,
                },
            ));
        }
    }

    server.add_service(background_service(
        "health probes",
        probe::Prober::new(router::RouterProbes(Arc::clone(&router))),
    ));

    server.add_service(background_service(
        "SIGHUP: reload and reopen the usage log",
        reload::HangupHandler {
            meter: Arc::clone(&meter),
            reloader: Arc::clone(&reloader),
        },
    ));
    server.add_service(background_service(
        "config watch",
        reload::ConfigWatcher::new(Arc::clone(&reloader)),
    ));

    log::info!(
        "tether listening on {listen}{}, admin on {}, config {}",
        certs
            .listeners()
            .iter()
            .map(|(a, _)| format!(", https {a}"))
            .collect::<String>(),
        admin_listen.map_or_else(|| "none".to_owned(), |a| a.to_string()),
        config.display()
    );
    // A graceful shutdown ends in the drain service; `run` (unlike `run_forever`) returns
    // after a fast one (SIGINT), or if the backstop was reached.
    server.run(RunArgs::default());
    finish.run();
    Ok(())
}

/// Pingora's own wait after the listeners close, which the drain never reaches: the drain
/// limit, the time cut requests get to log, and a margin.
fn backstop(drain_timeout: Duration) -> Duration {
    (drain_timeout + AFTER_CUT + Duration::from_secs(2)).max(Duration::from_secs(1))
        + Duration::from_millis(999)
}

/// Sets `draining` once a binary upgrade starts handing the listeners to the new process.
/// Pingora then keeps this process serving for its close timeout (5 s) before it drops idle
/// keep-alive connections; answering `Connection: close` meanwhile moves clients to new
/// connections cleanly, so none sends a request on a connection at the moment it is dropped.
struct DrainOnUpgrade {
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
    draining: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for DrainOnUpgrade {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.phases.lock().map(|mut p| p.take()).unwrap_or(None);
        let Some(mut phases) = taken else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::GracefulUpgradeTransferringFds
                        | ExecutionPhase::GracefulUpgradeCloseTimeout) => {
                        log::info!("upgrade: handing over the listeners; closing connections after each response");
                        self.draining.store(true, Ordering::Relaxed);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Brings the local table and the shared store back into agreement whenever the store comes
/// (back) up: see [`Tier::resync`].
struct StoreResync {
    tier: Tier,
    router: Arc<Router>,
}

#[async_trait]
impl BackgroundService for StoreResync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(OVERRIDE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let epoch = self.tier.epoch();
                    if epoch != seen {
                        seen = epoch;
                        let written = self.tier.resync(&self.router).await;
                        if written > 0 {
                            log::info!("sticky store: wrote {written} bindings back after it came up");
                        }
                    }
                }
            }
        }
    }
}

/// Reports this instance's requests in flight to the tier every `every`, and expires the
/// others' reports that stopped coming.
struct ShareLoad {
    tier: Tier,
    router: Arc<Router>,
    every: Duration,
}

#[async_trait]
impl BackgroundService for ShareLoad {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.tier.share_load(&self.router),
            }
        }
    }
}

/// Keeps the override table's sweeps off the request path: runs its maintenance every `every`
/// (the idle-TTL purge), and within a tick of the table passing its capacity.
#[derive(Debug)]
struct OverridePurge {
    router: Arc<Router>,
    every: Duration,
}

/// How often [`OverridePurge`] asks whether the override table is over capacity (two atomic
/// loads). Between checks the table's ceiling bounds it; this keeps it near its capacity.
const OVERRIDE_CHECK: Duration = Duration::from_millis(250);

#[async_trait]
impl BackgroundService for OverridePurge {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(OVERRIDE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut purged = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let table = self.router.overrides();
                    if table.needs_maintenance() || purged.elapsed() >= self.every {
                        purged = tokio::time::Instant::now();
                        let done = table.maintain();
                        if done.removed() > 0 || done.over_share > 0 {
                            log::debug!(
                                "override table: {} idle entries purged, {} evicted over capacity, \
                                 {} replaced by inserts at the ceiling, {} new entries of tenants \
                                 at their share since the last run",
                                done.expired,
                                done.evicted,
                                done.evicted_on_insert,
                                done.over_share
                            );
                        }
                    }
                }
            }
        }
    }
}
