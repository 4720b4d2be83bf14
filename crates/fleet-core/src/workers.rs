//! The two workers: health checks and metrics collection, as [`Work`] for the engine.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::classify::classify;
use crate::clock::Clock;
use crate::cluster::Fence;
use crate::engine::{CycleSummary, Tally, Work, Worker, WorkerConfig, WorkerKind};
use crate::events::Event;
use crate::model::{
    HealthCheck, HealthStatus, MetricsFailure, MetricsRecord, MetricsSample, Period, ProbeTarget,
    ServerId,
};
use crate::probe::{
    CollectError, HealthProbe, MetricsCollector, NotChecked, ProbeFailure, ProbeOutcome,
};
use crate::store::{Findings, StorageCheck, Store, StoreError};
use crate::targets::TargetRef;

/// Turns a probe's outcome into the health check that is stored; `Err` when Fleet could not
/// check, which stores nothing.
pub fn health_check(
    target: &ProbeTarget,
    timestamp: OffsetDateTime,
    outcome: ProbeOutcome,
) -> Result<HealthCheck, NotChecked> {
    let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    Ok(match outcome {
        ProbeOutcome::NotChecked(why) => return Err(why),
        ProbeOutcome::Report {
            answer,
            response_time,
        } => {
            let c = classify(&answer);
            HealthCheck {
                server_id: target.id,
                timestamp,
                status: c.status,
                response_time_ms: Some(millis(response_time)),
                database_healthy: c.database_healthy,
                redis_healthy: c.redis_healthy,
                services_healthy: c.services_healthy,
                error_message: c.error_message,
                error_details: c.error_details,
                responded: true,
                successful: true,
                fence: target.fence,
            }
        }
        ProbeOutcome::Failed {
            failure,
            response_time,
        } => failed_check(target.id, target.fence, timestamp, &failure, response_time),
    })
}

/// The cycle summary's warning: `1 critical (web-3), 2 unreachable (db-1, db-2)`, naming at
/// most [`HealthWork::ALERT_NAMES`] servers in all.
fn health_alert(s: &CycleSummary) -> String {
    let mut room = HealthWork::ALERT_NAMES;
    let mut parts = Vec::new();
    for status in [HealthStatus::Critical, HealthStatus::Unreachable] {
        let label = status.as_str();
        let count = s.count(label);
        if count == 0 {
            continue;
        }
        let names: Vec<&str> = s
            .names(label)
            .iter()
            .take(room)
            .map(String::as_str)
            .collect();
        room -= names.len();
        if names.is_empty() {
            parts.push(format!("{count} {label}"));
            continue;
        }
        let more = count as usize - names.len();
        let mut listed = names.join(", ");
        if more > 0 {
            listed.push_str(&format!(" and {more} more"));
        }
        parts.push(format!("{count} {label} ({listed})"));
    }
    parts.join(", ")
}

/// The stored check of a probe that failed.
fn failed_check(
    server_id: ServerId,
    fence: Option<Fence>,
    timestamp: OffsetDateTime,
    failure: &ProbeFailure,
    response_time: Option<Duration>,
) -> HealthCheck {
    HealthCheck {
        server_id,
        timestamp,
        status: failure.status(),
        response_time_ms: response_time.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        database_healthy: None,
        redis_healthy: None,
        services_healthy: None,
        error_message: Some(failure.to_string()),
        error_details: None,
        responded: failure.responded(),
        successful: false,
        fence,
    }
}

/// The health worker's work: probe every active server, stalest first.
///
/// When this process last started a scheduled check of each server it selects, in tokio time. A
/// scheduled check is due 0.9 x interval after the later of this and the store's record: the
/// store's lags while results wait in the buffer (after an outage, the first selection finds
/// the stored times stale by the whole outage), and this one is lost at a restart.
#[derive(Clone, Debug, Default)]
struct LastChecked(Arc<Mutex<Starts>>);

