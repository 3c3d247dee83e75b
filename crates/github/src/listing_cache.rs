//! What GitHub last sent for each listing the adapter repeats, with its
//! `ETag`, for conditional requests: an unchanged listing is answered
//! `304 Not Modified`, which GitHub does not charge to the rate limit.

use std::collections::HashMap;
use std::sync::Mutex;

use http::HeaderValue;

/// One response, as far as the adapter keeps it.
#[derive(Clone, Debug)]
pub(crate) struct Cached<T> {
    /// Sent back as `If-None-Match`.
    pub(crate) etag: HeaderValue,
    pub(crate) body: T,
}

/// Responses by request path (query included).
pub(crate) struct ListingCache<T>(Mutex<HashMap<String, Cached<T>>>);

impl<T> Default for ListingCache<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T: Clone> ListingCache<T> {
    pub(crate) fn get(&self, path: &str) -> Option<Cached<T>> {
        self.lock().get(path).cloned()
    }

    /// Keeps `body` for `path`; a response without an `ETag` cannot be
    /// asked about conditionally, so it forgets the path instead.
    pub(crate) fn put(&self, path: String, etag: Option<HeaderValue>, body: T) {
        let mut map = self.lock();
        match etag {
            Some(etag) => {
                map.insert(path, Cached { etag, body });
            }
            None => {
                map.remove(&path);
            }
        }
    }

    /// Forgets the paths under `prefix` that `keep` refuses (listings of
    /// things that no longer exist, such as finished workflow runs).
    pub(crate) fn retain_under(&self, prefix: &str, mut keep: impl FnMut(&str) -> bool) {
        self.lock()
            .retain(|path, _| !path.starts_with(prefix) || keep(path));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached<T>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_without_an_etag_is_not_kept_and_retain_touches_only_its_prefix() {
        let cache = ListingCache::<u32>::default();
        let etag = || Some(HeaderValue::from_static("\"v1\""));
        cache.put("/repos/a/runs/1/jobs".into(), etag(), 1);
        cache.put("/repos/a/runs/2/jobs".into(), etag(), 2);
        cache.put("/repos/b/runs/3/jobs".into(), etag(), 3);
        cache.put("/repos/a/runs/1/jobs".into(), None, 9);
        assert!(cache.get("/repos/a/runs/1/jobs").is_none());
        cache.retain_under("/repos/a/", |_| false);
        assert!(cache.get("/repos/a/runs/2/jobs").is_none());
        assert_eq!(cache.get("/repos/b/runs/3/jobs").map(|c| c.body), Some(3));
    }
}
