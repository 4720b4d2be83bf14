//! History tiers on a real PostgreSQL: day partitions, the rollup job, retention by tier and
//! reads across tiers, with an injected clock; each test in a database of its own.

use std::sync::Arc;

use fleet_core::conformance::{check_at, sample_at};
use fleet_core::rollup::{self, Resolution};
use fleet_core::testing::ManualClock;
use fleet_core::{
    HealthStatus, History, HistoryQuery, MetricsRecord, MetricsSample, NewServer, Registry, Store,
};
use fleet_pg::testing::TestDb;
use fleet_pg::{PartitionPolicy, PgStore, TokenVault};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

async fn rig(at: OffsetDateTime) -> (TestDb, PgStore, Arc<ManualClock>) {
    let db = TestDb::create().await;
    let clock = Arc::new(ManualClock::new(at));
    let store = db.store(clock.clone()).await;
    store.ensure_partitions().await.unwrap();
    (db, store, clock)
}

async fn server(store: &PgStore, name: &str) -> fleet_core::ServerId {
    store
        .create_server(NewServer::new(name, "http://127.0.0.1:9"))
        .await
        .unwrap()
        .id
}

/// The same database, with raw rows kept for the monthly retentions (no raw window).
fn keeping_raw(store: &PgStore, clock: &Arc<ManualClock>) -> PgStore {
    PgStore::new(
        store.pool().clone(),
        TokenVault::new(None),
        clock.clone(),
        PartitionPolicy {
            raw_retention_hours: 0,
            ..PartitionPolicy::default()
        },
    )
}

/// Runs the job until it has nothing left to roll up.
async fn roll_all(store: &PgStore) {
    for _ in 0..200 {
        let r = store.roll_up().await.unwrap();
        if r.five_minute_periods == 0 && r.hours == 0 {
            return;
        }
    }
    panic!("the rollup job never caught up");
}

fn counters(at: OffsetDateTime, server: fleet_core::ServerId, requests: i64) -> MetricsSample {
    let mut s = sample_at(server, at, 10.0 + (requests % 50) as f64);
    s.values.llm_requests = Some(requests);
    s.values.llm_cost_usd = Some(requests as f64 / 100.0);
    s.values.network_rx_bytes = Some(requests * 1_000);
    s
}

