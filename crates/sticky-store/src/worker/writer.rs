//! Drains the write queue in batches: one pipeline per batch on a single node, concurrent
//! commands in a cluster (a pipeline there must stay within one hash slot).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use super::{classify, connection_lost, Link, Shared, WriteOp};
use crate::connection::{RedisConnection, REQUEST_TIMEOUT};
use crate::error::StoreErrorKind;
use crate::message::{encode_bind, store_key};
use crate::settings::Plan;

/// Most writes sent in one round trip.
const MAX_BATCH: usize = 256;
/// How long shutdown spends writing what is still queued.
pub(crate) const FLUSH_BOUND: Duration = Duration::from_millis(500);

pub(super) async fn run(
    plan: Arc<Plan>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    mut writes: mpsc::Receiver<WriteOp>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            biased;
            // Also taken when the handle is dropped without a shutdown.
            _ = &mut stop => break,
            received = writes.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                write_batch(&plan, &link, &shared, &mut batch).await;
            }
        }
    }

    writes.close();
    let flush = async {
        while writes.recv_many(&mut batch, MAX_BATCH).await > 0 {
            write_batch(&plan, &link, &shared, &mut batch).await;
        }
    };
    if timeout(FLUSH_BOUND, flush).await.is_err() {
        let left = batch.len() + writes.len();
        shared.counters.writes_dropped(left as u64);
        log::warn!(
            "sticky store: shutdown dropped {left} queued writes it could not flush in time"
        );
    }
}

/// Writes and empties `batch`, counting each write as done or dropped.
async fn write_batch(plan: &Plan, link: &Link, shared: &Shared, batch: &mut Vec<WriteOp>) {
    let queued = batch.len() as u64;
    let ops = coalesce(batch.drain(..));
    let Some(connected) = link.current() else {
        shared.counters.error(StoreErrorKind::Connect);
        shared.counters.writes_dropped(queued);
        return;
    };
    let mut conn = connected.conn.clone();
    let failures = match &mut conn {
        RedisConnection::Single(single) => pipeline(plan, shared, single, &ops).await,
        cluster @ RedisConnection::Cluster(_) => one_by_one(plan, shared, cluster, &ops).await,
    };
    match failures {
        Ok(()) => shared.counters.writes_done(queued),
        Err(err) => {
            // The batch is counted as one failure of its kind; every write in it is dropped,
            // since a pipeline reports only its first error.
            shared.counters.writes_dropped(queued);
            if let WriteFailure::Redis { lost: true } = err {
                link.report_broken(connected.generation);
            }
        }
    }
}

enum WriteFailure {
    Redis { lost: bool },
    Timeout,
}

