//! Hostile upstreams: garbage, a 100 MB body, a stream that never ends. Tether's memory stays
//! bounded and each request still gets its usage record, with usage unknown.

use futures_util::StreamExt;
use serde_json::{json, Value};
use tether_e2e::{regions_yaml, SimFleet, TempDir, Tether, TetherConfig, READY_TIMEOUT};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_huge_and_endless_bodies_keep_memory_bounded_and_are_logged_as_unknown() {
    let fleet = SimFleet::start(&["h-1"]).unwrap();
    let logs = TempDir::new("tether-hostile").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("r", vec![("h-1".into(), fleet.addr("h-1"), "")])]),
            log_path.display()
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let chat = |stream: bool| {
        client
            .post(tether.url("/v1/chat/completions"))
            .json(&json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
    };
    let fault = |f: Value| {
        let url = fleet.admin_url("/replicas/h-1/fault");
        let client = client.clone();
        async move {
            assert!(client
                .post(url)
                .json(&f)
                .send()
                .await
                .unwrap()
                .status()
                .is_success());
        }
    };
    let pid = tether.process.pid();
    // Warm up so the baseline includes connection pools and buffers.
    assert_eq!(chat(false).send().await.unwrap().status(), 200);
    let baseline = rss_kib(pid);

    fault(json!({"kind": "garbage"})).await;
    let res = chat(false).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.bytes().await.unwrap().len(),
        65_536,
        "garbage is relayed untouched"
    );

    fault(json!({"kind": "huge", "bytes": 100_000_000u64})).await;
    let res = chat(false).send().await.unwrap();
    let mut received = 0usize;
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        received += chunk.unwrap().len();
    }
    assert!(
        received > 100_000_000,
        "the whole 100 MB body arrives ({received})"
    );
    let after_huge = rss_kib(pid);

    fault(json!({"kind": "endless"})).await;
    let res = chat(true).send().await.unwrap();
    let mut stream = res.bytes_stream();
    // Fifty frames of the stream, then the client gives up.
    let mut frames = 0;
    while frames < 50 {
        let chunk = tokio::time::timeout(READY_TIMEOUT, stream.next())
            .await
            .expect("the endless stream keeps coming")
            .expect("the endless stream never ends")
            .unwrap();
        frames += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    drop(stream);
    let after_endless = rss_kib(pid);

    for (what, rss) in [
        ("100 MB body", after_huge),
        ("endless stream", after_endless),
    ] {
        assert!(
            rss < baseline + 32 * 1024,
            "{what}: tether grew from {baseline} KiB to {rss} KiB"
        );
    }

    fault(json!({"kind": "none"})).await;
    assert!(tether.terminate().unwrap());
    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = records
        .iter()
        .map(|r| r["usage_status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["found", "malformed", "too_large", "incomplete"],
        "{records:#?}"
    );
    for r in &records[1..] {
        assert!(
            r["prompt_tokens"].is_null() && r["cached_tokens"].is_null(),
            "{r}"
        );
        assert!(
            r["cost_micro_usd"].is_null(),
            "unknown usage is never priced as 0: {r}"
        );
    }
}
