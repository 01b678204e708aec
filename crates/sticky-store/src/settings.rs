//! What the operator configures (the topology's `sticky_store:` section), and its validation
//! into the plan the store runs with.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::connection::Target;
use crate::error::SettingsProblem;

/// Default [`StoreSettings::key_prefix`].
pub const DEFAULT_KEY_PREFIX: &str = "tether:s:";
/// Default [`StoreSettings::channel`].
pub const DEFAULT_CHANNEL: &str = "tether:bindings";
/// Default [`StoreSettings::lookup_timeout`]: a loopback or same-zone round trip is well under
/// a millisecond, and a request should not wait longer than this for a hint it can live without.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_millis(5);
/// Default [`StoreSettings::ttl`], the same as the proxy's default `affinity.override_ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default [`StoreSettings::write_queue`].
pub const DEFAULT_WRITE_QUEUE: usize = 4096;

/// How to reach the shared store and how to use it. The proxy fills it from the topology's
/// `sticky_store:` section; field names are the YAML keys.
///
/// `Debug` hides the password of the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://…` for TLS (`#insecure` at the end
    /// skips certificate verification). Credentials are taken from the URL.
    pub url: String,
    /// Redis Cluster: `url` is one seed node; keys are sharded by hash slot.
    pub cluster: bool,
    /// Prefix of every store key (`{key_prefix}{routing key as 16 hex digits}`).
    pub key_prefix: String,
    /// Pub/sub channel on which instances announce new bindings.
    pub channel: String,
    /// How long a lookup may wait for Redis; past it the request is routed as if there were
    /// no entry.
    pub lookup_timeout: Duration,
    /// Idle lifetime of a binding in Redis (the proxy passes `affinity.override_ttl`). Whole
    /// seconds: Redis `EX` takes seconds, so a fraction is rounded up.
    pub ttl: Duration,
    /// Bound on queued writes (binds and touches); beyond it writes are dropped and counted.
    pub write_queue: usize,
    /// PEM file of the CA that signed the server's certificate, for a private CA with
    /// `rediss://`. Without it the system's roots are used.
    pub tls_ca_file: Option<PathBuf>,
}

impl StoreSettings {
    /// Settings for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> Self {
        StoreSettings {
            url: url.into(),
            cluster: false,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            ttl: DEFAULT_TTL,
            write_queue: DEFAULT_WRITE_QUEUE,
            tls_ca_file: None,
        }
    }
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &redact_url(&self.url))
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("channel", &self.channel)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("ttl", &self.ttl)
            .field("write_queue", &self.write_queue)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// Validated settings: what the running store uses.
#[derive(Debug)]
pub(crate) struct Plan {
    pub target: Target,
    /// The URL without its password, for logs.
    pub redacted_url: String,
    pub key_prefix: String,
    pub channel: String,
    pub lookup_timeout: Duration,
    pub ttl_seconds: u64,
    pub write_queue: usize,
}

/// Checks every field and reports every problem, not just the first.
pub(crate) fn plan(settings: &StoreSettings) -> Result<Plan, Vec<SettingsProblem>> {
    let mut problems = Vec::new();
    let mut problem =
        |field: &'static str, message: String| problems.push(SettingsProblem { field, message });

    let info = match settings.url.as_str().into_connection_info() {
        Ok(info) => Some(info),
        Err(err) => {
            // redis-rs's parse errors describe the fault without echoing the URL, so no
            // password can leak into the message.
            problem(
                "sticky_store.url",
                format!("not a redis:// or rediss:// URL ({err})"),
            );
            None
        }
    };
    let tls = info
        .as_ref()
        .is_some_and(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
    if let Some(info) = &info {
        if settings.cluster && matches!(info.addr(), ConnectionAddr::Unix(_)) {
            problem(
                "sticky_store.url",
                "a Redis Cluster seed must be a TCP address, not a unix socket".to_owned(),
            );
        }
    }
    if settings.key_prefix.is_empty() {
        problem(
            "sticky_store.key_prefix",
            "must not be empty: without a prefix Tether's keys mix with everything else in the database".to_owned(),
        );
    }
    if settings.channel.is_empty() {
        problem("sticky_store.channel", "must not be empty".to_owned());
    }
    if settings.lookup_timeout.is_zero() {
        problem(
            "sticky_store.lookup_timeout",
            "must be more than 0 (e.g. 5ms)".to_owned(),
        );
    }
    if settings.ttl < Duration::from_secs(1) {
        problem(
            "sticky_store.ttl",
            "must be at least 1s (Redis expiries are in whole seconds)".to_owned(),
        );
    }
    if settings.write_queue == 0 {
        problem("sticky_store.write_queue", "must be at least 1".to_owned());
    }
    let ca_pem = match &settings.tls_ca_file {
        None => None,
        Some(path) if !tls && info.is_some() => {
            problem(
                "sticky_store.tls_ca_file",
                format!(
                    "{} is set but the URL is not rediss://, so TLS is not used",
                    path.display()
                ),
            );
            None
        }
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(err) => {
                problem(
                    "sticky_store.tls_ca_file",
                    format!("cannot read {}: {err}", path.display()),
                );
                None
            }
        },
    };

    let target = match info {
        Some(info) if problems.is_empty() => {
            if tls {
                install_tls_crypto();
            }
            match Target::new(info, settings.cluster, ca_pem) {
                Ok(target) => Some(target),
                Err(err) => {
                    problems.push(SettingsProblem {
                        field: if settings.tls_ca_file.is_some() {
                            "sticky_store.tls_ca_file"
                        } else {
                            "sticky_store.url"
                        },
                        message: format!("cannot build a client: {err}"),
                    });
                    None
                }
            }
        }
        _ => None,
    };
    match target {
        Some(target) if problems.is_empty() => Ok(Plan {
            target,
            redacted_url: redact_url(&settings.url),
            key_prefix: settings.key_prefix.clone(),
            channel: settings.channel.clone(),
            lookup_timeout: settings.lookup_timeout,
            ttl_seconds: settings.ttl.as_secs() + u64::from(settings.ttl.subsec_nanos() > 0),
            write_queue: settings.write_queue,
        }),
        _ => Err(problems),
    }
}

