//! A turn's prompt size in 12 bits, kept in the override entry beside the replica tag.
//!
//! The cache-loss detector needs, for each sticky turn, how many prompt tokens the same
//! replica processed for the session's previous turn: that is how many a warm replica should
//! now report as cached. The override table is held to 64 bytes an entry, and its 16-byte
//! slot has no spare word, so the count shares the tag's 32 bits: 20 bits of tag (over a
//! million replica ids, where a fleet has at most hundreds and the selector already keeps one
//! vector entry per tag) and this 12-bit code.
//!
//! The code is a small float rounded **down**: an 8-bit mantissa and a 4-bit exponent, exact
//! to 511 tokens and within 1/256 (0.4 %) of the count above, up to 8,372,224 tokens, where
//! it saturates. Rounding down only ever lowers the expectation, so a warm replica is never
//! judged short because of the encoding. Code 0 means "unknown" (no turn recorded on this
//! replica yet, or one whose usage was not read).

/// Bits of the code.
pub(crate) const BITS: u32 = 12;
/// Mantissa bits (the exponent takes the other 4).
const MANTISSA_BITS: u32 = 8;
const MANTISSA: u64 = 1 << MANTISSA_BITS;
const MAX_EXPONENT: u32 = (1 << (BITS - MANTISSA_BITS)) - 1;

/// The largest count a code holds exactly at its own scale: 511 × 2^14.
pub const MAX_PROMPT_COUNT: u64 = (2 * MANTISSA - 1) << (MAX_EXPONENT - 1);

/// The code of `tokens`, rounded down; 0 for 0 (unknown), saturating at [`MAX_PROMPT_COUNT`].
pub(crate) fn encode(tokens: u64) -> u16 {
    if tokens < MANTISSA {
        return tokens as u16;
    }
    // `tokens` lies in [2^(bits-1), 2^bits) with bits ≥ 9; exponent e stands for
    // (256 + m) << (e - 1), so e = bits - 8.
    let bits = u64::BITS - tokens.leading_zeros();
    let exponent = bits - MANTISSA_BITS;
    if exponent > MAX_EXPONENT {
        return ((1 << BITS) - 1) as u16;
    }
    let mantissa = (tokens >> (exponent - 1)) - MANTISSA;
    ((exponent << MANTISSA_BITS) as u16) | mantissa as u16
}

/// The count a code stands for (0: unknown).
pub(crate) fn decode(code: u16) -> u64 {
    let code = u64::from(code) & ((1 << BITS) - 1);
    let exponent = (code >> MANTISSA_BITS) as u32;
    let mantissa = code & (MANTISSA - 1);
    if exponent == 0 {
        mantissa
    } else {
        (MANTISSA + mantissa) << (exponent - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_counts_are_exact_and_zero_stays_unknown() {
        for n in [0, 1, 16, 255, 256, 300, 511] {
            assert_eq!(decode(encode(n)), n);
        }
        assert_eq!(encode(0), 0);
        assert_ne!(encode(1), 0);
    }

    #[test]
    fn large_counts_round_down_within_a_256th_and_saturate() {
        assert_eq!(decode(encode(513)), 512);
        assert_eq!(decode(encode(100_000)), 99_840);
        assert_eq!(decode(encode(MAX_PROMPT_COUNT)), MAX_PROMPT_COUNT);
        assert_eq!(decode(encode(u64::MAX)), MAX_PROMPT_COUNT);
        assert!(encode(u64::MAX) < 1 << BITS);
    }

    proptest! {
        #[test]
        fn decoding_never_exceeds_the_count_and_loses_under_a_256th(n in 0u64..=MAX_PROMPT_COUNT) {
            let back = decode(encode(n));
            prop_assert!(back <= n);
            prop_assert!((n - back) * 256 <= n, "{n} → {back}");
            prop_assert!(encode(n) < 1 << BITS);
            prop_assert_eq!(encode(n) == 0, n == 0);
        }

        #[test]
        fn the_code_is_monotonic(a in any::<u64>(), b in any::<u64>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(decode(encode(lo)) <= decode(encode(hi)));
        }
    }
}
