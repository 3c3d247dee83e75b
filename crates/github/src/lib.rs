//! The production [`GitHub`] port: registers just-in-time runners, lists and
//! deletes runners, and looks up jobs through GitHub's REST API (octocrab).
//!
//! Authenticates as a GitHub App (an installation token per organization,
//! cached and refreshed before expiry) or with a plain token. Server errors
//! are retried here with backoff; rate limits are handed back to the caller
//! as [`GitHubError::RateLimited`] with the wait GitHub asked for. Every URL
//! is built from the configured API URL, never taken from a payload, and no
//! credential reaches a log line or a `Debug` output.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, StatusCode, Uri};
use octocrab::service::middleware::retry::RetryConfig;
use octocrab::Octocrab;
use secrecy::{ExposeSecret, SecretString};
use spot_runners_domain::ports::{
    GitHub, GitHubError, GitHubJob, GitHubRunner, HookDelivery, Installation, JitConfig,
    JitRequest, JobReport, RunnerScope, WebhookSource,
};
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::survival::RerunFailure;

mod app;
mod deliveries;
mod listing_cache;
mod scope;
mod transport;

use app::AppAuth;
use listing_cache::ListingCache;
use scope::Target;
use transport::{
    classify, github_message, rate_limit_wait, Reply, Request, RetryPolicy, Transport,
};

/// `per_page` maximum of the runners list.
const PAGE_SIZE: usize = 100;

/// Guards against a server that keeps answering full pages.
const MAX_PAGES: u32 = 1000;

/// Workflow runs looked at per status and poll for jobs whose `queued`
/// delivery was lost: the newest first, which is where such jobs are.
const QUEUED_RUNS_PER_POLL: usize = 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Told about every HTTP response the adapter receives (retries and token
/// exchanges included). The server backs it with
/// `spot_runners_github_api_requests_total{endpoint,status}` and
/// `spot_runners_github_rate_limit_remaining`.
pub trait ApiObserver: Send + Sync {
    /// `endpoint` is one of `generate_jitconfig`, `list_runners`,
    /// `delete_runner`, `get_job`, `get_installation`, `installation_token`,
    /// `list_installations`, `list_hook_deliveries`, `redeliver_hook_delivery`,
    /// `list_workflow_runs`, `list_jobs_for_run`, `get_workflow_run`,
    /// `rerun_job`, `rerun_failed_jobs`. A listing answered from the cache is
    /// reported with status 304.
    fn request(&self, endpoint: &'static str, status: u16);

    /// The `x-ratelimit-remaining` of a response that carried one.
    fn rate_limit_remaining(&self, remaining: i64);
}

/// How the adapter authenticates.
#[derive(Clone)]
pub enum Auth {
    /// A GitHub App; tokens are obtained per installation.
    App {
        app_id: u64,
        private_key_pem: SecretString,
    },
    /// A personal access token or any other bearer token.
    Token(SecretString),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::App { app_id, .. } => f
                .debug_struct("App")
                .field("app_id", app_id)
                .field("private_key_pem", &"[redacted]")
                .finish(),
            Auth::Token(_) => f.write_str("Token([redacted])"),
        }
    }
}

#[derive(Clone)]
pub struct GitHubConfig {
    /// `https://api.github.com`, or a GHES `https://HOST/api/v3`.
    pub api_url: String,
    pub auth: Auth,
    pub metrics: Option<Arc<dyn ApiObserver>>,
}

impl fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubConfig")
            .field("api_url", &self.api_url)
            .field("auth", &self.auth)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Why the adapter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid GitHub API URL: {0}")]
    InvalidUrl(String),
    #[error("invalid GitHub App private key: {0}")]
    InvalidPrivateKey(String),
    #[error("cannot set up the GitHub HTTP client: {0}")]
    Client(String),
}

enum Credentials {
    Token(Octocrab),
    App(AppAuth),
}

