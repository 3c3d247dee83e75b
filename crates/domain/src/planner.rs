//! The planner: a pure function from what is wanted (queued demand per
//! profile, plus warm pools) and what exists (runners) to what to launch.
//!
//! Runners are not bound to jobs (GitHub gives a queued job to any fitting
//! runner), so the planner only counts: per profile it keeps
//! `available runners >= queued jobs + min_idle`, within the profile's
//! `max_instances` and the global cap.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::ports::RunnerScope;
use crate::{Profile, ProfileName, RunnerState};

/// One queued job, as far as the planner cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedJob {
    pub since: DateTime<Utc>,
    /// Where a runner for it must be registered.
    pub scope: RunnerScope,
}

/// What the ledger says about one profile's demand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Queued jobs, oldest first.
    pub queued: Vec<QueuedJob>,
    /// Where warm-pool runners go: the scope of the profile's latest job.
    pub warm_scope: Option<RunnerScope>,
}

/// A runner as far as the planner cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerCount {
    pub profile: String,
    pub state: RunnerState,
    pub scope: Option<RunnerScope>,
}

/// One runner to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRunner {
    pub scope: RunnerScope,
    /// When the job it covers was first seen (`None` for a warm-pool
    /// runner), for the launch-latency metric.
    pub demand_since: Option<DateTime<Utc>>,
}

/// New runners to create for a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub profile: ProfileName,
    pub runners: Vec<NewRunner>,
}

impl Launch {
    pub fn count(&self) -> usize {
        self.runners.len()
    }
}

/// Decides what to launch. Profiles are served in priority order (then
/// name) when the global cap cannot cover everyone.
pub fn plan_launches(
    profiles: &[Profile],
    demand: &BTreeMap<String, Demand>,
    runners: &[RunnerCount],
    global_cap: u32,
) -> Vec<Launch> {
    let live_total = runners.iter().filter(|r| r.state.is_live()).count();
    let mut global_room = (global_cap as usize).saturating_sub(live_total);
    let mut order: Vec<&Profile> = profiles.iter().filter(|p| p.enabled).collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));

    let mut launches = Vec::new();
    for p in order {
        let mine: Vec<&RunnerCount> = runners
            .iter()
            .filter(|r| r.profile == p.name.as_str())
            .collect();
        let live = mine.iter().filter(|r| r.state.is_live()).count();
        let empty = Demand::default();
        let d = demand.get(p.name.as_str()).unwrap_or(&empty);
        // A runner only takes jobs of the scope it is registered in, so
        // available runners cover queued jobs scope by scope, oldest first.
        let mut spare: BTreeMap<&RunnerScope, usize> = BTreeMap::new();
        for r in mine.iter().filter(|r| r.state.is_available()) {
            if let Some(scope) = &r.scope {
                *spare.entry(scope).or_default() += 1;
            }
        }
        let mut wanted: Vec<NewRunner> = Vec::new();
        for job in &d.queued {
            match spare.get_mut(&job.scope) {
                Some(n) if *n > 0 => *n -= 1,
                _ => wanted.push(NewRunner {
                    scope: job.scope.clone(),
                    demand_since: Some(job.since),
                }),
            }
        }
        let spare_total: usize = spare.values().sum();
        if let Some(scope) = &d.warm_scope {
            let warm_missing = (p.min_idle as usize).saturating_sub(spare_total);
            wanted.extend((0..warm_missing).map(|_| NewRunner {
                scope: scope.clone(),
                demand_since: None,
            }));
        }
        let profile_room = (p.max_instances as usize).saturating_sub(live);
        wanted.truncate(profile_room.min(global_room));
        if wanted.is_empty() {
            continue;
        }
        global_room -= wanted.len();
        launches.push(Launch {
            profile: p.name.clone(),
            runners: wanted,
        });
    }
    launches
}

