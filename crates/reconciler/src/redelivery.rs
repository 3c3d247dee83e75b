//! Heals webhooks this service failed to take (a 503 while the database was
//! down, a timeout) by asking GitHub to send them again — one API call per
//! lost delivery, instead of polling repositories for the jobs it carried.
//!
//! The leader only (`Store::try_lead`), every [`EVERY`]: list the hook's
//! recent delivery attempts, pick the GUIDs that failed every attempt and
//! that the ledger does not hold ([`redelivery::to_redeliver`]), and ask
//! for each once. The redelivery keeps its GUID, so the ledger's
//! de-duplication still holds if GitHub ends up sending it twice.
//!
//! Each scan that reads the log records it in the shared [`Healing`], which
//! tells the lost-`queued` poll that failed deliveries are taken care of.
//! It lives in the reconciler crate so that the simulator and the API
//! budget benchmark run the same scan as `serve`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use spot_runners_domain::clock::Clock;
use spot_runners_domain::ports::{GitHub, GitHubError, WebhookSource};
use spot_runners_domain::redelivery::{self, Healing};
use spot_runners_domain::store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::MetricsSink;

/// How often the leader looks.
pub const EVERY: Duration = redelivery::SCAN_EVERY;
/// How far back the first scan after a start looks.
const FIRST_LOOK_BACK: TimeDelta = TimeDelta::hours(1);
/// Each scan overlaps the previous one by this much, for attempts GitHub
/// logs a little late.
const OVERLAP: TimeDelta = TimeDelta::minutes(2);

/// Why a scan did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading or writing the ledger: {0}")]
    Store(#[from] StoreError),
    #[error("listing the hook's deliveries: {0}")]
    GitHub(#[from] GitHubError),
}

/// What one scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Delivery attempts listed.
    pub listed: usize,
    /// Redeliveries GitHub accepted.
    pub requested: usize,
    /// Redeliveries GitHub refused or that could not be asked for.
    pub failed: usize,
}

#[derive(Default)]
struct ScanState {
    /// Where the next listing starts; `None` before the first scan.
    since: Option<DateTime<Utc>>,
    /// GUIDs asked for, and when: never asked for twice.
    asked: HashMap<String, DateTime<Utc>>,
}

pub struct Redeliverer {
    store: Arc<dyn Store>,
    github: Arc<dyn GitHub>,
    source: WebhookSource,
    clock: Arc<dyn Clock>,
    metrics: Arc<dyn MetricsSink>,
    controller_id: String,
    healing: Arc<Healing>,
    state: tokio::sync::Mutex<ScanState>,
}

impl Redeliverer {
    pub fn new(
        store: Arc<dyn Store>,
        github: Arc<dyn GitHub>,
        source: WebhookSource,
        clock: Arc<dyn Clock>,
        metrics: Arc<dyn MetricsSink>,
        controller_id: String,
        healing: Arc<Healing>,
    ) -> Self {
        Self {
            store,
            github,
            source,
            clock,
            metrics,
            controller_id,
            healing,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// One scan, if this replica leads; `None` when another one does.
    pub async fn scan_if_leader(&self) -> Result<Option<ScanReport>, ScanError> {
        if !self.store.try_lead(&self.controller_id).await? {
            return Ok(None);
        }
        self.scan().await.map(Some)
    }

    /// Lists the recent attempts and asks for every lost delivery once.
    pub async fn scan(&self) -> Result<ScanReport, ScanError> {
        let mut state = self.state.lock().await;
        let now = self.clock.now();
        let since = state.since.unwrap_or(now - FIRST_LOOK_BACK);
        let log = self.github.hook_deliveries(&self.source, since).await?;
        // The log was read: what failed is in it, and asked for below (or
        // on the next scan, if GitHub refuses now).
        self.healing.scanned(now);
        let failed_guids: Vec<String> = log
            .iter()
            .filter(|d| !d.succeeded())
            .map(|d| d.guid.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let held = if failed_guids.is_empty() {
            BTreeSet::new()
        } else {
            self.store.known_deliveries(&failed_guids).await?
        };
        let asked: HashSet<String> = state.asked.keys().cloned().collect();
        let due = redelivery::to_redeliver(&log, &held, &asked);

        let mut report = ScanReport {
            listed: log.len(),
            ..ScanReport::default()
        };
        for attempt in due {
            match self.github.redeliver(&self.source, attempt.id).await {
                Ok(()) => {
                    state.asked.insert(attempt.guid.clone(), now);
                    report.requested += 1;
                    self.metrics.redelivered("requested");
                    tracing::info!(
                        guid = %attempt.guid,
                        event = %attempt.event,
                        status_code = attempt.status_code,
                        delivered_at = %attempt.delivered_at,
                        "asked GitHub to redeliver a failed webhook"
                    );
                }
                Err(e) => {
                    report.failed += 1;
                    self.metrics.redelivered("failed");
                    tracing::warn!(guid = %attempt.guid, error = %e, "redelivery request failed; retried next scan");
                    if matches!(e, GitHubError::RateLimited(_)) {
                        break;
                    }
                }
            }
        }
        // A delivery still owed keeps the window where it was, so the next
        // scan sees it again.
        if report.failed == 0 {
            state.since = Some(now - OVERLAP);
        } else {
            state.since = Some(since);
        }
        let horizon = state.since.unwrap_or(since) - OVERLAP;
        state.asked.retain(|_, at| *at >= horizon);
        Ok(report)
    }

    /// Scans every `every` until `stop`.
    pub async fn run(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.scan_if_leader().await {
                Ok(Some(r)) if r.requested + r.failed > 0 => tracing::info!(
                    listed = r.listed,
                    requested = r.requested,
                    failed = r.failed,
                    source = %self.source,
                    "webhook redelivery scan"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, source = %self.source, "webhook redelivery scan failed")
                }
            }
        }
    }
}
