//! Money: what a runner's hours cost by the price table, the sums of
//! `spot-runners report`, the live spend rate and the daily spend cap.
//!
//! A price the table lacks is never taken as 0: the hours it covers are
//! counted apart ("unpriced") and the missing `(instance type, market)` is
//! named, so a report or a gauge can say what it does not know.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveTime, Utc};

use crate::{DomainError, Market};

/// Dollars per instance-hour, per instance type and market.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<(String, Market), f64>,
}

/// A `(instance type, market)` with no price in the table.
pub type PriceKey = (String, Market);

impl PriceTable {
    pub fn new(rows: impl IntoIterator<Item = (String, Market, f64)>) -> Self {
        Self {
            prices: rows
                .into_iter()
                .filter(|(_, _, p)| p.is_finite() && *p >= 0.0)
                .map(|(t, m, p)| ((t, m), p))
                .collect(),
        }
    }

    pub fn get(&self, instance_type: &str, market: Market) -> Option<f64> {
        self.prices
            .get(&(instance_type.to_owned(), market))
            .copied()
    }
}

/// One spot price EC2 reports (`DescribeSpotPriceHistory`), per AZ.
#[derive(Clone, Debug, PartialEq)]
pub struct SpotPrice {
    pub instance_type: String,
    pub availability_zone: Option<String>,
    pub dollars_per_hour: f64,
}

/// The price to charge per type from EC2's per-AZ answer: the highest of
/// the AZs, because the service may launch in any of the profile's subnets
/// and an estimate that errs should err towards the cap (principle 7).
pub fn current_spot_prices(samples: &[SpotPrice]) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.dollars_per_hour.is_finite() && s.dollars_per_hour >= 0.0)
    {
        let e = out.entry(s.instance_type.clone()).or_insert(0.0);
        *e = e.max(s.dollars_per_hour);
    }
    out
}

/// What became of the job a spot reclaim interrupted on a runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RerunFate {
    /// Still waiting for its run to complete, or for GitHub to accept.
    Pending,
    /// Re-run requested (or its re-run is running).
    Rerun,
    /// Given up without a re-run.
    Lost,
    /// GitHub reports the job finished well: the reclaim came after it.
    /// Nothing was thrown away, so it counts as neither interrupted nor lost.
    NotNeeded,
}

impl RerunFate {
    /// From the ledger's `rerun_state` (`pending`, `requested`, `rerun`,
    /// `lost`, `not_needed`).
    pub fn from_state(state: Option<&str>) -> Self {
        match state {
            Some("requested" | "rerun") => RerunFate::Rerun,
            Some("lost") => RerunFate::Lost,
            Some("not_needed") => RerunFate::NotNeeded,
            _ => RerunFate::Pending,
        }
    }

    /// The attempt's instance time went to waste with its job.
    fn wasted(self) -> bool {
        self != RerunFate::NotNeeded
    }
}

/// One runner's instance time, with the job it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub profile: String,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub instance_type: Option<String>,
    pub market: Option<Market>,
    /// When its instance was launched.
    pub started_at: DateTime<Utc>,
    /// When its instance ended; `None` while it lives.
    pub ended_at: Option<DateTime<Utc>>,
    /// The job it ran was interrupted by a spot reclaim of this instance.
    pub interrupted: Option<RerunFate>,
}

impl Usage {
    /// Hours of this instance inside `[from, to)`.
    pub fn hours_within(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
        let start = self.started_at.max(from);
        let end = self.ended_at.unwrap_or(to).min(to);
        if end <= start {
            return 0.0;
        }
        (end - start).num_milliseconds() as f64 / 3_600_000.0
    }
}

/// How `report` groups its lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReportBy {
    Repository,
    Workflow,
    #[default]
    Profile,
}

impl FromStr for ReportBy {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "repository" => Ok(ReportBy::Repository),
            "workflow" => Ok(ReportBy::Workflow),
            "profile" => Ok(ReportBy::Profile),
            other => Err(DomainError::InvalidReportOption(format!(
                "--by {other:?}: use repository, workflow or profile"
            ))),
        }
    }
}

