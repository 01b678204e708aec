use super::*;

/// A vLLM V1 `/metrics` as served (trimmed: a histogram, the counters and gauges read).
const VLLM_DUMP: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-0.6B"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-0.6B"} 0.4375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 52012.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen3-0.6B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-0.6B"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-0.6B"} 40.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27536",prefix_caching_hash_algo="builtin",sliding_window="None",swap_space="4"} 1.0
"#;

const SGLANG_DUMP: &str = r#"# HELP sglang:max_total_num_tokens Maximum total number of tokens
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{name="google/gemma-2-9b-it"} 161721.0
# HELP sglang:max_running_requests Maximum running requests
# TYPE sglang:max_running_requests gauge
sglang:max_running_requests{name="google/gemma-2-9b-it"} 4097.0
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{name="google/gemma-2-9b-it"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{name="google/gemma-2-9b-it"} 1.0
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{name="google/gemma-2-9b-it"} 0.28
"#;

const LLAMACPP_METRICS: &str =
    "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 4521
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
";

#[test]
fn vllm_metrics_give_running_waiting_kv_usage_and_blocks() {
    let r = parse(EngineKind::Vllm, VLLM_DUMP.as_bytes()).unwrap();
    assert_eq!(r.load.running, 3);
    assert_eq!(r.load.waiting, 2);
    assert_eq!(r.load.kv_usage, Some(0.4375));
    assert_eq!(r.capacity.kv_blocks, Some(27536));
    assert_eq!(r.capacity.sequences, None);
}

#[test]
fn older_vllm_names_its_kv_gauge_gpu_cache_usage() {
    let old = VLLM_DUMP.replace("kv_cache_usage_perc", "gpu_cache_usage_perc");
    let r = parse(EngineKind::Vllm, old.as_bytes()).unwrap();
    assert_eq!(r.load.kv_usage, Some(0.4375));
}

#[test]
fn label_sets_of_several_models_add_up() {
    let two = format!(
        "{VLLM_DUMP}vllm:num_requests_running{{engine=\"1\",model_name=\"b\"}} 4.0\n\
         vllm:kv_cache_usage_perc{{engine=\"1\",model_name=\"b\"}} 0.9\n"
    );
    let r = parse(EngineKind::Vllm, two.as_bytes()).unwrap();
    assert_eq!(r.load.running, 7);
    assert_eq!(r.load.kv_usage, Some(0.9));
}

#[test]
fn sglang_metrics_give_capacity_and_load() {
    let r = parse(EngineKind::Sglang, SGLANG_DUMP.as_bytes()).unwrap();
    assert_eq!(r.capacity.sequences, Some(4097));
    assert_eq!(r.capacity.kv_blocks, Some(161721));
    assert_eq!((r.load.running, r.load.waiting), (7, 1));
    assert_eq!(r.load.kv_usage, Some(0.28));
}

#[test]
fn llamacpp_slots_give_the_slot_count_and_those_processing() {
    let body = r#"[
      {"id":0,"id_task":12,"n_ctx":4096,"speculative":false,"is_processing":true,
       "params":{"n_predict":-1,"samplers":["top_k"]},"prompt":"<|im_start|>user"},
      {"id":1,"id_task":-1,"n_ctx":4096,"speculative":false,"is_processing":false}
    ]"#;
    let r = parse(EngineKind::Llamacpp, body.as_bytes()).unwrap();
    assert_eq!(r.capacity.sequences, Some(2));
    assert_eq!((r.load.running, r.load.waiting), (1, 0));
}

#[test]
fn llamacpp_metrics_give_processing_and_deferred() {
    let r = parse(EngineKind::Llamacpp, LLAMACPP_METRICS.as_bytes()).unwrap();
    assert_eq!((r.load.running, r.load.waiting), (2, 3));
    assert_eq!(r.capacity.sequences, None);
}

#[test]
fn answers_without_the_engines_metrics_are_errors_not_zeros() {
    for (kind, body) in [
        (EngineKind::Vllm, SGLANG_DUMP),
        (EngineKind::Sglang, VLLM_DUMP),
        (EngineKind::Vllm, "<html>Not Found</html>"),
        (EngineKind::Vllm, ""),
        (EngineKind::Llamacpp, "[]"),
        (EngineKind::Llamacpp, "[{\"id\":0,"),
        (EngineKind::Llamacpp, "{\"error\":\"slots disabled\"}"),
        (EngineKind::None, VLLM_DUMP),
    ] {
        assert!(parse(kind, body.as_bytes()).is_err(), "{kind:?} {body:?}");
    }
}

#[test]
fn bounds_hold_for_hostile_answers() {
    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    assert_eq!(
        parse(EngineKind::Vllm, &huge),
        Err(EngineError::TooLarge {
            bytes: MAX_BODY_BYTES + 1
        })
    );
    assert_eq!(
        parse(EngineKind::Vllm, &[0xff, 0xfe]),
        Err(EngineError::NotText)
    );
    let many = format!("[{}{{}}]", "{},".repeat(MAX_SLOTS));
    assert!(parse(EngineKind::Llamacpp, many.as_bytes()).is_err());
    // Odd values count as nothing rather than wrapping or panicking.
    let odd = "vllm:num_requests_running{a=\"b\"} NaN\nvllm:num_requests_waiting -4\n\
               vllm:kv_cache_usage_perc 7.5\nvllm:num_requests_running 1e300\n";
    let r = parse(EngineKind::Vllm, odd.as_bytes()).unwrap();
    assert_eq!(r.load.running, u32::MAX);
    assert_eq!(r.load.waiting, 0);
    assert_eq!(r.load.kv_usage, Some(1.0));
}

#[test]
fn every_kind_names_its_endpoint() {
    assert_eq!(EngineKind::Llamacpp.probe_path(), Some("/slots"));
    assert_eq!(EngineKind::Vllm.probe_path(), Some("/metrics"));
    assert_eq!(EngineKind::Sglang.probe_path(), Some("/metrics"));
    assert_eq!(EngineKind::None.probe_path(), None);
}
