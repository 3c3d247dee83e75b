//! What the reconciler reports, as a small sink: the server turns it into
//! Prometheus families (their names are a public contract and live there),
//! the simulator into the counters of its report. Every method has a no-op
//! default, so a sink implements only what it shows.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use spot_runners_domain::api_budget::Spending;
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::CloudError;
use spot_runners_domain::{Market, Profile, RunnerState};

/// Runners by `(profile, state)` and live instances by `(profile, market)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    pub runners: BTreeMap<(String, RunnerState), i64>,
    pub instances: BTreeMap<(String, String), i64>,
}

pub trait MetricsSink: Send + Sync + 'static {
    /// A pass finished, ok or not, after `seconds`.
    fn pass(&self, _seconds: f64, _ok: bool) {}
    /// The planner asked for `count` new runners of `profile`.
    fn requested(&self, _profile: &str, _count: usize) {}
    /// One `RunInstances` attempt and how it went.
    fn launch_attempt(&self, _profile: &str, _market: Market, _result: Result<(), &CloudError>) {}
    /// Queued demand seen → instance requested.
    fn launch_latency(&self, _profile: &str, _seconds: f64) {}
    /// A runner gave up provisioning with this code (the planner makes a
    /// new one if the demand is still there).
    fn launch_failed(&self, _profile: &str, _code: &str) {}
    /// A runner ended for `reason` (`completed`, `boot_timeout`,
    /// `idle_timeout`, `max_lifetime`, `registration_gone`).
    fn reaped(&self, _profile: &str, _reason: &str) {}
    /// `completed` received → instance terminated.
    fn terminate_latency(&self, _profile: &str, _seconds: f64) {}
    /// A runner's instance vanished underneath it (not one the service was
    /// terminating): `state` is `interrupted` for a spot reclaim.
    fn instance_lost(&self, _profile: &str, _was: RunnerState, _state: RunnerState) {}
    /// A spot reclaim interrupted a job of `profile`.
    fn interrupted(&self, _profile: &str) {}
    /// Re-runs of interrupted jobs by outcome (`requested`, `retry`,
    /// `waiting`, `lost`), `count` jobs at once.
    fn reruns(&self, _profile: &str, _outcome: &str, _count: u64) {}
    /// Interrupted jobs given up on: they will not be re-run.
    fn jobs_lost(&self, _profile: &str, _count: u64) {}
    /// The profile's spot breaker as of the re-run worker's last pass.
    fn spot_breaker(&self, _profile: &str, _open: bool) {}
    /// Orphans found and removed, by kind (`instance`, `github_runner`).
    fn orphans(&self, _kind: &str, _count: u64) {}
    /// Stale or lost jobs by outcome (`still_queued`, `started`,
    /// `finished`, `gone`, `discovered`).
    fn stale_jobs(&self, _outcome: &str, _count: u64) {}
    /// The fleet as the ledger has it, refreshed every few seconds.
    fn fleet(&self, _fleet: &Fleet) {}
    /// Queued demand per profile as of `now`, for the age of the oldest
    /// queued job (profiles with none at 0).
    fn queued(
        &self,
        _demand: &BTreeMap<String, Demand>,
        _profiles: &[Profile],
        _now: DateTime<Utc>,
    ) {
    }
    /// Instance-profile rows skipped as invalid.
    fn invalid_profiles(&self, _count: usize) {}
    /// How freely the sweeps spend GitHub's budget, as of the last sweep.
    fn github_spending(&self, _spending: Spending) {}
    /// A repository polled for queued jobs no webhook announced, and why
    /// (`suspect`, `active`, `quiet`).
    fn polled(&self, _reason: &str) {}
    /// A failed webhook delivery GitHub was asked to send again
    /// (`requested`), or a request for it that failed (`failed`).
    fn redelivered(&self, _outcome: &str) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMetrics;

impl MetricsSink for NoMetrics {}
