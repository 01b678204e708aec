//! Golden usage payloads per dialect (captured from the simulator, and shaped like the
//! vendors' documented responses), fed whole, split at every byte offset and in random
//! pieces: the answer never depends on the chunking.

// Test code: a panic with a message is how a test fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use proptest::prelude::*;
use tether_metering::{Dialect, Extraction, Framing, Usage, UsageExtractor, UsageOutcome};

struct Case {
    file: &'static str,
    dialect: Dialect,
    framing: Framing,
    /// Prompt, cached and completion tokens.
    expected: (u64, u64, u64),
    /// Cache writes: the total, then its 5-minute and 1-hour parts (`None`: not reported).
    writes: Writes,
    model: &'static str,
}

type Writes = (Option<u64>, Option<u64>, Option<u64>);

/// What every dialect but Anthropic's reports of cache writes: nothing.
const NO_WRITES: Writes = (None, None, None);

const CASES: &[Case] = &[
    Case {
        file: "sim-openai.json",
        dialect: Dialect::Openai,
        framing: Framing::Json,
        expected: (123, 112, 6),
        writes: NO_WRITES,
        model: "tether-sim",
    },
    Case {
        file: "sim-openai.sse",
        dialect: Dialect::Openai,
        framing: Framing::Sse,
        expected: (123, 112, 6),
        writes: NO_WRITES,
        model: "tether-sim",
    },
    Case {
        file: "sim-anthropic.json",
        dialect: Dialect::Anthropic,
        framing: Framing::Json,
        expected: (121, 112, 6),
        writes: (Some(0), None, None),
        model: "tether-sim",
    },
    Case {
        file: "sim-anthropic.sse",
        dialect: Dialect::Anthropic,
        framing: Framing::Sse,
        expected: (121, 112, 6),
        writes: (Some(0), None, None),
        model: "tether-sim",
    },
    Case {
        file: "sim-llamacpp.json",
        dialect: Dialect::Llamacpp,
        framing: Framing::Json,
        expected: (123, 112, 6),
        writes: NO_WRITES,
        model: "tether-sim",
    },
    Case {
        file: "sim-llamacpp.sse",
        dialect: Dialect::Llamacpp,
        framing: Framing::Sse,
        expected: (123, 112, 6),
        writes: NO_WRITES,
        model: "tether-sim",
    },
    Case {
        file: "openai-official.json",
        dialect: Dialect::Openai,
        framing: Framing::Json,
        expected: (1117, 1024, 46),
        writes: NO_WRITES,
        model: "gpt-4o-2024-08-06",
    },
    Case {
        file: "vllm-continuous-usage.sse",
        dialect: Dialect::Openai,
        framing: Framing::Sse,
        expected: (2048, 1984, 2),
        writes: NO_WRITES,
        model: "meta-llama/Llama-3.1-8B",
    },
    Case {
        file: "anthropic-official.sse",
        dialect: Dialect::Anthropic,
        framing: Framing::Sse,
        expected: (2025, 2000, 15),
        writes: (Some(0), None, None),
        model: "claude-sonnet-4-5",
    },
    Case {
        file: "anthropic-cache-write.json",
        dialect: Dialect::Anthropic,
        framing: Framing::Json,
        expected: (188_107, 0, 393),
        writes: (Some(188_086), None, None),
        model: "claude-3-5-sonnet-20241022",
    },
    Case {
        file: "anthropic-cache-write.sse",
        dialect: Dialect::Anthropic,
        framing: Framing::Sse,
        expected: (2314, 0, 64),
        writes: (Some(2310), None, None),
        model: "claude-3-5-haiku-20241022",
    },
    Case {
        file: "anthropic-cache-write-split.json",
        dialect: Dialect::Anthropic,
        framing: Framing::Json,
        expected: (4096, 1800, 503),
        writes: (Some(248), Some(148), Some(100)),
        model: "claude-sonnet-4-5",
    },
    Case {
        file: "anthropic-cache-write-split.sse",
        dialect: Dialect::Anthropic,
        framing: Framing::Sse,
        expected: (1512, 0, 87),
        writes: (Some(1500), Some(0), Some(1500)),
        model: "claude-sonnet-4-5",
    },
];

fn fixture(file: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn extract(case: &Case, pieces: &[&[u8]]) -> Extraction {
    let mut x = UsageExtractor::new(case.dialect, case.framing);
    for piece in pieces {
        x.feed(piece);
    }
    x.finish()
}

fn expected(case: &Case) -> Extraction {
    let (p, c, o) = case.expected;
    let (w, w5, w1) = case.writes;
    Extraction {
        usage: Usage {
            prompt_tokens: Some(p),
            cached_tokens: Some(c),
            completion_tokens: Some(o),
            cache_write_tokens: w,
            cache_write_5m_tokens: w5,
            cache_write_1h_tokens: w1,
        },
        outcome: UsageOutcome::Found,
        model: Some(case.model.to_owned()),
    }
}

#[test]
fn every_fixture_gives_its_usage_in_one_piece() {
    for case in CASES {
        assert_eq!(
            extract(case, &[&fixture(case.file)]),
            expected(case),
            "{}",
            case.file
        );
    }
}

#[test]
fn every_fixture_gives_the_same_usage_split_at_every_byte_offset() {
    for case in CASES {
        let body = fixture(case.file);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(
                extract(case, &[a, b]),
                expected(case),
                "{} split at {at}",
                case.file
            );
        }
    }
}

#[test]
fn byte_by_byte_feeding_gives_the_same_usage() {
    for case in CASES {
        let body = fixture(case.file);
        let pieces: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(extract(case, &pieces), expected(case), "{}", case.file);
    }
}

#[test]
fn a_truncated_body_is_never_reported_as_zero() {
    for case in CASES {
        let body = fixture(case.file);
        for at in 0..body.len() {
            let e = extract(case, &[&body[..at]]);
            for (got, want) in [
                (e.usage.prompt_tokens, Some(case.expected.0)),
                (e.usage.cached_tokens, Some(case.expected.1)),
                (e.usage.cache_write_tokens, case.writes.0),
                (e.usage.cache_write_5m_tokens, case.writes.1),
                (e.usage.cache_write_1h_tokens, case.writes.2),
            ] {
                assert!(
                    got.is_none() || got == want,
                    "{} cut at {at}: {e:?}",
                    case.file
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_chunkings_agree(case in 0..CASES.len(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12)) {
        let case = &CASES[case];
        let body = fixture(case.file);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        at.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in at {
            pieces.push(&body[start..cut]);
            start = cut;
        }
        pieces.push(&body[start..]);
        prop_assert_eq!(extract(case, &pieces), expected(case));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), sse in any::<bool>(), split in any::<prop::sample::Index>()) {
        let framing = if sse { Framing::Sse } else { Framing::Json };
        for dialect in [Dialect::Openai, Dialect::Anthropic, Dialect::Llamacpp] {
            let mut x = UsageExtractor::new(dialect, framing);
            let (a, b) = bytes.split_at(split.index(bytes.len() + 1));
            x.feed(a);
            x.feed(b);
            let _ = x.finish();
        }
    }
}
