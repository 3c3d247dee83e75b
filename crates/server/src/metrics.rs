//! Prometheus metrics (DESIGN.md, "Metrics"). Every family is registered up
//! front so dashboards and alerts can be checked against [`Metrics::names`].

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::Error;

pub struct Metrics {
    registry: Registry,
    pub webhooks_total: IntCounterVec,
    pub webhook_ack_seconds: Histogram,
    pub jobs: IntGaugeVec,
    pub runners: IntGaugeVec,
    pub instances: IntGaugeVec,
    pub estimated_spend: prometheus::GaugeVec,
    pub spend_today_dollars: prometheus::Gauge,
    pub daily_spend_cap_dollars: prometheus::Gauge,
    pub spend_cap_reached: IntGauge,
    pub unpriced_instances: IntGauge,
    pub launches_total: IntCounterVec,
    pub launch_errors_total: IntCounterVec,
    pub job_wait_seconds: HistogramVec,
    pub launch_latency_seconds: HistogramVec,
    pub terminate_latency_seconds: HistogramVec,
    pub reconcile_duration_seconds: Histogram,
    pub reconcile_passes_total: IntCounterVec,
    pub reaps_total: IntCounterVec,
    pub orphans_total: IntCounterVec,
    pub stale_jobs_total: IntCounterVec,
    pub oldest_queued_job_seconds: IntGaugeVec,
    pub invalid_profiles: IntGauge,
    pub github_api_requests_total: IntCounterVec,
    pub github_rate_limit_remaining: IntGauge,
    pub github_sweep_spending: IntGauge,
    pub lost_job_polls_total: IntCounterVec,
    pub redeliveries_total: IntCounterVec,
    pub interruptions_total: IntCounterVec,
    pub reruns_total: IntCounterVec,
    pub jobs_lost_total: IntCounterVec,
    pub spot_breaker_open: IntGaugeVec,
}

const PREFIX: &str = "spot_runners";

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(PREFIX)
        .buckets(buckets.to_vec())
}

