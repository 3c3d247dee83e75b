//! Fleet benchmark (`scripts/bench-provision`): how fast the service turns
//! webhooks into EC2 calls, measured on the fake EC2 and fake GitHub.
//!
//! The real `Application` (HTTP, ledger writer, reconciler) runs in this
//! process on its own multi-threaded tokio runtime (two workers, as
//! `#[tokio::main]` gets on a 2-vCPU machine), on a real PostgreSQL, with
//! `FakeCloud` and `FakeGitHub` as its backends. A separate single-threaded
//! runtime drives it with signed `workflow_job` deliveries over HTTP, and
//! reads the timings from the fakes' call logs, which stamp every call with
//! the same monotonic clock the driver uses.
//!
//! Scenarios (`--scenario`):
//!
//! - `latency`: queued webhooks at a steady rate (default 100/s for 30 s,
//!   after 2 s of warm-up), no rate limits and no added latency: time from
//!   sending each webhook to the `RunInstances` call that serves it.
//! - `burst`: 500 queued webhooks at once with EC2's and GitHub's documented
//!   limits: time to the last launch against the bound those limits set.
//! - `terminate`: jobs that run on the launched instances. Each instance
//!   "boots" (the fake's boot time), its runner takes the oldest queued job
//!   (an `in_progress` webhook naming it), runs it, and reports it
//!   `completed`: time from `completed` to `TerminateInstances`, and the
//!   instance-seconds wasted per job around it.
//! - `rss`: 1,000 queued jobs, so 1,000 runners are live; then this
//!   process's resident memory.
//! - `all`: every scenario above, `rss` first so that it sees a fresh process.
//!
//! A service never binds a runner to a job (DESIGN.md: "count demand"), so
//! `latency` pairs launches with jobs first-in first-out: the k-th successful
//! launch serves the k-th accepted job in send order.
//!
//! It reports, it does not assert: the exit status is non-zero only when the
//! measurement could not be made. Every scenario prints a table and one
//! `RESULT scenario=… key=value …` line.
//!
//! ```sh
//! cargo run --release -p spot-runners --example bench_fleet -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/postgres --scenario latency
//! ```
//!
//! With `--database-url` (a role that may create databases) each scenario gets
//! a new database there; without it, the test harness's throwaway cluster is
//! used (`spot_runners_store::testing`, which runs with fsync off).

// The report on stdout is this tool's whole purpose.
#![allow(clippy::print_stdout, clippy::print_stderr)]
// Counts and milliseconds are far below 2^52.
#![allow(clippy::cast_precision_loss)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};
use spot_runners::configuration::RawSettings;
use spot_runners::metrics::Metrics;
use spot_runners::startup::Application;
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::webhook::{delivery_headers, sign};
use spot_runners_reconciler::Backends;
use spot_runners_sim::cloud::CloudCall;
use spot_runners_sim::github::GitHubCall;
use spot_runners_sim::{FakeCloud, FakeGitHub};
use spot_runners_store::PgStore;
use sqlx::Connection as _;
use tokio::sync::oneshot;

/// GitHub's official organization example, reshaped per delivery.
const TEMPLATE: &str = include_str!("../tests/fixtures/workflow_job/in_progress-org-1.json");
const SECRET: &str = "bench-fleet-secret";
const PROFILE: &str = "kani";
const LABELS: [&str; 4] = ["self-hosted", "linux", "x64", "kani"];

/// EC2's documented `RunInstances` bucket and GitHub's JIT-config allowance
/// (`TokenBucket::ec2_run_instances`, `TokenBucket::github_jit_configs`):
/// (burst, refill per second). Only used to state the bound.
const EC2_RUN_LIMIT: (f64, f64) = (5.0, 2.0);
const GITHUB_JIT_LIMIT: (f64, f64) = (10.0, 3.0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Latency,
    Burst,
    Terminate,
    Rss,
    All,
}

#[derive(Parser)]
#[command(
    about = "Benchmarks webhook-to-EC2 latency, burst pacing, termination and memory on the fakes"
)]
struct Args {
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// PostgreSQL URL of a role that may create databases; each scenario
    /// creates its own. Unset: the test harness's throwaway cluster.
    #[arg(long, env = "BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The postmaster's pid: its CPU time (with its backends') is reported
    /// beside this process's.
    #[arg(long, env = "BENCH_POSTGRES_PID")]
    postgres_pid: Option<u32>,
    /// Worker threads of the service's runtime.
    #[arg(long, default_value_t = 2)]
    service_threads: usize,

    /// latency: queued webhooks per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// latency: measured seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// latency: seconds of warm-up at the same rate, not counted.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,

    /// latency: also run every job (instances boot in --boot-ms, take the
    /// oldest queued job, run it --job-ms, report it completed and are
    /// terminated), so the ledger stays at a steady state instead of piling
    /// up queued jobs and live runners; TerminateInstances is unthrottled too.
    #[arg(long)]
    lifecycle: bool,
    /// latency: open jobs already in the ledger before the measured run:
    /// queued jobs that the service covers with a live (booting) runner each
    /// before the clock starts, as a busy org's backlog.
    #[arg(long, default_value_t = 0)]
    open_jobs: usize,
    /// latency: completed jobs in the ledger (bulk-loaded with
    /// `generate_series`, spread over the last 29 days, each with its ended
    /// runner and one delivery row), so passes run beside a long history.
    #[arg(long, default_value_t = 0)]
    closed_jobs: usize,

    /// burst: jobs queued at once.
    #[arg(long, default_value_t = 500)]
    burst_jobs: usize,

    /// terminate: jobs.
    #[arg(long, default_value_t = 200)]
    terminate_jobs: usize,
    /// terminate: queued webhooks per second.
    #[arg(long, default_value_t = 5.0)]
    terminate_rate: f64,
    /// terminate (and latency --lifecycle): the fake instances' boot time
    /// (launch to running), ms.
    #[arg(long, default_value_t = 2000)]
    boot_ms: u64,
    /// terminate (and latency --lifecycle): how long each job runs, ms.
    #[arg(long, default_value_t = 1000)]
    job_ms: u64,

    /// rss: live runners.
    #[arg(long, default_value_t = 1000)]
    rss_runners: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "--rate and --duration must be positive"
    );
    ensure!(
        args.terminate_rate > 0.0,
        "--terminate-rate must be positive"
    );
    init_logging();
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scenarios: &[Scenario] = match args.scenario {
        Scenario::All => &[
            Scenario::Rss,
            Scenario::Latency,
            Scenario::Terminate,
            Scenario::Burst,
        ],
        ref one => std::slice::from_ref(one),
    };
    println!(
        "bench_fleet: {} cores ({}), service runtime {} worker threads, database {}",
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        cpu_model(),
        args.service_threads,
        if args.database_url.is_some() {
            "from --database-url"
        } else {
            "the test harness's cluster (fsync off)"
        }
    );
    for &scenario in scenarios {
        let result = match scenario {
            Scenario::Latency => latency(&args, &driver),
            Scenario::Burst => burst(&args, &driver),
            Scenario::Terminate => terminate(&args, &driver),
            Scenario::Rss => rss(&args, &driver),
            Scenario::All => unreachable!("expanded above"),
        };
        result.with_context(|| format!("scenario {scenario:?}"))?;
    }
    Ok(())
}

