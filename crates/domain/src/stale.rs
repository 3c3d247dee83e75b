//! When a job the ledger has as queued is worth asking GitHub about.
//!
//! A lost `in_progress` or `completed` leaves a job queued in the ledger
//! for ever, holding a runner (and an instance) for nothing. GitHub's jobs
//! API tells the truth, but every call spends rate limit, so only suspects
//! are asked often: a queued job whose profile has an idle runner (some
//! runner should have taken it). A job merely waiting for room under a cap
//! is asked about rarely.

use chrono::{DateTime, Duration, Utc};

/// Queued this long while a runner of its profile idles: a suspect.
pub const SUSPECT_AFTER_SECS: i64 = 180;
/// A suspect is asked again after this.
pub const SUSPECT_RECHECK_SECS: i64 = 300;
/// Any queued job is asked about after this (the backlog behind a cap).
pub const BACKLOG_AFTER_SECS: i64 = 900;
/// And again after this.
pub const BACKLOG_RECHECK_SECS: i64 = 3600;
/// Jobs-API calls per sweep, at most.
pub const CHECKS_PER_SWEEP: usize = 5;

/// The policy as cut-off times at one instant, so a database query and an
/// in-memory ledger apply exactly the same rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleCutoffs {
    pub suspect_seen_before: DateTime<Utc>,
    pub suspect_checked_before: DateTime<Utc>,
    pub backlog_seen_before: DateTime<Utc>,
    pub backlog_checked_before: DateTime<Utc>,
}

impl StaleCutoffs {
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            suspect_seen_before: now - Duration::seconds(SUSPECT_AFTER_SECS),
            suspect_checked_before: now - Duration::seconds(SUSPECT_RECHECK_SECS),
            backlog_seen_before: now - Duration::seconds(BACKLOG_AFTER_SECS),
            backlog_checked_before: now - Duration::seconds(BACKLOG_RECHECK_SECS),
        }
    }

    /// Whether a queued job first seen at `seen_at`, last asked about at
    /// `checked_at`, is due; `idle_runner` says whether its profile has a
    /// runner online with nothing to do.
    pub fn due(
        &self,
        seen_at: DateTime<Utc>,
        checked_at: Option<DateTime<Utc>>,
        idle_runner: bool,
    ) -> bool {
        let suspect = idle_runner
            && seen_at < self.suspect_seen_before
            && checked_at.is_none_or(|t| t < self.suspect_checked_before);
        let backlog = seen_at < self.backlog_seen_before
            && checked_at.is_none_or(|t| t < self.backlog_checked_before);
        suspect || backlog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(mins: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + mins * 60, 0).unwrap()
    }

    #[test]
    fn suspects_are_asked_early_and_the_backlog_rarely() {
        let c = StaleCutoffs::at(t(100));
        // Queued 4 minutes with an idle runner around: ask.
        assert!(c.due(t(96), None, true));
        // The same job behind a cap: not yet.
        assert!(!c.due(t(96), None, false));
        // Behind a cap for 16 minutes: once...
        assert!(c.due(t(84), None, false));
        // ...and then only hourly.
        assert!(!c.due(t(40), Some(t(50)), false));
        assert!(c.due(t(20), Some(t(39)), false));
        // A suspect asked 4 minutes ago waits; 6 minutes ago, asked again.
        assert!(!c.due(t(90), Some(t(96)), true));
        assert!(c.due(t(90), Some(t(94)), true));
    }
}
