//! One API call: send through octocrab's raw methods (so status and headers
//! stay visible), report to the observer, retry server errors, and turn a
//! failed reply into a `GitHubError`.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use octocrab::Octocrab;
use rand::Rng;
use serde::de::DeserializeOwned;
use spot_runners_domain::api_budget::RateLimit;
use spot_runners_domain::ports::GitHubError;

use crate::ApiObserver;

/// Covers a whole attempt (connect, headers, body); octocrab's own timeouts
/// only bound single socket operations.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// GitHub's advice for a secondary rate limit without a `retry-after`.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// A primary rate limit resets within the hour; a reset further away means a
/// skewed clock, and the caller should rather try again.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);

/// Error messages from GitHub are quoted, but not at any length.
const MAX_MESSAGE_CHARS: usize = 200;

#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) max_retries: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Exponential, with jitter so that many callers failing together do
    /// not come back together.
    fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(ceiling_ms / 2..=ceiling_ms))
    }
}

pub(crate) struct Request {
    pub(crate) method: Method,
    /// Absolute path (with the API URL's own path prefix) and query; never a
    /// full URL, so octocrab always sends it to the configured host.
    pub(crate) path: String,
    pub(crate) body: Option<serde_json::Value>,
    /// Extra headers (e.g. `If-None-Match`); GET only.
    pub(crate) headers: HeaderMap,
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Reply {
    /// Decoding errors carry only a position: the body may hold a token.
    pub(crate) fn json<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, GitHubError> {
        serde_json::from_str(&self.body).map_err(|e| {
            GitHubError::Transient(format!(
                "{endpoint}: malformed response body ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }
}

pub(crate) struct Transport {
    pub(crate) base_path: String,
    pub(crate) observer: Option<Arc<dyn ApiObserver>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) limits: RateLimits,
}

/// The primary rate limits GitHub reported, one per window. Each
/// installation (and the App's own JWT) has a window of its own; the reply
/// does not say whose, so windows are told apart by their reset time, and
/// two that share one merge to the lower count (the cautious side).
#[derive(Default)]
pub(crate) struct RateLimits(std::sync::Mutex<std::collections::BTreeMap<i64, RateLimit>>);

impl RateLimits {
    fn observe(&self, headers: &HeaderMap) {
        // Search and GraphQL have budgets of their own; only `core` is
        // what the sweeps and registrations share.
        let resource = headers
            .get("x-ratelimit-resource")
            .and_then(|v| v.to_str().ok());
        if resource.is_some_and(|r| r != "core") {
            return;
        }
        let (Some(remaining), Some(limit), Some(reset)) = (
            header_i64(headers, "x-ratelimit-remaining"),
            header_i64(headers, "x-ratelimit-limit"),
            header_i64(headers, "x-ratelimit-reset"),
        ) else {
            return;
        };
        let Some(reset_at) = chrono::DateTime::from_timestamp(reset, 0) else {
            return;
        };
        let mut windows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let seen = windows.entry(reset).or_insert(RateLimit {
            remaining,
            limit,
            reset_at,
        });
        seen.remaining = seen.remaining.min(remaining);
        seen.limit = limit;
    }

    /// The window with the smallest share left, of those not reset by `now`.
    pub(crate) fn tightest(&self, now: chrono::DateTime<chrono::Utc>) -> Option<RateLimit> {
        let mut windows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        windows.retain(|_, l| l.reset_at > now);
        windows
            .values()
            .filter(|l| l.limit > 0)
            .min_by(|a, b| {
                let share = |l: &RateLimit| l.remaining as f64 / l.limit as f64;
                share(a).total_cmp(&share(b))
            })
            .copied()
    }
}

impl Transport {
    pub(crate) fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Request {
        Request {
            method,
            path: format!("{}{path}", self.base_path),
            body,
            headers: HeaderMap::new(),
        }
    }

    /// Sends until a reply that is not a plain server error, or until the
    /// retries run out. Any status may come back; only transport failures
    /// are errors here.
    pub(crate) async fn send(
        &self,
        client: &Octocrab,
        endpoint: &'static str,
        request: &Request,
    ) -> Result<Reply, GitHubError> {
        let mut retry = 0;
        loop {
            let outcome = self.attempt(client, endpoint, request).await;
            let retryable = match &outcome {
                Ok(reply) => reply.status.is_server_error() && rate_limit_wait(reply).is_none(),
                Err(_) => true,
            };
            if !retryable || retry >= self.retry.max_retries {
                return outcome.map_err(GitHubError::Transient);
            }
            let delay = self.retry.delay(retry);
            match &outcome {
                Ok(reply) => tracing::debug!(
                    endpoint,
                    status = reply.status.as_u16(),
                    ?delay,
                    "GitHub server error; retrying"
                ),
                Err(error) => {
                    tracing::debug!(endpoint, %error, ?delay, "GitHub unreachable; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    async fn attempt(
        &self,
        client: &Octocrab,
        endpoint: &'static str,
        request: &Request,
    ) -> Result<Reply, String> {
        let exchange = async {
            let path = request.path.as_str();
            let response = match request.method {
                Method::GET if request.headers.is_empty() => client._get(path).await,
                Method::GET => {
                    client
                        ._get_with_headers(path, Some(request.headers.clone()))
                        .await
                }
                Method::POST => client._post(path, request.body.as_ref()).await,
                Method::DELETE => client._delete(path, None::<&()>).await,
                ref other => return Err(format!("{endpoint}: unsupported method {other}")),
            }
            .map_err(|e| format!("{endpoint}: {e}"))?;
            let status = response.status();
            let headers = response.headers().clone();
            self.observe(endpoint, status, &headers);
            let body = client
                .body_to_string(response)
                .await
                .map_err(|e| format!("{endpoint}: reading the response: {e}"))?;
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("{endpoint}: no answer within {ATTEMPT_TIMEOUT:?}")))
    }

    fn observe(&self, endpoint: &'static str, status: StatusCode, headers: &HeaderMap) {
        self.limits.observe(headers);
        let remaining = header_i64(headers, "x-ratelimit-remaining");
        tracing::debug!(endpoint, status = status.as_u16(), remaining, "GitHub API");
        if let Some(observer) = &self.observer {
            observer.request(endpoint, status.as_u16());
            if let Some(remaining) = remaining {
                observer.rate_limit_remaining(remaining);
            }
        }
    }
}

/// The error for a reply that was not a success. 409 is left to the caller
/// (it means "name taken" for generate-jitconfig only).
pub(crate) fn classify(endpoint: &str, reply: &Reply) -> GitHubError {
    if let Some(wait) = rate_limit_wait(reply) {
        return GitHubError::RateLimited(wait);
    }
    let message = format!(
        "{endpoint}: {}{}",
        reply.status,
        github_message(&reply.body)
    );
    match reply.status {
        StatusCode::NOT_FOUND => GitHubError::NotFound,
        StatusCode::REQUEST_TIMEOUT => GitHubError::Transient(message),
        s if s.is_server_error() => GitHubError::Transient(message),
        _ => GitHubError::Refused(message),
    }
}

/// How long GitHub asks us to wait, if this reply is a rate limit.
///
/// The wait goes back to the caller instead of being slept here: it can be a
/// minute or an hour, and the caller has other work to get on with.
pub(crate) fn rate_limit_wait(reply: &Reply) -> Option<Duration> {
    let status = reply.status;
    let limited_status = matches!(
        status,
        StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    );
    if let Some(value) = reply.headers.get(http::header::RETRY_AFTER) {
        if limited_status || status.is_server_error() {
            let secs = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            return Some(secs.map_or(DEFAULT_RATE_LIMIT_WAIT, Duration::from_secs));
        }
    }
    if !limited_status {
        return None;
    }
    if header_i64(&reply.headers, "x-ratelimit-remaining") == Some(0) {
        let wait = match header_i64(&reply.headers, "x-ratelimit-reset") {
            Some(reset) => {
                let secs = reset.saturating_sub(chrono::Utc::now().timestamp());
                Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1))
            }
            None => DEFAULT_RATE_LIMIT_WAIT,
        };
        return Some(wait.min(MAX_RATE_LIMIT_WAIT));
    }
    // A secondary limit may come as a bare 403 that only its message tells
    // apart from a permissions problem.
    if status == StatusCode::TOO_MANY_REQUESTS
        || reply.body.to_ascii_lowercase().contains("rate limit")
    {
        return Some(DEFAULT_RATE_LIMIT_WAIT);
    }
    None
}

pub(crate) fn header_i64(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// GitHub's `message` field, shortened, as `": message"`.
pub(crate) fn github_message(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            message: Some(message),
        }) if !message.is_empty() => {
            let short: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
            format!(": {short}")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, headers: &[(&'static str, String)], body: &str) -> Reply {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: body.to_owned(),
        }
    }

    #[test]
    fn delays_grow_stay_capped_and_jitter_downwards_only() {
        let policy = RetryPolicy {
            max_retries: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let first = policy.delay(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(2);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(policy.delay(30) <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn the_tightest_window_not_yet_reset_is_the_rate_limit() {
        let now = chrono::Utc::now();
        let limits = RateLimits::default();
        assert_eq!(limits.tightest(now), None);
        let seen = |remaining: i64, limit: i64, reset: i64, resource: &str| {
            let r = reply(
                200,
                &[
                    ("x-ratelimit-remaining", remaining.to_string()),
                    ("x-ratelimit-limit", limit.to_string()),
                    ("x-ratelimit-reset", reset.to_string()),
                    ("x-ratelimit-resource", resource.to_owned()),
                ],
                "",
            );
            limits.observe(&r.headers);
        };
        let soon = now.timestamp() + 600;
        let later = now.timestamp() + 1200;
        seen(4000, 5000, soon, "core");
        // A larger installation with a smaller share left is the tighter.
        seen(5000, 15000, later, "core");
        // Search counts against a budget of its own.
        seen(1, 30, soon, "search");
        let tight = limits.tightest(now).unwrap();
        assert_eq!((tight.remaining, tight.limit), (5000, 15000));
        // Within a window the count only goes down (replies race).
        seen(1000, 5000, soon, "core");
        seen(1500, 5000, soon, "core");
        let tight = limits.tightest(now).unwrap();
        assert_eq!((tight.remaining, tight.limit), (1000, 5000));
        // Once a window has reset, what it said no longer holds.
        let after_soon = chrono::DateTime::from_timestamp(soon + 1, 0).unwrap();
        assert_eq!(limits.tightest(after_soon).unwrap().limit, 15000);
        let after_both = chrono::DateTime::from_timestamp(later + 1, 0).unwrap();
        assert_eq!(limits.tightest(after_both), None);
    }

    #[test]
    fn primary_limit_waits_until_reset() {
        let reset = chrono::Utc::now().timestamp() + 120;
        let r = reply(
            403,
            &[
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", reset.to_string()),
            ],
            "",
        );
        let wait = rate_limit_wait(&r).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
    }

    #[test]
    fn reset_in_the_past_or_far_future_is_bounded() {
        let past = chrono::Utc::now().timestamp() - 10;
        let r = reply(
            403,
            &[
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", past.to_string()),
            ],
            "",
        );
        assert_eq!(rate_limit_wait(&r), Some(Duration::from_secs(1)));
        let far = chrono::Utc::now().timestamp() + 86_400;
        let r = reply(
            429,
            &[
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", far.to_string()),
            ],
            "",
        );
        assert_eq!(rate_limit_wait(&r), Some(MAX_RATE_LIMIT_WAIT));
    }

    #[test]
    fn retry_after_wins_and_bare_limits_get_a_minute() {
        let r = reply(403, &[("retry-after", "7".into())], "");
        assert_eq!(rate_limit_wait(&r), Some(Duration::from_secs(7)));
        let r = reply(503, &[("retry-after", "3".into())], "");
        assert_eq!(rate_limit_wait(&r), Some(Duration::from_secs(3)));
        let r = reply(429, &[], "");
        assert_eq!(rate_limit_wait(&r), Some(DEFAULT_RATE_LIMIT_WAIT));
        let r = reply(
            403,
            &[],
            r#"{"message":"You have exceeded a secondary rate limit."}"#,
        );
        assert_eq!(rate_limit_wait(&r), Some(DEFAULT_RATE_LIMIT_WAIT));
    }

    #[test]
    fn other_failures_are_classified() {
        let forbidden = reply(
            403,
            &[("x-ratelimit-remaining", "4000".into())],
            r#"{"message":"Resource not accessible by integration"}"#,
        );
        assert_eq!(rate_limit_wait(&forbidden), None);
        assert_eq!(
            classify("list_runners", &forbidden),
            GitHubError::Refused(
                "list_runners: 403 Forbidden: Resource not accessible by integration".into()
            )
        );
        assert!(matches!(
            classify("x", &reply(401, &[], "")),
            GitHubError::Refused(_)
        ));
        assert!(matches!(
            classify("x", &reply(422, &[], "not json")),
            GitHubError::Refused(_)
        ));
        assert_eq!(classify("x", &reply(404, &[], "")), GitHubError::NotFound);
        assert!(matches!(
            classify("x", &reply(502, &[], "")),
            GitHubError::Transient(_)
        ));
        assert!(matches!(
            classify("x", &reply(409, &[], "")),
            GitHubError::Refused(_)
        ));
    }

    #[test]
    fn decoding_errors_do_not_quote_the_body() {
        let r = reply(
            201,
            &[],
            r#"{"token": "ghs_secret", "expires_at": "ghs_secret"}"#,
        );
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            token: String,
            expires_at: chrono::DateTime<chrono::Utc>,
        }
        let err = r.json::<T>("installation_token").unwrap_err();
        assert!(!err.to_string().contains("ghs_secret"), "{err}");
    }
}
