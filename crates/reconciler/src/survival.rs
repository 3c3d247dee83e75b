//! The reconciler's hooks into spot survival: a busy runner's instance
//! reclaimed marks its job interrupted, and each launch's market is chosen
//! from re-run demand, the spot breaker and the job's duration history.
//! The rules are the domain's ([`spot_runners_domain::survival`]); the
//! re-runs themselves are the server's re-run worker's.

use chrono::{DateTime, Utc};
use spot_runners_domain::ports::Instance;
use spot_runners_domain::store::{MarketQuery, RunnerRecord, Store, StoreError};
use spot_runners_domain::survival::{
    attribute, breaker_state, choose_market, Interruption, MarketChoice, MarketInputs, RunnerEnd,
};
use spot_runners_domain::{Market, Profile};

use crate::MetricsSink;

/// How far back interruptions matter to a profile's breaker.
pub fn breaker_horizon(p: &Profile) -> chrono::Duration {
    chrono::Duration::seconds(
        i64::from(p.survival.breaker_window_secs) + i64::from(p.survival.breaker_cooldown_secs),
    )
}

/// Called for each runner whose instance is gone: a busy runner reclaimed
/// by EC2 marks its job interrupted (counted once, however often it is
/// called).
pub async fn attribute_gone(
    store: &dyn Store,
    metrics: &dyn MetricsSink,
    runner: &RunnerRecord,
    instance: Option<&Instance>,
    now: DateTime<Utc>,
) -> Result<Option<Interruption>, StoreError> {
    let job_id = match runner.job_id {
        Some(id) => Some(id),
        None => store.job_of_runner(&runner.name).await?,
    };
    let Some(job_id) = job_id else {
        return Ok(None);
    };
    let job = store.job(job_id).await?;
    let end = RunnerEnd {
        runner_name: &runner.name,
        state: runner.state,
        job_id: Some(job_id),
        job_conclusion: job.as_ref().and_then(|j| j.conclusion.as_deref()),
        job_started_at: job.as_ref().and_then(|j| j.in_progress_at),
        instance_reason: instance.and_then(|i| i.state_reason.as_deref()),
        instance_type: runner.instance_type.as_deref(),
        subnet_id: runner.subnet_id.as_deref(),
        availability_zone: instance.and_then(|i| i.availability_zone.as_deref()),
        market: runner.market.as_deref().and_then(|m| Market::parse(m).ok()),
    };
    let Some(interruption) = attribute(&end, now) else {
        return Ok(None);
    };
    if store.record_interruption(&interruption).await? {
        metrics.interrupted(&runner.profile);
        tracing::warn!(
            job_id, runner = %runner.name, profile = %runner.profile,
            instance_type = ?interruption.instance_type, subnet = ?interruption.subnet_id,
            availability_zone = ?interruption.availability_zone,
            ran_secs = interruption.ran_secs,
            "spot reclaim interrupted a job; it is re-run once its workflow run completes"
        );
    }
    Ok(Some(interruption))
}

/// The market to launch a runner on (re-run demand, breaker, duration
/// history), recorded on the runner row with its reason.
pub async fn choose_runner_market(
    store: &dyn Store,
    controller_id: &str,
    runner: &RunnerRecord,
    profile: &Profile,
    now: DateTime<Utc>,
) -> Result<MarketChoice, StoreError> {
    let p = profile.clone();
    let (market, reason) = store
        .choose_runner_market(
            controller_id,
            &runner.name,
            profile.name.as_str(),
            MarketQuery {
                interruptions_since: now - breaker_horizon(profile),
                with_durations: profile.survival.spot_max_job_minutes.is_some(),
            },
            Box::new(move |facts| {
                let breaker = breaker_state(&p.survival, &facts.interruptions, now);
                choose_market(
                    &p,
                    &MarketInputs {
                        queued: &facts.queued,
                        on_demand_available: facts.on_demand_available,
                        breaker,
                    },
                )
                .map(|choice| (choice.market, choice.reason))
            }),
        )
        .await?;
    Ok(MarketChoice { market, reason })
}
