//! Instance profiles: the operator-edited rows that say which jobs get which
//! kind of instance.

use std::fmt;

use globset::{GlobSet, GlobSetBuilder};

use crate::{DomainError, ProfileName};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Market {
    Spot,
    OnDemand,
}

impl Market {
    pub fn as_str(self) -> &'static str {
        match self {
            Market::Spot => "spot",
            Market::OnDemand => "on-demand",
        }
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        match s {
            "spot" => Ok(Market::Spot),
            "on-demand" => Ok(Market::OnDemand),
            other => Err(DomainError::UnknownMarket(other.to_owned())),
        }
    }
}

impl fmt::Display for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `instance_profiles` row as stored, before validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileRow {
    pub name: String,
    pub labels: Vec<String>,
    pub instance_types: Vec<String>,
    pub image_id: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub market: String,
    pub on_demand_fallback: bool,
    pub max_instances: i32,
    pub min_idle: i32,
    pub idle_timeout_secs: i32,
    pub boot_timeout_secs: i32,
    pub max_lifetime_secs: i32,
    pub runner_group_id: i64,
    pub root_volume_gb: i32,
    pub repositories: Option<Vec<String>>,
    pub enabled: bool,
    pub priority: i32,
    pub max_interruption_reruns: i32,
    pub rerun_market: String,
    pub rerun_own_failures: bool,
    pub spot_breaker_interruptions: i32,
    pub spot_breaker_window_secs: i32,
    pub spot_breaker_cooldown_secs: i32,
    pub spot_max_job_minutes: Option<i32>,
}

/// A validated profile. Labels are lower-case; limits are positive.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: ProfileName,
    pub labels: Vec<String>,
    pub instance_types: Vec<String>,
    pub image_id: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub market: Market,
    pub on_demand_fallback: bool,
    pub max_instances: u32,
    pub min_idle: u32,
    pub idle_timeout_secs: u32,
    pub boot_timeout_secs: u32,
    pub max_lifetime_secs: u32,
    pub runner_group_id: i64,
    pub root_volume_gb: u32,
    pub repositories: Option<RepositoryAllowList>,
    pub enabled: bool,
    pub priority: i32,
    pub survival: SurvivalPolicy,
}

/// How a profile survives spot reclaims: re-runs of interrupted jobs, the
/// spot circuit breaker and the duration-aware market.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurvivalPolicy {
    /// Re-runs per job lineage after a spot reclaim (0 = never).
    pub max_interruption_reruns: u32,
    /// Market for the demand of such a re-run.
    pub rerun_market: Market,
    /// Also re-run jobs of the same run that failed on their own.
    pub rerun_own_failures: bool,
    /// That many interruptions within the window open the breaker…
    pub breaker_interruptions: u32,
    pub breaker_window_secs: u32,
    /// …for this long.
    pub breaker_cooldown_secs: u32,
    /// Jobs whose history says they run longer start on-demand.
    pub spot_max_job_minutes: Option<u32>,
}

impl Default for SurvivalPolicy {
    /// The migration's column defaults (RunsOn's breaker: 2 in 15 min → 30 min).
    fn default() -> Self {
        Self {
            max_interruption_reruns: 2,
            rerun_market: Market::OnDemand,
            rerun_own_failures: false,
            breaker_interruptions: 2,
            breaker_window_secs: 900,
            breaker_cooldown_secs: 1800,
            spot_max_job_minutes: None,
        }
    }
}

impl SurvivalPolicy {
    fn from_row(n: &str, row: &ProfileRow) -> Result<Self, DomainError> {
        let reruns = u32::try_from(row.max_interruption_reruns)
            .ok()
            .filter(|r| *r <= 50)
            .ok_or_else(|| {
                invalid(
                    n,
                    format!(
                        "max_interruption_reruns must be 0..=50 (GitHub's re-run limit), got {}",
                        row.max_interruption_reruns
                    ),
                )
            })?;
        let cooldown = u32::try_from(row.spot_breaker_cooldown_secs).map_err(|_| {
            invalid(
                n,
                format!(
                    "spot_breaker_cooldown_secs must not be negative, got {}",
                    row.spot_breaker_cooldown_secs
                ),
            )
        })?;
        Ok(Self {
            max_interruption_reruns: reruns,
            rerun_market: Market::parse(&row.rerun_market)
                .map_err(|e| invalid(n, format!("rerun_market: {e}")))?,
            rerun_own_failures: row.rerun_own_failures,
            breaker_interruptions: positive(
                n,
                "spot_breaker_interruptions",
                row.spot_breaker_interruptions,
            )?,
            breaker_window_secs: positive(
                n,
                "spot_breaker_window_secs",
                row.spot_breaker_window_secs,
            )?,
            breaker_cooldown_secs: cooldown,
            spot_max_job_minutes: row
                .spot_max_job_minutes
                .map(|m| positive(n, "spot_max_job_minutes", m))
                .transpose()?,
        })
    }
}