/// [`GitHub`] on octocrab.
pub struct OctocrabGitHub {
    api_url: String,
    credentials: Credentials,
    transport: Transport,
    /// The runner listings' pages, the poll's runs listings and each open
    /// run's jobs, as GitHub last sent them with their `ETag`: an unchanged
    /// one is answered 304, which costs no rate limit.
    runner_pages: ListingCache<RunnerPage>,
    run_lists: ListingCache<Vec<i64>>,
    run_jobs: ListingCache<Vec<GitHubJob>>,
}

impl fmt::Debug for OctocrabGitHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("OctocrabGitHub");
        s.field("api_url", &self.api_url);
        match &self.credentials {
            Credentials::Token(_) => s.field("auth", &"token"),
            Credentials::App(app) => s.field("app_id", &app.app_id),
        };
        s.field("retry", &self.transport.retry).finish()
    }
}

impl OctocrabGitHub {
    pub fn new(config: GitHubConfig) -> Result<Self, Error> {
        let GitHubConfig {
            api_url,
            auth,
            metrics,
        } = config;
        let (origin, base_path) = split_api_url(&api_url)?;

        // Retries are ours: octocrab's would retry 5xx without backoff and
        // sleep through rate limits.
        let builder = Octocrab::builder()
            .base_uri(origin)
            .map_err(|e| Error::InvalidUrl(e.to_string()))?
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(CONNECT_TIMEOUT))
            .set_read_timeout(Some(IO_TIMEOUT))
            .set_write_timeout(Some(IO_TIMEOUT))
            .add_header(
                http::header::ACCEPT,
                "application/vnd.github+json".to_owned(),
            );

        let credentials = match auth {
            Auth::Token(token) => Credentials::Token(
                builder
                    .personal_token(token)
                    .build()
                    .map_err(|e| Error::Client(e.to_string()))?,
            ),
            Auth::App {
                app_id,
                private_key_pem,
            } => {
                let key =
                    octocrab::EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes())
                        .map_err(|e| Error::InvalidPrivateKey(e.to_string()))?;
                // A key that parses may still fail to sign; better to learn
                // that at startup than on the first webhook.
                octocrab::auth::create_jwt(octocrab::models::AppId(app_id), &key)
                    .map_err(|e| Error::InvalidPrivateKey(e.to_string()))?;
                let app = builder
                    .app(octocrab::models::AppId(app_id), key)
                    .build()
                    .map_err(|e| Error::Client(e.to_string()))?;
                Credentials::App(AppAuth::new(app_id, app))
            }
        };

        Ok(Self {
            api_url,
            credentials,
            transport: Transport {
                base_path,
                observer: metrics,
                retry: RetryPolicy::default(),
                limits: Default::default(),
            },
            runner_pages: ListingCache::default(),
            run_lists: ListingCache::default(),
            run_jobs: ListingCache::default(),
        })
    }

    /// Replaces the default server-error retries (3, from 250 ms doubling,
    /// with jitter).
    pub fn with_retries(mut self, max_retries: u32, base_delay: Duration) -> Self {
        self.transport.retry.max_retries = max_retries;
        self.transport.retry.base_delay = base_delay;
        self
    }

    /// One call, authenticated for `target`. With App auth, a 401 means the
    /// cached token was revoked early: it is replaced once.
    async fn call(
        &self,
        target: &Target,
        endpoint: &'static str,
        request: Request,
    ) -> Result<Reply, GitHubError> {
        match &self.credentials {
            Credentials::Token(client) => self.transport.send(client, endpoint, &request).await,
            Credentials::App(app) => {
                let (installation, client) = app.client(&self.transport, target).await?;
                let reply = self.transport.send(&client, endpoint, &request).await?;
                if reply.status != StatusCode::UNAUTHORIZED {
                    return Ok(reply);
                }
                tracing::info!(
                    installation,
                    endpoint,
                    "GitHub rejected the installation token; getting a new one"
                );
                app.forget_token(installation).await;
                let (_, client) = app.client(&self.transport, target).await?;
                self.transport.send(&client, endpoint, &request).await
            }
        }
    }
}

/// One page of a runner listing.
#[derive(Clone, Debug)]
struct RunnerPage {
    total_count: usize,
    runners: Vec<GitHubRunner>,
}

