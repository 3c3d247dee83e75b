//! Configuration from the environment (DESIGN.md, "Configuration"), parsed
//! once into types that cannot hold a bad value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;
use spot_runners_domain::ports::WebhookSource;
use spot_runners_domain::webhook::WebhookSecrets;
use spot_runners_domain::ControllerId;

use crate::http::IntakeLimits;
use crate::Error;

/// The environment, as clap reads it (each variable can also be a flag).
#[derive(Args, Clone)]
pub struct RawSettings {
    /// PostgreSQL URL; unset starts an embedded PostgreSQL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded PostgreSQL keeps its data.
    #[arg(long, env = "SPOT_RUNNERS_DATA_DIR", default_value = "./.spot-runners")]
    pub data_dir: PathBuf,
    /// Address for webhooks, health and metrics (port 0 picks a free port).
    #[arg(long, env = "SPOT_RUNNERS_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// A separate address for /metrics (and health), off the public webhook
    /// port; unset: /metrics is served on SPOT_RUNNERS_LISTEN.
    #[arg(long, env = "SPOT_RUNNERS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Webhook HMAC secret; a comma-separated list allows rotation.
    #[arg(long, env = "SPOT_RUNNERS_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Names this deployment in tags and runner names.
    #[arg(
        long,
        env = "SPOT_RUNNERS_CONTROLLER_ID",
        default_value = "spot-runners"
    )]
    pub controller_id: String,
    /// GitHub REST API base (GHES and tests point it elsewhere).
    #[arg(
        long,
        env = "SPOT_RUNNERS_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    pub github_api_url: String,
    /// GitHub App id (preferred auth).
    #[arg(long, env = "SPOT_RUNNERS_GITHUB_APP_ID")]
    pub github_app_id: Option<u64>,
    /// GitHub App private key: PEM text, or a path to a PEM file.
    #[arg(
        long,
        env = "SPOT_RUNNERS_GITHUB_APP_PRIVATE_KEY",
        hide_env_values = true
    )]
    pub github_app_private_key: Option<String>,
    /// Alternative to an App: a token with org self-hosted-runner admin rights.
    #[arg(long, env = "SPOT_RUNNERS_GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// Seconds between periodic reconcile passes.
    #[arg(
        long,
        env = "SPOT_RUNNERS_RECONCILE_INTERVAL_SECS",
        default_value_t = 15
    )]
    pub reconcile_interval_secs: u64,
    /// Global cap on live instances over all profiles.
    #[arg(long, env = "SPOT_RUNNERS_MAX_INSTANCES", default_value_t = 100)]
    pub max_instances: u32,
    /// Orgs (or `owner/repo` scopes) served from the first pass, before any
    /// webhook: comma-separated. Needed with token auth for warm pools.
    #[arg(long, env = "SPOT_RUNNERS_GITHUB_ORGS")]
    pub github_orgs: Option<String>,
    /// Days a delivery GUID is remembered for de-duplication.
    #[arg(
        long,
        env = "SPOT_RUNNERS_DELIVERY_RETENTION_DAYS",
        default_value_t = 7
    )]
    pub delivery_retention_days: u32,
    /// Days completed jobs and ended runners are kept in the ledger.
    #[arg(long, env = "SPOT_RUNNERS_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u32,
    /// The org webhook this service receives, as `ORG/HOOK_ID`: its failed
    /// deliveries are redelivered. Unset with App auth: the App's webhook.
    #[arg(long, env = "SPOT_RUNNERS_GITHUB_HOOK_ID")]
    pub github_hook_id: Option<String>,
    /// Dollars per UTC day; past it nothing new is launched. Unset: no cap.
    #[arg(long, env = "SPOT_RUNNERS_MAX_DAILY_SPEND")]
    pub max_daily_spend: Option<String>,
}

/// How the service authenticates to GitHub.
#[derive(Clone)]
pub enum GitHubAuth {
    App {
        app_id: u64,
        private_key: SecretString,
    },
    Token(SecretString),
    None,
}

