//! Listens for bindings announced by other instances and hands them to the proxy's callback.
//!
//! In a cluster a classic `PUBLISH` is broadcast to every node, so one subscription to any
//! node hears all of them. The subscriber starts with the seed node; when it cannot reach the
//! node it is on, it moves to the next node of the cluster (learnt with `CLUSTER NODES`).
//! Announcements made while no subscription is up are not replayed: the stored value stays
//! authoritative, and the announcement only lets other instances update their local copy early.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures_util::StreamExt;
use redis::aio::PubSub;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Client, Value};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

use super::state_log::StateLog;
use super::{classify, Link, Shared};
use crate::backoff::Backoff;
use crate::connection::{RedisConnection, CONNECT_TIMEOUT, HEALTH_INTERVAL, REQUEST_TIMEOUT};
use crate::error::StoreErrorKind;
use crate::message::{decode_bind, decode_load};
use crate::settings::Plan;

pub(super) async fn run(plan: Arc<Plan>, link: Arc<Link>, shared: Arc<Shared>) {
    let mut state = StateLog::new(format!(
        "subscription to {:?} on {}",
        plan.channel, plan.redacted_url
    ));
    let mut backoff = Backoff::new();
    let mut nodes = vec![plan.target.pubsub_seed().clone()];
    let mut node = 0;
    loop {
        let client = &nodes[node % nodes.len()];
        match timeout(CONNECT_TIMEOUT, subscribe(client, &plan.channel)).await {
            Ok(Ok(pubsub)) => {
                shared.counters.subscribed.store(true, Relaxed);
                shared.counters.established.fetch_add(1, Relaxed);
                state.up();
                backoff.reset();
                let reason = listen(pubsub, &shared).await;
                shared.counters.subscribed.store(false, Relaxed);
                state.down(&reason);
            }
            Ok(Err(err)) => {
                shared.counters.error(StoreErrorKind::Connect);
                state.down(&err);
                node += 1;
            }
            Err(_elapsed) => {
                shared.counters.error(StoreErrorKind::Connect);
                state.down(&"subscribing timed out");
                node += 1;
            }
        }
        if plan.target.is_cluster() && node >= nodes.len() {
            // Every known node failed: ask the cluster which nodes it has now.
            if let Some(found) = cluster_nodes(&plan, &link).await {
                nodes = found;
            }
            node = 0;
        }
        sleep(backoff.next_delay(rand::random())).await;
    }
}

async fn subscribe(client: &Client, channel: &str) -> redis::RedisResult<PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Delivers messages until the subscription fails; returns why.
async fn listen(pubsub: PubSub, shared: &Shared) -> String {
    let (mut sink, mut messages) = pubsub.split();
    // A subscribed connection only ever receives, so a server that silently went away would
    // otherwise go unnoticed: ping it.
    let mut checks = interval(HEALTH_INTERVAL);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    checks.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(message) => deliver(shared, message.get_payload_bytes()),
                None => return "the connection closed".to_owned(),
            },
            _ = checks.tick() => match timeout(REQUEST_TIMEOUT, sink.ping::<Value>()).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    shared.counters.error(classify(&err));
                    return format!("health check failed: {err}");
                }
                Err(_elapsed) => {
                    shared.counters.error(StoreErrorKind::Timeout);
                    return "health check timed out".to_owned();
                }
            },
        }
    }
}

fn deliver(shared: &Shared, payload: &[u8]) {
    if payload.first() == Some(&b'L') {
        deliver_load(shared, payload);
        return;
    }
    let Some(message) = decode_bind(payload) else {
        shared.counters.error(StoreErrorKind::Garbage);
        log::debug!(
            "sticky store: ignored a malformed message of {} bytes",
            payload.len()
        );
        return;
    };
    if message.origin == shared.origin {
        return;
    }
    shared.counters.remote_bind();
    let callback = shared.remote_bind.load();
    if let Some(callback) = callback.as_ref() {
        // A panicking callback must not end the subscription for the rest of the process.
        if catch_unwind(AssertUnwindSafe(|| {
            callback(message.key, message.replica, message.group)
        }))
        .is_err()
        {
            log::error!("sticky store: the remote-bind callback panicked; the message is dropped");
        }
    }
}

fn deliver_load(shared: &Shared, payload: &[u8]) {
    let Some(message) = decode_load(payload) else {
        shared.counters.error(StoreErrorKind::Garbage);
        log::debug!(
            "sticky store: ignored a malformed load report of {} bytes",
            payload.len()
        );
        return;
    };
    if message.origin == shared.origin {
        return;
    }
    let callback = shared.remote_load.load();
    if let Some(callback) = callback.as_ref() {
        if catch_unwind(AssertUnwindSafe(|| {
            callback(message.origin, &message.entries)
        }))
        .is_err()
        {
            log::error!("sticky store: the remote-load callback panicked; the report is dropped");
        }
    }
}

/// Clients for every reachable-looking node of the cluster, from `CLUSTER NODES` asked through
/// the command connection (which knows nodes the seed may no longer be).
async fn cluster_nodes(plan: &Plan, link: &Link) -> Option<Vec<Client>> {
    let connected = link.current()?;
    let RedisConnection::Cluster(mut conn) = connected.conn.clone() else {
        return None;
    };
    let reply = timeout(
        REQUEST_TIMEOUT,
        conn.route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        ),
    )
    .await
    .ok()?
    .ok()?;
    let text = match reply {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok()?,
        Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    let clients: Vec<Client> = parse_cluster_nodes(&text)
        .into_iter()
        .filter_map(|(host, port)| plan.target.node_client(host, port).ok())
        .collect();
    (!clients.is_empty()).then_some(clients)
}

/// `(host, port)` of each node in a `CLUSTER NODES` reply that is not marked failed. A line is
/// `<id> <ip:port@cport[,hostname]> <flags> …`.
fn parse_cluster_nodes(text: &str) -> Vec<(&str, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _id = fields.next()?;
            let address = fields.next()?;
            let flags = fields.next()?;
            if flags
                .split(',')
                .any(|flag| matches!(flag, "fail" | "fail?" | "noaddr" | "handshake"))
            {
                return None;
            }
            let host_port = address.split(['@', ',']).next()?;
            let (host, port) = host_port.rsplit_once(':')?;
            let port = port.parse().ok()?;
            (!host.is_empty()).then_some((host, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_addresses_of_live_nodes() {
        let reply = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,node-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
a1 :0@0 master,noaddr - 0 0 0 disconnected
b2 ::1:30005@31005 master - 0 0 5 connected
garbage
";
        assert_eq!(
            parse_cluster_nodes(reply),
            [
                ("127.0.0.1", 30004),
                ("127.0.0.1", 30002),
                ("127.0.0.1", 30001),
                ("::1", 30005),
            ]
        );
    }
}
