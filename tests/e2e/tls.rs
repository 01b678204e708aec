//! TLS on both sides: clients reach Tether over HTTPS (HTTP/2 or HTTP/1.1, chosen by ALPN),
//! Tether reaches replicas over HTTPS (checked against a CA, with a client certificate when the
//! replica asks for one). Every certificate is made at run time by a test CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tether_e2e::tls::{client_config, connect, https_client, served_certificate, PemFiles, TestCa};
use tether_e2e::{free_port, SimFleet, TempDir, Tether, TetherConfig, READY_TIMEOUT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Replicas serving HTTPS with certificates of `ca` for 127.0.0.1; `client_ca` makes them ask
/// for client certificates.
fn tls_fleet(ids: &[&str], files: &PemFiles, client_ca: Option<&Path>) -> SimFleet {
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let mut args = vec![
        "--deterministic",
        "--time-scale",
        "0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let client_ca = client_ca.map(|p| p.display().to_string());
    if let Some(ca) = &client_ca {
        args.extend(["--tls-client-ca", ca]);
    }
    SimFleet::start_with(ids, &args).unwrap()
}

/// `regions:` with one region `r` of `fleet`'s replicas, reached with the `tls` YAML given.
fn tls_regions(fleet: &SimFleet, tls: &str) -> String {
    let mut out = format!("regions:\n  - name: r\n    tls: {tls}\n    replicas:\n");
    for (id, addr) in &fleet.replicas {
        out.push_str(&format!("      - {{ id: {id}, address: \"{addr}\" }}\n"));
    }
    out
}

/// The config body of a Tether with an HTTPS listener on `https`.
fn body(
    https: SocketAddr,
    cert: &PemFiles,
    sni: &[&PemFiles],
    regions: &str,
    log: &Path,
) -> String {
    let mut listener = format!(
        "listen_tls:\n  - address: \"{https}\"\n    cert: \"{}\"\n    key: \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    );
    if !sni.is_empty() {
        listener.push_str("    sni:\n");
        for c in sni {
            listener.push_str(&format!(
                "      - {{ cert: \"{}\", key: \"{}\" }}\n",
                c.cert.display(),
                c.key.display()
            ));
        }
    }
    format!(
        "{listener}local_region: r\n{regions}usage_log: {{ path: \"{}\" }}\nhealth: {{ probe: {{ interval: 200ms, timeout: 100ms }} }}\n",
        log.display()
    )
}

fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn record_of<'a>(records: &'a [Value], model: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["model"] == model)
        .unwrap_or_else(|| panic!("no usage record of {model}: {records:?}"))
}

/// A streamed chat completion that did not ask for usage; returns the HTTP version and the
/// body.
async fn stream(client: &reqwest::Client, url: &str, model: &str) -> (reqwest::Version, String) {
    let res = client
        .post(url)
        .header("x-session-affinity", format!("tls-{model}"))
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "stream over TLS"}],
            "max_tokens": 6,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let version = res.version();
    let mut body = Vec::new();
    let mut chunks = res.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    (version, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http1_over_tls_reach_tls_replicas_and_are_metered() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let ca_file = ca.write(dir.path(), "ca.crt").unwrap();
    let replica = ca
        .server(dir.path(), "replica", "replica", &["127.0.0.1"])
        .unwrap();
    let edge = ca
        .server(dir.path(), "edge", "edge", &["localhost", "127.0.0.1"])
        .unwrap();
    let fleet = tls_fleet(&["s-1", "s-2"], &replica, None);
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("usage.jsonl");
    let regions = tls_regions(&fleet, &format!("{{ ca_file: \"{}\" }}", ca_file.display()));
    let mut tether = Tether::start(&TetherConfig {
        body: body(https, &edge, &[], &regions, &log),
    })
    .unwrap();
    wait_listening(https).await;
    let url = format!("https://localhost:{}/v1/chat/completions", https.port());

    let h2 = https_client(&ca, true).unwrap();
    let (version, sse) = stream(&h2, &url, "tls-h2").await;
    assert_eq!(version, reqwest::Version::HTTP_2, "ALPN chose h2");
    assert!(sse.contains("\"content\""), "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    assert!(
        !sse.contains("\"usage\":{"),
        "the usage event Tether asked for stays hidden: {sse}"
    );

    let h1 = https_client(&ca, false).unwrap();
    let (version, sse) = stream(&h1, &url, "tls-h1").await;
    assert_eq!(version, reqwest::Version::HTTP_11);
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");

    // A plain JSON answer over h2 too, and the plain listener still serves.
    let res = h2
        .post(&url)
        .json(&json!({"model": "tls-h2-json", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    let plain = reqwest::get(tether.url("/v1/models")).await.unwrap();
    assert_eq!(plain.status(), 200);

    // Tether's own answers (here a 400 for a token over the length limit) go out over h2 too,
    // and the connection stays usable.
    let res = h2
        .post(&url)
        .header("x-session-affinity", "t".repeat(200))
        .json(&json!({"model": "tls-refused", "messages": [], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 400);
    let refused: Value = res.json().await.unwrap();
    assert_eq!(
        refused["error"]["code"], "invalid_session_affinity",
        "{refused}"
    );
    let (version, _) = stream(&h2, &url, "tls-h2-after-400").await;
    assert_eq!(version, reqwest::Version::HTTP_2);

    assert!(tether.terminate().unwrap(), "tether exits cleanly");
    let records = records(&log);
    for (model, completion) in [
        ("tls-h2", 6),
        ("tls-h1", 6),
        ("tls-h2-json", 3),
        ("tls-h2-after-400", 6),
    ] {
        let r = record_of(&records, model);
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["usage_status"], "found", "{r}");
        assert_eq!(r["completion_tokens"], completion, "{r}");
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_over_https_with_http1_and_http2_to_tls_replicas() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let ca_file = ca.write(dir.path(), "ca.crt").unwrap();
    let replica = ca
        .server(dir.path(), "replica", "replica", &["127.0.0.1"])
        .unwrap();
    let edge = ca
        .server(dir.path(), "edge", "edge", &["localhost"])
        .unwrap();
    let fleet = tls_fleet(&["s-1", "s-2"], &replica, None);
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("usage.jsonl");
    let regions = tls_regions(&fleet, &format!("{{ ca_file: \"{}\" }}", ca_file.display()));
    let mut tether = Tether::start(&TetherConfig {
        body: body(https, &edge, &[], &regions, &log),
    })
    .unwrap();
    wait_listening(https).await;
    let base_url = format!("https://localhost:{}/v1", https.port());
    let ca_arg = ca_file.display().to_string();

    for (transport, version) in [
        (vec!["--ca-file", &ca_arg], "HTTP/1.1"),
        (vec!["--ca-file", &ca_arg, "--http2"], "HTTP/2"),
    ] {
        let seen = crate::sdk::run_sdk_over(
            "openai_client.py",
            base_url.clone(),
            "sk-unused",
            &transport,
            &["protocol"],
        )
        .await;
        let (stream, json) = (&seen["protocol"]["stream"], &seen["protocol"]["json"]);
        assert_eq!(stream["status"], 200, "{seen}");
        assert_eq!(stream["http_version"], version, "{seen}");
        assert!(stream["chunks"].as_u64().unwrap() >= 5, "{seen}");
        assert!(!stream["text"].as_str().unwrap().is_empty(), "{seen}");
        assert_eq!(json["status"], 200, "{seen}");
        assert_eq!(json["http_version"], version, "{seen}");
        assert_eq!(json["usage"]["completion_tokens"], 3, "{seen}");
    }

    assert!(tether.terminate().unwrap(), "tether exits cleanly");
    let records = records(&log);
    let metered = |model: &str| {
        records
            .iter()
            .filter(|r| r["model"] == model && r["usage_status"] == "found")
            .count()
    };
    assert_eq!(metered("sdk-protocol-stream"), 2, "{records:?}");
    assert_eq!(metered("sdk-protocol-json"), 2, "{records:?}");
}

/// `GET /v1/models` on an open HTTP/1.1 connection; returns the status.
async fn get_models<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
) -> u16 {
    stream
        .get_mut()
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut status = String::new();
    stream.read_line(&mut status).await.unwrap();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    status
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_chosen_by_server_name_and_a_renewed_one_is_served_to_new_connections_only(
) {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let first = ca
        .server(dir.path(), "edge", "edge-1", &["localhost", "127.0.0.1"])
        .unwrap();
    let other = ca
        .server(dir.path(), "other", "other", &["*.example.test"])
        .unwrap();
    let fleet = SimFleet::start(&["s-1"]).unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let regions = format!(
        "regions:\n  - name: r\n    replicas:\n      - {{ id: s-1, address: \"{}\" }}\n",
        fleet.addr("s-1")
    );
    let log = dir.path().join("usage.jsonl");
    let _tether = Tether::start(&TetherConfig {
        body: body(https, &first, &[&other], &regions, &log),
    })
    .unwrap();
    wait_listening(https).await;
    let config = client_config(&ca, &[b"http/1.1"]).unwrap();

    // By server name: the wildcard certificate for its names, the first one otherwise.
    let api = connect(config.clone(), https, "api.example.test")
        .await
        .unwrap();
    assert_eq!(served_certificate(&api).unwrap(), other.der);
    let mut old = BufReader::new(connect(config.clone(), https, "localhost").await.unwrap());
    assert_eq!(served_certificate(old.get_ref()).unwrap(), first.der);
    assert_eq!(get_models(&mut old).await, 200);

    // Renewed under the same paths: the file watch reloads it.
    let renewed = ca
        .server(dir.path(), "edge", "edge-2", &["localhost", "127.0.0.1"])
        .unwrap();
    assert_ne!(renewed.der, first.der);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let fresh = connect(config.clone(), https, "localhost").await.unwrap();
        if served_certificate(&fresh).unwrap() == renewed.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before the renewal keeps working, with the session it has.
    assert_eq!(served_certificate(old.get_ref()).unwrap(), first.der);
    assert_eq!(get_models(&mut old).await, 200);
}

const ADMIN_TOKEN: &str = "tls-test-admin-token";

/// `POST /v1/chat/completions` with a small body; returns the status and the JSON answer.
async fn chat(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let res = client
        .post(url)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_certificate_from_another_ca_is_a_502_and_mutual_tls_follows_a_reload() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let stranger = TestCa::new("some other CA").unwrap();
    let ca_file = ca.write(dir.path(), "ca.crt").unwrap();
    let client = ca.client(dir.path(), "tether-client", "tether").unwrap();
    // Signed by a CA Tether does not trust, and asking for client certificates of `ca`.
    let replica = stranger
        .server(dir.path(), "replica", "replica", &["127.0.0.1"])
        .unwrap();
    let fleet = tls_fleet(&["s-1"], &replica, Some(&ca_file));
    let log = dir.path().join("usage.jsonl");
    // No probes (they would take the replica out before the request shows the failure); no
    // file watch: each reload is the admin API's, applied when it answers.
    let body = |fleet: &SimFleet, extra: &str| {
        format!(
            "local_region: r\n{}usage_log: {{ path: \"{}\" }}\nhealth: {{ probe: {{ enabled: false }} }}\n\
             admin: {{ token: \"{ADMIN_TOKEN}\" }}\nreload: {{ watch: false }}\n",
            tls_regions(
                fleet,
                &format!("{{ ca_file: \"{}\"{extra} }}", ca_file.display())
            ),
            log.display()
        )
    };
    let tether = Tether::start(&TetherConfig {
        body: body(&fleet, ""),
    })
    .unwrap();
    let http = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");

    let (status, answer) = chat(&http, &url).await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["error"]["code"], "upstream_error", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TLSHandshakeFailure"),
        "{answer}"
    );
    assert!(!tether_exited(&tether), "a failed handshake is no crash");

    // Now a replica `ca` signed, still asking for a client certificate Tether does not have.
    drop(fleet);
    let replica = ca
        .server(dir.path(), "replica", "replica", &["127.0.0.1"])
        .unwrap();
    let fleet = tls_fleet(&["s-1"], &replica, Some(&ca_file));
    admin_reload(&tether, &body(&fleet, "")).await;
    // TLS 1.3: the replica refuses the missing certificate after the handshake, as Tether
    // sends the request (a TLS alert, or a reset if it closed first).
    let (status, answer) = chat(&http, &url).await;
    assert!(
        status == 502 || status == 503,
        "without a client certificate: {status} {answer}"
    );

    admin_reload(
        &tether,
        &body(
            &fleet,
            &format!(
                ", client_cert: \"{}\", client_key: \"{}\"",
                client.cert.display(),
                client.key.display()
            ),
        ),
    )
    .await;
    let (status, answer) = chat(&http, &url).await;
    assert_eq!(status, 200, "with one: {answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
}

fn tether_exited(tether: &Tether) -> bool {
    !PathBuf::from(format!("/proc/{}", tether.process.pid())).exists()
}

/// Runs `tether <command> -c <yaml>`; returns whether it succeeded and its stderr.
fn tether_cli(command: &str, dir: &Path, yaml: &str) -> (bool, String) {
    let path = dir.join(format!("{command}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(tether_e2e::binary("tether"))
        .args([command, "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_and_run_refuse_an_unusable_certificate_naming_its_key() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let a = ca.server(dir.path(), "a", "a", &["a.test"]).unwrap();
    let b = ca.server(dir.path(), "b", "b", &["b.test"]).unwrap();
    let [port, https] = tether_e2e::free_ports();
    let base = format!(
        "listen: 127.0.0.1:{port}\nlocal_region: r\nregions:\n  - name: r\n    replicas:\n      - {{ id: a, address: \"127.0.0.1:1\" }}\n"
    );
    let good = format!(
        "{base}listen_tls:\n  - {{ address: \"127.0.0.1:{https}\", cert: \"{}\", key: \"{}\" }}\n",
        a.cert.display(),
        a.key.display()
    );
    // Passes, with at most warnings that are not about TLS (no routing-key secret here).
    let (ok, stderr) = tether_cli("check", dir.path(), &good);
    assert!(
        ok && !stderr.contains("ERROR") && !stderr.contains("listen_tls"),
        "{stderr}"
    );

    let mismatched = good.replace(&a.key.display().to_string(), &b.key.display().to_string());
    for command in ["check", "run"] {
        let (ok, stderr) = tether_cli(command, dir.path(), &mismatched);
        assert!(!ok, "{command}");
        assert!(
            stderr.contains("listen_tls[0].key: ") && stderr.contains("is not the key of"),
            "{command}: {stderr}"
        );
    }

    let no_ca = base.replace(
        "address: \"127.0.0.1:1\"",
        "address: \"127.0.0.1:1\", tls: { ca_file: /nonexistent/ca.crt }",
    );
    let (ok, stderr) = tether_cli("check", dir.path(), &no_ca);
    assert!(!ok);
    assert!(
        stderr.contains("replica a: tls.ca_file: /nonexistent/ca.crt: cannot read"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_the_admin_api_reload_a_renewed_certificate_under_an_unchanged_config() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let first = ca
        .server(dir.path(), "edge", "edge-1", &["localhost"])
        .unwrap();
    let fleet = SimFleet::start(&["s-1"]).unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let regions = format!(
        "regions:\n  - name: r\n    replicas:\n      - {{ id: s-1, address: \"{}\" }}\n",
        fleet.addr("s-1")
    );
    let log = dir.path().join("usage.jsonl");
    // No file watch: only the triggers under test reload.
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "{}admin: {{ token: \"{ADMIN_TOKEN}\" }}\nreload: {{ watch: false }}\n",
            body(https, &first, &[], &regions, &log)
        ),
    })
    .unwrap();
    wait_listening(https).await;
    let config = client_config(&ca, &[b"http/1.1"]).unwrap();
    let served = || async {
        let stream = connect(config.clone(), https, "localhost").await.unwrap();
        served_certificate(&stream).unwrap()
    };
    assert_eq!(served().await, first.der);

    let second = ca
        .server(dir.path(), "edge", "edge-2", &["localhost"])
        .unwrap();
    tether.hangup().unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    while served().await != second.der {
        assert!(Instant::now() < deadline, "SIGHUP never served the renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let third = ca
        .server(dir.path(), "edge", "edge-3", &["localhost"])
        .unwrap();
    let answer: Value = reqwest::Client::new()
        .post(tether.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["result"], "ok", "{answer}");
    assert_eq!(
        answer["changes"],
        json!([format!("certificates of listen_tls[0] ({https}) reloaded")]),
        "{answer}"
    );
    assert_eq!(
        served().await,
        third.der,
        "applied when the admin API answers"
    );
}

/// Rewrites `tether`'s config to `body` and reloads it through the admin API.
async fn admin_reload(tether: &Tether, body: &str) {
    tether.rewrite_config(body).unwrap();
    let res = reqwest::Client::new()
        .post(tether.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
}

/// Replica `id`'s health as the admin API reports it.
async fn health_of(tether: &Tether, id: &str) -> String {
    let view: Value = reqwest::get(tether.admin_url("/admin/replicas"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    view["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .map(|r| r["health"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no replica {id}: {view}"))
}

async fn wait_for_health(tether: &Tether, id: &str, want: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let now = health_of(tether, id).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{id} stayed {now}, never {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_verify_a_tls_replica_like_requests_and_follow_its_tls_settings() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let stranger = TestCa::new("some other CA").unwrap();
    let ca_file = ca.write(dir.path(), "ca.crt").unwrap();
    let stranger_file = stranger.write(dir.path(), "stranger.crt").unwrap();
    let replica = ca
        .server(dir.path(), "replica", "replica", &["127.0.0.1"])
        .unwrap();
    let fleet = tls_fleet(&["s-1"], &replica, None);
    let log = dir.path().join("usage.jsonl");
    let body = |tls: &str| {
        format!(
            "local_region: r\n{}usage_log: {{ path: \"{}\" }}\n\
             health: {{ probe: {{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }} }}\n\
             admin: {{ token: \"{ADMIN_TOKEN}\" }}\nreload: {{ watch: false }}\n",
            tls_regions(&fleet, tls),
            log.display()
        )
    };
    let trusting = |ca: &Path| format!("{{ ca_file: \"{}\" }}", ca.display());
    // Trusting the wrong CA, probes fail the handshake and take the replica out.
    let tether = Tether::start(&TetherConfig {
        body: body(&trusting(&stranger_file)),
    })
    .unwrap();
    wait_for_health(&tether, "s-1", "unhealthy").await;

    // `verify: false` (a test bed's setting) accepts the certificate unchecked.
    admin_reload(&tether, &body("{ verify: false }")).await;
    wait_for_health(&tether, "s-1", "healthy").await;

    // Back to the wrong CA: out again; then the right CA: only a probe that speaks TLS and
    // verifies against it brings the replica back.
    admin_reload(&tether, &body(&trusting(&stranger_file))).await;
    wait_for_health(&tether, "s-1", "unhealthy").await;
    admin_reload(&tether, &body(&trusting(&ca_file))).await;
    wait_for_health(&tether, "s-1", "healthy").await;
    let (status, answer) = chat(&reqwest::Client::new(), &tether.url("/v1/chat/completions")).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_cancels_is_still_recorded_and_its_connection_lives_on() {
    let dir = TempDir::new("tether-tls").unwrap();
    let ca = TestCa::new("tether test CA").unwrap();
    let edge = ca
        .server(dir.path(), "edge", "edge", &["localhost"])
        .unwrap();
    // 20 tokens a second: a 200-token stream lasts far longer than the test waits for it.
    let fleet = SimFleet::start_with(
        &["s-1"],
        &[
            "--deterministic",
            "--time-scale",
            "1",
            "--decode-rate",
            "20",
        ],
    )
    .unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let regions = format!(
        "regions:\n  - name: r\n    replicas:\n      - {{ id: s-1, address: \"{}\" }}\n",
        fleet.addr("s-1")
    );
    let log = dir.path().join("usage.jsonl");
    let mut tether = Tether::start(&TetherConfig {
        body: body(https, &edge, &[], &regions, &log),
    })
    .unwrap();
    wait_listening(https).await;
    let url = format!("https://localhost:{}/v1/chat/completions", https.port());
    let h2 = https_client(&ca, true).unwrap();

    let res = h2
        .post(&url)
        .json(&json!({
            "model": "tls-h2-cancelled",
            "messages": [{"role": "user", "content": "a long answer, please"}],
            "max_tokens": 200,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let mut chunks = res.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // Dropping the body resets the stream (RST_STREAM), not the connection.
    drop(chunks);

    let res = h2
        .post(&url)
        .json(&json!({"model": "tls-h2-next", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // The cancelled request is recorded once Tether has noticed; stopping Tether flushes it.
    assert!(tether.terminate().unwrap(), "tether exits cleanly");
    let records = records(&log);
    assert_eq!(records.len(), 2, "one record per request: {records:?}");
    assert_eq!(record_of(&records, "tls-h2-next")["usage_status"], "found");
    // The cancelled one: answered, its usage never arrived.
    let cancelled = records
        .iter()
        .find(|r| r["model"] != "tls-h2-next")
        .unwrap();
    assert_eq!(cancelled["status"], 200, "{cancelled}");
    assert_eq!(cancelled["usage_status"], "incomplete", "{cancelled}");
}

/// Waits until Tether's HTTPS listener accepts connections (the harness's readiness check
/// covers the plain and admin listeners only).
async fn wait_listening(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTPS listener on {addr} never accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
