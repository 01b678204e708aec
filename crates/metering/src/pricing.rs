//! Prices and costs in integer micro-dollars: summing millions of requests never drifts.
//!
//! Every input token is priced once, in exactly one part: read from the prefix cache
//! (`cached_input`), written to the prompt cache (`cache_write`, or `cache_write_1h` for the
//! 1-hour lifetime), or plain uncached input (`input`).

use serde::Serialize;

use crate::Usage;

/// Prices in micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Uncached input tokens.
    pub input: u64,
    /// Input tokens served from the prefix cache.
    pub cached_input: u64,
    /// Output tokens.
    pub output: u64,
    /// Input tokens written to the prompt cache: the 5-minute lifetime, and writes whose
    /// lifetime the response does not say.
    pub cache_write: u64,
    /// Input tokens written to the prompt cache with the 1-hour lifetime.
    pub cache_write_1h: u64,
}

/// What one request cost, and what it would have cost without the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cost {
    /// With cached tokens at the cached price and cache writes at the cache-write prices.
    pub cost_micro_usd: u64,
    /// Every input token at the uncached price (no cache: nothing read, nothing written).
    pub uncached_cost_micro_usd: u64,
}

impl Cost {
    /// What the cache saved (0 when writing to it cost more than reading from it saved).
    pub fn saved_micro_usd(&self) -> u64 {
        self.uncached_cost_micro_usd
            .saturating_sub(self.cost_micro_usd)
    }
}

/// The input tokens of one usage, each in exactly one priced part; the parts sum to the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InputParts {
    /// Plain uncached input.
    pub(crate) uncached: u64,
    /// Read from the prefix cache.
    pub(crate) cached: u64,
    /// Written to the prompt cache, 5-minute or unsaid lifetime.
    pub(crate) cache_write: u64,
    /// Written to the prompt cache with the 1-hour lifetime.
    pub(crate) cache_write_1h: u64,
}

impl InputParts {
    /// The split of `usage`'s prompt, or `None` when the prompt or cached count is unknown.
    /// Counts that do not fit inside the prompt are cut to what is left of it (cached first,
    /// then writes, then their 1-hour part), so no token is priced twice. Writes the response
    /// did not report are plain input, as they were before cache writes had a price.
    pub(crate) fn of(usage: &Usage) -> Option<InputParts> {
        let prompt = usage.prompt_tokens?;
        let cached = usage.cached_tokens?.min(prompt);
        let not_cached = prompt - cached;
        let written = usage.cache_write_tokens.unwrap_or(0).min(not_cached);
        let written_1h = usage.cache_write_1h_tokens.unwrap_or(0).min(written);
        Some(InputParts {
            uncached: not_cached - written,
            cached,
            cache_write: written - written_1h,
            cache_write_1h: written_1h,
        })
    }
}

/// `Σ tokens × price / 1M`, rounded to the nearest micro-dollar, in saturating 128-bit
/// arithmetic (absurd counts saturate instead of overflowing).
fn scaled(parts: &[(u64, u64)]) -> u64 {
    let scaled_sum = parts.iter().fold(0u128, |sum, (t, p)| {
        sum.saturating_add(u128::from(*t) * u128::from(*p))
    });
    u64::try_from(scaled_sum.saturating_add(500_000) / 1_000_000).unwrap_or(u64::MAX)
}

impl Price {
    /// A price whose cache writes cost what plain input costs (what a price list without
    /// cache-write entries means).
    pub const fn new(input: u64, cached_input: u64, output: u64) -> Price {
        Price {
            input,
            cached_input,
            output,
            cache_write: input,
            cache_write_1h: input,
        }
    }

