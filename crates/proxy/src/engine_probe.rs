//! Reading a replica's engine on the probe round: one `GET` of its engine endpoint
//! ([`EngineKind::probe_path`]), bounded in time and size, parsed by `tether_engine`.
//!
//! The answer does two jobs, so a replica costs one request per round as before: a `200`
//! is the health probe's success, and its body is the engine's capacity and load. An engine
//! that does not serve the endpoint (`404`, say: llama.cpp started with `--no-slots`, SGLang
//! without `--enable-metrics`) or serves something unreadable is probed on the configured
//! health path instead and routed on Tether's own signals; its endpoint is tried again every
//! [`RETRY_ROUNDS`] rounds.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::http::RequestHeader;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use tether_engine::{EngineError, EngineKind, EngineReading, MAX_BODY_BYTES};

/// Rounds after which an engine endpoint that was not served is tried again.
pub const RETRY_ROUNDS: u32 = 60;

/// What one engine read found.
#[derive(Debug)]
pub enum EngineAnswer {
    /// `200` with a reading: healthy, and routing gets the numbers.
    Read(EngineReading),
    /// The replica answered, but not with a reading of this engine (the status, or why the
    /// body was unreadable): the health path decides, and the endpoint rests.
    NotServed(String),
    /// `5xx`: the replica answers but cannot serve (llama.cpp loading its model).
    Unavailable(u16),
    /// No answer in time, or the connection failed.
    Failed(String),
}

/// `GET path` on `address` with `credential`, the whole exchange within `timeout`.
pub async fn read(
    connector: &Connector,
    address: SocketAddr,
    kind: EngineKind,
    credential: Option<&(http::HeaderName, http::HeaderValue)>,
    timeout: Duration,
) -> EngineAnswer {
    let Some(path) = kind.probe_path() else {
        return EngineAnswer::NotServed("no engine".into());
    };
    match tokio::time::timeout(
        timeout,
        exchange(connector, address, path, credential, timeout),
    )
    .await
    {
        Err(_) => EngineAnswer::Failed("timed out".into()),
        Ok(Err(e)) => EngineAnswer::Failed(e.to_string()),
        Ok(Ok((status, _))) if status >= 500 => EngineAnswer::Unavailable(status),
        Ok(Ok((status, _))) if status != 200 => EngineAnswer::NotServed(format!("status {status}")),
        Ok(Ok((_, Err(e)))) => EngineAnswer::NotServed(e.to_string()),
        Ok(Ok((_, Ok(body)))) => match tether_engine::parse(kind, &body) {
            Ok(reading) => EngineAnswer::Read(reading),
            Err(e) => EngineAnswer::NotServed(e.to_string()),
        },
    }
}

/// The status and, for a `200`, the body (or why it was refused: too large).
async fn exchange(
    connector: &Connector,
    address: SocketAddr,
    path: &str,
    credential: Option<&(http::HeaderName, http::HeaderValue)>,
    timeout: Duration,
) -> pingora_core::Result<(u16, Result<Vec<u8>, EngineError>)> {
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let (mut session, _) = connector.get_http_session(&peer).await?;
    let mut req = RequestHeader::build("GET", path.as_bytes(), None)?;
    req.append_header("Host", address.to_string())?;
    req.append_header("User-Agent", "tether-engine-probe")?;
    if let Some((name, value)) = credential {
        req.append_header(name.clone(), value.clone())?;
    }
    session.write_request_header(Box::new(req)).await?;
    session.finish_request_body().await?;
    session.read_response_header().await?;
    let status = session.response_header().map_or(0, |r| r.status.as_u16());
    let mut body = Vec::new();
    let mut too_large = false;
    while let Some(chunk) = session.read_response_body().await? {
        if status != 200 || too_large {
            continue;
        }
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            too_large = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    // The connection is not pooled, as with the health probe: a pooled one the replica has
    // closed meanwhile would fail the next round.
    if too_large {
        return Ok((status, Err(EngineError::TooLarge { bytes: body.len() })));
    }
    Ok((status, Ok(body)))
}