impl std::fmt::Debug for GitHubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitHubAuth::App { app_id, .. } => {
                write!(f, "App {{ app_id: {app_id}, private_key: [redacted] }}")
            }
            GitHubAuth::Token(_) => f.write_str("Token([redacted])"),
            GitHubAuth::None => f.write_str("None"),
        }
    }
}

/// Validated settings. `Debug` never shows a secret.
#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: Option<SecretString>,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where /metrics is served instead of `listen`, when set.
    pub metrics_listen: Option<SocketAddr>,
    pub webhook_secrets: Option<WebhookSecrets>,
    pub controller_id: ControllerId,
    pub github_api_url: String,
    pub github_auth: GitHubAuth,
    pub reconcile_interval: Duration,
    pub max_instances: u32,
    pub delivery_retention: Duration,
    /// `SPOT_RUNNERS_GITHUB_ORGS`: where runners may register before any
    /// job or webhook said so.
    pub github_orgs: Vec<spot_runners_domain::ports::RunnerScope>,
    /// Completed jobs and ended runners older than this are pruned.
    pub retention: Duration,
    /// What requests may hold before they are authenticated.
    pub intake: IntakeLimits,
    /// Whose failed deliveries are redelivered; `None`: nobody's.
    pub redeliver_from: Option<WebhookSource>,
    /// `SPOT_RUNNERS_MAX_DAILY_SPEND`: dollars per UTC day; `None`: no cap.
    pub max_daily_spend: Option<f64>,
}

fn non_blank(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl RawSettings {
    /// Validates everything; `simulate` relaxes what the simulator supplies.
    pub fn parse(self, simulate: bool) -> Result<Settings, Error> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            Error::Config(format!(
                "SPOT_RUNNERS_LISTEN={:?} is not an address like 0.0.0.0:8080",
                self.listen
            ))
        })?;
        if !simulate {
            refuse_example_secrets(&self)?;
        }
        let metrics_listen = non_blank(self.metrics_listen)
            .map(|v| {
                v.parse::<SocketAddr>().map_err(|_| {
                    Error::Config(format!(
                        "SPOT_RUNNERS_METRICS_LISTEN={v:?} is not an address like 127.0.0.1:9100"
                    ))
                })
            })
            .transpose()?;
        let controller_id = ControllerId::parse(&self.controller_id)
            .map_err(|e| Error::Config(format!("SPOT_RUNNERS_CONTROLLER_ID: {e}")))?;
        let webhook_secrets = non_blank(self.webhook_secret)
            .as_deref()
            .and_then(WebhookSecrets::from_list);
        if webhook_secrets.is_none() && !simulate {
            return Err(Error::Config(
                "SPOT_RUNNERS_WEBHOOK_SECRET is required (the secret set on the GitHub webhook; \
                 a comma-separated list allows rotation)"
                    .into(),
            ));
        }
        let github_api_url = self.github_api_url.trim_end_matches('/').to_owned();
        if !(github_api_url.starts_with("https://") || github_api_url.starts_with("http://")) {
            return Err(Error::Config(format!(
                "SPOT_RUNNERS_GITHUB_API_URL={github_api_url:?} is not an http(s) URL"
            )));
        }
        let github_auth = match (
            self.github_app_id,
            non_blank(self.github_app_private_key),
            non_blank(self.github_token),
        ) {
            (Some(app_id), Some(key), _) => GitHubAuth::App {
                app_id,
                private_key: SecretString::from(read_pem(&key)?),
            },
            (Some(_), None, _) | (None, Some(_), _) => return Err(Error::Config(
                "SPOT_RUNNERS_GITHUB_APP_ID and SPOT_RUNNERS_GITHUB_APP_PRIVATE_KEY go together"
                    .into(),
            )),
            (None, None, Some(token)) => GitHubAuth::Token(SecretString::from(token)),
            (None, None, None) => GitHubAuth::None,
        };
        if self.reconcile_interval_secs == 0 {
            return Err(Error::Config(
                "SPOT_RUNNERS_RECONCILE_INTERVAL_SECS must be at least 1".into(),
            ));
        }
        if self.delivery_retention_days == 0 {
            return Err(Error::Config(
                "SPOT_RUNNERS_DELIVERY_RETENTION_DAYS must be at least 1".into(),
            ));
        }
        let github_orgs =
            spot_runners_domain::scopes::parse_scopes(self.github_orgs.as_deref().unwrap_or(""))
                .map_err(|e| Error::Config(format!("SPOT_RUNNERS_GITHUB_ORGS: {e}")))?;
        if self.retention_days < self.delivery_retention_days {
            // A job forgotten before its delivery GUIDs would come back as
            // new demand if GitHub redelivered its `queued`.
            return Err(Error::Config(format!(
                "SPOT_RUNNERS_RETENTION_DAYS ({}) must be at least SPOT_RUNNERS_DELIVERY_RETENTION_DAYS ({})",
                self.retention_days, self.delivery_retention_days
            )));
        }
        let redeliver_from = match non_blank(self.github_hook_id) {
            Some(hook) => Some(parse_org_hook(&hook)?),
            None => matches!(github_auth, GitHubAuth::App { .. }).then_some(WebhookSource::App),
        };
        let max_daily_spend = non_blank(self.max_daily_spend)
            .map(|v| parse_daily_spend(&v))
            .transpose()?;
        Ok(Settings {
            max_daily_spend,
            github_orgs,
            redeliver_from,
            database_url: non_blank(self.database_url).map(SecretString::from),
            data_dir: self.data_dir,
            listen,
            metrics_listen,
            webhook_secrets,
            controller_id,
            github_api_url,
            github_auth,
            reconcile_interval: Duration::from_secs(self.reconcile_interval_secs),
            max_instances: self.max_instances,
            delivery_retention: Duration::from_secs(
                u64::from(self.delivery_retention_days) * 86_400,
            ),
            retention: Duration::from_secs(u64::from(self.retention_days) * 86_400),
            intake: IntakeLimits::default(),
        })
    }
}

