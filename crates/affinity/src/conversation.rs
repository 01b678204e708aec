//! Session keys a request body already carries, and the conversation fingerprint.
//!
//! Many clients never send the affinity header, yet their request bodies name the
//! conversation anyway: OpenAI's `prompt_cache_key` (Chat Completions and Responses), the
//! `user` field or Anthropic's `metadata.user_id`, and, for a client that sends nothing at
//! all, the conversation itself: every turn resends the same head (system prompt and first
//! user message). [`BodyKeys::parse`] reads those fields out of a JSON body in one pass
//! without copying strings that need no unescaping; [`Fingerprinter`] turns the head into a
//! tenant-scoped [`RoutingKey`].
//!
//! # Canonical head
//!
//! The fingerprint hashes decoded text, never raw bytes, so what a client library may change
//! when it re-serialises a conversation does not change it: whitespace between tokens, the
//! order of keys in a message or content part, and how a character is escaped (`é`,
//! `\u00e9`) all give the same fingerprint. What it hashes, in this order:
//!
//! 1. the tenant's scope and the `model` (see below for where it must be);
//! 2. the system prompt: Anthropic's top-level `system`, the Responses API's `instructions`
//!    (both as `model`, only before the end of the head),
//!    then every `system`/`developer` message before the first user message;
//! 3. the first `user` message (`messages[]`, or the Responses API's `input`, a string or a
//!    list of items).
//!
//! A content given as a list of parts contributes the `text` of each part, each as its own
//! length-prefixed piece (so `["ab"]` and `["a","b"]` differ). A piece longer than
//! [`HEAD_TEXT_CAP`] bytes contributes its length, its first half-cap and its last half-cap
//! bytes: the work per request is bounded however large the head, and two agents sharing a
//! long system prompt still differ by the end of their first user message.
//!
//! A body without a first user message has no head (and no fingerprint).
//!
//! # Only what comes before the end of the head
//!
//! `model`, `system` and `instructions` count only when they come before the first user
//! message ends, that is before `messages`/`input` in the body's key order; later ones are
//! ignored. A large body is read only as a prefix ([`BodyKeys::parse_prefix`]), and whatever
//! follows the head may lie beyond that prefix: hashing only what precedes the head's end
//! gives every turn of a conversation the same fingerprint whether its body was read whole or
//! as a prefix, so a conversation keeps its key as it grows past the read-ahead limit. The
//! order of keys inside messages and content parts never matters, and a client library
//! writes its top-level keys in the same order on every turn.
//!
//! A head that does not end within the prefix (a system prompt and first message of about
//! the read-ahead limit or more) has no fingerprint.

use std::borrow::Cow;
use std::fmt;
use std::hash::Hasher;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use siphasher::sip::SipHasher24;

use crate::{RoutingKey, TenantScope};

/// Bytes of one text piece hashed whole; a longer piece contributes its first and last
/// `HEAD_TEXT_CAP / 2` bytes and its length.
pub const HEAD_TEXT_CAP: usize = 4096;

/// The session-naming fields of a JSON request body, borrowed from it where no unescaping
/// was needed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyKeys<'a> {
    /// `model`, wherever it is in the body.
    pub model: Option<Cow<'a, str>>,
    /// `model` when it comes before the end of the head: the one the fingerprint hashes.
    head_model: Option<Cow<'a, str>>,
    /// OpenAI's `prompt_cache_key`.
    pub prompt_cache_key: Option<Cow<'a, str>>,
    /// OpenAI's `user`.
    pub user: Option<Cow<'a, str>>,
    /// Anthropic's `metadata.user_id`.
    pub metadata_user_id: Option<Cow<'a, str>>,
    /// Top-level system text (`system`, `instructions`).
    top_system: Vec<Cow<'a, str>>,
    /// `system`/`developer` messages before the first user message.
    message_system: Vec<Cow<'a, str>>,
    /// The first user message's text pieces; `None` until one is seen whole.
    first_user: Option<Vec<Cow<'a, str>>>,
    /// Parsed from a prefix that ended before the body did.
    truncated: bool,
}

