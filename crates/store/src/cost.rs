//! The ledger side of cost: the `instance_prices` table and each runner's
//! instance time with the job it ran. Queries are checked at run time
//! against the real PostgreSQL the tests start, like [`crate::survival`].

use chrono::{DateTime, Utc};
use spot_runners_domain::cost::{RerunFate, Usage};
use spot_runners_domain::Market;
use sqlx::PgPool;

use spot_runners_domain::store::{PriceRow, PRICE_SOURCE_EC2, PRICE_SOURCE_OPERATOR};

use crate::PgError;

#[derive(sqlx::FromRow)]
struct PriceRecord {
    instance_type: String,
    market: String,
    dollars_per_hour: f64,
    source: String,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct UsageRow {
    profile: String,
    repository: Option<String>,
    workflow: Option<String>,
    instance_type: Option<String>,
    market: Option<String>,
    started_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    interrupted: bool,
    rerun_state: Option<String>,
}

pub(crate) async fn prices(pool: &PgPool) -> Result<Vec<PriceRow>, PgError> {
    let rows: Vec<PriceRecord> = sqlx::query_as(
        "SELECT instance_type, market, dollars_per_hour, source, updated_at
         FROM instance_prices ORDER BY instance_type, market",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| PriceRow {
            instance_type: r.instance_type,
            market: r.market,
            dollars_per_hour: r.dollars_per_hour,
            source: r.source,
            updated_at: r.updated_at,
        })
        .collect())
}

pub(crate) async fn record_spot_prices(
    pool: &PgPool,
    prices: &[(String, f64)],
) -> Result<u64, PgError> {
    let (types, values): (Vec<String>, Vec<f64>) = prices
        .iter()
        .filter(|(_, p)| p.is_finite() && *p >= 0.0)
        .cloned()
        .unzip();
    let done = sqlx::query(
        r#"INSERT INTO instance_prices AS p (instance_type, market, dollars_per_hour, source)
           SELECT t, 'spot', v, $3 FROM unnest($1::text[], $2::float8[]) AS u(t, v)
           ON CONFLICT (instance_type, market) DO UPDATE
               SET dollars_per_hour = EXCLUDED.dollars_per_hour, source = EXCLUDED.source
               WHERE p.source <> $4"#,
    )
    .bind(&types)
    .bind(&values)
    .bind(PRICE_SOURCE_EC2)
    .bind(PRICE_SOURCE_OPERATOR)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Every runner of `controller_id` whose instance ran at some time in
/// `[from, to)`, with the job it ran and whether a reclaim interrupted it.
pub(crate) async fn usage(
    pool: &PgPool,
    controller_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Usage>, PgError> {
    // An ended runner's instance stopped costing when it was terminated;
    // rows that ended without that stamp ended at their last transition.
    let rows: Vec<UsageRow> = sqlx::query_as(
        r#"WITH r AS (
               SELECT name, profile, instance_type, market, job_id, launched_at AS started_at,
                      CASE WHEN state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                                          'interrupted', 'orphaned')
                           THEN COALESCE(terminated_at, updated_at) END AS ended_at
               FROM runners
               WHERE controller_id = $1 AND launched_at IS NOT NULL AND launched_at < $3
                 -- Live, or ended within the window: `updated_at` is written
                 -- with `terminated_at` and only grows after. Keeps the scan
                 -- to the partial indexes, off the millions of old rows.
                 AND (state IN ('requested', 'registered', 'launching', 'booting', 'idle', 'busy',
                                'done', 'terminating')
                      OR (state IN ('terminated', 'launch_failed', 'boot_timeout', 'idle_timeout',
                                    'interrupted', 'orphaned') AND updated_at > $2))
           )
           SELECT r.profile, COALESCE(j.repository, i.repository) AS repository,
                  COALESCE(j.workflow_name, i.workflow_name) AS workflow,
                  r.instance_type, r.market, r.started_at, r.ended_at,
                  i.id IS NOT NULL AS interrupted, i.rerun_state
           FROM r
           LEFT JOIN workflow_jobs j ON j.id = r.job_id
           LEFT JOIN workflow_jobs i ON i.interrupted_runner = r.name
           WHERE r.ended_at IS NULL OR r.ended_at > $2"#,
    )
    .bind(controller_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let market = r
                .market
                .as_deref()
                .map(Market::parse)
                .transpose()
                .map_err(|e| PgError::Corrupt(e.to_string()))?;
            Ok(Usage {
                profile: r.profile,
                repository: r.repository,
                workflow: r.workflow,
                instance_type: r.instance_type,
                market,
                started_at: r.started_at,
                ended_at: r.ended_at,
                interrupted: r
                    .interrupted
                    .then(|| RerunFate::from_state(r.rerun_state.as_deref())),
            })
        })
        .collect()
}
