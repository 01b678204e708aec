//! Raw → validated, collecting every problem (not just the first) with its YAML path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tether_affinity::{InflightCap, Placement};
use tether_engine::EngineKind;
use tether_metering::Price;

use crate::raw::{RawInflightCap, RawPrice, RawRequestBodies, RawTopology};
use crate::{
    AdminSettings, AffinitySettings, FailoverSettings, HealthSettings, MeteringSettings, Pricing,
    ProbeSettings, Problem, Region, ReloadSettings, Replica, RequestBodySettings, SecretSource,
    ServerSettings, StickyStoreSettings, Tenant, Topology, UpstreamAuth, UpstreamSettings,
    UsageLog,
};

mod durations;
mod limits;
mod network;
mod tls;
pub use network::admin_needs_token;

/// Largest replica weight. Weight multiplies ring points; beyond this, split the replica.
pub const MAX_WEIGHT: u32 = 100;
/// Largest ring (points over all replicas): 4 Mi points = 32 MiB.
pub const MAX_RING_POINTS: u64 = 1 << 22;
/// Largest allowed `max_token_len`.
pub const MAX_TOKEN_LEN_LIMIT: usize = 4096;
/// Largest allowed `ring_points_per_weight`.
pub const MAX_POINTS_PER_WEIGHT: u32 = 65_536;

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn id_is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

const ID_RULE: &str = "must be 1-64 characters of A-Z a-z 0-9 - _ . :";

/// Whether `value` is finite; if not, records a problem that spells it as the YAML did
/// (`.nan`, `.inf`), followed by `rule`. YAML reads both as floats, and no setting takes them.
fn finite(problems: &mut Problems, key: &str, value: f64, rule: &str) -> bool {
    let words = if value.is_nan() {
        ".nan is not a number"
    } else if value == f64::INFINITY {
        ".inf is not a finite number"
    } else if value == f64::NEG_INFINITY {
        "-.inf is not a finite number"
    } else {
        return true;
    };
    problems.add(key, format!("{words}; {rule}"));
    false
}

const PRICE_RULE: &str = "use dollars per million tokens, 0 to 1000000";

fn price(problems: &mut Problems, key: &str, raw: &RawPrice) -> Price {
    let mut one = |field: &str, dollars: f64| -> u64 {
        let key = format!("{key}.{field}");
        if !finite(problems, &key, dollars, PRICE_RULE) {
            return 0;
        }
        if !(0.0..=1_000_000.0).contains(&dollars) {
            problems.add(key, format!("{dollars} is not a price; {PRICE_RULE}"));
            return 0;
        }
        // Micro-dollars per million tokens: exact for any price given to 6 decimals.
        (dollars * 1_000_000.0).round() as u64
    };
    let input = one("input_per_mtok", raw.input_per_mtok);
    let cached_input = one("cached_input_per_mtok", raw.cached_input_per_mtok);
    let output = one("output_per_mtok", raw.output_per_mtok);
    // Unsaid cache-write prices fall back along the chain 1h → 5m → plain input, so a price
    // list without them prices cache writes as the uncached input they were before.
    let cache_write = raw
        .cache_write_per_mtok
        .map_or(input, |dollars| one("cache_write_per_mtok", dollars));
    let cache_write_1h = raw.cache_write_1h_per_mtok.map_or(cache_write, |dollars| {
        one("cache_write_1h_per_mtok", dollars)
    });
    Price {
        input,
        cached_input,
        output,
        cache_write,
        cache_write_1h,
    }
}

/// Most writes the sticky store may queue (each holds a key and a replica id).
pub const MAX_WRITE_QUEUE: usize = 1 << 20;

/// A validated `upstream_auth` at `key`: exactly one of `env` and `file`, and a valid header.
fn upstream_auth(
    p: &mut Problems,
    key: &str,
    raw: &crate::raw::RawUpstreamAuth,
) -> Option<UpstreamAuth> {
    let source = match (&raw.env, &raw.file) {
        (Some(var), None) if !var.is_empty() && !var.contains('=') => {
            SecretSource::Env(var.clone())
        }
        (None, Some(file)) => SecretSource::File(file.clone()),
        _ => {
            p.add(
                key.to_owned(),
                "needs exactly one of `env: VARIABLE` or `file: PATH`: the secret itself never \
                 goes in the file",
            );
            return None;
        }
    };
    let header = raw.header.as_deref().map(|h| h.trim().to_ascii_lowercase());
    if let Some(h) = &header {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            p.add(
                format!("{key}.header"),
                format!("{h:?} is not a valid header name"),
            );
            return None;
        }
    }
    Some(UpstreamAuth { source, header })
}

