//! Builds the service from settings and runs it until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spot_runners_domain::clock::{Clock, SystemClock};
use spot_runners_domain::redelivery::Healing;
use spot_runners_domain::scopes::KnownScopes;
use spot_runners_store::Store;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::configuration::{GitHubAuth, Settings};
use crate::database::Database;
use crate::http::{metrics_router, public_router, serve, AppState, BodyBudget};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::profiles::{self, ProfileCache};
use crate::redelivery::Redeliverer;
use crate::reruns::RerunWorker;
use crate::spend::{SpendGate, SpendWorker};
use crate::Error;
use spot_runners_reconciler::{Backends, Reconciler};

/// Completed jobs stay in the jobs gauge this long.
const COMPLETED_GAUGE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How often delivery GUIDs past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct Application {
    listener: TcpListener,
    /// `SPOT_RUNNERS_METRICS_LISTEN`, bound: /metrics moves off `listener`.
    metrics_listener: Option<(TcpListener, SocketAddr)>,
    addr: SocketAddr,
    state: AppState,
    database: Database,
    writer: JoinHandle<()>,
    settings: Settings,
    /// Fired once the HTTP server has drained: stops the writer and loops.
    stop: CancellationToken,
    reconciler: Option<Arc<Reconciler>>,
    /// Asks GitHub to resend failed deliveries (leader only).
    redeliverer: Option<Arc<Redeliverer>>,
    reruns: Option<Arc<RerunWorker>>,
    spend: Arc<SpendWorker>,
}

