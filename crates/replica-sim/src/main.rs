//! `replica-sim`: start a simulated replica fleet.
//!
//! ```text
//! replica-sim --topology conf/tether.yaml            every replica the topology lists
//! replica-sim --replica eu-1=127.0.0.1:0 --replica …  explicit ids and addresses
//! ```
//!
//! Once every listener is bound it prints one line per replica, `ready <id> <addr>`, then
//! `ready`, so a test can start it with port 0 and read the real ports (no port races).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use tether_replica_sim::{Fleet, ReplicaConfig};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
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

    let fleet = Fleet::start(configs).await?;
    {
        let mut out = std::io::stdout().lock();
        for (id, addr) in fleet.replicas() {
            writeln!(out, "ready {id} {addr}")?;
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
