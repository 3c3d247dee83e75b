//! The open part of the ledger — queued jobs and live runners — held in
//! memory by the planner and brought up to date from the rows written
//! since it last looked, so a pass costs what changed, not what is open.
//!
//! "Since it last looked" is a transaction horizon, not a time: every job
//! and runner row carries the id of the transaction that last wrote it
//! (`changed_by`, the change_horizon migration), and a reader keeps the
//! oldest transaction still running when it read (`pg_snapshot_xmin`). A
//! row it did not see then was written by a transaction at or past that
//! horizon, however long that transaction took to commit; reading
//! `changed_by >= horizon` next time finds it. No clock and no overlap.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use spot_runners_domain::planner::{Demand, Queue, RunnerCount};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::RunnerState;

/// A job row as the open ledger reads it.
pub(crate) struct JobRow {
    pub id: i64,
    /// Whether it waits for a runner: queued, and matched to a profile.
    pub queued: bool,
    pub profile: Option<String>,
    pub scope: RunnerScope,
    pub first_seen_at: DateTime<Utc>,
}

/// A runner row as the open ledger reads it.
pub(crate) struct RunnerRow {
    pub name: String,
    pub profile: String,
    pub state: RunnerState,
    pub scope: Option<RunnerScope>,
}

type QueueKey = (String, RunnerScope);

#[derive(Default)]
pub(crate) struct OpenLedger {
    /// Whose runners these are; another controller starts over.
    controller: String,
    /// The oldest transaction that was running when the ledger last read.
    horizon: Option<i64>,
    /// When the ledger last read every open row, not just the changes.
    full_at: Option<DateTime<Utc>>,
    job_queue: HashMap<i64, (QueueKey, DateTime<Utc>)>,
    /// Each queue in order of arrival: a new runner's place in it tells
    /// which job it is for, and so since when it was wanted.
    queues: HashMap<QueueKey, BTreeSet<(DateTime<Utc>, i64)>>,
    runners: HashMap<String, RunnerKey>,
    /// `runners` counted, kept as they change: a pass reads the counts, and
    /// recounting 10,000 runners each time was most of its own CPU.
    counts: HashMap<RunnerKey, usize>,
}

/// What the planner tells runners apart by: profile, state and scope.
type RunnerKey = (String, RunnerState, Option<RunnerScope>);

/// How the next read must go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Read {
    /// Every queued job and live runner (first read, another controller,
    /// or the periodic one that also catches rows deleted by hand).
    Full,
    /// The rows written at or past this transaction horizon.
    Since(i64),
}

impl OpenLedger {
    pub fn next_read(
        &self,
        controller: &str,
        now: DateTime<Utc>,
        full_every: chrono::Duration,
    ) -> Read {
        match (self.horizon, self.full_at) {
            (Some(h), Some(at)) if self.controller == controller && now - at < full_every => {
                Read::Since(h)
            }
            _ => Read::Full,
        }
    }

    /// Replaces everything with a full read taken at `horizon`.
    pub fn reset(
        &mut self,
        controller: &str,
        horizon: i64,
        now: DateTime<Utc>,
        jobs: Vec<JobRow>,
        runners: Vec<RunnerRow>,
    ) {
        *self = OpenLedger {
            controller: controller.to_owned(),
            ..OpenLedger::default()
        };
        self.apply(horizon, jobs, runners);
        self.full_at = Some(now);
    }

    /// Folds in the rows written at or past the previous horizon (each as
    /// it is now), and moves the horizon on.
    pub fn apply(&mut self, horizon: i64, jobs: Vec<JobRow>, runners: Vec<RunnerRow>) {
        for job in jobs {
            self.forget_job(job.id);
            if let (true, Some(profile)) = (job.queued, job.profile) {
                let key = (profile, job.scope);
                self.queues
                    .entry(key.clone())
                    .or_default()
                    .insert((job.first_seen_at, job.id));
                self.job_queue.insert(job.id, (key, job.first_seen_at));
            }
        }
        for r in runners {
            let key = (r.profile, r.state, r.scope);
            let was = if r.state.is_live() {
                *self.counts.entry(key.clone()).or_default() += 1;
                self.runners.insert(r.name, key)
            } else {
                self.runners.remove(&r.name)
            };
            if let Some(was) = was {
                if let Some(n) = self.counts.get_mut(&was) {
                    *n -= 1;
                    if *n == 0 {
                        self.counts.remove(&was);
                    }
                }
            }
        }
        self.horizon = Some(horizon);
    }

    fn forget_job(&mut self, id: i64) {
        if let Some((key, since)) = self.job_queue.remove(&id) {
            if let Some(queue) = self.queues.get_mut(&key) {
                queue.remove(&(since, id));
                if queue.is_empty() {
                    self.queues.remove(&key);
                }
            }
        }
    }

    /// Queued jobs by profile and scope (warm scopes are the caller's).
    pub fn demand(&self) -> BTreeMap<String, Demand> {
        let mut demand: BTreeMap<String, Demand> = BTreeMap::new();
        for ((profile, scope), queue) in &self.queues {
            if let Some((oldest, _)) = queue.first() {
                demand.entry(profile.clone()).or_default().queued.insert(
                    scope.clone(),
                    Queue {
                        jobs: queue.len(),
                        oldest: *oldest,
                    },
                );
            }
        }
        demand
    }

