use thiserror::Error;

/// Everything the pure core can reject.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("invalid controller id {0:?}: use [a-z0-9][a-z0-9-]*, at most {max} characters", max = crate::names::CONTROLLER_ID_MAX)]
    InvalidControllerId(String),
    #[error("invalid profile name {0:?}: use [a-z0-9][a-z0-9-]*, at most 32 characters")]
    InvalidProfileName(String),
    #[error("invalid runner name {0:?}")]
    InvalidRunnerName(String),
    #[error("unknown job status {0:?}")]
    UnknownJobStatus(String),
    #[error("unknown runner state {0:?}")]
    UnknownRunnerState(String),
    #[error("unknown market {0:?}: use spot or on-demand")]
    UnknownMarket(String),
    #[error("profile {profile}: {reason}")]
    InvalidProfile { profile: String, reason: String },
    #[error("malformed webhook payload: {0}")]
    MalformedPayload(String),
    #[error("user data: {0}")]
    UserData(String),
    #[error("{0}")]
    InvalidReportOption(String),
}
