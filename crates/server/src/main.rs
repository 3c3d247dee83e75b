//! `spot-runners`: the command line. Errors become `anyhow` here, at the edge.

// The inspection commands answer on stdout; that is their whole purpose.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use spot_runners::configuration::RawSettings;
use spot_runners::database::Database;
use spot_runners::inspect;
use spot_runners::simulation::{self, SimServeArgs, SimulateArgs, SimulatedService};
use spot_runners::startup::{shutdown_signal, Application};
use spot_runners::telemetry;
use spot_runners_domain::cost::ReportBy;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spot-runners",
    version,
    about = "Ephemeral GitHub Actions runners on EC2 spot instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (migrations are applied at start).
    Serve {
        #[command(flatten)]
        settings: RawSettings,
        /// Simulated EC2 and GitHub in process: no AWS or GitHub account
        /// needed. A simulated GitHub queues jobs and sends their webhooks.
        #[arg(long)]
        simulate: bool,
        #[command(flatten)]
        sim: SimServeArgs,
    },
    /// Run a scenario (examples/*.json) against simulated EC2 and GitHub in
    /// virtual time, and report waits, costs and what went wrong.
    Simulate(SimulateArgs),
    /// Apply database migrations and exit.
    Migrate {
        #[command(flatten)]
        settings: RawSettings,
    },
    /// Ask the ledger about jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Ask the ledger about runners.
    Runners {
        #[command(subcommand)]
        command: RunnersCommand,
    },
    /// Cost, spot savings, savings lost to interruptions and re-runs, from
    /// the ledger and the instance_prices table.
    Report {
        /// How far back: a count and h, d or w (e.g. 36h, 7d, 2w).
        #[arg(long, default_value = "7d", value_parser = parse_since)]
        since: chrono::Duration,
        /// One line per repository, workflow or profile.
        #[arg(long, default_value = "profile", value_parser = parse_by)]
        by: ReportBy,
        #[command(flatten)]
        settings: RawSettings,
    },
    /// Exit 0 when the service on SPOT_RUNNERS_LISTEN answers /healthz (for container health checks).
    Healthcheck {
        #[arg(long, env = "SPOT_RUNNERS_LISTEN", default_value = "0.0.0.0:8080")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Why a job has, or has not, got a runner.
    Explain {
        /// The workflow job id (`workflow_job.id` in the webhook, the number in the job's URL).
        job_id: i64,
        #[command(flatten)]
        settings: RawSettings,
    },
}

#[derive(Subcommand)]
enum RunnersCommand {
    /// This controller's live runners, one per line.
    List {
        /// Include runners that ended in the last 24 hours.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        settings: RawSettings,
    },
}

fn parse_since(v: &str) -> Result<chrono::Duration, String> {
    spot_runners_domain::cost::parse_since(v).map_err(|e| e.to_string())
}

fn parse_by(v: &str) -> Result<ReportBy, String> {
    v.parse()
        .map_err(|e: spot_runners_domain::DomainError| e.to_string())
}

/// Opens the database for a one-off command, runs `f` and closes it.
async fn with_database<F, Fut>(settings: RawSettings, f: F) -> anyhow::Result<String>
where
    F: FnOnce(spot_runners::configuration::Settings, spot_runners_store::PgStore) -> Fut,
    Fut: std::future::Future<Output = Result<String, spot_runners::Error>>,
{
    // Reading the ledger needs no webhook secret.
    let settings = settings.parse(true)?;
    let db = Database::open(&settings).await?;
    let result = f(settings, db.store.clone()).await;
    db.close().await;
    Ok(result?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let result = run(cli).await;
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            settings,
            simulate: true,
            sim,
        } => {
            let settings = settings.parse(true)?;
            let service = SimulatedService::build(settings, &sim).await?;
            service.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Serve { settings, .. } => {
            let settings = settings.parse(false)?;
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Simulate(args) => {
            let text = tokio::task::spawn_blocking(move || {
                #[allow(clippy::print_stderr)]
                let mut progress = |p: &_| eprintln!("{}", simulation::progress_line(p));
                simulation::run_scenario(&args, &mut progress)
            })
            .await??;
            print!("{text}");
        }
        Command::Migrate { settings } => {
            // Migrating needs no webhook secret.
            let settings = settings.parse(true)?;
            let db = Database::open(&settings).await?;
            db.close().await;
        }
        Command::Jobs {
            command: JobsCommand::Explain { job_id, settings },
        } => {
            let text = with_database(settings, |s, store| async move {
                inspect::explain_job(&store, &s, job_id).await
            })
            .await?;
            print!("{text}");
        }
        Command::Runners {
            command: RunnersCommand::List { all, settings },
        } => {
            let text = with_database(settings, |s, store| async move {
                inspect::list_runners(&store, &s, all).await
            })
            .await?;
            print!("{text}");
        }
        Command::Report {
            since,
            by,
            settings,
        } => {
            let text = with_database(settings, |s, store| async move {
                spot_runners::cost_report::report(&store, &s, since, by, chrono::Utc::now()).await
            })
            .await?;
            print!("{text}");
        }
        Command::Healthcheck { listen } => {
            let addr: std::net::SocketAddr = listen.parse().context("SPOT_RUNNERS_LISTEN")?;
            let host = if addr.ip().is_unspecified() {
                std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            let res = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()?
                .get(format!("http://{host}/healthz"))
                .send()
                .await
                .context("GET /healthz")?;
            anyhow::ensure!(
                res.status().is_success(),
                "/healthz answered {}",
                res.status()
            );
        }
    }
    Ok(())
}
