//! The live set of instance profiles. Reloaded on every change notification
//! from the database (and periodically, in case a notification was missed),
//! so operators' edits apply without a restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use spot_runners_domain::{match_profile, Profile};
use spot_runners_store::{PgStore, Store};

use crate::metrics::Metrics;
use tokio_util::sync::CancellationToken;

/// Valid profiles, plus the names and faults of rows that were skipped.
#[derive(Debug, Default)]
pub struct ProfileSet {
    pub profiles: Vec<Profile>,
    pub invalid: Vec<(String, String)>,
}

#[derive(Clone, Default)]
pub struct ProfileCache {
    current: Arc<RwLock<Arc<ProfileSet>>>,
}

impl ProfileCache {
    pub fn get(&self) -> Arc<ProfileSet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The profile for a job, or why there is none.
    pub fn match_job(&self, labels: &[String], repository: &str) -> Result<String, String> {
        let set = self.get();
        match_profile(&set.profiles, labels, repository)
            .map(|p| p.name.to_string())
            .map_err(|e| e.to_string())
    }

    /// Reads every row; invalid ones are logged and counted, never fatal.
    pub async fn reload(
        &self,
        store: &dyn Store,
        metrics: &Metrics,
    ) -> Result<(), spot_runners_store::StoreError> {
        let rows = store.profile_rows().await?;
        let mut set = ProfileSet::default();
        for row in rows {
            let name = row.name.clone();
            match Profile::try_from(row) {
                Ok(p) => set.profiles.push(p),
                Err(e) => set.invalid.push((name, e.to_string())),
            }
        }
        let previous = self.get();
        if previous.invalid != set.invalid {
            for (name, fault) in &set.invalid {
                tracing::warn!(profile = %name, error = %fault, "instance profile is invalid and skipped");
            }
        }
        if previous.profiles.len() != set.profiles.len() || previous.invalid != set.invalid {
            tracing::info!(
                valid = set.profiles.len(),
                invalid = set.invalid.len(),
                "instance profiles loaded"
            );
        }
        metrics
            .invalid_profiles
            .set(i64::try_from(set.invalid.len()).unwrap_or(i64::MAX));
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
        Ok(())
    }

    /// Keeps the cache fresh until `stop` fires: reloads on every
    /// `instance_profiles` notification and at least every `fallback`.
    pub async fn watch(
        self,
        store: PgStore,
        metrics: Arc<Metrics>,
        fallback: Duration,
        stop: CancellationToken,
    ) {
        loop {
            let mut listener = match store.profile_listener().await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for profile changes; polling instead");
                    None
                }
            };
            // Reload after (re)subscribing, so nothing between is missed.
            if let Err(e) = self.reload(&store, &metrics).await {
                tracing::warn!(error = %e, "reloading instance profiles failed");
            }
            loop {
                let notified = async {
                    match listener.as_mut() {
                        Some(l) => l.recv().await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = notified => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "profile listener lost; reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    }
                    _ = tokio::time::sleep(fallback) => {}
                }
                if let Err(e) = self.reload(&store, &metrics).await {
                    tracing::warn!(error = %e, "reloading instance profiles failed");
                }
                if listener.is_none() {
                    break;
                }
            }
        }
    }
}