/// `owner/repo` globs, matched case-insensitively (GitHub names are).
#[derive(Clone, Debug)]
pub struct RepositoryAllowList {
    patterns: Vec<String>,
    set: GlobSet,
}

impl RepositoryAllowList {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            let glob = globset::GlobBuilder::new(p)
                .case_insensitive(true)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("repository pattern {p:?}: {e}"))?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            patterns: patterns.to_vec(),
            set,
        })
    }

    pub fn allows(&self, repository: &str) -> bool {
        self.set.is_match(repository)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

fn positive(profile: &str, field: &str, v: i32) -> Result<u32, DomainError> {
    u32::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| invalid(profile, format!("{field} must be positive, got {v}")))
}

fn invalid(profile: &str, reason: String) -> DomainError {
    DomainError::InvalidProfile {
        profile: profile.to_owned(),
        reason,
    }
}

impl TryFrom<ProfileRow> for Profile {
    type Error = DomainError;

    /// The database constraints reject most bad rows; this is the last line
    /// for what they cannot express (globs) or for rows written before a
    /// constraint existed. A rejected row is reported and skipped, never
    /// fatal.
    fn try_from(row: ProfileRow) -> Result<Self, DomainError> {
        let n = row.name.as_str();
        let name = ProfileName::parse(n)?;
        let survival = SurvivalPolicy::from_row(n, &row)?;
        let labels: Vec<String> = row
            .labels
            .iter()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect();
        if labels.is_empty() {
            return Err(invalid(n, "labels must not be empty".into()));
        }
        let instance_types: Vec<String> = row
            .instance_types
            .into_iter()
            .filter(|t| !t.trim().is_empty())
            .collect();
        if instance_types.is_empty() {
            return Err(invalid(n, "instance_types must not be empty".into()));
        }
        if row.image_id.trim().is_empty() {
            return Err(invalid(n, "image_id must not be empty".into()));
        }
        let max_instances = positive(n, "max_instances", row.max_instances)?;
        let min_idle = u32::try_from(row.min_idle).map_err(|_| {
            invalid(
                n,
                format!("min_idle must not be negative, got {}", row.min_idle),
            )
        })?;
        if min_idle > max_instances {
            return Err(invalid(
                n,
                format!("min_idle ({min_idle}) exceeds max_instances ({max_instances})"),
            ));
        }
        if row.runner_group_id <= 0 {
            return Err(invalid(n, "runner_group_id must be positive".into()));
        }
        let repositories = row
            .repositories
            .as_deref()
            .map(RepositoryAllowList::new)
            .transpose()
            .map_err(|e| invalid(n, e))?;
        Ok(Profile {
            survival,
            market: Market::parse(&row.market).map_err(|e| invalid(n, e.to_string()))?,
            idle_timeout_secs: positive(n, "idle_timeout_secs", row.idle_timeout_secs)?,
            boot_timeout_secs: positive(n, "boot_timeout_secs", row.boot_timeout_secs)?,
            max_lifetime_secs: positive(n, "max_lifetime_secs", row.max_lifetime_secs)?,
            root_volume_gb: positive(n, "root_volume_gb", row.root_volume_gb)?,
            name,
            labels,
            instance_types,
            image_id: row.image_id,
            subnet_ids: row.subnet_ids,
            security_group_ids: row.security_group_ids,
            iam_instance_profile: row.iam_instance_profile.filter(|s| !s.is_empty()),
            on_demand_fallback: row.on_demand_fallback,
            max_instances,
            min_idle,
            runner_group_id: row.runner_group_id,
            repositories,
            enabled: row.enabled,
            priority: row.priority,
        })
    }
}

