use thiserror::Error;

/// Everything that can stop the service from starting or running.
#[derive(Debug, Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] spot_runners_store::StoreError),
    #[error(transparent)]
    Database(#[from] spot_runners_store::PgError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("GitHub: {0}")]
    GitHub(#[from] spot_runners_domain::ports::GitHubError),
}
