//! GitHub App authentication: the App's JWT buys one installation token per
//! organization (or user repository); tokens are cached per installation and
//! replaced shortly before they expire.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Method, StatusCode};
use octocrab::Octocrab;
use secrecy::SecretString;
use spot_runners_domain::ports::{GitHubError, Installation};

use crate::scope::Target;
use crate::transport::{classify, Transport};

/// A token is replaced this long before `expires_at`, so that a call that
/// starts with it never reaches GitHub with an expired one.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// One async lock per key: a refresh for one organization must not hold up
/// calls for another, and concurrent callers for the same one wait for a
/// single exchange rather than each buying a token.
struct Slots<K, V>(Mutex<HashMap<K, Arc<tokio::sync::Mutex<Option<V>>>>>);

impl<K: Eq + Hash, V> Slots<K, V> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn slot(&self, key: K) -> Arc<tokio::sync::Mutex<Option<V>>> {
        // A poisoned map still holds valid slots; a panic elsewhere must not
        // stop every later call.
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(key).or_default())
    }
}

struct InstallationToken {
    expires_at: DateTime<Utc>,
    /// Shares the App client's connection pool; authenticates with the token.
    client: Octocrab,
}

pub(crate) struct AppAuth {
    pub(crate) app_id: u64,
    /// Authenticates as the App itself: octocrab signs a fresh JWT for each
    /// request it sends.
    app: Octocrab,
    /// Installation id per `Target::cache_key`.
    installations: Slots<String, u64>,
    tokens: Slots<u64, InstallationToken>,
}

impl AppAuth {
    pub(crate) fn new(app_id: u64, app: Octocrab) -> Self {
        Self {
            app_id,
            app,
            installations: Slots::new(),
            tokens: Slots::new(),
        }
    }

    /// A client carrying a valid installation token for `target`, and the
    /// installation it belongs to.
    pub(crate) async fn client(
        &self,
        transport: &Transport,
        target: &Target,
    ) -> Result<(u64, Octocrab), GitHubError> {
        let installation = self.installation_id(transport, target).await?;
        let slot = self.tokens.slot(installation);
        let mut cached = slot.lock().await;
        if let Some(token) = cached.as_ref() {
            if token.expires_at - Utc::now() > margin() {
                return Ok((installation, token.client.clone()));
            }
        }

        let request = transport.request(
            Method::POST,
            &format!("/app/installations/{installation}/access_tokens"),
            None,
        );
        let reply = transport
            .send(&self.app, "installation_token", &request)
            .await?;
        if !reply.status.is_success() {
            if matches!(
                reply.status,
                StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED
            ) {
                // The App may have been reinstalled under a new id.
                self.forget_installation(target).await;
            }
            return Err(match classify("installation_token", &reply) {
                GitHubError::NotFound => GitHubError::Refused(format!(
                    "installation {installation} of GitHub App {} is gone",
                    self.app_id
                )),
                other => other,
            });
        }

        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: String,
            expires_at: DateTime<Utc>,
        }
        let body: TokenBody = reply.json("installation_token")?;
        let client = self
            .app
            .user_access_token(SecretString::from(body.token))
            .map_err(|e| GitHubError::Transient(format!("installation_token: {e}")))?;
        tracing::debug!(
            installation,
            expires_at = %body.expires_at,
            "GitHub installation token obtained"
        );
        *cached = Some(InstallationToken {
            expires_at: body.expires_at,
            client: client.clone(),
        });
        Ok((installation, client))
    }

    /// The client that authenticates as the App itself (a JWT per request),
    /// for the App's own endpoints such as its webhook's deliveries.
    pub(crate) fn app_client(&self) -> &Octocrab {
        &self.app
    }

    /// Drops a token GitHub no longer accepts, so the next call buys one.
    pub(crate) async fn forget_token(&self, installation: u64) {
        *self.tokens.slot(installation).lock().await = None;
    }

    async fn forget_installation(&self, target: &Target) {
        *self.installations.slot(target.cache_key()).lock().await = None;
    }

    async fn installation_id(
        &self,
        transport: &Transport,
        target: &Target,
    ) -> Result<u64, GitHubError> {
        let slot = self.installations.slot(target.cache_key());
        let mut cached = slot.lock().await;
        if let Some(id) = *cached {
            return Ok(id);
        }
        let request = transport.request(
            Method::GET,
            &format!("{}/installation", target.prefix()),
            None,
        );
        let reply = transport
            .send(&self.app, "get_installation", &request)
            .await?;
        if !reply.status.is_success() {
            // Not "not found" to the caller: the runner or job may well
            // exist, the App just cannot see it, and retrying will not help.
            return Err(match classify("get_installation", &reply) {
                GitHubError::NotFound => GitHubError::Refused(format!(
                    "GitHub App {} is not installed for {target}",
                    self.app_id
                )),
                other => other,
            });
        }
        #[derive(serde::Deserialize)]
        struct InstallationBody {
            id: u64,
        }
        let id = reply.json::<InstallationBody>("get_installation")?.id;
        *cached = Some(id);
        Ok(id)
    }
}

impl AppAuth {
    /// `GET /app/installations`, every page, as the App itself.
    pub(crate) async fn installations(
        &self,
        transport: &Transport,
    ) -> Result<Vec<Installation>, GitHubError> {
        const ENDPOINT: &str = "list_installations";
        const PER_PAGE: usize = 100;
        const MAX_PAGES: u32 = 100;
        #[derive(serde::Deserialize)]
        struct Account {
            login: String,
            #[serde(rename = "type")]
            kind: String,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            id: i64,
            account: Option<Account>,
        }
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            let request = transport.request(
                Method::GET,
                &format!("/app/installations?per_page={PER_PAGE}&page={page}"),
                None,
            );
            let reply = transport.send(&self.app, ENDPOINT, &request).await?;
            if !reply.status.is_success() {
                return Err(classify(ENDPOINT, &reply));
            }
            let items: Vec<Item> = reply.json(ENDPOINT)?;
            let fetched = items.len();
            out.extend(items.into_iter().filter_map(|i| {
                i.account.map(|a| Installation {
                    id: i.id,
                    account: a.login,
                    account_type: a.kind,
                })
            }));
            if fetched < PER_PAGE {
                return Ok(out);
            }
        }
        Err(GitHubError::Transient(format!(
            "{ENDPOINT}: more than {MAX_PAGES} pages of installations"
        )))
    }
}

fn margin() -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(REFRESH_MARGIN).unwrap_or(chrono::TimeDelta::MAX)
}
