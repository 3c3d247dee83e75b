//! Simulated time: tokio's clock (paused and advanced by tests and by the
//! virtual-time simulator) tied to a calendar epoch for timestamps.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

/// Maps tokio instants to UTC from a fixed start, so payload timestamps and
/// the pure functions' `now` come from the same clock as everything else.
#[derive(Clone, Copy, Debug)]
pub struct SimClock {
    start: Instant,
    epoch: DateTime<Utc>,
}

impl SimClock {
    /// Starts now (tokio's now), calling it `epoch`.
    pub fn starting_at(epoch: DateTime<Utc>) -> Self {
        Self {
            start: crate::now(),
            epoch,
        }
    }

    /// The fixed calendar start of every `simulate` run: a Monday, so daily
    /// traces line up with a working week.
    pub fn virtual_epoch() -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_767_571_200, 0).unwrap_or_default()
    }

    pub fn now(&self) -> Instant {
        crate::now()
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn elapsed(&self) -> Duration {
        crate::now().saturating_duration_since(self.start)
    }

    pub fn utc(&self, at: Instant) -> DateTime<Utc> {
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        match at.checked_duration_since(self.start) {
            Some(after) => self.epoch + delta(after),
            None => self.epoch - delta(self.start - at),
        }
    }

    pub fn now_utc(&self) -> DateTime<Utc> {
        self.utc(crate::now())
    }
}