/// A validated secret source at `key`: exactly one of `env` and `file`.
fn secret_source(
    p: &mut Problems,
    key: &str,
    raw: &crate::raw::RawSecretSource,
) -> Option<SecretSource> {
    match (&raw.env, &raw.file) {
        (Some(var), None) if !var.is_empty() && !var.contains('=') => {
            Some(SecretSource::Env(var.clone()))
        }
        (None, Some(file)) if !file.as_os_str().is_empty() => {
            Some(SecretSource::File(file.clone()))
        }
        _ => {
            p.add(
                key.to_owned(),
                "needs exactly one of `env: VARIABLE` or `file: PATH`: the secret itself never \
                 goes in the file",
            );
            None
        }
    }
}

pub(crate) fn validate(raw: RawTopology) -> Result<Topology, Vec<Problem>> {
    let mut p = Problems::default();

    let listen = network::listener(&mut p, "listen", &raw.listen);
    let admin_listen = raw
        .admin_listen
        .as_deref()
        .and_then(|a| network::listener(&mut p, "admin_listen", a));
    if let (Some(l), Some(a)) = (listen, admin_listen) {
        if l == a {
            p.add(
                "admin_listen",
                format!("{a} is also `listen`; use another port"),
            );
        }
    }
    let listen_tls = tls::listeners(
        &mut p,
        &raw.listen_tls,
        &[("listen", listen), ("admin_listen", admin_listen)],
    );

    // affinity
    let a = &raw.affinity;
    let header = network::affinity_header(&mut p, &a.header);
    let agent_headers = network::agent_headers(&mut p, &a.agent_headers, &header);
    for (i, source) in a.key_sources.iter().enumerate() {
        if a.key_sources[..i].contains(source) {
            p.add(
                format!("affinity.key_sources[{i}]"),
                format!("{source} is listed twice"),
            );
        }
    }
    if a.max_token_len == 0 || a.max_token_len > MAX_TOKEN_LEN_LIMIT {
        p.add(
            "affinity.max_token_len",
            format!(
                "{} is out of range 1..={MAX_TOKEN_LEN_LIMIT}",
                a.max_token_len
            ),
        );
    }
    const BALANCE_RULE: &str = "the bound is balance_factor × mean load, so it must be at \
                                least 1 (1.25 is a good start)";
    if finite(
        &mut p,
        "affinity.balance_factor",
        a.balance_factor,
        BALANCE_RULE,
    ) && a.balance_factor < 1.0
    {
        p.add(
            "affinity.balance_factor",
            format!("{} is below 1; {BALANCE_RULE}", a.balance_factor),
        );
    }
    if let Some(factor) = a.shed_factor {
        const SHED_RULE: &str = "a replica sheds sticky sessions above shed_factor × the \
                                 fleet's mean load, so it must be at least 1 (1.25 is a good \
                                 start, null = off)";
        if finite(&mut p, "affinity.shed_factor", factor, SHED_RULE) && factor < 1.0 {
            p.add(
                "affinity.shed_factor",
                format!("{factor} is below 1; {SHED_RULE}"),
            );
        }
    }
    if a.override_capacity == 0 {
        p.add("affinity.override_capacity", "must be at least 1");
    }
    if a.ring_points_per_weight == 0 || a.ring_points_per_weight > MAX_POINTS_PER_WEIGHT {
        p.add(
            "affinity.ring_points_per_weight",
            format!(
                "{} is out of range 1..={MAX_POINTS_PER_WEIGHT}",
                a.ring_points_per_weight
            ),
        );
    }

    // regions and replicas
    if raw.regions.is_empty() {
        p.add("regions", "at least one region is required");
    }
    let mut region_names: HashMap<&str, usize> = HashMap::new();
    let mut replica_ids: HashMap<&str, String> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
    let mut regions = Vec::with_capacity(raw.regions.len());
    let mut total_weight: u64 = 0;
    for (r, region) in raw.regions.iter().enumerate() {
        let key = format!("regions[{r}]");
        if !id_is_valid(&region.name) {
            p.add(
                format!("{key}.name"),
                format!("{:?} {ID_RULE}", region.name),
            );
        } else if let Some(first) = region_names.insert(&region.name, r) {
            p.add(
                format!("{key}.name"),
                format!(
                    "duplicate region name {:?} (first at regions[{first}].name)",
                    region.name
                ),
            );
        }
        if region.replicas.is_empty() {
            p.add(
                format!("{key}.replicas"),
                format!(
                    "region {:?} has no replicas; add one or remove the region",
                    region.name
                ),
            );
        }
        let region_auth = region
            .upstream_auth
            .as_ref()
            .and_then(|a| upstream_auth(&mut p, &format!("{key}.upstream_auth"), a));
        let region_tls = region
            .tls
            .as_ref()
            .and_then(|t| tls::upstream(&mut p, &format!("{key}.tls"), t));
        let mut replicas = Vec::with_capacity(region.replicas.len());
        for (i, replica) in region.replicas.iter().enumerate() {
            let key = format!("{key}.replicas[{i}]");
            if !id_is_valid(&replica.id) {
                p.add(format!("{key}.id"), format!("{:?} {ID_RULE}", replica.id));
            } else if let Some(first) = replica_ids.get(replica.id.as_str()) {
                p.add(
                    format!("{key}.id"),
                    format!("duplicate replica id {:?} (first at {first})", replica.id),
                );
            } else {
                replica_ids.insert(&replica.id, format!("{key}.id"));
            }
            let address = network::replica(&mut p, &format!("{key}.address"), &replica.address);
            if let Some(addr) = address {
                if let Some(first) = addresses.get(&addr) {
                    p.add(
                        format!("{key}.address"),
                        format!("{addr} is also {first}; each replica needs its own address"),
                    );
                } else {
                    addresses.insert(addr, format!("{key}.address"));
                }
            }
            let weight = replica.weight.get();
            if weight > MAX_WEIGHT {
                p.add(
                    format!("{key}.weight"),
                    format!("{weight} is above the maximum of {MAX_WEIGHT}"),
                );
            }
            total_weight += u64::from(weight);
            let max_inflight = match replica.max_inflight {
                None => None,
                Some(RawInflightCap::Fixed(0)) => {
                    p.add(
                        format!("{key}.max_inflight"),
                        "must be at least 1 (omit it for no cap; use `state: disabled` to stop traffic)",
                    );
                    None
                }
                Some(RawInflightCap::Fixed(n)) => Some(InflightCap::Fixed(n)),
                Some(RawInflightCap::Auto) => {
                    if replica.engine == EngineKind::None {
                        p.add(
                            format!("{key}.max_inflight"),
                            "`auto` takes the cap from the replica's engine: set its `engine` \
                             (vllm, sglang or llamacpp)",
                        );
                    }
                    Some(InflightCap::Auto)
                }
            };
            let upstream_auth = match &replica.upstream_auth {
                Some(own) => upstream_auth(&mut p, &format!("{key}.upstream_auth"), own),
                None => region_auth.clone(),
            };
            let tls = match &replica.tls {
                Some(own) => tls::upstream(&mut p, &format!("{key}.tls"), own),
                None => region_tls.clone(),
            };
            let address = address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            replicas.push(Replica {
                id: replica.id.clone(),
                address,
                weight,
                state: replica.state,
                max_inflight,
                dialect: replica.dialect,
                engine: replica.engine,
                upstream_auth,
                tls: tls.map(|t| tls::for_replica(&t, address)),
            });
        }
        regions.push(Region {
            name: region.name.clone(),
            replicas,
            kv_scope: region.kv_scope,
        });
    }
    let points = total_weight * u64::from(a.ring_points_per_weight);
    if points > MAX_RING_POINTS {
        p.add(
            "affinity.ring_points_per_weight",
            format!(
                "the ring would have {points} points (total weight {total_weight} × \
                 {}); the maximum is {MAX_RING_POINTS}: lower ring_points_per_weight or weights",
                a.ring_points_per_weight
            ),
        );
    }

    let local_region = match region_names.get(raw.local_region.as_str()) {
        Some(i) => *i,
        None => {
            let known: Vec<&str> = raw.regions.iter().map(|r| r.name.as_str()).collect();
            p.add(
                "local_region",
                format!(
                    "{:?} is not a region (regions: {})",
                    raw.local_region,
                    known.join(", ")
                ),
            );
            0
        }
    };

    // tenants
    let problems_before = p.0.len();
    let tenant_limits = limits::tenant_limits(&mut p, "tenant_limits", &raw.tenant_limits);
    // A tenant inherits every field it does not set: judged only once the base is valid, so
    // that one bad `tenant_limits` field is reported once, not once per tenant.
    let base_limits_valid = p.0.len() == problems_before;
    let mut tenant_ids: HashMap<&str, usize> = HashMap::new();
    let mut key_hashes: HashMap<[u8; 32], usize> = HashMap::new();
    let mut tenants = Vec::with_capacity(raw.tenants.len());
    for (t, tenant) in raw.tenants.iter().enumerate() {
        let key = format!("tenants[{t}]");
        if !id_is_valid(&tenant.id) {
            p.add(format!("{key}.id"), format!("{:?} {ID_RULE}", tenant.id));
        } else if let Some(first) = tenant_ids.insert(&tenant.id, t) {
            p.add(
                format!("{key}.id"),
                format!(
                    "duplicate tenant id {:?} (first at tenants[{first}].id)",
                    tenant.id
                ),
            );
        }
        let digest = tenant.api_key_sha256.trim();
        let mut hash = [0u8; 32];
        let parsed = hex::decode_to_slice(digest, &mut hash).is_ok();
        if !parsed {
            p.add(
                format!("{key}.api_key_sha256"),
                format!(
                    "expected 64 hex characters (the SHA-256 of the API key, e.g. from \
                     `printf %s \"$KEY\" | sha256sum`), got {} characters",
                    digest.len()
                ),
            );
        } else if let Some(first) = key_hashes.insert(hash, t) {
            p.add(
                format!("{key}.api_key_sha256"),
                format!("the same API key hash as tenants[{first}]; each tenant needs its own key"),
            );
        }
        tenants.push(Tenant {
            id: tenant.id.clone(),
            api_key_sha256: hash,
            limits: if base_limits_valid {
                limits::tenant_limits(
                    &mut p,
                    &format!("{key}.limits"),
                    &tenant.limits.over(&raw.tenant_limits),
                )
            } else {
                tenant_limits
            },
        });
    }

    // pricing
    let pricing = match &raw.pricing {
        None => Pricing::default(),
        Some(pr) => Pricing {
            default: price(&mut p, "pricing.default", &pr.default),
            models: pr
                .models
                .iter()
                .map(|(model, raw)| {
                    (
                        model.clone(),
                        price(&mut p, &format!("pricing.models.{model}"), raw),
                    )
                })
                .collect(),
        },
    };

    durations::check(&mut p, &raw);

    let request_bodies = request_bodies(&mut p, &raw.request_bodies);

    // upstream and server
    if raw.server.threads == 0 || raw.server.threads > 1024 {
        p.add(
            "server.threads",
            format!("{} is out of range 1..=1024", raw.server.threads),
        );
    }
    if let Some(log) = &raw.usage_log {
        if log.path.as_os_str().is_empty() {
            p.add("usage_log.path", "must not be empty");
        }
        if log.queue == 0 || log.queue > 10_000_000 {
            p.add(
                "usage_log.queue",
                format!("{} is out of range 1..=10000000", log.queue),
            );
        }
    }
    let loss = &raw.metering.cache_loss;
    if !(loss.threshold > 0.0 && loss.threshold <= 1.0) {
        p.add(
            "metering.cache_loss.threshold",
            format!(
                "{} is out of range: a ratio of reported to expected cached tokens, above 0 \
                 and at most 1",
                loss.threshold
            ),
        );
    }
    if loss.window < Duration::from_secs(1) || loss.window > Duration::from_secs(24 * 3600) {
        p.add(
            "metering.cache_loss.window",
            format!(
                "{} is out of range 1s..=24h",
                humantime::format_duration(loss.window)
            ),
        );
    }
    if loss.block_tokens == 0 || loss.block_tokens > 4096 {
        p.add(
            "metering.cache_loss.block_tokens",
            format!("{} is out of range 1..=4096", loss.block_tokens),
        );
    }
    if let Some(key) = &raw.metering.session_key {
        if key.len() < 16 {
            p.add(
                "metering.session_key",
                "must be at least 16 characters: it keys the session hash in usage records",
            );
        }
    }

    let h = &raw.health;
    let probe = &h.probe;
    if !probe.path.starts_with('/') {
        p.add(
            "health.probe.path",
            format!("{:?} must start with '/'", probe.path),
        );
    }
    for (key, n) in [
        ("health.probe.rise", probe.rise),
        ("health.probe.fall", probe.fall),
        ("health.eject_after", h.eject_after),
    ] {
        if !(1..=100).contains(&n) {
            p.add(key, format!("{n} is out of range 1..=100"));
        }
    }
    let f = &raw.failover;
    if !(1..=10).contains(&f.max_attempts) {
        p.add(
            "failover.max_attempts",
            format!("{} is out of range 1..=10", f.max_attempts),
        );
    }
    for (i, path) in f.retry_unanswered.iter().enumerate() {
        if !path.starts_with('/') {
            p.add(
                format!("failover.retry_unanswered[{i}]"),
                format!("{path:?} must start with '/'"),
            );
        }
    }
    if let Some(token) = &raw.admin.token {
        if token.len() < 16 {
            p.add(
                "admin.token",
                "must be at least 16 characters: it guards drain and reload",
            );
        }
    }

    let sticky_store = raw.sticky_store.map(|s| {
        let scheme_ok = ["redis://", "rediss://", "valkey://", "valkeys://"]
            .iter()
            .any(|scheme| s.url.starts_with(scheme));
        if !scheme_ok {
            p.add(
                "sticky_store.url",
                "must start with redis://, rediss:// (TLS), valkey:// or valkeys:// (TLS); \
                 credentials go in the URL",
            );
        }
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(1));
        if !(min..=max).contains(&s.lookup_timeout) {
            p.add(
                "sticky_store.lookup_timeout",
                format!(
                    "{}: every new session on this edge may wait this long for the store",
                    durations::out_of_range(s.lookup_timeout, min, max)
                ),
            );
        }
        if s.write_queue == 0 || s.write_queue > MAX_WRITE_QUEUE {
            p.add(
                "sticky_store.write_queue",
                format!("must be from 1 to {MAX_WRITE_QUEUE}: queued writes are held in memory"),
            );
        }
        if s.tls_ca_file.is_some()
            && !s.url.starts_with("rediss://")
            && !s.url.starts_with("valkeys://")
        {
            p.add(
                "sticky_store.tls_ca_file",
                "is only used with a TLS URL (rediss:// or valkeys://)",
            );
        }
        if let Some(every) = s.load_interval {
            let (min, max) = (Duration::from_millis(10), Duration::from_secs(10));
            if !(min..=max).contains(&every) {
                p.add(
                    "sticky_store.load_interval",
                    format!(
                        "{}: every instance publishes one report per interval (null turns it off)",
                        durations::out_of_range(every, min, max)
                    ),
                );
            }
        }
        if s.key_prefix.is_empty() {
            p.add(
                "sticky_store.key_prefix",
                "must not be empty: it keeps Tether's keys apart from others in the store",
            );
        }
        if s.channel.is_empty() {
            p.add("sticky_store.channel", "must not be empty");
        }
        StickyStoreSettings {
            url: s.url,
            cluster: s.cluster,
            key_prefix: s.key_prefix,
            channel: s.channel,
            lookup_timeout: s.lookup_timeout,
            write_queue: s.write_queue,
            tls_ca_file: s.tls_ca_file,
            load_interval: s.load_interval,
        }
    });
    let placement = match (raw.affinity.placement, &sticky_store) {
        (Some(Placement::Nearest), None) => {
            p.add(
                "affinity.placement",
                "`nearest` needs a `sticky_store`: other instances could not find where this \
                 one placed a session (use `hash` without a store)",
            );
            Placement::Hash
        }
        (Some(placement), _) => placement,
        (None, Some(_)) => Placement::Nearest,
        (None, None) => Placement::Hash,
    };

    let outcome_header = raw.affinity.outcome_header.as_deref().and_then(|name| {
        let name = name.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name == header {
            p.add(
                "affinity.outcome_header",
                "must be a valid header name other than affinity.header (or null to send none)",
            );
            return None;
        }
        Some(name)
    });

    let override_share = raw.affinity.override_share;
    if !(override_share > 0.0 && override_share <= 1.0) {
        p.add(
            "affinity.override_share",
            format!(
                "{override_share} must be above 0 and at most 1 (the fraction of \
                 override_capacity one tenant may hold; 1 = no limit)"
            ),
        );
    }
    let key_secret = raw
        .affinity
        .key_secret
        .as_ref()
        .and_then(|s| secret_source(&mut p, "affinity.key_secret", s));

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Topology {
        // Both are Some when no problem was recorded.
        listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        listen_tls,
        admin_listen,
        local_region,
        affinity: AffinitySettings {
            header,
            max_token_len: a.max_token_len,
            balance_factor: a.balance_factor,
            override_ttl: a.override_ttl,
            override_capacity: a.override_capacity,
            ring_points_per_weight: a.ring_points_per_weight,
            tenant_locality: a.tenant_locality,
            shed_factor: a.shed_factor,
            placement,
            outcome_header,
            key_sources: a.key_sources.clone(),
            agent_headers,
            key_secret,
            override_share,
        },
        regions,
        tenants,
        tenant_limits,
        pricing,
        usage_log: raw.usage_log.map(|l| UsageLog {
            path: l.path,
            queue: l.queue,
        }),
        metering: MeteringSettings {
            enabled: raw.metering.enabled,
            session_key: raw.metering.session_key,
            inject_stream_usage: raw.metering.inject_stream_usage,
            cache_loss: tether_metering::CacheLossSettings {
                threshold: raw.metering.cache_loss.threshold,
                min_expected_tokens: raw.metering.cache_loss.min_expected_tokens,
                window: raw.metering.cache_loss.window,
                block_tokens: raw.metering.cache_loss.block_tokens,
            },
        },
        upstream: UpstreamSettings {
            connect_timeout: raw.upstream.connect_timeout,
            read_timeout: raw.upstream.read_timeout,
            idle_timeout: raw.upstream.idle_timeout,
            watch_connections: raw.upstream.watch_connections,
        },
        server: ServerSettings {
            threads: raw.server.threads,
            work_stealing: raw.server.work_stealing,
            drain_timeout: raw.server.drain_timeout,
            graceful_shutdown_timeout: raw.server.graceful_shutdown_timeout,
            pid_file: raw.server.pid_file,
            upgrade_sock: raw.server.upgrade_sock,
        },
        health: HealthSettings {
            probe: raw.health.probe.enabled.then(|| ProbeSettings {
                path: raw.health.probe.path.clone(),
                interval: raw.health.probe.interval,
                timeout: raw.health.probe.timeout,
                rise: raw.health.probe.rise,
                fall: raw.health.probe.fall,
            }),
            eject_after: raw.health.eject_after,
            eject_cooldown: raw.health.eject_cooldown,
            eject_max_cooldown: raw.health.eject_max_cooldown,
            overload_default: raw.health.overload_default,
            overload_max: raw.health.overload_max,
        },
        failover: FailoverSettings {
            max_attempts: raw.failover.max_attempts,
            deadline: raw.failover.deadline,
            retry_unanswered: raw.failover.retry_unanswered,
        },
        admin: AdminSettings {
            token: raw.admin.token,
        },
        reload: ReloadSettings {
            watch: raw.reload.watch,
        },
        sticky_store,
        request_bodies,
    })
}

