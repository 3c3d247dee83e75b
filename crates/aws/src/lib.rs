//! The EC2 side of spot-runners: [`Ec2Cloud`] implements the domain's
//! [`Cloud`] port on `aws-sdk-ec2`.
//!
//! It is deliberately thin. Choosing instance types, subnets and markets,
//! backing off and rate limiting belong to the reconciler; this crate makes
//! one EC2 call per request (plus a cached image lookup) and classifies the
//! outcome with EC2's own error codes.

mod ssm;
#[cfg(feature = "testing")]
pub mod testing;

pub use ssm::SsmParameterStore;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, CpuOptionsRequest, EbsBlockDevice, Filter, HttpTokensState,
    IamInstanceProfileSpecification, Image, ImageState, InstanceInterruptionBehavior,
    InstanceLifecycleType, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, MarketType, ResourceType,
    ShutdownBehavior, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use aws_sdk_ec2::Client;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use chrono::{DateTime, Utc};
use spot_runners_domain::cost::SpotPrice;
use spot_runners_domain::ports::{
    Cloud, CloudError, CloudErrorKind, Instance, InstanceState, LaunchRequest, TAG_CONTROLLER,
    TAG_NAME, TAG_PROFILE, TAG_RUNNER,
};
use spot_runners_domain::{ImageFilter, ImageSource, Market};

/// EC2 accepts at most this many ids in one `TerminateInstances`.
const TERMINATE_BATCH: usize = 1000;
/// `DescribeInstances` accepts `MaxResults` in 5..=1000.
const MIN_PAGE: i32 = 5;
const MAX_PAGE: i32 = 1000;
/// For an image whose description names no root device: the historical
/// default of EBS-backed images.
const FALLBACK_ROOT_DEVICE: &str = "/dev/sda1";
const NOT_FOUND: &str = "InvalidInstanceID.NotFound";
/// How long an image filter's answer is reused: launches in a burst share
/// one `DescribeImages`, and a newly built AMI is picked up within minutes.
pub const IMAGE_FILTER_TTL: Duration = Duration::from_secs(300);
/// What EC2 answers for CPU options an instance type does not take.
const CPU_OPTIONS_REFUSED: &str = "InvalidParameterCombination";

/// An AMI as a launch needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ResolvedImage {
    id: String,
    root_device: String,
}

/// What `DescribeInstanceTypes` says about a type's CPU options.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CpuInfo {
    bare_metal: bool,
    default_cores: Option<i32>,
    default_threads_per_core: Option<i32>,
    valid_threads_per_core: Vec<i32>,
}

/// Why [`Ec2Cloud::from_env`] could not build a client.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Without a region every call would fail later, one by one; failing at
    /// start-up points the operator at the real problem.
    #[error("no AWS region configured: set AWS_REGION or a region in the AWS profile")]
    NoRegion,
}

/// [`Cloud`] on EC2.
pub struct Ec2Cloud {
    client: Client,
    /// AMI id → root device name. Images are immutable, so an entry never
    /// goes stale; the map only grows by the handful of AMIs profiles use.
    root_devices: Mutex<HashMap<String, String>>,
    /// Image filter → its newest match and when it was looked up.
    filters: Mutex<HashMap<ImageFilter, (Instant, ResolvedImage)>>,
    filter_ttl: Duration,
    /// Instance type → its CPU facts; a type's defaults never change.
    cpu_infos: Mutex<HashMap<String, CpuInfo>>,
    page_size: i32,
}

impl std::fmt::Debug for Ec2Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Cloud")
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

/// The standard AWS configuration chain, with per-call timeouts (the SDK
/// has none by default): every AWS client of the service starts here.
pub(crate) async fn sdk_config(
    attempt: Duration,
    operation: Duration,
) -> Result<aws_config::SdkConfig, SetupError> {
    let timeouts = TimeoutConfig::builder()
        .operation_attempt_timeout(attempt)
        .operation_timeout(operation)
        .build();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .load()
        .await;
    if config.region().is_none() {
        return Err(SetupError::NoRegion);
    }
    Ok(config)
}

impl Ec2Cloud {
    /// Configuration from the standard AWS sources: `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` (moto, LocalStack), the default credentials chain
    /// and the shared config files.
    pub async fn from_env() -> Result<Self, SetupError> {
        // The SDK has no read timeout by default; a connection that stalls
        // would otherwise hold a reconcile pass forever. RunInstances can
        // legitimately take several seconds, hence the generous attempt
        // budget.
        let config = sdk_config(Duration::from_secs(30), Duration::from_secs(90)).await?;
        Ok(Self::new(Client::new(&config)))
    }