impl Application {
    /// Builds the service with the real GitHub and EC2 adapters, or none
    /// (ledger only) when their credentials are missing.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        let metrics = Arc::new(Metrics::new()?);
        let backends = real_backends(&settings, &metrics).await?;
        Self::build_with(settings, metrics, backends).await
    }

    /// Opens (and migrates) the database, loads the profiles and binds the
    /// listener. Nothing is served until [`Application::run_until_stopped`].
    pub async fn build_with(
        settings: Settings,
        metrics: Arc<Metrics>,
        backends: Option<Backends>,
    ) -> Result<Self, Error> {
        Self::build_with_clock(settings, metrics, backends, Arc::new(SystemClock)).await
    }

    /// [`Application::build_with`] with the reconciler reading time from
    /// `clock` (tests move it to make runners and jobs old).
    pub async fn build_with_clock(
        settings: Settings,
        metrics: Arc<Metrics>,
        backends: Option<Backends>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let mut database = Database::open(&settings).await?;
        // One clock: the ledger binds the times the reconciler reads.
        database.store = database.store.clone().with_clock(Arc::clone(&clock));
        let store: Arc<dyn Store> = Arc::new(database.store.clone());
        let profiles = ProfileCache::default();
        profiles.reload(store.as_ref(), metrics.as_ref()).await?;
        if let Err(e) = check_warm_pool_scopes(&settings, &profiles) {
            database.close().await;
            return Err(e);
        }
        let scopes = KnownScopes::new(settings.github_orgs.iter().cloned());
        let stop = CancellationToken::new();
        let (ingest, writer) = Ingest::start(Arc::clone(&store), stop.clone());
        let listener = match TcpListener::bind(settings.listen).await {
            Ok(l) => l,
            Err(e) => {
                stop.cancel();
                database.close().await;
                return Err(Error::Io {
                    context: format!("binding {}", settings.listen),
                    source: e,
                });
            }
        };
        let addr = listener.local_addr().map_err(|e| Error::Io {
            context: "reading the bound address".into(),
            source: e,
        })?;
        let Some(secrets) = settings.webhook_secrets.clone() else {
            // Never "no secret, so no verification".
            stop.cancel();
            database.close().await;
            return Err(Error::Config(
                "SPOT_RUNNERS_WEBHOOK_SECRET is required: every delivery is verified".into(),
            ));
        };
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(at) => match bind(at).await {
                Ok(bound) => Some(bound),
                Err(e) => {
                    stop.cancel();
                    database.close().await;
                    return Err(e);
                }
            },
        };
        let state = AppState {
            store,
            ingest,
            profiles,
            metrics,
            secrets,
            body_budget: BodyBudget::new(settings.intake.body_budget_bytes),
            body_read_timeout: settings.intake.body_read_timeout,
            wake: Arc::new(Notify::new()),
            scopes: scopes.clone(),
            spend_gate: SpendGate::new(settings.max_daily_spend),
        };
        let spend = Arc::new(SpendWorker::new(
            Arc::clone(&state.store),
            backends.as_ref().map(|b| Arc::clone(&b.cloud)),
            state.profiles.clone(),
            Arc::clone(&state.metrics),
            settings.controller_id.to_string(),
            Arc::clone(&clock),
            state.spend_gate.clone(),
        ));
        // The scan records each read of the delivery log here; the
        // reconciler's lost-`queued` poll reads it.
        let healing = Arc::new(Healing::default());
        let redeliverer = match (&backends, &settings.redeliver_from) {
            (Some(b), Some(source)) => Some(Arc::new(Redeliverer::new(
                Arc::clone(&state.store),
                Arc::clone(&b.github),
                source.clone(),
                Arc::clone(&clock),
                Arc::clone(&state.metrics) as Arc<dyn spot_runners_reconciler::MetricsSink>,
                settings.controller_id.as_str().to_owned(),
                Arc::clone(&healing),
            ))),
            _ => None,
        };
        let reruns = backends.as_ref().map(|b| {
            Arc::new(RerunWorker::new(
                Arc::clone(&state.store),
                Arc::clone(&b.github),
                state.profiles.clone(),
                Arc::clone(&state.metrics) as Arc<dyn spot_runners_reconciler::MetricsSink>,
                settings.controller_id.to_string(),
                Arc::clone(&clock),
            ))
        });
        let reconciler = backends.map(|b| {
            Arc::new(
                Reconciler::new(
                    Arc::clone(&state.store),
                    b,
                    state.profiles.clone(),
                    Arc::clone(&state.metrics) as Arc<dyn spot_runners_reconciler::MetricsSink>,
                    settings.controller_id.clone(),
                    settings.max_instances,
                )
                .with_clock(clock)
                .with_spend_gate(state.spend_gate.clone())
                .with_scopes(scopes)
                .with_healing(healing)
                .with_retention(settings.retention),
            )
        });
        Ok(Self {
            reconciler,
            redeliverer,
            reruns,
            spend,
            listener,
            metrics_listener,
            addr,
            state,
            database,
            writer,
            settings,
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where /metrics is served when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The database the service runs on (`serve --simulate` seeds example
    /// profiles through it).
    pub fn store(&self) -> &spot_runners_store::PgStore {
        &self.database.store
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn reconciler(&self) -> Option<Arc<Reconciler>> {
        self.reconciler.clone()
    }

    /// The re-run worker (tests drive its passes directly).
    pub fn reruns(&self) -> Option<Arc<RerunWorker>> {
        self.reruns.clone()
    }

    /// The spend worker (tests drive its passes directly).
    pub fn spend(&self) -> Arc<SpendWorker> {
        Arc::clone(&self.spend)
    }

    /// Serves until `shutdown` resolves, then drains: in-flight requests
    /// finish, every accepted delivery is committed, background loops stop,
    /// and an embedded database is shut down.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Self {
            listener,
            metrics_listener,
            addr,
            state,
            database,
            writer,
            settings,
            stop,
            reconciler,
            redeliverer,
            reruns,
            spend,
        } = self;
        let mut background = vec![
            tokio::spawn(profiles::watch(
                state.profiles.clone(),
                database.store.clone(),
                Arc::clone(&state.metrics),
                settings.reconcile_interval,
                stop.clone(),
            )),
            tokio::spawn(maintenance(
                state.clone(),
                settings.clone(),
                reconciler.is_none(),
                stop.clone(),
            )),
            tokio::spawn(relay_wakeups(
                database.store.clone(),
                Arc::clone(&state.wake),
                stop.clone(),
            )),
        ];
        background.push(tokio::spawn(
            spend.run(settings.reconcile_interval, stop.clone()),
        ));
        if let Some(w) = &reruns {
            background.push(tokio::spawn(
                Arc::clone(w).run(settings.reconcile_interval, stop.clone()),
            ));
        }
        match &reconciler {
            Some(r) => background.push(tokio::spawn(Arc::clone(r).run(
                Arc::clone(&state.wake),
                settings.reconcile_interval,
                stop.clone(),
            ))),
            None => tracing::warn!(
                "no GitHub credentials or AWS region: recording jobs only, launching nothing"
            ),
        }
        let app = public_router(state.clone(), metrics_listener.is_none());
        if let Some((metrics_listener, metrics_addr)) = metrics_listener {
            tracing::info!("metrics listening on {metrics_addr}");
            let routes = metrics_router(state.clone());
            let stopped = stop.clone();
            background.push(tokio::spawn(async move {
                let served = axum::serve(metrics_listener, routes)
                    .with_graceful_shutdown(async move { stopped.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "serving metrics failed");
                }
            }));
        }
        if let Some(r) = redeliverer {
            background.push(tokio::spawn(r.run(crate::redelivery::EVERY, stop.clone())));
        }
        tracing::info!("listening on {addr}");
        serve(listener, app, &settings.intake, shutdown).await;
        tracing::info!("shutting down");
        stop.cancel();
        for task in background {
            let _ = task.await;
        }
        // No request is in flight any more; the writer commits what is
        // queued and exits.
        let _ = writer.await;
        database.close().await;
        Ok(())
    }
}

async fn bind(at: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let io = |context: String| move |source| Error::Io { context, source };
    let listener = TcpListener::bind(at)
        .await
        .map_err(io(format!("binding {at}")))?;
    let addr = listener
        .local_addr()
        .map_err(io("reading the bound address".into()))?;
    Ok((listener, addr))
}

/// With token auth there is no App to list installations of: a profile
/// that keeps a warm pool needs `SPOT_RUNNERS_GITHUB_ORGS` to know where to
/// register its runners before the first job.
fn check_warm_pool_scopes(settings: &Settings, profiles: &ProfileCache) -> Result<(), Error> {
    if !matches!(settings.github_auth, GitHubAuth::Token(_)) || !settings.github_orgs.is_empty() {
        return Ok(());
    }
    let warm: Vec<String> = profiles
        .get()
        .profiles
        .iter()
        .filter(|p| p.enabled && p.min_idle > 0)
        .map(|p| p.name.to_string())
        .collect();
    if warm.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "profile(s) {} keep a warm pool (min_idle > 0), but with SPOT_RUNNERS_GITHUB_TOKEN the service \
         cannot list where it is installed: set SPOT_RUNNERS_GITHUB_ORGS to the org(s) (or owner/repo \
         scopes) to keep them in, e.g. SPOT_RUNNERS_GITHUB_ORGS=acme",
        warm.join(", ")
    )))
}

