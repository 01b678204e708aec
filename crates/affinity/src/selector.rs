//! The routing decision: override → ring with bounded loads → other regions.
//!
//! A [`Selector`] is an immutable snapshot of the fleet built from the topology; the proxy swaps
//! in a new one on reload. Live state (in-flight counts, health) is read through [`LoadView`], and
//! the override table is consulted by the caller, so [`Selector::decide`] is a pure function of
//! its inputs and is tested without a network.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tether_engine::EngineReading;

use crate::labels::{InflightCap, KvScope, Placement};
use crate::ring::{ReplicaIdx, Ring};
use crate::{Admission, Outcome, ReplicaSet, ReplicaTag, RoutingKey, TenantScope, Warmth};

/// Live per-replica state the selector reads (the proxy backs it with atomics). Reading it
/// changes nothing.
pub trait LoadView {
    /// Requests this instance has in flight to the replica: what its hard cap and a sticky
    /// session's eligibility are judged by.
    fn inflight(&self, replica: ReplicaIdx) -> u32;
    /// Requests in flight to the replica across the tier: this instance's and, as they last
    /// reported them, the other instances' (the proxy's shared load). What the bounded-load
    /// limits balance, so that the instances of a tier place new sessions as one instance
    /// taking every request would. Without a tier, this instance's own.
    fn tier_inflight(&self, replica: ReplicaIdx) -> u32 {
        self.inflight(replica)
    }
    /// Whether health checks consider the replica usable.
    fn is_healthy(&self, _replica: ReplicaIdx) -> bool {
        true
    }
    /// What the replica's record says about `tenant` (see [`crate::TenantWarmth`]); `None`
    /// when tenant locality is off, and new sessions follow the ring alone.
    fn tenant_warmth(&self, _replica: ReplicaIdx, _tenant: TenantScope) -> Option<Warmth> {
        None
    }
    /// Requests sent to the replica recently ([`crate::ReplicaLoad::recent_sent`]); `None`
    /// when not tracked, and no sticky session is shed.
    fn recent_sent(&self, _replica: ReplicaIdx) -> Option<f64> {
        None
    }
    /// The replica's engine's latest reading; `None` when it is not read, did not answer or
    /// the reading is stale, and routing uses Tether's own signals alone.
    fn engine(&self, _replica: ReplicaIdx) -> Option<EngineReading> {
        None
    }
    /// Distinct sessions the replica is serving ([`crate::SessionActivity::active`]), turns
    /// between which nothing is in flight included.
    fn active_sessions(&self, _replica: ReplicaIdx) -> u32 {
        0
    }
}

/// KV usage at or above which a replica has no headroom for a new session.
pub const KV_HEADROOM_LIMIT: f64 = 0.9;

/// Whether an engine reading leaves room for one more session, given `active` sessions
/// recently routed to the replica. A replica with sequence slots (llama.cpp, SGLang) is full
/// when its active sessions — or its running and waiting requests, if more — fill them: a
/// further session would evict one of theirs. Any replica is full while requests wait or its
/// KV cache is nearly all held by running requests (vLLM).
pub fn has_headroom(reading: &EngineReading, active: u32) -> bool {
    let load = &reading.load;
    if load.waiting > 0 || load.kv_usage.is_some_and(|u| u >= KV_HEADROOM_LIMIT) {
        return false;
    }
    reading
        .capacity
        .sequences
        .is_none_or(|slots| active.max(load.running) < slots)
}

/// Whether a sticky session should leave its replica: the engine's queue holds more than a
/// full batch (its sequences, or 16 when it does not say). Short of that a warm session stays,
/// since moving it costs a full prefill; and even then only for a replica of its region with
/// room ([`Selector::sticky_eligible`]).
pub fn truly_full(reading: &EngineReading) -> bool {
    reading.load.waiting > reading.capacity.sequences.unwrap_or(16).max(1)
}

/// Whether an over-limit replica gives up a sticky session now. Unlike [`LoadView`], this is
/// where deciding changes state: the gate tracks how long the excess has lasted and spaces
/// sheds out ([`crate::ReplicaLoad::claim_shed`]). The selector tells it about every sticky
/// decision it checks, over the limit or not.
pub trait ShedGate {
    /// Notes whether `replica` is `over` the limit and answers whether it sheds now.
    fn claim_shed(&self, replica: ReplicaIdx, over: bool) -> bool;
}

/// A gate without memory: every over-limit replica sheds at once (for tests and models).
#[derive(Debug, Clone, Copy, Default)]
pub struct ShedWhenOver;

impl ShedGate for ShedWhenOver {
    fn claim_shed(&self, _replica: ReplicaIdx, over: bool) -> bool {
        over
    }
}

impl LoadView for [u32] {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.get(replica as usize).copied().unwrap_or(0)
    }
}

impl LoadView for Vec<u32> {
    fn inflight(&self, replica: ReplicaIdx) -> u32 {
        self.as_slice().inflight(replica)
    }
}

/// One replica as the topology describes it.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// Unique id (also its position on the ring).
    pub id: String,
    /// Relative share of sessions (≥ 1).
    pub weight: u32,
    /// Whether it takes new work.
    pub admission: Admission,
    /// Hard cap on concurrent requests; at the cap the replica is skipped even for its own
    /// sessions. `None` = no cap.
    pub max_inflight: Option<InflightCap>,
}

/// One region as the topology describes it.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// Region name.
    pub name: String,
    /// Its replicas (at least one).
    pub replicas: Vec<ReplicaSpec>,
    /// Where its KV cache lives: in each replica (hard affinity) or in a tier the whole region
    /// reaches (soft affinity inside the region).
    pub kv_scope: KvScope,
}

/// Tunables of a [`Selector`].
#[derive(Debug, Clone, Copy)]
pub struct SelectorOptions {
    /// `c` in the bounded-load rule (≥ 1).
    pub balance_factor: f64,
    /// Ring points per unit of weight.
    pub points_per_weight: u32,
    /// Index (into the regions given to [`Selector::new`]) of the region this edge runs in:
    /// tokenless requests go there, and it is the first fallback for every other home region.
    pub local_region: usize,
    /// Sticky shedding (see [`crate::ReplicaLoad`]): a replica that has served more than this
    /// × the fleet's mean (per unit of weight) sheds sticky sessions. `None` = never (the
    /// default); values below 1 count as 1.
    pub shed_factor: Option<f64>,
    /// How a new session's home region is chosen.
    pub placement: Placement,
}

impl Default for SelectorOptions {
    fn default() -> Self {
        SelectorOptions {
            balance_factor: 1.25,
            points_per_weight: crate::ring::DEFAULT_POINTS_PER_WEIGHT,
            local_region: 0,
            shed_factor: None,
            placement: Placement::Hash,
        }
    }
}

/// A replica in a [`Selector`] snapshot.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    /// Its id.
    pub id: Arc<str>,
    /// Stable tag (what the override table stores).
    pub tag: ReplicaTag,
    /// Index of its region.
    pub region: u16,
    /// Weight.
    pub weight: u32,
    /// Admission state.
    pub admission: Admission,
    /// Hard in-flight cap (`u32::MAX` when none or taken from the engine).
    pub max_inflight: u32,
    /// The cap is the engine's sequences (`max_inflight: auto`), read live.
    pub auto_cap: bool,
}

#[derive(Debug)]
struct RegionInfo {
    name: Arc<str>,
    members: Vec<ReplicaIdx>,
    /// Regions to try, in order, after this one when it is the home region.
    fallback: Vec<u16>,
    kv_scope: KvScope,
}

/// Where a request goes and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The chosen replica.
    pub replica: ReplicaIdx,
    /// The branch that chose it.
    pub outcome: Outcome,
}

/// What the caller knows about one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteRequest<'a> {
    /// Routing key, when the request carried a valid token.
    pub key: Option<RoutingKey>,
    /// The override table's entry for the key, if any.
    pub sticky: Option<ReplicaTag>,
    /// Replicas already tried for this request (retries skip them).
    pub tried: Option<&'a ReplicaSet>,
    /// The request's tenant, for tenant locality (`None`: the ring alone places new sessions).
    pub tenant: Option<TenantScope>,
}

/// Assigns replica tags that stay the same across topology reloads, so override entries keep
/// pointing at the right replica however the YAML is reordered. Tags are dense small integers
/// (one per replica id ever seen by this process).
#[derive(Debug, Default)]
pub struct TagRegistry {
    tags: Mutex<HashMap<String, ReplicaTag>>,
}

impl TagRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tag of replica `id` if it has one.
    pub fn get(&self, id: &str) -> Option<ReplicaTag> {
        let tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        tags.get(id).copied()
    }

    /// The tag of replica `id`, assigning the next one on first sight.
    pub fn tag(&self, id: &str) -> ReplicaTag {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tag) = tags.get(id) {
            return *tag;
        }
        // Saturates at the override table's largest tag: the next is its empty-slot marker.
        let max = crate::overrides::MAX_REPLICA_TAG;
        let tag = ReplicaTag(u32::try_from(tags.len()).map_or(max, |n| n.min(max)));
        tags.insert(id.to_owned(), tag);
        tag
    }
}

/// An immutable routing snapshot of the fleet.
#[derive(Debug)]
pub struct Selector {
    replicas: Vec<ReplicaInfo>,
    regions: Vec<RegionInfo>,
    ring: Ring,
    by_tag: Vec<Option<ReplicaIdx>>,
    local_region: u16,
    balance_factor: f64,
    shed_factor: Option<f64>,
    placement: Placement,
    tokenless_cursor: AtomicUsize,
}

