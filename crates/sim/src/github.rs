//! A fake GitHub holding self-hosted runners and jobs, with the behaviour the
//! reconciler has to cope with: a JIT-config allowance that runs out, 409 on
//! a name already registered, runners that come online (or not) on their
//! own schedule, and failures on demand.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde_json::json;
use spot_runners_domain::api_budget::RateLimit;
use spot_runners_domain::ports::{
    GitHub, GitHubError, GitHubJob, GitHubRunner, HookDelivery, Installation, JitConfig,
    JitRequest, JobReport, RunnerScope, WebhookSource,
};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::survival::RerunFailure;

/// GitHub's limit on re-runs of one workflow run (full or partial).
pub const MAX_RUN_RERUNS: u32 = 50;
/// Job ids this fake hands out for re-runs start here, far from the ids a
/// simulated world gives its own jobs.
const FIRST_RERUN_JOB_ID: i64 = 1 << 40;

/// A workflow run: its latest attempt's jobs, by name. A re-run gives the
/// re-run jobs new ids (and the run a new attempt); the others carry over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeRun {
    pub attempt: i32,
    pub reruns: u32,
    /// `(job id, name, attempt that job belongs to)` of the latest attempt.
    pub jobs: Vec<(i64, String, i32)>,
}

/// A job a re-run created: GitHub queues it under a new id in the run's
/// next attempt, with the same name as the job it re-runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RerunJob {
    pub repository: String,
    pub run_id: i64,
    pub attempt: i32,
    /// The job of the previous attempt it re-runs.
    pub of: i64,
    pub id: i64,
    pub name: String,
}

/// A registered runner with what the list API does not show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeRunner {
    pub id: i64,
    pub name: String,
    pub labels: Vec<String>,
    pub runner_group_id: i64,
    pub scope: RunnerScope,
    pub online: bool,
    pub busy: bool,
}

impl FakeRunner {
    fn listed(&self) -> GitHubRunner {
        GitHubRunner {
            id: self.id,
            name: self.name.clone(),
            online: self.online,
            busy: self.busy,
            labels: self.labels.clone(),
        }
    }
}

/// One call the service made, for assertions on what it asked of GitHub.
/// Calls that failed (injected, rate limited, 409) are recorded too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitHubCall {
    GenerateJitConfig {
        scope: RunnerScope,
        name: String,
        at: Instant,
    },
    ListRunners {
        scope: RunnerScope,
        at: Instant,
    },
    DeleteRunner {
        scope: RunnerScope,
        runner_id: i64,
        at: Instant,
    },
    Job {
        repository: String,
        job_id: i64,
        at: Instant,
    },
    QueuedJobs {
        repository: String,
        at: Instant,
    },
    HookDeliveries {
        source: WebhookSource,
        at: Instant,
    },
    Redeliver {
        source: WebhookSource,
        delivery_id: i64,
        at: Instant,
    },
    WorkflowRun {
        repository: String,
        run_id: i64,
        at: Instant,
    },
    RerunJob {
        repository: String,
        job_id: i64,
        at: Instant,
    },
    RerunFailedJobs {
        repository: String,
        run_id: i64,
        at: Instant,
    },
}

impl GitHubCall {
    /// The trait method's name.
    pub fn method(&self) -> &'static str {
        match self {
            GitHubCall::GenerateJitConfig { .. } => "generate_jit_config",
            GitHubCall::ListRunners { .. } => "list_runners",
            GitHubCall::DeleteRunner { .. } => "delete_runner",
            GitHubCall::Job { .. } => "job",
            GitHubCall::QueuedJobs { .. } => "queued_jobs",
            GitHubCall::HookDeliveries { .. } => "hook_deliveries",
            GitHubCall::Redeliver { .. } => "redeliver",
            GitHubCall::WorkflowRun { .. } => "workflow_run",
            GitHubCall::RerunJob { .. } => "rerun_job",
            GitHubCall::RerunFailedJobs { .. } => "rerun_failed_jobs",
        }
    }

    pub fn at(&self) -> Instant {
        match self {
            GitHubCall::GenerateJitConfig { at, .. }
            | GitHubCall::ListRunners { at, .. }
            | GitHubCall::DeleteRunner { at, .. }
            | GitHubCall::Job { at, .. }
            | GitHubCall::QueuedJobs { at, .. }
            | GitHubCall::HookDeliveries { at, .. }
            | GitHubCall::Redeliver { at, .. }
            | GitHubCall::WorkflowRun { at, .. }
            | GitHubCall::RerunJob { at, .. }
            | GitHubCall::RerunFailedJobs { at, .. } => *at,
        }
    }
}

