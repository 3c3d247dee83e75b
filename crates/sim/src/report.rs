//! The end-of-run report of `spot-runners simulate`: per profile, what the
//! jobs waited, what the instances cost and what they idled; then what the
//! service did and what the webhooks suffered. A table for people, JSON
//! (`--json`) for tools. Nothing in it reads the wall clock, and every map
//! is ordered, so the same scenario and seed give the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use spot_runners_domain::{match_profile, Market, Profile};

use crate::counters::ServiceStats;
use crate::duration;
use crate::faults::FaultCounts;
use crate::scenario::Price;
use crate::world::{World, WorldStats};
use crate::FakeCloud;

/// A job queued this long with nothing on its way is stranded.
pub const STRANDED_AFTER: Duration = Duration::from_secs(300);

pub const NOTE: &str = "simulate runs the production reconciler and webhook parser on \
simulated EC2 and GitHub and an in-memory ledger, in virtual time; `serve --simulate` \
runs the whole production service with HTTP and PostgreSQL";

/// Jobs that match no profile are reported under this name.
pub const UNMATCHED: &str = "(unmatched)";

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProfileReport {
    pub jobs: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Still queued or running when the run ended.
    pub unfinished: u64,
    /// Queued → in progress, seconds, over jobs that started.
    pub wait_p50_secs: f64,
    pub wait_p95_secs: f64,
    pub wait_max_secs: f64,
    /// Queued over 5 minutes while the service did not count it as demand
    /// and no fitting runner was on its way.
    pub stranded: u64,
    pub instances: u64,
    pub spot_instance_hours: f64,
    pub on_demand_instance_hours: f64,
    pub cost_dollars: f64,
    /// Instances running with no job.
    pub idle_instance_secs: u64,
    pub interruptions: u64,
    /// Jobs running when a spot reclaim took their instance.
    pub jobs_interrupted: u64,
    /// Of those, re-run (GitHub queued a new attempt of the job).
    pub jobs_rerun: u64,
    /// Interrupted and never re-run.
    pub jobs_lost: u64,
    /// The most re-runs one job had (a re-run can be interrupted too).
    pub max_reruns_per_job: u64,
    /// Re-run jobs that started, and those of them whose runner was
    /// on-demand: demand is counted, not bound, so GitHub may hand a re-run
    /// to an idle spot runner.
    pub reruns_started: u64,
    pub reruns_on_demand: u64,
    /// What the instances that ran re-runs cost.
    pub rerun_cost_dollars: f64,
    /// The same instance-hours priced all at spot, and all at on-demand.
    pub cost_all_spot_dollars: f64,
    pub cost_all_on_demand_dollars: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub note: &'static str,
    /// How long jobs arrived.
    pub arrivals_secs: u64,
    /// The whole run, drain included.
    pub simulated_secs: u64,
    pub profiles: BTreeMap<String, ProfileReport>,
    pub total: ProfileReport,
    pub service: ServiceStats,
    /// Times the reconciler crashed inside a pass, sweep or launch and
    /// restarted on the same ledger (`crashes_per_hour`).
    pub reconciler_crashes: u64,
    pub world: WorldStats,
    pub webhooks: FaultCounts,
    /// `RunInstances`/`TerminateInstances` calls EC2 refused as throttled.
    pub throttled_calls: u64,
}

