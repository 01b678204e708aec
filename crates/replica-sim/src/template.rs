//! The tokenizer stand-in and the chat template: how a request becomes tokens and KV blocks.
//!
//! Messages render ChatML-style — `<|im_start|>{role}\n{content}<|im_end|>\n` — followed by
//! the generation prompt `<|im_start|>assistant\n`. One token is 4 bytes of the rendering
//! (rounded up), close to what BPE tokenizers average on English and code, and exactly
//! reproducible. Because the assistant's reply renders as `{content}<|im_end|>\n` right after
//! the generation prompt, the prompt of turn k plus its reply is a byte prefix of the prompt of
//! turn k+1: that is what makes multi-turn prefix caching work, here as in vLLM.

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes per token.
pub const BYTES_PER_TOKEN: usize = 4;
/// Tokens per KV-cache block (vLLM's default).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;
/// Opens a message.
pub const IM_START: &str = "<|im_start|>";
/// Closes a message.
pub const IM_END: &str = "<|im_end|>\n";

/// One chat message, as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Text content (text parts of a multi-part content are concatenated).
    pub content: String,
}

/// Why a `messages` value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessagesError {
    /// Not an array.
    #[error("`messages` must be an array")]
    NotAnArray,
    /// An element without a string `role`.
    #[error("`messages[{0}]` must be an object with a string `role`")]
    BadMessage(usize),
}

/// Reads OpenAI-style `messages` (content as a string or as an array of parts).
pub fn parse_messages(messages: &Value) -> Result<Vec<ChatMessage>, MessagesError> {
    let array = messages.as_array().ok_or(MessagesError::NotAnArray)?;
    array
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or(MessagesError::BadMessage(i))?;
            Ok(ChatMessage {
                role: role.to_owned(),
                content: content_text(m.get("content")),
            })
        })
        .collect()
}

/// The text of a `content` value: a string, or the `text` of each part of an array.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Renders messages plus the generation prompt.
pub fn render_prompt(messages: &[ChatMessage]) -> Vec<u8> {
    let mut out = Vec::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum());
    for m in messages {
        out.extend_from_slice(IM_START.as_bytes());
        out.extend_from_slice(m.role.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(m.content.as_bytes());
        out.extend_from_slice(IM_END.as_bytes());
    }
    out.extend_from_slice(IM_START.as_bytes());
    out.extend_from_slice(b"assistant\n");
    out
}

/// What the reply adds after the prompt, as the next turn's rendering will contain it.
pub fn render_reply(content: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + IM_END.len());
    out.extend_from_slice(content.as_bytes());
    out.extend_from_slice(IM_END.as_bytes());
    out
}

/// Tokens in `bytes` of rendering.
pub fn token_count(bytes: usize) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN) as u64
}

/// Chained hashes of the full blocks of `bytes`: block i's hash covers its own bytes and, via
/// the seed, every block before it — so equal hashes mean equal prefixes (as in vLLM's
/// automatic prefix caching). A trailing partial block is not cached.
pub fn block_hashes(bytes: &[u8], block_tokens: usize) -> Vec<u64> {
    let block_bytes = block_tokens.max(1) * BYTES_PER_TOKEN;
    let mut parent = 0u64;
    bytes
        .chunks_exact(block_bytes)
        .map(|block| {
            parent = xxh3_64_with_seed(block, parent);
            parent
        })
        .collect()
}

/// The deterministic reply text of `tokens` tokens: 4-byte tokens `"00a "`, `"00b "`, ….
pub fn reply_text(tokens: u64) -> String {
    (0..tokens).map(|i| format!("{:03x} ", i % 4096)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_turn_plus_its_reply_is_a_prefix_of_the_next_turn() {
        let turn1 = vec![msg("system", "be brief"), msg("user", "hello")];
        let reply = reply_text(5);
        let mut turn2 = turn1.clone();
        turn2.push(msg("assistant", &reply));
        turn2.push(msg("user", "more"));
        let mut extended = render_prompt(&turn1);
        extended.extend(render_reply(&reply));
        assert!(render_prompt(&turn2).starts_with(&extended));
    }

    #[test]
    fn block_hashes_chain_so_equal_hashes_mean_equal_prefixes() {
        let a = vec![b'a'; 64 * 3];
        let mut b = a.clone();
        b[70] = b'b'; // second block differs
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_ne!(
            ha[2], hb[2],
            "a block after a difference differs too, though its bytes match"
        );
    }

    #[test]
    fn partial_blocks_are_not_hashed() {
        assert_eq!(block_hashes(&[0u8; 63], 16).len(), 0);
        assert_eq!(block_hashes(&[0u8; 64 * 2 + 10], 16).len(), 2);
    }

    #[test]
    fn token_counts_round_up() {
        assert_eq!(token_count(0), 0);
        assert_eq!(token_count(1), 1);
        assert_eq!(token_count(8), 2);
        assert_eq!(token_count(9), 3);
    }

    #[test]
    fn reply_tokens_are_four_bytes_each() {
        assert_eq!(reply_text(3), "000 001 002 ");
        assert_eq!(token_count(reply_text(100).len()), 100);
    }

    #[test]
    fn messages_parse_strings_and_parts() {
        let m = parse_messages(&json!([
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
            {"role": "assistant"}
        ]))
        .unwrap();
        assert_eq!(m[0].content, "hi");
        assert_eq!(m[1].content, "ab");
        assert_eq!(m[2].content, "");
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(parse_messages(&json!("hi")), Err(MessagesError::NotAnArray));
        assert_eq!(
            parse_messages(&json!([{"role": "user"}, {"content": "x"}])),
            Err(MessagesError::BadMessage(1))
        );
    }
}
