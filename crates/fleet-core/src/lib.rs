//! Fleet's core: domain types, the four traits, the scheduling engine and both workers.
//!
//! Core knows no database driver, HTTP client or environment variable. Adapters implement
//! [`HealthProbe`], [`MetricsCollector`] and [`Store`]; a host service builds the two workers
//! from them and runs them until a cancellation token fires.
//!
//! # Embedding
//!
//! A host service with its own probe (here: can a TCP connection be opened?), the in-memory
//! store and both workers, stopped gracefully. The same program is `examples/embed.rs`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use async_trait::async_trait;
//! use fleet_core::{
//!     CollectError, HealthReport, HealthProbe, HealthWork, InMemoryStore, MetricValues,
//!     MetricsCollector, MetricsWork, NewServer, ProbeFailure, ProbeOutcome, ProbeTarget,
//!     Registry, SystemClock, WorkerConfig, WorkerKind,
//! };
//! use tokio::time::Instant;
//! use tokio_util::sync::CancellationToken;
//!
//! /// Healthy when a TCP connection opens, unreachable otherwise.
//! struct TcpConnect;
//!
//! #[async_trait]
//! impl HealthProbe for TcpConnect {
//!     async fn probe(&self, target: &ProbeTarget, _deadline: Instant) -> ProbeOutcome {
//!         let addr = target.api_url.trim_start_matches("http://");
//!         let started = Instant::now();
//!         match tokio::net::TcpStream::connect(addr).await {
//!             Ok(_) => ProbeOutcome::Report {
//!                 answer: HealthReport::default(),
//!                 response_time: started.elapsed(),
//!             },
//!             Err(e) => ProbeOutcome::Failed {
//!                 failure: ProbeFailure::Connect(e.to_string()),
//!                 response_time: None,
//!             },
//!         }
//!     }
//! }
//!
//! /// This host has no metrics to collect.
//! struct NoMetrics;
//!
//! #[async_trait]
//! impl MetricsCollector for NoMetrics {
//!     async fn collect(&self, _: &ProbeTarget, _: Instant) -> Result<MetricValues, CollectError> {
//!         Ok(MetricValues::default())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let store = Arc::new(InMemoryStore::new());
//! store.create_server(NewServer::new("local", format!("http://{}", listener.local_addr()?))).await?;
//!
//! let config = WorkerConfig::builder(WorkerKind::Health)
//!     .interval(Duration::from_secs(1))
//!     .timeout(Duration::from_millis(500))
//!     .build()?;
//! let health = HealthWork::new(store.clone(), Arc::new(TcpConnect))
//!     .worker(config, Arc::new(SystemClock));
//! let metrics = MetricsWork::new(store.clone(), Arc::new(NoMetrics))
//!     .worker(WorkerConfig::defaults(WorkerKind::Metrics), Arc::new(SystemClock));
//!
//! let cancel = CancellationToken::new();
//! let health = health.spawn(cancel.clone());
//! let metrics = metrics.spawn(cancel.clone());
//! // Wait (bounded) for the first health cycle.
//! for _ in 0..100 {
//!     if health.stats().snapshot().cycles > 0 { break; }
//!     tokio::time::sleep(Duration::from_millis(20)).await;
//! }
//! cancel.cancel();
//! let report = health.stopped().await;
//! metrics.stopped().await;
//! assert_eq!(report.lost_results, 0);
//! # Ok(())
//! # }
//! ```

mod classify;
mod clock;
pub mod cluster;
mod engine;
mod events;
mod memory;
mod model;
mod probe;
pub mod rollup;
pub mod series;
mod store;
mod targets;
pub mod validate;
mod workers;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use classify::{Classification, classify};
pub use clock::{Clock, SystemClock};
pub use engine::{
    CatchUp, CheckError, ConfigError, CycleSummary, ShutdownReport, StatsHandle, Tally, Work,
    Worker, WorkerConfig, WorkerConfigBuilder, WorkerHandle, WorkerKind, WorkerStats, check_now,
    check_once,
};
pub use events::{Event, EventStats, Events, Problem, Received, SubscriberStats, Subscription};
pub use fleet_wire::{ComponentHealth, Declared, HealthReport, MetricsError, NotAnObject};
pub use memory::InMemoryStore;
pub use model::{
    ApiToken, GroupFields, GroupId, HealthCheck, HealthStatus, LlmSummary, LlmUsage, ManagedServer,
    MetricValues, MetricsFailure, MetricsRecord, MetricsSample, NewServer, ParseEnumError, Period,
    ProbeTarget, Role, ServerGroup, ServerId, ServerKind, ServerStatus, ServerUpdate, StateChange,
    TokenRecord, counter_increase,
};
pub use probe::{
    CollectError, HealthProbe, MetricsCollector, NotChecked, ProbeFailure, ProbeOutcome,
};
pub use rollup::{HealthRollup, MetricsRollup, Resolution, Tiers};
pub use series::{HealthBucket, MetricsBucket, SeriesWindow};
pub use store::{
    AdminTokens, BoxError, ChangeLog, ChangeQuery, Counts, Findings, Groups, History, HistoryQuery,
    Ping, Registry, ServerFilter, ServerSort, ServerTally, SessionRecord, Sessions, SortKey,
    StorageCheck, Store, StoreError, health_rank,
};
pub use targets::{TargetRef, Targets};
pub use workers::{HealthWork, MetricsWork, health_check};

/// The cancellation token the engine stops on, re-exported so hosts need not name tokio-util.
pub use tokio_util::sync::CancellationToken;