/// The starts, each in whole milliseconds after `base` (rounded up, so that an age is never
/// overstated and a check never comes early): 20 bytes a server where an `Instant` makes 32,
/// which at 100,000 servers is 1.6 MB less for each worker.
#[derive(Debug, Default)]
struct Starts {
    base: Option<Instant>,
    at: HashMap<ServerId, u32>,
}

impl Starts {
    /// How far `base` moves when an offset would no longer fit: starts older than that are
    /// forgotten, long past due by then.
    const REBASE: u32 = u32::MAX / 2;

    fn offset(&mut self, at: Instant) -> u32 {
        let base = *self.base.get_or_insert(at);
        let ms = at
            .saturating_duration_since(base)
            .as_nanos()
            .div_ceil(1_000_000);
        match u32::try_from(ms) {
            Ok(ms) => ms,
            Err(_) => {
                // Every 24 days or so: move the base on so that offsets fit again.
                let shift = u32::MAX - Self::REBASE;
                self.base = Some(base + Duration::from_millis(u64::from(shift)));
                self.at.retain(|_, ms| {
                    *ms = ms.saturating_sub(shift);
                    *ms > 0
                });
                self.offset(at)
            }
        }
    }

    fn get(&self, id: &ServerId) -> Option<Instant> {
        let ms = *self.at.get(id)?;
        Some(self.base? + Duration::from_millis(u64::from(ms)))
    }
}

impl LastChecked {
    fn lock(&self) -> std::sync::MutexGuard<'_, Starts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, id: ServerId, at: Instant) {
        let mut starts = self.lock();
        let ms = starts.offset(at);
        starts.at.insert(id, ms);
    }

    /// The shorter of the store's age and this process's.
    fn ago(&self, target: &TargetRef) -> Option<Duration> {
        let local = self.lock().get(&target.id()).map(|at| at.elapsed());
        match (target.checked_ago(), local) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets servers no longer selected, so the map stays the selection's size.
    fn keep(&self, selected: &HashSet<ServerId>) {
        self.lock().at.retain(|id, _| selected.contains(id));
    }
}

/// Clones share the last known health of every server whose health differs from the one its
/// target was selected with, from which each result's event takes its true previous health:
/// while the store is away the engine re-checks the last cycle's targets, whose selected
/// health is stale, and the same change must not be announced again. A server whose check
/// agrees with its selection has no entry, so a steady fleet keeps next to none.
#[derive(Clone)]
pub struct HealthWork {
    store: Arc<dyn Store>,
    probe: Arc<dyn HealthProbe>,
    known: Arc<Mutex<HashMap<ServerId, Option<HealthStatus>>>>,
    last: LastChecked,
}

impl std::fmt::Debug for HealthWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthWork").finish_non_exhaustive()
    }
}

impl HealthWork {
    /// The most servers the cycle summary's warning names.
    pub const ALERT_NAMES: usize = 5;

