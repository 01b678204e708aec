//! Reading the request body ahead ([`ReadAhead`]), and adding `stream_options.include_usage`
//! to streaming chat requests, so that every stream reports its usage (the client never sees
//! the extra event: see `UsageChunkFilter`).
//!
//! A small body with a `Content-Length` is read whole in `request_filter` (Pingora's retry
//! buffer keeps it and replays it, byte for byte, on every attempt): session keys in the body
//! are read from it before a replica is chosen, and a rewrite knows its final length before
//! the upstream header goes out, so the framing stays `Content-Length`. Its bytes count in the
//! memory budget ([`crate::body_budget`]) for as long as the request holds them; when the
//! budget is spent the body is not read ahead and streams on.
//!
//! A larger or chunked body is read ahead only when session keys are wanted from it, and then
//! only as a prefix of about [`READ_AHEAD_LIMIT`] bytes (a chunked one that ends sooner is
//! whole); the rest stays in the socket and streams on. At the first attempt Pingora sends
//! what its retry buffer holds, then reads on from the client, so the replica gets the body
//! intact. Two of Pingora's limits shape how far the prefix goes (see [`ReadAhead::body`]):
//! its retry buffer drops everything once it passes 64 KiB, and it sends nothing from the
//! buffer if the body ended while being read ahead. A rewrite of such a body adds the option
//! as it passes ([`StreamUsageRewrite`]), framed chunked, holding none of it.

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora_proxy::Session;
use tether_metering::{ensure_stream_usage, StreamUsageRewrite, USAGE_OPTION};
use tether_topology::RequestBodySettings;

use crate::body_budget::{BodyReservation, OverBudget};
use crate::router::Snapshot;

/// Largest body read ahead whole in `request_filter`, and the length a prefix of a larger
/// one is read to: Pingora's retry buffer, which replays what was read, holds this much and
/// drops everything beyond.
pub const READ_AHEAD_LIMIT: usize = 64 << 10;

/// The most one read of a request body returns (Pingora's HTTP/1 body buffer): a prefix is
/// read on only while the next read cannot finish a body with a `Content-Length`.
const LARGEST_BODY_READ: usize = 64 << 10;

/// The most a prefix holds: it is read until it reaches [`READ_AHEAD_LIMIT`], and the last
/// read may bring up to [`LARGEST_BODY_READ`].
const LARGEST_PREFIX: usize = READ_AHEAD_LIMIT - 1 + LARGEST_BODY_READ;

/// What the body read ahead is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRead {
    /// Not read ahead: it streams on.
    Unread,
    /// The whole body.
    Whole(Bytes),
    /// Its first bytes; the rest streams on.
    Prefix(Bytes),
}

/// Why the body is wanted ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFor {
    /// Session keys: a prefix of a larger body will do.
    Keys,
    /// A rewrite: only a small body is worth holding (a larger one is rewritten as it passes).
    Rewrite,
}

/// How a body can be read ahead, from its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// A `Content-Length` of 1..=[`READ_AHEAD_LIMIT`]: read whole.
    Whole(usize),
    /// A larger `Content-Length`: a prefix.
    Prefix(usize),
    /// Chunked: a prefix, or the whole body if it ends first.
    Chunked,
}

