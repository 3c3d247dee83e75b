//! `spot-runners simulate`: a scenario in virtual time, deterministic.
//!
//! The production reconciler ([`Reconciler`]: passes, sweeps and
//! provisioning, as `serve` runs them) and the production re-run worker
//! ([`RerunWorker`], which re-runs jobs a spot reclaim killed) run against the simulated EC2 and
//! GitHub and an in-memory ledger ([`MemoryStore`]), on a current-thread
//! tokio runtime whose clock is paused, so a simulated day passes in
//! seconds. The [`World`]'s webhook deliveries go through the production
//! webhook parser and matching into the ledger, and wake the reconciler as
//! the HTTP intake does. The whole service with HTTP and PostgreSQL, on the
//! same world, is `serve --simulate`.
//!
//! Determinism: every generator is seeded from the scenario's seed, maps
//! that reach the report are ordered, the runtime has one thread and every
//! `select!` on the reconciler's path is biased, and no wall clock is read.
//! Same scenario, same seed: same report.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::clock::Clock;
use spot_runners_domain::job::ParsedWorkflowJob;
use spot_runners_domain::run::{ParsedWorkflowRun, WorkflowRunEvent};
use spot_runners_domain::store::{DeliveryOutcome, IncomingDelivery, Store};
use spot_runners_domain::{ControllerId, Market, WorkflowJobEvent};
use spot_runners_reconciler::{Backends, ProfileCache, Reconciler, RerunWorker};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::arrivals::Arrivals;
use crate::counters::Counters;
use crate::crash::{Crashes, CrashingCloud, CrashingGitHub, CrashingParameters, CrashingStore};
use crate::payload::Delivery;
use crate::report::{self, Report, STRANDED_AFTER};
use crate::scenario::Scenario;
use crate::sim_clock::SimClock;
use crate::world::{SimJob, World, WorldConfig};
use crate::{FakeCloud, FakeGitHub, FakeParameterStore, MemoryStore};

/// The world advances in steps of this much virtual time.
pub const TICK: Duration = Duration::from_secs(1);
/// A delivery has this long to be committed, as over HTTP.
const INTAKE_BUDGET: Duration = Duration::from_secs(5);

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
#[cfg(feature = "virtual-time")]
pub fn run(scenario: &Scenario, progress: &mut dyn FnMut(&Progress)) -> Result<Report, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("starting the simulation runtime: {e}"))?;
    runtime.block_on(run_in_paused_time(scenario, progress))
}

/// Built without `virtual-time` (a production binary): tokio's clock
/// cannot be paused, so there is no simulated day to run.
#[cfg(not(feature = "virtual-time"))]
pub fn run(_: &Scenario, _: &mut dyn FnMut(&Progress)) -> Result<Report, String> {
    Err("this binary was built without the `simulate` feature \
         (cargo build --features simulate): virtual time needs tokio's test-util"
        .into())
}

impl Clock for SimClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.now_utc()
    }
}

/// The service under simulation: the production reconciler on the fakes
/// and the in-memory ledger, restarted after each crash.
struct Service {
    ledger: MemoryStore,
    session: MemoryStore,
    cloud: FakeCloud,
    github: FakeGitHub,
    parameters: FakeParameterStore,
    profiles: ProfileCache,
    counters: Arc<Counters>,
    crashes: Arc<Crashes>,
    clock: SimClock,
    wake: Arc<Notify>,
    interval: Duration,
    max_instances: u32,
    seed: u64,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Starts an incarnation of the reconciler on a new store session.
    fn start(&mut self, incarnation: u64) {
        self.session = self.ledger.session();
        let point = self.crashes.point(incarnation);
        let store: Arc<dyn Store> = Arc::new(CrashingStore {
            inner: self.session.clone(),
            point: point.clone(),
        });
        let backends = Backends {
            cloud: Arc::new(CrashingCloud {
                inner: self.cloud.clone(),
                point: point.clone(),
            }),
            github: Arc::new(CrashingGitHub {
                inner: self.github.clone(),
                point: point.clone(),
            }),
            parameters: Arc::new(CrashingParameters {
                inner: self.parameters.clone(),
                point,
            }),
        };
        // Beside the reconciler, on the same session, as `serve` runs it:
        // it acts only while this incarnation leads.
        let reruns = RerunWorker::new(
            Arc::clone(&store),
            Arc::clone(&backends.github),
            self.profiles.clone(),
            Arc::clone(&self.counters) as _,
            ControllerId::default().to_string(),
            Arc::new(self.clock),
        );
        let reconciler = Reconciler::new(
            store,
            backends,
            self.profiles.clone(),
            Arc::clone(&self.counters) as _,
            ControllerId::default(),
            self.max_instances,
        )
        .with_clock(Arc::new(self.clock))
        .with_seed(self.seed ^ incarnation.wrapping_mul(0x9e37_79b9));
        self.stop = CancellationToken::new();
        self.tasks = vec![
            tokio::spawn(Arc::new(reconciler).run(
                Arc::clone(&self.wake),
                self.interval,
                self.stop.clone(),
            )),
            tokio::spawn(Arc::new(reruns).run(self.interval, self.stop.clone())),
        ];
    }

