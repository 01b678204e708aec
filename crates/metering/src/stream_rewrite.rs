//! Adding `stream_options.include_usage` to a request body as it passes, piece by piece,
//! holding none of it.
//!
//! [`ensure_stream_usage`](crate::ensure_stream_usage) needs the whole body. A large or
//! chunked body would have to be held until its end for that, so [`StreamUsageRewrite`]
//! follows the top-level object across the pieces instead (one state machine, the same walk
//! as [`crate::json_walk`]) and, when the object's closing brace arrives, knows everything the
//! decision needs: the option goes in just before that brace, in the piece that carries it.
//! Every piece before goes on as it came.
//!
//! It decides as the fast path of `ensure_stream_usage` does: the option is added when the
//! top-level `stream` is `true` and there is no top-level `stream_options`. The shapes that
//! path sends to a full parse (an escaped key, a decisive key seen twice, a `stream_options`
//! without `include_usage: true`) would need bytes already sent to change, so here they pass
//! unchanged.

/// Where the walk is in the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Before the opening brace.
    #[default]
    Start,
    /// After the opening brace: a key or the closing brace.
    KeyOrClose,
    /// After a comma: a key.
    NextKey,
    /// In a key's string.
    Key,
    /// After a key: the colon.
    AfterKey,
    /// After the colon: a value.
    BeforeValue,
    /// In a string value.
    StringValue,
    /// In an object or array value, `depth` deep.
    NestedValue,
    /// In a number, `true`, `false` or `null`.
    ScalarValue,
    /// After a value: a comma or the closing brace.
    AfterValue,
    /// After the closing brace.
    Closed,
    /// Not an object the walk can follow: the rest passes unchanged.
    Failed,
}

/// Which member's value is being crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Member {
    #[default]
    Other,
    Stream,
    StreamOptions,
}

/// The longest key kept to compare (`stream_options`); longer keys are other keys.
const KEY_CAP: usize = 16;

/// A request body's walk, fed piece by piece: see the module doc.
#[derive(Debug, Default)]
pub struct StreamUsageRewrite {
    state: State,
    /// Nesting depth in a [`State::NestedValue`].
    depth: u32,
    /// In a string inside a nested value.
    in_string: bool,
    /// The previous byte in a string was an unescaped backslash.
    escaped: bool,
    key: Vec<u8>,
    key_escaped: bool,
    member: Member,
    /// The scalar value of `stream` so far (only `true` counts, so at most 4 bytes are kept).
    stream_value: Vec<u8>,
    /// `stream` was seen, and its value was exactly `true`.
    stream_seen: bool,
    stream_true: bool,
    options_seen: bool,
    /// A key the walk cannot compare (escaped) or a decisive key seen twice.
    ambiguous: bool,
    injected: bool,
}

