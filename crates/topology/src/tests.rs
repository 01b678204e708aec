use std::time::Duration;

use tether_affinity::{Admission, KeySource, KvScope, Placement};
use tether_metering::Dialect;

use super::*;

const VALID: &str = r#"
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
local_region: eu
affinity:
  header: X-Session-Affinity
  max_token_len: 128
  balance_factor: 1.25
  override_ttl: 1h
  override_capacity: 1000000
regions:
  - name: eu
    replicas:
      - { id: eu-1, address: "127.0.0.1:9101", weight: 1, max_inflight: 64 }
      - { id: eu-2, address: "127.0.0.1:9102", state: draining }
  - name: us
    replicas:
      - { id: us-1, address: "127.0.0.1:9201", weight: 3, state: disabled, dialect: llamacpp }
tenants:
  - { id: acme, api_key_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }
pricing:
  default: { input_per_mtok: 0.50, cached_input_per_mtok: 0.05, output_per_mtok: 1.50 }
  models:
    big-model: { input_per_mtok: 3, cached_input_per_mtok: 0.3, output_per_mtok: 15 }
usage_log: { path: logs/usage.jsonl }
metering: { session_key: "0123456789abcdef" }
upstream: { connect_timeout: 500ms, read_timeout: 2m }
server: { threads: 4, grace_period: 10s }
"#;

fn load(yaml: &str) -> Result<Topology, TopologyError> {
    Topology::from_yaml(yaml, "test.yaml")
}

