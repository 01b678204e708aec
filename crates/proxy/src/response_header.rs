//! Adding a header to the response Pingora relays, at the cost of one map insertion.
//!
//! A response header read from a replica keeps, beside its `http` header map, a second map of
//! each name as the replica spelled it, so that HTTP/1 writes it back in the same case.
//! `ResponseHeader::insert_header` keeps both: it parses the name again, copies it twice and
//! inserts into both maps, on every response. [`insert_uncased`] instead takes the header
//! apart (Pingora has no other way in), inserts the value under a name built once, and puts it
//! back together without the case map. HTTP/1 then writes every name in its canonical case
//! (`Content-Type`, `Date` and the other common names title-cased, the rest lower-cased, as
//! HTTP/2 always sends them): header names are case-insensitive (RFC 9110 §5.1). The status
//! line's reason phrase is kept.

use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

/// Sets `name` to `value` in `response` (replacing any value it had), dropping the record of
/// how the replica spelled its header names.
pub fn insert_uncased(response: &mut ResponseHeader, name: &HeaderName, value: HeaderValue) {
    // Kept only when it is not the status's own (which Pingora supplies itself): allocating
    // for it is the rare case.
    let reason = response
        .get_reason_phrase()
        .filter(|r| Some(*r) != response.status.canonical_reason())
        .map(str::to_owned);
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(response, empty).into();
    parts.headers.insert(name.clone(), value);
    *response = ResponseHeader::from(parts);
    if reason.is_some() {
        // Only fails on invalid text, which this phrase, read from a response, is not.
        let _ = response.set_reason_phrase(reason.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(response: &ResponseHeader) -> String {
        let mut out = Vec::new();
        response.header_to_h1_wire(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_header_is_written_with_every_other_one() {
        let mut response = ResponseHeader::build(200, None).unwrap();
        response
            .insert_header("Content-Type", "application/json")
            .unwrap();
        response.insert_header("X-Request-Id", "r-1").unwrap();
        response.append_header("Set-Cookie", "a=1").unwrap();
        response.append_header("Set-Cookie", "b=2").unwrap();
        let name = HeaderName::from_static("x-session-affinity-status");
        insert_uncased(&mut response, &name, HeaderValue::from_static("warm"));
        assert_eq!(response.status, 200);
        assert_eq!(response.headers["x-session-affinity-status"], "warm");
        let written = wire(&response);
        for line in [
            "Content-Type: application/json\r\n",
            "x-request-id: r-1\r\n",
            "Set-Cookie: a=1\r\n",
            "Set-Cookie: b=2\r\n",
            "x-session-affinity-status: warm\r\n",
        ] {
            assert!(written.contains(line), "{line:?} in {written:?}");
        }
        // Headers Pingora adds afterwards (framing, keep-alive) still go out.
        response.insert_header("Connection", "keep-alive").unwrap();
        assert!(wire(&response).contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn a_value_the_replica_sent_under_that_name_is_replaced() {
        let mut response = ResponseHeader::build(200, None).unwrap();
        response
            .insert_header("X-Session-Affinity-Status", "forged")
            .unwrap();
        let name = HeaderName::from_static("x-session-affinity-status");
        insert_uncased(&mut response, &name, HeaderValue::from_static("new"));
        let values: Vec<_> = response
            .headers
            .get_all("x-session-affinity-status")
            .iter()
            .collect();
        assert_eq!(values, ["new"]);
    }

    #[test]
    fn the_reason_phrase_is_kept() {
        let name = HeaderName::from_static("x-outcome");
        let mut response = ResponseHeader::build(299, None).unwrap();
        response.set_reason_phrase(Some("Mostly Fine")).unwrap();
        insert_uncased(&mut response, &name, HeaderValue::from_static("new"));
        assert_eq!(response.get_reason_phrase(), Some("Mostly Fine"));
        let mut response = ResponseHeader::build(404, None).unwrap();
        insert_uncased(&mut response, &name, HeaderValue::from_static("new"));
        assert_eq!(response.get_reason_phrase(), Some("Not Found"));
    }
}
