//! Active health probes: every `interval`, an HTTP `GET` of each replica's probe path, all
//! replicas at once, each bounded by `timeout`; the results feed [`ReplicaStatus::record_probe`].
//!
//! The HTTP exchange is pingora-load-balancing's `HttpHealthCheck` (Pingora's own connector and
//! HTTP/1 client, the stack the proxy itself uses); its `LoadBalancer` / `Backends` machinery is
//! not used, because routing is our ring and the rise / fall / ejection logic must also take
//! passive signals (failed requests, Retry-After), which that machinery has no place for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;

use pingora_core::connectors::http::Connector;
use tether_engine::EngineKind;
use tether_health::{now_ms, HealthPolicy, ReplicaStatus, Transition};

use crate::engine_probe::{self, EngineAnswer};

/// How probes are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Request path (`GET`), answered `200` by a healthy replica.
    pub path: String,
    /// Time between the starts of two probe rounds.
    pub interval: Duration,
    /// Limit on one probe, connect to end of body.
    pub timeout: Duration,
}

/// One replica to probe.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// Replica id, for logs.
    pub id: Arc<str>,
    /// Where it listens.
    pub address: SocketAddr,
    /// How the proxy connects to it (TLS, server name, CAs, client certificate): probes
    /// connect the same way.
    pub peer: pingora::upstreams::peer::HttpPeer,
    /// Its live status, which the result updates.
    pub status: Arc<ReplicaStatus>,
    /// Its engine, read instead of the health path when it has an endpoint.
    pub engine: EngineKind,
    /// The replica's own credential (engine endpoints may need it).
    pub credential: Option<(http::HeaderName, http::HeaderValue)>,
}

/// What one probe round needs, read fresh every round so a reloaded topology applies at once.
#[derive(Debug, Clone)]
pub struct ProbeRound {
    /// Probe settings; `None` = probes are off (the loop idles and checks again later).
    pub settings: Option<ProbeSettings>,
    /// How results change health.
    pub policy: HealthPolicy,
    /// The replicas.
    pub targets: Vec<ProbeTarget>,
}

/// The source of probe rounds (the proxy's router).
pub trait ProbeSource: Send + Sync + 'static {
    /// The current round.
    fn round(&self) -> ProbeRound;
    /// Called for every state change a probe causes (for logs and metrics).
    fn on_transition(&self, _target: &ProbeTarget, _transition: Transition) {}
}

/// The probe loop, as a Pingora background service.
#[derive(Debug)]
pub struct Prober<S> {
    source: S,
}

impl<S: ProbeSource> Prober<S> {
    /// A prober over `source`.
    pub fn new(source: S) -> Self {
        Prober { source }
    }

    /// Probes every target once, concurrently, and applies the results.
    pub async fn probe_once(&self, round: &ProbeRound, checkers: &mut Checkers) {
        let Some(settings) = &round.settings else {
            return;
        };
        checkers.configure(settings);
        // Forget checkers of replicas no longer in the topology.
        checkers
            .by_address
            .retain(|address, _| round.targets.iter().any(|t| t.address == *address));
        let plans: Vec<_> = round
            .targets
            .iter()
            .map(|target| (target, checkers.get(target), checkers.engine_due(target)))
            .collect();
        let engine_connector = &checkers.engine_connector;
        let probes = plans.into_iter().map(|(target, checker, read_engine)| {
            async move {
                if read_engine {
                    let answer = engine_probe::read(
                        engine_connector,
                        target.address,
                        target.engine,
                        target.credential.as_ref(),
                        settings.timeout,
                    )
                    .await;
                    match answer {
                        EngineAnswer::Read(reading) => {
                            return (target, Ok(()), EngineResult::Read(reading));
                        }
                        EngineAnswer::Unavailable(status) => {
                            let why = format!("engine endpoint answered {status}");
                            return (target, Err(why), EngineResult::Unread);
                        }
                        EngineAnswer::Failed(why) => {
                            return (target, Err(why), EngineResult::Unread);
                        }
                        // Falls through to the health path below.
                        EngineAnswer::NotServed(why) => {
                            log::info!(
                                "replica {}: no {} reading ({why}); routing on Tether's own \
                                 signals, trying again in {} rounds",
                                target.id,
                                target.engine.as_str(),
                                engine_probe::RETRY_ROUNDS
                            );
                            let result = health_check(checker, target, settings).await;
                            return (target, result, EngineResult::NotServed);
                        }
                    }
                }
                let result = health_check(checker, target, settings).await;
                (target, result, EngineResult::Unread)
            }
        });
        let results = join_all(probes).await;
        for (target, result, engine) in results {
            let now = now_ms();
            match engine {
                EngineResult::Read(reading) => target.status.record_engine(Some(&reading), now),
                EngineResult::NotServed => {
                    checkers.rest_engine(target.address);
                    target.status.record_engine(None, now);
                }
                EngineResult::Unread => target.status.record_engine(None, now),
            }
            let ok = result.is_ok();
            if let Err(why) = &result {
                log::debug!("probe of {} ({}) failed: {why}", target.id, target.address);
            }
            if let Some(t) = target.status.record_probe(ok, now, &round.policy) {
                self.source.on_transition(target, t);
            }
        }
    }
}

