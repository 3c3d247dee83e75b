//! GitHub's API budget, as the production adapter would spend it
//! (issue 13, item 1; `scripts/bench-api-budget`).
//!
//! [`CountingGitHub`] sits between the reconciler and the [`FakeGitHub`]
//! and records, for every port call, the HTTP requests the production
//! adapter (`crates/github`) sends for it, under the adapter's endpoint
//! names (`spot_runners_github_api_requests_total{endpoint}`):
//!
//! - `list_runners`: one request per page of 100; a listing identical to
//!   the scope's previous one is answered `304 Not Modified`, as GitHub
//!   answers the adapter's `If-None-Match` (a 304 does not count against
//!   the primary rate limit);
//! - `queued_jobs`: `list_workflow_runs` twice (queued, in progress), then
//!   `list_jobs_for_run` for each of those runs (at most 20 of each), as the
//!   adapter polls. These are conditional too: a runs listing with the same
//!   runs as the repository's previous poll is a 304, and so is the jobs
//!   listing of a run listed then whose jobs are all in the same state and
//!   none running (a running job's steps move, which changes its listing:
//!   counted as changed, an upper bound);
//! - every other call: one request (`list_hook_deliveries` included, which
//!   on the App's webhook is really charged to the App, not the
//!   installation).
//!
//! [`Budget`] then charges them against GitHub's primary limit of 5,000
//! requests an hour per installation (a fixed window that starts with the
//! first request).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use spot_runners_domain::api_budget::RateLimit;
use spot_runners_domain::ports::{
    GitHub, GitHubError, GitHubJob, GitHubRunner, HookDelivery, Installation, JitConfig,
    JitRequest, JobReport, RunnerScope, WebhookSource,
};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::survival::RerunFailure;

use crate::sim_clock::SimClock;
use crate::FakeGitHub;

/// GitHub's primary rate limit for an App installation (the floor; large
/// organizations get more).
pub const HOURLY_BUDGET: u64 = 5_000;
const HOUR: Duration = Duration::from_secs(3600);
/// `per_page` of the adapter's runner listing.
const RUNNERS_PER_PAGE: usize = 100;
/// Runs per status the adapter's poll looks at (`QUEUED_RUNS_PER_POLL`).
const RUNS_PER_POLL: usize = 20;

/// One HTTP request the production adapter would have sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub endpoint: &'static str,
    /// Answered `304 Not Modified` (free under the primary rate limit).
    pub not_modified: bool,
    /// Since the run started.
    pub at: Duration,
}

/// Workflow runs of a repository that are waiting or running, newest
/// first, as GitHub's runs listings would show them; the driver keeps these
/// current.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenRuns {
    pub queued: Vec<OpenRun>,
    pub in_progress: Vec<OpenRun>,
}

/// One run and its jobs, as its jobs listing would show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRun {
    pub id: i64,
    pub jobs: Vec<(i64, JobState)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    InProgress,
    Completed,
}

/// What a repository's previous poll was shown.
#[derive(Default)]
struct LastPoll {
    queued: Vec<i64>,
    in_progress: Vec<i64>,
    jobs: HashMap<i64, Vec<(i64, JobState)>>,
}

/// The fake GitHub, with the adapter's HTTP requests counted.
pub struct CountingGitHub {
    inner: FakeGitHub,
    clock: SimClock,
    log: Mutex<Vec<Request>>,
    /// The primary limit's current window: its start and what it charged.
    window: Mutex<Option<(Duration, u64)>>,
    last_listing: Mutex<HashMap<RunnerScope, Vec<GitHubRunner>>>,
    open_runs: Mutex<BTreeMap<String, OpenRuns>>,
    last_polls: Mutex<HashMap<String, LastPoll>>,
}

impl CountingGitHub {
    pub fn new(inner: FakeGitHub, clock: SimClock) -> Self {
        Self {
            inner,
            clock,
            log: Mutex::default(),
            window: Mutex::default(),
            last_listing: Mutex::default(),
            open_runs: Mutex::default(),
            last_polls: Mutex::default(),
        }
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        crate::lock(&self.log).clone()
    }

