//! History tiers on disk and in reads (docs/benchmarks.md), `scripts/bench-history`:
//! `FLEET_BENCH_SERVERS` servers (default 2,000) with `FLEET_BENCH_DAYS` days (default 2) of
//! raw history at the default intervals (a check every 30 s, a sample every 60 s, a few state
//! changes a day), written straight into a throwaway PostgreSQL; then the rollup job catches
//! up, and the bench reports bytes per server-day of each tier (heap and indexes), the disk a
//! fleet needs over 13 months, the job's pace, and the reads: one server's 30 days of hourly
//! rollups, and the whole fleet's LLM use over the range.

use std::time::Instant;

use fleet_core::{History, HistoryQuery, Resolution, ServerId};
use time::Duration;
use time::macros::datetime;

fn env(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let servers = env("FLEET_BENCH_SERVERS", 2_000);
    let days = env("FLEET_BENCH_DAYS", 2);
    let t0 = datetime!(2026-11-01 00:00 UTC);
    let started = Instant::now();
    let (_db, store, clock) = fleet_benches::fleet_db(servers, t0).await;
    let client = store.pool().get().await.expect("connection");
    for day in 0..days {
        let from = t0 + Duration::days(day);
        // A check every 30 s: mostly healthy, 2 % degraded, 1 % critical with an error;
        // response times around 40 ms with a tail.
        client
            .execute(
                "INSERT INTO server_health_checks (server_id, timestamp, status, response_time_ms,
                     database_healthy, redis_healthy, services_healthy, successful, error_message)
                 SELECT s.id, $1::timestamptz + make_interval(secs => i * 30),
                        CASE WHEN r < 0.97 THEN 'healthy' WHEN r < 0.99 THEN 'degraded' ELSE 'critical' END,
                        (20 + 40 * random() + CASE WHEN random() < 0.05 THEN 400 * random() ELSE 0 END)::int,
                        true, true, r < 0.97, true,
                        CASE WHEN r >= 0.97 THEN 'unhealthy: services (unhealthy)' END
                 FROM managed_servers s, generate_series(0, 2879) i, LATERAL (SELECT random() AS r) x",
                &[&from],
            )
            .await
            .expect("health rows");
        // A sample every 60 s with every gauge and counter the seed defines.
        client
            .execute(
                "INSERT INTO server_metrics_aggregated (server_id, timestamp, period, cpu_percent,
                     memory_percent, disk_percent, network_rx_bytes, network_tx_bytes, active_services,
                     failed_services, total_services, llm_requests, llm_cost_usd, active_users, total_users)
                 SELECT s.id, $1::timestamptz + make_interval(secs => i * 60), 'raw',
                        30 + 40 * random(), 50 + 20 * random(), 60 + random(),
                        ($2::int8 * 1440 + i) * 150000, ($2::int8 * 1440 + i) * 90000,
                        12, (random() < 0.02)::int, 12,
                        ($2::int8 * 1440 + i) * 7, ($2::int8 * 1440 + i) * 0.013,
                        (100 * random())::int, 1000
                 FROM managed_servers s, generate_series(0, 1439) i",
                &[&from, &day],
            )
            .await
            .expect("metrics rows");
        // A few health changes a day per server (the log is never rolled up).
        client
            .execute(
                "INSERT INTO server_state_changes (server_id, changed_at, from_status, to_status, error_message)
                 SELECT s.id, $1::timestamptz + make_interval(secs => 3600 * k + 17), 'healthy', 'degraded',
                        'unhealthy: services (unhealthy)'
                 FROM managed_servers s, generate_series(0, 2) k",
                &[&from],
            )
            .await
            .expect("changes");
    }
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
    println!(
        "generated {servers} servers x {days} days of raw history in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The job catches up, as a leader would after the days have passed.
    clock.set(t0 + Duration::days(days) + Duration::minutes(10));
    let started = Instant::now();
    let (mut periods, mut hours, mut runs) = (0u64, 0u64, 0u64);
    loop {
        let r = store.roll_up().await.expect("rollup");
        runs += 1;
        if r.five_minute_periods == 0 && r.hours == 0 {
            break;
        }
        periods += u64::from(r.five_minute_periods);
        hours += u64::from(r.hours);
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "rollup: {periods} five-minute periods and {hours} hours in {runs} runs, {took:.1}s ({:.0} ms per 5-minute period of the fleet)",
        took * 1000.0 / periods.max(1) as f64
    );
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");

    let bytes = |like: String| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
                     WHERE c.relkind = 'r' AND c.relname LIKE $1",
                    &[&like],
                )
                .await
                .expect("sizes");
            row.get::<_, i64>(0) as f64
        }
    };
    let server_days = (servers * days) as f64;
    let per = |b: f64| b / server_days;
    let raw_health = per(bytes("server_health_checks_2026_11_%".into()).await);
    let raw_metrics = per(bytes("server_metrics_aggregated_2026_11_%".into()).await);
    let h5 = per(bytes("server_health_rollups_5m_%".into()).await);
    let m5 = per(bytes("server_metrics_rollups_5m_%".into()).await);
    let h1 = per(bytes("server_health_rollups_1h_%".into()).await);
    let m1 = per(bytes("server_metrics_rollups_1h_%".into()).await);
    let log = per(bytes("server_state_changes_%".into()).await);
    let totals = per(bytes("server_llm_marks_%".into()).await);
    println!("bytes per server-day (heap + indexes):");
    println!("  raw: health {raw_health:.0}, metrics {raw_metrics:.0}");
    println!("  5-minute tier: health {h5:.0}, metrics {m5:.0}");
    println!("  hourly tier: health {h1:.0}, metrics {m1:.0}");
    println!("  state-change log (3 changes a day): {log:.0}");
    println!("  running LLM totals (the summary's): {totals:.0}");
    let steady = h1 + m1 + log + totals;
    println!(
        "steady state over 13 months (hourly tiers + change log + LLM totals): {steady:.0} bytes = {:.1} KB per server-day",
        steady / 1024.0
    );
    // 13 months of hourly tiers and log, 7 days of 5-minute rows, 2 days of raw rows.
    let per_server = steady * 395.0 + (h5 + m5) * 7.0 + (raw_health + raw_metrics) * 2.0;
    for fleet in [10_000.0, 100_000.0] {
        println!(
            "disk for {fleet:.0} servers over 13 months: {:.1} GB (of which raw window {:.1} GB, 5-minute tier {:.1} GB)",
            per_server * fleet / 1e9,
            (raw_health + raw_metrics) * 2.0 * fleet / 1e9,
            (h5 + m5) * 7.0 * fleet / 1e9
        );
    }

    // Reads: one server's hourly history over the whole range, and the fleet's LLM use.
    let id: uuid::Uuid = client
        .query_one("SELECT id FROM managed_servers LIMIT 1", &[])
        .await
        .expect("a server")
        .get(0);
    let query = HistoryQuery {
        from: Some(t0),
        to: Some(t0 + Duration::days(30)),
        limit: 1_000,
    };
    let reads = read_hourly(&store, ServerId(id), query, (days * 24) as usize).await;
    let best = reads.iter().copied().fold(f64::MAX, f64::min);
    println!("one server's hourly health and metrics over {days} days: {best:.1} ms (best of 20)");

    clock.set(t0 + Duration::days(days + 3));
    let started = Instant::now();
    let usage = store
        .llm_usage(t0, t0 + Duration::days(days))
        .await
        .expect("usage");
    println!(
        "the fleet's LLM use over {days} days from the hourly tier: {} servers in {:.0} ms",
        usage.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    // A month of hourly history for the 30-day read: the rolled-up days copied forward
    // (each hour's rows of the fleet are written together, so one server's 720 rows sit on
    // 720 pages, as at any fleet size; only the index's depth grows with the fleet).
    const MONTH: i64 = 30;
    let copies = (MONTH - 1) / days;
    for table in ["server_health_rollups", "server_metrics_rollups"] {
        let columns: Vec<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let shifted: Vec<String> = columns
            .iter()
            .map(|c| match c.as_str() {
                "period_start" => format!("period_start + make_interval(days => k * {days})"),
                _ => c.clone(),
            })
            .collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {table} ({}) SELECT {} FROM {table}, generate_series(1, {copies}) k \
                     WHERE res = 'h' AND period_start < $1 \
                       AND period_start + make_interval(days => k * {days}) < $2",
                    columns.join(", "),
                    shifted.join(", ")
                ),
                &[&(t0 + Duration::days(days)), &(t0 + Duration::days(MONTH))],
            )
            .await
            .expect("a month of hourly rows");
        client
            .batch_execute(&format!("ANALYZE {table}"))
            .await
            .expect("analyze");
    }
    let reads = read_hourly(&store, ServerId(id), query, 720).await;
    println!(
        "one server's hourly health and metrics over {MONTH} days ({servers} servers): first {:.1} ms, best {:.1} ms of 20",
        reads[0],
        reads.iter().copied().fold(f64::MAX, f64::min)
    );
}

/// Twenty reads of one server's hourly health and metrics rollups in `query`, each expected to
/// hold `rows` rows per tier; the milliseconds each took.
async fn read_hourly(
    store: &fleet_pg::PgStore,
    id: ServerId,
    query: HistoryQuery,
    rows: usize,
) -> Vec<f64> {
    let mut reads = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let h = store
            .health_rollups(id, Resolution::Hour, query)
            .await
            .expect("read");
        let m = store
            .metrics_rollups(id, Resolution::Hour, query)
            .await
            .expect("read");
        assert_eq!((h.len(), m.len()), (rows, rows));
        reads.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    reads
}
