//! The runner lifecycle.

use std::fmt;

use crate::DomainError;

/// A runner row's state. See DESIGN.md, "Runner lifecycle".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunnerState {
    /// Row written; nothing exists outside yet.
    Requested,
    /// JIT config obtained from GitHub.
    Registered,
    /// `RunInstances` sent.
    Launching,
    /// The instance exists; its runner is not online yet.
    Booting,
    /// Online with no job.
    Idle,
    /// An `in_progress` delivery named it.
    Busy,
    /// Its job completed.
    Done,
    /// `TerminateInstances` sent.
    Terminating,
    Terminated,
    LaunchFailed,
    BootTimeout,
    IdleTimeout,
    /// Spot reclaim.
    Interrupted,
    Orphaned,
}

impl RunnerState {
    pub const ALL: [RunnerState; 14] = [
        RunnerState::Requested,
        RunnerState::Registered,
        RunnerState::Launching,
        RunnerState::Booting,
        RunnerState::Idle,
        RunnerState::Busy,
        RunnerState::Done,
        RunnerState::Terminating,
        RunnerState::Terminated,
        RunnerState::LaunchFailed,
        RunnerState::BootTimeout,
        RunnerState::IdleTimeout,
        RunnerState::Interrupted,
        RunnerState::Orphaned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunnerState::Requested => "requested",
            RunnerState::Registered => "registered",
            RunnerState::Launching => "launching",
            RunnerState::Booting => "booting",
            RunnerState::Idle => "idle",
            RunnerState::Busy => "busy",
            RunnerState::Done => "done",
            RunnerState::Terminating => "terminating",
            RunnerState::Terminated => "terminated",
            RunnerState::LaunchFailed => "launch_failed",
            RunnerState::BootTimeout => "boot_timeout",
            RunnerState::IdleTimeout => "idle_timeout",
            RunnerState::Interrupted => "interrupted",
            RunnerState::Orphaned => "orphaned",
        }
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| DomainError::UnknownRunnerState(s.to_owned()))
    }

    /// On the way to taking a job, or ready for one: counts against queued
    /// demand.
    pub fn is_available(self) -> bool {
        matches!(
            self,
            RunnerState::Requested
                | RunnerState::Registered
                | RunnerState::Launching
                | RunnerState::Booting
                | RunnerState::Idle
        )
    }

    /// May have an instance that costs money: counts against caps.
    pub fn is_live(self) -> bool {
        self.is_available()
            || matches!(
                self,
                RunnerState::Busy | RunnerState::Done | RunnerState::Terminating
            )
    }

    /// Nothing more will happen to it.
    pub fn is_final(self) -> bool {
        !self.is_live()
    }
}

impl fmt::Display for RunnerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in RunnerState::ALL {
            assert_eq!(RunnerState::parse(s.as_str()), Ok(s));
        }
        assert!(RunnerState::parse("running").is_err());
    }

    #[test]
    fn available_is_live_and_final_is_not() {
        for s in RunnerState::ALL {
            if s.is_available() {
                assert!(s.is_live());
            }
            assert_ne!(s.is_live(), s.is_final());
        }
        assert!(!RunnerState::Busy.is_available());
        assert!(RunnerState::Terminated.is_final());
    }
}