/// The service's own log, at `BENCH_RUST_LOG` (default: warnings), on stderr.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BENCH_RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

// ------------------------------------------------------------ database --

/// A migrated database holding the one profile every scenario uses.
struct BenchDb {
    url: String,
    /// Keeps the harness's database for the run (fallback only).
    _harness: Option<spot_runners_store::testing::TestDatabase>,
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").context("DATABASE_URL has no scheme")? + 3;
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    Ok(format!("{}/{name}{query}", &base[..host_end]))
}

async fn fresh_database(
    admin_url: Option<&str>,
    tag: &str,
    max_instances: usize,
) -> anyhow::Result<BenchDb> {
    let db = match admin_url {
        Some(admin) => {
            let name = format!(
                "bench_fleet_{tag}_{}_{:06x}",
                std::process::id(),
                rand::thread_rng().gen::<u32>() & 0xff_ffff
            );
            let mut conn = sqlx::PgConnection::connect(admin)
                .await
                .context("connecting to --database-url")?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .context("CREATE DATABASE")?;
            conn.close().await?;
            BenchDb {
                url: with_database(admin, &name)?,
                _harness: None,
            }
        }
        None => {
            let harness = spot_runners_store::testing::test_database()
                .await
                .context("starting the test harness's database")?;
            BenchDb {
                url: harness.url.clone(),
                _harness: Some(harness),
            }
        }
    };
    let store = PgStore::connect(&db.url).await?;
    store.migrate().await?;
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, max_instances)
         VALUES ($1, '{linux,x64,kani}', '{c6i.4xlarge}', 'ami-0123456789abcdef0', '{}', $2)",
    )
    .bind(PROFILE)
    .bind(i32::try_from(max_instances)?)
    .execute(store.pool())
    .await
    .context("inserting the profile")?;
    store.pool().close().await;
    Ok(db)
}

/// A busy org's ledger, bulk-loaded before the service starts: `closed`
/// completed jobs (each with its terminated runner, completed over the last
/// 29 days, inside the 30-day retention so no sweep prunes them during the
/// run), a delivery row for each of those inside the default 7-day delivery
/// retention, and `open` queued jobs of the profile, which the service then
/// covers with a launch each. Then it is settled as a ledger that grew over
/// a month would be: vacuumed, analysed and checkpointed, so the run does not
/// measure the database digesting a bulk load.
async fn preload(db: &BenchDb, open: usize, closed: usize) -> anyhow::Result<()> {
    if open == 0 && closed == 0 {
        return Ok(());
    }
    let began = Instant::now();
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let open = i64::try_from(open)?;
    let closed = i64::try_from(closed)?;
    // Closed jobs have ids 1..=closed, open ones OPEN_BASE + 1..; the
    // measured ones `job_id_base()` (microseconds since 1970), far above.
    sqlx::query(
        "INSERT INTO workflow_jobs (id, run_id, run_attempt, name, workflow_name, repository, owner,
                                    org, html_url, labels, status, conclusion, runner_id, runner_name,
                                    profile, github_created_at, queued_at, in_progress_at,
                                    completed_at, first_seen_at, updated_at)
         SELECT i, i / 4, 1, 'proof (' || i || ')', 'Kani proofs', 'octo-org/example-workflow',
                'octo-org', 'octo-org', 'https://github.com/octo-org/example-workflow/runs/' || i,
                '{self-hosted,linux,x64,kani}', 'completed', 'success', i,
                'spot-runners-kani-h' || to_hex(i), 'kani', t - interval '25 minutes',
                t - interval '25 minutes', t - interval '24 minutes', t, t - interval '25 minutes', t
         FROM (SELECT i, now() - interval '10 minutes' - (i::float8 / $1) * interval '29 days' AS t
               FROM generate_series(1, $1) AS i) AS s",
    )
    .bind(closed)
    .execute(&mut conn)
    .await
    .context("loading closed jobs")?;
    sqlx::query(
        "INSERT INTO runners (name, controller_id, profile, state, org, github_runner_id, instance_id,
                              instance_type, subnet_id, market, job_id, launch_attempts, reason,
                              demand_since, created_at, registered_at, launched_at, booted_at,
                              online_at, busy_at, done_at, terminating_at, terminated_at, updated_at)
         SELECT runner_name, 'spot-runners', 'kani', 'terminated', 'octo-org', id,
                'i-' || lpad(to_hex(id), 17, '0'), 'c6i.4xlarge', 'subnet-0bench', 'spot', id, 1,
                'completed', queued_at, queued_at, queued_at, queued_at, queued_at + interval '30 s',
                queued_at + interval '50 s', in_progress_at, completed_at, completed_at,
                completed_at, completed_at
         FROM workflow_jobs WHERE id BETWEEN 1 AND $1",
    )
    .bind(closed)
    .execute(&mut conn)
    .await
    .context("loading ended runners")?;
    sqlx::query(
        "INSERT INTO webhook_deliveries (delivery_id, event, action, job_id, received_at)
         SELECT 'bench-' || id, 'workflow_job', 'completed', id, completed_at
         FROM workflow_jobs WHERE id BETWEEN 1 AND $1 AND completed_at > now() - interval '7 days'",
    )
    .bind(closed)
    .execute(&mut conn)
    .await
    .context("loading deliveries")?;
    sqlx::query(
        "INSERT INTO workflow_jobs (id, run_id, run_attempt, name, workflow_name, repository, owner,
                                    org, html_url, labels, status, profile, github_created_at,
                                    queued_at, first_seen_at, updated_at)
         SELECT $2 + i, ($2 + i) / 4, 1, 'proof (' || i || ')', 'Kani proofs',
                'octo-org/example-workflow', 'octo-org', 'octo-org',
                'https://github.com/octo-org/example-workflow/runs/' || ($2 + i),
                '{self-hosted,linux,x64,kani}', 'queued', 'kani', now(), now(), now(), now()
         FROM generate_series(1, $1) AS i",
    )
    .bind(open)
    .bind(OPEN_BASE)
    .execute(&mut conn)
    .await
    .context("loading open jobs")?;
    // As autovacuum would have by then: planner statistics for the history,
    // and the load's dirty pages on disk, not written out under the run.
    sqlx::raw_sql("VACUUM ANALYZE workflow_jobs, runners, webhook_deliveries")
        .execute(&mut conn)
        .await
        .context("VACUUM ANALYZE")?;
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await {
        // Needs superuser (or pg_checkpoint); the figures then include it.
        println!("no CHECKPOINT after the load ({e}); the run may write the load out");
    }
    conn.close().await?;
    println!(
        "preloaded the ledger in {:.1} s: {closed} closed jobs (with their runners and deliveries), {open} open jobs",
        secs_f(began.elapsed())
    );
    Ok(())
}

/// What PostgreSQL did on its own during a run, which shows in the tail:
/// autovacuum and autoanalyze runs by table, and checkpoints.
struct Maintenance {
    tables: BTreeMap<String, (i64, i64)>,
    checkpoints: i64,
}

