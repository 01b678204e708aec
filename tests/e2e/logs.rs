//! What Tether's own log says: never the session token, at any level, and no error line for
//! a client that leaves mid-stream (a metric counts those).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tether_e2e::{regions_yaml, ServerOpts, SimFleet, Tether, TetherConfig, READY_TIMEOUT};

const TOKEN: &str = "secret-session-token-5e3f0a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_in_no_log_line_at_trace_and_clients_leaving_are_counted_not_logged() {
    let fleet =
        SimFleet::start_with(&["s-1"], &["--time-scale", "1", "--decode-rate", "50"]).unwrap();
    let mut tether = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                "local_region: eu\n{}",
                regions_yaml(&[("eu", vec![("s-1".into(), fleet.addr("s-1"), "")])])
            ),
        },
        &[],
        ServerOpts {
            captured_log: Some("trace"),
            ..ServerOpts::default()
        },
    )
    .unwrap();
    let client = reqwest::Client::new();
    let chat = |stream: bool, tokens: u32| {
        client
            .post(tether.url("/v1/chat/completions"))
            .header("x-session-affinity", TOKEN)
            .json(
                &json!({"model": "m", "stream": stream, "max_tokens": tokens,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
    };
    // A whole answer, JSON and streamed.
    assert_eq!(chat(false, 2).send().await.unwrap().status().as_u16(), 200);
    let streamed = chat(true, 2).send().await.unwrap().bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&streamed).contains("[DONE]"));
    // A client that reads the first event of a 4 s stream and hangs up.
    let res = chat(true, 200).send().await.unwrap();
    let mut events = res.bytes_stream();
    assert!(events.next().await.is_some());
    drop(events);
    let started = Instant::now();
    loop {
        let metrics = tether.metrics().await;
        if metrics.contains("tether_client_disconnects_total 1") {
            break;
        }
        assert!(started.elapsed() < READY_TIMEOUT, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tether.terminate().unwrap());

    let log = std::fs::read_to_string(tether.log_path()).unwrap();
    assert!(
        log.contains("Sending header to upstream"),
        "the trace log has Pingora's request dump"
    );
    let leaks: Vec<&str> = log.lines().filter(|l| l.contains(TOKEN)).collect();
    assert!(leaks.is_empty(), "the token is in the log: {leaks:#?}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
