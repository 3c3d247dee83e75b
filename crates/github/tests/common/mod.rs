//! Shared by the integration tests: adapters pointed at a wiremock server,
//! an observer that records what it is told, and a JWT check for the mock.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::{Arc, Mutex};
use std::time::Duration;

use octocrab::jsonwebtoken::{self, Algorithm, DecodingKey, Validation};
use secrecy::SecretString;
use spot_runners_github::{ApiObserver, Auth, GitHubConfig, OctocrabGitHub};
use wiremock::{MockServer, Request};

pub const APP_ID: u64 = 4242;
pub const TOKEN: &str = "test-token";
pub const TEST_KEY: &str = include_str!("../fixtures/test-app-key.pem");
pub const TEST_PUBLIC_KEY: &str = include_str!("../fixtures/test-app-key.pub.pem");

#[derive(Default)]
pub struct Recorder {
    requests: Mutex<Vec<(&'static str, u16)>>,
    remaining: Mutex<Vec<i64>>,
}

impl Recorder {
    pub fn requests(&self) -> Vec<(&'static str, u16)> {
        self.requests.lock().unwrap().clone()
    }

    pub fn remaining(&self) -> Vec<i64> {
        self.remaining.lock().unwrap().clone()
    }
}

impl ApiObserver for Recorder {
    fn request(&self, endpoint: &'static str, status: u16) {
        self.requests.lock().unwrap().push((endpoint, status));
    }

    fn rate_limit_remaining(&self, remaining: i64) {
        self.remaining.lock().unwrap().push(remaining);
    }
}

fn build(api_url: String, auth: Auth) -> (OctocrabGitHub, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url,
        auth,
        metrics: Some(recorder.clone()),
    })
    .expect("adapter builds")
    // Keeps the retry tests fast; the backoff itself is unit-tested.
    .with_retries(3, Duration::from_millis(2));
    (github, recorder)
}

pub fn token_github(server: &MockServer) -> (OctocrabGitHub, Arc<Recorder>) {
    build(server.uri(), Auth::Token(SecretString::from(TOKEN)))
}

pub fn app_github(server: &MockServer) -> (OctocrabGitHub, Arc<Recorder>) {
    build(
        server.uri(),
        Auth::App {
            app_id: APP_ID,
            private_key_pem: SecretString::from(TEST_KEY),
        },
    )
}

/// Matches requests authenticated as the test App: an RS256 JWT signed by
/// the fixture key, issued by `APP_ID`, not expired.
pub struct AppJwt;

impl wiremock::Match for AppJwt {
    fn matches(&self, request: &Request) -> bool {
        #[derive(serde::Deserialize)]
        struct Claims {
            iss: u64,
        }
        let Some(jwt) = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let key = DecodingKey::from_rsa_pem(TEST_PUBLIC_KEY.as_bytes()).unwrap();
        jsonwebtoken::decode::<Claims>(jwt, &key, &Validation::new(Algorithm::RS256))
            .is_ok_and(|data| data.claims.iss == APP_ID)
    }
}

/// RFC 3339, the way GitHub writes `expires_at`.
pub fn in_secs(secs: i64) -> String {
    (chrono::Utc::now() + chrono::TimeDelta::seconds(secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
