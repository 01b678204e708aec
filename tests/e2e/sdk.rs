//! The official Python SDKs (`openai`, `anthropic`) against Tether, used the way applications
//! use them: the scripts in `tests/sdk/` make the calls and print what the client saw as JSON;
//! these tests assert on it and on the usage log.
//!
//! `make deps` installs the SDKs into the virtualenv `target/sdk-venv`;
//! `TETHER_SDK_PYTHON` names another interpreter that has them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tether_e2e::{api_key_sha256, regions_yaml, SimFleet, TempDir, Tether, TetherConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OPENAI_KEY: &str = "sk-sdk-openai";
const ANTHROPIC_KEY: &str = "sk-sdk-anthropic";

/// The interpreter of the SDKs' virtualenv.
fn sdk_python() -> PathBuf {
    let python = std::env::var_os("TETHER_SDK_PYTHON").map_or_else(
        || workspace().join("target/sdk-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: run `make deps`, which installs the openai and anthropic SDKs into \
         target/sdk-venv (or point TETHER_SDK_PYTHON at a python that has them)",
        python.display()
    );
    python
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives in the workspace's tests/")
}

/// Runs `tests/sdk/<script>` with the SDKs' python and returns the JSON it printed.
async fn run_sdk(script: &str, base_url: String, api_key: &str, scenarios: &[&str]) -> Value {
    run_sdk_over(script, base_url, api_key, &[], scenarios).await
}

/// [`run_sdk`] with transport options (`--ca-file PEM`, `--http2`).
pub(crate) async fn run_sdk_over(
    script: &str,
    base_url: String,
    api_key: &str,
    transport: &[&str],
    scenarios: &[&str],
) -> Value {
    let mut cmd = Command::new(sdk_python());
    cmd.arg(workspace().join("tests/sdk").join(script))
        .args(["--base-url", &base_url, "--api-key", api_key])
        .args(transport)
        .args(scenarios);
    // Only the arguments decide where the client goes and what it sends: not a proxy, nor the
    // SDKs' own OPENAI_* / ANTHROPIC_* variables (ANTHROPIC_AUTH_TOKEN would add a bearer).
    for (name, _) in std::env::vars_os() {
        let upper = name.to_string_lossy().to_ascii_uppercase();
        if ["OPENAI_", "ANTHROPIC_"]
            .iter()
            .any(|p| upper.starts_with(p))
            || upper.ends_with("_PROXY")
        {
            cmd.env_remove(name);
        }
    }
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the SDK script's thread")
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let hint = if stderr.contains("ModuleNotFoundError") {
        "\nthe SDKs are missing from that python: run `make deps`"
    } else {
        ""
    };
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stderr}{stdout}{hint}",
        out.status
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{shown} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// Tether with two tenants (so every request needs a key) and a usage log, in front of a
/// fleet.
struct Stage {
    tether: Tether,
    log: PathBuf,
    _logs: TempDir,
    fleet: Option<SimFleet>,
}

impl Stage {
    /// Two simulated replicas in one region.
    fn start() -> Stage {
        let fleet =
            SimFleet::start_with(&["a-1", "a-2"], &["--deterministic", "--time-scale", "0"])
                .unwrap();
        let replicas = ["a-1", "a-2"].map(|id| (id.to_owned(), fleet.addr(id), ""));
        let mut stage = Stage::in_front_of(&regions_yaml(&[("a", replicas.into())]));
        stage.fleet = Some(fleet);
        stage
    }

    /// `regions` (YAML), whose region `a` is the local one.
    fn in_front_of(regions: &str) -> Stage {
        let logs = TempDir::new("tether-sdk").unwrap();
        let log = logs.path().join("usage.jsonl");
        let tether = Tether::start(&TetherConfig {
            body: format!(
                "local_region: a\n{regions}tenants:\n  - {{ id: acme, api_key_sha256: \"{}\" }}\n  - {{ id: globex, api_key_sha256: \"{}\" }}\n\
                 usage_log: {{ path: \"{}\" }}\n",
                api_key_sha256(OPENAI_KEY),
                api_key_sha256(ANTHROPIC_KEY),
                log.display(),
            ),
        })
        .unwrap();
        Stage {
            tether,
            log,
            _logs: logs,
            fleet: None,
        }
    }

    /// The OpenAI SDK's base URL (it appends `/chat/completions`).
    fn openai_url(&self) -> String {
        self.tether.url("/v1")
    }

    /// The Anthropic SDK's base URL (it appends `/v1/messages`).
    fn anthropic_url(&self) -> String {
        self.tether.url("")
    }

    /// Stops Tether, which flushes the usage log, and returns the log's records.
    fn finish(&mut self) -> Vec<Value> {
        assert!(self.tether.terminate().unwrap(), "tether exits cleanly");
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The one record of a request for `model` (each scenario names its own model).
fn record_of<'a>(records: &'a [Value], model: &str) -> &'a Value {
    let mut found = records.iter().filter(|r| r["model"] == model);
    let record = found
        .next()
        .unwrap_or_else(|| panic!("no usage record of {model}: {records:?}"));
    assert!(found.next().is_none(), "{model} was metered twice");
    record
}

/// Asserts that `record` metered `tenant` and exactly these token counts.
fn assert_metered(record: &Value, tenant: &str, [prompt, cached, completion]: [&Value; 3]) {
    assert_eq!(record["tenant"], tenant, "{record}");
    assert_eq!(record["usage_status"], "found", "{record}");
    assert_eq!(&record["prompt_tokens"], prompt, "{record}");
    assert_eq!(&record["cached_tokens"], cached, "{record}");
    assert_eq!(&record["completion_tokens"], completion, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_keeps_a_conversation_warm_on_one_replica() {
    let mut stage = Stage::start();
    let seen = run_sdk(
        "openai_client.py",
        stage.openai_url(),
        OPENAI_KEY,
        &["turns"],
    )
    .await;
    let [first, second] = [&seen["turns"][0], &seen["turns"][1]];

    for turn in [first, second] {
        assert_eq!(turn["status"], 200, "{turn}");
        assert_eq!(
            turn["sent_authorization"], true,
            "the SDK sends a bearer key: {turn}"
        );
        assert_eq!(turn["finish_reason"], "length", "{turn}");
        assert!(
            turn["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
            "{turn}"
        );
        assert_eq!(turn["usage"]["completion_tokens"], 8, "{turn}");
    }
    assert_eq!(first["affinity"], "new", "{first}");
    assert_eq!(second["affinity"], "warm", "{second}");
    assert!(first["replica"].is_string(), "{first}");
    assert_eq!(second["replica"], first["replica"], "the session stayed");
    let cached = &second["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert!(
        cached.as_u64().unwrap() > 0,
        "the second turn hit the first one's cache: {second}"
    );

    let records = stage.finish();
    let records: Vec<&Value> = records
        .iter()
        .filter(|r| r["model"] == "sdk-turns")
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    for (record, turn) in records.into_iter().zip([first, second]) {
        let usage = &turn["usage"];
        assert_metered(
            record,
            "acme",
            [
                &usage["prompt_tokens"],
                &usage["prompt_tokens_details"]["cached_tokens"],
                &usage["completion_tokens"],
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdks_prompt_cache_key_or_an_agent_header_alone_keeps_a_conversation_warm() {
    let mut stage = Stage::start();
    let seen = run_sdk(
        "openai_client.py",
        stage.openai_url(),
        OPENAI_KEY,
        &["session-ids"],
    )
    .await;
    let ways = [
        ("prompt_cache_key", "sdk-ids-pck"),
        ("agent_header", "sdk-ids-agent"),
        ("header", "sdk-ids-header"),
    ];
    for (way, _) in ways {
        let [first, second] = [&seen["session-ids"][way][0], &seen["session-ids"][way][1]];
        assert_eq!(first["status"], 200, "{way}: {first}");
        assert_eq!(first["affinity"], "new", "{way}: {first}");
        assert_eq!(second["affinity"], "warm", "{way}: {second}");
        assert_eq!(
            second["replica"], first["replica"],
            "{way}: the session stayed"
        );
    }
    let records = stage.finish();
    for (way, model) in ways {
        let of_model: Vec<&Value> = records.iter().filter(|r| r["model"] == model).collect();
        assert_eq!(of_model.len(), 2, "{records:?}");
        for record in of_model {
            assert_eq!(record["key_source"], way, "{record}");
            assert!(record["session"].is_string(), "{record}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_sdk_stream_without_stream_options_sees_no_usage_chunk_yet_is_metered() {
    let mut stage = Stage::start();
    let seen = run_sdk(
        "openai_client.py",
        stage.openai_url(),
        OPENAI_KEY,
        &["stream"],
    )
    .await;
    let stream = &seen["stream"];

    assert_eq!(
        stream["finish_reason"], "length",
        "the stream completed: {stream}"
    );
    assert!(!stream["text"].as_str().unwrap().is_empty(), "{stream}");
    assert_eq!(
        stream["usage_chunks"], 0,
        "the usage Tether asked for on the client's behalf stayed with Tether: {stream}"
    );
    assert_eq!(stream["empty_chunks"], 0, "{stream}");

    let records = stage.finish();
    let record = record_of(&records, "sdk-stream");
    assert_eq!(record["tenant"], "acme", "{record}");
    assert_eq!(record["usage_status"], "found", "{record}");
    assert!(record["prompt_tokens"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(record["completion_tokens"], 6, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdks_prompt_cache_key_reaches_the_replica_and_its_api_key_does_not() {
    let replica = Recorder::start().await;
    let mut stage = Stage::in_front_of(&regions_yaml(&[(
        "a",
        vec![("rec-1".into(), replica.addr, "")],
    )]));
    let seen = run_sdk(
        "openai_client.py",
        stage.openai_url(),
        OPENAI_KEY,
        &["prompt-cache-key"],
    )
    .await;
    assert_eq!(seen["prompt-cache-key"]["content"], "recorded", "{seen}");

    let requests = replica.requests_to("/v1/chat/completions");
    assert_eq!(requests.len(), 1, "{requests:?}");
    let (head, body) = &requests[0];
    assert_eq!(body["prompt_cache_key"], "sdk-prompt-cache-key", "{body}");
    for header in ["\nauthorization:", "\nx-api-key:"] {
        assert!(
            !head.contains(header),
            "the key reached the replica: {head}"
        );
    }
    let records = stage.finish();
    let usage = &seen["prompt-cache-key"]["usage"];
    assert_metered(
        record_of(&records, "sdk-cache-key"),
        "acme",
        [
            &usage["prompt_tokens"],
            &Value::Null,
            &usage["completion_tokens"],
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_is_served_with_its_x_api_key_in_json_and_in_streams() {
    let mut stage = Stage::start();
    let seen = run_sdk(
        "anthropic_client.py",
        stage.anthropic_url(),
        ANTHROPIC_KEY,
        &["message", "stream-helper", "stream-events"],
    )
    .await;

    let message = &seen["message"];
    assert_eq!(message["status"], 200, "{message}");
    // anthropic 1.x sends `api_key` as x-api-key; 2.x as a bearer (tests/sdk/requirements.txt).
    let header = (&message["sent_x_api_key"], &message["sent_authorization"]);
    assert_eq!(header, (&json!(true), &json!(false)), "{message}");
    assert_eq!(message["affinity"], "new", "{message}");
    assert!(message["replica"].is_string(), "{message}");
    assert_eq!(message["stop_reason"], "max_tokens", "{message}");
    assert!(!message["text"].as_str().unwrap().is_empty(), "{message}");

    let helper = &seen["stream-helper"];
    assert_eq!(helper["stop_reason"], "max_tokens", "{helper}");
    assert!(!helper["text"].as_str().unwrap().is_empty(), "{helper}");

    let events = &seen["stream-events"];
    assert_eq!(
        events["events"],
        json!([
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]),
        "{events}"
    );

    // Each is metered for the tenant of the key the SDK sent, exactly as the client saw it.
    let records = stage.finish();
    for (model, usage) in [
        ("sdk-anthropic-json", &message["usage"]),
        ("sdk-anthropic-stream", &helper["usage"]),
        ("sdk-anthropic-events", &events["usage"]),
    ] {
        assert_eq!(usage["output_tokens"], 6, "{model}: {usage}");
        let count = |field: &str| usage[field].as_u64().unwrap_or(0);
        let prompt = count("input_tokens")
            + count("cache_creation_input_tokens")
            + count("cache_read_input_tokens");
        assert_metered(
            record_of(&records, model),
            "globex",
            [
                &json!(prompt),
                &usage["cache_read_input_tokens"],
                &usage["output_tokens"],
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_x_api_key_request_to_v1_messages_is_served_for_the_keys_tenant() {
    let mut stage = Stage::start();
    let res = reqwest::Client::new()
        .post(stage.tether.url("/v1/messages"))
        .header("x-api-key", ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "raw-x-api-key", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-replica-id"));
    assert_eq!(res.headers()["x-session-affinity-status"], "none");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "message", "{body}");

    let records = stage.finish();
    let usage = &body["usage"];
    assert_metered(
        record_of(&records, "raw-x-api-key"),
        "globex",
        [
            &json!(
                usage["input_tokens"].as_u64().unwrap()
                    + usage["cache_creation_input_tokens"].as_u64().unwrap()
                    + usage["cache_read_input_tokens"].as_u64().unwrap()
            ),
            &usage["cache_read_input_tokens"],
            &usage["output_tokens"],
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_raises_each_sdks_authentication_error() {
    let stage = Stage::start();
    let (openai, anthropic) = tokio::join!(
        run_sdk(
            "openai_client.py",
            stage.openai_url(),
            "sk-wrong",
            &["rejected"]
        ),
        run_sdk(
            "anthropic_client.py",
            stage.anthropic_url(),
            "sk-wrong",
            &["rejected"]
        ),
    );
    let openai = &openai["rejected"];
    assert_eq!(openai["error"], "AuthenticationError", "{openai}");
    assert_eq!(openai["status"], 401, "{openai}");
    assert_eq!(openai["code"], "invalid_api_key", "{openai}");
    let anthropic = &anthropic["rejected"];
    assert_eq!(anthropic["error"], "AuthenticationError", "{anthropic}");
    assert_eq!(anthropic["status"], 401, "{anthropic}");
    assert_eq!(
        anthropic["body"]["error"]["code"], "invalid_api_key",
        "{anthropic}"
    );

    let fleet = stage.fleet.as_ref().expect("Stage::start has a fleet");
    let truth = fleet.state().await;
    for replica in truth["replicas"].as_array().unwrap() {
        assert_eq!(
            replica["stats"]["requests"], 0,
            "a rejected request got through: {replica}"
        );
    }
}

/// A replica that records every request it gets and answers each with the same chat
/// completion, so a test can see exactly what Tether forwarded.
pub(crate) struct Recorder {
    pub(crate) addr: SocketAddr,
    seen: Requests,
}

/// The head (lowercased) and body of each request a [`Recorder`] received.
type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What the [`Recorder`] answers: a chat completion of 12 prompt tokens and 1 completion token.
fn recorded_completion() -> String {
    json!({
        "id": "chatcmpl-recorded", "object": "chat.completion", "created": 0, "model": "sdk-cache-key",
        "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "recorded"},
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    })
    .to_string()
}

impl Recorder {
    /// Listens on a loopback port; the accept loop ends with the test's runtime.
    pub(crate) async fn start() -> Recorder {
        Recorder::start_as("rec-1").await
    }

    /// A recorder that names itself `id` in its answers' `x-replica-id`.
    pub(crate) async fn start_as(id: &'static str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Requests::default();
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(record_and_answer(conn, Arc::clone(&log), id));
            }
        });
        Recorder { addr, seen }
    }

    /// The head (first line) and raw body of every request received, in order.
    pub(crate) fn requests(&self) -> Vec<(String, Vec<u8>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(head, body)| {
                (
                    head.lines().next().unwrap_or_default().to_owned(),
                    body.clone(),
                )
            })
            .collect()
    }

    /// Head and JSON body of each `POST path` received.
    fn requests_to(&self, path: &str) -> Vec<(String, Value)> {
        let request_line = format!("post {path} ");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(head, _)| head.starts_with(&request_line))
            .map(|(head, body)| (head.clone(), serde_json::from_slice(body).unwrap()))
            .collect()
    }
}

/// Reads one request (head and `content-length` body), records it, answers and closes.
async fn record_and_answer(mut conn: TcpStream, seen: Requests, id: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head_len = None;
    let mut body_len = 0;
    let mut chunked = false;
    // A chunked body ends with its last chunk; a sized one at its length.
    let complete = |buf: &[u8], head_len: Option<usize>, body_len: usize, chunked: bool| {
        head_len.is_some_and(|h| {
            if chunked {
                buf[h..].ends_with(b"0\r\n\r\n")
            } else {
                buf.len() >= h + body_len
            }
        })
    };
    while !complete(&buf, head_len, body_len, chunked) {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if head_len.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                body_len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                chunked = head
                    .lines()
                    .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
                head_len = Some(end + 4);
            }
        }
    }
    let head_len = head_len.expect("the loop ends with a head");
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let body = if chunked {
        dechunk(&buf[head_len..])
    } else {
        buf[head_len..].to_vec()
    };
    seen.lock().unwrap().push((head, body));
    let body = recorded_completion();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-replica-id: {id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The payload of a complete chunked body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .expect("a chunk size line");
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}
