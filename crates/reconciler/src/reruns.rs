//! The re-run worker: re-runs the jobs a spot reclaim interrupted, once
//! their workflow run has completed.
//!
//! It learns that a run completed from the `workflow_run` webhook (recorded
//! by the webhook handler) and, so a lost delivery never loses a re-run, by
//! asking GitHub for runs with an interrupted job — a few per pass, each at
//! most every [`CHECK_EVERY`]. Only the sweep leader runs it, so two
//! replicas never ask GitHub to re-run the same job.
//!
//! The reconciler's own hooks into spot survival (attribution, market
//! choice) are in [`crate::survival`]. The worker lives beside the
//! reconciler so that `serve` and `simulate` run the same code: it reads
//! time from the injected [`Clock`] and paces itself with tokio's timer, so
//! the simulator's paused runtime drives it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::api_budget::Spending;
use spot_runners_domain::clock::Clock;
use spot_runners_domain::ports::GitHub;
use spot_runners_domain::store::{
    JobSurvival, RerunOutcome, RunAwaitingRerun, RunnerRecord, Store, StoreError,
};
use spot_runners_domain::survival::{
    breaker_state, judge_failure, plan_reruns, Interruption, Verdict,
};
use spot_runners_domain::{JobStatus, Market, Profile, RunnerState};
use tokio_util::sync::CancellationToken;

use crate::retry::lock;
use crate::survival::breaker_horizon;
use crate::{MetricsSink, ProfileCache};

/// Runs looked at per pass.
const RUNS_PER_PASS: i64 = 50;
/// GitHub is asked about at most this many runs per pass…
const CHECKS_PER_PASS: usize = 10;
/// …and about one run at most this often.
const CHECK_EVERY: chrono::Duration = chrono::Duration::seconds(30);

/// Runners a spot reclaim ended are looked at this long for a job GitHub
/// names only later (see [`RerunWorker::attribute_late`]).
const LATE_ATTRIBUTION: Duration = Duration::from_secs(3600);

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RerunReport {
    /// Re-runs linked to the interrupted job they re-run.
    pub linked: u64,
    /// Interrupted jobs learned after their runner had ended.
    pub attributed_late: usize,
    /// Runs GitHub was asked about.
    pub checked: usize,
    /// Jobs whose re-run GitHub accepted.
    pub requested: usize,
    pub retried: usize,
    pub lost: usize,
    /// Interrupted jobs GitHub reports finished well: nothing to re-run.
    pub not_needed: usize,
}

pub struct RerunWorker {
    store: Arc<dyn Store>,
    github: Arc<dyn GitHub>,
    profiles: ProfileCache,
    metrics: Arc<dyn MetricsSink>,
    controller_id: String,
    clock: Arc<dyn Clock>,
    /// Each profile's breaker as last reported, so a change is logged once.
    breakers: Mutex<BTreeMap<String, bool>>,
}

