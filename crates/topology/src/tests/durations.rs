//! Every duration in the file against the range its consumer accepts.

use super::*;

/// `VALID` with `key: value` in `section` (the section's other keys in `VALID` give way, but
/// for `affinity`; a section `VALID` lacks is appended).
fn set(section: &str, key: &str, value: &str) -> String {
    match section {
        "affinity" if key == "override_ttl" => {
            VALID.replace("override_ttl: 1h", &format!("override_ttl: {value}"))
        }
        "affinity" => VALID.replace(
            "override_ttl: 1h",
            &format!("override_ttl: 1h\n  {key}: {value}"),
        ),
        "upstream" => VALID.replace(
            "upstream: { connect_timeout: 500ms, read_timeout: 2m }",
            &format!("upstream: {{ {key}: {value} }}"),
        ),
        "server" => VALID.replace(
            "server: { threads: 4, grace_period: 10s }",
            &format!("server: {{ {key}: {value} }}"),
        ),
        _ => format!("{VALID}{section}: {{ {key}: {value} }}\n"),
    }
}

#[test]
fn every_duration_outside_its_range_is_refused_naming_the_range() {
    for (section, key, value, range) in [
        ("affinity", "override_ttl", "500ms", "1s..=30days"),
        ("affinity", "override_ttl", "2months", "1s..=30days"),
        ("affinity", "tenant_locality", "50ms", "100ms..=1day"),
        ("affinity", "tenant_locality", "2days", "100ms..=1day"),
        ("upstream", "connect_timeout", "500us", "1ms..=1day"),
        ("upstream", "connect_timeout", "2days", "1ms..=1day"),
        ("upstream", "read_timeout", "0s", "1ms..=1day"),
        ("upstream", "read_timeout", "500us", "1ms..=1day"),
        ("upstream", "idle_timeout", "500us", "1ms..=1day"),
        // Added to the clock by Pingora's connection pool: this one overflows it.
        (
            "upstream",
            "idle_timeout",
            "500000000000years",
            "1ms..=1day",
        ),
        ("server", "drain_timeout", "2h", "0s..=1h"),
        ("server", "graceful_shutdown_timeout", "2h", "0s..=1h"),
        ("health", "eject_cooldown", "500us", "1ms..=1day"),
        ("health", "eject_cooldown", "2days", "1ms..=1day"),
        ("health", "eject_max_cooldown", "2days", "5s..=1day"),
        ("health", "eject_max_cooldown", "2s", "5s..=1day"),
        ("health", "overload_default", "500us", "1ms..=1day"),
        ("health", "overload_max", "500ms", "1s..=1day"),
        ("health", "overload_max", "2days", "1s..=1day"),
        ("failover", "deadline", "0s", "1ms..=1day"),
        ("failover", "deadline", "500us", "1ms..=1day"),
        ("failover", "deadline", "2days", "1ms..=1day"),
    ] {
        let p = problem(&set(section, key, value));
        assert_eq!(p.key, format!("{section}.{key}"), "{key}: {value}");
        assert!(
            p.message
                .starts_with(&format!("{value} is out of range {range}")),
            "{key}: {value}: {}",
            p.message
        );
    }
}

#[test]
fn a_probe_timeout_under_a_millisecond_is_refused() {
    // Zero whole milliseconds: Pingora's timer panics on it when the proxy starts.
    let p = problem(&format!(
        "{VALID}health: {{ probe: {{ timeout: 500us }} }}\n"
    ));
    assert_eq!(p.key, "health.probe.timeout");
    assert!(
        p.message.starts_with("500us is out of range 1ms..="),
        "{}",
        p.message
    );
    assert!(p.message.contains("millisecond"), "{}", p.message);
}

