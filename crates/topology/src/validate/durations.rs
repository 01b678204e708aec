//! Every duration in the file, checked against what the code that consumes it accepts.
//!
//! Pingora's timers and the health state machine count whole milliseconds: below 1 ms a
//! duration is zero, which Pingora's timer does not handle (a probe timeout under 1 ms panics
//! it at start) and which turns an ejection or an overload into nothing. The override table and
//! Pingora's shutdown settings count whole seconds, so a fraction would be silently rounded.
//! And the probe loop and Pingora's connection pool add a duration to the clock, which panics
//! when the sum overflows, so every duration also has a ceiling, set far above any sensible
//! value.

use std::time::Duration;

use super::Problems;
use crate::raw::RawTopology;

const MILLISECOND: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

const PINGORA_MILLIS: &str = "Pingora's timers count whole milliseconds";
const HEALTH_MILLIS: &str = "the health state machine counts whole milliseconds";
const OVERRIDE_SECONDS: &str = "the override table counts whole seconds";
const PINGORA_SECONDS: &str = "Pingora's shutdown settings count whole seconds";

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// `500us is out of range 1ms..=1h`.
pub(super) fn out_of_range(value: Duration, min: Duration, max: Duration) -> String {
    format!(
        "{} is out of range {}..={}",
        human(value),
        human(min),
        human(max)
    )
}

/// Whether `value` is within `min..=max`; if not, records a problem naming the range, and
/// `below` as the reason when it is too short.
fn within(
    p: &mut Problems,
    key: &str,
    value: Duration,
    (min, max): (Duration, Duration),
    below: &str,
) -> bool {
    if value < min {
        p.add(key, format!("{}: {below}", out_of_range(value, min, max)));
        false
    } else if value > max {
        p.add(key, out_of_range(value, min, max));
        false
    } else {
        true
    }
}

/// Whether `value` is a whole number of seconds; if not, records a problem.
fn whole_seconds(p: &mut Problems, key: &str, value: Duration, why: &str) -> bool {
    if value.subsec_nanos() == 0 {
        return true;
    }
    p.add(
        key,
        format!("{} is not a whole number of seconds: {why}", human(value)),
    );
    false
}

/// Checks every duration of `raw` but the sticky store's (checked with the rest of its section).
pub(super) fn check(p: &mut Problems, raw: &RawTopology) {
    let a = &raw.affinity;
    if within(
        p,
        "affinity.override_ttl",
        a.override_ttl,
        (SECOND, 30 * DAY),
        OVERRIDE_SECONDS,
    ) {
        whole_seconds(p, "affinity.override_ttl", a.override_ttl, OVERRIDE_SECONDS);
    }
    if let Some(window) = a.tenant_locality {
        within(
            p,
            "affinity.tenant_locality",
            window,
            (Duration::from_millis(100), DAY),
            "a replica's record of its tenants keeps time in tenths of a second (null turns \
             locality off)",
        );
    }

    let u = &raw.upstream;
    within(
        p,
        "upstream.connect_timeout",
        u.connect_timeout,
        (MILLISECOND, DAY),
        PINGORA_MILLIS,
    );
    for (key, timeout) in [
        ("upstream.read_timeout", u.read_timeout),
        ("upstream.idle_timeout", u.idle_timeout),
    ] {
        if let Some(timeout) = timeout {
            within(
                p,
                key,
                timeout,
                (MILLISECOND, DAY),
                "Pingora's timers count whole milliseconds (null = no timeout)",
            );
        }
    }

    let s = &raw.server;
    within(
        p,
        "server.drain_timeout",
        s.drain_timeout,
        (Duration::ZERO, HOUR),
        "",
    );
    let key = "server.graceful_shutdown_timeout";
    if within(
        p,
        key,
        s.graceful_shutdown_timeout,
        (Duration::ZERO, HOUR),
        PINGORA_SECONDS,
    ) {
        whole_seconds(p, key, s.graceful_shutdown_timeout, PINGORA_SECONDS);
    }

    let h = &raw.health;
    let probe = &h.probe;
    let interval_ok = within(
        p,
        "health.probe.interval",
        probe.interval,
        (MILLISECOND, HOUR),
        PINGORA_MILLIS,
    );
    let timeout_ok = within(
        p,
        "health.probe.timeout",
        probe.timeout,
        (MILLISECOND, HOUR),
        PINGORA_MILLIS,
    );
    if interval_ok && timeout_ok && probe.timeout > probe.interval {
        // The loop waits for a round's slowest probe before it sleeps until the next start.
        p.add(
            "health.probe.timeout",
            format!(
                "{} is out of range 1ms..={} (health.probe.interval): a round waits for its \
                 slowest probe, so rounds would come every {} instead of every {}",
                human(probe.timeout),
                human(probe.interval),
                human(probe.timeout),
                human(probe.interval)
            ),
        );
    }
    if within(
        p,
        "health.eject_cooldown",
        h.eject_cooldown,
        (MILLISECOND, DAY),
        HEALTH_MILLIS,
    ) {
        within(
            p,
            "health.eject_max_cooldown",
            h.eject_max_cooldown,
            (h.eject_cooldown, DAY),
            "it must not be shorter than health.eject_cooldown",
        );
    }
    if within(
        p,
        "health.overload_default",
        h.overload_default,
        (MILLISECOND, DAY),
        HEALTH_MILLIS,
    ) {
        within(
            p,
            "health.overload_max",
            h.overload_max,
            (h.overload_default, DAY),
            "it must not be shorter than health.overload_default",
        );
    }

    within(
        p,
        "failover.deadline",
        raw.failover.deadline,
        (MILLISECOND, DAY),
        "a request needs time for its first attempt",
    );
    within(
        p,
        "request_bodies.deadline",
        raw.request_bodies.deadline,
        (SECOND, DAY),
        "a body needs time to arrive",
    );
}
