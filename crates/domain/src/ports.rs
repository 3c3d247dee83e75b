//! The edges of the system as traits: the cloud that runs instances and the
//! GitHub that registers runners and hands them jobs. Production adapters
//! (`spot-runners-aws`, `spot-runners-github`) and the simulator's fakes
//! (`spot-runners-sim`) implement the same traits, so the planner and the
//! reconciler never know which they talk to.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::ratelimit::TokenBucket;
use crate::run::WorkflowRunEvent;
use crate::survival::RerunFailure;
use crate::Market;

// ---------------------------------------------------------------- GitHub --

/// Where a runner is registered: an organization, or (for repositories
/// owned by a user) one repository.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunnerScope {
    Org(String),
    /// `owner/repo`
    Repo(String),
}

impl fmt::Display for RunnerScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunnerScope::Org(o) => write!(f, "org {o}"),
            RunnerScope::Repo(r) => write!(f, "repo {r}"),
        }
    }
}

/// A just-in-time runner to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitRequest {
    pub name: String,
    pub runner_group_id: i64,
    /// `self-hosted` plus the profile's labels.
    pub labels: Vec<String>,
}

/// GitHub's answer: the runner's id and its one-time configuration.
#[derive(Clone)]
pub struct JitConfig {
    pub runner_id: i64,
    /// Base64 text passed to `run.sh --jitconfig`; a credential.
    pub encoded: SecretString,
}

impl fmt::Debug for JitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JitConfig {{ runner_id: {}, encoded: [redacted] }}",
            self.runner_id
        )
    }
}

/// A self-hosted runner as GitHub lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitHubRunner {
    pub id: i64,
    pub name: String,
    pub online: bool,
    pub busy: bool,
    pub labels: Vec<String>,
}

/// A job's state as the jobs API reports it (stale-demand checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    pub status: String,
    pub conclusion: Option<String>,
    pub runner_name: Option<String>,
}

/// A job as the workflow-run jobs API lists it: enough to record one whose
/// `queued` delivery never arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitHubJob {
    pub id: i64,
    pub run_id: i64,
    pub run_attempt: i32,
    pub name: String,
    pub workflow_name: Option<String>,
    pub labels: Vec<String>,
    pub html_url: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GitHubError {
    /// 409 from generate-jitconfig: a runner with that name exists.
    #[error("a runner with that name already exists")]
    NameTaken,
    #[error("not found")]
    NotFound,
    /// Primary or secondary rate limit; try again after the given time.
    #[error("rate limited; retry after {0:?}")]
    RateLimited(Duration),
    /// 5xx, timeouts, connection errors: worth retrying.
    #[error("transient GitHub failure: {0}")]
    Transient(String),
    /// Anything retrying will not fix (bad credentials, permissions).
    #[error("GitHub refused: {0}")]
    Refused(String),
}

impl From<GitHubError> for RerunFailure {
    fn from(e: GitHubError) -> Self {
        match e {
            GitHubError::NotFound => RerunFailure::NotFound,
            GitHubError::RateLimited(wait) => RerunFailure::RateLimited(wait),
            GitHubError::Transient(m) => RerunFailure::Transient(m),
            GitHubError::NameTaken => RerunFailure::Rejected {
                status: 409,
                message: "conflict".into(),
            },
            GitHubError::Refused(m) => RerunFailure::Refused(m),
        }
    }
}

#[async_trait]
pub trait GitHub: Send + Sync + 'static {
    /// `POST .../actions/runners/generate-jitconfig`.
    async fn generate_jit_config(
        &self,
        scope: &RunnerScope,
        request: &JitRequest,
    ) -> Result<JitConfig, GitHubError>;

    /// Every self-hosted runner in the scope (all pages).
    async fn list_runners(&self, scope: &RunnerScope) -> Result<Vec<GitHubRunner>, GitHubError>;

    /// `DELETE .../actions/runners/{id}`; a runner already gone is success.
    async fn delete_runner(&self, scope: &RunnerScope, runner_id: i64) -> Result<(), GitHubError>;

    /// `GET /repos/{owner}/{repo}/actions/jobs/{job_id}`.
    async fn job(&self, repository: &str, job_id: i64) -> Result<JobReport, GitHubError>;

    /// Jobs waiting for a runner in the repository's queued and in-progress
    /// workflow runs (the most recent runs only; this is a safety net for
    /// lost `queued` deliveries, not a replacement for webhooks).
    async fn queued_jobs(&self, repository: &str) -> Result<Vec<GitHubJob>, GitHubError>;

    /// `GET /repos/{owner}/{repo}/actions/runs/{run_id}`: whether the run
    /// completed (a re-run waits for that).
    async fn workflow_run(
        &self,
        repository: &str,
        run_id: i64,
    ) -> Result<WorkflowRunEvent, GitHubError>;

    /// `POST /repos/{owner}/{repo}/actions/jobs/{job_id}/rerun`: re-runs one
    /// job (and its dependents) in a new attempt of its completed run.
    async fn rerun_job(&self, repository: &str, job_id: i64) -> Result<(), RerunFailure>;

    /// `POST /repos/{owner}/{repo}/actions/runs/{run_id}/rerun-failed-jobs`:
    /// re-runs every failed job of the completed run in one new attempt.
    async fn rerun_failed_jobs(&self, repository: &str, run_id: i64) -> Result<(), RerunFailure>;

    /// The JIT-config allowance this GitHub enforces; callers pace themselves by it.
    fn jit_config_limit(&self) -> TokenBucket {
        TokenBucket::github_jit_configs()
    }
}