impl fmt::Display for ReportBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReportBy::Repository => "repository",
            ReportBy::Workflow => "workflow",
            ReportBy::Profile => "profile",
        })
    }
}

/// The longest `--since` accepted (retention keeps less anyway).
const MAX_SINCE_DAYS: i64 = 3650;

/// `--since`: a count and a unit, `h` (hours), `d` (days) or `w` (weeks),
/// e.g. `7d`, `36h`, `2w`.
pub fn parse_since(text: &str) -> Result<Duration, DomainError> {
    let bad = |why: &str| {
        DomainError::InvalidReportOption(format!(
            "--since {text:?}: {why} (use a count and h, d or w, e.g. 7d, 36h, 2w)"
        ))
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("no unit"))?;
    let (count, unit) = t.split_at(split);
    let count: i64 = count.parse().map_err(|_| bad("no count"))?;
    if count == 0 {
        return Err(bad("must be more than 0"));
    }
    let hours = match unit {
        "h" => Some(count),
        "d" => count.checked_mul(24),
        "w" => count.checked_mul(7 * 24),
        _ => return Err(bad("unknown unit")),
    };
    match hours {
        Some(h) if h <= MAX_SINCE_DAYS * 24 => Ok(Duration::hours(h)),
        _ => Err(bad(&format!("at most {MAX_SINCE_DAYS} days"))),
    }
}

/// The sums of one report line (or of the whole report).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostLine {
    /// The repository, workflow or profile; `None` for runners that ran no
    /// job (warm, reaped idle, timed out booting) when grouped by job.
    pub key: Option<String>,
    pub runners: u64,
    pub hours: f64,
    /// Dollars, over the priced hours.
    pub cost: f64,
    /// What the spot hours would have cost on-demand, minus what they cost
    /// (over the hours both prices are known for).
    pub spot_savings: f64,
    /// What the instance time of interrupted attempts cost: paid for and
    /// thrown away with the job.
    pub lost_to_interruptions: f64,
    pub jobs_interrupted: u64,
    pub jobs_rerun: u64,
    pub jobs_lost: u64,
    /// Hours whose own price is missing (not in `cost`).
    pub unpriced_hours: f64,
    /// Prices missing for `cost` or for `spot_savings`.
    pub missing_prices: BTreeSet<PriceKey>,
}

impl CostLine {
    fn add(&mut self, u: &Usage, hours: f64, prices: &PriceTable) {
        self.runners += 1;
        self.hours += hours;
        let wasted = u.interrupted.filter(|f| f.wasted());
        if let Some(fate) = wasted {
            self.jobs_interrupted += 1;
            match fate {
                RerunFate::Rerun => self.jobs_rerun += 1,
                RerunFate::Lost => self.jobs_lost += 1,
                RerunFate::Pending | RerunFate::NotNeeded => {}
            }
        }
        let (Some(instance_type), Some(market)) = (u.instance_type.as_deref(), u.market) else {
            self.unpriced_hours += hours;
            return;
        };
        let Some(price) = prices.get(instance_type, market) else {
            self.unpriced_hours += hours;
            self.missing_prices
                .insert((instance_type.to_owned(), market));
            return;
        };
        let cost = hours * price;
        self.cost += cost;
        if wasted.is_some() {
            self.lost_to_interruptions += cost;
        }
        if market == Market::Spot {
            match prices.get(instance_type, Market::OnDemand) {
                Some(on_demand) => self.spot_savings += hours * (on_demand - price),
                None => {
                    self.missing_prices
                        .insert((instance_type.to_owned(), Market::OnDemand));
                }
            }
        }
    }

