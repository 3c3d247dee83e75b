//! `Ec2Cloud` against a real moto server (DESIGN.md, "Testing").
//!
//! The harness starts one `moto_server` per test process on a free loopback
//! port and points the SDK at it through the same environment variables an
//! operator would use (`AWS_REGION`, `AWS_ENDPOINT_URL`, credentials).
//!
//! What moto (5.x) does not model, so these tests cannot cover it (the fake
//! cloud in `spot-runners-sim` does):
//! - `ClientToken` de-duplication: moto starts a new instance for a repeated
//!   token, so idempotent retries are not asserted here.
//! - Capacity and throttling errors (`InsufficientInstanceCapacity`,
//!   `RequestLimitExceeded`, ...), spot prices and interruptions.
//! - IAM: policies are not enforced, and an instance profile must exist in
//!   moto's IAM (which this crate has no client for), so launches here carry
//!   none.
//! - Eventual consistency and real state transitions: instances are visible
//!   at once, start `pending` and read back `running` on the next describe;
//!   terminating answers `shutting-down` and the instance is `terminated`
//!   immediately afterwards.
//! - Its default hop limit is already 1, so only `HttpTokens` proves the
//!   metadata options were sent.
//! - `CpuOptions`: accepted, but neither modelled nor reported by
//!   `DescribeInstances`; what reached `RunInstances` is read from moto's
//!   request recorder (`testing::recorded_requests`). Images are stamped to
//!   the second, so tests that need one newer than another wait for moto's
//!   clock to pass it.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

use aws_config::BehaviorVersion;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, InstanceAttributeName, InstanceLifecycleType,
    InstanceMetadataEndpointState, VolumeType,
};
use aws_sdk_ec2::Client;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use spot_runners_aws::Ec2Cloud;
use spot_runners_domain::ports::{
    Cloud, CloudErrorKind, Instance, InstanceState, LaunchRequest, TAG_CONTROLLER, TAG_NAME,
    TAG_PROFILE, TAG_RUNNER,
};
use spot_runners_domain::{ImageFilter, ImageSource, Market};

// ------------------------------------------------------------- helpers --

/// The adapter under test (built exactly as production builds it) and a
/// plain client for looking behind its back.
async fn clients() -> (Ec2Cloud, Client) {
    spot_runners_aws::testing::moto();
    let cloud = Ec2Cloud::from_env()
        .await
        .expect("AWS_REGION is set by the harness");
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    (cloud, Client::new(&config))
}

/// Each test owns its controller id, so tests sharing the server never see
/// each other's instances.
fn controller_id(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{test}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An AMI from moto's built-in catalogue whose root device is not the
/// `/dev/sda1` a naive mapping would assume; picked by asking moto rather
/// than hard-coding an id its next release may drop.
async fn xvda_image(ec2: &Client) -> String {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let images = ec2.describe_images().send().await.expect("DescribeImages");
            let mut candidates: Vec<&str> = images
                .images()
                .iter()
                .filter(|i| i.root_device_name() == Some("/dev/xvda"))
                .filter_map(|i| i.image_id())
                .collect();
            candidates.sort_unstable();
            candidates
                .first()
                .expect("moto offers an AMI with root device /dev/xvda")
                .to_string()
        })
        .await
        .clone()
}

async fn default_subnet(ec2: &Client) -> String {
    let out = ec2
        .describe_subnets()
        .filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .expect("DescribeSubnets");
    let mut ids: Vec<&str> = out.subnets().iter().filter_map(|s| s.subnet_id()).collect();
    ids.sort_unstable();
    ids.first().expect("moto has default subnets").to_string()
}

async fn default_security_group(ec2: &Client) -> String {
    let out = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("default")
                .build(),
        )
        .send()
        .await
        .expect("DescribeSecurityGroups");
    out.security_groups()
        .first()
        .and_then(|g| g.group_id())
        .expect("moto has a default security group")
        .to_owned()
}

