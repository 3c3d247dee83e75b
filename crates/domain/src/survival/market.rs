//! Which market a profile's next runner is launched on, and why.
//!
//! Demand is counted, not bound (DESIGN.md principle 2): the runner launched
//! "for" a re-run may be taken by another job. So the rule counts, per
//! profile, the queued jobs that should run on-demand — re-runs of
//! interrupted jobs, and jobs whose history says they run longer than the
//! profile trusts spot with — and launches on-demand while fewer on-demand
//! runners than that are on the way or idle.

use crate::planner::launch_candidates;
use crate::survival::Breaker;
use crate::{Market, Profile};

/// Runs of the same repository + workflow + job name the duration rule looks at.
pub const HISTORY_RUNS: usize = 20;

/// What the ledger says about one queued job of the profile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueuedJobFacts {
    pub job_id: i64,
    /// It re-runs a job a spot reclaim interrupted.
    pub rerun_of_interrupted: bool,
    /// Minutes the last runs of the same repository + workflow + job name
    /// took, newest first (at most [`HISTORY_RUNS`] are used).
    pub history_minutes: Vec<f64>,
}

/// Everything [`choose_market`] looks at.
#[derive(Clone, Debug)]
pub struct MarketInputs<'a> {
    /// The profile's queued jobs, oldest first.
    pub queued: &'a [QueuedJobFacts],
    /// On-demand runners of the profile on the way or idle (not busy), not
    /// counting the one being decided; `None` while not counted. Counting
    /// them takes a per-profile lock, so it is only done when the answer
    /// depends on it (see [`choose_market`]).
    pub on_demand_available: Option<usize>,
    pub breaker: Breaker,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarketChoice {
    pub market: Market,
    /// Said by `jobs explain` and the launch log line.
    pub reason: String,
}

impl MarketChoice {
    fn new(market: Market, reason: impl Into<String>) -> Self {
        Self {
            market,
            reason: reason.into(),
        }
    }

    /// The launch walk for this choice: the profile's own walk (spot first,
    /// then on-demand if it falls back) when spot was chosen; on-demand only,
    /// over every type and subnet, when on-demand was.
    pub fn candidates(&self, profile: &Profile) -> Vec<(String, Option<String>, Market)> {
        match self.market {
            Market::Spot => launch_candidates(profile),
            Market::OnDemand => {
                let mut p = profile.clone();
                p.market = Market::OnDemand;
                launch_candidates(&p)
            }
        }
    }
}

