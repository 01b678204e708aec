//! The store when Redis misbehaves: down, stalled, restarted empty, holding garbage, slower
//! than the writes. Every lookup stays bounded and nothing panics.

use std::time::{Duration, Instant};

use tether_sticky_store::testing::{free_port, RedisServer};
use tether_sticky_store::{Lookup, StoreErrorKind, StoreSettings};

use crate::common::*;

#[tokio::test]
async fn redis_down_at_start_answers_connect_at_once_then_recovers_when_it_comes_up() {
    let port = free_port().unwrap();
    let store = start(settings(&format!("redis://127.0.0.1:{port}")));

    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(
            store.lookup(1).await,
            Lookup::Unavailable(StoreErrorKind::Connect)
        );
        // Answered from the connected flag, without waiting for Redis.
        assert!(started.elapsed() < Duration::from_millis(50));
    }
    store.bind(1, "eu-1", None);

    let _server = RedisServer::start_on(port).unwrap();
    wait_ready(&store).await;
    store.bind(1, "eu-1", None);
    wait_lookup(&store, 1, found("eu-1")).await;

    let stats = store.stats();
    assert!(stats.errors.get(StoreErrorKind::Connect) >= 20, "{stats:?}");
    assert_eq!(stats.lookups.unavailable.get(StoreErrorKind::Connect), 20);
    assert!(stats.writes_dropped >= 1);
}

#[tokio::test]
async fn a_stalled_redis_times_each_lookup_out_within_the_bound_then_works_again() {
    let lookup_timeout = Duration::from_millis(20);
    // Generous for a loaded machine; what is asserted is that no lookup waits on Redis.
    let bound = lookup_timeout + Duration::from_millis(100);
    let server = RedisServer::start().unwrap();
    let store = start(StoreSettings {
        lookup_timeout,
        ..settings(&server.url())
    });
    wait_ready(&store).await;
    store.bind(1, "eu-1", None);
    wait_lookup(&store, 1, found("eu-1")).await;

    server.pause().unwrap();
    let stall_ends = Instant::now() + Duration::from_secs(2);
    let (mut lookups, mut timeouts, mut connects, mut over_bound) = (0, 0, 0, 0);
    let mut slowest = Duration::ZERO;
    while Instant::now() < stall_ends {
        let started = Instant::now();
        let lookup = store.lookup(1).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        over_bound += usize::from(took > bound);
        lookups += 1;
        match lookup {
            Lookup::Unavailable(StoreErrorKind::Timeout) => timeouts += 1,
            // Once the health check gives up on the stalled server, lookups fail at once.
            Lookup::Unavailable(StoreErrorKind::Connect) => connects += 1,
            other => panic!("a stalled Redis answered {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.resume().unwrap();
    println!(
        "stalled 2 s: {lookups} lookups, {timeouts} timed out, {connects} failed fast, slowest {slowest:?}"
    );
    assert_eq!(over_bound, 0, "lookups slower than {bound:?}");
    assert!(timeouts > 0);
    let stats = store.stats();
    assert_eq!(
        stats.lookups.unavailable.get(StoreErrorKind::Timeout),
        timeouts
    );

    wait_lookup(&store, 1, found("eu-1")).await;
}

#[tokio::test]
async fn a_redis_restarted_empty_gives_missing_without_errors_and_takes_binds_again() {
    let mut server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));
    wait_ready(&store).await;
    store.bind(1, "eu-1", None);
    wait_lookup(&store, 1, found("eu-1")).await;

    server.restart().unwrap();
    wait_lookup(&store, 1, Lookup::Missing).await;
    wait_ready(&store).await;

    let errors_before = store.stats().errors.total();
    for _ in 0..50 {
        assert_eq!(store.lookup(1).await, Lookup::Missing);
    }
    store.bind(1, "eu-3", None);
    wait_lookup(&store, 1, found("eu-3")).await;
    assert_eq!(store.stats().errors.total(), errors_before);
}

#[tokio::test]
async fn garbage_in_redis_is_unavailable_and_counted_never_a_panic() {
    let server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));
    wait_ready(&store).await;

    let long = "r".repeat(300);
    let planted: [(u64, redis::Cmd); 4] = [
        (
            1,
            redis::cmd("SET")
                .arg(store_key(1))
                .arg(b"\xff\xfe\x00")
                .clone(),
        ),
        (2, redis::cmd("SET").arg(store_key(2)).arg(&long).clone()),
        (3, redis::cmd("SET").arg(store_key(3)).arg("").clone()),
        (4, redis::cmd("RPUSH").arg(store_key(4)).arg("eu-1").clone()),
    ];
    for (key, cmd) in &planted {
        let _: redis::Value = server.query(cmd).unwrap();
        assert_eq!(
            store.lookup(*key).await,
            Lookup::Unavailable(StoreErrorKind::Garbage),
            "key {key}"
        );
    }
    // Nor does the store write what it would refuse to read.
    store.bind(5, &long, None);
    store.bind(6, "", None);

    let stats = store.stats();
    assert_eq!(stats.lookups.unavailable.get(StoreErrorKind::Garbage), 4);
    assert_eq!(stats.errors.get(StoreErrorKind::Garbage), 6);
    assert_eq!(stats.writes_dropped, 2);
    let exists: i64 = server
        .query(redis::cmd("EXISTS").arg(store_key(5)).arg(store_key(6)))
        .unwrap();
    assert_eq!(exists, 0);
    // Still healthy afterwards.
    store.bind(7, "eu-1", None);
    wait_lookup(&store, 7, found("eu-1")).await;
}

