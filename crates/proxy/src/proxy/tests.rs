//! The hooks on a Pingora `Session` read from bytes: no listener, no replica.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::upstreams::peer::Peer;
use tether_affinity::Outcome;
use tether_metering::Limit;
use tether_topology::Topology;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::*;

/// A client connection that has sent `request` and records what it is answered.
#[derive(Debug)]
struct Client {
    request: io::Cursor<Vec<u8>>,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.request).poll_read(cx, buf)
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl VirtualSocket for Client {
    fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}

/// `sk-tether-demo` and `sk-tether-other`, as in conf/tether.yaml.
const TOPOLOGY: &str = r#"
listen: 127.0.0.1:18080
local_region: eu
regions:
  - name: eu
    replicas:
      - { id: eu-1, address: "127.0.0.1:19101" }
      - { id: eu-2, address: "127.0.0.1:19102" }
  - name: us
    replicas:
      - { id: us-1, address: "127.0.0.1:19201" }
tenants:
  - { id: demo, api_key_sha256: "249142d4624be5a93233d916886bc3fc3319811cb61ed2ce35bbb7728a6b017e" }
  - { id: other, api_key_sha256: "27eb8f96dfd4b8068a6745b9dcf52290ad7ce39da716d6546838c6db6ff88118" }
"#;

struct Harness {
    proxy: TetherProxy,
    router: Arc<Router>,
}

fn harness() -> Harness {
    harness_with(TOPOLOGY)
}

impl Harness {
    /// A chat request with `headers`, which `request_filter` must admit.
    async fn admitted(&self, headers: &[&str]) -> (Session, Box<RequestCtx>) {
        let (mut session, _) = session(&chat(headers)).await;
        let mut ctx = self.proxy.new_ctx();
        let done = self
            .proxy
            .request_filter(&mut session, &mut ctx)
            .await
            .unwrap();
        assert!(!done, "admitted");
        (session, ctx)
    }

