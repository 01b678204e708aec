//! Reading a small request body ahead ([`ReadAhead`]), and adding
//! `stream_options.include_usage` to streaming chat requests, so that every stream reports
//! its usage (the client never sees the extra event: see `UsageChunkFilter`).
//!
//! A small body with a `Content-Length` is read whole in `request_filter` (Pingora's retry
//! buffer keeps it and replays it, byte for byte, on every attempt): session keys in the body
//! are read from it before a replica is chosen, and a rewrite knows its final length before
//! the upstream header goes out, so the framing stays `Content-Length`. Its bytes count in the
//! memory budget ([`crate::body_budget`]) for as long as the request holds them; when the
//! budget is spent the body is not read ahead and streams on like a large one. Nothing else
//! is read ahead: a chunked body or one over [`READ_AHEAD_LIMIT`] streams on (reading more
//! than the retry buffer holds would lose what was read), and a rewrite adds the option as it
//! passes ([`StreamUsageRewrite`]), framed chunked, holding none of it.

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora_proxy::Session;
use tether_metering::{ensure_stream_usage, StreamUsageRewrite, USAGE_OPTION};
use tether_topology::RequestBodySettings;

use crate::body_budget::{BodyReservation, OverBudget};
use crate::router::Snapshot;

/// Largest body read ahead in `request_filter`: Pingora's retry buffer, which replays it,
/// holds this much and drops everything beyond.
pub const READ_AHEAD_LIMIT: usize = 64 << 10;

/// The request body, read ahead at most once per request and shared by whoever needs it
/// before a replica is chosen.
#[derive(Debug)]
pub struct ReadAhead {
    /// `None` until tried; then the body, or `None` when it is not read ahead.
    body: Option<Option<Bytes>>,
    /// Counts the body read ahead in the memory budget.
    reservation: BodyReservation,
    limits: RequestBodySettings,
    /// The budget refused the body: it was not read ahead.
    refused: Option<OverBudget>,
}

impl ReadAhead {
    /// Nothing read yet; a body read ahead is counted in `reservation` under `limits`.
    pub fn new(reservation: BodyReservation, limits: RequestBodySettings) -> Self {
        ReadAhead {
            body: None,
            reservation,
            limits,
            refused: None,
        }
    }

    /// The whole body when it has a `Content-Length` of 1..=[`READ_AHEAD_LIMIT`] bytes and
    /// the memory budget has room for it, read on the first call; `None` for any other body,
    /// which is left to stream.
    pub async fn body(&mut self, session: &mut Session) -> Result<Option<Bytes>> {
        if let Some(body) = &self.body {
            return Ok(body.clone());
        }
        let body = match small_body_length(session.req_header()) {
            None => None,
            Some(length) => match self.reservation.grow(length, &self.limits) {
                Ok(()) => Some(read_small_body(session, length).await?),
                Err(over) => {
                    self.refused = Some(over);
                    None
                }
            },
        };
        self.body = Some(body.clone());
        Ok(body)
    }

    /// Whether the body was read ahead (Pingora replays it from its retry buffer).
    pub fn was_read(&self) -> bool {
        matches!(self.body, Some(Some(_)))
    }

    /// Which limit of the memory budget kept the body from being read ahead, if one did.
    pub fn refused(&self) -> Option<OverBudget> {
        self.refused
    }

    /// The reservation holding the body read ahead, to keep for as long as the request holds
    /// the body.
    pub fn into_reservation(self) -> BodyReservation {
        self.reservation
    }
}

/// The `Content-Length` of a body small enough to read ahead.
fn small_body_length(req: &RequestHeader) -> Option<usize> {
    let length = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    length.filter(|n| !chunked && *n > 0 && *n <= READ_AHEAD_LIMIT)
}

async fn read_small_body(session: &mut Session, length: usize) -> Result<Bytes> {
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
    Ok(Bytes::from(raw))
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
    /// The final body, when it was read ahead: sent instead of what Pingora replays.
    ready: Option<Bytes>,
    /// The walk of a body that streams on.
    walk: StreamUsageRewrite,
}

/// What one piece of a body did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Went on (or was replaced by the body read ahead).
    Forwarded,
    /// Carried the object's end, and the usage option was added before it.
    Injected,
}

impl BodyRewrite {
    /// Decides whether this request's body may need the usage option, and reads a small one
    /// ahead. `None`: the body passes through as it is.
    pub async fn prepare(
        snapshot: &Snapshot,
        session: &mut Session,
        read_ahead: &mut ReadAhead,
    ) -> Result<Option<Self>> {
        let req = session.req_header();
        if !(snapshot.inject_stream_usage()
            && req.method == http::Method::POST
            && req.uri.path().ends_with("/chat/completions"))
        {
            return Ok(None);
        }
        let Some(raw) = read_ahead.body(session).await? else {
            return Ok(Some(BodyRewrite::default()));
        };
        // Unchanged bodies (the client asked for usage, or is not streaming) need no
        // rewrite: the retry buffer replays them as they came.
        Ok(ensure_stream_usage(&raw).map(|ready| BodyRewrite {
            ready: Some(Bytes::from(ready)),
            ..BodyRewrite::default()
        }))
    }

    /// Whether the body that goes upstream carries the injected option (known at once for a
    /// body read ahead, at the object's end for one that streams).
    pub fn injected(&self) -> bool {
        self.ready.is_some() || self.walk.injected()
    }

    /// A new attempt: Pingora replays the raw body from the start.
    pub fn restart(&mut self) {
        self.walk = StreamUsageRewrite::default();
    }

    /// Sets the upstream request's framing for the body that will be sent.
    pub fn frame(&self, upstream_request: &mut RequestHeader) -> Result<()> {
        match &self.ready {
            // Read ahead: the final body and its length are known.
            Some(ready) => {
                upstream_request
                    .insert_header(http::header::CONTENT_LENGTH, ready.len().to_string())?;
            }
            // Rewritten on the way: the body may grow, so Pingora frames it chunked.
            None => {
                upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            }
        }
        Ok(())
    }

    /// Rewrites one piece of the request body in place.
    pub fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Step {
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
        let Some(piece) = body.as_ref() else {
            return Step::Forwarded;
        };
        let Some(at) = self.walk.feed(piece) else {
            return Step::Forwarded;
        };
        let mut out = BytesMut::with_capacity(piece.len() + USAGE_OPTION.len());
        out.extend_from_slice(&piece[..at]);
        out.extend_from_slice(USAGE_OPTION);
        out.extend_from_slice(&piece[at..]);
        *body = Some(out.freeze());
        Step::Injected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_streaming_body_gains_the_usage_option_at_its_end_and_the_rest_goes_on_at_once() {
        let mut rewrite = BodyRewrite::default();
        let (a, b) = STREAMING.split_at(10);
        let mut first = Some(Bytes::copy_from_slice(a));
        assert_eq!(rewrite.filter(&mut first, false), Step::Forwarded);
        assert_eq!(first.as_deref(), Some(a), "nothing held back");
        let mut second = Some(Bytes::copy_from_slice(b));
        assert_eq!(rewrite.filter(&mut second, true), Step::Injected);
        assert!(rewrite.injected());
        let out = [a, &second.unwrap()[..]].concat();
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
    fn a_replayed_body_is_walked_afresh() {
        let mut rewrite = BodyRewrite::default();
        let (a, b) = STREAMING.split_at(20);
        let first = run(&mut rewrite, &[a, b]);
        rewrite.restart();
        assert_eq!(run(&mut rewrite, &[a, b]), first);
        assert!(rewrite.injected());
    }
}