    /// What the runs listing shows per repository (lower-cased `owner/repo`).
    pub fn set_open_runs(&self, runs: BTreeMap<String, OpenRuns>) {
        *crate::lock(&self.open_runs) = runs;
    }

    fn record(&self, endpoint: &'static str, n: usize, not_modified: bool) {
        let at = self.clock.elapsed();
        {
            // The same fixed windows as [`Budget::of`].
            let mut window = crate::lock(&self.window);
            let (start, used) = window.get_or_insert((at, 0));
            while at >= *start + HOUR {
                *start += HOUR;
                *used = 0;
            }
            if !not_modified {
                *used += n as u64;
            }
        }
        let mut log = crate::lock(&self.log);
        for _ in 0..n {
            log.push(Request {
                endpoint,
                not_modified,
                at,
            });
        }
    }
}

#[async_trait]
impl GitHub for CountingGitHub {
    fn jit_config_limit(&self) -> TokenBucket {
        self.inner.jit_config_limit()
    }

    /// What GitHub's `x-ratelimit-*` headers would say now.
    fn rate_limit(&self) -> Option<RateLimit> {
        let (start, used) = (*crate::lock(&self.window))?;
        let at = self.clock.elapsed();
        let reset_in = (start + HOUR).checked_sub(at)?;
        Some(RateLimit {
            remaining: HOURLY_BUDGET.saturating_sub(used) as i64,
            limit: HOURLY_BUDGET as i64,
            reset_at: self.clock.now_utc() + chrono::Duration::from_std(reset_in).ok()?,
        })
    }

    async fn generate_jit_config(
        &self,
        scope: &RunnerScope,
        request: &JitRequest,
    ) -> Result<JitConfig, GitHubError> {
        self.record("generate_jitconfig", 1, false);
        self.inner.generate_jit_config(scope, request).await
    }

    async fn list_runners(&self, scope: &RunnerScope) -> Result<Vec<GitHubRunner>, GitHubError> {
        let listed = self.inner.list_runners(scope).await;
        match &listed {
            Ok(runners) => {
                let pages = runners.len().div_ceil(RUNNERS_PER_PAGE).max(1);
                let mut last = crate::lock(&self.last_listing);
                let unchanged = last.get(scope) == Some(runners);
                last.insert(scope.clone(), runners.clone());
                drop(last);
                self.record("list_runners", pages, unchanged);
            }
            Err(_) => self.record("list_runners", 1, false),
        }
        listed
    }

    async fn delete_runner(&self, scope: &RunnerScope, runner_id: i64) -> Result<(), GitHubError> {
        self.record("delete_runner", 1, false);
        self.inner.delete_runner(scope, runner_id).await
    }

    async fn job(&self, repository: &str, job_id: i64) -> Result<JobReport, GitHubError> {
        self.record("get_job", 1, false);
        self.inner.job(repository, job_id).await
    }

    async fn queued_jobs(&self, repository: &str) -> Result<Vec<GitHubJob>, GitHubError> {
        let key = repository.to_ascii_lowercase();
        let runs = crate::lock(&self.open_runs)
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let queued = &runs.queued[..runs.queued.len().min(RUNS_PER_POLL)];
        let in_progress = &runs.in_progress[..runs.in_progress.len().min(RUNS_PER_POLL)];
        let ids = |runs: &[OpenRun]| runs.iter().map(|r| r.id).collect::<Vec<_>>();
        let now = LastPoll {
            queued: ids(queued),
            in_progress: ids(in_progress),
            jobs: queued
                .iter()
                .chain(in_progress)
                .map(|r| (r.id, r.jobs.clone()))
                .collect(),
        };
        let before = crate::lock(&self.last_polls).insert(key, now);
        let before = before.as_ref();
        for (listed, shown) in [
            (queued, before.map(|b| &b.queued)),
            (in_progress, before.map(|b| &b.in_progress)),
        ] {
            self.record("list_workflow_runs", 1, shown == Some(&ids(listed)));
        }
        for run in queued.iter().chain(in_progress) {
            let same = before.and_then(|b| b.jobs.get(&run.id)) == Some(&run.jobs)
                && !run.jobs.iter().any(|(_, s)| *s == JobState::InProgress);
            self.record("list_jobs_for_run", 1, same);
        }
        self.inner.queued_jobs(repository).await
    }

