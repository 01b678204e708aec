//! `replica-sim`: start a simulated replica fleet.
//!
//! ```text
//! replica-sim --topology conf/tether.yaml            every replica the topology lists
//! replica-sim --replica eu-1=127.0.0.1:0 --replica …  explicit ids and addresses
//!             [--admin 127.0.0.1:9300] [--time-scale 0.1] [--cache-tokens 24576] …
//! replica-sim --replica a=127.0.0.1:0 --tls-cert a.pem --tls-key a.key  HTTPS (HTTP/1.1)
//! replica-sim --replica a=127.0.0.1:0 --engine llamacpp --slots 2   llama.cpp-like slots
//! replica-sim --replica a=127.0.0.1:0 --replica b=127.0.0.1:0 --region-of a=eu --region-of b=eu \
//!             --shared-kv-region eu                  a and b share a region-wide KV tier
//! ```
//!
//! With `--topology`, each replica is in its region, and a region with `kv_scope: region`
//! gets a shared KV tier as if named by `--shared-kv-region`.
//!
//! Once every listener is bound it prints `ready <id> <addr>` per replica, `ready admin
//! <addr>` when there is an admin API, then `ready`, so a test can start it with port 0 and
//! read the real ports (no port races).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use tether_replica_sim::shared::{regions_with_shared_kv, DEFAULT_TRANSFER};
use tether_replica_sim::{Dialect, EngineMode, Fleet, ReplicaConfig, SharedKvConfig, SimConfig};
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
    /// Put a replica in a region, as ID=REGION (overrides its topology region); repeat for more.
    #[arg(long = "region-of", value_name = "ID=REGION")]
    region_of: Vec<String>,
    /// Give a region a shared KV tier that all its replicas read and write through to, like
    /// `kv_scope: region` in the topology; repeat for more.
    #[arg(long = "shared-kv-region", value_name = "NAME")]
    shared_kv_regions: Vec<String>,
    /// Capacity of each region's shared KV tier, in tokens [default: 8 × --cache-tokens].
    #[arg(long, value_name = "N")]
    shared_kv_tokens: Option<usize>,
    /// Time to fetch blocks from the shared tier, as a fraction of the time to prefill them.
    #[arg(long, value_name = "F", default_value_t = DEFAULT_TRANSFER)]
    shared_kv_transfer: f64,
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
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS; with --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Fixed ids and timestamps: identical requests get byte-identical responses.
    #[arg(long)]
    deterministic: bool,
    /// Which engine to imitate: `basic` (no engine endpoints), `vllm` (KV-block admission,
    /// vLLM's /metrics) or `llamacpp` (slots, /slots, /props, /metrics).
    #[arg(long, value_enum, default_value_t = EngineMode::Basic)]
    engine: EngineMode,
    /// llama.cpp mode: slots per replica (llama-server --parallel); --cache-tokens is split
    /// among them.
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// llama.cpp mode: host-RAM prompt cache per replica, in tokens (llama-server --cache-ram);
    /// 0 = none, so a conversation whose slot is taken loses its cache.
    #[arg(long, default_value_t = 0)]
    host_cache_tokens: usize,
    /// llama.cpp mode: llama-server --slot-prompt-similarity.
    #[arg(long, default_value_t = 0.1)]
    slot_prompt_similarity: f64,
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
        if self.block_tokens == 0 || self.max_num_seqs == 0 || self.slots == 0 {
            bail!("--block-tokens, --max-num-seqs and --slots must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.slot_prompt_similarity) {
            bail!(
                "--slot-prompt-similarity must be between 0 and 1, got {}",
                self.slot_prompt_similarity
            );
        }
        if self.engine == EngineMode::Llamacpp && self.cache_tokens / self.block_tokens < self.slots
        {
            bail!("--cache-tokens must hold at least one block per slot in llamacpp mode");
        }
        if self.cache_tokens < self.block_tokens {
            bail!(
                "--cache-tokens must hold at least one block ({} tokens)",
                self.block_tokens
            );
        }
        let shared_kv_tokens = self
            .shared_kv_tokens
            .unwrap_or(self.cache_tokens.saturating_mul(8));
        if shared_kv_tokens < self.block_tokens {
            bail!(
                "--shared-kv-tokens must hold at least one block ({} tokens)",
                self.block_tokens
            );
        }
        // Above 1 an engine would recompute rather than fetch.
        if !(0.0..=1.0).contains(&self.shared_kv_transfer) {
            bail!(
                "--shared-kv-transfer must be between 0 and 1, got {}",
                self.shared_kv_transfer
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
            shared_kv: SharedKvConfig {
                regions: self.shared_kv_regions.iter().cloned().collect(),
                capacity_tokens: shared_kv_tokens,
                transfer: self.shared_kv_transfer,
            },
            engine: self.engine,
            slots: self.slots,
            host_cache_tokens: self.host_cache_tokens,
            slot_prompt_similarity: self.slot_prompt_similarity,
        })
    }
}

