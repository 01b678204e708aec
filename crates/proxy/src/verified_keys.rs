//! API keys already checked against the configured SHA-256 digests, so that a tenant's every
//! request does not pay a SHA-256 of its key.
//!
//! The configuration holds digests, never keys, so a key can only be recognised by hashing
//! it. Once a key has matched, it is remembered under a keyed 128-bit SipHash tag (a random
//! key per process): finding the tag costs a small fraction of the SHA-256, and presenting
//! another key with the same tag means forging a 128-bit PRF output under a key the client
//! never sees. Only keys that matched a digest are remembered, so the cache holds at most one
//! entry per configured key whatever clients send; it lives as long as the configuration's
//! generation (a reload starts a fresh one).

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::RwLock;

use siphasher::sip128::{Hasher128, SipHasher13};

/// A SHA-256 digest of an API key, as the configuration holds it.
pub type KeyDigest = [u8; 32];

/// Keys seen to match a configured digest, by tag.
#[derive(Debug)]
pub struct VerifiedKeys {
    tag_key: [u8; 16],
    /// At most `capacity` entries: one per configured key.
    seen: RwLock<HashMap<u128, KeyDigest>>,
    capacity: usize,
}

impl VerifiedKeys {
    /// An empty cache for a configuration with `configured` keys.
    pub fn new(configured: usize) -> VerifiedKeys {
        VerifiedKeys {
            tag_key: rand::random(),
            seen: RwLock::new(HashMap::with_capacity(configured)),
            capacity: configured,
        }
    }

    /// The digest of `api_key` if it is one of the configured ones (`is_configured`), from
    /// the cache when the key matched before.
    pub fn digest(
        &self,
        api_key: &[u8],
        is_configured: impl Fn(&KeyDigest) -> bool,
    ) -> Option<KeyDigest> {
        let tag = self.tag(api_key);
        // A poisoned lock (a panic while inserting) only costs the shortcut.
        if let Some(digest) = self.seen.read().ok().and_then(|m| m.get(&tag).copied()) {
            return Some(digest);
        }
        let digest = sha256(api_key);
        if !is_configured(&digest) {
            return None;
        }
        if let Ok(mut seen) = self.seen.write() {
            if seen.len() < self.capacity {
                seen.insert(tag, digest);
            }
        }
        Some(digest)
    }

    fn tag(&self, api_key: &[u8]) -> u128 {
        let mut h = SipHasher13::new_with_key(&self.tag_key);
        h.write(api_key);
        h.finish128().as_u128()
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> KeyDigest {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_key_is_found_again_and_an_unknown_one_never_enters_the_cache() {
        let configured = [sha256(b"sk-acme"), sha256(b"sk-globex")];
        let keys = VerifiedKeys::new(configured.len());
        let known = |d: &KeyDigest| configured.contains(d);
        for _ in 0..3 {
            assert_eq!(keys.digest(b"sk-acme", known), Some(configured[0]));
            assert_eq!(keys.digest(b"sk-globex", known), Some(configured[1]));
        }
        for i in 0..100 {
            let guess = format!("sk-guess-{i}");
            assert_eq!(keys.digest(guess.as_bytes(), known), None);
        }
        assert_eq!(keys.seen.read().unwrap().len(), 2);
    }

    #[test]
    fn a_cached_key_is_recognised_even_if_the_check_would_now_refuse_it() {
        // The cache belongs to one configuration: a key it holds is one that configuration
        // knows, so the check is not run again.
        let digest = sha256(b"sk-acme");
        let keys = VerifiedKeys::new(1);
        assert_eq!(keys.digest(b"sk-acme", |d| *d == digest), Some(digest));
        assert_eq!(keys.digest(b"sk-acme", |_| false), Some(digest));
    }

    #[test]
    fn tags_are_keyed_per_cache() {
        let (a, b) = (VerifiedKeys::new(1), VerifiedKeys::new(1));
        assert_ne!(a.tag(b"sk-acme"), b.tag(b"sk-acme"));
    }
}
