//! Test fakes: a scriptable probe and collector, a store that fails on demand, and clocks.
//!
//! Each fake answers per target name as scripted (ok, an error, slowly, or never) and records
//! what it was asked, so tests can check batches, concurrency and order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::memory::InMemoryStore;
use crate::model::{HealthCheck, MetricValues, MetricsRecord, ProbeTarget};
use crate::probe::{
    CollectError, HealthProbe, MetricsCollector, NotChecked, ProbeFailure, ProbeOutcome,
};
use crate::store::{Store, StoreError};
use crate::targets::Targets;
use fleet_wire::{ComponentHealth, HealthReport};

/// How a fake answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Script<T, E> {
    /// Answers at once.
    Ok(T),
    /// Fails at once.
    Err(E),
    /// Answers after a delay.
    Slow(Duration, Box<Script<T, E>>),
    /// Never answers.
    Never,
    /// Fleet fails to check through its own fault (a local resource ran out).
    NotChecked(NotChecked),
}

/// A health report with every component in `status`.
pub fn report(status: &str) -> HealthReport {
    let c = if ["ok", "healthy", "up", "pass"].contains(&status) {
        ComponentHealth::Healthy
    } else {
        ComponentHealth::Unhealthy(status.to_owned())
    };
    HealthReport {
        declared: None,
        database: c.clone(),
        redis: c,
        services_healthy: Some(true),
        components: Vec::new(),
    }
}

/// A report of a healthy server.
pub fn healthy() -> Script<HealthReport, ProbeFailure> {
    Script::Ok(report("ok"))
}

/// A report of a degraded server (`services.healthy` false).
pub fn degraded() -> Script<HealthReport, ProbeFailure> {
    let mut r = report("ok");
    r.services_healthy = Some(false);
    Script::Ok(r)
}

/// One call as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The target's name.
    pub name: String,
    /// When it started, in tokio time.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Recorder {
    calls: Vec<Call>,
    open: HashMap<String, u64>,
    max_open_per_target: u64,
    open_total: u64,
    max_open_total: u64,
}

/// The shared part of both fakes: the script table and the call record.
#[derive(Debug)]
struct Fake<T, E> {
    default: Script<T, E>,
    scripts: Mutex<HashMap<String, Script<T, E>>>,
    record: Mutex<Recorder>,
}

impl<T: Clone + Send + Sync, E: Clone + Send + Sync> Fake<T, E> {
    fn new(default: Script<T, E>) -> Self {
        Self {
            default,
            scripts: Mutex::default(),
            record: Mutex::default(),
        }
    }

    fn record(&self) -> MutexGuard<'_, Recorder> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, name: &str, script: Script<T, E>) {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), script);
    }

    async fn answer(&self, name: &str) -> Result<Result<T, E>, NotChecked> {
        let script = {
            let scripts = self.scripts.lock().unwrap_or_else(|e| e.into_inner());
            scripts
                .get(name)
                .cloned()
                .unwrap_or_else(|| self.default.clone())
        };
        {
            let mut r = self.record();
            r.calls.push(Call {
                name: name.to_owned(),
                at: Instant::now(),
            });
            let open = r.open.entry(name.to_owned()).or_default();
            *open += 1;
            let open = *open;
            r.max_open_per_target = r.max_open_per_target.max(open);
            r.open_total += 1;
            r.max_open_total = r.max_open_total.max(r.open_total);
        }
        // Closes the call also when the engine drops it at its deadline.
        struct Close<'a, T, E>(&'a Fake<T, E>, &'a str);
        impl<T, E> Drop for Close<'_, T, E> {
            fn drop(&mut self) {
                let mut r = self.0.record.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = r.open.get_mut(self.1) {
                    *n -= 1;
                }
                r.open_total -= 1;
            }
        }
        let _close = Close(self, name);
        let mut script = script;
        loop {
            match script {
                Script::Ok(v) => return Ok(Ok(v)),
                Script::Err(e) => return Ok(Err(e)),
                Script::NotChecked(why) => return Err(why),
                Script::Slow(d, next) => {
                    tokio::time::sleep(d).await;
                    script = *next;
                }
                Script::Never => std::future::pending::<()>().await,
            }
        }
    }
}

macro_rules! recorder_methods {
    () => {
        /// Every call so far, in start order.
        pub fn calls(&self) -> Vec<Call> {
            self.fake.record().calls.clone()
        }

        /// The names of every call so far, in start order.
        pub fn call_names(&self) -> Vec<String> {
            self.fake
                .record()
                .calls
                .iter()
                .map(|c| c.name.clone())
                .collect()
        }

        /// Calls of the target `name` so far.
        pub fn calls_of(&self, name: &str) -> usize {
            self.fake
                .record()
                .calls
                .iter()
                .filter(|c| c.name == name)
                .count()
        }

        /// The most calls open at once for any single target.
        pub fn max_open_per_target(&self) -> u64 {
            self.fake.record().max_open_per_target
        }

        /// The most calls open at once overall.
        pub fn max_open(&self) -> u64 {
            self.fake.record().max_open_total
        }

        /// Calls open now.
        pub fn open(&self) -> u64 {
            self.fake.record().open_total
        }
    };
}

