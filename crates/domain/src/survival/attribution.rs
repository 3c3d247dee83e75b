//! Attribution: the job a spot reclaim killed.

use chrono::{DateTime, Utc};

use crate::{Market, RunnerState};

/// EC2's state reason code when it reclaims a spot instance.
pub const SPOT_RECLAIM_REASON: &str = "Server.SpotInstanceTermination";

/// What the ledger and EC2 say about a runner whose instance is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerEnd<'a> {
    pub runner_name: &'a str,
    /// The runner's state when its instance was found gone.
    pub state: RunnerState,
    /// The job GitHub gave it, if any.
    pub job_id: Option<i64>,
    /// That job's conclusion, if the ledger already has one.
    pub job_conclusion: Option<&'a str>,
    /// When the job started on it (`in_progress`), if known.
    pub job_started_at: Option<DateTime<Utc>>,
    /// EC2's state reason code for the instance.
    pub instance_reason: Option<&'a str>,
    pub instance_type: Option<&'a str>,
    pub subnet_id: Option<&'a str>,
    /// The instance's AZ, as EC2 last described it.
    pub availability_zone: Option<&'a str>,
    pub market: Option<Market>,
}

/// A job a spot reclaim killed, for the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interruption {
    pub job_id: i64,
    pub runner_name: String,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub availability_zone: Option<String>,
    pub market: Option<Market>,
    /// How long the job had run when the reclaim was noticed.
    pub ran_secs: u32,
    pub at: DateTime<Utc>,
}

/// The job a reclaim interrupted, if any. Only a runner that was running a
/// job when EC2 reclaimed its instance counts: an instance we terminated
/// ourselves (its job completed: the runner is `done`/`terminating`, and
/// EC2 names the shutdown user-initiated), one that shut itself down, and
/// an idle runner interrupt no job. A job the ledger already knows
/// succeeded is not interrupted, whatever happened to the instance after.
pub fn attribute(end: &RunnerEnd<'_>, now: DateTime<Utc>) -> Option<Interruption> {
    if end.instance_reason != Some(SPOT_RECLAIM_REASON) || end.state != RunnerState::Busy {
        return None;
    }
    if matches!(end.job_conclusion, Some("success" | "skipped" | "neutral")) {
        return None;
    }
    let job_id = end.job_id?;
    let ran_secs = end
        .job_started_at
        .map(|t| (now - t).num_seconds().clamp(0, i64::from(u32::MAX)) as u32)
        .unwrap_or(0);
    Some(Interruption {
        job_id,
        runner_name: end.runner_name.to_owned(),
        instance_type: end.instance_type.map(str::to_owned),
        subnet_id: end.subnet_id.map(str::to_owned),
        availability_zone: end.availability_zone.map(str::to_owned),
        market: end.market,
        ran_secs,
        at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn busy<'a>() -> RunnerEnd<'a> {
        RunnerEnd {
            runner_name: "spot-runners-kani-a1b2c3",
            state: RunnerState::Busy,
            job_id: Some(42),
            job_conclusion: None,
            job_started_at: Some(now() - chrono::Duration::minutes(90)),
            instance_reason: Some(SPOT_RECLAIM_REASON),
            instance_type: Some("c6i.4xlarge"),
            subnet_id: Some("subnet-a"),
            availability_zone: Some("us-east-1b"),
            market: Some(Market::Spot),
        }
    }

    #[test]
    fn a_busy_runner_reclaimed_interrupts_its_job() {
        let i = attribute(&busy(), now()).unwrap();
        assert_eq!(i.job_id, 42);
        assert_eq!(i.ran_secs, 5400);
        assert_eq!(i.instance_type.as_deref(), Some("c6i.4xlarge"));
        assert_eq!(i.subnet_id.as_deref(), Some("subnet-a"));
        assert_eq!(i.availability_zone.as_deref(), Some("us-east-1b"));
        assert_eq!(i.market, Some(Market::Spot));
        assert_eq!(i.runner_name, "spot-runners-kani-a1b2c3");
    }

    #[test]
    fn what_is_not_an_interruption() {
        type Case = (&'static str, fn(&mut RunnerEnd<'static>));
        let cases: Vec<Case> = vec![
            ("we terminated it", |e| {
                e.instance_reason = Some("Client.UserInitiatedShutdown")
            }),
            ("it shut itself down", |e| {
                e.instance_reason = Some("Client.InstanceInitiatedShutdown")
            }),
            ("no reason", |e| e.instance_reason = None),
            ("job already done", |e| e.state = RunnerState::Done),
            ("being terminated", |e| e.state = RunnerState::Terminating),
            ("idle", |e| e.state = RunnerState::Idle),
            ("booting", |e| e.state = RunnerState::Booting),
            ("no job", |e| e.job_id = None),
            ("succeeded", |e| e.job_conclusion = Some("success")),
            ("skipped", |e| e.job_conclusion = Some("skipped")),
        ];
        for (what, mutate) in cases {
            let mut e = busy();
            mutate(&mut e);
            assert_eq!(attribute(&e, now()), None, "{what}");
        }
    }

    #[test]
    fn a_failure_reported_for_the_killed_job_is_still_an_interruption() {
        // GitHub marks the job failed once it loses the runner; the reclaim
        // is what failed it.
        let mut e = busy();
        e.job_conclusion = Some("failure");
        assert!(attribute(&e, now()).is_some());
    }

    #[test]
    fn a_start_in_the_future_counts_as_no_time_run() {
        let mut e = busy();
        e.job_started_at = Some(now() + chrono::Duration::minutes(1));
        assert_eq!(attribute(&e, now()).unwrap().ran_secs, 0);
        e.job_started_at = None;
        assert_eq!(attribute(&e, now()).unwrap().ran_secs, 0);
    }

    fn any_state() -> impl Strategy<Value = RunnerState> {
        prop::sample::select(RunnerState::ALL.to_vec())
    }

    proptest! {
        /// Only a reclaim of a busy runner's instance ever marks a job, and
        /// then always its own job.
        #[test]
        fn only_reclaims_of_busy_runners_mark_their_job(
            state in any_state(),
            job in proptest::option::of(1i64..1000),
            reclaimed in any::<bool>(),
            conclusion in proptest::option::of(prop::sample::select(vec!["success", "failure", "cancelled"])),
        ) {
            let mut e = busy();
            e.state = state;
            e.job_id = job;
            e.job_conclusion = conclusion;
            e.instance_reason = Some(if reclaimed { SPOT_RECLAIM_REASON } else { "Client.UserInitiatedShutdown" });
            match attribute(&e, now()) {
                Some(i) => {
                    prop_assert!(reclaimed);
                    prop_assert_eq!(state, RunnerState::Busy);
                    prop_assert_eq!(Some(i.job_id), job);
                    prop_assert_ne!(conclusion, Some("success"));
                }
                None => prop_assert!(!reclaimed || state != RunnerState::Busy || job.is_none() || conclusion == Some("success")),
            }
        }
    }
}
