//! Persistence for spot-runners: the [`Store`] trait the service is written
//! against, its PostgreSQL implementation, and an embedded PostgreSQL for
//! running without a database server of one's own.

pub mod embedded;
mod error;
mod postgres;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

use async_trait::async_trait;
use spot_runners_domain::{profile::ProfileRow, JobStatus, WorkflowJobEvent};
use tokio::time::Instant;

pub use error::StoreError;
pub use postgres::PgStore;

/// A verified, parsed `workflow_job` delivery on its way into the ledger.
#[derive(Clone, Debug)]
pub struct IncomingDelivery {
    pub delivery_id: String,
    pub job: WorkflowJobEvent,
    /// The profile matched at arrival, or why none was.
    pub profile: Result<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Recorded; the ledger may or may not have changed (an older status
    /// than the job's current one changes nothing).
    Accepted,
    /// The delivery GUID was seen before; nothing changed.
    Duplicate,
}

/// Open and recent jobs per profile and status, for the jobs gauge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCount {
    pub profile: Option<String>,
    pub status: JobStatus,
    pub count: i64,
}

/// What the service needs from its database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a batch of deliveries in one transaction (one durable commit
    /// for all of them). Either every delivery is recorded or none is; a
    /// batch that cannot commit before `deadline` is rolled back, so a
    /// delivery answered "unavailable" is never recorded as seen.
    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError>;

    /// Every `instance_profiles` row, valid or not.
    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError>;

    /// Jobs per profile and status: all open jobs, and those completed
    /// within `completed_within`.
    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError>;

    /// Forgets delivery GUIDs older than `retention`; returns how many.
    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError>;

    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
