//! GitHub API budget benchmark (issue 13, item 1; `scripts/bench-api-budget`):
//! the production reconciler on the simulated GitHub and EC2 in virtual
//! time, with every request the production adapter would send counted by
//! endpoint ([`spot_runners_sim::api_budget`]). Three built-in scenarios:
//!
//! - `idle`: one organization, one repository, one job at the start; the
//!   third hour, when nothing is queued or running, is the idle hour;
//! - `steady`: a day of 100 jobs an hour over four repositories;
//! - `burst`: 500 jobs queued within a minute (room for all of them).
//!
//! It reports against the targets; it never asserts. A scenario file
//! (the `simulate` format) may be given instead: `-- path/to/scenario.json`.
//!
//! The redelivery scan runs beside the reconciler, as `serve` runs it with
//! App auth (or an org hook id); `--without-redelivery` measures token auth
//! with no hook id, where busy repositories are polled every minute.
//!
//! ```sh
//! cargo run --release -p spot-runners-sim --features virtual-time --example api_budget -- [idle|steady|burst|all|FILE] [--without-redelivery]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]
#![allow(clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use spot_runners_sim::api_budget::{run, Budget, HOURLY_BUDGET};
use spot_runners_sim::scenario::Scenario;

const HOUR: Duration = Duration::from_secs(3600);

/// Endpoints a job itself costs: its runner's registration, a check of
/// its status, and the registration's deletion.
const PER_JOB: [&str; 3] = ["generate_jitconfig", "get_job", "delete_runner"];

const IDLE: &str = r#"{
  "name": "idle org: one repository, one job, then nothing",
  "seed": 13, "duration": "3h", "boot_time": "60s",
  "profiles": [ { "name": "kani", "labels": ["linux", "x64", "kani"], "max_instances": 10 } ],
  "jobs": [ { "name": "proof", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/proofs",
              "duration": ["5m", "5m"], "arrivals": [ { "burst": { "at": "1m", "count": 1 } } ] } ]
}"#;

const STEADY: &str = r#"{
  "name": "steady day: 100 jobs an hour over four repositories",
  "seed": 13, "duration": "24h", "boot_time": "60s", "max_instances": 200,
  "profiles": [ { "name": "kani", "labels": ["linux", "x64", "kani"], "max_instances": 200 } ],
  "jobs": [
    { "name": "proofs", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/proofs",
      "duration": ["10m", "30m"], "arrivals": [ { "steady": { "per_hour": 40 } } ] },
    { "name": "core", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/core",
      "duration": ["10m", "30m"], "arrivals": [ { "steady": { "per_hour": 30 } } ] },
    { "name": "engine", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/engine",
      "duration": ["10m", "30m"], "arrivals": [ { "steady": { "per_hour": 20 } } ] },
    { "name": "tools", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/tools",
      "duration": ["10m", "30m"], "arrivals": [ { "steady": { "per_hour": 10 } } ] }
  ]
}"#;

const BURST: &str = r#"{
  "name": "500-job burst within a minute",
  "seed": 13, "duration": "2h", "boot_time": "90s", "max_instances": 600,
  "profiles": [ { "name": "kani", "labels": ["linux", "x64", "kani"], "max_instances": 600 } ],
  "jobs": [ { "name": "matrix", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/verified-core",
              "duration": ["20m", "40m"], "arrivals": [ { "burst": { "at": "1m", "count": 500, "spread": "1m" } } ] } ]
}"#;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_budget(title: &str, b: &Budget, per: f64, unit: &str) {
    println!("{title}");
    println!(
        "  {:<26} {:>9} {:>7} {:>9} {:>11}",
        "endpoint", "requests", "of 304", "charged", unit
    );
    for (endpoint, (n, not_modified)) in &b.by_endpoint {
        println!(
            "  {endpoint:<26} {n:>9} {not_modified:>7} {:>9} {:>11.2}",
            n - not_modified,
            (n - not_modified) as f64 / per
        );
    }
    println!(
        "  {:<26} {:>9} {:>7} {:>9} {:>11.2}",
        "all",
        b.total,
        b.total - b.charged,
        b.charged,
        b.charged as f64 / per
    );
}

