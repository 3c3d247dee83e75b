//! The jobs side of a sweep: stale queued jobs asked about, lost queued
//! jobs found by polling.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::api_budget::{self, Spending};
use spot_runners_domain::ports::GitHubError;
use spot_runners_domain::stale::{self, StaleCutoffs};
use spot_runners_domain::store::{
    IncomingDelivery, JobCheck, RecentRepository, StaleJob, StoreError,
};
use spot_runners_domain::sweeps as decide;
use spot_runners_domain::{JobStatus, WorkflowJobEvent};

use crate::retry::lock;
use crate::Reconciler;

/// One repository at most is asked for its queued jobs this often
/// ([`api_budget::next_poll`] says which).
pub const POLL_EVERY: Duration = Duration::from_secs(60);
/// Repositories with jobs this recent may be polled.
const POLL_REPOSITORIES_SEEN_WITHIN_DAYS: i64 = 7;
/// Time a polled batch may take to commit.
const POLL_COMMIT_BUDGET: Duration = Duration::from_secs(10);

impl Reconciler {
    /// Asks GitHub about jobs queued suspiciously long ([`stale`] says
    /// which), a few per sweep so the rate limit is never spent on it: a
    /// lost `completed` or `in_progress` would otherwise keep demand (and
    /// instances) alive.
    pub(super) async fn check_stale_jobs(
        &self,
        suspects: Vec<StaleJob>,
        idle_profiles: &[String],
        spending: Spending,
        now: DateTime<Utc>,
    ) -> Result<(usize, usize), StoreError> {
        let allowed = spending.stale_checks(stale::CHECKS_PER_SWEEP);
        let mut due = suspects;
        due.truncate(allowed);
        let room = (allowed - due.len()) as i64;
        if room > 0 {
            due.extend(
                self.store
                    .stale_jobs(&StaleCutoffs::at(now), idle_profiles, room)
                    .await?,
            );
        }
        let (mut checked, mut closed) = (0, 0);
        for job in due {
            let check = match self.backends.github.job(&job.repository, job.id).await {
                Ok(report) => decide::job_check(&report),
                Err(GitHubError::NotFound) => JobCheck::Gone,
                Err(e) => {
                    tracing::warn!(job_id = job.id, repository = %job.repository, error = %e, "checking a stale job failed; stale checks stop for this sweep");
                    break;
                }
            };
            checked += 1;
            self.store.record_job_check(job.id, &check, now).await?;
            self.metrics.stale_jobs(check.as_str(), 1);
            if check != JobCheck::Queued {
                closed += 1;
                tracing::warn!(job_id = job.id, repository = %job.repository, outcome = check.as_str(), "stale job repaired from GitHub's jobs API (a webhook was lost)");
            }
        }
        Ok((checked, closed))
    }

    /// Repositories with jobs within the polling window. The week's list
    /// is read once per quiet period (it is as long as the week's jobs are
    /// many); the last [`api_budget::ACTIVE_WITHIN`], where activity and
    /// suspects are, every time, and overrides it.
    async fn repositories_to_poll(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, StoreError> {
        if self.quiet_reads.due(now) {
            let week = self
                .store
                .recent_repositories(
                    now - chrono::Duration::days(POLL_REPOSITORIES_SEEN_WITHIN_DAYS),
                )
                .await?;
            *lock(&self.quiet_repositories) = week;
        }
        let active = self
            .store
            .recent_repositories(now - api_budget::ACTIVE_WITHIN)
            .await?;
        let mut merged: BTreeMap<String, RecentRepository> = lock(&self.quiet_repositories)
            .iter()
            .map(|r| (r.repository.clone(), r.clone()))
            .collect();
        for r in active {
            merged.insert(r.repository.clone(), r);
        }
        Ok(merged.into_values().collect())
    }

    /// GitHub does not resend a lost `queued` delivery, and without it a
    /// job is never covered (unless some other job's runner takes it). So,
    /// one repository a minute at most, GitHub is asked for its queued jobs
    /// and those the ledger has never seen are recorded as if delivered:
    /// at once where a job ran unannounced, every half hour everywhere else,
    /// and in turn where jobs are coming in while redelivery is not healing
    /// the deliveries GitHub tried and we missed ([`api_budget::next_poll`]).
    pub(super) async fn poll_queued_jobs(
        &self,
        spending: Spending,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        if spending == Spending::Essential || !self.polls.due(now) {
            return Ok(0);
        }
        let repositories = self.repositories_to_poll(now).await?;
        let chosen = {
            let mut polled = lock(&self.polled);
            let recent: BTreeSet<&str> =
                repositories.iter().map(|r| r.repository.as_str()).collect();
            polled.retain(|r, _| recent.contains(r.as_str()));
            let redelivered = self.healing.heals(now);
            let chosen = api_budget::next_poll(&repositories, &polled, spending, redelivered, now);
            if let Some((repo, _)) = chosen {
                polled.insert(repo.repository.clone(), now);
            }
            chosen
        };
        let Some((repo, reason)) = chosen else {
            return Ok(0);
        };
        self.metrics.polled(reason.as_str());
        tracing::debug!(repository = %repo.repository, reason = reason.as_str(), "polling for queued jobs no webhook announced");
        let listed = match self.backends.github.queued_jobs(&repo.repository).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(repository = %repo.repository, error = %e, "listing queued jobs failed");
                return Ok(0);
            }
        };
        let ids: Vec<i64> = listed.iter().map(|j| j.id).collect();
        let known = self.store.known_jobs(&ids).await?;
        let batch: Vec<IncomingDelivery> = decide::lost_queued_jobs(listed, &known, now)
            .into_iter()
            .map(|j| IncomingDelivery {
                delivery_id: format!("poll-{}", j.id),
                profile: self.profiles.match_job(&j.labels, &repo.repository),
                job: WorkflowJobEvent {
                    job_id: j.id,
                    run_id: j.run_id,
                    run_attempt: j.run_attempt,
                    status: JobStatus::Queued,
                    name: j.name,
                    workflow_name: j.workflow_name,
                    labels: j.labels,
                    conclusion: None,
                    runner_id: None,
                    runner_name: None,
                    repository: repo.repository.clone(),
                    owner: repo.owner.clone(),
                    org: repo.org.clone(),
                    installation_id: repo.installation_id,
                    html_url: j.html_url,
                    created_at: j.created_at,
                    started_at: None,
                    completed_at: None,
                },
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let deadline = tokio::time::Instant::now().into_std() + POLL_COMMIT_BUDGET;
        self.store.record_deliveries(&batch, deadline).await?;
        for d in &batch {
            tracing::warn!(job_id = d.job.job_id, repository = %d.job.repository, profile = ?d.profile.as_ref().ok(), "found a queued job no webhook told us about; recorded it");
        }
        self.metrics.stale_jobs("discovered", batch.len() as u64);
        Ok(batch.len())
    }
}