/// What `.env.example` ships: starting with one of these is a deployment
/// that was never filled in, and a guessable webhook secret or database
/// password is worse than not starting.
const EXAMPLE_SECRET_PREFIX: &str = "change-me";

fn refuse_example_secrets(raw: &RawSettings) -> Result<(), Error> {
    let refuse = |var: &str| {
        Err(Error::Config(format!(
            "{var} is still the example value from .env.example ({EXAMPLE_SECRET_PREFIX}-...): \
             set a real secret (e.g. `openssl rand -hex 32`)"
        )))
    };
    if let Some(secrets) = &raw.webhook_secret {
        if secrets
            .split(',')
            .any(|s| s.trim().starts_with(EXAMPLE_SECRET_PREFIX))
        {
            return refuse("SPOT_RUNNERS_WEBHOOK_SECRET");
        }
    }
    if let Some(token) = &raw.github_token {
        if token.trim().starts_with(EXAMPLE_SECRET_PREFIX) {
            return refuse("SPOT_RUNNERS_GITHUB_TOKEN");
        }
    }
    if let Some(url) = &raw.database_url {
        // postgres://user:PASSWORD@host/db
        let password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password);
        if password.is_some_and(|p| p.starts_with(EXAMPLE_SECRET_PREFIX)) {
            return refuse("the password in DATABASE_URL (POSTGRES_PASSWORD with compose)");
        }
    }
    Ok(())
}