impl Selector {
    /// Builds a snapshot. Regions without replicas are kept (they take no traffic); the
    /// topology crate refuses them earlier with a message naming the region.
    pub fn new(regions: &[RegionSpec], options: SelectorOptions, tags: &TagRegistry) -> Selector {
        let mut replicas = Vec::new();
        let mut infos = Vec::with_capacity(regions.len());
        for (r, region) in regions.iter().enumerate() {
            let mut members = Vec::with_capacity(region.replicas.len());
            for spec in &region.replicas {
                members.push(replicas.len() as ReplicaIdx);
                replicas.push(ReplicaInfo {
                    id: Arc::from(spec.id.as_str()),
                    tag: tags.tag(&spec.id),
                    region: r as u16,
                    weight: spec.weight.max(1),
                    admission: spec.admission,
                    max_inflight: match spec.max_inflight {
                        Some(InflightCap::Fixed(n)) => n,
                        Some(InflightCap::Auto) | None => u32::MAX,
                    },
                    auto_cap: spec.max_inflight == Some(InflightCap::Auto),
                });
            }
            infos.push(RegionInfo {
                name: Arc::from(region.name.as_str()),
                members,
                fallback: Vec::new(),
                kv_scope: region.kv_scope,
            });
        }
        let local = options.local_region.min(regions.len().saturating_sub(1)) as u16;
        for (home, info) in infos.iter_mut().enumerate() {
            let home = home as u16;
            let mut order = Vec::with_capacity(regions.len());
            if local != home {
                order.push(local);
            }
            order.extend((0..regions.len() as u16).filter(|r| *r != home && *r != local));
            info.fallback = order;
        }
        let ring = Ring::new(
            replicas
                .iter()
                .enumerate()
                .map(|(i, r)| (i as ReplicaIdx, &*r.id, r.weight)),
            options.points_per_weight,
        );
        let max_tag = replicas.iter().map(|r| r.tag.0 as usize).max().unwrap_or(0);
        let mut by_tag = vec![None; if replicas.is_empty() { 0 } else { max_tag + 1 }];
        for (i, r) in replicas.iter().enumerate() {
            by_tag[r.tag.0 as usize] = Some(i as ReplicaIdx);
        }
        Selector {
            replicas,
            regions: infos,
            ring,
            by_tag,
            local_region: local,
            balance_factor: options.balance_factor.max(1.0),
            shed_factor: options.shed_factor.map(|f| f.max(1.0)),
            placement: options.placement,
            tokenless_cursor: AtomicUsize::new(0),
        }
    }

    /// All replicas, indexed by [`ReplicaIdx`].
    pub fn replicas(&self) -> &[ReplicaInfo] {
        &self.replicas
    }

    /// One replica.
    pub fn replica(&self, idx: ReplicaIdx) -> Option<&ReplicaInfo> {
        self.replicas.get(idx as usize)
    }

    /// The index of the replica with `tag` in this snapshot.
    pub fn by_tag(&self, tag: ReplicaTag) -> Option<ReplicaIdx> {
        self.by_tag.get(tag.0 as usize).copied().flatten()
    }

    /// Name of region `region`.
    pub fn region_name(&self, region: u16) -> &str {
        self.regions.get(region as usize).map_or("", |r| &r.name)
    }

    /// Name of region `region`, shared rather than copied (what a usage record holds).
    pub fn shared_region_name(&self, region: u16) -> Option<Arc<str>> {
        self.regions
            .get(region as usize)
            .map(|r| Arc::clone(&r.name))
    }

    /// The region a key calls home: the region of the key's owner on the ring of *all*
    /// replicas. Every edge instance computes the same answer without coordination, regions get
    /// sessions in proportion to their weight, and adding a replica anywhere moves only the
    /// keys that replica takes (a separate region hash would move more).
    pub fn home_region(&self, key: RoutingKey) -> Option<u16> {
        let owner = self.ring.owner(key.ring_position())?;
        Some(self.replicas[owner as usize].region)
    }

    /// Chooses the replica for a request, or `None` when no replica anywhere can take it.
    ///
    /// Rules, in order:
    /// 1. An override entry wins if its replica is [sticky-eligible](Self::sticky_eligible),
    ///    unless sticky shedding is on and moves it ([`Outcome::Shed`]: see
    ///    [`crate::ReplicaLoad`]).
    /// 2. Otherwise walk the home region's ring from the key, skipping replicas that are not
    ///    active, unhealthy, tried, at their hard cap, or over the load bound
    ///    `ceil(c × (total in-flight + 1) × weight / total weight)` (Mirrokni et al. 2016).
    ///    With tenant locality (the request names a tenant and the view knows warmth), only
    ///    replicas under a second bound, the same rule on sessions placed recently, qualify:
    ///    of those warm for the tenant, the one with the fewest recent placements (per unit of
    ///    weight) takes it; when none is warm, the one serving the fewest other tenants (the
    ///    first on the walk among equals, in both cases).
    /// 3. Then the same walk in each fallback region (local region first, then YAML order).
    /// 4. Without a key: the least-loaded (in-flight per weight) eligible replica of the local
    ///    region, then of the fallback regions.
    pub fn decide<V: LoadView + ?Sized>(
        &self,
        req: &RouteRequest<'_>,
        view: &V,
    ) -> Option<Decision> {
        self.decide_gated(req, view, &ShedWhenOver)
    }

    /// [`decide`](Self::decide) with sticky shedding timed by `gate`.
    pub fn decide_gated<V: LoadView + ?Sized, G: ShedGate + ?Sized>(
        &self,
        req: &RouteRequest<'_>,
        view: &V,
        gate: &G,
    ) -> Option<Decision> {
        let Some(key) = req.key else {
            return self.tokenless(req.tried, view);
        };
        // The region the session's recorded replica is in, when it could not keep it.
        let mut recorded_region = None;
        if let Some(idx) = req.sticky.and_then(|tag| self.by_tag(tag)) {
            let region = self.replicas[idx as usize].region;
            if self.regions[region as usize].kv_scope == KvScope::Region {
                // The region holds the cache: any of its replicas is warm.
                if let Some(replica) = self.least_loaded_in(region, Some(idx), key, req.tried, view)
                {
                    let outcome = if replica == idx {
                        Outcome::Sticky
                    } else {
                        Outcome::SharedKv
                    };
                    return Some(Decision { replica, outcome });
                }
            } else if self.sticky_eligible(idx, req.tried, view) {
                let (replica, outcome) = match self.shed_to(idx, key, req.tried, view, gate) {
                    Some(to) => (to, Outcome::Shed),
                    None => (idx, Outcome::Sticky),
                };
                return Some(Decision { replica, outcome });
            }
            recorded_region = Some(region);
        }
        let lost_home = req.sticky.is_some();
        let (home, first) = match (self.placement, recorded_region) {
            // Hash placement recomputes the home every edge agrees on.
            (Placement::Hash, _) => (self.home_region(key)?, 0),
            // Nearest: a session keeps the region it was recorded in; a new one starts in the
            // first region, from this edge's own, that has room.
            (Placement::Nearest, Some(region)) => (region, 0),
            (Placement::Nearest, None) => self.nearest_home(req.tried, view)?,
        };
        let position = key.ring_position();
        let regions =
            std::iter::once(home).chain(self.regions[home as usize].fallback.iter().copied());
        for (n, region) in regions.enumerate() {
            let found = if self.regions[region as usize].kv_scope == KvScope::Region {
                self.least_loaded_in(region, None, key, req.tried, view)
                    .map(|replica| (replica, WalkNotes::default()))
            } else {
                self.walk_region(region, position, req.tried, req.tenant, view)
            };
            if let Some((replica, walk)) = found {
                let outcome = if n + first > 0 {
                    Outcome::CrossRegion
                } else if lost_home || walk.skipped_unavailable {
                    Outcome::Failover
                } else if self.regions[region as usize].kv_scope == KvScope::Region {
                    Outcome::SharedKv
                } else if walk.passed_for_locality {
                    Outcome::Locality
                } else if walk.skipped_for_load {
                    Outcome::Rebalanced
                } else {
                    Outcome::Ring
                };
                return Some(Decision { replica, outcome });
            }
        }
        None
    }

