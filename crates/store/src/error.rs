use thiserror::Error;

#[derive(Debug, Error)]
pub enum PgError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database did not answer in time")]
    Timeout,
    #[error("ledger holds an invalid value: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Embedded(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl PgError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| PgError::Io { context, source }
    }
}

impl From<PgError> for spot_runners_domain::store::StoreError {
    fn from(e: PgError) -> Self {
        use spot_runners_domain::store::StoreError;
        match e {
            PgError::Timeout => StoreError::Timeout,
            PgError::Corrupt(m) => StoreError::Corrupt(m),
            other => StoreError::Backend(Box::new(other)),
        }
    }
}
