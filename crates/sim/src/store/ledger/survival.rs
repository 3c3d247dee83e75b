//! The spot-survival statements of the in-memory ledger, one per query in
//! `spot-runners-store`'s `survival.rs`: interruptions, workflow runs,
//! re-run tracking and the facts the market choice reads.

use chrono::{DateTime, Utc};
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::store::{
    DeliveryOutcome, JobSurvival, MarketFn, MarketQuery, MarketSnapshot, RerunOutcome,
    RunAwaitingRerun,
};
use spot_runners_domain::survival::{Interruption, QueuedJobFacts, RunJob};
use spot_runners_domain::{JobStatus, Market, RunnerState};

use super::{Job, Ledger};

/// Completed jobs of the same repository + workflow + name the market
/// choice looks back on (the SQL's `LIMIT 20`).
const HISTORY_RUNS: usize = 20;

/// A `workflow_runs` row.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub run_attempt: i32,
    pub status: String,
    pub conclusion: Option<String>,
    pub completed_at: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
}

/// The interruption and re-run columns of a `workflow_jobs` row.
#[derive(Clone, Debug, Default)]
pub(crate) struct JobSurvivalColumns {
    pub interruption: Option<Interruption>,
    pub rerun_of: Option<i64>,
    pub rerun_count: i32,
    pub rerun_state: Option<&'static str>,
    pub rerun_reason: Option<String>,
    pub rerun_attempts: i32,
    pub rerun_next_at: Option<DateTime<Utc>>,
    pub rerun_requested_at: Option<DateTime<Utc>>,
}

/// A run's earliest due re-run, with `min(repository)` and `min(profile)`
/// of its pending jobs, as the SQL's `GROUP BY`.
type RunDue = (Option<DateTime<Utc>>, String, Option<String>);

impl Ledger {
    /// A run's status only moves forward within an attempt, and a later
    /// attempt replaces an earlier one (`upsert_run`).
    fn upsert_run(
        &mut self,
        run: &WorkflowRunEvent,
        checked_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let completed_at = (run.status == "completed").then_some(now);
        let Some(r) = self.runs.get_mut(&run.run_id) else {
            self.runs.insert(
                run.run_id,
                Run {
                    run_attempt: run.run_attempt,
                    status: run.status.clone(),
                    conclusion: run.conclusion.clone(),
                    completed_at,
                    checked_at,
                },
            );
            return;
        };
        use std::cmp::Ordering::*;
        match run.run_attempt.cmp(&r.run_attempt) {
            Greater => {
                r.status = run.status.clone();
                r.completed_at = completed_at;
            }
            Less => {}
            Equal => {
                if r.status != "completed" {
                    r.status = run.status.clone();
                }
                r.completed_at = r.completed_at.or(completed_at);
            }
        }
        if run.run_attempt >= r.run_attempt {
            r.conclusion = run.conclusion.clone().or(r.conclusion.take());
        }
        r.run_attempt = r.run_attempt.max(run.run_attempt);
        r.checked_at = checked_at.or(r.checked_at);
    }

    pub(crate) fn record_workflow_run(
        &mut self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
        now: DateTime<Utc>,
    ) -> DeliveryOutcome {
        if self.deliveries.contains_key(delivery_id) {
            return DeliveryOutcome::Duplicate;
        }
        self.deliveries.insert(delivery_id.to_owned(), now);
        self.upsert_run(run, None, now);
        DeliveryOutcome::Accepted
    }

    pub(crate) fn record_run_check(
        &mut self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        self.upsert_run(run, Some(at), now);
    }

    /// The repository is the SQL row's; the in-memory row needs none (the
    /// jobs carry it).
    pub(crate) fn mark_run_checked(&mut self, run_id: i64, at: DateTime<Utc>) {
        self.runs
            .entry(run_id)
            .and_modify(|r| r.checked_at = Some(at))
            .or_insert_with(|| Run {
                run_attempt: 1,
                status: "unknown".into(),
                conclusion: None,
                completed_at: None,
                checked_at: Some(at),
            });
    }

