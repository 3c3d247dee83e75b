//! Spend: the spot prices refreshed from EC2, the estimated spend gauges,
//! and the daily spend cap's gate.
//!
//! Every replica runs the [`SpendWorker`]: each computes today's spend from
//! the ledger and opens or closes its own [`SpendGate`], which provisioning
//! asks before it launches. Only the sweep leader asks EC2 for spot prices
//! and sets the spend-rate gauge (so summing it over replicas counts each
//! instance once).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::cost::{
    current_spot_prices, spend_rate, summarize, utc_day_start, LiveInstance, PriceKey, PriceTable,
    ReportBy,
};
use spot_runners_domain::ports::Cloud;
use spot_runners_domain::Market;
use spot_runners_store::{PriceRow, Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::profiles::ProfileCache;

pub use spot_runners_domain::cost::SpendGate;

/// Spot prices move slowly (hourly at most); EC2 is asked this often.
pub const PRICE_REFRESH_EVERY: chrono::Duration = chrono::Duration::hours(1);
/// After a failed refresh, the next try.
const PRICE_RETRY_AFTER: chrono::Duration = chrono::Duration::minutes(5);

/// What one pass saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpendReport {
    pub spent_today: f64,
    /// Dollars per hour of live instances (the leader's gauge).
    pub dollars_per_hour: Option<f64>,
    /// Spot prices written from EC2 this pass.
    pub prices_refreshed: Option<u64>,
    pub missing_prices: BTreeSet<PriceKey>,
}

#[derive(Default)]
struct Memory {
    next_refresh: Option<DateTime<Utc>>,
    /// Missing prices already logged: each is logged once.
    warned: BTreeSet<PriceKey>,
}

pub struct SpendWorker {
    store: Arc<dyn Store>,
    cloud: Option<Arc<dyn Cloud>>,
    profiles: ProfileCache,
    metrics: Arc<Metrics>,
    controller_id: String,
    clock: Arc<dyn Clock>,
    gate: SpendGate,
    memory: Mutex<Memory>,
}

impl SpendWorker {
    pub fn new(
        store: Arc<dyn Store>,
        cloud: Option<Arc<dyn Cloud>>,
        profiles: ProfileCache,
        metrics: Arc<Metrics>,
        controller_id: String,
        clock: Arc<dyn Clock>,
        gate: SpendGate,
    ) -> Self {
        metrics
            .daily_spend_cap_dollars
            .set(gate.cap().unwrap_or(0.0));
        Self {
            store,
            cloud,
            profiles,
            metrics,
            controller_id,
            clock,
            gate,
            memory: Mutex::new(Memory::default()),
        }
    }