    pub fn new(client: Client) -> Self {
        Self {
            client,
            root_devices: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
            filter_ttl: IMAGE_FILTER_TTL,
            cpu_infos: Mutex::new(HashMap::new()),
            page_size: MAX_PAGE,
        }
    }

    /// How long an image filter's answer is reused ([`IMAGE_FILTER_TTL`]
    /// by default); tests shorten it to see a new AMI at once.
    pub fn with_image_filter_ttl(mut self, ttl: Duration) -> Self {
        self.filter_ttl = ttl;
        self
    }

    /// The AMI a launch runs and its root device.
    async fn image(&self, source: &ImageSource) -> Result<ResolvedImage, CloudError> {
        match source {
            ImageSource::Id(id) => Ok(ResolvedImage {
                id: id.clone(),
                root_device: self.root_device_name(id).await?,
            }),
            ImageSource::Filter(filter) => self.resolve_filter(filter).await,
        }
    }

    /// The newest available AMI of the filter's owner whose name matches:
    /// what an operator means by "the current kani-runner image". Cached
    /// for [`IMAGE_FILTER_TTL`]; a filter with no match is asked again on
    /// the next launch (which the profile's backoff spaces out).
    async fn resolve_filter(&self, filter: &ImageFilter) -> Result<ResolvedImage, CloudError> {
        let cached = lock(&self.filters)
            .get(filter)
            .filter(|(at, _)| at.elapsed() < self.filter_ttl)
            .map(|(_, image)| image.clone());
        if let Some(image) = cached {
            return Ok(image);
        }
        let mut pages = self
            .client
            .describe_images()
            .owners(filter.owner())
            .filters(
                Filter::builder()
                    .name("name")
                    .values(filter.name_pattern())
                    .build(),
            )
            .filters(Filter::builder().name("state").values("available").build())
            .into_paginator()
            .send();
        let mut images = Vec::new();
        while let Some(page) = pages.next().await {
            images.extend(page.map_err(|e| cloud_error(&e))?.images().iter().cloned());
        }
        let newest = newest_image(&images).ok_or_else(|| CloudError::no_image_match(filter))?;
        let resolved = ResolvedImage {
            id: newest.image_id().unwrap_or_default().to_owned(),
            root_device: root_device_of(newest),
        };
        tracing::info!(
            image_filter = %filter,
            image_id = %resolved.id,
            name = newest.name().unwrap_or_default(),
            created = newest.creation_date().unwrap_or_default(),
            candidates = images.len(),
            "image filter resolved"
        );
        lock(&self.root_devices).insert(resolved.id.clone(), resolved.root_device.clone());
        lock(&self.filters).insert(filter.clone(), (Instant::now(), resolved.clone()));
        Ok(resolved)
    }

    /// The `CpuOptions` that give an instance of this type `threads` threads
    /// per core. EC2 wants the core count beside the threads; the type's
    /// default count keeps every physical core.
    async fn cpu_options(
        &self,
        instance_type: &str,
        threads: u32,
    ) -> Result<Option<CpuOptionsRequest>, CloudError> {
        let cached = lock(&self.cpu_infos).get(instance_type).cloned();
        let info = match cached {
            Some(info) => info,
            None => {
                let out = self
                    .client
                    .describe_instance_types()
                    .instance_types(InstanceType::from(instance_type))
                    .send()
                    .await
                    .map_err(|e| cloud_error(&e))?;
                let raw = out.instance_types().first().ok_or_else(|| {
                    CloudError::from_code(
                        "InvalidInstanceType",
                        format!("DescribeInstanceTypes knows no {instance_type}"),
                    )
                })?;
                let vcpu = raw.v_cpu_info();
                let info = CpuInfo {
                    bare_metal: raw.bare_metal().unwrap_or(false),
                    default_cores: vcpu.and_then(|v| v.default_cores()),
                    default_threads_per_core: vcpu.and_then(|v| v.default_threads_per_core()),
                    valid_threads_per_core: vcpu
                        .map(|v| v.valid_threads_per_core().to_vec())
                        .unwrap_or_default(),
                };
                lock(&self.cpu_infos).insert(instance_type.to_owned(), info.clone());
                info
            }
        };
        cpu_options_for(instance_type, &info, threads)
            .map(|o| {
                o.map(|(cores, threads)| {
                    CpuOptionsRequest::builder()
                        .core_count(cores)
                        .threads_per_core(threads)
                        .build()
                })
            })
            .map_err(|reason| CloudError::from_code(CPU_OPTIONS_REFUSED, reason))
    }

