//! Which session a request belongs to: the sources of `affinity.key_sources`, tried in order,
//! the first that is present winning.
//!
//! Header sources are read from the request header; body sources (`prompt_cache_key`,
//! `user`, `fingerprint`) need the body read ahead, which [`resolve`] asks for by answering
//! [`Resolution::NeedsBody`] when it reaches one before any source found a key. Every key is
//! tenant-scoped: the same token under the affinity header, an agent's header, or
//! `prompt_cache_key` gives the same key, so a client sending its id both ways is one session.

use pingora::http::RequestHeader;
use tether_affinity::{BodyKeys, KeySource, RoutingKey, TenantScope};

use crate::admission::Caller;
use crate::router::Access;

/// The request body as the body sources see it.
#[derive(Debug, Clone, Copy)]
pub enum BodyView<'b, 'a> {
    /// Not read yet: a body source asks for it.
    NotRead,
    /// Read, but it gives no keys (not JSON, not a POST, refused by the memory budget):
    /// body sources are skipped.
    Unavailable,
    /// Read and parsed, whole or as a prefix (a field beyond a prefix reads as absent).
    Read(&'b BodyKeys<'a>),
}

/// What the sources gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A key, and where it came from.
    Key(RoutingKey, KeySource),
    /// A body source comes before any source that had a key: read the body and ask again.
    NeedsBody,
    /// No source had one.
    None,
}

/// The answer of [`resolve`], with the sources whose values were present but invalid (an
/// agent's header or a body field the client did not address to Tether: ignored, counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// What was found.
    pub found: Found,
    /// Sources with an invalid value, one bit per [`KeySource::ALL`] index.
    ignored: u8,
}

impl Resolution {
    /// The sources that had an invalid value.
    pub fn ignored(&self) -> impl Iterator<Item = KeySource> + '_ {
        KeySource::ALL
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.ignored & (1 << i) != 0)
            .map(|(_, s)| s)
    }
}

fn bit(source: KeySource) -> u8 {
    let at = KeySource::ALL
        .iter()
        .position(|s| *s == source)
        .unwrap_or_default();
    1 << at
}

/// Tries `access.key_sources` in order for `caller`'s request.
pub fn resolve(
    access: &Access,
    caller: &Caller,
    req: &RequestHeader,
    body: BodyView<'_, '_>,
) -> Resolution {
    let scope = caller.scope;
    let mut ignored = 0u8;
    let token = |value: Option<&str>, source: KeySource, ignored: &mut u8| match access
        .token_rules
        .validate(value?.as_bytes())
    {
        Ok(t) => Some(scope.key(t)),
        Err(_) => {
            *ignored |= bit(source);
            None
        }
    };
    for &source in &access.key_sources {
        let key = match (source, body) {
            (KeySource::Header, _) => caller.header_key,
            (KeySource::AgentHeader, _) => agent_header(access, scope, req, &mut ignored),
            (_, BodyView::NotRead) => {
                return Resolution {
                    found: Found::NeedsBody,
                    ignored,
                }
            }
            (_, BodyView::Unavailable) => None,
            (KeySource::PromptCacheKey, BodyView::Read(keys)) => {
                token(keys.prompt_cache_key.as_deref(), source, &mut ignored)
            }
            (KeySource::User, BodyView::Read(keys)) => token(keys.user_id(), source, &mut ignored),
            (KeySource::Fingerprint, BodyView::Read(keys)) => {
                access.fingerprinter.fingerprint(scope, keys)
            }
        };
        if let Some(key) = key {
            return Resolution {
                found: Found::Key(key, source),
                ignored,
            };
        }
    }
    Resolution {
        found: Found::None,
        ignored,
    }
}

