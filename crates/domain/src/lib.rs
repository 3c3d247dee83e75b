//! The pure core of spot-runners.
//!
//! Everything here is deterministic and free of IO: names and their rules,
//! instance profiles, the workflow-job ledger's vocabulary, label matching,
//! webhook signatures and payloads, the runner lifecycle and the planner.
//! Adapters (Postgres, GitHub, EC2, the simulator) depend on this crate, never
//! the other way round.

pub mod api_budget;
pub mod backoff;
pub mod clock;
pub mod cost;
pub mod cost_tags;
mod error;
pub mod job;
pub mod matching;
pub mod names;
pub mod parameters;
pub mod planner;
pub mod ports;
pub mod profile;
pub mod ratelimit;
pub mod reaper;
pub mod redelivery;
pub mod run;
pub mod runner;
pub mod scopes;
pub mod stale;
pub mod store;
pub mod survival;
pub mod sweeps;
pub mod userdata;
pub mod webhook;

pub use error::DomainError;
pub use job::{JobStatus, WorkflowJobEvent};
pub use matching::{match_profile, NoMatch};
pub use names::{ControllerId, ProfileName, RunnerName};
pub use profile::{ImageFilter, ImageSource, Market, Profile};
pub use runner::RunnerState;
