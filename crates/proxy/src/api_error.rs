//! Errors Tether itself answers with, in the OpenAI error shape clients already parse:
//! `{"error":{"message":…,"type":…,"code":…}}`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora_proxy::Session;
use serde_json::json;

/// An error answered by Tether (not by a replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI `type`.
    pub kind: &'static str,
    /// OpenAI `code` (machine-readable).
    pub code: &'static str,
    /// Human-readable message; never contains the token or the API key.
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400: the session-affinity header is malformed.
    pub fn invalid_session_affinity(message: String) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: "invalid_session_affinity",
            message,
            retry_after: None,
        }
    }

    /// 401: no or unknown API key.
    pub fn invalid_api_key(message: &str) -> Self {
        ApiError {
            status: 401,
            kind: "invalid_request_error",
            code: "invalid_api_key",
            message: message.to_owned(),
            retry_after: None,
        }
    }

    /// 503: no replica in any region can take the request.
    pub fn no_replica_available(retry_after_secs: u32) -> Self {
        ApiError {
            status: 503,
            kind: "server_error",
            code: "no_replica_available",
            message: "no inference replica is available to serve this request; retry shortly"
                .to_owned(),
            retry_after: Some(retry_after_secs.max(1)),
        }
    }

    /// 502/504: the replica failed before answering.
    pub fn upstream(status: u16, message: String) -> Self {
        ApiError {
            status,
            kind: "server_error",
            code: "upstream_error",
            message,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        Bytes::from(
            json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
                .to_string(),
        )
    }

    /// The response header (content type, length, and `Retry-After` when set).
    pub fn header(&self, body_len: usize) -> pingora::Result<ResponseHeader> {
        let mut h = ResponseHeader::build(self.status, Some(4))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body_len.to_string())?;
        if let Some(secs) = self.retry_after {
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

    #[test]
    fn body_is_openai_shaped_and_escaped() {
        let e = ApiError::invalid_session_affinity("bad \"quote\"".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "bad \"quote\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_session_affinity");
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let e = ApiError::no_replica_available(1);
        let h = e.header(e.body().len()).unwrap();
        assert_eq!(h.status.as_u16(), 503);
        assert_eq!(h.headers.get("retry-after").unwrap(), "1");
        assert_eq!(
            h.headers.get("content-length").unwrap().to_str().unwrap(),
            e.body().len().to_string()
        );
    }
}
