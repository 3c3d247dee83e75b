//! The PostgreSQL implementation of [`Store`].

use std::time::Duration;

use async_trait::async_trait;
use spot_runners_domain::{profile::ProfileRow, JobStatus};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::{DeliveryOutcome, IncomingDelivery, JobCount, Store, StoreError};

/// Channel the `instance_profiles` trigger notifies on every change.
pub const PROFILES_CHANNEL: &str = "spot_runners_profiles";

/// Below this much time left, a batch is not started: it could not commit in
/// time and would only be rolled back.
const MIN_BATCH_TIME: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects a pool. Connection attempts and pool waits are bounded so a
    /// database outage turns into quick errors, not hung requests.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .application_name("spot-runners");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations. Idempotent; safe from several replicas at
    /// once (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations").run(&self.pool).await?;
        Ok(())
    }

    /// A listener subscribed to profile changes.
    pub async fn profile_listener(&self) -> Result<PgListener, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(PROFILES_CHANNEL).await?;
        Ok(listener)
    }

    async fn record_batch(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The server gives up on its own too, so a statement stuck behind a
        // lock cannot commit after the sender was told "unavailable".
        let budget = deadline.saturating_duration_since(Instant::now());
        let budget_ms = budget.saturating_sub(MIN_BATCH_TIME).as_millis().max(1);
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(budget_ms.to_string())
            .execute(&mut *tx)
            .await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for d in batch {
            let job = &d.job;
            let status = job.status.as_str();
            let fresh = sqlx::query!(
                r#"INSERT INTO webhook_deliveries (delivery_id, event, action, job_id)
                   VALUES ($1, 'workflow_job', $2, $3)
                   ON CONFLICT (delivery_id) DO NOTHING"#,
                d.delivery_id,
                status,
                job.job_id,
            )
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !fresh {
                outcomes.push(DeliveryOutcome::Duplicate);
                continue;
            }
            let (profile, match_error) = match &d.profile {
                Ok(p) => (Some(p.as_str()), None),
                Err(e) => (None, Some(e.as_str())),
            };
            // Status and per-transition timestamps only ever move forward, so
            // deliveries may arrive in any order and any number of times.
            sqlx::query!(
                r#"INSERT INTO workflow_jobs AS j (
                       id, run_id, run_attempt, name, workflow_name, repository, owner, org,
                       installation_id, html_url, labels, status, conclusion, runner_id,
                       runner_name, profile, match_error, github_created_at,
                       waiting_at, queued_at, in_progress_at, completed_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                           $16, $17, $18,
                           CASE WHEN $12 = 'waiting' THEN now() END,
                           CASE WHEN $12 = 'queued' THEN now() END,
                           CASE WHEN $12 = 'in_progress' THEN now() END,
                           CASE WHEN $12 = 'completed' THEN now() END)
                   ON CONFLICT (id) DO UPDATE SET
                       status = CASE WHEN job_status_rank(EXCLUDED.status) > job_status_rank(j.status)
                                     THEN EXCLUDED.status ELSE j.status END,
                       run_attempt = GREATEST(j.run_attempt, EXCLUDED.run_attempt),
                       conclusion = COALESCE(EXCLUDED.conclusion, j.conclusion),
                       runner_id = COALESCE(EXCLUDED.runner_id, j.runner_id),
                       runner_name = COALESCE(EXCLUDED.runner_name, j.runner_name),
                       installation_id = COALESCE(EXCLUDED.installation_id, j.installation_id),
                       html_url = COALESCE(j.html_url, EXCLUDED.html_url),
                       profile = COALESCE(j.profile, EXCLUDED.profile),
                       match_error = CASE WHEN COALESCE(j.profile, EXCLUDED.profile) IS NULL
                                          THEN EXCLUDED.match_error END,
                       github_created_at = COALESCE(j.github_created_at, EXCLUDED.github_created_at),
                       waiting_at = COALESCE(j.waiting_at, EXCLUDED.waiting_at),
                       queued_at = COALESCE(j.queued_at, EXCLUDED.queued_at),
                       in_progress_at = COALESCE(j.in_progress_at, EXCLUDED.in_progress_at),
                       completed_at = COALESCE(j.completed_at, EXCLUDED.completed_at),
                       updated_at = now()"#,
                job.job_id,
                job.run_id,
                job.run_attempt,
                job.name,
                job.workflow_name,
                job.repository,
                job.owner,
                job.org,
                job.installation_id,
                job.html_url,
                &job.labels,
                status,
                job.conclusion,
                job.runner_id,
                job.runner_name,
                profile,
                match_error,
                job.created_at,
            )
            .execute(&mut *tx)
            .await?;
            outcomes.push(DeliveryOutcome::Accepted);
        }
        if Instant::now() + MIN_BATCH_TIME / 5 >= deadline {
            // Dropping the transaction rolls it back.
            return Err(StoreError::Timeout);
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if deadline.saturating_duration_since(Instant::now()) < MIN_BATCH_TIME {
            return Err(StoreError::Timeout);
        }
        tokio::time::timeout_at(deadline, self.record_batch(batch, deadline))
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError> {
        let rows = sqlx::query_as!(
            ProfileRow,
            r#"SELECT name, labels, instance_types, image_id, subnet_ids, security_group_ids,
                      iam_instance_profile, market, on_demand_fallback, max_instances, min_idle,
                      idle_timeout_secs, boot_timeout_secs, max_lifetime_secs, runner_group_id,
                      root_volume_gb, repositories, enabled, priority
               FROM instance_profiles ORDER BY name"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT profile, status, count(*) AS "count!"
               FROM workflow_jobs
               WHERE status <> 'completed' OR completed_at > now() - make_interval(secs => $1)
               GROUP BY profile, status"#,
            completed_within.as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(JobCount {
                    status: JobStatus::parse(&r.status)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    profile: r.profile,
                    count: r.count,
                })
            })
            .collect()
    }

    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query!(
            "DELETE FROM webhook_deliveries WHERE received_at < now() - make_interval(secs => $1)",
            retention.as_secs_f64(),
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        .map_err(|_| StoreError::Timeout)??;
        Ok(())
    }
}
