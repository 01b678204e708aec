//! `loadgen`: run an agent-like multi-turn workload and report cache hits against the oracle.
//!
//! ```text
//! loadgen --target http://127.0.0.1:8080 --api-key sk-tether-demo --api-key sk-tether-other
//! loadgen --target http://127.0.0.1:8080,http://127.0.0.1:8081 --edge-choice round-robin \
//!         --region a-1=a,a-2=a,b-1=b
//! loadgen --replicas 127.0.0.1:9101,127.0.0.1:9102 --policy round-robin
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tether_loadgen::{ClientPolicy, EdgeChoice, FleetFacts, RunConfig, Target, Workload};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Agent-like multi-turn load generator for Tether"
)]
struct Cli {
    /// Send through the proxy at this base URL (repeat, or comma-separate, for a tier of
    /// edges: each turn goes to the edge --edge-choice names).
    #[arg(
        long,
        value_name = "URL,…",
        value_delimiter = ',',
        conflicts_with = "replicas"
    )]
    target: Vec<String>,
    /// With several --target edges: sticky (a session keeps its first edge), round-robin (turn
    /// t of session s to edge (s + t) mod edges) or random (per turn, from --seed).
    #[arg(long, value_enum, default_value_t = EdgeChoice::Sticky)]
    edge_choice: EdgeChoice,
    /// Replica regions whose replicas share a KV cache (ID=REGION, repeat or comma-separate):
    /// adds the region warm-follow rate.
    #[arg(long = "region", value_name = "ID=REGION,…", value_delimiter = ',')]
    regions: Vec<String>,
    /// Send straight to these replicas (ip:port, comma-separated) with --policy.
    #[arg(long, value_name = "ADDR,…", value_delimiter = ',')]
    replicas: Vec<String>,
    /// Client-side policy with --replicas.
    #[arg(long, value_enum, default_value_t = ClientPolicy::RoundRobin)]
    policy: ClientPolicy,
    /// API key (repeat: tenant i uses key i; with keys, --tenants defaults to their number).
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// Tenants (each with its own shared system prompt).
    #[arg(long)]
    tenants: Option<usize>,
    /// Sessions to run.
    #[arg(long, default_value_t = 48)]
    sessions: usize,
    /// Turns per session.
    #[arg(long, default_value_t = 8)]
    turns: usize,
    /// Sessions in progress at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// New sessions per second at most (0 = no pacing).
    #[arg(long, default_value_t = 8.0)]
    arrival_rate: f64,
    /// Longest think time between turns, ms (uniform from 0).
    #[arg(long, default_value_t = 200)]
    think_ms: u64,
    /// Tokens in each tenant's system prompt.
    #[arg(long, default_value_t = 1024)]
    system_tokens: usize,
    /// Tokens in each new user message.
    #[arg(long, default_value_t = 128)]
    user_tokens: usize,
    /// Reply length (max_tokens).
    #[arg(long, default_value_t = 64)]
    max_tokens: u64,
    /// Share of sessions sending no x-session-affinity header (0..=1).
    #[arg(long, default_value_t = 0.0)]
    tokenless_fraction: f64,
    /// How the other sessions name themselves, dealt in turn, comma-separated: header,
    /// agent_header (x-claude-code-session-id), prompt_cache_key, nothing. The report then
    /// gives a row per profile.
    #[arg(long, value_delimiter = ',', default_value = "header")]
    profiles: Vec<tether_loadgen::ClientProfile>,
    /// A hot spot: tenant 0's sessions run this many times --turns.
    #[arg(long, default_value_t = 1)]
    hot_tenant_factor: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Tokens per KV block of the fleet (for the oracle).
    #[arg(long, default_value_t = 16)]
    block_tokens: usize,
    /// Also report the capacity bound: an upper bound on what any router could hit with this
    /// many tokens of cache across the fleet (its replicas' total).
    #[arg(long)]
    capacity_bound_tokens: Option<usize>,
    /// With --capacity-bound-tokens: the fleet's number of replicas (equal caches), for the
    /// tighter bound of separate caches, each of which must hold a tenant's shared prefix.
    #[arg(long, requires = "capacity_bound_tokens")]
    bound_replicas: Option<usize>,
    /// Ask for whole responses instead of streams (TTFT is then the whole latency).
    #[arg(long)]
    no_stream: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl Cli {
    fn config(&self) -> anyhow::Result<RunConfig> {
        let target = match (self.target.as_slice(), self.replicas.is_empty()) {
            ([url], _) => Target::Proxy(url.clone()),
            ([_, _, ..], _) => Target::Tier(self.target.clone(), self.edge_choice),
            ([], false) => Target::Direct(
                self.replicas
                    .iter()
                    .map(|r| {
                        if r.starts_with("http://") {
                            r.clone()
                        } else {
                            format!("http://{r}")
                        }
                    })
                    .collect(),
                self.policy,
            ),
            ([], true) => bail!("say where to send: --target URL or --replicas ADDR,…"),
        };
        if !(0.0..=1.0).contains(&self.tokenless_fraction) {
            bail!("--tokenless-fraction must be between 0 and 1");
        }
        if self.turns == 0 || self.sessions == 0 || self.concurrency == 0 || self.block_tokens == 0
        {
            bail!("--sessions, --turns, --concurrency and --block-tokens must be at least 1");
        }
        if !(self.arrival_rate.is_finite() && self.arrival_rate >= 0.0) {
            bail!("--arrival-rate must be 0 or more");
        }
        let tenants = self
            .tenants
            .unwrap_or(if self.api_keys.is_empty() {
                2
            } else {
                self.api_keys.len()
            })
            .max(1);
        Ok(RunConfig {
            workload: Workload {
                sessions: self.sessions,
                turns: self.turns,
                concurrency: self.concurrency,
                arrival_rate: self.arrival_rate,
                think_ms: self.think_ms,
                tenants,
                system_tokens: self.system_tokens,
                user_tokens: self.user_tokens,
                max_tokens: self.max_tokens.max(1),
                tokenless_fraction: self.tokenless_fraction,
                profiles: self.profiles.clone(),
                seed: self.seed,
                hot_tenant_factor: self.hot_tenant_factor.max(1),
                ..Workload::default()
            },
            target,
            api_keys: self.api_keys.clone(),
            stream: !self.no_stream,
            block_tokens: self.block_tokens,
            capacity_bound_tokens: self.capacity_bound_tokens,
            bound_replicas: self.bound_replicas,
        })
    }

    fn facts(&self) -> anyhow::Result<FleetFacts> {
        let mut regions = BTreeMap::new();
        for pair in &self.regions {
            let Some((id, region)) = pair
                .split_once('=')
                .filter(|(i, r)| !i.is_empty() && !r.is_empty())
            else {
                bail!("--region {pair:?}: want ID=REGION");
            };
            if let Some(old) = regions.insert(id.to_owned(), region.to_owned()) {
                if old != region {
                    bail!("--region: replica {id} is in both {old} and {region}");
                }
            }
        }
        Ok(FleetFacts {
            regions,
            ..FleetFacts::default()
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, facts) = match cli.config().and_then(|c| Ok((c, cli.facts()?))) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = (!cli.quiet && !cli.json).then(|| {
        let bar = ProgressBar::new(config.workload.total_turns() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests  {elapsed_precise} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let report = match tether_loadgen::run_with(config, facts, progress).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("loadgen: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    if report.overall.errors > 0 {
        eprintln!("loadgen: {} requests failed", report.overall.errors);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from([&["loadgen"], args].concat()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_target_is_a_proxy_and_several_are_a_tier() {
        let one = cli(&["--target", "http://a:1"]).config().unwrap();
        assert!(matches!(one.target, Target::Proxy(u) if u == "http://a:1"));
        for args in [
            &["--target", "http://a:1,http://b:2"][..],
            &["--target", "http://a:1", "--target", "http://b:2"],
        ] {
            let tier = cli(args).config().unwrap();
            assert!(
                matches!(&tier.target, Target::Tier(urls, EdgeChoice::Sticky) if urls.len() == 2),
                "{:?}",
                tier.target
            );
        }
        let random = cli(&[
            "--target",
            "http://a:1,http://b:2",
            "--edge-choice",
            "random",
        ]);
        assert!(matches!(
            random.config().unwrap().target,
            Target::Tier(_, EdgeChoice::Random)
        ));
        assert!(Cli::try_parse_from(["loadgen", "--target", "u", "--replicas", "r"]).is_err());
    }

    #[test]
    fn regions_parse_and_contradictions_are_refused() {
        let facts = cli(&[
            "--target",
            "u",
            "--region",
            "a-1=a,a-2=a",
            "--region",
            "b-1=b",
        ])
        .facts()
        .unwrap();
        assert_eq!(facts.regions.len(), 3);
        assert_eq!(facts.regions["a-2"], "a");
        for bad in ["a-1", "=a", "a-1=", "a-1=a,a-1=b"] {
            let err = cli(&["--target", "u", "--region", bad]).facts();
            assert!(err.is_err(), "{bad}");
        }
        assert!(cli(&["--target", "u", "--region", "a-1=a,a-1=a"])
            .facts()
            .is_ok());
    }
}