    /// Instances per `DescribeInstances` page (clamped to EC2's 5..=1000).
    /// The default, 1000, keeps large fleets to few calls; tests lower it to
    /// exercise pagination.
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = page_size.clamp(MIN_PAGE, MAX_PAGE);
        self
    }

    /// The device the AMI boots from. The root volume mapping must use this
    /// exact name: under any other name EC2 attaches a second, empty volume
    /// and leaves the root at the image's size.
    async fn root_device_name(&self, image_id: &str) -> Result<String, CloudError> {
        if let Some(name) = self.cached_root_device(image_id) {
            return Ok(name);
        }
        let out = self
            .client
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .map_err(|e| cloud_error(&e))?;
        let image = out
            .images()
            .iter()
            .find(|image| image.image_id() == Some(image_id))
            .ok_or_else(|| {
                CloudError::from_code(
                    "InvalidAMIID.NotFound",
                    format!("image {image_id} is not visible to this account"),
                )
            })?;
        let name = root_device_of(image);
        lock(&self.root_devices).insert(image_id.to_owned(), name.clone());
        Ok(name)
    }

    /// Makes instance ARNs for the account that owns a reservation, in this
    /// client's region: what IAM compares with `ec2:SourceInstanceARN` when
    /// the instance calls AWS with its role.
    fn instance_arn(&self, owner_id: Option<&str>) -> impl Fn(&str) -> Option<String> {
        let region = self.client.config().region().map(|r| r.to_string());
        let owner = owner_id.filter(|o| !o.is_empty()).map(str::to_owned);
        move |id: &str| {
            let (region, owner) = (region.as_deref()?, owner.as_deref()?);
            Some(format!(
                "arn:{}:ec2:{region}:{owner}:instance/{id}",
                partition(region)
            ))
        }
    }

    fn cached_root_device(&self, image_id: &str) -> Option<String> {
        lock(&self.root_devices).get(image_id).cloned()
    }

    /// One `TerminateInstances` batch. EC2 rejects the whole batch when any
    /// id is unknown, so the unknown ones (named in the error message) are
    /// dropped and the rest retried; if the message names none of them, each
    /// id goes alone so one vanished instance cannot shield the others.
    async fn terminate_batch(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut pending = ids.to_vec();
        while !pending.is_empty() {
            let err = match self.terminate_call(&pending).await {
                Ok(()) => return Ok(()),
                Err(err) if err.code == NOT_FOUND => err,
                Err(err) => return Err(err),
            };
            let missing = instance_ids_in(&err.message);
            let before = pending.len();
            pending.retain(|id| !missing.contains(id.as_str()));
            if pending.len() < before {
                tracing::debug!(
                    gone = before - pending.len(),
                    remaining = pending.len(),
                    "some instances were already gone; retrying the rest"
                );
                continue;
            }
            if pending.len() == 1 {
                return Ok(());
            }
            tracing::debug!(
                count = pending.len(),
                "TerminateInstances named no missing id; terminating one by one"
            );
            for id in &pending {
                match self.terminate_call(std::slice::from_ref(id)).await {
                    Ok(()) => {}
                    Err(err) if err.code == NOT_FOUND => {}
                    Err(err) => return Err(err),
                }
            }
            return Ok(());
        }
        Ok(())
    }

    async fn terminate_call(&self, ids: &[String]) -> Result<(), CloudError> {
        self.client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error(&e))
    }
}

#[async_trait]
impl Cloud for Ec2Cloud {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        let image = self.image(&request.image).await?;
        let cpu_options = match request.threads_per_core {
            Some(threads) => self.cpu_options(&request.instance_type, threads).await?,
            None => None,
        };
        let volume_size = i32::try_from(request.root_volume_gb).map_err(|_| {
            CloudError::new(
                CloudErrorKind::Invalid,
                "InvalidParameterValue",
                format!("root volume of {} GiB", request.root_volume_gb),
            )
        })?;
        let tags = [
            (TAG_CONTROLLER, request.controller_id.as_str()),
            (TAG_PROFILE, request.profile.as_str()),
            (TAG_RUNNER, request.runner_name.as_str()),
            (TAG_NAME, request.runner_name.as_str()),
        ];
        let security_groups: Vec<String> = request
            .security_group_ids
            .iter()
            .filter(|id| !id.is_empty())
            .cloned()
            .collect();