/// A [`HealthProbe`] that answers as scripted per target name.
#[derive(Debug)]
pub struct ScriptedProbe {
    fake: Fake<HealthReport, ProbeFailure>,
    response_time: Duration,
}

impl ScriptedProbe {
    /// A probe answering `default` for every target without a script of its own.
    pub fn new(default: Script<HealthReport, ProbeFailure>) -> Self {
        Self {
            fake: Fake::new(default),
            response_time: Duration::from_millis(5),
        }
    }

    /// Scripts the answer for the target `name`.
    pub fn set(&self, name: &str, script: Script<HealthReport, ProbeFailure>) {
        self.fake.set(name, script);
    }

    recorder_methods!();
}

#[async_trait]
impl HealthProbe for ScriptedProbe {
    async fn probe(&self, target: &ProbeTarget, _deadline: Instant) -> ProbeOutcome {
        let started = Instant::now();
        match self.fake.answer(&target.name).await {
            Err(why) => ProbeOutcome::NotChecked(why),
            Ok(Ok(answer)) => ProbeOutcome::Report {
                answer,
                response_time: started.elapsed().max(self.response_time),
            },
            Ok(Err(failure)) => {
                let response_time = failure.responded().then(|| started.elapsed());
                ProbeOutcome::Failed {
                    failure,
                    response_time,
                }
            }
        }
    }
}

/// A [`MetricsCollector`] that answers as scripted per target name.
#[derive(Debug)]
pub struct ScriptedCollector {
    fake: Fake<MetricValues, CollectError>,
}

impl ScriptedCollector {
    /// A collector answering `default` for every target without a script of its own.
    pub fn new(default: Script<MetricValues, CollectError>) -> Self {
        Self {
            fake: Fake::new(default),
        }
    }

    /// Scripts the answer for the target `name`.
    pub fn set(&self, name: &str, script: Script<MetricValues, CollectError>) {
        self.fake.set(name, script);
    }

    recorder_methods!();
}

#[async_trait]
impl MetricsCollector for ScriptedCollector {
    async fn collect(
        &self,
        target: &ProbeTarget,
        _deadline: Instant,
    ) -> Result<MetricValues, CollectError> {
        self.fake.answer(&target.name).await?
    }
}

/// Wraps an [`InMemoryStore`]; writes (and, if asked, selections) fail while failing is on.
#[derive(Debug, Default)]
pub struct FailingStore {
    /// The store behind it.
    pub inner: Arc<InMemoryStore>,
    fail_writes: AtomicBool,
    fail_selects: AtomicBool,
    write_calls: AtomicU64,
    failed_writes: AtomicU64,
    batch_sizes: Mutex<Vec<usize>>,
}

impl FailingStore {
    /// Wraps `inner`, not failing.
    pub fn new(inner: Arc<InMemoryStore>) -> Self {
        Self {
            inner,
            ..Default::default()
        }
    }

    /// Turns failing writes on or off.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Turns failing selections on or off.
    pub fn fail_selects(&self, on: bool) {
        self.fail_selects.store(on, Ordering::SeqCst);
    }

    /// Write calls so far, failed or not.
    pub fn write_calls(&self) -> u64 {
        self.write_calls.load(Ordering::SeqCst)
    }

    /// Write calls that failed.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::SeqCst)
    }

    /// The size of every write call that succeeded.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.batch_sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write(&self, n: usize) -> Result<(), StoreError> {
        self.write_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_writes.load(Ordering::SeqCst) {
            self.failed_writes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::unavailable("connection refused (scripted)"));
        }
        self.batch_sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(n);
        Ok(())
    }

    fn select(&self) -> Result<(), StoreError> {
        if self.fail_selects.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("connection refused (scripted)"));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FailingStore {
    async fn health_targets(&self) -> Result<Targets, StoreError> {
        self.select()?;
        self.inner.health_targets().await
    }

    async fn metrics_targets(&self) -> Result<Targets, StoreError> {
        self.select()?;
        self.inner.metrics_targets().await
    }

    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        self.write(checks.len())?;
        self.inner.record_health(checks).await
    }

    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        self.write(records.len())?;
        self.inner.record_metrics(records).await
    }
}

/// A clock that shows what it is set to.
#[derive(Debug)]
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: OffsetDateTime) -> Self {
        Self(Mutex::new(at))
    }

    /// Sets the time.
    pub fn set(&self, at: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// Moves the time forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A wall clock that follows tokio's (possibly paused) time from a fixed start, so that
/// timestamps advance with `tokio::time::advance`.
#[derive(Debug)]
pub struct TokioClock {
    base: OffsetDateTime,
    start: Instant,
}

impl TokioClock {
    /// A clock showing `base` now.
    pub fn new(base: OffsetDateTime) -> Self {
        Self {
            base,
            start: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> OffsetDateTime {
        self.base + self.start.elapsed()
    }
}
