//! The shutdown's drain: once Pingora closes the listeners (SIGTERM, or the hand-over of a
//! binary upgrade), requests in flight get up to `server.drain_timeout` to finish; those still
//! running then are cut ([`Cut`]) so that each ends through the proxy's error path and logs a
//! usage record; the usage log is flushed and the process exits as soon as nothing is left.
//!
//! Why not Pingora's own sequence: after the listeners close it sleeps `grace_period_seconds`
//! whatever is in flight, then drops every task still running. A drain sized for generations
//! (minutes) would then make every shutdown take minutes, and a stream still running at the
//! end would vanish without its `logging` hook, so without a usage record. Pingora's sleep is
//! kept only as a backstop, longer than this drain.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::Notify;

use crate::upstream_io::Cut;

/// How long cut requests get to run their error path and log. They only have to notice a
/// failed read and write a record, so this is short; it bounds a request that is stuck
/// elsewhere (a client upload that stalls, say).
pub const AFTER_CUT: Duration = Duration::from_secs(2);

/// Requests in the proxy service, from their context's creation to its drop (after
/// `logging`).
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    /// No request yet.
    pub fn new() -> Arc<InFlight> {
        Arc::new(InFlight::default())
    }

    /// Counts one request until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a last request ending in between still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One request of [`InFlight`].
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What to do once the drain is over, before the process exits: flush the usage log, stop
/// the sticky store's thread. Runs once, whichever path gets there first.
pub struct Finish(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Finish {
    /// `f` runs at the first [`Finish::run`].
    pub fn new(f: impl FnOnce() + Send + 'static) -> Arc<Finish> {
        Arc::new(Finish(Mutex::new(Some(Box::new(f)))))
    }

    /// Runs it, if it has not run yet.
    pub fn run(&self) {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}

impl std::fmt::Debug for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finish")
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request finished within the limit.
    Finished,
    /// The limit passed: this many were cut, and all of them logged.
    Cut(usize),
    /// The limit passed, the requests were cut, and this many had not ended after
    /// [`AFTER_CUT`].
    Stuck(usize),
}

/// Waits for `in_flight` to empty, for at most `limit`; then fires `cut` and gives the rest
/// `after_cut` to end.
pub async fn drain(
    in_flight: &InFlight,
    cut: &Cut,
    limit: Duration,
    after_cut: Duration,
) -> Drained {
    if tokio::time::timeout(limit, in_flight.idle()).await.is_ok() {
        return Drained::Finished;
    }
    let running = in_flight.count();
    log::warn!(
        "shutdown: drain limit of {} reached; cutting {running} requests still in flight",
        humantime::format_duration(limit)
    );
    cut.fire();
    match tokio::time::timeout(after_cut, in_flight.idle()).await {
        Ok(()) => Drained::Cut(running),
        Err(_) => Drained::Stuck(in_flight.count()),
    }
}

/// The background service that runs the drain when Pingora starts its shutdown, then ends
/// the process.
#[derive(Debug)]
pub struct DrainOnShutdown {
    /// The proxy's requests.
    pub in_flight: Arc<InFlight>,
    /// Breaks off every upstream read.
    pub cut: Arc<Cut>,
    /// `server.drain_timeout`.
    pub limit: Duration,
    /// Flushes what must be flushed before exit.
    pub finish: Arc<Finish>,
}

#[async_trait]
impl BackgroundService for DrainOnShutdown {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Pingora only ever sends `true`, when the listeners close (SIGTERM, or SIGQUIT after
        // the listeners went to the new process); a closed channel means it is already gone.
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        log::info!(
            "shutdown: listeners closed; draining {} requests in flight (limit {})",
            self.in_flight.count(),
            humantime::format_duration(self.limit)
        );
        match drain(&self.in_flight, &self.cut, self.limit, AFTER_CUT).await {
            Drained::Finished => log::info!("shutdown: every request finished"),
            Drained::Cut(n) => log::warn!("shutdown: {n} requests cut and logged as incomplete"),
            Drained::Stuck(n) => {
                log::error!("shutdown: {n} requests did not end after being cut; they go unlogged")
            }
        }
        self.finish.run();
        // Pingora would now sleep out its backstop and drop the runtimes: nothing is left
        // for either, and a shutdown should take no longer than its requests did.
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_nothing_in_flight_ends_at_once() {
        let (in_flight, cut) = (InFlight::new(), Cut::new());
        let started = tokio::time::Instant::now();
        let done = drain(&in_flight, &cut, Duration::from_secs(60), AFTER_CUT).await;
        assert_eq!(done, Drained::Finished);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_when_the_last_request_does() {
        let (in_flight, cut) = (InFlight::new(), Cut::new());
        let guard = in_flight.enter();
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(7)).await;
            drop(guard);
        });
        let started = tokio::time::Instant::now();
        let done = drain(&in_flight, &cut, Duration::from_secs(60), AFTER_CUT).await;
        assert_eq!(done, Drained::Finished);
        assert_eq!(started.elapsed(), Duration::from_secs(7));
        ends.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_limit_are_cut_and_waited_for() {
        let (in_flight, cut) = (InFlight::new(), Cut::new());
        let stream = in_flight.enter();
        let stuck = in_flight.enter();
        // A request that ends shortly after the cut (as a cut upstream read makes it).
        let watcher = Arc::clone(&cut);
        let ends = tokio::spawn(async move {
            while !watcher.fired() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(stream);
        });
        let started = tokio::time::Instant::now();
        let done = drain(&in_flight, &cut, Duration::from_secs(5), AFTER_CUT).await;
        assert_eq!(done, Drained::Stuck(1));
        assert_eq!(started.elapsed(), Duration::from_secs(5) + AFTER_CUT);
        ends.await.unwrap();
        drop(stuck);
        assert_eq!(in_flight.count(), 0);
    }
}
