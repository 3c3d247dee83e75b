//! The live set of instance profiles. The server reloads it on every change
//! notification from the database (and periodically, in case one was
//! missed), so operators' edits apply without a restart.

use std::sync::{Arc, RwLock};

use spot_runners_domain::store::{Store, StoreError};
use spot_runners_domain::{match_profile, Profile};

use crate::metrics::MetricsSink;

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

    /// Replaces the set with these (already validated) profiles: the
    /// simulator's and the tests' way in, where no table is read.
    pub fn set(&self, profiles: Vec<Profile>) {
        let set = Arc::new(ProfileSet {
            profiles,
            invalid: Vec::new(),
        });
        match self.current.write() {
            Ok(mut g) => *g = set,
            Err(poisoned) => *poisoned.into_inner() = set,
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
        metrics: &dyn MetricsSink,
    ) -> Result<(), StoreError> {
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
        metrics.invalid_profiles(set.invalid.len());
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
        Ok(())
    }
}
