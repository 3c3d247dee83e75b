//! The reconciler's metrics sink, as the Prometheus families of
//! [`Metrics`] (DESIGN.md, "Metrics": the names are a public contract).

use spot_runners_domain::api_budget::Spending;
use spot_runners_domain::ports::CloudError;
use spot_runners_domain::{Market, RunnerState};
use spot_runners_reconciler::{Fleet, MetricsSink};

use crate::metrics::Metrics;

impl MetricsSink for Metrics {
    fn pass(&self, seconds: f64, ok: bool) {
        self.reconcile_duration_seconds.observe(seconds);
        let outcome = if ok { "ok" } else { "error" };
        self.reconcile_passes_total
            .with_label_values(&[outcome])
            .inc();
    }

    fn launch_attempt(&self, profile: &str, market: Market, result: Result<(), &CloudError>) {
        let outcome = if result.is_ok() { "launched" } else { "failed" };
        self.launches_total
            .with_label_values(&[profile, market.as_str(), outcome])
            .inc();
        if let Err(e) = result {
            self.launch_errors_total
                .with_label_values(&[profile, &e.code])
                .inc();
        }
    }

    fn launch_latency(&self, profile: &str, seconds: f64) {
        self.launch_latency_seconds
            .with_label_values(&[profile])
            .observe(seconds);
    }

    fn reaped(&self, profile: &str, reason: &str) {
        self.reaps_total.with_label_values(&[profile, reason]).inc();
    }

    fn terminate_latency(&self, profile: &str, seconds: f64) {
        self.terminate_latency_seconds
            .with_label_values(&[profile])
            .observe(seconds);
    }

    fn instance_lost(&self, profile: &str, _was: RunnerState, state: RunnerState) {
        self.orphans_total
            .with_label_values(&["ledger_runner"])
            .inc();
        self.reaps_total
            .with_label_values(&[profile, state.as_str()])
            .inc();
    }

    fn interrupted(&self, profile: &str) {
        self.interruptions_total.with_label_values(&[profile]).inc();
    }

    fn reruns(&self, profile: &str, outcome: &str, count: u64) {
        self.reruns_total
            .with_label_values(&[profile, outcome])
            .inc_by(count);
    }

    fn jobs_lost(&self, profile: &str, count: u64) {
        self.jobs_lost_total
            .with_label_values(&[profile])
            .inc_by(count);
    }

    fn spot_breaker(&self, profile: &str, open: bool) {
        self.spot_breaker_open
            .with_label_values(&[profile])
            .set(i64::from(open));
    }

    fn orphans(&self, kind: &str, count: u64) {
        self.orphans_total.with_label_values(&[kind]).inc_by(count);
    }

    fn stale_jobs(&self, outcome: &str, count: u64) {
        self.stale_jobs_total
            .with_label_values(&[outcome])
            .inc_by(count);
    }

    fn fleet(&self, fleet: &Fleet) {
        self.runners.reset();
        self.instances.reset();
        for ((profile, state), n) in &fleet.runners {
            self.runners
                .with_label_values(&[profile, state.as_str()])
                .set(*n);
        }
        for ((profile, market), n) in &fleet.instances {
            self.instances.with_label_values(&[profile, market]).set(*n);
        }
    }

    fn queued(
        &self,
        demand: &std::collections::BTreeMap<String, spot_runners_domain::planner::Demand>,
        profiles: &[spot_runners_domain::Profile],
        now: chrono::DateTime<chrono::Utc>,
    ) {
        self.set_oldest_queued(demand, profiles, now);
    }

    fn invalid_profiles(&self, count: usize) {
        self.invalid_profiles
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn github_spending(&self, spending: Spending) {
        self.github_sweep_spending.set(spending.level());
    }

    fn polled(&self, reason: &str) {
        self.lost_job_polls_total.with_label_values(&[reason]).inc();
    }

    fn redelivered(&self, outcome: &str) {
        self.redeliveries_total.with_label_values(&[outcome]).inc();
    }
}
