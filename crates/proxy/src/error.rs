//! Every error Tether itself answers, in one enum: its HTTP status, its OpenAI `type` and
//! `code`, whether a client may retry it, and its message are defined here and nowhere else.
//! Clients get the OpenAI error shape they already parse:
//! `{"error":{"message":…,"type":…,"code":…}}`. No message ever contains the token or the API
//! key.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora_proxy::Session;
use serde_json::json;
use tether_affinity::TokenError;
use tether_metering::Limit;

/// An error answered by Tether (not by a replica).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    /// No `Authorization: Bearer` key where keys are required.
    #[error("missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    MissingApiKey,
    /// A key no tenant owns.
    #[error("invalid API key")]
    UnknownApiKey,
    /// The session-affinity header is malformed.
    #[error("{0}")]
    InvalidSessionAffinity(TokenError),
    /// No replica in any region can take the request (or every one refused the connection).
    #[error("no inference replica is available to serve this request; retry shortly")]
    NoReplicaAvailable {
        /// Seconds for `Retry-After`.
        retry_after_secs: u32,
    },
    /// The replica accepted the request and did not answer in time.
    #[error("the inference replica timed out")]
    UpstreamTimeout,
    /// The replica failed before answering.
    #[error("the inference replica failed: {0}")]
    UpstreamFailed(&'static str),
    /// The replica answered a status that was being retried, and no retry was left.
    #[error("request failed: replica answered {0}")]
    UpstreamStatus(u16),
    /// The request could not be read.
    #[error("could not read the request: {0}")]
    BadRequest(&'static str),
    /// The client stopped sending its request body before it was complete.
    #[error("the request body stopped arriving before it was complete")]
    RequestTimeout,
    /// The tenant is over one of its limits (`tenant_limits`, `tenants[].limits`).
    #[error("{}", limit_message(*.limit))]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// Seconds for `Retry-After`.
        retry_after_secs: u32,
    },
    /// A bug in Tether.
    #[error("internal proxy error")]
    Internal,
}

impl From<crate::limits::Refused> for EdgeError {
    fn from(refused: crate::limits::Refused) -> Self {
        EdgeError::LimitExceeded {
            limit: refused.limit,
            retry_after_secs: refused.retry_after_secs(),
        }
    }
}

fn limit_message(limit: Limit) -> &'static str {
    match limit {
        Limit::Requests => "rate limit reached for requests; retry after the time in Retry-After",
        Limit::NewSessions => {
            "rate limit reached for new sessions; continue existing sessions, or retry after \
             the time in Retry-After"
        }
        Limit::Concurrency => {
            "too many requests in flight for this API key; retry when one has finished"
        }
    }
}

