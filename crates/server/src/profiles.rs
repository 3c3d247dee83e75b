//! Keeps the live set of instance profiles fresh: reloaded on every change
//! notification from the database, and periodically in case one was missed,
//! so operators' edits apply without a restart. The set itself is the
//! reconciler's ([`ProfileCache`]).

use std::sync::Arc;
use std::time::Duration;

pub use spot_runners_reconciler::{ProfileCache, ProfileSet};
use spot_runners_store::PgStore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Keeps the cache fresh until `stop` fires: reloads on every
/// `instance_profiles` notification and at least every `fallback`.
pub async fn watch(
    cache: ProfileCache,
    store: PgStore,
    metrics: Arc<Metrics>,
    fallback: Duration,
    stop: CancellationToken,
) {
    loop {
        let mut listener = match store.profile_listener().await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for profile changes; polling instead");
                None
            }
        };
        // Reload after (re)subscribing, so nothing between is missed.
        if let Err(e) = cache.reload(&store, metrics.as_ref()).await {
            tracing::warn!(error = %e, "reloading instance profiles failed");
        }
        loop {
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = notified => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "profile listener lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
                _ = tokio::time::sleep(fallback) => {}
            }
            if let Err(e) = cache.reload(&store, metrics.as_ref()).await {
                tracing::warn!(error = %e, "reloading instance profiles failed");
            }
            if listener.is_none() {
                break;
            }
        }
    }
}
