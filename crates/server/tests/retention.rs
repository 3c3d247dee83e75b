//! The leader's sweep keeps the ledger to its retention.

mod common;

use common::fleet::Harness;

#[tokio::test]
async fn the_leaders_sweep_prunes_jobs_past_the_retention() {
    let h = Harness::new().await;
    let r = h.reconciler(100);
    let pool = h.store.pool();
    for (id, days) in [(1_i64, 31), (2, 29)] {
        sqlx::query(
            "INSERT INTO workflow_jobs (id, run_id, repository, owner, org, labels, status, completed_at)
             VALUES ($1, 1, 'acme/proofs', 'acme', 'acme', '{kani}', 'completed',
                     now() - make_interval(days => $2::int))",
        )
        .bind(id)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
    r.sweep().await.unwrap().expect("the only replica leads");
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM workflow_jobs ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(left, [2], "30 days by default");
}