impl EdgeError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::MissingApiKey | EdgeError::UnknownApiKey => 401,
            EdgeError::InvalidSessionAffinity(_) | EdgeError::BadRequest(_) => 400,
            EdgeError::RequestTimeout => 408,
            EdgeError::LimitExceeded { .. } => 429,
            EdgeError::NoReplicaAvailable { .. } => 503,
            EdgeError::UpstreamTimeout => 504,
            EdgeError::UpstreamFailed(_) => 502,
            EdgeError::UpstreamStatus(code) => *code,
            EdgeError::Internal => 500,
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            EdgeError::MissingApiKey
            | EdgeError::UnknownApiKey
            | EdgeError::InvalidSessionAffinity(_)
            | EdgeError::BadRequest(_)
            | EdgeError::RequestTimeout => "invalid_request_error",
            EdgeError::LimitExceeded { .. } => "rate_limit_error",
            EdgeError::NoReplicaAvailable { .. }
            | EdgeError::UpstreamTimeout
            | EdgeError::UpstreamFailed(_)
            | EdgeError::UpstreamStatus(_)
            | EdgeError::Internal => "server_error",
        }
    }

    /// OpenAI's `code` (machine-readable).
    pub fn code(&self) -> &'static str {
        match self {
            EdgeError::MissingApiKey | EdgeError::UnknownApiKey => "invalid_api_key",
            EdgeError::InvalidSessionAffinity(_) => "invalid_session_affinity",
            EdgeError::NoReplicaAvailable { .. } => "no_replica_available",
            EdgeError::UpstreamTimeout
            | EdgeError::UpstreamFailed(_)
            | EdgeError::UpstreamStatus(_) => "upstream_error",
            EdgeError::BadRequest(_) => "bad_request",
            EdgeError::RequestTimeout => "request_timeout",
            EdgeError::LimitExceeded {
                limit: Limit::Concurrency,
                ..
            } => "concurrency_limit_exceeded",
            EdgeError::LimitExceeded { .. } => "rate_limit_exceeded",
            EdgeError::Internal => "internal_error",
        }
    }

    /// Whether the same request may succeed if the client sends it again.
    pub fn retryable(&self) -> bool {
        match self {
            EdgeError::MissingApiKey
            | EdgeError::UnknownApiKey
            | EdgeError::InvalidSessionAffinity(_)
            | EdgeError::BadRequest(_) => false,
            EdgeError::NoReplicaAvailable { .. }
            | EdgeError::UpstreamTimeout
            | EdgeError::UpstreamFailed(_)
            | EdgeError::UpstreamStatus(_)
            | EdgeError::RequestTimeout
            | EdgeError::LimitExceeded { .. }
            | EdgeError::Internal => true,
        }
    }

    /// Seconds for a `Retry-After` header.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            EdgeError::NoReplicaAvailable { retry_after_secs }
            | EdgeError::LimitExceeded {
                retry_after_secs, ..
            } => Some((*retry_after_secs).max(1)),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        Bytes::from(
            json!({"error": {"message": self.to_string(), "type": self.kind(), "code": self.code()}})
                .to_string(),
        )
    }

    /// The response header (content type, length, and `Retry-After` when set).
    pub fn header(&self, body_len: usize) -> pingora::Result<ResponseHeader> {
        let mut h = ResponseHeader::build(self.status(), Some(4))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body_len.to_string())?;
        if let Some(secs) = self.retry_after() {
            h.insert_header("retry-after", secs.to_string())?;
        }
        Ok(h)
    }

    /// Answers the request with this error.
    ///
    /// The request body is drained first: answering before it is read would make Pingora close
    /// the connection, and a client retrying on a fresh connection is slower for no reason.
    pub async fn send(&self, session: &mut Session, drain_body: bool) -> pingora::Result<()> {
        if drain_body {
            session.drain_request_body().await?;
        }
        let body = self.body();
        let header = self.header(body.len())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<EdgeError> {
        vec![
            EdgeError::MissingApiKey,
            EdgeError::UnknownApiKey,
            EdgeError::InvalidSessionAffinity(TokenError::Empty),
            EdgeError::NoReplicaAvailable {
                retry_after_secs: 0,
            },
            EdgeError::UpstreamTimeout,
            EdgeError::UpstreamFailed("ConnectionClosed"),
            EdgeError::UpstreamStatus(503),
            EdgeError::BadRequest("ReadError"),
            EdgeError::LimitExceeded {
                limit: Limit::Requests,
                retry_after_secs: 3,
            },
            EdgeError::LimitExceeded {
                limit: Limit::Concurrency,
                retry_after_secs: 1,
            },
            EdgeError::Internal,
        ]
    }

    #[test]
    fn body_is_openai_shaped_and_matches_status_and_code() {
        for e in all() {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(v["error"]["message"], e.to_string());
            assert_eq!(v["error"]["type"], e.kind());
            assert_eq!(v["error"]["code"], e.code());
            let h = e.header(e.body().len()).unwrap();
            assert_eq!(h.status.as_u16(), e.status());
            assert_eq!(
                h.headers.get("content-length").unwrap().to_str().unwrap(),
                e.body().len().to_string()
            );
            // Client errors are final, except a limit's (it passes later); server errors may
            // pass.
            assert_eq!(
                e.retryable(),
                e.status() >= 500 || e.status() == 429,
                "{e:?}"
            );
        }
    }

    #[test]
    fn unavailable_carries_retry_after_of_at_least_a_second() {
        let e = EdgeError::NoReplicaAvailable {
            retry_after_secs: 0,
        };
        let h = e.header(e.body().len()).unwrap();
        assert_eq!(h.status.as_u16(), 503);
        assert_eq!(h.headers.get("retry-after").unwrap(), "1");
    }

    #[test]
    fn a_limit_answers_429_with_retry_after_in_openai_shape() {
        let e = EdgeError::LimitExceeded {
            limit: Limit::NewSessions,
            retry_after_secs: 7,
        };
        let h = e.header(e.body().len()).unwrap();
        assert_eq!(h.status.as_u16(), 429);
        assert_eq!(h.headers.get("retry-after").unwrap(), "7");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("new sessions"));
    }
}
