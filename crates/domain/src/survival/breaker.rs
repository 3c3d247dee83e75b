//! The spot circuit breaker: after N interruptions within a window, a
//! profile launches on-demand for a cooldown. It is computed from the
//! ledger's interruption times on every call, so it survives restarts and
//! every replica agrees on it.

use chrono::{DateTime, Duration, Utc};

use crate::profile::SurvivalPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    /// Tripped at `since` (the interruption that made N within the window).
    Open {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        matches!(self, Breaker::Open { .. })
    }

    /// For `jobs explain` and log lines.
    pub fn describe(&self, policy: &SurvivalPolicy) -> String {
        match self {
            Breaker::Closed => "spot breaker closed".to_owned(),
            Breaker::Open { since, until } => format!(
                "spot breaker open since {} until {} ({} interruptions within {} s)",
                since.to_rfc3339(),
                until.to_rfc3339(),
                policy.breaker_interruptions,
                policy.breaker_window_secs
            ),
        }
    }
}

/// The breaker at `now`, given the times of the profile's interruptions
/// (any order; those after `now` are ignored). It trips at every
/// interruption that is the N-th within the window, and stays open for the
/// cooldown after the latest trip.
pub fn breaker_state(
    policy: &SurvivalPolicy,
    interruptions: &[DateTime<Utc>],
    now: DateTime<Utc>,
) -> Breaker {
    let n = policy.breaker_interruptions.max(1) as usize;
    let window = Duration::seconds(i64::from(policy.breaker_window_secs));
    let cooldown = Duration::seconds(i64::from(policy.breaker_cooldown_secs));
    let mut times: Vec<DateTime<Utc>> = interruptions
        .iter()
        .copied()
        .filter(|t| *t <= now)
        .collect();
    times.sort_unstable();
    let latest_trip = (n - 1..times.len())
        .rev()
        .find(|&i| times[i] - times[i + 1 - n] <= window)
        .map(|i| times[i]);
    match latest_trip {
        Some(since) if now < since + cooldown => Breaker::Open {
            since,
            until: since + cooldown,
        },
        _ => Breaker::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn at(min: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(min)
    }

    #[test]
    fn defaults_two_in_fifteen_minutes_open_for_thirty() {
        let p = SurvivalPolicy::default();
        // (what, interruptions at minute, now at minute, open from..until)
        type Case<'a> = (&'a str, &'a [i64], i64, Option<(i64, i64)>);
        let cases: &[Case<'_>] = &[
            ("none", &[], 0, None),
            ("one", &[0], 1, None),
            ("two within 15 min", &[0, 10], 11, Some((10, 40))),
            ("exactly 15 min apart", &[0, 15], 16, Some((15, 45))),
            ("16 min apart", &[0, 16], 17, None),
            ("cooldown over", &[0, 10], 40, None),
            ("just before the end", &[0, 10], 39, Some((10, 40))),
            ("a later trip extends it", &[0, 10, 20], 45, Some((20, 50))),
            ("future ones are ignored", &[0, 30], 5, None),
            ("unsorted", &[10, 0], 11, Some((10, 40))),
        ];
        for (what, times, now, want) in cases {
            let times: Vec<_> = times.iter().map(|m| at(*m)).collect();
            let got = breaker_state(&p, &times, at(*now));
            let want = want.map_or(Breaker::Closed, |(s, u)| Breaker::Open {
                since: at(s),
                until: at(u),
            });
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn three_needed_when_the_profile_says_so() {
        let p = SurvivalPolicy {
            breaker_interruptions: 3,
            ..SurvivalPolicy::default()
        };
        assert_eq!(breaker_state(&p, &[at(0), at(1)], at(2)), Breaker::Closed);
        assert!(breaker_state(&p, &[at(0), at(1), at(2)], at(3)).is_open());
        assert!(Breaker::Open {
            since: at(0),
            until: at(1)
        }
        .describe(&p)
        .contains("3 interruptions within 900 s"));
    }

    proptest! {
        /// Open exactly when some N interruptions within the window end
        /// no more than the cooldown ago; more interruptions never close it.
        #[test]
        fn open_iff_a_recent_burst(
            mins in proptest::collection::vec(0i64..240, 0..12),
            extra in 0i64..240,
            now in 0i64..300,
            n in 1u32..4,
        ) {
            let p = SurvivalPolicy { breaker_interruptions: n, ..SurvivalPolicy::default() };
            let times: Vec<_> = mins.iter().map(|m| at(*m)).collect();
            let state = breaker_state(&p, &times, at(now));
            let mut past: Vec<i64> = mins.iter().copied().filter(|m| *m <= now).collect();
            past.sort_unstable();
            let burst = past.iter().any(|&end| {
                now - end < 30
                    && past.iter().filter(|&&m| m <= end && end - m <= 15).count() >= n as usize
            });
            prop_assert_eq!(state.is_open(), burst);
            let mut more = times.clone();
            more.push(at(extra));
            if state.is_open() {
                prop_assert!(breaker_state(&p, &more, at(now)).is_open());
            }
        }
    }
}