/// What the report is made from.
pub struct Inputs<'a> {
    pub scenario: &'a str,
    pub seed: u64,
    pub arrivals: Duration,
    pub world: &'a World,
    pub cloud: &'a FakeCloud,
    pub profiles: &'a [Profile],
    pub prices: &'a BTreeMap<String, Price>,
    pub service: &'a ServiceStats,
    pub crashes: u64,
    pub stranded: &'a BTreeSet<i64>,
    pub end: Instant,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn build(inputs: &Inputs<'_>) -> Report {
    let mut profiles: BTreeMap<String, ProfileReport> = inputs
        .profiles
        .iter()
        .map(|p| (p.name.to_string(), ProfileReport::default()))
        .collect();
    let mut waits: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for job in inputs.world.jobs() {
        let name = match_profile(inputs.profiles, &job.spec.labels, &job.spec.repository)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|_| UNMATCHED.to_owned());
        let r = profiles.entry(name.clone()).or_default();
        r.jobs += 1;
        match job.conclusion.as_deref() {
            Some("success") => r.succeeded += 1,
            Some(_) => r.failed += 1,
            None => r.unfinished += 1,
        }
        r.stranded += u64::from(inputs.stranded.contains(&job.id));
        if let Some(w) = job.wait() {
            waits.entry(name).or_default().push(w.as_secs_f64());
        }
    }
    for (name, mut w) in waits {
        w.sort_by(f64::total_cmp);
        let r = profiles.entry(name).or_default();
        r.wait_p50_secs = round2(percentile(&w, 50.0));
        r.wait_p95_secs = round2(percentile(&w, 95.0));
        r.wait_max_secs = round2(w.last().copied().unwrap_or(0.0));
    }
    // What each runner's instance cost, and on which market.
    let mut by_runner: BTreeMap<String, (Market, f64)> = BTreeMap::new();
    for inst in inputs.cloud.instances() {
        let r = profiles.entry(inst.request.profile.clone()).or_default();
        let until = inst.terminated_at.unwrap_or(inputs.end);
        let hours = until
            .saturating_duration_since(inst.launched_at)
            .as_secs_f64()
            / 3600.0;
        let price = inputs
            .prices
            .get(&inst.request.instance_type)
            .copied()
            .unwrap_or(Price {
                spot: 0.0,
                on_demand: 0.0,
            });
        r.instances += 1;
        r.cost_all_spot_dollars += hours * price.spot;
        r.cost_all_on_demand_dollars += hours * price.on_demand;
        let cost = match inst.request.market {
            Market::Spot => {
                r.spot_instance_hours += hours;
                hours * price.spot
            }
            Market::OnDemand => {
                r.on_demand_instance_hours += hours;
                hours * price.on_demand
            }
        };
        r.cost_dollars += cost;
        by_runner.insert(
            inst.request.runner_name.clone(),
            (inst.request.market, cost),
        );
    }
    survival(inputs, &by_runner, &mut profiles);
    for life in inputs.world.instances() {
        let r = profiles.entry(life.profile.clone()).or_default();
        r.idle_instance_secs += life.idle(inputs.end).as_secs();
        r.interruptions += u64::from(life.reclaimed);
    }
    let mut total = ProfileReport::default();
    let mut all_waits = Vec::new();
    for job in inputs.world.jobs() {
        if let Some(w) = job.wait() {
            all_waits.push(w.as_secs_f64());
        }
    }
    all_waits.sort_by(f64::total_cmp);
    for r in profiles.values_mut() {
        r.spot_instance_hours = round2(r.spot_instance_hours);
        r.on_demand_instance_hours = round2(r.on_demand_instance_hours);
        r.cost_dollars = round2(r.cost_dollars);
        r.rerun_cost_dollars = round2(r.rerun_cost_dollars);
        r.cost_all_spot_dollars = round2(r.cost_all_spot_dollars);
        r.cost_all_on_demand_dollars = round2(r.cost_all_on_demand_dollars);
        total.jobs_interrupted += r.jobs_interrupted;
        total.jobs_rerun += r.jobs_rerun;
        total.jobs_lost += r.jobs_lost;
        total.max_reruns_per_job = total.max_reruns_per_job.max(r.max_reruns_per_job);
        total.reruns_started += r.reruns_started;
        total.reruns_on_demand += r.reruns_on_demand;
        total.rerun_cost_dollars += r.rerun_cost_dollars;
        total.cost_all_spot_dollars += r.cost_all_spot_dollars;
        total.cost_all_on_demand_dollars += r.cost_all_on_demand_dollars;
        total.jobs += r.jobs;
        total.succeeded += r.succeeded;
        total.failed += r.failed;
        total.unfinished += r.unfinished;
        total.stranded += r.stranded;
        total.instances += r.instances;
        total.spot_instance_hours += r.spot_instance_hours;
        total.on_demand_instance_hours += r.on_demand_instance_hours;
        total.cost_dollars += r.cost_dollars;
        total.idle_instance_secs += r.idle_instance_secs;
        total.interruptions += r.interruptions;
    }
    total.spot_instance_hours = round2(total.spot_instance_hours);
    total.on_demand_instance_hours = round2(total.on_demand_instance_hours);
    total.cost_dollars = round2(total.cost_dollars);
    total.rerun_cost_dollars = round2(total.rerun_cost_dollars);
    total.cost_all_spot_dollars = round2(total.cost_all_spot_dollars);
    total.cost_all_on_demand_dollars = round2(total.cost_all_on_demand_dollars);
    total.wait_p50_secs = round2(percentile(&all_waits, 50.0));
    total.wait_p95_secs = round2(percentile(&all_waits, 95.0));
    total.wait_max_secs = round2(all_waits.last().copied().unwrap_or(0.0));
    let clock = inputs.world.clock();
    Report {
        scenario: inputs.scenario.to_owned(),
        seed: inputs.seed,
        note: NOTE,
        arrivals_secs: inputs.arrivals.as_secs(),
        simulated_secs: inputs
            .end
            .saturating_duration_since(clock.start())
            .as_secs(),
        profiles,
        total,
        service: inputs.service.clone(),
        reconciler_crashes: inputs.crashes,
        world: inputs.world.stats(),
        webhooks: inputs.world.fault_counts(),
        throttled_calls: inputs.cloud.throttled_count(),
    }
}

