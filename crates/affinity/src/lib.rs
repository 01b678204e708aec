//! Session-affinity routing: which replica should serve this turn of this conversation.
//!
//! Agent and chat clients resend a growing conversation on every turn. The replica that served
//! the previous turn still holds its KV cache, so sending the next turn there skips most of the
//! prefill. Clients opt in by sending an opaque token per conversation in a header
//! (`x-session-affinity` by default); this crate turns that token into a routing decision. It
//! knows nothing of HTTP or Pingora, so every rule here is unit- and property-tested.
//!
//! # The contract
//!
//! - **Token** ([`TokenRules`]): 1..=`max_len` bytes of visible ASCII; anything else is refused
//!   (the proxy answers 400). Repeats of the header must agree. The token never leaves this
//!   crate: only its tenant-scoped digest, the [`RoutingKey`], does.
//! - **Key** ([`TenantScope::key`]): `xxh3(token, seed = xxh3(tenant))`, so two tenants sending
//!   the same token never share routing state.
//! - **Decision** ([`Selector::decide`]), in order:
//!   1. *override*: the [`OverrideTable`] entry (the replica that last served the key) wins if
//!      that replica is active, healthy, not already tried and below its hard `max_inflight`;
//!   2. *ring*: otherwise walk the home region's weighted consistent-hash [`Ring`] from the key,
//!      skipping replicas that are draining/disabled/unhealthy or over the bounded-load limit
//!      `ceil(c × (in-flight + 1) × weight / Σ weight)` (consistent hashing with bounded loads,
//!      Mirrokni–Thorup–Zadimoghaddam 2016);
//!   3. *other regions*: the same walk in the local region, then the rest in configured order;
//!   4. *no token*: the least-loaded eligible replica of the local region.
//!
//!   *Tenant locality* refines step 2 (and 3) when the request names a tenant and the caller's
//!   [`LoadView`] reports [`TenantWarmth`]: among the replicas the walk accepts that are also
//!   under the same bound on recently *placed* sessions, the one warm for the tenant with the
//!   fewest recent placements per unit of weight wins, else the one serving the fewest other
//!   tenants.
//!
//!   *Sticky shedding* (off by default) refines step 1: with
//!   [`SelectorOptions::shed_factor`] set and the view reporting [`ReplicaLoad`], a replica
//!   that has served more than that factor × the fleet's mean for a while gives one sticky
//!   session at a time to the least-loaded eligible replica.
//!
//!   With [`Placement::Nearest`] a new session's home is the edge's own region while it has
//!   room, and a recorded session fails over inside its region first; in a
//!   [`KvScope::Region`] region the least-loaded eligible replica serves (soft affinity).
//!
//!   Each decision records its branch as an [`Outcome`] (`sticky`, `shed`, `ring`,
//!   `rebalanced`, `locality`, `failover`, `cross_region`, `shared_kv`, `none`) for logs and
//!   metrics.
//! - **Recording**: after a successful response the proxy records `key → replica` in the
//!   override table. Adding a replica therefore moves no session that has an entry; removing or
//!   draining one moves only its own sessions. Entries idle out after a TTL, and the table is
//!   bounded: a background task calls [`OverrideTable::maintain`] (promptly when
//!   [`OverrideTable::needs_maintenance`]), and between its runs an insert never takes the table
//!   past [`OverrideTable::ceiling`].
//!
//! # Cost
//!
//! A sticky decision is one hash-table probe under a shard's read lock and a few atomic loads,
//! and recording a turn that stays on its replica takes that read lock again, never a write
//! lock (see [`OverrideTable`] for every lock); a ring decision adds a binary search over
//! `2048 × Σ weight` points and a walk that is O(1) expected. Nothing on the decision path
//! allocates for regions of up to 128 replicas. (Measured in `docs/performance.md`.)
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tether_affinity::*;
//!
//! let regions = vec![RegionSpec {
//!     name: "eu".into(),
//!     replicas: ["eu-1", "eu-2", "eu-3"]
//!         .iter()
//!         .map(|id| ReplicaSpec {
//!             id: id.to_string(),
//!             weight: 1,
//!             admission: Admission::Active,
//!             max_inflight: None,
//!         })
//!         .collect(),
//!     kv_scope: KvScope::Replica,
//! }];
//! let tags = TagRegistry::new();
//! let selector = Selector::new(&regions, SelectorOptions::default(), &tags);
//! let overrides = OverrideTable::new(Duration::from_secs(3600), 1_000_000);
//!
//! let token = TokenRules::default().validate(b"3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c").unwrap();
//! let key = TenantScope::new("acme").key(token);
//! let inflight = vec![0u32; 3];
//!
//! // First turn: the ring decides; the proxy records who served it.
//! let first = selector
//!     .decide(&RouteRequest { key: Some(key), sticky: overrides.get(key), tried: None, tenant: None }, &inflight)
//!     .unwrap();
//! assert_eq!(first.outcome, Outcome::Ring);
//! overrides.record(key, selector.replicas()[first.replica as usize].tag);
//!
//! // Next turn: the override wins.
//! let next = selector
//!     .decide(&RouteRequest { key: Some(key), sticky: overrides.get(key), tried: None, tenant: None }, &inflight)
//!     .unwrap();
//! assert_eq!((next.replica, next.outcome), (first.replica, Outcome::Sticky));
//! ```

mod activity;
mod clock;
mod conversation;
#[cfg(test)]
mod crafted_keys;
mod fleet;
mod key;
mod labels;
mod overrides;
mod prompt_count;
mod ring;
mod selector;
mod shed;
mod token;
mod warmth;

pub use activity::{SessionActivity, ACTIVE_SESSION_WINDOW_MS, GAP_MULTIPLE, MIN_ACTIVE_WINDOW_MS};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use conversation::{BodyKeys, Fingerprinter, HEAD_TEXT_CAP};
pub use fleet::{
    log_transition, refresh_due, retry_policy, AttemptFacts, Attempts, BindingSink, Failure, Fleet,
    FleetPlan, FleetState, RegionPlan, Replica, ReplicaPlan, Retry, RetryLimits, Route,
    SessionStatus,
};
pub use key::{KeySecret, RoutingKey, ShortKeySecret, TenantScope, MIN_KEY_SECRET_LEN};
pub use labels::{Admission, InflightCap, KeySource, KvScope, Outcome, Placement, UnknownOutcome};
pub use overrides::{Maintenance, OverrideTable, Recorded, ReplicaTag, MAX_REPLICA_TAG};
pub use prompt_count::MAX_PROMPT_COUNT;
pub use ring::{ReplicaIdx, ReplicaSet, Ring, RingWalk, DEFAULT_POINTS_PER_WEIGHT};
pub use selector::{
    has_headroom, truly_full, Decision, LoadView, RegionSpec, ReplicaInfo, ReplicaSpec,
    RouteRequest, Selector, SelectorOptions, ShedGate, ShedWhenOver, TagRegistry,
    KV_HEADROOM_LIMIT,
};
pub use shed::{ReplicaLoad, COOLDOWN_MS, MIN_SHED_LOAD, PERSIST_MS, SENT_WINDOW_MS};
pub use token::{ByteKind, SessionToken, TokenError, TokenRules, DEFAULT_MAX_TOKEN_LEN};
pub use warmth::{TenantWarmth, Warmth, WARMTH_SLOTS};
