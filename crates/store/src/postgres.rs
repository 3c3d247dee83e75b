//! The queries behind [`PgStore`]'s [`Store`](spot_runners_domain::store::Store)
//! implementation (`pg_store.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use spot_runners_domain::clock::{Clock, SystemClock};
use spot_runners_domain::planner::{Demand, Queue};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::{profile::ProfileRow, ControllerId, JobStatus, RunnerName, RunnerState};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::time::Instant;

use crate::open_ledger::{self, OpenLedger, Read};
use crate::runners::{job_scope, scope_columns, scope_of};
use crate::survival::sql as survival;
use crate::PgError;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::store::{
    DeliveryOutcome, FleetCount, IncomingDelivery, JobCheck, JobCount, JobRecord, JobSurvival,
    MarketFn, MarketQuery, PlanFn, PlanSnapshot, Pruned, RecentRepository, RerunOutcome,
    RunAwaitingRerun, RunnerChange, RunnerRecord, StaleJob,
};
use spot_runners_domain::survival::{Interruption, RunJob};
use spot_runners_domain::Market;

/// Channel the `instance_profiles` trigger notifies on every change.
pub const PROFILES_CHANNEL: &str = "spot_runners_profiles";
/// Channel every accepted delivery batch notifies, waking all replicas.
pub const WAKE_CHANNEL: &str = "spot_runners_wake";

/// The states a row is provisioned in, bound as a parameter, never
/// written into a statement that picks one row by name: with the literal
/// list PostgreSQL may read the row through the partial index on these
/// states (its statistics say they are rare) and walk every entry that index
/// still holds for rows that have left them, not the one the primary key
/// finds.
const PROVISIONING: [&str; 3] = ["requested", "registered", "launching"];
/// The states a listed runner may move on from, bound for the same reason.
const LISTED_ONLINE: [&str; 2] = ["launching", "booting"];
const LISTED_BUSY: [&str; 3] = ["launching", "booting", "idle"];
/// The states a runner whose job completed may move on from.
const RUNNING: [&str; 4] = ["launching", "booting", "idle", "busy"];

fn state_list(states: &[&str]) -> Vec<String> {
    states.iter().map(|s| (*s).to_owned()).collect()
}

/// A `runners.state` column as the domain's state.
fn runner_state(state: &str) -> Result<RunnerState, PgError> {
    RunnerState::parse(state).map_err(|e| PgError::Corrupt(e.to_string()))
}

/// Below this much time left, a batch is not started: it could not commit in
/// time and would only be rolled back.
const MIN_BATCH_TIME: Duration = Duration::from_millis(50);
/// How long a pooled connection may sit idle before it is pinged on
/// acquire (a restarted server or a dropped TCP link is then found before a
/// statement is sent, not by it).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);
/// Connections in the pool: the reconciler's, the health checks' and the
/// listeners'.
const MAX_CONNECTIONS: u32 = 16;
/// Connections of the ledger writer's own pool (it keeps one transaction in
/// flight, a few more beside one that is stuck).
const INGEST_CONNECTIONS: u32 = 4;
/// The statement timeout of the writer's connections. A batch with at
/// least this much time left (all but deliveries that queued for half a
/// second) is one autocommitted statement, a single round trip; one with
/// less is a transaction with its own, shorter timeout.
const INGEST_STATEMENT_TIMEOUT: Duration = Duration::from_millis(4500);
/// The writer connections' session: [`INGEST_STATEMENT_TIMEOUT`], and the
/// batch statement planned once per connection, not per batch (its custom
/// plans cost more to make, 0.8 ms, than to run, 0.4 ms, and its one
/// parameter, a JSON array, tells a planner nothing).
fn ingest_session() -> String {
    format!(
        "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan",
        INGEST_STATEMENT_TIMEOUT.as_millis()
    )
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The ledger writer's connections: same server, their own session
    /// settings (statement timeout, generic plans), which no other query
    /// should inherit.
    ingest: PgPool,
    /// Every time the store writes or compares with: the reconciler's
    /// clock, never PostgreSQL's `now()` (column defaults stay for
    /// operators' manual inserts).
    clock: Arc<dyn Clock>,
    /// The session holding the sweep leadership lock, while this process leads.
    leader: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
    /// How far `settle_jobs` has read the ledger.
    settled: Arc<std::sync::Mutex<SettleMark>>,
    /// The queue and the live fleet, as the planner last read them. Held
    /// across the plan's reads: one pass of this process plans at a time.
    open: Arc<tokio::sync::Mutex<OpenLedger>>,
}

/// What `settle_jobs` last read. A pass runs on every webhook, so it looks
/// only at the jobs written since its last run (by transactions at or past
/// its horizon: see `open_ledger`), through the `changed_by` index; now and
/// then, and on a replica's first pass, it reads every live runner's job
/// instead, a safety net for a job row written without the trigger.
#[derive(Debug, Default)]
struct SettleMark {
    /// The oldest transaction running when the last settle that committed
    /// began.
    horizon: Option<i64>,
    /// When the last full settle that committed began.
    last_full: Option<DateTime<Utc>>,
}

