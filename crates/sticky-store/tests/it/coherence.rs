//! Two instances on one Redis: announcements, and what the round trips cost on loopback.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tether_sticky_store::testing::RedisServer;
use tether_sticky_store::{Lookup, StickyStore, StoreErrorKind, StoreSettings};

use crate::common::*;

/// Binds `count` keys on `a` one at a time and returns how long each took to reach `b`'s
/// callback; also checks that `b` then finds the binding, hears the group tag of the binds
/// that carry one, and that `a` never hears itself.
pub async fn measure_coherence(a: &StickyStore, b: &StickyStore, count: u64) -> Vec<Duration> {
    let (heard, hearing) = mpsc::channel();
    b.on_remote_bind(move |key, replica, group| {
        let _ = heard.send((key, replica.to_owned(), group, Instant::now()));
    });
    let heard_itself = Arc::new(AtomicUsize::new(0));
    let counter = heard_itself.clone();
    a.on_remote_bind(move |_, _, _| {
        counter.fetch_add(1, Relaxed);
    });

    let mut delays = Vec::new();
    for i in 0..count {
        let key = 0x5eed_0000_0000_0000 | i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
        let replica = format!("eu-{}", i % 3);
        let group = (i % 2 == 1).then_some(i as u32);
        let sent = Instant::now();
        a.bind(key, &replica, group);
        let (heard_key, heard_replica, heard_group, at) = hearing
            .recv_timeout(Duration::from_secs(5))
            .expect("the announcement reached the other instance");
        assert_eq!(
            (heard_key, heard_replica.as_str(), heard_group),
            (key, replica.as_str(), group)
        );
        delays.push(at - sent);
        // Stored before it is announced, so whoever hears it finds it.
        assert_eq!(b.lookup(key).await, found(&replica));
    }
    assert_eq!(
        heard_itself.load(Relaxed),
        0,
        "an instance heard its own binds"
    );
    assert_eq!(b.stats().remote_binds, count);
    delays
}

#[tokio::test]
async fn a_bind_on_one_instance_reaches_the_others_callback_quickly() {
    let server = RedisServer::start().unwrap();
    let a = start(settings(&server.url()));
    let b = start(settings(&server.url()));
    wait_ready(&a).await;
    wait_ready(&b).await;

    let mut delays = measure_coherence(&a, &b, 100).await;
    let slow = delays
        .iter()
        .filter(|d| **d > Duration::from_millis(100))
        .count();
    let (median, p99, max) = percentiles(&mut delays);
    println!("coherence delay over 100 binds: median {median:?}, p99 {p99:?}, max {max:?}, {slow} over 100 ms");
    assert!(median < Duration::from_millis(100));
    // A scheduling hiccup on a shared machine may delay one; a pattern would not be a hiccup.
    assert!(slow <= 5, "{slow} of 100 announcements took over 100 ms");
}

#[tokio::test]
async fn a_load_report_reaches_the_other_instances_and_not_its_own() {
    let server = RedisServer::start().unwrap();
    let a = start(settings(&server.url()));
    let b = start(settings(&server.url()));
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (heard, hearing) = mpsc::channel();
    b.on_remote_load(move |origin, entries| {
        let owned: Vec<(String, u32)> =
            entries.iter().map(|(id, n)| (id.to_string(), *n)).collect();
        let _ = heard.send((origin, owned));
    });
    let (a_heard, a_hearing) = mpsc::channel();
    a.on_remote_load(move |origin, _| {
        let _ = a_heard.send(origin);
    });
    // An unstorable id is left out; the others arrive in order.
    let too_long = "r".repeat(tether_sticky_store::MAX_REPLICA_ID_LEN + 1);
    a.publish_load(&[("eu-1", 3), (&too_long, 9), ("us-2", 0)]);
    let (a_origin, entries) = hearing
        .recv_timeout(Duration::from_secs(5))
        .expect("the report reached the other instance");
    assert_eq!(
        entries,
        vec![("eu-1".to_owned(), 3), ("us-2".to_owned(), 0)]
    );
    // `a` hears `b`'s report and, before it on the same channel, never its own.
    b.publish_load(&[("eu-1", 1)]);
    let first_heard_by_a = a_hearing
        .recv_timeout(Duration::from_secs(5))
        .expect("b's report reached a");
    assert_ne!(
        first_heard_by_a, a_origin,
        "an instance heard its own report"
    );
    // Binds on the same channel reach the binding callback, not the load one.
    a.bind(5, "eu-1", None);
    wait_lookup(&b, 5, found("eu-1")).await;
    assert!(
        hearing.try_recv().is_err(),
        "a bind was taken for a load report"
    );
}

#[tokio::test]
async fn lookup_latency_on_loopback() {
    let server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));
    wait_ready(&store).await;
    store.bind(42, "eu-1", None);
    wait_lookup(&store, 42, found("eu-1")).await;

    let mut latencies = Vec::new();
    for i in 0..2000u64 {
        let key = if i % 2 == 0 { 42 } else { i };
        let started = Instant::now();
        let lookup = store.lookup(key).await;
        latencies.push(started.elapsed());
        assert!(
            matches!(lookup, Lookup::Found(_) | Lookup::Missing),
            "{lookup:?}"
        );
    }
    let (median, p99, max) = percentiles(&mut latencies);
    println!("lookup latency over 2000 lookups: median {median:?}, p99 {p99:?}, max {max:?}");
    let histogram = store.stats().lookup_latency;
    assert!(histogram.count >= 2000);
    let within_5ms = histogram
        .buckets
        .iter()
        .find(|b| b.le_seconds == 0.005)
        .unwrap()
        .cumulative_count;
    println!("histogram: {within_5ms} of {} within 5 ms", histogram.count);
    assert!(median < tether_sticky_store::DEFAULT_LOOKUP_TIMEOUT);
}

#[tokio::test]
async fn malformed_announcements_are_counted_and_a_panicking_callback_is_survived() {
    let server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));
    wait_ready(&store).await;
    let (heard, hearing) = mpsc::channel();
    store.on_remote_bind(move |key, replica, _| {
        if replica == "boom" {
            panic!("a callback bug");
        }
        let _ = heard.send((key, replica.to_owned()));
    });

    let channel = tether_sticky_store::DEFAULT_CHANNEL;
    for payload in [
        "hello".to_owned(),
        "0000000000000001:0000000000000002".to_owned(),
        format!("0000000000000001:0000000000000002:{}", "r".repeat(300)),
        "0000000000000001:0000000000000003:boom".to_owned(),
        "0000000000000001:0000000000000004:eu-9".to_owned(),
    ] {
        let _: i64 = server
            .query(redis::cmd("PUBLISH").arg(channel).arg(payload))
            .unwrap();
    }
    let delivered = hearing.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(delivered, (4, "eu-9".to_owned()));
    let stats = store.stats();
    assert_eq!(stats.errors.get(StoreErrorKind::Garbage), 3);
    assert_eq!(stats.remote_binds, 2);
    assert!(stats.subscribed);
}

#[tokio::test]
async fn different_channels_and_prefixes_keep_tiers_apart() {
    let server = RedisServer::start().unwrap();
    let blue = start(settings(&server.url()));
    let green = start(StoreSettings {
        key_prefix: "green:s:".to_owned(),
        channel: "green:bindings".to_owned(),
        ..settings(&server.url())
    });
    wait_ready(&blue).await;
    wait_ready(&green).await;

    blue.bind(1, "eu-1", None);
    wait_lookup(&blue, 1, found("eu-1")).await;
    assert_eq!(green.lookup(1).await, Lookup::Missing);
    assert_eq!(green.stats().remote_binds, 0);
}
