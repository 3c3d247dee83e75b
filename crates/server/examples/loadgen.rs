//! Load generator for the webhook ingest benchmark (`scripts/bench-ingest`).
//!
//! Fires signed `workflow_job` `queued` deliveries, each with its own job id
//! and delivery GUID, at a running `spot-runners serve`, from a fixed number
//! of concurrent senders over keep-alive connections (a closed loop: each
//! sender sends its next delivery as soon as the previous one is answered).
//! Every body and signature is built before the clock starts, and a short
//! warm-up is not counted. It prints the acknowledged deliveries per second,
//! the acknowledgement latency percentiles and every answer that was not
//! `202`, then one machine-readable `RESULT key=value …` line.
//!
//! ```sh
//! cargo run --release --example loadgen -- \
//!     --url http://127.0.0.1:8080 --secret change-me --requests 20000 --concurrency 64
//! ```
//!
//! With `--flood N` it measures the intake under strangers instead: N
//! senders (loopback only, for at most `--flood-secs`) keep POSTing
//! unauthenticated 25 MiB `workflow_job` bodies with a well-formed but
//! forged signature (the worst case: the service must read them to know),
//! while one signed delivery every `--probe-every-ms` measures how long a
//! real delivery waits, and the service's RSS (`--rss-of PID`) is sampled;
//! the kernel's peak (`VmHWM`) is reported too.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 \
//!     --secret change-me --flood 200 --flood-secs 20 --rss-of "$(pidof spot-runners)"
//! ```
//!
//! Exits non-zero only when it cannot run at all (bad template, service never
//! ready); a slow or failing service is reported, not treated as an error.

// The report on stdout is this tool's whole purpose.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};
use spot_runners_domain::webhook::{delivery_headers, sign};

const DEFAULT_TEMPLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/workflow_job/in_progress-org-1.json"
);

#[derive(Parser)]
#[command(about = "Fires signed workflow_job deliveries at spot-runners and reports ack latency")]
struct Args {
    /// Base URL of the service (`/webhook` and `/readyz` are appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Webhook secret the service was started with.
    #[arg(long, env = "SPOT_RUNNERS_WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
    /// Measured deliveries.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    requests: usize,
    /// Concurrent senders (each keeps one connection alive).
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Deliveries sent first and not counted.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// A GitHub `workflow_job` payload to shape the deliveries after.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: PathBuf,
    /// First job id (default: derived from the clock, so runs against the
    /// same database do not collide).
    #[arg(long)]
    job_id_base: Option<i64>,
    /// `runs-on` labels of every job, comma-separated.
    #[arg(long, default_value = "self-hosted,linux,x64,kani")]
    labels: String,
    /// Runtime threads of the generator (1 keeps it to one core, leaving the
    /// rest to the service and the database).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// How long to wait for `/readyz` before giving up.
    #[arg(long, default_value_t = 30)]
    ready_timeout_secs: u64,
    /// `NAME=PID`: report the CPU time that process and its direct children
    /// (e.g. a postmaster's backends) used during the measured run. Linux only;
    /// may be repeated.
    #[arg(long = "cpu-of", value_name = "NAME=PID", value_parser = parse_cpu_of)]
    cpu_of: Vec<(String, u32)>,
    /// Flood mode: this many concurrent unauthenticated senders of large
    /// bodies (0: the ordinary ingest benchmark).
    #[arg(long, default_value_t = 0)]
    flood: usize,
    /// How long the flood lasts (at most 120 s).
    #[arg(long, default_value_t = 20)]
    flood_secs: u64,
    /// Body size each flood sender announces and sends, in MiB.
    #[arg(long, default_value_t = 25)]
    flood_body_mib: usize,
    /// A signed delivery is sent this often during the flood.
    #[arg(long, default_value_t = 100)]
    probe_every_ms: u64,
    /// PID of the service, whose RSS is sampled during the flood.
    #[arg(long)]
    rss_of: Option<u32>,
}

fn parse_cpu_of(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid.parse().map_err(|e| format!("bad pid {pid:?}: {e}"))?;
    Ok((name.to_owned(), pid))
}

