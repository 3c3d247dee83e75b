//! The sweeps' decisions, as pure functions beside the planner and the
//! reaper: from snapshots (ledger rows, one EC2 listing, GitHub's runner
//! listings, `now`) to what should be done. The reconciler gathers the
//! snapshots and carries the actions out; nothing here does IO.
//!
//! - [`instances_gone`]: a runner whose instance is gone ends (reclaimed by
//!   EC2, shut down by its watchdog, terminated by us).
//! - [`ended_before_launch_recorded`]: a runner that reached `done` before
//!   its instance id was written ends, so it stops holding a cap slot.
//! - [`orphan_instances`]: instances no live runner accounts for go.
//! - [`orphan_registrations`]: offline registrations with our name that no
//!   live runner accounts for are deleted.
//! - [`registrations_gone`]: a runner missing from two of GitHub's listings
//!   taken at least one sweep apart has lost its registration.
//! - [`job_check`]: what GitHub's jobs API says about a stale job.
//! - [`lost_queued_jobs`]: queued jobs GitHub lists that no delivery told
//!   the ledger about.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};

use crate::ports::{GitHubJob, GitHubRunner, Instance, JobReport, RunnerScope};
use crate::stale;
use crate::store::{JobCheck, JobRecord, RunnerRecord};
use crate::{JobStatus, RunnerState};

/// An instance missing from EC2's listing this long after its launch is
/// gone: the listing lags a fresh launch by seconds.
pub const GONE_AFTER_SECS: i64 = 300;
/// A `terminating` runner whose instance still runs this long after is
/// terminated again (a terminate lost in a crash or an EC2 hiccup).
pub const TERMINATE_RETRY_AFTER_SECS: i64 = 60;
/// A runner launched this recently may be missing from a listing fetched
/// just before; only older ones missing from it count.
pub const REGISTRATION_SETTLE_SECS: i64 = 60;
/// A job created this recently may still have its delivery in flight.
pub const POLL_GRACE_SECS: i64 = 60;
/// EC2's reason for a reclaimed spot instance.
pub const SPOT_RECLAIMED: &str = "Server.SpotInstanceTermination";

/// A runner whose instance is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceGone {
    pub name: String,
    pub profile: String,
    /// The state the decision saw; the row ends only if it is still in it.
    pub was: RunnerState,
    /// `interrupted` for a spot reclaim, else `terminated`.
    pub state: RunnerState,
    pub reason: String,
    /// Whether the service expected it (its job had completed, or it was
    /// being terminated): expected ones are not counted as lost.
    pub expected: bool,
}

/// Runners whose instance is gone from `instances` (one EC2 listing of the
/// controller's instances) or listed as no longer alive.
pub fn instances_gone(
    runners: &[RunnerRecord],
    instances: &[Instance],
    now: DateTime<Utc>,
) -> Vec<InstanceGone> {
    let by_id: BTreeMap<&str, &Instance> = instances.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut out = Vec::new();
    for r in runners.iter().filter(|r| r.state.is_live()) {
        let Some(id) = r.instance_id.as_deref() else {
            continue;
        };
        let instance = by_id.get(id).copied();
        let vanished = match instance {
            Some(i) => !i.state.is_alive(),
            None => r
                .launched_at
                .is_some_and(|t| now - t > Duration::seconds(GONE_AFTER_SECS)),
        };
        if !vanished {
            continue;
        }
        let reason = instance
            .and_then(|i| i.state_reason.clone())
            .unwrap_or_else(|| "instance no longer listed".into());
        let state = if reason == SPOT_RECLAIMED {
            RunnerState::Interrupted
        } else {
            RunnerState::Terminated
        };
        out.push(InstanceGone {
            name: r.name.clone(),
            profile: r.profile.clone(),
            was: r.state,
            state,
            reason,
            expected: matches!(r.state, RunnerState::Done | RunnerState::Terminating),
        });
    }
    out
}

