//! The last listing per scope, page by page, for conditional requests.

use std::collections::HashMap;
use std::sync::Mutex;

use http::HeaderValue;
use spot_runners_domain::ports::GitHubRunner;

/// One page as GitHub last sent it.
#[derive(Clone, Debug)]
pub(crate) struct CachedPage {
    /// Sent back as `If-None-Match`; a page without one is never asked
    /// about conditionally.
    pub(crate) etag: Option<HeaderValue>,
    pub(crate) total_count: usize,
    pub(crate) runners: Vec<GitHubRunner>,
}

#[derive(Default)]
pub(crate) struct ListingCache(Mutex<HashMap<String, Vec<CachedPage>>>);

impl ListingCache {
    /// Page `page` (from 1) of the scope's last complete listing.
    pub(crate) fn page(&self, scope: &str, page: u32) -> Option<CachedPage> {
        let index = usize::try_from(page).ok()?.checked_sub(1)?;
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(scope)?.get(index).cloned()
    }

    /// Keeps a complete listing; pages past its end are forgotten with the
    /// previous one.
    pub(crate) fn replace(&self, scope: String, pages: Vec<CachedPage>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(scope, pages);
    }
}
