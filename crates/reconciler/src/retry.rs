//! Retry and pacing: backoff with seeded jitter, the "at most this often"
//! pacer, waits at the token buckets, and the one path every
//! `TerminateInstances` takes.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use spot_runners_domain::ports::{CloudError, CloudErrorKind};
use spot_runners_domain::ratelimit::TokenBucket;

use crate::Reconciler;

/// Retries of one call on transient errors.
pub const MAX_RETRIES: u32 = 4;
/// Retries of one launch candidate on `RequestLimitExceeded`. EC2's bucket
/// is per account: another replica or tool spending it is no reason to give
/// up, only to wait longer.
pub const MAX_THROTTLED_RETRIES: u32 = 12;
/// Rate-limit waits longer than this are not slept through: the row is
/// released and a later claim tries again.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A lock whose holder panicked is still usable: the data it guards (a
/// bucket, a map of timestamps) is consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// "At most this often", by the injected clock: webhooks wake a pass each,
/// and what need not follow every one of them is paced by one of these.
pub(crate) struct Every {
    period: chrono::Duration,
    last: Mutex<Option<DateTime<Utc>>>,
}

impl Every {
    pub(crate) fn new(period: Duration) -> Self {
        Self {
            period: chrono::Duration::from_std(period).unwrap_or(chrono::Duration::MAX),
            last: Mutex::new(None),
        }
    }

    /// Whether the period has passed since the last time this said yes.
    pub(crate) fn due(&self, now: DateTime<Utc>) -> bool {
        let mut last = lock(&self.last);
        let due = last.is_none_or(|t| now - t >= self.period);
        if due {
            *last = Some(now);
        }
        due
    }
}

impl Reconciler {
    /// Exponential backoff with jitter, from 250 ms, at most 16 s.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let cap = 250u64.saturating_mul(1 << attempt.min(6));
        Duration::from_millis(lock(&self.rng).gen_range(cap / 2..=cap))
    }

    /// Waits for a token. Buckets run on tokio's clock, which the
    /// simulator pauses and moves with everything else.
    pub(crate) async fn pace(bucket: &Mutex<TokenBucket>) {
        let wait = lock(bucket).reserve(tokio::time::Instant::now().into_std());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Every `TerminateInstances` goes through here: retried a few times
    /// with backoff when EC2 throttles it (its bucket is 100, refilled at
    /// 5/s: a wave of completions can empty it). Instances still running
    /// after that are the orphan sweep's to terminate again.
    pub(crate) async fn terminate_now(&self, ids: &[String]) -> Result<(), CloudError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.backends.cloud.terminate(ids).await {
                Err(e)
                    if matches!(
                        e.kind,
                        CloudErrorKind::Throttled | CloudErrorKind::Transient
                    ) && attempt <= MAX_RETRIES =>
                {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                result => return result,
            }
        }
    }
}