/// One delivery, ready to send: nothing is built or signed while timing.
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
}

/// What the senders saw.
#[derive(Default)]
struct Tally {
    /// Acknowledgement latency of every answered request, in microseconds.
    latencies_us: Vec<u64>,
    accepted: usize,
    duplicates: usize,
    /// Answers other than 202, by status code.
    other_status: BTreeMap<u16, usize>,
    transport_errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        for (status, n) in other.other_status {
            *self.other_status.entry(status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn non_202(&self) -> usize {
        self.other_status.values().sum::<usize>() + self.transport_errors
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.requests > 0, "--requests must be at least 1");
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.flood > 0 {
        return flood::run(&args).await;
    }
    let base_url = args.url.trim_end_matches('/').to_owned();
    let webhook_url = format!("{base_url}/webhook");
    let text = std::fs::read(&args.template)
        .with_context(|| format!("reading {}", args.template.display()))?;
    let template: Value = serde_json::from_slice(&text)
        .with_context(|| format!("parsing {}", args.template.display()))?;
    ensure!(
        template.get("workflow_job").is_some_and(Value::is_object),
        "{} is not a workflow_job payload",
        args.template.display()
    );
    let labels: Vec<&str> = args
        .labels
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let base = match args.job_id_base {
        Some(b) => b,
        // Microseconds since the epoch: far below i64::MAX, and a later run
        // starts past this run's ids unless it sends a million per second.
        None => i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros())?,
    };

    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_ready(
        &client,
        &format!("{base_url}/readyz"),
        Duration::from_secs(args.ready_timeout_secs),
    )
    .await?;

    let total = args.warmup + args.requests;
    let built = Instant::now();
    let mut all = Vec::with_capacity(total);
    let mut rng = rand::thread_rng();
    for i in 0..total {
        let job_id = base + i64::try_from(i)?;
        all.push(delivery(
            &template,
            &labels,
            job_id,
            &mut rng,
            &args.secret,
        )?);
    }
    let body_bytes: usize = all.iter().map(|d| d.body.len()).sum();
    println!(
        "loadgen: {total} deliveries built and signed in {:.1} s ({} bytes each on average), job ids {base}..{}",
        built.elapsed().as_secs_f64(),
        body_bytes / total,
        base + i64::try_from(total)? - 1,
    );
    let measured = all.split_off(args.warmup);

    if args.warmup > 0 {
        let (warm, elapsed) = fire(&client, &webhook_url, all, args.concurrency).await;
        println!(
            "warm-up: {} deliveries in {:.2} s, {} not 202",
            args.warmup,
            elapsed.as_secs_f64(),
            warm.non_202()
        );
    }

    let cpu_before = CpuSnapshot::take(&args.cpu_of);
    let (mut tally, elapsed) = fire(&client, &webhook_url, measured, args.concurrency).await;
    let cpu = CpuSnapshot::take(&args.cpu_of).since(&cpu_before, elapsed);
    report(&args, &mut tally, elapsed, &cpu);
    Ok(())
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(client: &reqwest::Client, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let last = match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= until {
            bail!("{url} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `queued` delivery for job `job_id` in GitHub's payload shape.
fn delivery(
    template: &Value,
    labels: &[&str],
    job_id: i64,
    rng: &mut impl Rng,
    secret: &str,
) -> anyhow::Result<Delivery> {
    let mut payload = template.clone();
    payload["action"] = json!("queued");
    let job = &mut payload["workflow_job"];
    let repo = job["html_url"]
        .as_str()
        .and_then(|u| u.split("/runs/").next())
        .unwrap_or("https://github.com/octo-org/example-workflow")
        .to_owned();
    let run_id = job_id / 4;
    job["id"] = json!(job_id);
    job["run_id"] = json!(run_id);
    job["run_attempt"] = json!(1);
    job["status"] = json!("queued");
    job["conclusion"] = Value::Null;
    job["completed_at"] = Value::Null;
    job["created_at"] = job["started_at"].clone();
    job["steps"] = json!([]);
    job["labels"] = json!(labels);
    job["html_url"] = json!(format!("{repo}/runs/{job_id}"));
    job["workflow_name"] = json!("Kani proofs");
    for field in [
        "runner_id",
        "runner_name",
        "runner_group_id",
        "runner_group_name",
    ] {
        job[field] = Value::Null;
    }
    let body = serde_json::to_vec(&payload)?;
    let mut headers = HeaderMap::with_capacity(5);
    for (name, value) in
        delivery_headers("workflow_job", &guid(rng), sign(secret.as_bytes(), &body))
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

/// A random version-4 GUID, like GitHub's `X-GitHub-Delivery`.
fn guid(rng: &mut impl Rng) -> String {
    let mut b: [u8; 16] = rng.gen();
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

/// Sends every delivery from `concurrency` senders; returns what they saw and
/// the wall time from the first send to the last answer.
async fn fire(
    client: &reqwest::Client,
    url: &str,
    deliveries: Vec<Delivery>,
    concurrency: usize,
) -> (Tally, Duration) {
    let per_sender = deliveries.len() / concurrency + 1;
    let queue = Arc::new(Mutex::new(VecDeque::from(deliveries)));
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let queue = Arc::clone(&queue);
        let client = client.clone();
        let url = url.to_owned();
        senders.spawn(async move {
            let mut tally = Tally {
                latencies_us: Vec::with_capacity(per_sender),
                ..Tally::default()
            };
            loop {
                let next = queue.lock().map(|mut q| q.pop_front()).ok().flatten();
                let Some(d) = next else { break };
                send(&client, &url, d, &mut tally).await;
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(done) = senders.join_next().await {
        match done {
            Ok(t) => tally.merge(t),
            Err(e) => {
                tally.transport_errors += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (tally, started.elapsed())
}

async fn send(client: &reqwest::Client, url: &str, d: Delivery, tally: &mut Tally) {
    let sent = Instant::now();
    let answer = client
        .post(url)
        .headers(d.headers)
        .body(d.body)
        .send()
        .await;
    let result = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            r.bytes().await.map(|body| (status, body))
        }
        Err(e) => Err(e),
    };
    let latency = sent.elapsed();
    match result {
        Ok((status, body)) => {
            tally
                .latencies_us
                .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            if status == 202 {
                tally.accepted += 1;
                if body.windows(9).any(|w| w == b"duplicate") {
                    tally.duplicates += 1;
                }
            } else {
                *tally.other_status.entry(status).or_default() += 1;
            }
        }
        Err(e) => {
            tally.transport_errors += 1;
            tally.first_error.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Linux's `USER_HZ`: the unit of CPU times in `/proc` (100 on every
/// mainstream architecture).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time used so far, in clock ticks, by this process, by each watched
/// process tree, and by the whole machine.
struct CpuSnapshot {
    own: u64,
    watched: Vec<(String, u64)>,
    /// Busy and total ticks over all CPUs, from `/proc/stat`.
    machine: Option<(u64, u64)>,
}

/// What the snapshots say about the measured run, in cores (CPU seconds per
/// second of wall time).
struct CpuUse {
    own: f64,
    watched: Vec<(String, f64)>,
    machine_busy: Option<f64>,
    cores: usize,
}

impl CpuSnapshot {
    fn take(watch: &[(String, u32)]) -> Self {
        let stats = if watch.is_empty() {
            Vec::new()
        } else {
            all_stats()
        };
        let watched = watch
            .iter()
            .map(|(name, pid)| {
                let ticks = stats
                    .iter()
                    .filter(|s| s.pid == *pid || s.ppid == *pid)
                    .map(|s| s.ticks)
                    .sum();
                (name.clone(), ticks)
            })
            .collect();
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(0, &t))
            .map_or(0, |s| s.ticks);
        Self {
            own,
            watched,
            machine: machine_ticks(),
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn since(&self, before: &Self, elapsed: Duration) -> CpuUse {
        let wall = elapsed.as_secs_f64().max(1e-9);
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_SEC / wall;
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        CpuUse {
            own: cores(self.own.saturating_sub(before.own)),
            watched: self
                .watched
                .iter()
                .zip(&before.watched)
                .map(|((name, after), (_, b))| (name.clone(), cores(after.saturating_sub(*b))))
                .collect(),
            machine_busy: match (self.machine, before.machine) {
                (Some((busy, total)), Some((busy0, total0))) if total > total0 => {
                    let share = busy.saturating_sub(busy0) as f64 / (total - total0) as f64;
                    Some(share * cpus as f64)
                }
                _ => None,
            },
            cores: cpus,
        }
    }
}

/// One process's CPU ticks (user + system) and parent.
struct ProcStat {
    pid: u32,
    ppid: u32,
    ticks: u64,
}

/// Parses `/proc/PID/stat`; the command name may hold spaces and parentheses,
/// so fields are counted from its closing parenthesis.
fn parse_stat(pid: u32, text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state, ppid, ..., utime (14th field of the line), stime.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        pid,
        ppid,
        ticks: utime + stime,
    })
}

fn all_stats() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &text)
        })
        .collect()
}

/// Busy and total ticks of all CPUs together (the `cpu` line of `/proc/stat`;
/// idle and iowait count as not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already
    // inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    // Precision loss is irrelevant for sample counts and microseconds.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    #[allow(clippy::cast_precision_loss)]
    let ms = sorted_us[idx] as f64 / 1000.0;
    ms
}

fn report(args: &Args, tally: &mut Tally, elapsed: Duration, cpu: &CpuUse) {
    tally.latencies_us.sort_unstable();
    let secs = elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = tally.accepted as f64 / secs;
    let lat = &tally.latencies_us;
    let (p50, p90, p99, max) = (
        percentile_ms(lat, 50.0),
        percentile_ms(lat, 90.0),
        percentile_ms(lat, 99.0),
        percentile_ms(lat, 100.0),
    );
    println!(
        "measured: {} deliveries, concurrency {}, {:.2} s",
        args.requests, args.concurrency, secs
    );
    println!("  rate     {rate:.0} deliveries/s acknowledged (202)");
    println!("  latency  p50 {p50:.2} ms  p90 {p90:.2} ms  p99 {p99:.2} ms  max {max:.2} ms");
    println!(
        "  answers  {} accepted ({} of them duplicates), {} not 202",
        tally.accepted,
        tally.duplicates,
        tally.non_202()
    );
    for (status, n) in &tally.other_status {
        println!("           {n} x HTTP {status}");
    }
    if tally.transport_errors > 0 {
        println!(
            "           {} transport errors, first: {}",
            tally.transport_errors,
            tally.first_error.as_deref().unwrap_or("?")
        );
    }
    let mut cpu_line = format!("  cpu      loadgen {:.2}", cpu.own);
    let mut cpu_fields = format!("cpu_loadgen={:.2}", cpu.own);
    let mut accounted = cpu.own;
    for (name, cores) in &cpu.watched {
        cpu_line.push_str(&format!(", {name} {cores:.2}"));
        cpu_fields.push_str(&format!(" cpu_{name}={cores:.2}"));
        accounted += cores;
    }
    if let Some(busy) = cpu.machine_busy {
        cpu_line.push_str(&format!(
            ", everything else {:.2}; machine busy {busy:.2} of {} cores",
            (busy - accounted).max(0.0),
            cpu.cores
        ));
        cpu_fields.push_str(&format!(
            " cpu_other={:.2} cpu_busy={busy:.2}",
            (busy - accounted).max(0.0)
        ));
    } else {
        cpu_line.push_str(" (cores)");
    }
    println!("{cpu_line}");
    println!(
        "RESULT requests={} concurrency={} elapsed_s={secs:.3} rate={rate:.1} p50_ms={p50:.3} p90_ms={p90:.3} p99_ms={p99:.3} max_ms={max:.3} accepted={} duplicates={} non_202={} {cpu_fields}",
        args.requests,
        args.concurrency,
        tally.accepted,
        tally.duplicates,
        tally.non_202()
    );
}

/// `--flood`: strangers' large bodies against signed deliveries.
mod flood {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context};
    use spot_runners_domain::webhook::{delivery_headers, sign};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{percentile_ms, wait_ready, Args};

    const MAX_SECS: u64 = 120;
    const CHUNK: usize = 64 * 1024;

    #[derive(Default)]
    struct Attack {
        started: AtomicU64,
        answered_503: AtomicU64,
        answered_401: AtomicU64,
        answered_other: AtomicU64,
        /// Connection closed or reset before an answer was read.
        cut: AtomicU64,
        bytes_sent: AtomicU64,
    }

    pub async fn run(args: &Args) -> anyhow::Result<()> {
        ensure!(
            args.flood_secs <= MAX_SECS,
            "--flood-secs is at most {MAX_SECS}"
        );
        ensure!(args.flood <= 1000, "--flood is at most 1000");
        let base = args.url.trim_end_matches('/').to_owned();
        let url: reqwest::Url = base.parse().context("--url")?;
        let host = url.host_str().unwrap_or_default().to_owned();
        ensure!(
            matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]"),
            "the flood only goes to loopback, not {host}"
        );
        let addr = format!("{host}:{}", url.port_or_known_default().unwrap_or(80));
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?;
        wait_ready(
            &client,
            &format!("{base}/readyz"),
            Duration::from_secs(args.ready_timeout_secs),
        )
        .await?;
        let rss_before = args.rss_of.and_then(|p| status_kib(p, "VmRSS:"));

        let body_len = args.flood_body_mib * 1024 * 1024;
        let forged = sign(b"a stranger's guess", b"anything");
        let head = format!(
            "POST /webhook HTTP/1.1\r\nHost: {addr}\r\nX-GitHub-Event: workflow_job\r\n\
             X-GitHub-Delivery: flood\r\nX-Hub-Signature-256: {forged}\r\n\
             Content-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
        );
        let attack = Arc::new(Attack::default());
        let until = Instant::now() + Duration::from_secs(args.flood_secs);
        let mut tasks = Vec::new();
        for _ in 0..args.flood {
            let (attack, head, addr) = (Arc::clone(&attack), head.clone(), addr.clone());
            tasks.push(tokio::spawn(async move {
                let zeros = vec![b' '; CHUNK];
                while Instant::now() < until {
                    attack.started.fetch_add(1, Ordering::Relaxed);
                    let outcome = tokio::time::timeout_at(
                        until.into(),
                        one_attack(&addr, head.as_bytes(), body_len, &zeros, &attack),
                    )
                    .await;
                    let counter = match outcome {
                        Ok(Some(503)) => &attack.answered_503,
                        Ok(Some(401)) => &attack.answered_401,
                        Ok(Some(_)) => &attack.answered_other,
                        Ok(None) | Err(_) => &attack.cut,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }

        // The signed deliveries GitHub would be sending meanwhile.
        let probe_every = Duration::from_millis(args.probe_every_ms.max(1));
        let secret = args.secret.clone();
        let webhook = format!("{base}/webhook");
        // On a thread and runtime of its own, so the flood's senders cannot
        // delay it inside this process: what it measures is the service.
        let probes = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Its own client too: pooled connections belong to a runtime.
            let client = reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()?;
            Ok::<_, anyhow::Error>(runtime.block_on(async move {
                let mut latencies_us = Vec::new();
                let mut statuses = std::collections::BTreeMap::<String, usize>::new();
                let mut tick = tokio::time::interval(probe_every);
                let id_base = i64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros())
                        .unwrap_or_default(),
                )
                .unwrap_or_default();
                let mut n = 0i64;
                while Instant::now() < until {
                    tick.tick().await;
                    n += 1;
                    let body = probe_body(id_base + n);
                    let mut req = client.post(&webhook).body(body.clone());
                    for (name, value) in delivery_headers(
                        "workflow_job",
                        &format!("probe-{}", id_base + n),
                        sign(secret.as_bytes(), &body),
                    ) {
                        req = req.header(name, value);
                    }
                    let sent = Instant::now();
                    let status = match req.send().await {
                        Ok(r) => r.status().as_u16().to_string(),
                        Err(e) => format!("error ({e})"),
                    };
                    latencies_us
                        .push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                    *statuses.entry(status).or_default() += 1;
                }
                (latencies_us, statuses)
            }))
        });

        let mut peak_sampled = 0u64;
        if let Some(pid) = args.rss_of {
            while Instant::now() < until {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    peak_sampled = peak_sampled.max(kib);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let (mut latencies, statuses) = probes
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
        latencies.sort_unstable();
        let hwm = args.rss_of.and_then(|p| status_kib(p, "VmHWM:"));
        let rss_after = args.rss_of.and_then(|p| status_kib(p, "VmRSS:"));
        let mib =
            |k: Option<u64>| k.map_or("n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        println!(
            "flood: {} senders x {} MiB bodies for {} s; {} requests started, {:.0} MiB sent",
            args.flood,
            args.flood_body_mib,
            args.flood_secs,
            attack.started.load(Ordering::Relaxed),
            attack.bytes_sent.load(Ordering::Relaxed) as f64 / 1048576.0
        );
        println!(
            "  answers to the flood: 503 {}, 401 {}, other {}, cut off {}",
            attack.answered_503.load(Ordering::Relaxed),
            attack.answered_401.load(Ordering::Relaxed),
            attack.answered_other.load(Ordering::Relaxed),
            attack.cut.load(Ordering::Relaxed)
        );
        println!(
            "  signed deliveries: {} sent, answers {statuses:?}; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            percentile_ms(&latencies, 50.0),
            percentile_ms(&latencies, 99.0),
            latencies.last().map_or(0.0, |u| *u as f64 / 1000.0),
        );
        println!(
            "  service RSS: before {} MiB, peak sampled {} MiB, peak (VmHWM) {} MiB, after {} MiB",
            mib(rss_before),
            mib((peak_sampled > 0).then_some(peak_sampled)),
            mib(hwm),
            mib(rss_after)
        );
        println!(
            "RESULT mode=flood senders={} body_mib={} secs={} probes={} probe_p50_ms={:.1} probe_p99_ms={:.1} probe_max_ms={:.1} peak_rss_mib={} hwm_mib={}",
            args.flood,
            args.flood_body_mib,
            args.flood_secs,
            latencies.len(),
            percentile_ms(&latencies, 50.0),
            percentile_ms(&latencies, 99.0),
            latencies.last().map_or(0.0, |u| *u as f64 / 1000.0),
            mib((peak_sampled > 0).then_some(peak_sampled)),
            mib(hwm),
        );
        Ok(())
    }

    /// One stranger's request: the head, then the body until the service
    /// answers or hangs up. The status it answered, if any.
    async fn one_attack(
        addr: &str,
        head: &[u8],
        body_len: usize,
        zeros: &[u8],
        attack: &Attack,
    ) -> Option<u16> {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(head).await.ok()?;
        let (mut reader, mut writer) = stream.split();
        let mut left = body_len;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while left > 0 {
            let n = left.min(zeros.len());
            tokio::select! {
                biased;
                r = reader.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return None,
                    Ok(k) => { answer.extend_from_slice(&buf[..k]); break; }
                },
                w = writer.write_all(&zeros[..n]) => {
                    if w.is_err() {
                        break;
                    }
                    attack.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n;
                }
            }
        }
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => answer.extend_from_slice(&buf[..k]),
            }
        }
        let line = String::from_utf8_lossy(&answer);
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok())
    }

    fn probe_body(job_id: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "action": "queued",
            "workflow_job": {
                "id": job_id, "run_id": job_id, "run_attempt": 1, "name": "probe",
                "labels": ["self-hosted", "linux", "x64", "kani"], "status": "queued",
                "created_at": "2026-12-01T10:00:00Z"
            },
            "repository": {"full_name": "flood/probe", "owner": {"login": "flood"}},
            "organization": {"login": "flood"}
        }))
        .unwrap_or_default()
    }

    /// A `kB` line of /proc/PID/status.
    fn status_kib(pid: u32, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}
