//! The store on a 3-node Redis Cluster: keys spread over the nodes, lookups and binds work the
//! same, and announcements reach a subscriber on one node whichever node they were made on.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Duration;

use tether_sticky_store::testing::RedisCluster;
use tether_sticky_store::{Lookup, StoreSettings};

use crate::coherence::measure_coherence;
use crate::common::*;

fn cluster_settings(cluster: &RedisCluster) -> StoreSettings {
    StoreSettings {
        cluster: true,
        ..settings(&cluster.seed_url())
    }
}

#[tokio::test]
async fn lookups_binds_and_announcements_work_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    let a = start(cluster_settings(&cluster));
    let b = start(cluster_settings(&cluster));
    wait_ready(&a).await;
    wait_ready(&b).await;

    assert_eq!(b.lookup(0xfeed).await, Lookup::Missing);
    let mut delays = measure_coherence(&a, &b, 60).await;
    let (median, p99, max) = percentiles(&mut delays);
    println!("cluster coherence delay over 60 binds: median {median:?}, p99 {p99:?}, max {max:?}");
    assert!(median < Duration::from_millis(100));

    // The keys were sharded: every node holds some.
    for node in cluster.nodes() {
        let keys: i64 = node.query(&redis::cmd("DBSIZE")).unwrap();
        assert!(keys > 0, "node {} holds no key", node.port());
    }

    // A publish on any node reaches the subscriber, whichever node it listens on.
    let (heard, hearing) = mpsc::channel();
    b.on_remote_bind(move |key, _, _| {
        let _ = heard.send(key);
    });
    for (i, node) in cluster.nodes().iter().enumerate() {
        let message = format!("00000000000000ff:{:016x}:eu-1", 0xa0 + i);
        let _: i64 = node
            .query(
                redis::cmd("PUBLISH")
                    .arg(tether_sticky_store::DEFAULT_CHANNEL)
                    .arg(message),
            )
            .unwrap();
    }
    let keys: HashSet<u64> = (0..3)
        .map(|_| hearing.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    assert_eq!(keys, HashSet::from([0xa0, 0xa1, 0xa2]));

    a.touch(0xfeed, "eu-1");
    b.bind(0xfeed, "eu-2", None);
    wait_lookup(&a, 0xfeed, found("eu-2")).await;
    assert_eq!(a.stats().errors.total(), 0, "{:?}", a.stats());
    assert_eq!(b.stats().errors.total(), 0, "{:?}", b.stats());
}

#[tokio::test]
async fn the_subscription_moves_to_another_node_when_its_node_dies() {
    let mut cluster = RedisCluster::start().unwrap();
    let store = start(cluster_settings(&cluster));
    wait_ready(&store).await;
    let (heard, hearing) = mpsc::channel();
    store.on_remote_bind(move |key, _, _| {
        let _ = heard.send(key);
    });

    // The subscription starts on the seed; kill it.
    cluster.nodes_mut()[0].kill().unwrap();
    wait_until("the subscription is lost", RECOVERY, || async {
        !store.stats().subscribed
    })
    .await;
    wait_until(
        "the subscription is back on another node",
        RECOVERY,
        || async { store.stats().subscribed },
    )
    .await;

    let survivor = &cluster.nodes()[1];
    let _: i64 = survivor
        .query(
            redis::cmd("PUBLISH")
                .arg(tether_sticky_store::DEFAULT_CHANNEL)
                .arg("00000000000000ff:00000000000000b1:eu-1"),
        )
        .unwrap();
    assert_eq!(hearing.recv_timeout(Duration::from_secs(5)).unwrap(), 0xb1);
}
