//! PgStore against a real PostgreSQL: each test in a database of its own.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::conformance::{base_time, check_at, sample_at};
use fleet_core::testing::{ManualClock, ScriptedProbe, healthy};
use fleet_core::{
    ApiToken, CancellationToken, HealthStatus, HealthWork, History, HistoryQuery, MetricsRecord,
    NewServer, Registry, StorageCheck, Store, StoreError, SystemClock, WorkerConfig, WorkerKind,
};
use fleet_pg::testing::{PrivateCluster, TestDb};
use fleet_pg::{PartitionPolicy, PgSettings, PgStore, Rotated, SecretKey, TokenVault, migrate};
use time::macros::datetime;

/// `n` connections of `pool` held at once.
async fn hold_connections(
    pool: &deadpool_postgres::Pool,
    n: usize,
) -> Vec<deadpool_postgres::Object> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.get().await.unwrap());
    }
    held
}

fn clock_at(at: time::OffsetDateTime) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(at))
}

async fn partitions(store: &PgStore) -> Vec<String> {
    let client = store.pool().get().await.unwrap();
    client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY($1) ORDER BY 1",
            &[&fleet_pg::PARTITIONED.as_slice()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

mod conformance {
    use super::*;

    fleet_core::store_conformance_tests!(|| async {
        let db = TestDb::create().await;
        let store = db.store(Arc::new(SystemClock)).await;
        (db, store)
    });
}

#[tokio::test]
async fn migrations_apply_once() {
    let db = TestDb::create().await;
    let pool = db.settings.pool().unwrap();
    assert_eq!(
        migrate(&pool).await.unwrap(),
        [
            "V1__initial",
            "V2__state_changes",
            "V3__case_insensitive_names",
            "V4__server_tallies",
            "V5__alerts",
            "V6__dashboard",
            "V7__server_kinds",
            "V8__server_ca_certs",
            "V9__scale_out",
            "V10__metrics_state",
            "V11__bucket_tallies",
            "V12__alert_change_log",
            "V13__history_tiers",
            "V14__hot_state_updates",
            "V15__llm_marks"
        ]
    );
    assert!(migrate(&pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn tokens_are_sealed_at_rest_and_refused_without_a_key() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(SystemClock)).await;
    let server = store
        .create_server(
            NewServer::new("a", "http://127.0.0.1:9")
                .with_token(ApiToken::new("very-secret-token")),
        )
        .await
        .unwrap();
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT api_token_sealed, api_token_key_id FROM managed_servers WHERE id = $1",
            &[&server.id.0],
        )
        .await
        .unwrap();
    let sealed: Vec<u8> = row.get(0);
    assert!(
        !sealed.windows(17).any(|w| w == b"very-secret-token"),
        "token stored in the clear"
    );
    let key_id: String = row.get(1);
    assert_eq!(key_id.len(), 12);
    let targets = store.health_targets().await.unwrap().to_vec();
    assert_eq!(
        targets[0].token.as_ref().unwrap().expose(),
        "very-secret-token"
    );

    // Rotation: a new token is sealed afresh.
    assert!(
        store
            .set_token(server.id, &ApiToken::new("rotated"))
            .await
            .unwrap()
    );
    assert_eq!(
        store.health_targets().await.unwrap().to_vec()[0]
            .token
            .as_ref()
            .unwrap()
            .expose(),
        "rotated"
    );

    let keyless = PgStore::new(
        store.pool().clone(),
        TokenVault::new(None),
        Arc::new(SystemClock),
        PartitionPolicy::default(),
    );
    let err = keyless
        .create_server(NewServer::new("b", "http://127.0.0.1:9").with_token(ApiToken::new("t")))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("FLEET_SECRET_KEY")),
        "{err}"
    );
    assert!(keyless.get_server(server.id).await.unwrap().is_some());
    assert_eq!(
        keyless
            .list_servers(&Default::default())
            .await
            .unwrap()
            .len(),
        1,
        "nothing stored for b"
    );
    // Without the key the token cannot be opened: the target has none, and nothing panics.
    assert!(
        keyless.health_targets().await.unwrap().to_vec()[0]
            .token
            .is_none()
    );
}