/// The single problem reported for `yaml`, as `key: message`.
fn problem(yaml: &str) -> Problem {
    match load(yaml) {
        Err(TopologyError::Invalid { problems, .. }) => {
            assert_eq!(problems.len(), 1, "expected one problem, got {problems:#?}");
            problems.into_iter().next().unwrap()
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn parse_error(yaml: &str) -> (Option<usize>, String) {
    match load(yaml) {
        Err(TopologyError::Parse { line, message, .. }) => (line, message),
        other => panic!("expected Parse, got {other:?}"),
    }
}

#[test]
fn the_full_example_loads_with_every_field() {
    let t = load(VALID).unwrap();
    assert_eq!(t.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(t.admin_listen.unwrap().to_string(), "127.0.0.1:9090");
    assert_eq!(t.local().name, "eu");
    assert_eq!(
        t.affinity.header, "x-session-affinity",
        "header names are lower-cased"
    );
    assert_eq!(t.affinity.override_ttl, Duration::from_secs(3600));
    assert_eq!(
        t.regions[0].replicas[0].max_inflight,
        Some(tether_affinity::InflightCap::Fixed(64))
    );
    assert_eq!(t.regions[0].replicas[0].engine, EngineKind::None);
    assert_eq!(t.regions[0].replicas[1].state, Admission::Draining);
    assert_eq!(t.regions[0].replicas[1].weight, 1, "weight defaults to 1");
    assert_eq!(t.regions[1].replicas[0].state, Admission::Disabled);
    assert_eq!(t.tenants[0].api_key_sha256[0], 0x2c);
    assert_eq!(t.pricing.default.input, 500_000);
    assert_eq!(t.pricing.default.cached_input, 50_000);
    assert_eq!(t.pricing.price(Some("big-model")).output, 15_000_000);
    assert_eq!(
        t.pricing.price(Some("other")),
        t.pricing.default,
        "a model without its own entry"
    );
    assert_eq!(
        t.pricing.price(None),
        t.pricing.default,
        "a response that named no model"
    );
    assert_eq!(t.upstream.connect_timeout, Duration::from_millis(500));
    assert_eq!(t.upstream.read_timeout, Some(Duration::from_secs(120)));
    assert_eq!(t.server.threads, 4);
    assert_eq!(t.replicas().count(), 3);
    let t = load(&VALID.replace("threads: 4,", "threads: 4, work_stealing: false,")).unwrap();
    assert!(!t.server.work_stealing);
    let err = load(&VALID.replace("threads: 4,", "threads: 4, work_stealing: maybe,"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.work_stealing"), "{err}");
}

#[test]
fn a_minimal_file_gets_the_documented_defaults() {
    let t = load(
        "listen: 127.0.0.1:8080\nlocal_region: eu\nregions:\n  - name: eu\n    replicas:\n      - { id: a, address: \"127.0.0.1:1\" }\n",
    )
    .unwrap();
    assert_eq!(t.affinity.header, "x-session-affinity");
    assert_eq!(t.affinity.max_token_len, 128);
    assert_eq!(t.affinity.balance_factor, 1.25);
    assert_eq!(t.affinity.override_capacity, 1_000_000);
    assert_eq!(t.affinity.ring_points_per_weight, 2048);
    assert_eq!(t.affinity.tenant_locality, Some(Duration::from_secs(30)));
    assert!(t.tenants.is_empty());
    assert!(t.admin_listen.is_none());
    assert!(t.usage_log.is_none());
    assert_eq!(t.server.threads, 2);
    assert!(t.server.work_stealing, "Pingora's default");
    let probe = t.health.probe.as_ref().unwrap();
    assert_eq!(
        (probe.path.as_str(), probe.interval, probe.rise, probe.fall),
        ("/health", Duration::from_secs(2), 2, 2)
    );
    assert_eq!(t.health.eject_after, 3);
    assert_eq!(t.failover.max_attempts, 3);
    assert_eq!(t.failover.retry_unanswered, DEFAULT_RETRY_UNANSWERED);
    assert_eq!(t.admin.token, None);
}

#[test]
fn health_failover_and_admin_sections_load_and_are_checked() {
    let with = |extra: &str| format!("{VALID}{extra}");
    let t = load(&with(
        "health:\n  probe: { path: /ready, interval: 5s, timeout: 2s, rise: 1, fall: 4 }\n  eject_after: 5\n  eject_cooldown: 1s\n  eject_max_cooldown: 10s\nfailover: { max_attempts: 2, deadline: 3s, retry_unanswered: [] }\nadmin: { token: \"0123456789abcdef\" }\n",
    ))
    .unwrap();
    let probe = t.health.probe.unwrap();
    assert_eq!((probe.path.as_str(), probe.fall), ("/ready", 4));
    assert_eq!(t.health.eject_max_cooldown, Duration::from_secs(10));
    assert_eq!(t.failover.deadline, Duration::from_secs(3));
    assert!(t.failover.retry_unanswered.is_empty());
    assert_eq!(t.admin.token.as_deref(), Some("0123456789abcdef"));
    assert!(load(&with("health: { probe: { enabled: false } }\n"))
        .unwrap()
        .health
        .probe
        .is_none());

    for (extra, key) in [
        ("health: { probe: { path: health } }\n", "health.probe.path"),
        (
            "health: { probe: { interval: 1s, timeout: 2s } }\n",
            "health.probe.timeout",
        ),
        ("health: { probe: { rise: 0 } }\n", "health.probe.rise"),
        ("health: { eject_after: 0 }\n", "health.eject_after"),
        (
            "health: { eject_cooldown: 10s, eject_max_cooldown: 5s }\n",
            "health.eject_max_cooldown",
        ),
        ("failover: { max_attempts: 0 }\n", "failover.max_attempts"),
        ("failover: { deadline: 0s }\n", "failover.deadline"),
        (
            "failover: { retry_unanswered: [v1/chat] }\n",
            "failover.retry_unanswered[0]",
        ),
        ("admin: { token: short }\n", "admin.token"),
    ] {
        assert_eq!(problem(&with(extra)).key, key, "{extra}");
    }
    let (_, message) = parse_error(&with("health: { probes: {} }\n"));
    assert!(message.contains("probes"), "{message}");
}

#[test]
fn unknown_key_is_a_parse_error_with_path_and_line() {
    let (line, message) = parse_error(&VALID.replace("weight: 3", "wieght: 3"));
    assert_eq!(line, Some(18), "the line of the us-1 replica");
    assert!(message.contains("regions[1].replicas[0]"), "{message}");
    assert!(message.contains("unknown field `wieght`"), "{message}");
}

#[test]
fn unknown_top_level_key_is_refused() {
    let (line, message) = parse_error(&format!("{VALID}lisen: 1.2.3.4:5\n"));
    assert!(line.is_some());
    assert!(message.contains("unknown field `lisen`"), "{message}");
}

#[test]
fn unknown_state_is_refused_not_defaulted() {
    let (_, message) = parse_error(&VALID.replace("state: draining", "state: drained"));
    assert!(message.contains("unknown variant `drained`"), "{message}");
    assert!(
        message.contains("regions[0].replicas[1].state"),
        "{message}"
    );
}

#[test]
fn zero_weight_is_refused_with_its_path() {
    let (_, message) = parse_error(&VALID.replace("weight: 3", "weight: 0"));
    assert!(
        message.contains("regions[1].replicas[0].weight"),
        "{message}"
    );
}

#[test]
fn malformed_yaml_reports_the_line() {
    let (line, _) = parse_error("listen: 127.0.0.1:8080\nregions: [\n  - x: {\n");
    assert!(line.is_some());
}

#[test]
fn empty_file_is_a_parse_error() {
    parse_error("");
}

#[test]
fn missing_required_key_is_named() {
    let (_, message) = parse_error("listen: 127.0.0.1:8080\nregions: []\n");
    assert!(message.contains("local_region"), "{message}");
}

#[test]
fn duplicate_replica_ids_name_both_places() {
    let p = problem(&VALID.replace("id: us-1", "id: eu-1"));
    assert_eq!(p.key, "regions[1].replicas[0].id");
    assert_eq!(
        p.message,
        "duplicate replica id \"eu-1\" (first at regions[0].replicas[0].id)"
    );
}

#[test]
fn invalid_replica_id_is_refused() {
    let p = problem(&VALID.replace("id: us-1", "id: \"us 1\""));
    assert_eq!(p.key, "regions[1].replicas[0].id");
}

#[test]
fn unparsable_address_is_named() {
    let p = problem(&VALID.replace("\"127.0.0.1:9102\"", "\"localhost:9102\""));
    assert_eq!(p.key, "regions[0].replicas[1].address");
    assert!(
        p.message
            .starts_with("\"localhost:9102\" is not a socket address"),
        "{}",
        p.message
    );
}

#[test]
fn address_without_port_is_refused() {
    let p = problem(&VALID.replace("\"127.0.0.1:9102\"", "\"127.0.0.1\""));
    assert_eq!(p.key, "regions[0].replicas[1].address");
}

#[test]
fn ipv6_addresses_are_accepted() {
    let t = load(&VALID.replace("\"127.0.0.1:9102\"", "\"[::1]:9102\"")).unwrap();
    assert!(t.regions[0].replicas[1].address.is_ipv6());
}

#[test]
fn two_replicas_on_one_address_are_refused() {
    let p = problem(&VALID.replace("127.0.0.1:9201", "127.0.0.1:9101"));
    assert_eq!(p.key, "regions[1].replicas[0].address");
    assert!(
        p.message.contains("regions[0].replicas[0].address"),
        "{}",
        p.message
    );
}

#[test]
fn bad_listen_addresses_are_named() {
    assert_eq!(
        problem(&VALID.replace("listen: 127.0.0.1:8080", "listen: nope")).key,
        "listen"
    );
    assert_eq!(
        problem(&VALID.replace("admin_listen: 127.0.0.1:9090", "admin_listen: nope")).key,
        "admin_listen"
    );
    assert_eq!(
        problem(&VALID.replace(
            "admin_listen: 127.0.0.1:9090",
            "admin_listen: 127.0.0.1:8080"
        ))
        .key,
        "admin_listen"
    );
}

#[test]
fn empty_region_is_refused() {
    let p = problem(
        &VALID
            .replace(
                "      - { id: us-1, address: \"127.0.0.1:9201\", weight: 3, state: disabled, dialect: llamacpp }\n",
                "",
            )
            .replace("    replicas:\ntenants", "    replicas: []\ntenants"),
    );
    assert_eq!(p.key, "regions[1].replicas");
    assert!(
        p.message.contains("region \"us\" has no replicas"),
        "{}",
        p.message
    );
}

#[test]
fn no_regions_at_all_is_refused() {
    match load("listen: 127.0.0.1:8080\nlocal_region: eu\nregions: []\n") {
        Err(TopologyError::Invalid { problems, .. }) => {
            assert_eq!(problems[0].key, "regions");
            assert_eq!(problems[1].key, "local_region");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_region_names_are_refused() {
    let p = problem(&VALID.replace("name: us", "name: eu"));
    assert_eq!(p.key, "regions[1].name");
}

#[test]
fn balance_factor_below_one_is_refused() {
    let p = problem(&VALID.replace("balance_factor: 1.25", "balance_factor: 0.9"));
    assert_eq!(p.key, "affinity.balance_factor");
    assert!(p.message.starts_with("0.9 is below 1"), "{}", p.message);
    assert_eq!(
        problem(&VALID.replace("balance_factor: 1.25", "balance_factor: .nan")).key,
        "affinity.balance_factor"
    );
    assert!(load(&VALID.replace("balance_factor: 1.25", "balance_factor: 1")).is_ok());
}

#[test]
fn unknown_local_region_lists_the_known_ones() {
    let p = problem(&VALID.replace("local_region: eu", "local_region: ap"));
    assert_eq!(p.key, "local_region");
    assert_eq!(p.message, "\"ap\" is not a region (regions: eu, us)");
}

#[test]
fn token_length_limits_are_checked() {
    assert_eq!(
        problem(&VALID.replace("max_token_len: 128", "max_token_len: 0")).key,
        "affinity.max_token_len"
    );
    assert_eq!(
        problem(&VALID.replace("max_token_len: 128", "max_token_len: 100000")).key,
        "affinity.max_token_len"
    );
}

#[test]
fn invalid_header_name_is_refused() {
    let p = problem(&VALID.replace("header: X-Session-Affinity", "header: \"x session\""));
    assert_eq!(p.key, "affinity.header");
}

#[test]
fn zero_ttl_and_capacity_are_refused() {
    assert_eq!(
        problem(&VALID.replace("override_ttl: 1h", "override_ttl: 0s")).key,
        "affinity.override_ttl"
    );
    assert_eq!(
        problem(&VALID.replace("override_capacity: 1000000", "override_capacity: 0")).key,
        "affinity.override_capacity"
    );
}

#[test]
fn tenant_locality_is_a_positive_duration_or_null() {
    let with = |value: &str| {
        VALID.replace(
            "override_ttl: 1h",
            &format!("override_ttl: 1h\n  tenant_locality: {value}"),
        )
    };
    assert_eq!(
        load(&with("2m")).unwrap().affinity.tenant_locality,
        Some(Duration::from_secs(120))
    );
    assert_eq!(load(&with("null")).unwrap().affinity.tenant_locality, None);
    assert_eq!(problem(&with("0s")).key, "affinity.tenant_locality");
    let (_, message) = parse_error(&with("lukewarm"));
    assert!(message.contains("affinity.tenant_locality"), "{message}");
}

#[test]
fn shed_factor_is_off_by_default_and_at_least_one() {
    let with = |value: &str| {
        VALID.replace(
            "override_ttl: 1h",
            &format!("override_ttl: 1h\n  shed_factor: {value}"),
        )
    };
    assert_eq!(load(VALID).unwrap().affinity.shed_factor, None);
    assert_eq!(
        load(&with("1.25")).unwrap().affinity.shed_factor,
        Some(1.25)
    );
    assert_eq!(load(&with("null")).unwrap().affinity.shed_factor, None);
    for bad in ["0.9", ".nan", ".inf", "-1"] {
        let p = problem(&with(bad));
        assert_eq!(p.key, "affinity.shed_factor", "{bad}");
        assert!(p.message.contains("at least 1"), "{bad}: {}", p.message);
    }
    let (_, message) = parse_error(&with("lots"));
    assert!(message.contains("shed_factor"), "{message}");
}

#[test]
fn unparsable_duration_is_a_parse_error() {
    let (_, message) = parse_error(&VALID.replace("override_ttl: 1h", "override_ttl: soon"));
    assert!(message.contains("affinity.override_ttl"), "{message}");
}

#[test]
fn an_unknown_affinity_key_is_refused_by_name() {
    let (_, message) = parse_error(&VALID.replace(
        "override_capacity: 1000000",
        "override_capacity: 1000000\n  tokenless: least_inflight",
    ));
    assert!(message.contains("tokenless"), "{message}");
}

#[test]
fn weights_and_ring_size_are_bounded() {
    assert_eq!(
        problem(&VALID.replace("weight: 3", "weight: 101")).key,
        "regions[1].replicas[0].weight"
    );
    let p = problem(&VALID.replace("weight: 3", "weight: 100").replace(
        "override_capacity: 1000000",
        "override_capacity: 1000000\n  ring_points_per_weight: 65536",
    ));
    assert_eq!(p.key, "affinity.ring_points_per_weight");
    assert!(p.message.contains("points"), "{}", p.message);
    assert_eq!(
        problem(&VALID.replace(
            "override_capacity: 1000000",
            "override_capacity: 1000000\n  ring_points_per_weight: 0"
        ))
        .key,
        "affinity.ring_points_per_weight"
    );
}

#[test]
fn zero_max_inflight_is_refused() {
    assert_eq!(
        problem(&VALID.replace("max_inflight: 64", "max_inflight: 0")).key,
        "regions[0].replicas[0].max_inflight"
    );
}

#[test]
fn api_key_hash_must_be_sha256_hex() {
    let p = problem(&VALID.replace(
        "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        "secret-in-plain-text",
    ));
    assert_eq!(p.key, "tenants[0].api_key_sha256");
    assert!(p.message.contains("64 hex characters"), "{}", p.message);
    assert!(!p.message.contains("secret"), "the value is never echoed");
    let p = problem(&VALID.replace(
        "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        "zz26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
    ));
    assert_eq!(p.key, "tenants[0].api_key_sha256");
}

#[test]
fn duplicate_tenants_and_shared_keys_are_refused() {
    let two = VALID.replace(
        "tenants:\n",
        "tenants:\n  - { id: acme, api_key_sha256: \"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\" }\n",
    );
    match load(&two) {
        Err(TopologyError::Invalid { problems, .. }) => {
            let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["tenants[1].id", "tenants[1].api_key_sha256"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn negative_prices_are_refused() {
    let p = problem(&VALID.replace("output_per_mtok: 1.50", "output_per_mtok: -1"));
    assert_eq!(p.key, "pricing.default.output_per_mtok");
    let p = problem(&VALID.replace("cached_input_per_mtok: 0.3", "cached_input_per_mtok: .inf"));
    assert_eq!(p.key, "pricing.models.big-model.cached_input_per_mtok");
}

#[test]
fn cache_writes_cost_plain_input_unless_priced() {
    let t = load(VALID).unwrap();
    let (default, big) = (t.pricing.default, t.pricing.price(Some("big-model")));
    assert_eq!(
        (default.cache_write, default.cache_write_1h),
        (500_000, 500_000)
    );
    assert_eq!(
        (big.cache_write, big.cache_write_1h),
        (3_000_000, 3_000_000),
        "a model's writes default to its own input price, not the default entry's"
    );
}

#[test]
fn cache_write_prices_are_read_and_the_1h_price_defaults_to_the_5m_one() {
    let priced = |entry: &str| {
        let yaml = VALID.replace(
            "output_per_mtok: 15 }",
            &format!("output_per_mtok: 15, {entry} }}"),
        );
        load(&yaml).unwrap().pricing.price(Some("big-model"))
    };
    let p = priced("cache_write_per_mtok: 3.75");
    assert_eq!((p.cache_write, p.cache_write_1h), (3_750_000, 3_750_000));
    let p = priced("cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: 6");
    assert_eq!((p.cache_write, p.cache_write_1h), (3_750_000, 6_000_000));
    let p = priced("cache_write_1h_per_mtok: 6");
    assert_eq!((p.cache_write, p.cache_write_1h), (3_000_000, 6_000_000));
    assert_eq!(
        (p.input, p.cached_input, p.output),
        (3_000_000, 300_000, 15_000_000),
        "the other prices are unchanged"
    );
}

#[test]
fn bad_cache_write_prices_name_their_key() {
    for (entry, key) in [
        (
            "cache_write_per_mtok: -1",
            "pricing.models.big-model.cache_write_per_mtok",
        ),
        (
            "cache_write_1h_per_mtok: 2000000",
            "pricing.models.big-model.cache_write_1h_per_mtok",
        ),
        (
            "cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: .nan",
            "pricing.models.big-model.cache_write_1h_per_mtok",
        ),
    ] {
        let yaml = VALID.replace(
            "output_per_mtok: 15 }",
            &format!("output_per_mtok: 15, {entry} }}"),
        );
        assert_eq!(problem(&yaml).key, key, "{entry}");
    }
    let p = problem(&VALID.replace(
        "output_per_mtok: 1.50 }",
        "output_per_mtok: 1.50, cache_write_per_mtok: .inf }",
    ));
    assert_eq!(p.key, "pricing.default.cache_write_per_mtok");
    // Both wrong: both reported.
    match load(&VALID.replace(
        "output_per_mtok: 1.50 }",
        "output_per_mtok: 1.50, cache_write_per_mtok: -2, cache_write_1h_per_mtok: -3 }",
    )) {
        Err(TopologyError::Invalid { problems, .. }) => {
            let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "pricing.default.cache_write_per_mtok",
                    "pricing.default.cache_write_1h_per_mtok"
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // A lifetime the pricing does not know is a mistake, not a price silently ignored.
    let (_, message) = parse_error(&VALID.replace(
        "output_per_mtok: 1.50 }",
        "output_per_mtok: 1.50, cache_write_2h_per_mtok: 1 }",
    ));
    assert!(message.contains("cache_write_2h_per_mtok"), "{message}");
}

#[test]
fn zero_timeouts_and_threads_are_refused() {
    assert_eq!(
        problem(&VALID.replace("connect_timeout: 500ms", "connect_timeout: 0s")).key,
        "upstream.connect_timeout"
    );
    assert_eq!(
        problem(&VALID.replace("threads: 4", "threads: 0")).key,
        "server.threads"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = VALID
        .replace("local_region: eu", "local_region: ap")
        .replace("balance_factor: 1.25", "balance_factor: 0.5")
        .replace("\"127.0.0.1:9102\"", "\"bad\"")
        .replace("id: us-1", "id: eu-1");
    let err = load(&yaml).unwrap_err();
    let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "affinity.balance_factor",
            "regions[0].replicas[1].address",
            "regions[1].replicas[0].id",
            "local_region"
        ]
    );
    let text = err.to_string();
    assert!(
        text.starts_with("test.yaml: 4 problems:\n  - affinity.balance_factor"),
        "{text}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = Topology::load(std::path::Path::new("/nonexistent/tether.yaml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read /nonexistent/tether.yaml"),
        "{err}"
    );
}

#[test]
fn null_timeouts_mean_none() {
    let t = load(&VALID.replace(
        "upstream: { connect_timeout: 500ms, read_timeout: 2m }",
        "upstream: { connect_timeout: 500ms, read_timeout: null, idle_timeout: null }",
    ))
    .unwrap();
    assert_eq!(t.upstream.read_timeout, None);
    assert_eq!(t.upstream.idle_timeout, None);
}

#[test]
fn invalid_region_name_is_refused() {
    let p = problem(&VALID.replace("name: us", "name: \"us west\""));
    assert_eq!(p.key, "regions[1].name");
}

#[test]
fn empty_usage_log_path_is_refused() {
    assert_eq!(
        problem(&VALID.replace(
            "usage_log: { path: logs/usage.jsonl }",
            "usage_log: { path: \"\" }"
        ))
        .key,
        "usage_log.path"
    );
}

#[test]
fn metering_settings_and_replica_dialects_load() {
    let t = load(VALID).unwrap();
    assert_eq!(t.metering.session_key.as_deref(), Some("0123456789abcdef"));
    assert!(t.metering.inject_stream_usage, "on by default");
    assert!(t.metering.enabled, "on by default");
    assert_eq!(
        t.usage_log.as_ref().unwrap().queue,
        65_536,
        "queue defaults"
    );
    assert_eq!(t.regions[1].replicas[0].dialect, Some(Dialect::Llamacpp));
    assert_eq!(t.regions[0].replicas[0].dialect, None);
}

#[test]
fn cache_loss_settings_default_and_every_bad_value_is_named() {
    let t = load(VALID).unwrap();
    assert_eq!(
        t.metering.cache_loss,
        tether_metering::CacheLossSettings::default()
    );
    let custom = VALID.replace(
        "metering: { session_key: \"0123456789abcdef\" }",
        "metering: { session_key: \"0123456789abcdef\", cache_loss: { threshold: 0.3, \
         min_expected_tokens: 500, window: 30s, block_tokens: 32 } }",
    );
    let loss = load(&custom).unwrap().metering.cache_loss;
    assert_eq!(
        (
            loss.threshold,
            loss.min_expected_tokens,
            loss.window.as_secs(),
            loss.block_tokens
        ),
        (0.3, 500, 30, 32)
    );
    let bad = VALID.replace(
        "metering: { session_key: \"0123456789abcdef\" }",
        "metering: { session_key: \"0123456789abcdef\", cache_loss: { threshold: 1.5, \
         window: 0s, block_tokens: 0 } }",
    );
    let keys: Vec<String> = load(&bad)
        .unwrap_err()
        .problems()
        .iter()
        .map(|p| p.key.clone())
        .collect();
    for key in ["threshold", "window", "block_tokens"] {
        assert!(
            keys.contains(&format!("metering.cache_loss.{key}")),
            "{key} in {keys:?}"
        );
    }
    let unknown = VALID.replace(
        "metering: { session_key: \"0123456789abcdef\" }",
        "metering: { cache_loss: { treshold: 0.5 } }",
    );
    assert!(load(&unknown).is_err(), "unknown keys are refused");
}

#[test]
fn a_short_session_key_and_a_zero_queue_are_refused() {
    assert_eq!(
        problem(&VALID.replace("session_key: \"0123456789abcdef\"", "session_key: short")).key,
        "metering.session_key"
    );
    assert_eq!(
        problem(&VALID.replace(
            "usage_log: { path: logs/usage.jsonl }",
            "usage_log: { path: u.jsonl, queue: 0 }"
        ))
        .key,
        "usage_log.queue"
    );
    let (_, message) = parse_error(&VALID.replace("dialect: llamacpp", "dialect: cohere"));
    assert!(message.contains("unknown variant `cohere`"), "{message}");
    assert!(
        message.contains("regions[1].replicas[0].dialect"),
        "{message}"
    );
}

#[test]
fn every_documented_dialect_and_state_spelling_loads() {
    for (name, dialect) in [
        ("openai", Dialect::Openai),
        ("anthropic", Dialect::Anthropic),
        ("llamacpp", Dialect::Llamacpp),
    ] {
        let t = load(&VALID.replace("dialect: llamacpp", &format!("dialect: {name}"))).unwrap();
        assert_eq!(t.regions[1].replicas[0].dialect, Some(dialect));
    }
    for (name, state) in [
        ("active", Admission::Active),
        ("draining", Admission::Draining),
        ("disabled", Admission::Disabled),
    ] {
        let t = load(&VALID.replace("state: disabled", &format!("state: {name}"))).unwrap();
        assert_eq!(t.regions[1].replicas[0].state, state);
    }
    assert_eq!(
        load(VALID).unwrap().regions[0].replicas[0].state,
        Admission::Active,
        "state defaults to active"
    );
}

#[test]
fn a_sticky_store_gets_defaults_and_makes_placement_nearest() {
    let t = load(&format!(
        "{VALID}sticky_store: {{ url: \"redis://127.0.0.1:6379/0\" }}\n"
    ))
    .unwrap();
    let store = t.sticky_store.unwrap();
    assert_eq!(store.url, "redis://127.0.0.1:6379/0");
    assert!(!store.cluster);
    assert_eq!(store.key_prefix, "tether:s:");
    assert_eq!(store.channel, "tether:bindings");
    assert_eq!(store.lookup_timeout, Duration::from_millis(5));
    assert_eq!(store.load_interval, Some(Duration::from_millis(100)));
    assert_eq!(t.affinity.placement, Placement::Nearest);
    // Without a store the home region comes from the ring.
    assert_eq!(load(VALID).unwrap().affinity.placement, Placement::Hash);
}

#[test]
fn nearest_placement_without_a_store_is_refused_by_name() {
    let yaml = VALID.replace(
        "override_capacity: 1000000",
        "override_capacity: 1000000\n  placement: nearest",
    );
    let p = problem(&yaml);
    assert_eq!(p.key, "affinity.placement");
    assert!(p.message.contains("sticky_store"), "{}", p.message);
}

#[test]
fn sticky_store_settings_are_checked() {
    for (store, key) in [
        ("{ url: \"http://127.0.0.1:6379\" }", "sticky_store.url"),
        (
            "{ url: \"redis://h:1\", lookup_timeout: 0s }",
            "sticky_store.lookup_timeout",
        ),
        (
            "{ url: \"redis://h:1\", lookup_timeout: 5s }",
            "sticky_store.lookup_timeout",
        ),
        (
            "{ url: \"redis://h:1\", write_queue: 0 }",
            "sticky_store.write_queue",
        ),
        (
            "{ url: \"redis://h:1\", key_prefix: \"\" }",
            "sticky_store.key_prefix",
        ),
        (
            "{ url: \"redis://h:1\", load_interval: 1ms }",
            "sticky_store.load_interval",
        ),
    ] {
        assert_eq!(
            problem(&format!("{VALID}sticky_store: {store}\n")).key,
            key,
            "{store}"
        );
    }
    let off = load(&format!(
        "{VALID}sticky_store: {{ url: \"redis://h:1\", load_interval: null }}\n"
    ))
    .unwrap();
    assert_eq!(off.sticky_store.unwrap().load_interval, None);
    let (_, message) = parse_error(&format!(
        "{VALID}sticky_store: {{ uri: \"redis://h:1\" }}\n"
    ));
    assert!(message.contains("unknown field `uri`"), "{message}");
}

#[test]
fn a_region_can_share_its_kv_cache() {
    let yaml = VALID.replacen("  - name: eu\n", "  - name: eu\n    kv_scope: region\n", 1);
    let t = load(&yaml).unwrap();
    assert_eq!(t.regions[0].kv_scope, KvScope::Region);
    assert_eq!(t.regions[1].kv_scope, KvScope::Replica);
    let (_, message) =
        parse_error(&VALID.replacen("  - name: eu\n", "  - name: eu\n    kv_scope: rack\n", 1));
    assert!(message.contains("rack"), "{message}");
}

#[test]
fn the_shipped_configs_load() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = Topology::load(&path) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked} files in {}", conf.display());
}

mod durations;
mod input;
mod network;
mod numbers;
mod tls;

#[test]
fn a_replica_credential_comes_from_the_environment_or_a_file_never_the_yaml() {
    let yaml = VALID.replacen(
        "  - name: eu\n",
        "  - name: eu\n    upstream_auth: { env: EU_KEY }\n",
        1,
    );
    let t = load(&yaml).unwrap();
    for r in &t.regions[0].replicas {
        assert_eq!(
            r.upstream_auth,
            Some(UpstreamAuth {
                source: SecretSource::Env("EU_KEY".into()),
                header: None
            })
        );
    }
    assert!(t.regions[1]
        .replicas
        .iter()
        .all(|r| r.upstream_auth.is_none()));
    for bad in [
        "{ env: A, file: /k }",
        "{}",
        "{ env: \"\" }",
        "{ file: /k, header: \"bad header\" }",
    ] {
        let yaml = VALID.replacen(
            "  - name: eu\n",
            &format!("  - name: eu\n    upstream_auth: {bad}\n"),
            1,
        );
        assert!(
            problem(&yaml).key.starts_with("regions[0].upstream_auth"),
            "{bad}"
        );
    }
    let (_, message) = parse_error(&VALID.replacen(
        "  - name: eu\n",
        "  - name: eu\n    upstream_auth: { token: sk-plain }\n",
        1,
    ));
    assert!(message.contains("unknown field `token`"), "{message}");
}

#[test]
fn the_outcome_header_is_on_by_default_and_can_be_renamed_or_turned_off() {
    assert_eq!(
        load(VALID).unwrap().affinity.outcome_header.as_deref(),
        Some("x-session-affinity-status")
    );
    let off = VALID.replace(
        "override_capacity: 1000000",
        "override_capacity: 1000000\n  outcome_header: null",
    );
    assert_eq!(load(&off).unwrap().affinity.outcome_header, None);
    let clash = VALID.replace(
        "override_capacity: 1000000",
        "override_capacity: 1000000\n  outcome_header: X-Session-Affinity",
    );
    assert_eq!(problem(&clash).key, "affinity.outcome_header");
}

#[test]
fn key_sources_default_to_headers_and_prompt_cache_key_with_the_agents_headers() {
    let t = load(VALID).unwrap();
    assert_eq!(
        t.affinity.key_sources,
        [
            KeySource::Header,
            KeySource::AgentHeader,
            KeySource::PromptCacheKey
        ]
    );
    assert!(t
        .affinity
        .agent_headers
        .contains(&"x-claude-code-session-id".to_string()));
}

#[test]
fn key_sources_and_agent_headers_are_read_in_order_and_lower_cased() {
    let yaml = VALID.replace(
        "  max_token_len: 128\n",
        "  max_token_len: 128\n  key_sources: [fingerprint, header]\n  agent_headers: [X-Agent-Session]\n",
    );
    let t = load(&yaml).unwrap();
    assert_eq!(
        t.affinity.key_sources,
        [KeySource::Fingerprint, KeySource::Header]
    );
    assert_eq!(t.affinity.agent_headers, ["x-agent-session"]);
}

#[test]
fn bad_key_sources_and_agent_headers_are_named_by_position() {
    let with = |extra: &str| {
        VALID.replace(
            "  max_token_len: 128\n",
            &format!("  max_token_len: 128\n{extra}"),
        )
    };
    let p = problem(&with("  key_sources: [header, user, header]\n"));
    assert_eq!(p.key, "affinity.key_sources[2]");
    assert!(p.message.contains("twice"), "{}", p.message);
    let p = problem(&with("  agent_headers: [x-ok, cookie]\n"));
    assert_eq!(p.key, "affinity.agent_headers[1]");
    let p = problem(&with("  agent_headers: [\"bad header\"]\n"));
    assert_eq!(p.key, "affinity.agent_headers[0]");
    let p = problem(&with("  agent_headers: [X-Session-Affinity]\n"));
    assert_eq!(p.key, "affinity.agent_headers[0]");
    let (_, message) = parse_error(&with("  key_sources: [none]\n"));
    assert!(message.contains("none"), "{message}");
}

#[test]
fn the_key_secret_comes_from_the_environment_or_a_file_never_the_yaml() {
    let with = |secret: &str| {
        VALID.replacen(
            "  override_capacity: 1000000\n",
            &format!("  override_capacity: 1000000\n  key_secret: {secret}\n"),
            1,
        )
    };
    assert_eq!(load(VALID).unwrap().affinity.key_secret, None);
    assert_eq!(
        load(&with("{ env: TETHER_KEY_SECRET }"))
            .unwrap()
            .affinity
            .key_secret,
        Some(SecretSource::Env("TETHER_KEY_SECRET".into()))
    );
    assert_eq!(
        load(&with("{ file: /run/secrets/tether-key }"))
            .unwrap()
            .affinity
            .key_secret,
        Some(SecretSource::File("/run/secrets/tether-key".into()))
    );
    for bad in [
        "{ env: A, file: /k }",
        "{}",
        "{ env: \"\" }",
        "{ file: \"\" }",
    ] {
        assert_eq!(problem(&with(bad)).key, "affinity.key_secret", "{bad}");
    }
    let (_, message) = parse_error(&with("0123456789abcdef0123"));
    assert!(message.contains("key_secret"), "{message}");
    let (_, message) = parse_error(&with("{ value: plain-text-secret }"));
    assert!(message.contains("unknown field `value`"), "{message}");
}

#[test]
fn tenant_limits_apply_to_every_tenant_and_a_tenant_overrides_them_field_by_field() {
    let yaml = VALID
        .replace(
            r#"api_key_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }"#,
            r#"api_key_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae", limits: { requests_per_second: 100, max_concurrent: 8 } }"#,
        )
        + "tenant_limits: { requests_per_second: 10, request_burst: 30, new_sessions_per_second: 0.5, max_concurrent: 4 }\n";
    let t = load(&yaml).unwrap();
    let rate = |per_second, burst| Some(Rate { per_second, burst });
    assert_eq!(
        t.tenant_limits,
        TenantLimits {
            requests: rate(10.0, 30),
            new_sessions: rate(0.5, 1),
            max_concurrent: std::num::NonZeroU32::new(4),
        }
    );
    assert_eq!(
        t.tenants[0].limits,
        TenantLimits {
            requests: rate(100.0, 30),
            new_sessions: rate(0.5, 1),
            max_concurrent: std::num::NonZeroU32::new(8),
        }
    );
    assert_eq!(load(VALID).unwrap().tenant_limits, TenantLimits::default());
}

#[test]
fn bad_tenant_limits_are_refused_naming_the_key() {
    for (limits, key) in [
        (
            "{ requests_per_second: 0 }",
            "tenant_limits.requests_per_second",
        ),
        (
            "{ requests_per_second: -1 }",
            "tenant_limits.requests_per_second",
        ),
        (
            "{ requests_per_second: .inf }",
            "tenant_limits.requests_per_second",
        ),
        (
            "{ requests_per_second: 2000000 }",
            "tenant_limits.requests_per_second",
        ),
        (
            "{ requests_per_second: 5, request_burst: 0 }",
            "tenant_limits.request_burst",
        ),
        ("{ request_burst: 5 }", "tenant_limits.request_burst"),
        (
            "{ new_session_burst: 5 }",
            "tenant_limits.new_session_burst",
        ),
        (
            "{ new_sessions_per_second: .nan }",
            "tenant_limits.new_sessions_per_second",
        ),
        ("{ max_concurrent: 0 }", "tenant_limits.max_concurrent"),
    ] {
        let yaml = format!("{VALID}tenant_limits: {limits}\n");
        assert_eq!(problem(&yaml).key, key, "{limits}");
    }
    let tenant = VALID.replace(r#"e7ae" }"#, r#"e7ae", limits: { max_concurrent: 0 } }"#);
    assert_eq!(problem(&tenant).key, "tenants[0].limits.max_concurrent");
    let (_, message) = parse_error(&(VALID.to_owned() + "tenant_limits: { rps: 5 }\n"));
    assert!(message.contains("unknown field `rps`"), "{message}");
}

#[test]
fn the_override_share_is_a_fraction_of_the_capacity() {
    assert_eq!(load(VALID).unwrap().affinity.override_share, 0.5);
    let with = |v: &str| {
        VALID.replacen(
            "  override_capacity: 1000000\n",
            &format!("  override_capacity: 1000000\n  override_share: {v}\n"),
            1,
        )
    };
    assert_eq!(load(&with("1")).unwrap().affinity.override_share, 1.0);
    assert_eq!(load(&with("0.1")).unwrap().affinity.override_share, 0.1);
    for bad in ["0", "-0.5", "1.5", ".nan", ".inf"] {
        assert_eq!(problem(&with(bad)).key, "affinity.override_share", "{bad}");
    }
}

#[test]
fn engine_and_an_auto_cap_load_per_replica() {
    let t = load(&VALID.replace(
        "max_inflight: 64 }",
        "max_inflight: auto, engine: llamacpp }",
    ))
    .unwrap();
    let replica = &t.regions[0].replicas[0];
    assert_eq!(replica.engine, EngineKind::Llamacpp);
    assert_eq!(
        replica.max_inflight,
        Some(tether_affinity::InflightCap::Auto)
    );
    for engine in ["vllm", "sglang", "none"] {
        let yaml = VALID.replace("max_inflight: 64 }", &format!("engine: {engine} }}"));
        assert!(load(&yaml).is_ok(), "{engine}");
    }
}

#[test]
fn an_unknown_engine_or_cap_is_refused_naming_the_key() {
    let (_, message) = parse_error(&VALID.replace("max_inflight: 64 }", "engine: ollama }"));
    assert!(message.contains("unknown variant `ollama`"), "{message}");
    assert!(
        message.contains("regions[0].replicas[0].engine"),
        "{message}"
    );
    let (_, message) = parse_error(&VALID.replace("max_inflight: 64", "max_inflight: lots"));
    assert!(
        message.contains("regions[0].replicas[0].max_inflight"),
        "{message}"
    );
    assert!(message.contains("`auto`"), "{message}");
}

#[test]
fn an_auto_cap_needs_an_engine_to_read() {
    let p = problem(&VALID.replace("max_inflight: 64", "max_inflight: auto"));
    assert_eq!(p.key, "regions[0].replicas[0].max_inflight");
    assert!(p.message.contains("engine"), "{}", p.message);
}
