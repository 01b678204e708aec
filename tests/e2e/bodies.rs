//! Request bodies stay within `request_bodies`: large chunked uploads that stall stream on to
//! the replica as they arrive (Tether holds none of them), small ones read ahead hold no more
//! than their tenant's share of the memory budget (the rest stream on), another tenant's
//! requests go on meanwhile, and every stalled upload is answered 408 at the deadline.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tether_e2e::{api_key_sha256, SimFleet, Tether, TetherConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STALLED_UPLOADS: usize = 12;
/// What each large stalled upload sends before it stops: under the replica's own body limit.
const UPLOAD_BYTES: usize = 3 << 20;
/// The `Content-Length` of each small stalled upload (read ahead when the budget allows).
const SMALL_LENGTH: usize = 60 << 10;
const MEMORY_MIB: usize = 1;
/// The loud tenant's share: room for 8 small bodies, not 9.
const SHARE: usize = (MEMORY_MIB << 20) / 2;
const DEADLINE: Duration = Duration::from_secs(3);

/// The value of one Prometheus series (0 when absent).
fn series(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Tether's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc readable");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

/// Starts a chunked streaming chat upload of `UPLOAD_BYTES` that never ends; returns the
/// connection, to read the answer from. It names its session in the header, so nothing of
/// it is read ahead (a tokenless one would have a prefix read for `prompt_cache_key`).
async fn stalled_upload(tether: &Tether, key: &str) -> TcpStream {
    let mut conn = TcpStream::connect(tether.addr).await.expect("connects");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         X-Session-Affinity: upload\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("header sent");
    let open = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":""#;
    let mut chunk = format!("{:x}\r\n", open.len()).into_bytes();
    chunk.extend_from_slice(open);
    chunk.extend_from_slice(b"\r\n");
    conn.write_all(&chunk).await.expect("body sent");
    let piece = vec![b'a'; 64 << 10];
    for _ in 0..UPLOAD_BYTES / piece.len() {
        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
        chunk.extend_from_slice(&piece);
        chunk.extend_from_slice(b"\r\n");
        conn.write_all(&chunk).await.expect("body sent");
    }
    conn
}

/// Starts a streaming chat upload with a `Content-Length` of `SMALL_LENGTH` that sends half
/// of it and stops.
async fn stalled_small_upload(tether: &Tether, key: &str) -> TcpStream {
    let mut conn = TcpStream::connect(tether.addr).await.expect("connects");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {SMALL_LENGTH}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("header sent");
    let mut body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":""#.to_vec();
    body.resize(SMALL_LENGTH / 2, b'a');
    conn.write_all(&body).await.expect("body sent");
    conn
}

/// The status line of the answer on `conn` (read until the server closes or 10 s pass).
async fn status_line(mut conn: TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 10 s");
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_stay_within_the_budget_and_end_at_the_deadline() {
    let fleet = SimFleet::start(&["r-1", "r-2"]).unwrap();
    let config = TetherConfig {
        body: format!(
            "local_region: r\nhealth:\n  probe: {{ enabled: false }}\n{}tenants:\n  - {{ id: loud, api_key_sha256: \"{}\" }}\n  - {{ id: quiet, api_key_sha256: \"{}\" }}\nrequest_bodies: {{ memory_mib: {MEMORY_MIB}, tenant_share: 0.5, deadline: {}s }}\n",
            fleet.regions_by_prefix(&["r"]),
            api_key_sha256("sk-loud"),
            api_key_sha256("sk-quiet"),
            DEADLINE.as_secs(),
        ),
    };
    let tether = Tether::start(&config).unwrap();
    let rss_before = rss_bytes(tether.process.pid());
    let started = Instant::now();
    let mut uploads =
        join_all((0..STALLED_UPLOADS).map(|_| stalled_upload(&tether, "sk-loud"))).await;
    uploads.extend(
        join_all((0..STALLED_UPLOADS).map(|_| stalled_small_upload(&tether, "sk-loud"))).await,
    );
    let sent = started.elapsed();
    assert!(
        sent < DEADLINE,
        "the uploads took {sent:?}, too long to test the deadline"
    );

    // While they stall: the small bodies read ahead fill the loud tenant's share, and those
    // that did not fit stream on; the large ones hold nothing.
    let fit = SHARE / SMALL_LENGTH;
    let refused = (STALLED_UPLOADS - fit) as u64;
    let over_series = "tether_request_body_over_budget_total{limit=\"tenant\",tenant=\"loud\"}";
    let mut metrics = tether.metrics().await;
    while series(&metrics, over_series) < refused && started.elapsed() < DEADLINE / 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = tether.metrics().await;
    }
    assert_eq!(series(&metrics, over_series), refused, "{metrics}");
    assert_eq!(
        series(&metrics, "tether_request_body_bytes"),
        (fit * SMALL_LENGTH) as u64
    );
    let grown = rss_bytes(tether.process.pid()).saturating_sub(rss_before);
    let sent_total = (STALLED_UPLOADS * UPLOAD_BYTES) as u64;
    // Collecting every large upload whole would hold all of `sent_total` at once (the process
    // then grew by nearly three times that: buffers double as they grow, and the allocator
    // keeps what was freed). Streamed, it grows by well under what passed through: a loose
    // bound, the budget gauge above being the exact one.
    assert!(
        grown < sent_total,
        "RSS grew by {} MiB while {} MiB were uploaded",
        grown >> 20,
        sent_total >> 20
    );

    // The quiet tenant's requests go on: a small one, read ahead within what the budget has
    // left, and a small chunked one, read ahead whole within it too.
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let chat = serde_json::json!({"model": "m", "stream": true, "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}]});
    let small = client
        .post(&url)
        .bearer_auth("sk-quiet")
        .json(&chat)
        .send()
        .await
        .expect("tether answers");
    assert_eq!(small.status(), 200);
    assert!(small.text().await.unwrap().contains("[DONE]"));
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(chat.to_string().into_bytes())];
    let chunked = client
        .post(&url)
        .bearer_auth("sk-quiet")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .expect("tether answers");
    assert_eq!(chunked.status(), 200);
    let text = chunked.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        started.elapsed() < DEADLINE,
        "the quiet requests were not served in time"
    );

    // The stalled uploads end at the deadline, answered 408, and their bytes are given back.
    let answers = join_all(uploads.into_iter().map(status_line)).await;
    let ended = started.elapsed();
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answers:?}");
    }
    assert!(
        ended >= DEADLINE && ended < DEADLINE + Duration::from_secs(3),
        "ended after {ended:?}"
    );
    let metrics = tether.metrics().await;
    assert_eq!(series(&metrics, "tether_request_body_bytes"), 0);
    assert_eq!(
        series(
            &metrics,
            "tether_request_body_timeouts_total{tenant=\"loud\"}"
        ),
        2 * STALLED_UPLOADS as u64
    );
}
