//! Scenario files for `spot-runners simulate` (JSON): profiles, kinds of
//! job and how they arrive, the cloud's and GitHub's behaviour, webhook
//! faults, seed and duration. See `examples/*.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spot_runners_domain::profile::ProfileRow;
use spot_runners_domain::Profile;

use crate::arrivals::JobKind;
use crate::duration::Dur;
use crate::faults::FaultRates;

/// A scenario file that cannot be used: which file, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ScenarioError {
    pub path: String,
    pub message: String,
}

/// Dollars per instance-hour.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub spot: f64,
    pub on_demand: f64,
}

/// Rough us-east-1 Linux prices; a scenario may override or add to them.
pub fn default_prices() -> BTreeMap<String, Price> {
    [
        ("c6i.4xlarge", 0.20, 0.68),
        ("c6i.8xlarge", 0.40, 1.36),
        ("c6a.4xlarge", 0.19, 0.612),
        ("c6a.8xlarge", 0.38, 1.224),
        ("m6i.4xlarge", 0.25, 0.768),
        ("m6i.8xlarge", 0.50, 1.536),
    ]
    .into_iter()
    .map(|(t, spot, on_demand)| (t.to_owned(), Price { spot, on_demand }))
    .collect()
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudModel {
    /// Spot reclaims per running instance-hour, by instance type
    /// (`default` for the rest).
    #[serde(default)]
    pub interruptions_per_hour: BTreeMap<String, f64>,
    /// Chance (0–1) that a spot launch of the type finds no capacity
    /// (`default` for the rest).
    #[serde(default)]
    pub spot_capacity_error_rate: BTreeMap<String, f64>,
    /// Added to, or replacing, [`default_prices`].
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Interruption storms: for a while, one pool's spot instances are
    /// reclaimed at a rate of their own.
    #[serde(default)]
    pub storms: Vec<Storm>,
}

/// A spot interruption storm in one pool (an instance type, in one subnet
/// or in all): from `at` (since the start) for `lasts`, its running spot
/// instances are reclaimed at `per_hour` instead of the usual rate.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Storm {
    pub instance_type: String,
    #[serde(default)]
    pub subnet_id: Option<String>,
    pub at: Dur,
    pub lasts: Dur,
    pub per_hour: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubModel {
    /// From a job's end until its instance has powered itself off.
    #[serde(default = "default_exit_delay")]
    pub runner_exit_delay: Dur,
    /// From an instance's death until GitHub fails its job.
    #[serde(default = "default_failure_delay")]
    pub failure_report_delay: Dur,
}

impl Default for GitHubModel {
    fn default() -> Self {
        Self {
            runner_exit_delay: default_exit_delay(),
            failure_report_delay: default_failure_delay(),
        }
    }
}

/// An `instance_profiles` row, with the table's column names and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioProfile {
    pub name: String,
    pub labels: Vec<String>,
    #[serde(default = "default_types")]
    pub instance_types: Vec<String>,
    #[serde(default)]
    pub subnet_ids: Vec<String>,
    #[serde(default = "default_market")]
    pub market: String,
    #[serde(default = "yes")]
    pub on_demand_fallback: bool,
    #[serde(default = "default_max_instances")]
    pub max_instances: i32,
    #[serde(default)]
    pub min_idle: i32,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: i32,
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: i32,
    #[serde(default = "default_lifetime")]
    pub max_lifetime_secs: i32,
    #[serde(default)]
    pub repositories: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i32,
    /// Re-runs of a job a spot reclaim killed; 0 turns re-runs off.
    #[serde(default = "default_reruns")]
    pub max_interruption_reruns: i32,
    #[serde(default = "default_rerun_market")]
    pub rerun_market: String,
}

fn default_reruns() -> i32 {
    2
}
fn default_rerun_market() -> String {
    "on-demand".into()
}