    /// Health work reading targets from and writing results to `store`.
    pub fn new(store: Arc<dyn Store>, probe: Arc<dyn HealthProbe>) -> Self {
        Self {
            store,
            probe,
            known: Arc::default(),
            last: LastChecked::default(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<ServerId, Option<HealthStatus>>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A health worker with `config`.
    pub fn worker(self, config: WorkerConfig, clock: Arc<dyn Clock>) -> Worker<Self> {
        Worker::new(self, config, clock)
    }
}

#[async_trait]
impl Work for HealthWork {
    type Target = TargetRef;
    type Output = HealthCheck;

    fn kind(&self) -> WorkerKind {
        WorkerKind::Health
    }

    async fn select(&self) -> Result<Vec<TargetRef>, StoreError> {
        let targets = self.store.health_targets().await?;
        // Forget servers that are no longer probed, so the map stays the fleet's size.
        let selected: HashSet<ServerId> = targets.ids().collect();
        {
            let mut known = self.known();
            // What the store now says needs no entry of its own.
            for i in 0..targets.len() {
                let id = targets.id(i);
                if known.get(&id) == Some(&targets.health(i)) {
                    known.remove(&id);
                }
            }
            known.retain(|id, _| selected.contains(id));
        }
        self.last.keep(&selected);
        Ok(targets.into_refs())
    }

    fn name<'a>(&self, target: &'a TargetRef) -> &'a str {
        target.name()
    }

    fn checked_ago(&self, target: &TargetRef) -> Option<Duration> {
        self.last.ago(target)
    }

    fn started(&self, target: &TargetRef, at: Instant) {
        self.last.record(target.id(), at);
    }

    async fn run(
        &self,
        target: &TargetRef,
        started: OffsetDateTime,
        deadline: Instant,
    ) -> Result<HealthCheck, NotChecked> {
        // Unpacked for this check only, and dropped with it.
        let target = target.to_target();
        if let Some(key_id) = &target.unreadable_token {
            return Err(NotChecked::TokenUnreadable {
                key_id: key_id.clone(),
            });
        }
        let outcome = self.probe.probe(&target, deadline).await;
        let check = health_check(&target, started, outcome)?;
        if !check.successful {
            tracing::debug!(target: "fleet::health", server = %target.name, error = check.error_message.as_deref().unwrap_or(""), "health check of {} failed", target.name);
        }
        Ok(check)
    }

    fn timed_out(
        &self,
        target: &TargetRef,
        started: OffsetDateTime,
        after: Duration,
    ) -> HealthCheck {
        failed_check(
            target.id(),
            target.fence(),
            started,
            &ProbeFailure::Timeout { after },
            None,
        )
    }

    fn tally(&self, output: &HealthCheck) -> Tally {
        Tally {
            successful: output.successful,
            label: output.status.as_str(),
        }
    }

    fn event(&self, target: &TargetRef, check: &HealthCheck, manual: bool) -> Event {
        let previous = {
            let mut known = self.known();
            let previous = known.get(&target.id()).copied().unwrap_or(target.health());
            if target.health() == Some(check.status) {
                known.remove(&target.id());
            } else {
                known.insert(target.id(), Some(check.status));
            }
            previous
        };
        let name = target.name();
        match previous {
            // A server's first check is recorded in the change log but not logged at info:
            // at start-up that would be one line per server of the fleet.
            None => {
                tracing::debug!(target: "fleet::health", server = %name, to = check.status.as_str(), "{}: first checked, {}", name, check.status)
            }
            Some(from) if from != check.status => {
                let (from, to) = (from.as_str(), check.status.as_str());
                match &check.error_message {
                    Some(error) => {
                        tracing::info!(target: "fleet::health", server = %name, from, to, error = %error, "{}: {from} → {to} ({error})", name)
                    }
                    None => {
                        tracing::info!(target: "fleet::health", server = %name, from, to, "{}: {from} → {to}", name)
                    }
                }
            }
            Some(_) => {}
        }
        Event::Checked {
            server: name.to_owned(),
            check: check.clone(),
            previous,
            manual,
        }
    }

    async fn record(&self, batch: &[HealthCheck]) -> Result<(), StoreError> {
        self.store.record_health(batch).await
    }

    fn result_size(c: &HealthCheck) -> usize {
        std::mem::size_of::<HealthCheck>()
            + c.error_message.as_ref().map_or(0, String::len)
            + c.error_details.as_ref().map_or(0, |d| d.to_string().len())
    }

    fn log_start(&self, targets: usize) {
        tracing::info!(target: "fleet::health", targets, "Starting health checks for {targets} servers");
    }

    fn log_summary(&self, s: &CycleSummary) {
        let [healthy, degraded, critical, unreachable] = [
            HealthStatus::Healthy,
            HealthStatus::Degraded,
            HealthStatus::Critical,
            HealthStatus::Unreachable,
        ]
        .map(|h| s.count(h.as_str()));
        tracing::info!(
            target: "fleet::health",
            checked = s.completed,
            seconds = s.duration.as_secs_f64(),
            healthy, degraded, critical, unreachable,
            "Health checks complete: {} servers checked in {:.2}s (✓{healthy} 🔶{degraded} ⚠️{critical} ❌{unreachable})",
            s.completed,
            s.duration.as_secs_f64(),
        );
        if critical + unreachable > 0 {
            tracing::warn!(
                target: "fleet::health",
                critical, unreachable,
                "Fleet health alert: {}",
                health_alert(s),
            );
        }
    }
}

/// The metrics worker's work: collect from healthy and degraded servers, most recently seen
/// first.
#[derive(Clone)]
pub struct MetricsWork {
    store: Arc<dyn Store>,
    collector: Arc<dyn MetricsCollector>,
    storage_check: Option<Arc<dyn StorageCheck>>,
    last: LastChecked,
}

impl std::fmt::Debug for MetricsWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsWork")
            .field("storage_check", &self.storage_check.is_some())
            .finish_non_exhaustive()
    }
}

