//! Runs each lookup as its own task on the current connection, so a slow answer never holds
//! up the next lookup (the multiplexed connection pipelines them on one socket).

use std::sync::Arc;

use redis::Value;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::{classify, connection_lost, Connected, Link, LookupRequest};
use crate::error::StoreErrorKind;
use crate::message::{replica_from_value, store_key};
use crate::settings::Plan;
use crate::store::Lookup;

pub(super) async fn run(
    plan: Arc<Plan>,
    link: Arc<Link>,
    mut requests: mpsc::Receiver<LookupRequest>,
) {
    while let Some(request) = requests.recv().await {
        match link.current() {
            // The caller checks the connected flag first; this is the race where the
            // connection was lost in between.
            None => {
                let _ = request
                    .reply
                    .send(Lookup::Unavailable(StoreErrorKind::Connect));
            }
            Some(connected) => {
                tokio::spawn(answer(plan.clone(), link.clone(), connected, request));
            }
        }
    }
}

async fn answer(
    plan: Arc<Plan>,
    link: Arc<Link>,
    connected: Arc<Connected>,
    request: LookupRequest,
) {
    let lookup = get(&plan, &link, &connected, request.key).await;
    // The caller may have given up already; its own timeout counted that.
    let _ = request.reply.send(lookup);
}

async fn get(plan: &Plan, link: &Link, connected: &Connected, key: u64) -> Lookup {
    let mut conn = connected.conn.clone();
    let mut cmd = redis::cmd("GET");
    cmd.arg(store_key(&plan.key_prefix, key));
    // Bounded here too, so that requests to a stalled server do not pile up as tasks after
    // their callers have gone.
    match timeout(plan.lookup_timeout, conn.query(&cmd)).await {
        Err(_elapsed) => Lookup::Unavailable(StoreErrorKind::Timeout),
        Ok(Ok(value)) => from_value(value),
        Ok(Err(err)) => {
            if connection_lost(&err) && !plan.target.is_cluster() {
                link.report_broken(connected.generation);
            }
            Lookup::Unavailable(classify(&err))
        }
    }
}

fn from_value(value: Value) -> Lookup {
    match value {
        Value::Nil => Lookup::Missing,
        Value::BulkString(bytes) => match replica_from_value(&bytes) {
            Some(replica) => Lookup::Found(replica),
            None => Lookup::Unavailable(StoreErrorKind::Garbage),
        },
        Value::ServerError(err) if err.code() == "WRONGTYPE" => {
            Lookup::Unavailable(StoreErrorKind::Garbage)
        }
        Value::ServerError(_) => Lookup::Unavailable(StoreErrorKind::Io),
        _ => Lookup::Unavailable(StoreErrorKind::Garbage),
    }
}