    /// The request header that goes to the replica.
    async fn upstream_header(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> RequestHeader {
        let mut upstream = session.req_header().clone();
        self.proxy
            .upstream_request_filter(session, &mut upstream, ctx)
            .await
            .unwrap();
        upstream
    }
}

fn harness_with(yaml: &str) -> Harness {
    let topology = Topology::from_yaml(yaml, "test.yaml").unwrap();
    let router = Arc::new(Router::new(&topology, None).unwrap());
    let meter = Arc::new(Meter::new(&topology).unwrap());
    Harness {
        proxy: TetherProxy::new(
            Arc::clone(&router),
            meter,
            None,
            Arc::new(AtomicBool::new(false)),
        ),
        router,
    }
}

async fn session(request: &str) -> (Session, Arc<Mutex<Vec<u8>>>) {
    let written = Arc::new(Mutex::new(Vec::new()));
    let client = Client {
        request: io::Cursor::new(request.as_bytes().to_vec()),
        written: Arc::clone(&written),
    };
    let stream = L4Stream::from(VirtualSocketStream::new(Box::new(client)));
    let mut session = Session::new_h1(Box::new(stream));
    assert!(session.read_request().await.unwrap());
    (session, written)
}

fn chat(headers: &[&str]) -> String {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut request = String::from("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    request
}

/// The status line and the JSON error code of what the client was answered.
fn answer(written: &Mutex<Vec<u8>>) -> (String, String) {
    let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(body)
        .map(|v| v["error"]["code"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (status, code)
}

/// Runs `request_filter` on a chat request with `headers`, which must refuse it: the status
/// line, the error code, everything written to the client, and the context.
async fn refused(headers: &[&str]) -> (String, String, String, Box<RequestCtx>) {
    let h = harness();
    let (mut session, written) = session(&chat(headers)).await;
    let mut ctx = h.proxy.new_ctx();
    let done = h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    assert!(done, "refused before routing");
    let (status, code) = answer(&written);
    let all = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
    (status, code, all, ctx)
}

#[tokio::test]
async fn a_request_without_an_api_key_is_refused_with_401() {
    let (status, code, _, ctx) = refused(&[]).await;
    assert!(status.contains(" 401 "), "{status}");
    assert_eq!(code, "invalid_api_key");
    assert!(ctx.caller.is_none() && ctx.refused_tenant.is_none());
}

#[tokio::test]
async fn an_unknown_api_key_is_refused_with_401() {
    let (_, code, _, _) = refused(&["Authorization: Bearer sk-nope"]).await;
    assert_eq!(code, "invalid_api_key");
}

#[tokio::test]
async fn a_malformed_token_is_refused_with_400_under_its_tenant_without_echoing_it() {
    let (status, code, all, ctx) = refused(&[
        "Authorization: Bearer sk-tether-demo",
        "X-Session-Affinity: secret token",
    ])
    .await;
    assert!(status.contains(" 400 "), "{status}");
    assert_eq!(code, "invalid_session_affinity");
    assert!(!all.contains("secret"));
    assert_eq!(ctx.refused_tenant.as_deref(), Some("demo"));
}

#[tokio::test]
async fn repeated_tokens_that_disagree_are_refused() {
    let (_, code, _, _) = refused(&[
        "Authorization: Bearer sk-tether-demo",
        "X-Session-Affinity: one",
        "X-Session-Affinity: two",
    ])
    .await;
    assert_eq!(code, "invalid_session_affinity");
}

#[tokio::test]
async fn the_same_token_from_two_tenants_gives_two_keys() {
    let h = harness();
    let mut keys = Vec::new();
    for api_key in ["sk-tether-demo", "sk-tether-other"] {
        let auth = format!("Authorization: Bearer {api_key}");
        let (_, ctx) = h.admitted(&[&auth, "X-Session-Affinity: conv-1"]).await;
        keys.push(ctx.attempts.key().unwrap());
    }
    assert_ne!(keys[0], keys[1]);
}

/// A topology whose routing-key secret is in a file holding `secret`.
fn with_key_secret(name: &str, secret: &str) -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("tether-key-{}-{name}", std::process::id()));
    std::fs::write(&path, secret).unwrap();
    let yaml = format!(
        "{TOPOLOGY}affinity: {{ key_secret: {{ file: {} }} }}\n",
        path.display()
    );
    (yaml, path)
}

#[tokio::test]
async fn a_key_secret_from_a_file_changes_every_key_and_instances_sharing_it_agree() {
    let (yaml, path) = with_key_secret("agree", "0123456789abcdef-the-tier-secret\n");
    let key = |h: Harness| async move {
        let (_, ctx) = h
            .admitted(&[
                "Authorization: Bearer sk-tether-demo",
                "X-Session-Affinity: conv-1",
            ])
            .await;
        ctx.attempts.key().unwrap()
    };
    let unkeyed = key(harness()).await;
    let first = key(harness_with(&yaml)).await;
    let second = key(harness_with(&yaml)).await;
    std::fs::remove_file(&path).unwrap();
    assert_ne!(first, unkeyed);
    assert_eq!(first, second, "two instances with one secret route alike");
}

#[test]
fn an_unreadable_or_short_key_secret_stops_the_start_naming_the_key() {
    let (short, path) = with_key_secret("short", "too-short\n");
    let missing =
        format!("{TOPOLOGY}affinity: {{ key_secret: {{ file: /nonexistent/tether-key }} }}\n");
    for yaml in [short, missing] {
        let topology = Topology::from_yaml(&yaml, "test.yaml").unwrap();
        let error = Router::new(&topology, None).unwrap_err().to_string();
        assert!(error.starts_with("affinity.key_secret: "), "{error}");
        assert!(!error.contains("too-short"), "never the secret: {error}");
    }
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn the_api_key_never_reaches_the_replica_and_bodies_come_back_uncompressed() {
    let h = harness();
    let (mut session, mut ctx) = h
        .admitted(&[
            "Authorization: Bearer sk-tether-demo",
            "Accept-Encoding: gzip",
        ])
        .await;
    let upstream = h.upstream_header(&mut session, &mut ctx).await;
    assert!(upstream.headers.get("authorization").is_none());
    assert_eq!(upstream.headers.get("accept-encoding").unwrap(), "identity");
}

#[tokio::test]
async fn a_2xx_answer_pins_the_session_and_the_next_turn_is_sticky() {
    let h = harness();
    let headers = [
        "Authorization: Bearer sk-tether-demo",
        "X-Session-Affinity: conv-7",
    ];
    let mut first = None;
    for turn in 0..2 {
        let (mut session, _) = session(&chat(&headers)).await;
        let mut ctx = h.proxy.new_ctx();
        assert!(!h
            .proxy
            .request_filter(&mut session, &mut ctx)
            .await
            .unwrap());
        let peer = h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
        let route = ctx.route.as_ref().unwrap();
        if turn == 0 {
            assert_ne!(route.outcome(), Outcome::Sticky);
            first = Some(peer.address().to_string());
        } else {
            assert_eq!(route.outcome(), Outcome::Sticky);
            assert_eq!(first.as_deref(), Some(peer.address().to_string().as_str()));
        }
        let mut answer = ResponseHeader::build(200, None).unwrap();
        answer
            .insert_header("content-type", "application/json")
            .unwrap();
        h.proxy
            .response_filter(&mut session, &mut answer, &mut ctx)
            .await
            .unwrap();
        assert!(ctx.answered);
        assert!(ctx.metered.is_some(), "a 2xx is metered");
        h.proxy.logging(&mut session, None, &mut ctx).await;
    }
    assert_eq!(h.router.overrides().len(), 1);
    let held: u32 = h
        .router
        .snapshot()
        .fleet()
        .replicas()
        .iter()
        .map(|r| r.inflight())
        .sum();
    assert_eq!(held, 0, "logging released every slot");
}

#[tokio::test]
async fn a_503_from_the_replica_is_retried_elsewhere_before_the_client_sees_it() {
    let h = harness();
    let (mut session, mut ctx) = h
        .admitted(&[
            "Authorization: Bearer sk-tether-demo",
            "X-Session-Affinity: conv-9",
        ])
        .await;
    let first = h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    let mut answer = ResponseHeader::build(503, None).unwrap();
    let e = h
        .proxy
        .response_filter(&mut session, &mut answer, &mut ctx)
        .await
        .unwrap_err();
    assert_eq!(ctx.retried_status, Some(503));
    assert!(!ctx.answered);
    let e = h
        .proxy
        .error_while_proxy(&first, &mut session, e, &mut ctx, false);
    assert!(e.retry(), "chat completions are safe to resend");
    let second = h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    assert_ne!(first.address(), second.address());
    assert!(h.router.overrides().is_empty(), "a 503 pins nothing");
}

#[tokio::test]
async fn a_refused_connection_is_retried_and_nothing_anywhere_answers_503() {
    let h = harness();
    let (mut session, written) = session(&chat(&["Authorization: Bearer sk-tether-demo"])).await;
    let mut ctx = h.proxy.new_ctx();
    assert!(!h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap());
    for _ in 0..3 {
        let peer = h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
        let e = Error::explain(ErrorType::ConnectRefused, "refused");
        let e = h.proxy.fail_to_connect(&mut session, &peer, &mut ctx, e);
        assert!(e.retry());
    }
    let e = h
        .proxy
        .upstream_peer(&mut session, &mut ctx)
        .await
        .unwrap_err();
    assert!(ctx.unavailable);
    let failed = h.proxy.fail_to_proxy(&mut session, &e, &mut ctx).await;
    assert_eq!(failed.error_code, 503);
    let (status, code) = answer(&written);
    assert!(status.contains(" 503 "), "{status}");
    assert_eq!(code, "no_replica_available");
    assert!(String::from_utf8_lossy(&written.lock().unwrap()).contains("retry-after"));
}

/// A read error as Pingora reports one that Tether caused.
fn aborted(why: Aborted) -> Box<Error> {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why);
    let read = Error::because(ErrorType::ReadError, "while reading response headers", io);
    // Passed on from the upstream half of the proxy to the downstream half.
    Error::because(ErrorType::ReadError, "Peer: 127.0.0.1:9", read).into_up()
}

#[test]
fn only_answers_that_claim_json_or_sse_are_judged_by_whether_they_parse() {
    for (content_type, judged) in [
        ("application/json", true),
        ("Application/JSON; charset=utf-8", true),
        ("application/problem+json", true),
        ("text/event-stream", true),
        ("text/event-stream;charset=UTF-8", true),
        ("text/plain", false),
        ("application/octet-stream", false),
        ("", false),
    ] {
        assert_eq!(claims_structured(content_type), judged, "{content_type:?}");
    }
}

#[test]
fn failures_are_classified_by_stage_and_source() {
    let upstream = Error::new_up;
    let downstream = Error::new_down;
    use ErrorType::*;
    // (error, answered, retried status, pooled connection, expected)
    type Row = (Box<Error>, bool, Option<u16>, bool, Failure);
    let rows: Vec<Row> = vec![
        (upstream(ReadTimedout), false, None, false, Failure::Timeout),
        (
            upstream(ConnectionClosed),
            false,
            None,
            false,
            Failure::Broken,
        ),
        (
            upstream(ConnectionClosed),
            false,
            None,
            true,
            Failure::StaleConnection,
        ),
        (
            upstream(ReadError),
            false,
            None,
            true,
            Failure::StaleConnection,
        ),
        (upstream(ReadTimedout), false, None, true, Failure::Timeout),
        (
            upstream(HTTPStatus(503)),
            false,
            Some(503),
            false,
            Failure::Status(503),
        ),
        (upstream(ReadError), true, None, false, Failure::AfterAnswer),
        (downstream(ReadError), true, None, false, Failure::Client),
        (downstream(ReadError), false, None, false, Failure::Client),
        (
            aborted(Aborted::Departed),
            false,
            None,
            true,
            Failure::Departed,
        ),
        (aborted(Aborted::Cut), false, None, false, Failure::Shutdown),
        (aborted(Aborted::Cut), true, None, false, Failure::Shutdown),
    ];
    for (e, answered, status, reused, expected) in rows {
        assert_eq!(classify(&e, answered, status, reused), expected, "{e:?}");
    }
}

#[test]
fn errors_answered_to_the_client_match_what_failed() {
    let e = Error::new_up(ErrorType::ReadTimedout);
    assert_eq!(edge_error(&e, false, 1), Some(EdgeError::UpstreamTimeout));
    let refused = Error::new(ErrorType::ConnectRefused);
    assert_eq!(
        edge_error(&refused, false, 2),
        Some(EdgeError::NoReplicaAvailable {
            retry_after_secs: 2
        })
    );
    let gone = Error::new_down(ErrorType::WriteError);
    assert_eq!(edge_error(&gone, false, 1), None, "the client left");
    let stalled = Error::new_down(ErrorType::ReadTimedout);
    assert_eq!(
        edge_error(&stalled, false, 1),
        Some(EdgeError::RequestTimeout),
        "a request body that stopped arriving"
    );
    assert_eq!(EdgeError::RequestTimeout.status(), 408);
    assert_eq!(
        edge_error(&gone, true, 3),
        Some(EdgeError::NoReplicaAvailable {
            retry_after_secs: 3
        })
    );
}

#[test]
fn retry_after_takes_delay_seconds_only() {
    assert_eq!(parse_retry_after(b" 7 "), Some(Duration::from_secs(7)));
    assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
}

#[tokio::test]
async fn an_anthropic_style_x_api_key_is_accepted_and_never_reaches_the_replica() {
    let h = harness();
    let (mut session, mut ctx) = h
        .admitted(&["x-api-key: sk-tether-other", "X-Session-Affinity: conv-x"])
        .await;
    assert_eq!(ctx.caller.as_ref().map(|c| &*c.tenant), Some("other"));
    h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    let upstream = h.upstream_header(&mut session, &mut ctx).await;
    assert!(upstream.headers.get("x-api-key").is_none());
    assert!(upstream.headers.get("authorization").is_none());
}

#[tokio::test]
async fn a_replica_gets_its_own_credential_in_place_of_the_clients() {
    let dir = std::env::temp_dir().join(format!("tether-cred-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("eu.key");
    std::fs::write(&secret, "sk-replica-secret\n").unwrap();
    let yaml = TOPOLOGY.replacen(
        "  - name: eu\n",
        &format!(
            "  - name: eu\n    upstream_auth: {{ file: \"{}\" }}\n",
            secret.display()
        ),
        1,
    );
    let h = harness_with(&yaml);
    let (mut session, mut ctx) = h.admitted(&["Authorization: Bearer sk-tether-demo"]).await;
    h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    let upstream = h.upstream_header(&mut session, &mut ctx).await;
    let auth = upstream.headers.get("authorization").unwrap();
    assert_eq!(
        auth, "Bearer sk-replica-secret",
        "tokenless goes to the local region eu"
    );
    assert!(auth.is_sensitive());
    let debug = format!("{:?}", ctx.route.as_ref().unwrap().replica().upstream());
    assert!(!debug.contains("sk-replica-secret"), "{debug}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_client_is_told_new_then_warm_and_nothing_about_topology() {
    let h = harness();
    let headers = [
        "Authorization: Bearer sk-tether-demo",
        "X-Session-Affinity: conv-status",
    ];
    for expected in ["new", "warm"] {
        let (mut session, _) = session(&chat(&headers)).await;
        let mut ctx = h.proxy.new_ctx();
        assert!(!h
            .proxy
            .request_filter(&mut session, &mut ctx)
            .await
            .unwrap());
        h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
        let mut answer = ResponseHeader::build(200, None).unwrap();
        h.proxy
            .response_filter(&mut session, &mut answer, &mut ctx)
            .await
            .unwrap();
        assert_eq!(
            answer.headers.get("x-session-affinity-status").unwrap(),
            expected
        );
        h.proxy.logging(&mut session, None, &mut ctx).await;
    }
}

/// The proxy's answer to a chat request with `headers`: `Some(status line, headers+body)`
/// when `request_filter` answered it, `None` when it was admitted (its context is returned
/// either way, holding any permit).
async fn filtered(h: &Harness, headers: &[&str]) -> (Option<String>, Box<RequestCtx>) {
    let (mut session, written) = session(&chat(headers)).await;
    let mut ctx = h.proxy.new_ctx();
    let done = h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
    (done.then_some(text), ctx)
}

const DEMO: &str = "Authorization: Bearer sk-tether-demo";
const OTHER: &str = "Authorization: Bearer sk-tether-other";

#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_429_with_retry_after_and_others_do_not() {
    let yaml = TOPOLOGY.replace(
        r#"017e" }"#,
        r#"017e", limits: { requests_per_second: 0.1, request_burst: 2 } }"#,
    );
    let h = harness_with(&yaml);
    for _ in 0..2 {
        assert!(filtered(&h, &[DEMO]).await.0.is_none());
    }
    let (answer, ctx) = filtered(&h, &[DEMO]).await;
    let answer = answer.expect("refused");
    assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
    let retry_after = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_owned)
        })
        .expect("a Retry-After header");
    // 0.1 per second: the next token is about ten seconds away.
    let secs: u32 = retry_after.trim().parse().unwrap();
    assert!((9..=10).contains(&secs), "{secs}");
    assert!(
        answer.contains(r#""code":"rate_limit_exceeded""#),
        "{answer}"
    );
    assert_eq!(ctx.limited.map(|r| r.limit), Some(Limit::Requests));
    assert_eq!(ctx.caller.as_ref().map(|c| &*c.tenant), Some("demo"));
    // Another tenant has its own bucket (and no limit here).
    for _ in 0..5 {
        assert!(filtered(&h, &[OTHER]).await.0.is_none());
    }
}

#[tokio::test]
async fn a_tenant_at_its_concurrency_limit_gets_429_until_a_request_finishes() {
    let h = harness_with(&format!(
        "{TOPOLOGY}tenant_limits: {{ max_concurrent: 2 }}\n"
    ));
    let (a, first) = filtered(&h, &[DEMO]).await;
    let (b, _second) = filtered(&h, &[DEMO]).await;
    assert!(a.is_none() && b.is_none());
    let (refused, ctx) = filtered(&h, &[DEMO]).await;
    assert!(refused
        .unwrap()
        .contains(r#""code":"concurrency_limit_exceeded""#));
    assert_eq!(ctx.limited.map(|r| r.limit), Some(Limit::Concurrency));
    assert!(filtered(&h, &[OTHER]).await.0.is_none(), "per tenant");
    drop(first);
    assert!(
        filtered(&h, &[DEMO]).await.0.is_none(),
        "a finished request frees its place"
    );
}

#[tokio::test]
async fn new_sessions_are_limited_and_known_sessions_are_not() {
    let h = harness_with(&format!(
        "{TOPOLOGY}tenant_limits: {{ new_sessions_per_second: 0.01, new_session_burst: 1 }}\n"
    ));
    // A first session is placed and recorded.
    let (mut session, mut ctx) = h.admitted(&[DEMO, "X-Session-Affinity: conv-1"]).await;
    h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    let mut answer = ResponseHeader::build(200, None).unwrap();
    h.proxy
        .response_filter(&mut session, &mut answer, &mut ctx)
        .await
        .unwrap();
    h.proxy.logging(&mut session, None, &mut ctx).await;
    // A second new session is over the limit…
    let (mut session, mut ctx) = h.admitted(&[DEMO, "X-Session-Affinity: conv-2"]).await;
    let e = h
        .proxy
        .upstream_peer(&mut session, &mut ctx)
        .await
        .unwrap_err();
    assert_eq!(ctx.limited.map(|r| r.limit), Some(Limit::NewSessions));
    assert!(h.proxy.suppress_error_log(&session, &ctx, &e));
    let (mut session, written) = super::tests::session(&chat(&[DEMO])).await;
    let failed = h.proxy.fail_to_proxy(&mut session, &e, &mut ctx).await;
    assert_eq!(failed.error_code, 429);
    assert!(String::from_utf8_lossy(&written.lock().unwrap()).contains("new sessions"));
    // …the first one's next turn, and requests without a token, are not.
    for headers in [&[DEMO, "X-Session-Affinity: conv-1"][..], &[DEMO][..]] {
        let (mut session, mut ctx) = h.admitted(headers).await;
        h.proxy.upstream_peer(&mut session, &mut ctx).await.unwrap();
    }
}