    pub(crate) fn record_interruption(&mut self, i: &Interruption) -> bool {
        let Some(job) = self.jobs.get_mut(&i.job_id) else {
            return false;
        };
        let s = &mut job.survival;
        if s.interruption.is_some() {
            return false;
        }
        s.interruption = Some(i.clone());
        s.rerun_state = Some("pending");
        s.rerun_next_at = Some(i.at);
        s.rerun_attempts = 0;
        s.rerun_reason =
            Some("interrupted by a spot reclaim; re-run once its workflow run completes".into());
        true
    }

    pub(crate) fn job_of_runner(&self, runner_name: &str) -> Option<i64> {
        self.jobs
            .values()
            .rev()
            .find(|j| j.runner_name.as_deref() == Some(runner_name))
            .map(|j| j.id)
    }

    /// A job of a later attempt re-runs the latest earlier attempt of the
    /// same run and name that was interrupted (`link_reruns`).
    pub(crate) fn link_reruns(&mut self) -> u64 {
        let mut pairs: Vec<(i64, i64, i32)> = Vec::new();
        for n in self.jobs.values().filter(|n| n.survival.rerun_of.is_none()) {
            let old = self
                .jobs
                .values()
                .filter(|p| {
                    p.run_id == n.run_id
                        && p.name == n.name
                        && p.run_attempt < n.run_attempt
                        && p.survival.interruption.is_some()
                })
                .max_by_key(|p| (p.run_attempt, std::cmp::Reverse(p.id)));
            if let Some(p) = old {
                pairs.push((n.id, p.id, p.survival.rerun_count));
            }
        }
        let mut linked = std::collections::BTreeSet::new();
        for (new_id, old_id, old_count) in pairs {
            if let Some(n) = self.jobs.get_mut(&new_id) {
                n.survival.rerun_of = Some(old_id);
                n.survival.rerun_count = old_count + 1;
                linked.insert(old_id);
            }
        }
        let mut changed = 0;
        for old_id in linked {
            let first_rerun = self
                .jobs
                .values()
                .filter(|n| n.survival.rerun_of == Some(old_id))
                .map(|n| n.id)
                .min();
            let Some(p) = self.jobs.get_mut(&old_id) else {
                continue;
            };
            if matches!(p.survival.rerun_state, Some("pending" | "requested")) {
                p.survival.rerun_state = Some("rerun");
                p.survival.rerun_reason = first_rerun.map(|id| format!("re-run as job {id}"));
                changed += 1;
            }
        }
        changed
    }