struct State {
    jit_bucket: TokenBucket,
    /// `jit_bucket` as configured, full: what callers should pace by.
    jit_limit: TokenBucket,
    latency: Duration,
    next_id: i64,
    /// In registration order.
    runners: Vec<FakeRunner>,
    /// `runners` by scope and lower-cased name (GitHub's names are
    /// case-insensitive and unique in a scope), so a registration need not
    /// search the fleet.
    names: std::collections::HashSet<(RunnerScope, String)>,
    /// Keyed by lower-cased `owner/repo`: GitHub names are case-insensitive.
    jobs: HashMap<(String, i64), JobReport>,
    /// What the run-jobs listing shows of a job, for jobs queued with
    /// [`FakeGitHub::queue_job`].
    job_details: HashMap<(String, i64), GitHubJob>,
    fail_next: VecDeque<GitHubError>,
    /// The webhook's delivery log, oldest first.
    hook_log: Vec<HookDelivery>,
    /// Keyed by lower-cased `owner/repo` and run id.
    runs: HashMap<(String, i64), FakeRun>,
    next_rerun_job_id: i64,
    /// Jobs re-runs created, not yet taken by [`FakeGitHub::take_reruns`].
    rerun_jobs: Vec<RerunJob>,
    calls: Vec<GitHubCall>,
    jit_calls: u64,
    /// What `GET /app/installations` answers.
    installations: Vec<Installation>,
    /// The primary rate limit the replies report, as set by a test.
    rate_limit: Option<RateLimit>,
    rng: StdRng,
}

impl State {
    /// Records the call and applies an injected failure, if one is queued.
    fn begin(&mut self, call: GitHubCall) -> Result<(), GitHubError> {
        self.calls.push(call);
        match self.fail_next.pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn job_report(&self, repo: &str, job_id: i64) -> Option<&JobReport> {
        self.jobs.get(&(repo.to_owned(), job_id))
    }

    /// A run is completed once every job of its latest attempt is.
    fn run_completed(&self, repo: &str, run: &FakeRun) -> bool {
        run.jobs.iter().all(|(id, _, _)| {
            self.job_report(repo, *id)
                .is_some_and(|j| j.status == "completed")
        })
    }

    fn job_failed(&self, repo: &str, job_id: i64) -> bool {
        self.job_report(repo, job_id).is_some_and(|j| {
            matches!(
                j.conclusion.as_deref(),
                Some("failure" | "cancelled" | "timed_out")
            )
        })
    }

    /// GitHub's rules for a re-run of `which` jobs of a run: only once the
    /// run completed, at most [`MAX_RUN_RERUNS`] times; the re-run jobs get
    /// new ids in a new attempt, queued.
    fn rerun(
        &mut self,
        repo: &str,
        run_id: i64,
        which: impl Fn(&State, i64) -> bool,
    ) -> Result<Vec<i64>, RerunFailure> {
        let key = (repo.to_owned(), run_id);
        let run = self.runs.get(&key).cloned().ok_or(RerunFailure::NotFound)?;
        if !self.run_completed(repo, &run) {
            return Err(RerunFailure::Rejected {
                status: 403,
                message: "This workflow is already running".into(),
            });
        }
        if run.reruns >= MAX_RUN_RERUNS {
            return Err(RerunFailure::Rejected {
                status: 403,
                message: "This workflow run has been re-run the maximum number of times".into(),
            });
        }
        let chosen: Vec<i64> = run
            .jobs
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|id| which(self, *id))
            .collect();
        if chosen.is_empty() {
            return Err(RerunFailure::Rejected {
                status: 403,
                message: "This workflow run cannot be retried".into(),
            });
        }
        let attempt = run.attempt + 1;
        let mut jobs = Vec::with_capacity(run.jobs.len());
        let mut new_ids = Vec::new();
        for (id, name, job_attempt) in run.jobs {
            if chosen.contains(&id) {
                let new_id = self.next_rerun_job_id;
                self.next_rerun_job_id += 1;
                self.jobs.insert(
                    (repo.to_owned(), new_id),
                    JobReport {
                        status: "queued".into(),
                        conclusion: None,
                        runner_name: None,
                    },
                );
                // The queued-jobs listing shows the new attempt's job.
                if let Some(old) = self.job_details.get(&(repo.to_owned(), id)).cloned() {
                    self.job_details.insert(
                        (repo.to_owned(), new_id),
                        GitHubJob {
                            id: new_id,
                            run_attempt: attempt,
                            ..old
                        },
                    );
                }
                self.rerun_jobs.push(RerunJob {
                    repository: repo.to_owned(),
                    run_id,
                    attempt,
                    of: id,
                    id: new_id,
                    name: name.clone(),
                });
                jobs.push((new_id, name, attempt));
                new_ids.push(new_id);
            } else {
                jobs.push((id, name, job_attempt));
            }
        }
        self.runs.insert(
            key,
            FakeRun {
                attempt,
                reruns: run.reruns + 1,
                jobs,
            },
        );
        Ok(new_ids)
    }