    fn merge(&mut self, other: &CostLine) {
        self.runners += other.runners;
        self.hours += other.hours;
        self.cost += other.cost;
        self.spot_savings += other.spot_savings;
        self.lost_to_interruptions += other.lost_to_interruptions;
        self.jobs_interrupted += other.jobs_interrupted;
        self.jobs_rerun += other.jobs_rerun;
        self.jobs_lost += other.jobs_lost;
        self.unpriced_hours += other.unpriced_hours;
        self.missing_prices
            .extend(other.missing_prices.iter().cloned());
    }
}

/// A report: one line per group, most expensive first, and the total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostReport {
    pub lines: Vec<CostLine>,
    pub total: CostLine,
}

/// Prices the instance time of `usages` inside `[from, to)`, grouped `by`.
/// Runners with no time in the window are left out.
pub fn summarize(
    usages: &[Usage],
    prices: &PriceTable,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    by: ReportBy,
) -> CostReport {
    let mut groups: BTreeMap<Option<String>, CostLine> = BTreeMap::new();
    for u in usages {
        let hours = u.hours_within(from, to);
        if hours <= 0.0 {
            continue;
        }
        let key = match by {
            ReportBy::Profile => Some(u.profile.clone()),
            ReportBy::Repository => u.repository.clone(),
            ReportBy::Workflow => u.workflow.clone(),
        };
        groups
            .entry(key.clone())
            .or_insert_with(|| CostLine {
                key,
                ..CostLine::default()
            })
            .add(u, hours, prices);
    }
    let mut total = CostLine::default();
    for line in groups.values() {
        total.merge(line);
    }
    let mut lines: Vec<CostLine> = groups.into_values().collect();
    lines.sort_by(|a, b| b.cost.total_cmp(&a.cost).then_with(|| a.key.cmp(&b.key)));
    CostReport { lines, total }
}

/// Midnight UTC of `now`'s day: where the daily spend cap starts counting.
pub fn utc_day_start(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive().and_time(NaiveTime::MIN).and_utc()
}

/// One live instance, for the spend rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveInstance {
    pub profile: String,
    pub instance_type: String,
    pub market: Market,
}

/// The spend rate of live instances.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpendRate {
    /// Dollars per hour per `(profile, market)`.
    pub dollars_per_hour: BTreeMap<(String, Market), f64>,
    /// Live instances with no price, counted out of the rate.
    pub unpriced_instances: u64,
    pub missing_prices: BTreeSet<PriceKey>,
}

pub fn spend_rate(live: &[LiveInstance], prices: &PriceTable) -> SpendRate {
    let mut rate = SpendRate::default();
    for i in live {
        match prices.get(&i.instance_type, i.market) {
            Some(p) => {
                *rate
                    .dollars_per_hour
                    .entry((i.profile.clone(), i.market))
                    .or_insert(0.0) += p;
            }
            None => {
                rate.unpriced_instances += 1;
                rate.missing_prices
                    .insert((i.instance_type.clone(), i.market));
            }
        }
    }
    rate
}

/// Whether today's spend has reached the daily cap (`None`: no cap).
pub fn cap_reached(spent_today: f64, cap: Option<f64>) -> bool {
    cap.is_some_and(|cap| spent_today >= cap)
}

/// Whether provisioning may launch: closed while today's spend is at or
/// past `SPOT_RUNNERS_MAX_DAILY_SPEND`. With a cap it starts closed until
/// the first spend pass has read today's spend, so a restart past the cap
/// launches nothing.
#[derive(Clone, Debug)]
pub struct SpendGate {
    cap: Option<f64>,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SpendGate {
    pub fn new(cap: Option<f64>) -> Self {
        Self {
            cap,
            closed: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(cap.is_some())),
        }
    }

    /// No cap: always open.
    pub fn unlimited() -> Self {
        Self::new(None)
    }

