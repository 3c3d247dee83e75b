//! The reconciler: compares what is wanted (queued demand per profile, plus
//! warm pools) with what exists (runners) and acts on the difference.
//!
//! One implementation, used by `serve`, `serve --simulate`, `simulate` and
//! the tests. It talks to the world only through ports — the [`Store`], the
//! [`Cloud`] and [`GitHub`] traits, a [`Clock`] and a [`MetricsSink`] — so
//! it knows nothing of HTTP, SQL or the simulator.
//!
//! Four loops run side by side ([`Reconciler::run`]):
//! - a *pass* ([`pass`]) is quick and touches only the store: settle jobs
//!   and terminate what completed, re-match, plan, say when the gauges are
//!   due. Every webhook wakes one.
//! - the *gauges* count the fleet and the queue when a pass says they are
//!   due, so no pass waits for those counts.
//! - a *sweep* ([`sweeps`]) compares the ledger with EC2's and GitHub's
//!   listings and repairs the difference. It is slow (GitHub pagination,
//!   stale checks) and runs beside the passes, never in their way.
//! - *provisioning* ([`provision`]) claims `requested` rows with a lease and
//!   drives them to `booting`, paced by the rate limits ([`retry`]), so a
//!   crash anywhere leaves rows the next claim resumes.

mod metrics;
pub mod pass;
mod profiles;
pub mod provision;
pub mod redelivery;
pub mod reruns;
pub mod retry;
pub mod survival;
pub mod sweeps;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spot_runners_domain::api_budget::Spending;
use spot_runners_domain::backoff::Backoffs;
use spot_runners_domain::clock::{Clock, SystemClock};
use spot_runners_domain::cost::SpendGate;
use spot_runners_domain::ports::{Cloud, GitHub, ParameterStore};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::redelivery::Healing;
use spot_runners_domain::scopes::KnownScopes;
use spot_runners_domain::store::{RecentRepository, Store};
use spot_runners_domain::ControllerId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use metrics::{Fleet, MetricsSink, NoMetrics};
pub use pass::PassReport;
pub use profiles::{ProfileCache, ProfileSet};
pub use redelivery::{Redeliverer, ScanReport};
pub use reruns::{RerunReport, RerunWorker};
pub use sweeps::SweepReport;

use crate::retry::Every;

/// Sweeps (GitHub's runner list, orphans, timeouts, stale jobs) run at most
/// this often, however often webhooks wake the reconciler.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The App's installations are listed this often (and on the first sweep).
const INSTALLATIONS_EVERY: Duration = Duration::from_secs(600);

/// The outside world the reconciler acts on.
#[derive(Clone)]
pub struct Backends {
    pub cloud: Arc<dyn Cloud>,
    pub github: Arc<dyn GitHub>,
    /// Where JIT configs wait for their instance (never in user data).
    pub parameters: Arc<dyn ParameterStore>,
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    backends: Backends,
    profiles: ProfileCache,
    metrics: Arc<dyn MetricsSink>,
    controller_id: ControllerId,
    max_instances: u32,
    /// Names this process in provisioning leases.
    owner: String,
    clock: Arc<dyn Clock>,
    /// Jitter for backoffs: seeded, so the simulator replays.
    rng: Mutex<StdRng>,
    rematches: Every,
    gauges: Every,
    polls: Every,
    /// When the week's repositories are read again (`quiet_repositories`).
    quiet_reads: Every,
    installations: Every,
    /// Where runners may be registered before any job said so.
    scopes: KnownScopes,
    /// Profiles whose launches were refused as invalid requests.
    backoffs: Mutex<Backoffs>,
    /// Completed jobs and ended runners older than this are pruned.
    retention: Duration,
    /// Busy runners whose instance carries its job's cost tags already.
    cost_tagged: Mutex<BTreeSet<String>>,
    /// `SPOT_RUNNERS_MAX_DAILY_SPEND`: closed, nothing new is launched.
    spend_gate: SpendGate,
    /// When each recent repository was last polled for lost `queued` jobs.
    polled: Mutex<BTreeMap<String, DateTime<Utc>>>,
    /// Whether redelivery heals failed deliveries (busy repositories are
    /// then polled no more often than quiet ones).
    healing: Arc<Healing>,
    /// Repositories with jobs within the polling window, as last read.
    quiet_repositories: Mutex<Vec<RecentRepository>>,
    /// Sweeps so far; a tight GitHub budget lists runners on some only.
    sweep_count: AtomicU64,
    /// How freely the last sweep spent GitHub's budget.
    spending: Mutex<Spending>,
    /// Runners missing from GitHub's last listings, and since when (one
    /// listing is not proof; see `sweeps::registrations_gone`).
    missing: Mutex<BTreeMap<String, DateTime<Utc>>>,
    launch_bucket: Mutex<TokenBucket>,
    jit_bucket: Mutex<TokenBucket>,
    provision_wake: Notify,
    /// Wakes the gauge task: a pass says when the gauges are due, the task
    /// counts them, so no pass (and no webhook behind it) waits for that.
    gauge_wake: Notify,
}