impl RerunWorker {
    pub fn new(
        store: Arc<dyn Store>,
        github: Arc<dyn GitHub>,
        profiles: ProfileCache,
        metrics: Arc<dyn MetricsSink>,
        controller_id: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            github,
            profiles,
            metrics,
            controller_id,
            clock,
            breakers: Mutex::default(),
        }
    }

    /// Passes every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "re-run pass failed; trying again next time");
            }
            // Biased, as the reconciler's loops: the simulator replays a run
            // only if nothing picks a branch at random.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass; `None` when another replica leads.
    pub async fn pass(&self) -> Result<Option<RerunReport>, StoreError> {
        if !self.store.try_lead(&self.controller_id).await? {
            return Ok(None);
        }
        let now = self.clock.now();
        let attributed_late = self.attribute_late().await?;
        let mut report = RerunReport {
            linked: self.store.link_reruns().await?,
            attributed_late,
            ..RerunReport::default()
        };
        self.refresh_breakers(now).await?;
        for run in self.store.runs_awaiting_reruns(now, RUNS_PER_PASS).await? {
            let completed = run.completed() || self.ask_github(&run, now, &mut report).await?;
            if completed {
                self.rerun(&run, now, &mut report).await?;
            }
        }
        Ok(Some(report))
    }

    /// A runner whose instance a spot reclaim took while the ledger had it
    /// idle (its `in_progress` delivery lost or not yet in) interrupted no
    /// job as far as the sweep knew. When GitHub later names it in the
    /// job's failed `completed` (or a stale check does), that job was
    /// interrupted all the same: it is marked now, so its re-run is not
    /// lost with the delivery. Marking is idempotent.
    async fn attribute_late(&self) -> Result<usize, StoreError> {
        let runners = self
            .store
            .runners(&self.controller_id, LATE_ATTRIBUTION)
            .await?;
        let mut marked = 0;
        for r in runners
            .iter()
            .filter(|r| r.state == RunnerState::Interrupted)
        {
            let Some(interruption) = self.late_interruption(r).await? else {
                continue;
            };
            if self.store.record_interruption(&interruption).await? {
                marked += 1;
                self.metrics.interrupted(&r.profile);
                tracing::warn!(
                    job_id = interruption.job_id, runner = %r.name, profile = %r.profile,
                    "spot reclaim interrupted a job GitHub named after its runner had ended; it is re-run once its workflow run completes"
                );
            }
        }
        Ok(marked)
    }

    async fn late_interruption(
        &self,
        r: &RunnerRecord,
    ) -> Result<Option<Interruption>, StoreError> {
        let job_id = match r.job_id {
            Some(id) => id,
            None => match self.store.job_of_runner(&r.name).await? {
                Some(id) => id,
                None => return Ok(None),
            },
        };
        let Some(job) = self.store.job(job_id).await? else {
            return Ok(None);
        };
        let finished_well = matches!(
            job.conclusion.as_deref(),
            Some("success" | "skipped" | "neutral")
        );
        if job.status != JobStatus::Completed || finished_well {
            return Ok(None);
        }
        let ran_secs = job
            .in_progress_at
            .map(|t| {
                (r.updated_at - t)
                    .num_seconds()
                    .clamp(0, i64::from(u32::MAX)) as u32
            })
            .unwrap_or(0);
        Ok(Some(Interruption {
            job_id,
            runner_name: r.name.clone(),
            instance_type: r.instance_type.clone(),
            subnet_id: r.subnet_id.clone(),
            // The sweep that ended the runner saw the instance, this pass
            // does not; the ledger keeps no AZ per runner.
            availability_zone: None,
            market: r.market.as_deref().and_then(|m| Market::parse(m).ok()),
            ran_secs,
            at: r.updated_at,
        }))
    }

    /// Asks GitHub whether the run completed, within the pass's budget.
    async fn ask_github(
        &self,
        run: &RunAwaitingRerun,
        now: DateTime<Utc>,
        report: &mut RerunReport,
    ) -> Result<bool, StoreError> {
        let due = run.checked_at.is_none_or(|t| now - t >= CHECK_EVERY);
        if !due || report.checked >= CHECKS_PER_PASS {
            return Ok(false);
        }
        // On a tight budget the run's `completed` webhook is waited for.
        if !Spending::of(self.github.rate_limit(), now).asks_about_runs() {
            return Ok(false);
        }
        report.checked += 1;
        match self.github.workflow_run(&run.repository, run.run_id).await {
            Ok(answer) => {
                self.store.record_run_check(&answer, now).await?;
                Ok(answer.is_completed())
            }
            Err(e) => {
                tracing::info!(run_id = run.run_id, repository = %run.repository, error = %e, "could not ask GitHub about a workflow run");
                self.store
                    .mark_run_checked(run.run_id, &run.repository, now)
                    .await?;
                Ok(false)
            }
        }
    }

    async fn rerun(
        &self,
        run: &RunAwaitingRerun,
        now: DateTime<Utc>,
        report: &mut RerunReport,
    ) -> Result<(), StoreError> {
        let profile_name = run.profile.clone().unwrap_or_default();
        let set = self.profiles.get();
        let policy = set
            .profiles
            .iter()
            .find(|p| p.name.as_str() == profile_name)
            .map(|p| p.survival.clone())
            .unwrap_or_default();
        let mut jobs = self.store.run_jobs(run.run_id).await?;
        // The ledger may not know yet how an interrupted job ended (its
        // `completed` late or lost): GitHub does, once the run completed.
        for j in jobs
            .iter_mut()
            .filter(|j| j.pending_rerun && j.conclusion.is_none())
        {
            match self.github.job(&run.repository, j.job_id).await {
                Ok(answer) => j.conclusion = answer.conclusion,
                Err(e) => {
                    tracing::info!(job_id = j.job_id, error = %e, "could not ask GitHub how an interrupted job ended");
                }
            }
        }
        // Marked interrupted while the ledger had not yet heard that the
        // job had finished well (its `completed` late or lost): the reclaim
        // came after the job, there is nothing to re-run and nothing lost.
        let finished: Vec<i64> = jobs
            .iter()
            .filter(|j| {
                j.pending_rerun
                    && matches!(
                        j.conclusion.as_deref(),
                        Some("success" | "skipped" | "neutral")
                    )
            })
            .map(|j| j.job_id)
            .collect();
        if !finished.is_empty() {
            let reason =
                "not needed: GitHub reports the job finished well (the reclaim came after it, or another runner ran it)"
                    .to_owned();
            tracing::info!(jobs = ?finished, profile = %profile_name, "interrupted jobs turned out to have finished; no re-run");
            // Terminal, and not a loss: neither jobs_lost_total nor the
            // JobLost alert hears of it.
            self.store
                .set_rerun_outcome(&finished, &RerunOutcome::NotNeeded { reason }, now)
                .await?;
            self.count(&profile_name, "not_needed", finished.len());
            report.not_needed += finished.len();
            jobs.retain(|j| !finished.contains(&j.job_id));
        }
        let plan = plan_reruns(&policy, &jobs);
        for (job_id, reason) in &plan.lost {
            self.lose(&profile_name, &[*job_id], reason.clone(), now, report)
                .await?;
        }
        if !plan.later.is_empty() {
            let reason = "waiting: GitHub re-runs one job per attempt, and this run has a job that failed on its own; re-run once the current attempt completes".to_owned();
            self.store
                .set_rerun_outcome(&plan.later, &RerunOutcome::Waiting { reason }, now)
                .await?;
            self.count(&profile_name, "waiting", plan.later.len());
        }
        let (ids, result) = if !plan.rerun_failed.is_empty() {
            let r = self
                .github
                .rerun_failed_jobs(&run.repository, run.run_id)
                .await;
            (plan.rerun_failed.clone(), r)
        } else if let Some(job) = plan.rerun_job {
            (vec![job], self.github.rerun_job(&run.repository, job).await)
        } else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                tracing::info!(run_id = run.run_id, repository = %run.repository, jobs = ?ids, profile = %profile_name, "re-run of interrupted jobs requested");
                self.store
                    .set_rerun_outcome(&ids, &RerunOutcome::Requested, now)
                    .await?;
                self.count(&profile_name, "requested", ids.len());
                report.requested += ids.len();
            }
            Err(failure) => {
                let attempt = self.store.rerun_attempts(ids[0]).await?;
                let attempt = u32::try_from(attempt).unwrap_or(0) + 1;
                match judge_failure(&failure, attempt) {
                    Verdict::RetryIn(wait, reason) => {
                        tracing::info!(run_id = run.run_id, jobs = ?ids, %reason, ?wait, "re-run refused for now; will retry");
                        let at = now
                            + chrono::Duration::from_std(wait)
                                .unwrap_or(chrono::Duration::seconds(60));
                        self.store
                            .set_rerun_outcome(&ids, &RerunOutcome::RetryAt { at, reason }, now)
                            .await?;
                        self.count(&profile_name, "retry", ids.len());
                        report.retried += ids.len();
                    }
                    Verdict::GiveUp(reason) => {
                        self.lose(&profile_name, &ids, reason, now, report).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn lose(
        &self,
        profile: &str,
        ids: &[i64],
        reason: String,
        now: DateTime<Utc>,
        report: &mut RerunReport,
    ) -> Result<(), StoreError> {
        tracing::warn!(jobs = ?ids, %profile, %reason, "interrupted job lost: not re-run");
        self.store
            .set_rerun_outcome(ids, &RerunOutcome::Lost { reason }, now)
            .await?;
        self.count(profile, "lost", ids.len());
        self.metrics.jobs_lost(profile, ids.len() as u64);
        report.lost += ids.len();
        Ok(())
    }

    fn count(&self, profile: &str, outcome: &str, n: usize) {
        self.metrics.reruns(profile, outcome, n as u64);
    }

    /// The breaker gauge, with a log line when a breaker opens or closes.
    async fn refresh_breakers(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let set = self.profiles.get();
        let horizon = set
            .profiles
            .iter()
            .map(breaker_horizon)
            .max()
            .unwrap_or_default();
        let times = self
            .store
            .interruptions_since(&self.controller_id, now - horizon)
            .await?;
        for p in &set.profiles {
            let mine: Vec<DateTime<Utc>> = times
                .iter()
                .filter(|(name, _)| name == p.name.as_str())
                .map(|(_, t)| *t)
                .collect();
            let state = breaker_state(&p.survival, &mine, now);
            let open = state.is_open();
            let was = lock(&self.breakers).insert(p.name.as_str().to_owned(), open);
            if was.unwrap_or(false) != open {
                tracing::warn!(profile = %p.name, state = %state.describe(&p.survival), "spot breaker changed");
            }
            self.metrics.spot_breaker(p.name.as_str(), open);
        }
        Ok(())
    }
}

// ------------------------------------------------------ jobs explain --

/// The spot-survival lines of `jobs explain`: the interruption, the
/// re-run and why it is where it is, the market of the runner that took
/// the job, and the profile's breaker.
pub async fn explain_job_survival(
    store: &dyn Store,
    controller_id: &str,
    job_id: i64,
    profile: Option<&str>,
    profiles: &[Profile],
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let survival = store.job_survival(job_id).await?.unwrap_or_default();
    let profile = profile.and_then(|name| profiles.iter().find(|p| p.name.as_str() == name));
    let breaker = match profile {
        Some(p) => {
            let times: Vec<DateTime<Utc>> = store
                .interruptions_since(controller_id, now - breaker_horizon(p))
                .await?
                .into_iter()
                .filter(|(name, _)| name == p.name.as_str())
                .map(|(_, t)| t)
                .collect();
            Some(breaker_state(&p.survival, &times, now).describe(&p.survival))
        }
        None => None,
    };
    Ok(survival_lines(&survival, breaker.as_deref()))
}

/// The wording, pure.
pub fn survival_lines(s: &JobSurvival, breaker: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(at) = s.interrupted_at {
        let _ = writeln!(
            out,
            "interrupted by a spot reclaim at {} after {} s on {} ({} in {}, {}, runner {})",
            at.to_rfc3339(),
            s.interrupted_after_secs.unwrap_or(0),
            s.interrupted_market.as_deref().unwrap_or("?"),
            s.interrupted_instance_type.as_deref().unwrap_or("?"),
            s.interrupted_az.as_deref().unwrap_or("an unknown AZ"),
            s.interrupted_subnet_id
                .as_deref()
                .unwrap_or("the default subnet"),
            s.interrupted_runner.as_deref().unwrap_or("?"),
        );
    }
    if let Some(state) = &s.rerun_state {
        let _ = write!(out, "re-run: {state}");
        if let Some(reason) = &s.rerun_reason {
            let _ = write!(out, " — {reason}");
        }
        if state == "pending" {
            if let Some(next) = s.rerun_next_at {
                let _ = write!(out, " (next try {})", next.to_rfc3339());
            }
        }
        let _ = writeln!(out, " [{} request(s) so far]", s.rerun_attempts);
    }
    if let Some(of) = s.rerun_of {
        let _ = writeln!(
            out,
            "re-runs job {of} (re-run {} of its lineage)",
            s.rerun_count
        );
    }
    if let Some(market) = &s.runner_market {
        let _ = writeln!(
            out,
            "its runner ran on {market}: {}",
            s.runner_market_reason
                .as_deref()
                .unwrap_or("the profile's launch walk")
        );
    }
    if let Some(b) = breaker {
        let _ = writeln!(out, "{b}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn explain_says_what_happened_and_why() {
        let at = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        let s = JobSurvival {
            interrupted_at: Some(at),
            interrupted_runner: Some("spot-runners-kani-a1".into()),
            interrupted_instance_type: Some("c6i.4xlarge".into()),
            interrupted_subnet_id: Some("subnet-a".into()),
            interrupted_az: Some("us-east-1b".into()),
            interrupted_market: Some("spot".into()),
            interrupted_after_secs: Some(5400),
            rerun_state: Some("lost".into()),
            rerun_reason: Some("GitHub's limit of 50 re-runs per workflow run is reached".into()),
            rerun_attempts: 1,
            ..JobSurvival::default()
        };
        let text = survival_lines(&s, Some("spot breaker closed"));
        assert!(
            text.contains("after 5400 s on spot (c6i.4xlarge in us-east-1b, subnet-a"),
            "{text}"
        );
        assert!(
            text.contains("re-run: lost — GitHub's limit of 50"),
            "{text}"
        );
        assert!(text.contains("spot breaker closed"), "{text}");
        let rerun = JobSurvival {
            rerun_of: Some(7),
            rerun_count: 1,
            runner_market: Some("on-demand".into()),
            runner_market_reason: Some("job 8 re-runs a job a spot reclaim interrupted".into()),
            ..JobSurvival::default()
        };
        let text = survival_lines(&rerun, None);
        assert!(
            text.contains("re-runs job 7 (re-run 1 of its lineage)"),
            "{text}"
        );
        assert!(
            text.contains("its runner ran on on-demand: job 8 re-runs"),
            "{text}"
        );
        let not_needed = JobSurvival {
            rerun_state: Some("not_needed".into()),
            rerun_reason: Some("not needed: GitHub reports the job finished well".into()),
            ..JobSurvival::default()
        };
        assert!(survival_lines(&not_needed, None)
            .contains("re-run: not_needed — not needed: GitHub reports the job finished well"));
        assert_eq!(survival_lines(&JobSurvival::default(), None), "");
    }
}
