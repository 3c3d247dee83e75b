//! The rows and the statements of [`MemoryStore`](super::MemoryStore), one
//! method per `PgStore` statement that changes more than a field.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::SeedableRng;
use spot_runners_domain::planner::{Demand, RunnerCount};
use spot_runners_domain::ports::RunnerScope;
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::store::{
    DeliveryOutcome, IncomingDelivery, JobCheck, JobRecord, PlanFn, PlanSnapshot, RunnerChange,
    RunnerRecord, StoreError,
};
use spot_runners_domain::{ControllerId, JobStatus, RunnerName, RunnerState};

mod survival;

pub(crate) use survival::{JobSurvivalColumns, Run};

/// Warm pools register where the profile's latest job (of this window) came from.
const WARM_SCOPE_WINDOW_DAYS: i64 = 30;

/// A `workflow_jobs` row.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub id: i64,
    pub run_id: i64,
    pub run_attempt: i32,
    pub name: String,
    pub workflow_name: Option<String>,
    pub repository: String,
    pub owner: String,
    pub org: Option<String>,
    pub installation_id: Option<i64>,
    pub html_url: Option<String>,
    pub labels: Vec<String>,
    pub status: JobStatus,
    pub conclusion: Option<String>,
    pub runner_name: Option<String>,
    pub profile: Option<String>,
    pub match_error: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
    pub survival: JobSurvivalColumns,
}

impl Job {
    fn scope(&self) -> RunnerScope {
        match &self.org {
            Some(o) => RunnerScope::Org(o.clone()),
            None => RunnerScope::Repo(self.repository.clone()),
        }
    }

    pub(crate) fn record(&self) -> JobRecord {
        JobRecord {
            id: self.id,
            name: self.name.clone(),
            workflow_name: self.workflow_name.clone(),
            repository: self.repository.clone(),
            org: self.org.clone(),
            labels: self.labels.clone(),
            status: self.status,
            conclusion: self.conclusion.clone(),
            runner_name: self.runner_name.clone(),
            profile: self.profile.clone(),
            match_error: self.match_error.clone(),
            html_url: self.html_url.clone(),
            first_seen_at: self.first_seen_at,
            queued_at: self.queued_at,
            in_progress_at: self.in_progress_at,
            completed_at: self.completed_at,
            checked_at: self.checked_at,
            queue_position: None,
        }
    }
}

/// A `runners` row.
#[derive(Clone, Debug)]
pub(crate) struct Runner {
    pub record: RunnerRecord,
    pub controller_id: String,
    /// Creation order, for ties in `created_at` (virtual time has many).
    pub seq: u64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// `terminated_at`: when it first reached a final state.
    pub ended_at: Option<DateTime<Utc>>,
    pub market_reason: Option<String>,
}

impl Runner {
    pub(crate) fn provisioning(&self) -> bool {
        matches!(
            self.record.state,
            RunnerState::Requested | RunnerState::Registered | RunnerState::Launching
        )
    }
}

pub(crate) struct Ledger {
    pub deliveries: BTreeMap<String, DateTime<Utc>>,
    pub jobs: BTreeMap<i64, Job>,
    pub runs: BTreeMap<i64, Run>,
    /// Jobs not completed.
    pub open: BTreeSet<i64>,
    /// The job naming each runner (`runner_name`).
    by_runner: BTreeMap<String, i64>,
    /// Each profile's latest job: (first seen, scope).
    latest: BTreeMap<String, (DateTime<Utc>, RunnerScope)>,
    pub runners: BTreeMap<String, Runner>,
    /// Names of runners in a live state.
    pub live: BTreeSet<String>,
    pub leaders: BTreeMap<String, u64>,
    pub profile_rows: Vec<ProfileRow>,
    /// `instance_prices` by (instance type, market); empty at first (the
    /// migration's seed rows are PostgreSQL's).
    pub prices: BTreeMap<(String, String), spot_runners_domain::store::PriceRow>,
    rng: StdRng,
    next_seq: u64,
}