impl Maintenance {
    async fn read(url: &str) -> anyhow::Result<Self> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables",
        )
        .fetch_all(&mut conn)
        .await?;
        let checkpoints: i64 =
            sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
                .fetch_one(&mut conn)
                .await?;
        conn.close().await?;
        Ok(Self {
            tables: rows.into_iter().map(|(t, v, a)| (t, (v, a))).collect(),
            checkpoints,
        })
    }

    fn since(self, before: &Maintenance) -> Self {
        let tables = self
            .tables
            .into_iter()
            .filter_map(|(t, (v, a))| {
                let (v0, a0) = before.tables.get(&t).copied().unwrap_or_default();
                (v > v0 || a > a0).then_some((t, (v - v0, a - a0)))
            })
            .collect();
        Self {
            tables,
            checkpoints: self.checkpoints - before.checkpoints,
        }
    }
}

impl std::fmt::Display for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tables.is_empty() {
            write!(f, "no autovacuum or autoanalyze")?;
        }
        for (i, (table, (vacuums, analyzes))) in self.tables.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}{table} {vacuums} autovacuum / {analyzes} autoanalyze"
            )?;
        }
        write!(f, "; {} checkpoints", self.checkpoints)
    }
}

/// First id of the preloaded open jobs.
const OPEN_BASE: i64 = 1_000_000_000_000;

/// Row counts of the ledger, as the output reports them.
struct LedgerSizes {
    open_jobs: i64,
    closed_jobs: i64,
    live_runners: i64,
    ended_runners: i64,
    deliveries: i64,
}

impl LedgerSizes {
    async fn read(url: &str) -> anyhow::Result<Self> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let (open_jobs, closed_jobs): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status <> 'completed'),
                    count(*) FILTER (WHERE status = 'completed')
             FROM workflow_jobs",
        )
        .fetch_one(&mut conn)
        .await?;
        let (live_runners, ended_runners): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state NOT IN ('terminated', 'launch_failed', 'boot_timeout',
                                                         'idle_timeout', 'interrupted', 'orphaned')),
                    count(*) FILTER (WHERE state IN ('terminated', 'launch_failed', 'boot_timeout',
                                                     'idle_timeout', 'interrupted', 'orphaned'))
             FROM runners",
        )
        .fetch_one(&mut conn)
        .await?;
        let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
        Ok(Self {
            open_jobs,
            closed_jobs,
            live_runners,
            ended_runners,
            deliveries,
        })
    }

    fn line(&self) -> String {
        format!(
            "{} open jobs, {} closed jobs; {} live runners, {} ended; {} deliveries",
            self.open_jobs,
            self.closed_jobs,
            self.live_runners,
            self.ended_runners,
            self.deliveries
        )
    }

    fn fields(&self) -> String {
        format!(
            "ledger_open_jobs={} ledger_closed_jobs={} ledger_live_runners={} ledger_ended_runners={} ledger_deliveries={}",
            self.open_jobs, self.closed_jobs, self.live_runners, self.ended_runners, self.deliveries
        )
    }
}

// ------------------------------------------------------------- service --

/// The real application on 127.0.0.1:0, on its own runtime, with the fakes.
struct Service {
    runtime: tokio::runtime::Runtime,
    base: String,
    cloud: FakeCloud,
    github: FakeGitHub,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), spot_runners::Error>>>,
}

struct ServiceOptions {
    max_instances: usize,
    reconcile_interval_secs: u64,
}

impl Service {
    fn start(
        args: &Args,
        db: &BenchDb,
        cloud: &FakeCloud,
        github: &FakeGitHub,
        options: &ServiceOptions,
    ) -> anyhow::Result<Self> {
        // Through the command line's own parser, so settings added later get
        // their defaults here too.
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            settings: RawSettings,
        }
        let flags = Serve::try_parse_from([
            "serve".to_owned(),
            format!("--database-url={}", db.url),
            "--listen=127.0.0.1:0".to_owned(),
            format!("--webhook-secret={SECRET}"),
            format!("--max-instances={}", options.max_instances),
            format!(
                "--reconcile-interval-secs={}",
                options.reconcile_interval_secs
            ),
        ])?;
        let settings = flags.settings.parse(false)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.service_threads.max(1))
            .thread_name("service")
            .enable_all()
            .build()?;
        let metrics = Arc::new(Metrics::new()?);
        let backends = Backends {
            cloud: Arc::new(cloud.clone()),
            github: Arc::new(github.clone()),
            parameters: Arc::new(spot_runners_sim::FakeParameterStore::new()),
        };
        let app = runtime.block_on(Application::build_with(settings, metrics, Some(backends)))?;
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            runtime,
            base,
            cloud: cloud.clone(),
            github: github.clone(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            self.runtime
                .block_on(task)
                .context("joining the service")?
                .context("the service stopped with an error")?;
        }
        self.runtime.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    }
}

// ------------------------------------------------------------ webhooks --

#[derive(Clone)]
struct Driver {
    client: reqwest::Client,
    url: String,
    metrics_url: String,
    template: Arc<Value>,
}

/// A delivery ready to send.
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
}

/// When a delivery was sent and answered.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Instant,
    acked: Instant,
    status: u16,
}

/// What a runner reports in `in_progress` and `completed`.
struct RunnerRef<'a> {
    id: i64,
    name: &'a str,
}