impl MetricsWork {
    /// Metrics work reading targets from and writing results to `store`.
    pub fn new(store: Arc<dyn Store>, collector: Arc<dyn MetricsCollector>) -> Self {
        Self {
            store,
            collector,
            storage_check: None,
            last: LastChecked::default(),
        }
    }

    /// Runs `check` after each cycle, as the seed's partition health check did.
    pub fn with_storage_check(mut self, check: Arc<dyn StorageCheck>) -> Self {
        self.storage_check = Some(check);
        self
    }

    /// A metrics worker with `config`.
    pub fn worker(self, config: WorkerConfig, clock: Arc<dyn Clock>) -> Worker<Self> {
        Worker::new(self, config, clock)
    }

    fn failure(
        &self,
        target: &TargetRef,
        started: OffsetDateTime,
        error: CollectError,
    ) -> MetricsRecord {
        let name = target.name();
        tracing::warn!(target: "fleet::metrics", server = %name, error = %error, "metrics collection from {name} failed: {error}");
        MetricsRecord::Failure(MetricsFailure {
            server_id: target.id(),
            timestamp: started,
            error: error.to_string(),
            fence: target.fence(),
        })
    }
}

#[async_trait]
impl Work for MetricsWork {
    type Target = TargetRef;
    type Output = MetricsRecord;

    fn kind(&self) -> WorkerKind {
        WorkerKind::Metrics
    }

    async fn select(&self) -> Result<Vec<TargetRef>, StoreError> {
        let targets = self.store.metrics_targets().await?;
        self.last.keep(&targets.ids().collect());
        Ok(targets.into_refs())
    }

