//! Which failed webhook deliveries to ask GitHub to send again.
//!
//! GitHub does not retry a delivery the receiver failed (a 503 while the
//! database was down, a timeout). Its delivery log keeps every attempt; a
//! redelivery is a new attempt with the same GUID. Asking for one costs a
//! single API call, far less than polling repositories for the jobs whose
//! deliveries were lost.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use crate::ports::HookDelivery;

/// How often the leader reads the hook's delivery log (RunsOn does the
/// same every 5 minutes).
pub const SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// A successful scan counts as healing for this long: two scan periods and
/// a margin, so one late or failed scan alone changes nothing.
pub const HEALS_FOR: Duration = Duration::minutes(11);

/// Whether failed deliveries are being healed: when this process last read
/// the hook's delivery log. The redelivery scan records it; the poll for
/// lost `queued` jobs reads it, and polls busy repositories every minute
/// only while redelivery is not working (not configured, no permission,
/// GitHub failing), because a failed delivery has no other trace.
#[derive(Debug, Default)]
pub struct Healing(Mutex<Option<DateTime<Utc>>>);

impl Healing {
    /// The delivery log was read at `at`.
    pub fn scanned(&self, at: DateTime<Utc>) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some(last.map_or(at, |l| l.max(at)));
    }

    /// Whether a scan succeeded within [`HEALS_FOR`] of `now`.
    pub fn heals(&self, now: DateTime<Utc>) -> bool {
        let last = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|at| now - at < HEALS_FOR)
    }
}

/// The events the service acts on; failures of any other event are left
/// alone (nothing was lost).
pub const EVENTS: &[&str] = &["workflow_job", "workflow_run"];

/// The attempts to redeliver, oldest GUID first: one per GUID that failed
/// every attempt in `log`, is not in the ledger (`held`) and was not asked
/// for before (`asked`). Of each such GUID the newest attempt is named.
pub fn to_redeliver<'a>(
    log: &'a [HookDelivery],
    held: &BTreeSet<String>,
    asked: &HashSet<String>,
) -> Vec<&'a HookDelivery> {
    let mut by_guid: BTreeMap<&str, Vec<&HookDelivery>> = BTreeMap::new();
    for d in log.iter().filter(|d| EVENTS.contains(&d.event.as_str())) {
        by_guid.entry(d.guid.as_str()).or_default().push(d);
    }
    let mut due: Vec<(&HookDelivery, &HookDelivery)> = by_guid
        .into_iter()
        .filter(|(guid, attempts)| {
            !attempts.iter().any(|a| a.succeeded())
                && !held.contains(*guid)
                && !asked.contains(*guid)
        })
        .filter_map(|(_, attempts)| {
            let first = attempts.iter().min_by_key(|a| (a.delivered_at, a.id))?;
            let newest = attempts.iter().max_by_key(|a| (a.delivered_at, a.id))?;
            Some((*first, *newest))
        })
        .collect();
    due.sort_by_key(|(first, _)| (first.delivered_at, first.id));
    due.into_iter().map(|(_, newest)| newest).collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn healing_holds_for_two_scan_periods_after_a_successful_scan() {
        let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        let healing = Healing::default();
        assert!(!healing.heals(t0), "never scanned: not healing");
        healing.scanned(t0);
        assert!(healing.heals(t0 + Duration::minutes(10)));
        assert!(!healing.heals(t0 + HEALS_FOR));
        // An older scan reported late does not move it back.
        healing.scanned(t0 + Duration::minutes(5));
        healing.scanned(t0);
        assert!(healing.heals(t0 + Duration::minutes(15)));
        assert!(!healing.heals(t0 + Duration::minutes(16)));
        let scan = Duration::from_std(SCAN_EVERY).unwrap();
        assert!(HEALS_FOR > scan * 2, "one missed scan must not end healing");
    }

    fn attempt(id: i64, guid: &str, minute: u32, status_code: u16) -> HookDelivery {
        HookDelivery {
            id,
            guid: guid.into(),
            delivered_at: Utc.with_ymd_and_hms(2026, 12, 1, 10, minute, 0).unwrap(),
            redelivery: false,
            status_code,
            event: "workflow_job".into(),
            action: Some("queued".into()),
        }
    }

    fn ids(due: &[&HookDelivery]) -> Vec<i64> {
        due.iter().map(|d| d.id).collect()
    }

    #[test]
    fn failures_are_redelivered_once_each_oldest_first() {
        let log = vec![
            attempt(3, "b", 2, 503),
            attempt(2, "a", 1, 0),
            attempt(1, "c", 0, 500),
        ];
        let due = to_redeliver(&log, &BTreeSet::new(), &HashSet::new());
        assert_eq!(ids(&due), [1, 2, 3]);
        let asked: HashSet<String> = ["a".to_owned()].into();
        assert_eq!(ids(&to_redeliver(&log, &BTreeSet::new(), &asked)), [1, 3]);
    }

    #[test]
    fn a_guid_that_succeeded_or_that_the_ledger_holds_is_left_alone() {
        let log = vec![
            attempt(1, "healed", 0, 503),
            // An operator redelivered it: a newer attempt, same GUID.
            HookDelivery {
                redelivery: true,
                ..attempt(5, "healed", 3, 202)
            },
            attempt(2, "held", 1, 503),
            attempt(3, "lost", 1, 503),
            HookDelivery {
                redelivery: true,
                ..attempt(4, "lost", 2, 503)
            },
        ];
        let held: BTreeSet<String> = ["held".to_owned()].into();
        let due = to_redeliver(&log, &held, &HashSet::new());
        assert_eq!(ids(&due), [4], "the newest attempt of the lost GUID");
    }

    #[test]
    fn events_the_service_does_not_use_are_not_redelivered() {
        let mut push = attempt(1, "p", 0, 503);
        push.event = "push".into();
        let mut run = attempt(2, "r", 0, 503);
        run.event = "workflow_run".into();
        let log = [push, run];
        assert_eq!(
            ids(&to_redeliver(&log, &BTreeSet::new(), &HashSet::new())),
            [2]
        );
    }
}