    /// Removes the runners `gone` picks; how many went.
    fn remove_runners(&mut self, gone: impl Fn(&FakeRunner) -> bool) -> usize {
        let State { runners, names, .. } = self;
        let before = runners.len();
        runners.retain(|r| {
            let keep = !gone(r);
            if !keep {
                names.remove(&(r.scope.clone(), r.name.to_ascii_lowercase()));
            }
            keep
        });
        before - runners.len()
    }

    /// Applies `change` to every runner by that name; `false` if none.
    fn update(&mut self, name: &str, change: impl Fn(&mut FakeRunner)) -> bool {
        let mut found = false;
        for runner in &mut self.runners {
            if runner.name.eq_ignore_ascii_case(name) {
                change(runner);
                found = true;
            }
        }
        found
    }

    /// A document shaped like GitHub's (runner settings, OAuth credentials,
    /// key material) so user data has a realistic size, but our own layout.
    fn jit_document(&mut self, scope: &RunnerScope, runner: &FakeRunner) -> String {
        let path = match scope {
            RunnerScope::Org(org) => org,
            RunnerScope::Repo(repo) => repo,
        };
        let client_id = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            self.rng.gen::<u32>(),
            self.rng.gen::<u16>(),
            self.rng.gen::<u16>(),
            self.rng.gen::<u16>(),
            self.rng.gen::<u64>() & 0xffff_ffff_ffff
        );
        let key: Vec<u8> = (0..384).map(|_| self.rng.gen()).collect();
        let doc = json!({
            "runner": {
                "id": runner.id,
                "name": runner.name,
                "labels": runner.labels,
                "runner_group_id": runner.runner_group_id,
                "github_url": format!("https://github.com/{path}"),
                "work_folder": "_work",
                "ephemeral": true,
            },
            "credentials": {
                "scheme": "OAuth",
                "client_id": client_id,
                "authorization_url": format!(
                    "https://token.actions.fake.invalid/{client_id}/oauth2/token"
                ),
            },
            "rsa_params": BASE64.encode(key),
        });
        BASE64.encode(doc.to_string())
    }
}

