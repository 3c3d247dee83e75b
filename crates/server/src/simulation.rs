//! The simulator's two front doors.
//!
//! - `spot-runners serve --simulate` runs the whole production service —
//!   database, webhook endpoint, reconciler, metrics — against a simulated
//!   EC2 and GitHub in process ([`SimulatedService`]). A simulated world
//!   queues jobs, brings runners online when their instances run, hands
//!   them jobs the way GitHub does, and POSTs the `workflow_job` webhooks,
//!   signed, to the service's own `/webhook`.
//! - `spot-runners simulate` runs a scenario in virtual time with the
//!   production planner, reaper and matching and a model of the
//!   reconciler's IO ([`run_scenario`]; see `spot_runners_sim::simulate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use spot_runners_domain::webhook::{delivery_headers, WebhookSecrets};
use spot_runners_sim::arrivals::{Arrivals, JobKind, JobSpec, Pattern};
use spot_runners_sim::duration::{self, Dur};
use spot_runners_sim::faults::FaultRates;
use spot_runners_sim::payload::Delivery;
use spot_runners_sim::scenario::Scenario;
use spot_runners_sim::sim_clock::SimClock;
use spot_runners_sim::simulate::Progress;
use spot_runners_sim::world::{World, WorldConfig};
use spot_runners_sim::{FakeCloud, FakeGitHub};
use tokio_util::sync::CancellationToken;

use crate::configuration::Settings;
use crate::metrics::Metrics;
use crate::startup::Application;
use crate::Error;
use spot_runners_reconciler::Backends;

/// `serve --simulate`'s knobs: defaults that show the whole loop within a
/// minute.
#[derive(clap::Args, Clone, Debug)]
pub struct SimServeArgs {
    /// Simulated jobs queued per minute (a Poisson stream; 3 in 4 are Kani
    /// proofs, the rest benchmarks).
    #[arg(long, default_value_t = 6.0)]
    pub sim_jobs_per_minute: f64,
    /// Shortest simulated job, seconds.
    #[arg(long, default_value_t = 15)]
    pub sim_min_job_secs: u64,
    /// Longest simulated job, seconds.
    #[arg(long, default_value_t = 45)]
    pub sim_max_job_secs: u64,
    /// From RunInstances until the instance runs and its runner is online.
    #[arg(long, default_value_t = 5)]
    pub sim_boot_secs: u64,
    /// Spot reclaims per running instance-hour.
    #[arg(long, default_value_t = 0.0)]
    pub sim_interruptions_per_hour: f64,
    /// Chance (0-1) that a webhook delivery is lost.
    #[arg(long, default_value_t = 0.0)]
    pub sim_webhook_loss: f64,
    /// Chance (0-1) that a webhook delivery arrives twice (same GUID).
    #[arg(long, default_value_t = 0.0)]
    pub sim_webhook_duplicates: f64,
    /// Seed for the simulated world (default: random).
    #[arg(long)]
    pub sim_seed: Option<u64>,
}

impl Default for SimServeArgs {
    fn default() -> Self {
        Self {
            sim_jobs_per_minute: 6.0,
            sim_min_job_secs: 15,
            sim_max_job_secs: 45,
            sim_boot_secs: 5,
            sim_interruptions_per_hour: 0.0,
            sim_webhook_loss: 0.0,
            sim_webhook_duplicates: 0.0,
            sim_seed: None,
        }
    }
}

/// The two example profiles seeded into an empty `instance_profiles`.
const SEED_PROFILES: &str = "
INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, max_instances)
VALUES ('kani', '{linux,x64,kani}', '{c6i.4xlarge,c6a.4xlarge}', 'ami-0simulated0000000', '{}', 10),
       ('bench', '{linux,x64,bench}', '{c6i.8xlarge}', 'ami-0simulated0000000', '{}', 4)
ON CONFLICT (name) DO NOTHING";

/// How often the world advances and its deliveries are sent.
const STEP: Duration = Duration::from_millis(250);

