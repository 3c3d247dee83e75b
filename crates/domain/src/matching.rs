//! Which profile serves a job.

use std::fmt;

use crate::Profile;

/// Why a job got no profile. Stored on the job so an operator can see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoMatch {
    /// `runs-on` named no labels at all.
    NoLabels,
    /// No enabled profile has all of the job's labels.
    NoProfileHasLabels { labels: Vec<String> },
    /// Profiles fit the labels, but their allow-lists exclude the repository.
    RepositoryNotAllowed {
        repository: String,
        profiles: Vec<String>,
    },
    /// Only disabled profiles fit.
    OnlyDisabledProfiles { profiles: Vec<String> },
}

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoMatch::NoLabels => f.write_str("the job names no labels"),
            NoMatch::NoProfileHasLabels { labels } => {
                write!(
                    f,
                    "no enabled profile has all of the labels [{}]",
                    labels.join(", ")
                )
            }
            NoMatch::RepositoryNotAllowed {
                repository,
                profiles,
            } => write!(
                f,
                "repository {repository} is not in the allow-list of [{}]",
                profiles.join(", ")
            ),
            NoMatch::OnlyDisabledProfiles { profiles } => {
                write!(f, "only disabled profiles fit: [{}]", profiles.join(", "))
            }
        }
    }
}

/// True when every job label is among the profile's labels or is
/// `self-hosted`, ignoring case.
pub fn labels_fit(profile: &Profile, job_labels: &[String]) -> bool {
    job_labels.iter().all(|l| {
        let l = l.to_lowercase();
        l == "self-hosted" || profile.labels.contains(&l)
    })
}