    /// Live runners counted by profile, state and scope.
    pub fn runner_counts(&self) -> Vec<RunnerCount> {
        let mut counts: Vec<RunnerCount> = self
            .counts
            .iter()
            .map(|((profile, state, scope), runners)| RunnerCount {
                profile: profile.clone(),
                state: *state,
                scope: scope.clone(),
                runners: *runners,
            })
            .collect();
        // In a stable order: the plan must not depend on a hash map's.
        counts
            .sort_by(|a, b| (&a.profile, a.state, &a.scope).cmp(&(&b.profile, b.state, &b.scope)));
        counts
    }

    /// When the job at `place` (0 = the oldest) of a queue was first seen.
    pub fn queued_since(
        &self,
        profile: &str,
        scope: &RunnerScope,
        place: usize,
    ) -> Option<DateTime<Utc>> {
        let queue = self.queues.get(&(profile.to_owned(), scope.clone()))?;
        // From the nearer end: a pass places new runners at the back.
        if place < queue.len() / 2 {
            queue.iter().nth(place)
        } else {
            queue.iter().rev().nth(queue.len().checked_sub(place + 1)?)
        }
        .map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn org() -> RunnerScope {
        RunnerScope::Org("octo-org".into())
    }

    fn job(id: i64, queued: bool, seen: i64) -> JobRow {
        JobRow {
            id,
            queued,
            profile: Some("kani".into()),
            scope: org(),
            first_seen_at: at(seen),
        }
    }

    fn runner(name: &str, state: RunnerState) -> RunnerRow {
        RunnerRow {
            name: name.into(),
            profile: "kani".into(),
            state,
            scope: Some(org()),
        }
    }

    #[test]
    fn a_job_leaves_its_queue_when_it_starts_and_the_oldest_moves_on() {
        let mut ledger = OpenLedger::default();
        ledger.reset(
            "c",
            10,
            at(0),
            vec![job(1, true, 1), job(2, true, 2), job(3, true, 3)],
            vec![],
        );
        assert_eq!(ledger.demand()["kani"].queued[&org()].jobs, 3);
        ledger.apply(11, vec![job(1, false, 1)], vec![]);
        let q = ledger.demand()["kani"].queued[&org()];
        assert_eq!((q.jobs, q.oldest), (2, at(2)));
        // Read again in the next delta (its writer was still running):
        // nothing counts twice.
        ledger.apply(12, vec![job(1, false, 1), job(3, true, 3)], vec![]);
        assert_eq!(ledger.demand()["kani"].queued[&org()].jobs, 2);
        ledger.apply(13, vec![job(2, false, 2), job(3, false, 3)], vec![]);
        assert!(ledger.demand().is_empty());
    }

    #[test]
    fn unmatched_jobs_wait_outside_the_queues_until_they_get_a_profile() {
        let mut ledger = OpenLedger::default();
        let mut unmatched = job(7, true, 7);
        unmatched.profile = None;
        ledger.reset("c", 1, at(0), vec![unmatched], vec![]);
        assert!(ledger.demand().is_empty());
        ledger.apply(2, vec![job(7, true, 7)], vec![]);
        assert_eq!(ledger.demand()["kani"].queued[&org()].jobs, 1);
    }

    #[test]
    fn runners_are_counted_while_live_and_dropped_when_they_end() {
        let mut ledger = OpenLedger::default();
        ledger.reset(
            "c",
            1,
            at(0),
            vec![],
            vec![
                runner("a", RunnerState::Requested),
                runner("b", RunnerState::Idle),
            ],
        );
        ledger.apply(
            2,
            vec![],
            vec![
                runner("a", RunnerState::Booting),
                runner("b", RunnerState::Terminated),
            ],
        );
        let counts = ledger.runner_counts();
        assert_eq!(counts.len(), 1);
        assert_eq!(
            (counts[0].state, counts[0].runners),
            (RunnerState::Booting, 1)
        );
        // Read again (its writer was still running at the last horizon),
        // and an ended runner read again: nothing counts twice.
        let again = vec![
            runner("a", RunnerState::Booting),
            runner("b", RunnerState::Terminated),
        ];
        ledger.apply(3, vec![], again);
        ledger.apply(4, vec![], vec![runner("c", RunnerState::Booting)]);
        let counts = ledger.runner_counts();
        assert_eq!((counts.len(), counts[0].runners), (1, 2));
        let moved = vec![
            runner("a", RunnerState::Done),
            runner("c", RunnerState::Orphaned),
        ];
        ledger.apply(5, vec![], moved);
        let counts = ledger.runner_counts();
        assert_eq!(counts.len(), 1);
        assert_eq!((counts[0].state, counts[0].runners), (RunnerState::Done, 1));
    }

    #[test]
    fn a_place_in_the_queue_names_when_that_job_arrived_from_either_end() {
        let mut ledger = OpenLedger::default();
        let jobs = (0..10).map(|i| job(100 - i, true, i)).collect();
        ledger.reset("c", 1, at(0), jobs, vec![]);
        for place in 0..10 {
            assert_eq!(
                ledger.queued_since("kani", &org(), place),
                Some(at(place as i64))
            );
        }
        assert_eq!(ledger.queued_since("kani", &org(), 10), None);
        assert_eq!(ledger.queued_since("other", &org(), 0), None);
    }

    #[test]
    fn reads_in_full_at_first_for_another_controller_and_every_so_often() {
        let every = chrono::Duration::seconds(60);
        let mut ledger = OpenLedger::default();
        assert!(matches!(ledger.next_read("c", at(0), every), Read::Full));
        ledger.reset("c", 5, at(0), vec![], vec![]);
        assert!(matches!(
            ledger.next_read("c", at(59), every),
            Read::Since(5)
        ));
        assert!(matches!(ledger.next_read("d", at(1), every), Read::Full));
        assert!(matches!(ledger.next_read("c", at(60), every), Read::Full));
    }
}
