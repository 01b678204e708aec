use proptest::prelude::*;
use serde_json::json;

use super::*;

const KEY: [u8; 16] = *b"0123456789abcdef";

fn fingerprint(body: &str) -> Option<RoutingKey> {
    let keys = BodyKeys::parse(body.as_bytes())?;
    Fingerprinter::new(KEY).fingerprint(TenantScope::new("acme"), &keys)
}

#[test]
fn chat_fields_are_read_and_borrowed_when_unescaped() {
    let body = br#"{"model":"m","prompt_cache_key":"pck-1","user":"u-1",
        "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
    let keys = BodyKeys::parse(body).unwrap();
    assert_eq!(keys.model.as_deref(), Some("m"));
    assert!(matches!(
        keys.prompt_cache_key,
        Some(Cow::Borrowed("pck-1"))
    ));
    assert_eq!(keys.user_id(), Some("u-1"));
    assert!(keys.has_head());
}

#[test]
fn anthropic_metadata_user_id_is_the_user_when_no_user_field() {
    let body = br#"{"metadata":{"user_id":"end-user-7","other":1},"messages":[]}"#;
    let keys = BodyKeys::parse(body).unwrap();
    assert_eq!(keys.user_id(), Some("end-user-7"));
    assert!(!keys.has_head(), "no user message, no head");
}

#[test]
fn bodies_that_are_not_a_json_object_give_nothing() {
    for body in [
        &b""[..],
        b"not json",
        b"[1,2]",
        b"{\"model\":",
        b"{\"model\":\"m\"} trailing",
        b"{\"messages\":[\"a\"",
        b"{\"model\":1}",
    ] {
        assert_eq!(
            BodyKeys::parse(body),
            None,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn null_fields_read_as_absent() {
    let body = br#"{"prompt_cache_key":null,"user":null,"metadata":null,"system":null,
        "messages":[{"role":"assistant","content":null,"tool_calls":[]},{"role":"user","content":"x"}]}"#;
    let keys = BodyKeys::parse(body).unwrap();
    assert_eq!(keys.prompt_cache_key, None);
    assert_eq!(keys.user_id(), None);
    assert!(keys.has_head());
}

#[test]
fn later_turns_of_a_conversation_keep_its_fingerprint() {
    let first = json!({"model": "m", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers."},
    ]});
    let mut later = first.clone();
    let messages = later["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": "Nile, Rhine, Po."}));
    messages.push(json!({"role": "user", "content": "Two more."}));
    assert_eq!(
        fingerprint(&first.to_string()),
        fingerprint(&later.to_string())
    );
    assert!(fingerprint(&first.to_string()).is_some());
}

#[test]
fn a_different_first_message_system_prompt_model_or_tenant_changes_it() {
    let base = json!({"model": "m", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}]});
    let fp = |v: &serde_json::Value| fingerprint(&v.to_string()).unwrap();
    let mut other_user = base.clone();
    other_user["messages"][1]["content"] = json!("V");
    let mut other_system = base.clone();
    other_system["messages"][0]["content"] = json!("T");
    assert_ne!(fp(&base), fp(&other_user));
    assert_ne!(fp(&base), fp(&other_system));
    let head = r#""messages":[{"role":"user","content":"U"}]}"#;
    assert_ne!(
        fingerprint(&format!(r#"{{"model":"m",{head}"#)),
        fingerprint(&format!(r#"{{"model":"n",{head}"#)),
    );
    let text = base.to_string();
    let keys = BodyKeys::parse(text.as_bytes()).unwrap();
    let f = Fingerprinter::new(KEY);
    assert_ne!(
        f.fingerprint(TenantScope::new("acme"), &keys),
        f.fingerprint(TenantScope::new("globex"), &keys),
        "tenant-scoped"
    );
    assert_ne!(
        f.fingerprint(TenantScope::new("acme"), &keys),
        Fingerprinter::new(*b"fedcba9876543210").fingerprint(TenantScope::new("acme"), &keys),
        "keyed"
    );
}

#[test]
fn the_three_dialects_share_one_canonical_head() {
    // The same system prompt and first message, as Chat Completions, Anthropic Messages
    // and the Responses API send them.
    // (`json!` sorts keys, which would put `model` and `system` after the head.)
    let chat = r#"{"model":"m","messages":[
        {"role":"developer","content":[{"type":"text","text":"S"}]},
        {"role":"user","content":[{"type":"text","text":"U"}]}]}"#;
    let anthropic = r#"{"model":"m","system":[{"type":"text","text":"S"}],
        "messages":[{"role":"user","content":[{"type":"text","text":"U"}]}]}"#;
    let responses = r#"{"model":"m","instructions":"S","input":[
        {"type":"message","role":"user","content":[{"type":"input_text","text":"U"}]}]}"#;
    let fp = fingerprint(chat);
    assert!(fp.is_some());
    assert_eq!(fp, fingerprint(anthropic));
    assert_eq!(fp, fingerprint(responses));
}

