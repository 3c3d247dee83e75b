//! Where simulated jobs come from: kinds of job (labels, duration range,
//! repository), each arriving steadily, in bursts, or along a daily trace.
//! Every stream draws from its own seeded generator, so adding a stream
//! leaves the others' arrivals as they were.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::duration::Dur;

/// A kind of job: what its `runs-on` says and how long it runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobKind {
    /// The job's (and its workflow's) name.
    pub name: String,
    /// `runs-on`, e.g. `["self-hosted", "linux", "x64", "kani"]`.
    pub labels: Vec<String>,
    /// `owner/repo`; default `<org>/<name>`.
    #[serde(default)]
    pub repository: Option<String>,
    /// Uniform between the two.
    pub duration: [Dur; 2],
    pub arrivals: Vec<Pattern>,
    /// Jobs per workflow run (a matrix): each arrival is one run of this
    /// many jobs, named `<name> (1)`, `<name> (2)`, …, each with its own
    /// duration. Default 1.
    #[serde(default = "one_job")]
    pub matrix: u32,
}

fn one_job() -> u32 {
    1
}

/// How a kind of job arrives.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Pattern {
    /// A Poisson stream.
    Steady { per_hour: f64 },
    /// `count` jobs spread evenly at random over `spread` from `at`;
    /// again every `every`, when given.
    Burst {
        at: Dur,
        count: u32,
        #[serde(default)]
        spread: Dur,
        #[serde(default)]
        every: Option<Dur>,
    },
    /// A Poisson stream whose rate follows the hour of the day (24 rates
    /// per hour, from midnight UTC).
    Daily { per_hour: Vec<f64> },
}

impl Pattern {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Pattern::Steady { per_hour } if !(per_hour.is_finite() && *per_hour >= 0.0) => {
                Err(format!("steady.per_hour = {per_hour} must be a rate ≥ 0"))
            }
            Pattern::Burst { count: 0, .. } => Err("burst.count must be at least 1".into()),
            Pattern::Burst { every: Some(e), .. } if e.0.is_zero() => {
                Err("burst.every must be longer than 0s".into())
            }
            Pattern::Daily { per_hour } if per_hour.len() != 24 => Err(format!(
                "daily.per_hour has {} rates; it needs 24, one per hour from midnight",
                per_hour.len()
            )),
            Pattern::Daily { per_hour } if per_hour.iter().any(|r| r.is_nan() || *r < 0.0) => {
                Err("daily.per_hour rates must be ≥ 0".into())
            }
            _ => Ok(()),
        }
    }
}

/// One job, as it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub kind: String,
    pub repository: String,
    pub labels: Vec<String>,
    pub duration: Duration,
    /// In a matrix run: the arrival it belongs to (shared by the run's
    /// jobs) and its place in the matrix. `None`: a run of its own.
    pub matrix: Option<(u64, u32)>,
}

impl JobSpec {
    /// The job's name on GitHub: matrix jobs are told apart by their place.
    pub fn name(&self) -> String {
        match self.matrix {
            Some((_, i)) => format!("{} ({})", self.kind, i + 1),
            None => self.kind.clone(),
        }
    }
}

struct Stream {
    kind: usize,
    pattern: Pattern,
    rng: StdRng,
    /// Arrival offsets drawn but not yet due, ascending.
    upcoming: VecDeque<Duration>,
    /// Where the stream's own clock stands (Poisson streams), or which
    /// occurrence comes next (bursts).
    cursor: Duration,
    occurrence: u32,
    exhausted: bool,
}

const HOUR: f64 = 3600.0;