impl Driver {
    fn new(base: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            url: format!("{base}/webhook"),
            metrics_url: format!("{base}/metrics"),
            template: Arc::new(serde_json::from_str(TEMPLATE)?),
        })
    }

    /// A signed `workflow_job` delivery of GitHub's shape: `queued`,
    /// `in_progress` (with the runner) or `completed` (with the runner).
    fn delivery(
        &self,
        action: &str,
        job_id: i64,
        runner: Option<RunnerRef<'_>>,
    ) -> anyhow::Result<Delivery> {
        let mut payload = (*self.template).clone();
        payload["action"] = json!(action);
        let job = &mut payload["workflow_job"];
        job["id"] = json!(job_id);
        job["run_id"] = json!(job_id / 4);
        job["run_attempt"] = json!(1);
        job["status"] = json!(action);
        job["labels"] = json!(LABELS);
        job["html_url"] = json!(format!(
            "https://github.com/octo-org/example-workflow/runs/{job_id}"
        ));
        job["workflow_name"] = json!("Kani proofs");
        job["created_at"] = job["started_at"].clone();
        job["steps"] = json!([]);
        match runner {
            Some(r) => {
                job["runner_id"] = json!(r.id);
                job["runner_name"] = json!(r.name);
                job["runner_group_id"] = json!(1);
                job["runner_group_name"] = json!("Default");
            }
            None => {
                for field in [
                    "runner_id",
                    "runner_name",
                    "runner_group_id",
                    "runner_group_name",
                ] {
                    job[field] = Value::Null;
                }
            }
        }
        if action == "completed" {
            job["conclusion"] = json!("success");
            job["completed_at"] = json!("2021-06-15T19:30:00Z");
        } else {
            job["conclusion"] = Value::Null;
            job["completed_at"] = Value::Null;
        }
        let body = serde_json::to_vec(&payload)?;
        let mut headers = HeaderMap::with_capacity(5);
        for (name, value) in
            delivery_headers("workflow_job", &guid(), sign(SECRET.as_bytes(), &body))
        {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(&value)?,
            );
        }
        Ok(Delivery {
            headers,
            body: Bytes::from(body),
        })
    }

    /// Sends one delivery; a transport error shows as status 0.
    async fn send(&self, d: Delivery) -> Sent {
        let at = Instant::now();
        let status = match self
            .client
            .post(&self.url)
            .headers(d.headers)
            .body(d.body)
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            }
            Err(_) => 0,
        };
        Sent {
            at,
            acked: Instant::now(),
            status,
        }
    }

    /// Sends deliveries from `concurrency` senders, each sending its next as
    /// soon as the last is answered; returns what each got, in input order.
    async fn send_all(&self, deliveries: Vec<Delivery>, concurrency: usize) -> Vec<Sent> {
        let n = deliveries.len();
        let queue = Arc::new(Mutex::new(
            deliveries.into_iter().enumerate().collect::<VecDeque<_>>(),
        ));
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let queue = Arc::clone(&queue);
            let me = self.clone();
            senders.spawn(async move {
                let mut got = Vec::new();
                loop {
                    let next = lock(&queue).pop_front();
                    let Some((i, d)) = next else { break };
                    got.push((i, me.send(d).await));
                }
                got
            });
        }
        let mut out: Vec<Option<Sent>> = vec![None; n];
        while let Some(done) = senders.join_next().await {
            for (i, s) in done.unwrap_or_default() {
                out[i] = Some(s);
            }
        }
        out.into_iter()
            .map(|s| {
                s.unwrap_or(Sent {
                    at: Instant::now(),
                    acked: Instant::now(),
                    status: 0,
                })
            })
            .collect()
    }

    async fn metrics_text(&self) -> String {
        match self.client.get(&self.metrics_url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random version-4 GUID, like GitHub's `X-GitHub-Delivery`.
fn guid() -> String {
    let mut b: [u8; 16] = rand::thread_rng().gen();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// Job ids that do not collide between runs on one database.
fn job_id_base() -> i64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    i64::try_from(micros).unwrap_or(1 << 50)
}

// ------------------------------------------------------------- figures --

/// One successful `RunInstances`.
#[derive(Clone, Debug)]
struct Launch {
    runner: String,
    instance: String,
    at: Instant,
}

/// Successful launches, in call order.
fn launches(cloud: &FakeCloud) -> Vec<Launch> {
    let mut out: Vec<Launch> = cloud
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CloudCall::Launch {
                runner_name,
                at,
                outcome: Ok(instance),
                ..
            } => Some(Launch {
                runner: runner_name,
                instance,
                at,
            }),
            _ => None,
        })
        .collect();
    out.sort_by_key(|l| l.at);
    out
}

/// The first accepted `TerminateInstances` naming each instance, and the
/// number of accepted calls.
fn terminations(cloud: &FakeCloud) -> (HashMap<String, Instant>, usize) {
    let mut out = HashMap::new();
    let mut calls = 0;
    for c in cloud.calls() {
        if let CloudCall::Terminate { ids, at } = c {
            calls += 1;
            for id in ids {
                out.entry(id).or_insert(at);
            }
        }
    }
    (out, calls)
}

/// The last `generate_jit_config` call for each runner name.
fn jit_calls(github: &FakeGitHub) -> HashMap<String, Instant> {
    let mut out = HashMap::new();
    for c in github.calls() {
        if let GitHubCall::GenerateJitConfig { name, at, .. } = c {
            out.insert(name, at);
        }
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `b - a` in milliseconds, negative when `b` came first.
fn ms_between(a: Instant, b: Instant) -> f64 {
    match b.checked_duration_since(a) {
        Some(d) => ms(d),
        None => -ms(a - b),
    }
}

/// Nearest-rank percentiles of a sample.
struct Stats {
    n: usize,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let pick = |p: f64| {
            if v.is_empty() {
                return f64::NAN;
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Self {
            n: v.len(),
            mean: if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            p50: pick(50.0),
            p90: pick(90.0),
            p99: pick(99.0),
            max: pick(100.0),
        }
    }

    fn row(&self, what: &str, unit: &str) -> String {
        format!(
            "  {what:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {unit} (n={})",
            self.mean, self.p50, self.p90, self.p99, self.max, self.n
        )
    }
}

fn table_header() -> String {
    format!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "mean", "p50", "p90", "p99", "max"
    )
}

/// A histogram of the service's `/metrics`, summed over its label sets:
/// (upper bound, cumulative count), ascending, `+Inf` last.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        // The last `le="…"`: a label such as `profile` also ends in "le".
        let Some(le) = line
            .rsplit("le=\"")
            .next()
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some((_, c)) => *c += count,
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Prometheus's `histogram_quantile`: linear within the bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return prev.0;
            }
            let width = count - prev.1;
            return if width <= 0.0 {
                bound
            } else {
                prev.0 + (bound - prev.0) * (rank - prev.1) / width
            };
        }
        prev = (bound, count);
    }
    prev.0
}

/// "p50 a ms, p99 b ms (n)" of one of the service's histograms, in ms.
fn histogram_summary(text: &str, name: &str) -> (f64, f64, f64) {
    let b = histogram(text, name);
    let n = b.last().map_or(0.0, |x| x.1);
    (quantile(&b, 0.5) * 1000.0, quantile(&b, 0.99) * 1000.0, n)
}

fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (VmRSS, VmHWM) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn secs_f(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Linux's `USER_HZ`, the unit of `/proc` CPU times.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time used so far: this process, PostgreSQL (the postmaster and its
/// children), and the machine (busy and total ticks over all CPUs).
struct CpuMark {
    at: Instant,
    own: u64,
    postgres: u64,
    machine: (u64, u64),
}

/// (pid, parent, user + system ticks) from `/proc/PID/stat`.
fn proc_stat(pid: &str) -> Option<(u32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let pid = text.split_whitespace().next()?.parse().ok()?;
    Some((pid, ppid, ticks))
}

impl CpuMark {
    fn take(postgres_pid: Option<u32>) -> Self {
        let own = proc_stat("self").map_or(0, |s| s.2);
        let postgres = postgres_pid.map_or(0, |pg| {
            std::fs::read_dir("/proc")
                .map(|dir| {
                    dir.filter_map(Result::ok)
                        .filter_map(|e| proc_stat(e.file_name().to_str()?))
                        .filter(|(pid, ppid, _)| *pid == pg || *ppid == pg)
                        .map(|s| s.2)
                        .sum()
                })
                .unwrap_or(0)
        });
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| {
                let v: Vec<u64> = t
                    .lines()
                    .find(|l| l.starts_with("cpu "))?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3)? + v.get(4).unwrap_or(&0);
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        Self {
            at: Instant::now(),
            own,
            postgres,
            machine,
        }
    }

    /// "cpu (cores): …" since `before`, and the RESULT fields.
    fn since(&self, before: &Self) -> (String, String) {
        let wall = secs_f(self.at - before.at).max(1e-9);
        let cores = |t: u64| t as f64 / TICKS_PER_SEC / wall;
        let own = cores(self.own.saturating_sub(before.own));
        let pg = cores(self.postgres.saturating_sub(before.postgres));
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let (busy, total) = (
            self.machine.0.saturating_sub(before.machine.0),
            self.machine.1.saturating_sub(before.machine.1),
        );
        let machine = if total > 0 {
            busy as f64 / total as f64 * cpus as f64
        } else {
            f64::NAN
        };
        let other = (machine - own - pg).max(0.0);
        (
            format!(
                "cpu (cores, over {wall:.1} s): this process (service + driver + fakes) {own:.2}, PostgreSQL {pg:.2}, everything else {other:.2}; machine busy {machine:.2} of {cpus}"
            ),
            format!("cpu_process={own:.2} cpu_postgres={pg:.2} cpu_other={other:.2} cpu_busy={machine:.2}"),
        )
    }
}

// ------------------------------------------------------------ scenarios --

/// Webhook sent → `RunInstances` at a steady rate, nothing throttled.
fn latency(args: &Args, driver_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let warm = (args.warmup * args.rate).round() as usize;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let measured = (args.duration * args.rate).round() as usize;
    let total = warm + measured;
    println!(
        "\n== latency: queued webhook -> RunInstances, {} jobs/s for {} s (+{} s warm-up); fake EC2 and GitHub unthrottled, no added latency{} ==",
        args.rate,
        args.duration,
        args.warmup,
        if args.lifecycle {
            format!(
                "; every job runs: {} ms boot, {} ms job, completed, terminated",
                args.boot_ms, args.job_ms
            )
        } else {
            "; jobs stay queued, runners stay live".to_owned()
        }
    );
    let cloud = FakeCloud::new();
    cloud.set_rate_limits(TokenBucket::unlimited(), TokenBucket::unlimited());
    cloud.set_boot_time(Duration::from_millis(args.boot_ms));
    let github = FakeGitHub::new();
    github.set_jit_limit(TokenBucket::unlimited());
    let cap = total + args.open_jobs + 100;
    let db = driver_rt.block_on(fresh_database(args.database_url.as_deref(), "latency", cap))?;
    driver_rt.block_on(preload(&db, args.open_jobs, args.closed_jobs))?;
    let service = Service::start(
        args,
        &db,
        &cloud,
        &github,
        &ServiceOptions {
            max_instances: cap,
            reconcile_interval_secs: 15,
        },
    )?;
    let outcome = driver_rt.block_on(latency_run(args, &service, &db, warm, total));
    service.stop()?;
    outcome
}

async fn latency_run(
    args: &Args,
    service: &Service,
    db: &BenchDb,
    warm: usize,
    total: usize,
) -> anyhow::Result<()> {
    let driver = Driver::new(&service.base)?;
    // The backlog gets its launches before the clock starts; the measured
    // jobs are paired with the launches after those.
    if args.open_jobs > 0 {
        let began = Instant::now();
        let want = args.open_jobs as u64;
        let deadline = began + Duration::from_secs(900);
        while service.cloud.launch_attempts() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            service.cloud.launch_attempts() >= want,
            "the {} open jobs got only {} launches in 900 s",
            args.open_jobs,
            service.cloud.launch_attempts()
        );
        println!(
            "backlog: {} open jobs covered by {} launches in {:.1} s",
            args.open_jobs,
            service.cloud.launch_attempts(),
            secs_f(began.elapsed())
        );
    }
    let skip_attempts = service.cloud.launch_attempts() as usize;
    let skip = launches(&service.cloud).len();
    let before = LedgerSizes::read(&db.url).await?;
    println!("ledger before the measured run: {}", before.line());
    let maintenance = Maintenance::read(&db.url).await?;
    let base = job_id_base();
    let mut deliveries = Vec::with_capacity(total);
    for i in 0..total {
        deliveries.push(driver.delivery("queued", base + i64::try_from(i)?, None)?);
    }
    // Open loop: job i is sent at start + i / rate, whatever the answers.
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let fleet = Arc::new(Fleet {
        driver: driver.clone(),
        github: service.github.clone(),
        boot: Duration::from_millis(args.boot_ms),
        job: Duration::from_millis(args.job_ms),
        queue: Mutex::new(VecDeque::new()),
        lives: Mutex::new(Vec::new()),
        give_up: Instant::now() + interval.mul_f64(total as f64) + Duration::from_secs(120),
    });
    let watcher = args
        .lifecycle
        .then(|| spawn_instances(Arc::clone(&fleet), service.cloud.clone(), total));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let cpu_before = CpuMark::take(args.postgres_pid);
    let results: Arc<Mutex<Vec<(usize, Sent)>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut late = Duration::ZERO;
    for (i, d) in deliveries.into_iter().enumerate() {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        late = late.max(tokio::time::Instant::now() - due);
        let job_id = base + i64::try_from(i)?;
        let fleet = Arc::clone(&fleet);
        let results = Arc::clone(&results);
        tasks.spawn(async move {
            let s = fleet.driver.send(d).await;
            if s.status == 202 {
                lock(&fleet.queue).push_back(job_id);
            }
            lock(&results).push((i, s));
        });
    }
    while tasks.join_next().await.is_some() {}
    let sent_all = Instant::now();
    let mut sent = std::mem::take(&mut *lock(&results));
    sent.sort_by_key(|(i, _)| *i);
    let accepted: Vec<(usize, Sent)> = sent
        .iter()
        .copied()
        .filter(|(_, s)| s.status == 202)
        .collect();
    let refused = sent.len() - accepted.len();

    // Every accepted job gets a launch; wait (bounded) for the last one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (service.cloud.launch_attempts() as usize) < skip_attempts + accepted.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(watcher) = watcher {
        // The last jobs run to completion and are terminated.
        let _ =
            tokio::time::timeout(fleet.boot + fleet.job + Duration::from_secs(30), watcher).await;
    }
    let (cpu_line, cpu_fields) = CpuMark::take(args.postgres_pid).since(&cpu_before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let launches: Vec<Launch> = launches(&service.cloud).into_iter().skip(skip).collect();
    let after = LedgerSizes::read(&db.url).await?;
    let maintenance = Maintenance::read(&db.url).await?.since(&maintenance);
    let jit = jit_calls(&service.github);

    // First in, first out: the k-th launch serves the k-th job sent.
    let mut by_send: Vec<(usize, Sent)> = accepted.clone();
    by_send.sort_by_key(|(_, s)| s.at);
    let mut to_launch = Vec::new();
    let mut ack_to_launch = Vec::new();
    let mut acks = Vec::new();
    let mut to_jit = Vec::new();
    let mut jit_to_launch = Vec::new();
    let window = 5.0;
    let mut windows: Vec<Vec<f64>> = Vec::new();
    for ((i, s), l) in by_send.iter().zip(&launches) {
        if *i < warm {
            continue;
        }
        let lat = ms_between(s.at, l.at);
        to_launch.push(lat);
        ack_to_launch.push(ms_between(s.acked, l.at));
        acks.push(ms_between(s.at, s.acked));
        if let Some(&j) = jit.get(&l.runner) {
            to_jit.push(ms_between(s.at, j));
            jit_to_launch.push(ms_between(j, l.at));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let w = ((i - warm) as f64 / args.rate / window) as usize;
        if windows.len() <= w {
            windows.resize_with(w + 1, Vec::new);
        }
        windows[w].push(lat);
    }
    let unmatched = accepted.len().saturating_sub(launches.len());
    let extra = launches.len().saturating_sub(accepted.len());
    let metrics = driver.metrics_text().await;
    let (svc_p50, svc_p99, svc_n) =
        histogram_summary(&metrics, "spot_runners_launch_latency_seconds");
    let (pass_p50, pass_p99, passes) =
        histogram_summary(&metrics, "spot_runners_reconcile_duration_seconds");
    let (rss, hwm) = rss_kib();
    let ran = lock(&fleet.lives).len();
    let (terminated, _) = terminations(&service.cloud);

    let main = Stats::of(&to_launch);
    println!(
        "sent {} jobs ({} warm-up, not counted) in {:.1} s, sender at most {:.1} ms behind schedule; {} not 202; {} successful launches ({} jobs without one, {} launches beyond the jobs); {} RequestLimitExceeded",
        sent.len(),
        warm,
        secs_f(sent_all - sent.first().map_or(sent_all, |(_, s)| s.at)),
        ms(late),
        refused,
        launches.len(),
        unmatched,
        extra,
        service.cloud.throttled_count()
    );
    if args.lifecycle {
        println!(
            "{ran} jobs ran on an instance and were reported completed; {} instances terminated, {} still live",
            terminated.len(),
            service.cloud.live_count(None)
        );
    }
    println!("ledger after the measured run: {}", after.line());
    println!("database maintenance during the measured run: {maintenance}");
    println!("{}", table_header());
    println!("{}", main.row("webhook sent -> RunInstances", "ms"));
    println!(
        "{}",
        Stats::of(&ack_to_launch).row("202 received -> RunInstances", "ms")
    );
    println!("{}", Stats::of(&acks).row("webhook sent -> 202", "ms"));
    println!(
        "{}",
        Stats::of(&to_jit).row("webhook sent -> JIT config call", "ms")
    );
    println!(
        "{}",
        Stats::of(&jit_to_launch).row("JIT config call -> RunInstances", "ms")
    );
    for (w, values) in windows.iter().enumerate() {
        println!(
            "{}",
            Stats::of(values).row(
                &format!(
                    "  sent in {}-{} s",
                    w as f64 * window,
                    (w + 1) as f64 * window
                ),
                "ms"
            )
        );
    }
    println!(
        "  service histogram spot_runners_launch_latency_seconds (queued received -> instance requested, all {svc_n} jobs incl. warm-up): p50 ~{svc_p50:.1} ms, p99 ~{svc_p99:.1} ms (interpolated in buckets 1, 2.5, 5, 10, 25, 50, 100 ms, ...)"
    );
    println!(
        "  reconcile passes: {passes} (histogram p50 ~{pass_p50:.1} ms, p99 ~{pass_p99:.1} ms); process RSS {} MiB, peak {} MiB",
        rss / 1024,
        hwm / 1024
    );
    println!("  {cpu_line}");
    println!(
        "RESULT scenario=latency lifecycle={} rate={} duration_s={} jobs={} warmup={} not_202={} launches={} unmatched={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} mean_ms={:.2} ack_p50_ms={:.2} ack_p99_ms={:.2} jit_p99_ms={:.2} svc_p50_ms={svc_p50:.2} svc_p99_ms={svc_p99:.2} passes={passes} pass_p50_ms={pass_p50:.2} pass_p99_ms={pass_p99:.2} throttled={} {} {cpu_fields}",
        args.lifecycle,
        args.rate,
        args.duration,
        to_launch.len(),
        warm,
        refused,
        launches.len(),
        unmatched,
        main.p50,
        main.p90,
        main.p99,
        main.max,
        main.mean,
        Stats::of(&acks).p50,
        Stats::of(&acks).p99,
        Stats::of(&to_jit).p99,
        service.cloud.throttled_count(),
        after.fields(),
    );
    Ok(())
}

/// A burst of queued jobs under EC2's and GitHub's real limits.
fn burst(args: &Args, driver_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let n = args.burst_jobs;
    ensure!(n > 0, "--burst-jobs must be at least 1");
    let bound = [EC2_RUN_LIMIT, GITHUB_JIT_LIMIT]
        .iter()
        .map(|(burst, rate)| ((n as f64 - burst) / rate).max(0.0))
        .fold(0.0, f64::max);
    println!(
        "\n== burst: {n} queued jobs at once; fake EC2 RunInstances bucket {} refilled at {}/s, GitHub JIT {} at {}/s (the fakes' defaults); bound {bound:.1} s ==",
        EC2_RUN_LIMIT.0, EC2_RUN_LIMIT.1, GITHUB_JIT_LIMIT.0, GITHUB_JIT_LIMIT.1
    );
    let cloud = FakeCloud::new();
    let github = FakeGitHub::new();
    let cap = n + 100;
    let db = driver_rt.block_on(fresh_database(args.database_url.as_deref(), "burst", cap))?;
    let service = Service::start(
        args,
        &db,
        &cloud,
        &github,
        &ServiceOptions {
            max_instances: cap,
            reconcile_interval_secs: 15,
        },
    )?;
    let outcome = driver_rt.block_on(burst_run(&service, n, bound, args.postgres_pid));
    service.stop()?;
    outcome
}

async fn burst_run(
    service: &Service,
    n: usize,
    bound: f64,
    postgres_pid: Option<u32>,
) -> anyhow::Result<()> {
    let driver = Driver::new(&service.base)?;
    let base = job_id_base();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        deliveries.push(driver.delivery("queued", base + i64::try_from(i)?, None)?);
    }
    let cpu_before = CpuMark::take(postgres_pid);
    let sent = driver.send_all(deliveries, 32).await;
    let t0 = sent.iter().map(|s| s.at).min().context("nothing sent")?;
    let last_ack = sent.iter().map(|s| s.acked).max().unwrap_or(t0);
    let refused = sent.iter().filter(|s| s.status != 202).count();
    println!(
        "sent {n} webhooks in {:.2} s ({refused} not 202); waiting for the launches (about {bound:.0} s)",
        secs_f(last_ack - t0)
    );
    let deadline = t0 + Duration::from_secs_f64(bound * 2.0 + 120.0);
    let mut next_report = Instant::now() + Duration::from_secs(30);
    while (service.cloud.live_count(None) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next_report {
            eprintln!(
                "  {:>5.0} s: {} launched, {} RequestLimitExceeded",
                secs_f(t0.elapsed()),
                service.cloud.live_count(None),
                service.cloud.throttled_count()
            );
            next_report += Duration::from_secs(30);
        }
    }
    let (cpu_line, cpu_fields) = CpuMark::take(postgres_pid).since(&cpu_before);
    // More than a pass and a provisioning round: nothing beyond n follows.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let launches = launches(&service.cloud);
    let last = launches
        .last()
        .map(|l| l.at)
        .context("nothing was launched")?;
    let first = launches.first().map_or(last, |l| l.at);
    let elapsed = secs_f(last - t0);
    let ratio = elapsed / bound;
    let live = service.cloud.live_count(None);
    let throttled = service.cloud.throttled_count();
    let attempts = service.cloud.launch_attempts();
    let jit_calls = service.github.jit_calls();
    let registered = service.github.runners().len();
    // Sustained rate after the initial bucket.
    let steady = if launches.len() > 10 {
        let a = launches[5].at;
        (launches.len() - 6) as f64 / secs_f(last - a)
    } else {
        f64::NAN
    };
    println!(
        "  first webhook sent -> first RunInstances   {:>8.3} s",
        secs_f(first - t0)
    );
    println!("  first webhook sent -> last RunInstances    {elapsed:>8.3} s");
    println!("  rate-limit bound max((N-5)/2, (N-10)/3)     {bound:>8.3} s");
    println!(
        "  ratio measured / bound                      {ratio:>8.3}  ({:+.1}%)",
        (ratio - 1.0) * 100.0
    );
    println!("  sustained launch rate after the 6th         {steady:>8.3} /s");
    println!(
        "  RunInstances calls {attempts}, successful {}, RequestLimitExceeded {throttled}",
        launches.len()
    );
    println!("  live instances {live} (expected {n}); JIT config calls {jit_calls}, runners registered {registered}");
    println!("  {cpu_line}");
    println!(
        "RESULT scenario=burst jobs={n} not_202={refused} first_launch_s={:.3} last_launch_s={elapsed:.3} bound_s={bound:.3} ratio={ratio:.4} steady_rate={steady:.3} launch_attempts={attempts} launched={} live={live} throttled={throttled} jit_calls={jit_calls} runners={registered} {cpu_fields}",
        secs_f(first - t0),
        launches.len()
    );
    Ok(())
}