/// The production service wired to a simulated EC2 and GitHub, with a
/// world feeding it webhooks over HTTP.
pub struct SimulatedService {
    app: Application,
    world: World,
    secrets: WebhookSecrets,
    cloud: FakeCloud,
    github: FakeGitHub,
}

impl SimulatedService {
    /// Builds the service (database, migrations, listener) with simulated
    /// backends, and seeds two example profiles when there are none. A
    /// missing webhook secret is generated: only the simulator signs.
    pub async fn build(mut settings: Settings, args: &SimServeArgs) -> Result<Self, Error> {
        if args.sim_min_job_secs > args.sim_max_job_secs {
            return Err(Error::Config(
                "--sim-min-job-secs is longer than --sim-max-job-secs".into(),
            ));
        }
        for (flag, rate) in [
            ("--sim-webhook-loss", args.sim_webhook_loss),
            ("--sim-webhook-duplicates", args.sim_webhook_duplicates),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(Error::Config(format!("{flag} must be between 0 and 1")));
            }
        }
        let secrets = match settings.webhook_secrets.clone() {
            Some(s) => s,
            None => {
                let secret: String = format!("{:032x}", rand::thread_rng().gen::<u128>());
                WebhookSecrets::from_list(&secret)
                    .ok_or_else(|| Error::Config("generating a webhook secret failed".into()))?
            }
        };
        settings.webhook_secrets = Some(secrets.clone());
        let seed = args.sim_seed.unwrap_or_else(|| rand::thread_rng().gen());
        let cloud = FakeCloud::with_seed(seed);
        cloud.set_boot_time(Duration::from_secs(args.sim_boot_secs));
        let github = FakeGitHub::with_seed(seed.wrapping_add(1));
        let backends = Backends {
            cloud: Arc::new(cloud.clone()),
            github: Arc::new(github.clone()),
            parameters: Arc::new(spot_runners_sim::FakeParameterStore::new()),
        };
        let metrics = Arc::new(Metrics::new()?);
        let app = Application::build_with(settings, metrics, Some(backends)).await?;
        seed_profiles(&app).await?;
        let world = World::new(
            cloud.clone(),
            github.clone(),
            WorldConfig {
                org: "acme".into(),
                runner_exit_delay: Duration::from_secs(10),
                failure_report_delay: Duration::from_secs(30),
                interruptions_per_hour: [("default".to_owned(), args.sim_interruptions_per_hour)]
                    .into(),
                storms: Vec::new(),
                faults: FaultRates {
                    lost: args.sim_webhook_loss,
                    duplicated: args.sim_webhook_duplicates,
                    ..FaultRates::none()
                },
                seed,
            },
            SimClock::starting_at(chrono::Utc::now()),
            job_source(args, seed),
        );
        tracing::info!(
            seed,
            jobs_per_minute = args.sim_jobs_per_minute,
            boot_secs = args.sim_boot_secs,
            "simulating EC2 and GitHub in process; webhooks come from the simulated GitHub"
        );
        Ok(Self {
            app,
            world,
            secrets,
            cloud,
            github,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.app.local_addr()
    }

    pub fn app(&self) -> &Application {
        &self.app
    }

    pub fn cloud(&self) -> &FakeCloud {
        &self.cloud
    }

    pub fn github(&self) -> &FakeGitHub {
        &self.github
    }

    /// Queues a job on the simulated GitHub now (besides the job source's).
    pub fn submit(&mut self, job: JobSpec) -> i64 {
        self.world.submit(job)
    }

    /// Serves, and steps the world beside it, until `shutdown` resolves.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let addr = self.app.local_addr();
        let target = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        let stop = CancellationToken::new();
        let driver = tokio::spawn(drive(
            self.world,
            format!("http://{target}/webhook"),
            self.secrets,
            stop.clone(),
        ));
        let stopping = stop.clone();
        let result = self
            .app
            .run_until_stopped(async move {
                shutdown.await;
                stopping.cancel();
            })
            .await;
        stop.cancel();
        let _ = driver.await;
        result
    }
}

