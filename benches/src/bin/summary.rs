//! The whole-fleet 30-day LLM summary (docs/benchmarks.md), `scripts/bench-summary`:
//! `FLEET_BENCH_SERVERS` servers (default 100,000) in a throwaway PostgreSQL. One hour of
//! 5-minute rollups is written for the fleet and the rollup job rolls it into the hourly tier
//! and the running LLM totals, timed; that hour's totals are then carried forward over 31 days
//! (growing each hour, as a fleet's do), and the summary of the last 30 days is read through the
//! store as the API reads it: first, then best of 20. Also the totals' bytes per server-day.

use std::time::Instant;

use fleet_core::{History, Resolution};
use time::Duration;
use time::macros::datetime;

#[tokio::main]
async fn main() {
    let servers: i64 = std::env::var("FLEET_BENCH_SERVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    const DAYS: i64 = 31;
    let t0 = datetime!(2026-10-01 00:00 UTC);
    let started = Instant::now();
    let (_db, store, clock) = fleet_benches::fleet_db(servers, t0).await;
    let client = store.pool().get().await.expect("connection");
    client
        .batch_execute(
            "CREATE TABLE server_health_rollups_5m_2026_10_01 PARTITION OF server_health_rollups_5m
                 FOR VALUES FROM ('2026-10-01 00:00:00+00') TO ('2026-10-02 00:00:00+00');
             CREATE TABLE server_metrics_rollups_5m_2026_10_01 PARTITION OF server_metrics_rollups_5m
                 FOR VALUES FROM ('2026-10-01 00:00:00+00') TO ('2026-10-02 00:00:00+00');
             INSERT INTO server_health_rollups_5m (server_id, res, period_start, healthy, degraded,
                 critical, unreachable, rt_count, rt_min, rt_max, rt_sum, h0, h1, h2, h3, h4, h5, h6,
                 h7, h8, h9, last_error)
             SELECT s.id, 'm', '2026-10-01 00:00:00+00'::timestamptz + make_interval(mins => 5 * p),
                    10, 0, 0, 0, 10, 21, 80, 400, 0, 2, 6, 2, 0, 0, 0, 0, 0, 0, NULL
             FROM generate_series(0, 11) p, managed_servers s;
             INSERT INTO server_metrics_rollups_5m (server_id, res, period_start, samples,
                 cpu_min, cpu_mean, cpu_max, memory_min, memory_mean, memory_max, disk_min, disk_mean,
                 disk_max, llm_requests_increase, llm_cost_usd_increase, network_rx_bytes_increase,
                 network_tx_bytes_increase)
             SELECT s.id, 'm', '2026-10-01 00:00:00+00'::timestamptz + make_interval(mins => 5 * p),
                    5, 3000, 5000, 7000, 5000, 6000, 7000, 6000, 6000, 6000,
                    (random() * 50)::int8, random() * 0.1, 750000, 450000
             FROM generate_series(0, 11) p, managed_servers s;
             UPDATE rollup_progress SET rolled_from = '2026-10-01 00:00:00+00',
                 rolled_until = CASE tier WHEN '5m' THEN '2026-10-01 01:00:00+00'::timestamptz
                                          ELSE '2026-10-01 00:00:00+00'::timestamptz END",
        )
        .await
        .expect("an hour of 5-minute rollups");
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
    println!(
        "{servers} servers with an hour of 5-minute rollups in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The job rolls the hour up: the hourly tier and the fleet's running totals.
    clock.set(t0 + Duration::hours(1) + Duration::minutes(6));
    println!(
        "rollup job, one hour of {servers} servers (hourly health and metrics rows, LLM totals): {:.0} ms",
        roll_one_hour(&store).await
    );

    // The next hour, as every later one: the servers are numbered already.
    client
        .batch_execute(
            "INSERT INTO server_health_rollups_5m (server_id, res, period_start, healthy, degraded,
                 critical, unreachable, rt_count, rt_min, rt_max, rt_sum, h0, h1, h2, h3, h4, h5, h6,
                 h7, h8, h9, last_error)
             SELECT server_id, res, period_start + interval '1 hour', healthy, degraded, critical,
                    unreachable, rt_count, rt_min, rt_max, rt_sum, h0, h1, h2, h3, h4, h5, h6, h7, h8,
                    h9, last_error
             FROM server_health_rollups_5m;
             INSERT INTO server_metrics_rollups_5m (server_id, res, period_start, samples,
                 cpu_min, cpu_mean, cpu_max, memory_min, memory_mean, memory_max, disk_min, disk_mean,
                 disk_max, llm_requests_increase, llm_cost_usd_increase, network_rx_bytes_increase,
                 network_tx_bytes_increase)
             SELECT server_id, res, period_start + interval '1 hour', samples, cpu_min, cpu_mean,
                    cpu_max, memory_min, memory_mean, memory_max, disk_min, disk_mean, disk_max,
                    llm_requests_increase, llm_cost_usd_increase, network_rx_bytes_increase,
                    network_tx_bytes_increase
             FROM server_metrics_rollups_5m;
             UPDATE rollup_progress SET rolled_until = '2026-10-01 02:00:00+00' WHERE tier = '5m'",
        )
        .await
        .expect("a second hour");
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
    clock.set(t0 + Duration::hours(2) + Duration::minutes(6));
    println!(
        "rollup job, the next hour (servers numbered): {:.0} ms",
        roll_one_hour(&store).await
    );
    client
        .execute(
            "DELETE FROM server_llm_marks WHERE period_start > $1",
            &[&t0],
        )
        .await
        .expect("one hour of totals");

    // The hour's totals carried over 31 days, each hour's a little larger.
    let started = Instant::now();
    for hour in 1..DAYS * 24 {
        client
            .execute(
                "INSERT INTO server_llm_marks (period_start, servers, requests, cost_usd)
                 SELECT period_start + make_interval(hours => $1),
                        servers,
                        (SELECT array_agg(r * ($1 + 1) ORDER BY o) FROM unnest(requests) WITH ORDINALITY u(r, o)),
                        (SELECT array_agg(c * ($1 + 1) ORDER BY o) FROM unnest(cost_usd) WITH ORDINALITY u(c, o))
                 FROM server_llm_marks WHERE period_start = $2",
                &[&(hour as i32), &t0],
            )
            .await
            .expect("a month of totals");
    }
    client
        .execute(
            "UPDATE rollup_progress SET rolled_until = $1 WHERE tier = '1h'",
            &[&(t0 + Duration::days(DAYS))],
        )
        .await
        .expect("progress");
    client
        .batch_execute("VACUUM ANALYZE server_llm_marks")
        .await
        .expect("vacuum");
    println!(
        "{DAYS} days of hourly totals written in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let bytes: i64 = client
        .query_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
             WHERE c.relkind = 'r' AND c.relname LIKE 'server_llm_marks_%'",
            &[],
        )
        .await
        .expect("sizes")
        .get(0);
    println!(
        "running LLM totals: {:.0} bytes per server-day (heap, TOAST and index)",
        bytes as f64 / (servers * DAYS) as f64
    );

    let now = t0 + Duration::days(DAYS) + Duration::minutes(10);
    clock.set(now);
    let mut reads = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let summary = store
            .llm_summary((now - Duration::days(30), now), None, 20)
            .await
            .expect("summary");
        reads.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(summary.resolution, Resolution::Hour);
        assert_eq!(summary.to - summary.from, Duration::days(30));
        assert_eq!(summary.top.len(), 20);
        assert!(summary.total_requests > 0);
    }
    println!(
        "the whole fleet's LLM summary over 30 days ({servers} servers, top 20): first {:.0} ms, best {:.0} ms of 20",
        reads[0],
        reads.iter().copied().fold(f64::MAX, f64::min)
    );
}

/// One run of the rollup job, which must roll up one hour and nothing else; its milliseconds.
async fn roll_one_hour(store: &fleet_pg::PgStore) -> f64 {
    let started = Instant::now();
    let report = store.roll_up().await.expect("rollup");
    assert_eq!((report.five_minute_periods, report.hours), (0, 1));
    started.elapsed().as_secs_f64() * 1000.0
}