    pub(crate) fn runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Vec<RunAwaitingRerun> {
        let mut runs: std::collections::BTreeMap<i64, RunDue> = std::collections::BTreeMap::new();
        for j in self.jobs.values() {
            let s = &j.survival;
            if s.rerun_state != Some("pending") || s.rerun_next_at.is_some_and(|t| t > now) {
                continue;
            }
            let e = runs.entry(j.run_id).or_insert((
                s.rerun_next_at,
                j.repository.clone(),
                j.profile.clone(),
            ));
            // `min(rerun_next_at)` ignores NULLs; NULLS FIRST only when all are.
            e.0 = match (e.0, s.rerun_next_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            e.1 = e.1.clone().min(j.repository.clone());
            e.2 = match (e.2.take(), j.profile.clone()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let mut out: Vec<(Option<DateTime<Utc>>, RunAwaitingRerun)> = runs
            .into_iter()
            .map(|(run_id, (next, repository, profile))| {
                let run = self.runs.get(&run_id);
                (
                    next,
                    RunAwaitingRerun {
                        run_id,
                        repository,
                        profile,
                        status: run.map(|r| r.status.clone()),
                        checked_at: run.and_then(|r| r.checked_at),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |x: &Option<DateTime<Utc>>| (x.is_some(), *x);
            key(&a.0).cmp(&key(&b.0)).then(a.1.run_id.cmp(&b.1.run_id))
        });
        out.into_iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|(_, r)| r)
            .collect()
    }

    /// The latest attempt's job of each name in the run.
    pub(crate) fn run_jobs(&self, run_id: i64) -> Vec<RunJob> {
        let mut latest: std::collections::BTreeMap<&str, &Job> = std::collections::BTreeMap::new();
        for j in self.jobs.values().filter(|j| j.run_id == run_id) {
            let e = latest.entry(j.name.as_str()).or_insert(j);
            if (j.run_attempt, j.id) > (e.run_attempt, e.id) {
                *e = j;
            }
        }
        let mut jobs: Vec<RunJob> = latest
            .values()
            .map(|j| {
                let lineage = self
                    .jobs
                    .values()
                    .filter(|p| {
                        p.run_id == j.run_id
                            && p.name == j.name
                            && p.run_attempt < j.run_attempt
                            && matches!(p.survival.rerun_state, Some("requested" | "rerun"))
                    })
                    .count();
                RunJob {
                    job_id: j.id,
                    name: j.name.clone(),
                    conclusion: j.conclusion.clone(),
                    pending_rerun: j.survival.rerun_state == Some("pending"),
                    lineage_reruns: u32::try_from(lineage).unwrap_or(0),
                }
            })
            .collect();
        jobs.sort_by_key(|j| j.job_id);
        jobs
    }

    pub(crate) fn set_rerun_outcome(
        &mut self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) {
        let (state, reason, next): (&'static str, String, Option<DateTime<Utc>>) = match outcome {
            RerunOutcome::Requested => ("requested", "re-run requested from GitHub".into(), None),
            RerunOutcome::RetryAt { at, reason } => ("pending", reason.clone(), Some(*at)),
            RerunOutcome::Lost { reason } => ("lost", reason.clone(), None),
            RerunOutcome::NotNeeded { reason } => ("not_needed", reason.clone(), None),
            RerunOutcome::Waiting { reason } => ("pending", reason.clone(), Some(at)),
        };
        let counts = matches!(
            outcome,
            RerunOutcome::Requested | RerunOutcome::RetryAt { .. }
        );
        let mut runs = Vec::new();
        for id in job_ids {
            let Some(j) = self.jobs.get_mut(id) else {
                continue;
            };
            let s = &mut j.survival;
            if s.rerun_state != Some("pending") {
                continue;
            }
            s.rerun_state = Some(state);
            s.rerun_reason = Some(reason.clone());
            s.rerun_next_at = next;
            s.rerun_attempts += i32::from(counts);
            if state == "requested" {
                s.rerun_requested_at = Some(at);
            }
            runs.push(j.run_id);
        }
        if *outcome == RerunOutcome::Requested {
            // A new attempt starts: the run is no longer completed.
            for id in runs {
                if let Some(r) = self.runs.get_mut(&id) {
                    r.run_attempt += 1;
                    r.status = "in_progress".into();
                    r.conclusion = None;
                    r.completed_at = None;
                }
            }
        }
    }

    pub(crate) fn rerun_attempts(&self, job_id: i64) -> i32 {
        self.jobs
            .get(&job_id)
            .map_or(0, |j| j.survival.rerun_attempts)
    }

    pub(crate) fn job_survival(&self, job_id: i64) -> Option<JobSurvival> {
        let j = self.jobs.get(&job_id)?;
        let s = &j.survival;
        let i = s.interruption.as_ref();
        let runner = j.runner_name.as_ref().and_then(|n| self.runners.get(n));
        Some(JobSurvival {
            interrupted_at: i.map(|i| i.at),
            interrupted_runner: i.map(|i| i.runner_name.clone()),
            interrupted_instance_type: i.and_then(|i| i.instance_type.clone()),
            interrupted_subnet_id: i.and_then(|i| i.subnet_id.clone()),
            interrupted_az: i.and_then(|i| i.availability_zone.clone()),
            interrupted_market: i.and_then(|i| i.market).map(|m| m.as_str().to_owned()),
            interrupted_after_secs: i.map(|i| i32::try_from(i.ran_secs).unwrap_or(i32::MAX)),
            rerun_of: s.rerun_of,
            rerun_count: s.rerun_count,
            rerun_state: s.rerun_state.map(str::to_owned),
            rerun_reason: s.rerun_reason.clone(),
            rerun_attempts: s.rerun_attempts,
            rerun_next_at: s.rerun_next_at,
            runner_market: runner.and_then(|r| r.record.market.clone()),
            runner_market_reason: runner.and_then(|r| r.market_reason.clone()),
        })
    }

    /// When each interrupted runner of the controller ended, since `since`.
    pub(crate) fn interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Vec<(String, DateTime<Utc>)> {
        self.runners
            .values()
            .filter(|r| {
                r.controller_id == controller_id && r.record.state == RunnerState::Interrupted
            })
            .map(|r| {
                (
                    r.record.profile.clone(),
                    r.ended_at.unwrap_or(r.record.updated_at),
                )
            })
            .filter(|(_, at)| *at > since)
            .collect()
    }

    /// Reads the profile's market facts, decides, and records the decision
    /// on the runner row — all under the ledger's one lock, which stands
    /// for PostgreSQL's per-profile advisory lock (taken there only when
    /// the decision asks for the on-demand count).
    pub(crate) fn choose_runner_market(
        &mut self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: &MarketFn,
        now: DateTime<Utc>,
    ) -> (Market, String) {
        let mut queued: Vec<&Job> = self
            .open
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.status == JobStatus::Queued && j.profile.as_deref() == Some(profile))
            .filter(|j| query.with_durations || j.run_attempt > 1)
            .collect();
        queued.sort_by_key(|j| (j.first_seen_at, j.id));
        let queued: Vec<QueuedJobFacts> = queued
            .into_iter()
            .map(|j| QueuedJobFacts {
                job_id: j.id,
                rerun_of_interrupted: self.jobs.values().any(|p| {
                    p.run_id == j.run_id
                        && p.name == j.name
                        && p.run_attempt < j.run_attempt
                        && p.survival.interruption.is_some()
                }),
                history_minutes: if query.with_durations {
                    self.history_minutes(j)
                } else {
                    Vec::new()
                },
            })
            .collect();
        let interruptions = self
            .interruptions_since(controller_id, query.interruptions_since)
            .into_iter()
            .filter(|(p, _)| p == profile)
            .map(|(_, at)| at)
            .collect();
        // As the database store: the on-demand runners are counted only
        // when the decision asks for them.
        let mut snapshot = MarketSnapshot {
            queued,
            on_demand_available: None,
            interruptions,
        };
        let (market, reason) = match decide(&snapshot) {
            Some(choice) => choice,
            None => {
                snapshot.on_demand_available = Some(
                    self.live
                        .iter()
                        .filter_map(|n| self.runners.get(n))
                        .filter(|r| {
                            r.controller_id == controller_id
                                && r.record.profile == profile
                                && r.record.name != runner_name
                                && r.record.market.as_deref() == Some(Market::OnDemand.as_str())
                                && matches!(
                                    r.record.state,
                                    RunnerState::Requested
                                        | RunnerState::Registered
                                        | RunnerState::Launching
                                        | RunnerState::Booting
                                        | RunnerState::Idle
                                )
                        })
                        .count(),
                );
                decide(&snapshot).expect("a market decision with the on-demand count answers")
            }
        };
        if let Some(r) = self.runners.get_mut(runner_name) {
            r.record.market = Some(market.as_str().to_owned());
            r.market_reason = Some(reason.clone());
            r.record.updated_at = now;
        }
        (market, reason)
    }

    /// Minutes the last completed, uninterrupted runs of the same
    /// repository + workflow + job name took, newest first.
    fn history_minutes(&self, job: &Job) -> Vec<f64> {
        let mut done: Vec<(DateTime<Utc>, f64)> = self
            .jobs
            .values()
            .filter(|h| {
                h.id != job.id
                    && h.repository == job.repository
                    && h.workflow_name == job.workflow_name
                    && h.name == job.name
                    && h.status == JobStatus::Completed
                    && h.survival.interruption.is_none()
            })
            .filter_map(|h| {
                let (start, end) = (h.in_progress_at?, h.completed_at?);
                Some((end, (end - start).num_milliseconds() as f64 / 60_000.0))
            })
            .collect();
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        done.into_iter()
            .take(HISTORY_RUNS)
            .map(|(_, m)| m)
            .collect()
    }
}