#[tokio::test]
async fn partitions_are_premade_and_expire_by_retention() {
    let db = TestDb::create().await;
    let clock = clock_at(datetime!(2026-11-15 12:00 UTC));
    let store = db.store(clock.clone()).await;
    let made = store.ensure_partitions().await.unwrap();
    assert_eq!(
        made.len(),
        24,
        "4 months of 3 history tables, 2 hourly rollup tables and the LLM totals"
    );
    assert!(
        store.ensure_partitions().await.unwrap().is_empty(),
        "premaking is idempotent"
    );
    let names = partitions(&store).await;
    for m in ["2026_11", "2026_12", "2027_01", "2027_02"] {
        assert!(
            names.contains(&format!("server_health_checks_{m}")),
            "{names:?}"
        );
        assert!(
            names.contains(&format!("server_metrics_aggregated_{m}")),
            "{names:?}"
        );
        assert!(
            names.contains(&format!("server_state_changes_{m}")),
            "{names:?}"
        );
    }

    // Five months later, health keeps 3 months back and metrics 13; the change log is kept
    // as long as the longest tier.
    clock.set(datetime!(2027-04-02 00:00 UTC));
    store.ensure_partitions().await.unwrap();
    let dropped = store.drop_expired_partitions().await.unwrap();
    assert_eq!(
        dropped,
        [
            "server_health_checks_2026_11",
            "server_health_checks_2026_12"
        ]
    );
    let names = partitions(&store).await;
    assert!(names.contains(&"server_health_checks_2027_01".to_owned()));
    assert!(names.contains(&"server_metrics_aggregated_2026_11".to_owned()));
    assert!(names.contains(&"server_state_changes_2026_11".to_owned()));

    // 0 keeps forever; the current month is never dropped.
    let keep = PgStore::new(
        store.pool().clone(),
        TokenVault::new(None),
        clock.clone(),
        PartitionPolicy {
            premake_months: 0,
            health_retention_months: 0,
            metrics_retention_months: 1,
            ..PartitionPolicy::default()
        },
    );
    let dropped = keep.drop_expired_partitions().await.unwrap();
    assert!(
        dropped
            .iter()
            .all(|n| n.starts_with("server_metrics_aggregated_")),
        "health kept forever keeps the change log forever too: {dropped:?}"
    );
    assert!(
        partitions(&keep)
            .await
            .contains(&"server_metrics_aggregated_2027_04".to_owned())
    );
    let left = partitions(&keep).await;
    assert!(
        !left.contains(&"server_metrics_aggregated_2027_02".to_owned()),
        "{left:?}"
    );
}

#[tokio::test]
async fn concurrent_maintenance_is_safe() {
    let db = TestDb::create().await;
    let store = db.store(clock_at(datetime!(2026-11-15 12:00 UTC))).await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.maintain().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(partitions(&store).await.len(), 12, "4 months of 3 tables");
}

