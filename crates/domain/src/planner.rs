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

/// The queued jobs of one profile in one scope, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    pub jobs: usize,
    /// When the oldest of them was first seen.
    pub oldest: DateTime<Utc>,
}

/// What the ledger says about one profile's demand: counts, not jobs, so a
/// pass costs the same beside ten open jobs or ten thousand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Queued jobs by the scope a runner for them must be registered in.
    pub queued: BTreeMap<RunnerScope, Queue>,
    /// Where warm-pool runners go: the scope of the profile's latest job.
    pub warm_scope: Option<RunnerScope>,
}

impl Demand {
    /// Counts one more queued job.
    pub fn add(&mut self, scope: RunnerScope, since: DateTime<Utc>) {
        self.queued
            .entry(scope)
            .and_modify(|q| {
                q.jobs += 1;
                q.oldest = q.oldest.min(since);
            })
            .or_insert(Queue {
                jobs: 1,
                oldest: since,
            });
    }

    /// Queued jobs in every scope.
    pub fn jobs(&self) -> usize {
        self.queued.values().map(|q| q.jobs).sum()
    }

    /// When the oldest queued job was first seen.
    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        self.queued.values().map(|q| q.oldest).min()
    }
}

/// Runners of one profile in one state and scope, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerCount {
    pub profile: String,
    pub state: RunnerState,
    pub scope: Option<RunnerScope>,
    pub runners: usize,
}

/// One runner to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRunner {
    pub scope: RunnerScope,
    /// The queued job it is for, as its place in its profile's queue in
    /// that scope (0 = the oldest); `None` for a warm-pool runner. The
    /// store, which holds the queue, turns it into `demand_since` for the
    /// launch-latency metric.
    pub covers: Option<usize>,
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
    let live_total: usize = runners
        .iter()
        .filter(|r| r.state.is_live())
        .map(|r| r.runners)
        .sum();
    let mut global_room = (global_cap as usize).saturating_sub(live_total);
    let mut order: Vec<&Profile> = profiles.iter().filter(|p| p.enabled).collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));

    let mut launches = Vec::new();
    for p in order {
        let mine = runners.iter().filter(|r| r.profile == p.name.as_str());
        let mut live = 0;
        // A runner only takes jobs of the scope it is registered in, so
        // available runners cover queued jobs scope by scope, oldest first.
        let mut spare: BTreeMap<&RunnerScope, usize> = BTreeMap::new();
        for r in mine {
            if r.state.is_live() {
                live += r.runners;
            }
            if let (true, Some(scope)) = (r.state.is_available(), &r.scope) {
                *spare.entry(scope).or_default() += r.runners;
            }
        }
        let empty = Demand::default();
        let d = demand.get(p.name.as_str()).unwrap_or(&empty);
        let room = (p.max_instances as usize)
            .saturating_sub(live)
            .min(global_room);
        let mut wanted = uncovered(d, &spare, room);
        let spare_left: usize = spare
            .iter()
            .map(|(scope, n)| n.saturating_sub(d.queued.get(*scope).map_or(0, |q| q.jobs)))
            .sum();
        if let Some(scope) = &d.warm_scope {
            let warm_missing = (p.min_idle as usize).saturating_sub(spare_left);
            let warm = warm_missing.min(room - wanted.len());
            wanted.extend((0..warm).map(|_| NewRunner {
                scope: scope.clone(),
                covers: None,
            }));
        }
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

/// Runners for the queued jobs the spare ones leave uncovered, at most
/// `room`: the oldest uncovered job of each scope in turn (scopes with the
/// oldest job first), so one scope's backlog cannot starve another's.
fn uncovered(d: &Demand, spare: &BTreeMap<&RunnerScope, usize>, room: usize) -> Vec<NewRunner> {
    // (scope, next job to cover, jobs), oldest queue first.
    let mut queues: Vec<(&RunnerScope, usize, usize, DateTime<Utc>)> = d
        .queued
        .iter()
        .map(|(scope, q)| {
            (
                scope,
                spare.get(scope).copied().unwrap_or(0),
                q.jobs,
                q.oldest,
            )
        })
        .filter(|(_, next, jobs, _)| next < jobs)
        .collect();
    queues.sort_by_key(|(scope, _, _, oldest)| (*oldest, *scope));
    let mut out = Vec::new();
    while out.len() < room && !queues.is_empty() {
        for (scope, next, _, _) in queues.iter_mut() {
            if out.len() == room {
                break;
            }
            out.push(NewRunner {
                scope: (*scope).clone(),
                covers: Some(*next),
            });
            *next += 1;
        }
        queues.retain(|(_, next, jobs, _)| next < jobs);
    }
    out
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

    fn t(i: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + i, 0).unwrap()
    }

    fn queued(n: usize) -> Demand {
        let mut d = Demand {
            warm_scope: Some(org()),
            ..Demand::default()
        };
        for i in 0..n {
            d.add(org(), t(i as i64));
        }
        d
    }

    fn runners(profile: &str, states: &[(RunnerState, usize)]) -> Vec<RunnerCount> {
        states
            .iter()
            .map(|(s, n)| RunnerCount {
                profile: profile.into(),
                state: *s,
                scope: Some(org()),
                runners: *n,
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
        let covers: Vec<_> = launches[0].runners.iter().map(|r| r.covers).collect();
        assert_eq!(covers, vec![Some(1), Some(2), None]);
    }

    #[test]
    fn under_a_cap_each_scope_gets_its_oldest_uncovered_job_in_turn() {
        let alice = RunnerScope::Repo("alice/proofs".into());
        let bob = RunnerScope::Repo("bob/bench".into());
        let profiles = vec![profile("kani", 10, 0, 0)];
        let mut d = Demand::default();
        for i in 0..5 {
            d.add(alice.clone(), t(i));
        }
        d.add(bob.clone(), t(3));
        d.add(org(), t(9));
        let demand = BTreeMap::from([("kani".to_owned(), d)]);
        // Two of alice's are covered; three runners fit under the cap.
        let mut existing = runners("kani", &[(RunnerState::Idle, 2), (RunnerState::Busy, 5)]);
        for r in &mut existing {
            r.scope = Some(alice.clone());
        }
        let launches = plan_launches(&profiles, &demand, &existing, 100);
        let got: Vec<_> = launches[0]
            .runners
            .iter()
            .map(|r| (r.scope.clone(), r.covers))
            .collect();
        assert_eq!(
            got,
            [(alice.clone(), Some(2)), (bob, Some(0)), (org(), Some(0))]
        );
    }

    #[test]
    fn runners_only_cover_jobs_of_their_scope() {
        let profiles = vec![profile("kani", 10, 0, 0)];
        let mut d = queued(1);
        d.add(RunnerScope::Repo("alice/proofs".into()), t(1));
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
            let rs: Vec<RunnerCount> = existing.iter().map(|(i, s)| RunnerCount { profile: names[*i].into(), state: *s, scope: Some(org()), runners: 1 }).collect();
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
            let mut rs: Vec<RunnerCount> = existing.iter().map(|(i, s)| RunnerCount { profile: names[*i].into(), state: *s, scope: Some(org()), runners: 1 }).collect();
            let first = plan_launches(&profiles, &demand, &rs, 25);
            for l in &first {
                for r in &l.runners {
                    rs.push(RunnerCount { profile: l.profile.to_string(), state: RunnerState::Requested, scope: Some(r.scope.clone()), runners: 1 });
                }
            }
            prop_assert!(plan_launches(&profiles, &demand, &rs, 25).is_empty());
        }
    }
}
