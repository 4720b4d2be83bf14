//! Shared helpers for Fleet's benchmarks.

use std::time::Duration;

/// Formats a rate per second.
pub fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// A throwaway database with `servers` active servers registered straight in SQL, and a store
/// on it whose clock starts at `at`, with the partitions made.
pub async fn fleet_db(
    servers: i64,
    at: time::OffsetDateTime,
) -> (
    fleet_pg::testing::TestDb,
    fleet_pg::PgStore,
    std::sync::Arc<fleet_core::testing::ManualClock>,
) {
    let db = fleet_pg::testing::TestDb::create().await;
    let clock = std::sync::Arc::new(fleet_core::testing::ManualClock::new(at));
    let store = db.store(clock.clone()).await;
    store.ensure_partitions().await.expect("partitions");
    store
        .pool()
        .get()
        .await
        .expect("connection")
        .execute(
            "INSERT INTO managed_servers (id, name, api_url, status)
             SELECT gen_random_uuid(), 'bench-' || i, 'http://127.0.0.1:9/' || i, 'active'
             FROM generate_series(1, $1::int8) i",
            &[&servers],
        )
        .await
        .expect("servers");
    (db, store, clock)
}
