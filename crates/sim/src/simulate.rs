//! `spot-runners simulate`: a scenario in virtual time, deterministic.
//!
//! It runs on a current-thread tokio runtime whose clock is paused, so a
//! simulated day passes in seconds. There is no database and no HTTP: the
//! [`World`]'s deliveries go to the [`Controller`], a model of the
//! reconciler's IO around the production matching, planner and reaper. The
//! whole production service, with the same world, is `serve --simulate`.
//!
//! Determinism: every generator is seeded from the scenario's seed, maps
//! that reach the report are ordered, one task does everything in a fixed
//! order, and no wall clock is read. Same scenario, same seed: same report.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::{ControllerId, Market};

use crate::arrivals::Arrivals;
use crate::controller::{Controller, ControllerConfig};
use crate::report::{self, Report, STRANDED_AFTER};
use crate::scenario::Scenario;
use crate::sim_clock::SimClock;
use crate::world::{SimJob, World, WorldConfig};
use crate::{FakeCloud, FakeGitHub};

/// The world and the service advance in steps of this much virtual time.
pub const TICK: Duration = Duration::from_secs(1);

/// Where a run stands, for a progress line.
#[derive(Clone, Debug)]
pub struct Progress {
    pub elapsed: Duration,
    pub jobs: u64,
    pub finished: u64,
    pub queued: usize,
    pub live_runners: usize,
}

/// Runs the scenario to its end on a fresh paused-clock runtime.
pub fn run(scenario: &Scenario, progress: &mut dyn FnMut(&Progress)) -> Result<Report, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("starting the simulation runtime: {e}"))?;
    runtime.block_on(run_in_paused_time(scenario, progress))
}

/// Runs the scenario on the current runtime, whose clock must be paused
/// (else it takes as long as the scenario says).
pub async fn run_in_paused_time(
    scenario: &Scenario,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, String> {
    let validated = scenario.validate()?;
    let seed = scenario.seed;
    let clock = SimClock::starting_at(SimClock::virtual_epoch());
    let cloud = FakeCloud::with_seed(seed);
    cloud.set_boot_time(scenario.boot_time.0);
    apply_capacity_rates(scenario, &validated.profiles, &cloud);
    let github = FakeGitHub::with_seed(seed.wrapping_add(1));
    let mut world = World::new(
        cloud.clone(),
        github.clone(),
        WorldConfig {
            org: scenario.org.clone(),
            runner_exit_delay: scenario.github.runner_exit_delay.0,
            failure_report_delay: scenario.github.failure_report_delay.0,
            interruptions_per_hour: scenario.cloud.interruptions_per_hour.clone(),
            faults: scenario.webhooks.clone(),
            seed,
        },
        clock,
        Arrivals::new(scenario.jobs.clone(), &scenario.org, seed),
    );
    let mut service = Controller::new(
        Arc::new(cloud.clone()),
        Arc::new(github.clone()),
        clock,
        validated.profiles.clone(),
        ControllerConfig {
            controller_id: ControllerId::default(),
            max_instances: scenario.max_instances,
            seed,
        },
    );
    let arrivals_end = scenario.duration.0;
    let hard_end = arrivals_end + scenario.drain.0;
    let interval = scenario.reconcile_interval.0;
    let report_every = progress_interval(hard_end);
    let mut stranded = BTreeSet::new();
    let mut next_pass = Duration::ZERO;
    let mut next_report = report_every;
    loop {
        let elapsed = clock.elapsed();
        if elapsed >= arrivals_end {
            world.stop_arrivals();
        }
        let deliveries = world.step();
        for d in &deliveries {
            service.deliver(d);
        }
        let periodic = elapsed >= next_pass;
        if periodic || !deliveries.is_empty() {
            service.pass().await;
        }
        if periodic {
            next_pass = elapsed + interval;
            note_stranded(&world, &service, &mut stranded);
        }
        service.provision().await;
        if elapsed >= next_report {
            next_report += report_every;
            progress(&Progress {
                elapsed,
                jobs: world.stats().jobs,
                finished: world.jobs().filter(|j| j.completed_at.is_some()).count() as u64,
                queued: world.queued().count(),
                live_runners: service.live_runners(),
            });
        }
        let done = elapsed >= arrivals_end && settled(&world, &service);
        if done || elapsed >= hard_end {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    Ok(report::build(&report::Inputs {
        scenario: &scenario.name,
        seed,
        arrivals: arrivals_end,
        world: &world,
        cloud: &cloud,
        profiles: &validated.profiles,
        prices: &validated.prices,
        service: service.stats(),
        stranded: &stranded,
        end: clock.now(),
    }))
}

/// Spot capacity errors by type; `default` covers every other type a
/// profile names.
fn apply_capacity_rates(
    scenario: &Scenario,
    profiles: &[spot_runners_domain::Profile],
    cloud: &FakeCloud,
) {
    let rates = &scenario.cloud.spot_capacity_error_rate;
    let types: BTreeSet<&String> = profiles.iter().flat_map(|p| &p.instance_types).collect();
    for t in types {
        let rate = crate::world::rate_for(rates, t);
        cloud.set_capacity_error_rate(t, Market::Spot, rate);
    }
}

fn progress_interval(total: Duration) -> Duration {
    if total > Duration::from_secs(6 * 3600) {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(600)
    }
}

/// Jobs queued over 5 minutes that the service does not count as demand
/// and that no fitting runner is on its way to: lost, unless something
/// else picks them up.
fn note_stranded(world: &World, service: &Controller, stranded: &mut BTreeSet<i64>) {
    for job in world.queued() {
        if is_stranded(world, service, job) {
            stranded.insert(job.id);
        }
    }
}

fn is_stranded(world: &World, service: &Controller, job: &SimJob) -> bool {
    let now = world.clock().now();
    now.saturating_duration_since(job.queued_at) > STRANDED_AFTER
        && !service.counts_as_demand(job.id)
        && !world.runner_on_the_way(job)
}

/// Nothing left that will ever finish: every job done, or only stranded
/// jobs left queued with nothing running.
fn settled(world: &World, service: &Controller) -> bool {
    if world.is_quiet() {
        return true;
    }
    let running = world
        .jobs()
        .any(|j| j.started_at.is_some() && j.completed_at.is_none());
    !running && world.queued().all(|j| is_stranded(world, service, j))
}
