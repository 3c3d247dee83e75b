//! Provisioning: claims `requested` rows with a lease and drives each to
//! `booting` (JIT config, then `RunInstances` walking the candidates in
//! `launch.rs`), or to a final state. A crash anywhere leaves rows whose
//! lease runs out and that the next claim resumes.

mod jit_config;
mod launch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::backoff;
use spot_runners_domain::ports::{GitHubError, JitConfig, JitRequest, RunnerScope};
use spot_runners_domain::store::{RunnerChange, RunnerRecord, StoreError, DEFAULT_LEASE};
use spot_runners_domain::{Profile, RunnerState};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::retry::{lock, MAX_RETRIES, MAX_WAIT};
use crate::{survival, Reconciler};

/// Rows one provisioner claims at a time; each waits its turn at the
/// token bucket, so this bounds in-flight calls, not throughput.
const CLAIM_BATCH: usize = 32;
/// A runner postponed (rate limits, GitHub trouble) is claimable again after this.
const RETRY_LATER: Duration = Duration::from_secs(2);

pub(crate) enum Failure {
    /// Give up on this runner (a final state); the planner makes a new one
    /// if the demand is still there.
    End { code: String, reason: String },
    /// Leave the row for a later claim (its lease runs out).
    Later,
    /// The row moved on without us (a sweep ended it, another replica took
    /// it over after our lease lapsed): touch nothing more.
    Lost,
}

impl Reconciler {
    /// Up to `limit` rows that need provisioning, claimed for this replica
    /// (none past the daily spend cap: planned rows wait in `requested`, no
    /// registration, no RunInstances, until the gate opens; the spend
    /// worker logs and counts when it closes).
    async fn claim(&self, limit: usize) -> Result<Vec<RunnerRecord>, StoreError> {
        if limit == 0 || !self.spend_gate.allows_launch() {
            return Ok(Vec::new());
        }
        self.store
            .claim_provisioning(
                self.controller_id.as_str(),
                &self.owner,
                DEFAULT_LEASE,
                i64::try_from(limit).unwrap_or(i64::MAX),
            )
            .await
    }

