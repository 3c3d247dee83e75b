//! End to end on the real adapters: a signed `queued` delivery → a JIT
//! config requested from GitHub (an HTTP mock, through octocrab) → a spot
//! instance in moto (through aws-sdk-ec2), tagged and configured as the
//! contract says, its JIT config in SSM (moto) granted to that instance
//! alone → `in_progress` names the runner → the instance carries its cost
//! tags → `completed` → the instance is terminated, and the config left
//! behind (no real boot script read it) is deleted.

mod common;
#[path = "support/moto.rs"]
mod moto;
#[path = "support/real_adapters.rs"]
mod real_adapters;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use base64::Engine;
use common::job_payload;
use real_adapters::spawn_on_real_adapters;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn a_queued_job_becomes_a_jit_runner_on_a_spot_instance() {
    let (ec2, image) = moto::ec2_with_image().await;

    let github_mock = MockServer::start().await;
    let jit =
        base64::engine::general_purpose::STANDARD.encode(r#"{".runner":"x",".credentials":"y"}"#);
    Mock::given(method("POST"))
        .and(path("/orgs/octo-org/actions/runners/generate-jitconfig"))
        .and(body_partial_json(serde_json::json!({
            "runner_group_id": 1,
            "labels": ["self-hosted", "linux", "x64", "spot", "kani"],
        })))
        .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
            "runner": {"id": 4242, "name": "ignored", "os": "linux", "status": "offline", "busy": false, "labels": []},
            "encoded_jit_config": jit,
        })))
        .expect(1)
        .mount(&github_mock)
        .await;

    let cloud = spot_runners_aws::Ec2Cloud::from_env().await.unwrap();
    let controller = "e2e-moto";
    let app = spawn_on_real_adapters(&github_mock.uri(), Arc::new(cloud), controller).await;
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids, max_instances)
         VALUES ('kani', '{linux,x64,spot,kani}', '{c6i.4xlarge}', $1, '{}', 5)",
    )
    .bind(&image)
    .execute(app.db.store.pool())
    .await
    .unwrap();
    app.eventually("profile loaded", || async {
        !app.state.profiles.get().profiles.is_empty()
    })
    .await;

    let with_workflow = |payload: Vec<u8>| {
        let mut v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        v["workflow_job"]["workflow_name"] = "Kani proofs".into();
        serde_json::to_vec(&v).unwrap()
    };
    let body = with_workflow(job_payload(
        "queued",
        777,
        &["self-hosted", "Linux", "X64", "spot", "kani"],
    ));
    assert_eq!(
        app.deliver("workflow_job", "e2e-1", &body).await.status(),
        202
    );

    let booted = || async {
        sqlx::query_scalar::<_, String>("SELECT name FROM runners WHERE state = 'booting'")
            .fetch_optional(app.db.store.pool())
            .await
            .unwrap()
    };
    app.eventually("runner booting", || async { booted().await.is_some() })
        .await;
    let runner = booted().await.unwrap();
    assert!(runner.starts_with("e2e-moto-kani-"), "{runner}");

    let described = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:spot-runners:runner")
                .values(&runner)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 1);
    let i = instances[0];
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("c6i.4xlarge"));
    assert_eq!(i.instance_lifecycle().map(|l| l.as_str()), Some("spot"));
    let tag = |k: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag("spot-runners:controller").as_deref(), Some(controller));
    assert_eq!(tag("spot-runners:profile").as_deref(), Some("kani"));
    assert_eq!(tag("spot-runners:runner").as_deref(), Some(runner.as_str()));
    assert_eq!(tag("Name").as_deref(), Some(runner.as_str()));
    let row: (i64, String) =
        sqlx::query_as("SELECT github_runner_id, instance_id FROM runners WHERE name = $1")
            .bind(&runner)
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    assert_eq!(row.0, 4242);
    assert_eq!(Some(row.1.as_str()), i.instance_id());

    // The boot script carries no secret; the JIT config waits in SSM,
    // encrypted, readable only by this instance; the request named the runner.
    let attr = ec2
        .describe_instance_attribute()
        .instance_id(i.instance_id().unwrap())
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(attr.user_data().and_then(|v| v.value()).unwrap())
        .unwrap();
    let user_data = String::from_utf8(user_data).unwrap();
    assert!(!user_data.contains(&jit), "no JIT config in user data");
    assert!(user_data.contains(&format!("RUNNER_NAME='{runner}'")));
    let parameter = format!("/spot-runners/{controller}/jit/{runner}");
    let stored = spot_runners_aws::testing::moto_parameter(&parameter)
        .await
        .expect("the JIT config is in SSM");
    assert_eq!(stored.value, jit);
    assert!(stored.secure, "a SecureString");
    assert_eq!(
        stored
            .tags
            .get("spot-runners:instance-arn")
            .map(String::as_str),
        Some(
            format!(
                "arn:aws:ec2:us-east-1:123456789012:instance/{}",
                i.instance_id().unwrap()
            )
            .as_str()
        ),
        "granted to its instance"
    );
    let requests = github_mock.received_requests().await.unwrap();
    let jit_request: serde_json::Value = requests
        .iter()
        .find(|r| r.url.path().ends_with("generate-jitconfig"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .unwrap();
    assert_eq!(jit_request["name"], runner.as_str());
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(
        r#"spot_runners_launches_total{market="spot",outcome="launched",profile="kani"} 1"#
    ));

    // GitHub hands the job to our runner, then the job completes: the
    // instance is terminated at once, not left to shut itself down.
    let named = |action: &str| {
        let mut v: serde_json::Value = serde_json::from_slice(&job_payload(
            action,
            777,
            &["self-hosted", "Linux", "X64", "spot", "kani"],
        ))
        .unwrap();
        v["workflow_job"]["runner_name"] = runner.as_str().into();
        v["workflow_job"]["runner_id"] = 4242.into();
        with_workflow(serde_json::to_vec(&v).unwrap())
    };
    assert_eq!(
        app.deliver("workflow_job", "e2e-2", &named("in_progress"))
            .await
            .status(),
        202
    );
    let state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM runners WHERE name = $1")
            .bind(&runner)
            .fetch_one(app.db.store.pool())
            .await
            .unwrap()
    };
    app.eventually("runner busy", || async { state().await == "busy" })
        .await;
    // Cost Explorer can now split this instance's spend.
    let instance_id = i.instance_id().unwrap().to_owned();
    let instance_tags = || async {
        ec2.describe_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.tags())
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    // The sweep sets them, on its own 10 s pace.
    app.eventually_within(
        "cost tags on the instance",
        Duration::from_secs(30),
        || async {
            let tags = instance_tags().await;
            tags.get("spot-runners:repository").map(String::as_str)
                == Some("octo-org/example-workflow")
                && tags.get("spot-runners:workflow").map(String::as_str) == Some("Kani proofs")
        },
    )
    .await;
    assert_eq!(
        app.deliver("workflow_job", "e2e-3", &named("completed"))
            .await
            .status(),
        202
    );
    let ec2_state = || async {
        ec2.describe_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
            })
            .next()
            .unwrap_or_default()
    };
    app.eventually("instance terminated in EC2", || async {
        matches!(ec2_state().await.as_str(), "shutting-down" | "terminated")
    })
    .await;
    app.eventually("runner ended in the ledger", || async {
        matches!(state().await.as_str(), "terminating" | "terminated")
    })
    .await;
    // Nothing booted to read and delete the config: the sweep deletes it.
    app.eventually_within(
        "the JIT config left behind is deleted",
        Duration::from_secs(30),
        || async {
            spot_runners_aws::testing::moto_parameter(&parameter)
                .await
                .is_none()
        },
    )
    .await;
    // Counted once EC2 has accepted the call, which the checks above may beat.
    app.eventually("the reap counted", || async {
        app.get("/metrics")
            .await
            .text()
            .await
            .unwrap()
            .contains(r#"spot_runners_reaps_total{profile="kani",reason="completed"} 1"#)
    })
    .await;
    app.stop().await;
}
