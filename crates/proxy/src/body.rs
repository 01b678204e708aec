//! Reading a small request body ahead ([`ReadAhead`]), and adding
//! `stream_options.include_usage` to streaming chat requests, so that every stream reports
//! its usage (the client never sees the extra event: see `UsageChunkFilter`).
//!
//! A small body with a `Content-Length` is read whole in `request_filter` (Pingora's retry
//! buffer keeps it and replays it, byte for byte, on every attempt): session keys in the body
//! are read from it before a replica is chosen, and a rewrite knows its final length before
//! the upstream header goes out, so the framing stays `Content-Length`. Nothing else is read
//! ahead: a chunked body or one over [`READ_AHEAD_LIMIT`] streams on untouched (reading
//! more than the retry buffer holds would lose what was read), and a rewrite collects it on
//! its way through `request_body_filter`, framed chunked.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora_proxy::Session;
use tether_metering::ensure_stream_usage;

use tether_topology::RequestBodySettings;

use crate::body_budget::{BodyReservation, OverBudget};
use crate::router::Snapshot;

/// Largest chat request body Tether buffers to add `stream_options.include_usage`; a larger
/// one is forwarded untouched (its stream may then report no usage).
pub const MAX_REWRITE_BODY: usize = 16 << 20;

/// Largest body read ahead in `request_filter`: Pingora's retry buffer, which replays it,
/// holds this much and drops everything beyond.
pub const READ_AHEAD_LIMIT: usize = 64 << 10;

/// The request body, read ahead at most once per request and shared by whoever needs it
/// before a replica is chosen.
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// `None` until tried; then the body, or `None` when it is not read ahead.
    body: Option<Option<Bytes>>,
}

impl ReadAhead {
    /// The whole body when it has a `Content-Length` of 1..=[`READ_AHEAD_LIMIT`] bytes, read
    /// on the first call; `None` for any other body, which is left to stream.
    pub async fn body(&mut self, session: &mut Session) -> Result<Option<Bytes>> {
        if let Some(body) = &self.body {
            return Ok(body.clone());
        }
        let body = read_small_body(session).await?;
        self.body = Some(body.clone());
        Ok(body)
    }

    /// Whether the body was read ahead (Pingora replays it from its retry buffer).
    pub fn was_read(&self) -> bool {
        matches!(self.body, Some(Some(_)))
    }
}

async fn read_small_body(session: &mut Session) -> Result<Option<Bytes>> {
    let req = session.req_header();
    let length = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let Some(length) = length.filter(|n| !chunked && *n > 0 && *n <= READ_AHEAD_LIMIT) else {
        return Ok(None);
    };
    session.enable_retry_buffering();
    if expects_continue(session.req_header()) {
        // The client waits for this before sending the body (curl gives up waiting after a
        // second); Pingora only relays a replica's, and the body is read here first.
        let go_on = ResponseHeader::build(100, Some(0))?;
        session
            .write_response_header(Box::new(go_on), false)
            .await?;
    }
    let mut raw = Vec::with_capacity(length);
    // Errors here are the client's (a body that stalls or breaks off), as they are when
    // Pingora reads a body on its way upstream.
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| e.into_down())?
    {
        raw.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(raw)))
}

/// Whether the client waits for `100 Continue` before it sends the body.
pub fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A chat request body being rewritten.
#[derive(Debug, Default)]
pub struct BodyRewrite {
    buffer: Vec<u8>,
    /// Gave up (too large, or over the memory budget): the rest passes through.
    passthrough: bool,
    /// The final body, when it was read ahead: sent instead of what Pingora replays.
    ready: Option<Bytes>,
    /// The collected body needed the field (set at its end).
    collected_injected: bool,
    /// The bytes of `buffer`, counted in the memory budget, and its limits (`None`: only
    /// [`MAX_REWRITE_BODY`] applies).
    budget: Option<(BodyReservation, RequestBodySettings)>,
}

/// What one piece of a collected body did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Held (not the end), passed on untouched, or the end of a body that needed nothing.
    Forwarded,
    /// The end of the body, with the usage option added.
    Injected,
    /// Collecting stopped here: what was held and the rest go on unchanged.
    GaveUp(GaveUp),
}

/// Why a body stopped being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// Over [`MAX_REWRITE_BODY`].
    TooLarge,
    /// Holding more would go over the memory budget.
    OverBudget(OverBudget),
}