/// A full settle this often, at least. Only a safety net now that the
/// horizon misses no write; at 10,000 live runners it takes a pass 0.2 s,
/// which every webhook arriving meanwhile waits for.
const FULL_SETTLE_EVERY: chrono::Duration = chrono::Duration::minutes(5);
/// The open ledger reads every open row this often, which also catches a
/// queued job or live runner deleted by hand (deletes leave no `changed_by`);
/// such a job is planned for until then, and its runner reaped as idle.
const FULL_OPEN_READ_EVERY: chrono::Duration = chrono::Duration::minutes(5);

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects a pool. Connection attempts and pool waits are bounded so a
    /// database outage turns into quick errors, not hung requests.
    pub async fn connect(url: &str) -> Result<Self, PgError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .application_name("spot-runners");
        let pool = pool_options(MAX_CONNECTIONS)
            .min_connections(1)
            .connect_with(options)
            .await?;
        Ok(Self::from_pool(pool))
    }

    /// A store on `pool`; the ledger writer gets a small pool of its own to
    /// the same server, connected on first use.
    pub fn from_pool(pool: PgPool) -> Self {
        let ingest = pool_options(INGEST_CONNECTIONS)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(conn, ingest_session().as_str()).await?;
                    Ok(())
                })
            })
            .connect_lazy_with((*pool.connect_options()).clone());
        Self {
            pool,
            ingest,
            clock: Arc::new(SystemClock),
            leader: Arc::default(),
            settled: Arc::default(),
            open: Arc::default(),
        }
    }

    /// Reads time from `clock` (the reconciler's) instead of the system's.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes both pools, waiting for their connections to be returned.
    pub async fn close(&self) {
        self.ingest.close().await;
        self.pool.close().await;
    }

    /// Applies pending migrations. Idempotent; safe from several replicas at
    /// once (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), PgError> {
        sqlx::migrate!("../../migrations").run(&self.pool).await?;
        Ok(())
    }

    /// A listener subscribed to wake-ups from any replica.
    pub async fn wake_listener(&self) -> Result<PgListener, PgError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(WAKE_CHANNEL).await?;
        Ok(listener)
    }

    /// A listener subscribed to profile changes.
    pub async fn profile_listener(&self) -> Result<PgListener, PgError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(PROFILES_CHANNEL).await?;
        Ok(listener)
    }

    /// Writes a batch with a fixed number of round trips, whatever its size:
    /// one set-based statement that records the delivery GUIDs, folds the
    /// new ones into `workflow_jobs` and wakes the reconcilers. With the
    /// usual time left that statement is autocommitted under the writer
    /// connections' statement timeout (one round trip); with less it runs
    /// in a transaction with a timeout of its own (three).
    async fn record_batch(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, PgError> {
        // A GUID twice in one batch is a duplicate of its first occurrence;
        // only first occurrences go to the database.
        let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        for (ord, d) in batch.iter().enumerate() {
            if first_of.contains_key(d.delivery_id.as_str()) {
                continue;
            }
            first_of.insert(d.delivery_id.as_str(), ord);
            rows.push(DeliveryRow::new(ord, d));
        }

        // The server gives up on its own, so a statement stuck behind a lock
        // cannot commit after the sender was told "unavailable".
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(MIN_BATCH_TIME);
        let fresh = if budget >= INGEST_STATEMENT_TIMEOUT {
            self.record_autocommitted(&rows).await?
        } else {
            self.record_in_transaction(&rows, budget, deadline).await?
        };
        let fresh: HashSet<String> = fresh.into_iter().collect();
        Ok(batch
            .iter()
            .enumerate()
            .map(|(ord, d)| {
                if first_of.get(d.delivery_id.as_str()) == Some(&ord)
                    && fresh.contains(&d.delivery_id)
                {
                    DeliveryOutcome::Accepted
                } else {
                    DeliveryOutcome::Duplicate
                }
            })
            .collect())
    }

    /// The batch statement on its own: its transaction commits when it
    /// ends. On a connection found gone it is sent again on another. That
    /// is safe: if the lost attempt did commit, the second finds its GUIDs
    /// recorded and answers them as duplicates, which are acknowledged
    /// alike.
    async fn record_autocommitted(&self, rows: &[DeliveryRow<'_>]) -> Result<Vec<String>, PgError> {
        Ok(on_a_live_connection("sending the batch", || {
            self.batch_statement(rows).fetch_all(&self.ingest)
        })
        .await?)
    }

    /// The batch statement in a transaction whose statement timeout is the
    /// batch's own (`budget`), rolled back if it finishes too late.
    async fn record_in_transaction(
        &self,
        rows: &[DeliveryRow<'_>],
        budget: Duration,
        deadline: Instant,
    ) -> Result<Vec<String>, PgError> {
        let budget_ms = budget.as_millis().max(1);
        let begin = format!("BEGIN; SET LOCAL statement_timeout = {budget_ms}");
        // Nothing is written at BEGIN, so a connection found dead there is
        // simply replaced.
        let mut tx = on_a_live_connection("starting the batch", || {
            self.ingest.begin_with(begin.clone())
        })
        .await?;
        let fresh = self.batch_statement(rows).fetch_all(&mut *tx).await?;
        if Instant::now() + MIN_BATCH_TIME / 5 >= deadline {
            // Dropping the transaction rolls it back.
            return Err(PgError::Timeout);
        }
        tx.commit().await?;
        Ok(fresh)
    }

    /// [`RECORD_BATCH_SQL`] with its parameters: `rows`, received now, and
    /// the reconcilers' wake-up channel.
    fn batch_statement<'q>(
        &self,
        rows: &'q [DeliveryRow<'q>],
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments> {
        sqlx::query_scalar(RECORD_BATCH_SQL)
            .bind(sqlx::types::Json(rows))
            .bind(self.clock.now())
            .bind(WAKE_CHANNEL)
    }
}

/// Runs `attempt` again while it fails because its pooled connection was
/// gone (pinged only after sitting idle, a connection the server dropped
/// meanwhile — a restart, an administrator — fails at its first use), at
/// most once per pooled connection: every pooled connection may be gone at
/// once, but each failed attempt discards the one it found dead.
async fn on_a_live_connection<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut lost = 0;
    loop {
        match attempt().await {
            Err(e) if connection_lost(&e) && lost < INGEST_CONNECTIONS => {
                lost += 1;
                tracing::info!(error = %e, "a pooled connection was gone; {what} on another");
            }
            done => return done,
        }
    }
}

/// The pool settings both pools share: bounded waits, so a database outage
/// turns into quick errors, not hung requests; and a connection checked
/// with a round trip only after it sat idle (one in steady use proves
/// itself on its next statement; a ping before every batch was a fifth of
/// a lone delivery's round trips).
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_WHEN_IDLE_FOR {
                    return Ok(true);
                }
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// Whether `e` says the connection itself is gone (rather than that a
/// statement failed on a working one): an I/O error, or the server saying
/// it shut the session down (SQLSTATE class 57P, operator intervention) or
/// that the connection failed (class 08).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
        _ => false,
    }
}

/// One delivery as a row of [`RECORD_BATCH_SQL`]'s input; `ord` is its
/// place in the batch, which decides "first" and "last" between deliveries
/// of one job. Borrowed and serialized straight into the statement's
/// parameter: the writer builds these while the database waits for its
/// next batch.
#[derive(serde::Serialize)]
struct DeliveryRow<'a> {
    ord: usize,
    delivery_id: &'a str,
    status: &'static str,
    job_id: i64,
    run_id: i64,
    run_attempt: i32,
    name: &'a str,
    workflow_name: Option<&'a str>,
    repository: &'a str,
    owner: &'a str,
    org: Option<&'a str>,
    installation_id: Option<i64>,
    html_url: Option<&'a str>,
    labels: &'a [String],
    conclusion: Option<&'a str>,
    runner_id: Option<i64>,
    runner_name: Option<&'a str>,
    profile: Option<&'a str>,
    match_error: Option<&'a str>,
    github_created_at: Option<DateTime<Utc>>,
}