/// What a round learnt of a replica's engine.
enum EngineResult {
    Read(tether_engine::EngineReading),
    /// The engine endpoint is not served: rest it for a while.
    NotServed,
    /// Not read this round (no engine, resting, or no answer).
    Unread,
}

async fn health_check(
    checker: Option<Arc<HttpHealthCheck>>,
    target: &ProbeTarget,
    settings: &ProbeSettings,
) -> Result<(), String> {
    match checker {
        Some(check) => tokio::time::timeout(settings.timeout, check.check(&check_backend(target)))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        None => Err("no checker".to_owned()),
    }
}

fn check_backend(target: &ProbeTarget) -> Backend {
    Backend {
        addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(target.address),
        weight: 1,
        ext: Default::default(),
    }
}

/// One `HttpHealthCheck` per replica address (each sends its own `Host`), rebuilt when the
/// probe settings change; the connector for engine reads, and the engines resting after their
/// endpoint was not served (rounds left).
pub struct Checkers {
    settings: Option<ProbeSettings>,
    /// With the peer's reuse hash (its address and TLS settings, the CA list through its group
    /// key), to rebuild a checker whose replica's TLS settings changed.
    by_address: HashMap<SocketAddr, (u64, Arc<HttpHealthCheck>)>,
    engine_connector: Connector,
    engine_resting: HashMap<SocketAddr, u32>,
}

impl Default for Checkers {
    fn default() -> Self {
        Checkers {
            settings: None,
            by_address: HashMap::new(),
            engine_connector: Connector::new(None),
            engine_resting: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for Checkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkers")
            .field("settings", &self.settings)
            .field("replicas", &self.by_address.len())
            .finish()
    }
}

impl Checkers {
    /// Whether this round reads `target`'s engine; counts a resting engine's rounds down.
    fn engine_due(&mut self, target: &ProbeTarget) -> bool {
        if target.engine.probe_path().is_none() {
            return false;
        }
        match self.engine_resting.get_mut(&target.address) {
            Some(0) | None => {
                self.engine_resting.remove(&target.address);
                true
            }
            Some(left) => {
                *left -= 1;
                false
            }
        }
    }

    fn rest_engine(&mut self, address: SocketAddr) {
        self.engine_resting
            .insert(address, engine_probe::RETRY_ROUNDS);
    }

    fn configure(&mut self, settings: &ProbeSettings) {
        if self.settings.as_ref() != Some(settings) {
            self.by_address.clear();
            self.settings = Some(settings.clone());
        }
    }

    fn get(&mut self, target: &ProbeTarget) -> Option<Arc<HttpHealthCheck>> {
        use pingora::upstreams::peer::Peer;
        let settings = self.settings.as_ref()?;
        let address = target.address;
        let peer_hash = target.peer.reuse_hash();
        if let Some((hash, c)) = self.by_address.get(&address) {
            if *hash == peer_hash {
                return Some(Arc::clone(c));
            }
        }
        let mut check = HttpHealthCheck::new(&address.to_string(), false);
        check.peer_template = target.peer.clone();
        // Rise and fall are ours (they also weigh passive signals): one result per probe.
        check.consecutive_success = 1;
        check.consecutive_failure = 1;
        check.peer_template.options.connection_timeout = Some(settings.timeout);
        check.peer_template.options.read_timeout = Some(settings.timeout);
        check.peer_template.options.write_timeout = Some(settings.timeout);
        match pingora::http::RequestHeader::build("GET", settings.path.as_bytes(), None).and_then(
            |mut req| {
                req.append_header("Host", address.to_string())?;
                req.append_header("User-Agent", "tether-health-probe")?;
                Ok(req)
            },
        ) {
            Ok(req) => check.req = req,
            Err(e) => {
                log::error!("health probe request for {address}: {e}");
                return None;
            }
        }
        let check = Arc::new(check);
        self.by_address
            .insert(address, (peer_hash, Arc::clone(&check)));
        Some(check)
    }
}

#[async_trait]
impl<S: ProbeSource> BackgroundService for Prober<S> {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut checkers = Checkers::default();
        loop {
            let round = self.source.round();
            let interval = round
                .settings
                .as_ref()
                .map_or(Duration::from_secs(1), |s| s.interval);
            let started = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.changed() => return,
                () = self.probe_once(&round, &mut checkers) => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(started + interval) => {}
            }
        }
    }
}
