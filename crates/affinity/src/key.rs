//! Tenant-scoped routing keys, keyed by a deployment secret.
//!
//! With a [`KeySecret`] the key is `SipHash-1-3(k_tenant, token)`, where
//! `k_tenant = SipHash-1-3-128(k_secret, tenant id)` is computed once per tenant when the
//! topology is loaded. Without one it is `xxh3_64(token, seed = xxh3_64(tenant id))`.
//!
//! Either way the tenant is the hash's key, not a prefix of its input, so the scope is
//! unambiguous (no `("ab", "c")` vs `("a", "bc")` aliasing), and two tenants sending the same
//! token get unrelated keys: they never share routing state or an override entry.
//!
//! Why a secret, and why SipHash for it: the override table takes a key's shard from its top
//! bits and its home slot from its low bits, and the ring places it by its high half. Anyone
//! who can compute the key (the unkeyed scheme is public, and a tenant knows its own id) can
//! search offline for thousands of tokens that share one shard and home slot, turning every
//! lookup in that shard into a walk along one long probe run, or that all land on one ring
//! point. xxh3's seed is not meant to stop that: it is a fast non-cryptographic hash whose
//! authors make no claim that seeded outputs are unpredictable, and seed-independent
//! multicollisions have been shown for hashes of its family (MurmurHash, CityHash). SipHash
//! is a keyed PRF designed for exactly this job (hash-flooding resistance; Rust's `HashMap`
//! uses SipHash-1-3 by default): without the key, an attacker cannot tell which tokens
//! collide. It costs tens of nanoseconds on a short token, once per request.
//!
//! The unkeyed scheme stays for deployments without a secret, so their keys (ring placement,
//! override entries, a shared store's bindings) do not change on upgrade.

use siphasher::sip::SipHasher13;
use siphasher::sip128::SipHasher13 as SipHasher13x128;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::SessionToken;

/// The shortest secret [`KeySecret::new`] accepts, in bytes (128 bits if they are random).
pub const MIN_KEY_SECRET_LEN: usize = 16;

/// A deployment's routing-key secret: the same on every instance of a tier, so that they all
/// compute the same keys. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySecret {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySecret(<redacted>)")
    }
}

/// A secret shorter than [`MIN_KEY_SECRET_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the secret has {0} bytes; at least {MIN_KEY_SECRET_LEN} are needed")]
pub struct ShortKeySecret(pub usize);

impl KeySecret {
    /// The secret from `bytes` (any length from [`MIN_KEY_SECRET_LEN`]). They are compressed
    /// to SipHash's 128-bit key by SipHash-1-3-128 under a fixed key: a random secret of at
    /// least 128 bits gives a key just as unpredictable.
    pub fn new(bytes: &[u8]) -> Result<Self, ShortKeySecret> {
        if bytes.len() < MIN_KEY_SECRET_LEN {
            return Err(ShortKeySecret(bytes.len()));
        }
        let h = SipHasher13x128::new_with_keys(0, 0).hash(bytes);
        Ok(KeySecret { k0: h.h1, k1: h.h2 })
    }
}

/// A tenant's hashing scope, computed once when the topology is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantScope {
    /// `xxh3_64(tenant id)`: the unkeyed seed, and the tenant's fingerprint for tenant
    /// locality (which must not change with the secret's presence).
    id_hash: u64,
    /// The tenant's SipHash key, when the deployment has a secret.
    keyed: Option<(u64, u64)>,
}

impl TenantScope {
    /// The scope of the tenant with this id, without a deployment secret (keys anyone can
    /// compute: see the module docs).
    pub fn new(tenant_id: &str) -> Self {
        TenantScope {
            id_hash: xxh3_64(tenant_id.as_bytes()),
            keyed: None,
        }
    }

    /// The scope of the tenant with this id, keyed by `secret` when there is one.
    pub fn with_secret(tenant_id: &str, secret: Option<&KeySecret>) -> Self {
        let keyed = secret.map(|s| {
            let h = SipHasher13x128::new_with_keys(s.k0, s.k1).hash(tenant_id.as_bytes());
            (h.h1, h.h2)
        });
        TenantScope {
            keyed,
            ..TenantScope::new(tenant_id)
        }
    }

    /// Whether keys in this scope depend on a deployment secret.
    pub fn is_keyed(&self) -> bool {
        self.keyed.is_some()
    }

    /// A scope standing for one session, so that a [`crate::TenantWarmth`] record can count
    /// the distinct sessions a replica served recently.
    pub(crate) fn of_session(key: RoutingKey) -> Self {
        TenantScope {
            id_hash: key.0,
            keyed: None,
        }
    }