/// One job's life on a simulated instance.
#[derive(Clone, Debug)]
struct JobLife {
    launched: Instant,
    started: Instant,
    ended: Sent,
    instance: String,
    statuses_ok: bool,
}

/// What the simulated instances share.
struct Fleet {
    driver: Driver,
    github: FakeGitHub,
    boot: Duration,
    job: Duration,
    /// Jobs queued (answered 202) and not yet taken, oldest first.
    queue: Mutex<VecDeque<i64>>,
    lives: Mutex<Vec<JobLife>>,
    give_up: Instant,
}

/// `completed` → `TerminateInstances`, and instance-seconds wasted per job.
fn terminate(args: &Args, driver_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let n = args.terminate_jobs;
    ensure!(n > 0, "--terminate-jobs must be at least 1");
    println!(
        "\n== terminate: {n} jobs at {}/s; each instance boots in {} ms, its runner takes the oldest queued job at once and runs it {} ms; fake EC2 RunInstances and GitHub unthrottled, TerminateInstances at EC2's bucket (100, 5/s) ==",
        args.terminate_rate, args.boot_ms, args.job_ms
    );
    let cloud = FakeCloud::new();
    cloud.set_rate_limits(
        TokenBucket::unlimited(),
        TokenBucket::ec2_terminate_instances(),
    );
    cloud.set_boot_time(Duration::from_millis(args.boot_ms));
    let github = FakeGitHub::new();
    github.set_jit_limit(TokenBucket::unlimited());
    let cap = n + 100;
    let db = driver_rt.block_on(fresh_database(
        args.database_url.as_deref(),
        "terminate",
        cap,
    ))?;
    let service = Service::start(
        args,
        &db,
        &cloud,
        &github,
        &ServiceOptions {
            max_instances: cap,
            reconcile_interval_secs: 15,
        },
    )?;
    let outcome = driver_rt.block_on(terminate_run(args, &service, n));
    service.stop()?;
    outcome
}

