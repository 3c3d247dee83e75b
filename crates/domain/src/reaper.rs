//! The reaper: a pure function from the runners that exist, the demand and
//! the clock to the runners whose instance should go.
//!
//! It decides only the timeouts. Completion (a job's `completed` names its
//! runner) and instances that vanished are facts, not decisions, and the
//! reconciler acts on them directly.
//!
//! The rules (DESIGN.md, "Talking to GitHub" and "Runner lifecycle"):
//! - `max_lifetime_secs` applies to every instance, busy or not: it is the
//!   ceiling on what one runner can cost.
//! - A booting runner is kept until it comes online — new demand may take
//!   it — but never beyond `boot_timeout_secs`.
//! - An idle runner goes after `idle_timeout_secs` online without a job,
//!   and only when it is surplus to queued demand plus `min_idle`.
//! - A busy runner is never reaped for being idle: GitHub's `busy` flag
//!   lags, so only the ledger's `in_progress` decides that it is working.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::planner::Demand;
use crate::{Profile, RunnerState};

/// Idle and boot limits for runners of a profile that no longer exists
/// (deleted or invalid): they serve no demand the service can see.
const ORPHAN_PROFILE_BOOT_TIMEOUT_SECS: i64 = 600;

/// A live runner as far as the reaper cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerAge {
    pub name: String,
    pub profile: String,
    pub state: RunnerState,
    /// When `RunInstances` was sent.
    pub launched_at: Option<DateTime<Utc>>,
    /// When the runner was first seen online (GitHub's runner list, or an
    /// `in_progress` naming it).
    pub online_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReapReason {
    BootTimeout,
    IdleTimeout,
    MaxLifetime,
}

impl ReapReason {
    /// The label value in `spot_runners_reaps_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReapReason::BootTimeout => "boot_timeout",
            ReapReason::IdleTimeout => "idle_timeout",
            ReapReason::MaxLifetime => "max_lifetime",
        }
    }

    /// The state the runner ends in.
    pub fn final_state(self) -> RunnerState {
        match self {
            ReapReason::BootTimeout => RunnerState::BootTimeout,
            ReapReason::IdleTimeout => RunnerState::IdleTimeout,
            // The lifecycle has no state of its own for this; the reason
            // column and the reap counter say why.
            ReapReason::MaxLifetime => RunnerState::Terminated,
        }
    }
}

/// A runner whose instance should be terminated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reap {
    pub name: String,
    pub profile: String,
    pub reason: ReapReason,
}

fn past(since: Option<DateTime<Utc>>, secs: i64, now: DateTime<Utc>) -> bool {
    since.is_some_and(|t| now - t >= Duration::seconds(secs))
}

