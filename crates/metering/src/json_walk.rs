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

/// The index just past the value starting at `start`.
fn value_end(body: &[u8], start: usize) -> Option<usize> {
    match body.get(start)? {
        b'"' => string_end(body, start),
        b'{' | b'[' => {
            let mut depth = 0u32;
            let mut i = start;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = string_end(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
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
