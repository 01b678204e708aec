//! `tether`: an edge proxy for LLM inference that routes `x-session-affinity` tokens to the
//! replica that holds the conversation's KV cache.
//!
//! ```text
//! tether run   -c conf/tether.yaml     serve
//! tether check -c conf/tether.yaml     validate and exit (non-zero with every problem listed)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;

use tether::router::Router;
use tether::tier::DiscardSink;
use tether::{report_cmd, server};
use tether_affinity::BindingSink;
use tether_topology::Topology;

/// mimalloc instead of glibc malloc: the usage log's writer thread frees records the proxy
/// threads allocated, and glibc serialises such cross-thread frees on an arena lock (a futex
/// wake per contended free); mimalloc frees them lock-free. Measured
/// in benches/proxy_cost.rs (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Session-affinity edge proxy for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the topology in FILE.
    Run {
        /// Topology file (YAML).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Take over the listeners of a running instance (zero-downtime upgrade).
        #[arg(short = 'u', long)]
        upgrade: bool,
        /// Detach and run in the background (for a systemd `Type=forking` unit; see
        /// docs/operations.md). The working directory stays the current one.
        #[arg(short = 'd', long)]
        daemon: bool,
    },
    /// Summarize usage logs per tenant (or region, replica, model).
    Report {
        /// Usage log files (JSONL; `.gz` for rotated ones).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Group by.
        #[arg(long, value_enum, default_value = "tenant")]
        by: report_cmd::By,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: report_cmd::Format,
    },
    /// Validate topology files and exit; non-zero if any is invalid.
    Check {
        /// Topology files (YAML).
        #[arg(short = 'c', long = "config", value_name = "FILE", required = true, num_args = 1..)]
        configs: Vec<PathBuf>,
    },
}

/// The process's logger: `RUST_LOG` as usual, except for the log lines that would print the
/// session token. At trace level Pingora prints each request header as it arrives (a `Debug`
/// dump) and as it goes upstream (raw bytes), headers and all, before any hook of Tether's
/// could mark the token sensitive; Tether never logs the token, at any level.
struct TokenSafeLogger(env_logger::Logger);

/// Those lines: their target and how their message starts.
const HEADER_DUMPS: [(&str, &str); 2] = [
    ("pingora_proxy", "Request header:"),
    (
        "pingora_core::protocols::http::v1::client",
        "Writing request header:",
    ),
];

impl TokenSafeLogger {
    fn install(inner: env_logger::Logger) {
        let max = inner.filter();
        if log::set_boxed_logger(Box::new(TokenSafeLogger(inner))).is_ok() {
            log::set_max_level(max);
        }
    }

    /// Whether `record` is one of [`HEADER_DUMPS`] (formats the message of trace records
    /// from those targets only).
    fn dumps_headers(record: &log::Record<'_>) -> bool {
        record.level() == log::Level::Trace
            && HEADER_DUMPS.iter().any(|(target, start)| {
                record.target() == *target && record.args().to_string().starts_with(start)
            })
    }

    /// Whether `record` reports expected client behaviour ([`CLIENT_BEHAVIOUR`]), which at
    /// its own level would be a line per connection. Kept at debug.
    fn client_behaviour(record: &log::Record<'_>) -> bool {
        CLIENT_BEHAVIOUR.iter().any(|line| {
            record.level() == line.level
                && record.target().starts_with(line.target)
                && line.matches(&record.args().to_string())
        })
    }
}

/// A library's log line about something clients routinely do.
struct ClientBehaviour {
    level: log::Level,
    /// The target's start.
    target: &'static str,
    /// How the message starts, and what it must contain after that.
    starts: &'static str,
    contains: &'static str,
}

impl ClientBehaviour {
    fn matches(&self, message: &str) -> bool {
        message.starts_with(self.starts) && message.contains(self.contains)
    }
}