impl ScenarioProfile {
    pub fn row(&self) -> ProfileRow {
        ProfileRow {
            name: self.name.clone(),
            labels: self.labels.clone(),
            instance_types: self.instance_types.clone(),
            image_id: Some("ami-0123456789abcdef0".into()),
            image_filter: None,
            subnet_ids: self.subnet_ids.clone(),
            security_group_ids: vec![],
            iam_instance_profile: None,
            market: self.market.clone(),
            on_demand_fallback: self.on_demand_fallback,
            max_instances: self.max_instances,
            min_idle: self.min_idle,
            idle_timeout_secs: self.idle_timeout_secs,
            boot_timeout_secs: self.boot_timeout_secs,
            max_lifetime_secs: self.max_lifetime_secs,
            runner_group_id: 1,
            root_volume_gb: 64,
            repositories: self.repositories.clone(),
            enabled: true,
            priority: self.priority,
            max_interruption_reruns: self.max_interruption_reruns,
            rerun_market: self.rerun_market.clone(),
            rerun_own_failures: false,
            spot_breaker_interruptions: 2,
            spot_breaker_window_secs: 900,
            spot_breaker_cooldown_secs: 1800,
            spot_max_job_minutes: None,
            threads_per_core: None,
            benchmark_tuning: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default = "one")]
    pub seed: u64,
    /// How long jobs arrive; the run goes on until they are done (at most
    /// `drain` more).
    pub duration: Dur,
    #[serde(default = "default_drain")]
    pub drain: Dur,
    #[serde(default = "default_org")]
    pub org: String,
    /// From `RunInstances` until the runner is online.
    #[serde(default = "default_boot")]
    pub boot_time: Dur,
    #[serde(default = "default_interval")]
    pub reconcile_interval: Dur,
    /// `SPOT_RUNNERS_MAX_INSTANCES`.
    #[serde(default = "default_global_max")]
    pub max_instances: u32,
    pub profiles: Vec<ScenarioProfile>,
    pub jobs: Vec<JobKind>,
    #[serde(default)]
    pub cloud: CloudModel,
    #[serde(default)]
    pub github: GitHubModel,
    #[serde(default = "FaultRates::none")]
    pub webhooks: FaultRates,
    /// The reconciler crashes this often, at a random IO call inside a
    /// pass, sweep or launch, and restarts on the same ledger.
    #[serde(default)]
    pub crashes_per_hour: f64,
}

fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_types() -> Vec<String> {
    vec!["c6i.4xlarge".into()]
}
fn default_market() -> String {
    "spot".into()
}
fn default_max_instances() -> i32 {
    10
}
fn default_idle_timeout() -> i32 {
    300
}
fn default_boot_timeout() -> i32 {
    600
}
fn default_lifetime() -> i32 {
    28_800
}
fn default_drain() -> Dur {
    Dur::secs(12 * 3600)
}
fn default_org() -> String {
    "acme".into()
}
fn default_boot() -> Dur {
    Dur::secs(60)
}
fn default_interval() -> Dur {
    Dur::secs(15)
}
fn default_global_max() -> u32 {
    100
}
fn default_exit_delay() -> Dur {
    Dur::secs(15)
}
fn default_failure_delay() -> Dur {
    Dur::secs(120)
}

/// What `simulate` runs with no scenario file: two hours of the first
/// users' mix, quick to run.
pub const BUILT_IN: &str = r#"{
  "name": "built-in: two hours of Kani and benchmarks",
  "duration": "2h",
  "profiles": [
    { "name": "kani", "labels": ["linux", "x64", "kani"], "instance_types": ["c6i.4xlarge", "c6a.4xlarge"], "max_instances": 20 },
    { "name": "bench", "labels": ["linux", "x64", "bench"], "instance_types": ["c6i.8xlarge"], "max_instances": 4 }
  ],
  "jobs": [
    { "name": "kani-proofs", "labels": ["self-hosted", "linux", "x64", "kani"], "repository": "acme/proofs",
      "duration": ["20m", "40m"], "arrivals": [ { "steady": { "per_hour": 12 } } ] },
    { "name": "benchmarks", "labels": ["self-hosted", "linux", "x64", "bench"], "repository": "acme/engine",
      "duration": ["30m", "1h"], "arrivals": [ { "burst": { "at": "30m", "count": 3, "spread": "2m" } } ] }
  ],
  "cloud": { "interruptions_per_hour": { "default": 0.02 } }
}"#;

/// A validated scenario: the profiles as the service would load them.
pub struct Validated {
    pub profiles: Vec<Profile>,
    pub prices: BTreeMap<String, Price>,
}

