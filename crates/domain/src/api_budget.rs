//! How much of GitHub's hourly request budget the sweeps may spend, and
//! which repository is polled for lost `queued` jobs next.
//!
//! GitHub meters an installation at a primary rate limit per hour (5,000
//! for most) that JIT registrations and runner deletes draw from too. Those
//! are what a job waits on, so as the budget runs low the sweeps give way:
//! first the speculative polls, then the stale checks and run lookups, at
//! last runner listings to once a minute (a listing that did not change answers 304,
//! which GitHub does not charge). JIT registrations, deletes and re-run
//! requests are never held back here.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::store::RecentRepository;

/// The last primary rate limit GitHub reported (`x-ratelimit-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub remaining: i64,
    pub limit: i64,
    /// `x-ratelimit-reset`: when the window starts afresh.
    pub reset_at: DateTime<Utc>,
}

/// At or above this share of the budget left, the sweeps spend freely.
pub const LEAN_BELOW: f64 = 0.5;
/// Below this share, only what keeps runners and jobs moving is spent.
pub const ESSENTIAL_BELOW: f64 = 0.2;

/// How freely the sweeps spend GitHub's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Spending {
    /// Everything: polls for lost jobs, stale checks, run lookups.
    Full,
    /// Polls only where a gap is suspected; one stale check per sweep.
    Lean,
    /// No polls, stale checks or run lookups (a re-run then waits for the
    /// run's `completed` webhook); runner listings once a minute.
    /// Redelivery goes on: one listing every few minutes heals the jobs
    /// whose deliveries failed.
    Essential,
}

impl Spending {
    /// From the last reported limit; none reported, or a window that has
    /// reset since, spends freely.
    pub fn of(limit: Option<RateLimit>, now: DateTime<Utc>) -> Self {
        let Some(l) = limit.filter(|l| l.reset_at > now && l.limit > 0) else {
            return Spending::Full;
        };
        let left = l.remaining as f64 / l.limit as f64;
        if left < ESSENTIAL_BELOW {
            Spending::Essential
        } else if left < LEAN_BELOW {
            Spending::Lean
        } else {
            Spending::Full
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Spending::Full => "full",
            Spending::Lean => "lean",
            Spending::Essential => "essential",
        }
    }

    /// The gauge's value: 0 full, 1 lean, 2 essential.
    pub fn level(self) -> i64 {
        match self {
            Spending::Full => 0,
            Spending::Lean => 1,
            Spending::Essential => 2,
        }
    }

    /// Stale queued jobs one sweep may ask GitHub about, of `usual`.
    pub fn stale_checks(self, usual: usize) -> usize {
        match self {
            Spending::Full => usual,
            Spending::Lean => usual.min(1),
            Spending::Essential => 0,
        }
    }

    /// Whether sweep number `sweep` lists runners (every `per_minute`-th
    /// sweep when essential: a listing is how a runner is seen online).
    pub fn lists_runners(self, sweep: u64, per_minute: u64) -> bool {
        self != Spending::Essential || sweep % per_minute.max(1) == 0
    }

    /// Whether the re-run worker may ask GitHub whether a run completed.
    pub fn asks_about_runs(self) -> bool {
        self != Spending::Essential
    }
}

/// A repository with jobs this recent is polled in turn, each at most
/// every [`ACTIVE_POLL_EVERY`] (one repository a minute is polled at most),
/// while failed deliveries are not healed by redelivery.
pub const ACTIVE_WITHIN: Duration = Duration::minutes(15);
/// A repository polled this recently is not polled again for activity.
pub const ACTIVE_POLL_EVERY: Duration = Duration::minutes(1);
/// Every repository with jobs in the polling window is still polled this
/// often: a `queued` GitHub never tried to deliver leaves no other trace.
pub const QUIET_POLL_EVERY: Duration = Duration::minutes(30);

/// Why a repository is polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollReason {
    /// A job of it ran whose `queued` the ledger never saw.
    Suspect,
    /// It had jobs within [`ACTIVE_WITHIN`], and failed deliveries are
    /// not being redelivered.
    Active,
    /// Not polled for [`QUIET_POLL_EVERY`] (or not since this start).
    Quiet,
}

impl PollReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PollReason::Suspect => "suspect",
            PollReason::Active => "active",
            PollReason::Quiet => "quiet",
        }
    }
}

