//! The Pingora glue: [`TetherProxy`] implements `ProxyHttp` by calling the pure crates.
//!
//! Per request: `request_filter` admits the caller ([`crate::admission`]); `upstream_peer`
//! asks the fleet for a [`Route`] (the receipt holding the replica's in-flight slot); the
//! failure hooks translate Pingora's error into a [`Failure`], tell the receipt, and ask the
//! retry policy ([`Attempts::after_failure`]); `response_filter` tells the receipt the answer
//! and starts metering; `logging` writes the usage record. Routing rules, health bookkeeping
//! and the retry policy live in `tether-affinity`; usage extraction in `tether-metering`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use log::debug;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tether_affinity::{
    Attempts, BodyKeys, Failure, KeySource, Outcome, Retry, RetryLimits, Route, RoutingKey,
};
use tether_health::now_ms;
use tether_metering::{
    Dialect, Extraction, Framing, Timestamp, UsageChunkFilter, UsageExtractor, UsageOutcome,
    UsageRecord, UsageStatus, DEFAULT_WINDOW,
};

use crate::admission::{admit, Admission, Caller};
use crate::body::{send_unsent_prefix, BodyRead, BodyRewrite, ReadAhead, ReadFor, Step};
use crate::body_budget::BodyReservation;
use crate::drain::{InFlight, InFlightGuard};
use crate::error::EdgeError;
use crate::limits::{InFlightPermit, Refused};
use crate::meter::Meter;
use crate::response_header::insert_uncased;
use crate::router::{Router, Snapshot, Upstream};
use crate::session_key::{resolve, BodyView, Found, Resolution};
use crate::tier::Tier;
use crate::upstream_io::Aborted;

/// The proxy.
#[derive(Debug, Clone)]
pub struct TetherProxy {
    router: Arc<Router>,
    meter: Arc<Meter>,
    tier: Option<Tier>,
    draining: Arc<AtomicBool>,
    in_flight: Arc<InFlight>,
}

impl TetherProxy {
    /// A proxy routing with `router` and metering with `meter`, sharing bindings through
    /// `tier` when it runs in one. While `draining` is set (a binary upgrade is handing the
    /// listeners over), every response closes its connection.
    pub fn new(
        router: Arc<Router>,
        meter: Arc<Meter>,
        tier: Option<Tier>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        TetherProxy {
            router,
            meter,
            tier,
            draining,
            in_flight: InFlight::new(),
        }
    }

    /// Notes that a tenant limit refused the request: for its record and the metrics.
    fn refuse(&self, tenant: &str, refused: Refused, ctx: &mut RequestCtx) {
        debug!(
            "tenant={tenant} over its {} limit; retry after {:?}",
            refused.limit.as_str(),
            refused.retry_after
        );
        self.meter.count_limited(tenant, refused.limit);
        ctx.limited = Some(refused);
    }

    /// Its requests in flight (what a shutdown drains).
    pub fn in_flight(&self) -> &Arc<InFlight> {
        &self.in_flight
    }
}

