//! What inference engines say about their own capacity and load.
//!
//! A replica's in-flight count, which Tether keeps itself, says nothing about how many
//! conversations the engine can *hold*: a llama.cpp server with two slots keeps two
//! conversations' caches and evicts a third, however idle it looks between turns. Real engines
//! publish that, each in its own dialect, and this crate turns one answer of theirs into an
//! [`EngineReading`]: capacity (sequences, KV blocks) and load (running, waiting, KV usage).
//!
//! | [`EngineKind`] | endpoint ([`EngineKind::probe_path`]) | capacity | load |
//! |---|---|---|---|
//! | `llamacpp` | `GET /slots` (JSON array) | slots | slots processing |
//! | `vllm` | `GET /metrics` | `vllm:cache_config_info{num_gpu_blocks}` | `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (or `vllm:gpu_cache_usage_perc`) |
//! | `sglang` | `GET /metrics` | `sglang:max_running_requests`, `sglang:max_total_num_tokens` | `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage` |
//!
//! llama.cpp's own `/metrics` (`llamacpp:requests_processing`, `llamacpp:requests_deferred`)
//! is parsed too ([`parse`] tells the shapes apart), but it carries no slot count, so the
//! prober reads `/slots`: one request gives both.
//!
//! Parsing is bounded: a body over [`MAX_BODY_BYTES`] is refused, only the lines of the
//! metrics above are kept (at most [`MAX_METRIC_LINES`]) before the Prometheus parser
//! (`prometheus-parse`) sees them, and a `/slots` array over [`MAX_SLOTS`] is refused. No
//! input panics.
//!
//! ```
//! use tether_engine::{parse, EngineKind};
//!
//! let body = br#"[{"id":0,"n_ctx":4096,"is_processing":true},{"id":1,"n_ctx":4096,"is_processing":false}]"#;
//! let reading = parse(EngineKind::Llamacpp, body).unwrap();
//! assert_eq!(reading.capacity.sequences, Some(2));
//! assert_eq!(reading.load.running, 1);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest engine answer read (a vLLM `/metrics` with every histogram is some 100 KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most metric lines kept for the parser.
pub const MAX_METRIC_LINES: usize = 4096;
/// Most slots accepted from llama.cpp's `/slots`.
pub const MAX_SLOTS: usize = 4096;

/// Which engine serves a replica, and so how its capacity and load are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// vLLM: Prometheus `/metrics`.
    Vllm,
    /// SGLang: Prometheus `/metrics` (the server started with `--enable-metrics`).
    Sglang,
    /// llama.cpp server: `/slots`.
    Llamacpp,
    /// Not read: routing uses Tether's own signals (the default).
    #[default]
    None,
}

impl EngineKind {
    /// The endpoint read on every probe round, or `None` when the engine is not read.
    pub const fn probe_path(self) -> Option<&'static str> {
        match self {
            EngineKind::Vllm | EngineKind::Sglang => Some("/metrics"),
            EngineKind::Llamacpp => Some("/slots"),
            EngineKind::None => None,
        }
    }

    /// Lower-case name, for logs, metrics and the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::None => "none",
        }
    }
}

/// How much an engine can hold.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Capacity {
    /// Sequences it runs at once, each keeping its own cache: llama.cpp's slots, SGLang's
    /// maximum running requests. `None` when the engine does not say (vLLM).
    pub sequences: Option<u32>,
    /// KV-cache blocks (vLLM) or tokens (SGLang), when known.
    pub kv_blocks: Option<u64>,
}

/// How busy an engine is.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Requests being processed.
    pub running: u32,
    /// Requests queued for a slot or for KV space.
    pub waiting: u32,
    /// Share of the KV cache held by running requests, 0..=1, when known.
    pub kv_usage: Option<f64>,
}

/// One reading of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineReading {
    /// What it can hold.
    pub capacity: Capacity,
    /// What it holds now.
    pub load: Load,
}

/// Why an engine's answer gave no reading.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EngineError {
    /// The body is over [`MAX_BODY_BYTES`].
    #[error("engine answer of {bytes} bytes is over the {MAX_BODY_BYTES}-byte limit")]
    TooLarge {
        /// Its size (or the part read).
        bytes: usize,
    },
    /// Not UTF-8 text.
    #[error("engine answer is not UTF-8 text")]
    NotText,
    /// The answer holds none of the engine's load metrics (a proxy's page, an engine started
    /// without metrics, another engine).
    #[error("no {engine} load metrics in the answer")]
    NoMetrics {
        /// The engine expected.
        engine: &'static str,
    },
    /// llama.cpp's `/slots` is not the expected JSON array.
    #[error("llama.cpp /slots: {why}")]
    BadSlots {
        /// What is wrong.
        why: String,
    },
    /// Asked to parse for [`EngineKind::None`].
    #[error("no engine to read")]
    NotRead,
}

/// Reads one answer of `kind`'s probe endpoint.
pub fn parse(kind: EngineKind, body: &[u8]) -> Result<EngineReading, EngineError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(EngineError::TooLarge { bytes: body.len() });
    }
    let text = std::str::from_utf8(body).map_err(|_| EngineError::NotText)?;
    match kind {
        EngineKind::None => Err(EngineError::NotRead),
        EngineKind::Llamacpp if text.trim_start().starts_with('[') => parse_slots(text),
        EngineKind::Llamacpp => metrics(text, &LLAMACPP),
        EngineKind::Vllm => metrics(text, &VLLM),
        EngineKind::Sglang => metrics(text, &SGLANG),
    }
}

#[derive(Deserialize)]
struct SlotJson {
    #[serde(default)]
    is_processing: bool,
}

