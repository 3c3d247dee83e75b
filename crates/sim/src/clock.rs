//! A clock tests move forward: the system's time plus whatever the test
//! has advanced it by. Timestamps the database writes with `now()` stay
//! comparable with it, so a test can make a runner ten minutes old
//! without waiting ten minutes.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use spot_runners_domain::clock::Clock;

#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    offset: Arc<Mutex<Duration>>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = Duration::from_std(by).unwrap_or(Duration::MAX);
        let mut offset = crate::lock(&self.offset);
        *offset += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + *crate::lock(&self.offset)
    }
}
