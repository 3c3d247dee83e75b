//! Where the service may register runners before any job has told it.
//!
//! A warm pool needs a scope to register its runners in, and the orphan
//! sweep needs to know which scopes to list. Matched jobs name theirs, but
//! a fresh deployment has none: so scopes are also learned from the App's
//! installations, from `SPOT_RUNNERS_GITHUB_ORGS`, and from every verified
//! webhook (a `ping` names the org it was installed on).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use crate::planner::Demand;
use crate::ports::RunnerScope;
use crate::Profile;

/// Parses `SPOT_RUNNERS_GITHUB_ORGS`: comma-separated org logins or
/// `owner/repo` names (blanks around entries are ignored).
pub fn parse_scopes(list: &str) -> Result<Vec<RunnerScope>, String> {
    fn login(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 39
            && !s.starts_with('-')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    }
    fn repo(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 100
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let scope = match entry.split_once('/') {
            None if login(entry) => RunnerScope::Org(entry.to_owned()),
            Some((owner, name)) if login(owner) && repo(name) => {
                RunnerScope::Repo(entry.to_owned())
            }
            _ => {
                return Err(format!(
                    "{entry:?} is neither an org login nor an owner/repo name"
                ))
            }
        };
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

/// Whether `profile` may serve jobs registered in `scope`: any scope when it
/// has no repository allow-list; else an org some allowed repository
/// belongs to, or an allowed repository.
pub fn profile_serves(profile: &Profile, scope: &RunnerScope) -> bool {
    let Some(allow) = &profile.repositories else {
        return true;
    };
    match scope {
        RunnerScope::Repo(r) => allow.allows(r),
        RunnerScope::Org(org) => allow.patterns().iter().any(|p| {
            let owner = p.split_once('/').map_or(p.as_str(), |(o, _)| o);
            globset::GlobBuilder::new(owner)
                .case_insensitive(true)
                .build()
                .is_ok_and(|g| g.compile_matcher().is_match(org))
        }),
    }
}

/// Gives every profile that keeps a warm pool and has no job to take a
/// scope from one of the known scopes it may serve (the first, in order),
/// so warm runners exist before the first job.
pub fn fill_warm_scopes(
    profiles: &[Profile],
    demand: &mut BTreeMap<String, Demand>,
    known: &BTreeSet<RunnerScope>,
) {
    for p in profiles.iter().filter(|p| p.min_idle > 0) {
        let d = demand.entry(p.name.to_string()).or_default();
        if d.warm_scope.is_none() {
            d.warm_scope = known.iter().find(|s| profile_serves(p, s)).cloned();
        }
    }
}

/// The scopes known so far, shared by the webhook handler (which learns
/// from verified deliveries) and the reconciler (installations, the
/// configured list). Only grows: a scope is forgotten on restart.
#[derive(Clone, Debug, Default)]
pub struct KnownScopes(Arc<Mutex<BTreeSet<RunnerScope>>>);

impl KnownScopes {
    pub fn new(initial: impl IntoIterator<Item = RunnerScope>) -> Self {
        Self(Arc::new(Mutex::new(initial.into_iter().collect())))
    }

    /// Adds a scope; returns whether it was new.
    pub fn learn(&self, scope: RunnerScope) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(scope)
    }

    pub fn snapshot(&self) -> BTreeSet<RunnerScope> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The scope a verified delivery names: its `organization.login` (an org
/// webhook), the org owning its repository (a repository webhook), or for a
/// repository owned by a user, the repository itself.
pub fn scope_of_delivery(body: &[u8]) -> Option<RunnerScope> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(org) = v["organization"]["login"].as_str() {
        return Some(RunnerScope::Org(org.to_owned()));
    }
    let repo = &v["repository"];
    if repo["owner"]["type"].as_str() == Some("Organization") {
        if let Some(owner) = repo["owner"]["login"].as_str() {
            return Some(RunnerScope::Org(owner.to_owned()));
        }
    }
    repo["full_name"]
        .as_str()
        .map(|r| RunnerScope::Repo(r.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::example_row;

    fn org(o: &str) -> RunnerScope {
        RunnerScope::Org(o.into())
    }

    #[test]
    fn the_configured_list_parses_orgs_and_repositories() {
        assert_eq!(
            parse_scopes(" acme, alice/proofs ,,acme").unwrap(),
            [org("acme"), RunnerScope::Repo("alice/proofs".into())]
        );
        assert!(parse_scopes("").unwrap().is_empty());
        for bad in ["a b", "acme/", "/x", "a/b/c", "-acme", "ac_me"] {
            let err = parse_scopes(bad).unwrap_err();
            assert!(err.contains("neither an org"), "{bad}: {err}");
        }
    }

    #[test]
    fn warm_pools_get_a_known_scope_the_profile_serves() {
        let mut warm = example_row("warm", &["kani"]);
        warm.min_idle = 2;
        warm.repositories = Some(vec!["beta/*".into()]);
        let mut cold = example_row("cold", &["kani"]);
        cold.min_idle = 0;
        let profiles = vec![
            Profile::try_from(warm).unwrap(),
            Profile::try_from(cold).unwrap(),
        ];
        let known: BTreeSet<_> = [org("acme"), org("Beta")].into();
        let mut demand = BTreeMap::new();
        fill_warm_scopes(&profiles, &mut demand, &known);
        assert_eq!(demand["warm"].warm_scope, Some(org("Beta")));
        assert!(!demand.contains_key("cold"));

        // A job's scope is kept.
        let mut demand = BTreeMap::from([(
            "warm".to_owned(),
            Demand {
                warm_scope: Some(org("gamma")),
                ..Demand::default()
            },
        )]);
        fill_warm_scopes(&profiles, &mut demand, &known);
        assert_eq!(demand["warm"].warm_scope, Some(org("gamma")));

        // Nothing it may serve: no scope, no warm runners.
        let mut demand = BTreeMap::new();
        fill_warm_scopes(&profiles, &mut demand, &[org("acme")].into());
        assert_eq!(demand["warm"].warm_scope, None);
    }

    #[test]
    fn deliveries_name_their_scope() {
        let ping = br#"{"zen":"z","hook_id":1,"organization":{"login":"acme"}}"#;
        assert_eq!(scope_of_delivery(ping), Some(org("acme")));
        let org_repo = br#"{"repository":{"full_name":"acme/x","owner":{"login":"acme","type":"Organization"}}}"#;
        assert_eq!(scope_of_delivery(org_repo), Some(org("acme")));
        let user = br#"{"repository":{"full_name":"alice/proofs","owner":{"login":"alice","type":"User"}}}"#;
        assert_eq!(
            scope_of_delivery(user),
            Some(RunnerScope::Repo("alice/proofs".into()))
        );
        assert_eq!(scope_of_delivery(b"{}"), None);
        assert_eq!(scope_of_delivery(b"not json"), None);

        let known = KnownScopes::default();
        assert!(known.learn(org("acme")));
        assert!(!known.learn(org("acme")));
        assert_eq!(known.snapshot().len(), 1);
    }
}
