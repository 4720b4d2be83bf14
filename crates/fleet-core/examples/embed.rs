//! Embeds both workers in a host service of its own: a TCP-connect probe, the in-memory store,
//! a graceful stop on Ctrl-C or after three health cycles.
//!
//! Run: `cargo run -p fleet-core --example embed`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::{
    CancellationToken, CollectError, HealthProbe, HealthReport, HealthWork, InMemoryStore,
    MetricValues, MetricsCollector, MetricsWork, NewServer, ProbeFailure, ProbeOutcome,
    ProbeTarget, Registry, SystemClock, WorkerConfig, WorkerKind,
};
use tokio::time::Instant;

/// Healthy when a TCP connection opens, unreachable otherwise.
struct TcpConnect;

#[async_trait]
impl HealthProbe for TcpConnect {
    async fn probe(&self, target: &ProbeTarget, _deadline: Instant) -> ProbeOutcome {
        let addr = target.api_url.trim_start_matches("http://");
        let started = Instant::now();
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => ProbeOutcome::Report {
                answer: HealthReport::default(),
                response_time: started.elapsed(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => ProbeOutcome::Failed {
                failure: ProbeFailure::ConnectionRefused,
                response_time: None,
            },
            Err(e) => ProbeOutcome::Failed {
                failure: ProbeFailure::Connect(e.to_string()),
                response_time: None,
            },
        }
    }
}

/// Reports how many servers this host knows, as a stand-in for real metrics.
struct Constant;

#[async_trait]
impl MetricsCollector for Constant {
    async fn collect(&self, _: &ProbeTarget, _: Instant) -> Result<MetricValues, CollectError> {
        Ok(MetricValues {
            total_services: Some(1),
            active_services: Some(1),
            ..Default::default()
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_target(false).init();

    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let down_addr = down.local_addr()?;
    drop(down);

    let store = Arc::new(InMemoryStore::new());
    store
        .create_server(NewServer::new("up", format!("http://{}", up.local_addr()?)))
        .await?;
    store
        .create_server(NewServer::new("down", format!("http://{down_addr}")))
        .await?;

    let fast = |kind| {
        WorkerConfig::builder(kind)
            .interval(Duration::from_secs(1))
            .timeout(Duration::from_millis(500))
            .build()
    };
    let health = HealthWork::new(store.clone(), Arc::new(TcpConnect))
        .worker(fast(WorkerKind::Health)?, Arc::new(SystemClock));
    let metrics = MetricsWork::new(store.clone(), Arc::new(Constant))
        .worker(fast(WorkerKind::Metrics)?, Arc::new(SystemClock));

    let cancel = CancellationToken::new();
    let health = health.spawn(cancel.clone());
    let metrics = metrics.spawn(cancel.clone());

    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..100 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticks.tick() => if health.stats().snapshot().cycles >= 3 { break },
        }
    }
    cancel.cancel();
    let health_report = health.stopped().await;
    let metrics_report = metrics.stopped().await;
    println!("health: {health_report:?}, metrics: {metrics_report:?}");
    Ok(())
}