// ----------------------------------------------------------------- Cloud --

/// Tag keys set on every instance at launch (DESIGN.md, "EC2 tags").
pub const TAG_CONTROLLER: &str = "spot-runners:controller";
pub const TAG_PROFILE: &str = "spot-runners:profile";
pub const TAG_RUNNER: &str = "spot-runners:runner";
pub const TAG_NAME: &str = "Name";

/// One `RunInstances` call: one instance, one type, one subnet, one market.
#[derive(Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// Also the `ClientToken`, so a retried call cannot make a second instance.
    pub runner_name: String,
    pub controller_id: String,
    pub profile: String,
    pub instance_type: String,
    /// `None`: the region's default subnet.
    pub subnet_id: Option<String>,
    pub image_id: String,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub market: Market,
    pub root_volume_gb: u32,
    /// The rendered boot script (plain text; the adapter encodes it). Holds
    /// the JIT config, so it is never printed.
    pub user_data: String,
}

impl fmt::Debug for LaunchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchRequest")
            .field("runner_name", &self.runner_name)
            .field("profile", &self.profile)
            .field("instance_type", &self.instance_type)
            .field("subnet_id", &self.subnet_id)
            .field("market", &self.market)
            .field(
                "user_data",
                &format_args!("[{} bytes redacted]", self.user_data.len()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceState {
    /// Still costs money (or may again).
    pub fn is_alive(self) -> bool {
        !matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }
}

/// An instance carrying our controller tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub runner_name: Option<String>,
    pub profile: Option<String>,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub market: Market,
    pub state: InstanceState,
    /// EC2's state reason code, e.g. `Server.SpotInstanceTermination`.
    pub state_reason: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
}

/// How a failed call should be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudErrorKind {
    /// No capacity for this type/subnet/market: try the next one.
    Capacity,
    /// `RequestLimitExceeded`: back off, then retry the same call.
    Throttled,
    /// The request itself is wrong (bad AMI, subnet, permissions): retrying
    /// the same profile will not help until an operator fixes it.
    Invalid,
    /// Network trouble or a 5xx: retry later.
    Transient,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CloudError {
    pub kind: CloudErrorKind,
    /// EC2's error code (the `code` label of launch_errors_total).
    pub code: String,
    pub message: String,
}

impl CloudError {
    pub fn new(kind: CloudErrorKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Classifies an EC2 error code.
    pub fn from_code(code: &str, message: impl Into<String>) -> Self {
        let kind = match code {
            "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "SpotMaxPriceTooLow"
            | "MaxSpotInstanceCountExceeded"
            | "UnfulfillableCapacity"
            | "InsufficientFreeAddressesInSubnet"
            | "Unsupported"
            | "InstanceLimitExceeded"
            | "VcpuLimitExceeded" => CloudErrorKind::Capacity,
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
                CloudErrorKind::Throttled
            }
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
                CloudErrorKind::Transient
            }
            _ => CloudErrorKind::Invalid,
        };
        Self::new(kind, code, message)
    }
}

#[async_trait]
pub trait Cloud: Send + Sync + 'static {
    /// One `RunInstances` with `ClientToken` = runner name and the contract
    /// tags. Repeating a call with the same runner name returns the same
    /// instance.
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError>;

    /// `TerminateInstances`; ids already gone are not an error.
    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError>;

    /// Every instance tagged with this controller id, in any state EC2 still
    /// reports (terminated ones linger for about an hour).
    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError>;

    /// The `RunInstances` bucket this cloud enforces; callers pace themselves by it.
    fn launch_limit(&self) -> TokenBucket {
        TokenBucket::ec2_run_instances()
    }
}