/// rustls needs a process-wide crypto provider and redis-rs does not pick one. The store brings
/// ring; if the process already installed a provider (the proxy's own TLS, say), that one stays.
///
/// rustls deprecates ring's provider for lacking post-quantum key exchange. What crosses this
/// link (replica ids under hashed keys, a rotatable password) does not need to stay secret for
/// decades, and ring builds with a plain C compiler where aws-lc-rs needs cmake and much longer.
#[allow(deprecated)]
pub(crate) fn install_tls_crypto() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// `url` with the password replaced by `***`, for logs and `Debug`.
pub(crate) fn redact_url(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user_info = &rest[..at];
    let user = match user_info.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // Without a colon the whole user info may be a password written in the wrong place.
        None => "***".to_owned(),
    };
    format!("{}{user}{}", &url[..authority_start], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(settings: &StoreSettings) -> Vec<&'static str> {
        match plan(settings) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(|p| p.field).collect(),
        }
    }

    #[test]
    fn defaults_with_a_redis_url_are_valid() {
        let plan = plan(&StoreSettings::new("redis://127.0.0.1:6379/2")).unwrap();
        assert_eq!(plan.ttl_seconds, 3600);
        assert!(!plan.target.uses_tls());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let settings = StoreSettings {
            url: "http://example.com".to_owned(),
            cluster: false,
            key_prefix: String::new(),
            channel: String::new(),
            lookup_timeout: Duration::ZERO,
            ttl: Duration::from_millis(500),
            write_queue: 0,
            tls_ca_file: None,
        };
        assert_eq!(
            fields(&settings),
            [
                "sticky_store.url",
                "sticky_store.key_prefix",
                "sticky_store.channel",
                "sticky_store.lookup_timeout",
                "sticky_store.ttl",
                "sticky_store.write_queue",
            ]
        );
    }

    #[test]
    fn a_rediss_url_selects_tls() {
        let plan = plan(&StoreSettings::new("rediss://:secret@cache.internal:6380")).unwrap();
        assert!(plan.target.uses_tls());
        assert_eq!(plan.redacted_url, "rediss://:***@cache.internal:6380");

        let cluster = plan_cluster("rediss://node-1.internal:7000");
        assert!(cluster.target.uses_tls());
    }

    fn plan_cluster(url: &str) -> Plan {
        plan(&StoreSettings {
            cluster: true,
            ..StoreSettings::new(url)
        })
        .unwrap()
    }

    #[test]
    fn a_cluster_seed_must_be_tcp() {
        let settings = StoreSettings {
            cluster: true,
            ..StoreSettings::new("redis+unix:///run/redis.sock")
        };
        assert_eq!(fields(&settings), ["sticky_store.url"]);
        assert!(!plan_cluster("redis://10.0.0.1:7000").target.uses_tls());
    }

    #[test]
    fn a_ca_file_needs_rediss_and_must_be_readable() {
        let plain = StoreSettings {
            tls_ca_file: Some("/etc/hosts".into()),
            ..StoreSettings::new("redis://127.0.0.1")
        };
        assert_eq!(fields(&plain), ["sticky_store.tls_ca_file"]);
        let missing = StoreSettings {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..StoreSettings::new("rediss://127.0.0.1")
        };
        let problems = plan(&missing).unwrap_err();
        assert_eq!(problems[0].field, "sticky_store.tls_ca_file");
        assert!(problems[0].message.contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn a_fractional_ttl_rounds_up_to_whole_seconds() {
        let settings = StoreSettings {
            ttl: Duration::from_millis(1500),
            ..StoreSettings::new("redis://127.0.0.1")
        };
        assert_eq!(plan(&settings).unwrap().ttl_seconds, 2);
    }

    #[test]
    fn passwords_never_reach_debug_output_or_problems() {
        let cases = [
            (
                "redis://user:s3cret@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://:s3cret@host", "redis://:***@host"),
            ("rediss://s3cret@host/", "rediss://***@host/"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis://host/db?x=a@b", "redis://host/db?x=a@b"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected);
            let debug = format!("{:?}", StoreSettings::new(url));
            assert!(!debug.contains("s3cret"), "{debug}");
        }
        let bad = StoreSettings {
            cluster: true,
            ..StoreSettings::new("redis://:s3cret@host:notaport")
        };
        for problem in plan(&bad).unwrap_err() {
            assert!(!problem.message.contains("s3cret"), "{problem}");
        }
    }
}
