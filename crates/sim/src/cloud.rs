//! A fake EC2 that behaves like the real one where the reconciler depends on
//! it: the `RunInstances` and `TerminateInstances` buckets, `ClientToken`
//! idempotency, capacity running out per type/subnet/market, instances that
//! take time to boot, and instances that vanish by spot reclaim or by shutting
//! themselves down.
//!
//! `ClientToken`s as EC2 treats them: a token is remembered with the
//! parameters of the request that used it, whether that request started an
//! instance or was refused for capacity (ubicloud's capacity fallback met
//! exactly this). The same token with other parameters is refused with
//! `IdempotentParameterMismatch`; with the same parameters it returns the
//! instance it started, or `IdempotentInstanceTerminated` once that instance
//! is terminated; after a capacity refusal it is simply tried again.
//! Throttled calls never reach that far and are not remembered.
//!
//! Images: a launch names an AMI id or an image filter. Filters resolve, as
//! the EC2 adapter resolves them with `DescribeImages`, to the newest
//! available registered image of the owner whose name matches
//! ([`FakeCloud::register_image`]); the token remembers the AMI it resolved
//! to, because that is what `RunInstances` receives. CPU options follow
//! EC2's one rule the fake can know without a type catalogue: bare metal
//! takes none.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spot_runners_domain::ports::{
    Cloud, CloudError, CloudErrorKind, Instance, InstanceState, LaunchRequest,
};
use spot_runners_domain::ratelimit::TokenBucket;
use spot_runners_domain::{ImageSource, Market};

/// EC2's state reason codes, as `DescribeInstances` reports them.
pub const REASON_USER_TERMINATED: &str = "Client.UserInitiatedShutdown";
pub const REASON_SPOT_RECLAIMED: &str = "Server.SpotInstanceTermination";
pub const REASON_SHUTDOWN_FROM_INSIDE: &str = "Client.InstanceInitiatedShutdown";

/// EC2 refuses user data above 16 KiB (before base64).
const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// The account and region the fake's instance ARNs name.
pub const FAKE_ARN_PREFIX: &str = "arn:aws:ec2:us-east-1:123456789012:instance/";

/// The AZs of the fake's region; `availability_zone_of` places each
/// subnet in one of them.
pub const FAKE_AZS: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

/// The AZ of a subnet, as EC2 places every instance of a subnet in the
/// subnet's one AZ: the same subnet always lands in the same AZ. The
/// default subnet (`None`) is in the first.
pub fn availability_zone_of(subnet_id: Option<&str>) -> &'static str {
    let Some(subnet) = subnet_id.filter(|s| !s.is_empty()) else {
        return FAKE_AZS[0];
    };
    // FNV-1a: stable across runs and platforms (std's hasher is seeded).
    let hash = subnet.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    FAKE_AZS[(hash % FAKE_AZS.len() as u64) as usize]
}

/// The fake's account, which `self` names in an image filter.
pub const FAKE_ACCOUNT: &str = "123456789012";

const DEFAULT_BOOT_TIME: Duration = Duration::from_secs(30);
/// EC2 keeps reporting terminated instances for about an hour.
const DEFAULT_TERMINATED_RETENTION: Duration = Duration::from_secs(3600);

/// One call the service made, for assertions on what it asked of EC2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudCall {
    /// Every `launch`, including throttled and failed ones.
    Launch {
        runner_name: String,
        client_token: String,
        instance_type: String,
        subnet_id: Option<String>,
        market: Market,
        at: Instant,
        /// The instance id, or EC2's error code.
        outcome: Result<String, String>,
    },
    /// A `terminate` EC2 accepted; throttled or failed calls change nothing
    /// and show only in [`FakeCloud::throttled_count`].
    Terminate { ids: Vec<String>, at: Instant },
    /// A `tag_instance` (`CreateTags` after launch).
    Tag {
        instance_id: String,
        tags: Vec<(String, String)>,
    },
}

/// An instance as the fake holds it, with what `Instance` cannot carry.
#[derive(Clone, Debug)]
pub struct FakeInstance {
    /// As `list_owned` would report it now.
    pub instance: Instance,
    /// The request that created it (controller id, user data, …).
    pub request: LaunchRequest,
    /// The AMI it runs: the request's id, or what its filter resolved to.
    pub image_id: String,
    pub launched_at: Instant,
    pub terminated_at: Option<Instant>,
}

/// A live instance as a simulation steps it, without the request's bulk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveInstance {
    pub id: String,
    /// The `spot-runners:runner` tag: the runner the instance starts.
    pub runner_name: String,
    pub profile: String,
    pub instance_type: String,
    /// `None`: the region's default subnet.
    pub subnet_id: Option<String>,
    pub market: Market,
    /// Past its boot time (EC2's `running`).
    pub running: bool,
    pub launched_at: Instant,
}

type CapacityKey = (String, Option<String>, Market);

/// What EC2 remembers of a `ClientToken`.
struct TokenUse {
    /// The request that first used it (only the fields EC2 compares matter).
    request: LaunchRequest,
    /// The AMI that request resolved to.
    image_id: String,
    /// The instance it started, as an index into `records`.
    instance: Option<usize>,
}

impl TokenUse {
    fn same_parameters(&self, other: &LaunchRequest, image_id: &str) -> bool {
        let first = &self.request;
        first.instance_type == other.instance_type
            && first.subnet_id == other.subnet_id
            && first.market == other.market
            && self.image_id == image_id
            && first.threads_per_core == other.threads_per_core
            && first.user_data == other.user_data
    }
}

struct Record {
    id: String,
    request: LaunchRequest,
    image_id: String,
    launched_at: Instant,
    running_at: Instant,
    ended: Option<(Instant, Option<String>)>,
    /// Added after launch by `tag_instance`.
    tags: BTreeMap<String, String>,
}

impl Record {
    fn is_live(&self) -> bool {
        self.ended.is_none()
    }

