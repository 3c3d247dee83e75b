//! What an operator asks the ledger from the command line: why a job has
//! (or has not) got a runner, and which runners exist. Reading is here;
//! the wording is in pure functions so it can be tested on its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use spot_runners_domain::backoff::{self, PastLaunch};
use spot_runners_domain::planner::Demand;
use spot_runners_domain::{ImageSource, JobStatus, Profile, RunnerState};
use spot_runners_store::{JobRecord, RunnerRecord, Store};

use crate::configuration::Settings;
use crate::Error;

/// `runners list` shows ended runners this recent with `--all`.
const ENDED_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Everything [`explain`] needs, read in one go.
pub struct JobContext {
    pub job: JobRecord,
    pub profiles: Vec<Profile>,
    /// Profile rows that failed validation: (name, why).
    pub invalid_profiles: Vec<(String, String)>,
    pub runners: Vec<RunnerRecord>,
    pub demand: BTreeMap<String, Demand>,
    pub max_instances: u32,
    pub now: DateTime<Utc>,
}

pub async fn explain_job(
    store: &dyn Store,
    settings: &Settings,
    job_id: i64,
) -> Result<String, Error> {
    let Some(job) = store.job(job_id).await? else {
        return Err(Error::NotFound(format!(
            "no job {job_id} in the ledger (no webhook for it was received, or it was recorded by another database)"
        )));
    };
    let mut profiles = Vec::new();
    let mut invalid_profiles = Vec::new();
    for row in store.profile_rows().await? {
        let name = row.name.clone();
        match Profile::try_from(row) {
            Ok(p) => profiles.push(p),
            Err(e) => invalid_profiles.push((name, e.to_string())),
        }
    }
    let profile = job.profile.clone();
    let context = JobContext {
        job,
        profiles,
        invalid_profiles,
        runners: store
            .runners(settings.controller_id.as_str(), ENDED_WINDOW)
            .await?,
        demand: store.demand().await?,
        max_instances: settings.max_instances,
        now: Utc::now(),
    };
    let mut text = explain(&context);
    text.push_str(
        &crate::reruns::explain_job_survival(
            store,
            settings.controller_id.as_str(),
            job_id,
            profile.as_deref(),
            &context.profiles,
            context.now,
        )
        .await?,
    );
    Ok(text)
}

pub async fn list_runners(
    store: &dyn Store,
    settings: &Settings,
    all: bool,
) -> Result<String, Error> {
    let window = if all { ENDED_WINDOW } else { Duration::ZERO };
    let runners = store
        .runners(settings.controller_id.as_str(), window)
        .await?;
    Ok(runners_table(&runners, Utc::now()))
}

