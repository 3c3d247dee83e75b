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

use crate::profile::ImageSource;
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

/// One installation of the GitHub App (`GET /app/installations`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installation {
    pub id: i64,
    /// The account's login.
    pub account: String,
    /// GitHub's account type: `Organization` or `User`.
    pub account_type: String,
}

impl Installation {
    /// Where runners for this installation register: an organization's
    /// runners live at org level; a user account has none (its
    /// repositories' runners are per repository, learned from their jobs).
    pub fn scope(&self) -> Option<RunnerScope> {
        (self.account_type == "Organization").then(|| RunnerScope::Org(self.account.clone()))
    }
}

/// The webhook whose deliveries GitHub keeps for us: the App's own, or an
/// organization hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookSource {
    /// `/app/hook/deliveries` (authenticated as the App, with its JWT).
    App,
    /// `/orgs/{org}/hooks/{hook_id}/deliveries` (a token with `admin:org_hook`).
    OrgHook { org: String, hook_id: i64 },
}

impl fmt::Display for WebhookSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebhookSource::App => f.write_str("the App's webhook"),
            WebhookSource::OrgHook { org, hook_id } => write!(f, "hook {hook_id} of org {org}"),
        }
    }
}

/// One attempt to deliver a webhook, as GitHub's delivery log lists it. A
/// redelivery is a new attempt (its own `id`) with the same `guid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookDelivery {
    pub id: i64,
    /// The `X-GitHub-Delivery` header of the attempt.
    pub guid: String,
    pub delivered_at: DateTime<Utc>,
    pub redelivery: bool,
    /// The receiver's HTTP status; 0 when it gave none (timeout, refused).
    pub status_code: u16,
    pub event: String,
    pub action: Option<String>,
}

impl HookDelivery {
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code)
    }
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

    /// Where the App is installed, every page. Token auth has no App: the
    /// answer is empty, and the configured orgs are what is known.
    async fn installations(&self) -> Result<Vec<Installation>, GitHubError> {
        Ok(Vec::new())
    }

    /// The hook's delivery attempts from `since` on, newest first (all
    /// pages back to `since`).
    async fn hook_deliveries(
        &self,
        source: &WebhookSource,
        since: DateTime<Utc>,
    ) -> Result<Vec<HookDelivery>, GitHubError> {
        let _ = since;
        Err(GitHubError::Refused(format!(
            "listing the deliveries of {source} is not supported here"
        )))
    }

    /// `POST …/deliveries/{delivery_id}/attempts`: GitHub sends that
    /// delivery again, with the same GUID.
    async fn redeliver(&self, source: &WebhookSource, delivery_id: i64) -> Result<(), GitHubError> {
        let _ = delivery_id;
        Err(GitHubError::Refused(format!(
            "redelivering to {source} is not supported here"
        )))
    }
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

    /// The tightest primary rate limit GitHub reported in a window that has
    /// not reset yet; the sweeps pace themselves by it
    /// ([`crate::api_budget::Spending`]). `None`: nothing reported.
    fn rate_limit(&self) -> Option<crate::api_budget::RateLimit> {
        None
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
    /// The `spot-runners:runner` and `Name` tags.
    pub runner_name: String,
    /// This attempt's `ClientToken` ([`crate::names::client_token`]): a
    /// retried call cannot make a second instance.
    pub client_token: String,
    pub controller_id: String,
    pub profile: String,
    pub instance_type: String,
    /// `None`: the region's default subnet.
    pub subnet_id: Option<String>,
    /// An AMI id, or a filter the cloud resolves to its newest match at
    /// launch (an operator who rebuilds the AMI edits no row). Resolved by
    /// the adapter, not the caller: it looks the image up anyway (root
    /// device name) and caches the answer.
    pub image: ImageSource,
    /// `CpuOptions.ThreadsPerCore` (1 = SMT off); `None` = the type's
    /// default. EC2 wants the core count beside it; the adapter sends the
    /// type's default core count, so SMT off keeps every physical core.
    pub threads_per_core: Option<u32>,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub market: Market,
    pub root_volume_gb: u32,
    /// The rendered boot script (plain text; the adapter encodes it). It
    /// holds no secret (the JIT config waits in the [`ParameterStore`]), but
    /// it is bulky, so `Debug` prints only its size.
    pub user_data: String,
}