    /// The cost of `usage`, or `None` when a count it needs (prompt, cached, completion) is
    /// unknown (never guessed as 0). The sum is rounded once, to the nearest micro-dollar:
    ///
    /// ```text
    /// cost = round((uncached × input + cached × cached_input + write_5m × cache_write
    ///               + write_1h × cache_write_1h + output × output) / 1M)
    /// ```
    pub fn cost(&self, usage: &Usage) -> Option<Cost> {
        let parts = InputParts::of(usage)?;
        let prompt = usage.prompt_tokens?;
        let output = usage.completion_tokens?;
        Some(Cost {
            cost_micro_usd: scaled(&[
                (parts.uncached, self.input),
                (parts.cached, self.cached_input),
                (parts.cache_write, self.cache_write),
                (parts.cache_write_1h, self.cache_write_1h),
                (output, self.output),
            ]),
            uncached_cost_micro_usd: scaled(&[(prompt, self.input), (output, self.output)]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // $0.50 / Mtok input, $0.05 cached, $1.50 output; writes at the input price.
    const PRICE: Price = Price::new(500_000, 50_000, 1_500_000);

    /// Anthropic's ratios: writes 1.25× input (5 minutes) and 2× (1 hour), reads 0.1×.
    const ANTHROPIC: Price = Price {
        input: 3_000_000,
        cached_input: 300_000,
        output: 15_000_000,
        cache_write: 3_750_000,
        cache_write_1h: 6_000_000,
    };

    fn usage(p: u64, c: u64, o: u64) -> Usage {
        Usage {
            prompt_tokens: Some(p),
            cached_tokens: Some(c),
            completion_tokens: Some(o),
            ..Usage::default()
        }
    }

    fn writes(mut u: Usage, total: Option<u64>, m5: Option<u64>, h1: Option<u64>) -> Usage {
        u.cache_write_tokens = total;
        u.cache_write_5m_tokens = m5;
        u.cache_write_1h_tokens = h1;
        u
    }

    #[test]
    fn cached_tokens_are_billed_at_the_discount() {
        let cost = PRICE.cost(&usage(1_000_000, 800_000, 100_000)).unwrap();
        // 200k × 0.5 + 800k × 0.05 + 100k × 1.5 = 0.10 + 0.04 + 0.15 = $0.29
        assert_eq!(cost.cost_micro_usd, 290_000);
        assert_eq!(cost.uncached_cost_micro_usd, 650_000);
        assert_eq!(cost.saved_micro_usd(), 360_000);
    }

    #[test]
    fn unknown_counts_give_no_cost() {
        let mut u = usage(10, 5, 1);
        u.cached_tokens = None;
        assert_eq!(PRICE.cost(&u), None);
        assert_eq!(PRICE.cost(&Usage::default()), None);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let max = Price {
            input: u64::MAX,
            cached_input: u64::MAX,
            output: u64::MAX,
            cache_write: u64::MAX,
            cache_write_1h: u64::MAX,
        };
        let c = max.cost(&usage(u64::MAX, 0, u64::MAX)).unwrap();
        assert_eq!(c.cost_micro_usd, u64::MAX);
        let every_part = writes(
            usage(u64::MAX, u64::MAX / 4, u64::MAX),
            Some(u64::MAX / 2),
            None,
            Some(u64::MAX / 4),
        );
        assert_eq!(max.cost(&every_part).unwrap().cost_micro_usd, u64::MAX);
    }

    #[test]
    fn cache_writes_are_billed_at_their_lifetimes_price() {
        // 4096 prompt: 1800 read, 148 written for 5 minutes, 100 for an hour, 2048 plain.
        let u = writes(usage(4096, 1800, 503), Some(248), Some(148), Some(100));
        let cost = ANTHROPIC.cost(&u).unwrap();
        // (2048 × 3 + 1800 × 0.3 + 148 × 3.75 + 100 × 6 + 503 × 15) / 1M dollars
        // = 6144 + 540 + 555 + 600 + 7545 = 15384 µ$.
        assert_eq!(cost.cost_micro_usd, 15_384);
        assert_eq!(cost.uncached_cost_micro_usd, 4096 * 3 + 503 * 15);
        // Without the split, every write is at the 5-minute price.
        let unsplit = writes(usage(4096, 1800, 503), Some(248), None, None);
        assert_eq!(
            ANTHROPIC.cost(&unsplit).unwrap().cost_micro_usd,
            6144 + 540 + 930 + 7545
        );
        // Writing a cold prompt costs more than not caching it: nothing saved, not negative.
        let cold = writes(usage(1_000, 0, 0), Some(1_000), None, None);
        let cost = ANTHROPIC.cost(&cold).unwrap();
        assert_eq!(
            (cost.cost_micro_usd, cost.uncached_cost_micro_usd),
            (3_750, 3_000)
        );
        assert_eq!(cost.saved_micro_usd(), 0);
    }

    #[test]
    fn unreported_cache_writes_are_plain_input() {
        let plain = usage(1_000_000, 800_000, 100_000);
        assert_eq!(
            ANTHROPIC.cost(&plain),
            ANTHROPIC.cost(&writes(plain, Some(0), None, None))
        );
        // Unknown writes do not make the cost unknown (other dialects never report them).
        assert!(PRICE.cost(&plain).is_some());
    }

    #[test]
    fn writes_that_do_not_fit_the_prompt_are_clamped() {
        // 100 prompt, 60 cached: at most 40 can have been written, at most 40 of them for 1h.
        let u = writes(usage(100, 60, 0), Some(500), None, Some(900));
        assert_eq!(
            InputParts::of(&u),
            Some(InputParts {
                uncached: 0,
                cached: 60,
                cache_write: 0,
                cache_write_1h: 40,
            })
        );
    }

    /// Token counts: everyday, edge and extreme.
    fn count() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            0u64..5_000,
            0u64..10_000_000_000,
            (u64::MAX - 5)..=u64::MAX,
            any::<u64>(),
        ]
    }

    /// Prices: anything a topology allows ($0 to $1M per Mtok), and beyond.
    fn price_value() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..=1_000_000_000_000, any::<u64>(), Just(u64::MAX)]
    }