/// Dollars, e.g. `250` or `99.50`: a positive, finite amount.
fn parse_daily_spend(value: &str) -> Result<f64, Error> {
    let v = value.trim();
    let bad = || {
        Error::Config(format!(
            "SPOT_RUNNERS_MAX_DAILY_SPEND={v:?} is not an amount of dollars per UTC day above 0 \
             (e.g. 250 or 99.50; unset it for no cap)"
        ))
    };
    let dollars: f64 = v.trim_start_matches('$').parse().map_err(|_| bad())?;
    if !dollars.is_finite() || dollars <= 0.0 {
        return Err(bad());
    }
    Ok(dollars)
}

/// `ORG/HOOK_ID`, e.g. `acme/123456789`.
fn parse_org_hook(value: &str) -> Result<WebhookSource, Error> {
    let bad = || {
        Error::Config(format!(
            "SPOT_RUNNERS_GITHUB_HOOK_ID={value:?} is not ORG/HOOK_ID (e.g. acme/123456789; \
             the id is in the hook's settings URL)"
        ))
    };
    let (org, id) = value.trim().split_once('/').ok_or_else(bad)?;
    let hook_id: i64 = id.parse().map_err(|_| bad())?;
    let plain = !org.is_empty() && org.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !plain || hook_id <= 0 {
        return Err(bad());
    }
    Ok(WebhookSource::OrgHook {
        org: org.to_owned(),
        hook_id,
    })
}

