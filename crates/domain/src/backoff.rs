//! A profile that cannot launch backs off.
//!
//! A profile whose `RunInstances` is refused as an invalid request (an AMI
//! that does not exist, a bad subnet or security group, a missing
//! permission) fails the same way on every try until an operator fixes the
//! row, and every try costs a JIT registration at GitHub and its deletion.
//! So such failures back the profile off exponentially, capped, and an edit
//! of the row that changes what is launched starts it afresh. What can be
//! checked without asking anyone ([`preflight`]) is checked before a runner
//! is registered at all.
//!
//! The state lives in the memory of each replica: it is a hint that saves
//! calls, not a fact others depend on. After a restart one more failing
//! try finds it again; two replicas each back off on their own, so at most
//! one try per replica per period. The ledger keeps every failed runner with
//! its error code, which is what `jobs explain` reads ([`from_history`]).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::ports::CloudError;
use crate::profile::ImageSource;
use crate::Profile;

/// The first backoff; each further failure doubles it, up to [`MAX_DELAY`].
pub const FIRST_DELAY: Duration = Duration::from_secs(30);
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);

/// Error code of a runner ended because its profile failed [`preflight`].
pub const PREFLIGHT_CODE: &str = "InvalidProfile";
/// Error code of a runner ended because GitHub refused to register it
/// (bad credentials, missing permission, unknown runner group).
pub const GITHUB_REFUSED_CODE: &str = "GitHubRefused";
/// Error code of a runner ended unlaunched because its profile was backed off.
pub const BACKED_OFF_CODE: &str = "ProfileBackedOff";

/// How long the profile waits after `failures` consecutive invalid requests.
pub fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

/// Whether a failure with this error code backs its profile off: EC2
/// codes that say the request itself is wrong, a profile that fails
/// [`preflight`], and GitHub refusing the registration.
pub fn backs_off(code: &str) -> bool {
    match code {
        PREFLIGHT_CODE | GITHUB_REFUSED_CODE => true,
        // The service's own codes for runners lost in a crash, to a
        // deleted profile, or to a backoff: no verdict on the request.
        "LostInLaunch" | "ProfileGone" | "NoCandidates" | "JitConfigGone" | BACKED_OFF_CODE => {
            false
        }
        _ => CloudError::from_code(code, "").kind.is_invalid_request(),
    }
}

/// What a launch needs from the profile, as one string: an edit that
/// changes any of it may have fixed the problem, so the backoff restarts.
pub fn fingerprint(profile: &Profile) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}|{}|{}",
        profile.image,
        profile.threads_per_core,
        profile.instance_types,
        profile.subnet_ids,
        profile.security_group_ids,
        profile.iam_instance_profile,
        profile.market,
        profile.on_demand_fallback,
        profile.root_volume_gb,
        profile.runner_group_id,
    )
}

/// One profile's run of failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub failures: u32,
    pub code: String,
    pub reason: String,
    pub until: DateTime<Utc>,
    fingerprint: String,
}

/// The backoffs of every profile.
#[derive(Clone, Debug, Default)]
pub struct Backoffs(BTreeMap<String, Backoff>);

impl Backoffs {
    /// Records an invalid-request failure of `profile` at `now`; returns the
    /// backoff it is now in.
    pub fn failed(
        &mut self,
        profile: &Profile,
        code: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> &Backoff {
        let print = fingerprint(profile);
        let failures = match self.0.get(profile.name.as_str()) {
            Some(b) if b.fingerprint == print => b.failures + 1,
            _ => 1,
        };
        let until =
            now + chrono::Duration::from_std(delay(failures)).unwrap_or(chrono::Duration::MAX);
        let entry = Backoff {
            failures,
            code: code.to_owned(),
            reason: reason.to_owned(),
            until,
            fingerprint: print,
        };
        self.0.insert(profile.name.to_string(), entry);
        &self.0[profile.name.as_str()]
    }

    /// A launch of the profile succeeded: whatever was wrong is fixed.
    pub fn launched(&mut self, profile: &str) {
        self.0.remove(profile);
    }

    /// The backoff `profile` is in at `now`, if any. A row changed since the
    /// failures forgets them.
    pub fn blocking(&mut self, profile: &Profile, now: DateTime<Utc>) -> Option<&Backoff> {
        let name = profile.name.as_str();
        let stale = self
            .0
            .get(name)
            .is_some_and(|b| b.fingerprint != fingerprint(profile));
        if stale {
            self.0.remove(name);
        }
        self.0.get(name).filter(|b| now < b.until)
    }
}

/// One ended runner of a profile, as the ledger has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastLaunch {
    pub at: DateTime<Utc>,
    /// `None`: it launched (or has not failed).
    pub failure_code: Option<String>,
}

