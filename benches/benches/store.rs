//! PostgreSQL writes through `PgStore`: results per second at batch sizes 1 (one round trip per
//! row, the baseline), 10, 100 and 1,000, against a raw `UNNEST` insert-plus-update of the same
//! rows; then bytes on disk per health row, per metrics row and per server-day.
//!
//! `scripts/bench-store` (starts a throwaway PostgreSQL), or with `DATABASE_URL` set:
//! `cargo bench -p fleet-benches --bench store`

use std::sync::Arc;
use std::time::Instant;

use fleet_benches::per_second;
use fleet_core::conformance::sample_at;
use fleet_core::{HealthCheck, HealthStatus, MetricsRecord, ServerId, Store, SystemClock};
use fleet_pg::PgStore;
use fleet_pg::testing::TestDb;
use time::OffsetDateTime;

const SERVERS: usize = 10_000;

fn checks(ids: &[ServerId], n: usize, base: OffsetDateTime) -> Vec<HealthCheck> {
    (0..n)
        .map(|i| {
            let id = ids[i % ids.len()];
            let round = (i / ids.len()) as i64;
            let degraded = i % 20 == 0;
            HealthCheck {
                fence: None,
                server_id: id,
                timestamp: base + time::Duration::seconds(30 * round),
                status: if degraded {
                    HealthStatus::Degraded
                } else {
                    HealthStatus::Healthy
                },
                response_time_ms: Some(3 + (i % 40) as u32),
                database_healthy: Some(true),
                redis_healthy: Some(true),
                services_healthy: Some(!degraded),
                error_message: degraded
                    .then(|| "unhealthy: services (unhealthy), worker (degraded)".to_owned()),
                error_details: degraded
                    .then(|| serde_json::json!({"services": "unhealthy", "worker": "degraded"})),
                responded: true,
                successful: true,
            }
        })
        .collect()
}

async fn exec(store: &PgStore, sql: &str) {
    store
        .pool()
        .get()
        .await
        .expect("connection")
        .batch_execute(sql)
        .await
        .expect("statement");
}

async fn scalar(store: &PgStore, sql: &str) -> i64 {
    store
        .pool()
        .get()
        .await
        .expect("connection")
        .query_one(sql, &[])
        .await
        .expect("query")
        .get(0)
}

async fn truncate(store: &PgStore) {
    exec(store, "TRUNCATE server_health_checks; UPDATE managed_servers SET health_status = NULL, last_health_check_at = NULL, last_seen_at = NULL").await;
}

async fn write(store: &PgStore, rows: &[HealthCheck], batch: usize) -> f64 {
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        store.record_health(chunk).await.expect("record_health");
    }
    per_second(rows.len(), started.elapsed())
}

/// The same rows written with two raw statements per batch: the ceiling PgStore is held to.
async fn raw(store: &PgStore, rows: &[HealthCheck], batch: usize) -> f64 {
    let client = store.pool().get().await.expect("connection");
    let insert = client
        .prepare(
            "INSERT INTO server_health_checks (server_id, timestamp, status, response_time_ms, database_healthy, \
             redis_healthy, services_healthy, successful, error_message, error_details) \
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::int4[], $5::bool[], $6::bool[], \
             $7::bool[], $8::bool[], $9::text[], $10::jsonb[]) ON CONFLICT DO NOTHING",
        )
        .await
        .expect("prepare");
    let update = client
        .prepare(
            "UPDATE managed_servers m SET health_status = u.status, last_health_check_at = u.ts, last_seen_at = u.ts \
             FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS u(id, ts, status) WHERE m.id = u.id",
        )
        .await
        .expect("prepare");
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        let ids: Vec<uuid::Uuid> = chunk.iter().map(|c| c.server_id.0).collect();
        let ts: Vec<OffsetDateTime> = chunk.iter().map(|c| c.timestamp).collect();
        let status: Vec<&str> = chunk.iter().map(|c| c.status.as_str()).collect();
        let rt: Vec<Option<i32>> = chunk
            .iter()
            .map(|c| c.response_time_ms.map(|v| v as i32))
            .collect();
        let db: Vec<Option<bool>> = chunk.iter().map(|c| c.database_healthy).collect();
        let redis: Vec<Option<bool>> = chunk.iter().map(|c| c.redis_healthy).collect();
        let svc: Vec<Option<bool>> = chunk.iter().map(|c| c.services_healthy).collect();
        let ok: Vec<bool> = chunk.iter().map(|c| c.successful).collect();
        let msg: Vec<Option<&str>> = chunk.iter().map(|c| c.error_message.as_deref()).collect();
        let details: Vec<Option<&serde_json::Value>> =
            chunk.iter().map(|c| c.error_details.as_ref()).collect();
        client
            .execute(
                &insert,
                &[
                    &ids, &ts, &status, &rt, &db, &redis, &svc, &ok, &msg, &details,
                ],
            )
            .await
            .expect("insert");
        client
            .execute(&update, &[&ids, &ts, &status])
            .await
            .expect("update");
    }
    per_second(rows.len(), started.elapsed())
}