/// The request body, read ahead at most once per request and shared by whoever needs it
/// before a replica is chosen.
#[derive(Debug)]
pub struct ReadAhead {
    /// `None` until read (or refused).
    body: Option<BodyRead>,
    /// A prefix Pingora will not send itself (its retry buffer overflowed while it was
    /// read): it goes upstream ahead of the first piece of the rest.
    unsent: Option<Bytes>,
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
            unsent: None,
            reservation,
            limits,
            refused: None,
        }
    }

    /// The body read ahead, read on the first call that may read it: whole when it has a
    /// `Content-Length` of 1..=[`READ_AHEAD_LIMIT`] bytes; for [`ReadFor::Keys`], a prefix of
    /// a larger or chunked one. [`BodyRead::Unread`] for any other body, or when the memory
    /// budget has no room, which is left to stream.
    ///
    /// A prefix is read until it holds [`READ_AHEAD_LIMIT`] bytes, but never with a read that
    /// could finish a body with a `Content-Length` (its last [`LARGEST_BODY_READ`] bytes stay
    /// unread): a body that ended while read ahead, past what the retry buffer holds, would
    /// never be sent. A chunked body cannot end on a read that brings data (its last chunk
    /// comes after), so it is read to the limit, or whole if it ends first. When the last
    /// read takes the prefix past the retry buffer, Pingora sends none of it, and the prefix
    /// is kept to send ahead of the rest ([`ReadAhead::into_parts`]).
    pub async fn body(&mut self, session: &mut Session, purpose: ReadFor) -> Result<BodyRead> {
        if let Some(body) = &self.body {
            return Ok(body.clone());
        }
        let Some(plan) = read_plan(session.req_header()) else {
            self.body = Some(BodyRead::Unread);
            return Ok(BodyRead::Unread);
        };
        let hold = match plan {
            Plan::Whole(length) => length,
            // Not read here: a later call for session keys may still read it.
            Plan::Prefix(_) | Plan::Chunked if purpose == ReadFor::Rewrite => {
                return Ok(BodyRead::Unread);
            }
            Plan::Prefix(length) => length.min(LARGEST_PREFIX),
            Plan::Chunked => LARGEST_PREFIX,
        };
        if let Err(over) = self.reservation.grow(hold, &self.limits) {
            self.refused = Some(over);
            self.body = Some(BodyRead::Unread);
            return Ok(BodyRead::Unread);
        }
        let body = read_ahead(session, plan).await?;
        // What is held from here on: these bytes (in Pingora's retry buffer, or kept to send).
        if let BodyRead::Whole(raw) | BodyRead::Prefix(raw) = &body {
            self.reservation.shrink_to(raw.len());
        }
        if let BodyRead::Prefix(prefix) = &body {
            if session.as_ref().retry_buffer_truncated() {
                self.unsent = Some(prefix.clone());
            }
        }
        self.body = Some(body.clone());
        Ok(body)
    }

    /// Whether the body was read ahead, whole or in part.
    pub fn was_read(&self) -> bool {
        matches!(self.body, Some(BodyRead::Whole(_) | BodyRead::Prefix(_)))
    }

    /// Which limit of the memory budget kept the body from being read ahead, if one did.
    pub fn refused(&self) -> Option<OverBudget> {
        self.refused
    }

    /// The reservation holding the body read ahead, to keep for as long as the request holds
    /// the body; and a prefix that Pingora will not send, to send ahead of the rest of the
    /// body ([`send_unsent_prefix`]).
    pub fn into_parts(self) -> (BodyReservation, Option<Bytes>) {
        (self.reservation, self.unsent)
    }
}

/// Puts a prefix read ahead that Pingora does not send in front of the first piece of the
/// body that goes upstream.
pub fn send_unsent_prefix(unsent: &mut Option<Bytes>, body: &mut Option<Bytes>) {
    let Some(prefix) = unsent.take() else {
        return;
    };
    *body = Some(match body.take() {
        Some(piece) if !piece.is_empty() => {
            let mut joined = BytesMut::with_capacity(prefix.len() + piece.len());
            joined.extend_from_slice(&prefix);
            joined.extend_from_slice(&piece);
            joined.freeze()
        }
        _ => prefix,
    });
}

/// How the body can be read ahead, if at all.
fn read_plan(req: &RequestHeader) -> Option<Plan> {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Some(Plan::Chunked);
    }
    let length = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())?;
    match length {
        0 => None,
        n if n <= READ_AHEAD_LIMIT => Some(Plan::Whole(n)),
        n => Some(Plan::Prefix(n)),
    }
}

