//! `kill -9` in the middle of a burst: the real binary, on moto (through
//! aws-sdk-ec2) and a GitHub mock (through octocrab), killed while it
//! launches, then started again. Afterwards every queued job has exactly
//! one live instance, granted its own JIT config in SSM (moto), and no
//! instance or runner is left that the ledger does not account for.

mod common;
#[path = "support/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use common::{job_payload, post_delivery, SECRET};
use spot_runners_domain::webhook::sign;
use spot_runners_store::testing::test_database;
use spot_runners_store::PgStore;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const CONTROLLER: &str = "kill9";
const JOBS: i64 = 14;

/// GitHub's generate-jitconfig: a new runner id every call.
struct JitConfigs(AtomicI64);

impl Respond for JitConfigs {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = self.0.fetch_add(1, Ordering::SeqCst);
        let name = serde_json::from_slice::<serde_json::Value>(&request.body)
            .ok()
            .and_then(|b| b["name"].as_str().map(str::to_owned))
            .unwrap_or_default();
        ResponseTemplate::new(201).set_body_json(serde_json::json!({
            "runner": {"id": id, "name": name, "os": "linux", "status": "offline", "busy": false, "labels": []},
            "encoded_jit_config": "eyJ4IjoieSJ9",
        }))
    }
}

struct Service {
    child: Child,
    log: PathBuf,
    base: String,
}

impl Service {
    /// Starts `spot-runners serve` and waits (bounded) for its address.
    async fn start(db_url: &str, github: &str, run: u32) -> Self {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kill9-run{run}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_spot-runners"))
            .arg("serve")
            .env("DATABASE_URL", db_url)
            .env("SPOT_RUNNERS_LISTEN", "127.0.0.1:0")
            .env("SPOT_RUNNERS_WEBHOOK_SECRET", SECRET)
            .env("SPOT_RUNNERS_CONTROLLER_ID", CONTROLLER)
            .env("SPOT_RUNNERS_GITHUB_API_URL", github)
            .env("SPOT_RUNNERS_GITHUB_TOKEN", "ghs_test")
            .env("SPOT_RUNNERS_RECONCILE_INTERVAL_SECS", "1")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the service binary starts");
        let mut service = Self {
            child,
            log,
            base: String::new(),
        };
        let addr = wait_for("the service to listen", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&service.log).unwrap_or_default();
            let found = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|a| a.trim().to_owned());
            async move { found }
        })
        .await;
        service.base = format!("http://{addr}");
        service
    }

    fn kill_9(&mut self) {
        // SIGKILL: no shutdown handler runs, nothing is flushed.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn deliver(&self, client: &reqwest::Client, delivery: &str, body: &[u8]) -> u16 {
        let signature = sign(SECRET.as_bytes(), body);
        post_delivery(
            client,
            &self.base,
            "workflow_job",
            delivery,
            body,
            &signature,
        )
        .await
        .status()
        .as_u16()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Live instances of this controller in moto: instance id → runner tag.
async fn live_instances(ec2: &aws_sdk_ec2::Client) -> BTreeMap<String, String> {
    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:spot-runners:controller")
                .values(CONTROLLER)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            let runner = i
                .tags()
                .iter()
                .find(|t| t.key() == Some("spot-runners:runner"))
                .and_then(|t| t.value())
                .unwrap_or("")
                .to_owned();
            (i.instance_id().unwrap().to_owned(), runner)
        })
        .collect()
}

#[tokio::test]
async fn kill_9_mid_burst_then_restart_leaves_one_instance_per_job_and_no_orphans() {
    let (ec2, image) = moto::ec2_with_image().await;

    let github = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/orgs/octo-org/actions/runners/generate-jitconfig"))
        .respond_with(JitConfigs(AtomicI64::new(1000)))
        .mount(&github)
        .await;
    Mock::given(method("GET"))
        .and(path("/orgs/octo-org/actions/runners"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"total_count": 0, "runners": []})),
        )
        .mount(&github)
        .await;
    Mock::given(method("DELETE"))
        .and(path_regex(r"^/orgs/octo-org/actions/runners/\d+$"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&github)
        .await;

    let db = test_database().await.unwrap();
    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, max_instances)
         VALUES ('kani', '{linux,x64,kani}', '{c6i.4xlarge}', $1, '{}', 50)",
    )
    .bind(&image)
    .execute(store.pool())
    .await
    .unwrap();

    let client = reqwest::Client::new();
    let mut first = Service::start(&db.url, &github.uri(), 1).await;
    for id in 1..=JOBS {
        let body = job_payload("queued", id, &["self-hosted", "linux", "x64", "kani"]);
        assert_eq!(first.deliver(&client, &format!("q-{id}"), &body).await, 202);
    }
    // The launches are paced (EC2's bucket), so a few are out and the rest
    // are requested, registered or mid-launch when the process dies.
    wait_for("the first launches", Duration::from_secs(60), || async {
        (live_instances(&ec2).await.len() >= 4).then_some(())
    })
    .await;
    first.kill_9();
    let before = live_instances(&ec2).await.len();
    assert!(
        before < JOBS as usize,
        "killed mid-burst ({before} launched)"
    );

    let _second = Service::start(&db.url, &github.uri(), 2).await;
    let settled = || async {
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT name, state, instance_id FROM runners WHERE state <> 'launch_failed' ORDER BY name")
                .fetch_all(store.pool())
                .await
                .unwrap();
        let booting = rows.iter().filter(|r| r.1 == "booting").count();
        (booting == JOBS as usize).then_some(rows)
    };
    let rows = wait_for(
        "every job covered after the restart",
        Duration::from_secs(90),
        settled,
    )
    .await;

    // Exactly one live instance per queued job, each accounted for by a
    // booting runner of the ledger, and nothing else.
    let live = live_instances(&ec2).await;
    assert_eq!(live.len(), JOBS as usize, "live instances: {live:?}");
    let mut tagged: Vec<&String> = live.values().collect();
    tagged.sort();
    tagged.dedup();
    assert_eq!(tagged.len(), JOBS as usize, "one instance per runner");
    for (name, state, instance) in &rows {
        if state == "booting" {
            let instance = instance
                .as_ref()
                .expect("a booting runner has its instance");
            assert_eq!(
                live.get(instance),
                Some(name),
                "{name} runs on its own instance"
            );
            // Its JIT config waits in SSM, granted to that instance: the
            // crash left none half-stored or granted to a lost launch.
            let stored = spot_runners_aws::testing::moto_parameter(&format!(
                "/spot-runners/{CONTROLLER}/jit/{name}"
            ))
            .await
            .unwrap_or_else(|| panic!("{name} has its JIT config in SSM"));
            let granted = stored.tags.get("spot-runners:instance-arn");
            assert!(
                granted.is_some_and(|arn| arn.ends_with(&format!("instance/{instance}"))),
                "{name}'s config is granted to {instance}: {granted:?}"
            );
        } else {
            assert!(
                matches!(state.as_str(), "terminated"),
                "{name} is {state}: only ended runners besides the booting ones"
            );
        }
    }
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runners WHERE state IN ('requested', 'registered', 'launching')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(in_flight, 0);
}
