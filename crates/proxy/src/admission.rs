//! Who is calling and which session this is: the checks `request_filter` makes before any
//! routing, as functions of the request header alone.

use std::sync::Arc;

use pingora::http::RequestHeader;
use tether_affinity::{KeySource, RoutingKey, TenantScope};

use tether_topology::TenantLimits;

use crate::error::EdgeError;
use crate::limits::TenantUsage;
use crate::router::Access;

/// An admitted caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant id, for logs and metrics.
    pub tenant: Arc<str>,
    /// The tenant's hashing scope (also its identity for tenant locality).
    pub scope: TenantScope,
    /// The tenant-scoped routing key of the affinity header, when the request carried one
    /// (other sources are tried by [`crate::session_key::resolve`]).
    pub header_key: Option<RoutingKey>,
    /// The tenant's limits in this generation.
    pub limits: TenantLimits,
    /// What the tenant is using (shared by every generation).
    pub usage: Arc<TenantUsage>,
}

/// What `request_filter` concluded.
#[derive(Debug)]
pub enum Admission {
    /// Route it.
    Admit(Caller),
    /// Refuse it with this error; `tenant` is known when the API key was (so the refusal is
    /// logged under its tenant).
    Reject {
        /// The error to answer.
        error: EdgeError,
        /// The caller's tenant, when its key was valid.
        tenant: Option<Arc<str>>,
    },
}

/// The API key of an `Authorization: Bearer <key>` header (any case of the scheme).
pub fn bearer_token(req: &RequestHeader) -> Option<&[u8]> {
    let value = req.headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// The API key of an `x-api-key` header (Anthropic's convention).
pub fn x_api_key(req: &RequestHeader) -> Option<&[u8]> {
    let key = req.headers.get("x-api-key")?.as_bytes().trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Authenticates the caller and validates its session token. The API key comes from
/// `Authorization: Bearer` (OpenAI's clients) or `x-api-key` (Anthropic's); with both, the
/// bearer key is the one checked.
pub fn admit(access: &Access, req: &RequestHeader) -> Admission {
    let tenant = if access.requires_api_key() {
        let Some(api_key) = bearer_token(req).or_else(|| x_api_key(req)) else {
            return Admission::Reject {
                error: EdgeError::MissingApiKey,
                tenant: None,
            };
        };
        match access.tenant_for_key(api_key) {
            Some(tenant) => tenant,
            None => {
                return Admission::Reject {
                    error: EdgeError::UnknownApiKey,
                    tenant: None,
                }
            }
        }
    } else {
        access.default_tenant()
    };
    // The header is addressed to Tether: a bad value is refused, not ignored (unless the
    // header is not a key source at all).
    let values = req
        .headers
        .get_all(&access.header)
        .into_iter()
        .map(|v| v.as_bytes());
    let validated = if access.key_sources.contains(&KeySource::Header) {
        access.token_rules.validate_all(values)
    } else {
        Ok(None)
    };
    match validated {
        Ok(token) => Admission::Admit(Caller {
            tenant: Arc::clone(&tenant.id),
            scope: tenant.scope,
            header_key: token.map(|t| tenant.scope.key(t)),
            limits: tenant.limits,
            usage: Arc::clone(&tenant.usage),
        }),
        Err(e) => Admission::Reject {
            error: EdgeError::InvalidSessionAffinity(e),
            tenant: Some(Arc::clone(&tenant.id)),
        },
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
