//! The contract with the real node_exporter: Debian's `prometheus-node-exporter` (scripts/test
//! installs it) on a free loopback port, read by the real engine with the HTTP adapters. What
//! Fleet stores is checked against what node_exporter served a moment later, within a
//! tolerance; bad pages from fleet-sim are recorded failures beside it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fleet_core::{
    CancellationToken, HealthStatus, HealthWork, History, HistoryQuery, InMemoryStore, MetricsWork,
    NewServer, Registry, ServerId, ServerKind, SystemClock, WorkerConfig, WorkerKind,
};
use fleet_http::node_exporter;
use fleet_http::{HttpCollector, HttpConfig, HttpProbe};
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_exporter(args: &[&str]) -> (Exporter, String) {
    let path = std::env::var("FLEET_NODE_EXPORTER")
        .unwrap_or_else(|_| "/usr/bin/prometheus-node-exporter".into());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: scripts/test installs Debian's prometheus-node-exporter"
    );
    let port = free_port();
    let child = Command::new(&path)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node_exporter");
    let exporter = Exporter(child);
    let url = format!("http://127.0.0.1:{port}");
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            tokio::time::Instant::now() < end,
            "node_exporter did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (exporter, url)
}

async fn page(url: &str) -> node_exporter::NodeFigures {
    let body = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    node_exporter::parse(&body).unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < end,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node(name: &str, url: &str) -> NewServer {
    let mut new = NewServer::new(name, url);
    new.kind = ServerKind::NodeExporter;
    new
}

/// The fullest real disk of a page is at least as full as `/`, as `df` sees it.
#[tokio::test]
async fn the_fullest_disk_is_read_off_a_real_page() {
    let (_exporter, url) = start_exporter(&[]).await;
    let served = page(&url).await;
    let (mount, used) = served.fullest_disk.clone().expect("a real file system");
    let df = Command::new("df").args(["-P", "/"]).output().unwrap();
    let root: f64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap();
    assert!(used + 1.0 >= root, "{mount} at {used}%, / at {root}%");
    assert!((0.0..=100.0).contains(&used));
}

/// The engine reads a real node_exporter. Its file systems are left out (`--no-collector.
/// filesystem`): how full this machine's disks are must not decide the test (a full one makes
/// the host critical, and a critical host is not collected from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_node_exporter_is_read_through_the_engine() {
    let (_exporter, url) = start_exporter(&["--no-collector.filesystem"]).await;
    // Bad pages beside it: invalid text, 10 MiB, a 503.
    let fleet = SimFleet::start(SimConfig {
        count: 3,
        mix: "garbage=1,huge=1,http_error=1".parse::<Mix>().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let store = Arc::new(InMemoryStore::new());
    let host = store.create_server(node("host", &url)).await.unwrap().id;
    let mut bad: Vec<(ServerId, Behavior)> = Vec::new();
    for s in fleet.servers() {
        let id = store
            .create_server(node(s.name(), &s.api_url()))
            .await
            .unwrap()
            .id;
        bad.push((id, s.behavior()));
    }
    let config = |kind, ms| {
        WorkerConfig::builder(kind)
            .interval(Duration::from_millis(ms))
            .timeout(Duration::from_millis(900))
            .flush_interval(Duration::from_millis(20))
            .build()
            .unwrap()
    };
    let http = HttpConfig::default();
    let cancel = CancellationToken::new();
    let health = HealthWork::new(store.clone(), Arc::new(HttpProbe::new(&http).unwrap()))
        .worker(config(WorkerKind::Health, 1000), Arc::new(SystemClock))
        .spawn(cancel.clone());
    let metrics = MetricsWork::new(store.clone(), Arc::new(HttpCollector::new(&http).unwrap()))
        .worker(config(WorkerKind::Metrics, 1000), Arc::new(SystemClock))
        .spawn(cancel.clone());

    // Two samples of the host: the first has no CPU use (no previous page), the second has.
    let samples = || async {
        store
            .metrics_history(host, HistoryQuery::default())
            .await
            .unwrap()
    };
    wait_for(
        "two samples of the host",
        Duration::from_secs(30),
        async || {
            if samples().await.len() >= 2 {
                return true;
            }
            false
        },
    )
    .await;
    let served = page(&url).await;
    let all = samples().await;
    let (newest, oldest) = (&all[0].values, &all[all.len() - 1].values);
    assert_eq!(
        oldest.cpu_percent, None,
        "a first page stores no CPU use, not 0"
    );
    let cpu = newest.cpu_percent.expect("CPU use from two pages");
    assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    let near = |a: Option<f64>, b: Option<f64>, tolerance: f64| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= tolerance,
        (None, None) => true,
        _ => false,
    };
    assert!(
        near(newest.memory_percent, served.memory_percent(), 5.0),
        "memory {:?} against {:?}",
        newest.memory_percent,
        served.memory_percent()
    );
    assert!(
        near(
            newest.disk_percent,
            served.fullest_disk.as_ref().map(|d| d.1),
            1.0
        ),
        "disk {:?} against {:?}",
        newest.disk_percent,
        served.fullest_disk
    );
    let rx = newest.network_rx_bytes.expect("network counters") as f64;
    assert!(
        rx <= served.rx_bytes.unwrap() && rx > 0.0,
        "the counter only grows"
    );

    // Health: a complete page, judged by the thresholds, as the page itself says.
    let expected = match served.health().declared {
        Some(fleet_core::Declared::Critical) => HealthStatus::Critical,
        Some(fleet_core::Declared::Degraded) => HealthStatus::Degraded,
        _ => HealthStatus::Healthy,
    };
    wait_for("the host's health", Duration::from_secs(10), async || {
        store
            .get_server(host)
            .await
            .unwrap()
            .is_some_and(|s| s.health_status == Some(expected))
    })
    .await;
    // Bad pages are recorded failures; none stopped a cycle.
    for (id, behavior) in &bad {
        let checks = store
            .health_history(*id, HistoryQuery::default())
            .await
            .unwrap();
        assert!(
            checks
                .iter()
                .any(|c| !c.successful && c.error_message.is_some()),
            "{behavior}: {checks:?}"
        );
        let s = store.get_server(*id).await.unwrap().unwrap();
        assert_ne!(s.health_status, Some(HealthStatus::Healthy), "{behavior}");
    }
    cancel.cancel();
    health.stopped().await;
    metrics.stopped().await;
}