/// Time on the clock the tenant limits run on (from the first request).
fn since_start() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// The usage of an answer: read as its body passes, then what was read.
#[derive(Debug)]
// Both live in the (boxed) request context, one after the other.
#[allow(clippy::large_enum_variant)]
enum Metered {
    Reading(UsageExtractor),
    Read(Extraction),
}

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    first_byte: Option<Instant>,
    /// The generation this request routes on, from `request_filter` to `logging`.
    snapshot: Option<Arc<Snapshot>>,
    caller: Option<Caller>,
    /// The tenant of a refused request whose API key was valid.
    refused_tenant: Option<Arc<str>>,
    attempts: Attempts,
    /// The current (last) attempt's receipt.
    route: Option<Route<Upstream>>,
    /// No replica could take the request.
    unavailable: bool,
    /// An attempt failed in the TLS handshake with its replica (a certificate the replica's
    /// `tls.ca_file` does not sign, a client certificate the replica refused): if no replica
    /// is left, the client is told that rather than "none available".
    tls_failure: Option<ErrorType>,
    /// The current attempt's response header went on to the client: no retry after this.
    answered: bool,
    /// The current attempt's replica answered this status, which is being retried elsewhere.
    retried_status: Option<u16>,
    /// Where the session key came from.
    key_source: Option<KeySource>,
    rewrite: Option<BodyRewrite>,
    /// When the request body must have arrived by (`request_bodies.deadline`), while it is
    /// still arriving; and the downstream read timeout it replaced, restored at its end.
    body_deadline: Option<(Instant, Option<Duration>)>,
    /// The body missed its deadline: the client is answered 408.
    body_timed_out: bool,
    /// Counts the body read ahead in the memory budget until the context drops.
    body_reservation: Option<BodyReservation>,
    /// A prefix of the body read ahead that Pingora does not send (it overflowed the retry
    /// buffer): it goes upstream ahead of the first piece of the rest.
    unsent_prefix: Option<Bytes>,
    /// Usage was injected into the request body.
    injected: bool,
    /// The answer's usage, being read or read.
    metered: Option<Metered>,
    /// The answer says it is JSON or SSE: a body that does not parse as such is the
    /// replica's failure.
    claims_structured: bool,
    /// Hides the injected usage event from the client.
    strip_usage: Option<UsageChunkFilter>,
    /// The tenant limit that refused the request.
    limited: Option<Refused>,
    /// Counts the request against its tenant's `max_concurrent` until the context drops.
    _tenant_permit: Option<InFlightPermit>,
    /// Counts the request in flight until the context drops, after `logging`.
    _in_flight: InFlightGuard,
}

impl RequestCtx {
    fn new(in_flight: InFlightGuard) -> Self {
        RequestCtx {
            started: Instant::now(),
            first_byte: None,
            snapshot: None,
            caller: None,
            refused_tenant: None,
            attempts: Attempts::default(),
            route: None,
            unavailable: false,
            tls_failure: None,
            answered: false,
            retried_status: None,
            key_source: None,
            rewrite: None,
            body_deadline: None,
            body_timed_out: false,
            body_reservation: None,
            unsent_prefix: None,
            injected: false,
            metered: None,
            claims_structured: false,
            strip_usage: None,
            limited: None,
            _tenant_permit: None,
            _in_flight: in_flight,
        }
    }

    /// The limits and properties the retry policy reads.
    fn retry_limits(&self, session: &Session) -> RetryLimits {
        let req = session.req_header();
        let snapshot = self.snapshot.as_deref();
        RetryLimits {
            resend_safe: snapshot.is_some_and(|s| s.resend_safe(&req.method, req.uri.path())),
            // A prefix not sent yet is still whole, in front of the rest still unread.
            body_replayable: !session.as_ref().retry_buffer_truncated()
                || self.unsent_prefix.is_some(),
            max_attempts: snapshot.map_or(0, |s| s.failover().max_attempts),
            past_deadline: snapshot.is_none_or(|s| self.started.elapsed() >= s.failover().deadline),
        }
    }

    /// Tells the current receipt that its attempt failed and asks the retry policy.
    fn attempt_failed(&mut self, session: &Session, failure: Failure) -> Retry {
        let limits = self.retry_limits(session);
        let Some(route) = self.route.as_mut() else {
            return Retry::GiveUp;
        };
        route.failed(failure, now_ms());
        self.attempts.after_failure(route, failure, limits)
    }
}

/// The log target of the line where Pingora prints each request it sends upstream, headers
/// and all.
const PINGORA_REQUEST_DUMP: &str = "pingora_proxy::proxy_h1";

/// Which [`Failure`] a Pingora error during proxying is.
fn classify(e: &Error, answered: bool, retried_status: Option<u16>, reused: bool) -> Failure {
    match Aborted::of(e) {
        Some(Aborted::Cut) => return Failure::Shutdown,
        Some(Aborted::Departed) if !answered => return Failure::Departed,
        _ => {}
    }
    let upstream = e.esource() != &ErrorSource::Downstream;
    match (answered, retried_status) {
        (true, _) if e.esource() == &ErrorSource::Upstream => Failure::AfterAnswer,
        (true, _) => Failure::Client,
        (false, Some(code)) => Failure::Status(code),
        (false, None) if !upstream => Failure::Client,
        (false, None) => match e.etype() {
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                if reused =>
            {
                Failure::StaleConnection
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
            _ => Failure::Broken,
        },
    }
}

/// Whether a connect error is the TLS handshake's.
fn is_tls_failure(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::TLSHandshakeFailure
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::TLSWantX509Lookup
    )
}

