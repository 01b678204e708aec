//! Helpers shared by the end-to-end tests.

use std::future::Future;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tether_sticky_store::{Lookup, StickyStore, StoreSettings};

/// Generous bound for anything that involves a reconnect (backoff is capped at 2 s).
pub const RECOVERY: Duration = Duration::from_secs(15);

/// Settings for a test: a lookup timeout long enough that a debug build on a loaded machine
/// does not time out, so functional tests see only the outcomes they provoke.
pub fn settings(url: &str) -> StoreSettings {
    StoreSettings {
        lookup_timeout: Duration::from_millis(250),
        ..StoreSettings::new(url)
    }
}

pub fn start(settings: StoreSettings) -> StickyStore {
    StickyStore::start(settings).unwrap()
}

/// Polls `condition` until it holds, panicking with `what` after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the store's command connection and subscription are both up.
pub async fn wait_ready(store: &StickyStore) {
    wait_until(
        "the store is connected and subscribed",
        RECOVERY,
        || async {
            let stats = store.stats();
            stats.connected && stats.subscribed
        },
    )
    .await;
}

/// Waits until looking `key` up gives `expected`.
pub async fn wait_lookup(store: &StickyStore, key: u64, expected: Lookup) {
    let what = format!("lookup({key:x}) gives {expected:?}");
    wait_until(&what, RECOVERY, || async {
        store.lookup(key).await == expected
    })
    .await;
}

pub fn found(replica: &str) -> Lookup {
    Lookup::Found(replica.into())
}

pub fn store_key(key: u64) -> String {
    format!("{}{key:016x}", tether_sticky_store::DEFAULT_KEY_PREFIX)
}

/// `(median, p99, max)` of `samples`.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("tether_sticky_store")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let text = record.args().to_string();
            RECORDS.lock().unwrap().push((record.level(), text));
        }
    }

    fn flush(&self) {}
}

/// Captures the store's log records (info and above) for [`logged`]; tests in this binary run
/// in parallel, so each filters by something unique to it, such as its server's port.
pub fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CaptureLogger).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// Captured records at `level` whose text contains every one of `parts`.
pub fn logged(level: log::Level, parts: &[&str]) -> Vec<String> {
    RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, text)| *at == level && parts.iter().all(|part| text.contains(part)))
        .map(|(_, text)| text.clone())
        .collect()
}
