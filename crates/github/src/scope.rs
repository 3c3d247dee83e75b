//! Owner and repository names on their way into URL paths.

use std::fmt;

use spot_runners_domain::ports::{GitHubError, RunnerScope};

/// An organization, or one repository, whose names have been checked to be
/// plain GitHub names. They come from webhook payloads, so they are checked
/// before they become part of a path: a `..` or `/` must not move a request
/// to another endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Org(String),
    Repo { owner: String, repo: String },
}

impl Target {
    pub(crate) fn from_scope(scope: &RunnerScope) -> Result<Self, GitHubError> {
        match scope {
            RunnerScope::Org(org) => Ok(Target::Org(checked("organization", org)?.to_owned())),
            RunnerScope::Repo(full) => Self::repository(full),
        }
    }

    /// `owner/repo`.
    pub(crate) fn repository(full: &str) -> Result<Self, GitHubError> {
        let Some((owner, repo)) = full.split_once('/') else {
            return Err(GitHubError::Refused(format!(
                "repository {:?} is not of the form owner/repo",
                shortened(full)
            )));
        };
        Ok(Target::Repo {
            owner: checked("owner", owner)?.to_owned(),
            repo: checked("repository", repo)?.to_owned(),
        })
    }

    /// `/orgs/{org}` or `/repos/{owner}/{repo}`.
    pub(crate) fn prefix(&self) -> String {
        match self {
            Target::Org(org) => format!("/orgs/{org}"),
            Target::Repo { owner, repo } => format!("/repos/{owner}/{repo}"),
        }
    }

    /// GitHub names are case-insensitive; one cache entry per account.
    pub(crate) fn cache_key(&self) -> String {
        match self {
            Target::Org(org) => format!("org:{}", org.to_ascii_lowercase()),
            Target::Repo { owner, repo } => format!(
                "repo:{}/{}",
                owner.to_ascii_lowercase(),
                repo.to_ascii_lowercase()
            ),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Org(org) => write!(f, "org {org}"),
            Target::Repo { owner, repo } => write!(f, "repo {owner}/{repo}"),
        }
    }
}

fn checked<'a>(what: &str, name: &'a str) -> Result<&'a str, GitHubError> {
    let plain = !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain {
        Ok(name)
    } else {
        Err(GitHubError::Refused(format!(
            "invalid {what} name {:?}",
            shortened(name)
        )))
    }
}

fn shortened(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        let t = Target::from_scope(&RunnerScope::Org("Acme-Corp".into())).unwrap();
        assert_eq!(t.prefix(), "/orgs/Acme-Corp");
        assert_eq!(t.cache_key(), "org:acme-corp");
        let t = Target::from_scope(&RunnerScope::Repo("octo_cat/my.repo-1".into())).unwrap();
        assert_eq!(t.prefix(), "/repos/octo_cat/my.repo-1");
    }

    #[test]
    fn names_that_would_change_the_path_are_refused() {
        for org in ["", "..", ".", "a/b", "a?b", "a%2Fb", "a b", "a#b", "ü"] {
            assert!(
                matches!(
                    Target::from_scope(&RunnerScope::Org(org.into())),
                    Err(GitHubError::Refused(_))
                ),
                "{org:?}"
            );
        }
        for repo in [
            "owner", "owner/", "/repo", "o/r/x", "o/..", "../r", "o/r?x=1",
        ] {
            assert!(
                matches!(
                    Target::from_scope(&RunnerScope::Repo(repo.into())),
                    Err(GitHubError::Refused(_))
                ),
                "{repo:?}"
            );
        }
    }
}
