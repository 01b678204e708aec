//! Running as one instance of a tier: the shared sticky store wired into routing.
//!
//! The local override table stays the first level. What another instance cannot compute by
//! itself — a session's replica, when it is new or moved — goes to the store
//! ([`StoreSink`], told by the fleet); a binding another instance changes comes back over the
//! store's pub/sub channel and lands in the local table. A request asks the store only when
//! the local table has no entry for its key, and waits at most `lookup_timeout`; a store
//! that is down, slow or wrong costs warmth, never a request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use tether_affinity::{BindingSink, FleetState, ReplicaTag, RoutingKey, TenantScope};
use tether_health::now_ms;
use tether_sticky_store::{Lookup, StickyStore, StoreSettings, StoreStats};
use tether_topology::Topology;

use crate::router::Router;

/// The fleet's bindings, passed on to the store.
#[derive(Debug)]
pub struct StoreSink(pub StickyStore);

impl BindingSink for StoreSink {
    fn bound(&self, key: RoutingKey, replica: &str, tenant: Option<TenantScope>) {
        self.0
            .bind(key.0, replica, tenant.map(TenantScope::locality_tag));
    }

    fn still_bound(&self, key: RoutingKey, replica: &str) {
        self.0.touch(key.0, replica);
    }

    fn ttl_changed(&self, ttl: std::time::Duration) {
        self.0.set_ttl(ttl);
    }
}

/// A sink that drops everything: `tether check` stands it in for a configured store, which it
/// does not start.
#[derive(Debug)]
pub struct DiscardSink;

impl BindingSink for DiscardSink {
    fn bound(&self, _key: RoutingKey, _replica: &str, _tenant: Option<TenantScope>) {}
    fn still_bound(&self, _key: RoutingKey, _replica: &str) {}
}

/// The other instances' latest load reports, by origin, until they go stale.
#[derive(Debug, Default)]
struct ReportsElsewhere {
    by_origin: Mutex<HashMap<u64, Report>>,
}

#[derive(Debug)]
struct Report {
    received: Instant,
    inflight: Vec<(Arc<str>, u32)>,
}

/// Most instances whose reports are kept: a tier is a few dozen instances; more origins than
/// this are garbage (or an attack on the channel), and the oldest reports make room.
const MAX_REPORTING_INSTANCES: usize = 1024;

impl ReportsElsewhere {
    fn take(&self, origin: u64, entries: &[(&str, u32)], now: Instant) {
        let mut by_origin = self
            .by_origin
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if by_origin.len() >= MAX_REPORTING_INSTANCES && !by_origin.contains_key(&origin) {
            if let Some(oldest) = by_origin
                .iter()
                .min_by_key(|(_, r)| r.received)
                .map(|(o, _)| *o)
            {
                by_origin.remove(&oldest);
            }
        }
        let inflight = entries.iter().map(|(id, n)| (Arc::from(*id), *n)).collect();
        by_origin.insert(
            origin,
            Report {
                received: now,
                inflight,
            },
        );
    }

