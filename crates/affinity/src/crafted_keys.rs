//! Tokens crafted to collide, as an attacker who knows the key algorithm and its own tenant id
//! would make them: what they cost the override table without a deployment secret, and with one.

use crate::{KeySecret, ManualClock, OverrideTable, ReplicaTag, TenantScope, TokenRules};

const TENANT: &str = "acme";
/// Crafted tokens: enough to fill one shard well past its first growth.
const CRAFTED: usize = 100;
/// Bits of the key the attacker fixes: the shard (top 6) and the home slot in any shard of up
/// to 256 slots (low 8), which is where 100 entries of one shard live.
const SHARD_SHIFT: u32 = 58;
const HOME_MASK: u64 = 0xFF;

/// A token the way a client could send it: visible ASCII, counter in hex.
fn token_bytes(n: u64) -> [u8; 22] {
    let mut out = *b"flood-0000000000000000";
    for (i, b) in out[6..].iter_mut().enumerate() {
        let nibble = (n >> (60 - 4 * i)) & 0xF;
        *b = b"0123456789abcdef"[nibble as usize];
    }
    out
}

/// The attacker's offline search: tokens whose *unkeyed* key has shard 0 and home slot 0.
fn craft(scope: TenantScope) -> Vec<[u8; 22]> {
    let rules = TokenRules::default();
    let mut found = Vec::with_capacity(CRAFTED);
    let mut n = 0u64;
    while found.len() < CRAFTED {
        let bytes = token_bytes(n);
        n += 1;
        let key = scope.key(rules.validate(&bytes).expect("visible ASCII")).0;
        if key >> SHARD_SHIFT == 0 && key & HOME_MASK == 0 {
            found.push(bytes);
        }
    }
    found
}

/// The longest lookup among `tokens` once all are recorded, and how many shards they use.
fn worst_probe(scope: TenantScope, tokens: &[[u8; 22]]) -> (usize, usize) {
    let rules = TokenRules::default();
    let table = OverrideTable::with_clock(
        std::time::Duration::from_secs(3600),
        1 << 20,
        ManualClock::default(),
    );
    let keys: Vec<_> = tokens
        .iter()
        .map(|t| scope.key(rules.validate(t).expect("visible ASCII")))
        .collect();
    for k in &keys {
        table.record(*k, ReplicaTag(1));
    }
    let worst = keys.iter().map(|k| table.probe_len(*k)).max().unwrap_or(0);
    let mut shards: Vec<u64> = keys.iter().map(|k| k.0 >> SHARD_SHIFT).collect();
    shards.sort_unstable();
    shards.dedup();
    (worst, shards.len())
}

#[test]
fn crafted_tokens_make_one_long_probe_run_without_a_secret_and_none_with_one() {
    let unkeyed = TenantScope::new(TENANT);
    let tokens = craft(unkeyed);

    let (worst_unkeyed, shards_unkeyed) = worst_probe(unkeyed, &tokens);
    let secret = KeySecret::new(b"a-deployment-secret-of-32-bytes!").expect("long enough");
    let keyed = TenantScope::with_secret(TENANT, Some(&secret));
    let (worst_keyed, shards_keyed) = worst_probe(keyed, &tokens);
    println!(
        "{CRAFTED} crafted tokens: longest lookup {worst_unkeyed} slots in {shards_unkeyed} \
         shard(s) unkeyed, {worst_keyed} slots in {shards_keyed} shards keyed"
    );

    // Unkeyed: every token shares one home slot, so the last one recorded sits at the end of
    // a run of all of them.
    assert_eq!(shards_unkeyed, 1);
    assert_eq!(worst_unkeyed, CRAFTED);
    // Keyed: the same tokens are ordinary keys, spread over the shards with short runs.
    assert!(shards_keyed > 40, "{shards_keyed} shards");
    assert!(worst_keyed <= 6, "longest lookup {worst_keyed} slots");
}