/// Interruptions and re-runs as the world saw them (GitHub's truth, not
/// the ledger's), per profile of the job.
fn survival(
    inputs: &Inputs<'_>,
    by_runner: &BTreeMap<String, (Market, f64)>,
    profiles: &mut BTreeMap<String, ProfileReport>,
) {
    let world = inputs.world;
    let rerun: BTreeSet<i64> = world.jobs().filter_map(|j| j.rerun_of).collect();
    for job in world.jobs() {
        let name = match_profile(inputs.profiles, &job.spec.labels, &job.spec.repository)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|_| UNMATCHED.to_owned());
        let r = profiles.entry(name).or_default();
        if job.interrupted {
            r.jobs_interrupted += 1;
            if rerun.contains(&job.id) {
                r.jobs_rerun += 1;
            } else {
                r.jobs_lost += 1;
            }
        }
        if job.rerun_of.is_none() {
            continue;
        }
        let mut depth = 0;
        let mut at = Some(job);
        while let Some(j) = at.and_then(|j| j.rerun_of).and_then(|id| world.job(id)) {
            depth += 1;
            at = Some(j);
        }
        r.max_reruns_per_job = r.max_reruns_per_job.max(depth);
        let Some((market, cost)) = job.runner.as_ref().and_then(|(n, _)| by_runner.get(n)) else {
            continue;
        };
        r.reruns_started += 1;
        r.reruns_on_demand += u64::from(*market == Market::OnDemand);
        r.rerun_cost_dollars += cost;
    }
}

fn secs(s: f64) -> String {
    duration::format(Duration::from_secs_f64(s.max(0.0)))
}