/// The 90th percentile (nearest rank) of the newest [`HISTORY_RUNS`] values.
pub fn p90(minutes: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = minutes
        .iter()
        .take(HISTORY_RUNS)
        .copied()
        .filter(|m| m.is_finite())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (0.9 * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Why this queued job should run on-demand, if it should.
fn wants_on_demand(profile: &Profile, job: &QueuedJobFacts) -> Option<String> {
    let s = &profile.survival;
    if job.rerun_of_interrupted && s.rerun_market == Market::OnDemand {
        return Some(format!(
            "job {} re-runs a job a spot reclaim interrupted (rerun_market = on-demand)",
            job.job_id
        ));
    }
    let limit = s.spot_max_job_minutes?;
    let p = p90(&job.history_minutes)?;
    (p > f64::from(limit)).then(|| {
        format!(
            "job {} usually runs {p:.0} min (p90 of its last {} runs) > spot_max_job_minutes = {limit}",
            job.job_id,
            job.history_minutes.len().min(HISTORY_RUNS)
        )
    })
}

/// The market of the profile's next launch, with the reason; `None` when
/// it depends on the on-demand runners available and those were not
/// counted (some queued job wants on-demand). With the count it always
/// answers.
pub fn choose_market(profile: &Profile, inputs: &MarketInputs<'_>) -> Option<MarketChoice> {
    if profile.market == Market::OnDemand {
        return Some(MarketChoice::new(
            Market::OnDemand,
            "the profile's market is on-demand",
        ));
    }
    if inputs.breaker.is_open() && profile.on_demand_fallback {
        return Some(MarketChoice::new(
            Market::OnDemand,
            format!(
                "{} (on_demand_fallback)",
                inputs.breaker.describe(&profile.survival)
            ),
        ));
    }
    let wanting: Vec<String> = inputs
        .queued
        .iter()
        .filter_map(|j| wants_on_demand(profile, j))
        .collect();
    if !wanting.is_empty() {
        if let Some(reason) = wanting.get(inputs.on_demand_available?) {
            return Some(MarketChoice::new(Market::OnDemand, reason.clone()));
        }
    }
    let mut reason = "spot, the profile's market".to_owned();
    if inputs.breaker.is_open() {
        reason.push_str(&format!(
            "; {} but on_demand_fallback is off",
            inputs.breaker.describe(&profile.survival)
        ));
    }
    if !wanting.is_empty() {
        reason.push_str(&format!(
            "; the {} queued job(s) that want on-demand have on-demand runners",
            wanting.len()
        ));
    }
    Some(MarketChoice::new(Market::Spot, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::example_row;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn profile(f: impl FnOnce(&mut crate::profile::ProfileRow)) -> Profile {
        let mut row = example_row("kani", &["kani"]);
        f(&mut row);
        Profile::try_from(row).unwrap()
    }

    fn rerun(id: i64) -> QueuedJobFacts {
        QueuedJobFacts {
            job_id: id,
            rerun_of_interrupted: true,
            history_minutes: vec![],
        }
    }

    fn plain(id: i64, history: &[f64]) -> QueuedJobFacts {
        QueuedJobFacts {
            job_id: id,
            rerun_of_interrupted: false,
            history_minutes: history.to_vec(),
        }
    }

    fn open() -> Breaker {
        let t = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        Breaker::Open {
            since: t,
            until: t + chrono::Duration::minutes(30),
        }
    }

    fn choose(p: &Profile, queued: &[QueuedJobFacts], od: usize, breaker: Breaker) -> MarketChoice {
        choose_market(
            p,
            &MarketInputs {
                queued,
                on_demand_available: Some(od),
                breaker,
            },
        )
        .expect("with the count it always answers")
    }

    #[test]
    fn p90_is_the_nearest_rank() {
        assert_eq!(p90(&[]), None);
        assert_eq!(p90(&[5.0]), Some(5.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(p90(&ten), Some(9.0));
        let v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(p90(&v), Some(18.0));
        // Only the newest HISTORY_RUNS count.
        let mut long: Vec<f64> = vec![1.0; HISTORY_RUNS];
        long.extend([500.0; 10]);
        assert_eq!(p90(&long), Some(1.0));
    }

    #[test]
    fn table() {
        let spot = profile(|_| {});
        let limited = profile(|r| r.spot_max_job_minutes = Some(60));
        let no_fallback = profile(|r| r.on_demand_fallback = false);
        let rerun_on_spot = profile(|r| r.rerun_market = "spot".into());
        let on_demand = profile(|r| r.market = "on-demand".into());
        let long = plain(1, &[90.0, 100.0, 110.0]);
        let short = plain(
            2,
            &[20.0, 25.0, 120.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0],
        );
        // (what, profile, queued jobs, on-demand runners available, breaker,
        // expected market, words the reason must contain)
        type Case<'a> = (
            &'a str,
            &'a Profile,
            Vec<QueuedJobFacts>,
            usize,
            Breaker,
            Market,
            &'a str,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "nothing special",
                &spot,
                vec![plain(1, &[])],
                0,
                Breaker::Closed,
                Market::Spot,
                "the profile's market",
            ),
            (
                "on-demand profile",
                &on_demand,
                vec![],
                0,
                Breaker::Closed,
                Market::OnDemand,
                "market is on-demand",
            ),
            (
                "re-run",
                &spot,
                vec![plain(1, &[]), rerun(7)],
                0,
                Breaker::Closed,
                Market::OnDemand,
                "job 7 re-runs",
            ),
            (
                "re-run already covered",
                &spot,
                vec![rerun(7)],
                1,
                Breaker::Closed,
                Market::Spot,
                "have on-demand runners",
            ),
            (
                "second re-run not covered",
                &spot,
                vec![rerun(7), rerun(8)],
                1,
                Breaker::Closed,
                Market::OnDemand,
                "job 8",
            ),
            (
                "re-run on spot by choice",
                &rerun_on_spot,
                vec![rerun(7)],
                0,
                Breaker::Closed,
                Market::Spot,
                "the profile's market",
            ),
            (
                "breaker open",
                &spot,
                vec![],
                0,
                open(),
                Market::OnDemand,
                "spot breaker open",
            ),
            (
                "breaker open, no fallback",
                &no_fallback,
                vec![],
                0,
                open(),
                Market::Spot,
                "on_demand_fallback is off",
            ),
            (
                "long job",
                &limited,
                vec![long.clone()],
                0,
                Breaker::Closed,
                Market::OnDemand,
                "p90 of its last 3 runs",
            ),
            (
                "long job without a limit",
                &spot,
                vec![long],
                0,
                Breaker::Closed,
                Market::Spot,
                "the profile's market",
            ),
            (
                "one slow outlier is below p90",
                &limited,
                vec![short],
                0,
                Breaker::Closed,
                Market::Spot,
                "the profile's market",
            ),
            (
                "no history",
                &limited,
                vec![plain(3, &[])],
                0,
                Breaker::Closed,
                Market::Spot,
                "the profile's market",
            ),
        ];
        for (what, p, queued, od, breaker, market, reason) in cases {
            let c = choose(p, &queued, od, breaker);
            assert_eq!(c.market, market, "{what}: {}", c.reason);
            assert!(c.reason.contains(reason), "{what}: {}", c.reason);
        }
    }

    #[test]
    fn on_demand_candidates_skip_spot_even_without_fallback() {
        let p = profile(|r| r.on_demand_fallback = false);
        let c = MarketChoice::new(Market::OnDemand, "x").candidates(&p);
        assert_eq!(c.len(), 4);
        assert!(c.iter().all(|(_, _, m)| *m == Market::OnDemand));
        let c = MarketChoice::new(Market::Spot, "x").candidates(&p);
        assert!(c.iter().all(|(_, _, m)| *m == Market::Spot));
    }

    proptest! {
        /// On-demand is chosen exactly while fewer on-demand runners are
        /// available than queued re-runs want (breaker closed, spot profile).
        #[test]
        fn reruns_get_as_many_on_demand_runners_as_they_need(
            reruns in 0usize..6, plain_jobs in 0usize..6, od in 0usize..8,
        ) {
            let p = profile(|_| {});
            let mut queued: Vec<QueuedJobFacts> = (0..plain_jobs as i64).map(|i| plain(i, &[])).collect();
            queued.extend((0..reruns as i64).map(|i| rerun(100 + i)));
            let c = choose(&p, &queued, od, Breaker::Closed);
            prop_assert_eq!(c.market == Market::OnDemand, od < reruns);
        }

        /// Without the on-demand count it answers exactly when no queued
        /// job wants on-demand, and then as it would with any count.
        #[test]
        fn the_count_is_asked_for_only_when_it_can_change_the_answer(
            reruns in 0usize..4, long_jobs in 0usize..4, od in 0usize..6,
            limited in any::<bool>(), on_demand in any::<bool>(), breaker_open in any::<bool>(),
        ) {
            let p = profile(|r| {
                r.spot_max_job_minutes = limited.then_some(60);
                if on_demand {
                    r.market = "on-demand".into();
                }
            });
            let mut queued: Vec<QueuedJobFacts> =
                (0..long_jobs as i64).map(|i| plain(i, &[90.0, 100.0])).collect();
            queued.extend((0..reruns as i64).map(|i| rerun(100 + i)));
            let breaker = if breaker_open { open() } else { Breaker::Closed };
            let uncounted = choose_market(&p, &MarketInputs {
                queued: &queued,
                on_demand_available: None,
                breaker,
            });
            let wanted = !on_demand && !breaker_open && (reruns > 0 || (limited && long_jobs > 0));
            prop_assert_eq!(uncounted.is_none(), wanted);
            if let Some(c) = uncounted {
                prop_assert_eq!(c, choose(&p, &queued, od, breaker));
            }
        }

        #[test]
        fn p90_lies_within_the_values(v in proptest::collection::vec(0.0f64..1000.0, 1..40)) {
            let got = p90(&v).unwrap();
            let used = &v[..v.len().min(HISTORY_RUNS)];
            prop_assert!(used.contains(&got));
            let below = used.iter().filter(|x| **x <= got).count();
            prop_assert!(below * 10 >= used.len() * 9);
        }
    }
}