impl<'a> BodyKeys<'a> {
    /// Reads the fields out of `body`. `None` when it is not a JSON object (or a field has a
    /// type no API gives it): the caller falls back to the next key source.
    pub fn parse(body: &'a [u8]) -> Option<BodyKeys<'a>> {
        let mut keys = BodyKeys::default();
        let mut de = serde_json::Deserializer::from_slice(body);
        de.deserialize_map(TopVisitor { keys: &mut keys }).ok()?;
        de.end().ok()?;
        Some(keys)
    }

    /// Reads the fields out of `prefix`, the first bytes of a body whose rest was not read:
    /// as far as the prefix goes. A field that lies beyond it is absent here, which says
    /// nothing about the body (the caller falls back to the next key source); the head is
    /// there only if it ended within the prefix ([`BodyKeys::has_head`]). `None` when the
    /// prefix is not the start of a JSON object. A prefix that is the whole body parses as
    /// [`BodyKeys::parse`] does.
    pub fn parse_prefix(prefix: &'a [u8]) -> Option<BodyKeys<'a>> {
        let mut keys = BodyKeys::default();
        let mut de = serde_json::Deserializer::from_slice(prefix);
        match de.deserialize_map(TopVisitor { keys: &mut keys }) {
            Ok(()) => de.end().ok()?,
            // The visitor keeps every field it finished before the prefix ran out; one cut
            // off midway was never stored.
            Err(e) if e.is_eof() => keys.truncated = true,
            Err(_) => return None,
        }
        Some(keys)
    }

    /// Whether these fields come from a prefix that ended before the body did.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The end user named in the body: `user`, else `metadata.user_id`.
    pub fn user_id(&self) -> Option<&str> {
        self.user.as_deref().or(self.metadata_user_id.as_deref())
    }

    /// Whether the body has a conversation head (a first user message, whole).
    pub fn has_head(&self) -> bool {
        self.first_user.is_some()
    }
}

/// Hashes conversation heads into routing keys with a secret key (SipHash-2-4), so a client
/// cannot aim a crafted head at another conversation's key without knowing the secret.
#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 16],
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(<key redacted>)")
    }
}

impl Fingerprinter {
    /// A fingerprinter keyed with `key`.
    pub fn new(key: [u8; 16]) -> Self {
        Fingerprinter { key }
    }

    /// The routing key of `body`'s conversation head within the tenant `scope`; `None`
    /// when the body has no head.
    pub fn fingerprint(&self, scope: TenantScope, body: &BodyKeys<'_>) -> Option<RoutingKey> {
        let first_user = body.first_user.as_ref()?;
        let mut h = SipHasher24::new_with_key(&self.key);
        h.write_u64(scope.hash());
        write_piece(&mut h, body.head_model.as_deref().unwrap_or(""));
        h.write_u8(b'S');
        for piece in body.top_system.iter().chain(&body.message_system) {
            write_piece(&mut h, piece);
        }
        h.write_u8(b'U');
        for piece in first_user {
            write_piece(&mut h, piece);
        }
        Some(RoutingKey(h.finish()))
    }
}

/// One length-prefixed piece, capped at [`HEAD_TEXT_CAP`] bytes (its head and its tail).
fn write_piece(h: &mut SipHasher24, text: &str) {
    let bytes = text.as_bytes();
    h.write_u64(bytes.len() as u64);
    if bytes.len() <= HEAD_TEXT_CAP {
        h.write(bytes);
    } else {
        let half = HEAD_TEXT_CAP / 2;
        h.write(&bytes[..half]);
        h.write(&bytes[bytes.len() - half..]);
    }
}

/// A string, borrowed from the input when it needed no unescaping.
struct Text<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v)))
    }
}

/// A string or `null`.
struct MaybeText<'a>(Option<Cow<'a, str>>);

impl<'de> de::Deserialize<'de> for MaybeText<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(MaybeText(Option::<Text<'de>>::deserialize(d)?.map(|t| t.0)))
    }
}

struct TopVisitor<'k, 'a> {
    keys: &'k mut BodyKeys<'a>,
}

