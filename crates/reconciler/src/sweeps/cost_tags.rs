//! Cost allocation tags: once an `in_progress` names a runner, its
//! instance is tagged with the job's repository and workflow, so Cost
//! Explorer can split spend by them.

use spot_runners_domain::cost_tags::cost_tags;
use spot_runners_domain::store::{RunnerRecord, StoreError};
use spot_runners_domain::RunnerState;

use crate::retry::lock;
use crate::Reconciler;

impl Reconciler {
    /// Tags the instance of each busy runner with its job's repository and
    /// workflow, once (per process: a restart tags again, which changes
    /// nothing), so Cost Explorer can split spend by them.
    pub(crate) async fn tag_costs(&self, runners: &[RunnerRecord]) -> Result<usize, StoreError> {
        let busy: Vec<&RunnerRecord> = runners
            .iter()
            .filter(|r| {
                r.state == RunnerState::Busy && r.instance_id.is_some() && r.job_id.is_some()
            })
            .collect();
        let todo: Vec<&RunnerRecord> = {
            let mut tagged = lock(&self.cost_tagged);
            let busy_names: std::collections::HashSet<&str> =
                busy.iter().map(|r| r.name.as_str()).collect();
            tagged.retain(|name| busy_names.contains(name.as_str()));
            busy.into_iter()
                .filter(|r| !tagged.contains(&r.name))
                .collect()
        };
        let mut done = 0;
        for r in todo {
            let (Some(instance_id), Some(job_id)) = (&r.instance_id, r.job_id) else {
                continue;
            };
            let Some(job) = self.store.job(job_id).await? else {
                continue;
            };
            let tags = cost_tags(&job.repository, job.workflow_name.as_deref());
            match self.backends.cloud.tag_instance(instance_id, &tags).await {
                Ok(()) => {
                    tracing::info!(runner = %r.name, instance = %instance_id, repository = %job.repository, workflow = ?job.workflow_name, "cost tags set");
                    lock(&self.cost_tagged).insert(r.name.clone());
                    done += 1;
                }
                Err(e) => {
                    tracing::warn!(runner = %r.name, instance = %instance_id, error = %e, "setting cost tags failed; next sweep retries");
                }
            }
        }
        Ok(done)
    }
}