fn request(controller: &str, id: &str, image_id: &str, market: Market) -> LaunchRequest {
    LaunchRequest {
        runner_name: format!("{controller}-linux-{id}"),
        client_token: format!("{controller}-linux-{id}"),
        controller_id: controller.to_owned(),
        profile: "linux".to_owned(),
        instance_type: "m5.large".to_owned(),
        subnet_id: None,
        image: ImageSource::Id(image_id.to_owned()),
        threads_per_core: None,
        security_group_ids: Vec::new(),
        iam_instance_profile: None,
        market,
        root_volume_gb: 40,
        user_data: "#!/bin/bash\nset -eu\necho 'jit: c2VjcmV0'\n# ünïcödé ✓\n".to_owned(),
    }
}

async fn describe(ec2: &Client, instance_id: &str) -> aws_sdk_ec2::types::Instance {
    let out = ec2
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .expect("DescribeInstances");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find(|i| i.instance_id() == Some(instance_id))
        .cloned()
        .unwrap_or_else(|| panic!("{instance_id} not described"))
}

fn tags_of(tags: &[aws_sdk_ec2::types::Tag]) -> HashMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect()
}

fn contract_tags(request: &LaunchRequest) -> HashMap<String, String> {
    HashMap::from([
        (TAG_CONTROLLER.to_owned(), request.controller_id.clone()),
        (TAG_PROFILE.to_owned(), request.profile.clone()),
        (TAG_RUNNER.to_owned(), request.runner_name.clone()),
        (TAG_NAME.to_owned(), request.runner_name.clone()),
    ])
}

// --------------------------------------------------------------- tests --

#[tokio::test]
async fn spot_launch_carries_the_whole_contract() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let subnet = default_subnet(&ec2).await;
    let group = default_security_group(&ec2).await;
    let controller = controller_id("spot");
    let mut req = request(&controller, "a1", &image, Market::Spot);
    req.instance_type = "c5.xlarge".to_owned();
    req.subnet_id = Some(subnet.clone());
    req.security_group_ids = vec![group.clone()];

    let launched = cloud.launch(&req).await.expect("launch");

    assert!(launched.id.starts_with("i-"), "{launched:?}");
    assert_eq!(
        launched.runner_name.as_deref(),
        Some(req.runner_name.as_str())
    );
    assert_eq!(launched.profile.as_deref(), Some("linux"));
    assert_eq!(launched.instance_type, "c5.xlarge");
    assert_eq!(launched.subnet_id.as_deref(), Some(subnet.as_str()));
    assert_eq!(launched.market, Market::Spot);
    assert!(launched.state.is_alive(), "{launched:?}");
    assert!(launched.launched_at.is_some());

    let raw = describe(&ec2, &launched.id).await;
    assert_eq!(raw.instance_type().map(|t| t.as_str()), Some("c5.xlarge"));
    assert_eq!(raw.instance_lifecycle(), Some(&InstanceLifecycleType::Spot));
    assert_eq!(raw.subnet_id(), Some(subnet.as_str()));
    assert_eq!(raw.image_id(), Some(image.as_str()));
    // The AZ is the subnet's, as EC2 places the instance.
    let az = raw.placement().and_then(|p| p.availability_zone());
    assert!(az.is_some_and(|az| az.starts_with("us-east-1")), "{az:?}");
    assert_eq!(launched.availability_zone.as_deref(), az);
    let groups: Vec<&str> = raw
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(groups, [group.as_str()]);
    assert_eq!(tags_of(raw.tags()), contract_tags(&req));

    let metadata = raw.metadata_options().expect("metadata options");
    assert_eq!(metadata.http_tokens(), Some(&HttpTokensState::Required));
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    assert_eq!(
        metadata.http_endpoint(),
        Some(&InstanceMetadataEndpointState::Enabled)
    );

    // The root volume is resized in place, not added beside the AMI's own.
    let devices: Vec<&str> = raw
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.device_name())
        .collect();
    assert_eq!(devices, ["/dev/xvda"]);
    let root = raw.block_device_mappings()[0].ebs().expect("EBS root");
    assert_eq!(root.delete_on_termination(), Some(true));
    let volume_id = root.volume_id().expect("root volume id");
    let volumes = ec2
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .expect("DescribeVolumes");
    let volume = &volumes.volumes()[0];
    assert_eq!(volume.size(), Some(40));
    assert_eq!(volume.volume_type(), Some(&VolumeType::Gp3));
    assert_eq!(volume.encrypted(), Some(true));
    assert_eq!(tags_of(volume.tags()), contract_tags(&req));

    let user_data = ec2
        .describe_instance_attribute()
        .instance_id(&launched.id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .expect("DescribeInstanceAttribute userData");
    let encoded = user_data
        .user_data()
        .and_then(|v| v.value())
        .expect("user data");
    let decoded = BASE64_STANDARD.decode(encoded).expect("base64 user data");
    assert_eq!(String::from_utf8(decoded).unwrap(), req.user_data);

    let shutdown = ec2
        .describe_instance_attribute()
        .instance_id(&launched.id)
        .attribute(InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .expect("DescribeInstanceAttribute instanceInitiatedShutdownBehavior");
    assert_eq!(
        shutdown
            .instance_initiated_shutdown_behavior()
            .and_then(|v| v.value()),
        Some("terminate")
    );
}

#[tokio::test]
async fn on_demand_launch_has_no_spot_lifecycle() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let controller = controller_id("ondemand");
    let req = request(&controller, "b2", &image, Market::OnDemand);

    let launched = cloud.launch(&req).await.expect("launch");

    assert_eq!(launched.market, Market::OnDemand);
    assert_eq!(launched.instance_type, "m5.large");
    let raw = describe(&ec2, &launched.id).await;
    assert_eq!(raw.instance_lifecycle(), None);
    assert_eq!(raw.instance_type().map(|t| t.as_str()), Some("m5.large"));
    assert_eq!(tags_of(raw.tags()), contract_tags(&req));
    assert_eq!(
        raw.metadata_options().and_then(|m| m.http_tokens()),
        Some(&HttpTokensState::Required)
    );
}