    async fn installations(&self) -> Result<Vec<Installation>, GitHubError> {
        self.record("list_installations", 1, false);
        self.inner.installations().await
    }

    async fn hook_deliveries(
        &self,
        source: &WebhookSource,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<HookDelivery>, GitHubError> {
        self.record("list_hook_deliveries", 1, false);
        self.inner.hook_deliveries(source, since).await
    }

    async fn redeliver(&self, source: &WebhookSource, delivery_id: i64) -> Result<(), GitHubError> {
        self.record("redeliver_hook_delivery", 1, false);
        self.inner.redeliver(source, delivery_id).await
    }

    async fn workflow_run(
        &self,
        repository: &str,
        run_id: i64,
    ) -> Result<WorkflowRunEvent, GitHubError> {
        self.record("get_workflow_run", 1, false);
        self.inner.workflow_run(repository, run_id).await
    }

    async fn rerun_job(&self, repository: &str, job_id: i64) -> Result<(), RerunFailure> {
        self.record("rerun_job", 1, false);
        self.inner.rerun_job(repository, job_id).await
    }

    async fn rerun_failed_jobs(&self, repository: &str, run_id: i64) -> Result<(), RerunFailure> {
        self.record("rerun_failed_jobs", 1, false);
        self.inner.rerun_failed_jobs(repository, run_id).await
    }
}

/// Requests of one stretch of a run, by endpoint, and what the primary
/// rate limit makes of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Endpoint → (requests, of them answered 304).
    pub by_endpoint: BTreeMap<&'static str, (u64, u64)>,
    /// Requests in the stretch.
    pub total: u64,
    /// Those the primary rate limit charges (not 304).
    pub charged: u64,
    /// The lowest `X-RateLimit-Remaining` GitHub would have sent, over
    /// the whole run up to the stretch's end (hourly windows from the
    /// run's first request).
    pub lowest_remaining: u64,
}

impl Budget {
    /// The requests made in `from..to` (since the run's start).
    pub fn of(requests: &[Request], from: Duration, to: Duration) -> Self {
        let mut b = Budget {
            lowest_remaining: HOURLY_BUDGET,
            ..Budget::default()
        };
        for r in requests.iter().filter(|r| r.at >= from && r.at < to) {
            let e = b.by_endpoint.entry(r.endpoint).or_default();
            e.0 += 1;
            b.total += 1;
            if r.not_modified {
                e.1 += 1;
            } else {
                b.charged += 1;
            }
        }
        let Some(first) = requests.first().map(|r| r.at) else {
            return b;
        };
        let hour = HOUR;
        let mut window_start = first;
        let mut used = 0u64;
        for r in requests.iter().filter(|r| r.at < to) {
            while r.at >= window_start + hour {
                window_start += hour;
                used = 0;
            }
            if !r.not_modified {
                used += 1;
                b.lowest_remaining = b.lowest_remaining.min(HOURLY_BUDGET.saturating_sub(used));
            }
        }
        b
    }

    pub fn requests(&self, endpoint: &str) -> u64 {
        self.by_endpoint.get(endpoint).map_or(0, |e| e.0)
    }
}

/// The production reconciler on the fakes and the in-memory ledger, in
/// virtual time, as `simulate` runs it (without crashes), with GitHub's
/// requests counted.
#[cfg(feature = "virtual-time")]
pub mod run {
    use super::*;

