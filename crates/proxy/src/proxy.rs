//! The Pingora glue: [`TetherProxy`] implements `ProxyHttp` by calling the pure crates.
//!
//! Per request: `request_filter` resolves the tenant and the routing key (401/400 otherwise),
//! `upstream_peer` asks the selector for a replica (healthy, not drained, within its load
//! bound) and takes an in-flight slot. Failover: `fail_to_connect` retries the next candidate;
//! `error_while_proxy` retries a replica that accepted the request but failed before
//! answering (timeout, reset), when the request is safe to resend; `response_filter` turns a
//! 429/502/503/504 into a retry elsewhere the same way, and records the override entry when
//! the replica answers 2xx. Every outcome feeds the replica's health (passive ejection,
//! `Retry-After` overload). Nothing is retried once response bytes reached the client.
//! `fail_to_proxy` answers OpenAI-style JSON, and `logging` writes the usage record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use log::debug;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tether_affinity::{
    Decision, Outcome, ReplicaInfo, ReplicaSet, RouteRequest, RoutingKey, TenantScope,
};

use tether_metering::{
    ensure_stream_usage, timestamp, Dialect, Framing, UsageChunkFilter, UsageExtractor,
    UsageRecord, UsageStatus, DEFAULT_WINDOW,
};

use crate::api_error::ApiError;
use crate::meter::Meter;
use crate::router::{log_transition, retry_after_hint, Router, Snapshot};
use tether_health::{now_ms, InflightGuard};

/// Largest chat request body Tether buffers to add `stream_options.include_usage`; a larger
/// one is forwarded untouched (its stream may then report no usage).
pub const MAX_REWRITE_BODY: usize = 16 << 20;

/// Largest body read ahead in `request_filter` (Pingora's retry buffer, which replays it).
const READ_AHEAD_LIMIT: usize = 64 << 10;

/// A chat request body being collected for [`ensure_stream_usage`].
#[derive(Debug, Default)]
struct BodyRewrite {
    buffer: Vec<u8>,
    /// Gave up (too large): the rest passes through.
    passthrough: bool,
    /// The final body, when it was read ahead in `request_filter`: its length is known before
    /// the upstream request header goes out, so the framing stays `Content-Length`.
    ready: Option<Bytes>,
}

/// The proxy.
#[derive(Debug, Clone)]
pub struct TetherProxy {
    router: Arc<Router>,
    meter: Arc<Meter>,
    draining: Arc<AtomicBool>,
}

impl TetherProxy {
    /// A proxy routing with `router` and metering with `meter`. While `draining` is set (a
    /// binary upgrade is handing the listeners over), every response closes its connection.
    pub fn new(router: Arc<Router>, meter: Arc<Meter>, draining: Arc<AtomicBool>) -> Self {
        TetherProxy {
            router,
            meter,
            draining,
        }
    }
}

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    first_byte: Option<Instant>,
    extractor: Option<UsageExtractor>,
    rewrite: Option<BodyRewrite>,
    /// Usage was injected into the request: hide the usage-only event from the client.
    strip_usage: Option<UsageChunkFilter>,
    injected: bool,
    snapshot: Option<Arc<Snapshot>>,
    tenant: Option<Arc<str>>,
    /// The tenant's hashing scope (also its identity for tenant locality).
    tenant_scope: Option<TenantScope>,
    key: Option<RoutingKey>,
    decision: Option<Decision>,
    tried: ReplicaSet,
    attempts: u32,
    /// Attempts that ended in a refused connection: free (nothing was sent, no time lost), so
    /// they do not count against `failover.max_attempts`; each replica is still tried once.
    refused: u32,
    inflight: Option<InflightGuard>,
    unavailable: bool,
    /// The current attempt's response header went on to the client: no retry after this.
    answered: bool,
    /// The current attempt's replica answered this status, which is being retried elsewhere.
    retried_status: Option<u16>,
}