#[tokio::test]
async fn a_missing_partition_is_reported_recreated_and_loses_no_row() {
    let db = TestDb::create().await;
    let clock = clock_at(datetime!(2026-02-10 08:00 UTC));
    let store = db.store(clock.clone()).await;
    store.ensure_partitions().await.unwrap();
    let a = store
        .create_server(NewServer::new("a", "http://127.0.0.1:9"))
        .await
        .unwrap()
        .id;
    let client = store.pool().get().await.unwrap();
    client
        .batch_execute(
            "DROP TABLE server_metrics_aggregated_2026_02; DROP TABLE server_health_checks_2026_02",
        )
        .await
        .unwrap();
    drop(client);
    // Several idle connections, as in a busy server: the retry must not run a statement
    // prepared on one connection on another.
    let busy: Vec<_> = hold_connections(store.pool(), 4).await;
    drop(busy);

    // Writes still land: the store makes the partition and retries.
    let t = datetime!(2026-02-10 08:00 UTC);
    store
        .record_health(&[check_at(a, t, HealthStatus::Healthy)])
        .await
        .unwrap();
    assert_eq!(
        store
            .health_history(a, HistoryQuery::default())
            .await
            .unwrap()
            .len(),
        1
    );

    let client = store.pool().get().await.unwrap();
    client
        .batch_execute("DROP TABLE server_metrics_aggregated_2026_02")
        .await
        .unwrap();
    drop(client);
    let findings = store.check_storage().await.unwrap();
    assert_eq!(
        findings,
        ["PARTITION MISSING: server_metrics_aggregated_2026_02 does not exist!"]
    );
    assert!(
        store.check_storage().await.unwrap().is_empty(),
        "the check repairs what it finds"
    );
    store
        .record_metrics(&[MetricsRecord::Sample(sample_at(a, t, 5.0))])
        .await
        .unwrap();
    assert_eq!(
        store
            .metrics_history(a, HistoryQuery::default())
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_batch_straddling_a_month_boundary_lands_in_both_months() {
    let db = TestDb::create().await;
    // The clock says March; nothing for April is made yet.
    let store = db.store(clock_at(datetime!(2026-03-31 23:59 UTC))).await;
    store.ensure_partitions().await.unwrap();
    let client = store.pool().get().await.unwrap();
    client
        .batch_execute("DROP TABLE server_health_checks_2026_04")
        .await
        .unwrap();
    drop(client);
    let a = store
        .create_server(NewServer::new("a", "http://127.0.0.1:9"))
        .await
        .unwrap()
        .id;
    let before = datetime!(2026-03-31 23:59:59.5 UTC);
    let after = datetime!(2026-04-01 00:00:00.5 UTC);
    store
        .record_health(&[
            check_at(a, before, HealthStatus::Healthy),
            check_at(a, after, HealthStatus::Critical),
        ])
        .await
        .unwrap();
    let client = store.pool().get().await.unwrap();
    let count = |p: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT count(*) FROM {p}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("server_health_checks_2026_03").await, 1);
    assert_eq!(count("server_health_checks_2026_04").await, 1);
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(s.health_status, Some(HealthStatus::Critical));
    assert_eq!(s.last_health_check_at, Some(after));
}

#[tokio::test]
async fn a_large_batch_is_one_statement_and_lands_exactly_once() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(SystemClock)).await;
    let ids = register(&store, 300).await;
    let t0 = base_time();
    let batch: Vec<_> = ids
        .iter()
        .flat_map(|id| {
            (0..4).map(move |k| {
                check_at(
                    *id,
                    t0 + time::Duration::seconds(30 * k),
                    HealthStatus::Degraded,
                )
            })
        })
        .collect();
    store.record_health(&batch).await.unwrap();
    store.record_health(&batch[..600]).await.unwrap();
    let client = store.pool().get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM server_health_checks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1200);
    let stale: i64 = client
        .query_one(
            "SELECT count(*) FROM managed_servers WHERE last_health_check_at <> $1",
            &[&(t0 + time::Duration::seconds(90))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, 0);
}