async fn pipeline(
    plan: &Plan,
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    ops: &[WriteOp],
) -> Result<(), WriteFailure> {
    let mut pipe = redis::pipe();
    for op in ops {
        for cmd in commands(plan, shared, op) {
            pipe.add_command(cmd).ignore();
        }
    }
    match timeout(REQUEST_TIMEOUT, pipe.query_async::<()>(conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => {
            shared.counters.error(classify(&err));
            log::debug!(
                "sticky store: a batch of {} writes failed: {err}",
                ops.len()
            );
            Err(WriteFailure::Redis {
                lost: connection_lost(&err),
            })
        }
        Err(_elapsed) => {
            shared.counters.error(StoreErrorKind::Timeout);
            Err(WriteFailure::Timeout)
        }
    }
}

async fn one_by_one(
    plan: &Plan,
    shared: &Shared,
    conn: &RedisConnection,
    ops: &[WriteOp],
) -> Result<(), WriteFailure> {
    let writes = ops.iter().map(|op| {
        let mut conn = conn.clone();
        async move {
            // In order: whoever hears the announcement must find the value.
            for cmd in commands(plan, shared, op) {
                conn.query(&cmd).await?;
            }
            Ok::<(), redis::RedisError>(())
        }
    });
    match timeout(REQUEST_TIMEOUT, join_all(writes)).await {
        Ok(results) => match results.into_iter().find_map(Result::err) {
            None => Ok(()),
            Some(err) => {
                shared.counters.error(classify(&err));
                log::debug!(
                    "sticky store: a batch of {} writes failed: {err}",
                    ops.len()
                );
                Err(WriteFailure::Redis { lost: false })
            }
        },
        Err(_elapsed) => {
            shared.counters.error(StoreErrorKind::Timeout);
            Err(WriteFailure::Timeout)
        }
    }
}

/// The Redis commands of one write.
fn commands(plan: &Plan, shared: &Shared, op: &WriteOp) -> Vec<redis::Cmd> {
    let (origin, ttl_seconds) = (
        shared.origin,
        shared
            .ttl_seconds
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    match op {
        WriteOp::Bind {
            key,
            replica,
            group,
        } => {
            let mut set = redis::cmd("SET");
            set.arg(store_key(&plan.key_prefix, *key))
                .arg(&**replica)
                .arg("EX")
                .arg(ttl_seconds);
            let mut publish = redis::cmd("PUBLISH");
            publish
                .arg(&plan.channel)
                .arg(encode_bind(origin, *key, *group, replica));
            vec![set, publish]
        }
        WriteOp::Touch { key, replica } => {
            let mut restore = redis::cmd("SET");
            restore
                .arg(store_key(&plan.key_prefix, *key))
                .arg(&**replica)
                .arg("NX")
                .arg("EX")
                .arg(ttl_seconds);
            let mut expire = redis::cmd("EXPIRE");
            expire
                .arg(store_key(&plan.key_prefix, *key))
                .arg(ttl_seconds);
            vec![restore, expire]
        }
        WriteOp::Load { payload } => {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(&plan.channel).arg(&**payload);
            vec![publish]
        }
    }
}

/// Drops writes a later one in the same batch makes pointless: an earlier bind of a key bound
/// again, any touch of a key that is bound or already touched (a bind sets the expiry), and
/// every load report but the last.
fn coalesce(ops: impl IntoIterator<Item = WriteOp>) -> Vec<WriteOp> {
    let mut reported = false;
    let mut bound = HashSet::new();
    let mut touched = HashSet::new();
    let mut kept: Vec<WriteOp> = Vec::new();
    let ops: Vec<WriteOp> = ops.into_iter().collect();
    for op in &ops {
        if let WriteOp::Bind { key, .. } = op {
            bound.insert(*key);
        }
    }
    let mut rebound = HashSet::new();
    for op in ops.into_iter().rev() {
        let keep = match &op {
            WriteOp::Bind { key, .. } => rebound.insert(*key),
            WriteOp::Touch { key, .. } => !bound.contains(key) && touched.insert(*key),
            WriteOp::Load { .. } => !std::mem::replace(&mut reported, true),
        };
        if keep {
            kept.push(op);
        }
    }
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(key: u64, replica: &str) -> WriteOp {
        WriteOp::Bind {
            key,
            replica: replica.into(),
            group: None,
        }
    }

    fn touch(key: u64) -> WriteOp {
        WriteOp::Touch {
            key,
            replica: "a".into(),
        }
    }

    #[test]
    fn coalescing_keeps_the_last_bind_and_drops_redundant_touches() {
        let cases = [
            (
                vec![bind(1, "a"), bind(2, "b")],
                vec![bind(1, "a"), bind(2, "b")],
            ),
            (vec![bind(1, "a"), bind(1, "b")], vec![bind(1, "b")]),
            (vec![touch(1), bind(1, "a"), touch(1)], vec![bind(1, "a")]),
            (vec![touch(1), touch(2), touch(1)], vec![touch(2), touch(1)]),
            (vec![], vec![]),
        ];
        for (ops, expected) in cases {
            assert_eq!(coalesce(ops.clone()), expected, "{ops:?}");
        }
    }
}