impl<'a> DeliveryRow<'a> {
    fn new(ord: usize, d: &'a IncomingDelivery) -> Self {
        let job = &d.job;
        let (profile, match_error) = match &d.profile {
            Ok(p) => (Some(p.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        Self {
            ord,
            delivery_id: &d.delivery_id,
            status: job.status.as_str(),
            job_id: job.job_id,
            run_id: job.run_id,
            run_attempt: job.run_attempt,
            name: &job.name,
            workflow_name: job.workflow_name.as_deref(),
            repository: &job.repository,
            owner: &job.owner,
            org: job.org.as_deref(),
            installation_id: job.installation_id,
            html_url: job.html_url.as_deref(),
            labels: &job.labels,
            conclusion: job.conclusion.as_deref(),
            runner_id: job.runner_id,
            runner_name: job.runner_name.as_deref(),
            profile,
            match_error,
            github_created_at: job.created_at,
        }
    }
}

/// Records a batch of deliveries (`$1`, a JSON array of [`DeliveryRow`]s
/// with distinct GUIDs, received at `$2`) and returns the GUIDs that were
/// new; if any was, it notifies channel `$3`.
///
/// The new deliveries of each job are folded into one row first, exactly as
/// applying them one after another in batch order would leave it: status
/// and run attempt only move forward; conclusion, runner and installation
/// take the last value given; URL, profile, creation time and the
/// per-status timestamps keep the first; the rest (names, labels) come from
/// the first delivery, as an insert followed by updates would keep them. That row is then upserted with the
/// same rules against what the ledger holds. GUIDs and jobs are written in
/// key order, so concurrent batches cannot deadlock on each other.
const RECORD_BATCH_SQL: &str = r#"
WITH input AS (
    SELECT * FROM jsonb_to_recordset($1) AS i(
        ord int, delivery_id text, status text, job_id bigint, run_id bigint,
        run_attempt int, name text, workflow_name text, repository text, owner text,
        org text, installation_id bigint, html_url text, labels text[],
        conclusion text, runner_id bigint, runner_name text, profile text,
        match_error text, github_created_at timestamptz)
),
fresh AS (
    INSERT INTO webhook_deliveries (delivery_id, event, action, job_id, received_at)
    SELECT delivery_id, 'workflow_job', status, job_id, $2::timestamptz FROM input ORDER BY delivery_id
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id
),
counted AS (
    SELECT job_id, count(*) AS deliveries FROM input GROUP BY job_id
),
-- A job with one delivery in the batch (nearly every one) is its own fold;
-- the aggregates, a sort each per job, are for the rest.
folded AS (
    SELECT i.job_id AS id, i.ord AS first_ord, i.run_attempt, i.installation_id,
           i.html_url, i.status, i.conclusion, i.runner_id, i.runner_name, i.profile,
           i.match_error AS last_match_error, i.github_created_at,
           i.status = 'waiting' AS waiting,
           i.status = 'queued' AS queued,
           i.status = 'in_progress' AS in_progress,
           i.status = 'completed' AS completed
    FROM input i JOIN fresh f USING (delivery_id) JOIN counted c USING (job_id)
    WHERE c.deliveries = 1
    UNION ALL
    SELECT i.job_id AS id,
           min(i.ord) AS first_ord,
           max(i.run_attempt) AS run_attempt,
           (array_agg(i.installation_id ORDER BY i.ord DESC)
                FILTER (WHERE i.installation_id IS NOT NULL))[1] AS installation_id,
           (array_agg(i.html_url ORDER BY i.ord)
                FILTER (WHERE i.html_url IS NOT NULL))[1] AS html_url,
           (array_agg(i.status ORDER BY job_status_rank(i.status) DESC))[1] AS status,
           (array_agg(i.conclusion ORDER BY i.ord DESC)
                FILTER (WHERE i.conclusion IS NOT NULL))[1] AS conclusion,
           (array_agg(i.runner_id ORDER BY i.ord DESC)
                FILTER (WHERE i.runner_id IS NOT NULL))[1] AS runner_id,
           (array_agg(i.runner_name ORDER BY i.ord DESC)
                FILTER (WHERE i.runner_name IS NOT NULL))[1] AS runner_name,
           (array_agg(i.profile ORDER BY i.ord)
                FILTER (WHERE i.profile IS NOT NULL))[1] AS profile,
           (array_agg(i.match_error ORDER BY i.ord DESC))[1] AS last_match_error,
           (array_agg(i.github_created_at ORDER BY i.ord)
                FILTER (WHERE i.github_created_at IS NOT NULL))[1] AS github_created_at,
           bool_or(i.status = 'waiting') AS waiting,
           bool_or(i.status = 'queued') AS queued,
           bool_or(i.status = 'in_progress') AS in_progress,
           bool_or(i.status = 'completed') AS completed
    FROM input i JOIN fresh f USING (delivery_id) JOIN counted c USING (job_id)
    WHERE c.deliveries > 1
    GROUP BY i.job_id
),
upserted AS (
    INSERT INTO workflow_jobs AS j (
        id, run_id, run_attempt, name, workflow_name, repository, owner, org,
        installation_id, html_url, labels, status, conclusion, runner_id,
        runner_name, profile, match_error, github_created_at,
        waiting_at, queued_at, in_progress_at, completed_at, first_seen_at, updated_at)
    SELECT f.id, s.run_id, f.run_attempt, s.name, s.workflow_name, s.repository, s.owner,
           s.org, f.installation_id, f.html_url, s.labels, f.status, f.conclusion,
           f.runner_id, f.runner_name, f.profile,
           CASE WHEN f.profile IS NULL THEN f.last_match_error END,
           f.github_created_at,
           CASE WHEN f.waiting THEN $2::timestamptz END,
           CASE WHEN f.queued THEN $2::timestamptz END,
           CASE WHEN f.in_progress THEN $2::timestamptz END,
           CASE WHEN f.completed THEN $2::timestamptz END,
           $2::timestamptz, $2::timestamptz
    FROM folded f JOIN input s ON s.ord = f.first_ord
    ORDER BY f.id
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
        updated_at = $2::timestamptz
    RETURNING 1
),
-- Delivered on commit, to every replica's reconciler; only when something
-- was new, and in this statement rather than a round trip of its own.
woken AS (
    SELECT pg_notify($3, '') FROM (SELECT 1 FROM fresh LIMIT 1) AS anything_fresh
)
SELECT f.delivery_id FROM fresh f LEFT JOIN woken ON true
"#;

impl PgStore {
    pub(crate) async fn pg_record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, PgError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if deadline.saturating_duration_since(Instant::now()) < MIN_BATCH_TIME {
            return Err(PgError::Timeout);
        }
        tokio::time::timeout_at(deadline, self.record_batch(batch, deadline))
            .await
            .map_err(|_| PgError::Timeout)?
    }

    pub(crate) async fn pg_profile_rows(&self) -> Result<Vec<ProfileRow>, PgError> {
        use sqlx::Row;
        // Read at run time, not with `query_as!`: several columns are added
        // by separate migrations, and a row type checked at build time
        // would have to change with every one of them.
        let rows = sqlx::query(
            r#"SELECT name, labels, instance_types, image_id, subnet_ids, security_group_ids,
                      iam_instance_profile, market, on_demand_fallback, max_instances, min_idle,
                      idle_timeout_secs, boot_timeout_secs, max_lifetime_secs, runner_group_id,
                      root_volume_gb, repositories, enabled, priority,
                      max_interruption_reruns, rerun_market, rerun_own_failures,
                      spot_breaker_interruptions, spot_breaker_window_secs,
                      spot_breaker_cooldown_secs, spot_max_job_minutes,
                      image_filter, threads_per_core, benchmark_tuning
               FROM instance_profiles ORDER BY name"#,
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ProfileRow {
                    name: r.try_get("name")?,
                    labels: r.try_get("labels")?,
                    instance_types: r.try_get("instance_types")?,
                    image_id: r.try_get("image_id")?,
                    image_filter: r.try_get("image_filter")?,
                    threads_per_core: r.try_get("threads_per_core")?,
                    benchmark_tuning: r.try_get("benchmark_tuning")?,
                    subnet_ids: r.try_get("subnet_ids")?,
                    security_group_ids: r.try_get("security_group_ids")?,
                    iam_instance_profile: r.try_get("iam_instance_profile")?,
                    market: r.try_get("market")?,
                    on_demand_fallback: r.try_get("on_demand_fallback")?,
                    max_instances: r.try_get("max_instances")?,
                    min_idle: r.try_get("min_idle")?,
                    idle_timeout_secs: r.try_get("idle_timeout_secs")?,
                    boot_timeout_secs: r.try_get("boot_timeout_secs")?,
                    max_lifetime_secs: r.try_get("max_lifetime_secs")?,
                    runner_group_id: r.try_get("runner_group_id")?,
                    root_volume_gb: r.try_get("root_volume_gb")?,
                    repositories: r.try_get("repositories")?,
                    enabled: r.try_get("enabled")?,
                    priority: r.try_get("priority")?,
                    max_interruption_reruns: r.try_get("max_interruption_reruns")?,
                    rerun_market: r.try_get("rerun_market")?,
                    rerun_own_failures: r.try_get("rerun_own_failures")?,
                    spot_breaker_interruptions: r.try_get("spot_breaker_interruptions")?,
                    spot_breaker_window_secs: r.try_get("spot_breaker_window_secs")?,
                    spot_breaker_cooldown_secs: r.try_get("spot_breaker_cooldown_secs")?,
                    spot_max_job_minutes: r.try_get("spot_max_job_minutes")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(PgError::from)
    }

    pub(crate) async fn pg_job_counts(
        &self,
        completed_within: Duration,
    ) -> Result<Vec<JobCount>, PgError> {
        // Two index ranges (open jobs, recent completions) instead of a
        // filter over every job the ledger keeps.
        let rows = sqlx::query!(
            r#"SELECT profile, status AS "status!", count(*) AS "count!"
               FROM workflow_jobs
               WHERE status IN ('waiting', 'queued', 'in_progress')
               GROUP BY profile, status
               UNION ALL
               SELECT profile, status, count(*)
               FROM workflow_jobs
               WHERE completed_at > $2::timestamptz - make_interval(secs => $1) AND status = 'completed'
               GROUP BY profile, status"#,
            completed_within.as_secs_f64(),
            self.clock.now()
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(JobCount {
                    status: JobStatus::parse(&r.status)
                        .map_err(|e| PgError::Corrupt(e.to_string()))?,
                    profile: r.profile,
                    count: r.count,
                })
            })
            .collect()
    }

    pub(crate) async fn pg_prune_deliveries(&self, retention: Duration) -> Result<u64, PgError> {
        let done = sqlx::query!(
            "DELETE FROM webhook_deliveries WHERE received_at < $2::timestamptz - make_interval(secs => $1)",
            retention.as_secs_f64(),
            self.clock.now()
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn pg_prune_ledger(
        &self,
        controller_id: &str,
        older_than: Duration,
        batch: i64,
    ) -> Result<Pruned, PgError> {
        // Small batches in short statements: the rows go oldest first
        // along an index, and nothing live waits on a long delete.
        let jobs = sqlx::query!(
            // `= ANY(ARRAY(…))`, not `IN (…)`: the batch is looked up by
            // key, never by a join over the whole table.
            r#"DELETE FROM workflow_jobs WHERE id = ANY(ARRAY(
                   SELECT id FROM workflow_jobs
                   WHERE completed_at < $3::timestamptz - make_interval(secs => $1) AND status = 'completed'
                   ORDER BY completed_at
                   LIMIT $2))"#,
            older_than.as_secs_f64(),
            batch,
            self.clock.now()
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        let runners = sqlx::query!(
            r#"DELETE FROM runners WHERE name = ANY(ARRAY(
                   SELECT name FROM runners
                   WHERE controller_id = $1
                     AND state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                                   'interrupted', 'orphaned')
                     AND updated_at < $4::timestamptz - make_interval(secs => $2)
                   ORDER BY updated_at
                   LIMIT $3))"#,
            controller_id,
            older_than.as_secs_f64(),
            batch,
            self.clock.now()
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(Pruned { jobs, runners })
    }

    pub(crate) async fn pg_ping(&self) -> Result<(), PgError> {
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        .map_err(|_| PgError::Timeout)??;
        Ok(())
    }

    pub(crate) async fn pg_unmatched_open_jobs(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<String>, String)>, PgError> {
        let rows = sqlx::query!(
            r#"SELECT id, labels, repository FROM workflow_jobs
               WHERE status IN ('waiting', 'queued') AND profile IS NULL
               ORDER BY first_seen_at LIMIT $1"#,
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.id, r.labels, r.repository))
            .collect())
    }

