//! Walking the top-level members of a complete JSON object without parsing it.
//!
//! Request bodies and SSE events are read for a few top-level members (`stream`, `usage`,
//! `model`, …) among many others (the prompt, the choices). A full parse validates and
//! compares every key and builds or skips every value at serde's pace; this walk crosses
//! strings with a SIMD search for their closing quote and nested values with a bracket count,
//! and hands the caller each member's raw key and value bytes. It does not validate scalars:
//! callers parse the values they keep, and fall back to a full parse when the walk gives up.

/// Calls `each(key, value)` for every member of the object that is the whole of `body` (keys
/// without their quotes and still escaped, values raw) until it returns false. Returns where
/// the closing brace is, or `None` when `body` is not one object the walk can follow (not an
/// object, unterminated, unbalanced, trailing bytes, or `each` stopped it).
pub(crate) fn top_level_members<'a>(
    body: &'a [u8],
    mut each: impl FnMut(&'a [u8], &'a [u8]) -> bool,
) -> Option<usize> {
    let mut i = skip_whitespace(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_whitespace(body, i + 1);
    let close = if body.get(i) == Some(&b'}') {
        i
    } else {
        loop {
            if body.get(i) != Some(&b'"') {
                return None;
            }
            let key_end = string_end(body, i)?;
            let key = &body[i + 1..key_end - 1];
            i = skip_whitespace(body, key_end);
            if body.get(i) != Some(&b':') {
                return None;
            }
            i = skip_whitespace(body, i + 1);
            let value_end = value_end(body, i)?;
            if !each(key, &body[i..value_end]) {
                return None;
            }
            i = skip_whitespace(body, value_end);
            match body.get(i) {
                Some(b',') => i = skip_whitespace(body, i + 1),
                Some(b'}') => break i,
                _ => return None,
            }
        }
    };
    (skip_whitespace(body, close + 1) == body.len()).then_some(close)
}

fn skip_whitespace(body: &[u8], mut i: usize) -> usize {
    while matches!(body.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// The index just past the string starting (with its quote) at `start`.
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
        if body[at] == b'"' {
            return Some(at + 1);
        }
        // A backslash escapes the next byte (`\"` does not end the string).
        i = at + 2;
    }
}

/// The bytes that open or close a nested value or a string.
static STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'[' as usize] = true;
    table[b'}' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// The index just past the value starting at `start`.
fn value_end(body: &[u8], start: usize) -> Option<usize> {
    match body.get(start)? {
        b'"' => string_end(body, start),
        b'{' | b'[' => {
            let mut depth = 0u32;
            let mut i = start;
            loop {
                // Straight to the next byte that matters: most of a nested value (numbers,
                // spaces, keys' and values' quotes aside) is skipped a table lookup a byte.
                i += body
                    .get(i..)?
                    .iter()
                    .position(|&b| STRUCTURAL[usize::from(b)])?;
                match body[i] {
                    b'"' => {
                        i = string_end(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                }
                i += 1;
            }
        }
        _ => {
            // A number, `true`, `false` or `null`: up to the next delimiter.
            let len = body[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(body.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(body: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        top_level_members(body.as_bytes(), |k, v| {
            out.push((
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ));
            true
        })?;
        Some(out)
    }

    #[test]
    fn members_are_handed_over_raw() {
        let got = members(r#" { "a" : [1, "]", {"b": "}"}] , "k\"q": "v\\" ,"n":-1.5e3,"o":{}} "#);
        assert_eq!(
            got.unwrap(),
            [
                ("a".into(), r#"[1, "]", {"b": "}"}]"#.into()),
                (r#"k\"q"#.into(), r#""v\\""#.into()),
                ("n".into(), "-1.5e3".into()),
                ("o".into(), "{}".into()),
            ]
        );
        assert_eq!(members("{}").unwrap(), []);
    }

    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~\\\\\"{}\\[\\]é]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\"{}]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_walk_hands_over_what_serde_parses(
            members in proptest::collection::btree_map("[a-z_\"]{1,8}", json(), 0..8),
            pretty: bool,
        ) {
            let object = serde_json::Value::Object(members.clone().into_iter().collect());
            let text = if pretty {
                serde_json::to_string_pretty(&object).unwrap()
            } else {
                serde_json::to_string(&object).unwrap()
            };
            let mut walked = Vec::new();
            let close = top_level_members(text.as_bytes(), |k, v| {
                walked.push((k.to_vec(), v.to_vec()));
                true
            });
            proptest::prop_assert_eq!(close, Some(text.rfind('}').unwrap()));
            proptest::prop_assert_eq!(walked.len(), members.len());
            for ((key, value), (want_key, want_value)) in walked.iter().zip(&members) {
                let key: String = serde_json::from_slice(&[b"\"", &key[..], b"\""].concat()).unwrap();
                proptest::prop_assert_eq!(&key, want_key);
                let value: serde_json::Value = serde_json::from_slice(value).unwrap();
                proptest::prop_assert_eq!(&value, want_value);
            }
        }
    }

    #[test]
    fn what_the_walk_cannot_follow_is_none() {
        for body in [
            "",
            "[]",
            "{",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1"#,
            r#"{"a":"x}"#,
            r#"{"a":[1}"#,
            r#"{"a":1} x"#,
            r#"{"a":1,}"#,
            r#"{a:1}"#,
        ] {
            assert_eq!(members(body), None, "{body}");
        }
    }
}
