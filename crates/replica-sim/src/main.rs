//! `replica-sim`: start a simulated replica fleet.
//!
//! ```text
//! replica-sim --topology conf/tether.yaml            every replica the topology lists
//! replica-sim --replica eu-1=127.0.0.1:0 --replica …  explicit ids and addresses
//!             [--admin 127.0.0.1:9300] [--time-scale 0.1] [--cache-tokens 24576] …
//! ```
//!
//! Once every listener is bound it prints `ready <id> <addr>` per replica, `ready admin
//! <addr>` when there is an admin API, then `ready`, so a test can start it with port 0 and
//! read the real ports (no port races).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use tether_replica_sim::{Dialect, Fleet, ReplicaConfig, SimConfig};
use tether_topology::Topology;

#[derive(Debug, Parser)]
#[command(
    name = "replica-sim",
    version,
    about = "Simulated OpenAI-compatible inference replicas"
)]
struct Cli {
    /// Start every replica of this Tether topology, on its configured address.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// A replica as ID=ADDR (port 0 picks a free port); repeat for more.
    #[arg(long = "replica", value_name = "ID=ADDR")]
    replicas: Vec<String>,
    /// Serve the fleet admin API (faults, flush, ground truth) here.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Multiply every simulated delay (0 = instant).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Prefix-cache capacity per replica, in tokens.
    #[arg(long, default_value_t = tether_replica_sim::DEFAULT_CACHE_TOKENS)]
    cache_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_tokens: usize,
    /// Prefill speed, uncached prompt tokens per second.
    #[arg(long, default_value_t = 8000.0)]
    prefill_rate: f64,
    /// Decode speed per sequence, tokens per second.
    #[arg(long, default_value_t = 50.0)]
    decode_rate: f64,
    /// Concurrent sequences per replica; more requests queue.
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    /// Usage shape of /v1/chat/completions (/v1/messages always answers Anthropic-style).
    #[arg(long, value_enum, default_value_t = Dialect::Openai)]
    dialect: Dialect,
    /// Fixed ids and timestamps: identical requests get byte-identical responses.
    #[arg(long)]
    deterministic: bool,
}

fn parse_replica(spec: &str) -> anyhow::Result<ReplicaConfig> {
    let (id, addr) = spec
        .split_once('=')
        .with_context(|| format!("--replica {spec:?}: expected ID=ADDR"))?;
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--replica {spec:?}: {addr:?} is not an ip:port address"))?;
    if id.is_empty() {
        bail!("--replica {spec:?}: the id is empty");
    }
    Ok(ReplicaConfig::new(id, addr))
}

impl Cli {
    fn sim_config(&self) -> anyhow::Result<SimConfig> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                bail!("--{name} must be a positive number, got {v}")
            }
        };
        if !(self.time_scale.is_finite() && self.time_scale >= 0.0) {
            bail!("--time-scale must be 0 or more, got {}", self.time_scale);
        }
        if self.block_tokens == 0 || self.max_num_seqs == 0 {
            bail!("--block-tokens and --max-num-seqs must be at least 1");
        }
        if self.cache_tokens < self.block_tokens {
            bail!(
                "--cache-tokens must hold at least one block ({} tokens)",
                self.block_tokens
            );
        }
        Ok(SimConfig {
            block_tokens: self.block_tokens,
            cache_tokens: self.cache_tokens,
            prefill_tokens_per_sec: positive("prefill-rate", self.prefill_rate)?,
            decode_tokens_per_sec: positive("decode-rate", self.decode_rate)?,
            max_num_seqs: self.max_num_seqs,
            time_scale: self.time_scale,
            dialect: self.dialect,
            deterministic: self.deterministic,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let sim = cli.sim_config()?;
    let mut configs = Vec::new();
    if let Some(path) = &cli.topology {
        let topology = Topology::load(path)?;
        configs.extend(
            topology
                .replicas()
                .map(|(_, r)| ReplicaConfig::new(r.id.clone(), r.address)),
        );
    }
    for spec in &cli.replicas {
        configs.push(parse_replica(spec)?);
    }
    if configs.is_empty() {
        bail!("nothing to start: pass --topology FILE or --replica ID=ADDR");
    }

    let fleet = Fleet::start(configs, sim, cli.admin).await?;
    {
        let mut out = std::io::stdout().lock();
        for (id, addr) in fleet.replicas() {
            writeln!(out, "ready {id} {addr}")?;
        }
        if let Some(addr) = fleet.admin_addr() {
            writeln!(out, "ready admin {addr}")?;
        }
        writeln!(out, "ready")?;
        out.flush()?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {},
    }
    fleet.stop();
    Ok(())
}