/// The bucket's float arithmetic can leave a caller that waited exactly the
/// advertised time a hair short of a token (1/3 s a token at 3/s), and then
/// advertise a wait of zero; whole milliseconds, rounded up, always suffice.
fn retry_after(wait: Duration) -> Duration {
    let ms = wait.as_nanos().div_ceil(1_000_000).max(1);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// A cheaply cloneable handle; clones share one fake GitHub.
#[derive(Clone)]
pub struct FakeGitHub {
    state: Arc<Mutex<State>>,
}

impl Default for FakeGitHub {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeGitHub {
    pub fn new() -> Self {
        Self::with_rng(StdRng::from_entropy())
    }

    /// JIT configs drawn from a seeded generator, for replayable runs.
    pub fn with_seed(seed: u64) -> Self {
        Self::with_rng(StdRng::seed_from_u64(seed))
    }

    fn with_rng(rng: StdRng) -> Self {
        let state = State {
            jit_bucket: TokenBucket::github_jit_configs(),
            jit_limit: TokenBucket::github_jit_configs(),
            latency: Duration::ZERO,
            next_id: 1,
            runners: Vec::new(),
            names: std::collections::HashSet::new(),
            jobs: HashMap::new(),
            job_details: HashMap::new(),
            fail_next: VecDeque::new(),
            hook_log: Vec::new(),
            runs: HashMap::new(),
            next_rerun_job_id: FIRST_RERUN_JOB_ID,
            rerun_jobs: Vec::new(),
            calls: Vec::new(),
            jit_calls: 0,
            installations: Vec::new(),
            rate_limit: None,
            rng,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    async fn delay(&self) {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// The runner name inside a JIT config this fake issued: what the runner
    /// on a simulated instance would register as.
    pub fn jit_runner_name(encoded: &str) -> Option<String> {
        let bytes = BASE64.decode(encoded.trim()).ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        doc["runner"]["name"].as_str().map(str::to_owned)
    }

    // ------------------------------------------------------- controls --

    /// The next call, of any method, fails with this error; queued errors
    /// are used one per call.
    /// Replaces GitHub's JIT-config allowance, e.g. with
    /// [`TokenBucket::unlimited`] to measure the service without it.
    pub fn set_jit_limit(&self, limit: TokenBucket) {
        let mut state = self.lock();
        state.jit_bucket = limit.clone();
        state.jit_limit = limit;
    }

    /// The primary rate limit this GitHub reports from now on (`None`:
    /// none). Reporting it is all this fake does: nothing is refused.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        self.lock().rate_limit = limit;
    }

    pub fn fail_next(&self, error: GitHubError) {
        self.lock().fail_next.push_back(error);
    }

    /// Added (as a tokio sleep) before every call.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// The runner connected (or lost its connection). `false` when no
    /// runner has that name.
    pub fn set_online(&self, name: &str, online: bool) -> bool {
        self.lock().update(name, |r| r.online = online)
    }

    /// The runner took (or finished) a job. `false` when no runner has that
    /// name.
    pub fn set_busy(&self, name: &str, busy: bool) -> bool {
        self.lock().update(name, |r| r.busy = busy)
    }

    /// GitHub removed the runner on its own, as it does for an ephemeral
    /// runner once its job is done. `false` when no runner has that name.
    pub fn deregister(&self, name: &str) -> bool {
        self.lock()
            .remove_runners(|r| r.name.eq_ignore_ascii_case(name))
            > 0
    }

    /// What `job(repository, job_id)` answers from now on.
    /// A job waiting for a runner in `repository`, listed by
    /// [`GitHub::queued_jobs`] for as long as its status is `queued`.
    pub fn queue_job(&self, repository: &str, job: GitHubJob) {
        let key = (repository.to_ascii_lowercase(), job.id);
        let mut state = self.lock();
        state.jobs.insert(
            key.clone(),
            JobReport {
                status: "queued".to_owned(),
                conclusion: None,
                runner_name: None,
            },
        );
        state.job_details.insert(key, job);
    }

    pub fn set_job(&self, repository: &str, job_id: i64, report: JobReport) {
        self.lock()
            .jobs
            .insert((repository.to_ascii_lowercase(), job_id), report);
    }

    /// GitHub tried to deliver `guid` and the receiver answered
    /// `status_code` (0: no answer). Returns the attempt's id.
    pub fn log_hook_delivery(
        &self,
        guid: &str,
        event: &str,
        status_code: u16,
        delivered_at: chrono::DateTime<chrono::Utc>,
    ) -> i64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let redelivery = state.hook_log.iter().any(|d| d.guid == guid);
        state.hook_log.push(HookDelivery {
            id,
            guid: guid.to_owned(),
            delivered_at,
            redelivery,
            status_code,
            event: event.to_owned(),
            action: None,
        });
        id
    }

    /// A workflow run of `repository` with these `(job id, name)` jobs in
    /// its first attempt; each job is queued unless already set.
    pub fn add_run(&self, repository: &str, run_id: i64, jobs: &[(i64, &str)]) {
        let repo = repository.to_ascii_lowercase();
        let mut state = self.lock();
        for (id, _) in jobs {
            state
                .jobs
                .entry((repo.clone(), *id))
                .or_insert_with(|| JobReport {
                    status: "queued".into(),
                    conclusion: None,
                    runner_name: None,
                });
        }
        state.runs.insert(
            (repo, run_id),
            FakeRun {
                attempt: 1,
                reruns: 0,
                jobs: jobs
                    .iter()
                    .map(|(id, n)| (*id, (*n).to_owned(), 1))
                    .collect(),
            },
        );
    }

    /// Adds a job to the first attempt of a run of `repository` (a matrix
    /// grows one job at a time); the job is queued unless already set.
    pub fn add_run_job(&self, repository: &str, run_id: i64, job_id: i64, name: &str) {
        let repo = repository.to_ascii_lowercase();
        let mut state = self.lock();
        state
            .jobs
            .entry((repo.clone(), job_id))
            .or_insert_with(|| JobReport {
                status: "queued".into(),
                conclusion: None,
                runner_name: None,
            });
        state
            .runs
            .entry((repo, run_id))
            .or_insert_with(|| FakeRun {
                attempt: 1,
                reruns: 0,
                jobs: Vec::new(),
            })
            .jobs
            .push((job_id, name.to_owned(), 1));
    }

    // ----------------------------------------------------- inspection --

    /// The ids of the delivery attempts the service asked to redeliver, in
    /// order.
    pub fn redelivery_requests(&self) -> Vec<i64> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                GitHubCall::Redeliver { delivery_id, .. } => Some(*delivery_id),
                _ => None,
            })
            .collect()
    }

    /// The jobs re-runs created since the last call, in order (the
    /// simulated world queues them).
    pub fn take_reruns(&self) -> Vec<RerunJob> {
        std::mem::take(&mut self.lock().rerun_jobs)
    }

    /// A run as this fake holds it.
    pub fn run(&self, repository: &str, run_id: i64) -> Option<FakeRun> {
        self.lock()
            .runs
            .get(&(repository.to_ascii_lowercase(), run_id))
            .cloned()
    }

    /// Every registered runner, of every scope, in registration order.
    pub fn runners(&self) -> Vec<FakeRunner> {
        self.lock().runners.clone()
    }

    /// Every `generate_jit_config` call, whatever its outcome.
    /// The App's installations, as `GET /app/installations` lists them.
    pub fn set_installations(&self, installations: Vec<Installation>) {
        self.lock().installations = installations;
    }

    pub fn jit_calls(&self) -> u64 {
        self.lock().jit_calls
    }

    pub fn calls(&self) -> Vec<GitHubCall> {
        self.lock().calls.clone()
    }
}

