//! `RunInstances` along the profile's candidates: instance types, then
//! subnets, then on-demand if the profile allows it.

use spot_runners_domain::names::client_token;
use spot_runners_domain::ports::{CloudError, CloudErrorKind, LaunchRequest};
use spot_runners_domain::store::{RunnerChange, RunnerRecord};
use spot_runners_domain::userdata::{render, UserDataValues};
use spot_runners_domain::{Market, Profile};

use super::Failure;
use crate::retry::{lock, MAX_RETRIES, MAX_THROTTLED_RETRIES};
use crate::Reconciler;

impl Reconciler {
    /// The instance type × subnet × market walk, from `first_attempt` on;
    /// each attempt sends its own `ClientToken`.
    pub(super) async fn launch(
        &self,
        runner: &RunnerRecord,
        profile: &Profile,
        candidates: &[(String, Option<String>, Market)],
        first_attempt: usize,
    ) -> Result<(), Failure> {
        let user_data = render(&UserDataValues {
            controller_id: self.controller_id.as_str(),
            runner_name: &runner.name,
            profile,
        })
        .map_err(|e| Failure::End {
            code: "UserData".into(),
            reason: e.to_string(),
        })?;
        let mut last: Option<CloudError> = None;
        for (attempt, (instance_type, subnet_id, market)) in
            candidates.iter().cloned().enumerate().skip(first_attempt)
        {
            let request = LaunchRequest {
                runner_name: runner.name.clone(),
                client_token: client_token(
                    &runner.name,
                    u32::try_from(attempt).unwrap_or(u32::MAX),
                ),
                controller_id: self.controller_id.to_string(),
                profile: profile.name.to_string(),
                instance_type: instance_type.clone(),
                subnet_id: subnet_id.clone(),
                image: profile.image.clone(),
                threads_per_core: profile.threads_per_core,
                security_group_ids: profile.security_group_ids.clone(),
                iam_instance_profile: profile.iam_instance_profile.clone(),
                market,
                root_volume_gb: profile.root_volume_gb,
                user_data: user_data.clone(),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                Self::pace(&self.launch_bucket).await;
                self.update(
                    &runner.name,
                    RunnerChange::Launching {
                        instance_type: instance_type.clone(),
                        subnet_id: subnet_id.clone(),
                        market: market.as_str().to_owned(),
                    },
                )
                .await?;
                if let Some(since) = runner.demand_since {
                    let secs = (self.clock.now() - since).num_milliseconds().max(0) as f64 / 1000.0;
                    self.metrics.launch_latency(profile.name.as_str(), secs);
                }
                match self.backends.cloud.launch(&request).await {
                    Ok(instance) => {
                        self.metrics
                            .launch_attempt(profile.name.as_str(), market, Ok(()));
                        tracing::info!(
                            runner = %runner.name, instance = %instance.id, instance_type = %instance_type,
                            market = %market, "instance launched"
                        );
                        lock(&self.backoffs).launched(profile.name.as_str());
                        self.grant_jit_config(&runner.name, &instance).await?;
                        return self
                            .update(
                                &runner.name,
                                RunnerChange::Booting {
                                    instance_id: instance.id,
                                    instance_type,
                                    subnet_id,
                                    market: market.as_str().to_owned(),
                                },
                            )
                            .await;
                    }
                    Err(e) => {
                        self.metrics
                            .launch_attempt(profile.name.as_str(), market, Err(&e));
                        let _ = self
                            .store
                            .update_runner(
                                &runner.name,
                                &self.owner,
                                RunnerChange::AttemptFailed {
                                    code: e.code.clone(),
                                    message: e.message.clone(),
                                },
                            )
                            .await;
                        tracing::info!(runner = %runner.name, instance_type = %instance_type, market = %market, code = %e.code, "launch attempt failed");
                        let kind = e.kind;
                        last = Some(e);
                        match kind {
                            CloudErrorKind::Capacity => break,
                            // Used before by an attempt whose outcome we
                            // never learned: its instance, if any, is ours.
                            CloudErrorKind::TokenSpent => {
                                if self.adopt(runner).await? {
                                    return Ok(());
                                }
                                break;
                            }
                            CloudErrorKind::Throttled if attempt <= MAX_THROTTLED_RETRIES => {
                                tokio::time::sleep(self.backoff(attempt)).await;
                            }
                            CloudErrorKind::Transient if attempt <= MAX_RETRIES => {
                                tokio::time::sleep(self.backoff(attempt)).await;
                            }
                            CloudErrorKind::Throttled | CloudErrorKind::Transient => break,
                            CloudErrorKind::Invalid | CloudErrorKind::AccountSetup => {
                                let e =
                                    last.unwrap_or_else(|| CloudError::from_code("Unknown", ""));
                                return Err(Failure::End {
                                    code: e.code,
                                    reason: e.message,
                                });
                            }
                        }
                    }
                }
            }
        }
        let e = last.unwrap_or_else(|| {
            CloudError::from_code("NoCandidates", "the profile names nothing to launch")
        });
        Err(Failure::End {
            code: e.code,
            reason: format!(
                "every instance type, subnet and market was tried: {}",
                e.message
            ),
        })
    }
}