/// What is added, just before the closing brace.
pub const USAGE_OPTION: &[u8] = b",\"stream_options\":{\"include_usage\":true}";

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl StreamUsageRewrite {
    /// Walks the next piece of the body; returns where in it the option goes (just before the
    /// object's closing brace) when it does.
    pub fn feed(&mut self, piece: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < piece.len() {
            let b = piece[i];
            match self.state {
                State::Failed => return None,
                State::Start => match b {
                    b'{' => self.state = State::KeyOrClose,
                    _ if is_space(b) => {}
                    _ => self.state = State::Failed,
                },
                State::KeyOrClose | State::NextKey => match b {
                    b'"' => {
                        self.key.clear();
                        self.key_escaped = false;
                        self.escaped = false;
                        self.state = State::Key;
                    }
                    b'}' if self.state == State::KeyOrClose => return self.close(i),
                    _ if is_space(b) => {}
                    _ => self.state = State::Failed,
                },
                State::Key => {
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                        self.key_escaped = true;
                    } else if b == b'"' {
                        self.state = State::AfterKey;
                        i += 1;
                        continue;
                    }
                    if self.key.len() <= KEY_CAP {
                        self.key.push(b);
                    }
                }
                State::AfterKey => match b {
                    b':' => {
                        self.start_member();
                        self.state = State::BeforeValue;
                    }
                    _ if is_space(b) => {}
                    _ => self.state = State::Failed,
                },
                State::BeforeValue => match b {
                    b'"' => {
                        self.escaped = false;
                        self.state = State::StringValue;
                    }
                    b'{' | b'[' => {
                        self.depth = 1;
                        self.in_string = false;
                        self.escaped = false;
                        self.state = State::NestedValue;
                    }
                    _ if is_space(b) => {}
                    b',' | b'}' | b']' => self.state = State::Failed,
                    _ => {
                        self.stream_value.clear();
                        self.keep_scalar(b);
                        self.state = State::ScalarValue;
                    }
                },
                State::StringValue => {
                    if self.escaped {
                        self.escaped = false;
                    } else {
                        // The prompt is nearly all of a body: jump to the next quote or
                        // backslash instead of looking at every byte.
                        match memchr::memchr2(b'"', b'\\', &piece[i..]) {
                            None => return None,
                            Some(at) => {
                                i += at;
                                if piece[i] == b'"' {
                                    self.end_value();
                                } else {
                                    self.escaped = true;
                                }
                            }
                        }
                    }
                }
                State::NestedValue => {
                    if self.in_string {
                        if self.escaped {
                            self.escaped = false;
                        } else {
                            match memchr::memchr2(b'"', b'\\', &piece[i..]) {
                                None => return None,
                                Some(at) => {
                                    i += at;
                                    if piece[i] == b'"' {
                                        self.in_string = false;
                                    } else {
                                        self.escaped = true;
                                    }
                                }
                            }
                        }
                    } else {
                        match b {
                            b'"' => self.in_string = true,
                            b'{' | b'[' => self.depth += 1,
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 0 {
                                    self.end_value();
                                }
                            }
                            _ => {}
                        }
                    }
                }
                State::ScalarValue => {
                    if matches!(b, b',' | b'}' | b']') || is_space(b) {
                        // The delimiter belongs to what follows the value.
                        self.end_value();
                        continue;
                    }
                    self.keep_scalar(b);
                }
                State::AfterValue => match b {
                    b',' => self.state = State::NextKey,
                    b'}' => return self.close(i),
                    _ if is_space(b) => {}
                    _ => self.state = State::Failed,
                },
                State::Closed => {
                    if !is_space(b) {
                        self.state = State::Failed;
                    }
                }
            }
            i += 1;
        }
        None
    }

    /// Whether the option was added.
    pub fn injected(&self) -> bool {
        self.injected
    }

    fn start_member(&mut self) {
        self.ambiguous |= self.key_escaped;
        self.member = match self.key.as_slice() {
            b"stream" => {
                self.ambiguous |= self.stream_seen;
                self.stream_seen = true;
                Member::Stream
            }
            b"stream_options" => {
                self.ambiguous |= self.options_seen;
                self.options_seen = true;
                Member::StreamOptions
            }
            _ => Member::Other,
        };
    }

    fn keep_scalar(&mut self, b: u8) {
        if self.member == Member::Stream && self.stream_value.len() <= 4 {
            self.stream_value.push(b);
        }
    }

    fn end_value(&mut self) {
        if self.member == Member::Stream {
            self.stream_true = self.state == State::ScalarValue && self.stream_value == b"true";
        }
        self.state = State::AfterValue;
    }

    fn close(&mut self, at: usize) -> Option<usize> {
        self.state = State::Closed;
        self.injected = self.stream_true && !self.options_seen && !self.ambiguous;
        self.injected.then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ensure_stream_usage;

    /// The body as it leaves, fed in pieces cut at `cuts`.
    fn rewrite(body: &[u8], cuts: &[usize]) -> (Vec<u8>, bool) {
        let mut walk = StreamUsageRewrite::default();
        let mut out = Vec::new();
        let mut from = 0;
        for to in cuts.iter().copied().chain([body.len()]) {
            let piece = &body[from..to];
            match walk.feed(piece) {
                Some(at) => {
                    out.extend_from_slice(&piece[..at]);
                    out.extend_from_slice(USAGE_OPTION);
                    out.extend_from_slice(&piece[at..]);
                }
                None => out.extend_from_slice(piece),
            }
            from = to;
        }
        (out, walk.injected())
    }

    const SHAPES: &[&str] = &[
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"a \"}\" b\\"}]}"#,
        r#" { "messages" : [ {"content": "x{[" } ] , "stream" : true } "#,
        r#"{"stream":true}"#,
        r#"{"stream":false,"messages":[]}"#,
        r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"messages":[],"stream":true,"stream_options":{"include_usage":false}}"#,
        r#"{"stream":"true"}"#,
        r#"{"stream":true,"n":-1.5e3,"o":{},"a":[1,"]",{"b":"}"}]}"#,
        r#"{"messages":[]}"#,
        r#"{}"#,
        r#"[]"#,
        r#"{"stream":true,"stream":false}"#,
        r#"{"str\u0065am":true}"#,
        r#"{"stream":true"#,
        "not json",
    ];

    #[test]
    fn every_cut_gives_what_the_whole_body_rewrite_gives_for_the_common_shapes() {
        for shape in SHAPES {
            let body = shape.as_bytes();
            let whole = ensure_stream_usage(body);
            for cut in 0..=body.len() {
                let (out, injected) = rewrite(body, &[cut]);
                match &whole {
                    Some(expected) if injected => assert_eq!(&out, expected, "{shape} at {cut}"),
                    // Shapes only a full parse settles pass unchanged.
                    _ => {
                        assert!(!injected, "{shape} at {cut}");
                        assert_eq!(out, body, "{shape} at {cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_common_streaming_shapes_gain_the_option() {
        for shape in [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[7]] {
            let (out, injected) = rewrite(shape.as_bytes(), &[3, 9]);
            assert!(injected, "{shape}");
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{shape}");
        }
    }

    #[test]
    fn a_byte_at_a_time_works_too() {
        let body = SHAPES[0].as_bytes();
        let cuts: Vec<usize> = (1..body.len()).collect();
        let (out, injected) = rewrite(body, &cuts);
        assert!(injected);
        assert_eq!(Some(out), ensure_stream_usage(body));
    }

    proptest::proptest! {
        #[test]
        fn random_cuts_agree_with_the_whole_body_rewrite(
            content in "[ -~]{0,40}",
            stream in proptest::bool::ANY,
            first in proptest::bool::ANY,
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let content = serde_json::to_string(&content).unwrap();
            let body = if first {
                format!(r#"{{"stream":{stream},"messages":[{{"content":{content}}}]}}"#)
            } else {
                format!(r#"{{"messages":[{{"content":{content}}}],"stream":{stream}}}"#)
            };
            let body = body.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let (out, injected) = rewrite(body, &cuts);
            proptest::prop_assert_eq!(injected, stream);
            proptest::prop_assert_eq!(Some(out).filter(|_| injected), ensure_stream_usage(body));
        }
    }
}