async fn relation_of(store: &PgStore, table: &str, at: OffsetDateTime) -> String {
    let client = store.pool().get().await.unwrap();
    client
        .query_one(
            &format!("SELECT tableoid::regclass::text FROM {table} WHERE timestamp = $1"),
            &[&at],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn raw_rows_land_in_day_partitions_across_the_month_boundary_and_roll_up_once() {
    // Clock at the end of March; checks either side of midnight into April.
    let (_db, store, clock) = rig(datetime!(2026-03-31 22:00 UTC)).await;
    let a = server(&store, "a").await;
    let before = datetime!(2026-03-31 23:59:59 UTC);
    let after = datetime!(2026-04-01 00:00:00 UTC);
    let mut checks = Vec::new();
    for i in 0..20 {
        let at = datetime!(2026-03-31 23:00 UTC) + Duration::minutes(3 * i);
        checks.push(check_at(a, at, HealthStatus::Healthy));
    }
    checks.push(check_at(a, before, HealthStatus::Critical));
    checks.push(check_at(a, after, HealthStatus::Healthy));
    store.record_health(&checks).await.unwrap();
    assert_eq!(
        relation_of(&store, "server_health_checks", before).await,
        "server_health_checks_2026_03_31"
    );
    assert_eq!(
        relation_of(&store, "server_health_checks", after).await,
        "server_health_checks_2026_04_01"
    );

    // Nothing closed yet (the settle time): nothing rolled up, and 1h answers empty.
    clock.set(datetime!(2026-03-31 23:59 UTC));
    roll_all(&store).await;
    let hours = store
        .health_rollups(a, Resolution::Hour, HistoryQuery::default())
        .await
        .unwrap();
    assert!(hours.is_empty(), "{hours:?}");

    // Later on 1 April: March's last hour and April's first are rolled up, each in its month.
    clock.set(datetime!(2026-04-01 02:00 UTC));
    roll_all(&store).await;
    let hours = store
        .health_rollups(a, Resolution::Hour, HistoryQuery::default())
        .await
        .unwrap();
    let starts: Vec<_> = hours.iter().map(|h| h.period_start).collect();
    assert_eq!(
        starts,
        [
            datetime!(2026-04-01 00:00 UTC),
            datetime!(2026-03-31 23:00 UTC)
        ]
    );
    assert_eq!(hours[1].checks.total(), 21);
    assert_eq!(hours[1].checks.critical, 1);
    assert_eq!(hours[1].last_error, checks[20].error_message);
    assert_eq!(hours[0].checks.total(), 1);
    let rt = hours[1].response_time_ms.unwrap();
    assert_eq!((rt.min, rt.max, rt.p95), (12, 12, 12));
    let fives = store
        .health_rollups(a, Resolution::FiveMinutes, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(
        fives.iter().map(|f| f.checks.total()).sum::<u32>(),
        22,
        "every check in one 5-minute row, none twice"
    );

    // A retried write of the same checks changes nothing, and running the job again rolls
    // nothing twice.
    store.record_health(&checks).await.unwrap();
    roll_all(&store).await;
    let again = store
        .health_rollups(a, Resolution::Hour, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(again, hours);
}

#[tokio::test]
async fn counters_increase_across_a_reset_as_core_computes_it() {
    let (_db, store, clock) = rig(datetime!(2026-05-10 09:00 UTC)).await;
    let a = server(&store, "a").await;
    let t0 = datetime!(2026-05-10 09:00 UTC);
    // A sample a minute for three hours; the counters restart from zero twice.
    let mut samples = Vec::new();
    let mut value = 1_000;
    for i in 0..180 {
        value = if i == 50 || i == 130 { 3 } else { value + 7 };
        samples.push(counters(t0 + Duration::minutes(i), a, value));
    }
    let records: Vec<_> = samples.iter().cloned().map(MetricsRecord::Sample).collect();
    store.record_metrics(&records).await.unwrap();
    clock.set(t0 + Duration::hours(4));
    roll_all(&store).await;
    let stored = store
        .metrics_rollups(a, Resolution::Hour, HistoryQuery::default())
        .await
        .unwrap();
    let expected = rollup::metrics_rollups(Resolution::Hour, &samples, t0 + Duration::hours(3));
    assert_eq!(stored.len(), 3);
    for (s, e) in stored.iter().zip(&expected) {
        assert_eq!(s.period_start, e.period_start);
        assert_eq!(s.samples, e.samples);
        for c in ["llm_requests", "network_rx_bytes"] {
            assert_eq!(s.counters[c], e.counters[c], "{c} at {}", s.period_start);
        }
        assert!((s.counters["llm_cost_usd"] - e.counters["llm_cost_usd"]).abs() < 1e-9);
        let (sg, eg) = (s.gauges["cpu_percent"], e.gauges["cpu_percent"]);
        assert_eq!((sg.min, sg.max), (eg.min, eg.max));
        assert!((sg.mean - eg.mean).abs() < 0.01, "{sg:?} {eg:?}");
    }
    // The first hour: 49 steps of 7, then a reset to 3, then 9 steps of 7.
    assert_eq!(
        stored[2].counters["llm_requests"],
        (49 * 7 + 3 + 9 * 7) as f64
    );
}

#[tokio::test]
async fn a_run_cut_short_or_run_twice_at_once_rolls_each_period_once() {
    let (db, store, clock) = rig(datetime!(2026-06-01 00:00 UTC)).await;
    let a = server(&store, "a").await;
    let t0 = datetime!(2026-06-01 00:00 UTC);
    let checks: Vec<_> = (0..120)
        .map(|i| check_at(a, t0 + Duration::seconds(30 * i), HealthStatus::Healthy))
        .collect();
    store.record_health(&checks).await.unwrap();
    clock.set(t0 + Duration::minutes(32));
    // Mid-hour: the closed 5-minute periods are rolled, the open hour is not.
    roll_all(&store).await;
    let (r5, r1) = store.rolled_until().await.unwrap();
    assert_eq!(r5, Some(t0 + Duration::minutes(25)));
    assert_eq!(r1, None, "no hour has closed");
    // A restart: another store on the same database goes on from the marks, and two runs at
    // once never roll a period twice.
    let other = db.store(clock.clone()).await;
    clock.set(t0 + Duration::hours(2));
    let (x, y) = tokio::join!(roll_all(&store), roll_all(&other));
    let ((), ()) = (x, y);
    let hours = other
        .health_rollups(a, Resolution::Hour, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(hours.len(), 1);
    assert_eq!(hours[0].checks.total(), 120);
}

#[tokio::test]
async fn raw_days_go_past_the_window_only_once_rolled_up_and_rollups_stay() {
    let (db, store, clock) = rig(datetime!(2026-07-01 00:00 UTC)).await;
    let a = server(&store, "a").await;
    let t0 = datetime!(2026-07-01 00:00 UTC);
    let checks: Vec<_> = (0..(4 * 24))
        .map(|h| check_at(a, t0 + Duration::hours(h), HealthStatus::Healthy))
        .collect();
    store.record_health(&checks).await.unwrap();
    clock.set(t0 + Duration::days(4) + Duration::hours(1));
    // Not rolled up yet: no raw day is dropped, whatever its age.
    let dropped = store.drop_expired_partitions().await.unwrap();
    assert!(
        dropped
            .iter()
            .all(|d| !d.starts_with("server_health_checks_2026_07_")),
        "{dropped:?}"
    );
    roll_all(&store).await;
    let dropped = store.drop_expired_partitions().await.unwrap();
    // 48 hours back from 5 July 01:00 is 3 July 01:00: the days of 1 and 2 July go, 3 July
    // (partly inside the window) stays.
    for gone in [
        "server_health_checks_2026_07_01",
        "server_health_checks_2026_07_02",
    ] {
        assert!(dropped.contains(&gone.to_owned()), "{dropped:?}");
    }
    assert!(!dropped.contains(&"server_health_checks_2026_07_03".to_owned()));
    let raw = store
        .health_history(
            a,
            HistoryQuery {
                limit: 1_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(raw.len(), 2 * 24);
    let hours = store
        .health_rollups(
            a,
            Resolution::Hour,
            HistoryQuery {
                limit: 1_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(hours.len(), 4 * 24, "rollups outlive the raw rows");

    // A chart of the four days reads the rollups where raw rows are gone, raw rows after.
    let window = fleet_core::SeriesWindow::new(t0, t0 + Duration::days(4), 4).unwrap();
    let series = store.health_series(a, window).await.unwrap();
    let per_day: Vec<u32> = series.iter().map(|b| b.checks).collect();
    assert_eq!(per_day, [24, 24, 24, 24]);
    assert!(series.iter().all(|b| b.worst == HealthStatus::Healthy));

    // With no raw window, raw rows stay for the monthly retention.
    let keep = keeping_raw(&store, &clock);
    clock.set(t0 + Duration::days(6));
    roll_all(&keep).await;
    let dropped = keep.drop_expired_partitions().await.unwrap();
    assert!(
        dropped
            .iter()
            .all(|d| !d.starts_with("server_health_checks_")),
        "{dropped:?}"
    );
    drop(db);
}

#[tokio::test]
async fn llm_use_over_a_range_spanning_rollups_and_raw_rows_matches_the_raw_rows() {
    let t0 = datetime!(2026-08-01 00:00 UTC);
    let (_db, store, clock) = rig(t0).await;
    let a = server(&store, "a").await;
    let b = server(&store, "b").await;
    let mut records = Vec::new();
    for (id, reset) in [(a, 700), (b, 1_900)] {
        let mut value = 0;
        for i in 0..(3 * 24 * 60 / 2) {
            value = if i == reset { 2 } else { value + 3 };
            records.push(MetricsRecord::Sample(counters(
                t0 + Duration::minutes(2 * i),
                id,
                value,
            )));
        }
    }
    store.record_metrics(&records).await.unwrap();
    // Three days later (raw window 48 h): the range's first day is read from rollups, the
    // rest from the 5-minute tier and raw rows. Raw rows are all still there (no retention
    // has run), so a store keeping raw rows by month reads the same range from them alone.
    let now = t0 + Duration::days(3);
    clock.set(now);
    roll_all(&store).await;
    let (r5, r1) = store.rolled_until().await.unwrap();
    assert!(r1.unwrap() > t0 && r5.unwrap() > r1.unwrap());
    let raw_only = keeping_raw(&store, &clock);
    let (from, to) = (t0, now);
    let mut tiered = store.llm_usage(from, to).await.unwrap();
    let mut raw = raw_only.llm_usage(from, to).await.unwrap();
    tiered.sort_by_key(|u| u.server_id);
    raw.sort_by_key(|u| u.server_id);
    assert_eq!(tiered.len(), 2);
    for (t, r) in tiered.iter().zip(&raw) {
        assert_eq!(t.requests, r.requests, "{t:?} {r:?}");
        assert!((t.cost_usd - r.cost_usd).abs() < 1e-6, "{t:?} {r:?}");
    }
}

/// The summary's LLM use over whole hours, read from two rows of running totals, against
/// every raw sample of the same window: across a month boundary, a counter reset, a server
/// that stops reporting (its totals carried), one that starts late, one deleted, one that
/// never reports LLM counters.
#[tokio::test]
async fn the_summary_over_whole_hours_reads_two_running_totals_and_matches_every_sample() {
    let t0 = datetime!(2026-07-31 18:00 UTC);
    let (_db, store, clock) = rig(t0).await;
    let ids = [
        server(&store, "resets").await,
        server(&store, "stops").await,
        server(&store, "starts-late").await,
        server(&store, "deleted").await,
        server(&store, "no-llm").await,
    ];
    let mut records = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let mut value = 0;
        for i in 0..(3 * 24 * 60 / 2) {
            let minute = 2 * i;
            match n {
                1 if minute > 20 * 60 => break,
                2 if minute < 30 * 60 => continue,
                _ => {}
            }
            value = if n == 0 && i == 1_000 {
                4
            } else {
                value + 1 + n as i64
            };
            let mut s = counters(t0 + Duration::minutes(minute), *id, value);
            if n == 4 {
                s.values.llm_requests = None;
                s.values.llm_cost_usd = None;
            }
            records.push(MetricsRecord::Sample(s));
        }
    }
    store.record_metrics(&records).await.unwrap();
    let now = t0 + Duration::days(3) + Duration::minutes(20);
    clock.set(now);
    roll_all(&store).await;
    assert!(store.delete_server(ids[3]).await.unwrap());
    let (_, rolled_1h) = store.rolled_until().await.unwrap();
    let rolled_1h = rolled_1h.unwrap();

    let client = store.pool().get().await.unwrap();
    let marks: i64 = client
        .query_one("SELECT count(*) FROM server_llm_marks", &[])
        .await
        .unwrap()
        .get(0);
    let first_day = t0.date().midnight().assume_utc();
    assert_eq!(
        marks,
        (rolled_1h - first_day).whole_hours(),
        "one row of totals per hour rolled up, from the first raw day"
    );

    // Asked from mid-hour to now: the window moves back to whole hours, ending at the last
    // hour rolled up.
    let asked = (t0 + Duration::minutes(150), now);
    let by_marks = store
        .llm_summary(asked, Some(Resolution::Hour), 3)
        .await
        .unwrap();
    assert_eq!(by_marks.resolution, Resolution::Hour);
    assert_eq!(
        (by_marks.from, by_marks.to),
        (t0 + Duration::hours(2), rolled_1h)
    );
    let raw_only = keeping_raw(&store, &clock);
    // The tiers count the step into a period's first sample, so the exact window starts at
    // the sample before (samples are 2 minutes apart).
    let exact = raw_only
        .llm_summary(
            (by_marks.from - Duration::minutes(2), by_marks.to),
            Some(Resolution::Raw),
            3,
        )
        .await
        .unwrap();
    assert_eq!(exact.resolution, Resolution::Raw);
    assert_eq!(by_marks.total_requests, exact.total_requests);
    assert!((by_marks.total_cost_usd - exact.total_cost_usd).abs() < 1e-6);
    let top = |s: &fleet_core::LlmSummary| -> Vec<_> {
        s.top.iter().map(|u| (u.server_id, u.requests)).collect()
    };
    assert_eq!(top(&by_marks), top(&exact));
    assert_eq!(
        by_marks.top.len(),
        3,
        "three servers used an LLM in the window"
    );
    assert!(!by_marks.top.iter().any(|u| u.server_id == ids[3]));

    // The totals alone answer it: with every rollup and raw row gone, the same figures.
    client
        .batch_execute(
            "TRUNCATE server_metrics_rollups_1h, server_metrics_rollups_5m, server_metrics_aggregated",
        )
        .await
        .unwrap();
    let again = store
        .llm_summary(asked, Some(Resolution::Hour), 3)
        .await
        .unwrap();
    assert_eq!(again, by_marks);
    // A window of a day or more is on whole hours unless every sample is asked for.
    let chosen = store.llm_summary(asked, None, 3).await.unwrap();
    assert_eq!(chosen, by_marks);
    let short = store
        .llm_summary((now - Duration::hours(2), now), None, 3)
        .await
        .unwrap();
    assert_eq!(short.resolution, Resolution::Raw);

    // A chain that starts after the tier (totals added to a store with history) does not
    // cover a window reaching back before it: that window is read from the tiers.
    client
        .execute(
            "DELETE FROM server_llm_marks WHERE period_start < $1",
            &[&(t0 + Duration::hours(12))],
        )
        .await
        .unwrap();
    let before_chain = store
        .llm_summary(asked, Some(Resolution::Hour), 3)
        .await
        .unwrap();
    assert_eq!(before_chain.total_requests, 0, "the tiers are empty now");
    let within_chain = store
        .llm_summary((t0 + Duration::hours(12), now), Some(Resolution::Hour), 3)
        .await
        .unwrap();
    assert!(within_chain.total_requests > 0);
}
