//! Which jobs of a completed workflow run are re-run, how, and what to do
//! when GitHub refuses.
//!
//! GitHub accepts a re-run only once the run has completed, and a re-run
//! starts a new attempt of the whole run: while it runs, no other job of
//! the run can be re-run. So when several jobs of one run were interrupted,
//! re-running them one by one (RunsOn #259) re-runs only the first.
//! `rerun-failed-jobs` re-runs all of them in one attempt — when every
//! failed job of the run is one we want re-run. When the run also has jobs
//! that failed on their own (and the operator did not opt in to re-running
//! those), the interrupted jobs are re-run one at a time, each once the
//! previous attempt completed.

use std::time::Duration;

use crate::profile::SurvivalPolicy;

/// Attempts at one re-run before it is given up as lost.
pub const MAX_RERUN_ATTEMPTS: u32 = 6;
/// First wait after a refusal worth retrying; doubles up to [`MAX_RETRY_WAIT`].
pub const FIRST_RETRY_WAIT: Duration = Duration::from_secs(60);
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(30 * 60);

/// A job of the run's latest attempt, as the ledger has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunJob {
    pub job_id: i64,
    pub name: String,
    pub conclusion: Option<String>,
    /// A spot reclaim killed it and its re-run is still due.
    pub pending_rerun: bool,
    /// Re-runs its lineage (earlier attempts of the same job) already had.
    pub lineage_reruns: u32,
}

/// What to ask GitHub for, for one completed run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RerunPlan {
    /// `POST …/runs/{run_id}/rerun-failed-jobs`, covering these jobs.
    pub rerun_failed: Vec<i64>,
    /// `POST …/jobs/{job_id}/rerun`, for this one job.
    pub rerun_job: Option<i64>,
    /// Interrupted jobs left for the next attempt's completion.
    pub later: Vec<i64>,
    /// Interrupted jobs not re-run, with why: they are lost.
    pub lost: Vec<(i64, String)>,
}

fn failed(conclusion: Option<&str>) -> bool {
    matches!(
        conclusion,
        Some("failure" | "cancelled" | "timed_out" | "startup_failure")
    )
}

/// The plan for a completed run's latest attempt.
pub fn plan_reruns(policy: &SurvivalPolicy, jobs: &[RunJob]) -> RerunPlan {
    let mut plan = RerunPlan::default();
    let mut due: Vec<&RunJob> = Vec::new();
    for j in jobs.iter().filter(|j| j.pending_rerun) {
        if j.lineage_reruns >= policy.max_interruption_reruns {
            plan.lost.push((
                j.job_id,
                format!(
                    "interrupted again after {} re-run(s); max_interruption_reruns = {}",
                    j.lineage_reruns, policy.max_interruption_reruns
                ),
            ));
        } else {
            due.push(j);
        }
    }
    if due.is_empty() {
        return plan;
    }
    let own_failures = jobs
        .iter()
        .filter(|j| !j.pending_rerun && failed(j.conclusion.as_deref()))
        .count();
    // Jobs lost to the limit failed too: rerun-failed-jobs would re-run them.
    if (own_failures == 0 || policy.rerun_own_failures) && plan.lost.is_empty() {
        plan.rerun_failed = due.iter().map(|j| j.job_id).collect();
    } else if let Some((first, rest)) = due.split_first() {
        plan.rerun_job = Some(first.job_id);
        plan.later = rest.iter().map(|j| j.job_id).collect();
    }
    plan
}

/// A failed re-run request, as the GitHub port reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RerunFailure {
    /// 403, 409 or 422 with GitHub's message.
    Rejected {
        status: u16,
        message: String,
    },
    RateLimited(Duration),
    Transient(String),
    NotFound,
    Refused(String),
}

/// What to do about a failed re-run request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    RetryIn(Duration, String),
    GiveUp(String),
}

fn backoff(attempt: u32) -> Duration {
    FIRST_RETRY_WAIT
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(MAX_RETRY_WAIT)
}