    /// Requests in flight per replica id over the reports younger than `stale_after` (older
    /// ones are dropped: an instance that stopped or lost the store).
    fn sums(&self, now: Instant, stale_after: Duration) -> HashMap<Arc<str>, u32> {
        let mut by_origin = self
            .by_origin
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        by_origin.retain(|_, r| now.saturating_duration_since(r.received) <= stale_after);
        let mut sums: HashMap<Arc<str>, u32> = HashMap::new();
        for report in by_origin.values() {
            for (id, n) in &report.inflight {
                let sum = sums.entry(Arc::clone(id)).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
        sums
    }
}

/// The store as routing uses it.
#[derive(Debug, Clone)]
pub struct Tier {
    store: StickyStore,
    /// Bindings found in the store (or announced) that name a replica this instance does not
    /// know: garbage, or a replica of a config this instance has not loaded.
    unknown_replicas: Arc<AtomicU64>,
    /// How often load is reported; `None`: load is not shared.
    load_interval: Option<Duration>,
    elsewhere: Arc<ReportsElsewhere>,
}

impl Tier {
    /// Starts the store of `topology`, if it has one (connecting happens in the background).
    pub fn start(topology: &Topology) -> anyhow::Result<Option<Tier>> {
        let Some(s) = &topology.sticky_store else {
            return Ok(None);
        };
        let settings = StoreSettings {
            url: s.url.clone(),
            cluster: s.cluster,
            key_prefix: s.key_prefix.clone(),
            channel: s.channel.clone(),
            lookup_timeout: s.lookup_timeout,
            ttl: topology.affinity.override_ttl,
            write_queue: s.write_queue,
            tls_ca_file: s.tls_ca_file.clone(),
        };
        let store = StickyStore::start(settings)?;
        Ok(Some(Tier {
            store,
            unknown_replicas: Arc::new(AtomicU64::new(0)),
            load_interval: s.load_interval,
            elsewhere: Arc::default(),
        }))
    }

    /// The sink the fleet tells its bindings to.
    pub fn sink(&self) -> Arc<dyn BindingSink> {
        Arc::new(StoreSink(self.store.clone()))
    }

    /// Takes other instances' binding changes into the router's state as they are announced
    /// (for the sessions this instance has an entry for), and their placements into tenant
    /// locality's record (for every session: where the tier puts a tenant's new sessions is
    /// what gathers the tenant, and one instance sees only its own share of them).
    pub fn follow(&self, router: Arc<Router>) {
        let unknown = Arc::clone(&self.unknown_replicas);
        let following = Arc::clone(&router);
        let shares_load = self.load_interval.is_some();
        self.store.on_remote_bind(move |key, replica, tenant_tag| {
            let router = &following;
            if !router.state().learn_if_known(RoutingKey(key), replica) {
                unknown.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let snapshot = router.snapshot();
            if shares_load {
                snapshot.fleet().note_inflight_elsewhere(replica);
            }
            if let Some(tag) = tenant_tag {
                snapshot
                    .fleet()
                    .note_placed_elsewhere(replica, tag, now_ms());
            }
        });
        if self.load_interval.is_some() {
            // Only kept here: [`share_load`](Self::share_load) sums them once per interval,
            // so a large tier's reports cost the store's thread a map insert each.
            let elsewhere = Arc::clone(&self.elsewhere);
            self.store.on_remote_load(move |origin, entries| {
                elsewhere.take(origin, entries, Instant::now());
            });
        }
    }

    /// How often this instance reports its load, if it shares load at all.
    pub fn load_interval(&self) -> Option<Duration> {
        self.load_interval
    }

    /// Tells the other instances the requests in flight per replica here (while the store
    /// is connected: a report that cannot be sent is not queued up), and drops their reports
    /// that went stale, so that an instance that stops reporting stops counting.
    pub fn share_load(&self, router: &Router) {
        let Some(every) = self.load_interval else {
            return;
        };
        let snapshot = router.snapshot();
        if self.store.stats().connected {
            self.store.publish_load(&snapshot.fleet().inflight_report());
        }
        let sums = self.elsewhere.sums(Instant::now(), stale_after(every));
        snapshot
            .fleet()
            .set_inflight_elsewhere(|id| sums.get(id).copied().unwrap_or(0));
    }

    /// Asks the store for `key`'s replica and takes an answer into `state`, so that routing
    /// finds it like a local entry. Waits at most the lookup timeout; returns whether a
    /// binding was learnt.
    pub async fn recall(&self, state: &FleetState, key: RoutingKey) -> bool {
        match self.store.lookup(key.0).await {
            Lookup::Found(replica) => {
                let known = state.learn(key, &replica);
                if !known {
                    self.unknown_replicas.fetch_add(1, Ordering::Relaxed);
                }
                known
            }
            Lookup::Missing | Lookup::Unavailable(_) => false,
        }
    }

    /// Changes whenever the store's connection or subscription comes (back) up.
    pub fn epoch(&self) -> u64 {
        self.store.epoch()
    }

    /// After the store came back: every entry of the local table is to be checked against
    /// it on its next turn (announcements may have been missed), and every binding is
    /// written back (`SET NX`: a binding the store holds, possibly newer, is never
    /// overwritten), since the store may have lost them or never received them. Returns how
    /// many were written.
    pub async fn resync(&self, router: &Router) -> usize {
        let state = router.state();
        state.reverify();
        let snapshot = router.snapshot();
        let ids: HashMap<ReplicaTag, Arc<str>> = snapshot
            .fleet()
            .replicas()
            .iter()
            .map(|r| (r.tag(), Arc::clone(r.id())))
            .collect();
        let mut written = 0;
        for (key, tag) in state.overrides().entries() {
            // A replica no longer in the topology: its sessions move on their next turn.
            let Some(id) = ids.get(&tag) else {
                continue;
            };
            if !self.store.touch_waiting(key.0, id).await {
                break;
            }
            written += 1;
        }
        written
    }

    /// Flushes queued writes (best effort, bounded) and stops the store's thread.
    pub fn shutdown(&self) {
        self.store.shutdown();
    }

    /// The store's metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        render_stats(
            &self.store.stats(),
            self.unknown_replicas.load(Ordering::Relaxed),
            out,
        );
    }
}

/// A report older than this many intervals is dropped: a lost message or two is not an
/// instance gone.
fn stale_after(every: Duration) -> Duration {
    every * 5
}

/// Writes one metric family: its HELP and TYPE lines, then `name{labels} value` per sample.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn render_stats(stats: &StoreStats, unknown_replicas: u64, out: &mut String) {
    let plain = |value: String| vec![(String::new(), value)];
    let by = |label: &str, pairs: Vec<(&str, u64)>| -> Vec<(String, String)> {
        pairs
            .into_iter()
            .map(|(l, v)| (format!("{{{label}=\"{l}\"}}"), v.to_string()))
            .collect()
    };
    family(
        out,
        "tether_sticky_store_connected",
        "gauge",
        "Whether the sticky store's connection is up.",
        &plain(u8::from(stats.connected).to_string()),
    );
    family(
        out,
        "tether_sticky_store_subscribed",
        "gauge",
        "Whether binding changes from other instances arrive.",
        &plain(u8::from(stats.subscribed).to_string()),
    );
    family(
        out,
        "tether_sticky_store_lookups_total",
        "counter",
        "Store lookups by result.",
        &by(
            "result",
            vec![
                ("found", stats.lookups.found),
                ("missing", stats.lookups.missing),
                ("unavailable", stats.lookups.unavailable.total()),
            ],
        ),
    );
    let mut errors: Vec<(&str, u64)> = stats.errors.iter().map(|(k, n)| (k.as_str(), n)).collect();
    errors.push(("unknown_replica", unknown_replicas));
    family(
        out,
        "tether_sticky_store_errors_total",
        "counter",
        "Failed store operations by kind.",
        &by("kind", errors),
    );
    family(
        out,
        "tether_sticky_store_writes_total",
        "counter",
        "Store writes (binds and refreshes) by result.",
        &by(
            "result",
            vec![
                ("done", stats.writes_done),
                ("dropped", stats.writes_dropped),
            ],
        ),
    );
    family(
        out,
        "tether_sticky_store_remote_binds_total",
        "counter",
        "Binding changes received from other instances.",
        &plain(stats.remote_binds.to_string()),
    );
    let h = &stats.lookup_latency;
    let mut samples: Vec<(String, String)> = h
        .buckets
        .iter()
        .map(|b| {
            (
                format!("_bucket{{le=\"{}\"}}", b.le_seconds),
                b.cumulative_count.to_string(),
            )
        })
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
    samples.push(("_sum".into(), h.sum_seconds.to_string()));
    samples.push(("_count".into(), h.count.to_string()));
    family(
        out,
        "tether_sticky_store_lookup_seconds",
        "histogram",
        "Time a request waited for the store.",
        &samples,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_from_several_instances_add_up_and_stale_ones_drop_out() {
        let reports = ReportsElsewhere::default();
        let start = Instant::now();
        reports.take(1, &[("eu-1", 3), ("eu-2", 1)], start);
        reports.take(2, &[("eu-1", 2)], start + Duration::from_millis(300));
        // A newer report from an instance replaces its older one.
        reports.take(1, &[("eu-1", 4)], start + Duration::from_millis(400));
        let sums = reports.sums(
            start + Duration::from_millis(450),
            Duration::from_millis(500),
        );
        assert_eq!(sums.get("eu-1"), Some(&6));
        assert_eq!(sums.get("eu-2"), None);
        // Instance 2 stops reporting: its share drops out once stale.
        let later = reports.sums(
            start + Duration::from_millis(850),
            Duration::from_millis(500),
        );
        assert_eq!(later.get("eu-1"), Some(&4));
        let gone = reports.sums(start + Duration::from_secs(2), Duration::from_millis(500));
        assert!(gone.is_empty());
    }

    #[test]
    fn reports_kept_are_bounded_by_instance_count() {
        let reports = ReportsElsewhere::default();
        let start = Instant::now();
        for origin in 0..(MAX_REPORTING_INSTANCES as u64 + 10) {
            reports.take(
                origin,
                &[("eu-1", 1)],
                start + Duration::from_micros(origin),
            );
        }
        let sums = reports.sums(start + Duration::from_millis(1), Duration::from_secs(1));
        assert_eq!(sums.get("eu-1"), Some(&(MAX_REPORTING_INSTANCES as u32)));
    }
}