impl OctocrabGitHub {
    /// A GET of a listing the adapter repeats: sent with the `ETag` of the
    /// body cached for its path, answered from that cache on `304 Not
    /// Modified`, and otherwise parsed by `parse` and cached.
    async fn conditional_get<T: Clone>(
        &self,
        target: &Target,
        endpoint: &'static str,
        path: String,
        cache: &ListingCache<T>,
        parse: impl FnOnce(&Reply) -> Result<T, GitHubError>,
    ) -> Result<T, GitHubError> {
        let mut request = self.transport.request(Method::GET, &path, None);
        let cached = cache.get(&path);
        if let Some(c) = &cached {
            request
                .headers
                .insert(http::header::IF_NONE_MATCH, c.etag.clone());
        }
        let reply = self.call(target, endpoint, request).await?;
        if let Some(c) = cached.filter(|_| reply.status == StatusCode::NOT_MODIFIED) {
            return Ok(c.body);
        }
        if !reply.status.is_success() {
            return Err(classify(endpoint, &reply));
        }
        let body = parse(&reply)?;
        cache.put(
            path,
            reply.headers.get(http::header::ETAG).cloned(),
            body.clone(),
        );
        Ok(body)
    }

    /// A call about a webhook's deliveries: the App's own hook takes the
    /// App's JWT; an organization hook takes the token (or the App's
    /// installation token for that organization).
    async fn hook_call(
        &self,
        source: &WebhookSource,
        endpoint: &'static str,
        request: Request,
    ) -> Result<Reply, GitHubError> {
        match (source, &self.credentials) {
            (WebhookSource::App, Credentials::App(app)) => {
                self.transport.send(app.app_client(), endpoint, &request).await
            }
            (WebhookSource::App, Credentials::Token(_)) => Err(GitHubError::Refused(
                "the App's webhook deliveries need GitHub App auth; with a token, set the org hook id"
                    .into(),
            )),
            (WebhookSource::OrgHook { org, .. }, _) => {
                let target = Target::from_scope(&RunnerScope::Org(org.clone()))?;
                self.call(&target, endpoint, request).await
            }
        }
    }
}

#[async_trait]
impl GitHub for OctocrabGitHub {
    fn rate_limit(&self) -> Option<spot_runners_domain::api_budget::RateLimit> {
        self.transport.limits.tightest(chrono::Utc::now())
    }

    async fn generate_jit_config(
        &self,
        scope: &RunnerScope,
        request: &JitRequest,
    ) -> Result<JitConfig, GitHubError> {
        const ENDPOINT: &str = "generate_jitconfig";
        let target = Target::from_scope(scope)?;
        let body = serde_json::json!({
            "name": request.name,
            "runner_group_id": request.runner_group_id,
            "labels": request.labels,
            "work_folder": "_work",
        });
        let http_request = self.transport.request(
            Method::POST,
            &format!("{}/actions/runners/generate-jitconfig", target.prefix()),
            Some(body),
        );
        let reply = self.call(&target, ENDPOINT, http_request).await?;
        if reply.status == StatusCode::CONFLICT {
            return Err(GitHubError::NameTaken);
        }
        if !reply.status.is_success() {
            return Err(classify(ENDPOINT, &reply));
        }

        #[derive(serde::Deserialize)]
        struct Runner {
            id: i64,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            runner: Runner,
            encoded_jit_config: String,
        }
        let body: Body = reply.json(ENDPOINT)?;
        tracing::debug!(runner = %request.name, runner_id = body.runner.id, %scope, "JIT runner registered");
        Ok(JitConfig {
            runner_id: body.runner.id,
            encoded: SecretString::from(body.encoded_jit_config),
        })
    }

