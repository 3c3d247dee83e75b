//! The embedded PostgreSQL starts from any checkout, even one the
//! unprivileged user it runs as (when we are root) cannot reach.

use std::os::unix::fs::PermissionsExt;

use spot_runners_store::embedded::{EmbeddedOptions, EmbeddedPostgres};
use sqlx::Connection;

#[tokio::test]
async fn a_data_dir_under_a_closed_parent_still_gets_a_working_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    // tempdir() is private to us; the fallback under it must not be.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Like /root: only its owner may enter.
    let closed = tmp.path().join("home");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let requested = closed.join("checkout").join(".spot-runners");
    let fallback = tmp.path().join("fallback");
    let options = EmbeddedOptions {
        unsafe_no_fsync: true,
        fallback_roots: Some(vec![fallback.clone()]),
    };
    let root = nix::unistd::Uid::effective().is_root();

    let pg = EmbeddedPostgres::start(&requested, &options)
        .await
        .expect("the cluster starts");
    let pgdata = pg.pgdata().to_owned();
    if root {
        assert!(
            pgdata.starts_with(&fallback),
            "moved to a reachable place: {}",
            pgdata.display()
        );
    } else {
        // The cluster runs as us: the requested place is fine.
        assert!(pgdata.starts_with(std::fs::canonicalize(&requested).unwrap()));
    }
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    sqlx::query("CREATE TABLE kept (x int)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    pg.stop().await.unwrap();

    // The same checkout finds the same cluster again.
    let pg = EmbeddedPostgres::start(&requested, &options).await.unwrap();
    assert_eq!(pg.pgdata(), pgdata);
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 0);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
}