    /// Passes every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "spend pass failed; the spend gate keeps its last state");
            }
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn pass(&self) -> Result<SpendReport, StoreError> {
        let now = self.clock.now();
        let leader = self.store.try_lead(&self.controller_id).await?;
        let mut report = SpendReport::default();
        if leader {
            report.prices_refreshed = self.refresh_prices(now).await?;
        }
        let prices = price_table(&self.store.prices().await?);

        let day_start = utc_day_start(now);
        let usage = self
            .store
            .usage(&self.controller_id, day_start, now)
            .await?;
        let today = summarize(&usage, &prices, day_start, now, ReportBy::Profile).total;
        report.spent_today = today.cost;
        report.missing_prices.extend(today.missing_prices);
        self.metrics.spend_today_dollars.set(today.cost);
        if self.gate.record_spend_today(today.cost) {
            let cap = self.gate.cap().unwrap_or(0.0);
            if self.gate.allows_launch() {
                tracing::info!(
                    spent_today = today.cost,
                    cap,
                    "below the daily spend cap again: launching resumes"
                );
            } else {
                tracing::warn!(
                    spent_today = today.cost,
                    cap,
                    "daily spend cap reached (SPOT_RUNNERS_MAX_DAILY_SPEND): launching nothing new until 00:00 UTC or a higher cap"
                );
            }
        }
        self.metrics
            .spend_cap_reached
            .set(i64::from(!self.gate.allows_launch()));

        if leader {
            let live: Vec<LiveInstance> = self
                .store
                .runners(&self.controller_id, Duration::ZERO)
                .await?
                .into_iter()
                .filter(|r| r.instance_id.is_some() && !r.state.is_final())
                .filter_map(|r| {
                    Some(LiveInstance {
                        profile: r.profile,
                        instance_type: r.instance_type?,
                        market: Market::parse(r.market.as_deref()?).ok()?,
                    })
                })
                .collect();
            let rate = spend_rate(&live, &prices);
            self.metrics.estimated_spend.reset();
            for ((profile, market), dollars) in &rate.dollars_per_hour {
                self.metrics
                    .estimated_spend
                    .with_label_values(&[profile.as_str(), market.as_str()])
                    .set(*dollars);
            }
            self.metrics
                .unpriced_instances
                .set(i64::try_from(rate.unpriced_instances).unwrap_or(i64::MAX));
            report.dollars_per_hour = Some(rate.dollars_per_hour.values().sum());
            report.missing_prices.extend(rate.missing_prices);
        } else {
            // The leader reports the fleet's rate; a second replica's copy
            // would double it in sum().
            self.metrics.estimated_spend.reset();
            self.metrics.unpriced_instances.set(0);
        }
        self.warn_missing(&report.missing_prices);
        Ok(report)
    }

    /// Asks EC2 for the spot prices of every type a profile names or a live
    /// runner runs, when due. `Some(rows written)` when it asked.
    async fn refresh_prices(&self, now: DateTime<Utc>) -> Result<Option<u64>, StoreError> {
        let Some(cloud) = &self.cloud else {
            return Ok(None);
        };
        if self.memory().next_refresh.is_some_and(|at| now < at) {
            return Ok(None);
        }
        let mut types: BTreeSet<String> = self
            .profiles
            .get()
            .profiles
            .iter()
            .flat_map(|p| p.instance_types.iter().cloned())
            .collect();
        types.extend(
            self.store
                .runners(&self.controller_id, Duration::ZERO)
                .await?
                .into_iter()
                .filter_map(|r| r.instance_type),
        );
        let types: Vec<String> = types.into_iter().collect();
        match cloud.spot_prices(&types).await {
            Ok(samples) => {
                let prices: Vec<(String, f64)> =
                    current_spot_prices(&samples).into_iter().collect();
                let written = self.store.record_spot_prices(&prices).await?;
                tracing::info!(
                    types = types.len(),
                    priced = prices.len(),
                    written,
                    "spot prices refreshed from DescribeSpotPriceHistory"
                );
                self.memory().next_refresh = Some(now + PRICE_REFRESH_EVERY);
                Ok(Some(written))
            }
            Err(e) => {
                tracing::warn!(error = %e, "DescribeSpotPriceHistory failed; spot prices stay as instance_prices has them");
                self.memory().next_refresh = Some(now + PRICE_RETRY_AFTER);
                Ok(None)
            }
        }
    }

    fn warn_missing(&self, missing: &BTreeSet<PriceKey>) {
        let mut memory = self.memory();
        for (instance_type, market) in missing {
            if memory.warned.insert((instance_type.clone(), *market)) {
                tracing::warn!(
                    instance_type = %instance_type,
                    market = %market,
                    "no price in instance_prices: its hours are left out of the spend (and the daily cap) until a row is added (docs/operations.md)"
                );
            }
        }
    }
}

/// The table's rows as prices; a row with an unknown market is skipped
/// (the table's constraint rejects it anyway).
pub fn price_table(rows: &[PriceRow]) -> PriceTable {
    PriceTable::new(rows.iter().filter_map(|r| {
        Market::parse(&r.market)
            .ok()
            .map(|m| (r.instance_type.clone(), m, r.dollars_per_hour))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_is_open_without_a_cap_and_follows_todays_spend_with_one() {
        let open = SpendGate::unlimited();
        assert!(open.allows_launch());
        assert!(!open.record_spend_today(1e9));
        assert!(open.allows_launch());

        let gate = SpendGate::new(Some(50.0));
        assert!(!gate.allows_launch(), "closed until today's spend is known");
        assert!(gate.record_spend_today(10.0), "opening is a change");
        assert!(gate.allows_launch());
        assert!(!gate.record_spend_today(20.0));
        assert!(gate.record_spend_today(50.0));
        assert!(!gate.allows_launch());
        assert!(
            gate.clone().record_spend_today(0.0),
            "clones share the gate"
        );
        assert!(gate.allows_launch());
    }
}
