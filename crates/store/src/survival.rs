//! The ledger side of spot survival: interruptions attributed to jobs,
//! workflow runs and their completion, re-run tracking, and the facts the
//! market choice reads. Queries here are checked at run time against the
//! real PostgreSQL the tests start (not by `sqlx::query!`), so this module
//! needs no offline query data.

use chrono::{DateTime, Utc};
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::store::{JobSurvival, MarketSnapshot, RerunOutcome, RunAwaitingRerun};
use spot_runners_domain::survival::{Interruption, QueuedJobFacts, RunJob};
use spot_runners_domain::Market;

pub(crate) mod sql {
    use super::*;
    use sqlx::{PgPool, Row};

    use crate::{DeliveryOutcome, MarketFn, MarketQuery, PgError};

    /// A run's status only moves forward within an attempt, and a later
    /// attempt replaces an earlier one; a late delivery of an older attempt
    /// changes nothing.
    async fn upsert_run(
        conn: &mut sqlx::PgConnection,
        run: &WorkflowRunEvent,
        checked_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), PgError> {
        sqlx::query(
            r#"INSERT INTO workflow_runs AS r (id, repository, run_attempt, status, conclusion, completed_at, checked_at)
               VALUES ($1, $2, $3, $4, $5, CASE WHEN $4 = 'completed' THEN $7::timestamptz END, $6)
               ON CONFLICT (id) DO UPDATE SET
                   run_attempt = GREATEST(r.run_attempt, EXCLUDED.run_attempt),
                   status = CASE
                       WHEN EXCLUDED.run_attempt > r.run_attempt THEN EXCLUDED.status
                       WHEN EXCLUDED.run_attempt < r.run_attempt THEN r.status
                       WHEN r.status = 'completed' THEN r.status
                       ELSE EXCLUDED.status END,
                   conclusion = CASE WHEN EXCLUDED.run_attempt >= r.run_attempt
                                     THEN COALESCE(EXCLUDED.conclusion, r.conclusion) ELSE r.conclusion END,
                   completed_at = CASE
                       WHEN EXCLUDED.run_attempt > r.run_attempt THEN EXCLUDED.completed_at
                       WHEN EXCLUDED.run_attempt < r.run_attempt THEN r.completed_at
                       ELSE COALESCE(r.completed_at, EXCLUDED.completed_at) END,
                   checked_at = COALESCE(EXCLUDED.checked_at, r.checked_at),
                   updated_at = $7::timestamptz"#,
        )
        .bind(run.run_id)
        .bind(&run.repository)
        .bind(run.run_attempt)
        .bind(&run.status)
        .bind(&run.conclusion)
        .bind(checked_at)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    pub(crate) async fn record_workflow_run(
        pool: &PgPool,
        delivery_id: &str,
        run: &WorkflowRunEvent,
        now: DateTime<Utc>,
    ) -> Result<DeliveryOutcome, PgError> {
        let mut tx = pool.begin().await?;
        let fresh = sqlx::query(
            r#"INSERT INTO webhook_deliveries (delivery_id, event, action)
               VALUES ($1, 'workflow_run', 'completed') ON CONFLICT (delivery_id) DO NOTHING"#,
        )
        .bind(delivery_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            return Ok(DeliveryOutcome::Duplicate);
        }
        upsert_run(&mut tx, run, None, now).await?;
        tx.commit().await?;
        Ok(DeliveryOutcome::Accepted)
    }

    pub(crate) async fn record_run_check(
        pool: &PgPool,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), PgError> {
        let mut conn = pool.acquire().await?;
        upsert_run(&mut conn, run, Some(at), now).await
    }

    pub(crate) async fn mark_run_checked(
        pool: &PgPool,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), PgError> {
        sqlx::query(
            r#"INSERT INTO workflow_runs (id, repository, status, checked_at) VALUES ($1, $2, 'unknown', $3)
               ON CONFLICT (id) DO UPDATE SET checked_at = $3, updated_at = $4::timestamptz"#,
        )
        .bind(run_id)
        .bind(repository)
        .bind(at)
        .bind(now)
        .execute(pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn record_interruption(
        pool: &PgPool,
        i: &Interruption,
        now: DateTime<Utc>,
    ) -> Result<bool, PgError> {
        let done = sqlx::query(
            r#"UPDATE workflow_jobs SET
                   interrupted_at = $2, interrupted_runner = $3, interrupted_instance_type = $4,
                   interrupted_subnet_id = $5, interrupted_market = $6, interrupted_after_secs = $7,
                   interrupted_az = $9,
                   rerun_state = 'pending', rerun_next_at = $2, rerun_attempts = 0,
                   rerun_reason = 'interrupted by a spot reclaim; re-run once its workflow run completes',
                   updated_at = $8::timestamptz
               WHERE id = $1 AND interrupted_at IS NULL"#,
        )
        .bind(i.job_id)
        .bind(i.at)
        .bind(&i.runner_name)
        .bind(&i.instance_type)
        .bind(&i.subnet_id)
        .bind(i.market.map(Market::as_str))
        .bind(i32::try_from(i.ran_secs).unwrap_or(i32::MAX))
        .bind(now)
        .bind(&i.availability_zone)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A job of a later attempt with the same run and name re-runs the
    /// latest earlier one that was interrupted: link them, and count the
    /// lineage's re-runs. A pending predecessor that someone re-ran by hand
    /// is no longer pending.
    pub(crate) async fn link_reruns(pool: &PgPool, now: DateTime<Utc>) -> Result<u64, PgError> {
        let done = sqlx::query(
            r#"WITH pairs AS (
                   SELECT DISTINCT ON (n.id) n.id AS new_id, p.id AS old_id, p.rerun_count AS old_count
                   FROM workflow_jobs p
                   JOIN workflow_jobs n ON n.run_id = p.run_id AND n.name = p.name
                                       AND n.run_attempt > p.run_attempt
                   WHERE p.interrupted_at IS NOT NULL AND n.rerun_of IS NULL
                   ORDER BY n.id, p.run_attempt DESC
               ), linked AS (
                   UPDATE workflow_jobs n SET rerun_of = pairs.old_id, rerun_count = pairs.old_count + 1,
                          updated_at = $1::timestamptz
                   FROM pairs WHERE n.id = pairs.new_id
                   RETURNING pairs.old_id
               )
               UPDATE workflow_jobs p SET rerun_state = 'rerun',
                      -- From `pairs`: the main statement does not see the rows `linked` updates.
                      rerun_reason = 're-run as job ' || (SELECT min(pairs.new_id) FROM pairs WHERE pairs.old_id = p.id),
                      updated_at = $1::timestamptz
               WHERE p.id IN (SELECT old_id FROM linked) AND p.rerun_state IN ('pending', 'requested')"#,
        )
        .bind(now)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn runs_awaiting_reruns(
        pool: &PgPool,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, PgError> {
        let rows = sqlx::query(
            r#"SELECT j.run_id, min(j.repository) AS repository, min(j.profile) AS profile,
                      min(r.status) AS status, min(r.checked_at) AS checked_at
               FROM workflow_jobs j LEFT JOIN workflow_runs r ON r.id = j.run_id
               WHERE j.rerun_state = 'pending' AND (j.rerun_next_at IS NULL OR j.rerun_next_at <= $1)
               GROUP BY j.run_id
               ORDER BY min(j.rerun_next_at) NULLS FIRST, j.run_id
               LIMIT $2"#,
        )
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RunAwaitingRerun {
                    run_id: r.try_get("run_id")?,
                    repository: r.try_get("repository")?,
                    profile: r.try_get("profile")?,
                    status: r.try_get("status")?,
                    checked_at: r.try_get("checked_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn run_jobs(pool: &PgPool, run_id: i64) -> Result<Vec<RunJob>, PgError> {
        let rows = sqlx::query(
            r#"SELECT DISTINCT ON (j.name) j.id, j.name, j.conclusion, j.rerun_state = 'pending' AS pending,
                      (SELECT count(*) FROM workflow_jobs p
                        WHERE p.run_id = j.run_id AND p.name = j.name AND p.run_attempt < j.run_attempt
                          AND p.rerun_state IN ('requested', 'rerun')) AS lineage
               FROM workflow_jobs j WHERE j.run_id = $1
               ORDER BY j.name, j.run_attempt DESC, j.id DESC"#,
        )
        .bind(run_id)
        .fetch_all(pool)
        .await?;
        let mut jobs: Vec<RunJob> = rows
            .into_iter()
            .map(|r| {
                Ok(RunJob {
                    job_id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    conclusion: r.try_get("conclusion")?,
                    pending_rerun: r.try_get::<Option<bool>, _>("pending")?.unwrap_or(false),
                    lineage_reruns: u32::try_from(r.try_get::<i64, _>("lineage")?).unwrap_or(0),
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        jobs.sort_by_key(|j| j.job_id);
        Ok(jobs)
    }

    pub(crate) async fn set_rerun_outcome(
        pool: &PgPool,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), PgError> {
        let (state, reason, next): (&str, String, Option<DateTime<Utc>>) = match outcome {
            RerunOutcome::Requested => {
                ("requested", "re-run requested from GitHub".to_owned(), None)
            }
            RerunOutcome::RetryAt { at, reason } => ("pending", reason.clone(), Some(*at)),
            RerunOutcome::Lost { reason } => ("lost", reason.clone(), None),
            RerunOutcome::NotNeeded { reason } => ("not_needed", reason.clone(), None),
            RerunOutcome::Waiting { reason } => ("pending", reason.clone(), Some(at)),
        };
        let mut tx = pool.begin().await?;
        let counts = matches!(
            outcome,
            RerunOutcome::Requested | RerunOutcome::RetryAt { .. }
        );
        let runs: Vec<i64> = sqlx::query_scalar(
            r#"UPDATE workflow_jobs SET rerun_state = $2, rerun_reason = $3, rerun_next_at = $4,
                      rerun_attempts = rerun_attempts + CASE WHEN $5 THEN 1 ELSE 0 END,
                      rerun_requested_at = CASE WHEN $2 = 'requested' THEN $6 ELSE rerun_requested_at END,
                      updated_at = $7::timestamptz
               WHERE id = ANY($1) AND rerun_state = 'pending'
               RETURNING run_id"#,
        )
        .bind(job_ids)
        .bind(state)
        .bind(&reason)
        .bind(next)
        .bind(counts)
        .bind(at)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if *outcome == RerunOutcome::Requested {
            // A new attempt starts: the run is no longer completed, and a
            // late delivery for the attempt that ended changes nothing.
            sqlx::query(
                r#"UPDATE workflow_runs SET run_attempt = run_attempt + 1, status = 'in_progress',
                          conclusion = NULL, completed_at = NULL, updated_at = $2::timestamptz
                   WHERE id = ANY($1)"#,
            )
            .bind(&runs)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn rerun_attempts(pool: &PgPool, job_id: i64) -> Result<i32, PgError> {
        let n: Option<i32> =
            sqlx::query_scalar("SELECT rerun_attempts FROM workflow_jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(pool)
                .await?;
        Ok(n.unwrap_or(0))
    }

    pub(crate) async fn job_survival(
        pool: &PgPool,
        job_id: i64,
    ) -> Result<Option<JobSurvival>, PgError> {
        let row = sqlx::query(
            r#"SELECT j.interrupted_at, j.interrupted_runner, j.interrupted_instance_type,
                      j.interrupted_subnet_id, j.interrupted_az, j.interrupted_market, j.interrupted_after_secs,
                      j.rerun_of, j.rerun_count, j.rerun_state, j.rerun_reason, j.rerun_attempts,
                      j.rerun_next_at, r.market AS runner_market, r.market_reason AS runner_market_reason
               FROM workflow_jobs j LEFT JOIN runners r ON r.name = j.runner_name
               WHERE j.id = $1"#,
        )
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(JobSurvival {
            interrupted_at: r.try_get("interrupted_at")?,
            interrupted_runner: r.try_get("interrupted_runner")?,
            interrupted_instance_type: r.try_get("interrupted_instance_type")?,
            interrupted_subnet_id: r.try_get("interrupted_subnet_id")?,
            interrupted_az: r.try_get("interrupted_az")?,
            interrupted_market: r.try_get("interrupted_market")?,
            interrupted_after_secs: r.try_get("interrupted_after_secs")?,
            rerun_of: r.try_get("rerun_of")?,
            rerun_count: r.try_get("rerun_count")?,
            rerun_state: r.try_get("rerun_state")?,
            rerun_reason: r.try_get("rerun_reason")?,
            rerun_attempts: r.try_get("rerun_attempts")?,
            rerun_next_at: r.try_get("rerun_next_at")?,
            runner_market: r.try_get("runner_market")?,
            runner_market_reason: r.try_get("runner_market_reason")?,
        }))
    }

    /// Reads the profile's market facts and records the decision on the
    /// runner row. Only a decision that depends on the on-demand runners
    /// available counts them, under a lock per profile, so runners
    /// provisioned at the same time see each other's on-demand decisions;
    /// the rest (almost every launch) take no lock.
    pub(crate) async fn choose_runner_market(
        pool: &PgPool,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: MarketFn,
        now: DateTime<Utc>,
    ) -> Result<(Market, String), PgError> {
        // One history per distinct job (repository + workflow + name), read
        // from `workflow_jobs_duration_history`, not one per queued job.
        // Two statements, not one with `$2 OR …`: a generic plan could not
        // use the re-runs' partial index for the latter.
        let which = if query.with_durations {
            "TRUE"
        } else {
            "j.run_attempt > 1"
        };
        let statement = format!(
            r#"WITH q AS (
                   SELECT j.id, j.repository, j.workflow_name, j.name, j.first_seen_at,
                          j.run_attempt > 1 AND EXISTS (
                              SELECT 1 FROM workflow_jobs p
                              WHERE p.run_id = j.run_id AND p.name = j.name
                                AND p.run_attempt < j.run_attempt
                                AND p.interrupted_at IS NOT NULL) AS rerun
                   FROM workflow_jobs j
                   WHERE j.status = 'queued' AND j.profile = $1 AND {which}
               ),
               g AS (
                   SELECT DISTINCT repository, workflow_name, name FROM q WHERE $2
               ),
               h AS (
                   SELECT g.*, ARRAY(
                       SELECT (EXTRACT(EPOCH FROM (h.completed_at - h.in_progress_at)) / 60.0)::float8
                       FROM workflow_jobs h
                       WHERE h.repository = g.repository AND h.name = g.name
                         AND h.workflow_name IS NOT DISTINCT FROM g.workflow_name
                         AND h.status = 'completed' AND h.interrupted_at IS NULL
                         AND h.in_progress_at IS NOT NULL AND h.completed_at IS NOT NULL
                       ORDER BY h.completed_at DESC LIMIT 20) AS history
                   FROM g
               )
               SELECT q.id, q.rerun, h.history
               FROM q LEFT JOIN h ON h.repository = q.repository AND h.name = q.name
                                 AND h.workflow_name IS NOT DISTINCT FROM q.workflow_name
               ORDER BY q.first_seen_at, q.id"#
        );
        let queued = sqlx::query(&statement)
            .bind(profile)
            .bind(query.with_durations)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                Ok(QueuedJobFacts {
                    job_id: r.try_get("id")?,
                    rerun_of_interrupted: r.try_get::<Option<bool>, _>("rerun")?.unwrap_or(false),
                    history_minutes: r
                        .try_get::<Option<Vec<f64>>, _>("history")?
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let interruptions: Vec<DateTime<Utc>> = sqlx::query_scalar(
            r#"SELECT COALESCE(terminated_at, updated_at) FROM runners
               WHERE controller_id = $1 AND profile = $2 AND state = 'interrupted'
                 AND updated_at > $3 AND COALESCE(terminated_at, updated_at) > $3"#,
        )
        .bind(controller_id)
        .bind(profile)
        .bind(query.interruptions_since)
        .fetch_all(pool)
        .await?;
        let mut snapshot = MarketSnapshot {
            queued,
            on_demand_available: None,
            interruptions,
        };
        let uncounted = decide(&snapshot);
        // The choice is made durable by the runner's `launching` write,
        // which commits synchronously (and so flushes the WAL before it)
        // before any `RunInstances`; this commit need not wait for the disk.
        // A crash in between loses only a choice for a launch that never
        // happened; the row is provisioned again.
        let mut tx = pool
            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
            .await?;
        let (market, reason) = match uncounted {
            Some(choice) => choice,
            None => {
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(hashtext('spot-runners:market:' || $1 || ':' || $2))",
                )
                .bind(controller_id)
                .bind(profile)
                .execute(&mut *tx)
                .await?;
                let on_demand: i64 = sqlx::query_scalar(
                    r#"SELECT count(*) FROM runners
                       WHERE controller_id = $1 AND profile = $2 AND name <> $3 AND market = 'on-demand'
                         AND state IN ('requested', 'registered', 'launching', 'booting', 'idle')"#,
                )
                .bind(controller_id)
                .bind(profile)
                .bind(runner_name)
                .fetch_one(&mut *tx)
                .await?;
                snapshot.on_demand_available = Some(usize::try_from(on_demand).unwrap_or(0));
                decide(&snapshot).ok_or_else(|| {
                    PgError::Corrupt(
                        "the market decision did not answer with the on-demand count".into(),
                    )
                })?
            }
        };
        sqlx::query(
            "UPDATE runners SET market = $2, market_reason = $3, updated_at = $4::timestamptz WHERE name = $1",
        )
        .bind(runner_name)
        .bind(market.as_str())
        .bind(&reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((market, reason))
    }

    /// Interruption times per profile since `since` (the breaker gauge).
    pub(crate) async fn interruptions_since(
        pool: &PgPool,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, PgError> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            r#"SELECT profile, COALESCE(terminated_at, updated_at) FROM runners
               WHERE controller_id = $1 AND state = 'interrupted'
                 AND updated_at > $2 AND COALESCE(terminated_at, updated_at) > $2"#,
        )
        .bind(controller_id)
        .bind(since)
        .fetch_all(pool)
        .await?;
        Ok(rows)
    }
}
