//! The fleet as routing sees it, and the lifecycle of one routed request.
//!
//! - A [`Fleet`] is one generation of the topology: one vector of [`Replica`]s, each with its
//!   spec, its upstream (the proxy's connection details: generic here, so this crate knows
//!   nothing of Pingora) and its live state, plus the selector built over them. The proxy keeps
//!   the current generation behind an atomic swap.
//! - [`FleetState`] is what outlives generations: the override table, replica tags, and each
//!   replica's live state (in-flight slots, health, tenants served, recent load), keyed by tag
//!   and kept across a reload while the replica's address stays the same.
//! - [`Fleet::route`] decides where one attempt of a request goes and returns a [`Route`]: a
//!   receipt that holds the replica's in-flight slot and is told what happened
//!   ([`Route::answered`], [`Route::failed`], [`Route::finished`]; dropped = cancelled, which
//!   releases the slot). Every bookkeeping rule — what counts as a placement, what an answer
//!   records, when a failure counts against the replica — lives here, so the whole
//!   decide → serve → record lifecycle is tested without a network.
//! - [`Attempts`] carries one request across its attempts (replicas tried, attempts that count
//!   against the limit) and applies the retry policy, [`retry_policy`]: a pure function from
//!   the facts about a failed attempt to [`Retry`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_health::{HealthPolicy, HealthState, InflightGuard, ReplicaStatus, Transition};

use crate::labels::{Admission, KvScope, Outcome};
use crate::ring::{ReplicaIdx, ReplicaSet};
use crate::selector::{
    LoadView, ReplicaInfo, ReplicaSpec, RouteRequest, Selector, SelectorOptions, ShedGate,
    TagRegistry,
};
use crate::{
    OverrideTable, Recorded, ReplicaLoad, ReplicaTag, RoutingKey, TenantScope, TenantWarmth, Warmth,
};

/// One replica as a topology generation describes it.
#[derive(Debug, Clone)]
pub struct ReplicaPlan<U> {
    /// What the selector needs (id, weight, admission, hard cap).
    pub spec: ReplicaSpec,
    /// Where it listens (a new address means a new process: its live state starts afresh).
    pub address: SocketAddr,
    /// The caller's connection details (the proxy's prebuilt peer).
    pub upstream: U,
}

/// One region as a topology generation describes it.
#[derive(Debug, Clone)]
pub struct RegionPlan<U> {
    /// Region name.
    pub name: String,
    /// Its replicas.
    pub replicas: Vec<ReplicaPlan<U>>,
    /// Where its KV cache lives.
    pub kv_scope: KvScope,
}

/// Everything a [`Fleet`] generation is built from.
#[derive(Debug, Clone)]
pub struct FleetPlan<U> {
    /// Regions in configured order.
    pub regions: Vec<RegionPlan<U>>,
    /// Selector tunables.
    pub options: SelectorOptions,
    /// Tenant locality's window; `None` = off.
    pub tenant_locality: Option<Duration>,
    /// How failures, probes and overload change health.
    pub health: HealthPolicy,
    /// The override table's idle TTL.
    pub override_ttl: Duration,
    /// The override table's capacity.
    pub override_capacity: usize,
}

/// A replica's live state: survives reloads (by tag) while its address stays the same.
#[derive(Debug, Default)]
struct LiveReplica {
    status: Arc<ReplicaStatus>,
    warmth: TenantWarmth,
    /// The sessions it is serving.
    sessions: crate::SessionActivity,
    load: ReplicaLoad,
    /// Requests in flight to it from the tier's other instances, as they last reported them
    /// ([`Fleet::set_inflight_elsewhere`]).
    inflight_elsewhere: std::sync::atomic::AtomicU32,
}

/// One replica of a generation: its spec, its upstream and its live state.
#[derive(Debug)]
pub struct Replica<U> {
    info: ReplicaInfo,
    region: Arc<str>,
    address: SocketAddr,
    upstream: U,
    live: Arc<LiveReplica>,
}

impl<U> Replica<U> {
    /// Its id.
    pub fn id(&self) -> &Arc<str> {
        &self.info.id
    }

    /// Its stable tag (what the override table stores).
    pub fn tag(&self) -> ReplicaTag {
        self.info.tag
    }