impl BodyRewrite {
    /// Decides whether this request's body may need the usage option, and reads a small one
    /// ahead. `None`: the body passes through as it is.
    pub async fn prepare(
        snapshot: &Snapshot,
        session: &mut Session,
        read_ahead: &mut ReadAhead,
        reservation: BodyReservation,
    ) -> Result<Option<Self>> {
        let req = session.req_header();
        if !(snapshot.inject_stream_usage()
            && req.method == http::Method::POST
            && req.uri.path().ends_with("/chat/completions"))
        {
            return Ok(None);
        }
        let Some(raw) = read_ahead.body(session).await? else {
            return Ok(Some(BodyRewrite {
                budget: Some((reservation, *snapshot.request_bodies())),
                ..BodyRewrite::default()
            }));
        };
        // Unchanged bodies (the client asked for usage, or is not streaming) need no
        // rewrite: the retry buffer replays them as they came.
        Ok(ensure_stream_usage(&raw).map(|ready| BodyRewrite {
            ready: Some(Bytes::from(ready)),
            ..BodyRewrite::default()
        }))
    }

    /// Whether the body that goes upstream carries the injected option (known at once for a
    /// body read ahead, at its end for one collected on the way).
    pub fn injected(&self) -> bool {
        self.ready.is_some() || self.collected_injected
    }

    /// A new attempt: Pingora replays the raw body from the start.
    pub fn restart(&mut self) {
        self.release();
        self.passthrough = false;
        self.collected_injected = false;
    }

    /// Gives the buffer and its reservation back.
    fn release(&mut self) {
        self.buffer = Vec::new();
        if let Some((reservation, _)) = &mut self.budget {
            reservation.release();
        }
    }

    /// Sets the upstream request's framing for the body that will be sent.
    pub fn frame(&self, upstream_request: &mut RequestHeader) -> Result<()> {
        match &self.ready {
            // Read ahead: the final body and its length are known.
            Some(ready) => {
                upstream_request
                    .insert_header(http::header::CONTENT_LENGTH, ready.len().to_string())?;
            }
            // Collected on the way: the body may grow, so Pingora frames it chunked.
            None => {
                upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            }
        }
        Ok(())
    }