    /// Claims a batch of rows that need provisioning and drives each to
    /// `booting` or a final state. Returns how many were claimed.
    pub async fn provision_batch(self: &Arc<Self>) -> Result<usize, StoreError> {
        let claimed = self.claim(CLAIM_BATCH).await?;
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
                _ = renew.tick() => self.renew(&names).await,
            }
        }
        Ok(n)
    }

    /// Provisions until `stop`, at most [`CLAIM_BATCH`] runners at a time,
    /// claiming more as soon as a slot frees or a pass plans new rows: a
    /// row planned while others are in flight does not wait for them all.
    pub(crate) async fn provision_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tasks: JoinSet<()> = JoinSet::new();
        // The rows in flight, by the task provisioning each: their leases
        // are renewed until the task ends, however it ends.
        let mut held: BTreeMap<tokio::task::Id, String> = BTreeMap::new();
        let mut renew = tokio::time::interval(DEFAULT_LEASE / 3);
        renew.tick().await;
        // Whether the last claim filled every free slot: then there may be
        // more to claim as soon as one frees.
        let mut more = true;
        loop {
            if more && !stop.is_cancelled() {
                let free = CLAIM_BATCH.saturating_sub(tasks.len());
                match self.claim(free).await {
                    Ok(claimed) => {
                        more = free > 0 && claimed.len() == free;
                        for runner in claimed {
                            let name = runner.name.clone();
                            let me = Arc::clone(&self);
                            let task = tasks.spawn(async move { me.provision(runner).await });
                            held.insert(task.id(), name);
                        }
                    }
                    Err(e) => {
                        more = false;
                        tracing::warn!(error = %e, "claiming runners to provision failed");
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled(), if tasks.is_empty() => return,
                Some(joined) = tasks.join_next_with_id() => {
                    let id = match joined {
                        Ok((id, ())) => id,
                        Err(e) => {
                            tracing::error!(error = %e, "a provisioning task failed; its row is left to its lease");
                            e.id()
                        }
                    };
                    held.remove(&id);
                    more = true;
                }
                _ = renew.tick(), if !held.is_empty() => {
                    let names: Vec<String> = held.values().cloned().collect();
                    self.renew(&names).await;
                }
                _ = self.provision_wake.notified(), if !stop.is_cancelled() => more = true,
                // Picks up rows whose lease ran out (a crashed replica's).
                _ = tokio::time::sleep(Duration::from_secs(5)), if !stop.is_cancelled() => more = true,
            }
        }
    }

    async fn renew(&self, names: &[String]) {
        if let Err(e) = self
            .store
            .renew_leases(names, &self.owner, DEFAULT_LEASE)
            .await
        {
            tracing::warn!(error = %e, "renewing provisioning leases failed");
        }
    }

    async fn provision(&self, runner: RunnerRecord) {
        let (name, profile) = (runner.name.clone(), runner.profile.clone());
        if let Err(failure) = self.provision_inner(runner).await {
            match failure {
                Failure::End { code, reason } => {
                    self.metrics.launch_failed(&profile, &code);
                    tracing::warn!(runner = %name, code = %code, reason = %reason, "launch failed");
                    if backoff::backs_off(&code) {
                        self.back_off(&profile, &code, &reason);
                    }
                    let change = RunnerChange::Ended {
                        state: RunnerState::LaunchFailed,
                        code: Some(code),
                        reason,
                    };
                    match self.store.update_runner(&name, &self.owner, change).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(runner = %name, "the row moved on before the failed launch was recorded");
                        }
                        Err(e) => {
                            tracing::warn!(runner = %name, error = %e, "recording a failed launch failed");
                        }
                    }
                }
                Failure::Later => {
                    tracing::info!(runner = %name, "provisioning postponed");
                    let change = RunnerChange::Postpone {
                        retry_in: RETRY_LATER,
                    };
                    if let Err(e) = self.store.update_runner(&name, &self.owner, change).await {
                        tracing::warn!(runner = %name, error = %e, "postponing a runner failed; its lease will run out");
                    }
                    self.provision_wake.notify_one();
                }
                Failure::Lost => {
                    tracing::info!(runner = %name, "the runner's row moved on (ended by a sweep, or taken over after a lapsed lease); leaving it");
                }
            }
        }
    }

    /// Backs the profile off after an invalid request (see [`backoff`]): no
    /// runner is planned for it until the delay passes or the row changes.
    fn back_off(&self, profile: &str, code: &str, reason: &str) {
        let profiles = self.profiles.get();
        let Some(p) = profiles
            .profiles
            .iter()
            .find(|p| p.name.as_str() == profile)
        else {
            return;
        };
        let now = self.clock.now();
        let mut backoffs = lock(&self.backoffs);
        let b = backoffs.failed(p, code, reason, now);
        tracing::warn!(
            profile, code, failures = b.failures, retry_in_secs = (b.until - now).num_seconds(),
            "profile backed off: its launches are refused as invalid requests; fix the instance_profiles row (an edit that changes what is launched retries at once)"
        );
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
        // Re-run demand, an open spot breaker or a job history longer than
        // the profile's spot limit moves the launch to on-demand.
        let choice = survival::choose_runner_market(
            self.store.as_ref(),
            self.controller_id.as_str(),
            &runner,
            &profile,
            self.clock.now(),
        )
        .await
        .map_err(|e| {
            tracing::warn!(runner = %runner.name, error = %e, "choosing the market failed");
            Failure::Later
        })?;
        tracing::info!(runner = %runner.name, market = %choice.market, reason = %choice.reason, "market chosen");
        let candidates = choice.candidates(&profile);
        let mut first_attempt = 0;
        match runner.state {
            RunnerState::Launching => {
                if self.adopt(&runner).await? {
                    return Ok(());
                }
                // The attempt the crash interrupted is resumed with its own
                // token: if its RunInstances never reached EC2 it launches
                // now; if it did, EC2 answers for that token.
                first_attempt = candidates
                    .iter()
                    .position(|(t, s, m)| {
                        runner.instance_type.as_deref() == Some(t.as_str())
                            && runner.subnet_id == *s
                            && runner.market.as_deref() == Some(m.as_str())
                    })
                    .unwrap_or(0);
                tracing::info!(runner = %runner.name, attempt = first_attempt, "resuming an interrupted launch");
                self.forget_registration(&runner).await;
                self.update(&runner.name, RunnerChange::Requeue).await?;
                runner.github_runner_id = None;
            }
            RunnerState::Registered => {
                // The JIT config lived only in the memory of a process that
                // is gone; GitHub will not issue it twice.
                self.forget_registration(&runner).await;
                self.update(&runner.name, RunnerChange::Requeue).await?;
                runner.github_runner_id = None;
            }
            _ => {}
        }
        let blocked = lock(&self.backoffs)
            .blocking(&profile, self.clock.now())
            .map(|b| {
                format!(
                    "profile {} is backed off after {} invalid request(s) ({}: {})",
                    profile.name, b.failures, b.code, b.reason
                )
            });
        if let Some(reason) = blocked {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: backoff::BACKED_OFF_CODE.into(),
                reason,
            });
        }
        if let Err(reason) = backoff::preflight(&profile) {
            self.forget_registration(&runner).await;
            return Err(Failure::End {
                code: backoff::PREFLIGHT_CODE.into(),
                reason,
            });
        }
        let jit = self.register(&runner, &profile).await?;
        runner.github_runner_id = Some(jit.runner_id);
        if let Err(failure) = self.store_jit_config(&runner, &jit).await {
            self.forget_registration(&runner).await;
            return Err(failure);
        }
        self.update(
            &runner.name,
            RunnerChange::Registered {
                github_runner_id: jit.runner_id,
            },
        )
        .await?;
        let result = self
            .launch(&runner, &profile, &candidates, first_attempt)
            .await;
        // A postponed launch may have an instance already (its row stays
        // `launching` and is adopted): its registration and config must stay.
        if matches!(result, Err(Failure::End { .. })) {
            self.forget_registration(&runner).await;
        }
        result
    }

    async fn update(&self, name: &str, change: RunnerChange) -> Result<(), Failure> {
        match self.store.update_runner(name, &self.owner, change).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Lost),
            Err(e) => {
                tracing::warn!(runner = %name, error = %e, "updating a runner failed");
                Err(Failure::Later)
            }
        }
    }

    /// A launch whose outcome is unknown (a crash during `RunInstances`, or
    /// a token EC2 says was used before): adopts a live instance carrying
    /// the runner's tag, if there is one. Returns whether it did.
    async fn adopt(&self, runner: &RunnerRecord) -> Result<bool, Failure> {
        let owned = self
            .backends
            .cloud
            .list_owned(self.controller_id.as_str())
            .await
            .map_err(|e| {
                tracing::warn!(runner = %runner.name, error = %e, "listing instances failed");
                Failure::Later
            })?;
        let Some(instance) = owned
            .into_iter()
            .find(|i| i.runner_name.as_deref() == Some(runner.name.as_str()) && i.state.is_alive())
        else {
            return Ok(false);
        };
        tracing::info!(runner = %runner.name, instance = %instance.id, "adopted the instance of an interrupted launch");
        self.grant_jit_config(&runner.name, &instance).await?;
        self.update(
            &runner.name,
            RunnerChange::Booting {
                instance_id: instance.id,
                instance_type: instance.instance_type,
                subnet_id: instance.subnet_id,
                market: instance.market.as_str().to_owned(),
            },
        )
        .await?;
        Ok(true)
    }

    /// Deletes the runner's GitHub registration, if it has one, and its
    /// JIT config parameter.
    pub(crate) async fn forget_registration(&self, runner: &RunnerRecord) {
        if let Some(id) = runner.github_runner_id {
            if let Err(e) = self.backends.github.delete_runner(&runner.scope, id).await {
                tracing::warn!(runner = %runner.name, error = %e, "deleting the GitHub registration failed; the orphan sweep will retry");
            }
        }
        self.forget_jit_config(&runner.name).await;
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
