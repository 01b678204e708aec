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
    let mut other_model = base.clone();
    other_model["model"] = json!("n");
    assert_ne!(fp(&base), fp(&other_user));
    assert_ne!(fp(&base), fp(&other_system));
    assert_ne!(fp(&base), fp(&other_model));
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
    let chat = json!({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "S"}]},
        {"role": "user", "content": [{"type": "text", "text": "U"}]}]});
    let anthropic = json!({"model": "m", "system": [{"type": "text", "text": "S"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "U"}]}]});
    let responses = json!({"model": "m", "instructions": "S", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "U"}]}]});
    let fp = fingerprint(&chat.to_string());
    assert!(fp.is_some());
    assert_eq!(fp, fingerprint(&anthropic.to_string()));
    assert_eq!(fp, fingerprint(&responses.to_string()));
}

#[test]
fn a_responses_input_string_is_the_first_user_message() {
    let a = json!({"model": "m", "instructions": "S", "input": "U"});
    let b = json!({"model": "m", "instructions": "S", "input": [{"role": "user", "content": "U"}]});
    assert_eq!(fingerprint(&a.to_string()), fingerprint(&b.to_string()));
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

/// Writes `value` as JSON with the object keys in reverse order, extra whitespace, and
/// every non-alphanumeric character of strings escaped as `\uXXXX`: what another client
/// library might send for the same request.
fn reserialise(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            out.push_str("{ \n");
            for (i, (k, v)) in map.iter().rev().enumerate() {
                if i > 0 {
                    out.push_str(" ,\t");
                }
                escape(k, out);
                out.push_str(" : ");
                reserialise(v, out);
            }
            out.push_str("\r\n}");
        }
        serde_json::Value::Array(items) => {
            out.push_str("[ ");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                reserialise(v, out);
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

    #[test]
    fn parsing_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = BodyKeys::parse(&body).map(|k| Fingerprinter::new(KEY).fingerprint(TenantScope::new("t"), &k));
    }
}
