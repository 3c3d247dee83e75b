//! A token bucket: EC2 meters `RunInstances` and `TerminateInstances` this
//! way, GitHub meters JIT configs much the same. The fake cloud enforces it;
//! the launcher paces itself with one of the same size so a burst waits its
//! turn instead of being throttled. Time is passed in, so tests and the
//! simulator drive it with their own clock.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// Full bucket of `capacity`, refilled at `per_sec` tokens a second.
    pub fn new(capacity: u32, per_sec: f64) -> Self {
        Self {
            capacity: f64::from(capacity),
            per_sec,
            tokens: f64::from(capacity),
            last: None,
        }
    }

    /// EC2's documented `RunInstances` resource bucket: 5, refilled at 2/s.
    pub fn ec2_run_instances() -> Self {
        Self::new(5, 2.0)
    }

    /// EC2's documented `TerminateInstances` resource bucket: 100, 5/s.
    pub fn ec2_terminate_instances() -> Self {
        Self::new(100, 5.0)
    }

    /// GitHub's JIT-config allowance: roughly 180 a minute.
    pub fn github_jit_configs() -> Self {
        Self::new(10, 3.0)
    }

    /// No limit at all: for benchmarks and simulations that measure the
    /// service without the cloud's throttling in the way.
    pub fn unlimited() -> Self {
        Self::new(u32::MAX, 1e12)
    }

    /// How a client should pace itself against a server enforcing `self`:
    /// one token less, because calls reach the server a variable time after
    /// they were paced and a token of slack keeps that jitter from ever
    /// costing a throttling error.
    pub fn client_side(&self) -> Self {
        Self::new(
            (self.capacity as u32).saturating_sub(1).max(1),
            self.per_sec,
        )
    }

    fn refill(&mut self, now: Instant) {
        match self.last {
            // Callers racing for a lock may arrive with slightly older
            // readings; time never runs backwards for the bucket.
            Some(last) if now <= last => {}
            Some(last) => {
                let elapsed = (now - last).as_secs_f64();
                self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
                self.last = Some(now);
            }
            None => self.last = Some(now),
        }
    }

    /// Seconds to a whole token, rounded up to the microsecond so a caller
    /// that waits exactly this long is never a rounding error short.
    fn wait_for(&self, deficit: f64) -> Duration {
        let micros = (deficit / self.per_sec * 1e6).ceil();
        Duration::from_micros(micros as u64)
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        // Tolerate float rounding: a caller that waited exactly the time it
        // was told must get its token.
        if self.tokens >= 1.0 - 1e-6 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for(1.0 - self.tokens))
        }
    }

    /// Reserves a token that may not exist yet; returns how long to wait
    /// before using it. Callers that reserve and then wait never overdraw.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            self.wait_for(-self.tokens)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::ec2_run_instances();
        for _ in 0..5 {
            assert!(b.try_take(t0).is_ok());
        }
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.try_take(t0 + Duration::from_millis(499)).is_err());
        assert!(b.try_take(t0 + Duration::from_millis(500)).is_ok());
        // Never more than the capacity, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(b.try_take(later).is_ok());
        }
        assert!(b.try_take(later).is_err());
    }

    /// Reservations spaced as they say are always honoured by an identical
    /// bucket on the other side.
    /// The JIT rate (3/s) has no exact binary fraction; waiting what the
    /// bucket says must still always be enough.
    #[test]
    fn waiting_the_reported_time_always_suffices() {
        let t0 = Instant::now();
        let mut b = TokenBucket::github_jit_configs();
        let mut now = t0;
        for _ in 0..2000 {
            match b.try_take(now) {
                Ok(()) => {}
                Err(wait) => {
                    now += wait;
                    assert!(b.try_take(now).is_ok());
                }
            }
        }
    }

    #[test]
    fn reservations_never_overdraw_an_identical_bucket() {
        let t0 = Instant::now();
        let mut client = TokenBucket::ec2_run_instances();
        let mut server = TokenBucket::ec2_run_instances();
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            let wait = client.reserve(t0);
            assert!(wait >= last);
            last = wait;
            assert!(server.try_take(t0 + wait).is_ok(), "throttled at {wait:?}");
        }
        // 200 calls: 5 at once, 195 more at 2/s.
        assert!((last.as_secs_f64() - 97.5).abs() < 1e-6);
    }
}