    /// Whether a new instance may be launched now.
    pub fn allows_launch(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn cap(&self) -> Option<f64> {
        self.cap
    }

    /// Sets the gate from today's spend; returns whether it changed.
    pub fn record_spend_today(&self, spent_today: f64) -> bool {
        let closed = cap_reached(spent_today, self.cap);
        self.closed
            .swap(closed, std::sync::atomic::Ordering::AcqRel)
            != closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(hours: f64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_796_083_200, 0).unwrap() // 2026-12-01T00:00:00Z
            + Duration::milliseconds((hours * 3_600_000.0) as i64)
    }

    fn prices() -> PriceTable {
        PriceTable::new([
            ("c6i.4xlarge".to_owned(), Market::Spot, 0.20),
            ("c6i.4xlarge".to_owned(), Market::OnDemand, 0.68),
            ("c6i.8xlarge".to_owned(), Market::OnDemand, 1.36),
            ("m6i.4xlarge".to_owned(), Market::Spot, 0.25),
        ])
    }

    fn usage(
        profile: &str,
        repo: Option<&str>,
        ty: &str,
        market: Market,
        from_h: f64,
        to_h: Option<f64>,
    ) -> Usage {
        Usage {
            profile: profile.into(),
            repository: repo.map(Into::into),
            workflow: repo.map(|r| format!("{r} ci")),
            instance_type: Some(ty.into()),
            market: Some(market),
            started_at: t(from_h),
            ended_at: to_h.map(t),
            interrupted: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_line_per_group_with_cost_savings_and_interruptions() {
        let mut reclaimed = usage(
            "kani",
            Some("a/proofs"),
            "c6i.4xlarge",
            Market::Spot,
            0.0,
            Some(1.5),
        );
        reclaimed.interrupted = Some(RerunFate::Rerun);
        let mut lost = usage(
            "kani",
            Some("a/proofs"),
            "c6i.4xlarge",
            Market::Spot,
            2.0,
            Some(2.5),
        );
        lost.interrupted = Some(RerunFate::Lost);
        // Reclaimed after its job had succeeded: 1 h of spot, 0.20, not wasted.
        let mut after_success = usage(
            "kani",
            Some("a/proofs"),
            "c6i.4xlarge",
            Market::Spot,
            6.0,
            Some(7.0),
        );
        after_success.interrupted = Some(RerunFate::NotNeeded);
        let usages = vec![
            after_success,
            // 2 h spot: 0.40 paid, 1.36 on-demand → 0.96 saved.
            usage(
                "kani",
                Some("a/proofs"),
                "c6i.4xlarge",
                Market::Spot,
                0.0,
                Some(2.0),
            ),
            reclaimed,
            lost,
            // The re-run, on-demand for 2 h: 1.36, no savings.
            usage(
                "kani",
                Some("a/proofs"),
                "c6i.4xlarge",
                Market::OnDemand,
                3.0,
                Some(5.0),
            ),
            // 3 h on-demand benchmark: 4.08.
            usage(
                "bench",
                Some("a/bench"),
                "c6i.8xlarge",
                Market::OnDemand,
                0.0,
                Some(3.0),
            ),
        ];
        let r = summarize(&usages, &prices(), t(0.0), t(24.0), ReportBy::Profile);
        let kani = r
            .lines
            .iter()
            .find(|l| l.key.as_deref() == Some("kani"))
            .unwrap();
        assert_eq!(kani.runners, 5);
        assert!(close(kani.hours, 7.0), "{}", kani.hours);
        // Spot 5 h × 0.20 + on-demand 2 h × 0.68.
        assert!(close(kani.cost, 1.0 + 1.36), "{}", kani.cost);
        assert!(
            close(kani.spot_savings, 5.0 * 0.48),
            "{}",
            kani.spot_savings
        );
        // The interrupted attempts: 1.5 h + 0.5 h of spot.
        assert!(
            close(kani.lost_to_interruptions, 0.4),
            "{}",
            kani.lost_to_interruptions
        );
        assert_eq!(
            (kani.jobs_interrupted, kani.jobs_rerun, kani.jobs_lost),
            (2, 1, 1)
        );
        assert!(kani.missing_prices.is_empty());
        // Most expensive first.
        assert_eq!(r.lines[0].key.as_deref(), Some("bench"));
        assert!(close(r.total.cost, 1.0 + 1.36 + 4.08));
        assert_eq!(r.total.runners, 6);
    }

    #[test]
    fn a_missing_price_is_named_and_its_hours_kept_apart_never_zero() {
        let usages = vec![
            usage("kani", None, "c7i.4xlarge", Market::Spot, 0.0, Some(2.0)),
            // Spot price known, on-demand not: cost counts, savings cannot.
            usage("kani", None, "m6i.4xlarge", Market::Spot, 0.0, Some(1.0)),
            Usage {
                instance_type: None,
                market: None,
                ..usage("kani", None, "x", Market::Spot, 0.0, Some(1.0))
            },
        ];
        let r = summarize(&usages, &prices(), t(0.0), t(24.0), ReportBy::Repository);
        assert_eq!(r.lines.len(), 1, "runners with no job are one line");
        let l = &r.lines[0];
        assert_eq!(l.key, None);
        assert!(close(l.cost, 0.25));
        assert!(close(l.unpriced_hours, 3.0));
        assert!(close(l.spot_savings, 0.0));
        assert_eq!(
            l.missing_prices,
            BTreeSet::from([
                ("c7i.4xlarge".to_owned(), Market::Spot),
                ("m6i.4xlarge".to_owned(), Market::OnDemand),
            ])
        );
    }

    #[test]
    fn hours_are_clipped_to_the_window_and_live_instances_run_to_its_end() {
        let table = [
            // (start, end, window from, window to, hours)
            (0.0, Some(2.0), 1.0, 24.0, 1.0),
            (0.0, Some(2.0), 3.0, 24.0, 0.0),
            (5.0, None, 0.0, 8.0, 3.0),
            (5.0, None, 6.0, 7.0, 1.0),
            (9.0, Some(10.0), 0.0, 8.0, 0.0),
        ];
        for (start, end, from, to, hours) in table {
            let u = usage("p", None, "c6i.4xlarge", Market::Spot, start, end);
            let got = u.hours_within(t(from), t(to));
            assert!(close(got, hours), "{start}..{end:?} in {from}..{to}: {got}");
        }
    }

    #[test]
    fn report_options_parse_or_say_what_is_wrong() {
        assert_eq!(parse_since("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_since("36h").unwrap(), Duration::hours(36));
        assert_eq!(parse_since("2w").unwrap(), Duration::days(14));
        for bad in [
            "",
            "7",
            "d",
            "0d",
            "7x",
            "-1d",
            "1.5d",
            "99999999999999999999d",
            "4000d",
        ] {
            let err = parse_since(bad).unwrap_err().to_string();
            assert!(err.contains("--since"), "{bad}: {err}");
        }
        assert_eq!("workflow".parse::<ReportBy>().unwrap(), ReportBy::Workflow);
        let err = "team".parse::<ReportBy>().unwrap_err().to_string();
        assert!(err.contains("repository, workflow or profile"), "{err}");
    }

    #[test]
    fn the_spend_rate_counts_unpriced_instances_apart() {
        let live = [
            LiveInstance {
                profile: "kani".into(),
                instance_type: "c6i.4xlarge".into(),
                market: Market::Spot,
            },
            LiveInstance {
                profile: "kani".into(),
                instance_type: "c6i.4xlarge".into(),
                market: Market::Spot,
            },
            LiveInstance {
                profile: "kani".into(),
                instance_type: "c6i.4xlarge".into(),
                market: Market::OnDemand,
            },
            LiveInstance {
                profile: "bench".into(),
                instance_type: "c7i.8xlarge".into(),
                market: Market::Spot,
            },
        ];
        let rate = spend_rate(&live, &prices());
        assert!(close(
            rate.dollars_per_hour[&("kani".to_owned(), Market::Spot)],
            0.40
        ));
        assert!(close(
            rate.dollars_per_hour[&("kani".to_owned(), Market::OnDemand)],
            0.68
        ));
        assert_eq!(rate.unpriced_instances, 1);
        assert!(rate
            .missing_prices
            .contains(&("c7i.8xlarge".to_owned(), Market::Spot)));
    }

    #[test]
    fn the_day_starts_at_midnight_utc_and_the_cap_is_inclusive() {
        assert_eq!(utc_day_start(t(13.5)), t(0.0));
        assert_eq!(utc_day_start(t(24.0)), t(24.0));
        assert!(!cap_reached(1_000.0, None));
        assert!(!cap_reached(49.99, Some(50.0)));
        assert!(cap_reached(50.0, Some(50.0)));
    }

    #[test]
    fn spot_prices_take_the_dearest_az() {
        let s = |ty: &str, az: &str, p: f64| SpotPrice {
            instance_type: ty.into(),
            availability_zone: Some(az.into()),
            dollars_per_hour: p,
        };
        let got = current_spot_prices(&[
            s("c6i.4xlarge", "us-east-1a", 0.21),
            s("c6i.4xlarge", "us-east-1b", 0.24),
            s("c6i.8xlarge", "us-east-1a", 0.41),
            s("c6i.8xlarge", "us-east-1b", f64::NAN),
        ]);
        assert_eq!(got.len(), 2);
        assert!(close(got["c6i.4xlarge"], 0.24));
        assert!(close(got["c6i.8xlarge"], 0.41));
    }

    fn arb_usage() -> impl Strategy<Value = Usage> {
        (
            prop::sample::select(vec!["kani", "bench"]),
            prop::sample::select(vec![
                "c6i.4xlarge",
                "c6i.8xlarge",
                "m6i.4xlarge",
                "c7i.4xlarge",
            ]),
            any::<bool>(),
            0.0f64..48.0,
            prop::option::of(0.0f64..12.0),
            prop::option::of(0u8..4),
        )
            .prop_map(|(profile, ty, spot, start, len, fate)| Usage {
                interrupted: fate.map(|f| match f {
                    0 => RerunFate::Pending,
                    1 => RerunFate::Rerun,
                    2 => RerunFate::NotNeeded,
                    _ => RerunFate::Lost,
                }),
                ..usage(
                    profile,
                    Some(profile),
                    ty,
                    if spot { Market::Spot } else { Market::OnDemand },
                    start,
                    len.map(|l| start + l),
                )
            })
    }

    proptest! {
        /// Splitting the window anywhere splits every sum: no hour is
        /// counted twice or dropped, and the parts never exceed the whole.
        #[test]
        fn sums_add_up_over_split_windows_and_groupings(
            usages in prop::collection::vec(arb_usage(), 0..30),
            split in 0.0f64..60.0,
        ) {
            let p = prices();
            let whole = summarize(&usages, &p, t(0.0), t(60.0), ReportBy::Profile);
            let a = summarize(&usages, &p, t(0.0), t(split), ReportBy::Profile).total;
            let b = summarize(&usages, &p, t(split), t(60.0), ReportBy::Profile).total;
            let eps = 1e-6;
            prop_assert!((whole.total.cost - (a.cost + b.cost)).abs() < eps);
            prop_assert!((whole.total.hours - (a.hours + b.hours)).abs() < eps);
            prop_assert!((whole.total.spot_savings - (a.spot_savings + b.spot_savings)).abs() < eps);
            let by_repo = summarize(&usages, &p, t(0.0), t(60.0), ReportBy::Repository).total;
            prop_assert!((by_repo.cost - whole.total.cost).abs() < eps);
            prop_assert_eq!(by_repo.jobs_rerun, whole.total.jobs_rerun);
            let line_sum: f64 = whole.lines.iter().map(|l| l.cost).sum();
            prop_assert!((line_sum - whole.total.cost).abs() < eps);
            prop_assert!(whole.total.lost_to_interruptions <= whole.total.cost + eps);
            prop_assert!(whole.total.spot_savings >= -eps, "on-demand is dearer in this table");
            prop_assert!(whole.total.jobs_rerun + whole.total.jobs_lost <= whole.total.jobs_interrupted);
        }
    }
}