impl fmt::Debug for LaunchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchRequest")
            .field("runner_name", &self.runner_name)
            .field("client_token", &self.client_token)
            .field("profile", &self.profile)
            .field("instance_type", &self.instance_type)
            .field("subnet_id", &self.subnet_id)
            .field("image", &self.image)
            .field("threads_per_core", &self.threads_per_core)
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
    /// `Placement.AvailabilityZone`, e.g. `us-east-1b`: where a reclaim
    /// happened (a subnet lives in one AZ, but the id alone does not say which).
    pub availability_zone: Option<String>,
    pub market: Market,
    pub state: InstanceState,
    /// EC2's state reason code, e.g. `Server.SpotInstanceTermination`.
    pub state_reason: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    /// `arn:<partition>:ec2:<region>:<account>:instance/<id>`, as IAM sees
    /// it in `ec2:SourceInstanceARN` (`None` when EC2 did not say the
    /// account).
    pub arn: Option<String>,
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
    /// The account lacks a one-time setup step (the spot service-linked
    /// role): no launch of any profile can succeed until an operator does it.
    AccountSetup,
    /// This attempt's `ClientToken` is spent: EC2 remembers it with other
    /// parameters (`IdempotentParameterMismatch`) or its instance was
    /// terminated (`IdempotentInstanceTerminated`). Nothing is wrong with
    /// the profile: adopt the runner's instance if it has one, else go on
    /// with the next attempt and its own token.
    TokenSpent,
}

impl CloudErrorKind {
    /// Whether retrying the profile as it is cannot help: an operator has
    /// to fix the row (or the account) first.
    pub fn is_invalid_request(self) -> bool {
        matches!(self, CloudErrorKind::Invalid | CloudErrorKind::AccountSetup)
    }
}

/// The service's error code for an image filter that no available AMI
/// matches: an invalid request (the profile backs off until an AMI appears
/// or the row is fixed).
pub const IMAGE_FILTER_NO_MATCH: &str = "ImageFilterNoMatch";

/// The role EC2 needs for spot, created once per account.
const SPOT_SERVICE_LINKED_ROLE_HELP: &str = "the account has no spot service-linked role \
     (AWSServiceRoleForEC2Spot) and this principal may not create it: run \
     `aws iam create-service-linked-role --aws-service-name spot.amazonaws.com` once, \
     or allow iam:CreateServiceLinkedRole for spot.amazonaws.com (docs/operations.md)";

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

    /// No available AMI matches the filter.
    pub fn no_image_match(filter: &crate::profile::ImageFilter) -> Self {
        Self::new(
            CloudErrorKind::Invalid,
            IMAGE_FILTER_NO_MATCH,
            format!(
                "no available AMI of owner {} is named like {:?} (image_filter {filter})",
                filter.owner(),
                filter.name_pattern()
            ),
        )
    }

    /// Classifies an EC2 error code.
    pub fn from_code(code: &str, message: impl Into<String>) -> Self {
        if code == "AuthFailure.ServiceLinkedRoleCreationNotPermitted" {
            return Self::new(
                CloudErrorKind::AccountSetup,
                code,
                format!("{SPOT_SERVICE_LINKED_ROLE_HELP} ({})", message.into()),
            );
        }
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
            "IdempotentParameterMismatch" | "IdempotentInstanceTerminated" => {
                CloudErrorKind::TokenSpent
            }
            _ => CloudErrorKind::Invalid,
        };
        Self::new(kind, code, message)
    }
}

