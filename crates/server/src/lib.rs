//! The spot-runners service: configuration, telemetry, the HTTP surface, the
//! ledger writer and the background loops, wired together by [`startup`].

pub mod configuration;
pub mod cost_report;
pub mod database;
mod error;
pub mod http;
pub mod ingest;
pub mod inspect;
pub mod metrics;
pub mod profiles;
mod reconciler_metrics;
pub mod reruns;
pub mod simulation;
pub mod spend;
pub mod startup;
pub mod telemetry;

pub use error::Error;
/// The redelivery scan is the reconciler crate's, so `simulate` and the API
/// budget benchmark run the same code as `serve`.
pub use spot_runners_reconciler::redelivery;
