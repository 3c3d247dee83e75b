//! The deployment assets agree with the service: every metric a dashboard or
//! an alert queries is one the service exports, and the boot script the
//! service renders is the one in `user-data/`, within EC2's size limit.

use std::path::{Path, PathBuf};

use spot_runners::metrics::Metrics;
use spot_runners_domain::profile::{example_row, Profile};
use spot_runners_domain::userdata::{render, UserDataValues, MAX_USER_DATA_BYTES, TEMPLATE};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `spot_runners_*` identifier in a text, histogram suffixes removed.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("spot_runners_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let preceded_by_word = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded_by_word {
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.push(base.to_owned());
        }
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn dashboards_and_alerts_query_only_exported_metrics() {
    let exported = Metrics::new().unwrap().names();
    let files = [
        "deploy/grafana/dashboards/spot-runners.json",
        "deploy/prometheus/alerts.yml",
    ];
    for file in files {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} queries no spot_runners metric");
        for name in used {
            // Families that are histograms are exported as name_bucket etc.,
            // which metric_names already folded back.
            assert!(
                exported.contains(&name),
                "{file} queries {name}, which the service does not export"
            );
        }
    }
}

#[test]
fn contract_metrics_are_exported() {
    let exported = Metrics::new().unwrap().names();
    for name in [
        "spot_runners_webhooks_total",
        "spot_runners_jobs",
        "spot_runners_runners",
        "spot_runners_launches_total",
        "spot_runners_launch_errors_total",
        "spot_runners_job_wait_seconds",
        "spot_runners_launch_latency_seconds",
        "spot_runners_reconcile_duration_seconds",
        "spot_runners_github_api_requests_total",
        "spot_runners_github_rate_limit_remaining",
    ] {
        assert!(exported.iter().any(|n| n == name), "{name} missing");
    }
}

#[test]
fn the_rendered_boot_script_is_the_repository_template_and_fits() {
    let on_disk =
        std::fs::read_to_string(repo().join("user-data/kani-runner-userdata.sh")).unwrap();
    assert_eq!(
        TEMPLATE, on_disk,
        "the binary embeds user-data/kani-runner-userdata.sh"
    );

    let profile = Profile::try_from(example_row(
        "kani-medium",
        &["linux", "x64", "spot", "kani"],
    ))
    .unwrap();
    let rendered = render(&UserDataValues {
        controller_id: "spot-runners",
        runner_name: "spot-runners-kani-medium-abcd1234",
        profile: &profile,
    })
    .unwrap();
    // The JIT config is not in it (it waits in SSM: tests/boot_script.rs),
    // which leaves room to spare under EC2's limit.
    assert!(
        rendered.len() < MAX_USER_DATA_BYTES - 1024,
        "{} bytes",
        rendered.len()
    );
    assert!(rendered.contains("JIT_PARAMETER=\"/spot-runners/$CONTROLLER_ID/jit/$RUNNER_NAME\""));
    assert!(rendered.contains("RUNNER_NAME='spot-runners-kani-medium-abcd1234'"));
    assert!(
        rendered.contains("'900'"),
        "idle limit = boot + idle timeout"
    );
    assert!(rendered.contains("'28800'"), "lifetime from the profile");
    assert!(!rendered.contains("@@"));
    // scripts/test hands this file to shellcheck (scripts/check-assets).
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rendered-user-data.sh");
    std::fs::write(&out, rendered).unwrap();
}

/// `scripts/lib/apt.sh`'s probe, run as `check-assets` runs it (`set -euo
/// pipefail`) against a fake `apt-cache` whose answer is longer than a pipe
/// holds: the probe must still see the candidate. The old `apt-cache policy
/// | grep -q` reported such packages "not offered" (exit 141 from SIGPIPE),
/// so a fresh machine never installed packer or docker-compose.
#[test]
fn apt_probe_survives_long_policy_output_under_pipefail() {
    use std::os::unix::fs::PermissionsExt;

    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("apt-cache");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         case \"$2\" in\n\
           offered) echo \"$2:\"; echo '  Installed: (none)'; echo '  Candidate: 1.6.6+ds2-1'; \
                    i=0; while [ $i -lt 20000 ]; do echo \"     500 http://deb.example/debian bookworm/main amd64 Packages $i\"; i=$((i+1)); done ;;\n\
           *) echo \"$2:\"; echo '  Installed: (none)'; echo '  Candidate: (none)' ;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let probe = |pkg: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -euo pipefail; . scripts/lib/apt.sh; apt_offers {pkg}"
            ))
            .current_dir(repo())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.path().display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .status()
            .unwrap()
    };
    assert!(
        probe("offered").success(),
        "a package with a candidate is offered"
    );
    assert!(
        !probe("unknown").success(),
        "a package without a candidate is not offered"
    );
}