#[tokio::test]
async fn list_owned_sees_only_this_controllers_instances() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let a = controller_id("owner-a");
    let b = controller_id("owner-b");
    let mine = cloud
        .launch(&request(&a, "c3", &image, Market::Spot))
        .await
        .expect("launch for A");
    let theirs = cloud
        .launch(&request(&b, "d4", &image, Market::OnDemand))
        .await
        .expect("launch for B");

    let listed_a = cloud.list_owned(&a).await.expect("list A");
    let listed_b = cloud.list_owned(&b).await.expect("list B");

    assert_eq!(ids(&listed_a), [mine.id.as_str()]);
    assert_eq!(ids(&listed_b), [theirs.id.as_str()]);
    let seen = &listed_a[0];
    assert_eq!(
        seen.runner_name.as_deref(),
        Some(format!("{a}-linux-c3").as_str())
    );
    assert_eq!(seen.profile.as_deref(), Some("linux"));
    assert_eq!(seen.market, Market::Spot);
    assert_eq!(seen.instance_type, "m5.large");
    assert_eq!(
        seen.availability_zone.as_deref(),
        describe(&ec2, &mine.id)
            .await
            .placement()
            .and_then(|p| p.availability_zone())
    );
    assert!(seen.availability_zone.is_some(), "{seen:?}");
    assert!(seen.state.is_alive(), "{seen:?}");
    assert!(seen.launched_at.is_some());
    assert_eq!(listed_b[0].market, Market::OnDemand);

    // A controller id that merely starts like A's owns nothing of A's.
    assert!(cloud
        .list_owned(&format!("{a}-x"))
        .await
        .expect("list other")
        .is_empty());
}

#[tokio::test]
async fn list_owned_follows_every_page() {
    let (cloud, ec2) = clients().await;
    let cloud = cloud.with_page_size(5);
    let image = xvda_image(&ec2).await;
    let controller = controller_id("pages");
    let mut launched = Vec::new();
    for n in 0..7 {
        let req = request(&controller, &format!("p{n}"), &image, Market::Spot);
        launched.push(cloud.launch(&req).await.expect("launch").id);
    }
    launched.sort();

    let listed = cloud.list_owned(&controller).await.expect("list");
    let mut listed = ids(&listed);
    listed.sort_unstable();

    assert_eq!(listed, launched);
}