    /// After a crash: the dead incarnation's session ends (its leadership
    /// goes) and a new one starts.
    fn restart_if_crashed(&mut self) {
        if !self.crashes.crashed() {
            return;
        }
        self.stop.cancel();
        // Its tasks are frozen at an IO call for good; they are not awaited.
        self.tasks.clear();
        self.session.end_session();
        let n = self.crashes.restart();
        tracing::debug!(incarnation = n, "the reconciler restarts");
        self.start(n);
    }

    /// A delivery arrives: parsed by the production parser, matched, and
    /// recorded as the HTTP intake records it; the reconciler is woken when
    /// anything was accepted.
    async fn deliver(&self, deliveries: &[Delivery]) {
        let mut batch = Vec::new();
        let mut duplicates = 0;
        for d in deliveries.iter().filter(|d| d.event == "workflow_run") {
            duplicates += u64::from(self.record_run(d).await == Some(DeliveryOutcome::Duplicate));
        }
        for d in deliveries.iter().filter(|d| d.event == "workflow_job") {
            let Ok(ParsedWorkflowJob::Event(ev)) = WorkflowJobEvent::parse(d.body.as_bytes())
            else {
                continue;
            };
            let profile = self.profiles.match_job(&ev.labels, &ev.repository);
            batch.push(IncomingDelivery {
                delivery_id: d.guid.clone(),
                job: *ev,
                profile,
            });
        }
        let deadline = crate::now() + INTAKE_BUDGET;
        // The ledger itself never crashes: the intake writes to it directly.
        let outcomes = match self.ledger.record_deliveries(&batch, deadline).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "recording deliveries failed");
                return;
            }
        };
        duplicates += outcomes
            .iter()
            .filter(|o| **o == DeliveryOutcome::Duplicate)
            .count() as u64;
        self.counters.delivered(deliveries.len() as u64, duplicates);
        if outcomes.contains(&DeliveryOutcome::Accepted) {
            self.wake.notify_one();
        }
    }

    /// A `workflow_run` delivery, parsed by the production parser and
    /// recorded as the HTTP intake records it (the re-run worker reads it).
    async fn record_run(&self, d: &Delivery) -> Option<DeliveryOutcome> {
        let run = match WorkflowRunEvent::parse(d.body.as_bytes()) {
            Ok(ParsedWorkflowRun::Completed(run)) => run,
            Ok(ParsedWorkflowRun::IgnoredAction(_)) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "simulated workflow_run delivery malformed");
                return None;
            }
        };
        match self.ledger.record_workflow_run(&d.guid, &run).await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "recording a workflow run failed");
                None
            }
        }
    }

    async fn stop(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// Runs the scenario on the current runtime, whose clock must be paused
/// (else it takes as long as the scenario says).
pub async fn run_in_paused_time(
    scenario: &Scenario,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, String> {
    run_scripted(scenario, progress, &mut |_| {}).await
}

/// [`run_in_paused_time`] with `script` acting on the world before each
/// step (tests reclaim chosen instances, fail chosen jobs).
pub async fn run_scripted(
    scenario: &Scenario,
    progress: &mut dyn FnMut(&Progress),
    script: &mut dyn FnMut(&mut World),
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
        world_config(scenario, seed),
        clock,
        Arrivals::new(scenario.jobs.clone(), &scenario.org, seed),
    );
    let ledger = MemoryStore::new(Arc::new(clock), seed);
    let profiles = ProfileCache::default();
    profiles.set(validated.profiles.clone());
    let mut service = Service {
        session: ledger.clone(),
        ledger,
        cloud: cloud.clone(),
        parameters: FakeParameterStore::new(),
        github,
        profiles,
        counters: Arc::new(Counters::default()),
        crashes: Crashes::new(scenario.crashes_per_hour, seed),
        clock,
        wake: Arc::new(Notify::new()),
        interval: scenario.reconcile_interval.0,
        max_instances: scenario.max_instances,
        seed,
        stop: CancellationToken::new(),
        tasks: Vec::new(),
    };
    service.start(0);
    let arrivals_end = scenario.duration.0;
    let hard_end = arrivals_end + scenario.drain.0;
    let interval = scenario.reconcile_interval.0;
    let report_every = progress_interval(hard_end);
    let mut stranded = BTreeSet::new();
    let mut next_check = Duration::ZERO;
    let mut next_report = report_every;
    loop {
        let elapsed = clock.elapsed();
        if elapsed >= arrivals_end {
            world.stop_arrivals();
        }
        script(&mut world);
        let deliveries = world.step();
        if !deliveries.is_empty() {
            service.deliver(&deliveries).await;
        }
        service.restart_if_crashed();
        if elapsed >= next_check {
            next_check = elapsed + interval;
            note_stranded(&world, &service.ledger, &mut stranded);
        }
        if elapsed >= next_report {
            next_report += report_every;
            progress(&Progress {
                elapsed,
                jobs: world.stats().jobs,
                finished: world.jobs().filter(|j| j.completed_at.is_some()).count() as u64,
                queued: world.queued().count(),
                live_runners: service.ledger.live_runners(),
            });
        }
        let done = elapsed >= arrivals_end && settled(&world, &service.ledger);
        if done || elapsed >= hard_end {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    let stats = service.counters.stats();
    let crashes = service.crashes.count();
    service.stop().await;
    Ok(report::build(&report::Inputs {
        scenario: &scenario.name,
        seed,
        arrivals: arrivals_end,
        world: &world,
        cloud: &cloud,
        profiles: &validated.profiles,
        prices: &validated.prices,
        service: &stats,
        crashes,
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

/// Jobs queued over 5 minutes that the ledger does not count as demand
/// and that no fitting runner is on its way to: lost, unless something
/// else picks them up.
fn note_stranded(world: &World, ledger: &MemoryStore, stranded: &mut BTreeSet<i64>) {
    for job in world.queued() {
        if is_stranded(world, ledger, job) {
            stranded.insert(job.id);
        }
    }
}

fn is_stranded(world: &World, ledger: &MemoryStore, job: &SimJob) -> bool {
    let now = world.clock().now();
    now.saturating_duration_since(job.queued_at) > STRANDED_AFTER
        && !ledger.counts_as_demand(job.id)
        && !world.runner_on_the_way(job)
}

/// Nothing left that will ever finish: every job done and no re-run still
/// due, or only stranded jobs left queued with nothing running.
fn settled(world: &World, ledger: &MemoryStore) -> bool {
    if world.is_quiet() {
        return ledger.reruns_pending() == 0;
    }
    let running = world
        .jobs()
        .any(|j| j.started_at.is_some() && j.completed_at.is_none());
    !running && world.queued().all(|j| is_stranded(world, ledger, j))
}

/// How the scenario's world behaves (the simulator and the API-budget
/// benchmark build the same one).
pub(crate) fn world_config(scenario: &Scenario, seed: u64) -> WorldConfig {
    WorldConfig {
        org: scenario.org.clone(),
        runner_exit_delay: scenario.github.runner_exit_delay.0,
        failure_report_delay: scenario.github.failure_report_delay.0,
        interruptions_per_hour: scenario.cloud.interruptions_per_hour.clone(),
        storms: scenario.cloud.storms.clone(),
        faults: scenario.webhooks.clone(),
        seed,
    }
}