/// Lines lowered to debug:
/// - rustls's warning that a client sent an IP address as its TLS server name (load
///   generators and some HTTP clients do, on every connection);
/// - Pingora's error for a client that closed its connection during the TLS handshake (wrk
///   and health checkers closing idle connections, port scanners).
const CLIENT_BEHAVIOUR: [ClientBehaviour; 2] = [
    ClientBehaviour {
        level: log::Level::Warn,
        target: "rustls::",
        starts: "Illegal SNI extension: ignoring IP address",
        contains: "",
    },
    ClientBehaviour {
        level: log::Level::Error,
        target: "pingora_core::services::listening",
        starts: "Downstream handshake error",
        contains: "tls handshake eof",
    },
];

impl log::Log for TokenSafeLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if Self::dumps_headers(record) {
            return;
        }
        if Self::client_behaviour(record) {
            let debug = log::Metadata::builder()
                .level(log::Level::Debug)
                .target(record.target())
                .build();
            if self.0.enabled(&debug) {
                self.0.log(
                    &log::Record::builder()
                        .metadata(debug)
                        .args(*record.args())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .build(),
                );
            }
            return;
        }
        self.0.log(record);
    }

    fn flush(&self) {
        self.0.flush();
    }
}

fn main() -> ExitCode {
    TokenSafeLogger::install(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build(),
    );
    let cli = Cli::parse();
    match cli.command {
        Command::Check { configs } => check(&configs),
        Command::Report { files, by, format } => match report_cmd::run(&files, by, format) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tether report: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            upgrade,
            daemon,
        } => match server::run(&config, upgrade, daemon) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tether: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(configs: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in configs {
        // Valid YAML is not enough: the proxy must also be able to use it (with this
        // environment's admin token).
        let checked = Topology::load(path)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                let sink = t
                    .sticky_store
                    .as_ref()
                    .map(|_| Arc::new(DiscardSink) as Arc<dyn BindingSink>);
                Router::new(&t, sink)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|_| {
                        tether::tls::ListenerCerts::load(&t)
                            .map_err(|e| format!("{}: {e}", path.display()))
                    })
                    .map(|_| t)
            });
        match checked {
            Ok(t) => println!(
                "{}: ok ({} regions, {} replicas, {} tenants)",
                path.display(),
                t.regions.len(),
                t.replicas().count(),
                t.tenants.len()
            ),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(
        level: log::Level,
        target: &'a str,
        args: std::fmt::Arguments<'a>,
    ) -> log::Record<'a> {
        log::Record::builder()
            .level(level)
            .target(target)
            .args(args)
            .build()
    }

    #[test]
    fn only_expected_client_behaviour_is_lowered() {
        let lowered =
            |level, target, args| TokenSafeLogger::client_behaviour(&record(level, target, args));
        assert!(lowered(
            log::Level::Warn,
            "rustls::msgs::handshake",
            format_args!(
                "Illegal SNI extension: ignoring IP address presented as hostname (3132372e302e302e31)"
            )
        ));
        assert!(!lowered(
            log::Level::Warn,
            "rustls::conn",
            format_args!("Sending fatal alert BadCertificate")
        ));
        assert!(!lowered(
            log::Level::Warn,
            "tether::tls",
            format_args!("Illegal SNI extension: ignoring IP address")
        ));
        assert!(lowered(
            log::Level::Error,
            "pingora_core::services::listening",
            format_args!(
                "Downstream handshake error from 127.0.0.1:39748:  TLSHandshakeFailure context: \
                 TLS accept() failed:  TLSHandshakeFailure context: tls connect error: tls handshake eof"
            )
        ));
        // A handshake that failed for another reason stays an error.
        assert!(!lowered(
            log::Level::Error,
            "pingora_core::services::listening",
            format_args!(
                "Downstream handshake error from 127.0.0.1:1: TLSHandshakeFailure context: \
                 tls connect error: received corrupt message"
            )
        ));
    }
}