impl Ledger {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            deliveries: BTreeMap::new(),
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            open: BTreeSet::new(),
            by_runner: BTreeMap::new(),
            latest: BTreeMap::new(),
            runners: BTreeMap::new(),
            live: BTreeSet::new(),
            leaders: BTreeMap::new(),
            profile_rows: Vec::new(),
            prices: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed ^ 0x5107_e000),
            next_seq: 0,
        }
    }

    /// Deliveries in one "transaction": duplicates change nothing, status
    /// and per-status timestamps only move forward.
    pub(crate) fn record(
        &mut self,
        batch: &[IncomingDelivery],
        now: DateTime<Utc>,
    ) -> Vec<DeliveryOutcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for d in batch {
            if self.deliveries.contains_key(&d.delivery_id) {
                outcomes.push(DeliveryOutcome::Duplicate);
                continue;
            }
            self.deliveries.insert(d.delivery_id.clone(), now);
            let ev = &d.job;
            let at = |s: JobStatus| (ev.status == s).then_some(now);
            let (profile, match_error) = match &d.profile {
                Ok(p) => (Some(p.clone()), None),
                Err(e) => (None, Some(e.clone())),
            };
            let job = self.jobs.entry(ev.job_id).or_insert_with(|| Job {
                id: ev.job_id,
                run_id: ev.run_id,
                run_attempt: ev.run_attempt,
                name: ev.name.clone(),
                workflow_name: ev.workflow_name.clone(),
                repository: ev.repository.clone(),
                owner: ev.owner.clone(),
                org: ev.org.clone(),
                installation_id: None,
                html_url: None,
                labels: ev.labels.clone(),
                status: ev.status,
                conclusion: None,
                runner_name: None,
                profile: None,
                match_error: None,
                first_seen_at: now,
                queued_at: None,
                in_progress_at: None,
                completed_at: None,
                checked_at: None,
                survival: JobSurvivalColumns::default(),
            });
            job.status = job.status.max(ev.status);
            job.run_attempt = job.run_attempt.max(ev.run_attempt);
            job.conclusion = ev.conclusion.clone().or(job.conclusion.take());
            job.runner_name = ev.runner_name.clone().or(job.runner_name.take());
            job.installation_id = ev.installation_id.or(job.installation_id);
            job.html_url = job.html_url.take().or(ev.html_url.clone());
            job.profile = job.profile.take().or(profile);
            job.match_error = if job.profile.is_none() {
                match_error
            } else {
                None
            };
            job.queued_at = job.queued_at.or(at(JobStatus::Queued));
            job.in_progress_at = job.in_progress_at.or(at(JobStatus::InProgress));
            job.completed_at = job.completed_at.or(at(JobStatus::Completed));
            let job = job.clone();
            self.reindex(&job);
            outcomes.push(DeliveryOutcome::Accepted);
        }
        outcomes
    }

    /// Keeps the indexes in step with a job row.
    fn reindex(&mut self, job: &Job) {
        if job.status == JobStatus::Completed {
            self.open.remove(&job.id);
        } else {
            self.open.insert(job.id);
        }
        if let Some(r) = &job.runner_name {
            self.by_runner.insert(r.clone(), job.id);
        }
        if let Some(p) = &job.profile {
            let newer = self
                .latest
                .get(p)
                .is_none_or(|(at, _)| job.first_seen_at > *at);
            if newer {
                self.latest
                    .insert(p.clone(), (job.first_seen_at, job.scope()));
            }
        }
    }

    pub(crate) fn set_profile(
        &mut self,
        id: i64,
        profile: Result<&str, &str>,
        _now: DateTime<Utc>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match profile {
            Ok(p) => (job.profile, job.match_error) = (Some(p.to_owned()), None),
            Err(e) => (job.profile, job.match_error) = (None, Some(e.to_owned())),
        }
        let job = job.clone();
        self.reindex(&job);
    }

    pub(crate) fn job_check(
        &mut self,
        id: i64,
        check: &JobCheck,
        at: DateTime<Utc>,
        _now: DateTime<Utc>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let (status, conclusion, runner_name) = match check {
            JobCheck::Queued => (JobStatus::Queued, None, None),
            JobCheck::Started { runner_name } => (JobStatus::InProgress, None, runner_name.clone()),
            JobCheck::Finished {
                conclusion,
                runner_name,
            } => (
                JobStatus::Completed,
                conclusion.clone(),
                runner_name.clone(),
            ),
            JobCheck::Gone => (JobStatus::Completed, Some("gone".to_owned()), None),
        };
        job.checked_at = Some(at);
        job.status = job.status.max(status);
        job.conclusion = job.conclusion.take().or(conclusion);
        job.runner_name = job.runner_name.take().or(runner_name);
        if matches!(status, JobStatus::InProgress | JobStatus::Completed) {
            job.in_progress_at = job.in_progress_at.or(Some(at));
        }
        if status == JobStatus::Completed {
            job.completed_at = job.completed_at.or(Some(at));
        }
        let job = job.clone();
        self.reindex(&job);
    }

    /// Queued jobs that matched a profile, oldest first.
    fn queue(&self) -> Vec<&Job> {
        let mut queued: Vec<&Job> = self
            .open
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.status == JobStatus::Queued && j.profile.is_some())
            .collect();
        queued.sort_by_key(|j| (j.first_seen_at, j.id));
        queued
    }

    /// As the SQL: the place of a queued job in its profile's queue, from 1.
    pub(crate) fn queue_position(&self, job: &Job) -> Option<usize> {
        if job.status != JobStatus::Queued || job.profile.is_none() {
            return None;
        }
        let place = self
            .queue()
            .into_iter()
            .filter(|q| q.profile == job.profile)
            .take_while(|q| q.id != job.id)
            .count();
        Some(place + 1)
    }

    pub(crate) fn demand(&self, now: DateTime<Utc>) -> BTreeMap<String, Demand> {
        let mut demand: BTreeMap<String, Demand> = BTreeMap::new();
        for j in self.queue() {
            if let Some(p) = &j.profile {
                demand
                    .entry(p.clone())
                    .or_default()
                    .add(j.scope(), j.first_seen_at);
            }
        }
        let window = chrono::Duration::days(WARM_SCOPE_WINDOW_DAYS);
        // As the SQL's join on `instance_profiles`: only rows that exist.
        for (p, (at, scope)) in &self.latest {
            if *at > now - window && self.profile_rows.iter().any(|r| &r.name == p) {
                demand.entry(p.clone()).or_default().warm_scope = Some(scope.clone());
            }
        }
        demand
    }

    fn live_of<'a>(&'a self, controller_id: &'a str) -> impl Iterator<Item = &'a Runner> + 'a {
        self.live
            .iter()
            .filter_map(|n| self.runners.get(n))
            .filter(move |r| r.controller_id == controller_id)
    }

    /// Live runners of the controller and those changed since `since`, by
    /// creation.
    pub(crate) fn recent_runners<'a>(
        &'a self,
        controller_id: &'a str,
        since: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a Runner> + 'a {
        let mut rows: Vec<&Runner> = self
            .runners
            .values()
            .filter(|r| r.controller_id == controller_id)
            .filter(|r| r.record.state.is_live() || r.record.updated_at > since)
            .collect();
        rows.sort_by_key(|r| (r.record.created_at, r.seq));
        rows.into_iter()
    }

    pub(crate) fn plan(
        &mut self,
        controller_id: &str,
        plan: PlanFn,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        let mut counts: BTreeMap<(String, RunnerState, RunnerScope), usize> = BTreeMap::new();
        for r in self.live_of(controller_id) {
            *counts
                .entry((
                    r.record.profile.clone(),
                    r.record.state,
                    r.record.scope.clone(),
                ))
                .or_default() += 1;
        }
        let runners: Vec<RunnerCount> = counts
            .into_iter()
            .map(|((profile, state, scope), runners)| RunnerCount {
                profile,
                state,
                scope: Some(scope),
                runners,
            })
            .collect();
        let snapshot = PlanSnapshot {
            demand: self.demand(now),
            runners,
        };
        let launches = plan(&snapshot);
        if launches.is_empty() {
            return Ok(Vec::new());
        }
        let controller =
            ControllerId::parse(controller_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let queue = self.queue();
        let covered_since = |profile: &str, scope: &RunnerScope, place: usize| {
            queue
                .iter()
                .filter(|j| j.profile.as_deref() == Some(profile) && &j.scope() == scope)
                .nth(place)
                .map(|j| j.first_seen_at)
        };
        let since: Vec<Vec<Option<DateTime<Utc>>>> = launches
            .iter()
            .map(|l| {
                l.runners
                    .iter()
                    .map(|r| {
                        r.covers
                            .and_then(|k| covered_since(l.profile.as_str(), &r.scope, k))
                    })
                    .collect()
            })
            .collect();
        drop(queue);
        let mut created = Vec::new();
        for (launch, since) in launches.iter().zip(since) {
            for (new, demand_since) in launch.runners.iter().zip(since) {
                let name = RunnerName::generate(&controller, &launch.profile, &mut self.rng);
                let record = RunnerRecord {
                    name: name.to_string(),
                    profile: launch.profile.to_string(),
                    state: RunnerState::Requested,
                    scope: new.scope.clone(),
                    github_runner_id: None,
                    instance_id: None,
                    instance_type: None,
                    subnet_id: None,
                    market: None,
                    job_id: None,
                    launch_attempts: 0,
                    last_error_code: None,
                    reason: None,
                    demand_since,
                    created_at: now,
                    launched_at: None,
                    online_at: None,
                    updated_at: now,
                };
                self.next_seq += 1;
                self.live.insert(record.name.clone());
                self.runners.insert(
                    record.name.clone(),
                    Runner {
                        record: record.clone(),
                        controller_id: controller_id.to_owned(),
                        seq: self.next_seq,
                        lease_owner: None,
                        lease_until: None,
                        ended_at: None,
                        market_reason: None,
                    },
                );
                created.push(record);
            }
        }
        Ok(created)
    }

    pub(crate) fn claim(
        &mut self,
        controller_id: &str,
        owner: &str,
        until: DateTime<Utc>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Vec<RunnerRecord> {
        let mut free: Vec<(DateTime<Utc>, u64, String)> = self
            .live_of(controller_id)
            .filter(|r| r.provisioning() && r.lease_until.is_none_or(|t| t < now))
            .map(|r| (r.record.created_at, r.seq, r.record.name.clone()))
            .collect();
        free.sort();
        free.truncate(usize::try_from(limit).unwrap_or(0));
        let mut out = Vec::new();
        for (_, _, name) in free {
            if let Some(r) = self.runners.get_mut(&name) {
                r.lease_owner = Some(owner.to_owned());
                r.lease_until = Some(until);
                r.record.updated_at = now;
                out.push(r.record.clone());
            }
        }
        out
    }

    fn set_state(&mut self, name: &str, state: RunnerState) {
        if let Some(r) = self.runners.get_mut(name) {
            r.record.state = state;
            if !state.is_live() {
                r.ended_at.get_or_insert(r.record.updated_at);
            }
        }
        if state.is_live() {
            self.live.insert(name.to_owned());
        } else {
            self.live.remove(name);
        }
    }

    /// Compare-and-set on the lease and the provisioning states, as
    /// `PgStore`'s statements; `Booting` also fills in the instance of a row
    /// moved to `busy`/`done` before it had one. Returns whether it applied.
    pub(crate) fn update(
        &mut self,
        name: &str,
        owner: &str,
        change: RunnerChange,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(r) = self.runners.get_mut(name) else {
            return false;
        };
        let ours = r.lease_owner.as_deref() == Some(owner) && r.provisioning();
        let taken = matches!(r.record.state, RunnerState::Busy | RunnerState::Done);
        let applies = match &change {
            RunnerChange::Booting { .. } => r.record.instance_id.is_none() && (ours || taken),
            _ => ours,
        };
        if !applies {
            return false;
        }
        r.record.updated_at = now;
        let rec = &mut r.record;
        let state = match change {
            RunnerChange::Registered { github_runner_id } => {
                rec.github_runner_id = Some(github_runner_id);
                Some(RunnerState::Registered)
            }
            RunnerChange::Launching {
                instance_type,
                subnet_id,
                market,
            } => {
                (rec.instance_type, rec.subnet_id, rec.market) =
                    (Some(instance_type), subnet_id, Some(market));
                rec.launch_attempts += 1;
                Some(RunnerState::Launching)
            }
            RunnerChange::AttemptFailed { code, .. } => {
                rec.last_error_code = Some(code);
                None
            }
            RunnerChange::Booting {
                instance_id,
                instance_type,
                subnet_id,
                market,
            } => {
                rec.instance_id = Some(instance_id);
                (rec.instance_type, rec.subnet_id, rec.market) =
                    (Some(instance_type), subnet_id, Some(market));
                rec.launched_at = Some(now);
                (r.lease_owner, r.lease_until) = (None, None);
                (!taken).then_some(RunnerState::Booting)
            }
            RunnerChange::Ended {
                state,
                code,
                reason,
            } => {
                rec.last_error_code = code.or(rec.last_error_code.take());
                rec.reason = Some(reason);
                (r.lease_owner, r.lease_until) = (None, None);
                Some(state)
            }
            RunnerChange::Postpone { retry_in } => {
                r.lease_until = Some(now + super::chrono(retry_in));
                None
            }
            RunnerChange::Requeue => {
                rec.github_runner_id = None;
                Some(RunnerState::Requested)
            }
        };
        if let Some(state) = state {
            self.set_state(name, state);
        }
        true
    }

    /// `in_progress` naming a runner → `busy`; its job `completed` →
    /// `done`; then `done` runners with an instance are claimed
    /// (→ `terminating`) and returned with their job's completion time.
    pub(crate) fn settle(
        &mut self,
        controller_id: &str,
        now: DateTime<Utc>,
    ) -> Vec<(RunnerRecord, Option<DateTime<Utc>>)> {
        let names: Vec<String> = self
            .live_of(controller_id)
            .map(|r| r.record.name.clone())
            .collect();
        let mut claimed = Vec::new();
        for name in names {
            let job = self
                .by_runner
                .get(&name)
                .and_then(|id| self.jobs.get(id))
                .map(|j| (j.id, j.status, j.completed_at));
            let Some(r) = self.runners.get_mut(&name) else {
                continue;
            };
            let rec = &mut r.record;
            if let Some((id, status, _)) = job {
                let early = matches!(
                    rec.state,
                    RunnerState::Launching | RunnerState::Booting | RunnerState::Idle
                );
                if status == JobStatus::InProgress && early {
                    rec.job_id = Some(id);
                    rec.online_at = rec.online_at.or(Some(now));
                    rec.updated_at = now;
                    rec.state = RunnerState::Busy;
                }
                if status == JobStatus::Completed && (early || rec.state == RunnerState::Busy) {
                    rec.job_id = Some(id);
                    rec.updated_at = now;
                    rec.state = RunnerState::Done;
                }
            }
            if rec.state == RunnerState::Done && rec.instance_id.is_some() {
                rec.state = RunnerState::Terminating;
                rec.updated_at = now;
                let completed = job.and_then(|(_, _, at)| at);
                claimed.push((r.seq, rec.clone(), completed));
            }
        }
        claimed.sort_by_key(|(seq, ..)| *seq);
        claimed.into_iter().map(|(_, r, at)| (r, at)).collect()
    }

    /// GitHub's listing: online (`busy` false) or busy runners move on.
    pub(crate) fn mark(
        &mut self,
        controller_id: &str,
        names: &[String],
        at: DateTime<Utc>,
        busy: bool,
        now: DateTime<Utc>,
    ) -> u64 {
        let mut n = 0;
        for name in names {
            let Some(r) = self
                .runners
                .get_mut(name)
                .filter(|r| r.controller_id == controller_id)
            else {
                continue;
            };
            let rec = &mut r.record;
            let from = match rec.state {
                RunnerState::Launching | RunnerState::Booting => true,
                RunnerState::Idle => busy,
                _ => false,
            };
            if !from {
                continue;
            }
            rec.online_at = rec.online_at.or(Some(at));
            rec.state = if busy {
                RunnerState::Busy
            } else {
                RunnerState::Idle
            };
            rec.updated_at = now;
            n += 1;
        }
        n
    }

    pub(crate) fn end_if(
        &mut self,
        name: &str,
        expected: RunnerState,
        state: RunnerState,
        reason: &str,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(r) = self.runners.get_mut(name) else {
            return false;
        };
        if r.record.state != expected {
            return false;
        }
        r.record.reason = Some(reason.to_owned());
        r.record.updated_at = now;
        (r.lease_owner, r.lease_until) = (None, None);
        self.set_state(name, state);
        true
    }
}