/// A check rewrites its server's row. With no index over a column it writes, PostgreSQL
/// updates the row in place (a heap-only tuple) instead of adding a version to each of the
/// registry's indexes, which at 100,000 servers was most of the writer's cost.
#[tokio::test]
async fn a_checks_state_update_touches_no_index() {
    let db = TestDb::create().await;
    // One connection, so that the statistics this test reads are that connection's own.
    let store = db.store_with_pool(Arc::new(SystemClock), 1).await;
    store.ensure_partitions().await.unwrap();
    let indexed: Vec<String> = store
        .pool()
        .get()
        .await
        .unwrap()
        .query(
            "SELECT indexname || ': ' || indexdef FROM pg_indexes WHERE tablename = 'managed_servers'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for column in [
        "last_seen_at",
        "last_health_check_at",
        "last_response_time_ms",
        "last_error",
    ] {
        let covering: Vec<_> = indexed.iter().filter(|d| d.contains(column)).collect();
        assert!(covering.is_empty(), "{column} is indexed: {covering:?}");
    }
    let ids = register(&store, 100).await;
    // The connection's counts so far, flushed to the statistics views first.
    let updates = || async {
        let client = store.pool().get().await.unwrap();
        client
            .execute("SELECT pg_stat_force_next_flush()", &[])
            .await
            .unwrap();
        let row = client
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE relname = 'managed_servers'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let t0 = base_time();
    let round = |k: i64| -> Vec<_> {
        ids.iter()
            .map(|id| {
                check_at(
                    *id,
                    t0 + time::Duration::seconds(30 * k),
                    HealthStatus::Healthy,
                )
            })
            .collect()
    };
    // The first check sets the health status, which is indexed; the next ones leave it.
    store.record_health(&round(0)).await.unwrap();
    let before = updates().await;
    for k in 1..=5 {
        store.record_health(&round(k)).await.unwrap();
    }
    // The counts reach the view a little behind the statements.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (all, hot) = loop {
        let now = updates().await;
        let (all, hot) = (now.0 - before.0, now.1 - before.1);
        if all >= 500 {
            break (all, hot);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30s for the statistics of 500 updates: {all}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A page still holding versions that another transaction may see sends some updates
    // elsewhere until it is pruned (about a quarter while other tests run beside this one);
    // an indexed column sends them all.
    assert!(hot * 2 >= all, "{hot} of {all} updates in place");
}

/// Registers `n` servers, `s0` to `s{n-1}`, and returns their ids.
async fn register(store: &PgStore, n: usize) -> Vec<fleet_core::ServerId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let server = NewServer::new(format!("s{i}"), "http://127.0.0.1:9");
        ids.push(store.create_server(server).await.unwrap().id);
    }
    ids
}

/// The plan PostgreSQL would use for `sql`, as text.
async fn explain(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.query(&format!("EXPLAIN {sql}"), &[]).await.unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_dashboards_reads_use_their_indexes() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(SystemClock)).await;
    let client = store.pool().get().await.unwrap();
    // A realistic registry: 20,000 servers, most active, a few in maintenance.
    client
        .batch_execute(
            "INSERT INTO managed_servers (id, name, api_url, status, health_status, last_seen_at, last_health_check_at)
             SELECT gen_random_uuid(), 's' || g, 'http://127.0.0.1:9',
                    CASE WHEN g % 50 = 0 THEN 'maintenance' ELSE 'active' END,
                    CASE WHEN g % 10 = 0 THEN 'critical' ELSE 'healthy' END,
                    now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval
             FROM generate_series(1, 20000) g;
             ANALYZE managed_servers;",
        )
        .await
        .unwrap();
    // The dashboard's search can be served by its trigram index (pg_trgm is in Debian's
    // server package); on 20,000 rows the planner may still prefer a scan, so it is asked to
    // show that it could do without one.
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan = explain(
        &client,
        "SELECT id FROM managed_servers WHERE search_text LIKE lower('%s1234%')",
    )
    .await;
    assert!(plan.contains("managed_servers_search"), "{plan}");
    // The live stream tails the change log by id through each partition's index.
    store.ensure_partitions().await.unwrap();
    let plan = explain(
        &client,
        "SELECT id FROM server_state_changes WHERE id > 100 ORDER BY id LIMIT 51",
    )
    .await;
    assert!(plan.contains("Index") && plan.contains("_id_idx"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_buffers_through_a_database_restart_then_writes_everything() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster.url()).await;
    let store = Arc::new(db.store_with_pool(Arc::new(SystemClock), 4).await);
    store.ensure_partitions().await.unwrap();
    for i in 0..20 {
        store
            .create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
            .await
            .unwrap();
    }
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let config = WorkerConfig::builder(WorkerKind::Health)
        .interval(Duration::from_millis(300))
        .timeout(Duration::from_millis(200))
        .flush_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let health = HealthWork::new(store.clone(), probe.clone())
        .worker(config, Arc::new(SystemClock))
        .spawn(cancel.clone());

    let wait = |what: &'static str, cond: &dyn Fn(&fleet_core::WorkerStats) -> bool| {
        let stats = health.stats().clone();
        let ok = (0..500).any(|_| {
            if cond(&stats.snapshot()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
            false
        });
        assert!(ok, "{what}: {:?}", stats.snapshot());
    };
    tokio::task::block_in_place(|| wait("first writes", &|s| s.written >= 20));
    tokio::task::block_in_place(|| cluster.stop());
    // Probing goes on while the database is down; results wait in the buffer. Cycles whose
    // selection fails are skipped, so count the results of the cycle that was running.
    let before = health.stats().snapshot();
    tokio::task::block_in_place(|| wait("a failed write", &|s| s.last_error.is_some()));
    tokio::task::block_in_place(|| cluster.start_again());
    tokio::task::block_in_place(|| {
        wait("buffer drained", &|s| {
            s.pending == 0 && s.last_error.is_none() && s.cycles > before.cycles + 1
        })
    });
    cancel.cancel();
    let stats = health.stats().clone();
    let report = health.stopped().await;
    assert_eq!(report.lost_results, 0);
    let s = stats.snapshot();
    assert_eq!((s.pending, s.dropped), (0, 0));
    assert_eq!(
        health_stats_total(&store).await,
        s.performed as i64,
        "every completed check is stored exactly once"
    );
    assert_eq!(s.written, s.performed);
}