/// `attempt` counts this one (1 = the first request failed). Every path
/// ends: after [`MAX_RERUN_ATTEMPTS`], whatever GitHub said, it gives up.
pub fn judge_failure(failure: &RerunFailure, attempt: u32) -> Verdict {
    let retry = |wait: Duration, why: String| {
        if attempt >= MAX_RERUN_ATTEMPTS {
            Verdict::GiveUp(format!("{why}; gave up after {attempt} attempts"))
        } else {
            Verdict::RetryIn(wait, why)
        }
    };
    match failure {
        RerunFailure::RateLimited(wait) => retry(
            (*wait).max(Duration::from_secs(1)),
            "GitHub rate limit".into(),
        ),
        RerunFailure::Transient(e) => retry(backoff(attempt), format!("GitHub unavailable: {e}")),
        RerunFailure::NotFound => {
            Verdict::GiveUp("GitHub does not know the job or run (deleted?)".into())
        }
        RerunFailure::Refused(e) => Verdict::GiveUp(format!("GitHub refused: {e}")),
        RerunFailure::Rejected { status, message } => {
            let m = message.to_ascii_lowercase();
            if m.contains("maximum") || m.contains("50 times") || m.contains("re-run limit") {
                Verdict::GiveUp(format!(
                    "GitHub's limit of 50 re-runs per workflow run is reached ({status}: {message})"
                ))
            } else if m.contains("month") || m.contains("30 days") || m.contains("too old") {
                Verdict::GiveUp(format!(
                    "the run is older than GitHub's 30 days for re-runs ({status}: {message})"
                ))
            } else if m.contains("not accessible by integration") || m.contains("permission") {
                Verdict::GiveUp(format!(
                    "the GitHub App lacks the Actions: write permission ({status}: {message})"
                ))
            } else if m.contains("already running")
                || m.contains("in progress")
                || m.contains("not completed")
                || *status == 409
            {
                retry(
                    backoff(attempt),
                    format!("the workflow run is running again ({status}: {message})"),
                )
            } else {
                Verdict::GiveUp(format!("GitHub will not re-run it ({status}: {message})"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(id: i64, conclusion: &str, pending: bool, lineage: u32) -> RunJob {
        RunJob {
            job_id: id,
            name: format!("job {id}"),
            conclusion: Some(conclusion.into()),
            pending_rerun: pending,
            lineage_reruns: lineage,
        }
    }

    #[test]
    fn three_interrupted_matrix_jobs_are_all_rerun_in_one_attempt() {
        let jobs = [
            job(1, "failure", true, 0),
            job(2, "success", false, 0),
            job(3, "failure", true, 0),
            job(4, "cancelled", true, 0),
        ];
        let plan = plan_reruns(&SurvivalPolicy::default(), &jobs);
        assert_eq!(plan.rerun_failed, [1, 3, 4]);
        assert_eq!(plan.rerun_job, None);
        assert!(plan.later.is_empty() && plan.lost.is_empty());
    }

    #[test]
    fn a_job_that_failed_on_its_own_is_not_rerun() {
        let jobs = [
            job(1, "failure", true, 0),
            job(2, "failure", false, 0),
            job(3, "failure", true, 0),
        ];
        let plan = plan_reruns(&SurvivalPolicy::default(), &jobs);
        assert!(plan.rerun_failed.is_empty());
        assert_eq!(plan.rerun_job, Some(1));
        assert_eq!(plan.later, [3]);
        let opted_in = SurvivalPolicy {
            rerun_own_failures: true,
            ..SurvivalPolicy::default()
        };
        assert_eq!(plan_reruns(&opted_in, &jobs).rerun_failed, [1, 3]);
    }

    #[test]
    fn the_limit_is_per_lineage() {
        let p = SurvivalPolicy::default();
        let jobs = [job(1, "failure", true, 2), job(2, "failure", true, 1)];
        let plan = plan_reruns(&p, &jobs);
        assert_eq!(plan.lost.len(), 1);
        assert_eq!(plan.lost[0].0, 1);
        assert!(plan.lost[0].1.contains("max_interruption_reruns = 2"));
        // Job 1 failed and is not re-run: rerun-failed-jobs would re-run it.
        assert_eq!(plan.rerun_job, Some(2));
        let never = SurvivalPolicy {
            max_interruption_reruns: 0,
            ..p
        };
        let plan = plan_reruns(&never, &[job(5, "failure", true, 0)]);
        assert_eq!(plan.lost.len(), 1);
        assert_eq!(plan.rerun_job, None);
    }

    #[test]
    fn nothing_pending_nothing_to_do() {
        let jobs = [job(1, "failure", false, 0), job(2, "success", false, 0)];
        assert_eq!(
            plan_reruns(&SurvivalPolicy::default(), &jobs),
            RerunPlan::default()
        );
    }

    fn rejected(status: u16, message: &str) -> RerunFailure {
        RerunFailure::Rejected {
            status,
            message: message.into(),
        }
    }

    #[test]
    fn github_refusals() {
        let cases: Vec<(RerunFailure, bool, &str)> = vec![
            (
                rejected(403, "This workflow is already running"),
                true,
                "running again",
            ),
            (rejected(409, "Conflict"), true, "running again"),
            (
                rejected(
                    403,
                    "This workflow run has been re-run the maximum number of times",
                ),
                false,
                "limit of 50",
            ),
            (
                rejected(
                    403,
                    "Unable to retry this workflow run because it was created over a month ago",
                ),
                false,
                "30 days",
            ),
            (
                rejected(403, "Resource not accessible by integration"),
                false,
                "Actions: write",
            ),
            (
                rejected(403, "This workflow run cannot be retried"),
                false,
                "will not re-run",
            ),
            (rejected(422, "Validation Failed"), false, "will not re-run"),
            (RerunFailure::NotFound, false, "does not know"),
            (
                RerunFailure::Refused("401 Bad credentials".into()),
                false,
                "refused",
            ),
            (RerunFailure::Transient("502".into()), true, "unavailable"),
            (
                RerunFailure::RateLimited(Duration::from_secs(30)),
                true,
                "rate limit",
            ),
        ];
        for (failure, retried, reason) in cases {
            let v = judge_failure(&failure, 1);
            match &v {
                Verdict::RetryIn(_, why) => {
                    assert!(retried, "{failure:?} retried");
                    assert!(why.contains(reason), "{why}");
                }
                Verdict::GiveUp(why) => {
                    assert!(!retried, "{failure:?} given up");
                    assert!(why.contains(reason), "{why}");
                }
            }
        }
        assert_eq!(
            judge_failure(&RerunFailure::RateLimited(Duration::from_secs(30)), 1),
            Verdict::RetryIn(Duration::from_secs(30), "GitHub rate limit".into())
        );
    }

    proptest! {
        /// Never a loop: every failure is given up by the last attempt, and
        /// waits never shrink as attempts go on (rate limits aside).
        #[test]
        fn retries_end(status in prop::sample::select(vec![403u16, 409, 422]), transient in any::<bool>()) {
            let failure = if transient {
                RerunFailure::Transient("503".into())
            } else {
                rejected(status, "This workflow is already running")
            };
            let mut last = Duration::ZERO;
            for attempt in 1..MAX_RERUN_ATTEMPTS {
                if let Verdict::RetryIn(wait, _) = judge_failure(&failure, attempt) {
                    prop_assert!(wait >= last);
                    prop_assert!(wait <= MAX_RETRY_WAIT);
                    last = wait;
                }
            }
            prop_assert!(
                matches!(judge_failure(&failure, MAX_RERUN_ATTEMPTS), Verdict::GiveUp(_)),
                "the last attempt gives up"
            );
        }

        /// Every pending job is in exactly one part of the plan; no job that
        /// failed on its own is re-run unless opted in.
        #[test]
        fn plans_cover_every_interrupted_job(
            jobs in proptest::collection::vec((any::<bool>(), 0u32..4, any::<bool>()), 0..10),
            opt_in in any::<bool>(),
        ) {
            let jobs: Vec<RunJob> = jobs.iter().enumerate().map(|(i, (pending, lineage, ok))| {
                job(i as i64, if *ok { "success" } else { "failure" }, *pending, *lineage)
            }).collect();
            let policy = SurvivalPolicy { rerun_own_failures: opt_in, ..SurvivalPolicy::default() };
            let plan = plan_reruns(&policy, &jobs);
            for j in &jobs {
                let parts = usize::from(plan.rerun_failed.contains(&j.job_id))
                    + usize::from(plan.rerun_job == Some(j.job_id))
                    + usize::from(plan.later.contains(&j.job_id))
                    + usize::from(plan.lost.iter().any(|(id, _)| *id == j.job_id));
                prop_assert_eq!(parts, usize::from(j.pending_rerun));
            }
            let own_failure = jobs.iter().any(|j| !j.pending_rerun && j.conclusion.as_deref() == Some("failure"));
            if own_failure && !opt_in {
                prop_assert!(plan.rerun_failed.is_empty());
            }
        }
    }
}
