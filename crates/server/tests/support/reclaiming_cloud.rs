//! The real EC2 adapter on moto, plus the one thing moto cannot do: reclaim
//! a spot instance. moto 5 ends every instance as `Client.UserInitiatedShutdown`;
//! EC2 ends a reclaimed spot instance as `Server.SpotInstanceTermination`.
//!
//! [`ReclaimingCloud`] forwards every call to the real [`Ec2Cloud`].
//! [`ReclaimingCloud::reclaim`] really terminates the instance on moto
//! (through the adapter's `TerminateInstances`), and from then on only the
//! state reason of that instance is rewritten in what the adapter returns;
//! its state, type, subnet, AZ, market and tags stay as moto answers them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use spot_runners_aws::Ec2Cloud;
use spot_runners_domain::cost::SpotPrice;
use spot_runners_domain::ports::{Cloud, CloudError, Instance, LaunchRequest};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::survival::SPOT_RECLAIM_REASON;

#[derive(Clone)]
pub struct ReclaimingCloud {
    inner: Arc<Ec2Cloud>,
    reclaimed: Arc<Mutex<BTreeSet<String>>>,
}

impl ReclaimingCloud {
    pub fn new(inner: Ec2Cloud) -> Self {
        Self {
            inner: Arc::new(inner),
            reclaimed: Arc::default(),
        }
    }

    /// EC2 takes the spot instance back: terminated on moto, and reported
    /// with EC2's spot reclaim reason once it is no longer alive.
    pub async fn reclaim(&self, instance_id: &str) -> Result<(), CloudError> {
        // Marked before the call, so no listing sees it ended with moto's reason.
        self.reclaimed
            .lock()
            .unwrap()
            .insert(instance_id.to_owned());
        self.inner.terminate(&[instance_id.to_owned()]).await
    }

    fn as_ec2_reports(&self, mut instance: Instance) -> Instance {
        // EC2 gives a state reason once the instance is shutting down or
        // terminated; a reclaim does not change what a live instance says.
        if !instance.state.is_alive() && self.reclaimed.lock().unwrap().contains(&instance.id) {
            instance.state_reason = Some(SPOT_RECLAIM_REASON.to_owned());
        }
        instance
    }
}

#[async_trait]
impl Cloud for ReclaimingCloud {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        let launched = self.inner.launch(request).await?;
        Ok(self.as_ec2_reports(launched))
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError> {
        self.inner.terminate(instance_ids).await
    }

    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError> {
        let listed = self.inner.list_owned(controller_id).await?;
        Ok(listed.into_iter().map(|i| self.as_ec2_reports(i)).collect())
    }

    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, String)],
    ) -> Result<(), CloudError> {
        self.inner.tag_instance(instance_id, tags).await
    }

    async fn spot_prices(&self, instance_types: &[String]) -> Result<Vec<SpotPrice>, CloudError> {
        self.inner.spot_prices(instance_types).await
    }

    fn launch_limit(&self) -> TokenBucket {
        self.inner.launch_limit()
    }
}