    /// Rewrites one piece of the request body in place.
    pub fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Step {
        if self.passthrough {
            return Step::Forwarded;
        }
        if let Some(ready) = &self.ready {
            // Pingora replays the read-ahead body here, whole, on every attempt; send the
            // final body instead.
            *body = Some(if end_of_stream {
                ready.clone()
            } else {
                Bytes::new()
            });
            return Step::Forwarded;
        }
        if let Some(chunk) = body.take() {
            let gave_up = if self.buffer.len() + chunk.len() > MAX_REWRITE_BODY {
                Some(GaveUp::TooLarge)
            } else if let Some((reservation, limits)) = &mut self.budget {
                reservation
                    .grow(chunk.len(), limits)
                    .err()
                    .map(GaveUp::OverBudget)
            } else {
                None
            };
            if let Some(why) = gave_up {
                // What was held goes on first, then this piece, unchanged.
                let mut out = std::mem::take(&mut self.buffer);
                out.extend_from_slice(&chunk);
                self.passthrough = true;
                self.release();
                *body = Some(Bytes::from(out));
                return Step::GaveUp(why);
            }
            self.buffer.extend_from_slice(&chunk);
        }
        if !end_of_stream {
            // Held back until the whole body is here. `Some(empty)`, not `None`: `None` would
            // end the upstream body.
            *body = Some(Bytes::new());
            return Step::Forwarded;
        }
        let raw = std::mem::take(&mut self.buffer);
        self.release();
        match ensure_stream_usage(&raw) {
            Some(rewritten) => {
                *body = Some(Bytes::from(rewritten));
                self.collected_injected = true;
                Step::Injected
            }
            None => {
                *body = Some(Bytes::from(raw));
                Step::Forwarded
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::body_budget::BodyBudget;
    use crate::limits::TenantUsage;

    const STREAMING: &[u8] = br#"{"model":"m","stream":true,"messages":[]}"#;

    fn run(rewrite: &mut BodyRewrite, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut body = Some(Bytes::copy_from_slice(piece));
            rewrite.filter(&mut body, i + 1 == pieces.len());
            out.extend_from_slice(&body.unwrap_or_default());
        }
        out
    }

    #[test]
    fn a_collected_streaming_body_gains_the_usage_option_at_its_end() {
        let mut rewrite = BodyRewrite::default();
        let (a, b) = STREAMING.split_at(10);
        let out = run(&mut rewrite, &[a, b]);
        assert!(rewrite.injected());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn a_body_that_needs_nothing_passes_unchanged() {
        let mut rewrite = BodyRewrite::default();
        let plain = br#"{"model":"m","messages":[]}"#;
        assert_eq!(run(&mut rewrite, &[plain]), plain);
        assert!(!rewrite.injected());
    }

    #[test]
    fn a_read_ahead_body_is_replaced_on_every_attempt() {
        let mut rewrite = BodyRewrite {
            ready: Some(Bytes::from_static(b"final")),
            ..BodyRewrite::default()
        };
        for _ in 0..2 {
            rewrite.restart();
            assert_eq!(run(&mut rewrite, &[b"raw", b"body"]), b"final");
            assert!(rewrite.injected());
        }
    }

    #[test]
    fn a_body_over_the_limit_passes_through_whole() {
        let mut rewrite = BodyRewrite::default();
        let big = vec![b' '; MAX_REWRITE_BODY + 1];
        let out = run(&mut rewrite, &[&big, b"tail"]);
        assert_eq!(out.len(), big.len() + 4);
        assert!(!rewrite.injected());
    }

    fn budgeted(
        budget: &Arc<BodyBudget>,
        tenant: &Arc<TenantUsage>,
        memory_limit: usize,
    ) -> BodyRewrite {
        let limits = RequestBodySettings {
            memory_limit,
            tenant_limit: memory_limit,
            deadline: std::time::Duration::from_secs(60),
        };
        let reservation = BodyReservation::new(Arc::clone(budget), Arc::clone(tenant));
        BodyRewrite {
            budget: Some((reservation, limits)),
            ..BodyRewrite::default()
        }
    }

    #[test]
    fn a_body_over_the_budget_passes_through_unchanged_and_gives_its_bytes_back() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let mut rewrite = budgeted(&budget, &tenant, 20);
        let (a, rest) = STREAMING.split_at(15);
        let (b, c) = rest.split_at(10);
        let mut first = Some(Bytes::copy_from_slice(a));
        assert_eq!(rewrite.filter(&mut first, false), Step::Forwarded);
        assert_eq!(first.as_deref(), Some(&b""[..]), "held");
        assert_eq!(budget.held(), 15);
        let mut second = Some(Bytes::copy_from_slice(b));
        assert_eq!(
            rewrite.filter(&mut second, false),
            Step::GaveUp(GaveUp::OverBudget(OverBudget::Total))
        );
        assert_eq!(budget.held(), 0, "nothing held once it passes through");
        let mut third = Some(Bytes::copy_from_slice(c));
        assert_eq!(rewrite.filter(&mut third, true), Step::Forwarded);
        let out = [first, second, third].concat_bytes();
        assert_eq!(out, STREAMING, "every byte, in order, unchanged");
        assert!(!rewrite.injected());
    }

    #[test]
    fn a_rewrite_dropped_mid_body_gives_its_bytes_back() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let mut rewrite = budgeted(&budget, &tenant, 1 << 20);
        let mut piece = Some(Bytes::from_static(b"{\"stream\":true,"));
        rewrite.filter(&mut piece, false);
        assert!(budget.held() > 0);
        // The client left, or the request failed: the context and its rewrite drop.
        drop(rewrite);
        assert_eq!(budget.held(), 0);
        assert_eq!(tenant.body_bytes().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_collected_body_releases_its_bytes_at_its_end_and_on_a_new_attempt() {
        let budget = Arc::new(BodyBudget::default());
        let tenant = Arc::new(TenantUsage::default());
        let mut rewrite = budgeted(&budget, &tenant, 1 << 20);
        let (a, b) = STREAMING.split_at(10);
        run(&mut rewrite, &[a, b]);
        assert!(rewrite.injected());
        assert_eq!(budget.held(), 0);
        let mut piece = Some(Bytes::copy_from_slice(a));
        rewrite.filter(&mut piece, false);
        assert_eq!(budget.held(), a.len());
        rewrite.restart();
        assert_eq!(budget.held(), 0);
    }

    trait ConcatBytes {
        fn concat_bytes(self) -> Vec<u8>;
    }

    impl<const N: usize> ConcatBytes for [Option<Bytes>; N] {
        fn concat_bytes(self) -> Vec<u8> {
            self.into_iter()
                .flatten()
                .flat_map(|b| b.to_vec())
                .collect()
        }
    }
}