/// Runners `done` with no instance id: their job completed before the
/// provisioner recorded the instance (a crash mid-launch, or a runner that
/// took a job within the `RunInstances` call). Nothing would ever end them,
/// and they would hold a cap slot for good; ended, any instance carrying
/// their name is an orphan the instance sweep terminates.
pub fn ended_before_launch_recorded(runners: &[RunnerRecord]) -> Vec<&RunnerRecord> {
    runners
        .iter()
        .filter(|r| r.state == RunnerState::Done && r.instance_id.is_none())
        .collect()
}

/// What the instance sweep terminates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrphanInstances {
    /// Alive instances no live runner accounts for.
    pub orphans: Vec<String>,
    /// Instances of `terminating` runners still alive a while after.
    pub retries: Vec<String>,
}

/// Alive instances carrying the controller's tag whose runner is unknown to
/// the ledger (a launch lost in a crash) or has ended, and instances whose
/// terminate seems lost. `states` holds the ledger state of every runner
/// named by an alive instance's tag (names the ledger never saw are absent).
pub fn orphan_instances(
    instances: &[Instance],
    states: &BTreeMap<String, RunnerState>,
    runners: &[RunnerRecord],
    now: DateTime<Utc>,
) -> OrphanInstances {
    let retry_after = Duration::seconds(TERMINATE_RETRY_AFTER_SECS);
    // Looked up per instance, so indexed once: a fleet of 10,000 would
    // otherwise cost 10,000 × 10,000 comparisons a sweep.
    let stuck: HashSet<&str> = runners
        .iter()
        .filter(|r| now - r.updated_at > retry_after)
        .filter_map(|r| r.instance_id.as_deref())
        .collect();
    let recorded: HashMap<&str, &str> = runners
        .iter()
        .filter_map(|r| Some((r.name.as_str(), r.instance_id.as_deref()?)))
        .collect();
    let mut out = OrphanInstances::default();
    for i in instances.iter().filter(|i| i.state.is_alive()) {
        let state = i.runner_name.as_ref().and_then(|n| states.get(n)).copied();
        match state {
            Some(RunnerState::Terminating) => {
                if stuck.contains(i.id.as_str()) {
                    out.retries.push(i.id.clone());
                }
            }
            // A second instance under a live runner's name (a resumed
            // launch whose first instance EC2 listed only later) is
            // nobody's: the runner uses the one the ledger names.
            Some(s)
                if s.is_live()
                    && i.runner_name
                        .as_deref()
                        .and_then(|n| recorded.get(n))
                        .is_none_or(|id| *id == i.id) => {}
            _ => out.orphans.push(i.id.clone()),
        }
    }
    out
}

/// A GitHub registration to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrphanRegistration {
    pub scope: RunnerScope,
    pub id: i64,
    pub name: String,
    /// The ledger's state for it, if the ledger knows the name.
    pub known: Option<RunnerState>,
}

/// Offline registrations that are ours (known to the ledger, or named
/// `<controller>-<profile>-<id>` by `is_ours`) and that no live runner still
/// needs: a JIT runner that finished but lingers, or one registered just
/// before a crash. Online ones are left to finish what they are doing.
pub fn orphan_registrations(
    listed: &BTreeMap<RunnerScope, Vec<GitHubRunner>>,
    states: &BTreeMap<String, RunnerState>,
    is_ours: impl Fn(&str) -> bool,
) -> Vec<OrphanRegistration> {
    let mut out = Vec::new();
    for (scope, list) in listed {
        for g in list.iter().filter(|g| !g.online) {
            let known = states.get(&g.name).copied();
            let accounted = known.is_some_and(|s| {
                s.is_live() && !matches!(s, RunnerState::Done | RunnerState::Terminating)
            });
            if accounted || (known.is_none() && !is_ours(&g.name)) {
                continue;
            }
            out.push(OrphanRegistration {
                scope: scope.clone(),
                id: g.id,
                name: g.name.clone(),
                known,
            });
        }
    }
    out
}

/// A runner whose GitHub registration is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationGone {
    pub name: String,
    pub profile: String,
    pub was: RunnerState,
    /// The job an `in_progress` gave it, for a busy one: that job probably
    /// finished and its `completed` was lost, so it is checked first.
    pub job_id: Option<i64>,
}