impl Report {
    /// Each profile's row, then the total's.
    fn rows(&self) -> impl Iterator<Item = (&str, &ProfileReport)> {
        self.profiles
            .iter()
            .map(|(n, r)| (n.as_str(), r))
            .chain(std::iter::once(("total", &self.total)))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The report as a table, for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "spot-runners simulate: {} (seed {})",
            self.scenario, self.seed
        );
        let _ = writeln!(
            out,
            "{} of arrivals, {} simulated in all. Note: {}.\n",
            duration::format(Duration::from_secs(self.arrivals_secs)),
            duration::format(Duration::from_secs(self.simulated_secs)),
            self.note
        );
        let _ =
            writeln!(
            out,
            "{:<14} {:>5} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>9} {:>7}",
            "profile", "jobs", "ok", "failed", "unfin", "wait p50", "wait p95", "wait max",
            "stranded", "spot h", "od h", "cost $", "idle h", "reclaim"
        );
        for (name, r) in self.rows() {
            let _ = writeln!(
                out,
                "{:<14} {:>5} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7.2} {:>7.2} {:>8.2} {:>9.2} {:>7}",
                name,
                r.jobs,
                r.succeeded,
                r.failed,
                r.unfinished,
                secs(r.wait_p50_secs),
                secs(r.wait_p95_secs),
                secs(r.wait_max_secs),
                r.stranded,
                r.spot_instance_hours,
                r.on_demand_instance_hours,
                r.cost_dollars,
                r.idle_instance_secs as f64 / 3600.0,
                r.interruptions
            );
        }
        let _ = writeln!(
            out,
            "\n{:<14} {:>7} {:>6} {:>5} {:>7} {:>12} {:>9} {:>8} {:>10} {:>12}",
            "spot survival",
            "interr.",
            "re-run",
            "lost",
            "max/job",
            "re-runs od",
            "re-run $",
            "cost $",
            "all-spot $",
            "all-on-dem $"
        );
        for (name, r) in self.rows() {
            let _ = writeln!(
                out,
                "{:<14} {:>7} {:>6} {:>5} {:>7} {:>12} {:>9.2} {:>8.2} {:>10.2} {:>12.2}",
                name,
                r.jobs_interrupted,
                r.jobs_rerun,
                r.jobs_lost,
                r.max_reruns_per_job,
                format!("{}/{}", r.reruns_on_demand, r.reruns_started),
                r.rerun_cost_dollars,
                r.cost_dollars,
                r.cost_all_spot_dollars,
                r.cost_all_on_demand_dollars
            );
        }
        let s = &self.service;
        let reaps: Vec<String> = s.reaps.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "\nservice:  {} runners requested; {} spot + {} on-demand launches; {} capacity errors; \
             {} launch failures; {} throttled EC2 calls",
            s.runners_requested,
            s.spot_launches,
            s.on_demand_launches,
            s.capacity_errors,
            s.launch_failures,
            self.throttled_calls
        );
        let _ = writeln!(
            out,
            "          {} instances terminated on completed; {} re-launches after spot reclaims; \
             reaps: {}",
            s.terminated_on_completion,
            s.relaunches,
            if reaps.is_empty() {
                "none".to_owned()
            } else {
                reaps.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "          {} stale queued jobs checked with GitHub, {} healed; {} lost queued jobs found by polling; \
             {} runners ended with their registration gone",
            s.stale_checks, s.stale_healed, s.discovered, s.registrations_gone
        );
        let reruns: Vec<String> = s.reruns.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "          {} jobs marked interrupted; re-runs: {}; {} jobs lost; spot breaker opened {} times",
            s.interrupted,
            if reruns.is_empty() {
                "none".to_owned()
            } else {
                reruns.join(", ")
            },
            s.jobs_lost,
            s.breaker_opened
        );
        if self.reconciler_crashes > 0 {
            let _ = writeln!(
                out,
                "          {} reconciler crashes inside a pass, sweep or launch, each restarted on the same ledger",
                self.reconciler_crashes
            );
        }
        let w = &self.world;
        let _ = writeln!(
            out,
            "world:    {} jobs in {} workflow runs ({} of them queued by re-runs); {} spot interruptions; \
             {} jobs failed with their instance; {} instances powered off by their watchdog",
            w.jobs,
            w.workflow_runs,
            w.rerun_jobs,
            w.spot_interruptions,
            w.jobs_killed,
            w.watchdog_shutdowns
        );
        let h = &self.webhooks;
        let _ = writeln!(
            out,
            "webhooks: {} sent; {} lost, {} duplicated ({} ignored as duplicates), \
             {} reordered, {} delayed",
            h.sent, h.lost, h.duplicated, s.duplicates_ignored, h.reordered, h.delayed
        );
        out
    }
}