#[tokio::test]
async fn terminate_ends_instances_and_ignores_ids_already_gone() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let controller = controller_id("terminate");
    let first = cloud
        .launch(&request(&controller, "e5", &image, Market::Spot))
        .await
        .expect("launch");
    let second = cloud
        .launch(&request(&controller, "f6", &image, Market::OnDemand))
        .await
        .expect("launch");
    let unknown = "i-0123456789abcdef0".to_owned();

    // EC2 (and moto) reject a whole batch naming an unknown id.
    cloud
        .terminate(&[first.id.clone(), unknown.clone(), second.id.clone()])
        .await
        .expect("terminate with an unknown id in the batch");

    let listed = cloud.list_owned(&controller).await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    for instance in &listed {
        assert!(
            matches!(
                instance.state,
                InstanceState::ShuttingDown | InstanceState::Terminated
            ),
            "{instance:?}"
        );
    }

    cloud
        .terminate(std::slice::from_ref(&first.id))
        .await
        .expect("terminating a terminated instance");
    cloud
        .terminate(std::slice::from_ref(&unknown))
        .await
        .expect("terminating an unknown instance");
    cloud
        .terminate(&[unknown.clone(), "i-0fedcba9876543210".to_owned()])
        .await
        .expect("terminating only unknown instances");
    cloud.terminate(&[]).await.expect("terminating nothing");
}