    async fn list_runners(&self, scope: &RunnerScope) -> Result<Vec<GitHubRunner>, GitHubError> {
        const ENDPOINT: &str = "list_runners";
        #[derive(serde::Deserialize)]
        struct Label {
            name: String,
        }
        #[derive(serde::Deserialize)]
        struct Runner {
            id: i64,
            name: String,
            status: String,
            busy: bool,
            #[serde(default)]
            labels: Vec<Label>,
        }
        #[derive(serde::Deserialize)]
        struct Page {
            total_count: usize,
            runners: Vec<Runner>,
        }

        let target = Target::from_scope(scope)?;
        let mut runners: Vec<GitHubRunner> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for page in 1..=MAX_PAGES {
            let path = format!(
                "{}/actions/runners?per_page={PAGE_SIZE}&page={page}",
                target.prefix()
            );
            let fetched = self
                .conditional_get(&target, ENDPOINT, path, &self.runner_pages, |reply| {
                    let body: Page = reply.json(ENDPOINT)?;
                    Ok(RunnerPage {
                        total_count: body.total_count,
                        runners: body
                            .runners
                            .into_iter()
                            .map(|r| GitHubRunner {
                                id: r.id,
                                name: r.name,
                                online: r.status == "online",
                                busy: r.busy,
                                labels: r.labels.into_iter().map(|l| l.name).collect(),
                            })
                            .collect(),
                    })
                })
                .await?;
            let count = fetched.runners.len();
            // Runners registered or removed between two pages shift the
            // others; one may show up twice.
            for r in fetched.runners {
                if seen.insert(r.id) {
                    runners.push(r);
                }
            }
            if count < PAGE_SIZE || runners.len() >= fetched.total_count {
                return Ok(runners);
            }
        }
        Err(GitHubError::Transient(format!(
            "{ENDPOINT}: more than {MAX_PAGES} pages of runners for {scope}"
        )))
    }

    async fn installations(&self) -> Result<Vec<Installation>, GitHubError> {
        match &self.credentials {
            // A token is no App: there is nothing to list.
            Credentials::Token(_) => Ok(Vec::new()),
            Credentials::App(app) => app.installations(&self.transport).await,
        }
    }

    async fn delete_runner(&self, scope: &RunnerScope, runner_id: i64) -> Result<(), GitHubError> {
        const ENDPOINT: &str = "delete_runner";
        let target = Target::from_scope(scope)?;
        let http_request = self.transport.request(
            Method::DELETE,
            &format!("{}/actions/runners/{runner_id}", target.prefix()),
            None,
        );
        let reply = self.call(&target, ENDPOINT, http_request).await?;
        if reply.status.is_success() || reply.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(classify(ENDPOINT, &reply))
    }

