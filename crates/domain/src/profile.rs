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

/// Where a profile's AMI comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImageSource {
    /// `image_id`: one AMI.
    Id(String),
    /// `image_filter`: the newest available AMI of an owner whose name
    /// matches, looked up at launch, so a rebuilt AMI needs no row edit.
    Filter(ImageFilter),
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Id(id) => f.write_str(id),
            ImageSource::Filter(filter) => write!(f, "newest of {filter}"),
        }
    }
}

/// `owner/name-pattern`, as `DescribeImages` takes it: `Owners=[owner]`,
/// `Filters=[name=<pattern>]`. The owner is an account id or one of EC2's
/// aliases; the pattern uses EC2's wildcards (`*`, `?`) and may itself hold
/// slashes (Canonical's names do), so the text splits at the first one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageFilter {
    owner: String,
    name_pattern: String,
}

/// AMI names are 3 to 128 characters; a pattern may be shorter (`k*`).
const MAX_IMAGE_NAME: usize = 128;

impl ImageFilter {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (owner, pattern) = text
            .split_once('/')
            .ok_or_else(|| format!("image_filter {text:?} is not owner/name-pattern"))?;
        let owner_ok = matches!(owner, "self" | "amazon" | "aws-marketplace")
            || (owner.len() == 12 && owner.chars().all(|c| c.is_ascii_digit()));
        if !owner_ok {
            return Err(format!(
                "image_filter owner {owner:?} is not an account id (12 digits), self, amazon or aws-marketplace"
            ));
        }
        // The characters EC2 allows in an AMI name, plus its two wildcards.
        let name_char = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_*?".contains(c);
        if pattern.is_empty()
            || pattern.len() > MAX_IMAGE_NAME
            || pattern.trim() != pattern
            || !pattern.chars().all(name_char)
        {
            return Err(format!(
                "image_filter name pattern {pattern:?} is not an AMI name pattern \
                 (1-{MAX_IMAGE_NAME} of letters, digits, ()[] ./-'@_ and the wildcards * ?)"
            ));
        }
        Ok(Self {
            owner: owner.to_owned(),
            name_pattern: pattern.to_owned(),
        })
    }

    /// `DescribeImages`' `Owners` value.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// `DescribeImages`' `name` filter value.
    pub fn name_pattern(&self) -> &str {
        &self.name_pattern
    }

    /// Whether an AMI name matches the pattern as EC2 matches it: `*` any
    /// run of characters (slashes too), `?` one, everything else literal.
    pub fn matches(&self, name: &str) -> bool {
        let glob: String = self
            .name_pattern
            .chars()
            .map(|c| match c {
                '*' | '?' => c.to_string(),
                other => globset::escape(&other.to_string()),
            })
            .collect();
        globset::GlobBuilder::new(&glob)
            .literal_separator(false)
            .build()
            .is_ok_and(|g| g.compile_matcher().is_match(name))
    }
}

impl fmt::Display for ImageFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name_pattern)
    }
}

/// An `instance_profiles` row as stored, before validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileRow {
    pub name: String,
    pub labels: Vec<String>,
    pub instance_types: Vec<String>,
    /// Exactly one of `image_id` and `image_filter` is set.
    pub image_id: Option<String>,
    pub image_filter: Option<String>,
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
    pub threads_per_core: Option<i32>,
    pub benchmark_tuning: bool,
}

/// A validated profile. Labels are lower-case; limits are positive.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: ProfileName,
    pub labels: Vec<String>,
    pub instance_types: Vec<String>,
    pub image: ImageSource,
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
    /// `CpuOptions.ThreadsPerCore` at launch (1 = SMT off); `None` keeps
    /// each instance type's default.
    pub threads_per_core: Option<u32>,
    /// The boot script applies the benchmark tuning (governor, turbo,
    /// C-states, THP, ASLR, perf) on this profile's instances.
    pub benchmark_tuning: bool,
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