    /// Its region's name.
    pub fn region(&self) -> &Arc<str> {
        &self.region
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The caller's connection details.
    pub fn upstream(&self) -> &U {
        &self.upstream
    }

    /// Relative weight.
    pub fn weight(&self) -> u32 {
        self.info.weight
    }

    /// Admission state from the topology.
    pub fn admission(&self) -> Admission {
        self.info.admission
    }

    /// Its live health and in-flight count (shared with the probe loop and the admin API).
    pub fn status(&self) -> &Arc<ReplicaStatus> {
        &self.live.status
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> u32 {
        self.live.status.inflight()
    }

    /// Its health as routing sees it at `now`.
    pub fn health(&self, now: u64) -> HealthState {
        self.live.status.state(now)
    }
}

/// Where bindings go beyond this process: a shared store that other edges read. Told only of
/// what another edge cannot compute itself (a session's replica, when it is new or moved) and,
/// rarely, that a binding is still in use (so the store's copy does not idle out while this
/// edge's local table keeps answering).
pub trait BindingSink: Send + Sync + std::fmt::Debug {
    /// `key`, of `tenant`'s sessions, is now served by `replica`.
    fn bound(&self, key: RoutingKey, replica: &str, tenant: Option<TenantScope>);
    /// `key`'s binding to `replica` is still in use (and should be written back if the
    /// store lost it, without overwriting a newer one).
    fn still_bound(&self, key: RoutingKey, replica: &str);
    /// The idle TTL of bindings changed (a reload): the store's copies should follow it.
    fn ttl_changed(&self, _ttl: Duration) {}
}

/// What outlives a topology generation: the override table, replica tags, each replica's live
/// state, and where bindings are shared.
#[derive(Debug)]
pub struct FleetState {
    overrides: OverrideTable,
    tags: TagRegistry,
    live: Mutex<HashMap<ReplicaTag, (SocketAddr, Arc<LiveReplica>)>>,
    sink: Option<Arc<dyn BindingSink>>,
    /// Entries last touched before this second (on the table's clock) are not trusted to
    /// match the shared store: it came back after a gap in which announcements may have been
    /// missed. 0 = every entry is trusted.
    verified_since: std::sync::atomic::AtomicU32,
}

impl FleetState {
    /// Empty state with an override table of `ttl` and `capacity`.
    pub fn new(override_ttl: Duration, override_capacity: usize) -> Arc<FleetState> {
        Self::shared(override_ttl, override_capacity, None)
    }

    /// Empty state whose bindings also go to `sink`.
    pub fn shared(
        override_ttl: Duration,
        override_capacity: usize,
        sink: Option<Arc<dyn BindingSink>>,
    ) -> Arc<FleetState> {
        Arc::new(FleetState {
            overrides: OverrideTable::new(override_ttl, override_capacity),
            tags: TagRegistry::new(),
            live: Mutex::new(HashMap::new()),
            sink,
            verified_since: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The shared store came back after a gap: every entry touched until now is to be
    /// checked against it once (its next turn looks the key up before routing).
    pub fn reverify(&self) {
        let now = self.overrides.now_secs().saturating_add(1);
        self.verified_since
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the local table has an entry for `key` that needs no check against a shared
    /// store.
    pub fn knows(&self, key: RoutingKey) -> bool {
        let since = self
            .verified_since
            .load(std::sync::atomic::Ordering::Relaxed);
        self.overrides
            .get_touched(key)
            .is_some_and(|(_, touched)| touched >= since)
    }

    /// Whether bindings are shared with other instances (a sink is configured).
    pub fn shares(&self) -> bool {
        self.sink.is_some()
    }

    /// Takes in a binding change another instance announced, for a key this instance
    /// already has an entry for (a key it has never seen is looked up when it first shows up,
    /// so inserting every session of the tier would only crowd this table). Returns false
    /// for a replica id this process does not know.
    pub fn learn_if_known(&self, key: RoutingKey, replica_id: &str) -> bool {
        let Some(tag) = self.tags.get(replica_id) else {
            return false;
        };
        if self.overrides.get(key).is_some() {
            self.overrides.record(key, tag);
        }
        true
    }

    /// Takes in a binding learnt from elsewhere (the shared store, another edge's change):
    /// `key` is served by the replica `replica_id`. Returns false, changing nothing, for an id
    /// this process has never seen in a topology (garbage, or a replica of a newer config).
    /// Not passed on to the sink: it came from there.
    pub fn learn(&self, key: RoutingKey, replica_id: &str) -> bool {
        match self.tags.get(replica_id) {
            Some(tag) => {
                self.overrides.record(key, tag);
                true
            }
            None => false,
        }
    }

    /// Records that `replica` served `key`, and tells the sink what other edges need to know.
    fn bind(&self, key: RoutingKey, tenant: Option<TenantScope>, replica: &ReplicaInfo) {
        let recorded = self.overrides.record_for(key, replica.tag, tenant);
        let Some(sink) = &self.sink else {
            return;
        };
        match recorded {
            Recorded::New | Recorded::Moved => sink.bound(key, &replica.id, tenant),
            Recorded::Kept { last_touched, now }
                if refresh_due(key, last_touched, now, self.overrides.ttl_secs()) =>
            {
                sink.still_bound(key, &replica.id);
            }
            Recorded::Kept { .. } | Recorded::OverShare => {}
        }
    }

    /// The override table (key → the replica that last answered it).
    pub fn overrides(&self) -> &OverrideTable {
        &self.overrides
    }

    /// Builds a generation. Replicas keep their live state (in-flight counts, health, admin
    /// drain, tenants served, recent load) across generations by tag while their address is
    /// unchanged; a replica at a new address starts afresh. The override table takes the
    /// plan's limits.
    pub fn build<U>(self: &Arc<Self>, plan: FleetPlan<U>) -> Fleet<U> {
        let specs: Vec<crate::RegionSpec> = plan
            .regions
            .iter()
            .map(|r| crate::RegionSpec {
                name: r.name.clone(),
                replicas: r.replicas.iter().map(|p| p.spec.clone()).collect(),
                kv_scope: r.kv_scope,
            })
            .collect();
        let selector = Selector::new(&specs, plan.options, &self.tags);
        let mut replicas = Vec::with_capacity(selector.replicas().len());
        {
            // A poisoned lock means a panic mid-insert elsewhere; the map itself is sound.
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let plans = plan.regions.into_iter().flat_map(|r| r.replicas);
            for (info, p) in selector.replicas().iter().zip(plans) {
                let entry = live
                    .entry(info.tag)
                    .or_insert_with(|| (p.address, Arc::default()));
                if entry.0 != p.address {
                    *entry = (p.address, Arc::default());
                }
                replicas.push(Replica {
                    info: info.clone(),
                    region: Arc::from(selector.region_name(info.region)),
                    address: p.address,
                    upstream: p.upstream,
                    live: Arc::clone(&entry.1),
                });
            }
        }
        self.overrides
            .set_limits(plan.override_ttl, plan.override_capacity);
        if let Some(sink) = &self.sink {
            sink.ttl_changed(plan.override_ttl);
        }
        Fleet {
            selector,
            replicas,
            state: Arc::clone(self),
            locality_ms: plan.tenant_locality.map(millis),
            shedding: plan.options.shed_factor.is_some(),
            health: plan.health,
        }
    }
}

/// Whether a binding used from `last_touched` to `now` (seconds) should refresh the shared
/// store's copy: when the interval crosses one of the key's refresh points, every quarter of
/// the TTL at a phase the key sets. A session in use refreshes about four times per TTL,
/// whatever its turn rate, with no per-entry state, and refreshes of many sessions spread over
/// time instead of coming at once.
pub fn refresh_due(key: RoutingKey, last_touched: u32, now: u32, ttl_secs: u32) -> bool {
    let period = u64::from((ttl_secs / 4).max(1));
    let phase = key.0 % period;
    (u64::from(now) + phase) / period != (u64::from(last_touched) + phase) / period
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One generation of the fleet (see the module docs).
#[derive(Debug)]
pub struct Fleet<U> {
    selector: Selector,
    replicas: Vec<Replica<U>>,
    state: Arc<FleetState>,
    locality_ms: Option<u64>,
    shedding: bool,
    health: HealthPolicy,
}

impl<U> Fleet<U> {
    /// Every replica, in configured order.
    pub fn replicas(&self) -> &[Replica<U>] {
        &self.replicas
    }

    /// The replica with `id`.
    pub fn find(&self, id: &str) -> Option<&Replica<U>> {
        self.replicas.iter().find(|r| &**r.id() == id)
    }

    /// The routing snapshot (ring, regions, bounds).
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// How failures, probes and overload change health.
    pub fn health_policy(&self) -> &HealthPolicy {
        &self.health
    }

    /// The override table.
    pub fn overrides(&self) -> &OverrideTable {
        &self.state.overrides
    }

    /// The state shared by every generation.
    pub fn state(&self) -> &Arc<FleetState> {
        &self.state
    }

    /// Whether the local table has an entry for `key` it trusts (when it does not, a shared
    /// store may know better).
    pub fn knows(&self, key: RoutingKey) -> bool {
        self.state.knows(key)
    }

    /// Counts a placement another instance of the tier announced on `replica_id` as one more
    /// request in flight there, until the next sum of the tier's load reports
    /// ([`Fleet::set_inflight_elsewhere`]) replaces the estimate. A placement is announced
    /// when its answer starts, so its request is nearly always still running; without this,
    /// a replica the tier has just filled looks as empty as it was at the last report, and
    /// every instance's bounded-load limit lets new sessions pile onto it for a whole report
    /// interval. Only for an instance that receives load reports: nothing else would reset
    /// the count. Returns false for a replica this generation does not have.
    pub fn note_inflight_elsewhere(&self, replica_id: &str) -> bool {
        let Some(replica) = self.find(replica_id) else {
            return false;
        };
        replica
            .live
            .inflight_elsewhere
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Takes in a placement another instance of the tier announced: it put a session of the
    /// tenant with `tenant_tag` ([`TenantScope::locality_tag`]) on `replica_id` at about `now`.
    /// Tenant locality then counts it as if this instance had placed it, so that the
    /// instances of a tier gather each tenant on the same replicas and spread new sessions
    /// by the tier's placements, not each by its own third. Returns false for a replica this
    /// generation does not have; does nothing without tenant locality.
    pub fn note_placed_elsewhere(&self, replica_id: &str, tenant_tag: u32, now: u64) -> bool {
        let Some(replica) = self.find(replica_id) else {
            return false;
        };
        if let Some(window) = self.locality_ms {
            let live = &replica.live;
            live.warmth
                .record(TenantScope::from_locality_tag(tenant_tag), now);
            live.warmth.record_placement(now, window);
        }
        true
    }

    /// Carry-over: a session `key` that has no binding yet inherits the replica `from` is
    /// bound to (a conversation known by its fingerprint that now sends a token, or a second
    /// client naming the same conversation its own way), so its next route is sticky to the
    /// replica that holds the conversation's cache. Returns whether it did; an existing
    /// binding of `key` always wins.
    pub fn carry_over(&self, key: RoutingKey, from: RoutingKey) -> bool {
        let overrides = &self.state.overrides;
        if key == from || overrides.get(key).is_some() {
            return false;
        }
        let Some(tag) = overrides.get(from) else {
            return false;
        };
        // A replica of an older generation has no place to carry the session to.
        let Some(replica) = self.replicas.iter().find(|r| r.tag() == tag) else {
            return false;
        };
        overrides.record(key, tag);
        if let Some(sink) = &self.state.sink {
            sink.bound(key, replica.id(), None);
        }
        true
    }

    /// Takes in the requests the tier's other instances have in flight to each replica, as
    /// `elsewhere(replica id)`; bounded-load limits balance the sum with this instance's own
    /// ([`LoadView::tier_inflight`]). The hard cap and sticky eligibility stay on this
    /// instance's own count: a report is a moment old, and moving a warm session on a stale
    /// number would cost a full prefill.
    pub fn set_inflight_elsewhere(&self, elsewhere: impl Fn(&str) -> u32) {
        for replica in &self.replicas {
            replica.live.inflight_elsewhere.store(
                elsewhere(&replica.info.id),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Requests in flight per replica at this instance, for the other instances of a tier.
    pub fn inflight_report(&self) -> Vec<(&str, u32)> {
        self.replicas
            .iter()
            .map(|r| (&*r.info.id, r.live.status.inflight()))
            .collect()
    }

    /// Where the next attempt of `attempts`' request goes at `now` (milliseconds on
    /// [`tether_health::now_ms`]), or `None` when no replica anywhere can take it.
    ///
    /// Bookkeeping, all here: the replica joins the tried set and the attempt is counted; a
    /// keyed attempt counts towards the replica's recent load (sticky shedding reads it); the
    /// replica notes the tenant (tenant locality), and a keyed request that did not stay on
    /// its recorded replica counts as a *placement* there; the receipt takes an in-flight slot.
    pub fn route(self: &Arc<Self>, attempts: &mut Attempts, now: u64) -> Option<Route<U>> {
        self.expire_ejections(now);
        let view = FleetView { fleet: self, now };
        let sticky = attempts.key.and_then(|k| self.state.overrides.get(k));
        attempts.was_bound |= sticky.is_some();
        // A retry on a fresh connection goes back to the same replica only while it may still
        // keep the session; otherwise the request is decided afresh.
        let again = attempts
            .again
            .take()
            .filter(|(idx, _)| self.selector.sticky_eligible(*idx, None, &view));
        let retried_here = again.is_some();
        let (replica, outcome) = match again {
            Some(again) => again,
            None => {
                let request = RouteRequest {
                    key: attempts.key,
                    sticky,
                    tried: Some(&attempts.tried),
                    tenant: attempts.tenant,
                };
                let decision = self.selector.decide_gated(&request, &view, &view)?;
                (decision.replica, decision.outcome)
            }
        };
        let live = &self.replicas.get(replica as usize)?.live;
        attempts.tried.insert(replica);
        attempts.total += 1;
        let keyed = attempts.key.is_some();
        if let Some(key) = attempts.key {
            live.sessions.record(TenantScope::of_session(key), now);
        }
        if keyed && self.shedding {
            live.load.record_sent(now);
        }
        if let (Some(tenant), Some(window)) = (attempts.tenant, self.locality_ms) {
            live.warmth.record(tenant, now);
            if keyed && outcome != Outcome::Sticky && !retried_here {
                live.warmth.record_placement(now, window);
            }
        }
        Some(Route {
            fleet: Arc::clone(self),
            replica,
            outcome,
            was_bound: attempts.was_bound,
            key: attempts.key,
            tenant: attempts.tenant,
            slot: Some(live.status.acquire()),
            departures_when_chosen: live.status.departures(),
            body_to_judge: false,
        })
    }

    /// Without probes an ejection ends with its cooldown; with probes the probe loop ends it.
    /// Done before deciding, so that the view the selector reads changes nothing.
    fn expire_ejections(&self, now: u64) {
        if self.health.probes {
            return;
        }
        for replica in &self.replicas {
            if let Some(t) = replica.live.status.expire_ejection(now, &self.health) {
                log_transition(replica.id(), t);
            }
        }
    }
}

/// What the selector sees at one instant: atomics read without a lock, nothing written. The
/// same value is the shed gate, the one place deciding writes (shedding's timers).
struct FleetView<'a, U> {
    fleet: &'a Fleet<U>,
    now: u64,
}

impl<U> FleetView<'_, U> {
    fn live(&self, replica: ReplicaIdx) -> Option<&LiveReplica> {
        self.fleet.replicas.get(replica as usize).map(|r| &*r.live)
    }
}

impl<U> LoadView for FleetView<'_, U> {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.live(replica).map_or(0, |l| l.status.inflight())
    }

    fn tier_inflight(&self, replica: ReplicaIdx) -> u32 {
        self.live(replica).map_or(0, |l| {
            l.status.inflight().saturating_add(
                l.inflight_elsewhere
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    fn is_healthy(&self, replica: ReplicaIdx) -> bool {
        self.live(replica)
            .is_some_and(|l| l.status.usable(self.now))
    }

    fn tenant_warmth(&self, replica: ReplicaIdx, tenant: TenantScope) -> Option<Warmth> {
        let window = self.fleet.locality_ms?;
        Some(self.live(replica)?.warmth.warmth(tenant, self.now, window))
    }

    fn recent_sent(&self, replica: ReplicaIdx) -> Option<f64> {
        if !self.fleet.shedding {
            return None;
        }
        Some(self.live(replica)?.load.recent_sent(self.now))
    }

    fn engine(&self, replica: ReplicaIdx) -> Option<tether_engine::EngineReading> {
        self.live(replica)?
            .status
            .engine(self.now, self.fleet.health.engine_max_age)
    }

    fn active_sessions(&self, replica: ReplicaIdx) -> u32 {
        self.live(replica)
            .map_or(0, |l| l.sessions.active(self.now))
    }
}

impl<U> ShedGate for FleetView<'_, U> {
    fn claim_shed(&self, replica: ReplicaIdx, over: bool) -> bool {
        self.live(replica)
            .is_some_and(|l| l.load.claim_shed(over, self.now))
    }
}

/// Logs a health change at the level it deserves.
pub fn log_transition(replica: &str, t: Transition) {
    match t {
        Transition::ProbeDown => log::warn!("replica {replica} failed its health probes: out"),
        Transition::ProbeUp => log::info!("replica {replica} passes its health probes again: in"),
        Transition::Ejected(d) => log::warn!(
            "replica {replica} ejected for {} ms after consecutive failed requests",
            d.as_millis()
        ),
        Transition::EjectionExtended(d) => log::warn!(
            "replica {replica} still failing its probe: ejected for another {} ms",
            d.as_millis()
        ),
        Transition::Returned => log::info!("replica {replica} returns from ejection"),
    }
}

/// How an attempt failed, as far as health and retries care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused: nothing was sent, no time lost.
    Refused,
    /// Connecting failed otherwise (timed out, no route, handshake).
    ConnectFailed,
    /// A pooled keep-alive connection that the replica had already closed: not the replica
    /// failing, and nothing was processed.
    StaleConnection,
    /// Accepted, then no response byte within the read timeout.
    Timeout,
    /// Accepted, then reset or broken before answering.
    Broken,
    /// The replica left rotation (probes, ejection, an immediate drain) while the request
    /// waited for its answer: Tether broke the wait off. Already counted by whatever took
    /// the replica out.
    Departed,
    /// Tether cut the request at the end of a shutdown's drain: not the replica's doing,
    /// and nowhere left to send it.
    Shutdown,
    /// Answered this status (429, 502, 503, 504), which another replica may answer instead;
    /// [`Route::answered`] has already counted it.
    Status(u16),
    /// Failed after its response header went on to the client.
    AfterAnswer,
    /// The client's side failed (gone, bad request body): not the replica's doing.
    Client,
}

impl Failure {
    /// Whether this failure counts towards the replica's ejection streak.
    pub fn counts_against_replica(self) -> bool {
        matches!(
            self,
            Failure::Refused
                | Failure::ConnectFailed
                | Failure::Timeout
                | Failure::Broken
                | Failure::AfterAnswer
        )
    }

    /// Whether the attempt is free: it does not use up `max_attempts` (each replica is still
    /// tried at most once per request, and the deadline bounds the whole).
    fn free(self) -> bool {
        matches!(self, Failure::Refused | Failure::StaleConnection)
    }

    /// Label for `tether_upstream_retries_total{reason}`.
    pub fn retry_reason(self) -> &'static str {
        match self {
            Failure::Refused | Failure::ConnectFailed => "connect",
            Failure::StaleConnection => "stale_connection",
            Failure::Timeout => "timeout",
            Failure::Departed => "departed",
            Failure::Status(_) => "status",
            Failure::Broken | Failure::AfterAnswer | Failure::Client | Failure::Shutdown => "error",
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same replica again, on a fresh connection (its cache is still the warm one).
    Here,
    /// The next candidate.
    NextReplica,
    /// Answer the client with the failure.
    GiveUp,
}

/// Everything the retry policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptFacts {
    /// How the attempt failed.
    pub failure: Failure,
    /// The request may be processed twice: an idempotent method, or a path listed in
    /// `failover.retry_unanswered`.
    pub resend_safe: bool,
    /// Its body can be sent again (whole in the retry buffer).
    pub body_replayable: bool,
    /// Whether this attempt was already a retry on the same replica.
    pub was_retry_here: bool,
    /// Attempts so far that count against the limit, this one included unless it was free.
    pub counted_attempts: u32,
    /// `failover.max_attempts`.
    pub max_attempts: u32,
    /// Whether `failover.deadline` has passed since the request started.
    pub past_deadline: bool,
}

/// The retry policy (the table in docs/health.md):
///
/// | failure | retried |
/// |---|---|
/// | client side | never |
/// | after the response header reached the client | never |
/// | attempts or deadline used up | never |
/// | connect refused or failed | next replica, always: nothing reached the replica |
/// | stale pooled connection | same replica once on a fresh connection, then the next, if the request is replayable |
/// | timed out or broken before answering; its replica left rotation while it waited; answered 429/502/503/504 | next replica, if the request is safe to resend and its body is replayable |
/// | cut by a shutdown | never |
pub fn retry_policy(facts: &AttemptFacts) -> Retry {
    if matches!(
        facts.failure,
        Failure::Client | Failure::AfterAnswer | Failure::Shutdown
    ) || facts.counted_attempts >= facts.max_attempts
        || facts.past_deadline
    {
        return Retry::GiveUp;
    }
    let replayable = facts.resend_safe && facts.body_replayable;
    match facts.failure {
        Failure::Refused | Failure::ConnectFailed => Retry::NextReplica,
        Failure::StaleConnection if !replayable => Retry::GiveUp,
        Failure::StaleConnection if facts.was_retry_here => Retry::NextReplica,
        Failure::StaleConnection => Retry::Here,
        Failure::Timeout | Failure::Broken | Failure::Departed | Failure::Status(_)
            if replayable =>
        {
            Retry::NextReplica
        }
        _ => Retry::GiveUp,
    }
}

/// One request across its attempts: who it is (key, tenant), where it has been, and how many
/// attempts count against the limit.
#[derive(Debug, Default)]
pub struct Attempts {
    key: Option<RoutingKey>,
    tenant: Option<TenantScope>,
    tried: ReplicaSet,
    total: u32,
    free: u32,
    /// The next attempt goes back to this replica (a retry on a fresh connection).
    again: Option<(ReplicaIdx, Outcome)>,
    /// The last attempt was such a retry.
    retrying_here: bool,
    /// The session had a recorded replica when this request arrived.
    was_bound: bool,
}

impl Attempts {
    /// A request with routing key `key` (none: tokenless) from `tenant`.
    pub fn new(key: Option<RoutingKey>, tenant: Option<TenantScope>) -> Self {
        Attempts {
            key,
            tenant,
            ..Attempts::default()
        }
    }

    /// Its routing key.
    pub fn key(&self) -> Option<RoutingKey> {
        self.key
    }

    /// Attempts made so far.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Attempts that count against `failover.max_attempts`.
    pub fn counted(&self) -> u32 {
        self.total.saturating_sub(self.free)
    }

    /// Whether the retry policy would try again after `failure` (nothing is recorded).
    pub fn would_retry(&self, failure: Failure, limits: RetryLimits) -> bool {
        retry_policy(&self.facts(failure, limits, self.retrying_here)) != Retry::GiveUp
    }

    fn facts(&self, failure: Failure, limits: RetryLimits, was_retry_here: bool) -> AttemptFacts {
        AttemptFacts {
            failure,
            resend_safe: limits.resend_safe,
            body_replayable: limits.body_replayable,
            was_retry_here,
            counted_attempts: self.counted(),
            max_attempts: limits.max_attempts,
            past_deadline: limits.past_deadline,
        }
    }

    /// Applies the retry policy after `route` failed with `failure`; on [`Retry::Here`] the
    /// next [`Fleet::route`] goes back to the same replica.
    pub fn after_failure<U>(
        &mut self,
        route: &Route<U>,
        failure: Failure,
        limits: RetryLimits,
    ) -> Retry {
        if failure.free() {
            self.free += 1;
        }
        let was_retry_here = std::mem::take(&mut self.retrying_here);
        let verdict = retry_policy(&self.facts(failure, limits, was_retry_here));
        if verdict == Retry::Here {
            self.again = Some((route.replica, route.outcome));
            self.retrying_here = true;
        }
        verdict
    }
}

/// The request's limits and properties, for [`Attempts::after_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    /// See [`AttemptFacts::resend_safe`].
    pub resend_safe: bool,
    /// See [`AttemptFacts::body_replayable`].
    pub body_replayable: bool,
    /// `failover.max_attempts`.
    pub max_attempts: u32,
    /// See [`AttemptFacts::past_deadline`].
    pub past_deadline: bool,
}

/// What happened to a request's session, for its client (the outcome header): the routing
/// outcome without anything about the fleet's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Sent where its last turn ran (its cache is warm there).
    Warm,
    /// A session seen for the first time (or forgotten): placed.
    New,
    /// Its replica could not take it (drained, down, full, shed): its cache is cold for this
    /// turn.
    Moved,
    /// The request named no session.
    None,
}

impl SessionStatus {
    /// The header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Warm => "warm",
            SessionStatus::New => "new",
            SessionStatus::Moved => "moved",
            SessionStatus::None => "none",
        }
    }
}

/// The receipt for one attempt: the replica chosen, why, and its in-flight slot until the
/// replica is done. Tell it what happened; dropping it releases the slot (a cancelled
/// request).
#[derive(Debug)]
pub struct Route<U> {
    fleet: Arc<Fleet<U>>,
    replica: ReplicaIdx,
    outcome: Outcome,
    was_bound: bool,
    key: Option<RoutingKey>,
    tenant: Option<TenantScope>,
    slot: Option<InflightGuard>,
    /// The replica's departure count when it was chosen ([`Route::departed_since_chosen`]).
    departures_when_chosen: u64,
    /// A 2xx whose success waits for its body's verdict ([`Route::body_ended`]).
    body_to_judge: bool,
}

impl<U> Route<U> {
    /// The replica chosen.
    pub fn replica(&self) -> &Replica<U> {
        // `route` only builds receipts for replicas of this generation.
        &self.fleet.replicas[self.replica as usize]
    }

    /// Whether the replica left rotation (probe `fall`, ejection, immediate drain) since it
    /// was chosen: the request, not yet sent, is better moved than sent into a replica that
    /// is known to be gone.
    pub fn departed_since_chosen(&self) -> bool {
        self.replica().status().departures() != self.departures_when_chosen
    }

    /// Why it was chosen.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// What happened to the session, as its client may be told: nothing about topology.
    pub fn session_status(&self) -> SessionStatus {
        match self.outcome {
            Outcome::NoToken => SessionStatus::None,
            Outcome::Sticky => SessionStatus::Warm,
            // The region holds the cache: any of its replicas is warm for a known session.
            Outcome::SharedKv if self.was_bound => SessionStatus::Warm,
            Outcome::Shed | Outcome::Failover => SessionStatus::Moved,
            Outcome::CrossRegion if self.was_bound => SessionStatus::Moved,
            Outcome::SharedKv
            | Outcome::CrossRegion
            | Outcome::Ring
            | Outcome::Rebalanced
            | Outcome::Locality => SessionStatus::New,
        }
    }

    /// Whether it still holds an in-flight slot.
    pub fn in_flight(&self) -> bool {
        self.slot.is_some()
    }

    /// The replica answered `status` (its response header arrived) at `now`. A 429 or 503
    /// marks it overloaded for `retry_after` (or the policy's default); a 5xx counts towards
    /// ejection; anything else but a 429 ends its failure streak. A 2xx to a keyed request
    /// records the replica as the session's own: it has prefilled the prompt, so its cache is
    /// warm even if the body later fails, and the next turn, possibly already on its way,
    /// must find the entry.
    pub fn answered(&mut self, status: u16, retry_after: Option<Duration>, now: u64) {
        self.answer(status, retry_after, now, false);
    }

    /// As [`Route::answered`], for an answer whose body is read to its end (metering parses
    /// it): a 2xx only counts as the replica's success once [`Route::body_ended`] says the
    /// body was sound, so a replica that answers 200 with garbage is ejected like one that
    /// answers 500. The session is still recorded at once (see [`Route::answered`]).
    pub fn answered_body_to_judge(&mut self, status: u16, retry_after: Option<Duration>, now: u64) {
        self.answer(status, retry_after, now, true);
    }

    /// The body of a 2xx given to [`Route::answered_body_to_judge`] ended at `now`: `sound`
    /// if it could be parsed (usage found or not), otherwise it counts towards ejection. A
    /// body that never ends (the client left, the stream broke) records nothing here.
    pub fn body_ended(&mut self, sound: bool, now: u64) {
        if !std::mem::take(&mut self.body_to_judge) {
            return;
        }
        let replica = self.replica();
        let live = replica.status();
        if sound {
            live.record_success();
        } else if let Some(t) = live.record_failure(now, &self.fleet.health) {
            log_transition(replica.id(), t);
        }
    }

    fn answer(&mut self, status: u16, retry_after: Option<Duration>, now: u64, judge_body: bool) {
        let success_waits = judge_body && (200..300).contains(&status);
        self.body_to_judge = success_waits;
        let replica = self.replica();
        let health = &self.fleet.health;
        let live = replica.status();
        if matches!(status, 429 | 503) {
            live.record_overload(now, retry_after, health);
        }
        if status >= 500 {
            if let Some(t) = live.record_failure(now, health) {
                log_transition(replica.id(), t);
            }
        } else if status != 429 && !success_waits {
            live.record_success();
        }
        if (200..300).contains(&status) {
            if let Some(key) = self.key {
                self.fleet.state.bind(key, self.tenant, &replica.info);
            }
        }
    }

    /// The attempt failed at `now`: the slot is released, and the failure counts towards the
    /// replica's ejection when it is the replica's doing.
    pub fn failed(&mut self, failure: Failure, now: u64) {
        self.slot = None;
        if failure.counts_against_replica() {
            let replica = self.replica();
            if let Some(t) = replica.status().record_failure(now, &self.fleet.health) {
                log_transition(replica.id(), t);
            }
        }
    }

    /// The replica is done with the request (its response body ended): the slot is released
    /// before the last bytes reach the client.
    pub fn finished(&mut self) {
        self.slot = None;
    }
}

#[cfg(test)]
mod tests;
