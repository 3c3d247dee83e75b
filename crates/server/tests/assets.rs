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

/// The rendered boot script's top-level function `name() { ... }`.
fn shell_function(script: &str, name: &str) -> String {
    let start = script
        .find(&format!("\n{name}() {{"))
        .unwrap_or_else(|| panic!("boot script defines no {name}()"));
    let body = &script[start + 1..];
    let end = body.find("\n}\n").expect("function closes") + 3;
    body[..end].to_owned()
}

/// The boot script's interruption section, as rendered by the service.
fn interruption_section(script: &str) -> String {
    let start = script
        .find("# ---- spot interruption and rebalance")
        .expect("boot script has the interruption section");
    let end = script[start..]
        .find("# ---- end of spot interruption and rebalance")
        .expect("section ends")
        + start;
    script[start..end].to_owned()
}

struct WatchRun {
    log: String,
    stops: String,
    power_off: String,
}

/// Runs the rendered boot script's `interruption_watch` against a fake IMDS
/// (`imds` serves `/latest/...`), with `pkill` and `power_off` recorded
/// instead of done, until the watch returns (or 20 s pass: a failure).
async fn run_interruption_watch(imds: &wiremock::MockServer, busy: bool) -> WatchRun {
    use std::os::unix::fs::PermissionsExt;

    let profile = Profile::try_from(example_row("kani-medium", &["kani"])).unwrap();
    let rendered = render(&UserDataValues {
        controller_id: "spot-runners",
        runner_name: "spot-runners-kani-medium-abcd1234",
        profile: &profile,
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    std::fs::write(
        out.join("pkill"),
        format!("#!/bin/sh\necho \"$*\" >>{}/stops\n", out.display()),
    )
    .unwrap();
    std::fs::set_permissions(out.join("pkill"), std::fs::Permissions::from_mode(0o755)).unwrap();
    if busy {
        std::fs::write(out.join("busy"), "").unwrap();
    }
    let harness = format!(
        "set -euo pipefail\n\
         OUT={out}\n\
         RUNNER_NAME=spot-runners-kani-medium-abcd1234\n\
         RUNNER_USER=runner\n\
         IMDS={imds}/latest\n\
         log() {{ printf '%s\\n' \"$*\" >>\"$OUT/log\"; }}\n\
         power_off() {{ printf '%s\\n' \"$*\" >>\"$OUT/power_off\"; }}\n\
         job_started() {{ [[ -e $OUT/busy ]]; }}\n\
         {token}\n{section}\n\
         INTERRUPTION_POLL_SECS=0.05\n\
         interruption_watch\n",
        out = out.display(),
        imds = imds.uri(),
        token = shell_function(&rendered, "imds_token"),
        section = interruption_section(&rendered),
    );
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(harness)
        .env(
            "PATH",
            format!("{}:{}", out.display(), std::env::var("PATH").unwrap()),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("interruption_watch returns once it has acted")
        .unwrap();
    assert!(status.success(), "interruption_watch failed: {status}");
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    WatchRun {
        log: read("log"),
        stops: read("stops"),
        power_off: read("power_off"),
    }
}

async fn fake_imds() -> wiremock::MockServer {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let imds = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .and(header("X-aws-ec2-metadata-token-ttl-seconds", "21600"))
        .respond_with(ResponseTemplate::new(200).set_body_string("tok-1"))
        .mount(&imds)
        .await;
    imds
}

fn imds_answer(p: &str, status: u16, body: &str) -> wiremock::Mock {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, ResponseTemplate};
    // Only IMDSv2: a request without the session token gets nothing.
    Mock::given(method("GET"))
        .and(path(format!("/latest/meta-data/{p}")))
        .and(header("X-aws-ec2-metadata-token", "tok-1"))
        .respond_with(ResponseTemplate::new(status).set_body_string(body))
}

const NOTICE: &str = r#"{"action":"terminate","time":"2026-12-01T10:02:00Z"}"#;
const REBALANCE: &str = r#"{"noticeTime":"2026-12-01T09:58:00Z"}"#;

#[tokio::test]
async fn boot_script_stops_a_busy_runner_on_the_interruption_notice_and_says_so() {
    let imds = fake_imds().await;
    imds_answer("spot/instance-action", 200, NOTICE)
        .mount(&imds)
        .await;
    let run = run_interruption_watch(&imds, true).await;
    assert_eq!(run.stops.trim(), "-INT -u runner -x Runner.Listener");
    assert!(
        run.log.contains(&format!(
            "spot-runners-event interruption-notice runner=spot-runners-kani-medium-abcd1234 job=busy notice={NOTICE}"
        )),
        "{}",
        run.log
    );
    // The reclaim ends the instance; the script's own exit powers it off.
    assert!(run.power_off.is_empty(), "{}", run.power_off);
}

#[tokio::test]
async fn boot_script_gives_up_an_idle_runner_on_a_rebalance_recommendation() {
    let imds = fake_imds().await;
    imds_answer("events/recommendations/rebalance", 200, REBALANCE)
        .mount(&imds)
        .await;
    let run = run_interruption_watch(&imds, false).await;
    assert!(
        run.log
            .contains("spot-runners-event rebalance-recommendation runner=spot-runners-kani-medium-abcd1234 job=idle action=replace"),
        "{}",
        run.log
    );
    assert_eq!(run.stops.trim(), "-INT -u runner -x Runner.Listener");
    assert!(
        run.power_off
            .contains("rebalance recommendation while idle"),
        "{}",
        run.power_off
    );
}

#[tokio::test]
async fn boot_script_keeps_a_busy_runner_on_a_rebalance_recommendation() {
    let imds = fake_imds().await;
    imds_answer("events/recommendations/rebalance", 200, REBALANCE)
        .mount(&imds)
        .await;
    // No notice for the first polls, then the notice.
    imds_answer("spot/instance-action", 404, "")
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&imds)
        .await;
    imds_answer("spot/instance-action", 200, NOTICE)
        .mount(&imds)
        .await;
    let run = run_interruption_watch(&imds, true).await;
    let lines: Vec<&str> = run
        .log
        .lines()
        .filter(|l| l.starts_with("spot-runners-event"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", run.log);
    assert!(
        lines[0].starts_with("spot-runners-event rebalance-recommendation")
            && lines[0].contains("job=busy action=none"),
        "{}",
        run.log
    );
    assert!(lines[1].starts_with("spot-runners-event interruption-notice"));
    // Stopped once, on the notice, not on the recommendation.
    assert_eq!(run.stops.lines().count(), 1, "{}", run.stops);
    assert!(run.power_off.is_empty());
}

/// `deploy/iam/service-policy.json` grants the EC2 calls the adapter makes
/// and no others (`CreateTags` rides on `RunInstances`' tag specifications).
#[test]
fn the_service_policy_grants_exactly_the_ec2_calls_the_adapter_makes() {
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/iam/service-policy.json")).unwrap(),
    )
    .unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        let actions = match &statement["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|a| a.as_str().unwrap().to_owned()).collect()
            }
            other => panic!("Action {other}"),
        };
        for a in actions {
            if let Some(ec2) = a.strip_prefix("ec2:") {
                granted.insert(ec2.to_owned());
            }
        }
    }
    let adapter = std::fs::read_to_string(repo().join("crates/aws/src/lib.rs")).unwrap();
    let snake = |action: &str| {
        let mut out = String::new();
        for (i, c) in action.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    };
    for action in &granted {
        if action == "CreateTags" {
            assert!(
                adapter.contains("tag_specifications("),
                "CreateTags is for launch-time tags"
            );
            continue;
        }
        assert!(
            adapter.contains(&format!(".{}()", snake(action))),
            "the policy grants ec2:{action}, which the adapter never calls: drop it"
        );
    }
    for call in [
        "run_instances",
        "terminate_instances",
        "describe_instances",
        "describe_images",
        "describe_spot_price_history",
        "describe_instance_types",
    ] {
        if adapter.contains(&format!(".{call}()")) {
            assert!(
                granted.iter().any(|a| snake(a) == call),
                "the adapter calls {call}, which the policy does not grant"
            );
        }
    }
    let text = serde_json::to_string(&policy).unwrap();
    assert!(
        text.contains("iam:CreateServiceLinkedRole") && text.contains("spot.amazonaws.com"),
        "a fresh account needs the spot service-linked role"
    );
    assert!(
        text.contains("kms:CreateGrant"),
        "EBS keys of the account's own"
    );
}

/// Launch latency reaches minutes behind caps and rate limits: its buckets
/// must tell 5 minutes from 50.
#[test]
fn launch_latency_buckets_reach_minutes() {
    let metrics = Metrics::new().unwrap();
    metrics
        .launch_latency_seconds
        .with_label_values(&["kani"])
        .observe(240.0);
    let text = metrics.render();
    for (le, n) in [("120", 0), ("300", 1), ("1800", 1), ("3600", 1)] {
        let line = format!(
            "spot_runners_launch_latency_seconds_bucket{{profile=\"kani\",le=\"{le}\"}} {n}"
        );
        assert!(text.contains(&line), "missing {line}:\n{text}");
    }
}