    /// With nearest placement, the home of a new session and its distance (0: this edge's
    /// own region): the first region, in this edge's order, with an available replica under
    /// the bounded-load limit taken over the whole fleet, so that a region spills new sessions
    /// only when it is busier than the fleet, not on every local imbalance. `None` when no
    /// replica is available anywhere; when every region is over the limit, the local region
    /// (its own walk still balances inside it).
    fn nearest_home<V: LoadView + ?Sized>(
        &self,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> Option<(u16, usize)> {
        let (mut total_inflight, mut total_weight) = (0u64, 0u64);
        for (m, replica) in self.replicas.iter().enumerate() {
            if self.available(m as ReplicaIdx, tried, view) {
                total_inflight += u64::from(view.tier_inflight(m as ReplicaIdx));
                total_weight += u64::from(replica.weight);
            }
        }
        if total_weight == 0 {
            return None;
        }
        let scale = self.balance_factor * (total_inflight + 1) as f64 / total_weight as f64;
        let local = self.local_region;
        let order =
            std::iter::once(local).chain(self.regions[local as usize].fallback.iter().copied());
        let has_room = |region: u16| {
            self.regions[region as usize].members.iter().any(|&m| {
                let replica = &self.replicas[m as usize];
                self.available(m, tried, view)
                    && view.inflight(m) < self.cap(m, view)
                    && f64::from(view.tier_inflight(m)) < (scale * f64::from(replica.weight)).ceil()
            })
        };
        let chosen = order.enumerate().find(|(_, region)| has_room(*region));
        Some(chosen.map_or((local, 0), |(n, region)| (region, n)))
    }

    /// The eligible replica of `region` with the fewest requests in flight per unit of weight
    /// (ties: `prefer`, the session's own replica, whose local cache is the warmest; then the
    /// first from a point the key picks, so that an idle region spreads new sessions instead
    /// of piling them on its first replica): placement inside a region that shares its KV
    /// cache.
    fn least_loaded_in<V: LoadView + ?Sized>(
        &self,
        region: u16,
        prefer: Option<ReplicaIdx>,
        key: RoutingKey,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> Option<ReplicaIdx> {
        let mut best: Option<(ReplicaIdx, u64, u64)> = None;
        let members = &self.regions.get(region as usize)?.members;
        let preferred = prefer.filter(|p| members.contains(p));
        let start = key.ring_position() as usize % members.len().max(1);
        let rotated = members[start..].iter().chain(&members[..start]);
        for &m in preferred
            .iter()
            .chain(rotated.filter(|m| Some(**m) != preferred))
        {
            if !self.sticky_eligible(m, tried, view) {
                continue;
            }
            let (load, weight) = (
                u64::from(view.tier_inflight(m)) + 1,
                u64::from(self.replicas[m as usize].weight),
            );
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((m, load, weight));
            }
        }
        best.map(|(m, _, _)| m)
    }

    /// Whether a session's recorded replica may keep it: active, healthy, not tried, below its
    /// hard cap. The soft balance bound does *not* apply here: moving a warm session costs a
    /// full prefill, while a transient imbalance of a few requests costs little, and the bound
    /// still steers every new placement.
    pub fn sticky_eligible<V: LoadView + ?Sized>(
        &self,
        idx: ReplicaIdx,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> bool {
        self.available(idx, tried, view)
            && view.inflight(idx) < self.cap(idx, view)
            && !(view.engine(idx).is_some_and(|e| truly_full(&e))
                && self.room_elsewhere_in_region(idx, tried, view))
    }

    /// Whether another replica of `idx`'s region could take a session now: available, and
    /// its engine has headroom or is not read. A sticky session leaves a truly full replica
    /// only for such a one: when the whole region is full, moving it evicts someone else's
    /// cache to rebuild its own, and staying in the queue of the replica that holds it is the
    /// cheaper wait.
    fn room_elsewhere_in_region<V: LoadView + ?Sized>(
        &self,
        idx: ReplicaIdx,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> bool {
        let region = self.replicas[idx as usize].region;
        self.regions[region as usize].members.iter().any(|&other| {
            other != idx && self.available(other, tried, view) && !self.engine_full(other, view)
        })
    }

    /// The replica's hard in-flight cap now: its own, or with `max_inflight: auto` its
    /// engine's sequences (no cap while the engine has not said).
    fn cap<V: LoadView + ?Sized>(&self, idx: ReplicaIdx, view: &V) -> u32 {
        let replica = &self.replicas[idx as usize];
        if !replica.auto_cap {
            return replica.max_inflight;
        }
        view.engine(idx)
            .and_then(|e| e.capacity.sequences)
            .map_or(replica.max_inflight, |n| n.min(replica.max_inflight))
    }

    /// The bounded-load limit on the replica's requests in flight, for the walk's `scale`
    /// (`c × (total in flight + 1) / total weight`).
    fn load_bound(&self, idx: ReplicaIdx, scale: f64) -> u64 {
        (scale * f64::from(self.replicas[idx as usize].weight)).ceil() as u64
    }

    /// How well the replica's engine fits a new session now (see [`EngineFit`]).
    /// `queue_in_region`: some engine of the region has requests waiting. Then only slot
    /// counts rank replicas: Tether counts a replica's sessions itself, as they come, while a
    /// queue or KV usage is a probe interval old and changes within it, so steering by them
    /// while the region is busy sends every new session to whichever replica had an empty
    /// queue at the last round.
    fn engine_fit<V: LoadView + ?Sized>(
        &self,
        idx: ReplicaIdx,
        queue_in_region: bool,
        view: &V,
    ) -> EngineFit {
        let reading = view.engine(idx);
        let slots = reading.and_then(|r| r.capacity.sequences);
        let Some(reading) = reading.filter(|_| !(queue_in_region && slots.is_none())) else {
            return if queue_in_region {
                EngineFit::Full
            } else {
                EngineFit::Room
            };
        };
        let active = view.active_sessions(idx);
        if has_headroom(&reading, active) {
            return EngineFit::Room;
        }
        let held = active.max(reading.load.running);
        match slots {
            Some(slots) if held > slots => EngineFit::Overcommitted(Reverse(held - slots)),
            _ => EngineFit::Full,
        }
    }

    /// How the region's replicas that a new session may go to (available, under the hard cap
    /// and the load bound of `scale` per unit of weight) are ranked; `None` when no engine of
    /// the region is read, and placement is as without engines.
    fn rank_engines<V: LoadView + ?Sized>(
        &self,
        info: &RegionInfo,
        tried: Option<&ReplicaSet>,
        scale: f64,
        view: &V,
    ) -> Option<EngineRanking> {
        let (mut read, mut queue_in_region) = (false, false);
        for &idx in &info.members {
            if self.available(idx, tried, view) {
                if let Some(reading) = view.engine(idx) {
                    read = true;
                    queue_in_region |= reading.load.waiting > 0;
                }
            }
        }
        if !read {
            return None;
        }
        let mut best: Option<EngineFit> = None;
        for &idx in &info.members {
            if !self.available(idx, tried, view) {
                continue;
            }
            if view.inflight(idx) >= self.cap(idx, view)
                || u64::from(view.tier_inflight(idx)) >= self.load_bound(idx, scale)
            {
                continue;
            }
            let fit = self.engine_fit(idx, queue_in_region, view);
            if best.is_none_or(|b| fit < b) {
                best = Some(fit);
            }
        }
        best.map(|best| EngineRanking {
            best,
            queue_in_region,
        })
    }

    /// Whether the engine says the replica has no room for a new session (unknown: room).
    fn engine_full<V: LoadView + ?Sized>(&self, idx: ReplicaIdx, view: &V) -> bool {
        view.engine(idx)
            .is_some_and(|e| !has_headroom(&e, view.active_sessions(idx)))
    }

    /// Where the sticky session `key` on `idx` goes if `idx` sheds it now, or `None` to stay.
    ///
    /// `idx` is over the limit when it served more than `shed_factor` × the mean of the
    /// fleet's available replicas recently (both per unit of weight) and at least
    /// [`MIN_SHED_LOAD`](crate::MIN_SHED_LOAD). The limit is fleet-wide, not per region: a
    /// region can be the hot one, and then only another region has room. The destination is
    /// the least-loaded sticky-eligible replica of the key's home region if it is at or under
    /// the mean, else of the whole fleet (under the mean too, or no shed); the view decides
    /// whether this is the moment ([`ShedGate::claim_shed`]). With shedding off, `None` at the
    /// cost of one branch; with it on, a pass over the fleet's replicas per sticky request.
    fn shed_to<V: LoadView + ?Sized, G: ShedGate + ?Sized>(
        &self,
        idx: ReplicaIdx,
        key: RoutingKey,
        tried: Option<&ReplicaSet>,
        view: &V,
        gate: &G,
    ) -> Option<ReplicaIdx> {
        let factor = self.shed_factor?;
        let load = |m: ReplicaIdx| {
            view.recent_sent(m)
                .map(|n| n / f64::from(self.replicas[m as usize].weight))
        };
        let own = load(idx)?;
        let (mut served, mut weight) = (0.0, 0u64);
        for (m, replica) in self.replicas.iter().enumerate() {
            if self.available(m as ReplicaIdx, None, view) {
                served += view.recent_sent(m as ReplicaIdx).unwrap_or(0.0);
                weight += u64::from(replica.weight);
            }
        }
        let mean = served / weight.max(1) as f64;
        let limit = factor * mean;
        let over = own >= crate::MIN_SHED_LOAD && own > limit;
        // Told even when not over: the view tracks how long the excess has lasted.
        if !over {
            gate.claim_shed(idx, false);
            return None;
        }
        let mut skip = tried
            .cloned()
            .unwrap_or_else(|| ReplicaSet::new(self.replicas.len()));
        skip.insert(idx);
        // The least loaded of `members`; among equals (idle replicas), the key picks, so that
        // hot replicas on many edges do not all pile onto the first one.
        let least_loaded = |members: &[ReplicaIdx]| {
            let start = (key.0 >> 32) as usize % members.len().max(1);
            members[start..]
                .iter()
                .chain(&members[..start])
                .copied()
                .filter(|&m| self.sticky_eligible(m, Some(&skip), view))
                .map(|m| (m, load(m).unwrap_or(0.0)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
        };
        let home = self.home_region(key)?;
        let all: Vec<ReplicaIdx>;
        let to = match least_loaded(&self.regions[home as usize].members) {
            Some((m, l)) if l <= mean => (m, l),
            _ => {
                all = (0..self.replicas.len() as ReplicaIdx).collect();
                least_loaded(&all)?
            }
        };
        // Only to a replica at or under the mean: one between the mean and this one would soon
        // be over the limit itself and send sessions back.
        if to.1 > mean || !gate.claim_shed(idx, true) {
            return None;
        }
        Some(to.0)
    }

    fn available<V: LoadView + ?Sized>(
        &self,
        idx: ReplicaIdx,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> bool {
        let Some(info) = self.replicas.get(idx as usize) else {
            return false;
        };
        info.admission == Admission::Active
            && view.is_healthy(idx)
            && !tried.is_some_and(|t| t.contains(idx))
    }

    fn walk_region<V: LoadView + ?Sized>(
        &self,
        region: u16,
        position: u32,
        tried: Option<&ReplicaSet>,
        tenant: Option<TenantScope>,
        view: &V,
    ) -> Option<(ReplicaIdx, WalkNotes)> {
        let info = &self.regions[region as usize];
        let (mut total_inflight, mut total_weight, mut total_placed) = (0u64, 0u64, 0f64);
        for &idx in &info.members {
            if self.available(idx, tried, view) {
                total_inflight += u64::from(view.tier_inflight(idx));
                total_weight += u64::from(self.replicas[idx as usize].weight);
                if let Some(w) = tenant.and_then(|t| view.tenant_warmth(idx, t)) {
                    total_placed += w.recent_placements;
                }
            }
        }
        if total_weight == 0 {
            return None;
        }
        // The incoming request counts towards the mean, so some replica is always under the
        // bound: Σ bound ≥ c·(total+1) > total.
        let scale = self.balance_factor * (total_inflight + 1) as f64 / total_weight as f64;
        // Locality's own bound, on sessions placed recently rather than requests in flight, so
        // that a tenant cannot gather on one replica while few requests are in flight.
        let placed_scale = self.balance_factor * (total_placed + 1.0) / total_weight as f64;
        // With engines read, replicas are ranked by how their engines fit a new session (see
        // `EngineFit`): when some have room only they compete; otherwise the rank orders the
        // replicas within locality's choice, or, without locality, the best-ranked first on
        // the walk wins.
        let ranking = self.rank_engines(info, tried, scale, view);
        let mut notes = WalkNotes::default();
        let mut unvisited = info.members.len();
        // Without locality the first eligible replica wins. With it, among eligible replicas
        // under the placement bound, the one warm for the tenant with the fewest recent
        // placements per unit of weight (`best_warm`: spreading the tenant evenly over its
        // replicas balances load at the same hit ratio, where taking the first warm one on the
        // walk piles every session it can onto it); failing that, the one with the fewest other tenants (`best`). The
        // earliest on the walk wins among equals.
        let mut best_warm: Option<(ReplicaIdx, Option<EngineFit>, f64)> = None;
        let mut best: Option<(ReplicaIdx, Option<EngineFit>, u32)> = None;
        let mut first_eligible = None;
        // The first replica passed over only for the soft rules (the load bound, a full
        // engine) while under its hard cap. In-flight counts are read one replica at a time
        // while other requests take and release slots, so the sum the bound is built from can
        // be stale by the time a replica is checked: every replica can then read over its
        // bound although together they are not. Such a race must not refuse the request or
        // send it to another region.
        let mut first_over_soft_limit = None;
        // One ring holds every region; a region's own order is the global walk filtered to it,
        // so the home region's first candidate is exactly the key's global owner.
        let mut walk = self.ring.walk(position, self.replicas.len());
        // Checked before each step, not after: once every member has been seen, another
        // `next()` would scan the rest of the ring (thousands of points) for a replica that is
        // not there, which a locality scan (it goes past the first eligible replica) would
        // always reach.
        while unvisited > 0 {
            let Some(idx) = walk.next() else {
                break;
            };
            if self.replicas[idx as usize].region != region {
                continue;
            }
            unvisited -= 1;
            // Skips after the first eligible replica (a locality scan goes on past it) did not
            // decide anything.
            let deciding = first_eligible.is_none();
            if !self.available(idx, tried, view) {
                notes.skipped_unavailable |= deciding;
                continue;
            }
            let replica = &self.replicas[idx as usize];
            let bound = self.load_bound(idx, scale);
            if view.inflight(idx) >= self.cap(idx, view) {
                notes.skipped_for_load |= deciding;
                continue;
            }
            let over_bound = u64::from(view.tier_inflight(idx)) >= bound;
            let fit = ranking
                .filter(|_| !over_bound)
                .map(|r| self.engine_fit(idx, r.queue_in_region, view));
            let warmth = (!over_bound)
                .then(|| tenant.and_then(|t| view.tenant_warmth(idx, t)))
                .flatten();
            // Off the best rank, a replica competes only under locality and only while no
            // replica has room: room, where there is any, wins locality or not (a tenant's
            // warm replicas with full slots would evict one of its sessions).
            let off_rank = ranking.is_some_and(|r| {
                fit != Some(r.best) && (r.best == EngineFit::Room || warmth.is_none())
            });
            if over_bound || off_rank {
                notes.skipped_for_load |= deciding;
                first_over_soft_limit.get_or_insert(idx);
                continue;
            }
            let Some(warmth) = warmth else {
                return Some((idx, notes));
            };
            first_eligible.get_or_insert(idx);
            if warmth.recent_placements >= placed_scale * f64::from(replica.weight) {
                continue;
            }
            // Without room anywhere, warmth first and then the engine's fit, among warm
            // replicas and among the others: the tenant's shared prefix is worth more than
            // packing the excess elsewhere.
            if warmth.warm {
                // Per unit of weight: a replica twice the size takes twice the sessions.
                let placed = warmth.recent_placements / f64::from(replica.weight);
                if best_warm.is_none_or(|(_, f, best)| (fit, placed) < (f, best)) {
                    best_warm = Some((idx, fit, placed));
                }
                continue;
            }
            if best.is_none_or(|(_, f, others)| (fit, warmth.others) < (f, others)) {
                best = Some((idx, fit, warmth.others));
            }
        }
        // Σ placement bounds exceed Σ placements, so `best` is empty only through float
        // rounding; the first eligible replica is then as good as any.
        best_warm
            .map(|(idx, _, _)| idx)
            .or(best.map(|(idx, _, _)| idx))
            .or(first_eligible)
            .map(|idx| {
                notes.passed_for_locality = first_eligible != Some(idx);
                (idx, notes)
            })
            .or_else(|| first_over_soft_limit.map(|idx| (idx, notes)))
    }

    fn tokenless<V: LoadView + ?Sized>(
        &self,
        tried: Option<&ReplicaSet>,
        view: &V,
    ) -> Option<Decision> {
        let local = self.local_region;
        let regions = std::iter::once(local).chain(
            self.regions
                .get(local as usize)
                .map(|r| r.fallback.as_slice())
                .unwrap_or_default()
                .iter()
                .copied(),
        );
        for region in regions {
            let members = &self.regions[region as usize].members;
            if members.is_empty() {
                continue;
            }
            // Rotate the starting point so ties (an idle fleet) spread instead of piling onto
            // the first replica.
            let start = self.tokenless_cursor.fetch_add(1, Ordering::Relaxed) % members.len();
            let mut best: Option<(ReplicaIdx, u64, u64)> = None;
            for k in 0..members.len() {
                let idx = members[(start + k) % members.len()];
                let replica = &self.replicas[idx as usize];
                if !self.available(idx, tried, view) || view.inflight(idx) >= self.cap(idx, view) {
                    continue;
                }
                // Compare (inflight + 1) / weight without division.
                let (load, weight) = (
                    u64::from(view.tier_inflight(idx)) + 1,
                    u64::from(replica.weight),
                );
                if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                    best = Some((idx, load, weight));
                }
            }
            if let Some((replica, _, _)) = best {
                return Some(Decision {
                    replica,
                    outcome: Outcome::NoToken,
                });
            }
        }
        None
    }
}

/// How well a replica's engine fits a new session, best first. Slot-limited engines evict a
/// session's cache when a new session takes its slot, and beyond what a region's slots hold
/// some session is evicted wherever a new one goes; what placement decides is whose. Filling
/// replicas with free slots first and then the one already most over its slots keeps the
/// replicas that hold exactly their slots' worth warm: their sessions take turns on their own
/// slots, where spreading the excess evenly makes every replica's sessions evict each other
/// on every turn (a few sessions taking turns on fewer slots, least recently used first, all
/// miss). The load bound still caps how far one replica is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EngineFit {
    /// A free slot, KV to spare and no queue, or an engine that is not read: no one's cache
    /// is evicted.
    Room,
    /// More active sessions than slots, by this much (more first): its sessions evict each
    /// other already.
    Overcommitted(Reverse<u32>),
    /// Exactly full, or waiting requests or nearly all its KV cache held without slots to
    /// count.
    Full,
}

/// How a region's engines rank for one new session ([`Selector::rank_engines`]).
#[derive(Debug, Clone, Copy)]
struct EngineRanking {
    /// The best fit among the replicas the session may go to.
    best: EngineFit,
    /// Some engine of the region has requests waiting.
    queue_in_region: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct WalkNotes {
    skipped_unavailable: bool,
    skipped_for_load: bool,
    /// Tenant locality chose a replica after the first eligible one.
    passed_for_locality: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> ReplicaSpec {
        ReplicaSpec {
            id: id.into(),
            weight: 1,
            admission: Admission::Active,
            max_inflight: None,
        }
    }

    fn fleet(regions: &[(&str, &[&str])]) -> Vec<RegionSpec> {
        regions
            .iter()
            .map(|(name, ids)| RegionSpec {
                name: name.to_string(),
                replicas: ids.iter().map(|id| spec(id)).collect(),
                kv_scope: KvScope::Replica,
            })
            .collect()
    }

    fn selector(regions: &[RegionSpec]) -> Selector {
        Selector::new(regions, SelectorOptions::default(), &TagRegistry::new())
    }

    fn keyed(key: u64) -> RouteRequest<'static> {
        RouteRequest {
            key: Some(RoutingKey(key)),
            ..RouteRequest::default()
        }
    }

    fn keys() -> impl Iterator<Item = u64> {
        (0..2000u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A view with engine readings: `(in flight, active sessions, reading)` per replica.
    struct EngineView(Vec<(u32, u32, Option<EngineReading>)>);

    impl LoadView for EngineView {
        fn inflight(&self, replica: ReplicaIdx) -> u32 {
            self.0[replica as usize].0
        }
        fn active_sessions(&self, replica: ReplicaIdx) -> u32 {
            self.0[replica as usize].1
        }
        fn engine(&self, replica: ReplicaIdx) -> Option<EngineReading> {
            self.0[replica as usize].2
        }
    }

    fn slots(slots: u32, running: u32, waiting: u32) -> Option<EngineReading> {
        Some(EngineReading {
            capacity: tether_engine::Capacity {
                sequences: Some(slots),
                kv_blocks: None,
            },
            load: tether_engine::Load {
                running,
                waiting,
                kv_usage: None,
            },
        })
    }

    #[test]
    fn a_new_session_passes_over_a_replica_whose_slots_hold_active_sessions() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(200) {
            let owner = s.decide(&keyed(k), &vec![0; 3]).unwrap().replica;
            // The owner's two slots hold two sessions between their turns: nothing in flight.
            let mut view = EngineView(vec![(0, 0, slots(2, 0, 0)); 3]);
            view.0[owner as usize].1 = 2;
            let d = s.decide(&keyed(k), &view).unwrap();
            assert_ne!(d.replica, owner);
            assert_eq!(d.outcome, Outcome::Rebalanced);
            // With one slot free it stays with the ring.
            view.0[owner as usize].1 = 1;
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, owner);
        }
    }

    #[test]
    fn beyond_what_the_region_holds_a_free_slot_wins_then_the_replica_most_over_its_slots() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c", "d"])]));
        for k in keys().take(200) {
            let owner = s.decide(&keyed(k), &vec![0; 4]).unwrap().replica;
            let other = |n: u32| (owner + n) % 4;
            // Eight slots, nine active sessions: one replica still shows a free slot.
            let mut view = EngineView(vec![(0, 2, slots(2, 0, 0)); 4]);
            view.0[other(1) as usize].1 = 1;
            view.0[other(2) as usize].1 = 4;
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, other(1));
            // No free slot: the replica most over its slots takes it, not one that holds
            // exactly its slots' worth.
            view.0[other(1) as usize].1 = 2;
            view.0[other(3) as usize].1 = 3;
            let d = s.decide(&keyed(k), &view).unwrap();
            assert_eq!(d.replica, other(2));
            assert_eq!(d.outcome, Outcome::Rebalanced);
            // Unless the load bound says it has enough in flight already.
            view.0[other(2) as usize].0 = 5;
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, other(3));
        }
    }

    #[test]
    fn on_engines_without_slots_kv_to_spare_steers_only_while_no_engine_of_the_region_queues() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let kv = |usage: f64, waiting: u32| {
            Some(EngineReading {
                capacity: tether_engine::Capacity::default(),
                load: tether_engine::Load {
                    running: 4,
                    waiting,
                    kv_usage: Some(usage),
                },
            })
        };
        for k in keys().take(200) {
            let owner = s.decide(&keyed(k), &vec![0; 3]).unwrap().replica;
            let mut view = EngineView(vec![(0, 9, kv(0.95, 0)); 3]);
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, owner);
            view.0[((owner + 2) % 3) as usize].2 = kv(0.5, 0);
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, (owner + 2) % 3);
            // A queue anywhere in the region: readings a probe interval old do not steer.
            view.0[((owner + 1) % 3) as usize].2 = kv(0.99, 3);
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, owner);
        }
    }

    #[test]
    fn when_every_engine_is_full_or_silent_the_ring_decides_as_before() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(200) {
            let owner = s.decide(&keyed(k), &vec![0; 3]).unwrap().replica;
            let full = EngineView(vec![(0, 2, slots(2, 2, 0)); 3]);
            assert_eq!(s.decide(&keyed(k), &full).unwrap().replica, owner);
            let silent = EngineView(vec![(0, 5, None); 3]);
            assert_eq!(s.decide(&keyed(k), &silent).unwrap().replica, owner);
        }
    }

    #[test]
    fn a_waiting_queue_or_a_full_kv_cache_leaves_no_headroom() {
        let mut reading = slots(4, 1, 0).unwrap();
        assert!(has_headroom(&reading, 2));
        assert!(!has_headroom(&reading, 4));
        reading.load.waiting = 1;
        assert!(!has_headroom(&reading, 0));
        let vllm = EngineReading {
            load: tether_engine::Load {
                running: 40,
                waiting: 0,
                kv_usage: Some(0.95),
            },
            ..EngineReading::default()
        };
        assert!(!has_headroom(&vllm, 0));
        assert!(has_headroom(
            &EngineReading {
                load: tether_engine::Load {
                    kv_usage: Some(0.5),
                    ..vllm.load
                },
                ..vllm
            },
            100
        ));
    }

    #[test]
    fn a_sticky_session_leaves_a_busy_engine_only_past_a_batch_and_for_room() {
        let s = selector(&fleet(&[("eu", &["a", "b"])]));
        let sticky = RouteRequest {
            sticky: Some(s.replicas()[0].tag),
            ..keyed(7)
        };
        let busy = EngineView(vec![(2, 6, slots(2, 2, 2)), (0, 0, slots(2, 0, 0))]);
        assert_eq!(s.decide(&sticky, &busy).unwrap().outcome, Outcome::Sticky);
        let swamped = EngineView(vec![(2, 6, slots(2, 2, 3)), (0, 0, slots(2, 0, 0))]);
        let d = s.decide(&sticky, &swamped).unwrap();
        assert_eq!((d.replica, d.outcome), (1, Outcome::Failover));
        // The other replica is full too: moving would evict a session there to rebuild this
        // one's cache, so it waits where its cache is.
        let all_full = EngineView(vec![(2, 6, slots(2, 2, 3)), (2, 2, slots(2, 2, 0))]);
        assert_eq!(
            s.decide(&sticky, &all_full).unwrap().outcome,
            Outcome::Sticky
        );
        // An unread engine elsewhere may have room: it moves.
        let unread = EngineView(vec![(2, 6, slots(2, 2, 3)), (0, 0, None)]);
        assert_eq!(s.decide(&sticky, &unread).unwrap().replica, 1);
    }

    #[test]
    fn an_auto_cap_follows_the_engines_sequences() {
        let mut regions = fleet(&[("eu", &["a", "b"])]);
        regions[0].replicas[0].max_inflight = Some(InflightCap::Auto);
        let s = selector(&regions);
        let sticky = RouteRequest {
            sticky: Some(s.replicas()[0].tag),
            ..keyed(7)
        };
        let at_cap = EngineView(vec![(2, 2, slots(2, 2, 0)), (0, 0, None)]);
        assert_eq!(s.decide(&sticky, &at_cap).unwrap().replica, 1);
        let unread = EngineView(vec![(50, 2, None), (0, 0, None)]);
        assert_eq!(
            s.decide(&sticky, &unread).unwrap().replica,
            0,
            "no cap unread"
        );
    }

    #[test]
    fn idle_fleet_routes_a_key_to_its_ring_owner() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let load = vec![0; 3];
        for k in keys() {
            let d = s.decide(&keyed(k), &load).unwrap();
            assert_eq!(d.outcome, Outcome::Ring);
            assert_eq!(Some(d.replica), s.ring.owner(RoutingKey(k).ring_position()));
        }
    }

    #[test]
    fn eligible_override_wins_over_the_ring() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let load = vec![0; 3];
        for k in keys().take(100) {
            let ring = s.decide(&keyed(k), &load).unwrap().replica;
            let other = (ring + 1) % 3;
            let req = RouteRequest {
                sticky: Some(s.replicas()[other as usize].tag),
                ..keyed(k)
            };
            assert_eq!(
                s.decide(&req, &load),
                Some(Decision {
                    replica: other,
                    outcome: Outcome::Sticky
                })
            );
        }
    }

    #[test]
    fn override_ignores_the_soft_bound_but_not_the_hard_cap() {
        let mut regions = fleet(&[("eu", &["a", "b"])]);
        regions[0].replicas[0].max_inflight = Some(InflightCap::Fixed(10));
        let s = selector(&regions);
        let sticky = RouteRequest {
            sticky: Some(s.replicas()[0].tag),
            ..keyed(1)
        };
        // Far over the balance bound (9 vs 0) but under the cap: stays.
        assert_eq!(
            s.decide(&sticky, &vec![9, 0]).unwrap().outcome,
            Outcome::Sticky
        );
        // At the cap: moves.
        let d = s.decide(&sticky, &vec![10, 0]).unwrap();
        assert_eq!((d.replica, d.outcome), (1, Outcome::Failover));
    }

    #[test]
    fn override_to_a_draining_replica_fails_over_to_the_ring() {
        let mut regions = fleet(&[("eu", &["a", "b", "c"])]);
        regions[0].replicas[1].admission = Admission::Draining;
        let s = selector(&regions);
        let req = RouteRequest {
            sticky: Some(s.replicas()[1].tag),
            ..keyed(42)
        };
        let d = s.decide(&req, &vec![0; 3]).unwrap();
        assert_ne!(d.replica, 1);
        assert_eq!(d.outcome, Outcome::Failover);
    }

    #[test]
    fn override_to_a_removed_replica_fails_over() {
        let tags = TagRegistry::new();
        let gone = tags.tag("gone");
        let s = Selector::new(
            &fleet(&[("eu", &["a", "b"])]),
            SelectorOptions::default(),
            &tags,
        );
        let req = RouteRequest {
            sticky: Some(gone),
            ..keyed(42)
        };
        assert_eq!(
            s.decide(&req, &vec![0; 2]).unwrap().outcome,
            Outcome::Failover
        );
    }

    #[test]
    fn draining_and_disabled_replicas_take_no_new_keys() {
        let mut regions = fleet(&[("eu", &["a", "b", "c", "d"])]);
        regions[0].replicas[1].admission = Admission::Draining;
        regions[0].replicas[2].admission = Admission::Disabled;
        let s = selector(&regions);
        for k in keys() {
            let d = s.decide(&keyed(k), &vec![0; 4]).unwrap();
            assert!(
                d.replica == 0 || d.replica == 3,
                "key {k} went to {}",
                d.replica
            );
        }
    }

    #[test]
    fn unhealthy_ring_owner_fails_over_within_the_region() {
        struct Down(ReplicaIdx);
        impl LoadView for Down {
            fn inflight(&self, _: ReplicaIdx) -> u32 {
                0
            }
            fn is_healthy(&self, r: ReplicaIdx) -> bool {
                r != self.0
            }
        }
        let s = selector(&fleet(&[
            ("eu", &["a", "b", "c"]),
            ("us", &["x", "y", "z"]),
        ]));
        for k in keys() {
            let owner = s.decide(&keyed(k), &vec![0; 6]).unwrap().replica;
            let d = s.decide(&keyed(k), &Down(owner)).unwrap();
            assert_ne!(d.replica, owner);
            assert_eq!(d.outcome, Outcome::Failover);
            assert_eq!(
                s.replicas()[d.replica as usize].region,
                s.replicas()[owner as usize].region,
                "failover stays in the home region while it has capacity"
            );
        }
    }

    #[test]
    fn over_bound_owner_spills_to_the_next_replica_on_the_walk() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let k = 7u64;
        let owner = s.decide(&keyed(k), &vec![0; 3]).unwrap().replica;
        let mut load = vec![0; 3];
        // total 4 → bound = ceil(1.25 × 5 / 3) = 3; the owner at 4 is over it.
        load[owner as usize] = 4;
        let d = s.decide(&keyed(k), &load).unwrap();
        assert_ne!(d.replica, owner);
        assert_eq!(d.outcome, Outcome::Rebalanced);
        let second = s
            .ring
            .walk(RoutingKey(k).ring_position(), 3)
            .nth(1)
            .unwrap();
        assert_eq!(d.replica, second);
    }

    #[test]
    fn load_that_rises_while_the_walk_reads_it_neither_refuses_nor_leaves_the_region() {
        // Other requests take slots between the walk's sum and its checks: the sum reads an
        // idle region, every later read finds four in flight, over the bound of 2.
        struct Rising(std::cell::Cell<u32>);
        impl LoadView for Rising {
            fn inflight(&self, _: ReplicaIdx) -> u32 {
                let reads = self.0.get();
                self.0.set(reads + 1);
                if reads < 3 {
                    0
                } else {
                    4
                }
            }
        }
        let s = selector(&fleet(&[
            ("eu", &["a", "b", "c"]),
            ("us", &["x", "y", "z"]),
        ]));
        for k in keys().take(200) {
            if s.home_region(RoutingKey(k)) != Some(0) {
                continue;
            }
            let owner = s.decide(&keyed(k), &vec![0; 6]).unwrap().replica;
            let d = s
                .decide(&keyed(k), &Rising(std::cell::Cell::new(0)))
                .unwrap();
            assert_eq!(d.replica, owner, "the first replica on the walk takes it");
            assert_eq!(d.outcome, Outcome::Rebalanced);
        }
    }

    #[test]
    fn whole_home_region_down_goes_cross_region() {
        let mut regions = fleet(&[("eu", &["a", "b"]), ("us", &["x", "y"])]);
        for r in &mut regions[0].replicas {
            r.admission = Admission::Disabled;
        }
        let s = selector(&regions);
        let mut cross = 0;
        for k in keys() {
            let d = s.decide(&keyed(k), &vec![0; 4]).unwrap();
            assert!(d.replica >= 2);
            if s.home_region(RoutingKey(k)) == Some(0) {
                assert_eq!(d.outcome, Outcome::CrossRegion);
                cross += 1;
            }
        }
        assert!(cross > 0);
    }

    #[test]
    fn nothing_eligible_anywhere_is_none() {
        let mut regions = fleet(&[("eu", &["a"]), ("us", &["x"])]);
        regions[0].replicas[0].admission = Admission::Draining;
        regions[1].replicas[0].max_inflight = Some(InflightCap::Fixed(1));
        let s = selector(&regions);
        assert_eq!(s.decide(&keyed(1), &vec![0, 1]), None);
        assert_eq!(s.decide(&RouteRequest::default(), &vec![0, 1]), None);
    }

    #[test]
    fn tried_replicas_are_skipped_on_retry() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let first = s.decide(&keyed(9), &vec![0; 3]).unwrap().replica;
        let mut tried = ReplicaSet::default();
        tried.insert(first);
        let req = RouteRequest {
            tried: Some(&tried),
            tenant: None,
            sticky: Some(s.replicas()[first as usize].tag),
            ..keyed(9)
        };
        let d = s.decide(&req, &vec![0; 3]).unwrap();
        assert_ne!(d.replica, first);
        assert_eq!(d.outcome, Outcome::Failover);
    }

    #[test]
    fn tokenless_requests_go_to_the_least_loaded_local_replica() {
        let regions = fleet(&[("eu", &["a", "b", "c"]), ("us", &["x", "y", "z"])]);
        let s = Selector::new(
            &regions,
            SelectorOptions {
                local_region: 1,
                ..SelectorOptions::default()
            },
            &TagRegistry::new(),
        );
        let load = vec![0, 0, 0, 5, 1, 3];
        let d = s.decide(&RouteRequest::default(), &load).unwrap();
        assert_eq!((d.replica, d.outcome), (4, Outcome::NoToken));
    }

    #[test]
    fn tokenless_ties_rotate_across_replicas() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let mut hits = [0; 3];
        for _ in 0..30 {
            hits[s
                .decide(&RouteRequest::default(), &vec![0; 3])
                .unwrap()
                .replica as usize] += 1;
        }
        assert_eq!(hits, [10, 10, 10]);
    }

    #[test]
    fn tokenless_spills_to_another_region_when_local_is_out() {
        let mut regions = fleet(&[("eu", &["a"]), ("us", &["x"])]);
        regions[0].replicas[0].admission = Admission::Disabled;
        let s = selector(&regions);
        let d = s.decide(&RouteRequest::default(), &vec![0, 0]).unwrap();
        assert_eq!((d.replica, d.outcome), (1, Outcome::NoToken));
    }

    #[test]
    fn fallback_order_is_local_region_then_yaml_order() {
        let regions = fleet(&[("a", &["a1"]), ("b", &["b1"]), ("c", &["c1"])]);
        let s = Selector::new(
            &regions,
            SelectorOptions {
                local_region: 2,
                ..SelectorOptions::default()
            },
            &TagRegistry::new(),
        );
        assert_eq!(s.regions[0].fallback, vec![2, 1]);
        assert_eq!(s.regions[1].fallback, vec![2, 0]);
        assert_eq!(s.regions[2].fallback, vec![0, 1]);
    }

    #[test]
    fn tags_survive_a_rebuild_with_reordered_replicas() {
        let tags = TagRegistry::new();
        let s1 = Selector::new(
            &fleet(&[("eu", &["a", "b"])]),
            SelectorOptions::default(),
            &tags,
        );
        let s2 = Selector::new(
            &fleet(&[("eu", &["b", "c", "a"])]),
            SelectorOptions::default(),
            &tags,
        );
        let a = s1.replicas()[0].tag;
        assert_eq!(s2.replica(s2.by_tag(a).unwrap()).unwrap().id.as_ref(), "a");
    }

    /// In-flight counts plus a per-replica warmth record, read at a fixed instant.
    struct WarmView {
        inflight: Vec<u32>,
        warmth: Vec<crate::TenantWarmth>,
    }

    const NOW_MS: u64 = 100_000;
    const WINDOW_MS: u64 = 30_000;

    impl WarmView {
        fn new(n: usize) -> Self {
            WarmView {
                inflight: vec![0; n],
                warmth: (0..n).map(|_| crate::TenantWarmth::new()).collect(),
            }
        }
        fn serve(&self, replica: ReplicaIdx, tenant: &str) -> &Self {
            self.warmth[replica as usize].record(TenantScope::new(tenant), NOW_MS);
            self
        }
    }

    impl LoadView for WarmView {
        fn inflight(&self, replica: ReplicaIdx) -> u32 {
            self.inflight[replica as usize]
        }
        fn tenant_warmth(&self, replica: ReplicaIdx, tenant: TenantScope) -> Option<Warmth> {
            Some(self.warmth[replica as usize].warmth(tenant, NOW_MS, WINDOW_MS))
        }
    }

    fn of_tenant(key: u64, tenant: &str) -> RouteRequest<'static> {
        RouteRequest {
            tenant: Some(TenantScope::new(tenant)),
            ..keyed(key)
        }
    }

    /// The key's ring owner and the other replicas of a three-replica region.
    fn owner_and_others(s: &Selector, key: u64) -> (ReplicaIdx, [ReplicaIdx; 2]) {
        let owner = s.decide(&keyed(key), &vec![0u32; 3]).unwrap().replica;
        let mut others = (0..3).filter(|&i| i != owner);
        (owner, [others.next().unwrap(), others.next().unwrap()])
    }

    #[test]
    fn a_free_slot_wins_over_warmth_and_without_one_fit_orders_the_warm_replicas() {
        /// Warmth from `WarmView`, engines from `EngineView`.
        struct Both(WarmView, EngineView);
        impl LoadView for Both {
            fn inflight(&self, replica: ReplicaIdx) -> u32 {
                self.0.inflight(replica)
            }
            fn tenant_warmth(&self, replica: ReplicaIdx, tenant: TenantScope) -> Option<Warmth> {
                self.0.tenant_warmth(replica, tenant)
            }
            fn active_sessions(&self, replica: ReplicaIdx) -> u32 {
                self.1.active_sessions(replica)
            }
            fn engine(&self, replica: ReplicaIdx) -> Option<EngineReading> {
                self.1.engine(replica)
            }
        }
        let s = selector(&fleet(&[("eu", &["a", "b", "c", "d"])]));
        for k in keys().take(100) {
            let owner = s.decide(&keyed(k), &vec![0; 4]).unwrap().replica;
            let other = |n: u32| (owner + n) % 4;
            let warm = WarmView::new(4);
            warm.serve(other(1), "acme").serve(other(2), "acme");
            warm.serve(owner, "globex").serve(other(3), "globex");
            // One of the other tenant's replicas has a free slot; acme's are full or over.
            let mut engines = EngineView(vec![(0, 2, slots(2, 0, 0)); 4]);
            engines.0[other(3) as usize].1 = 1;
            engines.0[other(2) as usize].1 = 3;
            let both = Both(warm, engines);
            let d = s.decide(&of_tenant(k, "acme"), &both).unwrap();
            assert_eq!(d.replica, other(3), "a free slot evicts no one");
            // No free slot anywhere: acme's replica most over its slots, not globex's, which
            // is over by more.
            let Both(warm, mut engines) = both;
            engines.0[other(3) as usize].1 = 2;
            engines.0[owner as usize].1 = 5;
            let d = s
                .decide(&of_tenant(k, "acme"), &Both(warm, engines))
                .unwrap();
            assert_eq!(d.replica, other(2), "acme's replica most over its slots");
        }
    }

    #[test]
    fn a_new_session_goes_to_a_replica_warm_for_its_tenant() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [other, _]) = owner_and_others(&s, k);
            let view = WarmView::new(3);
            view.serve(other, "acme").serve(owner, "globex");
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (other, Outcome::Locality));
            // The owner warm for the tenant too: the ring decides as before.
            view.serve(owner, "acme");
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (owner, Outcome::Ring));
        }
    }

    #[test]
    fn with_no_warm_replica_the_one_serving_fewest_other_tenants_wins() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [x, y]) = owner_and_others(&s, k);
            let view = WarmView::new(3);
            view.serve(owner, "globex").serve(owner, "initech");
            view.serve(x, "globex").serve(y, "initech");
            // x and y tie at one other tenant: the earlier on the walk wins, and it is stable.
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert!(d.replica == x || d.replica == y);
            assert_eq!(d.outcome, Outcome::Locality);
            assert_eq!(s.decide(&of_tenant(k, "acme"), &view).unwrap(), d);
            // A fleet cold for everyone: the ring owner.
            let cold = WarmView::new(3);
            let d = s.decide(&of_tenant(k, "acme"), &cold).unwrap();
            assert_eq!((d.replica, d.outcome), (owner, Outcome::Ring));
        }
    }

    #[test]
    fn locality_never_overrides_the_load_bound_or_a_sticky_entry() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [x, y]) = owner_and_others(&s, k);
            let mut view = WarmView::new(3);
            view.serve(x, "acme");
            // The warm replica is over the bound ceil(1.25 × (4 + 1) / 3) = 3.
            view.inflight[x as usize] = 4;
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!(d.replica, owner, "both others are cold and serve no one");
            assert_eq!(d.outcome, Outcome::Ring);
            // A session with an entry stays where it is, warm replica or not.
            view.inflight[x as usize] = 0;
            let sticky = RouteRequest {
                sticky: Some(s.replicas()[y as usize].tag),
                ..of_tenant(k, "acme")
            };
            let d = s.decide(&sticky, &view).unwrap();
            assert_eq!((d.replica, d.outcome), (y, Outcome::Sticky));
        }
    }

    #[test]
    fn a_warm_replica_with_more_than_its_share_of_new_sessions_is_passed_over() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [x, y]) = owner_and_others(&s, k);
            let view = WarmView::new(3);
            view.serve(x, "acme").serve(owner, "globex");
            // x took 4 of the 4 recent sessions: over ceil-free 1.25 × (4 + 1) / 3 ≈ 2.08.
            for _ in 0..4 {
                view.warmth[x as usize].record_placement(NOW_MS, WINDOW_MS);
            }
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!(d.replica, y, "cold, and serving no other tenant");
            assert_eq!(d.outcome, Outcome::Locality);
        }
    }

    #[test]
    fn of_two_warm_replicas_the_one_with_fewer_recent_placements_wins() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [x, y]) = owner_and_others(&s, k);
            let view = WarmView::new(3);
            view.serve(owner, "acme")
                .serve(x, "acme")
                .serve(y, "globex");
            // The owner took two recent sessions, x one: x is emptier, though later on the walk.
            for _ in 0..2 {
                view.warmth[owner as usize].record_placement(NOW_MS, WINDOW_MS);
            }
            view.warmth[x as usize].record_placement(NOW_MS, WINDOW_MS);
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (x, Outcome::Locality));
            // Equal counts: the earlier on the walk (the owner) keeps it.
            view.warmth[x as usize].record_placement(NOW_MS, WINDOW_MS);
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (owner, Outcome::Ring));
        }
    }

    #[test]
    fn recent_placements_are_compared_per_unit_of_weight() {
        // Raw counts would send new sessions to the small replica of two warm ones.
        let mut regions = fleet(&[("eu", &["a", "b", "c"])]);
        regions[0].replicas[2].weight = 3;
        let s = selector(&regions);
        for k in keys().take(50) {
            let view = WarmView::new(3);
            view.serve(0, "acme").serve(2, "acme").serve(1, "globex");
            // a: 1 placement for weight 1; c: 2 for weight 3, the emptier per unit. b took 6
            // (over its bound 1.25 × (9 + 1) / 5 = 2.5), so only a and c compete.
            let placements = [(0, 1), (1, 6), (2, 2)];
            for (replica, n) in placements {
                for _ in 0..n {
                    view.warmth[replica].record_placement(NOW_MS, WINDOW_MS);
                }
            }
            let d = s.decide(&of_tenant(k, "acme"), &view).unwrap();
            assert_eq!(d.replica, 2, "key {k:#x}");
        }
    }

    /// No requests in flight; recent served-request counts; whether a shed may happen now.
    struct ServedView {
        served: Vec<f64>,
        allow: bool,
    }

    impl LoadView for ServedView {
        fn inflight(&self, _replica: ReplicaIdx) -> u32 {
            0
        }
        fn recent_sent(&self, replica: ReplicaIdx) -> Option<f64> {
            self.served.get(replica as usize).copied()
        }
    }

    impl ShedGate for ServedView {
        fn claim_shed(&self, _replica: ReplicaIdx, over: bool) -> bool {
            over && self.allow
        }
    }

    fn served(served: &[f64]) -> ServedView {
        ServedView {
            served: served.to_vec(),
            allow: true,
        }
    }

    fn shedding(regions: &[RegionSpec], factor: f64) -> Selector {
        let options = SelectorOptions {
            shed_factor: Some(factor),
            ..SelectorOptions::default()
        };
        Selector::new(regions, options, &TagRegistry::new())
    }

    fn sticky_on(s: &Selector, replica: ReplicaIdx, key: u64) -> RouteRequest<'static> {
        RouteRequest {
            sticky: Some(s.replicas()[replica as usize].tag),
            ..keyed(key)
        }
    }

    #[test]
    fn a_replica_over_the_shed_limit_gives_a_sticky_session_to_the_least_loaded() {
        let s = shedding(&fleet(&[("eu", &["a", "b", "c"])]), 1.25);
        // Mean 30, limit 37.5: a (60) is over; c served least.
        let view = served(&[60.0, 20.0, 10.0]);
        for k in keys().take(50) {
            let d = s.decide(&sticky_on(&s, 0, k), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (2, Outcome::Shed));
            // b and c are under the limit: they keep their sessions.
            for r in [1, 2] {
                let d = s.decide(&sticky_on(&s, r, k), &view).unwrap();
                assert_eq!((d.replica, d.outcome), (r, Outcome::Sticky));
            }
            // The view says not now (the excess is new, or a shed just happened): it stays.
            let wait = ServedView {
                allow: false,
                ..served(&[60.0, 20.0, 10.0])
            };
            let d = s.decide_gated(&sticky_on(&s, 0, k), &wait, &wait).unwrap();
            assert_eq!((d.replica, d.outcome), (0, Outcome::Sticky));
        }
    }

    #[test]
    fn no_shed_within_the_limit_on_little_traffic_or_when_off() {
        let s = shedding(&fleet(&[("eu", &["a", "b", "c"])]), 1.25);
        for view in [served(&[37.0, 27.0, 26.0]), served(&[3.0, 0.0, 0.0])] {
            let d = s.decide(&sticky_on(&s, 0, 7), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (0, Outcome::Sticky));
        }
        let off = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        let d = off
            .decide(&sticky_on(&off, 0, 7), &served(&[90.0, 0.0, 0.0]))
            .unwrap();
        assert_eq!((d.replica, d.outcome), (0, Outcome::Sticky));
        // A draining replica is no destination, however idle (and not in the mean): of the
        // other two, a (90) is over 1.25 × 65 and sheds to c, not to the idle b.
        let mut regions = fleet(&[("eu", &["a", "b", "c"])]);
        regions[0].replicas[1].admission = Admission::Draining;
        let s = shedding(&regions, 1.25);
        let view = served(&[90.0, 0.0, 40.0]);
        let d = s.decide(&sticky_on(&s, 0, 7), &view).unwrap();
        assert_eq!((d.replica, d.outcome), (2, Outcome::Shed));
        // With no destination left, the session stays.
        regions[0].replicas[2].admission = Admission::Draining;
        let s = shedding(&regions, 1.25);
        let d = s.decide(&sticky_on(&s, 0, 7), &view).unwrap();
        assert_eq!((d.replica, d.outcome), (0, Outcome::Sticky));
    }

    #[test]
    fn a_shed_stays_in_the_home_region_when_it_has_room() {
        let s = shedding(&fleet(&[("eu", &["a", "b"]), ("us", &["c", "d"])]), 1.25);
        // Mean 22.5, limit 28.1: a is over. eu's b (15) is under the mean, so a session homed
        // in eu goes there although us's d is idler; one homed in us goes to d.
        let view = served(&[60.0, 15.0, 10.0, 5.0]);
        let mut homes = std::collections::HashSet::new();
        for k in keys().take(100) {
            let home = s.home_region(RoutingKey(k)).unwrap();
            homes.insert(home);
            let want = if home == 0 { 1 } else { 3 };
            let d = s.decide(&sticky_on(&s, 0, k), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (want, Outcome::Shed), "key {k:#x}");
        }
        assert_eq!(homes.len(), 2, "keys homed in both regions");
    }

    #[test]
    fn a_hot_region_sheds_to_another_region() {
        let s = shedding(&fleet(&[("eu", &["a", "b"]), ("us", &["c", "d"])]), 1.25);
        // Fleet mean 25, limit 31.25: eu's a (50) is over, and eu's b (35) is too, so the
        // session goes to us's least-loaded replica, whatever its home region.
        let view = served(&[50.0, 35.0, 10.0, 5.0]);
        for k in keys().take(50) {
            let d = s.decide(&sticky_on(&s, 0, k), &view).unwrap();
            assert_eq!((d.replica, d.outcome), (3, Outcome::Shed), "key {k:#x}");
        }
    }

    #[test]
    fn without_a_tenant_or_a_warmth_record_the_ring_alone_decides() {
        let s = selector(&fleet(&[("eu", &["a", "b", "c"])]));
        for k in keys().take(50) {
            let (owner, [x, _]) = owner_and_others(&s, k);
            let view = WarmView::new(3);
            view.serve(x, "acme");
            assert_eq!(s.decide(&keyed(k), &view).unwrap().replica, owner);
            let plain = vec![0u32; 3];
            assert_eq!(
                s.decide(&of_tenant(k, "acme"), &plain).unwrap().replica,
                owner
            );
        }
    }

    #[test]
    fn outcome_labels_are_stable() {
        let labels: Vec<_> = [
            Outcome::Sticky,
            Outcome::Ring,
            Outcome::Rebalanced,
            Outcome::Locality,
            Outcome::Failover,
            Outcome::CrossRegion,
            Outcome::NoToken,
        ]
        .iter()
        .map(|o| o.as_str())
        .collect();
        assert_eq!(
            labels,
            [
                "sticky",
                "ring",
                "rebalanced",
                "locality",
                "failover",
                "cross_region",
                "none"
            ]
        );
    }

    fn placed(regions: &[RegionSpec], placement: Placement, local_region: usize) -> Selector {
        let options = SelectorOptions {
            placement,
            local_region,
            ..SelectorOptions::default()
        };
        Selector::new(regions, options, &TagRegistry::new())
    }

    #[test]
    fn nearest_placement_starts_every_new_session_in_the_edges_own_region() {
        let regions = fleet(&[("eu", &["eu-1", "eu-2"]), ("us", &["us-1", "us-2"])]);
        let s = placed(&regions, Placement::Nearest, 1);
        let load = vec![0; 4];
        for k in keys() {
            let d = s.decide(&keyed(k), &load).unwrap();
            assert!(d.replica >= 2, "key {k:#x} went to {}", d.replica);
            assert_ne!(d.outcome, Outcome::CrossRegion);
        }
        // Hash placement sends about half to the other region.
        let hash = placed(&regions, Placement::Hash, 1);
        let eu = keys()
            .filter(|k| hash.decide(&keyed(*k), &load).unwrap().replica < 2)
            .count();
        assert!(eu > keys().count() / 4, "{eu}");
    }

    #[test]
    fn nearest_placement_spills_only_when_the_local_region_is_busier_than_the_fleet() {
        let regions = fleet(&[("eu", &["eu-1", "eu-2"]), ("us", &["us-1", "us-2"])]);
        let s = placed(&regions, Placement::Nearest, 1);
        // us carries 10 each, eu 0: the fleet-wide bound is 1.25 × 21 / 4 ≈ 6.6.
        let busy = vec![0, 0, 10, 10];
        for k in keys().take(200) {
            let d = s.decide(&keyed(k), &busy).unwrap();
            assert!(d.replica < 2);
            assert_eq!(d.outcome, Outcome::CrossRegion);
        }
        // A local imbalance that the fleet can absorb keeps sessions at home.
        let uneven = vec![3, 3, 4, 2];
        for k in keys().take(200) {
            assert!(s.decide(&keyed(k), &uneven).unwrap().replica >= 2);
        }
    }

    #[test]
    fn with_nearest_placement_a_session_fails_over_inside_its_recorded_region() {
        let mut regions = fleet(&[("eu", &["eu-1", "eu-2"]), ("us", &["us-1", "us-2"])]);
        regions[0].replicas[0].admission = Admission::Draining;
        let s = placed(&regions, Placement::Nearest, 1);
        let load = vec![0; 4];
        for k in keys().take(200) {
            let d = s.decide(&sticky_on(&s, 0, k), &load).unwrap();
            assert_eq!((d.replica, d.outcome), (1, Outcome::Failover), "key {k:#x}");
        }
    }

    #[test]
    fn a_shared_kv_region_serves_a_session_on_its_least_loaded_replica() {
        let mut regions = fleet(&[("eu", &["a", "b", "c"]), ("us", &["d"])]);
        regions[0].kv_scope = KvScope::Region;
        let s = selector(&regions);
        for k in keys().take(100) {
            // Idle: the session's own replica wins the tie (its local cache is warmest).
            let d = s.decide(&sticky_on(&s, 1, k), &vec![0; 4]).unwrap();
            assert_eq!((d.replica, d.outcome), (1, Outcome::Sticky));
            // Its replica is busy: the least-loaded one of the region takes it.
            let d = s.decide(&sticky_on(&s, 1, k), &vec![3, 5, 1, 0]).unwrap();
            assert_eq!((d.replica, d.outcome), (2, Outcome::SharedKv));
        }
        // A replica-scoped region keeps hard affinity under the same load.
        let hard = selector(&fleet(&[("eu", &["a", "b", "c"]), ("us", &["d"])]));
        let d = hard
            .decide(&sticky_on(&hard, 1, 7), &vec![3, 5, 1, 0])
            .unwrap();
        assert_eq!((d.replica, d.outcome), (1, Outcome::Sticky));
    }

    #[test]
    fn a_shared_kv_region_places_new_sessions_by_load_and_keeps_them_in_the_region() {
        let mut regions = fleet(&[("eu", &["a", "b", "c"])]);
        regions[0].kv_scope = KvScope::Region;
        regions[0].replicas[0].admission = Admission::Draining;
        let s = selector(&regions);
        let d = s.decide(&keyed(42), &vec![0, 4, 2]).unwrap();
        assert_eq!((d.replica, d.outcome), (2, Outcome::SharedKv));
        // Its recorded replica drained: still in the region, least-loaded.
        let d = s.decide(&sticky_on(&s, 0, 42), &vec![0, 1, 2]).unwrap();
        assert_eq!((d.replica, d.outcome), (1, Outcome::SharedKv));
    }
}