    fn name<'a>(&self, target: &'a TargetRef) -> &'a str {
        target.name()
    }

    fn checked_ago(&self, target: &TargetRef) -> Option<Duration> {
        self.last.ago(target)
    }

    fn started(&self, target: &TargetRef, at: Instant) {
        self.last.record(target.id(), at);
    }

    async fn run(
        &self,
        handle: &TargetRef,
        started: OffsetDateTime,
        deadline: Instant,
    ) -> Result<MetricsRecord, NotChecked> {
        // Unpacked for this collection only, and dropped with it.
        let target = handle.to_target();
        if let Some(key_id) = &target.unreadable_token {
            return Err(NotChecked::TokenUnreadable {
                key_id: key_id.clone(),
            });
        }
        match self.collector.collect(&target, deadline).await {
            Ok(values) => Ok(MetricsRecord::Sample(MetricsSample {
                server_id: target.id,
                timestamp: started,
                period: Period::Raw,
                values,
                fence: target.fence,
            })),
            Err(CollectError::NotChecked(why)) => Err(why),
            Err(e) => Ok(self.failure(handle, started, e)),
        }
    }

    fn timed_out(
        &self,
        target: &TargetRef,
        started: OffsetDateTime,
        after: Duration,
    ) -> MetricsRecord {
        self.failure(target, started, CollectError::Timeout { after })
    }

    fn tally(&self, output: &MetricsRecord) -> Tally {
        match output {
            MetricsRecord::Sample(_) => Tally {
                successful: true,
                label: "collected",
            },
            MetricsRecord::Failure(_) => Tally {
                successful: false,
                label: "failed",
            },
        }
    }

    fn event(&self, target: &TargetRef, record: &MetricsRecord, _manual: bool) -> Event {
        Event::Collected {
            server: target.name().to_owned(),
            record: record.clone(),
        }
    }

    async fn record(&self, batch: &[MetricsRecord]) -> Result<(), StoreError> {
        self.store.record_metrics(batch).await
    }

    fn result_size(r: &MetricsRecord) -> usize {
        std::mem::size_of::<MetricsRecord>()
            + match r {
                MetricsRecord::Sample(_) => 0,
                MetricsRecord::Failure(f) => f.error.len(),
            }
    }

    fn stored_values(&self, batch: &[MetricsRecord]) -> u64 {
        batch
            .iter()
            .map(|r| match r {
                MetricsRecord::Sample(s) => s.values.count(),
                MetricsRecord::Failure(_) => 0,
            })
            .sum()
    }

    fn log_start(&self, targets: usize) {
        tracing::info!(target: "fleet::metrics", targets, "Starting metrics collection for {targets} servers");
    }

    fn log_summary(&self, s: &CycleSummary) {
        tracing::info!(
            target: "fleet::metrics",
            collected = s.successful,
            failed = s.failed,
            seconds = s.duration.as_secs_f64(),
            "Metrics collection complete: {} servers in {:.2}s (✓{} ❌{})",
            s.completed,
            s.duration.as_secs_f64(),
            s.successful,
            s.failed,
        );
        if s.failed > 0 {
            tracing::warn!(target: "fleet::metrics", failed = s.failed, "Failed to collect metrics from: {}", s.failed_list());
        }
    }

    async fn after_cycle(&self) -> Option<Result<Findings, StoreError>> {
        let check = self.storage_check.as_ref()?;
        let found = check.check_storage().await;
        match &found {
            Ok(findings) => {
                for finding in findings {
                    tracing::error!(target: "fleet::metrics", "{finding}");
                }
            }
            Err(e) => {
                tracing::error!(target: "fleet::metrics", error = %e, "storage check failed: {e}")
            }
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(counts: &[(&'static str, u64)], names: &[(&'static str, &[&str])], expected: &str) {
        let summary = CycleSummary {
            by_label: counts.iter().copied().collect(),
            names_by_label: names
                .iter()
                .map(|(l, n)| (*l, n.iter().map(|s| (*s).to_owned()).collect()))
                .collect(),
            ..Default::default()
        };
        assert_eq!(health_alert(&summary), expected);
    }

    /// One scheduled check of every selected server, its event taken and its result stored.
    async fn health_cycle(work: &HealthWork) -> Vec<Event> {
        let targets = work.select().await.unwrap();
        let mut events = Vec::new();
        let mut checks = Vec::new();
        for t in &targets {
            let deadline = Instant::now() + Duration::from_secs(5);
            let check = work
                .run(t, OffsetDateTime::now_utc(), deadline)
                .await
                .unwrap();
            events.push(work.event(t, &check, false));
            checks.push(check);
        }
        work.record(&checks).await.unwrap();
        events
    }

    #[tokio::test]
    async fn only_servers_whose_health_the_store_does_not_know_yet_are_remembered() {
        use crate::store::Registry;
        use crate::testing::{ScriptedProbe, healthy};
        use crate::{InMemoryStore, NewServer};
        let memory = Arc::new(InMemoryStore::new());
        for i in 0..3 {
            memory
                .create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
                .await
                .unwrap();
        }
        let probe = Arc::new(ScriptedProbe::new(healthy()));
        let work = HealthWork::new(memory.clone(), probe.clone());
        let previous = |events: &[Event]| -> Vec<Option<HealthStatus>> {
            events
                .iter()
                .map(|e| match e {
                    Event::Checked { previous, .. } => *previous,
                    other => panic!("not a check: {other:?}"),
                })
                .collect()
        };
        // First checks: the selection knew no health, so each is remembered until the store
        // has it.
        assert_eq!(previous(&health_cycle(&work).await), [None; 3]);
        assert_eq!(work.known().len(), 3);
        // The store now agrees: the next selection forgets them, and steady checks add none.
        assert_eq!(
            previous(&health_cycle(&work).await),
            [Some(HealthStatus::Healthy); 3]
        );
        assert!(work.known().is_empty(), "{:?}", work.known());
        // A change is remembered until a selection shows it stored.
        probe.set(
            "s1",
            crate::testing::Script::Err(ProbeFailure::Connect("refused".into())),
        );
        let targets = work.select().await.unwrap();
        assert!(work.known().is_empty());
        let t = targets.iter().find(|t| t.name() == "s1").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let check_s1 = || async {
            work.run(t, OffsetDateTime::now_utc(), deadline)
                .await
                .unwrap()
        };
        let check = check_s1().await;
        assert_eq!(
            previous(&[work.event(t, &check, false)]),
            [Some(HealthStatus::Healthy)]
        );
        assert_eq!(work.known().len(), 1);
        // Checked again from the same (stale) selection: the change is not announced twice.
        let again = check_s1().await;
        assert_eq!(
            previous(&[work.event(t, &again, false)]),
            [Some(again.status)]
        );
        work.record(&[check, again]).await.unwrap();
        work.select().await.unwrap();
        assert!(work.known().is_empty(), "the store has it now");
    }

    #[test]
    fn starts_are_kept_to_the_millisecond_and_never_overstate_an_age() {
        let mut starts = Starts::default();
        let t0 = Instant::now();
        let (a, b) = (ServerId::new(), ServerId::new());
        let ms = starts.offset(t0);
        starts.at.insert(a, ms);
        let later = t0 + Duration::from_micros(2_500_100);
        let ms = starts.offset(later);
        starts.at.insert(b, ms);
        assert_eq!(starts.get(&a), Some(t0));
        // Rounded up: the start is taken as at most a millisecond later than it was.
        assert_eq!(starts.get(&b), Some(t0 + Duration::from_millis(2_501)));
        assert_eq!(starts.get(&ServerId::new()), None);
    }

    #[test]
    fn starts_past_what_a_u32_holds_move_the_base_and_forget_the_oldest() {
        let mut starts = Starts::default();
        let t0 = Instant::now();
        let (old, recent, new) = (ServerId::new(), ServerId::new(), ServerId::new());
        let ms = starts.offset(t0);
        starts.at.insert(old, ms);
        let day = Duration::from_secs(86_400);
        let recent_at = t0 + day * 40;
        let ms = starts.offset(recent_at);
        starts.at.insert(recent, ms);
        // 60 days after the base: beyond u32 milliseconds (49.7 days).
        let new_at = t0 + day * 60;
        let ms = starts.offset(new_at);
        starts.at.insert(new, ms);
        assert_eq!(starts.get(&old), None, "a start 60 days old is forgotten");
        assert_eq!(starts.get(&recent), Some(recent_at));
        assert_eq!(starts.get(&new), Some(new_at));
    }

    #[test]
    fn the_cycle_warning_names_at_most_five_servers() {
        check(
            &[("critical", 1), ("unreachable", 1), ("healthy", 9)],
            &[("critical", &["web-3"]), ("unreachable", &["db-1"])],
            "1 critical (web-3), 1 unreachable (db-1)",
        );
        check(
            &[("unreachable", 7)],
            &[("unreachable", &["a", "b", "c", "d", "e"])],
            "7 unreachable (a, b, c, d, e and 2 more)",
        );
        check(
            &[("critical", 4), ("unreachable", 3)],
            &[
                ("critical", &["c1", "c2", "c3", "c4"]),
                ("unreachable", &["u1", "u2", "u3"]),
            ],
            "4 critical (c1, c2, c3, c4), 3 unreachable (u1 and 2 more)",
        );
        check(
            &[("critical", 6), ("unreachable", 2)],
            &[
                ("critical", &["c1", "c2", "c3", "c4", "c5"]),
                ("unreachable", &["u1", "u2"]),
            ],
            "6 critical (c1, c2, c3, c4, c5 and 1 more), 2 unreachable",
        );
    }
}