async fn read_ahead(session: &mut Session, plan: Plan) -> Result<BodyRead> {
    session.enable_retry_buffering();
    if expects_continue(session.req_header()) {
        // The client waits for this before sending the body (curl gives up waiting after a
        // second); Pingora only relays a replica's, and the body is read here first.
        let go_on = ResponseHeader::build(100, Some(0))?;
        session
            .write_response_header(Box::new(go_on), false)
            .await?;
    }
    let capacity = match plan {
        Plan::Whole(length) => length,
        Plan::Prefix(_) | Plan::Chunked => READ_AHEAD_LIMIT,
    };
    // A small body nearly always arrives in one read: it is kept as Pingora hands it over,
    // and copied into one buffer only when a second piece follows.
    let mut first: Option<Bytes> = None;
    let mut raw = Vec::new();
    loop {
        let read = first.as_ref().map_or(raw.len(), Bytes::len);
        let enough = match plan {
            Plan::Whole(_) => false,
            Plan::Prefix(length) => {
                read >= READ_AHEAD_LIMIT || length.saturating_sub(read) <= LARGEST_BODY_READ
            }
            Plan::Chunked => read >= READ_AHEAD_LIMIT,
        };
        if enough {
            break;
        }
        // Errors here are the client's (a body that stalls or breaks off), as they are when
        // Pingora reads a body on its way upstream.
        match session
            .read_request_body()
            .await
            .map_err(|e| e.into_down())?
        {
            Some(chunk) if raw.is_empty() && first.is_none() => first = Some(chunk),
            Some(chunk) => {
                if let Some(first) = first.take() {
                    raw.reserve_exact(capacity.max(first.len() + chunk.len()));
                    raw.extend_from_slice(&first);
                }
                raw.extend_from_slice(&chunk);
            }
            None => return Ok(BodyRead::Whole(first.unwrap_or_else(|| Bytes::from(raw)))),
        }
    }
    if session.as_mut().is_body_done() && session.as_ref().retry_buffer_truncated() {
        // Pingora would send none of this body; the reading rule above rules it out.
        return Error::e_explain(
            ErrorType::InternalError,
            "the request body ended while read ahead, past the retry buffer",
        );
    }
    Ok(BodyRead::Prefix(first.unwrap_or_else(|| Bytes::from(raw))))
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
    /// ahead (a larger one, even if a prefix of it was read ahead, is rewritten as it
    /// passes). `None`: the body passes through as it is.
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
        let raw = match read_ahead.body(session, ReadFor::Rewrite).await? {
            BodyRead::Whole(raw) => raw,
            // Rewritten as it passes, the prefix read ahead included.
            BodyRead::Prefix(_) | BodyRead::Unread => return Ok(Some(BodyRewrite::default())),
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
    fn how_a_body_is_read_ahead_follows_its_framing() {
        let req = |headers: &[(&str, &str)]| {
            let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
            for (name, value) in headers {
                req.insert_header(name.to_string(), value.to_string())
                    .unwrap();
            }
            req
        };
        let limit = READ_AHEAD_LIMIT.to_string();
        let over = (READ_AHEAD_LIMIT + 1).to_string();
        assert_eq!(read_plan(&req(&[])), None);
        assert_eq!(read_plan(&req(&[("content-length", "0")])), None);
        assert_eq!(
            read_plan(&req(&[("content-length", &limit)])),
            Some(Plan::Whole(READ_AHEAD_LIMIT))
        );
        assert_eq!(
            read_plan(&req(&[("content-length", &over)])),
            Some(Plan::Prefix(READ_AHEAD_LIMIT + 1))
        );
        assert_eq!(
            read_plan(&req(&[("transfer-encoding", "chunked")])),
            Some(Plan::Chunked)
        );
    }

    #[test]
    fn an_unsent_prefix_goes_ahead_of_the_first_piece_only() {
        let mut unsent = Some(Bytes::from_static(b"{\"head\""));
        let mut first = Some(Bytes::from_static(b":1}"));
        send_unsent_prefix(&mut unsent, &mut first);
        assert_eq!(first.as_deref(), Some(&b"{\"head\":1}"[..]));
        let mut second = Some(Bytes::from_static(b"rest"));
        send_unsent_prefix(&mut unsent, &mut second);
        assert_eq!(second.as_deref(), Some(&b"rest"[..]));
        // A prefix meeting the end of the body (or an empty piece) goes alone.
        let mut unsent = Some(Bytes::from_static(b"all"));
        let mut end = None;
        send_unsent_prefix(&mut unsent, &mut end);
        assert_eq!(end.as_deref(), Some(&b"all"[..]));
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