impl Stream {
    /// Makes sure the next arrival, if there is one, is drawn.
    fn refill(&mut self) {
        if !self.upcoming.is_empty() || self.exhausted {
            return;
        }
        match &self.pattern {
            Pattern::Steady { per_hour } => {
                if *per_hour <= 0.0 {
                    self.exhausted = true;
                    return;
                }
                let gap = exponential(&mut self.rng) * HOUR / per_hour;
                self.cursor += Duration::from_secs_f64(gap);
                self.upcoming.push_back(self.cursor);
            }
            Pattern::Daily { per_hour } => {
                let rates = per_hour.clone();
                match next_daily(&rates, self.cursor, exponential(&mut self.rng)) {
                    Some(t) => {
                        self.cursor = t;
                        self.upcoming.push_back(t);
                    }
                    None => self.exhausted = true,
                }
            }
            Pattern::Burst {
                at,
                count,
                spread,
                every,
            } => {
                let start = match every {
                    Some(e) => at.0 + e.0 * self.occurrence,
                    None if self.occurrence > 0 => {
                        self.exhausted = true;
                        return;
                    }
                    None => at.0,
                };
                self.occurrence += 1;
                let spread = spread.0.as_secs_f64();
                let mut offsets: Vec<Duration> = (0..*count)
                    .map(|_| start + Duration::from_secs_f64(self.rng.gen::<f64>() * spread))
                    .collect();
                offsets.sort();
                self.upcoming.extend(offsets);
            }
        }
    }
}

fn exponential(rng: &mut StdRng) -> f64 {
    // 1 - u is in (0, 1], so the log is finite.
    -(1.0 - rng.gen::<f64>()).ln()
}

/// The time at which `work` units of a unit-rate Poisson clock have passed
/// since `from`, the clock running at the hour's rate.
fn next_daily(rates: &[f64], from: Duration, mut work: f64) -> Option<Duration> {
    if rates.iter().all(|r| *r <= 0.0) {
        return None;
    }
    let mut t = from.as_secs_f64();
    loop {
        let hour = ((t / HOUR).floor() as usize) % 24;
        let rate = rates[hour] / HOUR;
        let hour_end = ((t / HOUR).floor() + 1.0) * HOUR;
        let room = (hour_end - t) * rate;
        if rate > 0.0 && room >= work {
            return Some(Duration::from_secs_f64(t + work / rate));
        }
        work -= room;
        t = hour_end;
    }
}

/// Every stream of every kind, merged in time order.
pub struct Arrivals {
    kinds: Vec<JobKind>,
    org: String,
    streams: Vec<Stream>,
    stopped: bool,
    /// Matrix arrivals so far: the key of the next one.
    runs: u64,
}

impl Arrivals {
    /// No jobs at all (tests submit their own).
    pub fn none() -> Self {
        Self {
            kinds: Vec::new(),
            org: String::new(),
            streams: Vec::new(),
            stopped: true,
            runs: 0,
        }
    }

    pub fn new(kinds: Vec<JobKind>, org: &str, seed: u64) -> Self {
        let mut streams = Vec::new();
        for (k, kind) in kinds.iter().enumerate() {
            for pattern in &kind.arrivals {
                let n = streams.len() as u64;
                streams.push(Stream {
                    kind: k,
                    pattern: pattern.clone(),
                    rng: StdRng::seed_from_u64(seed ^ (0x5eed_0000 + n).wrapping_mul(0x9e37_79b9)),
                    upcoming: VecDeque::new(),
                    cursor: Duration::ZERO,
                    occurrence: 0,
                    exhausted: false,
                });
            }
        }
        Self {
            kinds,
            org: org.to_owned(),
            streams,
            stopped: false,
            runs: 0,
        }
    }