async fn health_stats_total(store: &PgStore) -> i64 {
    let client = store.pool().get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM server_health_checks", &[])
        .await
        .unwrap()
        .get(0)
}

/// Runs a health worker over `servers` instant-healthy targets against `store`, calls `fault`
/// while it runs, then stops it and checks that every completed check is stored exactly once.
async fn survives<F, Fut>(
    store: Arc<PgStore>,
    servers: usize,
    write_batch: usize,
    fault: F,
) -> fleet_core::WorkerStats
where
    F: FnOnce(fleet_core::StatsHandle) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..servers {
        store
            .create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
            .await
            .unwrap();
    }
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let config = WorkerConfig::builder(WorkerKind::Health)
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(100))
        .batch_size(servers)
        .write_batch_size(write_batch)
        .flush_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let health = HealthWork::new(store.clone(), probe.clone())
        .worker(config, Arc::new(SystemClock))
        .spawn(cancel.clone());
    let stats = health.stats().clone();
    fault(stats.clone()).await;
    // Recovered means: nothing waits, no error stands, and a whole cycle has run since the fault.
    let after_fault = stats.snapshot().cycles;
    let recovered = |s: &fleet_core::WorkerStats| {
        s.pending == 0 && s.last_error.is_none() && s.cycles > after_fault
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while !recovered(&stats.snapshot()) {
        assert!(
            tokio::time::Instant::now() < end,
            "never recovered: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    let report = health.stopped().await;
    let s = stats.snapshot();
    assert_eq!(
        (report.lost_results, s.dropped, s.pending),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(
        health_stats_total(&store).await,
        s.performed as i64,
        "every completed check stored exactly once"
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_killed_during_batch_writes_lose_and_duplicate_nothing() {
    let db = TestDb::create().await;
    let store = Arc::new(db.store(Arc::new(SystemClock)).await);
    store.ensure_partitions().await.unwrap();
    let killer = fleet_pg::PgSettings::from_url(db.settings.url.clone().unwrap())
        .pool()
        .unwrap();
    let name = db.name().to_owned();
    // Large batches, so that writes last long enough to be caught in the act: the killer
    // polls for a backend running the batch statement and terminates it, a few times over.
    let s = survives(store.clone(), 1_000, 500, |_| async move {
        let client = killer.get().await.unwrap();
        let mut killed = 0i64;
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while killed < 3 && tokio::time::Instant::now() < end {
            let row = client
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'fleet' AND pid <> pg_backend_pid() \
                     AND state = 'active' AND query LIKE 'WITH raw AS%'",
                    &[&name],
                )
                .await
                .unwrap();
            killed += row.get::<_, i64>(0);
        }
        assert!(killed > 0, "no backend was caught writing in 10 s");
    })
    .await;
    assert!(s.performed >= 1_000, "not every server was checked: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_is_absorbed_by_the_buffer_and_probing_goes_on() {
    let db = TestDb::create().await;
    let store = Arc::new(db.store(Arc::new(SystemClock)).await);
    store.ensure_partitions().await.unwrap();
    let locker = fleet_pg::PgSettings::from_url(db.settings.url.clone().unwrap())
        .pool()
        .unwrap();
    let hold = if std::env::var("FLEET_LONG").is_ok_and(|v| v == "1") {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(2)
    };
    survives(store.clone(), 50, 50, |stats| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut client = locker.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE server_health_checks IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        // Readers wait on the lock too: count through the lock holder.
        let rows_before: i64 = tx
            .query_one("SELECT count(*) FROM server_health_checks", &[])
            .await
            .unwrap()
            .get(0);
        let performed_before = stats.snapshot().performed;
        tokio::time::sleep(hold).await;
        let during = stats.snapshot();
        let rows_during: i64 = tx
            .query_one("SELECT count(*) FROM server_health_checks", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows_before, rows_during, "a write got past the lock");
        assert!(
            during.performed >= performed_before + 100,
            "probing stalled behind the lock: {during:?}"
        );
        assert!(
            during.pending >= 50,
            "results did not wait in the buffer: {during:?}"
        );
        tx.commit().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn keys_rotate_every_sealed_column_and_the_old_key_can_then_go() {
    let db = TestDb::create().await;
    let pool = db.settings.pool().unwrap();
    migrate(&pool).await.unwrap();
    let (a, b) = (SecretKey::generate(), SecretKey::generate());
    let store = |vault: TokenVault| {
        PgStore::new(
            pool.clone(),
            vault,
            Arc::new(SystemClock),
            PartitionPolicy::default(),
        )
    };
    let token_of = |s: PgStore| async move {
        let t = s.health_targets().await.unwrap().to_vec().remove(0);
        (t.token.map(|t| t.expose().to_owned()), t.unreadable_token)
    };
    // Sealed under A.
    store(TokenVault::new(Some(a.clone())))
        .create_server(NewServer::new("s", "http://127.0.0.1:9").with_token(ApiToken::new("tok")))
        .await
        .unwrap();
    // A channel's secrets too.
    let slack = fleet_alerts::ChannelConfig::Slack {
        url: "http://127.0.0.1:9/hook".into(),
    };
    let channel = fleet_alerts::AlertStore::create_channel(
        &store(TokenVault::new(Some(a.clone()))),
        "slack",
        slack.clone(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();

    // B alone opens nothing: the start-up check names A, and the target says which key.
    let b_only = store(TokenVault::new(Some(b.clone())));
    let unknown = b_only.unopenable_keys().await.unwrap();
    assert_eq!(
        unknown.into_iter().collect::<Vec<_>>(),
        [(a.id().to_owned(), 2)]
    );
    assert_eq!(
        token_of(store(TokenVault::new(Some(b.clone())))).await,
        (None, Some(a.id().to_owned()))
    );
    let refused = b_only.rotate_keys().await.unwrap_err().to_string();
    assert!(refused.contains(a.id()), "{refused}");

    // B current with A previous: probes work, and rotation re-seals under B.
    let rotating = || store(TokenVault::new(Some(b.clone())).with_previous(a.clone()));
    assert!(rotating().unopenable_keys().await.unwrap().is_empty());
    assert_eq!(token_of(rotating()).await, (Some("tok".to_owned()), None));
    let report = rotating().rotate_keys().await.unwrap();
    let resealed = Rotated {
        resealed: 1,
        current: 0,
    };
    assert_eq!(
        report.into_iter().collect::<Vec<_>>(),
        [
            ("alert_channels.config", resealed.clone()),
            ("managed_servers.api_token", resealed)
        ]
    );
    let again = rotating().rotate_keys().await.unwrap();
    assert_eq!(
        again["managed_servers.api_token"],
        Rotated {
            resealed: 0,
            current: 1
        }
    );
    // A can go.
    let b_now = store(TokenVault::new(Some(b.clone())));
    let opened = fleet_alerts::AlertStore::get_channel(&b_now, channel.id)
        .await
        .unwrap();
    assert_eq!(opened.unwrap().config, slack);
    assert_eq!(
        token_of(store(TokenVault::new(Some(b.clone())))).await,
        (Some("tok".to_owned()), None)
    );
    assert_eq!(
        b_only
            .key_ids_in_use()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [(b.id().to_owned(), 2)]
    );
}

/// A CA, and a certificate it signs for 127.0.0.1 and localhost: (CA PEM, cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// Whether a connection made with `url` is encrypted, or why none could be made.
async fn ssl_in_use(url: &str) -> Result<bool, String> {
    let pool = PgSettings::from_url(url)
        .pool()
        .map_err(|e| e.to_string())?;
    let client = pool.get().await.map_err(|e| {
        std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    })?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn tls_to_postgresql_in_every_mode() {
    let (ca, cert, key) = certificates();
    let (other_ca, ..) = certificates();
    let cluster = tokio::task::spawn_blocking(move || {
        let c = PrivateCluster::start();
        c.enable_ssl(&cert, &key);
        c
    })
    .await
    .unwrap();
    let dir = cluster.dir().to_owned();
    let (ca_file, wrong_file) = (dir.join("ca.pem"), dir.join("wrong-ca.pem"));
    std::fs::write(&ca_file, ca).unwrap();
    std::fs::write(&wrong_file, other_ca).unwrap();
    let base = cluster.url();
    let with = |q: &str| format!("{base}?{q}");

    assert_eq!(ssl_in_use(&with("sslmode=disable")).await, Ok(false));
    assert_eq!(
        ssl_in_use(&base).await,
        Ok(true),
        "prefer, the default, takes TLS when offered"
    );
    assert_eq!(ssl_in_use(&with("sslmode=require")).await, Ok(true));
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca_file.display());
    assert_eq!(ssl_in_use(&with(&verified)).await, Ok(true));
    // The same through POSTGRES_SSLMODE and POSTGRES_SSLROOTCERT's fields.
    let settings = PgSettings {
        sslmode: Some(fleet_pg::SslMode::VerifyFull),
        sslrootcert: Some(ca_file.clone()),
        ..PgSettings::from_url(base.clone())
    };
    let c = settings.pool().unwrap().get().await.unwrap();
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));

    // A certificate from another CA is refused, clearly.
    let wrong = format!("sslmode=verify-full&sslrootcert={}", wrong_file.display());
    let err = ssl_in_use(&with(&wrong)).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // Without the CA, the system's roots do not know it either.
    let err = ssl_in_use(&with("sslmode=verify-full")).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // A missing root file is a settings error naming it.
    let err = ssl_in_use(&with("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"))
        .await
        .unwrap_err();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[tokio::test]
async fn concurrent_health_and_metrics_writes_over_the_same_servers_never_deadlock() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(SystemClock)).await;
    store.ensure_partitions().await.unwrap();
    let ids = register(&store, 200).await;
    // The health writer and the metrics writer lock the same servers' rows, each batch in
    // its own (shuffled, reversed) order: both take them in id order, so neither waits on
    // the other in a cycle.
    let t0 = time::OffsetDateTime::now_utc();
    let health = {
        let (store, ids) = (store.clone(), ids.clone());
        tokio::spawn(async move {
            for round in 0..40i64 {
                let at = t0 + time::Duration::seconds(round);
                let mut batch: Vec<_> = ids
                    .iter()
                    .map(|id| check_at(*id, at, HealthStatus::Healthy))
                    .collect();
                let n = batch.len();
                batch.rotate_left((round as usize * 37) % n);
                store.record_health(&batch).await?;
            }
            Ok::<(), StoreError>(())
        })
    };
    let metrics = {
        let (store, ids) = (store.clone(), ids.clone());
        tokio::spawn(async move {
            for round in 0..40i64 {
                let at = t0 + time::Duration::seconds(round);
                let batch: Vec<_> = ids
                    .iter()
                    .rev()
                    .map(|id| {
                        MetricsRecord::Failure(fleet_core::MetricsFailure {
                            server_id: *id,
                            timestamp: at,
                            error: "refused".into(),
                            fence: None,
                        })
                    })
                    .collect();
                store.record_metrics(&batch).await?;
            }
            Ok::<(), StoreError>(())
        })
    };
    health.await.unwrap().unwrap();
    metrics.await.unwrap().unwrap();
    let client = store.pool().get().await.unwrap();
    let deadlocks: i64 = client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deadlocks, 0);
}