        let mut call = self
            .client
            .run_instances()
            .min_count(1)
            .max_count(1)
            // EC2 returns the original instance for a repeated token, so a
            // retry after a lost response cannot start a second machine.
            .client_token(&request.client_token)
            .image_id(&image.id)
            .set_cpu_options(cpu_options)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .set_subnet_id(non_empty(request.subnet_id.as_deref()).map(str::to_owned))
            .set_security_group_ids((!security_groups.is_empty()).then_some(security_groups))
            .user_data(BASE64_STANDARD.encode(&request.user_data))
            // A runner powers itself off when its job ends; that must end
            // the bill, not leave a stopped instance behind.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    // One hop: the token answer cannot cross a container
                    // bridge, so a job's containers cannot fetch user data
                    // (and the JIT config in it) from IMDS.
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(image.root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(volume_size)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            // Tagging at launch (not CreateTags afterwards) is what the IAM
            // policy allows, and it leaves no window where an instance or
            // its volume exists unowned.
            .tag_specifications(tag_specification(ResourceType::Instance, &tags))
            .tag_specifications(tag_specification(ResourceType::Volume, &tags));

        if let Some(profile) = non_empty(request.iam_instance_profile.as_deref()) {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            call = call.iam_instance_profile(spec.build());
        }
        if request.market == Market::Spot {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }

        let output = call.send().await.map_err(|err| {
            let err = cloud_error(&err);
            tracing::debug!(
                runner = %request.runner_name,
                instance_type = %request.instance_type,
                market = request.market.as_str(),
                code = %err.code,
                "RunInstances failed"
            );
            err
        })?;
        let raw = output.instances().first();
        let arn = self.instance_arn(output.owner_id());
        let mut instance = raw.and_then(|r| to_instance(r, &arn)).ok_or_else(|| {
            // Safe to retry: the same ClientToken finds the instance if one
            // was in fact started.
            CloudError::new(
                CloudErrorKind::Transient,
                "EmptyResponse",
                "RunInstances returned no instance",
            )
        })?;
        // The launch response may omit what the request already says.
        instance
            .runner_name
            .get_or_insert_with(|| request.runner_name.clone());
        instance
            .profile
            .get_or_insert_with(|| request.profile.clone());
        if raw.and_then(|r| r.instance_lifecycle()).is_none() {
            instance.market = request.market;
        }
        tracing::info!(
            runner = %request.runner_name,
            instance_id = %instance.id,
            instance_type = %instance.instance_type,
            market = instance.market.as_str(),
            image_id = %image.id,
            threads_per_core = ?request.threads_per_core,
            "launched"
        );
        Ok(instance)
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError> {
        let mut seen = HashSet::new();
        let ids: Vec<String> = instance_ids
            .iter()
            .filter(|id| !id.is_empty() && seen.insert(id.as_str()))
            .cloned()
            .collect();
        for batch in ids.chunks(TERMINATE_BATCH) {
            self.terminate_batch(batch).await?;
        }
        if !ids.is_empty() {
            tracing::debug!(count = ids.len(), "terminated");
        }
        Ok(())
    }

    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_CONTROLLER}"))
                    .values(controller_id)
                    .build(),
            )
            .into_paginator()
            .page_size(self.page_size)
            .items()
            .send();
        let mut owned = Vec::new();
        while let Some(reservation) = pages.next().await {
            let reservation = reservation.map_err(|e| cloud_error(&e))?;
            let arn = self.instance_arn(reservation.owner_id());
            for raw in reservation.instances() {
                // Tag filter values accept `*` and `?` wildcards; ownership
                // is an exact match, checked here rather than trusted.
                let ours = raw
                    .tags()
                    .iter()
                    .any(|t| t.key() == Some(TAG_CONTROLLER) && t.value() == Some(controller_id));
                if let (true, Some(instance)) = (ours, to_instance(raw, &arn)) {
                    owned.push(instance);
                }
            }
        }
        Ok(owned)
    }

    async fn spot_prices(&self, instance_types: &[String]) -> Result<Vec<SpotPrice>, CloudError> {
        if instance_types.is_empty() {
            return Ok(Vec::new());
        }
        // Start and end now: EC2 answers with the price in effect now in
        // each AZ (the last change before the start time).
        let now = aws_sdk_ec2::primitives::DateTime::from_secs(Utc::now().timestamp());
        let call = instance_types.iter().fold(
            self.client
                .describe_spot_price_history()
                .start_time(now)
                .end_time(now)
                .product_descriptions("Linux/UNIX")
                .product_descriptions("Linux/UNIX (Amazon VPC)"),
            |call, t| call.instance_types(InstanceType::from(t.as_str())),
        );
        let mut pages = call.into_paginator().items().send();
        // (type, AZ) → (timestamp, price): the latest sample wins.
        let mut latest: HashMap<(String, Option<String>), (i64, f64)> = HashMap::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| cloud_error(&e))?;
            let (Some(instance_type), Some(price)) = (
                item.instance_type(),
                item.spot_price().and_then(|p| p.trim().parse::<f64>().ok()),
            ) else {
                continue;
            };
            let at = item.timestamp().map_or(0, |t| t.secs());
            let key = (
                instance_type.as_str().to_owned(),
                item.availability_zone().map(str::to_owned),
            );
            let entry = latest.entry(key).or_insert((at, price));
            if (at, price) > *entry {
                *entry = (at, price);
            }
        }
        Ok(latest
            .into_iter()
            .map(
                |((instance_type, availability_zone), (_, dollars_per_hour))| SpotPrice {
                    instance_type,
                    availability_zone,
                    dollars_per_hour,
                },
            )
            .collect())
    }

    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, String)],
    ) -> Result<(), CloudError> {
        if tags.is_empty() {
            return Ok(());
        }
        let call = tags.iter().fold(
            self.client.create_tags().resources(instance_id),
            |call, (key, value)| call.tags(Tag::builder().key(*key).value(value).build()),
        );
        call.send().await.map(|_| ()).map_err(|e| cloud_error(&e))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn root_device_of(image: &Image) -> String {
    image
        .root_device_name()
        .filter(|name| !name.is_empty())
        .unwrap_or(FALLBACK_ROOT_DEVICE)
        .to_owned()
}

/// The newest available image by `CreationDate` (ISO 8601, so text order is
/// time order); the image id breaks ties so the choice is stable.
fn newest_image(images: &[Image]) -> Option<&Image> {
    images
        .iter()
        .filter(|i| i.image_id().is_some_and(|id| !id.is_empty()))
        .filter(|i| i.state().is_none_or(|s| *s == ImageState::Available))
        .max_by_key(|i| (i.creation_date().unwrap_or_default(), i.image_id()))
}

/// EC2's rules for `CpuOptions`: none on bare metal; the threads per core
/// must be one the type lists as valid, and the core count must come with
/// them. `Ok(None)`: the type already runs that many threads per core, so
/// nothing is sent (Graviton and other one-thread types need no options).
fn cpu_options_for(
    instance_type: &str,
    info: &CpuInfo,
    threads: u32,
) -> Result<Option<(i32, i32)>, String> {
    let threads = i32::try_from(threads).map_err(|_| format!("{threads} threads per core"))?;
    if info.default_threads_per_core == Some(threads) {
        return Ok(None);
    }
    if info.bare_metal {
        return Err(format!(
            "{instance_type} is bare metal, which takes no CPU options (threads_per_core = {threads})"
        ));
    }
    match info.default_cores {
        Some(cores) if info.valid_threads_per_core.contains(&threads) => Ok(Some((cores, threads))),
        _ => Err(format!(
            "{instance_type} does not take {threads} thread(s) per core (valid: {:?})",
            info.valid_threads_per_core
        )),
    }
}

/// The ARN partition of a region.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

fn tag_specification(resource: ResourceType, tags: &[(&str, &str)]) -> TagSpecification {
    tags.iter()
        .fold(
            TagSpecification::builder().resource_type(resource),
            |spec, (key, value)| spec.tags(Tag::builder().key(*key).value(*value).build()),
        )
        .build()
}

/// `None` only when EC2 sent no instance id, which it always does. `arn`
/// makes an instance's ARN from its id (see [`Ec2Cloud::instance_arn`]).
fn to_instance(
    raw: &aws_sdk_ec2::types::Instance,
    arn: &dyn Fn(&str) -> Option<String>,
) -> Option<Instance> {
    let id = raw.instance_id().filter(|id| !id.is_empty())?.to_owned();
    let tag = |key: &str| {
        raw.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    let market = match raw.instance_lifecycle() {
        Some(InstanceLifecycleType::Spot) => Market::Spot,
        _ => Market::OnDemand,
    };
    Some(Instance {
        runner_name: tag(TAG_RUNNER),
        profile: tag(TAG_PROFILE),
        instance_type: raw
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        subnet_id: non_empty(raw.subnet_id()).map(str::to_owned),
        availability_zone: non_empty(raw.placement().and_then(|p| p.availability_zone()))
            .map(str::to_owned),
        market,
        state: raw.state().map_or(InstanceState::Pending, |s| {
            instance_state(s.name(), s.code())
        }),
        state_reason: raw
            .state_reason()
            .and_then(|r| r.code())
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        launched_at: raw
            .launch_time()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())),
        arn: arn(&id),
        id,
    })
}