/// What `request_filter` concluded about the caller.
enum Admission {
    Admit {
        tenant_id: Arc<str>,
        scope: TenantScope,
        key: Option<RoutingKey>,
    },
    Reject(ApiError),
}

/// The API key of an `Authorization: Bearer <key>` header.
fn bearer_token(req: &RequestHeader) -> Option<&[u8]> {
    let value = req.headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

fn admit(snapshot: &Snapshot, req: &RequestHeader) -> Admission {
    let tenant = if snapshot.requires_api_key() {
        let Some(api_key) = bearer_token(req) else {
            return Admission::Reject(ApiError::invalid_api_key(
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        match snapshot.tenant_for_key(api_key) {
            Some(tenant) => tenant,
            None => return Admission::Reject(ApiError::invalid_api_key("invalid API key")),
        }
    } else {
        &snapshot.default_tenant
    };
    let values = req
        .headers
        .get_all(&snapshot.header)
        .into_iter()
        .map(|v| v.as_bytes());
    match snapshot.token_rules.validate_all(values) {
        Ok(token) => Admission::Admit {
            tenant_id: Arc::clone(&tenant.id),
            scope: tenant.scope,
            key: token.map(|t| tenant.scope.key(t)),
        },
        Err(e) => Admission::Reject(ApiError::invalid_session_affinity(e.to_string())),
    }
}

/// Reads a (small) request body whole, before any upstream work, and returns the body that
/// should go upstream instead when usage has to be injected. Pingora's retry buffer keeps the
/// bytes and replays them through `request_body_filter`, where the new body is substituted.
async fn read_ahead(session: &mut Session) -> Result<Option<Bytes>> {
    session.enable_retry_buffering();
    let mut raw = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        raw.extend_from_slice(&chunk);
    }
    Ok(ensure_stream_usage(&raw).map(Bytes::from))
}

/// Whether a request may go to a second replica after the first accepted it and failed before
/// answering: idempotent methods always; others when their path is listed in
/// `failover.retry_unanswered` (text generation has no side effects).
fn resend_safe(snapshot: &Snapshot, req: &RequestHeader) -> bool {
    req.method.is_idempotent()
        || snapshot
            .failover
            .retry_unanswered
            .iter()
            .any(|p| p == req.uri.path())
}

/// Whether another attempt fits the request's limits (attempts and deadline).
fn may_try_again(ctx: &RequestCtx) -> bool {
    ctx.snapshot.as_deref().is_some_and(|s| {
        ctx.attempts.saturating_sub(ctx.refused) < s.failover.max_attempts
            && ctx.started.elapsed() < s.failover.deadline
    })
}

/// `Retry-After` as delay-seconds (RFC 9110 §10.2.3). The HTTP-date form is rare from
/// inference servers and would need the clocks to agree; it falls back to the default.
fn parse_retry_after(value: &[u8]) -> Option<Duration> {
    let seconds: u64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

impl TetherProxy {
    /// Counts a failed request against the replica of the current attempt (passive ejection).
    fn replica_failed(&self, ctx: &RequestCtx) {
        let (Some(snapshot), Some(decision)) = (ctx.snapshot.as_deref(), ctx.decision) else {
            return;
        };
        if let Some(status) = snapshot.status(decision.replica) {
            if let Some(t) = status.record_failure(now_ms(), &snapshot.health_policy) {
                log_transition(snapshot.replica_id(decision.replica), t);
            }
        }
    }
}

impl RequestCtx {
    fn served_replica(&self) -> Option<&ReplicaInfo> {
        let idx = self.decision?.replica;
        self.snapshot.as_deref()?.selector.replica(idx)
    }
}

#[async_trait]
impl ProxyHttp for TetherProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            first_byte: None,
            extractor: None,
            rewrite: None,
            strip_usage: None,
            injected: false,
            snapshot: None,
            tenant: None,
            tenant_scope: None,
            key: None,
            decision: None,
            tried: ReplicaSet::default(),
            attempts: 0,
            refused: 0,
            inflight: None,
            unavailable: false,
            answered: false,
            retried_status: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.draining.load(Ordering::Relaxed) {
            // `Connection: close` on the answer: the client's next request opens a new
            // connection (to the new process) instead of racing this one's close.
            session.set_keepalive(None);
        }
        let snapshot = self.router.snapshot();
        // Kept for rejected requests too: they get a usage record like every other.
        ctx.snapshot = Some(Arc::clone(&snapshot));
        match admit(&snapshot, session.req_header()) {
            Admission::Admit {
                tenant_id,
                scope,
                key,
            } => {
                ctx.tenant = Some(tenant_id);
                ctx.tenant_scope = Some(scope);
                ctx.key = key;
                if resend_safe(&snapshot, session.req_header()) {
                    // Keep the body (up to Pingora's 64 KiB retry buffer) so a replica that
                    // fails before answering can be replaced.
                    session.enable_retry_buffering();
                }
                let req = session.req_header();
                if snapshot.inject_stream_usage
                    && req.method == http::Method::POST
                    && req.uri.path().ends_with("/chat/completions")
                {
                    let length = req
                        .headers
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok());
                    if length.is_some_and(|n| n > 0 && n <= READ_AHEAD_LIMIT) {
                        // Unchanged bodies (the client asked for usage, or is not streaming)
                        // need no rewrite: the retry buffer replays them as they came.
                        if let Some(ready) = read_ahead(session).await? {
                            ctx.injected = true;
                            ctx.rewrite = Some(BodyRewrite {
                                ready: Some(ready),
                                ..BodyRewrite::default()
                            });
                        }
                    } else {
                        ctx.rewrite = Some(BodyRewrite::default());
                    }
                }
                Ok(false)
            }
            Admission::Reject(err) => {
                err.send(session, true).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = match &ctx.snapshot {
            Some(s) => Arc::clone(s),
            None => self.router.snapshot(),
        };
        // A retry releases the failed attempt's slot before taking the next, and replays the
        // raw request body through `request_body_filter`.
        ctx.inflight = None;
        ctx.answered = false;
        ctx.retried_status = None;
        if let Some(rewrite) = &mut ctx.rewrite {
            rewrite.buffer.clear();
            rewrite.passthrough = false;
        }
        if ctx.rewrite.as_ref().is_none_or(|r| r.ready.is_none()) {
            ctx.injected = false;
        }
        let request = RouteRequest {
            key: ctx.key,
            sticky: ctx.key.and_then(|k| self.router.overrides().get(k)),
            tried: Some(&ctx.tried),
            tenant: ctx.tenant_scope,
        };
        let now = now_ms();
        let view = snapshot.view(now);
        let Some(decision) = snapshot.selector.decide(&request, &view) else {
            ctx.unavailable = true;
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no replica available in any region",
            ));
        };
        let Some(peer) = snapshot.peers.get(decision.replica as usize) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "selector chose a replica without a peer",
            ));
        };
        ctx.tried.insert(decision.replica);
        if ctx.key.is_some() {
            snapshot.sent(decision.replica, now);
        }
        if let Some(scope) = ctx.tenant_scope {
            let placed = ctx.key.is_some() && decision.outcome != Outcome::Sticky;
            snapshot.serving(decision.replica, scope, placed, now);
        }
        ctx.attempts += 1;
        ctx.inflight = snapshot.acquire(decision.replica);
        ctx.decision = Some(decision);
        Ok(Box::new(peer.clone()))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.inflight = None;
        self.replica_failed(ctx);
        if matches!(e.etype(), ErrorType::ConnectRefused) {
            ctx.refused += 1;
        }
        // Nothing reached the replica, so any request is safe to send elsewhere.
        let retry = may_try_again(ctx);
        if retry {
            debug!("connect to {peer} failed ({e}); trying the next replica");
            self.meter.count_retry("connect");
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.answered {
            // Response bytes reached the client: a second replica cannot continue them.
            if e.esource() == &ErrorSource::Upstream {
                self.replica_failed(ctx);
            }
            e.set_retry(false);
            return e;
        }
        let status_retry = ctx.retried_status.is_some();
        // A pooled connection the replica had already closed is not the replica failing.
        let stale_pooled = client_reused
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if !status_retry && !stale_pooled && e.esource() != &ErrorSource::Downstream {
            self.replica_failed(ctx);
        }
        let retry = e.esource() != &ErrorSource::Downstream
            && ctx
                .snapshot
                .as_deref()
                .is_some_and(|s| resend_safe(s, session.req_header()))
            && !session.as_ref().retry_buffer_truncated()
            && may_try_again(ctx);
        if retry {
            let reason = match (ctx.retried_status, e.etype()) {
                (Some(_), _) => "status",
                (None, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => "timeout",
                _ => "error",
            };
            debug!("{e}: trying the next replica ({reason})");
            self.meter.count_retry(reason);
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The tenant's API key is a credential for Tether, not for the fleet.
        if ctx.snapshot.as_ref().is_some_and(|s| s.requires_api_key()) {
            upstream_request.remove_header(&http::header::AUTHORIZATION);
        }
        // Metering reads usage out of response bodies, so ask for them uncompressed: token
        // streams compress poorly and replicas sit on a fast network, so identity costs little
        // and saves decoding every response.
        // Without the header a server may not compress (and the replicas we know do not).
        if ctx.snapshot.as_ref().is_some_and(|s| s.metering)
            && upstream_request
                .headers
                .get(http::header::ACCEPT_ENCODING)
                .is_some_and(|v| v.as_bytes() != b"identity")
        {
            upstream_request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        }
        match ctx.rewrite.as_ref().map(|r| r.ready.as_ref()) {
            // Read ahead: the final body and its length are known.
            Some(Some(ready)) => {
                upstream_request
                    .insert_header(http::header::CONTENT_LENGTH, ready.len().to_string())?;
            }
            // Collected on the way: the body may grow, so Pingora frames it chunked.
            Some(None) => {
                upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            }
            None => {}
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(rewrite) = ctx.rewrite.as_mut().filter(|r| !r.passthrough) else {
            return Ok(());
        };
        if let Some(ready) = &rewrite.ready {
            // Pingora replays the read-ahead body (its retry buffer) here, whole, on every
            // attempt; send the final body instead.
            *body = Some(if end_of_stream {
                ready.clone()
            } else {
                Bytes::new()
            });
            return Ok(());
        }
        if let Some(chunk) = body.take() {
            rewrite.buffer.extend_from_slice(&chunk);
        }
        if rewrite.buffer.len() > MAX_REWRITE_BODY {
            rewrite.passthrough = true;
            *body = Some(Bytes::from(std::mem::take(&mut rewrite.buffer)));
            return Ok(());
        }
        if !end_of_stream {
            // Held back until the whole body is here. `Some(empty)`, not `None`: `None` would
            // end the upstream body.
            *body = Some(Bytes::new());
            return Ok(());
        }
        let raw = std::mem::take(&mut rewrite.buffer);
        *body = Some(match ensure_stream_usage(&raw) {
            Some(rewritten) => {
                ctx.injected = true;
                Bytes::from(rewritten)
            }
            None => Bytes::from(raw),
        });
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let code = upstream_response.status.as_u16();
        if let (Some(snapshot), Some(decision)) = (ctx.snapshot.as_deref(), ctx.decision) {
            if let Some(status) = snapshot.status(decision.replica) {
                let now = now_ms();
                if matches!(code, 429 | 503) {
                    let retry_after = upstream_response
                        .headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| parse_retry_after(v.as_bytes()));
                    status.record_overload(now, retry_after, &snapshot.health_policy);
                }
                if code >= 500 {
                    if let Some(t) = status.record_failure(now, &snapshot.health_policy) {
                        log_transition(snapshot.replica_id(decision.replica), t);
                    }
                } else if code != 429 {
                    status.record_success();
                }
            }
            // Overloaded or a gateway failure: nothing has reached the client yet, so another
            // replica may answer instead (when the request is safe to resend).
            if matches!(code, 429 | 502 | 503 | 504)
                && resend_safe(snapshot, session.req_header())
                && !session.as_ref().retry_buffer_truncated()
                && may_try_again(ctx)
            {
                ctx.retried_status = Some(code);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(code),
                    format!(
                        "replica {} answered {code}",
                        snapshot.replica_id(decision.replica)
                    ),
                ));
            }
        }
        ctx.answered = true;
        let metering = ctx.snapshot.as_deref().is_some_and(|s| s.metering);
        if metering && upstream_response.status.is_success() {
            let configured = ctx
                .decision
                .zip(ctx.snapshot.as_deref())
                .and_then(|(d, s)| s.dialects.get(d.replica as usize).copied().flatten());
            let dialect =
                configured.unwrap_or_else(|| Dialect::from_path(session.req_header().uri.path()));
            let framing = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map_or(Framing::Json, Framing::from_content_type);
            ctx.extractor = Some(UsageExtractor::new(dialect, framing));
            if ctx.injected && framing == Framing::Sse {
                ctx.strip_usage = Some(UsageChunkFilter::new(DEFAULT_WINDOW));
                // The body shrinks: it cannot keep a fixed length.
                upstream_response.remove_header(&http::header::CONTENT_LENGTH);
                upstream_response.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
        }
        // Record the override as soon as the replica accepts the turn (2xx header), not in
        // `logging`: Pingora runs `logging` after the client already has the whole response,
        // so a fast client's next turn could otherwise be routed before the entry exists.
        // A 2xx means the replica has prefilled the prompt, so its cache is warm even if the
        // body later fails mid-stream.
        if upstream_response.status.is_success() {
            if let (Some(key), Some(replica)) = (ctx.key, ctx.served_replica()) {
                self.router.overrides().record(key, replica.tag);
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(chunk) = body.as_ref().filter(|b| !b.is_empty()) {
            ctx.first_byte.get_or_insert_with(Instant::now);
            if let Some(x) = &mut ctx.extractor {
                x.feed(chunk);
            }
        }
        // Meter first, then hide the usage event the client did not ask for.
        if let Some(filter) = &mut ctx.strip_usage {
            let chunk = body.as_deref().unwrap_or_default();
            let kept = filter.filter(chunk, end_of_stream);
            if body.is_some() || !kept.is_empty() {
                *body = Some(Bytes::from(kept));
            }
        }
        // The replica is done with this request once its body ends; release the slot before
        // the last bytes reach the client (`logging` runs later, and also releases it on
        // every path that never gets here).
        if end_of_stream {
            ctx.inflight = None;
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let retry_after = ctx.snapshot.as_deref().map_or(1, |s| {
            u32::try_from(retry_after_hint(s).as_secs()).unwrap_or(u32::MAX)
        });
        let error = if ctx.unavailable {
            Some(ApiError::no_replica_available(retry_after))
        } else {
            match (e.etype(), e.esource()) {
                // Every replica tried refused or timed out the connection.
                (
                    ErrorType::ConnectRefused
                    | ErrorType::ConnectTimedout
                    | ErrorType::ConnectError
                    | ErrorType::ConnectNoRoute,
                    _,
                ) => Some(ApiError::no_replica_available(retry_after)),
                (ErrorType::HTTPStatus(code), _) => Some(ApiError::upstream(
                    *code,
                    format!("request failed: {}", e.etype().as_str()),
                )),
                (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => {
                    Some(ApiError::upstream(
                        504,
                        "the inference replica timed out".into(),
                    ))
                }
                (_, ErrorSource::Upstream) => Some(ApiError::upstream(
                    502,
                    format!("the inference replica failed: {}", e.etype().as_str()),
                )),
                (
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                    ErrorSource::Downstream,
                ) => None,
                (_, ErrorSource::Downstream) => Some(ApiError {
                    status: 400,
                    kind: "invalid_request_error",
                    code: "bad_request",
                    message: format!("could not read the request: {}", e.etype().as_str()),
                    retry_after: None,
                }),
                _ => Some(ApiError {
                    status: 500,
                    kind: "server_error",
                    code: "internal_error",
                    message: "internal proxy error".into(),
                    retry_after: None,
                }),
            }
        };
        let Some(error) = error else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let body = error.body();
        match error.header(body.len()) {
            Ok(header) => {
                // Writes nothing if the response had already started (mid-stream failure).
                if let Err(write) = session
                    .as_downstream_mut()
                    .write_error_response(header, body)
                    .await
                {
                    debug!("could not send the error response: {write}");
                }
            }
            Err(build) => debug!("could not build the error response: {build}"),
        }
        FailToProxy {
            error_code: error.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        drop(ctx.inflight.take());
        if !ctx.snapshot.as_deref().is_some_and(|s| s.metering) {
            return;
        }
        let latency = ctx.started.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let mut extraction = ctx.extractor.as_mut().map(UsageExtractor::finish);
        let replica = ctx.served_replica();
        let usage = extraction.as_ref().map(|x| x.usage).unwrap_or_default();
        let model = extraction.as_mut().and_then(|x| x.model.take());
        let cost = ctx
            .snapshot
            .as_deref()
            .and_then(|s| s.price(model.as_deref()).cost(&usage));
        let usage_status = UsageStatus::of(extraction.as_ref(), e.is_some());
        let record = UsageRecord {
            ts: timestamp(SystemTime::now()),
            tenant: ctx.tenant.clone().unwrap_or_else(|| Arc::from("-")),
            session: ctx.key.map(|k| self.meter.session_hash(k)),
            model,
            region: replica
                .zip(ctx.snapshot.as_deref())
                .and_then(|(r, s)| s.selector.shared_region_name(r.region)),
            replica: replica.map(|r| Arc::clone(&r.id)),
            outcome: ctx.decision.map(|d| d.outcome),
            status,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            completion_tokens: usage.completion_tokens,
            cost_micro_usd: cost.map(|c| c.cost_micro_usd),
            uncached_cost_micro_usd: cost.map(|c| c.uncached_cost_micro_usd),
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            ttft_ms: ctx
                .first_byte
                .map(|t| u64::try_from((t - ctx.started).as_millis()).unwrap_or(u64::MAX)),
            attempts: ctx.attempts,
            usage_status,
        };
        debug!(
            "tenant={} outcome={} replica={} status={status} attempts={} usage={usage_status}{}",
            record.tenant,
            record.outcome.map_or("-", Outcome::as_str),
            record.replica.as_deref().unwrap_or("-"),
            ctx.attempts,
            e.map(|e| format!(" error={e}")).unwrap_or_default(),
        );
        self.meter.finish(record, latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &[u8])]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (name, value) in headers {
            req.append_header(
                name.to_string(),
                http::HeaderValue::from_bytes(value).unwrap(),
            )
            .unwrap();
        }
        req
    }

    #[test]
    fn bearer_token_accepts_any_scheme_case_and_trims() {
        let req = request(&[("authorization", b"bEaReR   sk-123  ")]);
        assert_eq!(bearer_token(&req), Some(&b"sk-123"[..]));
    }

    #[test]
    fn bearer_token_refuses_other_schemes_and_empty_keys() {
        assert_eq!(
            bearer_token(&request(&[("authorization", b"Basic abc")])),
            None
        );
        assert_eq!(
            bearer_token(&request(&[("authorization", b"Bearer ")])),
            None
        );
        assert_eq!(
            bearer_token(&request(&[("authorization", b"sk-123")])),
            None
        );
        assert_eq!(bearer_token(&request(&[])), None);
    }
}