/// Whether `e` was caused by TLS (rustls) rather than by the request: with TLS 1.3 a replica
/// refuses a client certificate only after the handshake, so it shows as a failed read with a
/// TLS alert as its cause (or, when the replica closed first, as a failed write, which says
/// nothing about TLS and is not recognised).
fn caused_by_tls(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.cause.as_deref().map(|c| c as _);
    // Bounded: a cause chain is short, and this never loops on a cycle.
    for _ in 0..8 {
        let Some(c) = cause else {
            return false;
        };
        if c.is::<rustls::Error>() {
            return true;
        }
        // Pingora keeps a cause as it was given: an `Error` or a boxed one.
        let pingora = c
            .downcast_ref::<Error>()
            .or_else(|| c.downcast_ref::<Box<Error>>().map(|b| &**b));
        cause = if let Some(p) = pingora {
            p.cause.as_deref().map(|c| c as _)
        } else if let Some(io) = c.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|inner| inner as _)
        } else {
            c.source()
        };
    }
    false
}

/// What the client is told when proxying failed (`None`: the client is gone, say nothing).
fn edge_error(e: &Error, unavailable: bool, retry_after_secs: u32) -> Option<EdgeError> {
    if unavailable {
        return Some(EdgeError::NoReplicaAvailable { retry_after_secs });
    }
    Some(match (e.etype(), e.esource()) {
        // Every replica tried refused or timed out the connection.
        (
            ErrorType::ConnectRefused
            | ErrorType::ConnectTimedout
            | ErrorType::ConnectError
            | ErrorType::ConnectNoRoute,
            _,
        ) => EdgeError::NoReplicaAvailable { retry_after_secs },
        (ErrorType::HTTPStatus(code), _) => EdgeError::UpstreamStatus(*code),
        (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => {
            EdgeError::UpstreamTimeout
        }
        (etype, ErrorSource::Upstream) => EdgeError::UpstreamFailed(etype.as_str()),
        (
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => return None,
        (ErrorType::ReadTimedout, ErrorSource::Downstream) => EdgeError::RequestTimeout,
        (etype, ErrorSource::Downstream) => EdgeError::BadRequest(etype.as_str()),
        _ => EdgeError::Internal,
    })
}

/// Whether a `Content-Type` promises JSON or an event stream (what the usage extractor
/// parses), so that a body failing to parse is malformed rather than another kind of answer.
fn claims_structured(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let suffix = essence
        .len()
        .checked_sub(5)
        .and_then(|at| essence.get(at..));
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/event-stream")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

/// Whether the request failed because its client went away (closed or reset the connection
/// while the request or its response was under way): something clients do, not a fault.
fn client_left(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        )
}

/// `Retry-After` as delay-seconds (RFC 9110 §10.2.3). The HTTP-date form is rare from
/// inference servers and would need the clocks to agree; it falls back to the default.
fn parse_retry_after(value: &[u8]) -> Option<Duration> {
    let seconds: u64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

impl TetherProxy {
    /// The cache-loss detector's part of a finished 2xx: stores this turn's prompt size in
    /// the session's override entry (for its next turn) and, for a sticky turn, returns how
    /// many cached tokens the replica should have reported and counts what it did report.
    /// The previous size is the one this instance stored: in a tier, a turn whose previous
    /// turn another instance served finds none (or an older one, a lower expectation) and is
    /// not judged.
    fn expect_cached(
        &self,
        snapshot: &Snapshot,
        route: &Route<Upstream>,
        key: Option<RoutingKey>,
        usage: &tether_metering::Usage,
    ) -> Option<u64> {
        let replica = route.replica();
        let previous = snapshot.fleet().overrides().exchange_prompt_tokens(
            key?,
            replica.tag(),
            usage.prompt_tokens,
        )?;
        if route.outcome() != Outcome::Sticky {
            return None;
        }
        let settings = snapshot.cache_loss();
        let expected = tether_metering::expected_cached_tokens(
            previous,
            usage.prompt_tokens?,
            settings.block_tokens,
        );
        let reported = usage.cached_tokens?;
        if expected == 0 {
            return None;
        }
        self.meter
            .observe_cache(replica.id(), expected, reported, settings);
        Some(expected)
    }

    /// The request's session key and its source (see [`crate::session_key`]). The body is
    /// read ahead only when a body source is reached, or to carry a new token over to the
    /// replica its conversation's fingerprint is bound to.
    async fn session_key(
        &self,
        snapshot: &Snapshot,
        caller: &Caller,
        session: &mut Session,
        read_ahead: &mut ReadAhead,
    ) -> Result<(Option<RoutingKey>, Option<KeySource>)> {
        let access = snapshot.access();
        let fingerprints = access.key_sources.contains(&KeySource::Fingerprint);
        let first = resolve(access, caller, session.req_header(), BodyView::NotRead);
        let carry_over = |found: Found| match found {
            Found::Key(key, source) => {
                fingerprints
                    && source != KeySource::Fingerprint
                    && snapshot.fleet().overrides().get(key).is_none()
            }
            _ => false,
        };
        if first.found != Found::NeedsBody && !carry_over(first.found) {
            self.count_ignored(&first);
            return Ok(found_key(first.found));
        }
        let body = if json_post(session.req_header()) {
            read_ahead.body(session, ReadFor::Keys).await?
        } else {
            BodyRead::Unread
        };
        let keys = match &body {
            BodyRead::Whole(raw) => BodyKeys::parse(raw),
            BodyRead::Prefix(raw) => BodyKeys::parse_prefix(raw),
            BodyRead::Unread => None,
        };
        let view = keys.as_ref().map_or(BodyView::Unavailable, BodyView::Read);
        let resolution = match first.found {
            Found::NeedsBody => resolve(access, caller, session.req_header(), view),
            _ => first,
        };
        self.count_ignored(&resolution);
        if let (Found::Key(key, _), true, Some(keys)) =
            (resolution.found, carry_over(resolution.found), &keys)
        {
            if let Some(fingerprint) = access.fingerprinter.fingerprint(caller.scope, keys) {
                snapshot.fleet().carry_over(key, fingerprint);
            }
        }
        Ok(found_key(resolution.found))
    }

    fn count_ignored(&self, resolution: &Resolution) {
        for source in resolution.ignored() {
            self.meter.count_ignored_key(source);
        }
    }
}

/// A POST whose body may be JSON (no content type, or a JSON one).
fn json_post(req: &RequestHeader) -> bool {
    req.method == http::Method::POST
        && req.headers.get(http::header::CONTENT_TYPE).is_none_or(|v| {
            v.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"))
        })
}

fn found_key(found: Found) -> (Option<RoutingKey>, Option<KeySource>) {
    match found {
        Found::Key(key, source) => (Some(key), Some(source)),
        Found::NeedsBody | Found::None => (None, None),
    }
}

#[async_trait]
impl ProxyHttp for TetherProxy {
    /// Boxed: Pingora keeps the context in each request's future, which it moves into place
    /// for every request; a pointer moves instead of the context.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::new(RequestCtx::new(self.in_flight.enter()))
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<bool> {
        if self.draining.load(Ordering::Relaxed) {
            // `Connection: close` on the answer: the client's next request opens a new
            // connection (to the new process) instead of racing this one's close.
            session.set_keepalive(None);
        }
        let snapshot = self.router.snapshot();
        // Kept for refused requests too: they get a usage record like every other.
        ctx.snapshot = Some(Arc::clone(&snapshot));
        let caller = match admit(snapshot.access(), session.req_header()) {
            Admission::Admit(caller) => caller,
            Admission::Reject { error, tenant } => {
                ctx.refused_tenant = tenant;
                error.send(session, true).await?;
                return Ok(true);
            }
        };
        match caller.usage.admit(&caller.limits, since_start()) {
            Ok(permit) => ctx._tenant_permit = permit,
            Err(refused) => {
                let tenant = Arc::clone(&caller.tenant);
                ctx.attempts = Attempts::new(None, Some(caller.scope));
                ctx.caller = Some(caller);
                self.refuse(&tenant, refused, ctx);
                EdgeError::from(refused).send(session, true).await?;
                return Ok(true);
            }
        }
        let req = session.req_header();
        if snapshot.resend_safe(&req.method, req.uri.path()) {
            // Keep the body (up to Pingora's retry buffer) so a replica that fails before
            // answering can be replaced.
            session.enable_retry_buffering();
        }
        // Kept before the body is read: a request that fails reading it is still logged under
        // its tenant.
        let scope = caller.scope;
        ctx.attempts = Attempts::new(None, Some(scope));
        let caller = &*ctx.caller.insert(caller);
        // Every read of the body, the read-ahead's included, ends by the body's deadline.
        let deadline = snapshot.request_bodies().deadline;
        let downstream = session.as_downstream_mut();
        ctx.body_deadline = Some((ctx.started + deadline, downstream.get_read_timeout()));
        downstream.set_read_timeout(Some(deadline));
        let reservation = BodyReservation::new(
            Arc::clone(self.router.body_budget()),
            Arc::clone(&caller.usage),
        );
        let mut read_ahead = ReadAhead::new(reservation, *snapshot.request_bodies());
        let (key, source) = self
            .session_key(&snapshot, caller, session, &mut read_ahead)
            .await?;
        ctx.key_source = source;
        ctx.attempts = Attempts::new(key, Some(scope));
        ctx.rewrite = BodyRewrite::prepare(&snapshot, session, &mut read_ahead).await?;
        if let Some(limit) = read_ahead.refused() {
            let tenant = ctx.caller.as_ref().map_or("-", |c| &*c.tenant);
            debug!(
                "tenant={tenant}: request body over the {} memory budget; not read ahead",
                limit.as_str()
            );
            self.meter.count_body_over_budget(tenant, limit);
        }
        let (reservation, unsent_prefix) = read_ahead.into_parts();
        ctx.body_reservation = Some(reservation);
        ctx.unsent_prefix = unsent_prefix;
        ctx.injected = ctx.rewrite.as_ref().is_some_and(BodyRewrite::injected);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = Arc::clone(ctx.snapshot.get_or_insert_with(|| self.router.snapshot()));
        // A retry replays the raw request body through `request_body_filter`.
        ctx.answered = false;
        ctx.retried_status = None;
        if let Some(rewrite) = &mut ctx.rewrite {
            rewrite.restart();
            ctx.injected = rewrite.injected();
        }
        // The previous attempt's slot is released before the next is taken; its receipt
        // stays for the record until another replica is chosen.
        if let Some(previous) = &mut ctx.route {
            previous.finished();
        }
        // First attempt of a keyed request this instance has no entry for: another instance
        // may have placed the session (bounded wait; a miss or a failure routes as new).
        if let (Some(tier), Some(key), 0) = (&self.tier, ctx.attempts.key(), ctx.attempts.total()) {
            if !snapshot.fleet().knows(key) {
                tier.recall(snapshot.fleet().state(), key).await;
            }
        }
        // A session no instance knows is a new one: its tenant's new-session rate applies.
        if let (Some(key), 0, Some(caller)) =
            (ctx.attempts.key(), ctx.attempts.total(), &ctx.caller)
        {
            // The table lookup only when there is a limit to apply.
            if caller.limits.new_sessions.is_some() && !snapshot.fleet().knows(key) {
                if let Err(refused) = caller.usage.start_session(&caller.limits, since_start()) {
                    let tenant = Arc::clone(&caller.tenant);
                    self.refuse(&tenant, refused, ctx);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(429),
                        "the tenant's new-session limit",
                    ));
                }
            }
        }
        let Some(route) = snapshot.fleet().route(&mut ctx.attempts, now_ms()) else {
            ctx.unavailable = true;
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no replica available in any region",
            ));
        };
        let peer = Box::new(route.replica().upstream().peer.clone());
        ctx.route = Some(route);
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Box<RequestCtx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match e.etype() {
            ErrorType::ConnectRefused => Failure::Refused,
            _ => Failure::ConnectFailed,
        };
        if is_tls_failure(e.etype()) {
            // Almost always configuration (CA, server name, client certificate), so an
            // operator must see it: at warn, with the replica and rustls's reason.
            let replica = ctx
                .route
                .as_ref()
                .map_or("?", |r| r.replica().id().as_ref());
            log::warn!("TLS to replica {replica} ({peer}) failed: {e}");
            ctx.tls_failure = Some(e.etype().clone());
        }
        let retry = ctx.attempt_failed(session, failure) != Retry::GiveUp;
        if retry {
            debug!("connect to {peer} failed ({e}); trying the next replica");
            self.meter.count_retry(failure.retry_reason());
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<RequestCtx>,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let failure = classify(&e, ctx.answered, ctx.retried_status, client_reused);
        if !ctx.answered && caused_by_tls(&e) {
            let replica = ctx
                .route
                .as_ref()
                .map_or("?", |r| r.replica().id().as_ref());
            log::warn!("TLS to replica {replica} failed: {e}");
            ctx.tls_failure = Some(ErrorType::TLSHandshakeFailure);
        }
        let retry = ctx.attempt_failed(session, failure);
        if retry != Retry::GiveUp {
            debug!("{e}: trying again ({retry:?})");
            self.meter.count_retry(failure.retry_reason());
        }
        e.set_retry(retry != Retry::GiveUp);
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        // The replica left rotation between its choice and now (the connect took a while, or
        // an operator drained it at once): the request has not gone out, so it moves now
        // rather than waiting on a replica known to be gone. From here on, a departure is
        // the watched connection's to notice (`upstream_io`).
        if ctx
            .route
            .as_ref()
            .is_some_and(|r| r.departed_since_chosen())
        {
            return Err(Aborted::Departed.into_error());
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        let Some(snapshot) = ctx.snapshot.as_deref() else {
            return Ok(());
        };
        // The tenant's API key is a credential for Tether, not for the fleet, in whichever
        // header it came; a replica that needs its own gets it from the configuration.
        if snapshot.access().requires_api_key() {
            upstream_request.remove_header(&http::header::AUTHORIZATION);
            upstream_request.remove_header("x-api-key");
        }
        // Tether answered the client's `Expect: 100-continue` and has read the body: the
        // replica has nothing to wait for.
        if session.response_written().is_some_and(|r| r.status == 100) {
            upstream_request.remove_header(&http::header::EXPECT);
        }
        // Pingora prints the request it sends at debug level: a sensitive value prints as
        // `Sensitive`, so the session token reaches no log. Pingora's header API can only
        // mark it by taking the header out and putting it back, which costs a header parse
        // and two map insertions per request, so it is done only when that line would be
        // written. (Repeats of the header all carry the same value, or admission refused
        // the request: one is kept.)
        let header = &snapshot.access().header;
        if log::log_enabled!(target: PINGORA_REQUEST_DUMP, log::Level::Debug) {
            if let Some(mut token) = upstream_request.remove_header(header) {
                token.set_sensitive(true);
                upstream_request.insert_header(header.clone(), token)?;
            }
        }
        if let Some(credential) = ctx
            .route
            .as_ref()
            .and_then(|r| r.replica().upstream().credential.as_ref())
        {
            upstream_request.insert_header(credential.name.clone(), credential.value.clone())?;
        }
        // Metering reads usage out of response bodies, so ask for them uncompressed: token
        // streams compress poorly and replicas sit on a fast network, so identity costs little
        // and saves decoding every response. Without the header a server may not compress.
        if snapshot.metering()
            && upstream_request
                .headers
                .get(http::header::ACCEPT_ENCODING)
                .is_some_and(|v| v.as_bytes() != b"identity")
        {
            upstream_request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        }
        if let Some(rewrite) = &ctx.rewrite {
            rewrite.frame(upstream_request)?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        if let Some((deadline, before)) = ctx.body_deadline {
            let downstream = session.as_downstream_mut();
            if end_of_stream {
                // The body is in: the connection's next request reads as it did before.
                downstream.set_read_timeout(before);
                ctx.body_deadline = None;
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    ctx.body_timed_out = true;
                    return Error::e_explain(
                        ErrorType::ReadTimedout,
                        "the request body did not arrive within request_bodies.deadline",
                    )
                    .map_err(|e| e.into_down());
                }
                // The next read waits no longer than what is left of the deadline.
                downstream.set_read_timeout(Some(left));
            }
        }
        send_unsent_prefix(&mut ctx.unsent_prefix, body);
        let Some(rewrite) = &mut ctx.rewrite else {
            return Ok(());
        };
        if rewrite.filter(body, end_of_stream) == Step::Injected {
            ctx.injected = true;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        let code = upstream_response.status.as_u16();
        let retry_after = upstream_response
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| parse_retry_after(v.as_bytes()));
        let limits = ctx.retry_limits(session);
        let Some(route) = ctx.route.as_mut() else {
            return Ok(());
        };
        // A metered 2xx is parsed to its end: whether the replica did well waits for that.
        let metering = ctx.snapshot.as_deref().is_some_and(Snapshot::metering);
        if metering {
            route.answered_body_to_judge(code, retry_after, now_ms());
        } else {
            route.answered(code, retry_after, now_ms());
        }
        // Overloaded or a gateway failure: nothing has reached the client yet, so another
        // replica may answer instead (when the policy allows).
        if matches!(code, 429 | 502 | 503 | 504)
            && ctx.attempts.would_retry(Failure::Status(code), limits)
        {
            ctx.retried_status = Some(code);
            return Err(Error::explain(
                ErrorType::HTTPStatus(code),
                format!("replica {} answered {code}", route.replica().id()),
            ));
        }
        ctx.answered = true;
        if let Some(name) = ctx.snapshot.as_deref().and_then(Snapshot::outcome_header) {
            let status = http::HeaderValue::from_static(route.session_status().as_str());
            insert_uncased(upstream_response, name, status);
        }
        if metering && upstream_response.status.is_success() {
            let dialect = route
                .replica()
                .upstream()
                .dialect
                .unwrap_or_else(|| Dialect::from_path(session.req_header().uri.path()));
            let content_type = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            ctx.claims_structured = content_type.is_some_and(claims_structured);
            let framing = content_type.map_or(Framing::Json, Framing::from_content_type);
            ctx.metered = Some(Metered::Reading(UsageExtractor::new(dialect, framing)));
            if ctx.injected && framing == Framing::Sse {
                ctx.strip_usage = Some(UsageChunkFilter::new(DEFAULT_WINDOW));
                // The body shrinks: it cannot keep a fixed length. (Streams nearly always
                // arrive chunked already, with nothing to change.)
                let headers = &upstream_response.headers;
                let chunked = headers
                    .get(http::header::TRANSFER_ENCODING)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
                if !chunked || headers.contains_key(http::header::CONTENT_LENGTH) {
                    upstream_response.remove_header(&http::header::CONTENT_LENGTH);
                    upstream_response.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                }
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Option<Duration>> {
        if let Some(chunk) = body.as_ref().filter(|b| !b.is_empty()) {
            ctx.first_byte.get_or_insert_with(Instant::now);
            if let Some(Metered::Reading(x)) = &mut ctx.metered {
                x.feed(chunk);
            }
        }
        // Meter first, then hide the usage event the client did not ask for.
        if let Some(filter) = &mut ctx.strip_usage {
            let had_body = body.is_some();
            let kept = filter.filter(body.take().unwrap_or_default(), end_of_stream);
            if had_body || !kept.is_empty() {
                *body = Some(kept);
            }
        }
        // The replica is done once its body ends: release the slot before the last bytes
        // reach the client (`logging` runs later).
        if end_of_stream {
            if let Some(metered) = &mut ctx.metered {
                if let Metered::Reading(x) = metered {
                    *metered = Metered::Read(x.finish());
                }
            }
            if let Some(route) = &mut ctx.route {
                // A 200 whose body is not the JSON or SSE it claims counts as a failure.
                let malformed = matches!(
                    &ctx.metered,
                    Some(Metered::Read(x)) if x.outcome == UsageOutcome::Malformed
                );
                let sound = !ctx.claims_structured || !malformed;
                route.body_ended(sound, now_ms());
                route.finished();
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<RequestCtx>,
    ) -> FailToProxy {
        let retry_after = ctx.snapshot.as_deref().map_or(1, |s| {
            u32::try_from(s.retry_after_hint().as_secs()).unwrap_or(u32::MAX)
        });
        // A read that timed out while the body was still arriving: the body's deadline passed
        // (every such read waits at most until it).
        if ctx.body_deadline.is_some() && e.etype() == &ErrorType::ReadTimedout {
            ctx.body_timed_out = true;
        }
        if ctx.body_timed_out {
            let tenant = ctx.caller.as_ref().map_or("-", |c| &*c.tenant);
            let deadline = ctx
                .snapshot
                .as_deref()
                .map(|s| s.request_bodies().deadline)
                .unwrap_or_default();
            log::warn!(
                "tenant={tenant}: request body not complete within {}; answered 408",
                humantime::format_duration(deadline)
            );
            self.meter.count_body_timeout(tenant);
        }
        let error = match (ctx.limited, &ctx.tls_failure) {
            (Some(refused), _) => Some(EdgeError::from(refused)),
            _ if ctx.body_timed_out => Some(EdgeError::RequestTimeout),
            (None, Some(tls)) if ctx.unavailable || e.esource() == &ErrorSource::Upstream => {
                Some(EdgeError::UpstreamFailed(tls.as_str()))
            }
            _ => edge_error(e, ctx.unavailable, retry_after),
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
            error_code: error.status(),
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Box<RequestCtx>, e: &Error) -> bool {
        // Clients leaving mid-stream, the shutdown's cut, tenants over their limits and bodies
        // past their deadline (logged at warn with their tenant) are counted (metrics, the
        // drain's summary) rather than logged one by one at error level.
        let body_late = ctx.body_timed_out
            || (ctx.body_deadline.is_some() && e.etype() == &ErrorType::ReadTimedout);
        let expected = client_left(e)
            || Aborted::of(e) == Some(Aborted::Cut)
            || ctx.limited.is_some()
            || body_late;
        if expected {
            debug!("request ended early: {e}");
        }
        expected
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<RequestCtx>) {
        if let Some(route) = &mut ctx.route {
            route.finished();
        }
        if e.is_some_and(client_left) {
            self.meter.count_client_disconnect();
        }
        let Some(snapshot) = ctx.snapshot.as_deref().filter(|s| s.metering()) else {
            return;
        };
        let latency = ctx.started.elapsed();
        // A `100 Continue` alone is no answer: the request ended before one.
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .filter(|s| *s >= 200)
            .unwrap_or(0);
        // Finished at the body's end; a body that broke off is finished here.
        let mut extraction = match ctx.metered.take() {
            Some(Metered::Read(x)) => Some(x),
            Some(Metered::Reading(mut x)) => Some(x.finish()),
            None => None,
        };
        let usage = extraction.as_ref().map(|x| x.usage).unwrap_or_default();
        let model = extraction.as_mut().and_then(|x| x.model.take());
        let cost = snapshot.price(model.as_deref()).cost(&usage);
        // Cut at the end of a shutdown's drain: whatever usage was read so far (an Anthropic
        // stream's input tokens, a vLLM stream's running counts) is kept, and said to be
        // incomplete, since the replica never finished.
        let cut = e.and_then(Aborted::of) == Some(Aborted::Cut) && extraction.is_some();
        let usage_status = if cut {
            UsageStatus::Incomplete
        } else {
            UsageStatus::of(extraction.as_ref(), e.is_some())
        };
        let route = ctx.route.as_ref();
        let expected_cached_tokens = route
            .filter(|_| (200..300).contains(&status))
            .and_then(|route| self.expect_cached(snapshot, route, ctx.attempts.key(), &usage));
        let tenant = ctx
            .caller
            .as_ref()
            .map(|c| &c.tenant)
            .or(ctx.refused_tenant.as_ref());
        let record = UsageRecord {
            ts: Timestamp::now(),
            tenant: tenant.map_or_else(|| Arc::from("-"), Arc::clone),
            session: ctx.attempts.key().map(|k| self.meter.session_hash(k)),
            model,
            region: route.map(|r| Arc::clone(r.replica().region())),
            replica: route.map(|r| Arc::clone(r.replica().id())),
            outcome: route.map(Route::outcome),
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
            attempts: ctx.attempts.total(),
            usage_status,
            cache_write_tokens: usage.cache_write_tokens,
            key_source: ctx.key_source,
            cache_write_5m_tokens: usage.cache_write_5m_tokens,
            cache_write_1h_tokens: usage.cache_write_1h_tokens,
            limit: ctx.limited.map(|r| r.limit),
            expected_cached_tokens,
        };
        debug!(
            "tenant={} outcome={} replica={} status={status} attempts={} usage={usage_status}{}",
            record.tenant,
            record.outcome.map_or("-", |o| o.as_str()),
            record.replica.as_deref().unwrap_or("-"),
            record.attempts,
            e.map(|e| format!(" error={e}")).unwrap_or_default(),
        );
        self.meter.finish(record, latency);
    }
}

#[cfg(test)]
mod tests;