    /// No more arrivals from now on.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Jobs whose arrival time (since the start) is at or before `elapsed`,
    /// in time order.
    pub fn due(&mut self, elapsed: Duration) -> Vec<JobSpec> {
        if self.stopped {
            return Vec::new();
        }
        let mut due: Vec<(Duration, usize, JobSpec)> = Vec::new();
        for (i, stream) in self.streams.iter_mut().enumerate() {
            loop {
                stream.refill();
                match stream.upcoming.front() {
                    Some(t) if *t <= elapsed => {
                        let t = *t;
                        stream.upcoming.pop_front();
                        let kind = &self.kinds[stream.kind];
                        let [lo, hi] = kind.duration;
                        let span = hi.0.saturating_sub(lo.0).as_secs_f64();
                        let duration =
                            lo.0 + Duration::from_secs_f64(stream.rng.gen::<f64>() * span);
                        let repository = kind
                            .repository
                            .clone()
                            .unwrap_or_else(|| format!("{}/{}", self.org, kind.name));
                        let mut spec = JobSpec {
                            kind: kind.name.clone(),
                            repository,
                            labels: kind.labels.clone(),
                            duration: Duration::from_secs(duration.as_secs().max(1)),
                            matrix: None,
                        };
                        if kind.matrix > 1 {
                            let run = self.runs;
                            self.runs += 1;
                            spec.matrix = Some((run, 0));
                            due.push((t, i, spec.clone()));
                            for m in 1..kind.matrix {
                                let d =
                                    lo.0 + Duration::from_secs_f64(stream.rng.gen::<f64>() * span);
                                due.push((
                                    t,
                                    i,
                                    JobSpec {
                                        duration: Duration::from_secs(d.as_secs().max(1)),
                                        matrix: Some((run, m)),
                                        ..spec.clone()
                                    },
                                ));
                            }
                        } else {
                            due.push((t, i, spec));
                        }
                    }
                    _ => break,
                }
            }
        }
        due.sort_by_key(|(t, i, _)| (*t, *i));
        due.into_iter().map(|(_, _, spec)| spec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(arrivals: Vec<Pattern>) -> JobKind {
        JobKind {
            name: "proof".into(),
            labels: vec!["self-hosted".into(), "kani".into()],
            repository: None,
            duration: [Dur::secs(60), Dur::secs(120)],
            arrivals,
            matrix: 1,
        }
    }

    fn count(arrivals: &mut Arrivals, hours: u64) -> usize {
        (1..=hours * 60)
            .map(|m| arrivals.due(Duration::from_secs(m * 60)).len())
            .sum()
    }

    #[test]
    fn steady_streams_arrive_at_their_rate() {
        let mut a = Arrivals::new(
            vec![kind(vec![Pattern::Steady { per_hour: 60.0 }])],
            "acme",
            1,
        );
        let n = count(&mut a, 10);
        assert!((500..=700).contains(&n), "{n}");
    }

    #[test]
    fn bursts_come_all_at_once_and_repeat() {
        let burst = Pattern::Burst {
            at: Dur::secs(600),
            count: 500,
            spread: Dur::secs(60),
            every: Some(Dur::secs(3600)),
        };
        let mut a = Arrivals::new(vec![kind(vec![burst])], "acme", 1);
        assert!(a.due(Duration::from_secs(599)).is_empty());
        assert_eq!(a.due(Duration::from_secs(660)).len(), 500);
        assert!(a.due(Duration::from_secs(4199)).is_empty());
        assert_eq!(a.due(Duration::from_secs(4260)).len(), 500);
    }

    #[test]
    fn a_daily_trace_follows_the_hour() {
        let mut rates = vec![0.0; 24];
        rates[9] = 120.0;
        let mut a = Arrivals::new(
            vec![kind(vec![Pattern::Daily { per_hour: rates }])],
            "acme",
            3,
        );
        assert_eq!(a.due(Duration::from_secs(9 * 3600)).len(), 0);
        let in_hour = a.due(Duration::from_secs(10 * 3600)).len();
        assert!((80..=160).contains(&in_hour), "{in_hour}");
        assert_eq!(a.due(Duration::from_secs(33 * 3600)).len(), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_jobs() {
        let make = |seed| {
            let mut a = Arrivals::new(
                vec![kind(vec![Pattern::Steady { per_hour: 30.0 }])],
                "acme",
                seed,
            );
            a.due(Duration::from_secs(7200))
        };
        assert_eq!(make(5), make(5));
        assert_ne!(make(5), make(6));
        let jobs = make(5);
        assert!(jobs
            .iter()
            .all(|j| j.repository == "acme/proof" && (60..=120).contains(&j.duration.as_secs())));
    }
}