/// Decides which runners to reap. Runners in states with no instance yet
/// (`requested`, `registered`) or already on their way out are left alone.
pub fn plan_reaps(
    profiles: &[Profile],
    demand: &BTreeMap<String, Demand>,
    runners: &[RunnerAge],
    now: DateTime<Utc>,
) -> Vec<Reap> {
    let mut reaps = Vec::new();
    let mut by_profile: BTreeMap<&str, Vec<&RunnerAge>> = BTreeMap::new();
    for r in runners.iter().filter(|r| r.state.is_live()) {
        by_profile.entry(r.profile.as_str()).or_default().push(r);
    }
    for (name, mine) in by_profile {
        let profile = profiles.iter().find(|p| p.name.as_str() == name);
        let (boot, idle, lifetime, keep) = match profile {
            Some(p) => {
                let queued = demand.get(name).map_or(0, |d| d.jobs());
                let min_idle = if p.enabled { p.min_idle as usize } else { 0 };
                (
                    i64::from(p.boot_timeout_secs),
                    i64::from(p.idle_timeout_secs),
                    Some(i64::from(p.max_lifetime_secs)),
                    queued + min_idle,
                )
            }
            None => (ORPHAN_PROFILE_BOOT_TIMEOUT_SECS, 0, None, 0),
        };
        let mut reap = |r: &RunnerAge, reason| {
            reaps.push(Reap {
                name: r.name.clone(),
                profile: r.profile.clone(),
                reason,
            })
        };
        let mut survivors = Vec::new();
        for r in mine {
            let has_instance = r.launched_at.is_some()
                && !matches!(r.state, RunnerState::Done | RunnerState::Terminating);
            if has_instance && lifetime.is_some_and(|l| past(r.launched_at, l, now)) {
                reap(r, ReapReason::MaxLifetime);
            } else if r.state == RunnerState::Booting && past(r.launched_at, boot, now) {
                reap(r, ReapReason::BootTimeout);
            } else {
                survivors.push(r);
            }
        }
        // Surplus: runners that could still take a job, beyond what the
        // queue and the warm pool want. The longest idle go first.
        let available = survivors.iter().filter(|r| r.state.is_available()).count();
        let mut surplus = available.saturating_sub(keep);
        let mut idle: Vec<&RunnerAge> = survivors
            .into_iter()
            .filter(|r| r.state == RunnerState::Idle && past(r.online_at, idle, now))
            .collect();
        idle.sort_by_key(|r| (r.online_at, r.name.clone()));
        for r in idle {
            if surplus == 0 {
                break;
            }
            reap(r, ReapReason::IdleTimeout);
            surplus -= 1;
        }
    }
    reaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::RunnerScope;
    use crate::profile::example_row;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn profile(min_idle: u32) -> Profile {
        let mut row = example_row("kani", &["kani"]);
        row.min_idle = min_idle as i32;
        row.boot_timeout_secs = 600;
        row.idle_timeout_secs = 300;
        row.max_lifetime_secs = 4 * 3600;
        Profile::try_from(row).unwrap()
    }

    fn runner(name: &str, state: RunnerState, launched: i64, online: Option<i64>) -> RunnerAge {
        RunnerAge {
            name: name.into(),
            profile: "kani".into(),
            state,
            launched_at: Some(t(launched)),
            online_at: online.map(t),
        }
    }

    fn queued(n: usize) -> BTreeMap<String, Demand> {
        let mut d = Demand::default();
        for _ in 0..n {
            d.add(RunnerScope::Org("acme".into()), t(0));
        }
        BTreeMap::from([("kani".to_string(), d)])
    }

    fn reasons(reaps: &[Reap]) -> Vec<(&str, ReapReason)> {
        reaps.iter().map(|r| (r.name.as_str(), r.reason)).collect()
    }

    #[test]
    fn timeouts_table() {
        use ReapReason::{BootTimeout, IdleTimeout, MaxLifetime};
        use RunnerState::{Booting, Busy, Done, Idle, Terminated, Terminating};
        let p = [profile(0)];
        let cases: Vec<(&str, RunnerAge, usize, i64, Option<ReapReason>)> = vec![
            (
                "booting within limit",
                runner("a", Booting, 0, None),
                0,
                599,
                None,
            ),
            (
                "booting too long",
                runner("a", Booting, 0, None),
                0,
                600,
                Some(BootTimeout),
            ),
            (
                "booting too long, even with demand",
                runner("a", Booting, 0, None),
                3,
                601,
                Some(BootTimeout),
            ),
            ("idle, short", runner("a", Idle, 0, Some(60)), 0, 359, None),
            (
                "idle past limit, surplus",
                runner("a", Idle, 0, Some(60)),
                0,
                360,
                Some(IdleTimeout),
            ),
            (
                "idle past limit, demand wants it",
                runner("a", Idle, 0, Some(60)),
                1,
                3000,
                None,
            ),
            (
                "busy for hours",
                runner("a", Busy, 0, Some(60)),
                0,
                4 * 3600 - 1,
                None,
            ),
            (
                "busy past lifetime",
                runner("a", Busy, 0, Some(60)),
                0,
                4 * 3600,
                Some(MaxLifetime),
            ),
            (
                "idle past lifetime, wanted",
                runner("a", Idle, 0, Some(60)),
                5,
                4 * 3600,
                Some(MaxLifetime),
            ),
            (
                "done: terminate already under way",
                runner("a", Done, 0, Some(60)),
                0,
                9 * 3600,
                None,
            ),
            (
                "terminating",
                runner("a", Terminating, 0, Some(60)),
                0,
                9 * 3600,
                None,
            ),
            (
                "ended",
                runner("a", Terminated, 0, Some(60)),
                0,
                9 * 3600,
                None,
            ),
        ];
        for (what, r, demand, now, want) in cases {
            let got = plan_reaps(&p, &queued(demand), std::slice::from_ref(&r), t(now));
            assert_eq!(got.first().map(|r| r.reason), want, "{what}");
            assert!(got.len() <= 1, "{what}");
        }
    }

    #[test]
    fn requested_runners_are_never_reaped() {
        let mut r = runner("a", RunnerState::Requested, 0, None);
        r.launched_at = None;
        assert!(plan_reaps(&[profile(0)], &queued(0), &[r], t(99_999)).is_empty());
    }

    #[test]
    fn only_the_surplus_goes_longest_idle_first() {
        use RunnerState::{Booting, Idle};
        let runners = [
            runner("a", Idle, 0, Some(30)),
            runner("b", Idle, 0, Some(10)),
            runner("c", Idle, 0, Some(20)),
            // On the way: counts as available, so one idle runner fewer is needed.
            runner("d", Booting, 900, None),
        ];
        let got = plan_reaps(&[profile(0)], &queued(2), &runners, t(1000));
        assert_eq!(
            reasons(&got),
            vec![
                ("b", ReapReason::IdleTimeout),
                ("c", ReapReason::IdleTimeout)
            ]
        );
    }

    #[test]
    fn a_warm_pool_keeps_its_idle_runners() {
        let runners = [
            runner("a", RunnerState::Idle, 0, Some(0)),
            runner("b", RunnerState::Idle, 0, Some(0)),
        ];
        let got = plan_reaps(&[profile(2)], &queued(0), &runners, t(3600));
        assert!(got.is_empty());
        let got = plan_reaps(&[profile(1)], &queued(0), &runners, t(3600));
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn a_disabled_profile_keeps_no_warm_pool() {
        let mut p = profile(2);
        p.enabled = false;
        let runners = [runner("a", RunnerState::Idle, 0, Some(0))];
        assert_eq!(plan_reaps(&[p], &queued(0), &runners, t(3600)).len(), 1);
    }

    #[test]
    fn runners_of_a_deleted_profile_drain() {
        use RunnerState::{Booting, Busy, Idle};
        let runners = [
            runner("idle", Idle, 0, Some(10)),
            runner("busy", Busy, 0, Some(10)),
            runner("booting", Booting, 0, None),
        ];
        let got = plan_reaps(&[], &BTreeMap::new(), &runners, t(20));
        assert_eq!(reasons(&got), vec![("idle", ReapReason::IdleTimeout)]);
        let got = plan_reaps(&[], &BTreeMap::new(), &runners, t(600));
        assert_eq!(
            reasons(&got),
            vec![
                ("booting", ReapReason::BootTimeout),
                ("idle", ReapReason::IdleTimeout)
            ]
        );
    }

    fn any_state() -> impl Strategy<Value = RunnerState> {
        proptest::sample::select(RunnerState::ALL.to_vec())
    }

    proptest! {
        /// Whatever the mix: busy runners go only at their lifetime, at
        /// least queued + min_idle available runners survive (when they
        /// exist), and nothing is reaped twice.
        #[test]
        fn reaping_never_starves_demand_nor_kills_work(
            states in proptest::collection::vec((any_state(), 0i64..20_000, proptest::option::of(0i64..20_000)), 0..30),
            demand in 0usize..10,
            min_idle in 0u32..3,
            now in 0i64..20_000,
        ) {
            let p = profile(min_idle);
            let runners: Vec<RunnerAge> = states
                .iter()
                .enumerate()
                .map(|(i, (s, l, o))| runner(&format!("r{i}"), *s, *l, *o))
                .collect();
            let reaps = plan_reaps(std::slice::from_ref(&p), &queued(demand), &runners, t(now));
            let mut names: Vec<&str> = reaps.iter().map(|r| r.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), reaps.len());
            for reap in &reaps {
                let r = runners.iter().find(|r| r.name == reap.name).unwrap();
                prop_assert!(r.state.is_live());
                if matches!(r.state, RunnerState::Busy | RunnerState::Done | RunnerState::Terminating) {
                    prop_assert_eq!(reap.reason, ReapReason::MaxLifetime);
                    prop_assert!(r.state == RunnerState::Busy);
                }
            }
            let reaped = |name: &str, idle: bool| {
                reaps.iter().any(|r| r.name == name && (r.reason == ReapReason::IdleTimeout) == idle)
            };
            let after_timeouts = runners
                .iter()
                .filter(|r| r.state.is_available() && !reaped(&r.name, false))
                .count();
            let idle_reaped = reaps.iter().filter(|r| r.reason == ReapReason::IdleTimeout).count();
            let keep = demand + min_idle as usize;
            // Idle reaps never cut into what demand and the warm pool need.
            prop_assert!(after_timeouts - idle_reaped >= keep.min(after_timeouts));
        }
    }
}
