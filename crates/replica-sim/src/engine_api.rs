//! The engine's own endpoints, in the shapes of the servers each mode imitates:
//!
//! - llama.cpp server: `GET /slots` (one object per slot: `id`, `n_ctx`, `is_processing`, …),
//!   `GET /props` (`total_slots`, `default_generation_settings.n_ctx`) and `GET /metrics`
//!   (`llamacpp:requests_processing`, `llamacpp:requests_deferred`, token counters).
//! - vLLM: `GET /metrics` with `vllm:num_requests_running`, `vllm:num_requests_waiting`,
//!   `vllm:kv_cache_usage_perc`, `vllm:cache_config_info` (whose `num_gpu_blocks` label is the
//!   KV capacity), the prefix-cache counters and `vllm:num_preemptions_total`.
//!
//! A mode answers `404` for an endpoint its engine does not have (and the basic mode for all
//! of them), as a real engine would. Every request here counts as a probe
//! ([`Replica::count_probe`]) so tests can bound what a prober costs.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::chat::{fault_gate, named, openai_error};
use crate::engine::{EngineMode, Replica};

const MODEL: &str = "tether-sim";

fn not_served(replica: &Replica) -> Response {
    named(
        replica,
        openai_error(StatusCode::NOT_FOUND, "File Not Found", "not_found"),
    )
}

fn unavailable(_retry_after: u32) -> Response {
    openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "Loading model",
        "unavailable",
    )
}

/// Counts the probe, then applies the replica's fault; `Some` answers at once.
async fn gate(replica: &Replica, served: bool) -> Option<Response> {
    replica.count_probe();
    if !served {
        return Some(not_served(replica));
    }
    fault_gate(replica, unavailable)
        .await
        .map(|r| named(replica, r))
}

pub(crate) async fn slots(State(replica): State<Arc<Replica>>) -> Response {
    let llamacpp = replica.config().engine == EngineMode::Llamacpp;
    if let Some(response) = gate(&replica, llamacpp).await {
        return response;
    }
    let snapshot = replica.engine_snapshot();
    let slots: Vec<_> = snapshot
        .slots_busy
        .iter()
        .enumerate()
        .map(|(id, busy)| {
            json!({
                "id": id,
                "id_task": if *busy { json!(id) } else { json!(-1) },
                "n_ctx": snapshot.slot_ctx_tokens,
                "speculative": false,
                "is_processing": busy,
                "params": {"n_predict": -1},
                "next_token": {"has_next_token": busy, "n_remain": -1, "n_decoded": 0},
            })
        })
        .collect();
    named(&replica, Json(slots).into_response())
}

pub(crate) async fn props(State(replica): State<Arc<Replica>>) -> Response {
    let llamacpp = replica.config().engine == EngineMode::Llamacpp;
    if let Some(response) = gate(&replica, llamacpp).await {
        return response;
    }
    let snapshot = replica.engine_snapshot();
    let body = json!({
        "default_generation_settings": {"n_ctx": snapshot.slot_ctx_tokens, "params": {}},
        "total_slots": snapshot.slots_busy.len(),
        "model_path": format!("/models/{MODEL}.gguf"),
        "chat_template": "chatml",
        "build_info": "tether-replica-sim",
    });
    named(&replica, Json(body).into_response())
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn llamacpp_metrics(replica: &Replica) -> String {
    let (snapshot, stats) = (replica.engine_snapshot(), replica.stats());
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let name = format!("llamacpp:{name}");
        family(&mut out, &name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "prompt_tokens_total",
        "counter",
        "Number of prompt tokens processed.",
        stats.prompt_tokens - stats.cached_tokens,
    );
    metric(
        "tokens_predicted_total",
        "counter",
        "Number of generation tokens processed.",
        stats.completion_tokens,
    );
    metric(
        "requests_processing",
        "gauge",
        "Number of requests processing.",
        snapshot.running,
    );
    metric(
        "requests_deferred",
        "gauge",
        "Number of requests deferred.",
        snapshot.waiting,
    );
    out
}

fn vllm_metrics(replica: &Replica) -> String {
    let (snapshot, stats) = (replica.engine_snapshot(), replica.stats());
    let config = replica.config();
    let labels = format!("engine=\"0\",model_name=\"{MODEL}\"");
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let name = format!("vllm:{name}");
        family(&mut out, &name, kind, help);
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    };
    let usage = snapshot.kv_used_blocks as f64 / snapshot.kv_total_blocks.max(1) as f64;
    metric(
        "num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        format!("{:.1}", snapshot.running as f64),
    );
    metric(
        "num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        format!("{:.1}", snapshot.waiting as f64),
    );
    metric(
        "kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        format!("{usage}"),
    );
    metric(
        "num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
        format!("{:.1}", snapshot.preemptions as f64),
    );
    metric(
        "prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        format!("{:.1}", stats.prompt_tokens as f64),
    );
    metric(
        "prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        format!("{:.1}", stats.cached_tokens as f64),
    );
    family(
        &mut out,
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",\
         gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
        config.block_tokens, snapshot.kv_total_blocks
    );
    out
}

pub(crate) async fn metrics(State(replica): State<Arc<Replica>>) -> Response {
    let mode = replica.config().engine;
    if let Some(response) = gate(&replica, mode != EngineMode::Basic).await {
        return response;
    }
    let body = match mode {
        EngineMode::Llamacpp => llamacpp_metrics(&replica),
        EngineMode::Vllm | EngineMode::Basic => vllm_metrics(&replica),
    };
    let response = (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    );
    named(&replica, response.into_response())
}