/// The key itself when it looks like PEM, else the contents of that file.
fn read_pem(value: &str) -> Result<String, Error> {
    if value.contains("-----BEGIN") {
        return Ok(value.replace("\\n", "\n"));
    }
    std::fs::read_to_string(value.trim()).map_err(|e| {
        Error::Config(format!(
            "SPOT_RUNNERS_GITHUB_APP_PRIVATE_KEY is neither PEM text nor a readable file ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        raw: RawSettings,
    }

    fn raw(args: &[&str]) -> RawSettings {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .raw
    }

    #[test]
    fn secret_required_unless_simulating() {
        let err = raw(&[]).parse(false).unwrap_err().to_string();
        assert!(err.contains("SPOT_RUNNERS_WEBHOOK_SECRET"), "{err}");
        assert!(raw(&[]).parse(true).is_ok());
    }

    #[test]
    fn rejects_bad_values_with_the_variable_named() {
        let cases = [
            (vec!["--listen", "nonsense"], "SPOT_RUNNERS_LISTEN"),
            (
                vec!["--controller-id", "Bad_Id"],
                "SPOT_RUNNERS_CONTROLLER_ID",
            ),
            (
                vec!["--github-api-url", "ftp://x"],
                "SPOT_RUNNERS_GITHUB_API_URL",
            ),
            (
                vec!["--github-app-id", "5"],
                "SPOT_RUNNERS_GITHUB_APP_PRIVATE_KEY",
            ),
            (
                vec!["--reconcile-interval-secs", "0"],
                "SPOT_RUNNERS_RECONCILE_INTERVAL_SECS",
            ),
            (
                vec!["--github-orgs", "acme, not an org"],
                "SPOT_RUNNERS_GITHUB_ORGS",
            ),
            (vec!["--retention-days", "3"], "SPOT_RUNNERS_RETENTION_DAYS"),
        ];
        for (mut args, var) in cases {
            args.extend(["--webhook-secret", "s"]);
            let err = raw(&args).parse(false).unwrap_err().to_string();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn example_secrets_are_refused_with_the_variable_named() {
        let cases = [
            (
                vec!["--webhook-secret", "change-me-webhook-secret"],
                "SPOT_RUNNERS_WEBHOOK_SECRET",
            ),
            (
                vec!["--webhook-secret", "real-one,change-me"],
                "SPOT_RUNNERS_WEBHOOK_SECRET",
            ),
            (
                vec!["--webhook-secret", "s", "--github-token", "change-me"],
                "SPOT_RUNNERS_GITHUB_TOKEN",
            ),
            (
                vec![
                    "--webhook-secret",
                    "s",
                    "--database-url",
                    "postgres://spot_runners:change-me-postgres@postgres:5432/spot_runners",
                ],
                "DATABASE_URL",
            ),
        ];
        for (args, var) in cases {
            let err = raw(&args).parse(false).unwrap_err().to_string();
            assert!(
                err.contains(var) && err.contains(".env.example"),
                "{args:?}: {err}"
            );
            assert!(
                !err.contains("change-me-postgres"),
                "the value itself is not echoed: {err}"
            );
        }
        // A real secret that merely contains the words is fine, and so is
        // the simulator, which needs none.
        assert!(raw(&["--webhook-secret", "please-change-me-never"])
            .parse(false)
            .is_ok());
        assert!(raw(&["--webhook-secret", "change-me"]).parse(true).is_ok());
    }

    #[test]
    fn metrics_listen_is_optional_and_validated() {
        let s = raw(&["--webhook-secret", "s"]).parse(false).unwrap();
        assert_eq!(s.metrics_listen, None);
        let s = raw(&[
            "--webhook-secret",
            "s",
            "--metrics-listen",
            "127.0.0.1:9100",
        ])
        .parse(false)
        .unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let err = raw(&["--webhook-secret", "s", "--metrics-listen", "nope"])
            .parse(false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SPOT_RUNNERS_METRICS_LISTEN"), "{err}");
    }

    #[test]
    fn retention_defaults_to_30_days() {
        let s = raw(&["--webhook-secret", "s"]).parse(false).unwrap();
        assert_eq!(s.retention, Duration::from_secs(30 * 86_400));
        let s = raw(&["--webhook-secret", "s", "--retention-days", "90"])
            .parse(false)
            .unwrap();
        assert_eq!(s.retention, Duration::from_secs(90 * 86_400));
    }

    #[test]
    fn the_hook_to_redeliver_from() {
        let with = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend(["--webhook-secret", "s"]);
            raw(&all).parse(false)
        };
        assert_eq!(with(&[]).unwrap().redeliver_from, None);
        assert_eq!(
            with(&["--github-hook-id", "acme/42"])
                .unwrap()
                .redeliver_from,
            Some(WebhookSource::OrgHook {
                org: "acme".into(),
                hook_id: 42
            })
        );
        for bad in ["42", "acme/x", "/42", "acme/-1", "a/b/42", "../1"] {
            let err = with(&["--github-hook-id", bad]).unwrap_err().to_string();
            assert!(err.contains("SPOT_RUNNERS_GITHUB_HOOK_ID"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_daily_spend_cap_is_optional_and_validated() {
        let with = |args: &[&str]| {
            let mut all = args.to_vec();
            all.extend(["--webhook-secret", "s"]);
            raw(&all).parse(false)
        };
        assert_eq!(with(&[]).unwrap().max_daily_spend, None);
        assert_eq!(
            with(&["--max-daily-spend", " "]).unwrap().max_daily_spend,
            None
        );
        assert_eq!(
            with(&["--max-daily-spend", "99.50"])
                .unwrap()
                .max_daily_spend,
            Some(99.5)
        );
        assert_eq!(
            with(&["--max-daily-spend", "$250"])
                .unwrap()
                .max_daily_spend,
            Some(250.0)
        );
        for bad in ["0", "-5", "ten", "NaN", "inf", "1e400", "5 dollars"] {
            let arg = format!("--max-daily-spend={bad}");
            let err = with(&[&arg]).unwrap_err().to_string();
            assert!(err.contains("SPOT_RUNNERS_MAX_DAILY_SPEND"), "{bad}: {err}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let s = raw(&[
            "--webhook-secret",
            "hook-secret-1,hook-secret-2",
            "--github-token",
            "ghp_tokenvalue",
            "--database-url",
            "postgres://u:dbpassword@h/db",
        ])
        .parse(false)
        .unwrap();
        let shown = format!("{s:?}");
        for secret in ["hook-secret-1", "ghp_tokenvalue", "dbpassword"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert_eq!(s.webhook_secrets.unwrap().len(), 2);
    }
}
