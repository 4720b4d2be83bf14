//! The real engine with both HTTP adapters against fleet-sim over real sockets, in real time
//! with short intervals and deadlines. Waits are on conditions, bounded.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::{
    ApiToken, CancellationToken, HealthStatus, HealthWork, History, HistoryQuery, InMemoryStore,
    MetricsWork, NewServer, Registry, ServerFilter, SystemClock, WorkerConfig, WorkerKind,
    WorkerStats,
};
use fleet_http::{HttpCollector, HttpConfig, HttpProbe};
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_workers_watch_a_simulated_fleet() {
    let mix: Mix =
        "healthy=6,degraded=2,critical=2,host_critical=2,unreachable=2,hang=2,http_error=2,slow=4"
            .parse()
            .unwrap();
    let config = SimConfig {
        count: 20,
        mix,
        seed: 7,
        slow: (Duration::from_millis(20), Duration::from_millis(80)),
        ..Default::default()
    };
    let fleet = SimFleet::start(config).await.unwrap();
    let store = Arc::new(InMemoryStore::new());
    for s in fleet.servers() {
        store
            .create_server(
                NewServer::new(s.name(), s.api_url()).with_token(ApiToken::new(s.token())),
            )
            .await
            .unwrap();
    }
    let fast = |kind, interval_ms| {
        WorkerConfig::builder(kind)
            .interval(Duration::from_millis(interval_ms))
            .timeout(Duration::from_millis(400))
            .batch_size(5)
            .batch_delay(Duration::from_millis(20))
            .flush_interval(Duration::from_millis(20))
            .build()
            .unwrap()
    };
    let http = HttpConfig::default();
    let cancel = CancellationToken::new();
    let health = HealthWork::new(store.clone(), Arc::new(HttpProbe::new(&http).unwrap()))
        .worker(fast(WorkerKind::Health, 700), Arc::new(SystemClock))
        .spawn(cancel.clone());
    let metrics = MetricsWork::new(store.clone(), Arc::new(HttpCollector::new(&http).unwrap()))
        .worker(fast(WorkerKind::Metrics, 900), Arc::new(SystemClock))
        .spawn(cancel.clone());

    let hs = health.stats().clone();
    let ms = metrics.stats().clone();
    wait_for(
        "three health cycles written",
        Duration::from_secs(20),
        || {
            let s = hs.snapshot();
            s.cycles >= 3 && s.pending == 0
        },
    )
    .await;
    wait_for(
        "a metrics cycle with targets",
        Duration::from_secs(20),
        || {
            let s = ms.snapshot();
            s.cycles >= 1 && s.successful > 0 && s.pending == 0
        },
    )
    .await;

    // Every server's current health follows its behaviour.
    for s in fleet.servers() {
        let expected = match s.behavior() {
            Behavior::Healthy | Behavior::Slow => HealthStatus::Healthy,
            Behavior::Degraded => HealthStatus::Degraded,
            Behavior::Critical | Behavior::HostCritical | Behavior::HttpError => {
                HealthStatus::Critical
            }
            _ => HealthStatus::Unreachable,
        };
        let found = store
            .list_servers(&ServerFilter {
                search: Some(s.name().into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            found[0].health_status,
            Some(expected),
            "{} ({})",
            s.name(),
            s.behavior()
        );
        // One check per server per cycle, never two at once.
        assert!(
            s.stats().max_open <= 1,
            "{} saw {} requests at once",
            s.name(),
            s.stats().max_open
        );
    }

    // A behaviour change shows up as a transition within a cycle or two.
    let flipped = fleet
        .servers()
        .iter()
        .find(|s| s.behavior() == Behavior::Healthy)
        .unwrap()
        .clone();
    let id = store
        .list_servers(&ServerFilter {
            search: Some(flipped.name().into()),
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .id;
    flipped.set_behavior(Behavior::Critical);
    let store2 = store.clone();
    let mut latest = None;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while latest != Some(HealthStatus::Critical) {
        assert!(
            tokio::time::Instant::now() < end,
            "no transition to critical"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        latest = store2.get_server(id).await.unwrap().unwrap().health_status;
    }
    let history = store
        .health_history(id, HistoryQuery::default())
        .await
        .unwrap();
    assert!(history.iter().any(|c| c.status == HealthStatus::Healthy));
    assert_eq!(history[0].status, HealthStatus::Critical);

    cancel.cancel();
    let h = health.stopped().await;
    let m = metrics.stopped().await;
    assert_eq!((h.lost_results, m.lost_results), (0, 0));
    let s: WorkerStats = hs.snapshot();
    assert_eq!(s.pending, 0);
    assert_eq!(s.written, s.performed);
    // Hung and unreachable servers failed; the rest succeeded, whatever health they reported.
    assert!(s.failed > 0 && s.successful > 0);
    let m = ms.snapshot();
    assert!(m.values_collected >= 12 * m.successful, "{m:?}");
    fleet.shutdown().await;
}
