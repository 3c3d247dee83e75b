//! Warm pools and orphan sweeps from the first pass: the service knows
//! where it may register runners from the App's installations and from
//! `SPOT_RUNNERS_GITHUB_ORGS`, not only from jobs that matched a profile.
//! On the fake cloud and fake GitHub, against a real PostgreSQL.

mod common;

use common::fleet::Harness;
use spot_runners_domain::ports::{GitHub, Installation, JitRequest, RunnerScope};
use spot_runners_domain::scopes::KnownScopes;

fn acme() -> RunnerScope {
    RunnerScope::Org("acme".into())
}

async fn booting_in(h: &Harness) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT state, org FROM runners ORDER BY name")
        .fetch_all(h.store.pool())
        .await
        .unwrap()
}

/// `min_idle = 2` and no job ever seen: the App is installed in acme, so
/// the first pass launches two warm runners there.
#[tokio::test]
async fn a_warm_pool_is_filled_on_the_first_pass_from_the_apps_installations() {
    let h = Harness::new().await;
    h.profile("kani", "min_idle = 2").await;
    h.github.set_installations(vec![
        Installation {
            id: 7,
            account: "acme".into(),
            account_type: "Organization".into(),
        },
        Installation {
            id: 8,
            account: "octocat".into(),
            account_type: "User".into(),
        },
    ]);
    let r = h.reconciler(100);
    h.reconcile(&r).await;

    let booting = ("booting".to_owned(), Some("acme".to_owned()));
    assert_eq!(booting_in(&h).await, [booting.clone(), booting]);
    assert_eq!(h.cloud.live_count(Some("kani")), 2);
    let scopes: Vec<RunnerScope> = h.github.runners().into_iter().map(|g| g.scope).collect();
    assert_eq!(scopes, [acme(), acme()]);
    // The pool is full: the next pass adds nothing.
    h.reconcile(&r).await;
    assert_eq!(h.cloud.live_count(Some("kani")), 2);
}

/// Token auth has no installations to list: the configured orgs
/// (`SPOT_RUNNERS_GITHUB_ORGS`) are where the pool goes.
#[tokio::test]
async fn a_warm_pool_is_filled_on_the_first_pass_from_the_configured_orgs() {
    let h = Harness::new().await;
    h.profile("kani", "min_idle = 2").await;
    let r = h.reconciler_with(100, |r| r.with_scopes(KnownScopes::new([acme()])));
    h.reconcile(&r).await;
    assert_eq!(h.cloud.live_count(Some("kani")), 2);
    assert!(h.github.runners().iter().all(|g| g.scope == acme()));
}

/// A registration named like ours, left in an org no job of ours has run
/// in (say, by a previous deployment's crash): the first sweep deletes it.
#[tokio::test]
async fn a_leftover_registration_is_deleted_with_no_job_ever_seen() {
    let h = Harness::new().await;
    h.profile("kani", "min_idle = 0").await;
    let leftover = h
        .github
        .generate_jit_config(
            &acme(),
            &JitRequest {
                name: "spot-runners-kani-abcd1234".into(),
                runner_group_id: 1,
                labels: vec![],
            },
        )
        .await
        .unwrap();
    // Someone else's runner in the same org stays.
    h.github
        .generate_jit_config(
            &acme(),
            &JitRequest {
                name: "my-laptop".into(),
                runner_group_id: 1,
                labels: vec![],
            },
        )
        .await
        .unwrap();
    let r = h.reconciler_with(100, |r| r.with_scopes(KnownScopes::new([acme()])));
    let sweep = r.sweep().await.unwrap().expect("the only replica leads");
    assert_eq!(sweep.orphan_registrations, 1);
    let left: Vec<String> = h.github.runners().into_iter().map(|g| g.name).collect();
    assert_eq!(left, ["my-laptop"]);
    assert!(!h
        .github
        .runners()
        .iter()
        .any(|g| g.id == leftover.runner_id));
    assert!(booting_in(&h).await.is_empty(), "nothing launched");
}