async fn terminate_run(args: &Args, service: &Service, n: usize) -> anyhow::Result<()> {
    let driver = Driver::new(&service.base)?;
    let run_for = Duration::from_secs_f64(n as f64 / args.terminate_rate);
    let fleet = Arc::new(Fleet {
        driver: driver.clone(),
        github: service.github.clone(),
        boot: Duration::from_millis(args.boot_ms),
        job: Duration::from_millis(args.job_ms),
        queue: Mutex::new(VecDeque::new()),
        lives: Mutex::new(Vec::new()),
        give_up: Instant::now() + run_for + Duration::from_secs(120),
    });

    let watcher = spawn_instances(Arc::clone(&fleet), service.cloud.clone(), n);

    // The jobs, open loop.
    let cpu_before = CpuMark::take(args.postgres_pid);
    let base = job_id_base();
    let interval = Duration::from_secs_f64(1.0 / args.terminate_rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut senders = tokio::task::JoinSet::new();
    let mut refused = 0usize;
    for i in 0..n {
        let job_id = base + i64::try_from(i)?;
        let d = driver.delivery("queued", job_id, None)?;
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let fleet = Arc::clone(&fleet);
        senders.spawn(async move {
            let s = fleet.driver.send(d).await;
            if s.status == 202 {
                lock(&fleet.queue).push_back(job_id);
            }
            s.status == 202
        });
    }
    while let Some(ok) = senders.join_next().await {
        if !matches!(ok, Ok(true)) {
            refused += 1;
        }
    }
    let _ = watcher.await;

    // Every finished job's instance should be terminated; wait (bounded).
    let lives = lock(&fleet.lives).clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (terminated, _) = terminations(&service.cloud);
        if lives.iter().all(|l| terminated.contains_key(&l.instance)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu_line, cpu_fields) = CpuMark::take(args.postgres_pid).since(&cpu_before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (terminated, terminate_calls) = terminations(&service.cloud);

    let mut to_terminate = Vec::new();
    let mut ack_to_terminate = Vec::new();
    let mut before_job = Vec::new();
    let mut after_job = Vec::new();
    let mut wasted = Vec::new();
    let mut not_terminated = 0;
    let mut bad_status = 0;
    for l in &lives {
        if !l.statuses_ok {
            bad_status += 1;
        }
        let Some(&t) = terminated.get(&l.instance) else {
            not_terminated += 1;
            continue;
        };
        let before = ms_between(l.launched, l.started);
        let after = ms_between(l.ended.at, t);
        to_terminate.push(after);
        ack_to_terminate.push(ms_between(l.ended.acked, t));
        before_job.push(before);
        after_job.push(after);
        wasted.push((before + after) / 1000.0);
    }
    let overhead: Vec<f64> = wasted.iter().map(|w| w * 1000.0 - ms(fleet.boot)).collect();
    let metrics = driver.metrics_text().await;
    let (svc_p50, svc_p99, svc_n) =
        histogram_summary(&metrics, "spot_runners_terminate_latency_seconds");
    let launched = launches(&service.cloud).len();
    let throttled = service.cloud.throttled_count();
    let idle = launched.saturating_sub(lives.len());

    let t = Stats::of(&to_terminate);
    let w = Stats::of(&wasted);
    println!(
        "{} jobs queued ({refused} not 202), {} ran on an instance; {launched} launches; {} TerminateInstances calls accepted, {throttled} RequestLimitExceeded; {not_terminated} finished jobs whose instance was not terminated; {bad_status} jobs with an in_progress/completed answer other than 202; {idle} instances never got a job",
        n,
        lives.len(),
        terminate_calls
    );
    println!("{}", table_header());
    println!("{}", t.row("completed sent -> TerminateInstances", "ms"));
    println!(
        "{}",
        Stats::of(&ack_to_terminate).row("completed 202 -> TerminateInstances", "ms")
    );
    println!(
        "{}",
        Stats::of(&before_job).row("launch -> job start (in_progress)", "ms")
    );
    println!(
        "{}",
        Stats::of(&after_job).row("job end -> termination", "ms")
    );
    println!("{}", w.row("wasted instance-seconds per job", "s"));
    println!(
        "{}",
        Stats::of(&overhead).row(
            &format!("  of which beyond the {} ms boot", args.boot_ms),
            "ms"
        )
    );
    println!(
        "  service histogram spot_runners_terminate_latency_seconds (completed received -> TerminateInstances, n={svc_n}): p50 ~{svc_p50:.1} ms, p99 ~{svc_p99:.1} ms"
    );
    println!("  {cpu_line}");
    println!(
        "RESULT scenario=terminate jobs={n} ran={} rate={} boot_ms={} job_ms={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} wasted_mean_s={:.3} wasted_p50_s={:.3} wasted_p99_s={:.3} overhead_mean_ms={:.2} overhead_p99_ms={:.2} terminate_calls={terminate_calls} throttled={throttled} not_terminated={not_terminated} svc_p50_ms={svc_p50:.2} svc_p99_ms={svc_p99:.2} {cpu_fields}",
        lives.len(),
        args.terminate_rate,
        args.boot_ms,
        args.job_ms,
        t.p50,
        t.p90,
        t.p99,
        t.max,
        w.mean,
        w.p50,
        w.p99,
        Stats::of(&overhead).mean,
        Stats::of(&overhead).p99,
    );
    Ok(())
}

/// The instances: each launch becomes a runner once it has booted, until
/// `n` jobs have run (or `fleet.give_up`).
fn spawn_instances(fleet: Arc<Fleet>, cloud: FakeCloud, n: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = 0;
        let mut instances = tokio::task::JoinSet::new();
        while Instant::now() < fleet.give_up {
            let launches = launches(&cloud);
            for l in launches.iter().skip(seen) {
                instances.spawn(run_instance(Arc::clone(&fleet), l.clone()));
            }
            seen = seen.max(launches.len());
            if lock(&fleet.lives).len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        instances.abort_all();
    })
}

/// One simulated instance: boots, its runner comes online and takes the
/// oldest queued job (as GitHub would hand it one), runs it, reports it
/// completed, and is left for the service to terminate.
async fn run_instance(fleet: Arc<Fleet>, launch: Launch) {
    tokio::time::sleep_until((launch.at + fleet.boot).into()).await;
    fleet.github.set_online(&launch.runner, true);
    let job_id = loop {
        if let Some(j) = lock(&fleet.queue).pop_front() {
            break j;
        }
        if Instant::now() > fleet.give_up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let runner_id = fleet
        .github
        .runners()
        .iter()
        .find(|r| r.name == launch.runner)
        .map_or(0, |r| r.id);
    fleet.github.set_busy(&launch.runner, true);
    let runner = || RunnerRef {
        id: runner_id,
        name: &launch.runner,
    };
    let (Ok(start), Ok(end)) = (
        fleet.driver.delivery("in_progress", job_id, Some(runner())),
        fleet.driver.delivery("completed", job_id, Some(runner())),
    ) else {
        return;
    };
    let started = fleet.driver.send(start).await;
    tokio::time::sleep(fleet.job).await;
    let ended = fleet.driver.send(end).await;
    fleet.github.set_busy(&launch.runner, false);
    fleet.github.deregister(&launch.runner);
    lock(&fleet.lives).push(JobLife {
        launched: launch.at,
        started: started.at,
        ended,
        instance: launch.instance,
        statuses_ok: started.status == 202 && ended.status == 202,
    });
}

/// The process's memory with this many live runners.
fn rss(args: &Args, driver_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let n = args.rss_runners;
    println!(
        "\n== rss: {n} queued jobs -> {n} live runners; fake EC2 and GitHub unthrottled; RSS of this one process (service + load generator + fakes) =="
    );
    let cloud = FakeCloud::new();
    cloud.set_rate_limits(TokenBucket::unlimited(), TokenBucket::unlimited());
    let github = FakeGitHub::new();
    github.set_jit_limit(TokenBucket::unlimited());
    let cap = n + 100;
    let db = driver_rt.block_on(fresh_database(args.database_url.as_deref(), "rss", cap))?;
    let (before, _) = rss_kib();
    let service = Service::start(
        args,
        &db,
        &cloud,
        &github,
        &ServiceOptions {
            max_instances: cap,
            // A few periodic passes over the full fleet before the reading.
            reconcile_interval_secs: 2,
        },
    )?;
    let outcome = driver_rt.block_on(rss_run(&service, &db, n, before));
    service.stop()?;
    outcome
}

async fn rss_run(service: &Service, db: &BenchDb, n: usize, before_kib: u64) -> anyhow::Result<()> {
    let driver = Driver::new(&service.base)?;
    // Ready and idle first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_kib, _) = rss_kib();
    let base = job_id_base();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        deliveries.push(driver.delivery("queued", base + i64::try_from(i)?, None)?);
    }
    let sent = driver.send_all(deliveries, 32).await;
    let refused = sent.iter().filter(|s| s.status != 202).count();
    drop(sent);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut booting: i64 = 0;
    while Instant::now() < deadline {
        booting =
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runners WHERE state = 'booting'")
                .fetch_one(&pool)
                .await?;
        if booting >= i64::try_from(n)? && service.cloud.live_count(None) as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if booting < i64::try_from(n)? {
        bail!("only {booting} of {n} runners reached booting");
    }
    // Several periodic passes (every 2 s) over 1,000 live runners.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (rss, hwm) = rss_kib();
    let metrics = driver.metrics_text().await;
    let passes = counter_sum(&metrics, "spot_runners_reconcile_passes_total");
    let live = service.cloud.live_count(None);
    let user_data: usize = service
        .cloud
        .instances()
        .iter()
        .map(|i| i.request.user_data.len())
        .sum();
    pool.close().await;
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "  process RSS before the service started   {:>8.1} MiB",
        mib(before_kib)
    );
    println!(
        "  process RSS with the service idle        {:>8.1} MiB",
        mib(idle_kib)
    );
    println!(
        "  process RSS with {live} live runners      {:>8.1} MiB (VmRSS)",
        mib(rss)
    );
    println!(
        "  process peak RSS                         {:>8.1} MiB (VmHWM)",
        mib(hwm)
    );
    println!(
        "  of which the fakes hold at least {:.1} MiB of user data (JIT configs) for {live} instances; {refused} webhooks not 202; {booting} runners booting; {passes} reconcile passes",
        user_data as f64 / 1024.0 / 1024.0
    );
    println!(
        "RESULT scenario=rss runners={n} live={live} booting={booting} not_202={refused} rss_mib={:.1} peak_mib={:.1} idle_mib={:.1} before_mib={:.1} fake_user_data_mib={:.1} passes={passes}",
        mib(rss),
        mib(hwm),
        mib(idle_kib),
        mib(before_kib),
        user_data as f64 / 1024.0 / 1024.0
    );
    Ok(())
}