/// States EC2 may add later, or leave out, count as `Pending`: an instance
/// believed alive gets terminated eventually, one believed dead could run
/// (and bill) unnoticed.
fn instance_state(name: Option<&InstanceStateName>, code: Option<i32>) -> InstanceState {
    match name {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        // The low byte of the state code is documented and stable.
        _ => match code.map(|c| c & 0xff) {
            Some(16) => InstanceState::Running,
            Some(32) => InstanceState::ShuttingDown,
            Some(48) => InstanceState::Terminated,
            Some(64) => InstanceState::Stopping,
            Some(80) => InstanceState::Stopped,
            _ => InstanceState::Pending,
        },
    }
}

/// Instance ids quoted in an EC2 message such as
/// "The instance IDs 'i-0a, i-0b' do not exist".
fn instance_ids_in(message: &str) -> HashSet<&str> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| {
            word.strip_prefix("i-")
                .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .collect()
}

/// Classifies an SDK failure. EC2's error code decides when there is one;
/// failures that never reached EC2 (or got no parseable answer) are worth a
/// retry, except requests the SDK could not even build.
pub(crate) fn cloud_error<E>(err: &SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(code) = err.code().filter(|c| !c.is_empty()) {
        return CloudError::from_code(code, err.message().unwrap_or_default());
    }
    let detail = DisplayErrorContext(err).to_string();
    match err {
        SdkError::ConstructionFailure(_) => {
            CloudError::new(CloudErrorKind::Invalid, "ConstructionFailure", detail)
        }
        SdkError::TimeoutError(_) => CloudError::new(CloudErrorKind::Transient, "Timeout", detail),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            CloudError::new(CloudErrorKind::Transient, "Timeout", detail)
        }
        SdkError::DispatchFailure(_) => {
            CloudError::new(CloudErrorKind::Transient, "NetworkError", detail)
        }
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            match status {
                Some(429) => CloudError::new(CloudErrorKind::Throttled, "Http429", detail),
                Some(s) if (400..500).contains(&s) => {
                    CloudError::new(CloudErrorKind::Invalid, format!("Http{s}"), detail)
                }
                Some(s) => CloudError::new(CloudErrorKind::Transient, format!("Http{s}"), detail),
                None => CloudError::new(CloudErrorKind::Transient, "ResponseError", detail),
            }
        }
        _ => CloudError::new(CloudErrorKind::Transient, "Unknown", detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_ec2::operation::run_instances::RunInstancesError;

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), "".into())
    }

    fn service_error(code: &str, status: u16) -> SdkError<RunInstancesError, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("details from EC2")
            .build();
        SdkError::service_error(RunInstancesError::generic(meta), response(status))
    }

    #[test]
    fn ec2_codes_decide_the_kind() {
        let cases = [
            ("InsufficientInstanceCapacity", CloudErrorKind::Capacity),
            ("SpotMaxPriceTooLow", CloudErrorKind::Capacity),
            ("MaxSpotInstanceCountExceeded", CloudErrorKind::Capacity),
            ("UnfulfillableCapacity", CloudErrorKind::Capacity),
            ("RequestLimitExceeded", CloudErrorKind::Throttled),
            ("InternalError", CloudErrorKind::Transient),
            ("Unavailable", CloudErrorKind::Transient),
            ("InvalidAMIID.NotFound", CloudErrorKind::Invalid),
            ("InvalidSubnetID.NotFound", CloudErrorKind::Invalid),
            ("UnauthorizedOperation", CloudErrorKind::Invalid),
            ("AuthFailure", CloudErrorKind::Invalid),
            ("InvalidParameterValue", CloudErrorKind::Invalid),
            // Not the profile's fault: the attempt's token is spent.
            ("IdempotentParameterMismatch", CloudErrorKind::TokenSpent),
            ("IdempotentInstanceTerminated", CloudErrorKind::TokenSpent),
        ];
        for (code, kind) in cases {
            let err = cloud_error(&service_error(code, 400));
            assert_eq!(err.kind, kind, "{code}");
            assert_eq!(err.code, code);
            assert_eq!(err.message, "details from EC2");
        }
    }

    #[test]
    fn the_code_wins_over_the_http_status() {
        let err = cloud_error(&service_error("RequestLimitExceeded", 503));
        assert_eq!(err.kind, CloudErrorKind::Throttled);
        let err = cloud_error(&service_error("InternalError", 500));
        assert_eq!(err.kind, CloudErrorKind::Transient);
    }

    #[test]
    fn failures_without_a_code_fall_back_to_transport_and_status() {
        let timeout: SdkError<RunInstancesError, HttpResponse> =
            SdkError::timeout_error("attempt timed out");
        let err = cloud_error(&timeout);
        assert_eq!(
            (err.kind, err.code.as_str()),
            (CloudErrorKind::Transient, "Timeout")
        );

        let refused: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
        let err = cloud_error(&refused);
        assert_eq!(
            (err.kind, err.code.as_str()),
            (CloudErrorKind::Transient, "NetworkError")
        );
        assert!(
            err.message.contains("connection refused"),
            "{}",
            err.message
        );

        let slow: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::timeout("read timed out".into()));
        assert_eq!(cloud_error(&slow).code, "Timeout");

        let garbled: SdkError<RunInstancesError, HttpResponse> =
            SdkError::response_error("unparseable body", response(502));
        let err = cloud_error(&garbled);
        assert_eq!(
            (err.kind, err.code.as_str()),
            (CloudErrorKind::Transient, "Http502")
        );

        let unbuildable: SdkError<RunInstancesError, HttpResponse> =
            SdkError::construction_failure("missing field");
        assert_eq!(cloud_error(&unbuildable).kind, CloudErrorKind::Invalid);

        let uncoded = SdkError::service_error(
            RunInstancesError::generic(ErrorMetadata::builder().build()),
            response(503),
        );
        let err = cloud_error(&uncoded);
        assert_eq!(
            (err.kind, err.code.as_str()),
            (CloudErrorKind::Transient, "Http503")
        );

        let throttled = SdkError::service_error(
            RunInstancesError::generic(ErrorMetadata::builder().build()),
            response(429),
        );
        assert_eq!(cloud_error(&throttled).kind, CloudErrorKind::Throttled);

        let forbidden = SdkError::service_error(
            RunInstancesError::generic(ErrorMetadata::builder().build()),
            response(403),
        );
        assert_eq!(cloud_error(&forbidden).kind, CloudErrorKind::Invalid);
    }

    #[test]
    fn missing_instance_ids_are_read_from_ec2_messages() {
        let many = instance_ids_in("The instance IDs 'i-0123abcd, i-0fed' do not exist");
        assert_eq!(many, HashSet::from(["i-0123abcd", "i-0fed"]));
        let one = instance_ids_in("The instance ID 'i-551726e057d275be8' does not exist");
        assert_eq!(one, HashSet::from(["i-551726e057d275be8"]));
        assert!(instance_ids_in("Invalid id: \"i-\" or i-xyz").is_empty());
    }

    fn image(id: &str, created: &str, state: ImageState) -> Image {
        Image::builder()
            .image_id(id)
            .creation_date(created)
            .state(state)
            .build()
    }

    #[test]
    fn the_newest_available_image_wins() {
        let images = [
            image("ami-old", "2026-11-01T12:00:00.000Z", ImageState::Available),
            image("ami-new", "2026-11-20T12:00:00.000Z", ImageState::Available),
            image(
                "ami-pending",
                "2026-11-30T12:00:00.000Z",
                ImageState::Pending,
            ),
            image("ami-mid", "2026-11-10T12:00:00.000Z", ImageState::Available),
        ];
        assert_eq!(
            newest_image(&images).and_then(Image::image_id),
            Some("ami-new")
        );
        assert_eq!(newest_image(&[]), None);
    }

    #[test]
    fn cpu_options_follow_ec2s_rules() {
        let c6i = CpuInfo {
            bare_metal: false,
            default_cores: Some(16),
            default_threads_per_core: Some(2),
            valid_threads_per_core: vec![1, 2],
        };
        assert_eq!(cpu_options_for("c6i.8xlarge", &c6i, 1), Ok(Some((16, 1))));
        assert_eq!(cpu_options_for("c6i.8xlarge", &c6i, 2), Ok(None));
        let graviton = CpuInfo {
            default_threads_per_core: Some(1),
            valid_threads_per_core: vec![1],
            ..c6i.clone()
        };
        assert_eq!(cpu_options_for("c7g.8xlarge", &graviton, 1), Ok(None));
        assert!(cpu_options_for("c7g.8xlarge", &graviton, 2).is_err());
        let metal = CpuInfo {
            bare_metal: true,
            valid_threads_per_core: vec![],
            ..c6i
        };
        let err = cpu_options_for("c6i.metal", &metal, 1).unwrap_err();
        assert!(err.contains("bare metal"), "{err}");
    }

    #[test]
    fn arns_carry_the_regions_partition() {
        assert_eq!(partition("us-east-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }

    #[test]
    fn unknown_states_count_as_alive() {
        assert_eq!(
            instance_state(Some(&InstanceStateName::ShuttingDown), Some(32)),
            InstanceState::ShuttingDown
        );
        assert_eq!(
            instance_state(None, Some(48 | 0x100)),
            InstanceState::Terminated
        );
        let future = InstanceStateName::from("hibernating");
        assert!(instance_state(Some(&future), None).is_alive());
        assert!(instance_state(None, None).is_alive());
    }

    #[test]
    fn tags_and_lifecycle_map_back() {
        let raw = aws_sdk_ec2::types::Instance::builder()
            .instance_id("i-0abc")
            .instance_type(InstanceType::from("c7i.large"))
            .instance_lifecycle(InstanceLifecycleType::Spot)
            .subnet_id("subnet-1")
            .placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone("us-east-1c")
                    .build(),
            )
            .tags(
                Tag::builder()
                    .key(TAG_RUNNER)
                    .value("ctl-linux-ab12")
                    .build(),
            )
            .tags(Tag::builder().key(TAG_PROFILE).value("linux").build())
            .state_reason(
                aws_sdk_ec2::types::StateReason::builder()
                    .code("Server.SpotInstanceTermination")
                    .build(),
            )
            .launch_time(aws_sdk_ec2::primitives::DateTime::from_secs(1_700_000_000))
            .build();
        let instance = to_instance(&raw, &|id| {
            Some(format!("arn:aws:ec2:us-east-1:123456789012:instance/{id}"))
        })
        .unwrap();
        assert_eq!(instance.id, "i-0abc");
        assert_eq!(
            instance.arn.as_deref(),
            Some("arn:aws:ec2:us-east-1:123456789012:instance/i-0abc")
        );
        assert_eq!(instance.runner_name.as_deref(), Some("ctl-linux-ab12"));
        assert_eq!(instance.profile.as_deref(), Some("linux"));
        assert_eq!(instance.instance_type, "c7i.large");
        assert_eq!(instance.availability_zone.as_deref(), Some("us-east-1c"));
        assert_eq!(instance.market, Market::Spot);
        assert_eq!(instance.state, InstanceState::Pending);
        assert_eq!(
            instance.state_reason.as_deref(),
            Some("Server.SpotInstanceTermination")
        );
        assert_eq!(
            instance.launched_at.map(|t| t.timestamp()),
            Some(1_700_000_000)
        );

        let on_demand = aws_sdk_ec2::types::Instance::builder()
            .instance_id("i-0def")
            .state_reason(aws_sdk_ec2::types::StateReason::builder().code("").build())
            .build();
        let instance = to_instance(&on_demand, &|_| None).unwrap();
        assert_eq!(instance.market, Market::OnDemand);
        assert_eq!(instance.arn, None);
        assert_eq!(instance.state_reason, None);
        assert_eq!(instance.availability_zone, None);
        assert_eq!(instance.runner_name, None);
    }
}
