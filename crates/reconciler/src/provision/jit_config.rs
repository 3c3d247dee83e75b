//! The JIT config's way to its instance (DESIGN.md, "Launching on EC2"):
//! stored in SSM before the launch, granted to the instance once it exists,
//! deleted with its registration, and swept when left behind. User data
//! carries no secret.

use spot_runners_domain::parameters::{
    jit_parameter_is_leftover, jit_parameter_name, jit_parameter_path, runner_of_parameter,
    TAG_INSTANCE_ARN,
};
use spot_runners_domain::ports::{CloudErrorKind, Instance, JitConfig, PARAMETER_ALREADY_EXISTS};
use spot_runners_domain::store::{RunnerRecord, StoreError};

use super::Failure;
use crate::retry::MAX_RETRIES;
use crate::Reconciler;

impl Reconciler {
    /// Deletes the runner's JIT config parameter, if any is left.
    pub(crate) async fn forget_jit_config(&self, runner_name: &str) {
        let name = jit_parameter_name(self.controller_id.as_str(), runner_name);
        if let Err(e) = self.backends.parameters.delete(&name).await {
            tracing::warn!(runner = %runner_name, parameter = %name, error = %e, "deleting the JIT config parameter failed; the sweep will retry");
        }
    }

    /// Puts the JIT config where only the runner's instance will read it.
    /// The name is the runner's, so one left by a crash before this row
    /// moved on holds an older registration's config: it is replaced, never
    /// kept (creation refuses to overwrite, and a fresh parameter has no
    /// grant to any instance).
    pub(super) async fn store_jit_config(
        &self,
        runner: &RunnerRecord,
        jit: &JitConfig,
    ) -> Result<(), Failure> {
        let name = jit_parameter_name(self.controller_id.as_str(), &runner.name);
        let store = &self.backends.parameters;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let e = match store.create_secure(&name, &jit.encoded).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match e.kind {
                _ if e.code == PARAMETER_ALREADY_EXISTS && attempt <= MAX_RETRIES => {
                    tracing::info!(runner = %runner.name, parameter = %name, "replacing a JIT config left by an interrupted launch");
                    if let Err(e) = store.delete(&name).await {
                        tracing::warn!(runner = %runner.name, error = %e, "deleting a stale JIT config failed");
                        return Err(Failure::Later);
                    }
                }
                CloudErrorKind::Throttled | CloudErrorKind::Transient if attempt <= MAX_RETRIES => {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                CloudErrorKind::Invalid => {
                    return Err(Failure::End {
                        code: e.code,
                        reason: format!("storing the JIT config in SSM failed: {}", e.message),
                    })
                }
                _ => {
                    tracing::warn!(runner = %runner.name, code = %e.code, "storing the JIT config failed; retrying later");
                    return Err(Failure::Later);
                }
            }
        }
    }

    /// Grants the runner's JIT config to its instance (the tag the instance
    /// role's policy checks). Until this succeeds the instance cannot read
    /// it; a failure leaves the row `launching`, and adopting the instance
    /// grants it again.
    pub(super) async fn grant_jit_config(
        &self,
        runner_name: &str,
        instance: &Instance,
    ) -> Result<(), Failure> {
        let name = jit_parameter_name(self.controller_id.as_str(), runner_name);
        let Some(arn) = instance.arn.clone() else {
            tracing::warn!(runner = %runner_name, instance = %instance.id, "EC2 did not say the instance's account; cannot grant its JIT config");
            return Err(Failure::Later);
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .backends
                .parameters
                .tag(&name, &[(TAG_INSTANCE_ARN, arn.clone())])
                .await
            {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind,
                        CloudErrorKind::Throttled | CloudErrorKind::Transient
                    ) && attempt <= MAX_RETRIES =>
                {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                // The parameter is gone (deleted by hand, or a crash lost it
                // before it was stored): the instance can never read its
                // config, so waiting for a grant would wait forever. The
                // runner ends; its instance is then an orphan the sweep
                // terminates, and the planner replaces it for its demand.
                Err(e) if matches!(e.code.as_str(), "InvalidResourceId" | "ParameterNotFound") => {
                    tracing::warn!(runner = %runner_name, instance = %instance.id, parameter = %name, "the JIT config parameter is gone; the instance can never register");
                    return Err(Failure::End {
                        code: "JitConfigGone".into(),
                        reason: format!("the JIT config parameter {name} no longer exists"),
                    });
                }
                Err(e) => {
                    tracing::warn!(runner = %runner_name, instance = %instance.id, code = %e.code, error = %e.message, "granting the JIT config to its instance failed; retrying later");
                    return Err(Failure::Later);
                }
            }
        }
    }

    /// Deletes JIT config parameters nobody will read: their runner is
    /// online already (its boot script read the config and should have
    /// deleted it), has ended, or is unknown.
    pub(crate) async fn sweep_jit_parameters(&self) -> Result<usize, StoreError> {
        let controller = self.controller_id.as_str();
        let stored = match self
            .backends
            .parameters
            .list(&jit_parameter_path(controller))
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "listing JIT config parameters failed; their sweep is skipped this time");
                return Ok(0);
            }
        };
        let names: Vec<String> = stored
            .iter()
            .filter_map(|p| runner_of_parameter(controller, &p.name))
            .map(str::to_owned)
            .collect();
        // Read after listing: a row precedes its parameter, so every
        // parameter listed has its row by now.
        let states = self.store.runner_states(controller, &names).await?;
        let mut deleted = 0;
        for p in &stored {
            let runner = runner_of_parameter(controller, &p.name);
            let state = runner.and_then(|r| states.get(r)).copied();
            if !jit_parameter_is_leftover(state) {
                continue;
            }
            match self.backends.parameters.delete(&p.name).await {
                Ok(()) => {
                    tracing::info!(parameter = %p.name, ledger = ?state, "deleted a JIT config left behind");
                    self.metrics.orphans("jit_parameter", 1);
                    deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(parameter = %p.name, error = %e, "deleting a JIT config left behind failed; next sweep retries");
                }
            }
        }
        Ok(deleted)
    }
}
