//! The reconciler's metrics as the simulator's report counts them: a
//! [`MetricsSink`] that adds up what the production reconciler did.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use spot_runners_domain::ports::{CloudError, CloudErrorKind};
use spot_runners_domain::{Market, RunnerState};
use spot_runners_reconciler::MetricsSink;

/// What the service did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceStats {
    pub deliveries: u64,
    pub duplicates_ignored: u64,
    pub runners_requested: u64,
    pub spot_launches: u64,
    pub on_demand_launches: u64,
    /// `InsufficientInstanceCapacity` and friends, each moving the launch on
    /// to the next candidate.
    pub capacity_errors: u64,
    /// Runners that gave up provisioning (the planner asks again if the
    /// demand is still there).
    pub launch_failures: u64,
    /// Runners ended because their job completed.
    pub terminated_on_completion: u64,
    /// Runners whose instance was reclaimed before they took a job; the
    /// planner replaces them.
    pub relaunches: u64,
    /// Reaps by reason (`boot_timeout`, `idle_timeout`, `max_lifetime`).
    pub reaps: BTreeMap<String, u64>,
    pub stale_checks: u64,
    /// Stale queued jobs that GitHub said had started or finished.
    pub stale_healed: u64,
    /// Queued jobs found by polling GitHub that no delivery announced.
    pub discovered: u64,
    /// Runners ended because their GitHub registration was gone.
    pub registrations_gone: u64,
    /// Jobs the service marked interrupted by a spot reclaim.
    pub interrupted: u64,
    /// Re-runs of interrupted jobs by outcome (`requested`, `retry`,
    /// `waiting`, `lost`, `not_needed`), counted per job.
    pub reruns: BTreeMap<String, u64>,
    /// Interrupted jobs the re-run worker gave up on.
    pub jobs_lost: u64,
    /// Times a profile's spot breaker opened.
    pub breaker_opened: u64,
}

#[derive(Debug, Default)]
pub struct Counters {
    stats: Mutex<ServiceStats>,
    /// Each profile's breaker as last reported, to count openings.
    breakers: Mutex<BTreeMap<String, bool>>,
}

impl Counters {
    pub fn stats(&self) -> ServiceStats {
        crate::lock(&self.stats).clone()
    }

    /// The intake's part: deliveries seen, and those ignored as duplicates.
    pub fn delivered(&self, total: u64, duplicates: u64) {
        let mut s = crate::lock(&self.stats);
        s.deliveries += total;
        s.duplicates_ignored += duplicates;
    }

    fn add(&self, f: impl FnOnce(&mut ServiceStats)) {
        f(&mut crate::lock(&self.stats));
    }
}

impl MetricsSink for Counters {
    fn requested(&self, _profile: &str, count: usize) {
        self.add(|s| s.runners_requested += count as u64);
    }

    fn launch_attempt(&self, _profile: &str, market: Market, result: Result<(), &CloudError>) {
        self.add(|s| match (result, market) {
            (Ok(()), Market::Spot) => s.spot_launches += 1,
            (Ok(()), Market::OnDemand) => s.on_demand_launches += 1,
            (Err(e), _) if e.kind == CloudErrorKind::Capacity => s.capacity_errors += 1,
            (Err(_), _) => {}
        });
    }

    fn launch_failed(&self, _profile: &str, _code: &str) {
        self.add(|s| s.launch_failures += 1);
    }

    fn reaped(&self, _profile: &str, reason: &str) {
        self.add(|s| match reason {
            "completed" => s.terminated_on_completion += 1,
            "registration_gone" => s.registrations_gone += 1,
            other => *s.reaps.entry(other.to_owned()).or_default() += 1,
        });
    }

    fn instance_lost(&self, _profile: &str, was: RunnerState, state: RunnerState) {
        let replaced = state == RunnerState::Interrupted
            && matches!(was, RunnerState::Booting | RunnerState::Idle);
        self.add(|s| s.relaunches += u64::from(replaced));
    }

    fn interrupted(&self, _profile: &str) {
        self.add(|s| s.interrupted += 1);
    }

    fn reruns(&self, _profile: &str, outcome: &str, count: u64) {
        self.add(|s| *s.reruns.entry(outcome.to_owned()).or_default() += count);
    }

    fn jobs_lost(&self, _profile: &str, count: u64) {
        self.add(|s| s.jobs_lost += count);
    }

    fn spot_breaker(&self, profile: &str, open: bool) {
        let was = crate::lock(&self.breakers).insert(profile.to_owned(), open);
        if open && was != Some(true) {
            self.add(|s| s.breaker_opened += 1);
        }
    }

    fn stale_jobs(&self, outcome: &str, count: u64) {
        self.add(|s| match outcome {
            "discovered" => s.discovered += count,
            "still_queued" => s.stale_checks += count,
            _ => {
                s.stale_checks += count;
                s.stale_healed += count;
            }
        });
    }
}
