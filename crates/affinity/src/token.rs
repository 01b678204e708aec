//! The session-affinity token: what a valid one looks like, and the reasons one is refused.
//!
//! A token is opaque to Tether (clients mint a UUID per conversation) but it is untrusted input
//! that ends up hashed on the hot path, so the rules are strict and cheap to check: 1 to
//! `max_len` bytes, each a visible ASCII character (0x21..=0x7E). That rules out empty values,
//! whitespace (which proxies and clients trim inconsistently, so two turns of one session could
//! differ), control bytes and anything non-ASCII.
//!
//! Error messages never contain the token itself: a token is a capability for someone's warm
//! cache and must not be echoed to clients or written to logs.

use thiserror::Error;

/// Default maximum token length in bytes.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 128;

/// A validated session token, borrowed from the request header.
///
/// It deliberately implements neither `Display` nor `Debug` with the content: the only thing
/// the rest of Tether ever sees is the [`RoutingKey`](crate::RoutingKey) derived from it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionToken<'a>(&'a [u8]);

impl<'a> SessionToken<'a> {
    /// The token's bytes, for hashing.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a valid token has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SessionToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionToken(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a token header was refused. The message is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// The header is present but empty.
    #[error("the session-affinity header is empty")]
    Empty,
    /// The value is longer than allowed.
    #[error("the session-affinity token is {len} bytes long; the maximum is {max}")]
    TooLong {
        /// Length of the offending value.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A byte outside visible ASCII.
    #[error(
        "the session-affinity token has a {kind} at byte {position}; only visible ASCII (0x21-0x7E) is allowed"
    )]
    InvalidByte {
        /// Zero-based offset of the first bad byte.
        position: usize,
        /// What kind of byte it was (never the byte of a secret itself beyond its class).
        kind: ByteKind,
    },
    /// The header was sent more than once with different values.
    #[error("the session-affinity header is repeated with different values")]
    Conflicting,
}

/// The class of a refused byte, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteKind {
    /// 0x20.
    Space,
    /// 0x00..=0x1F or 0x7F.
    Control,
    /// 0x80..=0xFF.
    NonAscii,
}

impl std::fmt::Display for ByteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ByteKind::Space => "space",
            ByteKind::Control => "control character",
            ByteKind::NonAscii => "non-ASCII byte",
        })
    }
}

/// Token validation rules (from the topology's `affinity` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRules {
    /// Maximum length in bytes (at least 1).
    pub max_len: usize,
}

impl Default for TokenRules {
    fn default() -> Self {
        TokenRules {
            max_len: DEFAULT_MAX_TOKEN_LEN,
        }
    }
}

impl TokenRules {
    /// Validates one header value.
    pub fn validate<'a>(&self, value: &'a [u8]) -> Result<SessionToken<'a>, TokenError> {
        if value.is_empty() {
            return Err(TokenError::Empty);
        }
        if value.len() > self.max_len {
            return Err(TokenError::TooLong {
                len: value.len(),
                max: self.max_len,
            });
        }
        if let Some(position) = value.iter().position(|b| !(0x21..=0x7E).contains(b)) {
            let byte = value[position];
            let kind = match byte {
                b' ' => ByteKind::Space,
                0x80..=0xFF => ByteKind::NonAscii,
                _ => ByteKind::Control,
            };
            return Err(TokenError::InvalidByte { position, kind });
        }
        Ok(SessionToken(value))
    }

    /// Validates every occurrence of the header in a request.
    ///
    /// No occurrence → `Ok(None)` (a tokenless request). Repeats with the same value are
    /// tolerated (some client stacks duplicate headers); repeats with different values are
    /// refused, because silently picking one would route the session unpredictably.
    pub fn validate_all<'a, I>(&self, values: I) -> Result<Option<SessionToken<'a>>, TokenError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut token: Option<SessionToken<'a>> = None;
        for value in values {
            let next = self.validate(value)?;
            match token {
                None => token = Some(next),
                Some(first) if first == next => {}
                Some(_) => return Err(TokenError::Conflicting),
            }
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(max_len: usize) -> TokenRules {
        TokenRules { max_len }
    }

    #[test]
    fn a_uuid_is_a_valid_token() {
        let t = rules(128)
            .validate(b"3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c")
            .unwrap();
        assert_eq!(t.len(), 36);
    }

    #[test]
    fn every_visible_ascii_byte_is_allowed() {
        let all: Vec<u8> = (0x21..=0x7E).collect();
        assert!(rules(128).validate(&all).is_ok());
    }

    #[test]
    fn empty_token_is_refused() {
        assert_eq!(rules(128).validate(b""), Err(TokenError::Empty));
    }

    #[test]
    fn token_at_the_limit_passes_and_one_byte_more_fails() {
        assert!(rules(4).validate(b"abcd").is_ok());
        assert_eq!(
            rules(4).validate(b"abcde"),
            Err(TokenError::TooLong { len: 5, max: 4 })
        );
    }

    #[test]
    fn bad_bytes_are_refused_with_their_class_and_position() {
        let cases: &[(&[u8], usize, ByteKind)] = &[
            (b"ab cd", 2, ByteKind::Space),
            (b"\tabc", 0, ByteKind::Control),
            (b"abc\x7f", 3, ByteKind::Control),
            (b"abc\x00", 3, ByteKind::Control),
            ("caf\u{e9}".as_bytes(), 3, ByteKind::NonAscii),
        ];
        for (value, position, kind) in cases {
            assert_eq!(
                rules(128).validate(value),
                Err(TokenError::InvalidByte {
                    position: *position,
                    kind: *kind
                }),
                "value {value:?}"
            );
        }
    }

    #[test]
    fn error_messages_never_contain_the_token() {
        let secret = b"super-secret token";
        let err = rules(128).validate(secret).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = rules(4).validate(b"secretsecret").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let t = rules(128).validate(b"hunter2").unwrap();
        assert_eq!(format!("{t:?}"), "SessionToken(<7 bytes redacted>)");
    }

    #[test]
    fn absent_header_is_a_tokenless_request() {
        assert_eq!(rules(128).validate_all(std::iter::empty()), Ok(None));
    }

    #[test]
    fn repeated_header_with_the_same_value_is_accepted() {
        let values: [&[u8]; 2] = [b"abc", b"abc"];
        let t = rules(128).validate_all(values).unwrap().unwrap();
        assert_eq!(t.as_bytes(), b"abc");
    }

    #[test]
    fn repeated_header_with_different_values_is_refused() {
        let values: [&[u8]; 2] = [b"abc", b"abd"];
        assert_eq!(
            rules(128).validate_all(values),
            Err(TokenError::Conflicting)
        );
    }

    #[test]
    fn a_bad_repeat_is_reported_as_the_bad_value() {
        let values: [&[u8]; 2] = [b"abc", b""];
        assert_eq!(rules(128).validate_all(values), Err(TokenError::Empty));
    }
}