#[async_trait]
impl GitHub for FakeGitHub {
    fn jit_config_limit(&self) -> TokenBucket {
        self.lock().jit_limit.clone()
    }

    fn rate_limit(&self) -> Option<RateLimit> {
        self.lock().rate_limit
    }

    async fn generate_jit_config(
        &self,
        scope: &RunnerScope,
        request: &JitRequest,
    ) -> Result<JitConfig, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.jit_calls += 1;
        state.begin(GitHubCall::GenerateJitConfig {
            scope: scope.clone(),
            name: request.name.clone(),
            at: now,
        })?;
        state
            .jit_bucket
            .try_take(now)
            .map_err(|wait| GitHubError::RateLimited(retry_after(wait)))?;
        let key = (scope.clone(), request.name.to_ascii_lowercase());
        if state.names.contains(&key) {
            return Err(GitHubError::NameTaken);
        }

        let runner = FakeRunner {
            id: state.next_id,
            name: request.name.clone(),
            labels: request.labels.clone(),
            runner_group_id: request.runner_group_id,
            scope: scope.clone(),
            online: false,
            busy: false,
        };
        state.next_id += 1;
        let encoded = state.jit_document(scope, &runner);
        let runner_id = runner.id;
        state.runners.push(runner);
        state.names.insert(key);
        Ok(JitConfig {
            runner_id,
            encoded: SecretString::from(encoded),
        })
    }

    async fn installations(&self) -> Result<Vec<Installation>, GitHubError> {
        self.delay().await;
        Ok(self.lock().installations.clone())
    }

    async fn list_runners(&self, scope: &RunnerScope) -> Result<Vec<GitHubRunner>, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::ListRunners {
            scope: scope.clone(),
            at: now,
        })?;
        Ok(state
            .runners
            .iter()
            .filter(|r| &r.scope == scope)
            .map(FakeRunner::listed)
            .collect())
    }

    async fn delete_runner(&self, scope: &RunnerScope, runner_id: i64) -> Result<(), GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::DeleteRunner {
            scope: scope.clone(),
            runner_id,
            at: now,
        })?;
        // GitHub refuses to delete a runner that is running a job (422).
        if state
            .runners
            .iter()
            .any(|r| r.id == runner_id && &r.scope == scope && r.busy)
        {
            return Err(GitHubError::Refused(
                "Bad request - Runner \"is still running a job\"".into(),
            ));
        }
        state.remove_runners(|r| r.id == runner_id && &r.scope == scope);
        Ok(())
    }

    async fn queued_jobs(&self, repository: &str) -> Result<Vec<GitHubJob>, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::QueuedJobs {
            repository: repository.to_owned(),
            at: now,
        })?;
        let repository = repository.to_ascii_lowercase();
        let mut queued: Vec<GitHubJob> = state
            .job_details
            .iter()
            .filter(|((repo, id), _)| {
                repo == &repository
                    && state
                        .jobs
                        .get(&(repo.clone(), *id))
                        .is_some_and(|j| j.status == "queued")
            })
            .map(|(_, job)| job.clone())
            .collect();
        queued.sort_by_key(|j| j.id);
        Ok(queued)
    }

    async fn hook_deliveries(
        &self,
        source: &WebhookSource,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<HookDelivery>, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::HookDeliveries {
            source: source.clone(),
            at: now,
        })?;
        Ok(state
            .hook_log
            .iter()
            .rev()
            .filter(|d| d.delivered_at >= since)
            .cloned()
            .collect())
    }

    async fn redeliver(&self, source: &WebhookSource, delivery_id: i64) -> Result<(), GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::Redeliver {
            source: source.clone(),
            delivery_id,
            at: now,
        })?;
        if state.hook_log.iter().any(|d| d.id == delivery_id) {
            Ok(())
        } else {
            Err(GitHubError::NotFound)
        }
    }

    async fn workflow_run(
        &self,
        repository: &str,
        run_id: i64,
    ) -> Result<WorkflowRunEvent, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::WorkflowRun {
            repository: repository.to_owned(),
            run_id,
            at: now,
        })?;
        let repo = repository.to_ascii_lowercase();
        let run = state
            .runs
            .get(&(repo.clone(), run_id))
            .ok_or(GitHubError::NotFound)?;
        let completed = state.run_completed(&repo, run);
        let failed = run
            .jobs
            .iter()
            .any(|(id, _, _)| state.job_failed(&repo, *id));
        Ok(WorkflowRunEvent {
            run_id,
            run_attempt: run.attempt,
            repository: repository.to_owned(),
            status: if completed {
                "completed"
            } else {
                "in_progress"
            }
            .into(),
            conclusion: completed.then(|| if failed { "failure" } else { "success" }.into()),
            updated_at: None,
        })
    }

    async fn rerun_job(&self, repository: &str, job_id: i64) -> Result<(), RerunFailure> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::RerunJob {
            repository: repository.to_owned(),
            job_id,
            at: now,
        })?;
        let repo = repository.to_ascii_lowercase();
        let run_id = state
            .runs
            .iter()
            .find(|((r, _), run)| r == &repo && run.jobs.iter().any(|(id, _, _)| *id == job_id))
            .map(|((_, id), _)| *id)
            .ok_or(RerunFailure::NotFound)?;
        state.rerun(&repo, run_id, |_, id| id == job_id).map(drop)
    }

    async fn rerun_failed_jobs(&self, repository: &str, run_id: i64) -> Result<(), RerunFailure> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::RerunFailedJobs {
            repository: repository.to_owned(),
            run_id,
            at: now,
        })?;
        let repo = repository.to_ascii_lowercase();
        let r = repo.clone();
        state
            .rerun(&repo, run_id, move |s, id| s.job_failed(&r, id))
            .map(drop)
    }

    async fn job(&self, repository: &str, job_id: i64) -> Result<JobReport, GitHubError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.begin(GitHubCall::Job {
            repository: repository.to_owned(),
            job_id,
            at: now,
        })?;
        state
            .jobs
            .get(&(repository.to_ascii_lowercase(), job_id))
            .cloned()
            .ok_or(GitHubError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn org() -> RunnerScope {
        RunnerScope::Org("acme".to_owned())
    }

    fn jit(name: &str) -> JitRequest {
        JitRequest {
            name: name.to_owned(),
            runner_group_id: 1,
            labels: vec!["self-hosted".to_owned(), "linux".to_owned()],
        }
    }

    fn done(conclusion: &str) -> JobReport {
        JobReport {
            status: "completed".into(),
            conclusion: Some(conclusion.into()),
            runner_name: Some("r".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reruns_follow_githubs_rules() {
        let gh = FakeGitHub::new();
        let repo = "acme/proofs";
        gh.add_run(
            repo,
            9,
            &[(1, "proof (a)"), (2, "proof (b)"), (3, "proof (c)")],
        );
        // Not before the run completed.
        gh.set_job(repo, 1, done("failure"));
        let err = gh.rerun_job(repo, 1).await.unwrap_err();
        assert!(
            matches!(err, RerunFailure::Rejected { status: 403, ref message } if message.contains("already running"))
        );
        assert_eq!(
            gh.workflow_run(repo, 9).await.unwrap().status,
            "in_progress"
        );
        gh.set_job(repo, 2, done("success"));
        gh.set_job(repo, 3, done("failure"));
        let run = gh.workflow_run(repo, 9).await.unwrap();
        assert!(run.is_completed());
        assert_eq!(run.conclusion.as_deref(), Some("failure"));

        // rerun-failed-jobs: every failed job, new ids, attempt + 1.
        gh.rerun_failed_jobs(repo, 9).await.unwrap();
        let run = gh.run(repo, 9).unwrap();
        assert_eq!(run.attempt, 2);
        let ids: Vec<i64> = run.jobs.iter().map(|j| j.0).collect();
        assert_eq!(ids[1], 2, "the job that passed carries over");
        assert!(ids[0] >= FIRST_RERUN_JOB_ID && ids[2] > ids[0]);
        assert_eq!(run.jobs[0].2, 2);
        // Running again: a second re-run is refused until it completes.
        assert!(gh.rerun_job(repo, 2).await.is_err());
        gh.set_job(repo, ids[0], done("success"));
        gh.set_job(repo, ids[2], done("success"));
        // One job re-run; nothing failed, so rerun-failed-jobs has nothing to do.
        let err = gh.rerun_failed_jobs(repo, 9).await.unwrap_err();
        assert!(matches!(err, RerunFailure::Rejected { status: 403, .. }));
        gh.rerun_job(repo, 2).await.unwrap();
        assert_eq!(gh.run(repo, 9).unwrap().attempt, 3);
        assert_eq!(
            gh.rerun_job(repo, 12345).await.unwrap_err(),
            RerunFailure::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_is_rerun_at_most_fifty_times() {
        let gh = FakeGitHub::new();
        let repo = "acme/proofs";
        gh.add_run(repo, 9, &[(1, "bench")]);
        let mut job = 1;
        gh.set_job(repo, job, done("failure"));
        for _ in 0..MAX_RUN_RERUNS {
            gh.rerun_job(repo, job).await.unwrap();
            job = gh.run(repo, 9).unwrap().jobs[0].0;
            gh.set_job(repo, job, done("failure"));
        }
        let err = gh.rerun_job(repo, job).await.unwrap_err();
        assert!(
            matches!(err, RerunFailure::Rejected { status: 403, ref message } if message.contains("maximum"))
        );
        assert_eq!(gh.run(repo, 9).unwrap().attempt, 51);
    }

    #[tokio::test(start_paused = true)]
    async fn registers_runners_with_increasing_ids_and_a_realistic_config() {
        let gh = FakeGitHub::new();
        let a = gh
            .generate_jit_config(&org(), &jit("ctl-linux-a"))
            .await
            .unwrap();
        let b = gh
            .generate_jit_config(&org(), &jit("ctl-linux-b"))
            .await
            .unwrap();
        assert_eq!((a.runner_id, b.runner_id), (1, 2));

        let encoded = a.encoded.expose_secret();
        assert!(encoded.len() > 300, "{} bytes", encoded.len());
        assert!(encoded
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=')));
        assert_eq!(
            FakeGitHub::jit_runner_name(encoded).as_deref(),
            Some("ctl-linux-a")
        );

        let listed = gh.list_runners(&org()).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].name, "ctl-linux-a");
        assert_eq!(listed[0].labels, ["self-hosted", "linux"]);
        assert!(!listed[0].online && !listed[0].busy);
        assert_eq!(gh.jit_calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_name_is_409_until_the_runner_is_deleted() {
        let gh = FakeGitHub::new();
        let first = gh.generate_jit_config(&org(), &jit("r-1")).await.unwrap();
        assert_eq!(
            gh.generate_jit_config(&org(), &jit("r-1"))
                .await
                .unwrap_err(),
            GitHubError::NameTaken
        );
        // Names are per scope.
        let repo = RunnerScope::Repo("someone/thing".to_owned());
        gh.generate_jit_config(&repo, &jit("r-1")).await.unwrap();

        // Deleting in the wrong scope, or twice, is harmless.
        gh.delete_runner(&repo, first.runner_id).await.unwrap();
        assert_eq!(gh.runners().len(), 2);
        gh.delete_runner(&org(), first.runner_id).await.unwrap();
        gh.delete_runner(&org(), first.runner_id).await.unwrap();
        assert!(gh.list_runners(&org()).await.unwrap().is_empty());

        let again = gh.generate_jit_config(&org(), &jit("r-1")).await.unwrap();
        assert_ne!(again.runner_id, first.runner_id);
        let methods: Vec<_> = gh.calls().iter().map(GitHubCall::method).collect();
        assert_eq!(
            methods,
            [
                "generate_jit_config",
                "generate_jit_config",
                "generate_jit_config",
                "delete_runner",
                "delete_runner",
                "delete_runner",
                "list_runners",
                "generate_jit_config",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jit_configs_are_rate_limited_and_refill() {
        let gh = FakeGitHub::new();
        for i in 0..10 {
            gh.generate_jit_config(&org(), &jit(&format!("r-{i}")))
                .await
                .unwrap();
        }
        let err = gh
            .generate_jit_config(&org(), &jit("r-10"))
            .await
            .unwrap_err();
        let GitHubError::RateLimited(wait) = err else {
            panic!("expected a rate limit, got {err:?}");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        tokio::time::advance(wait).await;
        gh.generate_jit_config(&org(), &jit("r-10")).await.unwrap();
        assert_eq!(gh.jit_calls(), 12);
        assert_eq!(gh.runners().len(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_are_answered_from_what_was_set() {
        let gh = FakeGitHub::new();
        assert_eq!(
            gh.job("acme/app", 7).await.unwrap_err(),
            GitHubError::NotFound
        );
        let report = JobReport {
            status: "completed".to_owned(),
            conclusion: Some("success".to_owned()),
            runner_name: Some("r-1".to_owned()),
        };
        gh.set_job("acme/app", 7, report.clone());
        assert_eq!(gh.job("Acme/App", 7).await.unwrap(), report);
        assert_eq!(
            gh.job("acme/app", 8).await.unwrap_err(),
            GitHubError::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn injected_failures_hit_the_next_call_of_any_method() {
        let gh = FakeGitHub::new();
        gh.fail_next(GitHubError::Transient("502".to_owned()));
        gh.fail_next(GitHubError::Refused("bad credentials".to_owned()));
        assert_eq!(
            gh.list_runners(&org()).await.unwrap_err(),
            GitHubError::Transient("502".to_owned())
        );
        assert_eq!(
            gh.generate_jit_config(&org(), &jit("r-1"))
                .await
                .unwrap_err(),
            GitHubError::Refused("bad credentials".to_owned())
        );
        assert!(gh.runners().is_empty());
        gh.generate_jit_config(&org(), &jit("r-1")).await.unwrap();
        assert_eq!(gh.jit_calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn runners_come_online_get_busy_and_go_away() {
        let gh = FakeGitHub::new();
        gh.generate_jit_config(&org(), &jit("r-1")).await.unwrap();
        assert!(gh.set_online("r-1", true));
        assert!(gh.set_busy("r-1", true));
        assert!(!gh.set_online("nobody", true));
        let listed = gh.list_runners(&org()).await.unwrap();
        assert!(listed[0].online && listed[0].busy);

        assert!(gh.deregister("r-1"));
        assert!(!gh.deregister("r-1"));
        assert!(gh.list_runners(&org()).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_every_call() {
        let gh = FakeGitHub::new();
        gh.set_latency(Duration::from_millis(300));
        let start = crate::now();
        gh.list_runners(&org()).await.unwrap();
        let _ = gh.job("acme/app", 1).await;
        assert_eq!(crate::now() - start, Duration::from_millis(600));
        assert_eq!(gh.calls()[1].at() - start, Duration::from_millis(600));
    }
}