fn ago(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Why a job has or has not got a runner, in plain words.
pub fn explain(c: &JobContext) -> String {
    let j = &c.job;
    let mut out = String::new();
    let workflow = j.workflow_name.as_deref().unwrap_or("?");
    let _ = writeln!(
        out,
        "job {} \"{}\" ({workflow}) in {}, labels [{}]",
        j.id,
        j.name,
        j.repository,
        j.labels.join(", ")
    );
    let _ = writeln!(
        out,
        "status: {} (first seen {} ago)",
        j.status,
        ago(c.now, j.first_seen_at)
    );
    match j.status {
        JobStatus::Waiting => {
            let _ = writeln!(
                out,
                "=> waiting for an environment approval; it is not demand until GitHub queues it."
            );
        }
        JobStatus::Queued => explain_queued(c, &mut out),
        JobStatus::InProgress | JobStatus::Completed => explain_taken(c, &mut out),
    }
    if let Some(t) = j.checked_at {
        let _ = writeln!(
            out,
            "last checked against GitHub's jobs API {} ago",
            ago(c.now, t)
        );
    }
    out
}

fn explain_queued(c: &JobContext, out: &mut String) {
    let j = &c.job;
    let Some(name) = &j.profile else {
        let why = j.match_error.as_deref().unwrap_or("not matched yet");
        let _ = writeln!(out, "=> no runner: no instance profile matches ({why}).");
        for (p, e) in &c.invalid_profiles {
            let _ = writeln!(out, "   profile {p} is invalid and ignored: {e}");
        }
        let _ = writeln!(
            out,
            "   Add or fix a row in instance_profiles; open jobs are matched again on every pass."
        );
        return;
    };
    let Some(profile) = c.profiles.iter().find(|p| p.name.as_str() == name) else {
        let _ = writeln!(
            out,
            "=> no runner: it matched profile {name}, which no longer exists or is invalid."
        );
        return;
    };
    if !profile.enabled {
        let _ = writeln!(out, "=> no runner: profile {name} is disabled.");
        return;
    }
    let queued = c.demand.get(name.as_str()).map_or(0, Demand::jobs);
    let position = j.queue_position.unwrap_or(1).max(1);
    let mine: Vec<&RunnerRecord> = c.runners.iter().filter(|r| &r.profile == name).collect();
    let available: Vec<&&RunnerRecord> = mine.iter().filter(|r| r.state.is_available()).collect();
    let live = mine.iter().filter(|r| r.state.is_live()).count();
    let live_total = c.runners.iter().filter(|r| r.state.is_live()).count();
    let mut by_state: BTreeMap<RunnerState, usize> = BTreeMap::new();
    for r in &available {
        *by_state.entry(r.state).or_default() += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let _ = writeln!(
        out,
        "profile {name}: {queued} queued (this job is #{position}), {} on the way or idle [{}], {live} of max_instances {} live; {live_total} of the global cap {} live",
        available.len(),
        states.join(", "),
        profile.max_instances,
        c.max_instances
    );
    let _ = writeln!(out, "   launches: {}", launch_summary(profile));
    let history: Vec<PastLaunch> = mine
        .iter()
        .filter(|r| {
            !matches!(
                r.state,
                RunnerState::Requested | RunnerState::Registered | RunnerState::Launching
            )
        })
        .map(|r| PastLaunch {
            at: r.updated_at,
            failure_code: (r.state == RunnerState::LaunchFailed)
                .then(|| r.last_error_code.clone().unwrap_or_default()),
        })
        .collect();
    let backed_off = backoff::from_history(&history).filter(|(_, _, until)| *until > c.now);
    if available.len() >= position {
        let _ = writeln!(
            out,
            "=> covered: a runner of {name} is on the way or idle. GitHub gives the job to the first fitting runner online."
        );
    } else if live as u32 >= profile.max_instances {
        let _ = writeln!(
            out,
            "=> waiting: profile {name} is at max_instances ({}); the job gets a runner when one frees up.",
            profile.max_instances
        );
    } else if live_total as u32 >= c.max_instances {
        let _ = writeln!(
            out,
            "=> waiting: the global cap SPOT_RUNNERS_MAX_INSTANCES ({}) is reached.",
            c.max_instances
        );
    } else if let Some((failures, code, until)) = &backed_off {
        let _ = writeln!(
            out,
            "=> backed off: launches of profile {name} were refused as invalid requests ({code}, {failures} in a row); \
             the service tries again in {} (backoff doubles, up to {} min). Fix the instance_profiles row: \
             an edit of what is launched (image, types, subnets, groups) is tried at once.",
            ago(*until, c.now),
            backoff::MAX_DELAY.as_secs() / 60
        );
        if code == spot_runners_domain::ports::IMAGE_FILTER_NO_MATCH {
            let _ = writeln!(
                out,
                "   No available AMI matches the profile's image_filter: build the image (packer/) or fix the filter."
            );
        }
    } else {
        let _ = writeln!(
            out,
            "=> not covered yet: the next reconcile pass requests a runner for it."
        );
    }
    let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
    for r in mine.iter().filter(|r| r.state == RunnerState::LaunchFailed) {
        *failures
            .entry(r.last_error_code.as_deref().unwrap_or("unknown"))
            .or_default() += 1;
    }
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(|(c, n)| format!("{c} x{n}")).collect();
        let _ = writeln!(
            out,
            "   recent launch failures in {name}: {}",
            list.join(", ")
        );
    }
}

/// What an instance of the profile is launched from and with.
fn launch_summary(profile: &Profile) -> String {
    let image = match &profile.image {
        ImageSource::Id(id) => format!("image {id}"),
        ImageSource::Filter(filter) => format!(
            "the newest available AMI matching image_filter {filter} (looked up at launch, cached {} min; \
             the service logs `image filter resolved` with the AMI id)",
            spot_runners_aws::IMAGE_FILTER_TTL.as_secs() / 60
        ),
    };
    let smt = match profile.threads_per_core {
        Some(1) => ", 1 thread per core (SMT off)".to_owned(),
        Some(n) => format!(", {n} threads per core"),
        None => String::new(),
    };
    let tuning = if profile.benchmark_tuning {
        ", benchmark tuning at boot (/run/spot-runners/tuning)"
    } else {
        ""
    };
    format!("{image}{smt}{tuning}")
}

fn explain_taken(c: &JobContext, out: &mut String) {
    let j = &c.job;
    let verb = if j.status == JobStatus::Completed {
        format!(
            "completed ({})",
            j.conclusion.as_deref().unwrap_or("no conclusion")
        )
    } else {
        "running".to_owned()
    };
    let Some(runner) = &j.runner_name else {
        let _ = writeln!(
            out,
            "=> {verb} without a runner (cancelled while queued, or closed by a stale check)."
        );
        return;
    };
    match c.runners.iter().find(|r| &r.name == runner) {
        Some(r) => {
            let _ = writeln!(
                out,
                "=> {verb} on our runner {runner}: {} ({}, instance {}{})",
                r.state,
                r.profile,
                r.instance_id.as_deref().unwrap_or("none"),
                r.reason
                    .as_deref()
                    .map(|s| format!(", {s}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "=> {verb} on runner {runner}, which this controller does not own (or ended over a day ago)."
            );
        }
    }
}

/// One line per runner, newest last.
pub fn runners_table(runners: &[RunnerRecord], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<16} {:<13} {:<21} {:<14} {:<9} {:>8} {:>12}  LAST ERROR",
        "NAME", "PROFILE", "STATE", "INSTANCE", "TYPE", "MARKET", "AGE", "JOB"
    );
    for r in runners {
        let _ = writeln!(
            out,
            "{:<40} {:<16} {:<13} {:<21} {:<14} {:<9} {:>8} {:>12}  {}",
            r.name,
            r.profile,
            r.state.as_str(),
            r.instance_id.as_deref().unwrap_or("-"),
            r.instance_type.as_deref().unwrap_or("-"),
            r.market.as_deref().unwrap_or("-"),
            ago(now, r.created_at),
            r.job_id.map_or("-".to_owned(), |j| j.to_string()),
            r.last_error_code.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(out, "{} runner(s)", runners.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use spot_runners_domain::ports::RunnerScope;
    use spot_runners_domain::profile::example_row;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn job(status: JobStatus, profile: Option<&str>) -> JobRecord {
        JobRecord {
            id: 42,
            name: "proof".into(),
            workflow_name: Some("kani".into()),
            repository: "acme/proofs".into(),
            org: Some("acme".into()),
            labels: vec!["self-hosted".into(), "kani".into()],
            status,
            conclusion: None,
            runner_name: None,
            profile: profile.map(str::to_owned),
            match_error: profile
                .is_none()
                .then(|| "no profile has label gpu".to_owned()),
            html_url: None,
            first_seen_at: t(0),
            queued_at: Some(t(0)),
            in_progress_at: None,
            completed_at: None,
            checked_at: None,
            queue_position: Some(1),
        }
    }

    fn runner(name: &str, state: RunnerState) -> RunnerRecord {
        RunnerRecord {
            name: name.into(),
            profile: "kani".into(),
            state,
            scope: RunnerScope::Org("acme".into()),
            github_runner_id: Some(1),
            instance_id: Some(format!("i-{name}")),
            instance_type: Some("c6i.4xlarge".into()),
            subnet_id: None,
            market: Some("spot".into()),
            job_id: None,
            launch_attempts: 1,
            last_error_code: None,
            reason: None,
            demand_since: Some(t(0)),
            created_at: t(1),
            launched_at: Some(t(2)),
            online_at: None,
            updated_at: t(2),
        }
    }

    fn context(job: JobRecord, runners: Vec<RunnerRecord>, max_instances: i32) -> JobContext {
        let mut row = example_row("kani", &["kani"]);
        row.max_instances = max_instances;
        let mut queued = Demand::default();
        queued.add(RunnerScope::Org("acme".into()), t(0));
        JobContext {
            job,
            profiles: vec![Profile::try_from(row).unwrap()],
            invalid_profiles: vec![("gpu".into(), "image_id is empty".into())],
            runners,
            demand: BTreeMap::from([("kani".to_owned(), queued)]),
            max_instances: 100,
            now: t(90),
        }
    }

    #[test]
    fn an_unmatched_job_says_why_and_what_to_do() {
        let text = explain(&context(job(JobStatus::Queued, None), vec![], 5));
        assert!(
            text.contains("no instance profile matches (no profile has label gpu)"),
            "{text}"
        );
        assert!(
            text.contains("profile gpu is invalid and ignored: image_id is empty"),
            "{text}"
        );
    }

    #[test]
    fn the_launch_line_names_the_image_source_and_cpu_settings() {
        let plain = Profile::try_from(example_row("kani", &["kani"])).unwrap();
        assert_eq!(launch_summary(&plain), "image ami-0123456789abcdef0");
        let mut row = example_row("bench", &["bench"]);
        row.image_id = None;
        row.image_filter = Some("self/bench-runner-*".into());
        row.threads_per_core = Some(1);
        row.benchmark_tuning = true;
        let line = launch_summary(&Profile::try_from(row).unwrap());
        assert!(
            line.starts_with("the newest available AMI matching image_filter self/bench-runner-*"),
            "{line}"
        );
        assert!(line.contains("1 thread per core (SMT off)"), "{line}");
        assert!(line.contains("benchmark tuning at boot"), "{line}");
    }

    #[test]
    fn a_covered_job_names_the_runners_on_the_way() {
        let text = explain(&context(
            job(JobStatus::Queued, Some("kani")),
            vec![runner("a", RunnerState::Booting)],
            5,
        ));
        assert!(text.contains("1 on the way or idle [1 booting]"), "{text}");
        assert!(text.contains("=> covered"), "{text}");
    }

    #[test]
    fn a_job_at_the_profile_cap_says_so() {
        let mut failed = runner("f", RunnerState::LaunchFailed);
        failed.last_error_code = Some("InsufficientInstanceCapacity".into());
        let text = explain(&context(
            job(JobStatus::Queued, Some("kani")),
            vec![runner("b", RunnerState::Busy), failed],
            1,
        ));
        assert!(text.contains("is at max_instances (1)"), "{text}");
        assert!(text.contains("InsufficientInstanceCapacity x1"), "{text}");
    }

    #[test]
    fn a_profile_refused_as_invalid_says_it_is_backed_off() {
        let failed = |name: &str, at: i64| {
            let mut r = runner(name, RunnerState::LaunchFailed);
            r.last_error_code = Some("InvalidAMIID.NotFound".into());
            r.instance_id = None;
            r.updated_at = t(at);
            r
        };
        let text = explain(&context(
            job(JobStatus::Queued, Some("kani")),
            vec![failed("a", 40), failed("b", 80)],
            5,
        ));
        // Two in a row: 60 s after the latest (t=80), at t=90 that is 50 s away.
        assert!(
            text.contains("=> backed off: launches of profile kani were refused as invalid requests (InvalidAMIID.NotFound, 2 in a row)"),
            "{text}"
        );
        assert!(text.contains("tries again in 50s"), "{text}");
        // Capacity errors are no reason to back off.
        let mut capacity = failed("c", 80);
        capacity.last_error_code = Some("InsufficientInstanceCapacity".into());
        let text = explain(&context(
            job(JobStatus::Queued, Some("kani")),
            vec![capacity],
            5,
        ));
        assert!(text.contains("=> not covered yet"), "{text}");
    }

    #[test]
    fn a_running_job_names_its_runner() {
        let mut j = job(JobStatus::InProgress, Some("kani"));
        j.runner_name = Some("a".into());
        let text = explain(&context(j, vec![runner("a", RunnerState::Busy)], 5));
        assert!(
            text.contains("=> running on our runner a: busy (kani, instance i-a)"),
            "{text}"
        );
    }

    #[test]
    fn the_runner_table_has_a_line_per_runner() {
        let table = runners_table(&[runner("a", RunnerState::Idle)], t(150));
        assert!(table.contains("i-a"), "{table}");
        assert!(table.contains("2m29s"), "{table}");
        assert!(table.ends_with("1 runner(s)\n"), "{table}");
    }
}