/// The first agent header with a valid value; invalid ones are skipped (the client meant them
/// for someone else, so they are no reason to refuse the request).
fn agent_header(
    access: &Access,
    scope: TenantScope,
    req: &RequestHeader,
    ignored: &mut u8,
) -> Option<RoutingKey> {
    for name in &access.agent_headers {
        let values = req.headers.get_all(name).into_iter().map(|v| v.as_bytes());
        match access.token_rules.validate_all(values) {
            Ok(Some(token)) => return Some(scope.key(token)),
            Ok(None) => {}
            Err(_) => *ignored |= bit(KeySource::AgentHeader),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use tether_affinity::TokenRules;

    use super::*;
    use crate::admission::{admit, Admission};

    const ALL: [KeySource; 4] = [
        KeySource::Header,
        KeySource::AgentHeader,
        KeySource::PromptCacheKey,
        KeySource::Fingerprint,
    ];
    const AGENT: [&str; 2] = ["x-session-id", "x-claude-code-session-id"];

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

    fn found(sources: &[KeySource], req: &RequestHeader, body: BodyView<'_, '_>) -> Resolution {
        let access = Access::for_tests(sources, &AGENT);
        let Admission::Admit(caller) = admit(&access, req) else {
            panic!("refused");
        };
        resolve(&access, &caller, req, body)
    }

    fn token_key(token: &str) -> RoutingKey {
        TenantScope::new("default").key(TokenRules::default().validate(token.as_bytes()).unwrap())
    }

    #[test]
    fn the_same_id_from_the_header_an_agent_header_or_the_body_is_one_session() {
        let body = BodyKeys::parse(br#"{"prompt_cache_key":"conv-1"}"#).unwrap();
        let from_header = found(
            &ALL,
            &request(&[("x-session-affinity", b"conv-1")]),
            BodyView::NotRead,
        );
        let from_agent = found(
            &ALL,
            &request(&[("x-claude-code-session-id", b"conv-1")]),
            BodyView::NotRead,
        );
        let from_body = found(&ALL, &request(&[]), BodyView::Read(&body));
        assert_eq!(
            from_header.found,
            Found::Key(token_key("conv-1"), KeySource::Header)
        );
        assert_eq!(
            from_agent.found,
            Found::Key(token_key("conv-1"), KeySource::AgentHeader)
        );
        assert_eq!(
            from_body.found,
            Found::Key(token_key("conv-1"), KeySource::PromptCacheKey)
        );
    }

    #[test]
    fn the_first_source_present_wins_in_the_configured_order() {
        let req = request(&[("x-session-affinity", b"h"), ("x-session-id", b"a")]);
        assert_eq!(
            found(&ALL, &req, BodyView::NotRead).found,
            Found::Key(token_key("h"), KeySource::Header)
        );
        let agent_first = [KeySource::AgentHeader, KeySource::Header];
        assert_eq!(
            found(&agent_first, &req, BodyView::NotRead).found,
            Found::Key(token_key("a"), KeySource::AgentHeader)
        );
    }

    #[test]
    fn a_body_source_before_any_key_asks_for_the_body_and_an_unusable_body_falls_through() {
        let req = request(&[]);
        assert_eq!(found(&ALL, &req, BodyView::NotRead).found, Found::NeedsBody);
        assert_eq!(found(&ALL, &req, BodyView::Unavailable).found, Found::None);
        let headers_only = [KeySource::Header, KeySource::AgentHeader];
        assert_eq!(
            found(&headers_only, &req, BodyView::NotRead).found,
            Found::None
        );
    }

    #[test]
    fn invalid_agent_ids_and_body_keys_are_ignored_and_counted_not_refused() {
        let body = BodyKeys::parse(
            br#"{"prompt_cache_key":"has space","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let req = request(&[
            ("x-session-id", b"bad value"),
            ("x-claude-code-session-id", b""),
        ]);
        let r = found(&ALL, &req, BodyView::Read(&body));
        assert!(
            matches!(r.found, Found::Key(_, KeySource::Fingerprint)),
            "{r:?}"
        );
        assert_eq!(
            r.ignored().collect::<Vec<_>>(),
            [KeySource::AgentHeader, KeySource::PromptCacheKey]
        );
    }

    #[test]
    fn the_user_fields_count_only_when_listed() {
        let body = BodyKeys::parse(br#"{"metadata":{"user_id":"end-user"}}"#).unwrap();
        let req = request(&[]);
        assert_eq!(found(&ALL, &req, BodyView::Read(&body)).found, Found::None);
        assert_eq!(
            found(&[KeySource::User], &req, BodyView::Read(&body)).found,
            Found::Key(token_key("end-user"), KeySource::User)
        );
    }

    #[test]
    fn a_bad_affinity_header_is_still_refused_but_only_while_it_is_a_source() {
        let req = request(&[("x-session-affinity", b"bad value")]);
        assert!(matches!(
            admit(&Access::for_tests(&ALL, &AGENT), &req),
            Admission::Reject { .. }
        ));
        assert!(matches!(
            admit(&Access::for_tests(&[KeySource::AgentHeader], &AGENT), &req),
            Admission::Admit(_)
        ));
    }
}
