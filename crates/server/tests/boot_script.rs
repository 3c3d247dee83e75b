//! The boot script's secret path, run for real: the script the service
//! renders, under bash, against fake metadata service, SSM, firewall and
//! runner commands (`tests/fixtures/boot_script/fake.py`). The JIT config
//! must reach the runner once, from SSM, be deleted there, never appear on
//! a command line or in the log, and the runner user must be firewalled off
//! the metadata service before any job can run.
//!
//! The benchmark tuning runs here too: the image's tuning script
//! (`packer/files/benchmark-tuning.sh`) against a fake `/sys` and `/proc`,
//! only for a profile with `benchmark_tuning`, and the state file a job
//! prints.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spot_runners_domain::profile::{example_row, Profile, ProfileRow};
use spot_runners_domain::userdata::{render, UserDataValues};

const CONTROLLER: &str = "spot-runners";
const RUNNER: &str = "spot-runners-kani-medium-abcd1234";
const PARAMETER: &str = "/spot-runners/spot-runners/jit/spot-runners-kani-medium-abcd1234";
const INSTANCE_ARN: &str = "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0";
/// What the fake metadata service hands out as the role's credentials.
const ROLE_SECRETS: [&str; 2] = ["fake-secret-access-key", "fake-session-token"];
const FAKES: [&str; 9] = [
    "curl",
    "iptables",
    "ip6tables",
    "runuser",
    "logger",
    "shutdown",
    "poweroff",
    "getent",
    "jq",
];

/// Kernel files as a fresh Ubuntu instance has them, relative to `/`.
const KERNEL_DEFAULTS: [(&str, &str); 14] = [
    (
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
        "powersave",
    ),
    (
        "sys/devices/system/cpu/cpu1/cpufreq/scaling_governor",
        "powersave",
    ),
    ("sys/devices/system/cpu/intel_pstate/no_turbo", "0"),
    ("sys/devices/system/cpu/cpu0/cpuidle/state1/disable", "0"),
    ("sys/devices/system/cpu/cpu0/cpuidle/state2/disable", "0"),
    ("sys/devices/system/cpu/cpu1/cpuidle/state1/disable", "0"),
    ("sys/devices/system/cpu/cpu1/cpuidle/state3/disable", "0"),
    ("sys/devices/system/cpu/smt/active", "0"),
    ("sys/devices/system/cpu/online", "0-1"),
    (
        "sys/kernel/mm/transparent_hugepage/enabled",
        "always [madvise] never",
    ),
    ("sys/kernel/mm/transparent_hugepage/defrag", "madvise"),
    ("proc/sys/kernel/randomize_va_space", "2"),
    ("proc/sys/kernel/perf_event_paranoid", "4"),
    ("proc/sys/kernel/kptr_restrict", "1"),
];

fn jit_config() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .encode(r#"{".runner":"eyJhZ2VudElkIjoxfQ==",".credentials":"eyJzY2hlbWUiOiJPQXV0aCJ9"}"#)
}

struct Instance {
    dir: tempfile::TempDir,
}

struct Run {
    status: std::process::ExitStatus,
    calls: Vec<Value>,
    aws: Value,
    journal: String,
    log_file: String,
}

