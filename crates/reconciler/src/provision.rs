//! Provisioning: claims `requested` rows with a lease and drives each to
//! `booting` (JIT config, then `RunInstances` walking the candidates in
//! `launch.rs`), or to a final state. A crash anywhere leaves rows whose
//! lease runs out and that the next claim resumes.

mod launch;

use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::ports::{GitHubError, JitConfig, JitRequest, RunnerScope};
use spot_runners_domain::store::{RunnerChange, RunnerRecord, StoreError, DEFAULT_LEASE};
use spot_runners_domain::{Profile, RunnerState};
use tokio::task::JoinSet;

use crate::retry::{MAX_RETRIES, MAX_WAIT};
use crate::Reconciler;

/// Rows one provisioner claims at a time; each waits its turn at the
/// token bucket, so this bounds in-flight calls, not throughput.
const CLAIM_BATCH: i64 = 32;
/// A runner postponed (rate limits, GitHub trouble) is claimable again after this.
const RETRY_LATER: Duration = Duration::from_secs(2);

pub(crate) enum Failure {
    /// Give up on this runner (a final state); the planner makes a new one
    /// if the demand is still there.
    End { code: String, reason: String },
    /// Leave the row for a later claim (its lease runs out).
    Later,
}

impl Reconciler {
    /// Claims a batch of rows that need provisioning and drives each to
    /// `booting` or a final state. Returns how many were claimed.
    pub async fn provision_batch(self: &Arc<Self>) -> Result<usize, StoreError> {
        let claimed = self
            .store
            .claim_provisioning(
                self.controller_id.as_str(),
                &self.owner,
                DEFAULT_LEASE,
                CLAIM_BATCH,
            )
            .await?;
        let n = claimed.len();
        let names: Vec<String> = claimed.iter().map(|r| r.name.clone()).collect();
        let mut tasks = JoinSet::new();
        for runner in claimed {
            let me = Arc::clone(self);
            tasks.spawn(async move { me.provision(runner).await });
        }
        // Keeps the claims alive while the batch waits on rate limits and
        // calls; if this process dies, they lapse within one lease.
        let mut renew = tokio::time::interval(DEFAULT_LEASE / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                biased;
                joined = tasks.join_next() => if joined.is_none() { break },
                _ = renew.tick() => {
                    if let Err(e) = self.store.renew_leases(&names, &self.owner, DEFAULT_LEASE).await {
                        tracing::warn!(error = %e, "renewing provisioning leases failed");
                    }
                }
            }
        }
        Ok(n)
    }

    async fn provision(&self, runner: RunnerRecord) {
        let (name, profile) = (runner.name.clone(), runner.profile.clone());
        if let Err(failure) = self.provision_inner(runner).await {
            match failure {
                Failure::End { code, reason } => {
                    self.metrics.launch_failed(&profile, &code);
                    tracing::warn!(runner = %name, code = %code, reason = %reason, "launch failed");
                    let change = RunnerChange::Ended {
                        state: RunnerState::LaunchFailed,
                        code: Some(code),
                        reason,
                    };
                    if let Err(e) = self.store.update_runner(&name, change).await {
                        tracing::warn!(runner = %name, error = %e, "recording a failed launch failed");
                    }
                }
                Failure::Later => {
                    tracing::info!(runner = %name, "provisioning postponed");
                    let change = RunnerChange::Postpone {
                        retry_in: RETRY_LATER,
                    };
                    if let Err(e) = self.store.update_runner(&name, change).await {
                        tracing::warn!(runner = %name, error = %e, "postponing a runner failed; its lease will run out");
                    }
                    self.provision_wake.notify_one();
                }
            }
        }
    }

    async fn provision_inner(&self, mut runner: RunnerRecord) -> Result<(), Failure> {
        let profiles = self.profiles.get();
        let Some(profile) = profiles
            .profiles
            .iter()
            .find(|p| p.name.as_str() == runner.profile)
            .cloned()
        else {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: "ProfileGone".into(),
                reason: format!("profile {} no longer exists or is invalid", runner.profile),
            });
        };
        match runner.state {
            RunnerState::Launching => return self.recover_launching(&runner).await,
            RunnerState::Registered => {
                // The JIT config lived only in the memory of a process that
                // is gone; GitHub will not issue it twice.
                self.forget_registration(&runner).await;
                self.update(&runner.name, RunnerChange::Requeue).await?;
                runner.github_runner_id = None;
            }
            _ => {}
        }
        let jit = self.register(&runner, &profile).await?;
        self.update(
            &runner.name,
            RunnerChange::Registered {
                github_runner_id: jit.runner_id,
            },
        )
        .await?;
        runner.github_runner_id = Some(jit.runner_id);
        let result = self.launch(&runner, &profile, &jit).await;
        if result.is_err() {
            self.forget_registration(&runner).await;
        }
        result
    }

    async fn update(&self, name: &str, change: RunnerChange) -> Result<(), Failure> {
        self.store.update_runner(name, change).await.map_err(|e| {
            tracing::warn!(runner = %name, error = %e, "updating a runner failed");
            Failure::Later
        })
    }

    /// A row left in `launching` by a crash: `RunInstances` may or may not
    /// have happened. Adopt the instance if it exists; otherwise end the
    /// runner (anything that appears later under its name is an orphan the
    /// sweep terminates).
    async fn recover_launching(&self, runner: &RunnerRecord) -> Result<(), Failure> {
        let owned = self
            .backends
            .cloud
            .list_owned(self.controller_id.as_str())
            .await
            .map_err(|e| {
                tracing::warn!(runner = %runner.name, error = %e, "listing instances failed");
                Failure::Later
            })?;
        if let Some(instance) = owned
            .into_iter()
            .find(|i| i.runner_name.as_deref() == Some(runner.name.as_str()) && i.state.is_alive())
        {
            tracing::info!(runner = %runner.name, instance = %instance.id, "adopted the instance of an interrupted launch");
            return self
                .update(
                    &runner.name,
                    RunnerChange::Booting {
                        instance_id: instance.id,
                        instance_type: instance.instance_type,
                        subnet_id: instance.subnet_id,
                        market: instance.market.as_str().to_owned(),
                    },
                )
                .await;
        }
        self.forget_registration(runner).await;
        Err(Failure::End {
            code: "LostInLaunch".into(),
            reason: "interrupted during RunInstances and no instance found".into(),
        })
    }

    /// Deletes the runner's GitHub registration, if it has one.
    pub(crate) async fn forget_registration(&self, runner: &RunnerRecord) {
        if let Some(id) = runner.github_runner_id {
            if let Err(e) = self.backends.github.delete_runner(&runner.scope, id).await {
                tracing::warn!(runner = %runner.name, error = %e, "deleting the GitHub registration failed; the orphan sweep will retry");
            }
        }
    }

    async fn register(
        &self,
        runner: &RunnerRecord,
        profile: &Profile,
    ) -> Result<JitConfig, Failure> {
        let request = JitRequest {
            name: runner.name.clone(),
            runner_group_id: profile.runner_group_id,
            labels: profile.runner_labels(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            Self::pace(&self.jit_bucket).await;
            match self
                .backends
                .github
                .generate_jit_config(&runner.scope, &request)
                .await
            {
                Ok(jit) => return Ok(jit),
                Err(GitHubError::NameTaken) if attempt <= MAX_RETRIES => {
                    // A crash between GitHub's answer and our write: the
                    // config is gone, so delete the registration and ask again.
                    self.delete_by_name(&runner.scope, &runner.name).await?;
                }
                Err(GitHubError::RateLimited(wait))
                    if wait <= MAX_WAIT && attempt <= MAX_RETRIES =>
                {
                    tokio::time::sleep(wait).await;
                }
                Err(GitHubError::Transient(e)) if attempt <= MAX_RETRIES => {
                    tracing::info!(runner = %runner.name, error = %e, "GitHub failed; retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(GitHubError::RateLimited(_) | GitHubError::Transient(_)) => {
                    return Err(Failure::Later)
                }
                Err(e) => {
                    return Err(Failure::End {
                        code: "GitHubRefused".into(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    async fn delete_by_name(&self, scope: &RunnerScope, name: &str) -> Result<(), Failure> {
        let runners = self
            .backends
            .github
            .list_runners(scope)
            .await
            .map_err(|e| {
                tracing::warn!(runner = %name, error = %e, "listing GitHub runners failed");
                Failure::Later
            })?;
        for r in runners.iter().filter(|r| r.name == name) {
            self.backends
                .github
                .delete_runner(scope, r.id)
                .await
                .map_err(|_| Failure::Later)?;
        }
        Ok(())
    }
}