impl Reconciler {
    pub fn new(
        store: Arc<dyn Store>,
        backends: Backends,
        profiles: ProfileCache,
        metrics: Arc<dyn MetricsSink>,
        controller_id: ControllerId,
        max_instances: u32,
    ) -> Self {
        let mut me = Self {
            store,
            profiles,
            metrics,
            owner: String::new(),
            controller_id,
            max_instances,
            clock: Arc::new(SystemClock),
            rng: Mutex::new(StdRng::from_entropy()),
            rematches: Every::new(SWEEP_EVERY),
            gauges: Every::new(pass::GAUGES_EVERY),
            polls: Every::new(sweeps::POLL_EVERY),
            quiet_reads: Every::new(
                spot_runners_domain::api_budget::QUIET_POLL_EVERY
                    .to_std()
                    .unwrap_or(Duration::MAX),
            ),
            installations: Every::new(INSTALLATIONS_EVERY),
            scopes: KnownScopes::default(),
            backoffs: Mutex::default(),
            retention: Duration::from_secs(30 * 86_400),
            cost_tagged: Mutex::default(),
            spend_gate: SpendGate::unlimited(),
            polled: Mutex::default(),
            healing: Arc::default(),
            quiet_repositories: Mutex::default(),
            sweep_count: AtomicU64::new(0),
            spending: Mutex::new(Spending::Full),
            missing: Mutex::default(),
            launch_bucket: Mutex::new(backends.cloud.launch_limit().client_side()),
            jit_bucket: Mutex::new(backends.github.jit_config_limit()),
            provision_wake: Notify::new(),
            gauge_wake: Notify::new(),
            backends,
        };
        me.name_owner();
        me
    }

    /// Reads time from `clock` instead of the system's.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Keeps completed jobs and ended runners this long (default 30 days).
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Launches only while `gate` allows (the daily spend cap).
    #[must_use]
    pub fn with_spend_gate(mut self, gate: SpendGate) -> Self {
        self.spend_gate = gate;
        self
    }

    /// Shares the scopes known from configuration and webhooks.
    #[must_use]
    pub fn with_scopes(mut self, scopes: KnownScopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// Shares the redelivery scan's record of healing failed deliveries
    /// (see [`redelivery::Redeliverer`]).
    #[must_use]
    pub fn with_healing(mut self, healing: Arc<Healing>) -> Self {
        self.healing = healing;
        self
    }

    /// Draws jitter and the lease owner's name from `seed`, so a run can be
    /// replayed exactly (the simulator does).
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = Mutex::new(StdRng::seed_from_u64(seed));
        self.name_owner();
        self
    }

    fn name_owner(&mut self) {
        let tag: u32 = retry::lock(&self.rng).gen();
        self.owner = format!("{}-{:08x}", self.controller_id, tag);
    }

    pub fn controller_id(&self) -> &ControllerId {
        &self.controller_id
    }

    /// Runs passes on every wake-up and every `interval`, sweeps beside
    /// them at their own pace, and provisions beside both, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        wake: Arc<Notify>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let provisioner = tokio::spawn(Arc::clone(&self).provision_loop(stop.clone()));
        let sweeper = tokio::spawn(Arc::clone(&self).sweep_loop(stop.clone()));
        let gauges = tokio::spawn(Arc::clone(&self).gauge_loop(stop.clone()));
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "reconcile pass failed");
            }
            // Biased, here and in every loop: the simulator replays a run
            // only if nothing picks a branch at random.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        let _ = provisioner.await;
        let _ = sweeper.await;
        let _ = gauges.await;
    }

    /// Sweeps every [`SWEEP_EVERY`] until `stop`. A slow GitHub listing or
    /// a burst of stale checks delays the next sweep, never a pass.
    async fn sweep_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "sweep failed");
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
    }
}