impl Instance {
    /// A fake instance whose parameter store holds `parameters`
    /// (name → (value, instance ARN it is granted to)).
    fn new(parameters: &Value, fast_clock: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["bin", "state", "state/home", "runner"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // The image's tuning script, and the kernel files it tunes, as an
        // instance of a type that gives the guest P-state and C-state control.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packer/files/benchmark-tuning.sh"),
            root.join("bin/spot-runners-benchmark-tuning"),
        )
        .unwrap();
        for (file, value) in KERNEL_DEFAULTS {
            let path = root.join("fs").join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }
        let fake = root.join("bin/fake.py");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boot_script/fake.py"),
            &fake,
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut names = FAKES.to_vec();
        if fast_clock {
            // 36 retries: the real jq keeps the run short (its arguments
            // are filters only; the runs without a fast clock record them).
            names.retain(|n| *n != "jq");
            names.push("sleep");
        }
        for name in names {
            symlink("fake.py", root.join("bin").join(name)).unwrap();
        }
        std::fs::write(
            root.join("state/aws.json"),
            json!({"parameters": parameters, "log": []}).to_string(),
        )
        .unwrap();
        // The runner: what it was given, and how.
        let state = root.join("state");
        let run_sh = root.join("runner/run.sh");
        std::fs::write(
            &run_sh,
            format!(
                "#!/bin/sh\nprintf '%s' \"$ACTIONS_RUNNER_INPUT_JITCONFIG\" >'{s}/runner-config'\n\
                 printf '%s\\n' \"$#\" \"$*\" >'{s}/runner-args'\nenv >'{s}/runner-env'\n",
                s = state.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&run_sh, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    /// A fake kernel file's content, trimmed.
    fn kernel_file(&self, file: &str) -> String {
        std::fs::read_to_string(self.root().join("fs").join(file))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self, file: &str) -> PathBuf {
        self.root().join("state").join(file)
    }

    /// Renders the boot script as the service does for the kani-medium
    /// profile and runs it to its end.
    fn boot(&self, extra_env: &[(&str, &str)]) -> Run {
        self.boot_profile(
            example_row("kani-medium", &["linux", "x64", "spot", "kani"]),
            extra_env,
        )
    }

    fn boot_profile(&self, row: ProfileRow, extra_env: &[(&str, &str)]) -> Run {
        let profile = Profile::try_from(row).unwrap();
        let script = render(&UserDataValues {
            controller_id: CONTROLLER,
            runner_name: RUNNER,
            profile: &profile,
        })
        .unwrap();
        let path = self.root().join("user-data.sh");
        std::fs::write(&path, &script).unwrap();

        let mut command = Command::new("bash");
        command
            .arg(&path)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.root().join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("SPOT_RUNNERS_TEST_RUNNER_DIR", self.root().join("runner"))
            .env("SPOT_RUNNERS_TEST_LOG_FILE", self.state("userdata.log"))
            .env("SPOT_RUNNERS_TEST_TUNING_FILE", self.state("tuning"))
            .env(
                "SPOT_RUNNERS_TEST_TUNING_SCRIPT",
                self.root().join("bin/spot-runners-benchmark-tuning"),
            )
            .env("SPOT_RUNNERS_TEST_ROOT", self.root().join("fs"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its watchdogs run on in the background, as on an instance
            // until the power goes: the whole group is ended afterwards.
            .process_group(0);
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the boot script did not finish");
            std::thread::sleep(Duration::from_millis(20));
        };
        let read = |f: &str| std::fs::read_to_string(self.state(f)).unwrap_or_default();
        // The log goes through a pipe (tee, then logger) that may still hold
        // the script's last line: wait for it before ending the group.
        let last = "powering off: boot script ended";
        while !(read("userdata.log").contains(last) && read("journal").contains(last)) {
            assert!(
                Instant::now() < deadline,
                "the boot script's log never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();

        Run {
            status,
            calls: read("calls.jsonl")
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            aws: serde_json::from_str(&read("aws.json")).unwrap(),
            journal: read("journal"),
            log_file: read("userdata.log"),
        }
    }
}

impl Run {
    fn position(&self, what: &str, test: impl Fn(&Value) -> bool) -> usize {
        self.calls
            .iter()
            .position(test)
            .unwrap_or_else(|| panic!("no call {what} in {:#?}", self.calls))
    }

    fn ssm_ops(&self) -> Vec<(String, Value)> {
        self.aws["log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["op"].as_str().unwrap().to_owned(), e["request"].clone()))
            .collect()
    }

    fn secrets_stay_off_command_lines(&self, secrets: &[&str]) {
        for call in &self.calls {
            let line = call["argv"].to_string();
            for secret in secrets {
                assert!(!line.contains(secret), "a secret on a command line: {call}");
            }
        }
        for secret in secrets {
            assert!(!self.journal.contains(secret), "a secret in the journal");
            assert!(!self.log_file.contains(secret), "a secret in the log file");
        }
    }
}

fn granted(value: &str) -> Value {
    json!({ PARAMETER: {"value": value, "tags": {"spot-runners:instance-arn": INSTANCE_ARN}} })
}

fn is_runner_start(c: &Value) -> bool {
    c["cmd"] == "runuser" && c["argv"].to_string().contains("run.sh")
}

#[test]
fn the_jit_config_is_read_once_deleted_and_given_to_the_runner_on_stdin() {
    let jit = jit_config();
    let instance = Instance::new(&granted(&jit), false);
    let run = instance.boot(&[]);

    // The runner ran, got the config from its environment and no argument.
    let got = std::fs::read_to_string(instance.state("runner-config")).unwrap();
    assert_eq!(got, jit);
    let args = std::fs::read_to_string(instance.state("runner-args")).unwrap();
    assert_eq!(args, "0\n\n", "run.sh takes no argument");
    let env = std::fs::read_to_string(instance.state("runner-env")).unwrap();
    assert!(env.contains("USER=runner") && !env.contains("SPOT_RUNNERS_TEST"));

    // Read once, with decryption, then deleted; nothing else asked of SSM.
    let ops = run.ssm_ops();
    assert_eq!(
        ops,
        vec![
            (
                "AmazonSSM.GetParameter".to_owned(),
                json!({"Name": PARAMETER, "WithDecryption": true})
            ),
            (
                "AmazonSSM.DeleteParameter".to_owned(),
                json!({"Name": PARAMETER})
            ),
        ]
    );
    assert_eq!(run.aws["parameters"], json!({}), "the parameter is gone");
    // Every SSM call got the role's keys on stdin.
    assert!(run
        .calls
        .iter()
        .filter(|c| c["cmd"] == "curl" && c["argv"].to_string().contains("ssm.us-east-1"))
        .all(|c| c["config_on_stdin"] == true));

    // The firewall rule came first; the runner user was refused by it.
    let firewall = run.position("iptables for IMDS", |c| {
        c["cmd"] == "iptables" && {
            let a = c["argv"].to_string();
            a.contains("\"169.254.169.254/32\"")
                && a.contains("\"--uid-owner\",\"runner\"")
                && a.contains("\"REJECT\"")
                && a.contains("\"OUTPUT\"")
        }
    });
    let probe = run.position("IMDS probe as the runner user", |c| {
        c["cmd"] == "curl" && c["user"] == "runner"
    });
    let fetch = run.position("SSM fetch", |c| {
        c["cmd"] == "curl" && c["argv"].to_string().contains("AmazonSSM.GetParameter")
    });
    let start = run.position("runner start", is_runner_start);
    assert!(firewall < probe && probe < fetch && fetch < start);
    assert!(run.calls[start]["argv"].to_string().contains("env\",\"-i"));
    assert!(run
        .calls
        .iter()
        .filter(|c| c["user"] == "runner")
        .all(|c| c["cmd"] != "curl" || c == &run.calls[probe]));

    run.secrets_stay_off_command_lines(&[jit.as_str(), ROLE_SECRETS[0], ROLE_SECRETS[1]]);
    assert!(run.log_file.contains("JIT config read from"));
    assert!(run.log_file.contains("metadata service blocked for runner"));
    // The runner exited: the instance powers off (and so terminates).
    run.position("shutdown", |c| c["cmd"] == "shutdown");
    assert!(run.status.success(), "the runner exited cleanly");
}

#[test]
fn a_config_never_granted_to_this_instance_is_not_read_and_no_job_runs() {
    let jit = jit_config();
    let mut other = granted(&jit);
    other[PARAMETER]["tags"]["spot-runners:instance-arn"] =
        "arn:aws:ec2:us-east-1:123456789012:instance/i-0ffffffffffffffff".into();
    let instance = Instance::new(&other, true);
    let run = instance.boot(&[]);

    assert!(
        !instance.state("runner-config").exists(),
        "no runner started"
    );
    assert!(!run.calls.iter().any(is_runner_start));
    let ops = run.ssm_ops();
    // Retried (the grant follows RunInstances), never deleted, then given up.
    assert_eq!(ops.len(), 36, "{ops:?}");
    assert!(ops.iter().all(|(op, _)| op == "AmazonSSM.GetParameter"));
    assert!(run.aws["parameters"][PARAMETER].is_object());
    assert!(run.log_file.contains("FATAL: could not read"));
    assert!(!run.status.success());
    run.position("shutdown", |c| c["cmd"] == "shutdown");
    run.secrets_stay_off_command_lines(&[jit.as_str(), ROLE_SECRETS[0], ROLE_SECRETS[1]]);
}

#[test]
fn an_ineffective_firewall_stops_the_boot_before_the_config_is_read() {
    let jit = jit_config();
    let instance = Instance::new(&granted(&jit), false);
    let run = instance.boot(&[("FAKE_FIREWALL", "ignores-rules")]);

    assert!(run.ssm_ops().is_empty(), "nothing read from SSM");
    assert!(!run.calls.iter().any(is_runner_start));
    assert!(run
        .log_file
        .contains("FATAL: the runner user still reaches the metadata service"));
    assert!(!run.status.success());
    run.position("shutdown", |c| c["cmd"] == "shutdown");
}

#[test]
fn benchmark_tuning_is_applied_only_where_the_profile_asks_and_reported() {
    let jit = jit_config();
    let mut bench = example_row("bench", &["linux", "x64", "bench"]);
    bench.benchmark_tuning = true;
    bench.threads_per_core = Some(1);
    let tuned = Instance::new(&granted(&jit), false);
    let run = tuned.boot_profile(bench.clone(), &[]);
    assert!(run.status.success(), "{}", run.log_file);

    for cpu in ["cpu0", "cpu1"] {
        assert_eq!(
            tuned.kernel_file(&format!(
                "sys/devices/system/cpu/{cpu}/cpufreq/scaling_governor"
            )),
            "performance"
        );
    }
    let cpu = |f: &str| tuned.kernel_file(&format!("sys/devices/system/cpu/{f}"));
    assert_eq!(cpu("intel_pstate/no_turbo"), "1");
    // C1 stays; deeper states are off.
    assert_eq!(cpu("cpu0/cpuidle/state1/disable"), "0");
    assert_eq!(cpu("cpu0/cpuidle/state2/disable"), "1");
    assert_eq!(cpu("cpu1/cpuidle/state3/disable"), "1");
    assert_eq!(
        tuned.kernel_file("sys/kernel/mm/transparent_hugepage/enabled"),
        "never"
    );
    assert_eq!(tuned.kernel_file("proc/sys/kernel/randomize_va_space"), "0");
    assert_eq!(
        tuned.kernel_file("proc/sys/kernel/perf_event_paranoid"),
        "1"
    );

    let state = std::fs::read_to_string(tuned.state("tuning")).unwrap();
    let lines: Vec<&str> = state.lines().collect();
    for expected in [
        "benchmark_tuning=on",
        "governor=performance",
        "intel_pstate_no_turbo=1",
        // This fake instance type has no acpi-cpufreq boost switch.
        "cpufreq_boost=unavailable",
        "deep_cstates_disabled=1",
        "transparent_hugepage=never",
        "randomize_va_space=0",
        "perf_event_paranoid=1",
        "smt_active=0",
        "online_cpus=0-1",
    ] {
        assert!(lines.contains(&expected), "{expected} missing from {state}");
    }
    assert!(lines.iter().any(|l| l.starts_with("perf=")), "{state}");
    assert!(run
        .log_file
        .contains("benchmark_tuning=on governor=performance"));
    // Tuned before the runner could take a job.
    let tuning_logged = run.log_file.find("tuning (").unwrap();
    let jit_read = run.log_file.find("JIT config read from").unwrap();
    assert!(tuning_logged < jit_read);

    // A Kani profile: the kernel keeps its defaults, and the file says so.
    let plain = Instance::new(&granted(&jit), false);
    let run = plain.boot(&[]);
    assert!(run.status.success());
    for (file, value) in KERNEL_DEFAULTS {
        assert_eq!(plain.kernel_file(file), value, "{file} was changed");
    }
    assert_eq!(
        std::fs::read_to_string(plain.state("tuning")).unwrap(),
        "benchmark_tuning=off\n"
    );

    // An image without the tuning script still runs the job, and says why
    // it is untuned.
    let bare = Instance::new(&granted(&jit), false);
    std::fs::remove_file(bare.root().join("bin/spot-runners-benchmark-tuning")).unwrap();
    let run = bare.boot_profile(bench, &[]);
    assert!(run.status.success());
    assert!(bare.state("runner-config").exists(), "the job ran");
    assert!(std::fs::read_to_string(bare.state("tuning"))
        .unwrap()
        .starts_with("benchmark_tuning=unavailable (the image has no "));
    assert_eq!(bare.kernel_file("proc/sys/kernel/randomize_va_space"), "2");
}
