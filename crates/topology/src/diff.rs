//! What a reload changes: the settings that apply live, described for the log and the admin
//! API, and the ones a running process cannot change (they need a restart or an upgrade).

use std::collections::BTreeMap;

use crate::{Replica, Topology};

/// The difference between the running topology and a newly loaded one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyDiff {
    /// Human-readable changes that take effect with the reload, e.g.
    /// `replica eu-4 added (region eu, weight 1)`.
    pub changes: Vec<String>,
    /// Keys whose new value is ignored until a restart, e.g. `listen`.
    pub restart_required: Vec<&'static str>,
}

impl TopologyDiff {
    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.restart_required.is_empty()
    }
}

/// Compares `old` (running) with `new` (just loaded). `started` is the topology the process
/// started with: settings fixed at start-up are compared against it, so a pending restart keeps
/// being reported on every reload until it happens.
pub fn diff(started: &Topology, old: &Topology, new: &Topology) -> TopologyDiff {
    let mut d = TopologyDiff::default();

    // Fixed at start-up: listeners and threads belong to the process, the usage log and the
    // session key to the metering pipeline opened once, the sticky store's connections to the
    // process.
    let addresses = |t: &Topology| t.listen_tls.iter().map(|l| l.address).collect::<Vec<_>>();
    let fixed: [(&'static str, bool); 13] = [
        ("listen", started.listen != new.listen),
        ("listen_tls[].address", addresses(started) != addresses(new)),
        ("admin_listen", started.admin_listen != new.admin_listen),
        (
            "server.threads",
            started.server.threads != new.server.threads,
        ),
        (
            "server.work_stealing",
            started.server.work_stealing != new.server.work_stealing,
        ),
        (
            "server.drain_timeout",
            started.server.drain_timeout != new.server.drain_timeout,
        ),
        (
            "server.graceful_shutdown_timeout",
            started.server.graceful_shutdown_timeout != new.server.graceful_shutdown_timeout,
        ),
        (
            "server.pid_file",
            started.server.pid_file != new.server.pid_file,
        ),
        (
            "server.upgrade_sock",
            started.server.upgrade_sock != new.server.upgrade_sock,
        ),
        ("usage_log", started.usage_log != new.usage_log),
        (
            "metering.session_key",
            started.metering.session_key != new.metering.session_key,
        ),
        ("sticky_store", started.sticky_store != new.sticky_store),
        // Routing keys (the ring, the override table, a tier's bindings) all derive from the
        // secret: it changes only with the process, like the ring of a fresh start.
        (
            "affinity.key_secret",
            started.affinity.key_secret != new.affinity.key_secret,
        ),
    ];
    d.restart_required = fixed
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();

    // Replicas, by id.
    let index = |t: &Topology| -> BTreeMap<String, (String, Replica)> {
        t.replicas()
            .map(|(r, replica)| {
                (
                    replica.id.clone(),
                    (t.regions[r].name.clone(), replica.clone()),
                )
            })
            .collect()
    };
    let (before, after) = (index(old), index(new));
    for (id, (region, r)) in &after {
        match before.get(id) {
            None => d.changes.push(format!(
                "replica {id} added (region {region}, weight {}, {})",
                r.weight, r.state
            )),
            Some((old_region, o)) => {
                let mut what = Vec::new();
                if old_region != region {
                    what.push(format!("region {old_region} → {region}"));
                }
                if o.address != r.address {
                    what.push(format!("address {} → {}", o.address, r.address));
                }
                if o.weight != r.weight {
                    what.push(format!("weight {} → {}", o.weight, r.weight));
                }
                if o.state != r.state {
                    what.push(format!("state {} → {}", o.state, r.state));
                }
                if o.max_inflight != r.max_inflight {
                    what.push(format!(
                        "max_inflight {:?} → {:?}",
                        o.max_inflight, r.max_inflight
                    ));
                }
                if o.dialect != r.dialect {
                    what.push(format!("dialect {:?} → {:?}", o.dialect, r.dialect));
                }
                if o.tls != r.tls {
                    what.push(match &r.tls {
                        Some(t) => format!("tls (sni {}, verify {})", t.sni, t.verify),
                        None => "tls off".to_owned(),
                    });
                }
                if o.engine != r.engine {
                    what.push(format!(
                        "engine {} → {}",
                        o.engine.as_str(),
                        r.engine.as_str()
                    ));
                }
                if !what.is_empty() {
                    d.changes.push(format!("replica {id}: {}", what.join(", ")));
                }
            }
        }
    }
    for id in before.keys().filter(|id| !after.contains_key(*id)) {
        d.changes.push(format!("replica {id} removed"));
    }

    // Certificates apply to new connections at once; the listeners themselves stay.
    for (i, l) in new.listen_tls.iter().enumerate() {
        let before = old.listen_tls.iter().find(|o| o.address == l.address);
        if before.is_some_and(|o| o.certificates != l.certificates) {
            d.changes
                .push(format!("listen_tls[{i}] ({}) certificates", l.address));
        }
    }

    let region_order = |t: &Topology| t.regions.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    if region_order(old) != region_order(new) {
        d.changes.push(format!(
            "regions {:?} → {:?}",
            region_order(old),
            region_order(new)
        ));
    }
    if old.local().name != new.local().name {
        d.changes.push(format!(
            "local_region {} → {}",
            old.local().name,
            new.local().name
        ));
    }

    fn tenants(t: &Topology) -> BTreeMap<&str, &crate::Tenant> {
        t.tenants.iter().map(|t| (t.id.as_str(), t)).collect()
    }
    let (tb, ta) = (tenants(old), tenants(new));
    for (id, t) in &ta {
        match tb.get(id) {
            None => d.changes.push(format!("tenant {id} added")),
            Some(o) => {
                if o.api_key_sha256 != t.api_key_sha256 {
                    d.changes.push(format!("tenant {id}: new API key"));
                }
                if o.limits != t.limits {
                    d.changes.push(format!("tenant {id}: new limits"));
                }
            }
        }
    }
    for id in tb.keys().filter(|id| !ta.contains_key(**id)) {
        d.changes.push(format!("tenant {id} removed"));
    }

    for (section, changed) in [
        ("affinity", old.affinity != new.affinity),
        ("tenant_limits", old.tenant_limits != new.tenant_limits),
        ("pricing", old.pricing != new.pricing),
        ("metering", {
            let (o, n) = (&old.metering, &new.metering);
            o.enabled != n.enabled
                || o.inject_stream_usage != n.inject_stream_usage
                || o.cache_loss != n.cache_loss
        }),
        ("upstream", old.upstream != new.upstream),
        ("health", old.health != new.health),
        ("failover", old.failover != new.failover),
        ("admin", old.admin != new.admin),
        ("reload", old.reload != new.reload),
        ("request_bodies", old.request_bodies != new.request_bodies),
    ] {
        if changed {
            d.changes.push(format!("{section} settings changed"));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
local_region: eu
regions:
  - name: eu
    replicas:
      - { id: eu-1, address: "127.0.0.1:9101" }
      - { id: eu-2, address: "127.0.0.1:9102" }
  - name: us
    replicas:
      - { id: us-1, address: "127.0.0.1:9201" }
tenants:
  - { id: acme, api_key_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }
"#;

    fn load(yaml: &str) -> Topology {
        Topology::from_yaml(yaml, "test.yaml").unwrap()
    }

    fn changes(new: &str) -> TopologyDiff {
        let old = load(BASE);
        diff(&old, &old, &load(new))
    }

    #[test]
    fn the_same_file_is_no_change() {
        assert!(changes(BASE).is_empty());
    }

    #[test]
    fn replica_additions_removals_and_edits_are_named() {
        let new = BASE
            .replace(
                "      - { id: eu-2, address: \"127.0.0.1:9102\" }",
                "      - { id: eu-2, address: \"127.0.0.1:9102\", weight: 3, state: draining }\n      - { id: eu-3, address: \"127.0.0.1:9103\" }",
            )
            .replace(
                "      - { id: us-1, address: \"127.0.0.1:9201\" }",
                "      - { id: us-2, address: \"127.0.0.1:9202\" }",
            );
        let d = changes(&new);
        assert_eq!(
            d.changes,
            [
                "replica eu-2: weight 1 → 3, state active → draining",
                "replica eu-3 added (region eu, weight 1, active)",
                "replica us-2 added (region us, weight 1, active)",
                "replica us-1 removed",
            ]
        );
        assert!(d.restart_required.is_empty());
    }

    #[test]
    fn tenants_and_sections_are_named() {
        let new = format!(
            "{BASE}  - {{ id: beta, api_key_sha256: \"fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9\" }}\npricing:\n  default: {{ input_per_mtok: 1, cached_input_per_mtok: 0.1, output_per_mtok: 2 }}\nhealth: {{ eject_after: 5 }}\n"
        );
        let d = changes(&new);
        assert_eq!(
            d.changes,
            [
                "tenant beta added",
                "pricing settings changed",
                "health settings changed"
            ]
        );
    }

    #[test]
    fn listeners_threads_and_the_usage_log_need_a_restart() {
        let new = format!(
            "{}server: {{ threads: 8, work_stealing: false }}\nusage_log: {{ path: /tmp/u.jsonl }}\n",
            BASE.replace("127.0.0.1:8080", "127.0.0.1:8081")
        );
        let d = changes(&new);
        assert_eq!(
            d.restart_required,
            [
                "listen",
                "server.threads",
                "server.work_stealing",
                "usage_log"
            ]
        );
        assert!(d.changes.is_empty(), "{:?}", d.changes);
    }

    #[test]
    fn a_new_key_secret_needs_a_restart() {
        let d = changes(&format!(
            "{BASE}affinity: {{ key_secret: {{ env: TETHER_KEY_SECRET }} }}\n"
        ));
        assert_eq!(d.restart_required, ["affinity.key_secret"]);
    }

    #[test]
    fn a_pending_restart_is_reported_against_the_started_topology() {
        let started = load(BASE);
        let moved = load(&BASE.replace("127.0.0.1:8080", "127.0.0.1:8081"));
        // The second reload of the same file still reports it: the process still listens on
        // the old address.
        assert_eq!(diff(&started, &moved, &moved).restart_required, ["listen"]);
    }
}