    fn state(&self, now: Instant) -> InstanceState {
        match self.ended {
            Some(_) => InstanceState::Terminated,
            None if now >= self.running_at => InstanceState::Running,
            None => InstanceState::Pending,
        }
    }
}

struct State {
    run_bucket: TokenBucket,
    /// `run_bucket` as configured, full: what callers should pace by.
    run_limit: TokenBucket,
    terminate_bucket: TokenBucket,
    boot_time: Duration,
    latency: Duration,
    terminated_retention: Duration,
    /// In launch order.
    records: Vec<Record>,
    /// Every id ever handed out (EC2 never reuses one).
    issued: std::collections::HashSet<String>,
    by_token: HashMap<String, TokenUse>,
    /// Absent means unlimited.
    capacity: HashMap<CapacityKey, u32>,
    /// Chance that a launch of this type and market finds no capacity.
    capacity_error_rates: HashMap<(String, Market), f64>,
    fail_launch: VecDeque<String>,
    /// AMIs that do not exist: launching one is refused, every time.
    missing_images: std::collections::HashSet<String>,
    /// Images an image filter can find, in registration order.
    images: Vec<FakeImage>,
    fail_terminate: VecDeque<String>,
    fail_list: VecDeque<String>,
    /// `DescribeSpotPriceHistory`: dollars per hour by instance type, the
    /// same in every AZ.
    spot_prices: HashMap<String, f64>,
    spot_price_calls: u64,
    live: HashMap<String, u32>,
    peak: HashMap<String, u32>,
    live_total: u32,
    peak_total: u32,
    calls: Vec<CloudCall>,
    launch_attempts: u64,
    throttled: u64,
    rng: StdRng,
    /// Ties tokio's clock to wall time, so `launched_at` moves with a paused
    /// clock instead of with the machine's.
    epoch: (Instant, DateTime<Utc>),
}

/// A registered AMI, as `DescribeImages` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeImage {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// `available`; a deregistered or still pending image is not.
    pub available: bool,
}

impl State {
    /// The AMI a launch runs, as the EC2 adapter resolves it.
    fn resolve_image(&self, image: &ImageSource) -> Result<String, CloudError> {
        match image {
            ImageSource::Id(id) if self.missing_images.contains(id) => Err(CloudError::from_code(
                "InvalidAMIID.NotFound",
                format!("The image id '[{id}]' does not exist"),
            )),
            ImageSource::Id(id) => Ok(id.clone()),
            ImageSource::Filter(filter) => {
                let owner = match filter.owner() {
                    "self" => FAKE_ACCOUNT,
                    other => other,
                };
                self.images
                    .iter()
                    .filter(|i| i.available && i.owner == owner && filter.matches(&i.name))
                    .max_by_key(|i| i.created_at)
                    .map(|i| i.id.clone())
                    .ok_or_else(|| CloudError::no_image_match(filter))
            }
        }
    }

    fn wall_time(&self, at: Instant) -> DateTime<Utc> {
        let (base, base_utc) = self.epoch;
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        match at.checked_duration_since(base) {
            Some(after) => base_utc + delta(after),
            None => base_utc - delta(base - at),
        }
    }

    fn view(&self, record: &Record, now: Instant) -> Instance {
        let request = &record.request;
        Instance {
            id: record.id.clone(),
            // Tags, exactly as the EC2 adapter sets them at launch.
            runner_name: Some(request.runner_name.clone()),
            profile: Some(request.profile.clone()),
            instance_type: request.instance_type.clone(),
            subnet_id: request.subnet_id.clone(),
            availability_zone: Some(availability_zone_of(request.subnet_id.as_deref()).to_owned()),
            market: request.market,
            state: record.state(now),
            state_reason: record.ended.as_ref().and_then(|(_, r)| r.clone()),
            launched_at: Some(self.wall_time(record.launched_at)),
            arn: Some(format!("{FAKE_ARN_PREFIX}{}", record.id)),
        }
    }

    fn new_instance_id(&mut self) -> String {
        loop {
            let bits: u128 = self.rng.gen::<u128>() & ((1 << 68) - 1);
            let id = format!("i-{bits:017x}");
            if self.issued.insert(id.clone()) {
                return id;
            }
        }
    }