fn image_source(
    profile: &str,
    image_id: Option<&str>,
    image_filter: Option<&str>,
) -> Result<ImageSource, DomainError> {
    match (image_id, image_filter) {
        (Some(id), None) if !id.trim().is_empty() => Ok(ImageSource::Id(id.to_owned())),
        (Some(_), None) => Err(invalid(profile, "image_id must not be empty".into())),
        (None, Some(filter)) => ImageFilter::parse(filter)
            .map(ImageSource::Filter)
            .map_err(|e| invalid(profile, e)),
        (Some(_), Some(_)) => Err(invalid(
            profile,
            "set image_id or image_filter, not both".into(),
        )),
        (None, None) => Err(invalid(
            profile,
            "no image: set image_id or image_filter".into(),
        )),
    }
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
        let image = image_source(n, row.image_id.as_deref(), row.image_filter.as_deref())?;
        let threads_per_core = row
            .threads_per_core
            .map(|t| match t {
                1 | 2 => Ok(t.unsigned_abs()),
                other => Err(invalid(
                    n,
                    format!("threads_per_core must be 1 (SMT off) or 2, got {other}"),
                )),
            })
            .transpose()?;
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
            image,
            threads_per_core,
            benchmark_tuning: row.benchmark_tuning,
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
        image_id: Some("ami-0123456789abcdef0".into()),
        image_filter: None,
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
        threads_per_core: None,
        benchmark_tuning: false,
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
            images in (
                proptest::option::of(text()),
                proptest::option::of(prop_oneof![
                    Just("self/kani-runner-*".to_owned()),
                    "(self|amazon|[0-9]{11,13})/[a-z*?/. -]{0,8}",
                    text(),
                ]),
            ),
            market in prop_oneof![Just("spot".to_owned()), Just("on-demand".to_owned()), text()],
            limits in proptest::array::uniform6(int()),
            runner_group_id in prop_oneof![Just(0i64), Just(-3i64), 1..5i64],
            repositories in proptest::option::of(proptest::collection::vec(text(), 0..3)),
            flags in proptest::array::uniform4(any::<bool>()),
            priority in any::<i32>(),
            survival in proptest::array::uniform4(int()),
            rerun_market in prop_oneof![Just("spot".to_owned()), Just("on-demand".to_owned()), text()],
            optional in proptest::array::uniform2(proptest::option::of(int())),
        ) -> ProfileRow {
            ProfileRow {
                name, labels, instance_types,
                image_id: images.0,
                image_filter: images.1,
                threads_per_core: optional[0],
                benchmark_tuning: flags[2],
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
                rerun_own_failures: flags[3],
                spot_breaker_interruptions: survival[1],
                spot_breaker_window_secs: survival[2],
                spot_breaker_cooldown_secs: survival[3],
                spot_max_job_minutes: optional[1],
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
                    prop_assert!(matches!(p.threads_per_core, None | Some(1 | 2)));
                    prop_assert_eq!(
                        row.image_id.is_some(),
                        matches!(p.image, ImageSource::Id(_)),
                        "exactly one image source, the one the row names"
                    );
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
            ("blank image", Box::new(|r| r.image_id = Some(" ".into()))),
            ("no image", Box::new(|r| r.image_id = None)),
            (
                "both images",
                Box::new(|r| r.image_filter = Some("self/kani-*".into())),
            ),
            (
                "filter without owner",
                Box::new(|r| {
                    r.image_id = None;
                    r.image_filter = Some("kani-runner-*".into());
                }),
            ),
            (
                "filter with a bad owner",
                Box::new(|r| {
                    r.image_id = None;
                    r.image_filter = Some("canonical/ubuntu-*".into());
                }),
            ),
            (
                "filter with an empty pattern",
                Box::new(|r| {
                    r.image_id = None;
                    r.image_filter = Some("self/".into());
                }),
            ),
            (
                "filter with a quote breaker",
                Box::new(|r| {
                    r.image_id = None;
                    r.image_filter = Some("self/kani\"*".into());
                }),
            ),
            ("threads 0", Box::new(|r| r.threads_per_core = Some(0))),
            ("threads 3", Box::new(|r| r.threads_per_core = Some(3))),
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
    fn an_image_filter_parses_into_owner_and_pattern() {
        let mut row = example_row("bench", &["bench"]);
        row.image_id = None;
        row.image_filter =
            Some("099720109477/ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*".into());
        row.threads_per_core = Some(1);
        row.benchmark_tuning = true;
        let p = parse(row).unwrap();
        let ImageSource::Filter(filter) = &p.image else {
            panic!("expected a filter, got {:?}", p.image);
        };
        assert_eq!(filter.owner(), "099720109477");
        assert_eq!(
            filter.name_pattern(),
            "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
        );
        assert_eq!(
            filter.to_string(),
            "099720109477/ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
        );
        assert_eq!((p.threads_per_core, p.benchmark_tuning), (Some(1), true));

        let defaults = parse(example_row("kani", &["kani"])).unwrap();
        assert_eq!(
            defaults.image,
            ImageSource::Id("ami-0123456789abcdef0".into())
        );
        assert_eq!(
            (defaults.threads_per_core, defaults.benchmark_tuning),
            (None, false)
        );
    }

    #[test]
    fn image_filters_match_names_as_ec2_does() {
        let f = ImageFilter::parse("self/kani-runner-2.334.0-*").unwrap();
        assert!(f.matches("kani-runner-2.334.0-20261201-120000"));
        assert!(f.matches("kani-runner-2.334.0-"));
        assert!(!f.matches("kani-runner-2.333.0-20261201-120000"));
        assert!(!f.matches("xkani-runner-2.334.0-1"));
        let q = ImageFilter::parse("amazon/al202?-ami-*").unwrap();
        assert!(q.matches("al2023-ami-2023.6/x86_64"), "* crosses slashes");
        assert!(!q.matches("al20234-ami-1"));
        // Brackets are literal in EC2 names, not character classes.
        let b = ImageFilter::parse("self/bench [smt-off]*").unwrap();
        assert!(b.matches("bench [smt-off] 2"));
        assert!(!b.matches("bench s 2"));
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