    use spot_runners_domain::job::ParsedWorkflowJob;
    use spot_runners_domain::redelivery::Healing;
    use spot_runners_domain::store::{DeliveryOutcome, IncomingDelivery, Store};
    use spot_runners_domain::{ControllerId, WorkflowJobEvent};
    use spot_runners_reconciler::redelivery::EVERY as REDELIVERY_EVERY;
    use spot_runners_reconciler::{Backends, NoMetrics, ProfileCache, Reconciler, Redeliverer};
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use crate::arrivals::Arrivals;
    use crate::scenario::Scenario;
    use crate::world::World;
    use crate::{FakeCloud, FakeParameterStore, MemoryStore};

    /// What a run leaves to look at.
    pub struct Outcome {
        pub requests: Vec<Request>,
        /// Jobs that arrived, and of them completed, by the end.
        pub jobs: u64,
        pub completed: u64,
        /// How long the run lasted (virtual).
        pub ran: Duration,
    }

    /// Runs `scenario` for its `duration` (no drain), on a paused clock.
    /// With `redelivery`, the redelivery scan runs beside the reconciler on
    /// the App's webhook, as `serve` runs it with App auth (or an org hook
    /// id); without, as with token auth and no hook id.
    pub fn run(scenario: &Scenario, redelivery: bool) -> Result<Outcome, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))?;
        runtime.block_on(run_in_paused_time(scenario, redelivery))
    }

    async fn run_in_paused_time(scenario: &Scenario, redelivery: bool) -> Result<Outcome, String> {
        let validated = scenario.validate()?;
        let seed = scenario.seed;
        let clock = SimClock::starting_at(SimClock::virtual_epoch());
        let cloud = FakeCloud::with_seed(seed);
        cloud.set_boot_time(scenario.boot_time.0);
        let fake = FakeGitHub::with_seed(seed.wrapping_add(1));
        let github = Arc::new(CountingGitHub::new(fake.clone(), clock));
        let mut world = World::new(
            cloud.clone(),
            fake,
            crate::simulate::world_config(scenario, seed),
            clock,
            Arrivals::new(scenario.jobs.clone(), &scenario.org, seed),
        );
        let ledger = MemoryStore::new(Arc::new(clock), seed);
        let profiles = ProfileCache::default();
        profiles.set(validated.profiles.clone());
        let healing = Arc::new(Healing::default());
        let reconciler = Reconciler::new(
            Arc::new(ledger.clone()),
            Backends {
                cloud: Arc::new(cloud),
                github: Arc::clone(&github) as Arc<dyn GitHub>,
                parameters: Arc::new(FakeParameterStore::new()),
            },
            profiles.clone(),
            Arc::new(NoMetrics),
            ControllerId::default(),
            scenario.max_instances,
        )
        .with_clock(Arc::new(clock))
        .with_healing(Arc::clone(&healing))
        .with_seed(seed);
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::new(reconciler).run(
            Arc::clone(&wake),
            scenario.reconcile_interval.0,
            stop.clone(),
        ));
        let redeliverer = redelivery.then(|| {
            let scan = Redeliverer::new(
                Arc::new(ledger.clone()),
                Arc::clone(&github) as Arc<dyn GitHub>,
                WebhookSource::App,
                Arc::new(clock),
                Arc::new(NoMetrics),
                ControllerId::default().as_str().to_owned(),
                healing,
            );
            tokio::spawn(Arc::new(scan).run(REDELIVERY_EVERY, stop.clone()))
        });
        let end = scenario.duration.0;
        let mut next_runs = Duration::ZERO;
        while clock.elapsed() < end {
            let deliveries = world.step();
            let mut batch = Vec::new();
            for d in &deliveries {
                let Ok(ParsedWorkflowJob::Event(ev)) = WorkflowJobEvent::parse(d.body.as_bytes())
                else {
                    continue;
                };
                let profile = profiles.match_job(&ev.labels, &ev.repository);
                batch.push(IncomingDelivery {
                    delivery_id: d.guid.clone(),
                    job: *ev,
                    profile,
                });
            }
            if !batch.is_empty() {
                let deadline = crate::now() + Duration::from_secs(5);
                let outcomes = ledger
                    .record_deliveries(&batch, deadline)
                    .await
                    .map_err(|e| format!("recording deliveries: {e}"))?;
                if outcomes.contains(&DeliveryOutcome::Accepted) {
                    wake.notify_one();
                }
            }
            // The poll reads this at most once a minute; every 10 s is
            // close enough and keeps a day's run quick.
            if clock.elapsed() >= next_runs {
                next_runs = clock.elapsed() + Duration::from_secs(10);
                github.set_open_runs(open_runs(&world));
            }
            tokio::time::sleep(crate::simulate::TICK).await;
        }
        stop.cancel();
        let _ = task.await;
        if let Some(scan) = redeliverer {
            let _ = scan.await;
        }
        let jobs = world.stats().jobs;
        let completed = world.jobs().filter(|j| j.completed_at.is_some()).count() as u64;
        Ok(Outcome {
            requests: github.requests(),
            jobs,
            completed,
            ran: clock.elapsed(),
        })
    }

    /// The runs with a job still waiting or running, newest first, per
    /// repository; their jobs as a jobs listing shows them.
    fn open_runs(world: &World) -> BTreeMap<String, OpenRuns> {
        let mut by_run: BTreeMap<(String, i64), Vec<(i64, JobState)>> = BTreeMap::new();
        for job in world.jobs() {
            let state = match (job.started_at, job.completed_at) {
                (_, Some(_)) => JobState::Completed,
                (Some(_), None) => JobState::InProgress,
                (None, None) => JobState::Queued,
            };
            by_run
                .entry((job.spec.repository.to_ascii_lowercase(), job.run_id))
                .or_default()
                .push((job.id, state));
        }
        let mut runs: BTreeMap<String, OpenRuns> = BTreeMap::new();
        // Run ids grow with time: newest first is highest first.
        for ((repository, id), mut jobs) in by_run.into_iter().rev() {
            if jobs.iter().all(|(_, s)| *s == JobState::Completed) {
                continue;
            }
            jobs.sort_unstable_by_key(|(id, _)| *id);
            let open = runs.entry(repository).or_default();
            let run = OpenRun { id, jobs };
            if run.jobs.iter().all(|(_, s)| *s == JobState::Queued) {
                open.queued.push(run);
            } else {
                open.in_progress.push(run);
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org() -> RunnerScope {
        RunnerScope::Org("acme".to_owned())
    }

    fn jit(name: &str) -> JitRequest {
        JitRequest {
            name: name.to_owned(),
            runner_group_id: 1,
            labels: vec!["self-hosted".to_owned()],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_listing_is_a_free_304_and_pages_count() {
        let fake = FakeGitHub::new();
        fake.set_jit_limit(TokenBucket::unlimited());
        let gh = CountingGitHub::new(
            fake.clone(),
            SimClock::starting_at(SimClock::virtual_epoch()),
        );
        gh.list_runners(&org()).await.unwrap();
        gh.list_runners(&org()).await.unwrap();
        for i in 0..150 {
            gh.generate_jit_config(&org(), &jit(&format!("r-{i}")))
                .await
                .unwrap();
        }
        gh.list_runners(&org()).await.unwrap();
        gh.list_runners(&org()).await.unwrap();
        fake.set_online("r-7", true);
        gh.list_runners(&org()).await.unwrap();

        // 1 page (new), 1 (304), 2 (changed), 2 (304), 2 (one runner came online).
        let flags: Vec<bool> = gh
            .requests()
            .iter()
            .filter(|r| r.endpoint == "list_runners")
            .map(|r| r.not_modified)
            .collect();
        assert_eq!(flags, [false, true, false, false, true, true, false, false]);
        let b = Budget::of(&gh.requests(), Duration::ZERO, Duration::from_secs(1));
        assert_eq!(b.requests("generate_jitconfig"), 150);
        assert_eq!(b.by_endpoint["list_runners"], (8, 3));
        assert_eq!(b.total, 158);
        assert_eq!(b.charged, 155);
        assert_eq!(b.lowest_remaining, HOURLY_BUDGET - 155);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_costs_two_run_listings_and_one_per_open_run_and_unchanged_ones_are_free() {
        let gh = CountingGitHub::new(
            FakeGitHub::new(),
            SimClock::starting_at(SimClock::virtual_epoch()),
        );
        let run = |id: i64, state: JobState| OpenRun {
            id,
            jobs: vec![(id * 10, state)],
        };
        let waiting: Vec<OpenRun> = (0..3).map(|i| run(100 + i, JobState::Queued)).collect();
        let running: Vec<OpenRun> = (0..25).map(|i| run(i, JobState::InProgress)).collect();
        gh.set_open_runs(BTreeMap::from([(
            "acme/proofs".to_owned(),
            OpenRuns {
                queued: waiting.clone(),
                in_progress: running.clone(),
            },
        )]));
        gh.queued_jobs("Acme/Proofs").await.unwrap();
        gh.queued_jobs("acme/other").await.unwrap();
        let b = Budget::of(&gh.requests(), Duration::ZERO, Duration::from_secs(1));
        assert_eq!(b.requests("list_workflow_runs"), 4);
        assert_eq!(b.requests("list_jobs_for_run"), 3 + 20);
        assert_eq!(b.charged, 4 + 23, "nothing was listed before");

        // Nothing changed: the runs listings and the waiting runs' jobs
        // are 304s; the running ones are charged (their steps move).
        let from = gh.requests().len();
        gh.queued_jobs("acme/proofs").await.unwrap();
        let again: Vec<(&str, bool)> = gh.requests()[from..]
            .iter()
            .map(|r| (r.endpoint, r.not_modified))
            .collect();
        assert_eq!(again[..2], [("list_workflow_runs", true); 2]);
        assert_eq!(again[2..5], [("list_jobs_for_run", true); 3]);
        assert!(again[5..]
            .iter()
            .all(|r| *r == ("list_jobs_for_run", false)));
        assert_eq!(again.len(), 25);

        // One waiting run starts: both runs listings changed, and its jobs.
        let mut queued = waiting.clone();
        let started = queued.remove(0);
        let mut in_progress = vec![run(started.id, JobState::InProgress)];
        in_progress.extend(running);
        gh.set_open_runs(BTreeMap::from([(
            "acme/proofs".to_owned(),
            OpenRuns {
                queued,
                in_progress,
            },
        )]));
        let from = gh.requests().len();
        gh.queued_jobs("acme/proofs").await.unwrap();
        let third: Vec<bool> = gh.requests()[from..]
            .iter()
            .map(|r| r.not_modified)
            .collect();
        assert_eq!(third[..2], [false, false]);
        assert_eq!(third[2..4], [true, true], "the two still waiting");
        assert!(!third[4], "the run that started");
    }

    #[test]
    fn the_remaining_budget_resets_every_hour_from_the_first_request() {
        let at = |s: u64, not_modified: bool| Request {
            endpoint: "get_job",
            not_modified,
            at: Duration::from_secs(s),
        };
        let mut requests = vec![at(10, false); 3000];
        requests.extend(vec![at(20, true); 5000]);
        requests.extend(vec![at(3609, false); 1000]);
        // A new window from 3610 s on.
        requests.extend(vec![at(3610, false); 4500]);
        let b = Budget::of(&requests, Duration::ZERO, Duration::from_secs(7200));
        assert_eq!(b.charged, 8500);
        assert_eq!(b.lowest_remaining, 500);
        let first_hour = Budget::of(&requests, Duration::ZERO, Duration::from_secs(3610));
        assert_eq!(first_hour.lowest_remaining, 1000);
        assert_eq!(first_hour.total, 9000);
    }
}