    pub(crate) async fn pg_set_job_profile(
        &self,
        job_id: i64,
        profile: Result<&str, &str>,
    ) -> Result<(), PgError> {
        let (p, e) = match profile {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        sqlx::query!(
            "UPDATE workflow_jobs SET profile = $2, match_error = $3, updated_at = $4::timestamptz WHERE id = $1",
            job_id,
            p,
            e,
            self.clock.now()
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn pg_plan_runners(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, PgError> {
        self.plan_in_tx(controller_id, plan).await
    }

    pub(crate) async fn pg_claim_provisioning(
        &self,
        controller_id: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<RunnerRecord>, PgError> {
        let rows = sqlx::query_as!(
            RunnerRow,
            r#"UPDATE runners SET lease_owner = $2, lease_until = $5::timestamptz + make_interval(secs => $3), updated_at = $5::timestamptz
               WHERE name IN (
                   SELECT name FROM runners
                   WHERE controller_id = $1
                     AND state IN ('requested', 'registered', 'launching')
                     AND (lease_until IS NULL OR lease_until < $5::timestamptz)
                   ORDER BY created_at
                   LIMIT $4
                   FOR UPDATE SKIP LOCKED)
               RETURNING name, profile, state, org, repository, github_runner_id, instance_id,
                         instance_type, subnet_id, market, job_id, launch_attempts,
                         last_error_code, reason, demand_since, created_at, launched_at, online_at, updated_at"#,
            controller_id,
            owner,
            lease.as_secs_f64(),
            limit,
            self.clock.now()
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = records(rows)?;
        out.sort_by_key(|r| r.created_at);
        Ok(out)
    }

    /// Every statement is compare-and-set on the lease and the
    /// provisioning states (`PROVISIONING`), so a provisioner whose lease
    /// lapsed cannot write over a row another replica or a sweep moved on.
    pub(crate) async fn pg_update_runner(
        &self,
        name: &str,
        owner: &str,
        change: RunnerChange,
    ) -> Result<bool, PgError> {
        let now = self.clock.now();
        let done = match change {
            RunnerChange::Registered { github_runner_id } => {
                sqlx::query!(
                    "UPDATE runners SET state = 'registered', github_runner_id = $3, registered_at = $4,
                            updated_at = $4
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($5::text[])",
                    name,
                    owner,
                    github_runner_id,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            RunnerChange::Launching {
                instance_type,
                subnet_id,
                market,
            } => {
                sqlx::query!(
                    "UPDATE runners SET state = 'launching', instance_type = $3, subnet_id = $4, market = $5,
                            launch_attempts = launch_attempts + 1, updated_at = $6
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($7::text[])",
                    name,
                    owner,
                    instance_type,
                    subnet_id,
                    market,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            RunnerChange::AttemptFailed { code, message } => {
                sqlx::query!(
                    "UPDATE runners SET last_error_code = $3, last_error = $4, updated_at = $5
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($6::text[])",
                    name,
                    owner,
                    code,
                    message,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            // A row `settle_jobs` or a listing made busy (or done) before
            // its instance was recorded keeps its state but gets its
            // instance, so it can still be ended; a row that ended meanwhile
            // gets nothing (its instance is an orphan the sweep terminates).
            RunnerChange::Booting {
                instance_id,
                instance_type,
                subnet_id,
                market,
            } => {
                sqlx::query!(
                    "UPDATE runners SET
                            state = CASE WHEN state IN ('busy', 'done') THEN state ELSE 'booting' END,
                            instance_id = $3, instance_type = $4, subnet_id = $5,
                            market = $6, launched_at = $7, lease_owner = NULL, lease_until = NULL,
                            updated_at = $7
                     WHERE name = $1 AND instance_id IS NULL
                       AND ((lease_owner = $2 AND state = ANY($8::text[]))
                            OR state IN ('busy', 'done'))",
                    name,
                    owner,
                    instance_id,
                    instance_type,
                    subnet_id,
                    market,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            RunnerChange::Ended { state, code, reason } => {
                sqlx::query!(
                    "UPDATE runners SET state = $3, last_error_code = COALESCE($4, last_error_code), reason = $5,
                            terminated_at = COALESCE(terminated_at, $6), lease_owner = NULL, lease_until = NULL,
                            updated_at = $6
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($7::text[])",
                    name,
                    owner,
                    state.as_str(),
                    code,
                    reason,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            RunnerChange::Postpone { retry_in } => {
                sqlx::query!(
                    "UPDATE runners SET lease_until = $4::timestamptz + make_interval(secs => $3), updated_at = $4
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($5::text[])",
                    name,
                    owner,
                    retry_in.as_secs_f64(),
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
            RunnerChange::Requeue => {
                sqlx::query!(
                    "UPDATE runners SET state = 'requested', github_runner_id = NULL, updated_at = $3
                     WHERE name = $1 AND lease_owner = $2
                       AND state = ANY($4::text[])",
                    name,
                    owner,
                    now,
                    &state_list(&PROVISIONING)
                )
                .execute(&self.pool)
                .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn pg_fleet_counts(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<FleetCount>, PgError> {
        // The rows of `pg_runners`, counted in the database.
        let rows = sqlx::query!(
            r#"SELECT profile AS "profile!", state AS "state!", market,
                      instance_id IS NOT NULL AS "with_instance!", count(*) AS "runners!"
               FROM (
                   SELECT profile, state, market, instance_id FROM runners
                   WHERE controller_id = $1
                     AND state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                                   'done', 'terminating')
                   UNION ALL
                   SELECT profile, state, market, instance_id FROM runners
                   WHERE controller_id = $1
                     AND state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                                   'interrupted', 'orphaned')
                     AND updated_at > $3::timestamptz - make_interval(secs => $2)
               ) r
               GROUP BY 1, 2, 3, 4"#,
            controller_id,
            ended_within.as_secs_f64(),
            self.clock.now()
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(FleetCount {
                    state: runner_state(&r.state)?,
                    profile: r.profile,
                    market: r.market,
                    with_instance: r.with_instance,
                    runners: usize::try_from(r.runners).unwrap_or(0),
                })
            })
            .collect()
    }

    pub(crate) async fn pg_runners(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerRecord>, PgError> {
        let rows = sqlx::query_as!(
            RunnerRow,
            // Live rows, then recently ended ones: one partial index each
            // (see the ledger_retention migration), however many rows ended
            // long ago.
            r#"SELECT name AS "name!", profile AS "profile!", state AS "state!", org, repository,
                      github_runner_id, instance_id, instance_type, subnet_id, market, job_id,
                      launch_attempts AS "launch_attempts!", last_error_code, reason, demand_since,
                      created_at AS "created_at!", launched_at, online_at, updated_at AS "updated_at!"
               FROM (
                   SELECT * FROM runners
                   WHERE controller_id = $1
                     AND state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                                   'done', 'terminating')
                   UNION ALL
                   SELECT * FROM runners
                   WHERE controller_id = $1
                     AND state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                                   'interrupted', 'orphaned')
                     AND updated_at > $3::timestamptz - make_interval(secs => $2)
               ) r
               ORDER BY created_at"#,
            controller_id,
            ended_within.as_secs_f64(),
            self.clock.now()
        )
        .fetch_all(&self.pool)
        .await?;
        records(rows)
    }

    pub(crate) async fn pg_runner_scopes(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerScope>, PgError> {
        let rows = sqlx::query!(
            r#"SELECT org, repository FROM runners
               WHERE controller_id = $1
                 AND state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                               'done', 'terminating')
               UNION
               SELECT org, repository FROM runners
               WHERE controller_id = $1
                 AND state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                               'interrupted', 'orphaned')
                 AND updated_at > $3::timestamptz - make_interval(secs => $2)"#,
            controller_id,
            ended_within.as_secs_f64(),
            self.clock.now()
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| scope_of(r.org, r.repository))
            .collect())
    }

    pub(crate) async fn pg_settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, PgError> {
        self.settle_jobs_tx(controller_id).await
    }

    pub(crate) async fn pg_renew_leases(
        &self,
        names: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<u64, PgError> {
        let done = sqlx::query!(
            "UPDATE runners SET lease_until = $4::timestamptz + make_interval(secs => $3)
             WHERE name = ANY($1) AND lease_owner = $2 AND state = ANY($5::text[])",
            names,
            owner,
            lease.as_secs_f64(),
            self.clock.now(),
            &state_list(&PROVISIONING)
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn pg_mark_online(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, PgError> {
        let done = sqlx::query!(
            "UPDATE runners SET state = 'idle', online_at = COALESCE(online_at, $2), updated_at = $3
             WHERE name = ANY($1) AND controller_id = $4 AND state = ANY($5::text[])",
            names,
            at,
            self.clock.now(),
            controller_id,
            &state_list(&LISTED_ONLINE)
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn pg_mark_busy(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, PgError> {
        let done = sqlx::query!(
            "UPDATE runners SET state = 'busy', online_at = COALESCE(online_at, $2),
                    busy_at = COALESCE(busy_at, $2), updated_at = $3
             WHERE name = ANY($1) AND controller_id = $4 AND state = ANY($5::text[])",
            names,
            at,
            self.clock.now(),
            controller_id,
            &state_list(&LISTED_BUSY)
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn pg_end_runner_if(
        &self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
    ) -> Result<bool, PgError> {
        let done = sqlx::query!(
            "UPDATE runners SET state = $3, reason = $4, terminated_at = COALESCE(terminated_at, $5::timestamptz),
                    lease_owner = NULL, lease_until = NULL, updated_at = $5::timestamptz
             WHERE name = $1 AND state = $2",
            name,
            expected.as_str(),
            state.as_str(),
            reason,
            self.clock.now()
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn pg_runner_states(
        &self,
        controller_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, RunnerState>, PgError> {
        // The live ones first, through their partial index: asked for a
        // whole listing's names at once (thousands), PostgreSQL would rather
        // read every ended runner of the month than probe the primary key
        // for each. The rest — ended or unknown, a few — by name.
        let live = sqlx::query!(
            "SELECT name, state FROM runners
             WHERE controller_id = $1
               AND state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                             'done', 'terminating')
               AND name = ANY($2)",
            controller_id,
            names
        )
        .fetch_all(&self.pool)
        .await?;
        let mut states = BTreeMap::new();
        for r in live {
            states.insert(r.name, runner_state(&r.state)?);
        }
        let rest: Vec<String> = names
            .iter()
            .filter(|n| !states.contains_key(*n))
            .cloned()
            .collect();
        if rest.is_empty() {
            return Ok(states);
        }
        let ended = sqlx::query!(
            "SELECT name, state FROM runners WHERE controller_id = $1 AND name = ANY($2)",
            controller_id,
            &rest
        )
        .fetch_all(&self.pool)
        .await?;
        for r in ended {
            states.insert(r.name, runner_state(&r.state)?);
        }
        Ok(states)
    }

    pub(crate) async fn pg_demand(&self) -> Result<BTreeMap<String, Demand>, PgError> {
        let mut conn = self.pool.acquire().await?;
        load_demand(&mut conn, self.clock.now()).await
    }

    pub(crate) async fn pg_stale_jobs(
        &self,
        cutoffs: &StaleCutoffs,
        idle_profiles: &[String],
        limit: i64,
    ) -> Result<Vec<StaleJob>, PgError> {
        // StaleCutoffs::due, as SQL.
        let rows = sqlx::query_as!(
            StaleJob,
            r#"SELECT id, repository, profile, first_seen_at FROM workflow_jobs
               WHERE status = 'queued'
                 AND ((profile = ANY($1) AND first_seen_at < $2
                       AND (checked_at IS NULL OR checked_at < $3))
                   OR (first_seen_at < $4 AND (checked_at IS NULL OR checked_at < $5)))
               ORDER BY checked_at NULLS FIRST, first_seen_at, id
               LIMIT $6"#,
            idle_profiles,
            cutoffs.suspect_seen_before,
            cutoffs.suspect_checked_before,
            cutoffs.backlog_seen_before,
            cutoffs.backlog_checked_before,
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn pg_record_job_check(
        &self,
        job_id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
    ) -> Result<(), PgError> {
        let (status, conclusion, runner_name) = match check {
            JobCheck::Queued => (JobStatus::Queued, None, None),
            JobCheck::Started { runner_name } => (JobStatus::InProgress, None, runner_name.clone()),
            JobCheck::Finished {
                conclusion,
                runner_name,
            } => (
                JobStatus::Completed,
                conclusion.clone(),
                runner_name.clone(),
            ),
            JobCheck::Gone => (JobStatus::Completed, Some("gone".to_owned()), None),
        };
        sqlx::query!(
            r#"UPDATE workflow_jobs SET
                   checked_at = $2,
                   status = CASE WHEN job_status_rank($3) > job_status_rank(status) THEN $3 ELSE status END,
                   conclusion = COALESCE(conclusion, $4),
                   runner_name = COALESCE(runner_name, $5),
                   in_progress_at = CASE WHEN $3 IN ('in_progress', 'completed')
                                         THEN COALESCE(in_progress_at, $2) ELSE in_progress_at END,
                   completed_at = CASE WHEN $3 = 'completed' THEN COALESCE(completed_at, $2) ELSE completed_at END,
                   updated_at = $6::timestamptz
               WHERE id = $1"#,
            job_id,
            at,
            status.as_str(),
            conclusion,
            runner_name,
            self.clock.now()
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn pg_try_lead(&self, controller_id: &str) -> Result<bool, PgError> {
        let mut held = self.leader.lock().await;
        if let Some(conn) = held.as_mut() {
            // The lock lives as long as this session does.
            if sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok() {
                return Ok(true);
            }
            *held = None;
        }
        let mut conn = self.pool.acquire().await?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock(hashtextextended('spot-runners:lead:' || $1, 0)) AS "locked!""#,
            controller_id
        )
        .fetch_one(&mut *conn)
        .await?;
        if locked {
            // Kept out of the pool: the lock belongs to this session.
            *held = Some(conn.detach());
        }
        Ok(locked)
    }

    pub(crate) async fn pg_recent_repositories(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, PgError> {
        // Where the runners register comes from the newest job; the two
        // times from all of the window's jobs.
        let rows = sqlx::query_as!(
            RecentRepository,
            r#"SELECT DISTINCT ON (repository) repository, owner, org, installation_id,
                      max(first_seen_at) OVER w AS "last_job_seen_at!",
                      max(first_seen_at) FILTER (
                          WHERE queued_at IS NULL AND runner_name IS NOT NULL) OVER w AS unqueued_job_seen_at
               FROM workflow_jobs WHERE first_seen_at > $1
               WINDOW w AS (PARTITION BY repository)
               ORDER BY repository, first_seen_at DESC"#,
            since
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub(crate) async fn pg_known_jobs(&self, ids: &[i64]) -> Result<BTreeSet<i64>, PgError> {
        let rows = sqlx::query_scalar!("SELECT id FROM workflow_jobs WHERE id = ANY($1)", ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    pub(crate) async fn pg_job(&self, job_id: i64) -> Result<Option<JobRecord>, PgError> {
        let row = sqlx::query!(
            r#"SELECT id, name, workflow_name, repository, org, labels, status, conclusion, runner_name,
                      profile, match_error, html_url, first_seen_at, queued_at, in_progress_at,
                      completed_at, checked_at,
                      CASE WHEN j.status = 'queued' AND j.profile IS NOT NULL THEN
                          (SELECT count(*) FROM workflow_jobs q
                           WHERE q.status = 'queued' AND q.profile = j.profile
                             AND (q.first_seen_at, q.id) <= (j.first_seen_at, j.id))
                      END AS queue_position
               FROM workflow_jobs j WHERE id = $1"#,
            job_id
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(JobRecord {
                status: JobStatus::parse(&r.status).map_err(|e| PgError::Corrupt(e.to_string()))?,
                id: r.id,
                name: r.name,
                workflow_name: r.workflow_name,
                repository: r.repository,
                org: r.org,
                labels: r.labels,
                conclusion: r.conclusion,
                runner_name: r.runner_name,
                profile: r.profile,
                match_error: r.match_error,
                html_url: r.html_url,
                first_seen_at: r.first_seen_at,
                queued_at: r.queued_at,
                in_progress_at: r.in_progress_at,
                completed_at: r.completed_at,
                checked_at: r.checked_at,
                queue_position: r
                    .queue_position
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            })
        })
        .transpose()
    }

    pub(crate) async fn pg_known_deliveries(
        &self,
        guids: &[String],
    ) -> Result<BTreeSet<String>, PgError> {
        let known: Vec<String> = sqlx::query_scalar(
            "SELECT delivery_id FROM webhook_deliveries WHERE delivery_id = ANY($1)",
        )
        .bind(guids)
        .fetch_all(&self.pool)
        .await?;
        Ok(known.into_iter().collect())
    }

    pub(crate) async fn pg_notify_wake(&self) -> Result<(), PgError> {
        sqlx::query!("SELECT pg_notify($1, '')", WAKE_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn pg_record_workflow_run(
        &self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
    ) -> Result<DeliveryOutcome, PgError> {
        survival::record_workflow_run(&self.pool, delivery_id, run, self.clock.now()).await
    }

    pub(crate) async fn pg_record_run_check(
        &self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
    ) -> Result<(), PgError> {
        survival::record_run_check(&self.pool, run, at, self.clock.now()).await
    }

    pub(crate) async fn pg_mark_run_checked(
        &self,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
    ) -> Result<(), PgError> {
        survival::mark_run_checked(&self.pool, run_id, repository, at, self.clock.now()).await
    }

    pub(crate) async fn pg_record_interruption(
        &self,
        interruption: &Interruption,
    ) -> Result<bool, PgError> {
        survival::record_interruption(&self.pool, interruption, self.clock.now()).await
    }

    pub(crate) async fn pg_job_of_runner(&self, runner_name: &str) -> Result<Option<i64>, PgError> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM workflow_jobs WHERE runner_name = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(runner_name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    pub(crate) async fn pg_link_reruns(&self) -> Result<u64, PgError> {
        survival::link_reruns(&self.pool, self.clock.now()).await
    }

    pub(crate) async fn pg_runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, PgError> {
        survival::runs_awaiting_reruns(&self.pool, now, limit).await
    }

    pub(crate) async fn pg_run_jobs(&self, run_id: i64) -> Result<Vec<RunJob>, PgError> {
        survival::run_jobs(&self.pool, run_id).await
    }

    pub(crate) async fn pg_set_rerun_outcome(
        &self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), PgError> {
        survival::set_rerun_outcome(&self.pool, job_ids, outcome, at, self.clock.now()).await
    }

    pub(crate) async fn pg_rerun_attempts(&self, job_id: i64) -> Result<i32, PgError> {
        survival::rerun_attempts(&self.pool, job_id).await
    }

    pub(crate) async fn pg_job_survival(
        &self,
        job_id: i64,
    ) -> Result<Option<JobSurvival>, PgError> {
        survival::job_survival(&self.pool, job_id).await
    }

    pub(crate) async fn pg_choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: MarketFn,
    ) -> Result<(Market, String), PgError> {
        survival::choose_runner_market(
            &self.pool,
            controller_id,
            runner_name,
            profile,
            query,
            decide,
            self.clock.now(),
        )
        .await
    }

    pub(crate) async fn pg_interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, PgError> {
        survival::interruptions_since(&self.pool, controller_id, since).await
    }
}

/// A runner row as selected; converted into [`RunnerRecord`].
struct RunnerRow {
    name: String,
    profile: String,
    state: String,
    org: Option<String>,
    repository: Option<String>,
    github_runner_id: Option<i64>,
    instance_id: Option<String>,
    instance_type: Option<String>,
    subnet_id: Option<String>,
    market: Option<String>,
    job_id: Option<i64>,
    launch_attempts: i32,
    last_error_code: Option<String>,
    reason: Option<String>,
    demand_since: Option<chrono::DateTime<chrono::Utc>>,
    created_at: chrono::DateTime<chrono::Utc>,
    launched_at: Option<chrono::DateTime<chrono::Utc>>,
    online_at: Option<chrono::DateTime<chrono::Utc>>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl TryFrom<RunnerRow> for RunnerRecord {
    type Error = PgError;

    fn try_from(r: RunnerRow) -> Result<Self, PgError> {
        Ok(RunnerRecord {
            state: runner_state(&r.state)?,
            scope: scope_of(r.org, r.repository)
                .ok_or_else(|| PgError::Corrupt(format!("runner {} has no scope", r.name)))?,
            name: r.name,
            profile: r.profile,
            github_runner_id: r.github_runner_id,
            instance_id: r.instance_id,
            instance_type: r.instance_type,
            subnet_id: r.subnet_id,
            market: r.market,
            job_id: r.job_id,
            launch_attempts: r.launch_attempts,
            last_error_code: r.last_error_code,
            reason: r.reason,
            demand_since: r.demand_since,
            created_at: r.created_at,
            launched_at: r.launched_at,
            online_at: r.online_at,
            updated_at: r.updated_at,
        })
    }
}

fn records(rows: Vec<RunnerRow>) -> Result<Vec<RunnerRecord>, PgError> {
    rows.into_iter().map(RunnerRecord::try_from).collect()
}

// The live states ('requested' … 'terminating': those that may still have
// or get an instance) and the ended ones are written out in each query, as
// in the partial indexes of the ledger_retention migration, so the planner
// can use those indexes; `live_states_match_the_domain` keeps the lists honest.

impl PgStore {
    async fn plan_in_tx(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, PgError> {
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock(hashtext('spot-runners:plan:' || $1)) AS "locked!""#,
            controller_id
        )
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let mut open = self.open.lock().await;
        read_open_ledger(&mut tx, controller_id, now, &mut open).await?;
        let mut snapshot = PlanSnapshot {
            demand: open.demand(),
            runners: open.runner_counts(),
        };
        load_warm_scopes(&mut tx, now, &mut snapshot.demand).await?;
        let launches = plan(&snapshot);
        if launches.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let controller =
            ControllerId::parse(controller_id).map_err(|e| PgError::Corrupt(e.to_string()))?;
        // Planned rows need not wait for the disk (every pass waits on this
        // commit): the claim that provisions them commits synchronously
        // first, and a plan lost in a crash is planned again from the
        // same demand.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let (mut names, mut profiles, mut orgs, mut repos, mut since) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut rng = rand::rngs::StdRng::from_entropy();
        for launch in &launches {
            for r in &launch.runners {
                names.push(
                    RunnerName::generate(&controller, &launch.profile, &mut rng)
                        .as_str()
                        .to_owned(),
                );
                profiles.push(launch.profile.to_string());
                let (org, repo) = scope_columns(&r.scope);
                orgs.push(org.map(str::to_owned));
                repos.push(repo.map(str::to_owned));
                since.push(
                    r.covers
                        .and_then(|k| open.queued_since(launch.profile.as_str(), &r.scope, k)),
                );
            }
        }
        let rows = sqlx::query_as!(
            RunnerRow,
            r#"INSERT INTO runners (name, controller_id, profile, state, org, repository, demand_since,
                                   created_at, updated_at)
               SELECT n, $2, p, 'requested', o, r, d, $7::timestamptz, $7::timestamptz
               FROM UNNEST($1::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) AS t(n, p, o, r, d)
               RETURNING name, profile, state, org, repository, github_runner_id, instance_id,
                         instance_type, subnet_id, market, job_id, launch_attempts,
                         last_error_code, reason, demand_since, created_at, launched_at, online_at, updated_at"#,
            &names,
            controller_id,
            &profiles,
            &orgs as &[Option<String>],
            &repos as &[Option<String>],
            &since as &[Option<chrono::DateTime<chrono::Utc>>],
            self.clock.now(),
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        records(rows)
    }
}

impl PgStore {
    /// Carries what `in_progress` and `completed` deliveries said over to
    /// our runners: the runner GitHub gave a job becomes `busy` with that
    /// job; when the job completes it becomes `done`. Returns the runners
    /// that are `done` and still have an instance to terminate.
    async fn settle_jobs_tx(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<chrono::DateTime<chrono::Utc>>)>, PgError> {
        let now = self.clock.now();
        let since = {
            let mark = self
                .settled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match (mark.horizon, mark.last_full) {
                (Some(horizon), Some(full)) if now - full < FULL_SETTLE_EVERY => Some(horizon),
                _ => None,
            }
        };
        let mut tx = self.pool.begin().await?;
        let horizon = read_horizon(&mut tx).await?;
        match since {
            Some(since) => {
                // In two steps, the jobs first: joined in one statement,
                // PostgreSQL may start from the live runners (their count
                // is often far off in its statistics, they come and go so
                // fast) and probe each one's job. Planned for the actual
                // horizon each time (not a generic plan, which guesses a
                // third of the ledger for a range).
                let changed: Vec<(i64, String, bool)> = sqlx::query_as(
                    "SELECT id, runner_name, status = 'completed' FROM workflow_jobs
                     WHERE changed_by >= $1::text::xid8 AND status IN ('in_progress', 'completed')
                       AND runner_name IS NOT NULL",
                )
                .bind(since.to_string())
                .persistent(false)
                .fetch_all(&mut *tx)
                .await?;
                let (completed, started): (Vec<_>, Vec<_>) = changed
                    .into_iter()
                    .partition(|(_, _, completed)| *completed);
                if !started.is_empty() {
                    let (ids, names): (Vec<i64>, Vec<String>) =
                        started.into_iter().map(|(id, name, _)| (id, name)).unzip();
                    sqlx::query!(
                        r#"UPDATE runners r SET state = 'busy', job_id = j.id, busy_at = COALESCE(r.busy_at, $2::timestamptz),
                                  online_at = COALESCE(r.online_at, $2::timestamptz), updated_at = $2::timestamptz
                           FROM UNNEST($3::int8[], $4::text[]) AS j(id, runner_name)
                           WHERE r.name = j.runner_name AND r.controller_id = $1
                             AND r.state = ANY($5::text[])"#,
                        controller_id,
                        now,
                        &ids,
                        &names,
                        &state_list(&LISTED_BUSY)
                    )
                    .execute(&mut *tx)
                    .await?;
                }
                if !completed.is_empty() {
                    let (ids, names): (Vec<i64>, Vec<String>) = completed
                        .into_iter()
                        .map(|(id, name, _)| (id, name))
                        .unzip();
                    sqlx::query!(
                        r#"UPDATE runners r SET state = 'done', job_id = j.id, done_at = $2::timestamptz, updated_at = $2::timestamptz
                           FROM UNNEST($3::int8[], $4::text[]) AS j(id, runner_name)
                           WHERE r.name = j.runner_name AND r.controller_id = $1
                             AND r.state = ANY($5::text[])"#,
                        controller_id,
                        now,
                        &ids,
                        &names,
                        &state_list(&RUNNING)
                    )
                    .execute(&mut *tx)
                    .await?;
                }
            }
            None => {
                sqlx::query!(
                    r#"UPDATE runners r SET state = 'busy', job_id = j.id, busy_at = COALESCE(r.busy_at, $2::timestamptz),
                              online_at = COALESCE(r.online_at, $2::timestamptz), updated_at = $2::timestamptz
                       FROM workflow_jobs j
                       WHERE r.controller_id = $1 AND j.runner_name = r.name AND j.status = 'in_progress'
                         AND r.state IN ('launching', 'booting', 'idle')"#,
                    controller_id,
                    now
                )
                .execute(&mut *tx)
                .await?;
                // From the live runners to their jobs, one index probe each:
                // joined the other way round, PostgreSQL reads every
                // completed job of the month.
                sqlx::query!(
                    r#"WITH done AS MATERIALIZED (
                           SELECT r.name, j.id FROM runners r
                           CROSS JOIN LATERAL (
                               SELECT id FROM workflow_jobs j
                               WHERE j.runner_name = r.name AND j.status = 'completed'
                               ORDER BY j.completed_at DESC NULLS LAST
                               LIMIT 1) j
                           WHERE r.controller_id = $1 AND r.state IN ('launching', 'booting', 'idle', 'busy'))
                       UPDATE runners r SET state = 'done', job_id = d.id, done_at = $2::timestamptz, updated_at = $2::timestamptz
                       FROM done d
                       WHERE r.name = d.name AND r.state IN ('launching', 'booting', 'idle', 'busy')"#,
                    controller_id,
                    now
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        let claimed = sqlx::query_as!(
            RunnerRow,
            r#"UPDATE runners SET state = 'terminating', terminating_at = $2::timestamptz, updated_at = $2::timestamptz
               WHERE controller_id = $1 AND state = 'done' AND instance_id IS NOT NULL
               RETURNING name, profile, state, org, repository, github_runner_id, instance_id,
                         instance_type, subnet_id, market, job_id, launch_attempts,
                         last_error_code, reason, demand_since, created_at, launched_at, online_at, updated_at"#,
            controller_id,
            self.clock.now()
        )
        .fetch_all(&mut *tx)
        .await?;
        let jobs: Vec<i64> = claimed.iter().filter_map(|r| r.job_id).collect();
        let completed = sqlx::query!(
            "SELECT id, completed_at FROM workflow_jobs WHERE id = ANY($1)",
            &jobs
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        {
            let mut mark = self
                .settled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            mark.horizon = Some(horizon);
            if since.is_none() {
                mark.last_full = Some(now);
            }
        }
        let mut out = Vec::new();
        for rec in records(claimed)? {
            let at = completed
                .iter()
                .find(|j| Some(j.id) == rec.job_id)
                .and_then(|j| j.completed_at);
            out.push((rec, at));
        }
        Ok(out)
    }
}

/// Queued jobs per profile, counted by scope, and where each profile's warm
/// pool registers: the scope of its latest job.
async fn load_demand(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<BTreeMap<String, Demand>, PgError> {
    let mut demand: BTreeMap<String, Demand> = BTreeMap::new();
    // A job's scope is its org when it has one, else its repository.
    let queued = sqlx::query!(
        r#"SELECT profile AS "profile!", org, CASE WHEN org IS NULL THEN repository END AS repository,
                  count(*) AS "jobs!", min(first_seen_at) AS "oldest!"
               FROM workflow_jobs
               WHERE status = 'queued' AND profile IS NOT NULL
               GROUP BY 1, 2, 3"#
    )
    .fetch_all(&mut *conn)
    .await?;
    for q in queued {
        let Some(scope) = scope_of(q.org, q.repository) else {
            continue;
        };
        demand.entry(q.profile).or_default().queued.insert(
            scope,
            Queue {
                jobs: usize::try_from(q.jobs).unwrap_or(0),
                oldest: q.oldest,
            },
        );
    }
    load_warm_scopes(conn, now, &mut demand).await?;
    Ok(demand)
}

/// Warm pools register where the profile's latest job came from: one index
/// probe per profile, not a pass over a month of jobs.
async fn load_warm_scopes(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    demand: &mut BTreeMap<String, Demand>,
) -> Result<(), PgError> {
    let latest = sqlx::query!(
        r#"SELECT p.name AS "profile!", j.org, j.repository AS "repository!"
               FROM instance_profiles p
               CROSS JOIN LATERAL (
                   SELECT org, repository FROM workflow_jobs
                   WHERE profile = p.name AND first_seen_at > $1::timestamptz - interval '30 days'
                   ORDER BY first_seen_at DESC
                   LIMIT 1) j"#,
        now
    )
    .fetch_all(&mut *conn)
    .await?;
    for j in latest {
        demand.entry(j.profile).or_default().warm_scope = Some(job_scope(j.org, j.repository));
    }
    Ok(())
}

/// The oldest transaction still running. Read before the rows it goes
/// with: whatever those reads miss was written by a transaction at or past
/// it, so the next read from it (`changed_by >= horizon`) finds it.
async fn read_horizon(conn: &mut PgConnection) -> Result<i64, PgError> {
    Ok(
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Brings the open ledger up to date: every open row now and then, else
/// the rows written since its horizon. Unnamed statements, planned for the
/// horizon at hand: a generic plan would guess a third of the table.
async fn read_open_ledger(
    conn: &mut PgConnection,
    controller_id: &str,
    now: DateTime<Utc>,
    open: &mut OpenLedger,
) -> Result<(), PgError> {
    let horizon = read_horizon(conn).await?;
    type Job = (
        i64,
        bool,
        Option<String>,
        Option<String>,
        String,
        DateTime<Utc>,
    );
    type Runner = (String, String, String, Option<String>, Option<String>);
    let read = open.next_read(controller_id, now, FULL_OPEN_READ_EVERY);
    let (jobs, runners): (Vec<Job>, Vec<Runner>) = match read {
        Read::Full => (
            sqlx::query_as(
                "SELECT id, true, profile, org, repository, first_seen_at FROM workflow_jobs
                 WHERE status = 'queued' AND profile IS NOT NULL",
            )
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?,
            sqlx::query_as(
                "SELECT name, profile, state, org, repository FROM runners
                 WHERE controller_id = $1
                   AND state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                                 'done', 'terminating')",
            )
            .bind(controller_id)
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?,
        ),
        Read::Since(since) => (
            sqlx::query_as(
                "SELECT id, status = 'queued', profile, org, repository, first_seen_at
                 FROM workflow_jobs WHERE changed_by >= $1::text::xid8",
            )
            .bind(since.to_string())
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?,
            sqlx::query_as(
                "SELECT name, profile, state, org, repository FROM runners
                 WHERE controller_id = $1 AND changed_by >= $2::text::xid8",
            )
            .bind(controller_id)
            .bind(since.to_string())
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?,
        ),
    };
    let jobs = jobs
        .into_iter()
        .map(
            |(id, queued, profile, org, repository, first_seen_at)| open_ledger::JobRow {
                id,
                queued,
                profile,
                scope: job_scope(org, repository),
                first_seen_at,
            },
        )
        .collect();
    let runners = runners
        .into_iter()
        .map(|(name, profile, state, org, repository)| {
            Ok(open_ledger::RunnerRow {
                name,
                profile,
                state: runner_state(&state)?,
                scope: scope_of(org, repository),
            })
        })
        .collect::<Result<_, PgError>>()?;
    match read {
        Read::Full => open.reset(controller_id, horizon, now, jobs, runners),
        Read::Since(_) => open.apply(horizon, jobs, runners),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use spot_runners_domain::RunnerState;

    #[test]
    fn live_states_match_the_domain() {
        let sql = include_str!("../../../migrations/20261201101000_ledger_retention.sql");
        let live = "'requested', 'registered', 'launching', 'booting', 'idle', 'busy',\n                    'done', 'terminating'";
        assert!(sql.contains(live));
        for state in [
            "requested",
            "registered",
            "launching",
            "booting",
            "idle",
            "busy",
            "done",
            "terminating",
            "terminated",
            "launch_failed",
            "boot_timeout",
            "idle_timeout",
            "interrupted",
            "orphaned",
        ] {
            let parsed = RunnerState::parse(state).unwrap();
            assert_eq!(
                parsed.is_live(),
                live.contains(&format!("'{state}'")),
                "{state}"
            );
        }
    }
}