    fn maybe(s: impl Strategy<Value = u64>) -> impl Strategy<Value = Option<u64>> {
        prop::option::of(s)
    }

    fn any_usage() -> impl Strategy<Value = Usage> {
        (
            count(),
            count(),
            count(),
            maybe(count()),
            maybe(count()),
            maybe(count()),
        )
            .prop_map(|(p, c, o, w, w5, w1)| writes(usage(p, c, o), w, w5, w1))
    }

    fn any_price() -> impl Strategy<Value = Price> {
        (
            price_value(),
            price_value(),
            price_value(),
            price_value(),
            price_value(),
        )
            .prop_map(
                |(input, cached_input, output, cache_write, cache_write_1h)| Price {
                    input,
                    cached_input,
                    output,
                    cache_write,
                    cache_write_1h,
                },
            )
    }

    /// The cost as written in the formula, in checked arithmetic: `None` when the exact sum
    /// does not fit 128 bits (the cost then saturates).
    fn reference_cost(price: &Price, u: &Usage) -> Option<u64> {
        let p = InputParts::of(u)?;
        let output = u.completion_tokens?;
        let sum = [
            (p.uncached, price.input),
            (p.cached, price.cached_input),
            (p.cache_write, price.cache_write),
            (p.cache_write_1h, price.cache_write_1h),
            (output, price.output),
        ]
        .iter()
        .try_fold(0u128, |sum, (t, p)| {
            sum.checked_add(u128::from(*t).checked_mul(u128::from(*p))?)
        })?;
        Some(u64::try_from(sum.checked_add(500_000)? / 1_000_000).unwrap_or(u64::MAX))
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2048,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Every prompt token lands in exactly one part, and no part exceeds what was reported.
        #[test]
        fn the_input_parts_sum_to_the_prompt(u in any_usage()) {
            let parts = InputParts::of(&u).unwrap();
            let sum = u128::from(parts.uncached)
                + u128::from(parts.cached)
                + u128::from(parts.cache_write)
                + u128::from(parts.cache_write_1h);
            prop_assert_eq!(sum, u128::from(u.prompt_tokens.unwrap()));
            prop_assert!(parts.cached <= u.cached_tokens.unwrap());
            prop_assert!(
                parts.cache_write + parts.cache_write_1h <= u.cache_write_tokens.unwrap_or(0)
            );
            prop_assert!(parts.cache_write_1h <= u.cache_write_1h_tokens.unwrap_or(0));
        }

        /// Extreme counts and prices never overflow: the cost is the formula's exact value,
        /// or saturates at `u64::MAX` when that does not fit.
        #[test]
        fn costs_are_exact_or_saturate(u in any_usage(), price in any_price()) {
            let cost = price.cost(&u).unwrap();
            match reference_cost(&price, &u) {
                Some(exact) => prop_assert_eq!(cost.cost_micro_usd, exact),
                None => prop_assert_eq!(cost.cost_micro_usd, u64::MAX),
            }
        }

        /// With cache writes at the input price the cost is what it was before writes had a
        /// price of their own: uncached input (writes included) at the input price.
        #[test]
        fn writes_at_the_input_price_cost_what_they_did_before(u in any_usage(), price in any_price()) {
            let price = Price { cache_write: price.input, cache_write_1h: price.input, ..price };
            let prompt = u.prompt_tokens.unwrap();
            let cached = u.cached_tokens.unwrap().min(prompt);
            let before = scaled(&[
                (prompt - cached, price.input),
                (cached, price.cached_input),
                (u.completion_tokens.unwrap(), price.output),
            ]);
            prop_assert_eq!(price.cost(&u).unwrap().cost_micro_usd, before);
        }

        /// A dearer cache write never makes a request cheaper.
        #[test]
        fn dearer_writes_never_lower_the_cost(u in any_usage(), price in any_price(), more in 0u64..1_000_000) {
            let dearer = Price {
                cache_write: price.cache_write.saturating_add(more),
                cache_write_1h: price.cache_write_1h.saturating_add(more),
                ..price
            };
            prop_assert!(
                dearer.cost(&u).unwrap().cost_micro_usd >= price.cost(&u).unwrap().cost_micro_usd
            );
        }
    }

    #[test]
    fn more_cached_than_prompt_is_clamped() {
        let c = PRICE.cost(&usage(100, 500, 0)).unwrap();
        assert_eq!(
            c.cost_micro_usd, 5,
            "100 cached tokens at $0.05/Mtok, rounded"
        );
    }
}
