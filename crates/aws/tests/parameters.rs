//! `SsmParameterStore` against a real moto server, and the cost tags
//! `Ec2Cloud::tag_instance` sets, in the style of `moto.rs`.
//!
//! moto does not enforce IAM, so the instance-only read (the runner policy's
//! condition on `spot-runners:instance-arn`) is checked in the fake store and
//! in `scripts/check-assets`, not here.

use std::sync::atomic::{AtomicU32, Ordering};

use aws_config::BehaviorVersion;
use secrecy::SecretString;
use spot_runners_aws::{Ec2Cloud, SsmParameterStore};
use spot_runners_domain::cost_tags::{cost_tags, TAG_REPOSITORY, TAG_WORKFLOW};
use spot_runners_domain::parameters::{jit_parameter_name, jit_parameter_path, TAG_INSTANCE_ARN};
use spot_runners_domain::ports::{
    Cloud, LaunchRequest, ParameterStore, PARAMETER_ALREADY_EXISTS, TAG_CONTROLLER,
};
use spot_runners_domain::{ImageSource, Market};

async fn clients() -> (SsmParameterStore, aws_sdk_ssm::Client) {
    spot_runners_aws::testing::moto();
    let store = SsmParameterStore::from_env().await.unwrap();
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    (store, aws_sdk_ssm::Client::new(&config))
}

fn controller_id(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{test}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A JIT config of the real size: base64 of a JSON document of ~3 KB.
fn jit_shaped() -> String {
    use base64::Engine;
    let inner = format!(
        r#"{{".runner":"{}",".credentials":"{}",".credentials_rsaparams":"{}"}}"#,
        "x".repeat(600),
        "y".repeat(500),
        "z".repeat(1700)
    );
    base64::engine::general_purpose::STANDARD.encode(inner)
}

#[tokio::test]
async fn a_jit_config_is_stored_encrypted_once_granted_listed_and_deleted() {
    let (store, ssm) = clients().await;
    let controller = controller_id("params");
    let name = jit_parameter_name(&controller, &format!("{controller}-kani-ab12"));
    let jit = jit_shaped();
    assert!(jit.len() > 3500);

    store
        .create_secure(&name, &SecretString::from(jit.clone()))
        .await
        .unwrap();
    let got = ssm
        .get_parameter()
        .name(&name)
        .with_decryption(true)
        .send()
        .await
        .unwrap();
    let p = got.parameter().unwrap();
    assert_eq!(
        p.r#type(),
        Some(&aws_sdk_ssm::types::ParameterType::SecureString)
    );
    assert_eq!(p.value(), Some(jit.as_str()));

    // Never overwritten: a second create is refused with SSM's own code.
    let again = store
        .create_secure(&name, &SecretString::from("b3RoZXI=".to_owned()))
        .await
        .unwrap_err();
    assert_eq!(again.code, PARAMETER_ALREADY_EXISTS);

    let arn = "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0";
    store
        .tag(&name, &[(TAG_INSTANCE_ARN, arn.to_owned())])
        .await
        .unwrap();
    let tags = ssm
        .list_tags_for_resource()
        .resource_type(aws_sdk_ssm::types::ResourceTypeForTagging::Parameter)
        .resource_id(&name)
        .send()
        .await
        .unwrap();
    assert!(tags
        .tag_list()
        .iter()
        .any(|t| t.key() == TAG_INSTANCE_ARN && t.value() == arn));

    let listed = store.list(&jit_parameter_path(&controller)).await.unwrap();
    assert_eq!(
        listed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        [name.as_str()]
    );
    assert!(listed[0].modified_at.is_some());

    store.delete(&name).await.unwrap();
    // Already gone is success, and the name is free again.
    store.delete(&name).await.unwrap();
    assert!(store
        .list(&jit_parameter_path(&controller))
        .await
        .unwrap()
        .is_empty());
    store
        .create_secure(&name, &SecretString::from(jit))
        .await
        .unwrap();
    store.delete(&name).await.unwrap();
}

#[tokio::test]
async fn listing_pages_through_every_parameter_of_one_controller_only() {
    let (store, _) = clients().await;
    let mine = controller_id("pages");
    let other = controller_id("pages");
    // GetParametersByPath answers 10 a page.
    for i in 0..23 {
        let name = jit_parameter_name(&mine, &format!("{mine}-kani-{i:04}"));
        store
            .create_secure(&name, &SecretString::from("eA==".to_owned()))
            .await
            .unwrap();
    }
    let theirs = jit_parameter_name(&other, &format!("{other}-kani-0000"));
    store
        .create_secure(&theirs, &SecretString::from("eA==".to_owned()))
        .await
        .unwrap();
    let listed = store.list(&jit_parameter_path(&mine)).await.unwrap();
    assert_eq!(listed.len(), 23);
    assert!(listed
        .iter()
        .all(|p| p.name.starts_with(&jit_parameter_path(&mine))));
}

#[tokio::test]
async fn cost_tags_land_on_the_instance_and_its_arn_names_the_account() {
    spot_runners_aws::testing::moto();
    let cloud = Ec2Cloud::from_env().await.unwrap();
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let image = ec2
        .describe_images()
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .min()
        .unwrap();
    let controller = controller_id("cost");
    let instance = cloud
        .launch(&LaunchRequest {
            runner_name: format!("{controller}-linux-ab12"),
            client_token: format!("{controller}-linux-ab12"),
            controller_id: controller.clone(),
            profile: "linux".to_owned(),
            instance_type: "m5.large".to_owned(),
            subnet_id: None,
            image: ImageSource::Id(image),
            threads_per_core: None,
            security_group_ids: Vec::new(),
            iam_instance_profile: None,
            market: Market::OnDemand,
            root_volume_gb: 20,
            user_data: "#!/bin/bash\n".to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(
        instance.arn.as_deref(),
        Some(
            format!(
                "arn:aws:ec2:us-east-1:123456789012:instance/{}",
                instance.id
            )
            .as_str()
        )
    );
    let listed = cloud.list_owned(&controller).await.unwrap();
    assert_eq!(
        listed[0].arn, instance.arn,
        "the listing names the same ARN"
    );

    let tags = cost_tags("acme/kani-proofs", Some("Kani / nightly"));
    cloud.tag_instance(&instance.id, &tags).await.unwrap();
    let described = ec2
        .describe_instances()
        .instance_ids(&instance.id)
        .send()
        .await
        .unwrap();
    let raw = &described.reservations()[0].instances()[0];
    let tag = |k: &str| {
        raw.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag(TAG_REPOSITORY).as_deref(), Some("acme/kani-proofs"));
    assert_eq!(tag(TAG_WORKFLOW).as_deref(), Some("Kani / nightly"));
    assert_eq!(tag(TAG_CONTROLLER).as_deref(), Some(controller.as_str()));
    cloud.terminate(&[instance.id]).await.unwrap();
}