    /// The scope's 64-bit hash (tenant locality fingerprints tenants by it).
    pub(crate) fn hash(self) -> u64 {
        self.id_hash
    }

    /// The 32 bits of the scope that tenant locality tells tenants apart by: what instances
    /// of a tier announce with a placement, so that each learns where the others put the
    /// tenant's new sessions. Not the routing keys' seed (that is all 64 bits).
    pub fn locality_tag(self) -> u32 {
        (self.id_hash >> 32) as u32
    }

    /// A scope that tenant locality cannot tell from the one `tag` was taken from
    /// ([`locality_tag`](Self::locality_tag)); only for recording warmth, never for keys.
    pub fn from_locality_tag(tag: u32) -> Self {
        TenantScope {
            id_hash: u64::from(tag) << 32,
            keyed: None,
        }
    }

    /// The routing key of `token` within this tenant.
    pub fn key(&self, token: SessionToken<'_>) -> RoutingKey {
        let digest = match self.keyed {
            Some((k0, k1)) => SipHasher13::new_with_keys(k0, k1).hash(token.as_bytes()),
            None => xxh3_64_with_seed(token.as_bytes(), self.id_hash),
        };
        RoutingKey(digest)
    }
}

/// The 64-bit digest a session is routed by. The only form of the token that leaves this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutingKey(pub u64);

impl RoutingKey {
    /// Position on the 32-bit ring (the high half of the digest).
    pub(crate) fn ring_position(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenRules;

    fn token(s: &str) -> SessionToken<'_> {
        TokenRules::default().validate(s.as_bytes()).unwrap()
    }

    #[test]
    fn same_tenant_and_token_give_the_same_key() {
        let a = TenantScope::new("acme").key(token("t-1"));
        let b = TenantScope::new("acme").key(token("t-1"));
        assert_eq!(a, b);
    }

    #[test]
    fn same_token_in_two_tenants_gives_different_keys() {
        let a = TenantScope::new("acme").key(token("t-1"));
        let b = TenantScope::new("globex").key(token("t-1"));
        assert_ne!(a, b);
    }

    #[test]
    fn tenant_and_token_boundaries_do_not_alias() {
        let a = TenantScope::new("ab").key(token("c"));
        let b = TenantScope::new("a").key(token("bc"));
        assert_ne!(a, b);
    }

    fn secret(s: &str) -> KeySecret {
        KeySecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_secret_changes_every_key_and_the_same_secret_agrees() {
        let s = secret("0123456789abcdef-tier");
        let plain = TenantScope::new("acme");
        let keyed = TenantScope::with_secret("acme", Some(&s));
        let again = TenantScope::with_secret("acme", Some(&secret("0123456789abcdef-tier")));
        let other = TenantScope::with_secret("acme", Some(&secret("0123456789abcdef-TIER")));
        for t in ["t-1", "t-2", "a-long-session-token-0000000000000000000000"] {
            assert_ne!(plain.key(token(t)), keyed.key(token(t)), "{t}");
            assert_eq!(keyed.key(token(t)), again.key(token(t)), "{t}");
            assert_ne!(keyed.key(token(t)), other.key(token(t)), "{t}");
        }
        assert!(keyed.is_keyed() && !plain.is_keyed());
    }

    #[test]
    fn keyed_scopes_keep_tenants_apart() {
        let s = secret("0123456789abcdef");
        let key = |tenant: &str, t: &str| TenantScope::with_secret(tenant, Some(&s)).key(token(t));
        assert_ne!(key("acme", "t-1"), key("globex", "t-1"));
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    #[test]
    fn no_secret_keeps_the_unkeyed_keys() {
        let a = TenantScope::with_secret("acme", None);
        assert_eq!(a, TenantScope::new("acme"));
        assert_eq!(
            a.key(token("t-1")),
            RoutingKey(xxh3_64_with_seed(b"t-1", xxh3_64(b"acme")))
        );
    }

    #[test]
    fn the_locality_tag_does_not_depend_on_the_secret() {
        let s = secret("0123456789abcdef");
        assert_eq!(
            TenantScope::with_secret("acme", Some(&s)).locality_tag(),
            TenantScope::new("acme").locality_tag()
        );
    }

    #[test]
    fn a_short_secret_is_refused_and_a_secret_is_never_printed() {
        assert_eq!(KeySecret::new(b"too-short").unwrap_err(), ShortKeySecret(9));
        let s = secret("0123456789abcdef");
        assert_eq!(format!("{s:?}"), "KeySecret(<redacted>)");
        assert!(!format!("{:?}", TenantScope::with_secret("acme", Some(&s))).contains("0123"));
    }
}
