//! Logs a link's state changes once each, never once per failed attempt or request: an outage
//! of a shared dependency must not flood the logs of every proxy in the tier.

use std::fmt::Display;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Up,
    Down,
}

#[derive(Debug)]
pub(crate) struct StateLog {
    /// "connection to redis://…" or "subscription to \"channel\" on redis://…".
    link: String,
    state: State,
}

impl StateLog {
    pub(crate) fn new(link: String) -> Self {
        StateLog {
            link,
            state: State::Starting,
        }
    }

    pub(crate) fn up(&mut self) {
        match self.state {
            State::Starting => log::info!("sticky store: {} is up", self.link),
            State::Down => log::info!("sticky store: {} is back", self.link),
            State::Up => {}
        }
        self.state = State::Up;
    }

    pub(crate) fn down(&mut self, reason: &dyn Display) {
        match self.state {
            State::Starting => log::warn!(
                "sticky store: {} cannot be established ({reason}); lookups report the store unavailable while it retries",
                self.link
            ),
            State::Up => log::warn!(
                "sticky store: {} is lost ({reason}); reconnecting with backoff",
                self.link
            ),
            State::Down => log::debug!("sticky store: {} still down ({reason})", self.link),
        }
        self.state = State::Down;
    }
}
