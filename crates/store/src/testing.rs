//! Test support: a fresh, migrated database per test on a real PostgreSQL.
//!
//! With `SPOT_RUNNERS_TEST_DATABASE_URL` or `DATABASE_URL` set (it must name a
//! role that may create databases),
//! databases are created there. Otherwise a throwaway cluster is started from
//! the machine's PostgreSQL binaries under the system temp directory and
//! shared by every test process (nextest runs each test in its own); it keeps
//! running for the next run, and `scripts/test` stops it.

use std::path::PathBuf;

use sqlx::Connection;

use crate::embedded::{EmbeddedOptions, EmbeddedPostgres};
use crate::{PgError, PgStore};

/// A database made for one test.
pub struct TestDatabase {
    pub store: PgStore,
    /// URL of this test's database (holds credentials).
    pub url: String,
    /// URL of the server's maintenance database.
    pub admin_url: String,
}

/// Where the shared test cluster lives.
pub fn shared_cluster_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "spot-runners-test-pg-{}",
        nix::unistd::Uid::effective()
    ))
}

async fn admin_url() -> Result<String, PgError> {
    for var in ["SPOT_RUNNERS_TEST_DATABASE_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var) {
            if !url.trim().is_empty() {
                return Ok(url);
            }
        }
    }
    let dir = shared_cluster_dir();
    std::fs::create_dir_all(&dir).map_err(PgError::io(format!("creating {}", dir.display())))?;
    // Only one process may initialise or start the cluster; the rest wait and
    // then adopt it.
    let lock_path = dir.join("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(PgError::io(format!("opening {}", lock_path.display())))?;
    let lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| PgError::Embedded(format!("locking the test cluster: {e}")))
    })
    .await
    .map_err(|e| PgError::Embedded(e.to_string()))??;
    let pg = EmbeddedPostgres::start(
        &dir,
        &EmbeddedOptions {
            unsafe_no_fsync: true,
            ..EmbeddedOptions::default()
        },
    )
    .await;
    drop(lock);
    Ok(pg?.detach())
}

/// A new empty database with every migration applied.
pub async fn test_database() -> Result<TestDatabase, PgError> {
    let admin_url = admin_url().await?;
    let name = format!(
        "test_{}_{:x}",
        chrono::Utc::now().format("%Y%m%d%H%M%S"),
        rand_suffix()
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    drop_stale_databases(&mut admin).await;
    admin.close().await?;
    let url = replace_database(&admin_url, &name);
    let store = PgStore::connect(&url).await?;
    store.migrate().await?;
    Ok(TestDatabase {
        store,
        url,
        admin_url,
    })
}

/// Test databases outlive their test (each test is its own process, and an
/// async drop cannot run at exit), so every new one removes those of earlier
/// runs: one per test would fill the disk of a machine that runs the suite
/// often. Only names this harness makes, older than an hour, go; a failure
/// only leaves them for the next test.
async fn drop_stale_databases(admin: &mut sqlx::PgConnection) {
    let cutoff = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("test_%Y%m%d%H%M%S")
        .to_string();
    let stale: Vec<String> = match sqlx::query_scalar(
        "SELECT datname FROM pg_database
         WHERE datname ~ '^test_[0-9]{14}_[0-9a-f]+$' AND datname < $1
         ORDER BY datname LIMIT 50",
    )
    .bind(&cutoff)
    .fetch_all(&mut *admin)
    .await
    {
        Ok(names) => names,
        Err(_) => return,
    };
    for name in stale {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut *admin)
            .await;
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The same server URL with another database name.
pub fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// Writes an `instance_profiles` row as an operator would.
pub async fn insert_profile(
    store: &PgStore,
    row: &spot_runners_domain::profile::ProfileRow,
) -> Result<(), PgError> {
    sqlx::query(
        "INSERT INTO instance_profiles (name, labels, instance_types, image_id, subnet_ids,
             security_group_ids, iam_instance_profile, market, on_demand_fallback, max_instances,
             min_idle, idle_timeout_secs, boot_timeout_secs, max_lifetime_secs, runner_group_id,
             root_volume_gb, repositories, enabled, priority)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
    )
    .bind(&row.name)
    .bind(&row.labels)
    .bind(&row.instance_types)
    .bind(&row.image_id)
    .bind(&row.subnet_ids)
    .bind(&row.security_group_ids)
    .bind(&row.iam_instance_profile)
    .bind(&row.market)
    .bind(row.on_demand_fallback)
    .bind(row.max_instances)
    .bind(row.min_idle)
    .bind(row.idle_timeout_secs)
    .bind(row.boot_timeout_secs)
    .bind(row.max_lifetime_secs)
    .bind(row.runner_group_id)
    .bind(row.root_volume_gb)
    .bind(&row.repositories)
    .bind(row.enabled)
    .bind(row.priority)
    .execute(store.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            replace_database("postgres://u:p@h:5/db?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@h", "t1"),
            "postgres://u@h/t1"
        );
    }
}
