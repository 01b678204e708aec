//! The formats this store writes to Redis: store keys, stored values (replica ids) and the
//! pub/sub message announcing a binding. Pure functions, so every rule is unit-tested.
//!
//! Everything read back is checked before it reaches the proxy: another program (or an old
//! version of this one) may have written under the same prefix or channel.

use std::fmt::Write as _;
use std::sync::Arc;

/// The longest replica id the store writes or accepts, in bytes. Longer values are treated as
/// garbage: real ids are short (`eu-2`), and the bound keeps a corrupted value from becoming a
/// large allocation on every lookup.
pub const MAX_REPLICA_ID_LEN: usize = 256;

/// Whether `replica` can be stored: 1..=[`MAX_REPLICA_ID_LEN`] bytes. (Whether the proxy knows
/// the replica is the proxy's business.)
pub fn is_storable_replica_id(replica: &str) -> bool {
    !replica.is_empty() && replica.len() <= MAX_REPLICA_ID_LEN
}

/// `{prefix}{key:016x}`: fixed width, so keys sort and grep well and never alias.
pub(crate) fn store_key(prefix: &str, key: u64) -> String {
    let mut out = String::with_capacity(prefix.len() + 16);
    out.push_str(prefix);
    // Writing to a String cannot fail.
    let _ = write!(out, "{key:016x}");
    out
}

/// A stored value as a replica id, or `None` if it is not one this store could have written.
pub(crate) fn replica_from_value(bytes: &[u8]) -> Option<Arc<str>> {
    if bytes.is_empty() || bytes.len() > MAX_REPLICA_ID_LEN {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(Arc::from)
}

/// `{origin:016x}:{key:016x}:{replica}`, or with a group tag
/// `{origin:016x}:{key:016x}/{group:08x}:{replica}`. The replica id goes last, so it may itself
/// contain `:`. An instance that predates group tags reads a tagged key field as malformed and
/// ignores the message (it counts it as garbage), so in a tier being upgraded the older
/// instances stop hearing the newer ones' changes until they are upgraded too.
pub(crate) fn encode_bind(origin: u64, key: u64, group: Option<u32>, replica: &str) -> String {
    let mut out = String::with_capacity(43 + replica.len());
    let _ = write!(out, "{origin:016x}:{key:016x}");
    if let Some(group) = group {
        let _ = write!(out, "/{group:08x}");
    }
    out.push(':');
    out.push_str(replica);
    out
}

/// A binding announced on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BindMessage<'a> {
    /// The instance that made the binding.
    pub origin: u64,
    pub key: u64,
    /// The caller's group tag, if it gave one (the proxy: the session's tenant).
    pub group: Option<u32>,
    pub replica: &'a str,
}

/// Parses a message written by [`encode_bind`]; `None` for anything else.
pub(crate) fn decode_bind(payload: &[u8]) -> Option<BindMessage<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.splitn(3, ':');
    let origin = parse_hex16(fields.next()?)?;
    let key_field = fields.next()?;
    let (key, group) = match key_field.split_once('/') {
        None => (parse_hex16(key_field)?, None),
        Some((key, group)) => (parse_hex16(key)?, Some(parse_hex8(group)?)),
    };
    let replica = fields.next()?;
    is_storable_replica_id(replica).then_some(BindMessage {
        origin,
        key,
        group,
        replica,
    })
}

/// Exactly 8 hex digits.
fn parse_hex8(field: &str) -> Option<u32> {
    if field.len() != 8 || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(field, 16).ok()
}

/// Most replicas a load report names; a longer report is malformed.
pub const MAX_LOAD_ENTRIES: usize = 4096;

/// `L{origin:016x}` followed by `:{count}:{len}:{replica}` per replica, `len` being the id's
/// length in bytes (so an id may hold any character). Starts with a letter that is not a hex
/// digit, so a binding's decoder never takes it for one.
pub(crate) fn encode_load(origin: u64, entries: &[(&str, u32)]) -> String {
    let mut out = String::with_capacity(17 + entries.len() * 16);
    let _ = write!(out, "L{origin:016x}");
    for (replica, count) in entries {
        let _ = write!(out, ":{count}:{}:{replica}", replica.len());
    }
    out
}

/// A load report: requests in flight per replica at the reporting instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadMessage<'a> {
    /// The instance that reported.
    pub origin: u64,
    pub entries: Vec<(&'a str, u32)>,
}

/// Parses a message written by [`encode_load`]; `None` for anything else (including a report
/// naming more than [`MAX_LOAD_ENTRIES`] replicas or a replica id that is not storable).
pub(crate) fn decode_load(payload: &[u8]) -> Option<LoadMessage<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix('L')?;
    let origin = parse_hex16(rest.get(..16)?)?;
    let mut rest = &rest[16..];
    let mut entries = Vec::new();
    while !rest.is_empty() {
        if entries.len() == MAX_LOAD_ENTRIES {
            return None;
        }
        let body = rest.strip_prefix(':')?;
        let (count, body) = body.split_once(':')?;
        let (len, body) = body.split_once(':')?;
        let count = parse_decimal(count)?;
        let len = usize::try_from(parse_decimal(len)?).ok()?;
        let replica = body.get(..len)?;
        if !is_storable_replica_id(replica) {
            return None;
        }
        entries.push((replica, count));
        rest = &body[len..];
    }
    Some(LoadMessage { origin, entries })
}