/// Picks the profile for a job: enabled, fitting its labels, admitting its
/// repository; ties go to the highest priority, then the fewest labels (the
/// most specific fit), then the name.
pub fn match_profile<'p>(
    profiles: &'p [Profile],
    job_labels: &[String],
    repository: &str,
) -> Result<&'p Profile, NoMatch> {
    if job_labels.iter().all(|l| l.trim().is_empty()) {
        return Err(NoMatch::NoLabels);
    }
    let fitting: Vec<&Profile> = profiles
        .iter()
        .filter(|p| labels_fit(p, job_labels))
        .collect();
    let enabled: Vec<&Profile> = fitting.iter().copied().filter(|p| p.enabled).collect();
    let allowed = enabled.iter().copied().filter(|p| {
        p.repositories
            .as_ref()
            .is_none_or(|allow| allow.allows(repository))
    });
    let best = allowed.min_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.labels.len().cmp(&b.labels.len()))
            .then(a.name.cmp(&b.name))
    });
    if let Some(best) = best {
        return Ok(best);
    }
    let names = |ps: &[&Profile]| ps.iter().map(|p| p.name.to_string()).collect();
    Err(if !enabled.is_empty() {
        NoMatch::RepositoryNotAllowed {
            repository: repository.to_owned(),
            profiles: names(&enabled),
        }
    } else if !fitting.is_empty() {
        NoMatch::OnlyDisabledProfiles {
            profiles: names(&fitting),
        }
    } else {
        NoMatch::NoProfileHasLabels {
            labels: job_labels.to_vec(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{example_row, ProfileRow};
    use proptest::prelude::*;

    fn profile(row: ProfileRow) -> Profile {
        Profile::try_from(row).unwrap()
    }

    fn p(name: &str, labels: &[&str], priority: i32) -> Profile {
        let mut row = example_row(name, labels);
        row.priority = priority;
        profile(row)
    }

    fn labels(ls: &[&str]) -> Vec<String> {
        ls.iter().map(|s| (*s).to_owned()).collect()
    }

    fn first_users() -> Vec<Profile> {
        vec![
            p(
                "kani-medium",
                &["linux", "x64", "spot", "kani", "kani-medium"],
                10,
            ),
            p(
                "kani-slow",
                &["linux", "x64", "spot", "kani", "kani-slow"],
                0,
            ),
            p("benchmark", &["linux", "x64", "spot", "benchmark"], 0),
        ]
    }

    #[test]
    fn table() {
        let profiles = first_users();
        let cases: &[(&[&str], Option<&str>)] = &[
            (
                &["self-hosted", "Linux", "X64", "spot", "kani"],
                Some("kani-medium"),
            ),
            (
                &["self-hosted", "linux", "x64", "spot", "kani", "kani-slow"],
                Some("kani-slow"),
            ),
            (
                &["self-hosted", "Linux", "X64", "spot", "benchmark"],
                Some("benchmark"),
            ),
            (&["SELF-HOSTED", "BENCHMARK"], Some("benchmark")),
            (&["kani"], Some("kani-medium")),
            (
                &["self-hosted", "linux", "x64", "spot", "kani", "gpu"],
                None,
            ),
            (&["ubuntu-latest"], None),
            (&["self-hosted", "kani", "benchmark"], None),
            (&[], None),
        ];
        for (job, want) in cases {
            let got = match_profile(&profiles, &labels(job), "org/repo")
                .ok()
                .map(|p| p.name.as_str());
            assert_eq!(got, *want, "labels {job:?}");
        }
    }

    #[test]
    fn ties_break_on_priority_then_fewest_labels_then_name() {
        let job = labels(&["self-hosted", "kani"]);
        let ps = vec![
            p("wide", &["kani", "linux", "x64"], 0),
            p("narrow", &["kani"], 0),
        ];
        assert_eq!(
            match_profile(&ps, &job, "o/r").unwrap().name.as_str(),
            "narrow"
        );
        let ps = vec![
            p("wide", &["kani", "linux", "x64"], 1),
            p("narrow", &["kani"], 0),
        ];
        assert_eq!(
            match_profile(&ps, &job, "o/r").unwrap().name.as_str(),
            "wide"
        );
        let ps = vec![p("b", &["kani"], 0), p("a", &["kani"], 0)];
        assert_eq!(match_profile(&ps, &job, "o/r").unwrap().name.as_str(), "a");
    }

    #[test]
    fn allow_lists_and_disabled_profiles() {
        let mut row = example_row("private", &["kani"]);
        row.repositories = Some(vec!["Acme/proofs-*".into(), "acme/bench".into()]);
        let ps = vec![profile(row)];
        let job = labels(&["kani"]);
        assert!(match_profile(&ps, &job, "acme/proofs-core").is_ok());
        assert!(match_profile(&ps, &job, "ACME/bench").is_ok());
        assert!(matches!(
            match_profile(&ps, &job, "acme/website"),
            Err(NoMatch::RepositoryNotAllowed { .. })
        ));
        assert!(match_profile(&ps, &job, "other/proofs-core").is_err());

        let mut row = example_row("off", &["kani"]);
        row.enabled = false;
        let ps = vec![profile(row)];
        assert!(matches!(
            match_profile(&ps, &job, "o/r"),
            Err(NoMatch::OnlyDisabledProfiles { .. })
        ));
        assert_eq!(
            match_profile(&[], &job, "o/r").unwrap_err(),
            NoMatch::NoProfileHasLabels {
                labels: job.clone()
            }
        );
        assert_eq!(
            match_profile(&ps, &[], "o/r").unwrap_err(),
            NoMatch::NoLabels
        );
    }

    const VOCAB: &[&str] = &[
        "self-hosted",
        "linux",
        "x64",
        "arm64",
        "spot",
        "kani",
        "gpu",
        "benchmark",
    ];

    fn label_set() -> impl Strategy<Value = Vec<String>> {
        proptest::sample::subsequence(VOCAB, 0..=VOCAB.len()).prop_flat_map(|ls| {
            let n = ls.len();
            (Just(ls), proptest::collection::vec(any::<bool>(), n)).prop_map(|(ls, upper)| {
                ls.iter()
                    .zip(upper)
                    .map(|(l, u)| if u { l.to_uppercase() } else { (*l).to_owned() })
                    .collect()
            })
        })
    }

    fn profiles() -> impl Strategy<Value = Vec<Profile>> {
        proptest::collection::vec((label_set(), -2..3i32, any::<bool>()), 0..6).prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .filter(|(_, (ls, _, _))| ls.iter().any(|l| l != "self-hosted"))
                .map(|(i, (ls, prio, enabled))| {
                    let refs: Vec<&str> = ls.iter().map(String::as_str).collect();
                    let mut row = example_row(&format!("p{i}"), &refs);
                    row.priority = prio;
                    row.enabled = enabled;
                    profile(row)
                })
                .collect()
        })
    }

    proptest! {
        /// A match is always enabled, always fits every label, and no other
        /// fitting enabled profile beats it.
        #[test]
        fn a_match_is_sound_and_best(ps in profiles(), job in label_set()) {
            match match_profile(&ps, &job, "o/r") {
                Ok(m) => {
                    prop_assert!(m.enabled);
                    for l in &job {
                        let l = l.to_lowercase();
                        prop_assert!(l == "self-hosted" || m.labels.contains(&l));
                    }
                    for other in ps.iter().filter(|o| o.enabled && labels_fit(o, &job)) {
                        prop_assert!(other.priority <= m.priority);
                        if other.priority == m.priority {
                            prop_assert!(other.labels.len() >= m.labels.len());
                        }
                    }
                }
                Err(_) => {
                    let nonempty = job.iter().any(|l| !l.trim().is_empty());
                    prop_assert!(!nonempty || !ps.iter().any(|o| o.enabled && labels_fit(o, &job)));
                }
            }
        }

        /// Case never changes the outcome.
        #[test]
        fn case_insensitive(ps in profiles(), job in label_set()) {
            let upper: Vec<String> = job.iter().map(|l| l.to_uppercase()).collect();
            let a = match_profile(&ps, &job, "o/r").ok().map(|p| p.name.clone());
            let b = match_profile(&ps, &upper, "o/r").ok().map(|p| p.name.clone());
            prop_assert_eq!(a, b);
        }

        /// Profile order in the table never changes the outcome.
        #[test]
        fn order_independent(mut ps in profiles(), job in label_set()) {
            let a = match_profile(&ps, &job, "o/r").ok().map(|p| p.name.clone());
            ps.reverse();
            let b = match_profile(&ps, &job, "o/r").ok().map(|p| p.name.clone());
            prop_assert_eq!(a, b);
        }
    }
}
