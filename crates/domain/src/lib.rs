//! The pure core of spot-runners.
//!
//! Everything here is deterministic and free of IO: names and their rules,
//! instance profiles, the workflow-job ledger's vocabulary, label matching,
//! webhook signatures and payloads, the runner lifecycle and the planner.
//! Adapters (Postgres, GitHub, EC2, the simulator) depend on this crate, never
//! the other way round.

pub mod clock;
mod error;
pub mod job;
pub mod matching;
pub mod names;
pub mod planner;
pub mod ports;
pub mod profile;
pub mod ratelimit;
pub mod reaper;
pub mod run;
pub mod runner;
pub mod stale;
pub mod survival;
pub mod userdata;
pub mod webhook;

pub use error::DomainError;
pub use job::{JobStatus, WorkflowJobEvent};
pub use matching::{match_profile, NoMatch};
pub use names::{ControllerId, ProfileName, RunnerName};
pub use profile::{Market, Profile};
pub use runner::RunnerState;