/// 1 to 10 decimal digits that fit a `u32`.
fn parse_decimal(field: &str) -> Option<u32> {
    if field.is_empty() || field.len() > 10 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// Exactly 16 hex digits: `from_str_radix` alone would also take a sign or fewer digits.
fn parse_hex16(field: &str) -> Option<u64> {
    if field.len() != 16 || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(field, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn store_keys_are_the_prefix_and_sixteen_hex_digits() {
        assert_eq!(store_key("tether:s:", 0xab), "tether:s:00000000000000ab");
        assert_eq!(store_key("", u64::MAX), "ffffffffffffffff");
    }

    #[test]
    fn values_that_are_not_replica_ids_are_refused() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"eu-2", Some("eu-2")),
            (b"", None),
            (b"\xff\xfe", None),
            (
                &[b'x'; MAX_REPLICA_ID_LEN],
                Some(&*"x".repeat(MAX_REPLICA_ID_LEN)),
            ),
            (&[b'x'; MAX_REPLICA_ID_LEN + 1], None),
        ];
        for (value, expected) in cases {
            assert_eq!(replica_from_value(value).as_deref(), *expected, "{value:?}");
        }
    }

    #[test]
    fn bind_messages_round_trip_even_with_colons_in_the_replica_id() {
        let text = encode_bind(7, 0xdead_beef, None, "eu:2");
        assert_eq!(text, "0000000000000007:00000000deadbeef:eu:2");
        assert_eq!(
            decode_bind(text.as_bytes()),
            Some(BindMessage {
                origin: 7,
                key: 0xdead_beef,
                group: None,
                replica: "eu:2"
            })
        );
        let tagged = encode_bind(7, 0xdead_beef, Some(0xab), "eu:2");
        assert_eq!(tagged, "0000000000000007:00000000deadbeef/000000ab:eu:2");
        assert_eq!(
            decode_bind(tagged.as_bytes()),
            Some(BindMessage {
                origin: 7,
                key: 0xdead_beef,
                group: Some(0xab),
                replica: "eu:2"
            })
        );
    }

    #[test]
    fn malformed_bind_messages_are_refused() {
        for payload in [
            &b""[..],
            b"hello",
            b"0000000000000007:00000000deadbeef",
            b"0000000000000007:00000000deadbeef:",
            b"7:00000000deadbeef:eu-2",
            b"+000000000000007:00000000deadbeef:eu-2",
            b"000000000000000g:00000000deadbeef:eu-2",
            b"0000000000000007:00000000deadbeef:\xff",
            b"0000000000000007:00000000deadbeef/:eu-2",
            b"0000000000000007:00000000deadbeef/ab:eu-2",
            b"0000000000000007:00000000deadbeef/0000000g:eu-2",
            b"0000000000000007:00000000deadbeef/+000000a:eu-2",
            b"0000000000000007:deadbeef/000000ab:eu-2",
        ] {
            assert_eq!(decode_bind(payload), None, "{payload:?}");
        }
        let too_long = encode_bind(1, 2, None, &"r".repeat(MAX_REPLICA_ID_LEN + 1));
        assert_eq!(decode_bind(too_long.as_bytes()), None);
    }

    #[test]
    fn load_reports_round_trip_and_are_never_taken_for_bindings() {
        let text = encode_load(7, &[("eu-1", 3), ("a:b", 0)]);
        assert_eq!(text, "L0000000000000007:3:4:eu-1:0:3:a:b");
        assert_eq!(
            decode_load(text.as_bytes()),
            Some(LoadMessage {
                origin: 7,
                entries: vec![("eu-1", 3), ("a:b", 0)]
            })
        );
        assert_eq!(decode_bind(text.as_bytes()), None);
        assert_eq!(
            decode_load(b"L0000000000000007"),
            Some(LoadMessage {
                origin: 7,
                entries: vec![]
            })
        );
        for payload in [
            &b""[..],
            b"L",
            b"L7:3:4:eu-1",
            b"L0000000000000007:",
            b"L0000000000000007:3:5:eu-1",
            b"L0000000000000007:3:0:",
            b"L0000000000000007:-3:4:eu-1",
            b"L0000000000000007:99999999999:4:eu-1",
            b"L0000000000000007:3:4:eu-1:",
            b"0000000000000007:00000000deadbeef:eu-2",
        ] {
            assert_eq!(decode_load(payload), None, "{payload:?}");
        }
    }

    proptest! {
        #[test]
        fn any_load_report_round_trips(
            origin: u64,
            entries in proptest::collection::vec(("[ -~]{1,40}", any::<u32>()), 0..20),
        ) {
            let borrowed: Vec<(&str, u32)> =
                entries.iter().map(|(id, n)| (id.as_str(), *n)).collect();
            let text = encode_load(origin, &borrowed);
            prop_assert_eq!(
                decode_load(text.as_bytes()),
                Some(LoadMessage { origin, entries: borrowed.clone() })
            );
        }

        #[test]
        fn decoding_arbitrary_bytes_as_a_load_report_never_panics(
            payload in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut with_prefix = b"L0000000000000001".to_vec();
            with_prefix.extend(&payload);
            let _ = decode_load(&payload);
            let _ = decode_load(&with_prefix);
        }

        #[test]
        fn any_bind_message_round_trips(
            origin: u64,
            key: u64,
            group: Option<u32>,
            replica in "[ -~]{1,256}",
        ) {
            let text = encode_bind(origin, key, group, &replica);
            prop_assert_eq!(
                decode_bind(text.as_bytes()),
                Some(BindMessage { origin, key, group, replica: &replica })
            );
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_bind(&payload);
            let _ = replica_from_value(&payload);
        }
    }
}
