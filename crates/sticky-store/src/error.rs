//! Errors of starting the store, and the kinds of failure a running store reports.

use std::fmt;

use thiserror::Error;

/// What kind of failure an operation met: the reason in [`Lookup::Unavailable`] and the label
/// of the error counters in [`StoreStats`].
///
/// [`Lookup::Unavailable`]: crate::Lookup::Unavailable
/// [`StoreStats`]: crate::StoreStats
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// No usable connection to Redis: down, refused, or reconnecting after a loss.
    Connect,
    /// Redis did not answer in time (`lookup_timeout` for a lookup).
    Timeout,
    /// The connection broke mid-request or Redis answered with an error.
    Io,
    /// A stored value or a published message is not something this store writes: not UTF-8,
    /// empty, longer than [`MAX_REPLICA_ID_LEN`](crate::MAX_REPLICA_ID_LEN), or of the wrong
    /// Redis type.
    Garbage,
    /// A bounded queue was full, so the operation was dropped instead of waiting.
    QueueFull,
    /// The store has been shut down.
    Stopped,
}

impl StoreErrorKind {
    /// Every kind, in the order of [`KindCounts`](crate::KindCounts).
    pub const ALL: [StoreErrorKind; 6] = [
        StoreErrorKind::Connect,
        StoreErrorKind::Timeout,
        StoreErrorKind::Io,
        StoreErrorKind::Garbage,
        StoreErrorKind::QueueFull,
        StoreErrorKind::Stopped,
    ];

    /// The label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreErrorKind::Connect => "connect",
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::Io => "io",
            StoreErrorKind::Garbage => "garbage",
            StoreErrorKind::QueueFull => "queue_full",
            StoreErrorKind::Stopped => "stopped",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            StoreErrorKind::Connect => 0,
            StoreErrorKind::Timeout => 1,
            StoreErrorKind::Io => 2,
            StoreErrorKind::Garbage => 3,
            StoreErrorKind::QueueFull => 4,
            StoreErrorKind::Stopped => 5,
        }
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with the settings, named by its YAML path (`sticky_store.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsProblem {
    /// YAML path of the offending field.
    pub field: &'static str,
    /// What is wrong, in words an operator can act on. Never contains a password.
    pub message: String,
}

impl fmt::Display for SettingsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why [`StickyStore::start`](crate::StickyStore::start) refused to start. Redis being down is
/// never one of them: the store starts and keeps reconnecting.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The settings break one or more rules; every problem is listed.
    #[error("invalid sticky store settings: {}", ProblemList(problems))]
    InvalidSettings {
        /// Every problem found, in field order.
        problems: Vec<SettingsProblem>,
    },
    /// The store's runtime or its thread could not be created.
    #[error("cannot start the sticky store thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl StoreError {
    /// The problems of an `InvalidSettings` error (empty for the other kinds).
    pub fn problems(&self) -> &[SettingsProblem] {
        match self {
            StoreError::InvalidSettings { problems } => problems,
            StoreError::Thread(_) => &[],
        }
    }
}

struct ProblemList<'a>(&'a [SettingsProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
