//! The store against one healthy Redis node: what it writes, what it reads, how it stops.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tether_sticky_store::testing::RedisServer;
use tether_sticky_store::{Lookup, StickyStore, StoreErrorKind, StoreSettings};

use crate::common::*;

#[tokio::test]
async fn a_bind_is_stored_under_the_prefixed_key_with_the_ttl() {
    let server = RedisServer::start().unwrap();
    let store = start(StoreSettings {
        ttl: Duration::from_secs(90),
        ..settings(&server.url())
    });
    wait_ready(&store).await;

    assert_eq!(store.lookup(0xabc).await, Lookup::Missing);
    store.bind(0xabc, "eu-2", None);
    wait_lookup(&store, 0xabc, found("eu-2")).await;

    let value: String = server
        .query(redis::cmd("GET").arg(store_key(0xabc)))
        .unwrap();
    assert_eq!(value, "eu-2");
    let ttl: i64 = server
        .query(redis::cmd("TTL").arg(store_key(0xabc)))
        .unwrap();
    assert!((85..=90).contains(&ttl), "ttl {ttl}");

    let stats = store.stats();
    assert!(stats.lookups.found >= 1 && stats.lookups.missing >= 1);
    assert_eq!(stats.writes_done, 1);
    assert_eq!(stats.errors.total(), 0, "{stats:?}");
    assert!(stats.lookup_latency.count >= 2);
}

#[tokio::test]
async fn a_touch_restarts_the_ttl_and_announces_nothing() {
    let server = RedisServer::start().unwrap();
    let store = start(StoreSettings {
        ttl: Duration::from_secs(600),
        ..settings(&server.url())
    });
    let other = start(settings(&server.url()));
    wait_ready(&store).await;
    wait_ready(&other).await;

    store.bind(7, "eu-1", None);
    wait_lookup(&store, 7, found("eu-1")).await;
    wait_until("the bind is announced", RECOVERY, || async {
        other.stats().remote_binds == 1
    })
    .await;
    let _: () = server
        .query(redis::cmd("EXPIRE").arg(store_key(7)).arg(5))
        .unwrap();

    store.touch(7, "eu-2");
    wait_until("the touch restores the ttl", RECOVERY, || async {
        let ttl: i64 = server.query(redis::cmd("TTL").arg(store_key(7))).unwrap();
        ttl > 500
    })
    .await;
    // A touch never overwrites the binding that is there...
    wait_lookup(&store, 7, found("eu-1")).await;
    // ...and writes back one the store lost, without announcing it.
    store.touch(8, "eu-3");
    wait_lookup(&store, 8, found("eu-3")).await;
    assert_eq!(other.stats().remote_binds, 1);
}

#[tokio::test]
async fn shutdown_flushes_queued_writes_then_answers_stopped() {
    let server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));
    wait_ready(&store).await;

    for key in 0..200 {
        store.bind(key, "eu-1", None);
    }
    store.shutdown();

    let stored: i64 = server.query(&redis::cmd("DBSIZE")).unwrap();
    assert_eq!(stored, 200);
    assert_eq!(store.stats().writes_done, 200);
    assert_eq!(
        store.lookup(1).await,
        Lookup::Unavailable(StoreErrorKind::Stopped)
    );
    store.bind(1, "eu-2", None);
    let stats = store.stats();
    assert_eq!(stats.writes_dropped, 1);
    assert!(!stats.connected);
    store.shutdown();
}

#[test]
fn lookups_work_from_any_runtime_and_never_panic_outside_one() {
    let server = RedisServer::start().unwrap();
    let store = start(settings(&server.url()));

    let current_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current_thread.block_on(async {
        wait_ready(&store).await;
        store.bind(1, "eu-1", None);
        wait_lookup(&store, 1, found("eu-1")).await;
    });

    let multi_thread = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let from_tasks = multi_thread.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.lookup(1).await })
            })
            .collect();
        let mut lookups = Vec::new();
        for task in tasks {
            lookups.push(task.await.unwrap());
        }
        lookups
    });
    assert!(from_tasks.iter().all(|lookup| *lookup == found("eu-1")));

    // Polled by no runtime at all: it cannot bound its wait, so it declines at once.
    let mut lookup = pin!(store.lookup(1));
    let polled = lookup
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    assert_eq!(
        polled,
        Poll::Ready(Lookup::Unavailable(StoreErrorKind::Timeout))
    );
}

#[test]
fn invalid_settings_fail_start_naming_each_field() {
    let err = StickyStore::start(StoreSettings {
        write_queue: 0,
        ..StoreSettings::new("redis://user:hunter2@127.0.0.1:notaport")
    })
    .unwrap_err();
    let fields: Vec<_> = err.problems().iter().map(|p| p.field).collect();
    assert_eq!(fields, ["sticky_store.url", "sticky_store.write_queue"]);
    let text = err.to_string();
    assert!(text.contains("sticky_store.write_queue"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}