/// Every replica of a topology in its region, and the regions with `kv_scope: region`.
fn read_topology(path: &Path, sim: &mut SimConfig) -> anyhow::Result<Vec<ReplicaConfig>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
    let topology = Topology::from_yaml(&text, &name)?;
    let shared = regions_with_shared_kv(&text).with_context(|| format!("{name}: kv_scope"))?;
    sim.shared_kv.regions.extend(shared);
    Ok(topology
        .replicas()
        .map(|(region, r)| {
            let config = ReplicaConfig::new(r.id.clone(), r.address);
            match topology.regions.get(region) {
                Some(region) => config.in_region(region.name.clone()),
                None => config,
            }
        })
        .collect())
}

/// Applies `--region-of ID=REGION` to the replicas it names.
fn place(configs: &mut [ReplicaConfig], spec: &str) -> anyhow::Result<()> {
    let (id, region) = spec
        .split_once('=')
        .with_context(|| format!("--region-of {spec:?}: expected ID=REGION"))?;
    if region.is_empty() {
        bail!("--region-of {spec:?}: the region is empty");
    }
    let Some(config) = configs.iter_mut().find(|c| c.id == id) else {
        bail!("--region-of {spec:?}: no replica {id:?}");
    };
    config.region = Some(region.to_owned());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let mut sim = cli.sim_config()?;
    let mut configs = Vec::new();
    if let Some(path) = &cli.topology {
        configs.extend(read_topology(path, &mut sim)?);
    }
    for spec in &cli.replicas {
        configs.push(parse_replica(spec)?);
    }
    for spec in &cli.region_of {
        place(&mut configs, spec)?;
    }
    if configs.is_empty() {
        bail!("nothing to start: pass --topology FILE or --replica ID=ADDR");
    }

    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(tether_replica_sim::tls::server_config(
            cert,
            key,
            cli.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let fleet = Fleet::start_with_tls(configs, sim, cli.admin, tls).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("replica-sim").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn topology_replicas_are_in_their_regions_and_region_of_moves_them() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf/tether.yaml");
        let mut sim = SimConfig::default();
        let mut configs = read_topology(&path, &mut sim).unwrap();
        let region = |configs: &[ReplicaConfig], id: &str| {
            let config = configs.iter().find(|c| c.id == id).unwrap();
            config.region.clone()
        };
        assert_eq!(region(&configs, "eu-2").as_deref(), Some("eu"));
        assert_eq!(region(&configs, "us-1").as_deref(), Some("us"));
        assert!(sim.shared_kv.regions.is_empty(), "no kv_scope in the file");
        place(&mut configs, "us-1=eu").unwrap();
        assert_eq!(region(&configs, "us-1").as_deref(), Some("eu"));
        assert!(place(&mut configs, "nobody=eu").is_err());
        assert!(place(&mut configs, "us-1").is_err());
        assert!(place(&mut configs, "us-1=").is_err());
    }

    #[test]
    fn the_shared_tier_defaults_to_eight_local_caches_and_a_fifth_of_the_prefill() {
        let sim = cli(&["--cache-tokens", "1000", "--shared-kv-region", "eu"])
            .sim_config()
            .unwrap();
        assert_eq!(sim.shared_kv.capacity_tokens, 8000);
        assert_eq!(sim.shared_kv.transfer, 0.2);
        assert_eq!(
            sim.shared_kv.regions.iter().collect::<Vec<_>>(),
            ["eu"],
            "{sim:?}"
        );
        let sim = cli(&["--shared-kv-tokens", "64", "--shared-kv-transfer", "0.5"])
            .sim_config()
            .unwrap();
        assert_eq!(
            (sim.shared_kv.capacity_tokens, sim.shared_kv.transfer),
            (64, 0.5)
        );
        for bad in [
            &["--shared-kv-transfer", "1.5"][..],
            &["--shared-kv-transfer=-0.1"],
            &["--shared-kv-transfer", "NaN"],
            &["--shared-kv-tokens", "8"],
        ] {
            assert!(cli(bad).sim_config().is_err(), "{bad:?}");
        }
    }
}