/// What one look at GitHub's runner listings decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistrationSweep {
    pub gone: Vec<RegistrationGone>,
    /// Runners missing from this listing, and since when: the next sweep's
    /// `missing_before`.
    pub missing: BTreeMap<String, DateTime<Utc>>,
}

/// Runners missing from a complete listing of their scope. Offset paging
/// can skip an entry while runners come and go, so one listing is not
/// proof: a runner is gone only when it was already missing from a listing
/// taken at least `apart` earlier (`missing_before`, what the previous
/// sweeps returned). Scopes absent from `listed` (their listing failed) say
/// nothing; a runner launched within [`REGISTRATION_SETTLE_SECS`] may not
/// be listed yet.
pub fn registrations_gone(
    runners: &[RunnerRecord],
    listed: &BTreeMap<RunnerScope, Vec<GitHubRunner>>,
    missing_before: &BTreeMap<String, DateTime<Utc>>,
    apart: Duration,
    now: DateTime<Utc>,
) -> RegistrationSweep {
    let settled = Duration::seconds(REGISTRATION_SETTLE_SECS);
    // GitHub compares runner names without case. Indexed once per scope,
    // not searched per runner (quadratic in the fleet).
    let names: BTreeMap<&RunnerScope, HashSet<String>> = listed
        .iter()
        .map(|(scope, list)| {
            let names = list.iter().map(|g| g.name.to_ascii_lowercase()).collect();
            (scope, names)
        })
        .collect();
    let mut out = RegistrationSweep::default();
    for r in runners.iter().filter(|r| {
        matches!(
            r.state,
            RunnerState::Booting | RunnerState::Idle | RunnerState::Busy
        ) && r.launched_at.is_some_and(|t| now - t >= settled)
    }) {
        let Some(list) = names.get(&r.scope) else {
            if let Some(since) = missing_before.get(&r.name) {
                out.missing.insert(r.name.clone(), *since);
            }
            continue;
        };
        if list.contains(&r.name.to_ascii_lowercase()) {
            continue;
        }
        let since = missing_before.get(&r.name).copied().unwrap_or(now);
        if now - since >= apart && since < now {
            out.gone.push(RegistrationGone {
                name: r.name.clone(),
                profile: r.profile.clone(),
                was: r.state,
                job_id: if r.state == RunnerState::Busy {
                    r.job_id
                } else {
                    None
                },
            });
        } else {
            out.missing.insert(r.name.clone(), since);
        }
    }
    out
}

/// Whether the job of a busy runner whose registration is gone should be
/// asked about now (not completed, not checked within
/// [`stale::SUSPECT_RECHECK_SECS`]).
pub fn suspect_due(job: &JobRecord, now: DateTime<Utc>) -> bool {
    job.status != JobStatus::Completed
        && job
            .checked_at
            .is_none_or(|t| now - t >= Duration::seconds(stale::SUSPECT_RECHECK_SECS))
}

/// What GitHub's jobs API says, in the ledger's terms.
pub fn job_check(report: &JobReport) -> JobCheck {
    match report.status.as_str() {
        "queued" | "waiting" | "pending" | "requested" => JobCheck::Queued,
        "in_progress" => JobCheck::Started {
            runner_name: report.runner_name.clone(),
        },
        // completed, and anything newer GitHub may invent: not demand.
        _ => JobCheck::Finished {
            conclusion: report.conclusion.clone(),
            runner_name: report.runner_name.clone(),
        },
    }
}

/// Queued jobs GitHub lists that the ledger has never seen (`known`), old
/// enough that their delivery is not merely still in flight.
pub fn lost_queued_jobs(
    listed: Vec<GitHubJob>,
    known: &BTreeSet<i64>,
    now: DateTime<Utc>,
) -> Vec<GitHubJob> {
    let grace = Duration::seconds(POLL_GRACE_SECS);
    listed
        .into_iter()
        .filter(|j| !known.contains(&j.id) && j.created_at.is_none_or(|t| now - t >= grace))
        .collect()
}

#[cfg(test)]
mod tests;