/// Periodic upkeep: the jobs gauge and delivery-GUID retention.
/// Without a reconciler (ledger only) it also keeps the oldest-queued gauge,
/// which the reconciler keeps otherwise: jobs that nothing launches for
/// must still raise the alert.
async fn maintenance(
    state: AppState,
    settings: Settings,
    ledger_only: bool,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.store.job_counts(COMPLETED_GAUGE_WINDOW).await {
            Ok(counts) => {
                state.metrics.jobs.reset();
                for c in counts {
                    let profile = c.profile.as_deref().unwrap_or("");
                    state
                        .metrics
                        .jobs
                        .with_label_values(&[profile, c.status.as_str()])
                        .set(c.count);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting jobs failed"),
        }
        if ledger_only {
            match state.store.demand().await {
                Ok(demand) => state.metrics.set_oldest_queued(
                    &demand,
                    &state.profiles.get().profiles,
                    chrono::Utc::now(),
                ),
                Err(e) => tracing::warn!(error = %e, "reading queued jobs failed"),
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            match state
                .store
                .prune_deliveries(settings.delivery_retention)
                .await
            {
                Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot old delivery GUIDs"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning deliveries failed"),
            }
            last_prune = Some(tokio::time::Instant::now());
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The production adapters, when their configuration is there.
async fn real_backends(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Option<Backends>, Error> {
    use spot_runners_github::{Auth, GitHubConfig, OctocrabGitHub};
    let auth = match &settings.github_auth {
        GitHubAuth::App {
            app_id,
            private_key,
        } => Auth::App {
            app_id: *app_id,
            private_key_pem: private_key.clone(),
        },
        GitHubAuth::Token(t) => Auth::Token(t.clone()),
        GitHubAuth::None => return Ok(None),
    };
    let observer: Arc<dyn spot_runners_github::ApiObserver> = metrics.clone();
    let github = OctocrabGitHub::new(GitHubConfig {
        api_url: settings.github_api_url.clone(),
        auth,
        metrics: Some(observer),
    })
    .map_err(|e| Error::Config(format!("GitHub: {e}")))?;
    let cloud = match spot_runners_aws::Ec2Cloud::from_env().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "EC2 is not configured");
            return Ok(None);
        }
    };
    let parameters = spot_runners_aws::SsmParameterStore::from_env()
        .await
        .map_err(|e| Error::Config(format!("SSM: {e}")))?;
    Ok(Some(Backends {
        cloud: Arc::new(cloud),
        github: Arc::new(github),
        parameters: Arc::new(parameters),
    }))
}

/// Turns every replica's delivery notifications into local wake-ups.
async fn relay_wakeups(
    store: spot_runners_store::PgStore,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let mut listener = match store.wake_listener().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for wake-ups; relying on the periodic pass");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "wake-up listener lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