/// The backoff a run of failures in the ledger implies: the consecutive
/// backing-off failures since the last launch that went through, and until
/// when the service waits after the latest of them. For `jobs explain`,
/// which cannot see a replica's memory; a row edited since then has
/// restarted the backoff without the ledger knowing.
pub fn from_history(history: &[PastLaunch]) -> Option<(u32, String, DateTime<Utc>)> {
    let mut sorted: Vec<&PastLaunch> = history.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.at));
    let mut failures = 0u32;
    let mut latest: Option<(&str, DateTime<Utc>)> = None;
    for past in sorted {
        match past.failure_code.as_deref() {
            Some(BACKED_OFF_CODE) => continue,
            Some(code) if backs_off(code) => {
                failures += 1;
                latest.get_or_insert((code, past.at));
            }
            _ => break,
        }
    }
    let (code, at) = latest?;
    let until = at + chrono::Duration::from_std(delay(failures)).unwrap_or(chrono::Duration::MAX);
    Some((failures, code.to_owned(), until))
}

/// What can be checked about a profile before a runner is registered for
/// it: ids that EC2 would refuse by their shape alone. A placeholder left
/// in a row (`ami-REPLACE_ME`) fails here instead of at GitHub and EC2.
pub fn preflight(profile: &Profile) -> Result<(), String> {
    fn id_like(id: &str, prefix: &str) -> bool {
        id.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
    }
    let mut problems = Vec::new();
    // A filter was checked when the row was parsed; what it finds, only
    // EC2 can say.
    if let ImageSource::Id(id) = &profile.image {
        if !id_like(id, "ami-") {
            problems.push(format!("image_id {id:?} is not an AMI id (ami-…)"));
        }
    }
    // EC2 takes CPU options for every size but bare metal (its whole host).
    if let Some(threads) = profile.threads_per_core {
        for t in profile.instance_types.iter().filter(|t| {
            t.split('.')
                .nth(1)
                .is_some_and(|size| size.starts_with("metal"))
        }) {
            problems.push(format!(
                "instance type {t:?} is bare metal, which takes no CPU options (threads_per_core = {threads})"
            ));
        }
    }
    for s in profile.subnet_ids.iter().filter(|s| !id_like(s, "subnet-")) {
        problems.push(format!("subnet {s:?} is not a subnet id (subnet-…)"));
    }
    for g in profile
        .security_group_ids
        .iter()
        .filter(|g| !id_like(g, "sg-"))
    {
        problems.push(format!("security group {g:?} is not a group id (sg-…)"));
    }
    for t in profile.instance_types.iter().filter(|t| {
        let parts: Vec<&str> = t.split('.').collect();
        parts.len() < 2
            || parts.iter().any(|p| {
                p.is_empty()
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    }) {
        problems.push(format!("instance type {t:?} is not an EC2 instance type"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::example_row;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn profile(image: &str) -> Profile {
        let mut row = example_row("kani", &["kani"]);
        row.image_id = Some(image.into());
        Profile::try_from(row).unwrap()
    }

    #[test]
    fn delays_double_and_are_capped() {
        let secs: Vec<u64> = (1..=8).map(|n| delay(n).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn invalid_requests_back_off_and_capacity_does_not() {
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "InvalidSubnetID.NotFound",
            "InvalidGroup.NotFound",
            "InvalidParameterValue",
            "UnauthorizedOperation",
            "AuthFailure",
            PREFLIGHT_CODE,
            GITHUB_REFUSED_CODE,
        ] {
            assert!(backs_off(code), "{code}");
        }
        for code in [
            "InsufficientInstanceCapacity",
            "RequestLimitExceeded",
            "InternalError",
            "IdempotentParameterMismatch",
            "IdempotentInstanceTerminated",
            "LostInLaunch",
            BACKED_OFF_CODE,
        ] {
            assert!(!backs_off(code), "{code}");
        }
    }

    #[test]
    fn failures_block_until_the_delay_passes_and_grow() {
        let p = profile("ami-0bad");
        let mut b = Backoffs::default();
        assert!(b.blocking(&p, t(0)).is_none());
        assert_eq!(
            b.failed(&p, "InvalidAMIID.NotFound", "no such AMI", t(0))
                .until,
            t(30)
        );
        assert!(b.blocking(&p, t(29)).is_some());
        assert!(b.blocking(&p, t(30)).is_none(), "one more try is due");
        assert_eq!(
            b.failed(&p, "InvalidAMIID.NotFound", "", t(30)).until,
            t(90)
        );
        assert_eq!(b.blocking(&p, t(60)).unwrap().failures, 2);
        b.launched("kani");
        assert!(b.blocking(&p, t(60)).is_none());
    }

    #[test]
    fn editing_the_row_resets_the_backoff() {
        let bad = profile("ami-0bad");
        let mut b = Backoffs::default();
        b.failed(&bad, "InvalidAMIID.NotFound", "", t(0));
        b.failed(&bad, "InvalidAMIID.NotFound", "", t(30));
        let fixed = profile("ami-0good");
        assert!(
            b.blocking(&fixed, t(31)).is_none(),
            "a new AMI is tried at once"
        );
        // ...and a failure of the new row starts from the first delay.
        assert_eq!(
            b.failed(&fixed, "InvalidAMIID.NotFound", "", t(31))
                .failures,
            1
        );
        // Labels or caps do not change what is launched.
        let mut row = example_row("kani", &["kani", "x64"]);
        row.image_id = Some("ami-0good".into());
        row.max_instances = 3;
        let relabelled = Profile::try_from(row.clone()).unwrap();
        assert!(b.blocking(&relabelled, t(32)).is_some());
        // Switching SMT off changes what is launched.
        row.threads_per_core = Some(1);
        let smt_off = Profile::try_from(row).unwrap();
        assert!(b.blocking(&smt_off, t(32)).is_none());
    }

    #[test]
    fn history_gives_the_current_run_of_failures() {
        let past = |at, code: Option<&str>| PastLaunch {
            at: t(at),
            failure_code: code.map(str::to_owned),
        };
        assert_eq!(from_history(&[]), None);
        assert_eq!(
            from_history(&[past(0, Some("InsufficientInstanceCapacity"))]),
            None
        );
        let history = [
            past(0, Some("InvalidAMIID.NotFound")),
            past(10, None),
            past(20, Some("InvalidAMIID.NotFound")),
            past(25, Some(BACKED_OFF_CODE)),
            past(50, Some("InvalidAMIID.NotFound")),
        ];
        assert_eq!(
            from_history(&history),
            Some((2, "InvalidAMIID.NotFound".to_owned(), t(50 + 60)))
        );
    }

    #[test]
    fn preflight_catches_placeholders() {
        assert!(preflight(&profile("ami-0123456789abcdef0")).is_ok());
        let err = preflight(&profile("ami-REPLACE_ME")).unwrap_err();
        assert!(err.contains("image_id \"ami-REPLACE_ME\""), "{err}");
        let mut row = example_row("kani", &["kani"]);
        row.subnet_ids = vec!["subnet-REPLACE_ME_AZ_A".into(), "subnet-0abc".into()];
        row.security_group_ids = vec!["default".into()];
        row.instance_types = vec!["c6i.4xlarge".into(), "big".into()];
        let err = preflight(&Profile::try_from(row).unwrap()).unwrap_err();
        assert!(err.contains("subnet \"subnet-REPLACE_ME_AZ_A\""), "{err}");
        assert!(!err.contains("subnet-0abc"), "{err}");
        assert!(err.contains("security group \"default\""), "{err}");
        assert!(err.contains("instance type \"big\""), "{err}");

        // A filter is not an id; CPU options do not fit bare metal.
        let mut row = example_row("bench", &["bench"]);
        row.image_id = None;
        row.image_filter = Some("self/bench-*".into());
        assert!(preflight(&Profile::try_from(row.clone()).unwrap()).is_ok());
        row.threads_per_core = Some(1);
        row.instance_types = vec!["c6i.8xlarge".into(), "c6i.metal".into()];
        let err = preflight(&Profile::try_from(row).unwrap()).unwrap_err();
        assert!(err.contains("\"c6i.metal\" is bare metal"), "{err}");
        assert!(!err.contains("c6i.8xlarge"), "{err}");
    }
}
