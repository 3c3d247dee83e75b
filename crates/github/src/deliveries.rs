//! The delivery log of a webhook: paths, pages and cursors.

use chrono::{DateTime, Utc};
use http::HeaderMap;
use spot_runners_domain::ports::{GitHubError, HookDelivery, RunnerScope, WebhookSource};

use crate::scope::Target;
use crate::transport::Reply;

/// `per_page` maximum of the deliveries list.
const PAGE_SIZE: usize = 100;
/// Pages looked at per listing; the newest deliveries come first.
pub(crate) const MAX_PAGES: usize = 20;
/// Cursors are opaque, but GitHub's are short and plain (`v1_12077215967`);
/// anything else is refused rather than put into a path.
const MAX_CURSOR_CHARS: usize = 200;

/// `/app/hook/deliveries` or `/orgs/{org}/hooks/{hook_id}/deliveries`.
pub(crate) fn base_path(source: &WebhookSource) -> Result<String, GitHubError> {
    match source {
        WebhookSource::App => Ok("/app/hook/deliveries".to_owned()),
        WebhookSource::OrgHook { org, hook_id } => {
            let target = Target::from_scope(&RunnerScope::Org(org.clone()))?;
            Ok(format!("{}/hooks/{hook_id}/deliveries", target.prefix()))
        }
    }
}

pub(crate) fn list_path(
    source: &WebhookSource,
    cursor: Option<&str>,
) -> Result<String, GitHubError> {
    let base = base_path(source)?;
    Ok(match cursor {
        Some(c) => format!("{base}?per_page={PAGE_SIZE}&cursor={c}"),
        None => format!("{base}?per_page={PAGE_SIZE}"),
    })
}

pub(crate) fn parse_page(reply: &Reply, endpoint: &str) -> Result<Vec<HookDelivery>, GitHubError> {
    #[derive(serde::Deserialize)]
    struct Delivery {
        id: i64,
        guid: String,
        delivered_at: DateTime<Utc>,
        #[serde(default)]
        redelivery: bool,
        #[serde(default)]
        status_code: Option<u16>,
        event: String,
        action: Option<String>,
    }
    let page: Vec<Delivery> = reply.json(endpoint)?;
    Ok(page
        .into_iter()
        .map(|d| HookDelivery {
            id: d.id,
            guid: d.guid,
            delivered_at: d.delivered_at,
            redelivery: d.redelivery,
            status_code: d.status_code.unwrap_or(0),
            event: d.event,
            action: d.action,
        })
        .collect())
}

/// The `cursor` of the `rel="next"` link, if there is a next page. Only the
/// cursor is taken from the link: the next request is built from the
/// configured API URL like every other.
pub(crate) fn next_cursor(headers: &HeaderMap) -> Result<Option<String>, GitHubError> {
    let Some(link) = headers
        .get(http::header::LINK)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    for part in link.split(',') {
        let mut pieces = part.split(';');
        let url = pieces.next().unwrap_or_default().trim();
        if !pieces.any(|p| p.trim().replace(' ', "") == "rel=\"next\"") {
            continue;
        }
        let url = url.trim_start_matches('<').trim_end_matches('>');
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let cursor = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("cursor="))
            .ok_or_else(|| {
                GitHubError::Transient("webhook deliveries: a next link without a cursor".into())
            })?;
        let plain = cursor.len() <= MAX_CURSOR_CHARS
            && !cursor.is_empty()
            && cursor
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='));
        if !plain {
            return Err(GitHubError::Transient(
                "webhook deliveries: a cursor of unexpected form".into(),
            ));
        }
        return Ok(Some(cursor.to_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::LINK, value.parse().unwrap());
        h
    }

    #[test]
    fn the_next_cursor_is_read_from_the_link_header() {
        let h = link(
            r#"<https://api.github.com/app/hook/deliveries?per_page=100&cursor=v1_12077215967>; rel="next", <https://api.github.com/app/hook/deliveries?per_page=100>; rel="first""#,
        );
        assert_eq!(next_cursor(&h).unwrap().as_deref(), Some("v1_12077215967"));
        let last =
            link(r#"<https://api.github.com/app/hook/deliveries?per_page=100>; rel="first""#);
        assert_eq!(next_cursor(&last).unwrap(), None);
        assert_eq!(next_cursor(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn odd_cursors_are_refused() {
        let h = link(r#"<https://x/app/hook/deliveries?cursor=../../orgs>; rel="next""#);
        assert!(next_cursor(&h).is_err());
    }

    #[test]
    fn paths_check_the_org_name() {
        assert_eq!(
            list_path(&WebhookSource::App, Some("v1_5")).unwrap(),
            "/app/hook/deliveries?per_page=100&cursor=v1_5"
        );
        assert_eq!(
            base_path(&WebhookSource::OrgHook {
                org: "acme".into(),
                hook_id: 7
            })
            .unwrap(),
            "/orgs/acme/hooks/7/deliveries"
        );
        assert!(base_path(&WebhookSource::OrgHook {
            org: "../x".into(),
            hook_id: 7
        })
        .is_err());
    }
}