fn parse_slots(text: &str) -> Result<EngineReading, EngineError> {
    let bad = |why: String| EngineError::BadSlots { why };
    // The body is already bounded, and a slot is one bool here: the vector stays small.
    let slots: Vec<SlotJson> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if slots.is_empty() || slots.len() > MAX_SLOTS {
        return Err(bad(format!(
            "{} slots (1..={MAX_SLOTS} expected)",
            slots.len()
        )));
    }
    let running = slots.iter().filter(|s| s.is_processing).count();
    Ok(EngineReading {
        capacity: Capacity {
            sequences: Some(u32::try_from(slots.len()).unwrap_or(u32::MAX)),
            kv_blocks: None,
        },
        load: Load {
            running: u32::try_from(running).unwrap_or(u32::MAX),
            waiting: 0,
            kv_usage: None,
        },
    })
}

/// Which metric fills which field, for one engine's Prometheus dialect.
struct Dialect {
    engine: &'static str,
    /// The metric names' prefix (`vllm:`), which the Prometheus parser cannot read (its
    /// names are `\w+`): rewritten to `vllm_` before parsing.
    prefix: &'static str,
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    kv_usage: &'static [&'static str],
    sequences: &'static [&'static str],
    /// `(metric, label)` whose label holds the KV capacity, or a metric whose value does.
    kv_blocks_label: Option<(&'static str, &'static str)>,
    kv_blocks: &'static [&'static str],
}

const VLLM: Dialect = Dialect {
    engine: "vllm",
    prefix: "vllm:",
    running: &["num_requests_running"],
    waiting: &["num_requests_waiting"],
    // V1 renamed the gauge; older servers have the first name.
    kv_usage: &["kv_cache_usage_perc", "gpu_cache_usage_perc"],
    sequences: &[],
    kv_blocks_label: Some(("cache_config_info", "num_gpu_blocks")),
    kv_blocks: &[],
};

const SGLANG: Dialect = Dialect {
    engine: "sglang",
    prefix: "sglang:",
    running: &["num_running_reqs"],
    waiting: &["num_queue_reqs"],
    kv_usage: &["token_usage"],
    sequences: &["max_running_requests"],
    kv_blocks_label: None,
    kv_blocks: &["max_total_num_tokens"],
};

const LLAMACPP: Dialect = Dialect {
    engine: "llamacpp",
    prefix: "llamacpp:",
    running: &["requests_processing"],
    waiting: &["requests_deferred"],
    kv_usage: &["kv_cache_usage_ratio"],
    sequences: &[],
    kv_blocks_label: None,
    kv_blocks: &[],
};

impl Dialect {
    fn all(&self) -> impl Iterator<Item = &'static str> {
        let label = self.kv_blocks_label.map(|(m, _)| m);
        self.running
            .iter()
            .chain(self.waiting)
            .chain(self.kv_usage)
            .chain(self.sequences)
            .chain(self.kv_blocks)
            .copied()
            .chain(label)
    }
}

/// A metric sample's value as a count: finite, non-negative, saturating.
fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

fn metrics(text: &str, dialect: &Dialect) -> Result<EngineReading, EngineError> {
    // Keep only the samples of the metrics read, renamed so the parser accepts them.
    let lines: Vec<std::io::Result<String>> = text
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix(dialect.prefix)?;
            let name_end = rest.find(['{', ' ', '\t']).unwrap_or(rest.len());
            dialect
                .all()
                .any(|m| m == &rest[..name_end])
                .then(|| Ok(format!("m_{rest}")))
        })
        .take(MAX_METRIC_LINES)
        .collect();
    let scrape =
        prometheus_parse::Scrape::parse(lines.into_iter()).map_err(|_| EngineError::NoMetrics {
            engine: dialect.engine,
        })?;
    let mut reading = EngineReading::default();
    let (mut saw_running, mut running, mut waiting) = (false, 0u64, 0u64);
    let (mut sequences, mut kv_blocks) = (0u64, 0u64);
    for sample in &scrape.samples {
        let Some(name) = sample.metric.strip_prefix("m_") else {
            continue;
        };
        let value = match sample.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        // Several label sets (models, data-parallel ranks) add up; usage is the fullest.
        if dialect.running.contains(&name) {
            saw_running = true;
            running = running.saturating_add(count(value));
        } else if dialect.waiting.contains(&name) {
            waiting = waiting.saturating_add(count(value));
        } else if dialect.kv_usage.contains(&name) {
            if value.is_finite() {
                let usage = value.clamp(0.0, 1.0);
                reading.load.kv_usage = Some(reading.load.kv_usage.map_or(usage, |u| u.max(usage)));
            }
        } else if dialect.sequences.contains(&name) {
            sequences = sequences.saturating_add(count(value));
        } else if dialect.kv_blocks.contains(&name) {
            kv_blocks = kv_blocks.saturating_add(count(value));
        } else if let Some((metric, label)) = dialect.kv_blocks_label {
            if name == metric {
                let blocks = sample.labels.get(label).and_then(|v| v.parse::<u64>().ok());
                kv_blocks = kv_blocks.saturating_add(blocks.unwrap_or(0));
            }
        }
    }
    if !saw_running {
        return Err(EngineError::NoMetrics {
            engine: dialect.engine,
        });
    }
    let small = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    reading.load.running = small(running);
    reading.load.waiting = small(waiting);
    reading.capacity.sequences = (sequences > 0).then(|| small(sequences));
    reading.capacity.kv_blocks = (kv_blocks > 0).then_some(kv_blocks);
    Ok(reading)
}

#[cfg(test)]
mod tests;