/// Seconds, for waits that range from a warm runner to a slow boot.
const WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0,
];
/// Seconds from a queued delivery to RunInstances: milliseconds on the happy
/// path, minutes behind a cap, EC2's rate limit or a GitHub outage.
const LAUNCH_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0, 3600.0,
];
/// Seconds, for work the service does itself.
const FAST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        Ok(Self {
            webhooks_total: reg!(IntCounterVec::new(
                opts("webhooks_total", "Webhook deliveries by event, action and outcome."),
                &["event", "action", "outcome"]
            )?),
            webhook_ack_seconds: reg!(Histogram::with_opts(hist(
                "webhook_ack_seconds",
                "Time from a delivery's arrival to its answer.",
                FAST_BUCKETS
            ))?),
            jobs: reg!(IntGaugeVec::new(
                opts("jobs", "Workflow jobs in the ledger by matched profile and status (completed: last 24 h)."),
                &["profile", "status"]
            )?),
            runners: reg!(IntGaugeVec::new(
                opts("runners", "Runners by profile and lifecycle state."),
                &["profile", "state"]
            )?),
            instances: reg!(IntGaugeVec::new(
                opts("instances", "Live instances by profile and market."),
                &["profile", "market"]
            )?),
            estimated_spend: reg!(prometheus::GaugeVec::new(
                opts("estimated_spend_dollars_per_hour", "Estimated spend of live instances, dollars per hour."),
                &["profile", "market"]
            )?),
            spend_today_dollars: reg!(prometheus::Gauge::with_opts(opts(
                "spend_today_dollars",
                "Estimated spend of this controller's instances since 00:00 UTC, dollars (priced hours only)."
            ))?),
            daily_spend_cap_dollars: reg!(prometheus::Gauge::with_opts(opts(
                "daily_spend_cap_dollars",
                "SPOT_RUNNERS_MAX_DAILY_SPEND (0 when unset: no cap)."
            ))?),
            spend_cap_reached: reg!(IntGauge::with_opts(opts(
                "spend_cap_reached",
                "1 while today's spend is at or past SPOT_RUNNERS_MAX_DAILY_SPEND: nothing new is launched."
            ))?),
            unpriced_instances: reg!(IntGauge::with_opts(opts(
                "unpriced_instances",
                "Live instances whose type and market have no row in instance_prices (left out of the spend)."
            ))?),
            launches_total: reg!(IntCounterVec::new(
                opts("launches_total", "RunInstances attempts by profile, market and outcome."),
                &["profile", "market", "outcome"]
            )?),
            launch_errors_total: reg!(IntCounterVec::new(
                opts("launch_errors_total", "Failed launches by profile and EC2 error code."),
                &["profile", "code"]
            )?),
            job_wait_seconds: reg!(HistogramVec::new(
                hist("job_wait_seconds", "Time from queued to in_progress, by profile.", WAIT_BUCKETS),
                &["profile"]
            )?),
            launch_latency_seconds: reg!(HistogramVec::new(
                hist(
                    "launch_latency_seconds",
                    "Time from a queued delivery's arrival to its instance being requested.",
                    LAUNCH_BUCKETS
                ),
                &["profile"]
            )?),
            terminate_latency_seconds: reg!(HistogramVec::new(
                hist(
                    "terminate_latency_seconds",
                    "Time from a completed delivery's arrival to TerminateInstances.",
                    FAST_BUCKETS
                ),
                &["profile"]
            )?),
            reconcile_duration_seconds: reg!(Histogram::with_opts(hist(
                "reconcile_duration_seconds",
                "Duration of reconcile passes.",
                FAST_BUCKETS
            ))?),
            reconcile_passes_total: reg!(IntCounterVec::new(
                opts("reconcile_passes_total", "Reconcile passes by outcome (ok, error)."),
                &["outcome"]
            )?),
            reaps_total: reg!(IntCounterVec::new(
                opts("reaps_total", "Runners reaped by profile and reason."),
                &["profile", "reason"]
            )?),
            orphans_total: reg!(IntCounterVec::new(
                opts("orphans_total", "Orphans found by kind (instance, github_runner, ledger_runner)."),
                &["kind"]
            )?),
            stale_jobs_total: reg!(IntCounterVec::new(
                opts("stale_jobs_total", "Stale queued jobs checked against GitHub, by outcome."),
                &["outcome"]
            )?),
            oldest_queued_job_seconds: reg!(IntGaugeVec::new(
                opts("oldest_queued_job_seconds", "Age of the oldest queued job, by profile."),
                &["profile"]
            )?),
            invalid_profiles: reg!(IntGauge::with_opts(opts(
                "invalid_profiles",
                "instance_profiles rows that fail validation and are skipped."
            ))?),
            github_api_requests_total: reg!(IntCounterVec::new(
                opts("github_api_requests_total", "GitHub API requests by endpoint and HTTP status."),
                &["endpoint", "status"]
            )?),
            github_rate_limit_remaining: reg!(IntGauge::with_opts(opts(
                "github_rate_limit_remaining",
                "Requests left in GitHub's current rate-limit window."
            ))?),
            github_sweep_spending: reg!(IntGauge::with_opts(opts(
                "github_sweep_spending",
                "How freely sweeps spend GitHub's rate limit: 0 full, 1 lean (suspect polls only, one stale check), 2 essential (no polls, stale checks or run lookups; runners listed once a minute)."
            ))?),
            lost_job_polls_total: reg!(IntCounterVec::new(
                opts(
                    "lost_job_polls_total",
                    "Repositories polled for queued jobs no webhook announced, by reason (suspect, active, quiet)."
                ),
                &["reason"]
            )?),
            redeliveries_total: reg!(IntCounterVec::new(
                opts(
                    "redeliveries_total",
                    "Failed webhook deliveries GitHub was asked to send again, by outcome (requested, failed)."
                ),
                &["outcome"]
            )?),
            interruptions_total: reg!(IntCounterVec::new(
                opts("interruptions_total", "Jobs a spot reclaim interrupted, by profile."),
                &["profile"]
            )?),
            reruns_total: reg!(IntCounterVec::new(
                opts("reruns_total", "Re-runs of interrupted jobs by profile and outcome (requested, retry, waiting, rerun, lost, not_needed)."),
                &["profile", "outcome"]
            )?),
            jobs_lost_total: reg!(IntCounterVec::new(
                opts("jobs_lost_total", "Interrupted jobs given up without a re-run, by profile."),
                &["profile"]
            )?),
            spot_breaker_open: reg!(IntGaugeVec::new(
                opts("spot_breaker_open", "1 while a profile's spot circuit breaker is open (it launches on-demand)."),
                &["profile"]
            )?),
            registry,
        })
    }

    /// `oldest_queued_job_seconds` from the ledger's demand: every profile
    /// with queued jobs, the others at 0 (so a job that starts clears it).
    pub fn set_oldest_queued(
        &self,
        demand: &std::collections::BTreeMap<String, spot_runners_domain::planner::Demand>,
        profiles: &[spot_runners_domain::Profile],
        now: chrono::DateTime<chrono::Utc>,
    ) {
        self.oldest_queued_job_seconds.reset();
        for p in profiles {
            self.oldest_queued_job_seconds
                .with_label_values(&[p.name.as_str()])
                .set(0);
        }
        for (profile, d) in demand {
            if let Some(oldest) = d.oldest() {
                self.oldest_queued_job_seconds
                    .with_label_values(&[profile])
                    .set((now - oldest).num_seconds().max(0));
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Every family's full name, whether or not it has samples yet.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        // Families with labels have no samples until first used and are then
        // missing from gather(); their descriptors are always known.
        for collector in self.collectors() {
            for desc in collector.desc() {
                names.push(desc.fq_name.clone());
            }
        }
        names.sort();
        names.dedup();
        names
    }

    fn collectors(&self) -> Vec<&dyn prometheus::core::Collector> {
        vec![
            &self.webhooks_total,
            &self.webhook_ack_seconds,
            &self.jobs,
            &self.runners,
            &self.instances,
            &self.estimated_spend,
            &self.spend_today_dollars,
            &self.daily_spend_cap_dollars,
            &self.spend_cap_reached,
            &self.unpriced_instances,
            &self.launches_total,
            &self.launch_errors_total,
            &self.job_wait_seconds,
            &self.launch_latency_seconds,
            &self.terminate_latency_seconds,
            &self.reconcile_duration_seconds,
            &self.reconcile_passes_total,
            &self.reaps_total,
            &self.orphans_total,
            &self.stale_jobs_total,
            &self.oldest_queued_job_seconds,
            &self.invalid_profiles,
            &self.github_api_requests_total,
            &self.github_rate_limit_remaining,
            &self.github_sweep_spending,
            &self.lost_job_polls_total,
            &self.redeliveries_total,
            &self.interruptions_total,
            &self.reruns_total,
            &self.jobs_lost_total,
            &self.spot_breaker_open,
        ]
    }
}

impl spot_runners_github::ApiObserver for Metrics {
    fn request(&self, endpoint: &'static str, status: u16) {
        self.github_api_requests_total
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }

    fn rate_limit_remaining(&self, remaining: i64) {
        self.github_rate_limit_remaining.set(remaining);
    }
}