impl Profile {
    /// Labels a runner of this profile registers with: `self-hosted` first,
    /// then the profile's own.
    pub fn runner_labels(&self) -> Vec<String> {
        std::iter::once("self-hosted".to_owned())
            .chain(self.labels.iter().filter(|l| *l != "self-hosted").cloned())
            .collect()
    }

    /// Seconds after boot by which a job must have started on an instance of
    /// this profile, else its on-instance watchdog shuts it down. Warm-pool
    /// runners wait for work until the end of their lifetime.
    pub fn instance_idle_limit_secs(&self) -> u32 {
        if self.min_idle > 0 {
            self.max_lifetime_secs
        } else {
            self.boot_timeout_secs
                .saturating_add(self.idle_timeout_secs)
                .min(self.max_lifetime_secs)
        }
    }
}

/// Builds a valid row for tests and examples.
pub fn example_row(name: &str, labels: &[&str]) -> ProfileRow {
    ProfileRow {
        name: name.to_owned(),
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        instance_types: vec!["c6i.4xlarge".into(), "c6a.4xlarge".into()],
        image_id: "ami-0123456789abcdef0".into(),
        subnet_ids: vec!["subnet-a".into(), "subnet-b".into()],
        security_group_ids: vec![],
        iam_instance_profile: None,
        market: "spot".into(),
        on_demand_fallback: true,
        max_instances: 10,
        min_idle: 0,
        idle_timeout_secs: 300,
        boot_timeout_secs: 600,
        max_lifetime_secs: 28_800,
        runner_group_id: 1,
        root_volume_gb: 64,
        repositories: None,
        enabled: true,
        priority: 0,
        max_interruption_reruns: 2,
        rerun_market: "on-demand".into(),
        rerun_own_failures: false,
        spot_breaker_interruptions: 2,
        spot_breaker_window_secs: 900,
        spot_breaker_cooldown_secs: 1800,
        spot_max_job_minutes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9-]{1,40}",
            "[a-z*?/{}\\[\\]!,-]{0,12}",
            ".{0,12}",
        ]
    }

    fn int() -> impl Strategy<Value = i32> {
        prop_oneof![Just(0), Just(-1), Just(i32::MAX), Just(i32::MIN), -5..50i32]
    }

    prop_compose! {
        /// Whatever a hand-edited row (or one from before a constraint
        /// existed) may hold.
        fn any_row()(
            name in text(),
            labels in proptest::collection::vec(text(), 0..4),
            instance_types in proptest::collection::vec(text(), 0..3),
            image_id in text(),
            market in prop_oneof![Just("spot".to_owned()), Just("on-demand".to_owned()), text()],
            limits in proptest::array::uniform6(int()),
            runner_group_id in prop_oneof![Just(0i64), Just(-3i64), 1..5i64],
            repositories in proptest::option::of(proptest::collection::vec(text(), 0..3)),
            flags in proptest::array::uniform2(any::<bool>()),
            priority in any::<i32>(),
            survival in proptest::array::uniform4(int()),
            rerun_market in prop_oneof![Just("spot".to_owned()), Just("on-demand".to_owned()), text()],
            rerun_own_failures in any::<bool>(),
            spot_max_job_minutes in proptest::option::of(int()),
        ) -> ProfileRow {
            ProfileRow {
                name, labels, instance_types, image_id,
                subnet_ids: vec![],
                security_group_ids: vec![],
                iam_instance_profile: None,
                market,
                on_demand_fallback: flags[0],
                max_instances: limits[0],
                min_idle: limits[1],
                idle_timeout_secs: limits[2],
                boot_timeout_secs: limits[3],
                max_lifetime_secs: limits[4],
                runner_group_id,
                root_volume_gb: limits[5],
                repositories,
                enabled: flags[1],
                priority,
                max_interruption_reruns: survival[0],
                rerun_market,
                rerun_own_failures,
                spot_breaker_interruptions: survival[1],
                spot_breaker_window_secs: survival[2],
                spot_breaker_cooldown_secs: survival[3],
                spot_max_job_minutes,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any row is a usable profile or skipped with a reason; never a panic.
        #[test]
        fn any_row_is_a_valid_profile_or_a_reason(row in any_row()) {
            match Profile::try_from(row.clone()) {
                Ok(p) => {
                    prop_assert!(!p.labels.is_empty());
                    prop_assert!(p.labels.iter().all(|l| *l == l.to_lowercase()));
                    prop_assert!(!p.instance_types.is_empty());
                    prop_assert!(p.min_idle <= p.max_instances && p.max_instances > 0);
                    prop_assert!(p.idle_timeout_secs > 0 && p.boot_timeout_secs > 0);
                    prop_assert!(p.instance_idle_limit_secs() <= p.max_lifetime_secs);
                    let _ = p.repositories.as_ref().map(|r| r.allows("acme/proofs"));
                }
                Err(e) => {
                    let reason = e.to_string();
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }

    fn parse(row: ProfileRow) -> Result<Profile, DomainError> {
        Profile::try_from(row)
    }

    #[test]
    fn accepts_a_good_row_and_lowercases_labels() {
        let p = parse(example_row("kani", &["Linux", "X64", "kani"])).unwrap();
        assert_eq!(p.labels, ["linux", "x64", "kani"]);
        assert_eq!(p.runner_labels(), ["self-hosted", "linux", "x64", "kani"]);
    }

    #[test]
    fn rejects_nonsense() {
        type Mutation = Box<dyn Fn(&mut ProfileRow)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("empty labels", Box::new(|r| r.labels.clear())),
            ("blank labels", Box::new(|r| r.labels = vec![" ".into()])),
            ("no instance types", Box::new(|r| r.instance_types.clear())),
            ("no image", Box::new(|r| r.image_id.clear())),
            ("market", Box::new(|r| r.market = "reserved".into())),
            ("max 0", Box::new(|r| r.max_instances = 0)),
            ("min_idle < 0", Box::new(|r| r.min_idle = -1)),
            ("min_idle > max", Box::new(|r| r.min_idle = 11)),
            ("idle 0", Box::new(|r| r.idle_timeout_secs = 0)),
            ("boot < 0", Box::new(|r| r.boot_timeout_secs = -5)),
            ("life 0", Box::new(|r| r.max_lifetime_secs = 0)),
            ("group 0", Box::new(|r| r.runner_group_id = 0)),
            ("volume 0", Box::new(|r| r.root_volume_gb = 0)),
            (
                "bad glob",
                Box::new(|r| r.repositories = Some(vec!["org/[".into()])),
            ),
            ("bad name", Box::new(|r| r.name = "Kani".into())),
            ("reruns < 0", Box::new(|r| r.max_interruption_reruns = -1)),
            ("reruns > 50", Box::new(|r| r.max_interruption_reruns = 51)),
            (
                "rerun market",
                Box::new(|r| r.rerun_market = "cheap".into()),
            ),
            ("breaker 0", Box::new(|r| r.spot_breaker_interruptions = 0)),
            ("window 0", Box::new(|r| r.spot_breaker_window_secs = 0)),
            (
                "cooldown < 0",
                Box::new(|r| r.spot_breaker_cooldown_secs = -1),
            ),
            (
                "max minutes 0",
                Box::new(|r| r.spot_max_job_minutes = Some(0)),
            ),
        ];
        for (what, mutate) in cases {
            let mut row = example_row("kani", &["kani"]);
            mutate(&mut row);
            assert!(parse(row).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn survival_columns_parse_with_the_migration_defaults() {
        let p = parse(example_row("kani", &["kani"])).unwrap();
        assert_eq!(p.survival, SurvivalPolicy::default());
        let mut row = example_row("bench", &["bench"]);
        row.max_interruption_reruns = 0;
        row.rerun_market = "spot".into();
        row.rerun_own_failures = true;
        row.spot_breaker_interruptions = 3;
        row.spot_breaker_window_secs = 600;
        row.spot_breaker_cooldown_secs = 0;
        row.spot_max_job_minutes = Some(90);
        let s = parse(row).unwrap().survival;
        assert_eq!(
            s,
            SurvivalPolicy {
                max_interruption_reruns: 0,
                rerun_market: Market::Spot,
                rerun_own_failures: true,
                breaker_interruptions: 3,
                breaker_window_secs: 600,
                breaker_cooldown_secs: 0,
                spot_max_job_minutes: Some(90),
            }
        );
    }

    #[test]
    fn watchdog_limit_follows_the_pool() {
        let mut row = example_row("kani", &["kani"]);
        let p = parse(row.clone()).unwrap();
        assert_eq!(p.instance_idle_limit_secs(), 900);
        row.min_idle = 2;
        let p = parse(row).unwrap();
        assert_eq!(p.instance_idle_limit_secs(), 28_800);
    }
}
