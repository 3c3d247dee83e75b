//! The ledger in memory, behind the production [`Store`] trait: what
//! `spot-runners simulate` and the tests that need no database run the
//! production reconciler on. It follows `PgStore` statement by statement;
//! the store contract suite (`crates/sim/tests/store_contract.rs`) runs the
//! same assertions against both.
//!
//! Times come from the injected [`Clock`], runner names from a seeded
//! generator, and every answer is ordered, so a simulated run replays.
//! Handles made by [`MemoryStore::session`] share one ledger but are
//! separate sessions, as two connections to PostgreSQL are: leadership is
//! per session, and [`MemoryStore::end_session`] drops it as a crash does.

mod ledger;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::planner::Demand;
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::run::WorkflowRunEvent;
use spot_runners_domain::stale::StaleCutoffs;
use spot_runners_domain::store::{
    DeliveryOutcome, FleetCount, IncomingDelivery, JobCheck, JobCount, JobRecord, JobSurvival,
    MarketFn, MarketQuery, PlanFn, Pruned, RecentRepository, RerunOutcome, RunAwaitingRerun,
    RunnerChange, RunnerRecord, StaleJob, Store, StoreError,
};
use spot_runners_domain::survival::{Interruption, RunJob};
use spot_runners_domain::{JobStatus, Market, RunnerState};

use ledger::Ledger;