#[test]
fn a_responses_input_string_is_the_first_user_message() {
    let a = r#"{"model":"m","instructions":"S","input":"U"}"#;
    let b = r#"{"model":"m","instructions":"S","input":[{"role":"user","content":"U"}]}"#;
    assert_eq!(fingerprint(a), fingerprint(b));
    assert_ne!(
        fingerprint(a),
        fingerprint(r#"{"model":"m","instructions":"T","input":"U"}"#)
    );
}

#[test]
fn text_pieces_are_delimited() {
    let one = json!({"messages": [{"role": "user", "content": [{"type":"text","text":"ab"}]}]});
    let two = json!({"messages": [{"role": "user", "content": [
        {"type":"text","text":"a"}, {"type":"text","text":"b"}]}]});
    assert_ne!(fingerprint(&one.to_string()), fingerprint(&two.to_string()));
}

#[test]
fn long_pieces_are_hashed_by_length_head_and_tail() {
    let long = |middle: char, end: &str| {
        let text: String = "x".repeat(HEAD_TEXT_CAP)
            + &middle.to_string().repeat(HEAD_TEXT_CAP)
            + &"y".repeat(HEAD_TEXT_CAP)
            + end;
        json!({"messages": [{"role": "user", "content": text}]}).to_string()
    };
    // Only the middle differs: beyond the cap, by design.
    assert_eq!(fingerprint(&long('a', "!")), fingerprint(&long('b', "!")));
    // The end differs: two agents with a long common preamble stay apart.
    assert_ne!(fingerprint(&long('a', "!")), fingerprint(&long('a', "?")));
}

#[test]
fn a_body_without_a_user_message_has_no_fingerprint() {
    assert_eq!(
        fingerprint(r#"{"model":"m","messages":[{"role":"system","content":"S"}]}"#),
        None
    );
    assert_eq!(fingerprint(r#"{"model":"m"}"#), None);
}

#[test]
fn model_and_system_count_only_before_the_end_of_the_head() {
    let head = r#"{"role":"user","content":"U"}"#;
    let fp = |before: &str, after: &str| {
        fingerprint(&format!(r#"{{{before}"messages":[{head}]{after}}}"#)).unwrap()
    };
    assert_ne!(fp(r#""model":"m","#, ""), fp(r#""model":"n","#, ""));
    assert_ne!(fp(r#""system":"S","#, ""), fp(r#""system":"T","#, ""));
    // After the head: ignored, as a prefix that stops at the head could not see them.
    assert_eq!(fp("", r#","model":"m""#), fp("", r#","model":"n""#));
    assert_eq!(fp("", r#","system":"S""#), fp("", ""));
    assert_eq!(fp("", r#","instructions":"S""#), fp("", ""));
    // Still read as fields.
    let keys = BodyKeys::parse(br#"{"messages":[],"model":"m"}"#).unwrap();
    assert_eq!(keys.model.as_deref(), Some("m"));
}

#[test]
fn a_prefix_gives_what_ended_within_it() {
    let body = br#"{"model":"m","prompt_cache_key":"pck","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"},{"role":"assistant","content":"A"}],"user":"late"}"#;
    let whole = BodyKeys::parse(body).unwrap();
    assert!(!whole.truncated());
    let f = Fingerprinter::new(KEY);
    let scope = TenantScope::new("acme");
    let cut = body.len() - 40;
    let prefix = BodyKeys::parse_prefix(&body[..cut]).unwrap();
    assert!(prefix.truncated());
    assert_eq!(prefix.prompt_cache_key.as_deref(), Some("pck"));
    assert_eq!(prefix.user, None, "beyond the prefix: unknown");
    assert!(prefix.has_head());
    assert_eq!(f.fingerprint(scope, &prefix), f.fingerprint(scope, &whole));
    // Cut inside the first user message: no head, no fingerprint.
    let inside = body.windows(3).position(|w| w == b"\"U\"").unwrap() + 1;
    let early = BodyKeys::parse_prefix(&body[..inside]).unwrap();
    assert!(!early.has_head());
    assert_eq!(f.fingerprint(scope, &early), None);
    // A prefix that is the whole body, and one that is not JSON.
    assert_eq!(BodyKeys::parse_prefix(body), Some(whole));
    assert_eq!(BodyKeys::parse_prefix(b"<html"), None);
    assert_eq!(BodyKeys::parse_prefix(b"{\"model\":1"), None);
}

/// Writes `value` as JSON with the keys of nested objects in reverse order (top-level keys in
/// their order), extra whitespace, and every non-alphanumeric character of strings escaped as
/// `\uXXXX`: what another client library might send for the same request.
fn reserialise(value: &serde_json::Value, out: &mut String) {
    reserialise_at(value, true, out);
}

fn reserialise_at(value: &serde_json::Value, top: bool, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            out.push_str("{ \n");
            let entries: Vec<_> = if top {
                map.iter().collect()
            } else {
                map.iter().rev().collect()
            };
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(" ,\t");
                }
                escape(k, out);
                out.push_str(" : ");
                reserialise_at(v, false, out);
            }
            out.push_str("\r\n}");
        }
        serde_json::Value::Array(items) => {
            out.push_str("[ ");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                reserialise_at(v, false, out);
            }
            out.push_str(" ]");
        }
        serde_json::Value::String(s) => escape(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.push('"');
}

proptest! {
    #[test]
    fn reserialising_a_request_never_changes_its_fingerprint(
        system in ".{0,40}",
        user in ".{1,40}",
        model in "[a-z0-9.-]{1,12}",
        turns in proptest::collection::vec(".{0,20}", 0..4),
    ) {
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": user}),
        ];
        for t in &turns {
            messages.push(json!({"role": "assistant", "content": t}));
        }
        let body = json!({"model": model, "stream": true, "messages": messages});
        let compact = body.to_string();
        let mut other = String::new();
        reserialise(&body, &mut other);
        let fp = fingerprint(&compact);
        prop_assert!(fp.is_some());
        prop_assert_eq!(fp, fingerprint(&other), "{} vs {}", compact, other);
    }

    /// Every prefix that holds the head gives the whole body's fingerprint: a conversation
    /// keeps its key when its body grows past what is read ahead.
    #[test]
    fn every_prefix_holding_the_head_gives_the_whole_bodys_fingerprint(
        system in ".{0,30}",
        user in ".{1,30}",
        model in "[a-z0-9.-]{1,12}",
        model_first in any::<bool>(),
        top_system in proptest::option::of(".{0,20}"),
        turns in proptest::collection::vec(".{0,30}", 0..4),
        pck in proptest::option::of("[a-z0-9]{1,8}"),
    ) {
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": [{"type": "text", "text": user}]}),
        ];
        for t in &turns {
            messages.push(json!({"role": "assistant", "content": t}));
        }
        // Top-level keys in a chosen order: `model` (and a top-level system) before or after
        // the messages.
        let mut body = String::from("{");
        let mut fields = Vec::new();
        if let Some(s) = &top_system {
            fields.push(format!("\"system\":{}", json!(s)));
        }
        fields.push(format!("\"model\":{}", json!(model)));
        if let Some(p) = &pck {
            fields.push(format!("\"prompt_cache_key\":{}", json!(p)));
        }
        let messages = format!("\"messages\":{}", serde_json::Value::Array(messages));
        if model_first {
            fields.push(messages);
        } else {
            fields.insert(0, messages);
        }
        body.push_str(&fields.join(","));
        body.push('}');
        let bytes = body.as_bytes();
        let f = Fingerprinter::new(KEY);
        let scope = TenantScope::new("acme");
        let whole = f.fingerprint(scope, &BodyKeys::parse(bytes).unwrap());
        prop_assert!(whole.is_some());
        let mut with_head = 0;
        for n in 0..=bytes.len() {
            let Some(keys) = BodyKeys::parse_prefix(&bytes[..n]) else {
                continue;
            };
            if keys.has_head() {
                with_head += 1;
                prop_assert_eq!(f.fingerprint(scope, &keys), whole, "prefix {}", n);
            }
        }
        prop_assert!(with_head > 0);
    }

    #[test]
    fn parsing_an_arbitrary_prefix_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = BodyKeys::parse_prefix(&body).map(|k| Fingerprinter::new(KEY).fingerprint(TenantScope::new("t"), &k));
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = BodyKeys::parse(&body).map(|k| Fingerprinter::new(KEY).fingerprint(TenantScope::new("t"), &k));
    }
}