/// The most `request_bodies.memory_mib` may be (1 TiB).
const MAX_BODY_MEMORY_MIB: u64 = 1 << 20;

fn request_bodies(p: &mut Problems, raw: &RawRequestBodies) -> RequestBodySettings {
    if raw.memory_mib == 0 || raw.memory_mib > MAX_BODY_MEMORY_MIB {
        p.add(
            "request_bodies.memory_mib",
            format!(
                "{} is out of range 1..={MAX_BODY_MEMORY_MIB}",
                raw.memory_mib
            ),
        );
    }
    if !(raw.tenant_share > 0.0 && raw.tenant_share <= 1.0) {
        p.add(
            "request_bodies.tenant_share",
            format!("{} is out of range (0, 1]", raw.tenant_share),
        );
    }
    let memory_limit =
        usize::try_from(raw.memory_mib.clamp(1, MAX_BODY_MEMORY_MIB) << 20).unwrap_or(usize::MAX);
    // Rounded down, at least one byte: a share is a fraction of a validated total.
    let share = if raw.tenant_share > 0.0 && raw.tenant_share <= 1.0 {
        raw.tenant_share
    } else {
        1.0
    };
    let tenant_limit = ((memory_limit as f64 * share) as usize).clamp(1, memory_limit);
    RequestBodySettings {
        memory_limit,
        tenant_limit,
        deadline: raw.deadline,
    }
}
