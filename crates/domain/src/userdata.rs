//! Renders the boot script every instance runs (`user-data/`).

use crate::{DomainError, Profile};

/// The script template, compiled in so the binary and the repository's
/// `user-data/` can never disagree.
pub const TEMPLATE: &str = include_str!("../../../user-data/kani-runner-userdata.sh");

/// EC2 rejects user data over 16 KB (before base64).
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// The values substituted into [`TEMPLATE`].
pub struct UserDataValues<'a> {
    pub controller_id: &'a str,
    pub runner_name: &'a str,
    pub profile: &'a Profile,
}

fn shell_safe(what: &str, v: &str) -> Result<(), DomainError> {
    // Every value lands inside single quotes; these characters are all a
    // name or a number can hold.
    let ok = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DomainError::UserData(format!(
            "{what} holds characters that cannot go into the boot script"
        )))
    }
}

/// Renders the template. Fails when a value could break out of its quotes,
/// when a placeholder is left, or when the result would exceed EC2's limit.
pub fn render(v: &UserDataValues<'_>) -> Result<String, DomainError> {
    render_template(TEMPLATE, v)
}

pub fn render_template(template: &str, v: &UserDataValues<'_>) -> Result<String, DomainError> {
    let idle = v.profile.instance_idle_limit_secs().to_string();
    let life = v.profile.max_lifetime_secs.to_string();
    let tuning = if v.profile.benchmark_tuning { "1" } else { "0" };
    let pairs = [
        ("@@BENCHMARK_TUNING@@", "benchmark tuning", tuning),
        ("@@CONTROLLER_ID@@", "controller id", v.controller_id),
        ("@@PROFILE@@", "profile", v.profile.name.as_str()),
        ("@@RUNNER_NAME@@", "runner name", v.runner_name),
        ("@@IDLE_LIMIT_SECS@@", "idle limit", &idle),
        ("@@MAX_LIFETIME_SECS@@", "lifetime", &life),
    ];
    let mut out = template.to_owned();
    for (placeholder, what, value) in pairs {
        shell_safe(what, value)?;
        out = out.replace(placeholder, value);
    }
    if let Some(name) = leftover_placeholder(&out) {
        return Err(DomainError::UserData(format!(
            "placeholder @@{name}@@ has no value"
        )));
    }
    if out.len() > MAX_USER_DATA_BYTES {
        return Err(DomainError::UserData(format!(
            "rendered boot script is {} bytes; EC2 accepts at most {MAX_USER_DATA_BYTES}",
            out.len()
        )));
    }
    Ok(out)
}

fn leftover_placeholder(s: &str) -> Option<&str> {
    let mut rest = s;
    while let Some(start) = rest.find("@@") {
        rest = &rest[start + 2..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .unwrap_or(rest.len());
        if name_len > 0 && rest[name_len..].starts_with("@@") {
            return Some(&rest[..name_len]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::example_row;

    fn profile() -> Profile {
        Profile::try_from(example_row("kani-medium", &["kani"])).unwrap()
    }

    #[test]
    fn rejects_quote_breaking_values_and_leftover_placeholders() {
        let p = profile();
        let v = UserDataValues {
            controller_id: "spot-runners",
            runner_name: "abc'; rm -rf / #",
            profile: &p,
        };
        assert!(render_template("X='@@RUNNER_NAME@@'", &v).is_err());
        let v = UserDataValues {
            runner_name: "spot-runners-kani-medium-abcd1234",
            ..v
        };
        assert_eq!(
            render_template("X='@@RUNNER_NAME@@'", &v).unwrap(),
            "X='spot-runners-kani-medium-abcd1234'"
        );
        assert!(render_template("X='@@SOMETHING_ELSE@@'", &v).is_err());
        assert!(render_template("a@@b @@RUNNER_NAME@@ @@LEFT@@", &v).is_err());
        assert!(render_template("email@@example and @@ alone", &v).is_ok());
        let huge = "A".repeat(MAX_USER_DATA_BYTES + 1);
        assert!(render_template(&huge, &v).is_err());
    }

    #[test]
    fn the_benchmark_tuning_flag_follows_the_profile() {
        let plain = profile();
        let mut row = example_row("bench", &["bench"]);
        row.benchmark_tuning = true;
        let bench = Profile::try_from(row).unwrap();
        let script = |p: &Profile| {
            render(&UserDataValues {
                controller_id: "spot-runners",
                runner_name: "spot-runners-bench-abcd1234",
                profile: p,
            })
            .unwrap()
        };
        assert!(script(&bench).contains("\nBENCHMARK_TUNING='1'\n"));
        assert!(script(&plain).contains("\nBENCHMARK_TUNING='0'\n"));
    }

    /// The JIT config waits in the parameter store; nothing in the template
    /// may ask for it.
    #[test]
    fn the_template_takes_no_secret() {
        assert!(!TEMPLATE.contains("@@JIT_CONFIG@@"));
        assert!(!TEMPLATE.contains("--jitconfig"));
    }
}