    fn try_launch(
        &mut self,
        request: &LaunchRequest,
        now: Instant,
    ) -> Result<Instance, CloudError> {
        // Before RunInstances, as the adapter's DescribeImages: neither
        // throttled by its bucket nor remembered with a token.
        let image_id = self.resolve_image(&request.image)?;
        if self.run_bucket.try_take(now).is_err() {
            self.throttled += 1;
            return Err(CloudError::from_code(
                "RequestLimitExceeded",
                "Request limit exceeded.",
            ));
        }

        if let Some(used) = self.by_token.get(&request.client_token) {
            if !used.same_parameters(request, &image_id) {
                return Err(CloudError::from_code(
                    "IdempotentParameterMismatch",
                    format!(
                        "Arguments on this idempotent request (client token {}) are inconsistent with arguments used in previous request(s).",
                        request.client_token
                    ),
                ));
            }
            if let Some(index) = used.instance {
                let first = &self.records[index];
                return if first.is_live() {
                    Ok(self.view(first, now))
                } else {
                    Err(CloudError::from_code(
                        "IdempotentInstanceTerminated",
                        format!(
                            "The instance {} launched with client token {} has been terminated.",
                            first.id, request.client_token
                        ),
                    ))
                };
            }
            // Refused for capacity last time: EC2 tries it again.
        }

        if let Some(code) = self.fail_launch.pop_front() {
            let error = CloudError::from_code(&code, "injected by the fake cloud");
            if error.kind == CloudErrorKind::Capacity {
                self.remember_token(request, &image_id, None);
            }
            return Err(error);
        }

        let bare_metal = request
            .instance_type
            .split('.')
            .nth(1)
            .is_some_and(|size| size.starts_with("metal"));
        if request.threads_per_core.is_some() && bare_metal {
            return Err(CloudError::from_code(
                "InvalidParameterCombination",
                format!(
                    "CPU options are not supported for instance type {}",
                    request.instance_type
                ),
            ));
        }

        if request.user_data.len() > MAX_USER_DATA_BYTES {
            return Err(CloudError::from_code(
                "InvalidParameterValue",
                format!("user data is limited to {MAX_USER_DATA_BYTES} bytes"),
            ));
        }

        let key = (
            request.instance_type.clone(),
            request.subnet_id.clone(),
            request.market,
        );
        if let Some(left) = self.capacity.get_mut(&key) {
            if *left == 0 {
                self.remember_token(request, &image_id, None);
                return Err(CloudError::from_code(
                    "InsufficientInstanceCapacity",
                    format!(
                        "there is not enough {} {} capacity in subnet {}",
                        request.market,
                        request.instance_type,
                        request.subnet_id.as_deref().unwrap_or("(default)"),
                    ),
                ));
            }
            *left -= 1;
        }
        let rate = self
            .capacity_error_rates
            .get(&(request.instance_type.clone(), request.market))
            .copied()
            .unwrap_or(0.0);
        if rate > 0.0 && self.rng.gen_bool(rate.min(1.0)) {
            self.remember_token(request, &image_id, None);
            return Err(CloudError::from_code(
                "InsufficientInstanceCapacity",
                format!(
                    "there is not enough {} {} capacity right now",
                    request.market, request.instance_type
                ),
            ));
        }

        let id = self.new_instance_id();
        let record = Record {
            id,
            request: request.clone(),
            image_id: image_id.clone(),
            launched_at: now,
            running_at: now + self.boot_time,
            ended: None,
            tags: BTreeMap::new(),
        };
        let instance = self.view(&record, now);
        self.remember_token(request, &image_id, Some(self.records.len()));
        self.records.push(record);

        let live = self.live.entry(request.profile.clone()).or_default();
        *live += 1;
        let live = *live;
        let peak = self.peak.entry(request.profile.clone()).or_default();
        *peak = (*peak).max(live);
        self.live_total += 1;
        self.peak_total = self.peak_total.max(self.live_total);
        Ok(instance)
    }

    fn remember_token(&mut self, request: &LaunchRequest, image_id: &str, instance: Option<usize>) {
        self.by_token.insert(
            request.client_token.clone(),
            TokenUse {
                request: request.clone(),
                image_id: image_id.to_owned(),
                instance,
            },
        );
    }

    /// Ends a live instance; `false` when there is none by that id.
    fn end(&mut self, id: &str, now: Instant, reason: &str) -> bool {
        self.end_where(id, now, reason, |_| true)
    }

    fn end_where(
        &mut self,
        id: &str,
        now: Instant,
        reason: &str,
        eligible: impl Fn(&Record) -> bool,
    ) -> bool {
        let Some(record) = self
            .records
            .iter_mut()
            .find(|r| r.id == id && r.is_live() && eligible(r))
        else {
            return false;
        };
        record.ended = Some((now, Some(reason.to_owned())));
        if let Some(live) = self.live.get_mut(&record.request.profile) {
            *live = live.saturating_sub(1);
        }
        self.live_total = self.live_total.saturating_sub(1);
        true
    }
}

/// A cheaply cloneable handle; clones share one fake EC2 region.
#[derive(Clone)]
pub struct FakeCloud {
    state: Arc<Mutex<State>>,
}

impl Default for FakeCloud {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeCloud {
    /// Unlimited capacity, full buckets, 30 s boot time, no latency.
    pub fn new() -> Self {
        Self::with_rng(StdRng::from_entropy())
    }

    /// Instance ids drawn from a seeded generator, so a simulation run can
    /// be replayed exactly.
    pub fn with_seed(seed: u64) -> Self {
        Self::with_rng(StdRng::seed_from_u64(seed))
    }