async fn bytes_per_row(store: &PgStore, table: &str) -> f64 {
    exec(store, &format!("VACUUM ANALYZE {table}")).await;
    let size = scalar(
        store,
        &format!(
            "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = '{table}'"
        ),
    )
    .await;
    let rows = scalar(store, &format!("SELECT count(*) FROM {table}")).await;
    size as f64 / rows.max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!(
            "skipped: set DATABASE_URL, or run scripts/bench-store, which starts a throwaway PostgreSQL"
        );
        return;
    };
    let db = TestDb::create_on(&url).await;
    let store = db.store(Arc::new(SystemClock)).await;
    store.ensure_partitions().await.expect("partitions");
    exec(
        &store,
        &format!(
            "INSERT INTO managed_servers (id, name, api_url) \
             SELECT gen_random_uuid(), 'bench-' || g, 'http://127.0.0.1:9' FROM generate_series(1, {SERVERS}) g"
        ),
    )
    .await;
    let client = store.pool().get().await.expect("connection");
    let ids: Vec<ServerId> = client
        .query("SELECT id FROM managed_servers", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| ServerId(r.get(0)))
        .collect();
    drop(client);
    let base = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("whole second")
        - time::Duration::hours(6);

    let mut results = Vec::new();
    for (batch, n) in [
        (1usize, 2_000usize),
        (10, 20_000),
        (100, 50_000),
        (1_000, 100_000),
    ] {
        truncate(&store).await;
        let rows = checks(&ids, n, base);
        let rate = write(&store, &rows, batch).await;
        results.push((batch, n, rate));
    }
    truncate(&store).await;
    let rows = checks(&ids, 100_000, base);
    let raw_rate = raw(&store, &rows, 1_000).await;
    truncate(&store).await;
    let pg_1000 = write(&store, &rows, 1_000).await;

    // Disk: a day of checks for the whole registry is too much here; 100,000 rows show the
    // per-row cost, which is flat.
    let health_bytes = bytes_per_row(&store, "server_health_checks").await;
    let samples: Vec<MetricsRecord> = (0..50_000)
        .map(|i| {
            let mut s = sample_at(
                ids[i % ids.len()],
                base + time::Duration::seconds(60 * (i / ids.len()) as i64),
                12.5,
            );
            s.values.total_services = Some(8);
            s.values.active_services = Some(8);
            s.values.failed_services = Some(0);
            s.values.disk_percent = Some(40.0);
            s.values.network_tx_bytes = Some(1 << 30);
            s.values.active_users = Some(4);
            MetricsRecord::Sample(s)
        })
        .collect();
    let started = Instant::now();
    for chunk in samples.chunks(1_000) {
        store.record_metrics(chunk).await.expect("record_metrics");
    }
    let metrics_rate = per_second(samples.len(), started.elapsed());
    let metrics_bytes = bytes_per_row(&store, "server_metrics_aggregated").await;
    let day = 2_880.0 * health_bytes + 1_440.0 * metrics_bytes;

    println!("| batch | results | health results/s (history + state) |");
    println!("|---:|---:|---:|");
    for (batch, n, rate) in &results {
        let label = if *batch == 1 {
            "1 (one round trip per row)".to_owned()
        } else {
            batch.to_string()
        };
        println!("| {label} | {n} | {rate:.0} |");
    }
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| raw UNNEST insert + UPDATE, batch 1,000 | {raw_rate:.0} results/s |");
    println!("| PgStore, batch 1,000, same rows, same run | {pg_1000:.0} results/s |");
    println!("| PgStore / raw | {:.0}% |", 100.0 * pg_1000 / raw_rate);
    println!("| metrics samples, batch 1,000 | {metrics_rate:.0} samples/s |");
    println!("| bytes per health row (heap + indexes) | {health_bytes:.0} |");
    println!("| bytes per metrics row (heap + indexes) | {metrics_bytes:.0} |");
    println!(
        "| bytes per server-day (2,880 health + 1,440 metrics rows) | {:.2} MB |",
        day / 1e6
    );
}
