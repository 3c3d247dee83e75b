//! A reconciler on the fake cloud and fake GitHub, against a real
//! PostgreSQL, with a clock the test moves.

use std::sync::Arc;
use std::time::Duration;

use spot_runners::metrics::Metrics;
use spot_runners_domain::ports::LaunchRequest;
use spot_runners_domain::{ControllerId, ImageSource, Market};
use spot_runners_reconciler::ProfileCache;
use spot_runners_reconciler::{Backends, Reconciler};
use spot_runners_sim::cloud::CloudCall;
use spot_runners_sim::{FakeCloud, FakeGitHub, FakeParameterStore, ManualClock};
use spot_runners_store::testing::{test_database, TestDatabase};
use spot_runners_store::PgStore;

pub struct Harness {
    pub _db: TestDatabase,
    pub store: Arc<PgStore>,
    pub cloud: FakeCloud,
    pub github: FakeGitHub,
    pub parameters: FakeParameterStore,
    pub profiles: ProfileCache,
    pub metrics: Arc<Metrics>,
    pub clock: ManualClock,
}

impl Harness {
    pub async fn new() -> Self {
        let db = test_database().await.unwrap();
        // Up to 32 provisioning tasks write at once.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(64)
            .acquire_timeout(Duration::from_secs(24 * 3600))
            .connect(&db.url)
            .await
            .unwrap();
        Self {
            store: Arc::new(PgStore::from_pool(pool)),
            _db: db,
            cloud: FakeCloud::with_seed(1),
            github: FakeGitHub::with_seed(1),
            parameters: FakeParameterStore::new(),
            profiles: ProfileCache::default(),
            metrics: Arc::new(Metrics::new().unwrap()),
            clock: ManualClock::new(),
        }
    }

    pub fn reconciler(&self, max_instances: u32) -> Arc<Reconciler> {
        self.reconciler_on(self.store.clone(), max_instances)
    }

    /// A reconciler on its own store: another replica, or the same one
    /// after a restart.
    pub fn reconciler_on(&self, store: Arc<PgStore>, max_instances: u32) -> Arc<Reconciler> {
        Arc::new(
            Reconciler::new(
                store,
                Backends {
                    cloud: Arc::new(self.cloud.clone()),
                    github: Arc::new(self.github.clone()),
                    parameters: Arc::new(self.parameters.clone()),
                },
                self.profiles.clone(),
                Arc::clone(&self.metrics) as _,
                ControllerId::default(),
                max_instances,
            )
            .with_clock(Arc::new(self.clock.clone())),
        )
    }

    /// A reconciler on the harness's store, adjusted by `f` (scopes, …).
    pub fn reconciler_with(
        &self,
        max_instances: u32,
        f: impl FnOnce(Reconciler) -> Reconciler,
    ) -> Arc<Reconciler> {
        Arc::new(f(Reconciler::new(
            self.store.clone(),
            Backends {
                cloud: Arc::new(self.cloud.clone()),
                github: Arc::new(self.github.clone()),
                parameters: Arc::new(self.parameters.clone()),
            },
            self.profiles.clone(),
            Arc::clone(&self.metrics) as _,
            ControllerId::default(),
            max_instances,
        )
        .with_clock(Arc::new(self.clock.clone()))))
    }

    pub async fn profile(&self, name: &str, sql_set: &str) {
        sqlx::query(
            "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids)
             VALUES ($1, '{linux,x64,kani}', '{c6i.4xlarge,c6a.4xlarge}', 'ami-1', '{subnet-a,subnet-b}')",
        )
        .bind(name)
        .execute(self.store.pool())
        .await
        .unwrap();
        sqlx::query(&format!(
            "UPDATE instance_profiles SET {sql_set} WHERE name = $1"
        ))
        .bind(name)
        .execute(self.store.pool())
        .await
        .unwrap_or_else(|e| panic!("profile {name}: {e}"));
        self.profiles
            .reload(self.store.as_ref(), self.metrics.as_ref())
            .await
            .unwrap();
    }

    pub async fn queue(&self, profile: &str, ids: std::ops::Range<i64>) {
        sqlx::query(
            "INSERT INTO workflow_jobs (id, run_id, repository, owner, org, labels, status, profile, queued_at)
             SELECT i, i, 'acme/proofs', 'acme', 'acme', '{self-hosted,linux,x64,kani}', 'queued', $1, now()
             FROM generate_series($2::bigint, $3::bigint - 1) AS i",
        )
        .bind(profile)
        .bind(ids.start)
        .bind(ids.end)
        .execute(self.store.pool())
        .await
        .unwrap();
    }

    /// A sweep and a pass, then provisioning until nothing is left to claim.
    pub async fn reconcile(&self, r: &Arc<Reconciler>) {
        r.sweep().await.unwrap();
        r.pass().await.unwrap();
        while r.provision_batch().await.unwrap() > 0 {}
    }

    pub async fn states(&self) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT state, count(*) FROM runners GROUP BY state ORDER BY state")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
    }

    pub async fn sql(&self, q: &str) {
        sqlx::query(q).execute(self.store.pool()).await.unwrap();
    }
}

/// Every `TerminateInstances` EC2 accepted, in order.
pub fn terminations(cloud: &FakeCloud) -> Vec<Vec<String>> {
    cloud
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CloudCall::Terminate { ids, .. } => Some(ids),
            CloudCall::Launch { .. } | CloudCall::Tag { .. } => None,
        })
        .collect()
}

/// A first-attempt `RunInstances` of profile `kani` for `runner`, as the
/// reconciler would send it: for tests that put an instance in EC2 behind
/// the ledger's back (a crash mid-launch, an orphan).
pub fn launch_request(controller: &str, runner: &str) -> LaunchRequest {
    LaunchRequest {
        runner_name: runner.to_owned(),
        client_token: runner.to_owned(),
        controller_id: controller.to_owned(),
        profile: "kani".to_owned(),
        instance_type: "c6i.4xlarge".to_owned(),
        subnet_id: None,
        image: ImageSource::Id("ami-1".into()),
        threads_per_core: None,
        security_group_ids: vec![],
        iam_instance_profile: None,
        market: Market::Spot,
        root_volume_gb: 64,
        user_data: "#!/bin/sh\n".to_owned(),
    }
}