/// The `(instance type, subnet, market)` combinations to try for a launch,
/// in order: every subnet of the first type, then the next type, and the
/// whole walk again on-demand when spot is exhausted and the profile allows.
pub fn launch_candidates(profile: &Profile) -> Vec<(String, Option<String>, crate::Market)> {
    let mut markets = vec![profile.market];
    if profile.market == crate::Market::Spot && profile.on_demand_fallback {
        markets.push(crate::Market::OnDemand);
    }
    let subnets: Vec<Option<String>> = if profile.subnet_ids.is_empty() {
        vec![None]
    } else {
        profile.subnet_ids.iter().cloned().map(Some).collect()
    };
    let mut out = Vec::new();
    for market in markets {
        for t in &profile.instance_types {
            for s in &subnets {
                out.push((t.clone(), s.clone(), market));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::example_row;
    use crate::Market;
    use proptest::prelude::*;

    fn profile(name: &str, max: i32, min_idle: i32, priority: i32) -> Profile {
        let mut row = example_row(name, &["kani"]);
        row.max_instances = max;
        row.min_idle = min_idle;
        row.priority = priority;
        Profile::try_from(row).unwrap()
    }

    fn org() -> RunnerScope {
        RunnerScope::Org("acme".into())
    }

    fn queued(n: usize) -> Demand {
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        Demand {
            queued: (0..n)
                .map(|i| QueuedJob {
                    since: t0 + chrono::Duration::seconds(i as i64),
                    scope: org(),
                })
                .collect(),
            warm_scope: Some(org()),
        }
    }

    fn runners(profile: &str, states: &[(RunnerState, usize)]) -> Vec<RunnerCount> {
        states
            .iter()
            .flat_map(|(s, n)| {
                std::iter::repeat_n(
                    RunnerCount {
                        profile: profile.into(),
                        state: *s,
                        scope: Some(org()),
                    },
                    *n,
                )
            })
            .collect()
    }

    fn counts(launches: &[Launch]) -> Vec<(String, usize)> {
        launches
            .iter()
            .map(|l| (l.profile.to_string(), l.count()))
            .collect()
    }

    #[test]
    fn table() {
        use RunnerState::*;
        // (queued, min_idle, max, existing runners, global cap) -> launches
        type Case = (usize, i32, i32, Vec<(RunnerState, usize)>, u32, usize);
        let cases: Vec<Case> = vec![
            (0, 0, 10, vec![], 100, 0),
            (3, 0, 10, vec![], 100, 3),
            (3, 0, 10, vec![(Booting, 1), (Idle, 1)], 100, 1),
            (3, 0, 10, vec![(Busy, 5)], 100, 3),
            (3, 0, 5, vec![(Busy, 4)], 100, 1),
            (3, 0, 10, vec![], 2, 2),
            (0, 2, 10, vec![], 100, 2),
            (1, 2, 10, vec![(Idle, 2)], 100, 1),
            (3, 0, 10, vec![(Terminated, 50), (LaunchFailed, 9)], 100, 3),
            (
                3,
                0,
                10,
                vec![(Requested, 1), (Registered, 1), (Launching, 1)],
                100,
                0,
            ),
            (2, 0, 10, vec![(Done, 3), (Terminating, 3)], 7, 1),
        ];
        for (q, min_idle, max, existing, cap, want) in cases {
            let profiles = vec![profile("kani", max, min_idle, 0)];
            let demand = BTreeMap::from([("kani".to_owned(), queued(q))]);
            let launches = plan_launches(&profiles, &demand, &runners("kani", &existing), cap);
            let got: usize = launches.iter().map(Launch::count).sum();
            assert_eq!(
                got, want,
                "queued {q}, idle {min_idle}, max {max}, {existing:?}, cap {cap}"
            );
        }
    }

    #[test]
    fn global_cap_goes_to_priority_first() {
        let profiles = vec![profile("bench", 10, 0, 0), profile("kani", 10, 0, 5)];
        let demand = BTreeMap::from([
            ("bench".to_owned(), queued(4)),
            ("kani".to_owned(), queued(4)),
        ]);
        let launches = plan_launches(&profiles, &demand, &[], 6);
        assert_eq!(counts(&launches), [("kani".into(), 4), ("bench".into(), 2)]);
    }

    #[test]
    fn disabled_and_unknown_profiles_get_nothing() {
        let mut row = example_row("off", &["kani"]);
        row.enabled = false;
        let profiles = vec![Profile::try_from(row).unwrap()];
        let demand = BTreeMap::from([
            ("off".to_owned(), queued(3)),
            ("gone".to_owned(), queued(3)),
        ]);
        assert!(plan_launches(&profiles, &demand, &[], 100).is_empty());
    }

    #[test]
    fn new_runners_cover_the_jobs_existing_ones_do_not() {
        let profiles = vec![profile("kani", 10, 1, 0)];
        let demand = BTreeMap::from([("kani".to_owned(), queued(3))]);
        let existing = runners("kani", &[(RunnerState::Booting, 1)]);
        let launches = plan_launches(&profiles, &demand, &existing, 100);
        let d = queued(3).queued;
        let since: Vec<_> = launches[0].runners.iter().map(|r| r.demand_since).collect();
        assert_eq!(since, vec![Some(d[1].since), Some(d[2].since), None]);
    }

    #[test]
    fn runners_only_cover_jobs_of_their_scope() {
        let profiles = vec![profile("kani", 10, 0, 0)];
        let mut d = queued(2);
        d.queued[1].scope = RunnerScope::Repo("alice/proofs".into());
        let demand = BTreeMap::from([("kani".to_owned(), d)]);
        // One idle runner in the org covers the org's job, not alice's.
        let existing = runners("kani", &[(RunnerState::Idle, 1)]);
        let launches = plan_launches(&profiles, &demand, &existing, 100);
        assert_eq!(launches[0].runners.len(), 1);
        assert_eq!(
            launches[0].runners[0].scope,
            RunnerScope::Repo("alice/proofs".into())
        );
    }

    #[test]
    fn candidates_walk_types_then_subnets_then_on_demand() {
        let mut row = example_row("kani", &["kani"]);
        row.instance_types = vec!["a".into(), "b".into()];
        row.subnet_ids = vec!["s1".into(), "s2".into()];
        let p = Profile::try_from(row.clone()).unwrap();
        let c: Vec<String> = launch_candidates(&p)
            .into_iter()
            .map(|(t, s, m)| format!("{t}/{}/{m}", s.unwrap()))
            .collect();
        assert_eq!(
            c,
            [
                "a/s1/spot",
                "a/s2/spot",
                "b/s1/spot",
                "b/s2/spot",
                "a/s1/on-demand",
                "a/s2/on-demand",
                "b/s1/on-demand",
                "b/s2/on-demand"
            ]
        );
        row.on_demand_fallback = false;
        row.subnet_ids = vec![];
        let p = Profile::try_from(row).unwrap();
        let c = launch_candidates(&p);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|(_, s, m)| s.is_none() && *m == Market::Spot));
    }

    fn state() -> impl Strategy<Value = RunnerState> {
        proptest::sample::select(RunnerState::ALL.to_vec())
    }

    proptest! {
        /// Caps are never exceeded, whatever exists already.
        #[test]
        fn caps_hold(
            q in proptest::collection::vec(0usize..40, 3),
            maxes in proptest::collection::vec(1i32..20, 3),
            existing in proptest::collection::vec((0usize..3, state()), 0..60),
            cap in 0u32..80,
        ) {
            let names = ["a", "b", "c"];
            let profiles: Vec<Profile> = (0..3).map(|i| profile(names[i], maxes[i], 0, i as i32)).collect();
            let demand: BTreeMap<String, Demand> = (0..3).map(|i| (names[i].to_owned(), queued(q[i]))).collect();
            let rs: Vec<RunnerCount> = existing.iter().map(|(i, s)| RunnerCount { profile: names[*i].into(), state: *s, scope: Some(org()) }).collect();
            let launches = plan_launches(&profiles, &demand, &rs, cap);
            let live_before = rs.iter().filter(|r| r.state.is_live()).count();
            let new: usize = launches.iter().map(Launch::count).sum();
            prop_assert!(new == 0 || live_before + new <= cap as usize);
            for (i, p) in profiles.iter().enumerate() {
                let live = rs.iter().filter(|r| r.profile == names[i] && r.state.is_live()).count();
                let added: usize = launches.iter().filter(|l| l.profile == p.name).map(Launch::count).sum();
                prop_assert!(added == 0 || live + added <= p.max_instances as usize);
                prop_assert!(added <= q[i], "never more than the demand");
            }
        }

        /// Applying a plan and planning again launches nothing more.
        #[test]
        fn repeated_passes_converge(
            q in proptest::collection::vec(0usize..40, 2),
            existing in proptest::collection::vec((0usize..2, state()), 0..30),
        ) {
            let names = ["a", "b"];
            let profiles: Vec<Profile> = (0..2).map(|i| profile(names[i], 15, 1, 0)).collect();
            let demand: BTreeMap<String, Demand> = (0..2).map(|i| (names[i].to_owned(), queued(q[i]))).collect();
            let mut rs: Vec<RunnerCount> = existing.iter().map(|(i, s)| RunnerCount { profile: names[*i].into(), state: *s, scope: Some(org()) }).collect();
            let first = plan_launches(&profiles, &demand, &rs, 25);
            for l in &first {
                for _ in 0..l.count() {
                    rs.push(RunnerCount { profile: l.profile.to_string(), state: RunnerState::Requested, scope: Some(l.runners[0].scope.clone()) });
                }
            }
            prop_assert!(plan_launches(&profiles, &demand, &rs, 25).is_empty());
        }
    }
}
