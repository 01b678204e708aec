//! Prices and costs in integer micro-dollars: summing millions of requests never drifts.

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
}

/// What one request cost, and what it would have cost without the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cost {
    /// With cached tokens at the cached price.
    pub cost_micro_usd: u64,
    /// Every input token at the uncached price.
    pub uncached_cost_micro_usd: u64,
}

impl Cost {
    /// What the cache saved.
    pub fn saved_micro_usd(&self) -> u64 {
        self.uncached_cost_micro_usd
            .saturating_sub(self.cost_micro_usd)
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
    /// The cost of `usage`, or `None` when a count it needs is unknown (never guessed as 0).
    pub fn cost(&self, usage: &Usage) -> Option<Cost> {
        let prompt = usage.prompt_tokens?;
        let cached = usage.cached_tokens?.min(prompt);
        let output = usage.completion_tokens?;
        Some(Cost {
            cost_micro_usd: scaled(&[
                (prompt - cached, self.input),
                (cached, self.cached_input),
                (output, self.output),
            ]),
            uncached_cost_micro_usd: scaled(&[(prompt, self.input), (output, self.output)]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = Price {
        input: 500_000,       // $0.50 / Mtok
        cached_input: 50_000, // $0.05 / Mtok
        output: 1_500_000,    // $1.50 / Mtok
    };

    fn usage(p: u64, c: u64, o: u64) -> Usage {
        Usage {
            prompt_tokens: Some(p),
            cached_tokens: Some(c),
            completion_tokens: Some(o),
        }
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
        let c = Price {
            input: u64::MAX,
            cached_input: u64::MAX,
            output: u64::MAX,
        }
        .cost(&usage(u64::MAX, 0, u64::MAX))
        .unwrap();
        assert_eq!(c.cost_micro_usd, u64::MAX);
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
