//! Keeps one command connection up: connect with backoff, publish it in the [`Link`],
//! health-check it, and replace it when it breaks.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

use super::state_log::StateLog;
use super::{classify, Connected, Link, Shared};
use crate::backoff::Backoff;
use crate::connection::{RedisConnection, CONNECT_TIMEOUT, HEALTH_INTERVAL, REQUEST_TIMEOUT};
use crate::error::StoreErrorKind;
use crate::settings::Plan;

pub(super) async fn run(plan: Arc<Plan>, link: Arc<Link>, shared: Arc<Shared>) {
    let mut state = StateLog::new(format!("connection to {}", plan.redacted_url));
    let mut backoff = Backoff::new();
    let mut broken = link.broken.subscribe();
    let mut generation = 0;
    loop {
        match timeout(CONNECT_TIMEOUT, plan.target.connect()).await {
            Ok(Ok(conn)) => {
                generation += 1;
                link.current.store(Some(Arc::new(Connected {
                    generation,
                    conn: conn.clone(),
                })));
                shared.counters.connected.store(true, Relaxed);
                shared.counters.established.fetch_add(1, Relaxed);
                state.up();
                backoff.reset();
                let reason = watch(&plan, conn, generation, &mut broken, &shared).await;
                link.current.store(None);
                shared.counters.connected.store(false, Relaxed);
                state.down(&reason);
            }
            Ok(Err(err)) => {
                shared.counters.error(StoreErrorKind::Connect);
                state.down(&err);
            }
            Err(_elapsed) => {
                shared.counters.error(StoreErrorKind::Connect);
                state.down(&"connecting timed out");
            }
        }
        sleep(backoff.next_delay(rand::random())).await;
    }
}

/// Returns why the connection must be replaced.
async fn watch(
    plan: &Plan,
    mut conn: RedisConnection,
    generation: u64,
    broken: &mut watch::Receiver<u64>,
    shared: &Shared,
) -> String {
    // A single node that misses a check is gone or stalled. A cluster connection reconnects
    // to its nodes by itself and each check asks a random node, so one miss may only mean one
    // node is down: replace the whole connection only when checks keep failing.
    let misses_allowed = if plan.target.is_cluster() { 3 } else { 1 };
    let mut misses = 0;
    let mut checks = interval(HEALTH_INTERVAL);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    checks.tick().await;
    loop {
        tokio::select! {
            _ = reported_broken(broken, generation) => {
                return "a request found it closed".to_owned();
            }
            _ = checks.tick() => {
                let failure = match timeout(REQUEST_TIMEOUT, conn.ping()).await {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => {
                        shared.counters.error(classify(&err));
                        Some(format!("health check failed: {err}"))
                    }
                    Err(_elapsed) => {
                        shared.counters.error(StoreErrorKind::Timeout);
                        Some("health check timed out".to_owned())
                    }
                };
                match failure {
                    None => misses = 0,
                    Some(reason) => {
                        misses += 1;
                        if misses >= misses_allowed {
                            return reason;
                        }
                    }
                }
            }
        }
    }
}

async fn reported_broken(broken: &mut watch::Receiver<u64>, generation: u64) {
    // The sender lives in the Link as long as this task, so the wait cannot fail.
    let _ = broken.wait_for(|highest| *highest >= generation).await;
}