fn fields(b: &Budget) -> String {
    b.by_endpoint
        .iter()
        .map(|(e, (n, m))| format!("{e}={n}/{m}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn load(name: &str, text: &str) -> Result<Scenario, String> {
    Scenario::parse(name, text).map_err(|e| e.to_string())
}

fn idle(scenario: &Scenario, redelivery: bool) -> Result<(), String> {
    let out = timed(scenario, redelivery)?;
    // The last whole hour: the job is long done, its runner reaped.
    let to = out.ran;
    let from = to.saturating_sub(HOUR);
    let b = Budget::of(&out.requests, from, to);
    print_budget(
        &format!(
            "idle hour ({:.1}-{:.1} h; {} job before it, {} completed)",
            from.as_secs_f64() / 3600.0,
            to.as_secs_f64() / 3600.0,
            out.jobs,
            out.completed
        ),
        &b,
        1.0,
        "charged/h",
    );
    println!(
        "  targets: <= 400 requests/h ...... {} ({}/h)\n           <= 100 charged/h with 304s .. {} ({}/h)",
        verdict(b.total <= 400),
        b.total,
        verdict(b.charged <= 100),
        b.charged
    );
    println!(
        "RESULT scenario=idle requests_per_h={} charged_per_h={} {}",
        b.total,
        b.charged,
        fields(&b)
    );
    Ok(())
}

fn steady(scenario: &Scenario, redelivery: bool) -> Result<(), String> {
    let out = timed(scenario, redelivery)?;
    let b = Budget::of(&out.requests, Duration::ZERO, out.ran);
    let jobs = out.jobs.max(1) as f64;
    print_budget(
        &format!(
            "steady day ({:.0} h, {} jobs, {} completed)",
            out.ran.as_secs_f64() / 3600.0,
            out.jobs,
            out.completed
        ),
        &b,
        jobs,
        "per job",
    );
    let job_charged: u64 = PER_JOB.iter().map(|e| b.requests(e)).sum();
    let per_job = job_charged as f64 / jobs;
    let all_per_job = b.charged as f64 / jobs;
    let hours = out.ran.as_secs_f64() / 3600.0;
    println!(
        "  per job: {per_job:.2} requests to the job endpoints ({}), {all_per_job:.2} counting every charged request; {:.0} charged/h on average, lowest X-RateLimit-Remaining {} of {HOURLY_BUDGET}",
        PER_JOB.join(", "),
        b.charged as f64 / hours,
        b.lowest_remaining
    );
    println!(
        "  target: <= 3 requests per job (JIT + at most one check + one delete) .. {} ({per_job:.2}; all-in {all_per_job:.2})",
        verdict(per_job <= 3.0)
    );
    println!(
        "RESULT scenario=steady jobs={} per_job={per_job:.2} all_per_job={all_per_job:.2} charged={} lowest_remaining={} {}",
        out.jobs,
        b.charged,
        b.lowest_remaining,
        fields(&b)
    );
    Ok(())
}

fn burst(scenario: &Scenario, redelivery: bool) -> Result<(), String> {
    let out = timed(scenario, redelivery)?;
    let first_hour = Budget::of(&out.requests, Duration::ZERO, HOUR);
    let whole = Budget::of(&out.requests, Duration::ZERO, out.ran);
    print_budget(
        &format!(
            "burst, first hour ({} jobs, {} completed by {:.0} h)",
            out.jobs,
            out.completed,
            out.ran.as_secs_f64() / 3600.0
        ),
        &first_hour,
        1.0,
        "charged",
    );
    let floor = HOURLY_BUDGET / 5;
    println!(
        "  lowest X-RateLimit-Remaining over the run: {} of {HOURLY_BUDGET}\n  target: never below 20% ({floor}) ...... {}",
        whole.lowest_remaining,
        verdict(whole.lowest_remaining >= floor)
    );
    println!(
        "RESULT scenario=burst jobs={} first_hour_charged={} lowest_remaining={} {}",
        out.jobs,
        first_hour.charged,
        whole.lowest_remaining,
        fields(&first_hour)
    );
    Ok(())
}

fn timed(scenario: &Scenario, redelivery: bool) -> Result<run::Outcome, String> {
    println!(
        "\n== {} ({}) ==",
        scenario.name,
        if redelivery {
            "failed deliveries redelivered"
        } else {
            "no redelivery: busy repositories polled every minute"
        }
    );
    let started = Instant::now();
    let out = run::run(scenario, redelivery)?;
    println!(
        "  ({:.0} s simulated in {:.1} s)",
        out.ran.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let redelivery = !args.iter().any(|a| a == "--without-redelivery");
    args.retain(|a| a != "--without-redelivery");
    let what = args.first().cloned().unwrap_or_else(|| "all".into());
    println!(
        "GitHub API budget: the production reconciler on the simulated GitHub, requests as the production adapter sends them (304 = listing unchanged since the scope's last one); primary limit {HOURLY_BUDGET}/h"
    );
    let result = match what.as_str() {
        "idle" => load("idle", IDLE).and_then(|s| idle(&s, redelivery)),
        "steady" => load("steady", STEADY).and_then(|s| steady(&s, redelivery)),
        "burst" => load("burst", BURST).and_then(|s| burst(&s, redelivery)),
        "all" => load("idle", IDLE)
            .and_then(|s| idle(&s, redelivery))
            .and_then(|()| load("steady", STEADY))
            .and_then(|s| steady(&s, redelivery))
            .and_then(|()| load("burst", BURST))
            .and_then(|s| burst(&s, redelivery)),
        path => Scenario::load(std::path::Path::new(path))
            .map_err(|e| e.to_string())
            .and_then(|s| steady(&s, redelivery)),
    };
    if let Err(e) = result {
        eprintln!("api_budget: {e}");
        std::process::exit(1);
    }
}
