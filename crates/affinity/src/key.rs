//! Tenant-scoped routing keys.
//!
//! The key is `xxh3_64(token, seed = xxh3_64(tenant id))`. Seeding with the tenant (rather than
//! hashing a concatenation) makes the scope unambiguous — no `("ab", "c")` vs `("a", "bc")`
//! aliasing — and costs one precomputed `u64` per tenant. Two tenants sending the same token get
//! unrelated keys, so they never share routing state or an override entry.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::SessionToken;

/// A tenant's hashing scope, computed once when the topology is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantScope(u64);

impl TenantScope {
    /// The scope of the tenant with this id.
    pub fn new(tenant_id: &str) -> Self {
        TenantScope(xxh3_64(tenant_id.as_bytes()))
    }

    /// A scope standing for one session, so that a [`crate::TenantWarmth`] record can count
    /// the distinct sessions a replica served recently.
    pub(crate) fn of_session(key: RoutingKey) -> Self {
        TenantScope(key.0)
    }

    /// The scope's 64-bit hash (tenant locality fingerprints tenants by it).
    pub(crate) fn hash(self) -> u64 {
        self.0
    }

    /// The routing key of `token` within this tenant.
    pub fn key(&self, token: SessionToken<'_>) -> RoutingKey {
        RoutingKey(xxh3_64_with_seed(token.as_bytes(), self.0))
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
}