async fn seed_profiles(app: &Application) -> Result<(), Error> {
    let state = app.state();
    let existing = state.store.profile_rows().await?;
    if existing.is_empty() {
        sqlx::query(SEED_PROFILES)
            .execute(app.store().pool())
            .await
            .map_err(|e| Error::Config(format!("seeding the example profiles: {e}")))?;
        tracing::info!(
            "seeded example profiles kani [self-hosted, linux, x64, kani] and \
             bench [self-hosted, linux, x64, bench]"
        );
    }
    state
        .profiles
        .reload(state.store.as_ref(), state.metrics.as_ref())
        .await?;
    Ok(())
}

fn job_source(args: &SimServeArgs, seed: u64) -> Arrivals {
    let per_hour = args.sim_jobs_per_minute.max(0.0) * 60.0;
    let duration = [
        Dur::secs(args.sim_min_job_secs),
        Dur::secs(args.sim_max_job_secs),
    ];
    let kind = |name: &str, label: &str, share: f64| JobKind {
        name: name.into(),
        labels: ["self-hosted", "linux", "x64", label]
            .map(str::to_owned)
            .to_vec(),
        repository: Some(format!("acme/{name}")),
        duration,
        arrivals: vec![Pattern::Steady {
            per_hour: per_hour * share,
        }],
        matrix: 1,
    };
    let mut proofs = kind("proofs", "kani", 0.75);
    if per_hour > 0.0 {
        // Something to watch at once, whatever the stream draws first.
        proofs.arrivals.push(Pattern::Burst {
            at: Dur::secs(2),
            count: 1,
            spread: Dur::default(),
            every: None,
        });
    }
    Arrivals::new(vec![proofs, kind("engine", "bench", 0.25)], "acme", seed)
}

/// Steps the world every [`STEP`] and POSTs its deliveries.
async fn drive(mut world: World, url: String, secrets: WebhookSecrets, stop: CancellationToken) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the simulator's HTTP client");
            return;
        }
    };
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for delivery in world.step() {
            if stop.is_cancelled() {
                return;
            }
            post(&client, &url, &secrets, &delivery).await;
        }
    }
}

/// One delivery, as GitHub sends it.
async fn post(client: &reqwest::Client, url: &str, secrets: &WebhookSecrets, d: &Delivery) {
    let mut request = client.post(url).body(d.body.clone());
    for (name, value) in delivery_headers(d.event, &d.guid, secrets.sign(d.body.as_bytes())) {
        request = request.header(name, value);
    }
    let sent = request.send().await;
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            tracing::warn!(job_id = d.job_id, action = d.action, status = %r.status(), "simulated webhook refused")
        }
        Err(e) => {
            tracing::warn!(job_id = d.job_id, action = d.action, error = %e, "simulated webhook not delivered")
        }
    }
}

/// `spot-runners simulate`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Scenario file (JSON; see examples/). Without one, a built-in
    /// two-hour scenario runs.
    pub scenario: Option<PathBuf>,
    /// Overrides the scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Overrides how long jobs arrive (e.g. 8h, 90m).
    #[arg(long, value_parser = duration::parse)]
    pub duration: Option<Duration>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the scenario faster than real time; returns the report as the
/// table or the JSON to print. `progress` sees the run every simulated ten
/// minutes or hour.
pub fn run_scenario(
    args: &SimulateArgs,
    progress: &mut dyn FnMut(&Progress),
) -> Result<String, Error> {
    let mut scenario = match &args.scenario {
        Some(path) => Scenario::load(path).map_err(|e| Error::Config(e.to_string()))?,
        None => Scenario::built_in(),
    };
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    if let Some(d) = args.duration {
        scenario.duration = Dur(d);
    }
    // The world's own log lines are for `serve --simulate`; here the
    // report says it all.
    let report =
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
            spot_runners_sim::simulate::run(&scenario, progress)
        })
        .map_err(Error::Config)?;
    Ok(if args.json {
        report.to_json()
    } else {
        report.to_table()
    })
}

/// A progress line for stderr.
pub fn progress_line(p: &Progress) -> String {
    format!(
        "simulated {:>7}: {} jobs, {} finished, {} queued, {} runners",
        duration::format(p.elapsed),
        p.jobs,
        p.finished,
        p.queued,
        p.live_runners
    )
}
