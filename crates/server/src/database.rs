//! Opens the database: `DATABASE_URL`, or the embedded PostgreSQL.

use secrecy::ExposeSecret;
use spot_runners_store::embedded::{EmbeddedOptions, EmbeddedPostgres};
use spot_runners_store::PgStore;

use crate::configuration::Settings;
use crate::Error;

/// An open, migrated database and, when embedded, the cluster to stop.
pub struct Database {
    pub store: PgStore,
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    pub async fn open(settings: &Settings) -> Result<Self, Error> {
        let (url, embedded) = match &settings.database_url {
            Some(url) => (url.expose_secret().to_owned(), None),
            None => {
                tracing::info!(
                    data_dir = %settings.data_dir.display(),
                    "DATABASE_URL is unset: starting the embedded PostgreSQL"
                );
                let pg = EmbeddedPostgres::start(&settings.data_dir, &EmbeddedOptions::default())
                    .await?;
                (pg.url(), Some(pg))
            }
        };
        let store = match PgStore::connect(&url).await {
            Ok(store) => store,
            Err(e) => {
                if let Some(pg) = embedded {
                    let _ = pg.stop().await;
                }
                return Err(e.into());
            }
        };
        store.migrate().await?;
        tracing::info!("database migrations applied");
        Ok(Self { store, embedded })
    }

    /// Closes the pools and stops the embedded cluster, if any.
    pub async fn close(self) {
        self.store.close().await;
        if let Some(pg) = self.embedded {
            if let Err(e) = pg.stop().await {
                tracing::warn!(error = %e, "could not stop the embedded PostgreSQL");
            }
        }
    }
}