#[tokio::test]
async fn a_full_write_queue_drops_and_counts_without_blocking_the_caller() {
    let server = RedisServer::start().unwrap();
    let store = start(StoreSettings {
        write_queue: 4,
        ..settings(&server.url())
    });
    wait_ready(&store).await;

    // The writer gets stuck on its first batch; the queue behind it fills up.
    server.pause().unwrap();
    let mut slowest = Duration::ZERO;
    for key in 0..1000 {
        let started = Instant::now();
        store.bind(key, "eu-1", None);
        slowest = slowest.max(started.elapsed());
    }
    let stats = store.stats();
    server.resume().unwrap();

    println!("1000 binds into a queue of 4: slowest call {slowest:?}");
    assert!(slowest < Duration::from_millis(50), "{slowest:?}");
    let full = stats.errors.get(StoreErrorKind::QueueFull);
    assert!(full >= 1000 - 4 - 256, "{stats:?}");
    assert!(stats.writes_dropped >= full);
}

#[tokio::test]
async fn connection_state_changes_are_logged_once_each() {
    capture_logs();
    let mut server = RedisServer::start().unwrap();
    let url = server.url();
    let store = start(settings(&url));
    wait_ready(&store).await;

    server.kill().unwrap();
    wait_until("the store notices", RECOVERY, || async {
        !store.stats().connected && !store.stats().subscribed
    })
    .await;
    // Many failing lookups and reconnect attempts while it is down.
    let down_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < down_until {
        assert!(matches!(store.lookup(1).await, Lookup::Unavailable(_)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.restart().unwrap();
    wait_ready(&store).await;

    // The trailing space keeps port 4000 from matching 40001.
    let connection = format!("connection to {url} ");
    let subscription = format!("on {url} ");
    let any = format!("{url} ");
    use log::Level::{Info, Warn};
    assert_eq!(logged(Warn, &[&connection, "is lost"]).len(), 1);
    assert_eq!(logged(Info, &[&connection, "is back"]).len(), 1);
    assert_eq!(logged(Warn, &[&subscription, "is lost"]).len(), 1);
    assert_eq!(logged(Info, &[&subscription, "is back"]).len(), 1);
    assert_eq!(
        logged(Warn, &[&any]).len(),
        2,
        "{:?}",
        logged(Warn, &[&any])
    );
}
