//! Spot survival: the pure decisions that keep a spot reclaim from losing a
//! job. Which job an interruption killed ([`attribution`]), when a profile
//! stops trusting spot ([`breaker`]), which market new demand gets
//! ([`market`]), and which jobs of a completed run are re-run, and what to
//! do when GitHub refuses ([`reruns`]).

pub mod attribution;
pub mod breaker;
pub mod market;
pub mod reruns;

pub use attribution::{attribute, Interruption, RunnerEnd, SPOT_RECLAIM_REASON};
pub use breaker::{breaker_state, Breaker};
pub use market::{choose_market, p90, MarketChoice, MarketInputs, QueuedJobFacts};
pub use reruns::{judge_failure, plan_reruns, RerunFailure, RerunPlan, RunJob, Verdict};