    async fn queued_jobs(&self, repository: &str) -> Result<Vec<GitHubJob>, GitHubError> {
        const RUNS: &str = "list_workflow_runs";
        const JOBS: &str = "list_jobs_for_run";
        #[derive(serde::Deserialize)]
        struct Runs {
            workflow_runs: Vec<Run>,
        }
        #[derive(serde::Deserialize)]
        struct Run {
            id: i64,
        }
        #[derive(serde::Deserialize)]
        struct Jobs {
            jobs: Vec<Job>,
        }
        #[derive(serde::Deserialize)]
        struct Job {
            id: i64,
            run_id: i64,
            #[serde(default)]
            run_attempt: Option<i32>,
            status: String,
            #[serde(default)]
            name: String,
            workflow_name: Option<String>,
            #[serde(default)]
            labels: Vec<String>,
            html_url: Option<String>,
            created_at: Option<chrono::DateTime<chrono::Utc>>,
        }

        let target = Target::repository(repository)?;
        let mut run_ids = Vec::new();
        // A run with some jobs started is `in_progress`; its other jobs
        // may still be queued (a matrix wider than the fleet).
        for status in ["queued", "in_progress"] {
            let path = format!(
                "{}/actions/runs?status={status}&per_page={QUEUED_RUNS_PER_POLL}",
                target.prefix()
            );
            let ids = self
                .conditional_get(&target, RUNS, path, &self.run_lists, |reply| {
                    let runs: Runs = reply.json(RUNS)?;
                    Ok(runs.workflow_runs.into_iter().map(|r| r.id).collect())
                })
                .await?;
            run_ids.extend(ids);
        }
        let jobs_path = |run_id: i64| {
            format!(
                "{}/actions/runs/{run_id}/jobs?filter=latest&per_page=100",
                target.prefix()
            )
        };
        // Runs no longer waiting or running are not listed again.
        let open: std::collections::HashSet<String> =
            run_ids.iter().map(|id| jobs_path(*id)).collect();
        self.run_jobs
            .retain_under(&format!("{}/actions/runs/", target.prefix()), |path| {
                open.contains(path)
            });
        let mut queued = Vec::new();
        for run_id in run_ids {
            let jobs = self
                .conditional_get(&target, JOBS, jobs_path(run_id), &self.run_jobs, |reply| {
                    let jobs: Jobs = reply.json(JOBS)?;
                    Ok(jobs
                        .jobs
                        .into_iter()
                        .filter(|j| j.status == "queued")
                        .map(|j| GitHubJob {
                            id: j.id,
                            run_id: j.run_id,
                            run_attempt: j.run_attempt.unwrap_or(1),
                            name: j.name,
                            workflow_name: j.workflow_name,
                            labels: j.labels,
                            html_url: j.html_url,
                            created_at: j.created_at,
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            queued.extend(jobs);
        }
        Ok(queued)
    }

    async fn hook_deliveries(
        &self,
        source: &WebhookSource,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<HookDelivery>, GitHubError> {
        const ENDPOINT: &str = "list_hook_deliveries";
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..deliveries::MAX_PAGES {
            let path = deliveries::list_path(source, cursor.as_deref())?;
            let request = self.transport.request(Method::GET, &path, None);
            let reply = self.hook_call(source, ENDPOINT, request).await?;
            if !reply.status.is_success() {
                return Err(classify(ENDPOINT, &reply));
            }
            let page = deliveries::parse_page(&reply, ENDPOINT)?;
            let reached_since = page.iter().any(|d| d.delivered_at < since);
            out.extend(page.into_iter().filter(|d| d.delivered_at >= since));
            cursor = deliveries::next_cursor(&reply.headers)?;
            if reached_since || cursor.is_none() {
                return Ok(out);
            }
        }
        // The newest pages are the ones that matter; say how far we got.
        tracing::info!(
            %source,
            deliveries = out.len(),
            "webhook delivery log longer than {} pages; looked at the newest only",
            deliveries::MAX_PAGES
        );
        Ok(out)
    }

    async fn redeliver(&self, source: &WebhookSource, delivery_id: i64) -> Result<(), GitHubError> {
        const ENDPOINT: &str = "redeliver_hook_delivery";
        let path = format!("{}/{delivery_id}/attempts", deliveries::base_path(source)?);
        let request = self.transport.request(Method::POST, &path, None);
        let reply = self.hook_call(source, ENDPOINT, request).await?;
        if reply.status.is_success() {
            return Ok(());
        }
        Err(classify(ENDPOINT, &reply))
    }

    async fn workflow_run(
        &self,
        repository: &str,
        run_id: i64,
    ) -> Result<WorkflowRunEvent, GitHubError> {
        const ENDPOINT: &str = "get_workflow_run";
        let target = Target::repository(repository)?;
        let http_request = self.transport.request(
            Method::GET,
            &format!("{}/actions/runs/{run_id}", target.prefix()),
            None,
        );
        let reply = self.call(&target, ENDPOINT, http_request).await?;
        if !reply.status.is_success() {
            return Err(classify(ENDPOINT, &reply));
        }
        WorkflowRunEvent::from_api(repository, reply.body.as_bytes())
            .map_err(|e| GitHubError::Transient(format!("{ENDPOINT}: {e}")))
    }

    async fn rerun_job(&self, repository: &str, job_id: i64) -> Result<(), RerunFailure> {
        self.rerun(
            repository,
            "rerun_job",
            format!("/actions/jobs/{job_id}/rerun"),
        )
        .await
    }

    async fn rerun_failed_jobs(&self, repository: &str, run_id: i64) -> Result<(), RerunFailure> {
        self.rerun(
            repository,
            "rerun_failed_jobs",
            format!("/actions/runs/{run_id}/rerun-failed-jobs"),
        )
        .await
    }

    async fn job(&self, repository: &str, job_id: i64) -> Result<JobReport, GitHubError> {
        const ENDPOINT: &str = "get_job";
        #[derive(serde::Deserialize)]
        struct Job {
            status: String,
            conclusion: Option<String>,
            runner_name: Option<String>,
        }

        let target = Target::repository(repository)?;
        let http_request = self.transport.request(
            Method::GET,
            &format!("{}/actions/jobs/{job_id}", target.prefix()),
            None,
        );
        let reply = self.call(&target, ENDPOINT, http_request).await?;
        if !reply.status.is_success() {
            return Err(classify(ENDPOINT, &reply));
        }
        let job: Job = reply.json(ENDPOINT)?;
        Ok(JobReport {
            status: job.status,
            conclusion: job.conclusion,
            // A queued job reports an empty name on some GitHub versions.
            runner_name: job.runner_name.filter(|n| !n.is_empty()),
        })
    }
}

impl OctocrabGitHub {
    /// One re-run request. GitHub answers 201 with an empty object; 403,
    /// 409 and 422 carry a message saying why not (run still in progress,
    /// re-run limit, too old, missing permission), which the caller judges.
    async fn rerun(
        &self,
        repository: &str,
        endpoint: &'static str,
        path: String,
    ) -> Result<(), RerunFailure> {
        let target = Target::repository(repository)?;
        let http_request = self.transport.request(
            Method::POST,
            &format!("{}{path}", target.prefix()),
            Some(serde_json::json!({})),
        );
        let reply = self.call(&target, endpoint, http_request).await?;
        if reply.status.is_success() {
            return Ok(());
        }
        if rate_limit_wait(&reply).is_none()
            && matches!(
                reply.status,
                StatusCode::FORBIDDEN | StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY
            )
        {
            let message = github_message(&reply.body);
            return Err(RerunFailure::Rejected {
                status: reply.status.as_u16(),
                message: message.trim_start_matches(": ").to_owned(),
            });
        }
        Err(classify(endpoint, &reply).into())
    }
}

/// `scheme://authority` for octocrab, and the path prefix (GHES's `/api/v3`)
/// for every request path.
fn split_api_url(api_url: &str) -> Result<(String, String), Error> {
    // Checked before parsing so that no error message can echo it: the part
    // before '@' would be a credential.
    if api_url.contains('@') {
        return Err(Error::InvalidUrl(
            "credentials in the URL are not supported".to_owned(),
        ));
    }
    let uri: Uri = api_url
        .trim()
        .parse()
        .map_err(|e| Error::InvalidUrl(format!("{api_url:?}: {e}")))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => {
            return Err(Error::InvalidUrl(format!(
                "{api_url:?}: must start with https:// or http://"
            )))
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(Error::InvalidUrl(format!("{api_url:?}: no host")));
    };
    if uri.query().is_some() {
        return Err(Error::InvalidUrl(format!(
            "{api_url:?}: a query string is not supported"
        )));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((format!("{scheme}://{authority}"), base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_split_into_origin_and_prefix() {
        assert_eq!(
            split_api_url("https://api.github.com").unwrap(),
            ("https://api.github.com".to_owned(), String::new())
        );
        assert_eq!(
            split_api_url("https://ghe.example.com/api/v3/").unwrap(),
            ("https://ghe.example.com".to_owned(), "/api/v3".to_owned())
        );
        assert_eq!(
            split_api_url("http://127.0.0.1:8080").unwrap(),
            ("http://127.0.0.1:8080".to_owned(), String::new())
        );
    }

    #[test]
    fn bad_api_urls_are_refused_without_echoing_credentials() {
        for url in [
            "",
            "api.github.com",
            "ftp://x",
            "https://x/?a=b",
            "not a url",
        ] {
            assert!(
                matches!(split_api_url(url), Err(Error::InvalidUrl(_))),
                "{url}"
            );
        }
        let err = split_api_url("https://user:hunter2@ghe.example.com").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
