//! The fleet over HTTP: replicas and the admin API on real loopback listeners.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// One HTTP/1.1 request on a fresh connection; `(status, JSON body)`.
async fn call(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn shared_in(regions: &[&str]) -> SimConfig {
    SimConfig {
        time_scale: 0.0,
        shared_kv: SharedKvConfig {
            regions: regions
                .iter()
                .map(|r| r.to_string())
                .collect::<BTreeSet<_>>(),
            ..SharedKvConfig::default()
        },
        ..SimConfig::default()
    }
}

fn conversation(turns: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are terse. ".repeat(40)})];
    for t in 0..turns {
        if t > 0 {
            messages.push(json!({"role": "assistant", "content": template::reply_text(16)}));
        }
        messages.push(json!({"role": "user", "content": format!("question {t} ").repeat(30)}));
    }
    json!({"model": "m", "messages": messages, "max_tokens": 16})
}

#[tokio::test]
async fn turn_two_on_another_replica_of_a_shared_kv_region_reports_the_shared_tokens_as_cached() {
    let configs = vec![
        ReplicaConfig::new("eu-1", loopback()).in_region("eu"),
        ReplicaConfig::new("eu-2", loopback()).in_region("eu"),
        ReplicaConfig::new("us-1", loopback()).in_region("us"),
    ];
    let fleet = Fleet::start(configs, shared_in(&["eu"]), Some(loopback()))
        .await
        .unwrap();
    let addr = |id: &str| {
        fleet
            .replicas()
            .into_iter()
            .find(|(r, _)| r == id)
            .unwrap()
            .1
    };
    let admin = fleet.admin_addr().unwrap();
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();

    let path = "/v1/chat/completions";
    let (status, one) = call(addr("eu-1"), "POST", path, &conversation(1)).await;
    assert_eq!((status, cached(&one)), (200, Some(0)));
    let (_, two) = call(addr("eu-2"), "POST", path, &conversation(2)).await;
    let shared = cached(&two).unwrap();
    assert!(shared > 0, "{two}");
    // A region without a tier: another replica starts cold.
    let (_, elsewhere) = call(addr("us-1"), "POST", path, &conversation(2)).await;
    assert_eq!(cached(&elsewhere), Some(0));

    let (_, state) = call(admin, "GET", "/replicas", &json!({})).await;
    let replica = |id: &str| {
        state["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    let eu2 = replica("eu-2");
    assert_eq!(eu2["region"], "eu");
    assert_eq!(eu2["stats"]["cached_tokens"], shared);
    assert_eq!(eu2["stats"]["shared_cached_tokens"], shared);
    assert_eq!(replica("eu-1")["stats"]["shared_cached_tokens"], 0);
    let regions = state["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2, "{state}");
    assert_eq!(regions[0]["name"], "eu");
    assert_eq!(regions[0]["replicas"], json!(["eu-1", "eu-2"]));
    assert!(regions[0]["shared_kv"]["blocks"].as_u64().unwrap() > 0);
    assert_eq!(regions[0]["shared_kv"]["capacity_blocks"], 8 * 160);
    assert_eq!(regions[1]["shared_kv"], Value::Null);

    // Flushing a replica leaves the tier; flushing the region empties it.
    let (status, _) = call(admin, "POST", "/replicas/eu-2/flush", &json!({})).await;
    assert_eq!(status, 200);
    let (_, again) = call(addr("eu-2"), "POST", path, &conversation(2)).await;
    // Now the tier also holds turn 2 as eu-2 wrote it through: all but its last block.
    let again = cached(&again).unwrap();
    assert!(again > shared);
    let (_, state) = call(admin, "GET", "/replicas", &json!({})).await;
    let eu2 = &state["replicas"][1]["stats"];
    assert_eq!(eu2["shared_cached_tokens"], shared + again, "{state}");
    let (status, _) = call(admin, "POST", "/regions/eu/flush", &json!({})).await;
    assert_eq!(status, 200);
    call(admin, "POST", "/replicas/eu-2/flush", &json!({})).await;
    let (_, cold) = call(addr("eu-2"), "POST", path, &conversation(2)).await;
    assert_eq!(cached(&cold), Some(0));
    let (status, _) = call(admin, "POST", "/regions/us/flush", &json!({})).await;
    assert_eq!(status, 404, "us has no shared tier");
    fleet.stop();
}

#[tokio::test]
async fn a_shared_tier_for_a_region_without_replicas_is_an_error() {
    let configs = vec![ReplicaConfig::new("eu-1", loopback()).in_region("eu")];
    let err = Fleet::start(configs, shared_in(&["eu", "ue", "ap"]), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "shared KV tier for regions without replicas: ap, ue"
    );
}

/// `GET path` on a fresh connection: `(status, body)`.
async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: sim\r\nconnection: close\r\n\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn each_mode_serves_its_engine_endpoints_and_counts_them_as_probes() {
    let start = |engine| async move {
        let sim = SimConfig {
            engine,
            slots: 3,
            cache_tokens: 3 * 1024,
            time_scale: 0.0,
            ..SimConfig::default()
        };
        let fleet = Fleet::start(vec![ReplicaConfig::new("r", loopback())], sim, None)
            .await
            .unwrap();
        let addr = fleet.replicas()[0].1;
        (fleet, addr)
    };

    let (fleet, addr) = start(EngineMode::Llamacpp).await;
    let (status, body) = get_text(addr, "/slots").await;
    assert_eq!(status, 200);
    let slots: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 3);
    assert_eq!(slots[2]["id"], 2);
    assert_eq!(slots[0]["is_processing"], false);
    assert_eq!(slots[0]["n_ctx"], 1024);
    let (_, props) = get_text(addr, "/props").await;
    assert_eq!(
        serde_json::from_str::<Value>(&props).unwrap()["total_slots"],
        3
    );
    let (status, metrics) = get_text(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nllamacpp:requests_processing 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nllamacpp:requests_deferred 0\n"),
        "{metrics}"
    );
    assert_eq!(
        fleet.replica("r").unwrap().engine_snapshot().probe_requests,
        3
    );
    fleet.stop();

    let (fleet, addr) = start(EngineMode::Vllm).await;
    assert_eq!(get_text(addr, "/slots").await.0, 404);
    let (status, metrics) = get_text(addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "num_gpu_blocks=\"192\"",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    fleet.stop();

    let (fleet, addr) = start(EngineMode::Basic).await;
    assert_eq!(get_text(addr, "/metrics").await.0, 404);
    fleet.stop();
}