#[test]
fn probe_interval_and_timeout_are_bounded_and_ordered() {
    let probe = |settings: &str| format!("{VALID}health: {{ probe: {{ {settings} }} }}\n");
    for (settings, key, start) in [
        (
            "interval: 0s",
            "health.probe.interval",
            "0s is out of range 1ms..=1h",
        ),
        (
            "interval: 500us",
            "health.probe.interval",
            "500us is out of range 1ms..=1h",
        ),
        // The probe loop adds it to the clock: this overflows it.
        (
            "interval: 500000000000years, timeout: 1s",
            "health.probe.interval",
            "500000000000years is out of range 1ms..=1h",
        ),
        (
            "timeout: 0s",
            "health.probe.timeout",
            "0s is out of range 1ms..=1h",
        ),
        (
            "interval: 1s, timeout: 2s",
            "health.probe.timeout",
            "2s is out of range 1ms..=1s (health.probe.interval)",
        ),
    ] {
        let p = problem(&probe(settings));
        assert_eq!(p.key, key, "{settings}");
        assert!(p.message.starts_with(start), "{settings}: {}", p.message);
    }
    let t = load(&probe("interval: 1ms, timeout: 1ms")).unwrap();
    let settings = t.health.probe.unwrap();
    assert_eq!(settings.interval, settings.timeout);
}

#[test]
fn settings_counted_in_whole_seconds_refuse_fractions() {
    for (section, key, value) in [
        ("affinity", "override_ttl", "1s 500ms"),
        ("server", "graceful_shutdown_timeout", "2s 500ms"),
    ] {
        let p = problem(&set(section, key, value));
        assert_eq!(p.key, format!("{section}.{key}"), "{value}");
        assert!(
            p.message
                .starts_with(&format!("{value} is not a whole number of seconds")),
            "{key}: {value}: {}",
            p.message
        );
    }
}

#[test]
fn every_duration_at_the_edge_of_its_range_loads() {
    let t = load(
        &(VALID
            .replace(
                "override_ttl: 1h",
                "override_ttl: 1s\n  tenant_locality: 100ms",
            )
            .replace(
                "upstream: { connect_timeout: 500ms, read_timeout: 2m }",
                "upstream: { connect_timeout: 1ms, read_timeout: 1day, idle_timeout: 1ms }",
            )
            .replace(
                "server: { threads: 4, grace_period: 10s }",
                "server: { threads: 4, drain_timeout: 0s, graceful_shutdown_timeout: 1h }",
            )
            + "health:\n  probe: { interval: 1h, timeout: 1h }\n  eject_cooldown: 1ms\n  eject_max_cooldown: 1day\n  overload_default: 1ms\n  overload_max: 1ms\nfailover: { deadline: 1ms }\n"),
    )
    .unwrap();
    assert_eq!(t.affinity.override_ttl, Duration::from_secs(1));
    assert_eq!(t.server.drain_timeout, Duration::ZERO);
    assert_eq!(t.health.overload_max, Duration::from_millis(1));
    assert_eq!(t.failover.deadline, Duration::from_millis(1));
}

#[test]
fn the_sticky_store_lookup_timeout_names_its_range() {
    for value in ["0s", "2s"] {
        let p = problem(&format!(
            "{VALID}sticky_store: {{ url: \"redis://h:1\", lookup_timeout: {value} }}\n"
        ));
        assert_eq!(p.key, "sticky_store.lookup_timeout");
        assert!(
            p.message
                .starts_with(&format!("{value} is out of range 1ms..=1s")),
            "{}",
            p.message
        );
    }
}

#[test]
fn the_former_grace_period_key_sets_the_drain_timeout() {
    let t = load(VALID).unwrap();
    assert_eq!(t.server.drain_timeout, Duration::from_secs(10));
    let t = load(&set("server", "drain_timeout", "1500ms")).unwrap();
    assert_eq!(t.server.drain_timeout, Duration::from_millis(1500));
    let t = load(&VALID.replace("server: { threads: 4, grace_period: 10s }", "")).unwrap();
    assert_eq!(t.server.drain_timeout, Duration::from_secs(600));
}