/// The repository to poll now, if any (the sweep asks once a minute).
/// `polled` holds when each was last polled by this process.
///
/// A lost `queued` leaves one of three traces. A delivery GitHub tried and
/// we failed is in the hook's delivery log: while redelivery reads that log
/// (`redelivered`), it heals those for one call each, and busy repositories
/// are polled no more often than quiet ones. A job that ran on one of our
/// runners unannounced makes its repository a suspect, polled at once. A
/// delivery GitHub never tried leaves no trace at all: the quiet poll is the
/// safety net for it.
pub fn next_poll<'a>(
    repositories: &'a [RecentRepository],
    polled: &BTreeMap<String, DateTime<Utc>>,
    spending: Spending,
    redelivered: bool,
    now: DateTime<Utc>,
) -> Option<(&'a RecentRepository, PollReason)> {
    // Each candidate with the time it fell due (`None`: never polled, or a
    // suspect, which is due at once).
    let due = |r: &RecentRepository| -> Option<(Option<DateTime<Utc>>, PollReason)> {
        let before = polled.get(&r.repository).copied();
        let suspect = r
            .unqueued_job_seen_at
            .is_some_and(|seen| before.is_none_or(|p| seen > p));
        if suspect && spending <= Spending::Lean {
            return Some((None, PollReason::Suspect));
        }
        if spending != Spending::Full {
            return None;
        }
        let (every, reason) = if !redelivered && now - r.last_job_seen_at < ACTIVE_WITHIN {
            (ACTIVE_POLL_EVERY, PollReason::Active)
        } else {
            (QUIET_POLL_EVERY, PollReason::Quiet)
        };
        match before.map(|p| p + every) {
            Some(at) if at > now => None,
            at => Some((at, reason)),
        }
    };
    repositories
        .iter()
        .filter_map(|r| due(r).map(|(at, why)| (r, at, why)))
        // Suspects first; then the one overdue longest, so a busy
        // repository does not keep the quiet ones from their turn.
        .min_by_key(|(_, at, why)| (*why != PollReason::Suspect, *at))
        .map(|(r, _, why)| (r, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + Duration::minutes(min)
    }

    fn repo(name: &str, last_job: i64, unqueued: Option<i64>) -> RecentRepository {
        RecentRepository {
            repository: name.into(),
            owner: "o".into(),
            org: Some("o".into()),
            installation_id: None,
            last_job_seen_at: t(last_job),
            unqueued_job_seen_at: unqueued.map(t),
        }
    }

    fn limit(remaining: i64) -> Option<RateLimit> {
        Some(RateLimit {
            remaining,
            limit: 5000,
            reset_at: t(30),
        })
    }

    #[test]
    fn spending_tightens_as_the_budget_runs_low_and_relaxes_when_it_resets() {
        assert_eq!(Spending::of(None, t(0)), Spending::Full);
        assert_eq!(Spending::of(limit(2500), t(0)), Spending::Full);
        assert_eq!(Spending::of(limit(2499), t(0)), Spending::Lean);
        assert_eq!(Spending::of(limit(999), t(0)), Spending::Essential);
        assert_eq!(Spending::of(limit(0), t(0)), Spending::Essential);
        // The window reset: what was reported no longer holds.
        assert_eq!(Spending::of(limit(0), t(30)), Spending::Full);
    }

    #[test]
    fn essential_spending_keeps_listings_once_a_minute_and_drops_the_rest() {
        let e = Spending::Essential;
        assert_eq!(e.stale_checks(5), 0);
        assert!(!e.asks_about_runs());
        assert!(Spending::Lean.asks_about_runs());
        let listed: Vec<u64> = (0..12).filter(|s| e.lists_runners(*s, 6)).collect();
        assert_eq!(listed, vec![0, 6]);
        assert!((0..12).all(|s| Spending::Lean.lists_runners(s, 6)));
        assert_eq!(Spending::Lean.stale_checks(5), 1);
        assert_eq!(Spending::Full.stale_checks(5), 5);
    }

    #[test]
    fn an_idle_repository_is_polled_once_per_quiet_period() {
        let repos = [repo("o/idle", -600, None)];
        let mut polled = BTreeMap::new();
        // Not polled since this start: polled.
        let (r, why) = next_poll(&repos, &polled, Spending::Full, false, t(0)).unwrap();
        assert_eq!((r.repository.as_str(), why), ("o/idle", PollReason::Quiet));
        polled.insert("o/idle".to_owned(), t(0));
        for m in 1..30 {
            assert_eq!(
                next_poll(&repos, &polled, Spending::Full, false, t(m)),
                None
            );
        }
        assert!(next_poll(&repos, &polled, Spending::Full, false, t(30)).is_some());
    }

    #[test]
    fn an_active_repository_is_polled_every_minute_while_the_budget_is_full() {
        let repos = [repo("o/busy", -1, None)];
        let polled = BTreeMap::from([("o/busy".to_owned(), t(-1))]);
        assert_eq!(
            next_poll(&repos, &polled, Spending::Full, false, t(0)).map(|x| x.1),
            Some(PollReason::Active)
        );
        // Activity stops: back to the quiet period.
        let quiet = [repo("o/busy", -20, None)];
        assert_eq!(
            next_poll(&quiet, &polled, Spending::Full, false, t(0)),
            None
        );
        // Lean spending keeps only the suspects.
        assert_eq!(
            next_poll(&repos, &polled, Spending::Lean, false, t(0)),
            None
        );
    }

    #[test]
    fn while_redelivery_heals_an_active_repository_is_polled_only_when_quiet_or_suspect() {
        let repos = [repo("o/busy", -1, None)];
        let polled = BTreeMap::from([("o/busy".to_owned(), t(-1))]);
        for m in 0..29 {
            assert_eq!(next_poll(&repos, &polled, Spending::Full, true, t(m)), None);
        }
        assert_eq!(
            next_poll(&repos, &polled, Spending::Full, true, t(29)).map(|x| x.1),
            Some(PollReason::Quiet)
        );
        // A job that ran unannounced is no delivery redelivery can find.
        let gap = [repo("o/busy", 0, Some(0))];
        assert_eq!(
            next_poll(&gap, &polled, Spending::Full, true, t(0)).map(|x| x.1),
            Some(PollReason::Suspect)
        );
        // Redelivery stops working: busy repositories every minute again.
        assert_eq!(
            next_poll(&repos, &polled, Spending::Full, false, t(0)).map(|x| x.1),
            Some(PollReason::Active)
        );
    }

    #[test]
    fn a_busy_repository_does_not_keep_a_quiet_one_from_its_turn() {
        let repos = [repo("o/busy", 0, None), repo("o/quiet", -600, None)];
        let mut polled =
            BTreeMap::from([("o/busy".to_owned(), t(-1)), ("o/quiet".to_owned(), t(-31))]);
        // The quiet one fell due a minute before the busy one.
        let (r, why) = next_poll(&repos, &polled, Spending::Full, false, t(0)).unwrap();
        assert_eq!((r.repository.as_str(), why), ("o/quiet", PollReason::Quiet));
        polled.insert("o/quiet".to_owned(), t(0));
        let (r, why) = next_poll(&repos, &polled, Spending::Full, false, t(0)).unwrap();
        assert_eq!((r.repository.as_str(), why), ("o/busy", PollReason::Active));
    }

    #[test]
    fn a_job_that_ran_unannounced_makes_its_repository_a_suspect_at_once() {
        let repos = [repo("o/quiet", -1, None), repo("o/gap", -1, Some(-1))];
        let polled = BTreeMap::from([("o/quiet".to_owned(), t(-5)), ("o/gap".to_owned(), t(-2))]);
        // The suspect wins over the repository polled longer ago, even on
        // a lean budget.
        for spending in [Spending::Full, Spending::Lean] {
            let (r, why) = next_poll(&repos, &polled, spending, false, t(0)).unwrap();
            assert_eq!((r.repository.as_str(), why), ("o/gap", PollReason::Suspect));
        }
        // Once polled after the unannounced job, it is no longer suspect.
        let polled = BTreeMap::from([("o/gap".to_owned(), t(0))]);
        assert_eq!(
            next_poll(&repos[1..], &polled, Spending::Lean, false, t(0)),
            None
        );
        assert_eq!(
            next_poll(&repos, &polled, Spending::Essential, false, t(0)),
            None
        );
    }
}
