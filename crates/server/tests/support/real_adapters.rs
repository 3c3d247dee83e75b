//! The service on the real adapters: octocrab against a GitHub mock, the
//! given cloud (the EC2 adapter on moto, or a wrapper of it) and SSM on
//! moto. Only the end-to-end tests include this.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use spot_runners_domain::ports::Cloud;
use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
use spot_runners_reconciler::Backends;

use crate::common::{spawn_app_with, TestApp, SECRET};

/// Reconciling every second, as `controller`.
pub async fn spawn_on_real_adapters(
    github_url: &str,
    cloud: Arc<dyn Cloud>,
    controller: &str,
) -> TestApp {
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: github_url.to_owned(),
        auth: Auth::Token(SecretString::from("ghs_test".to_owned())),
        metrics: None,
    })
    .unwrap();
    spawn_app_with(
        SECRET,
        |s| {
            s.controller_id = controller.parse().unwrap();
            s.reconcile_interval = Duration::from_secs(1);
        },
        Some(Backends {
            cloud,
            github: Arc::new(github),
            parameters: Arc::new(
                spot_runners_aws::SsmParameterStore::from_env()
                    .await
                    .unwrap(),
            ),
        }),
    )
    .await
}
