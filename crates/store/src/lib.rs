//! Persistence for spot-runners on PostgreSQL: [`PgStore`] implements the
//! domain's [`Store`] port, and an embedded PostgreSQL serves those who run
//! without a database server of their own.

mod cost;
pub mod embedded;
mod error;
mod open_ledger;
mod pg_store;
mod postgres;
mod runners;
mod survival;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::PgError;
pub use postgres::{PgStore, WAKE_CHANNEL};
// The port and its records, re-exported so callers of this crate need not
// name the domain's module.
pub use spot_runners_domain::store::{
    DeliveryOutcome, IncomingDelivery, JobCheck, JobCount, JobRecord, JobSurvival, MarketFn,
    MarketQuery, MarketSnapshot, PlanFn, PlanSnapshot, PriceRow, Pruned, RecentRepository,
    RerunOutcome, RunAwaitingRerun, RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
    DEFAULT_LEASE, PRICE_SOURCE_EC2, PRICE_SOURCE_OPERATOR,
};