impl Scenario {
    /// Reads and checks a scenario file; errors name the file and the fault.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            path: shown.clone(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&shown, &text)
    }

    /// Parses and checks scenario text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, ScenarioError> {
        let fail = |message: String| ScenarioError {
            path: origin.to_owned(),
            message,
        };
        let scenario: Scenario = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        scenario.validate().map_err(fail)?;
        Ok(scenario)
    }

    pub fn built_in() -> Self {
        // The built-in text is tested to parse.
        #[allow(clippy::expect_used)]
        Self::parse("built-in scenario", BUILT_IN).expect("the built-in scenario is valid")
    }

    /// Checks what serde cannot; returns the profiles and prices to use.
    pub fn validate(&self) -> Result<Validated, String> {
        if self.duration.0.is_zero() {
            return Err("duration must be longer than 0s".into());
        }
        if self.reconcile_interval.0 < Duration::from_secs(1) {
            return Err("reconcile_interval must be at least 1s".into());
        }
        if !(self.crashes_per_hour.is_finite() && self.crashes_per_hour >= 0.0) {
            return Err("crashes_per_hour must be a number of at least 0".into());
        }
        if self.profiles.is_empty() {
            return Err("profiles: at least one profile is needed".into());
        }
        let mut names = BTreeSet::new();
        let mut profiles = Vec::new();
        for p in &self.profiles {
            if !names.insert(p.name.clone()) {
                return Err(format!("profiles: {:?} appears twice", p.name));
            }
            let profile =
                Profile::try_from(p.row()).map_err(|e| format!("profiles: {:?}: {e}", p.name))?;
            profiles.push(profile);
        }
        if self.jobs.is_empty() {
            return Err("jobs: at least one kind of job is needed".into());
        }
        for kind in &self.jobs {
            let at = |m: String| format!("jobs: {:?}: {m}", kind.name);
            if kind.labels.is_empty() {
                return Err(at("labels must not be empty".into()));
            }
            if kind.arrivals.is_empty() {
                return Err(at("arrivals must name at least one pattern".into()));
            }
            if kind.duration[0] > kind.duration[1] {
                return Err(at(format!(
                    "duration [{}, {}] runs backwards",
                    kind.duration[0], kind.duration[1]
                )));
            }
            if let Some(repo) = &kind.repository {
                if repo.split('/').count() != 2 {
                    return Err(at(format!("repository {repo:?} is not owner/name")));
                }
            }
            for pattern in &kind.arrivals {
                pattern.validate().map_err(at)?;
            }
        }
        for (t, rate) in &self.cloud.spot_capacity_error_rate {
            if !(0.0..=1.0).contains(rate) {
                return Err(format!(
                    "cloud.spot_capacity_error_rate.{t} = {rate} is not between 0 and 1"
                ));
            }
        }
        for (t, rate) in &self.cloud.interruptions_per_hour {
            if !(rate.is_finite() && *rate >= 0.0) {
                return Err(format!(
                    "cloud.interruptions_per_hour.{t} = {rate} must be a rate ≥ 0"
                ));
            }
        }
        for (k, storm) in self.cloud.storms.iter().enumerate() {
            if !(storm.per_hour.is_finite() && storm.per_hour >= 0.0) {
                return Err(format!(
                    "cloud.storms[{k}].per_hour = {} must be a rate ≥ 0",
                    storm.per_hour
                ));
            }
            if storm.lasts.0.is_zero() {
                return Err(format!("cloud.storms[{k}].lasts must be longer than 0s"));
            }
        }
        self.webhooks.validate()?;
        let mut prices = default_prices();
        prices.extend(self.cloud.prices.clone());
        for p in &profiles {
            for t in &p.instance_types {
                if !prices.contains_key(t) {
                    return Err(format!(
                        "profiles: {:?}: no price for instance type {t}; add \
                         \"cloud\": {{\"prices\": {{\"{t}\": {{\"spot\": …, \"on_demand\": …}}}}}}",
                        p.name.as_str()
                    ));
                }
            }
        }
        Ok(Validated { profiles, prices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_scenario_is_valid() {
        let s = Scenario::built_in();
        assert_eq!(s.profiles.len(), 2);
        assert_eq!(s.duration.0, Duration::from_secs(7200));
    }

    #[test]
    fn errors_name_the_origin_and_the_fault() {
        let bad = [
            (r#"{"name": "x"}"#, "missing field `duration`"),
            (
                &BUILT_IN.replace("\"per_hour\": 12", "\"per_hour\": -1"),
                "per_hour = -1",
            ),
            (
                &BUILT_IN.replace("\"c6i.8xlarge\"]", "\"z9.huge\"]"),
                "no price for instance type z9.huge",
            ),
            (
                &BUILT_IN.replace("\"duration\": \"2h\"", "\"duration\": \"2 hours\""),
                "not a duration",
            ),
            (
                &BUILT_IN.replace("\"name\": \"bench\"", "\"name\": \"Bench\""),
                "\"Bench\"",
            ),
            (
                &BUILT_IN
                    .replace("\"org\"", "\"typo\"")
                    .replace("\"seed\"", "\"sede\"")
                    .replace("\"cloud\": {", "\"clod\": {"),
                "unknown field `clod`",
            ),
        ];
        for (text, want) in bad {
            let err = Scenario::parse("examples/x.json", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("examples/x.json: "), "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let err = Scenario::load(Path::new("/nonexistent/s.json")).unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent/s.json: cannot read it"));
    }
}