#[tokio::test]
async fn ec2_errors_keep_their_code() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let controller = controller_id("errors");

    let mut bad_subnet = request(&controller, "g7", &image, Market::Spot);
    bad_subnet.subnet_id = Some("subnet-0000000000000000f".to_owned());
    let err = cloud.launch(&bad_subnet).await.expect_err("unknown subnet");
    assert_eq!(err.kind, CloudErrorKind::Invalid, "{err}");
    assert_eq!(err.code, "InvalidSubnetID.NotFound", "{err}");
    assert!(!err.to_string().contains("c2VjcmV0"), "{err}");

    let bad_image = request(&controller, "h8", "ami-00000000000000000", Market::Spot);
    let err = cloud.launch(&bad_image).await.expect_err("unknown image");
    assert_eq!(err.kind, CloudErrorKind::Invalid, "{err}");
    assert!(err.code.starts_with("InvalidAMIID."), "{err}");

    assert!(cloud
        .list_owned(&controller)
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn unreachable_endpoint_is_transient() {
    spot_runners_aws::testing::moto();
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    let cloud = Ec2Cloud::new(Client::from_conf(config));

    let err = cloud.list_owned("nobody").await.expect_err("no server");

    assert_eq!(err.kind, CloudErrorKind::Transient, "{err}");
    assert_eq!(err.code, "NetworkError", "{err}");
}

fn ids(instances: &[Instance]) -> Vec<&str> {
    instances.iter().map(|i| i.id.as_str()).collect()
}

/// moto answers `DescribeSpotPriceHistory` for the region's offered types,
/// one sample per AZ; a type EC2 does not offer gets no price (it is then
/// reported unknown, never 0).
#[tokio::test]
async fn spot_prices_come_per_az_for_the_types_asked() {
    let (cloud, _) = clients().await;
    let prices = cloud
        .spot_prices(&["c6i.4xlarge".to_owned(), "x9z.notatype".to_owned()])
        .await
        .unwrap();
    assert!(!prices.is_empty(), "moto offers c6i.4xlarge in the region");
    assert!(prices.iter().all(|p| p.instance_type == "c6i.4xlarge"));
    assert!(prices
        .iter()
        .all(|p| p.dollars_per_hour.is_finite() && p.dollars_per_hour >= 0.0));
    let azs: std::collections::BTreeSet<_> =
        prices.iter().map(|p| p.availability_zone.clone()).collect();
    assert_eq!(azs.len(), prices.len(), "one sample per AZ");
    assert!(cloud.spot_prices(&[]).await.unwrap().is_empty());
}

// ------------------------------------------------ image filters, CPU --

/// Registers an AMI in this account whose `CreationDate` is later than
/// `after` (moto stamps images to the second, so one registered in the
/// same second as `after` is dropped and registered again).
async fn register_image_after(ec2: &Client, name: &str, after: &str) -> (String, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let id = ec2
            .register_image()
            .name(name)
            .send()
            .await
            .expect("RegisterImage")
            .image_id()
            .expect("an image id")
            .to_owned();
        let described = ec2
            .describe_images()
            .image_ids(&id)
            .send()
            .await
            .expect("DescribeImages");
        let created = described.images()[0]
            .creation_date()
            .expect("a creation date")
            .to_owned();
        if created.as_str() > after {
            return (id, created);
        }
        ec2.deregister_image()
            .image_id(&id)
            .send()
            .await
            .expect("DeregisterImage");
        assert!(
            std::time::Instant::now() < deadline,
            "moto's clock did not move past {after}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn filter(text: &str) -> ImageSource {
    ImageSource::Filter(ImageFilter::parse(text).unwrap())
}

/// `DescribeImages` calls moto received for this name pattern.
fn image_lookups(pattern: &str) -> usize {
    spot_runners_aws::testing::recorded_requests("DescribeImages")
        .iter()
        .filter(|fields| fields.values().any(|v| v == pattern))
        .count()
}

#[tokio::test]
async fn an_image_filter_launches_the_newest_match_and_is_cached() {
    let (cloud, ec2) = clients().await;
    let controller = controller_id("filter");
    // Unique per test run, so other tests' images never match.
    let prefix = format!("kani-runner-{controller}");
    let (old, old_at) = register_image_after(&ec2, &format!("{prefix}-1"), "").await;
    let (newest, newest_at) = register_image_after(&ec2, &format!("{prefix}-2"), &old_at).await;
    // Newer still, but not matching the pattern, or not available.
    let (_other, other_at) =
        register_image_after(&ec2, &format!("bench-{controller}-3"), &newest_at).await;
    let (gone, _) = register_image_after(&ec2, &format!("{prefix}-4"), &other_at).await;
    ec2.deregister_image().image_id(&gone).send().await.unwrap();

    let pattern = format!("{prefix}-*");
    let mut req = request(&controller, "f1", "unused", Market::OnDemand);
    req.image = filter(&format!("self/{pattern}"));
    let launched = cloud.launch(&req).await.expect("launch by filter");
    let raw = describe(&ec2, &launched.id).await;
    assert_eq!(raw.image_id(), Some(newest.as_str()));
    assert_ne!(raw.image_id(), Some(old.as_str()));
    assert_eq!(image_lookups(&pattern), 1);

    // A newer build appears: within the TTL the cached answer is used (no
    // second DescribeImages)...
    let (rebuilt, _) = register_image_after(&ec2, &format!("{prefix}-5"), &other_at).await;
    let mut again = request(&controller, "f2", "unused", Market::OnDemand);
    again.image = req.image.clone();
    let second = cloud.launch(&again).await.unwrap();
    assert_eq!(
        describe(&ec2, &second.id).await.image_id(),
        Some(newest.as_str())
    );
    assert_eq!(
        image_lookups(&pattern),
        1,
        "the second launch was served from the cache"
    );

    // ...and once it has expired, the new AMI is launched without a row edit.
    let fresh = Ec2Cloud::from_env()
        .await
        .unwrap()
        .with_image_filter_ttl(std::time::Duration::ZERO);
    let mut third = request(&controller, "f3", "unused", Market::OnDemand);
    third.image = req.image.clone();
    let third = fresh.launch(&third).await.unwrap();
    assert_eq!(
        describe(&ec2, &third.id).await.image_id(),
        Some(rebuilt.as_str())
    );
    assert_eq!(image_lookups(&pattern), 2);

    // The filter really went to EC2 as Owners + name + state.
    let lookup = spot_runners_aws::testing::recorded_requests("DescribeImages")
        .into_iter()
        .find(|fields| fields.values().any(|v| *v == pattern))
        .unwrap();
    assert_eq!(lookup.get("Owner.1").map(String::as_str), Some("self"));
    assert!(lookup.values().any(|v| v == "available"), "{lookup:?}");
}

#[tokio::test]
async fn an_image_filter_without_a_match_is_an_invalid_request() {
    let (cloud, _ec2) = clients().await;
    let controller = controller_id("nomatch");
    let mut req = request(&controller, "n1", "unused", Market::Spot);
    req.image = filter(&format!("self/no-such-image-{controller}-*"));
    let err = cloud.launch(&req).await.unwrap_err();
    assert_eq!(err.code, spot_runners_domain::ports::IMAGE_FILTER_NO_MATCH);
    assert_eq!(err.kind, CloudErrorKind::Invalid);
    assert!(spot_runners_domain::backoff::backs_off(&err.code));
    assert!(err.message.contains("no-such-image"), "{}", err.message);
    let sent = spot_runners_aws::testing::recorded_requests("RunInstances");
    assert!(
        !sent
            .iter()
            .any(|f| f.get("ClientToken") == Some(&req.client_token)),
        "nothing was launched"
    );
}

/// moto accepts `CpuOptions` but neither models nor reports them
/// (`DescribeInstances` has no `CpuOptions`), so what reached its
/// `RunInstances` is read from its request recorder.
#[tokio::test]
async fn threads_per_core_reaches_run_instances_with_the_types_core_count() {
    let (cloud, ec2) = clients().await;
    let image = xvda_image(&ec2).await;
    let controller = controller_id("cpu");
    let sent = |token: &str| {
        spot_runners_aws::testing::recorded_requests("RunInstances")
            .into_iter()
            .find(|f| f.get("ClientToken").map(String::as_str) == Some(token))
            .unwrap_or_else(|| panic!("no RunInstances with token {token}"))
    };
    let cpu = |fields: &std::collections::BTreeMap<String, String>| {
        (
            fields.get("CpuOptions.CoreCount").cloned(),
            fields.get("CpuOptions.ThreadsPerCore").cloned(),
        )
    };

    // SMT off on c6i.8xlarge (16 cores × 2 threads): all 16 cores, 1 thread.
    let mut smt_off = request(&controller, "c1", &image, Market::OnDemand);
    smt_off.instance_type = "c6i.8xlarge".into();
    smt_off.threads_per_core = Some(1);
    cloud.launch(&smt_off).await.expect("launch with SMT off");
    assert_eq!(
        cpu(&sent(&smt_off.client_token)),
        (Some("16".into()), Some("1".into()))
    );

    // No preference: no CpuOptions at all.
    let mut plain = request(&controller, "c2", &image, Market::OnDemand);
    plain.instance_type = "c6i.8xlarge".into();
    cloud.launch(&plain).await.unwrap();
    assert_eq!(cpu(&sent(&plain.client_token)), (None, None));

    // A type that already runs one thread per core needs no options.
    let mut graviton = request(&controller, "c3", &image, Market::OnDemand);
    graviton.instance_type = "m7a.large".into();
    graviton.threads_per_core = Some(1);
    cloud.launch(&graviton).await.unwrap();
    assert_eq!(cpu(&sent(&graviton.client_token)), (None, None));

    // Bare metal takes none: refused before RunInstances, as invalid.
    let mut metal = request(&controller, "c4", &image, Market::OnDemand);
    metal.instance_type = "c6i.metal".into();
    metal.threads_per_core = Some(1);
    let err = cloud.launch(&metal).await.unwrap_err();
    assert_eq!(err.kind, CloudErrorKind::Invalid);
    assert!(err.message.contains("bare metal"), "{}", err.message);
    assert!(
        !spot_runners_aws::testing::recorded_requests("RunInstances")
            .iter()
            .any(|f| f.get("ClientToken") == Some(&metal.client_token))
    );
}
