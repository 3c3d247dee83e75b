//! Webhook delivery faults: lost, delivered twice (a redelivery keeps its
//! GUID), out of order, late. Drawn from a seeded generator, so a run with
//! the same seed loses the same deliveries.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::payload::Delivery;

/// Chances, each from 0 to 1, per delivery.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultRates {
    /// Never arrives.
    #[serde(default)]
    pub lost: f64,
    /// Arrives, and arrives again (same GUID) up to `max_delay` later.
    #[serde(default)]
    pub duplicated: f64,
    /// Overtaken by the deliveries of the next step.
    #[serde(default)]
    pub reordered: f64,
    /// Arrives up to `max_delay` late.
    #[serde(default)]
    pub delayed: f64,
    #[serde(default = "default_max_delay")]
    pub max_delay: Dur,
}

fn default_max_delay() -> Dur {
    Dur::secs(30)
}

impl FaultRates {
    pub fn none() -> Self {
        Self {
            max_delay: default_max_delay(),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("reordered", self.reordered),
            ("delayed", self.delayed),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("webhooks.{name} = {rate} is not between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// How many deliveries each fault hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Deliveries the simulated GitHub produced.
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub delayed: u64,
}

/// Sits between the world and the service.
pub struct FaultLayer {
    rates: FaultRates,
    rng: StdRng,
    /// Late deliveries: due time, order of holding, the delivery.
    held: Vec<(Instant, u64, Delivery)>,
    /// Reordered deliveries, released after the next step's.
    behind: Vec<Delivery>,
    seq: u64,
    pub counts: FaultCounts,
}

impl FaultLayer {
    pub fn new(rates: FaultRates, rng: StdRng) -> Self {
        Self {
            rates,
            rng,
            held: Vec::new(),
            behind: Vec::new(),
            seq: 0,
            counts: FaultCounts::default(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p.min(1.0))
    }

    fn later(&mut self, now: Instant) -> Instant {
        let max = self.rates.max_delay.0.as_millis().max(1) as u64;
        now + Duration::from_millis(self.rng.gen_range(1..=max))
    }

    fn hold(&mut self, due: Instant, d: Delivery) {
        self.seq += 1;
        self.held.push((due, self.seq, d));
    }

    /// What arrives at the service now: late deliveries that are due, then
    /// this step's (minus the faulty ones), then those held back last step.
    pub fn apply(&mut self, now: Instant, fresh: Vec<Delivery>) -> Vec<Delivery> {
        let overtaken = std::mem::take(&mut self.behind);
        let mut now_out = Vec::new();
        for d in fresh {
            self.counts.sent += 1;
            if self.chance(self.rates.lost) {
                self.counts.lost += 1;
                continue;
            }
            if self.chance(self.rates.duplicated) {
                self.counts.duplicated += 1;
                let due = self.later(now);
                self.hold(due, d.clone());
            }
            if self.chance(self.rates.delayed) {
                self.counts.delayed += 1;
                let due = self.later(now);
                self.hold(due, d);
            } else if self.chance(self.rates.reordered) {
                self.counts.reordered += 1;
                self.behind.push(d);
            } else {
                now_out.push(d);
            }
        }
        self.held.sort_by_key(|(due, seq, _)| (*due, *seq));
        let due_count = self
            .held
            .iter()
            .take_while(|(due, _, _)| *due <= now)
            .count();
        let mut out: Vec<Delivery> = self.held.drain(..due_count).map(|(_, _, d)| d).collect();
        out.extend(now_out);
        out.extend(overtaken);
        out
    }

    /// Deliveries not yet arrived (held late or behind).
    pub fn in_flight(&self) -> usize {
        self.held.len() + self.behind.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn delivery(i: i64) -> Delivery {
        Delivery {
            event: "workflow_job",
            guid: format!("guid-{i}"),
            action: "queued",
            job_id: i,
            body: "{}".into(),
        }
    }

    fn run(rates: FaultRates, seed: u64) -> (Vec<Delivery>, FaultCounts) {
        let mut layer = FaultLayer::new(rates, StdRng::seed_from_u64(seed));
        let t0 = Instant::now();
        let mut out = Vec::new();
        for step in 0..1000i64 {
            let now = t0 + Duration::from_secs(step as u64);
            out.extend(layer.apply(now, vec![delivery(step)]));
        }
        // Let everything late arrive.
        out.extend(layer.apply(t0 + Duration::from_secs(5000), vec![]));
        out.extend(layer.apply(t0 + Duration::from_secs(5001), vec![]));
        (out, layer.counts)
    }

    #[test]
    fn lost_and_duplicated_at_their_rates_keeping_guids() {
        let rates = FaultRates {
            lost: 0.1,
            duplicated: 0.05,
            ..FaultRates::none()
        };
        let (out, counts) = run(rates.clone(), 7);
        assert_eq!(counts.sent, 1000);
        assert!((70..=130).contains(&counts.lost), "{counts:?}");
        assert!((25..=80).contains(&counts.duplicated), "{counts:?}");
        assert_eq!(
            out.len() as u64,
            counts.sent - counts.lost + counts.duplicated
        );
        // A duplicate is the same delivery: same GUID, same body.
        let mut by_guid = std::collections::BTreeMap::new();
        for d in &out {
            by_guid
                .entry(d.guid.clone())
                .or_insert_with(Vec::new)
                .push(d);
        }
        let twice = by_guid.values().filter(|v| v.len() == 2).count() as u64;
        assert_eq!(twice, counts.duplicated);
        assert!(by_guid.values().all(|v| v.iter().all(|d| d == &v[0])));
        // The same seed loses the same deliveries.
        assert_eq!(run(rates.clone(), 7).0, out);
        assert_ne!(run(rates, 8).0, out);
    }

    #[test]
    fn reordered_and_delayed_deliveries_arrive_after_later_ones() {
        let rates = FaultRates {
            reordered: 0.1,
            delayed: 0.1,
            ..FaultRates::none()
        };
        let (out, counts) = run(rates, 3);
        assert_eq!(out.len(), 1000, "nothing lost");
        assert!(counts.reordered > 0 && counts.delayed > 0);
        let out_of_order = out.windows(2).filter(|w| w[0].job_id > w[1].job_id).count();
        assert!(out_of_order > 50, "{out_of_order}");
    }

    #[test]
    fn no_faults_is_the_identity() {
        let (out, counts) = run(FaultRates::none(), 1);
        assert_eq!(counts.lost + counts.duplicated + counts.delayed, 0);
        let ids: Vec<i64> = out.iter().map(|d| d.job_id).collect();
        assert_eq!(ids, (0..1000).collect::<Vec<_>>());
    }
}