/// The in-memory ledger; clones share it and the session.
#[derive(Clone)]
pub struct MemoryStore {
    ledger: Arc<Mutex<Ledger>>,
    clock: Arc<dyn Clock>,
    session: u64,
    sessions: Arc<AtomicU64>,
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl MemoryStore {
    /// An empty ledger; runner names are drawn from `seed`.
    pub fn new(clock: Arc<dyn Clock>, seed: u64) -> Self {
        Self {
            ledger: Arc::new(Mutex::new(Ledger::new(seed))),
            clock,
            session: 1,
            sessions: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Another session on the same ledger (another replica, or the same
    /// one after a restart).
    pub fn session(&self) -> Self {
        Self {
            session: self.sessions.fetch_add(1, Ordering::Relaxed) + 1,
            ..self.clone()
        }
    }

    /// Ends this session: the leadership it held passes on.
    pub fn end_session(&self) {
        self.lock().leaders.retain(|_, s| *s != self.session);
    }

    /// Replaces the `instance_profiles` rows.
    pub fn set_profile_rows(&self, rows: Vec<ProfileRow>) {
        self.lock().profile_rows = rows;
    }

    /// Whether the ledger counts this job as queued demand for a profile.
    pub fn counts_as_demand(&self, job_id: i64) -> bool {
        self.lock()
            .jobs
            .get(&job_id)
            .is_some_and(|j| j.status == JobStatus::Queued && j.profile.is_some())
    }

    /// Interrupted jobs whose re-run is still to be asked for.
    pub fn reruns_pending(&self) -> usize {
        self.lock()
            .jobs
            .values()
            .filter(|j| j.survival.rerun_state == Some("pending"))
            .count()
    }

    /// Runners in a live state.
    pub fn live_runners(&self) -> usize {
        self.lock().live.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        crate::lock(&self.ledger)
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn prices(&self) -> Result<Vec<spot_runners_domain::store::PriceRow>, StoreError> {
        Ok(self.lock().prices.values().cloned().collect())
    }

    async fn record_spot_prices(&self, prices: &[(String, f64)]) -> Result<u64, StoreError> {
        use spot_runners_domain::store::{PriceRow, PRICE_SOURCE_EC2, PRICE_SOURCE_OPERATOR};
        let now = self.now();
        let mut ledger = self.lock();
        let mut written = 0;
        for (instance_type, dollars) in prices {
            if !dollars.is_finite() || *dollars < 0.0 {
                continue;
            }
            let key = (instance_type.clone(), Market::Spot.as_str().to_owned());
            if ledger
                .prices
                .get(&key)
                .is_some_and(|r| r.source == PRICE_SOURCE_OPERATOR)
            {
                continue;
            }
            ledger.prices.insert(
                key,
                PriceRow {
                    instance_type: instance_type.clone(),
                    market: Market::Spot.as_str().to_owned(),
                    dollars_per_hour: *dollars,
                    source: PRICE_SOURCE_EC2.to_owned(),
                    updated_at: now,
                },
            );
            written += 1;
        }
        Ok(written)
    }

    async fn usage(
        &self,
        controller_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<spot_runners_domain::cost::Usage>, StoreError> {
        use spot_runners_domain::cost::{RerunFate, Usage};
        let ledger = self.lock();
        let mut out = Vec::new();
        for r in ledger.runners.values() {
            let rec = &r.record;
            let Some(started_at) = rec.launched_at else {
                continue;
            };
            if r.controller_id != controller_id || started_at >= to {
                continue;
            }
            let ended_at = rec
                .state
                .is_final()
                .then(|| r.ended_at.unwrap_or(rec.updated_at));
            if ended_at.is_some_and(|e| e <= from) {
                continue;
            }
            let job = rec.job_id.and_then(|id| ledger.jobs.get(&id));
            let interrupted = ledger.jobs.values().find(|j| {
                j.survival
                    .interruption
                    .as_ref()
                    .is_some_and(|i| i.runner_name == rec.name)
            });
            let market = rec
                .market
                .as_deref()
                .map(Market::parse)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(Usage {
                profile: rec.profile.clone(),
                repository: job.or(interrupted).map(|j| j.repository.clone()),
                workflow: job.or(interrupted).and_then(|j| j.workflow_name.clone()),
                instance_type: rec.instance_type.clone(),
                market,
                started_at,
                ended_at,
                interrupted: interrupted.map(|j| RerunFate::from_state(j.survival.rerun_state)),
            });
        }
        Ok(out)
    }

    async fn record_deliveries(
        &self,
        batch: &[IncomingDelivery],
        deadline: std::time::Instant,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if crate::now() >= deadline {
            return Err(StoreError::Timeout);
        }
        let now = self.now();
        Ok(self.lock().record(batch, now))
    }

    async fn profile_rows(&self) -> Result<Vec<ProfileRow>, StoreError> {
        let mut rows = self.lock().profile_rows.clone();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    async fn job_counts(&self, completed_within: Duration) -> Result<Vec<JobCount>, StoreError> {
        let since = self.now() - chrono(completed_within);
        let mut counts: BTreeMap<(Option<String>, JobStatus), i64> = BTreeMap::new();
        for j in self.lock().jobs.values() {
            if j.status != JobStatus::Completed || j.completed_at.is_some_and(|t| t > since) {
                *counts.entry((j.profile.clone(), j.status)).or_default() += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|((profile, status), count)| JobCount {
                profile,
                status,
                count,
            })
            .collect())
    }

    async fn prune_deliveries(&self, retention: Duration) -> Result<u64, StoreError> {
        let before = self.now() - chrono(retention);
        let mut ledger = self.lock();
        let n = ledger.deliveries.len();
        ledger.deliveries.retain(|_, at| *at >= before);
        Ok((n - ledger.deliveries.len()) as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn unmatched_open_jobs(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<String>, String)>, StoreError> {
        let ledger = self.lock();
        let mut open: Vec<_> = ledger
            .open
            .iter()
            .filter_map(|id| ledger.jobs.get(id))
            .filter(|j| {
                matches!(j.status, JobStatus::Waiting | JobStatus::Queued) && j.profile.is_none()
            })
            .map(|j| {
                (
                    j.first_seen_at,
                    j.id,
                    j.labels.clone(),
                    j.repository.clone(),
                )
            })
            .collect();
        open.sort_by_key(|a| (a.0, a.1));
        Ok(open
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|(_, id, labels, repo)| (id, labels, repo))
            .collect())
    }

    async fn set_job_profile(
        &self,
        job_id: i64,
        profile: Result<&str, &str>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        self.lock().set_profile(job_id, profile, now);
        Ok(())
    }

    async fn plan_runners(
        &self,
        controller_id: &str,
        plan: PlanFn,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        let now = self.now();
        self.lock().plan(controller_id, plan, now)
    }

    async fn claim_provisioning(
        &self,
        controller_id: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        let now = self.now();
        Ok(self
            .lock()
            .claim(controller_id, owner, now + chrono(lease), limit, now))
    }

    async fn renew_leases(
        &self,
        names: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        let until = self.now() + chrono(lease);
        let mut ledger = self.lock();
        let mut n = 0;
        for name in names {
            if let Some(r) = ledger.runners.get_mut(name) {
                if r.lease_owner.as_deref() == Some(owner) && r.provisioning() {
                    r.lease_until = Some(until);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn update_runner(
        &self,
        name: &str,
        owner: &str,
        change: RunnerChange,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        Ok(self.lock().update(name, owner, change, now))
    }

    async fn runner_scopes(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerScope>, StoreError> {
        let since = self.now() - chrono(ended_within);
        let scopes: BTreeSet<RunnerScope> = self
            .lock()
            .recent_runners(controller_id, since)
            .map(|r| r.record.scope.clone())
            .collect();
        Ok(scopes.into_iter().collect())
    }

    async fn runners(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        let since = self.now() - chrono(ended_within);
        Ok(self
            .lock()
            .recent_runners(controller_id, since)
            .map(|r| r.record.clone())
            .collect())
    }

    async fn fleet_counts(
        &self,
        controller_id: &str,
        ended_within: Duration,
    ) -> Result<Vec<FleetCount>, StoreError> {
        let since = self.now() - chrono(ended_within);
        let mut counts: BTreeMap<(String, RunnerState, Option<String>, bool), usize> =
            BTreeMap::new();
        for r in self.lock().recent_runners(controller_id, since) {
            let r = &r.record;
            *counts
                .entry((
                    r.profile.clone(),
                    r.state,
                    r.market.clone(),
                    r.instance_id.is_some(),
                ))
                .or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .map(
                |((profile, state, market, with_instance), runners)| FleetCount {
                    profile,
                    state,
                    market,
                    with_instance,
                    runners,
                },
            )
            .collect())
    }

    async fn settle_jobs(
        &self,
        controller_id: &str,
    ) -> Result<Vec<(RunnerRecord, Option<DateTime<Utc>>)>, StoreError> {
        let now = self.now();
        Ok(self.lock().settle(controller_id, now))
    }

    async fn mark_online(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let now = self.now();
        Ok(self.lock().mark(controller_id, names, at, false, now))
    }

    async fn mark_busy(
        &self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let now = self.now();
        Ok(self.lock().mark(controller_id, names, at, true, now))
    }

    async fn end_runner_if(
        &self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        Ok(self.lock().end_if(name, expected, state, reason, now))
    }

    async fn runner_states(
        &self,
        controller_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, RunnerState>, StoreError> {
        let ledger = self.lock();
        Ok(names
            .iter()
            .filter_map(|n| ledger.runners.get(n))
            .filter(|r| r.controller_id == controller_id)
            .map(|r| (r.record.name.clone(), r.record.state))
            .collect())
    }

    async fn demand(&self) -> Result<BTreeMap<String, Demand>, StoreError> {
        let now = self.now();
        Ok(self.lock().demand(now))
    }

    async fn stale_jobs(
        &self,
        cutoffs: &StaleCutoffs,
        idle_profiles: &[String],
        limit: i64,
    ) -> Result<Vec<StaleJob>, StoreError> {
        let ledger = self.lock();
        let mut due: Vec<_> = ledger
            .open
            .iter()
            .filter_map(|id| ledger.jobs.get(id))
            .filter(|j| j.status == JobStatus::Queued)
            .filter(|j| {
                let idle = j
                    .profile
                    .as_ref()
                    .is_some_and(|p| idle_profiles.contains(p));
                cutoffs.due(j.first_seen_at, j.checked_at, idle)
            })
            .collect();
        // checked_at NULLS FIRST, first_seen_at, id — as PgStore orders.
        due.sort_by_key(|j| (j.checked_at.is_some(), j.checked_at, j.first_seen_at, j.id));
        Ok(due
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|j| StaleJob {
                id: j.id,
                repository: j.repository.clone(),
                profile: j.profile.clone(),
                first_seen_at: j.first_seen_at,
            })
            .collect())
    }

    async fn record_job_check(
        &self,
        job_id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        self.lock().job_check(job_id, check, at, now);
        Ok(())
    }

    async fn try_lead(&self, controller_id: &str) -> Result<bool, StoreError> {
        let mut ledger = self.lock();
        let holder = ledger
            .leaders
            .entry(controller_id.to_owned())
            .or_insert(self.session);
        Ok(*holder == self.session)
    }

    async fn recent_repositories(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RecentRepository>, StoreError> {
        let ledger = self.lock();
        let mut latest: BTreeMap<&str, (&ledger::Job, Option<DateTime<Utc>>)> = BTreeMap::new();
        for j in ledger.jobs.values().filter(|j| j.first_seen_at > since) {
            let unqueued =
                (j.queued_at.is_none() && j.runner_name.is_some()).then_some(j.first_seen_at);
            let entry = latest.entry(&j.repository).or_insert((j, unqueued));
            if j.first_seen_at > entry.0.first_seen_at {
                entry.0 = j;
            }
            entry.1 = entry.1.max(unqueued);
        }
        Ok(latest
            .into_values()
            .map(|(j, unqueued)| RecentRepository {
                repository: j.repository.clone(),
                owner: j.owner.clone(),
                org: j.org.clone(),
                installation_id: j.installation_id,
                last_job_seen_at: j.first_seen_at,
                unqueued_job_seen_at: unqueued,
            })
            .collect())
    }

    async fn known_jobs(&self, ids: &[i64]) -> Result<BTreeSet<i64>, StoreError> {
        let ledger = self.lock();
        Ok(ids
            .iter()
            .filter(|id| ledger.jobs.contains_key(id))
            .copied()
            .collect())
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError> {
        let ledger = self.lock();
        Ok(ledger.jobs.get(&job_id).map(|j| {
            let mut record = j.record();
            record.queue_position = ledger.queue_position(j);
            record
        }))
    }

    async fn notify_wake(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn prune_ledger(
        &self,
        controller_id: &str,
        older_than: Duration,
        batch: i64,
    ) -> Result<Pruned, StoreError> {
        let before = self.now() - chrono(older_than);
        let batch = usize::try_from(batch).unwrap_or(0);
        let mut ledger = self.lock();
        let mut jobs: Vec<(DateTime<Utc>, i64)> = ledger
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Completed)
            .filter_map(|j| j.completed_at.filter(|t| *t < before).map(|t| (t, j.id)))
            .collect();
        jobs.sort();
        jobs.truncate(batch);
        for (_, id) in &jobs {
            ledger.jobs.remove(id);
        }
        let mut runners: Vec<(DateTime<Utc>, String)> = ledger
            .runners
            .values()
            .filter(|r| r.controller_id == controller_id && r.record.state.is_final())
            .filter(|r| r.record.updated_at < before)
            .map(|r| (r.record.updated_at, r.record.name.clone()))
            .collect();
        runners.sort();
        runners.truncate(batch);
        for (_, name) in &runners {
            ledger.runners.remove(name);
        }
        Ok(Pruned {
            jobs: jobs.len() as u64,
            runners: runners.len() as u64,
        })
    }

    async fn known_deliveries(&self, guids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        let ledger = self.lock();
        Ok(guids
            .iter()
            .filter(|g| ledger.deliveries.contains_key(*g))
            .cloned()
            .collect())
    }

    async fn record_workflow_run(
        &self,
        delivery_id: &str,
        run: &WorkflowRunEvent,
    ) -> Result<DeliveryOutcome, StoreError> {
        let now = self.now();
        Ok(self.lock().record_workflow_run(delivery_id, run, now))
    }

    async fn record_run_check(
        &self,
        run: &WorkflowRunEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        self.lock().record_run_check(run, at, now);
        Ok(())
    }

    async fn mark_run_checked(
        &self,
        run_id: i64,
        repository: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _ = repository;
        self.lock().mark_run_checked(run_id, at);
        Ok(())
    }

    async fn record_interruption(&self, interruption: &Interruption) -> Result<bool, StoreError> {
        Ok(self.lock().record_interruption(interruption))
    }

    async fn job_of_runner(&self, runner_name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.lock().job_of_runner(runner_name))
    }

    async fn link_reruns(&self) -> Result<u64, StoreError> {
        Ok(self.lock().link_reruns())
    }

    async fn runs_awaiting_reruns(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RunAwaitingRerun>, StoreError> {
        Ok(self.lock().runs_awaiting_reruns(now, limit))
    }

    async fn run_jobs(&self, run_id: i64) -> Result<Vec<RunJob>, StoreError> {
        Ok(self.lock().run_jobs(run_id))
    }

    async fn set_rerun_outcome(
        &self,
        job_ids: &[i64],
        outcome: &RerunOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock().set_rerun_outcome(job_ids, outcome, at);
        Ok(())
    }

    async fn rerun_attempts(&self, job_id: i64) -> Result<i32, StoreError> {
        Ok(self.lock().rerun_attempts(job_id))
    }

    async fn job_survival(&self, job_id: i64) -> Result<Option<JobSurvival>, StoreError> {
        Ok(self.lock().job_survival(job_id))
    }

    async fn choose_runner_market(
        &self,
        controller_id: &str,
        runner_name: &str,
        profile: &str,
        query: MarketQuery,
        decide: MarketFn,
    ) -> Result<(Market, String), StoreError> {
        let now = self.now();
        Ok(self.lock().choose_runner_market(
            controller_id,
            runner_name,
            profile,
            query,
            &decide,
            now,
        ))
    }

    async fn interruptions_since(
        &self,
        controller_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        Ok(self.lock().interruptions_since(controller_id, since))
    }
}
