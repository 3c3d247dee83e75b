//! Names that cross system boundaries: they are runner names on GitHub,
//! `ClientToken`s and tags on EC2, and keys in the ledger, so each is parsed
//! once into a type that cannot hold a bad value.

use std::fmt;

use rand::Rng;

use crate::DomainError;

/// Longest runner name GitHub accepts, and our own contract.
pub const RUNNER_NAME_MAX: usize = 64;
/// Longest profile name (the `instance_profiles.name` constraint).
pub const PROFILE_NAME_MAX: usize = 32;
/// Length of the random suffix of a runner name.
pub const RUNNER_ID_LEN: usize = 8;
/// Longest controller id that still leaves room for the longest profile name
/// and the random suffix inside [`RUNNER_NAME_MAX`].
pub const CONTROLLER_ID_MAX: usize = RUNNER_NAME_MAX - PROFILE_NAME_MAX - RUNNER_ID_LEN - 2;

fn is_slug(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
        _ => return false,
    }
    s.len() <= max && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

macro_rules! slug_newtype {
    ($(#[$doc:meta])* $name:ident, $max:expr, $err:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, DomainError> {
                if is_slug(s, $max) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(DomainError::$err(s.to_owned()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

slug_newtype!(
    /// Names one deployment; every instance and runner it owns carries it.
    ControllerId,
    CONTROLLER_ID_MAX,
    InvalidControllerId
);
slug_newtype!(
    /// The primary key of an `instance_profiles` row.
    ProfileName,
    PROFILE_NAME_MAX,
    InvalidProfileName
);

impl Default for ControllerId {
    fn default() -> Self {
        Self("spot-runners".to_owned())
    }
}

/// `<controller id>-<profile>-<id>`: the runner row's key, the GitHub runner
/// name, the EC2 `ClientToken` and the `spot-runners:runner` tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerName(String);

impl RunnerName {
    /// A fresh name with a random suffix.
    pub fn generate<R: Rng + ?Sized>(
        controller: &ControllerId,
        profile: &ProfileName,
        rng: &mut R,
    ) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let id: String = (0..RUNNER_ID_LEN)
            .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
            .collect();
        Self(format!("{controller}-{profile}-{id}"))
    }

    /// Parses a name this controller could have made for one of `profiles`.
    /// Anything else is not ours and must never be touched. Controller ids
    /// and profile names may contain dashes, so the profile is the one named
    /// between the controller's prefix and the final random id.
    pub fn parse_owned<'p>(
        s: &str,
        controller: &ControllerId,
        mut profiles: impl Iterator<Item = &'p ProfileName>,
    ) -> Option<(Self, ProfileName)> {
        let rest = s.strip_prefix(controller.as_str())?.strip_prefix('-')?;
        let (profile, id) = rest.rsplit_once('-')?;
        let id_ok = id.len() == RUNNER_ID_LEN
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !id_ok || s.len() > RUNNER_NAME_MAX {
            return None;
        }
        let profile = profiles.find(|p| p.as_str() == profile)?.clone();
        Some((Self(s.to_owned()), profile))
    }

    /// Wraps a name read back from our own ledger.
    pub fn from_ledger(s: String) -> Result<Self, DomainError> {
        if s.is_empty() || s.len() > RUNNER_NAME_MAX {
            return Err(DomainError::InvalidRunnerName(s));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// EC2 accepts client tokens of at most this many ASCII characters.
pub const CLIENT_TOKEN_MAX: usize = 64;

/// The `ClientToken` of one attempt of a runner's launch walk (attempt 0 is
/// the first instance type × subnet × market tried). EC2 remembers a token
/// with the parameters of its request, so every attempt with other
/// parameters needs its own token, while a retry of the same attempt (a
/// throttled call, a lost response, a resumed crash) must send the same one.
/// Attempt 0's token is the runner name itself (DESIGN.md); later ones add
/// `.<attempt>`, a character runner names never contain, so no token of one
/// runner can equal another's. A name too long for the suffix is replaced
/// by a digest of it.
pub fn client_token(runner_name: &str, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    if attempt == 0 && runner_name.len() <= CLIENT_TOKEN_MAX {
        return runner_name.to_owned();
    }
    let suffix = format!(".{attempt}");
    if runner_name.len() + suffix.len() <= CLIENT_TOKEN_MAX {
        return format!("{runner_name}{suffix}");
    }
    let digest = hex::encode(Sha256::digest(runner_name.as_bytes()));
    format!("{}{suffix}", &digest[..CLIENT_TOKEN_MAX - suffix.len()])
}

impl fmt::Display for RunnerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn slugs() {
        assert!(ControllerId::parse("spot-runners").is_ok());
        assert!(ControllerId::parse("spot-runners-staging").is_ok());
        for bad in [
            "",
            "-x",
            "Spot",
            "a_b",
            "a b",
            &"a".repeat(CONTROLLER_ID_MAX + 1),
        ] {
            assert!(ControllerId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ProfileName::parse(&"k".repeat(32)).is_ok());
        assert!(ProfileName::parse(&"k".repeat(33)).is_err());
    }

    #[test]
    fn generated_names_parse_back_and_fit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = ControllerId::parse(&"c".repeat(CONTROLLER_ID_MAX)).unwrap();
        let p = ProfileName::parse(&"p".repeat(PROFILE_NAME_MAX)).unwrap();
        let n = RunnerName::generate(&c, &p, &mut rng);
        assert!(n.as_str().len() <= RUNNER_NAME_MAX);
        let (back, profile) = RunnerName::parse_owned(n.as_str(), &c, [&p].into_iter()).unwrap();
        assert_eq!(back, n);
        assert_eq!(profile, p);
    }

    #[test]
    fn client_tokens_are_distinct_per_attempt_stable_and_fit() {
        let short = "spot-runners-kani-abcd1234";
        assert_eq!(
            client_token(short, 0),
            short,
            "the first attempt's token is the name"
        );
        assert_eq!(client_token(short, 3), "spot-runners-kani-abcd1234.3");
        assert_eq!(client_token(short, 3), client_token(short, 3));
        let long = format!(
            "{}-{}-abcd1234",
            "c".repeat(CONTROLLER_ID_MAX),
            "p".repeat(PROFILE_NAME_MAX)
        );
        assert_eq!(long.len(), RUNNER_NAME_MAX);
        let other = long.replace("abcd1234", "abcd1235");
        let mut seen = std::collections::BTreeSet::new();
        for name in [short, long.as_str(), other.as_str()] {
            for attempt in [0, 1, 2, 9, 10, 99, u32::MAX] {
                let t = client_token(name, attempt);
                assert!(t.len() <= CLIENT_TOKEN_MAX && t.is_ascii(), "{t}");
                assert!(seen.insert(t.clone()), "{t} repeats");
            }
        }
    }

    #[test]
    fn ownership_is_strict() {
        let ours = ControllerId::parse("spot-runners").unwrap();
        let kani = ProfileName::parse("kani-medium").unwrap();
        let profiles = [kani.clone()];
        let owned = |s: &str| RunnerName::parse_owned(s, &ours, profiles.iter()).is_some();
        assert!(owned("spot-runners-kani-medium-abcd1234"));
        // another deployment sharing the org
        assert!(!owned("spot-runners-staging-kani-medium-abcd1234"));
        // unknown profile, wrong id length, foreign runner
        assert!(!owned("spot-runners-kani-slow-abcd1234"));
        assert!(!owned("spot-runners-kani-medium-abcd123"));
        assert!(!owned("my-laptop"));
    }
}
