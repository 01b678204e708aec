//! Per-tenant limits: token-bucket rates and a concurrency cap.

use std::num::NonZeroU32;

use super::Problems;
use crate::raw::RawLimits;
use crate::{Rate, TenantLimits};

/// The highest rate accepted, per second: far above what one instance serves, and low enough
/// that the bucket's arithmetic in nanoseconds stays exact.
const MAX_RATE: f64 = 1_000_000.0;

/// A rate and its burst at `key.{rate_field}` / `key.{burst_field}`. The burst defaults to one
/// second's worth (at least 1).
fn rate(
    p: &mut Problems,
    key: &str,
    (rate_field, per_second): (&str, Option<f64>),
    (burst_field, burst): (&str, Option<u32>),
) -> Option<Rate> {
    let Some(per_second) = per_second else {
        if burst.is_some() {
            p.add(
                format!("{key}.{burst_field}"),
                format!("a burst needs a rate: set {rate_field} too"),
            );
        }
        return None;
    };
    if !(per_second.is_finite() && per_second > 0.0 && per_second <= MAX_RATE) {
        p.add(
            format!("{key}.{rate_field}"),
            format!("{per_second} must be above 0 and at most {MAX_RATE} (omit it for no limit)"),
        );
        return None;
    }
    let burst = match burst {
        Some(0) => {
            p.add(
                format!("{key}.{burst_field}"),
                "must be at least 1 (a bucket that holds nothing admits nothing)",
            );
            return None;
        }
        Some(b) => b,
        // Truncation is intended: a second's worth, rounded up, of at most MAX_RATE.
        None => per_second.ceil() as u32,
    };
    Some(Rate { per_second, burst })
}

/// Validated limits at `key` (`tenant_limits` or `tenants[i].limits`).
pub(super) fn tenant_limits(p: &mut Problems, key: &str, raw: &RawLimits) -> TenantLimits {
    let requests = rate(
        p,
        key,
        ("requests_per_second", raw.requests_per_second),
        ("request_burst", raw.request_burst),
    );
    let new_sessions = rate(
        p,
        key,
        ("new_sessions_per_second", raw.new_sessions_per_second),
        ("new_session_burst", raw.new_session_burst),
    );
    let max_concurrent = raw.max_concurrent.and_then(|n| {
        let n = NonZeroU32::new(n);
        if n.is_none() {
            p.add(
                format!("{key}.max_concurrent"),
                "must be at least 1 (omit it for no limit)",
            );
        }
        n
    });
    TenantLimits {
        requests,
        new_sessions,
        max_concurrent,
    }
}