    fn with_rng(rng: StdRng) -> Self {
        let state = State {
            run_bucket: TokenBucket::ec2_run_instances(),
            run_limit: TokenBucket::ec2_run_instances(),
            terminate_bucket: TokenBucket::ec2_terminate_instances(),
            boot_time: DEFAULT_BOOT_TIME,
            latency: Duration::ZERO,
            terminated_retention: DEFAULT_TERMINATED_RETENTION,
            records: Vec::new(),
            issued: std::collections::HashSet::new(),
            by_token: HashMap::new(),
            capacity: HashMap::new(),
            capacity_error_rates: HashMap::new(),
            fail_launch: VecDeque::new(),
            missing_images: std::collections::HashSet::new(),
            images: Vec::new(),
            fail_terminate: VecDeque::new(),
            fail_list: VecDeque::new(),
            spot_prices: crate::scenario::default_prices()
                .into_iter()
                .map(|(t, p)| (t, p.spot))
                .collect(),
            spot_price_calls: 0,
            live: HashMap::new(),
            peak: HashMap::new(),
            live_total: 0,
            peak_total: 0,
            calls: Vec::new(),
            launch_attempts: 0,
            throttled: 0,
            rng,
            epoch: (crate::now(), Utc::now()),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    async fn delay(&self) {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    // ------------------------------------------------------- controls --

    /// The spot price `DescribeSpotPriceHistory` reports for a type (the
    /// defaults are [`crate::scenario::default_prices`]); `None`: no price.
    pub fn set_spot_price(&self, instance_type: &str, dollars_per_hour: Option<f64>) {
        let mut state = self.lock();
        match dollars_per_hour {
            Some(p) => state.spot_prices.insert(instance_type.to_owned(), p),
            None => state.spot_prices.remove(instance_type),
        };
    }

    /// `DescribeSpotPriceHistory` calls so far.
    pub fn spot_price_calls(&self) -> u64 {
        self.lock().spot_price_calls
    }

    /// Replaces EC2's documented buckets, e.g. with
    /// [`TokenBucket::unlimited`] to measure the service without throttling.
    pub fn set_rate_limits(&self, run_instances: TokenBucket, terminate_instances: TokenBucket) {
        let mut state = self.lock();
        state.run_bucket = run_instances.clone();
        state.run_limit = run_instances;
        state.terminate_bucket = terminate_instances;
    }

    /// The next launch that gets past the bucket and the `ClientToken` check
    /// fails with this EC2 error code; queued codes are used one per launch.
    pub fn fail_next(&self, code: &str) {
        self.lock().fail_launch.push_back(code.to_owned());
    }

    /// Every launch of this AMI fails with `InvalidAMIID.NotFound`, as a
    /// deregistered or mistyped image does.
    pub fn remove_image(&self, image_id: &str) {
        self.lock().missing_images.insert(image_id.to_owned());
    }

    /// Registers an available AMI that image filters can find; returns its
    /// id. `owner` is an account id ([`FAKE_ACCOUNT`] is `self`) or an alias
    /// such as `amazon`.
    pub fn register_image(&self, owner: &str, name: &str, created_at: DateTime<Utc>) -> String {
        let mut state = self.lock();
        let id = format!("ami-{:017x}", state.rng.gen::<u64>());
        state.images.push(FakeImage {
            id: id.clone(),
            owner: owner.to_owned(),
            name: name.to_owned(),
            created_at,
            available: true,
        });
        id
    }

    /// The image is no longer `available` (deregistered): filters skip it.
    pub fn deregister_image(&self, image_id: &str) {
        let mut state = self.lock();
        for image in state.images.iter_mut().filter(|i| i.id == image_id) {
            image.available = false;
        }
        state.missing_images.insert(image_id.to_owned());
    }

    /// Like [`fail_next`](Self::fail_next), for the next accepted `terminate`.
    pub fn fail_next_terminate(&self, code: &str) {
        self.lock().fail_terminate.push_back(code.to_owned());
    }

    /// Like [`fail_next`](Self::fail_next), for the next `list_owned`.
    pub fn fail_next_list(&self, code: &str) {
        self.lock().fail_list.push_back(code.to_owned());
    }

    /// `Some(n)`: at most `n` more launches of exactly this type, subnet
    /// (`None` being the default subnet) and market succeed; after that they
    /// fail with `InsufficientInstanceCapacity`. `None`: unlimited again.
    pub fn set_capacity(
        &self,
        instance_type: &str,
        subnet: Option<&str>,
        market: Market,
        available: Option<u32>,
    ) {
        let key = (instance_type.to_owned(), subnet.map(str::to_owned), market);
        let mut state = self.lock();
        match available {
            Some(n) => state.capacity.insert(key, n),
            None => state.capacity.remove(&key),
        };
    }

    /// Each launch of this type and market fails with
    /// `InsufficientInstanceCapacity` with this probability (0 to 1), drawn
    /// from the cloud's seeded generator: spot markets that run dry now and
    /// then rather than after a fixed count.
    pub fn set_capacity_error_rate(&self, instance_type: &str, market: Market, rate: f64) {
        let key = (instance_type.to_owned(), market);
        let mut state = self.lock();
        if rate > 0.0 {
            state.capacity_error_rates.insert(key, rate);
        } else {
            state.capacity_error_rates.remove(&key);
        }
    }

    /// How long from launch until an instance reports `Running`; applies to
    /// instances launched from now on.
    pub fn set_boot_time(&self, boot_time: Duration) {
        self.lock().boot_time = boot_time;
    }

    /// Added (as a tokio sleep) before every call, to expose code that holds
    /// locks or blocks other work across a slow EC2 API.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// How long `list_owned` keeps reporting an instance after it
    /// terminated; EC2's is about an hour.
    pub fn set_terminated_retention(&self, retention: Duration) {
        self.lock().terminated_retention = retention;
    }

    /// Spot reclaim. `false` (and nothing happens) unless the instance is a
    /// live spot instance: EC2 never reclaims on-demand ones.
    pub fn interrupt(&self, instance_id: &str) -> bool {
        let now = crate::now();
        self.lock()
            .end_where(instance_id, now, REASON_SPOT_RECLAIMED, |r| {
                r.request.market == Market::Spot
            })
    }

    /// The instance powered itself off (job done, or its watchdog fired);
    /// instances are launched to terminate on shutdown. `false` if not live.
    pub fn shutdown_from_inside(&self, instance_id: &str) -> bool {
        let now = crate::now();
        self.lock()
            .end(instance_id, now, REASON_SHUTDOWN_FROM_INSIDE)
    }

    // ----------------------------------------------------- inspection --

    /// Live (pending or running) instances, of one profile or of all.
    pub fn live_count(&self, profile: Option<&str>) -> u32 {
        let state = self.lock();
        match profile {
            Some(p) => state.live.get(p).copied().unwrap_or(0),
            None => state.live_total,
        }
    }

    /// The most instances of this profile ever live at once.
    pub fn peak_live(&self, profile: &str) -> u32 {
        self.lock().peak.get(profile).copied().unwrap_or(0)
    }

    /// The most instances ever live at once over all profiles.
    pub fn peak_live_total(&self) -> u32 {
        self.lock().peak_total
    }

    /// Pending and running instances, in launch order, without their user
    /// data: cheap enough to call on every step of a simulation.
    pub fn live_instances(&self) -> Vec<LiveInstance> {
        let now = crate::now();
        let state = self.lock();
        state
            .records
            .iter()
            .filter(|r| r.is_live())
            .map(|r| LiveInstance {
                id: r.id.clone(),
                runner_name: r.request.runner_name.clone(),
                profile: r.request.profile.clone(),
                instance_type: r.request.instance_type.clone(),
                subnet_id: r.request.subnet_id.clone(),
                market: r.request.market,
                running: now >= r.running_at,
                launched_at: r.launched_at,
            })
            .collect()
    }

    /// The boot script an instance was launched with.
    pub fn user_data(&self, instance_id: &str) -> Option<String> {
        self.lock()
            .records
            .iter()
            .find(|r| r.id == instance_id)
            .map(|r| r.request.user_data.clone())
    }

    /// Every instance ever launched, in launch order, whatever its owner and
    /// however long ago it terminated.
    pub fn instances(&self) -> Vec<FakeInstance> {
        let now = crate::now();
        let state = self.lock();
        state
            .records
            .iter()
            .map(|r| FakeInstance {
                instance: state.view(r, now),
                request: r.request.clone(),
                image_id: r.image_id.clone(),
                launched_at: r.launched_at,
                terminated_at: r.ended.as_ref().map(|(at, _)| *at),
            })
            .collect()
    }

    /// One instance as `list_owned` would report it now.
    pub fn instance(&self, instance_id: &str) -> Option<Instance> {
        let now = crate::now();
        let state = self.lock();
        state
            .records
            .iter()
            .find(|r| r.id == instance_id)
            .map(|r| state.view(r, now))
    }

    /// The tags added to an instance after its launch.
    pub fn added_tags(&self, instance_id: &str) -> BTreeMap<String, String> {
        self.lock()
            .records
            .iter()
            .find(|r| r.id == instance_id)
            .map(|r| r.tags.clone())
            .unwrap_or_default()
    }

    pub fn calls(&self) -> Vec<CloudCall> {
        self.lock().calls.clone()
    }

    /// Every `launch` call, whatever its outcome.
    pub fn launch_attempts(&self) -> u64 {
        self.lock().launch_attempts
    }

    /// Calls refused with `RequestLimitExceeded`, launches and terminations.
    pub fn throttled_count(&self) -> u64 {
        self.lock().throttled
    }
}

#[async_trait]
impl Cloud for FakeCloud {
    fn launch_limit(&self) -> TokenBucket {
        self.lock().run_limit.clone()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, CloudError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        state.launch_attempts += 1;
        let result = state.try_launch(request, now);
        state.calls.push(CloudCall::Launch {
            runner_name: request.runner_name.clone(),
            client_token: request.client_token.clone(),
            instance_type: request.instance_type.clone(),
            subnet_id: request.subnet_id.clone(),
            market: request.market,
            at: now,
            outcome: match &result {
                Ok(instance) => Ok(instance.id.clone()),
                Err(e) => Err(e.code.clone()),
            },
        });
        result
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), CloudError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        if state.terminate_bucket.try_take(now).is_err() {
            state.throttled += 1;
            return Err(CloudError::from_code(
                "RequestLimitExceeded",
                "Request limit exceeded.",
            ));
        }
        if let Some(code) = state.fail_terminate.pop_front() {
            return Err(CloudError::from_code(&code, "injected by the fake cloud"));
        }
        for id in instance_ids {
            state.end(id, now, REASON_USER_TERMINATED);
        }
        state.calls.push(CloudCall::Terminate {
            ids: instance_ids.to_vec(),
            at: now,
        });
        Ok(())
    }

    async fn list_owned(&self, controller_id: &str) -> Result<Vec<Instance>, CloudError> {
        self.delay().await;
        let now = crate::now();
        let mut state = self.lock();
        if let Some(code) = state.fail_list.pop_front() {
            return Err(CloudError::from_code(&code, "injected by the fake cloud"));
        }
        let retention = state.terminated_retention;
        Ok(state
            .records
            .iter()
            .filter(|r| r.request.controller_id == controller_id)
            .filter(|r| match r.ended {
                Some((at, _)) => now < at + retention,
                None => true,
            })
            .map(|r| state.view(r, now))
            .collect())
    }

    async fn spot_prices(
        &self,
        instance_types: &[String],
    ) -> Result<Vec<spot_runners_domain::cost::SpotPrice>, CloudError> {
        self.delay().await;
        let mut state = self.lock();
        state.spot_price_calls += 1;
        let azs = ["us-east-1a", "us-east-1b"];
        Ok(instance_types
            .iter()
            .filter_map(|t| state.spot_prices.get(t).map(|p| (t, *p)))
            .flat_map(|(t, p)| {
                azs.iter()
                    .map(move |az| spot_runners_domain::cost::SpotPrice {
                        instance_type: t.clone(),
                        availability_zone: Some((*az).to_owned()),
                        dollars_per_hour: p,
                    })
            })
            .collect())
    }

    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, String)],
    ) -> Result<(), CloudError> {
        self.delay().await;
        let mut state = self.lock();
        let Some(record) = state.records.iter_mut().find(|r| r.id == instance_id) else {
            return Err(CloudError::from_code(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{instance_id}' does not exist"),
            ));
        };
        for (key, value) in tags {
            record.tags.insert((*key).to_owned(), value.clone());
        }
        state.calls.push(CloudCall::Tag {
            instance_id: instance_id.to_owned(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use spot_runners_domain::ports::CloudErrorKind;

    fn request(name: &str) -> LaunchRequest {
        LaunchRequest {
            runner_name: name.to_owned(),
            client_token: name.to_owned(),
            controller_id: "ctl".to_owned(),
            profile: "linux".to_owned(),
            instance_type: "c6i.large".to_owned(),
            subnet_id: Some("subnet-a".to_owned()),
            image: ImageSource::Id("ami-1".into()),
            threads_per_core: None,
            security_group_ids: vec!["sg-1".to_owned()],
            iam_instance_profile: None,
            market: Market::Spot,
            root_volume_gb: 64,
            user_data: "#!/bin/sh\necho hi\n".to_owned(),
        }
    }

    /// Advances past the `RunInstances` bucket so the next launch is about
    /// what the test is checking, not about throttling.
    async fn refill() {
        tokio::time::advance(Duration::from_secs(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_six_is_throttled_at_the_sixth_and_recovers() {
        let cloud = FakeCloud::new();
        for i in 0..5 {
            cloud.launch(&request(&format!("r-{i}"))).await.unwrap();
        }
        let err = cloud.launch(&request("r-5")).await.unwrap_err();
        assert_eq!(err.code, "RequestLimitExceeded");
        assert_eq!(err.kind, CloudErrorKind::Throttled);
        assert_eq!(cloud.throttled_count(), 1);
        assert_eq!(cloud.launch_attempts(), 6);
        assert_eq!(cloud.live_count(None), 5);

        tokio::time::advance(Duration::from_millis(500)).await;
        cloud.launch(&request("r-5")).await.unwrap();
        assert!(cloud.launch(&request("r-6")).await.is_err());
        assert_eq!(cloud.throttled_count(), 2);
        assert_eq!(cloud.live_count(Some("linux")), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_client_token_returns_the_same_instance() {
        let cloud = FakeCloud::new();
        let first = cloud.launch(&request("r-1")).await.unwrap();
        assert!(first.id.starts_with("i-") && first.id.len() == 19);
        assert!(first.id[2..].chars().all(|c| c.is_ascii_hexdigit()));

        // Only the fields EC2 compares matter; a different security group
        // is not one of them here.
        let mut again = request("r-1");
        again.security_group_ids = vec!["sg-2".to_owned()];
        assert_eq!(cloud.launch(&again).await.unwrap().id, first.id);
        assert_eq!(cloud.instances().len(), 1);
        assert_eq!(cloud.live_count(None), 1);

        type Change = fn(&mut LaunchRequest);
        let changes: [Change; 6] = [
            |r| r.instance_type = "c6a.large".to_owned(),
            |r| r.subnet_id = Some("subnet-b".to_owned()),
            |r| r.market = Market::OnDemand,
            |r| r.image = ImageSource::Id("ami-2".to_owned()),
            |r| r.threads_per_core = Some(1),
            |r| r.user_data.push('\n'),
        ];
        for change in changes {
            refill().await;
            let mut different = request("r-1");
            change(&mut different);
            let err = cloud.launch(&different).await.unwrap_err();
            assert_eq!(err.code, "IdempotentParameterMismatch");
            assert_eq!(err.kind, CloudErrorKind::TokenSpent);
        }
        assert_eq!(cloud.instances().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_whose_instance_terminated_is_refused() {
        let cloud = FakeCloud::new();
        let first = cloud.launch(&request("r-1")).await.unwrap();
        cloud
            .terminate(std::slice::from_ref(&first.id))
            .await
            .unwrap();
        let err = cloud.launch(&request("r-1")).await.unwrap_err();
        assert_eq!(err.code, "IdempotentInstanceTerminated");
        assert_eq!(err.kind, CloudErrorKind::TokenSpent);
        // A new token for the same runner launches again.
        let mut next = request("r-1");
        next.client_token = "r-1.1".to_owned();
        assert_ne!(cloud.launch(&next).await.unwrap().id, first.id);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_refused_for_capacity_is_remembered_with_its_parameters() {
        let cloud = FakeCloud::new();
        cloud.set_capacity("c6i.large", Some("subnet-a"), Market::Spot, Some(0));
        let err = cloud.launch(&request("r-1")).await.unwrap_err();
        assert_eq!(err.kind, CloudErrorKind::Capacity);
        // The fallback to another subnet with the same token: EC2 refuses.
        let mut fallback = request("r-1");
        fallback.subnet_id = Some("subnet-b".to_owned());
        let err = cloud.launch(&fallback).await.unwrap_err();
        assert_eq!(err.code, "IdempotentParameterMismatch");
        // With its own token it goes through.
        fallback.client_token = "r-1.1".to_owned();
        cloud.launch(&fallback).await.unwrap();
        // The first request, repeated once capacity is back, is tried again.
        refill().await;
        cloud.set_capacity("c6i.large", Some("subnet-a"), Market::Spot, None);
        cloud.launch(&request("r-1")).await.unwrap();
        assert_eq!(cloud.live_count(None), 2);
        // Throttled calls are not remembered.
        let mut throttled = request("r-2");
        refill().await;
        for _ in 0..5 {
            let _ = cloud.launch(&request("filler")).await;
        }
        throttled.subnet_id = Some("subnet-b".to_owned());
        assert_eq!(
            cloud.launch(&throttled).await.unwrap_err().code,
            "RequestLimitExceeded"
        );
        refill().await;
        cloud.launch(&request("r-2")).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_runs_out_per_type_subnet_and_market() {
        let cloud = FakeCloud::new();
        cloud.set_capacity("c6i.large", Some("subnet-a"), Market::Spot, Some(1));

        cloud.launch(&request("r-1")).await.unwrap();
        let err = cloud.launch(&request("r-2")).await.unwrap_err();
        assert_eq!(err.code, "InsufficientInstanceCapacity");
        assert_eq!(err.kind, CloudErrorKind::Capacity);

        // Any other combination still has room (the fallback of r-2 uses
        // its own token: the first is remembered with subnet-a).
        let mut other_subnet = request("r-2");
        other_subnet.client_token = "r-2.1".to_owned();
        other_subnet.subnet_id = Some("subnet-b".to_owned());
        cloud.launch(&other_subnet).await.unwrap();
        let mut other_type = request("r-3");
        other_type.instance_type = "c6a.large".to_owned();
        cloud.launch(&other_type).await.unwrap();
        let mut on_demand = request("r-4");
        on_demand.market = Market::OnDemand;
        cloud.launch(&on_demand).await.unwrap();

        refill().await;
        cloud.set_capacity("c6i.large", Some("subnet-a"), Market::OnDemand, Some(0));
        let mut on_demand = request("r-5");
        on_demand.market = Market::OnDemand;
        let err = cloud.launch(&on_demand).await.unwrap_err();
        assert_eq!(err.code, "InsufficientInstanceCapacity");

        cloud.set_capacity("c6i.large", Some("subnet-a"), Market::Spot, None);
        cloud.launch(&request("r-6")).await.unwrap();

        let outcomes: Vec<_> = cloud
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                CloudCall::Launch {
                    runner_name,
                    outcome,
                    ..
                } => Some((runner_name, outcome.is_ok())),
                CloudCall::Terminate { .. } | CloudCall::Tag { .. } => None,
            })
            .collect();
        let expected = [
            ("r-1", true),
            ("r-2", false),
            ("r-2", true),
            ("r-3", true),
            ("r-4", true),
            ("r-5", false),
            ("r-6", true),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, ok)| ((*n).to_owned(), *ok))
            .collect();
        assert_eq!(outcomes, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn injected_failures_are_used_one_per_launch() {
        let cloud = FakeCloud::new();
        cloud.fail_next("InternalError");
        cloud.fail_next("InvalidAMIID.NotFound");
        let err = cloud.launch(&request("r-1")).await.unwrap_err();
        assert_eq!(err.kind, CloudErrorKind::Transient);
        let err = cloud.launch(&request("r-1")).await.unwrap_err();
        assert_eq!(err.kind, CloudErrorKind::Invalid);
        cloud.launch(&request("r-1")).await.unwrap();
    }

    fn filtered(pattern: &str) -> LaunchRequest {
        let mut r = request("r-1");
        r.image = ImageSource::Filter(spot_runners_domain::ImageFilter::parse(pattern).unwrap());
        r
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_filter_launches_the_newest_available_match() {
        let cloud = FakeCloud::new();
        let day = |d: u32| Utc.with_ymd_and_hms(2026, 11, d, 12, 0, 0).unwrap();
        let old = cloud.register_image(FAKE_ACCOUNT, "kani-runner-2.334.0-20261101", day(1));
        let newest = cloud.register_image(FAKE_ACCOUNT, "kani-runner-2.334.0-20261120", day(20));
        let middle = cloud.register_image(FAKE_ACCOUNT, "kani-runner-2.334.0-20261110", day(10));
        // Newer, but another owner's or another name's.
        cloud.register_image("210987654321", "kani-runner-2.334.0-20261125", day(25));
        cloud.register_image(FAKE_ACCOUNT, "bench-runner-20261126", day(26));

        let launched = cloud.launch(&filtered("self/kani-runner-*")).await.unwrap();
        let fake = &cloud.instances()[0];
        assert_eq!(fake.instance.id, launched.id);
        assert_eq!(fake.image_id, newest);
        assert_ne!(fake.image_id, old);

        // The newest one is deregistered: the next-newest wins.
        cloud.deregister_image(&newest);
        let mut next = filtered("self/kani-runner-*");
        next.client_token = "r-2".into();
        next.runner_name = "r-2".into();
        cloud.launch(&next).await.unwrap();
        assert_eq!(cloud.instances()[1].image_id, middle);
        // The first token now resolves to another AMI: EC2 sees other
        // parameters under the same token.
        let err = cloud
            .launch(&filtered("self/kani-runner-*"))
            .await
            .unwrap_err();
        assert_eq!(err.code, "IdempotentParameterMismatch");
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_filter_without_a_match_is_an_invalid_request() {
        let cloud = FakeCloud::new();
        cloud.register_image("210987654321", "kani-runner-1", Utc::now());
        let err = cloud
            .launch(&filtered("self/kani-runner-*"))
            .await
            .unwrap_err();
        assert_eq!(err.code, spot_runners_domain::ports::IMAGE_FILTER_NO_MATCH);
        assert_eq!(err.kind, CloudErrorKind::Invalid);
        assert!(
            err.message.contains("self/kani-runner-*"),
            "{}",
            err.message
        );
        assert_eq!(cloud.live_count(None), 0);
        match &cloud.calls()[0] {
            CloudCall::Launch { outcome, .. } => {
                assert_eq!(outcome, &Err("ImageFilterNoMatch".to_owned()));
            }
            other => panic!("unexpected call {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn threads_per_core_reaches_the_instance_and_bare_metal_refuses_it() {
        let cloud = FakeCloud::new();
        let mut smt_off = request("r-1");
        smt_off.threads_per_core = Some(1);
        cloud.launch(&smt_off).await.unwrap();
        assert_eq!(cloud.instances()[0].request.threads_per_core, Some(1));

        let mut metal = request("r-2");
        metal.instance_type = "c6i.metal".into();
        cloud.launch(&metal).await.unwrap();
        metal.threads_per_core = Some(1);
        metal.client_token = "r-2.1".into();
        let err = cloud.launch(&metal).await.unwrap_err();
        assert_eq!(err.code, "InvalidParameterCombination");
        assert!(err.kind.is_invalid_request());
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_user_data_is_refused() {
        let cloud = FakeCloud::new();
        let mut big = request("r-1");
        big.user_data = "x".repeat(MAX_USER_DATA_BYTES + 1);
        let err = cloud.launch(&big).await.unwrap_err();
        assert_eq!(err.code, "InvalidParameterValue");
    }

    #[tokio::test(start_paused = true)]
    async fn instances_run_after_their_boot_time() {
        let cloud = FakeCloud::new();
        let launched = cloud.launch(&request("r-1")).await.unwrap();
        assert_eq!(launched.state, InstanceState::Pending);
        assert!(launched.launched_at.is_some());
        assert_eq!(launched.runner_name.as_deref(), Some("r-1"));
        assert_eq!(launched.profile.as_deref(), Some("linux"));

        tokio::time::advance(Duration::from_secs(29)).await;
        let listed = cloud.list_owned("ctl").await.unwrap();
        assert_eq!(listed[0].state, InstanceState::Pending);
        tokio::time::advance(Duration::from_secs(1)).await;
        let listed = cloud.list_owned("ctl").await.unwrap();
        assert_eq!(listed[0].state, InstanceState::Running);
        assert_eq!(listed[0].launched_at, launched.launched_at);

        cloud.set_boot_time(Duration::from_secs(5));
        let quick = cloud.launch(&request("r-2")).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let quick = cloud.instance(&quick.id).unwrap();
        assert_eq!(quick.state, InstanceState::Running);
        // The wall-clock launch time follows tokio's clock.
        let gap = quick.launched_at.unwrap() - launched.launched_at.unwrap();
        assert_eq!(gap, TimeDelta::seconds(30));
    }

    #[tokio::test(start_paused = true)]
    async fn list_owned_keeps_to_its_controller_and_forgets_after_an_hour() {
        let cloud = FakeCloud::new();
        let mine = cloud.launch(&request("r-1")).await.unwrap();
        let mut theirs = request("other-1");
        theirs.controller_id = "other".to_owned();
        cloud.launch(&theirs).await.unwrap();

        let listed = cloud.list_owned("ctl").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, mine.id);

        cloud
            .terminate(std::slice::from_ref(&mine.id))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3599)).await;
        let listed = cloud.list_owned("ctl").await.unwrap();
        assert_eq!(listed[0].state, InstanceState::Terminated);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cloud.list_owned("ctl").await.unwrap().is_empty());
        assert_eq!(cloud.instances().len(), 2);

        cloud.fail_next_list("InternalError");
        assert!(cloud.list_owned("ctl").await.is_err());
        assert!(cloud.list_owned("ctl").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn spot_reclaim_and_self_shutdown_carry_ec2_reasons() {
        let cloud = FakeCloud::new();
        let spot = cloud.launch(&request("r-1")).await.unwrap();
        let mut od = request("r-2");
        od.market = Market::OnDemand;
        let od = cloud.launch(&od).await.unwrap();

        assert!(!cloud.interrupt(&od.id), "EC2 does not reclaim on-demand");
        assert!(cloud.interrupt(&spot.id));
        assert!(!cloud.interrupt(&spot.id));
        let spot = cloud.instance(&spot.id).unwrap();
        assert_eq!(spot.state, InstanceState::Terminated);
        assert_eq!(spot.state_reason.as_deref(), Some(REASON_SPOT_RECLAIMED));

        assert!(cloud.shutdown_from_inside(&od.id));
        let od = cloud.instance(&od.id).unwrap();
        assert_eq!(od.state, InstanceState::Terminated);
        assert_eq!(
            od.state_reason.as_deref(),
            Some(REASON_SHUTDOWN_FROM_INSIDE)
        );
        assert_eq!(cloud.live_count(None), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn every_instance_of_a_subnet_is_in_that_subnets_az() {
        let cloud = FakeCloud::new();
        let mut azs = std::collections::BTreeMap::new();
        for (i, subnet) in ["subnet-a", "subnet-b", "subnet-a", "subnet-c"]
            .iter()
            .enumerate()
        {
            let mut r = request(&format!("r-{i}"));
            r.subnet_id = Some((*subnet).to_owned());
            let launched = cloud.launch(&r).await.unwrap();
            let az = launched.availability_zone.clone().unwrap();
            assert!(FAKE_AZS.contains(&az.as_str()), "{az}");
            assert_eq!(
                cloud.instance(&launched.id).unwrap().availability_zone,
                Some(az.clone())
            );
            assert_eq!(*azs.entry(*subnet).or_insert(az.clone()), az, "{subnet}");
        }
        let mut r = request("r-default");
        r.subnet_id = None;
        let default = cloud.launch(&r).await.unwrap();
        assert_eq!(default.availability_zone.as_deref(), Some(FAKE_AZS[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_live_remembers_the_most_at_once() {
        let cloud = FakeCloud::new();
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(cloud.launch(&request(&format!("r-{i}"))).await.unwrap().id);
        }
        let mut other = request("w-1");
        other.profile = "windows".to_owned();
        cloud.launch(&other).await.unwrap();

        cloud.terminate(&ids[..2]).await.unwrap();
        refill().await;
        cloud.launch(&request("r-3")).await.unwrap();

        assert_eq!(cloud.live_count(Some("linux")), 2);
        assert_eq!(cloud.peak_live("linux"), 3);
        assert_eq!(cloud.peak_live("windows"), 1);
        assert_eq!(cloud.peak_live("none"), 0);
        assert_eq!(cloud.peak_live_total(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_is_idempotent_and_metered() {
        let cloud = FakeCloud::new();
        let a = cloud.launch(&request("r-1")).await.unwrap();
        let ids = vec![a.id.clone(), "i-00000000000000000".to_owned()];
        cloud.terminate(&ids).await.unwrap();
        let first = cloud.instances()[0].terminated_at;
        assert!(first.is_some());

        tokio::time::advance(Duration::from_secs(1)).await;
        cloud.terminate(&ids).await.unwrap();
        let after = &cloud.instances()[0];
        assert_eq!(
            after.terminated_at, first,
            "a second terminate changes nothing"
        );
        assert_eq!(
            after.instance.state_reason.as_deref(),
            Some(REASON_USER_TERMINATED)
        );
        assert_eq!(cloud.live_count(None), 0);

        cloud.fail_next_terminate("InternalError");
        assert!(cloud.terminate(&ids).await.is_err());

        // The bucket holds 100 calls; the 101st at the same instant waits.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..100 {
            cloud.terminate(&ids).await.unwrap();
        }
        let err = cloud.terminate(&ids).await.unwrap_err();
        assert_eq!(err.kind, CloudErrorKind::Throttled);
        assert_eq!(cloud.throttled_count(), 1);
        let terminations = cloud
            .calls()
            .iter()
            .filter(|c| matches!(c, CloudCall::Terminate { .. }))
            .count();
        assert_eq!(terminations, 102);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_every_call() {
        let cloud = FakeCloud::new();
        cloud.set_latency(Duration::from_secs(2));
        let start = crate::now();
        cloud.launch(&request("r-1")).await.unwrap();
        cloud.list_owned("ctl").await.unwrap();
        assert_eq!(crate::now() - start, Duration::from_secs(4));
        match &cloud.calls()[0] {
            CloudCall::Launch { at, .. } => assert_eq!(*at - start, Duration::from_secs(2)),
            other => panic!("unexpected call {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_clouds_draw_the_same_ids() {
        let a = FakeCloud::with_seed(7);
        let b = FakeCloud::with_seed(7);
        let x = a.launch(&request("r-1")).await.unwrap();
        let y = b.launch(&request("r-1")).await.unwrap();
        assert_eq!(x.id, y.id);
    }
}
