//! In-memory stand-ins for EC2 and GitHub behind the production traits
//! ([`Cloud`](spot_runners_domain::ports::Cloud) and
//! [`GitHub`](spot_runners_domain::ports::GitHub)), the simulated world
//! around them, and the fleet simulator.
//!
//! The fakes exist for what emulators such as moto or an HTTP mock cannot
//! do: capacity errors, throttling by the real token buckets, `ClientToken`
//! de-duplication, instances dying underneath the service, and a clock the
//! test controls. Every timestamp comes from tokio's clock, so a test under
//! `#[tokio::test(start_paused = true)]` decides when instances finish
//! booting and when buckets refill.
//!
//! - [`world`]: jobs arriving on GitHub, runners taking them, webhooks
//!   (through [`faults`]) — driven by `serve --simulate` in real time and by
//!   [`simulate`] in virtual time.
//! - [`store`]: the ledger in memory, behind the production `Store` trait.
//! - [`counters`], [`crash`]: the reconciler's metrics as report counters,
//!   and crash points between its IO calls.
//! - [`scenario`], [`report`], [`simulate`]: `spot-runners simulate`.

pub mod api_budget;
pub mod arrivals;
pub mod clock;
pub mod cloud;
pub mod counters;
pub mod crash;
pub mod duration;
pub mod faults;
pub mod github;
pub mod parameters;
pub mod payload;
pub mod report;
pub mod scenario;
pub mod sim_clock;
pub mod simulate;
pub mod store;
pub mod world;

pub use clock::ManualClock;
pub use cloud::FakeCloud;
pub use github::FakeGitHub;
pub use parameters::FakeParameterStore;
pub use store::MemoryStore;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Tokio's clock rather than the system's, so paused tests can move it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A test that panicked while holding the lock should not turn every later
/// assertion into a poison error that hides the first failure.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