#[async_trait]
pub trait Cloud: Send + Sync + 'static {
    /// One `RunInstances` with the request's `ClientToken` and the contract
    /// tags. Repeating a call with the same token and parameters returns the
    /// same instance; the same token with other parameters, or after its
    /// instance terminated, is refused ([`CloudErrorKind::TokenSpent`]).
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError>;

    /// `TerminateInstances`; ids already gone are not an error.
    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError>;

    /// Every instance tagged with this controller id, in any state EC2 still
    /// reports (terminated ones linger for about an hour).
    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError>;

    /// `CreateTags` on one of our instances (cost allocation tags: see
    /// [`crate::cost_tags`]); an existing key gets the new value.
    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, String)],
    ) -> Result<(), CloudError>;

    /// `DescribeSpotPriceHistory`: the Linux spot price in effect now for
    /// each of these instance types, one sample per AZ; types EC2 has no
    /// price for are missing from the answer. A cloud that cannot tell
    /// answers nothing, and prices stay as the price table has them.
    async fn spot_prices(
        &self,
        instance_types: &[String],
    ) -> Result<Vec<crate::cost::SpotPrice>, CloudError> {
        let _ = instance_types;
        Ok(Vec::new())
    }

    /// The `RunInstances` bucket this cloud enforces; callers pace themselves by it.
    fn launch_limit(&self) -> TokenBucket {
        TokenBucket::ec2_run_instances()
    }
}

// ------------------------------------------------------- Parameter store --

/// SSM's error code for creating a parameter whose name exists.
pub const PARAMETER_ALREADY_EXISTS: &str = "ParameterAlreadyExists";

/// A parameter as a listing shows it: no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredParameter {
    pub name: String,
    pub modified_at: Option<DateTime<Utc>>,
}

/// Where JIT configs wait for their instance (SSM Parameter Store; see
/// [`crate::parameters`]). Errors carry SSM's error code, classified like
/// EC2's.
#[async_trait]
pub trait ParameterStore: Send + Sync + 'static {
    /// Creates a SecureString (encrypted with the account's `aws/ssm` key).
    /// Never overwrites: a name that exists fails with
    /// [`PARAMETER_ALREADY_EXISTS`], so a stale value (and its tags, which
    /// grant it to an instance) can never be silently kept.
    async fn create_secure(&self, name: &str, value: &SecretString) -> Result<(), CloudError>;

    /// Adds tags to a parameter (`AddTagsToResource`); an existing key gets
    /// the new value.
    async fn tag(&self, name: &str, tags: &[(&str, String)]) -> Result<(), CloudError>;

    /// `DeleteParameter`; a parameter already gone is success.
    async fn delete(&self, name: &str) -> Result<(), CloudError>;

    /// Every parameter under `path`, without values.
    async fn list(&self, path: &str) -> Result<Vec<StoredParameter>, CloudError>;
}

#[cfg(test)]
mod cloud_error_tests {
    use super::*;

    #[test]
    fn an_unmatched_image_filter_is_an_invalid_request() {
        let filter = crate::profile::ImageFilter::parse("self/kani-runner-*").unwrap();
        let e = CloudError::no_image_match(&filter);
        assert!(e.kind.is_invalid_request());
        assert!(crate::backoff::backs_off(&e.code));
        assert!(e.message.contains("self/kani-runner-*"), "{}", e.message);
    }

    #[test]
    fn a_missing_spot_service_linked_role_says_what_to_do() {
        let e = CloudError::from_code(
            "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
            "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances.",
        );
        assert_eq!(e.kind, CloudErrorKind::AccountSetup);
        assert_eq!(e.code, "AuthFailure.ServiceLinkedRoleCreationNotPermitted");
        assert!(e
            .message
            .contains("create-service-linked-role --aws-service-name spot.amazonaws.com"));
        assert!(
            e.message.contains("The provided credentials"),
            "EC2's own words are kept"
        );
    }
}