impl<'de> Visitor<'de> for TopVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let keys = self.keys;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            // Past the head, `model` and the system prompt no longer count (see the module
            // documentation).
            let in_head = keys.first_user.is_none();
            match &*key.0 {
                "model" => {
                    keys.model = map.next_value::<MaybeText<'de>>()?.0;
                    if in_head {
                        keys.head_model.clone_from(&keys.model);
                    }
                }
                "prompt_cache_key" => keys.prompt_cache_key = map.next_value::<MaybeText<'de>>()?.0,
                "user" => keys.user = map.next_value::<MaybeText<'de>>()?.0,
                "metadata" => map.next_value_seed(MetadataSeed { keys: &mut *keys })?,
                "system" | "instructions" if in_head => {
                    map.next_value_seed(TextsSeed {
                        out: &mut keys.top_system,
                    })?;
                }
                "messages" | "input" => map.next_value_seed(MessagesSeed { keys: &mut *keys })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A seed that is its own visitor over whatever JSON value comes (`deserialize_any`): the
/// visitors below read only the shapes they name and refuse the rest.
macro_rules! seed_visits_any {
    ($($seed:ident),+) => {$(
        impl<'de> DeserializeSeed<'de> for $seed<'_, 'de> {
            type Value = ();

            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }
    )+};
}

seed_visits_any!(MetadataSeed, TextsSeed, PartSeed, MessagesSeed);

/// Anthropic's `metadata` object (or `null`): only `user_id` is read.
struct MetadataSeed<'k, 'a> {
    keys: &'k mut BodyKeys<'a>,
}

impl<'de> Visitor<'de> for MetadataSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if key.0 == "user_id" {
                self.keys.metadata_user_id = map.next_value::<MaybeText<'de>>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A content: a string, `null`, or a list of parts whose `text` fields are appended to `out`.
struct TextsSeed<'k, 'a> {
    out: &'k mut Vec<Cow<'a, str>>,
}

impl<'de> Visitor<'de> for TextsSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a list of content parts, or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.out.push(Cow::Borrowed(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.out.push(Cow::Owned(v.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.out.push(Cow::Owned(v));
        Ok(())
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq
            .next_element_seed(PartSeed {
                out: &mut *self.out,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One content part: its `text` (if any) is appended; images, tool calls and the like add
/// nothing. A bare string counts as a text part.
struct PartSeed<'k, 'a> {
    out: &'k mut Vec<Cow<'a, str>>,
}

impl<'de> Visitor<'de> for PartSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.out.push(Cow::Borrowed(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.out.push(Cow::Owned(v.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.out.push(Cow::Owned(v));
        Ok(())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if key.0 == "text" {
                if let Some(text) = map.next_value::<MaybeText<'de>>()?.0 {
                    self.out.push(text);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// `messages` (or the Responses API's `input`): a list of messages, or a string that is the
/// first user message itself.
struct MessagesSeed<'k, 'a> {
    keys: &'k mut BodyKeys<'a>,
}

impl<'de> Visitor<'de> for MessagesSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages or a string")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.keys
            .first_user
            .get_or_insert_with(Vec::new)
            .push(Cow::Borrowed(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.keys
            .first_user
            .get_or_insert_with(Vec::new)
            .push(Cow::Owned(v.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.keys
            .first_user
            .get_or_insert_with(Vec::new)
            .push(Cow::Owned(v));
        Ok(())
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        loop {
            // Past the head, the rest of the conversation is only skipped.
            if self.keys.first_user.is_some() {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            }
            let mut texts = Vec::new();
            let Some(role) = seq.next_element_seed(MessageSeed { texts: &mut texts })? else {
                return Ok(());
            };
            match role.as_deref() {
                Some("user") => self.keys.first_user = Some(texts),
                Some("system" | "developer") => self.keys.message_system.append(&mut texts),
                _ => {}
            }
        }
    }
}

/// One message: its `role` is returned and its `content` texts collected (in either key
/// order, hence collected before the role is known).
struct MessageSeed<'k, 'a> {
    texts: &'k mut Vec<Cow<'a, str>>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_, 'de> {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_, 'de> {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut role = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match &*key.0 {
                "role" => role = map.next_value::<MaybeText<'de>>()?.0,
                "content" => map.next_value_seed(TextsSeed {
                    out: &mut *self.texts,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests;
