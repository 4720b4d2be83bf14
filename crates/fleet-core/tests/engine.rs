//! Engine behaviour on the fakes, in paused tokio time.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::testing::{
    FailingStore, Script, ScriptedCollector, ScriptedProbe, TokioClock, degraded, healthy, report,
};
use fleet_core::{
    CancellationToken, CollectError, Event, Events, HealthStatus, HealthWork, History,
    HistoryQuery, InMemoryStore, MetricValues, MetricsError, MetricsWork, NewServer, NotChecked,
    ProbeFailure, Problem, Received, Registry, ServerId, ShutdownReport, Store, Subscription,
    WorkerConfig, WorkerConfigBuilder, WorkerHandle, WorkerKind, WorkerStats,
};
use time::macros::datetime;
use tokio::time::{Instant, sleep};

const SEC: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Rig {
    memory: Arc<InMemoryStore>,
    store: Arc<FailingStore>,
    probe: Arc<ScriptedProbe>,
    collector: Arc<ScriptedCollector>,
    ids: Vec<ServerId>,
    cancel: CancellationToken,
    events: Events,
    t0: Instant,
}

fn name(i: usize) -> String {
    format!("s{i:03}")
}

impl Rig {
    async fn new(servers: usize) -> Self {
        let memory = Arc::new(InMemoryStore::new());
        let mut ids = Vec::new();
        for i in 0..servers {
            ids.push(
                memory
                    .create_server(NewServer::new(name(i), "http://127.0.0.1:9"))
                    .await
                    .unwrap()
                    .id,
            );
        }
        Self {
            store: Arc::new(FailingStore::new(memory.clone())),
            memory,
            probe: Arc::new(ScriptedProbe::new(healthy())),
            collector: Arc::new(ScriptedCollector::new(Script::Ok(MetricValues {
                cpu_percent: Some(10.0),
                llm_requests: Some(1),
                ..Default::default()
            }))),
            ids,
            cancel: CancellationToken::new(),
            events: Events::new(),
            t0: Instant::now(),
        }
    }

    fn clock() -> Arc<TokioClock> {
        Arc::new(TokioClock::new(datetime!(2026-11-28 06:00:00 UTC)))
    }

    fn health(&mut self, config: WorkerConfigBuilder) -> WorkerHandle {
        let work = HealthWork::new(self.store.clone(), self.probe.clone());
        self.t0 = Instant::now();
        work.worker(config.build().unwrap(), Self::clock())
            .with_events(self.events.clone())
            .spawn(self.cancel.clone())
    }

    fn metrics(&mut self, config: WorkerConfigBuilder) -> WorkerHandle {
        let work = MetricsWork::new(self.store.clone(), self.collector.clone());
        self.t0 = Instant::now();
        work.worker(config.build().unwrap(), Self::clock())
            .with_events(self.events.clone())
            .spawn(self.cancel.clone())
    }

    /// Start times of the probe's calls, relative to the worker's start, in milliseconds.
    fn probe_starts(&self) -> Vec<u128> {
        self.probe
            .calls()
            .iter()
            .map(|c| (c.at - self.t0).as_millis())
            .collect()
    }

    async fn stop(&self, handle: WorkerHandle) -> (ShutdownReport, WorkerStats) {
        self.cancel.cancel();
        let stats = handle.stats().clone();
        let report = handle.stopped().await;
        (report, stats.snapshot())
    }

    /// Records the servers `ids` healthy once: the metrics worker then collects from them,
    /// and the health worker checks them after the never-checked ones.
    async fn record_healthy(&self, ids: &[ServerId]) {
        let checks: Vec<_> = ids
            .iter()
            .map(|id| {
                fleet_core::conformance::check_at(
                    *id,
                    fleet_core::conformance::base_time(),
                    HealthStatus::Healthy,
                )
            })
            .collect();
        self.store.record_health(&checks).await.unwrap();
    }

    async fn history_len(&self) -> usize {
        let mut n = 0;
        for id in &self.ids {
            n += self
                .memory
                .health_history(
                    *id,
                    HistoryQuery {
                        limit: 10_000,
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .len();
        }
        n
    }
}

fn health() -> WorkerConfigBuilder {
    WorkerConfig::builder(WorkerKind::Health)
}

/// Sleeps in paused time until `cond` holds, at most `limit`.
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "condition not met within {limit:?}");
        sleep(ms(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn batches_start_together_and_delay_apart() {
    let mut rig = Rig::new(25).await;
    let h = rig.health(health().batch_size(10).batch_delay(ms(500)));
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    let starts = rig.probe_starts();
    assert_eq!(starts, [vec![0; 10], vec![500; 10], vec![1000; 5]].concat());
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_server_does_not_delay_the_next_batch() {
    let mut rig = Rig::new(20).await;
    for i in 0..10 {
        rig.probe.set(&name(i), Script::Never);
    }
    // The other ten were checked before, so the ten never-checked hung ones go first.
    rig.record_healthy(&rig.ids[10..]).await;
    let h = rig.health(
        health()
            .batch_size(10)
            .batch_delay(ms(500))
            .timeout(5 * SEC),
    );
    wait_until(10 * SEC, || h.stats().snapshot().cycles == 1).await;
    assert_eq!(rig.probe_starts(), [vec![0; 10], vec![500; 10]].concat());
    let s = h.stats().snapshot();
    // The ten hung checks end at their deadline; the cycle takes the deadline, not 10 of them.
    assert_eq!(s.last_duration_seconds, Some(5.0));
    assert_eq!(s.by_status.get("unreachable"), Some(&10));
    assert_eq!(s.by_status.get("healthy"), Some(&10));
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn max_in_flight_holds_across_batches() {
    let mut rig = Rig::new(30).await;
    for i in 0..30 {
        rig.probe
            .set(&name(i), Script::Slow(2 * SEC, Box::new(healthy())));
    }
    let h = rig.health(
        health()
            .batch_size(10)
            .batch_delay(ms(100))
            .max_in_flight(4),
    );
    wait_until(60 * SEC, || h.stats().snapshot().cycles == 1).await;
    assert_eq!(rig.probe.max_open(), 4);
    assert_eq!(h.stats().snapshot().performed, 30);
    // 30 checks of 2 s, 4 at a time: 8 waves.
    assert_eq!(h.stats().snapshot().last_duration_seconds, Some(16.0));
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn deadlines_fire_and_are_recorded_as_timeouts() {
    let mut rig = Rig::new(2).await;
    rig.probe.set("s000", Script::Never);
    rig.probe
        .set("s001", Script::Slow(3 * SEC, Box::new(healthy())));
    let h = rig.health(health().timeout(2 * SEC));
    wait_until(10 * SEC, || h.stats().snapshot().written == 2).await;
    for id in &rig.ids {
        let checks = rig
            .memory
            .health_history(*id, HistoryQuery::default())
            .await
            .unwrap();
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, HealthStatus::Unreachable);
        assert_eq!(checks[0].error_message.as_deref(), Some("timeout after 2s"));
        assert!(!checks[0].successful && !checks[0].responded);
    }
    assert_eq!(h.stats().snapshot().last_duration_seconds, Some(2.0));
    assert_eq!(rig.probe.open(), 0, "timed-out probes were dropped");
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn cycles_keep_a_start_to_start_cadence() {
    let mut rig = Rig::new(1).await;
    rig.probe
        .set("s000", Script::Slow(3 * SEC, Box::new(healthy())));
    let h = rig.health(health().interval(10 * SEC).timeout(5 * SEC));
    wait_until(35 * SEC, || h.stats().snapshot().cycles == 4).await;
    assert_eq!(rig.probe_starts(), [0, 10_000, 20_000, 30_000]);
    assert_eq!(h.stats().snapshot().overruns, 0);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_phase_delays_the_first_cycle_and_the_grid_keeps_it() {
    let mut rig = Rig::new(1).await;
    let h = rig.health(health().interval(10 * SEC).timeout(5 * SEC).phase(3 * SEC));
    wait_until(SEC, || h.stats().snapshot().running).await;
    assert!(
        rig.probe_starts().is_empty(),
        "running before its first cycle"
    );
    wait_until(35 * SEC, || h.stats().snapshot().cycles == 3).await;
    assert_eq!(rig.probe_starts(), [3_000, 13_000, 23_000]);
    rig.stop(h).await;
    let refused = health()
        .interval(10 * SEC)
        .timeout(5 * SEC)
        .phase(10 * SEC)
        .build();
    assert_eq!(refused.unwrap_err().setting, "phase");
}

#[tokio::test(start_paused = true)]
async fn an_overrunning_cycle_counts_missed_ticks_and_never_overlaps() {
    let mut rig = Rig::new(25).await;
    // 25 batches of one, 1 s apart and held fixed: a cycle takes 24 s plus the last check
    // (1 s), in a 10 s interval.
    for i in 0..25 {
        rig.probe
            .set(&name(i), Script::Slow(SEC, Box::new(healthy())));
    }
    let h = rig.health(
        health()
            .interval(10 * SEC)
            .timeout(5 * SEC)
            .batch_size(1)
            .batch_delay(SEC)
            .fixed_batch_delay(true),
    );
    let mut sub = rig.events.subscribe("problems", 1000);
    wait_until(80 * SEC, || h.stats().snapshot().cycles == 3).await;
    let s = h.stats().snapshot();
    // Cycle 1 ran 0..25 s: ticks at 10 and 20 fell during it. Cycle 2 started at once at 25 s
    // and ran to 50 s: ticks at 30, 40 and 50. Cycle 3 ran 50..75 s: ticks at 60 and 70.
    assert_eq!(s.overruns, 7);
    let overruns = problems(&drain_events(&mut sub));
    assert_eq!(
        overruns,
        [2, 3, 2].map(|missed| Problem::Overrun { missed }),
        "each overrun is published with its missed ticks"
    );
    assert_eq!(
        rig.probe.max_open_per_target(),
        1,
        "a server was checked twice at once"
    );
    let starts = rig.probe_starts();
    assert_eq!(starts[0], 0);
    assert_eq!(
        starts[25], 25_000,
        "the late cycle starts when the previous one ends"
    );
    assert_eq!(starts[50], 50_000, "missed ticks were queued");
    assert_eq!(starts[74], 74_000);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn batch_delay_is_shortened_for_large_fleets_unless_fixed() {
    let mut rig = Rig::new(1000).await;
    let h = rig.health(health().batch_size(10).batch_delay(ms(500)));
    wait_until(20 * SEC, || h.stats().snapshot().cycles == 1).await;
    // 100 batches within a quarter of 30 s: 99 gaps of 75.76 ms.
    let last = *rig.probe_starts().last().unwrap();
    assert!(last <= 7_500, "last batch started at {last} ms");
    assert!(last >= 7_425, "last batch started at {last} ms");
    let s = h.stats().snapshot();
    assert!(
        (s.batch_delay_seconds - 7.5 / 99.0).abs() < 1e-6,
        "{}",
        s.batch_delay_seconds
    );
    rig.stop(h).await;

    let mut rig = Rig::new(100).await;
    let h = rig.health(
        health()
            .batch_size(10)
            .batch_delay(2 * SEC)
            .fixed_batch_delay(true)
            .interval(60 * SEC),
    );
    wait_until(30 * SEC, || h.stats().snapshot().cycles == 1).await;
    assert_eq!(*rig.probe_starts().last().unwrap(), 18_000);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_tenth_of_a_large_fleet_holds_no_start_back_within_the_file_budget() {
    let hang = |rig: &Rig| {
        for i in (0..5_000).step_by(10) {
            rig.probe.set(&name(i), Script::Never);
        }
    };
    // With a file budget, max_in_flight grows to hold the 500 hung checks (10 s each, started
    // over 10 s) and four batches more: no start waits, the cycle ends within its interval.
    let mut rig = Rig::new(5_000).await;
    hang(&rig);
    let h = rig.health(health().file_budget(Some(2_000)));
    wait_until(40 * SEC, || h.stats().snapshot().cycles == 1).await;
    let s = h.stats().snapshot();
    assert_eq!(s.starts_delayed, 0, "{s:?}");
    assert!(
        (540..=600).contains(&s.max_in_flight),
        "{}",
        s.max_in_flight
    );
    assert!(s.last_duration_seconds.unwrap() < 22.0, "{s:?}");
    assert_eq!(s.overruns, 0);
    rig.stop(h).await;

    // Without one, the 256 configured slots fill with hung checks: starts wait for the
    // timeouts, and each wait is counted.
    let mut rig = Rig::new(5_000).await;
    hang(&rig);
    let h = rig.health(health());
    wait_until(60 * SEC, || h.stats().snapshot().cycles == 1).await;
    let s = h.stats().snapshot();
    assert!(s.starts_delayed > 0, "{s:?}");
    assert_eq!(s.max_in_flight, 256);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn health_targets_go_stalest_first() {
    let mut rig = Rig::new(3).await;
    let h = rig.health(
        health()
            .interval(10 * SEC)
            .batch_size(1)
            .batch_delay(SEC)
            .timeout(2 * SEC),
    );
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    let first: Vec<String> = rig.probe.call_names();
    // A new server joins: never checked, so it goes first next cycle; the rest keep the
    // order of their last checks.
    rig.memory
        .create_server(NewServer::new("new", "http://127.0.0.1:9"))
        .await
        .unwrap();
    wait_until(15 * SEC, || h.stats().snapshot().cycles == 2).await;
    let second: Vec<String> = rig.probe.call_names()[3..].to_vec();
    assert_eq!(second, [vec!["new".to_owned()], first].concat());
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn metrics_come_from_healthy_and_degraded_servers_most_recently_seen_first() {
    let mut rig = Rig::new(5).await;
    rig.probe.set("s001", degraded());
    rig.probe.set("s002", Script::Ok(report("down")));
    rig.probe
        .set("s003", Script::Err(ProbeFailure::ConnectionRefused));
    // s000 and s004 are healthy; s004 answers 2 s later, so it was seen most recently.
    rig.probe
        .set("s000", Script::Slow(ms(100), Box::new(healthy())));
    let h = rig.health(
        health()
            .interval(10 * SEC)
            .batch_size(1)
            .batch_delay(SEC)
            .fixed_batch_delay(true)
            .timeout(2 * SEC),
    );
    wait_until(10 * SEC, || h.stats().snapshot().written == 5).await;
    let order: Vec<String> = rig
        .store
        .metrics_targets()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let seen: Vec<String> = rig
        .probe
        .call_names()
        .into_iter()
        .filter(|n| ["s000", "s001", "s004"].contains(&n.as_str()))
        .rev()
        .collect();
    assert_eq!(order, seen);
    rig.stop(h).await;

    let cancel = CancellationToken::new();
    rig.cancel = cancel;
    let m = rig.metrics(
        WorkerConfig::builder(WorkerKind::Metrics)
            .batch_size(1)
            .batch_delay(SEC)
            .fixed_batch_delay(true),
    );
    wait_until(10 * SEC, || m.stats().snapshot().cycles == 1).await;
    assert_eq!(rig.collector.call_names(), order);
    let s = m.stats().snapshot();
    assert_eq!((s.performed, s.successful, s.values_collected), (3, 3, 6));
    rig.stop(m).await;
}

#[tokio::test(start_paused = true)]
async fn statistics_count_answers_not_attempts() {
    let mut rig = Rig::new(8).await;
    rig.probe.set("s000", degraded());
    rig.probe.set("s001", Script::Ok(report("down")));
    rig.probe
        .set("s002", Script::Err(ProbeFailure::ConnectionRefused));
    rig.probe
        .set("s003", Script::Err(ProbeFailure::Http { code: 503 }));
    rig.probe.set(
        "s004",
        Script::Err(ProbeFailure::Invalid(
            "expected a JSON object, got null".into(),
        )),
    );
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(25 * SEC, || h.stats().snapshot().cycles == 3).await;
    let s = h.stats().snapshot();
    assert_eq!(s.performed, 24);
    // healthy x3, degraded, and critical-by-report succeed; refused, 503 and invalid fail.
    assert_eq!(s.successful, 15);
    assert_eq!(s.failed, 9);
    assert_eq!(s.success_rate, 62.5);
    assert_eq!(s.by_status.get("healthy"), Some(&9));
    assert_eq!(s.by_status.get("degraded"), Some(&3));
    assert_eq!(s.by_status.get("critical"), Some(&9));
    assert_eq!(s.by_status.get("unreachable"), Some(&3));
    assert_eq!(s.interval_seconds, 10.0);
    assert_eq!(s.last_run, Some(datetime!(2026-11-28 06:00:20 UTC)));
    assert!(s.running);
    let (_, s) = rig.stop(h).await;
    assert!(!s.running);
}

#[tokio::test(start_paused = true)]
async fn metrics_failures_are_counted_and_kept() {
    let mut rig = Rig::new(2).await;
    rig.record_healthy(&rig.ids).await;
    rig.collector.set(
        "s001",
        Script::Err(CollectError::Wire(MetricsError::Field {
            field: "cpu_percent",
            value: "140".into(),
            reason: "is out of range 0..=100",
        })),
    );
    let m = rig.metrics(WorkerConfig::builder(WorkerKind::Metrics));
    wait_until(10 * SEC, || m.stats().snapshot().written == 2).await;
    let s = m.stats().snapshot();
    assert_eq!((s.successful, s.failed), (1, 1));
    let server = rig.memory.get_server(rig.ids[1]).await.unwrap().unwrap();
    assert_eq!(
        server.last_metrics_error.as_deref(),
        Some("metrics response field cpu_percent = 140 is out of range 0..=100")
    );
    rig.stop(m).await;
}

#[tokio::test(start_paused = true)]
async fn results_wait_while_the_store_fails_and_are_written_after() {
    let mut rig = Rig::new(10).await;
    rig.store.fail_writes(true);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(35 * SEC, || h.stats().snapshot().cycles == 3).await;
    let s = h.stats().snapshot();
    assert_eq!(s.pending, 30);
    assert_eq!(s.written, 0);
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("writing results failed")
    );
    assert!(rig.store.failed_writes() > 1, "writes were retried");
    assert_eq!(rig.history_len().await, 0);
    rig.store.fail_writes(false);
    wait_until(10 * SEC, || h.stats().snapshot().pending == 0).await;
    let s = h.stats().snapshot();
    assert_eq!((s.written, s.dropped), (30, 0));
    assert_eq!(s.last_error, None);
    assert_eq!(rig.history_len().await, 30);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_drops_the_oldest_and_counts_them() {
    let mut rig = Rig::new(10).await;
    rig.store.fail_writes(true);
    let h = rig.health(
        health()
            .interval(10 * SEC)
            .timeout(2 * SEC)
            .result_buffer(25),
    );
    wait_until(35 * SEC, || h.stats().snapshot().cycles == 3).await;
    let s = h.stats().snapshot();
    assert_eq!((s.performed, s.pending, s.dropped), (30, 25, 5));
    rig.store.fail_writes(false);
    wait_until(10 * SEC, || h.stats().snapshot().pending == 0).await;
    // The five dropped were the oldest: the first cycle's first five.
    let kept = rig.history_len().await;
    assert_eq!(kept, 25);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn results_are_written_in_batches_not_one_by_one() {
    let mut rig = Rig::new(250).await;
    let h = rig.health(
        health()
            .batch_size(250)
            .write_batch_size(100)
            .timeout(2 * SEC),
    );
    wait_until(5 * SEC, || h.stats().snapshot().written == 250).await;
    let sizes = rig.store.batch_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(
        sizes.len() <= 4,
        "{} store calls for 250 results: {sizes:?}",
        sizes.len()
    );
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_checks_and_flushes_every_result() {
    let mut rig = Rig::new(20).await;
    for i in 0..10 {
        rig.probe
            .set(&name(i), Script::Slow(3 * SEC, Box::new(healthy())));
    }
    for i in 10..20 {
        rig.probe.set(&name(i), Script::Never);
    }
    let h = rig.health(
        health()
            .batch_size(20)
            .timeout(9 * SEC)
            .shutdown_grace(5 * SEC),
    );
    sleep(SEC).await;
    assert_eq!(h.stats().snapshot().in_flight, 20);
    let stopped_at = Instant::now();
    let (report, s) = rig.stop(h).await;
    // The slow ten finish within the grace period and are stored; the hung ten are cut.
    assert_eq!(
        report,
        ShutdownReport {
            cancelled_checks: 10,
            lost_results: 0
        }
    );
    assert!(
        stopped_at.elapsed() <= 5 * SEC,
        "stop took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.pending, 0);
    assert_eq!(rig.history_len().await, 10);
    assert_eq!(rig.probe.open(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_the_store_down_returns_on_time_and_counts_the_loss() {
    let mut rig = Rig::new(10).await;
    rig.store.fail_writes(true);
    let h = rig.health(health().timeout(2 * SEC).shutdown_grace(3 * SEC));
    wait_until(5 * SEC, || h.stats().snapshot().performed == 10).await;
    let stopped_at = Instant::now();
    let (report, s) = rig.stop(h).await;
    assert!(
        stopped_at.elapsed() <= 3 * SEC,
        "stop took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(report.lost_results, 10);
    assert_eq!(s.dropped, 10);
}

#[tokio::test(start_paused = true)]
async fn a_failing_selection_skips_the_cycle_and_keeps_the_schedule() {
    let mut rig = Rig::new(3).await;
    rig.store.fail_selects(true);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    sleep(SEC).await;
    let s = h.stats().snapshot();
    assert_eq!(s.cycles, 0);
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("selecting targets failed")
    );
    rig.store.fail_selects(false);
    wait_until(15 * SEC, || h.stats().snapshot().cycles == 1).await;
    assert_eq!(rig.probe_starts(), [10_000; 3]);
    rig.stop(h).await;
}

mockall::mock! {
    Store {}
    #[async_trait::async_trait]
    impl Store for Store {
        async fn health_targets(&self) -> Result<fleet_core::Targets, fleet_core::StoreError>;
        async fn metrics_targets(&self) -> Result<fleet_core::Targets, fleet_core::StoreError>;
        async fn record_health(&self, checks: &[fleet_core::HealthCheck]) -> Result<(), fleet_core::StoreError>;
        async fn record_metrics(&self, records: &[fleet_core::MetricsRecord]) -> Result<(), fleet_core::StoreError>;
    }
}

#[tokio::test(start_paused = true)]
async fn one_cycle_makes_one_selection_and_one_write_for_its_batch() {
    let targets: Vec<fleet_core::ProbeTarget> = (0..50).map(|i| aged(i, None)).collect();
    let mut store = MockStore::new();
    store
        .expect_health_targets()
        .times(1)
        .returning(move || Ok(targets.clone().into()));
    store
        .expect_record_health()
        .times(1)
        .withf(|checks| checks.len() == 50)
        .returning(|_| Ok(()));
    store.expect_metrics_targets().never();
    store.expect_record_metrics().never();
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let cancel = CancellationToken::new();
    let work = HealthWork::new(Arc::new(store), probe);
    let h = work
        .worker(health().batch_size(50).build().unwrap(), Rig::clock())
        .spawn(cancel.clone());
    wait_until(5 * SEC, || h.stats().snapshot().written == 50).await;
    cancel.cancel();
    h.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn while_selection_fails_the_last_targets_are_checked_again() {
    let mut rig = Rig::new(3).await;
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    rig.store.fail_selects(true);
    wait_until(15 * SEC, || h.stats().snapshot().cycles == 2).await;
    let s = h.stats().snapshot();
    assert_eq!(rig.probe.calls().len(), 6, "the second cycle did not probe");
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("checking the 3 targets of the last cycle"),
        "{s:?}"
    );
    rig.store.fail_selects(false);
    wait_until(15 * SEC, || {
        let s = h.stats().snapshot();
        s.cycles == 3 && s.pending == 0
    })
    .await;
    assert_eq!(h.stats().snapshot().last_error, None);
    assert_eq!(rig.history_len().await, 9);
    rig.stop(h).await;
}

/// Everything queued for `sub` now, in order.
fn drain_events(sub: &mut Subscription) -> Vec<Received> {
    std::iter::from_fn(|| sub.try_recv()).collect()
}

/// The health checks among `received`: (server, previous, new).
fn checks(received: &[Received]) -> Vec<(String, Option<HealthStatus>, HealthStatus)> {
    received
        .iter()
        .filter_map(|r| match r {
            Received::Event(e) => match &**e {
                Event::Checked {
                    server,
                    check,
                    previous,
                    ..
                } => Some((server.clone(), *previous, check.status)),
                _ => None,
            },
            Received::Lagged { .. } => None,
        })
        .collect()
}

fn problems(received: &[Received]) -> Vec<Problem> {
    received
        .iter()
        .filter_map(|r| match r {
            Received::Event(e) => match &**e {
                Event::Problem { problem, .. } => Some(problem.clone()),
                _ => None,
            },
            Received::Lagged { .. } => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_result_reaches_every_subscriber() {
    let mut rig = Rig::new(10).await;
    let mut a = rig.events.subscribe("a", 100);
    let mut b = rig.events.subscribe("b", 100);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    let m = rig.metrics(
        WorkerConfig::builder(WorkerKind::Metrics)
            .interval(10 * SEC)
            .timeout(2 * SEC),
    );
    wait_until(15 * SEC, || {
        h.stats().snapshot().cycles == 2 && m.stats().snapshot().cycles == 2
    })
    .await;
    for sub in [&mut a, &mut b] {
        let got = drain_events(sub);
        assert_eq!(checks(&got).len(), 20, "{got:?}");
        let collected = got
            .iter()
            .filter(|r| matches!(r, Received::Event(e) if matches!(**e, Event::Collected { .. })))
            .count();
        // The metrics worker collects from servers once they are known healthy.
        assert!(collected >= 10, "{collected} collections seen");
        let cycles = got
            .iter()
            .filter(
                |r| matches!(r, Received::Event(e) if matches!(**e, Event::CycleFinished { .. })),
            )
            .count();
        assert_eq!(cycles, 4);
    }
    assert_eq!(rig.events.stats().lost, 0);
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_subscriber_stalls_neither_the_cycle_nor_the_writer_and_is_told_it_lagged() {
    let mut rig = Rig::new(50).await;
    let mut stalled = rig.events.subscribe("stalled", 5);
    let mut keeping_up = rig.events.subscribe("keeping-up", 1000);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC).batch_size(50));
    wait_until(25 * SEC, || {
        let s = h.stats().snapshot();
        s.cycles == 3 && s.written == 150
    })
    .await;
    let s = h.stats().snapshot();
    assert_eq!((s.overruns, s.dropped), (0, 0));
    // 150 checks and 3 cycle ends were published; the stalled queue holds 5.
    let stats = rig.events.stats();
    assert_eq!(stats.published, 153);
    let of = |name: &str| stats.subscribers.iter().find(|s| s.name == name).unwrap();
    assert_eq!((of("stalled").queued, of("stalled").lost), (5, 148));
    assert_eq!(of("keeping-up").lost, 0);
    assert_eq!(stats.lost, 148);
    assert_eq!(stalled.lost(), 148);
    // The stalled subscriber hears of its loss first, then gets what was queued.
    let got = drain_events(&mut stalled);
    assert_eq!(got[0], Received::Lagged { missed: 148 });
    assert_eq!(got.len(), 6);
    assert_eq!(drain_events(&mut keeping_up).len(), 153);
    // Told once: more losses are counted afresh.
    rig.events.publish(Event::Problem {
        worker: WorkerKind::Health,
        problem: Problem::WriteRecovered,
    });
    assert!(matches!(stalled.try_recv(), Some(Received::Event(_))));
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_write_publishes_nothing_twice() {
    let mut rig = Rig::new(10).await;
    let mut sub = rig.events.subscribe("all", 1000);
    rig.store.fail_writes(true);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(25 * SEC, || h.stats().snapshot().cycles == 2).await;
    assert!(rig.store.failed_writes() > 1, "writes were retried");
    rig.store.fail_writes(false);
    wait_until(10 * SEC, || h.stats().snapshot().pending == 0).await;
    assert_eq!(rig.history_len().await, 20);
    let got = drain_events(&mut sub);
    let checked = checks(&got);
    assert_eq!(
        checked.len(),
        20,
        "one event per result, however often it was written"
    );
    assert_eq!(
        problems(&got),
        [
            Problem::WriteFailing {
                error: "store unavailable: connection refused (scripted)".into(),
                pending: 10
            },
            Problem::WriteRecovered
        ],
        "a failing write is announced once, and its recovery once"
    );
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn previous_and_new_health_stay_true_through_a_store_outage() {
    let mut rig = Rig::new(2).await;
    let mut sub = rig.events.subscribe("all", 1000);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    // The store goes away; s000 turns unreachable and stays so for three cycles.
    rig.store.fail_selects(true);
    rig.store.fail_writes(true);
    rig.probe.set(
        &name(0),
        Script::Err(ProbeFailure::Connect("connection refused".into())),
    );
    wait_until(35 * SEC, || h.stats().snapshot().cycles == 4).await;
    rig.store.fail_selects(false);
    rig.store.fail_writes(false);
    rig.probe.set(&name(0), healthy());
    wait_until(15 * SEC, || {
        let s = h.stats().snapshot();
        s.cycles == 5 && s.pending == 0
    })
    .await;
    use HealthStatus::*;
    let received = checks(&drain_events(&mut sub));
    let of = |server: usize| -> Vec<(Option<HealthStatus>, HealthStatus)> {
        received
            .iter()
            .filter(|(n, ..)| *n == name(server))
            .map(|(_, p, s)| (*p, *s))
            .collect()
    };
    let s0 = of(0);
    assert_eq!(
        s0,
        [
            (None, Healthy),
            (Some(Healthy), Unreachable),
            (Some(Unreachable), Unreachable),
            (Some(Unreachable), Unreachable),
            (Some(Unreachable), Healthy),
        ],
        "one change in, one change out: no phantom change while the store was away"
    );
    let s1 = of(1);
    assert_eq!(s1[0], (None, Healthy));
    assert!(
        s1[1..].iter().all(|c| *c == (Some(Healthy), Healthy)),
        "{s1:?}"
    );
    // The store agrees once it is back.
    let server = rig.memory.get_server(rig.ids[0]).await.unwrap().unwrap();
    assert_eq!(server.health_status, Some(Healthy));
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_local_resource_failure_is_fleets_own_it_stores_nothing_and_moves_no_state() {
    let mut rig = Rig::new(3).await;
    let mut sub = rig.events.subscribe("problems", 1000);
    let h = rig.health(health().interval(10 * SEC).timeout(2 * SEC));
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    // The process runs out of files while checking two servers.
    for i in [0, 1] {
        rig.probe.set(
            &name(i),
            Script::NotChecked(NotChecked::LocalResource(
                "Too many open files (os error 24)".into(),
            )),
        );
    }
    wait_until(25 * SEC, || {
        let s = h.stats().snapshot();
        s.cycles == 3 && s.pending == 0
    })
    .await;
    let s = h.stats().snapshot();
    assert_eq!(s.not_checked.get("local_resource"), Some(&4));
    assert_eq!(
        s.performed, 5,
        "not-checked servers are not counted as checks"
    );
    assert_eq!(s.by_status.get("unreachable"), None);
    for i in [0, 1] {
        let server = rig.memory.get_server(rig.ids[i]).await.unwrap().unwrap();
        assert_eq!(
            server.health_status,
            Some(HealthStatus::Healthy),
            "{}",
            name(i)
        );
    }
    assert_eq!(
        rig.history_len().await,
        5,
        "nothing stored for what was not checked"
    );
    let got = drain_events(&mut sub);
    let raised: Vec<Problem> = problems(&got);
    assert_eq!(raised.len(), 2, "raised once per cycle: {raised:?}");
    for p in raised {
        let Problem::NotChecked {
            kind,
            count,
            example,
        } = p
        else {
            panic!("{p:?}")
        };
        assert_eq!((kind, count), ("local_resource", 2));
        assert!(
            example.ends_with(": local resource failure: Too many open files (os error 24)"),
            "{example}"
        );
    }
    assert_eq!(
        checks(&got).iter().filter(|(n, ..)| *n != name(2)).count(),
        2,
        "only the first cycle's checks of s000 and s001"
    );
    rig.stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_server_whose_token_no_key_opens_is_not_probed() {
    let targets: Vec<fleet_core::ProbeTarget> = (0..3)
        .map(|i| fleet_core::ProbeTarget {
            unreadable_token: (i < 2).then(|| "0123abcd".to_owned()),
            ..aged(i, None)
        })
        .collect();
    let mut store = MockStore::new();
    store
        .expect_health_targets()
        .returning(move || Ok(targets.clone().into()));
    store
        .expect_record_health()
        .withf(|checks| checks.len() == 1)
        .returning(|_| Ok(()));
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let cancel = CancellationToken::new();
    let events = Events::new();
    let mut sub = events.subscribe("problems", 100);
    let h = HealthWork::new(Arc::new(store), probe.clone())
        .worker(
            health()
                .interval(10 * SEC)
                .timeout(2 * SEC)
                .build()
                .unwrap(),
            Rig::clock(),
        )
        .with_events(events)
        .spawn(cancel.clone());
    wait_until(5 * SEC, || h.stats().snapshot().cycles == 1).await;
    assert_eq!(
        probe.call_names(),
        [name(2)],
        "servers with unreadable tokens were probed"
    );
    assert_eq!(
        h.stats().snapshot().not_checked.get("token_unreadable"),
        Some(&2)
    );
    let raised = problems(&drain_events(&mut sub));
    assert_eq!(
        raised,
        [Problem::NotChecked {
            kind: "token_unreadable",
            count: 2,
            example: format!(
                "{}: probe token sealed under key 0123abcd, which no configured key opens",
                name(0)
            ),
        }]
    );
    cancel.cancel();
    h.stopped().await;
}

#[tokio::test(start_paused = true)]
async fn metric_values_count_when_stored_not_when_collected() {
    let mut rig = Rig::new(2).await;
    rig.record_healthy(&rig.ids).await;
    rig.store.fail_writes(true);
    let m = rig.metrics(
        WorkerConfig::builder(WorkerKind::Metrics)
            .interval(10 * SEC)
            .timeout(2 * SEC),
    );
    wait_until(5 * SEC, || m.stats().snapshot().cycles == 1).await;
    let s = m.stats().snapshot();
    assert_eq!(
        (s.successful, s.values_collected),
        (2, 0),
        "nothing stored yet"
    );
    rig.store.fail_writes(false);
    wait_until(10 * SEC, || m.stats().snapshot().pending == 0).await;
    // Two samples of two values each (cpu_percent and llm_requests).
    assert_eq!(m.stats().snapshot().values_collected, 4);
    rig.stop(m).await;
}

/// A storage self-check that fails while told to, and finds nothing otherwise.
#[derive(Debug, Default)]
struct FlakyCheck(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl fleet_core::StorageCheck for FlakyCheck {
    async fn check_storage(&self) -> Result<fleet_core::Findings, fleet_core::StoreError> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            Err(fleet_core::StoreError::unavailable("connection refused"))
        } else {
            Ok(Vec::new())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_storage_check_is_reported_and_cleared_by_a_good_one() {
    let rig = Rig::new(1).await;
    let check = Arc::new(FlakyCheck::default());
    check.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = MetricsWork::new(rig.store.clone(), rig.collector.clone())
        .with_storage_check(check.clone())
        .worker(
            WorkerConfig::builder(WorkerKind::Metrics)
                .interval(10 * SEC)
                .timeout(2 * SEC)
                .build()
                .unwrap(),
            Rig::clock(),
        )
        .spawn(rig.cancel.clone());
    wait_until(5 * SEC, || m.stats().snapshot().cycles == 1).await;
    assert_eq!(
        m.stats().snapshot().last_error.as_deref(),
        Some("storage check failed: store unavailable: connection refused")
    );
    check.0.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(15 * SEC, || m.stats().snapshot().cycles == 2).await;
    assert_eq!(m.stats().snapshot().last_error, None);
    rig.stop(m).await;
}

/// Each probe call's target and start, in milliseconds after `t0`.
fn named_starts(probe: &ScriptedProbe, t0: Instant) -> Vec<(String, u128)> {
    probe
        .calls()
        .iter()
        .map(|c| (c.name.clone(), (c.at - t0).as_millis()))
        .collect()
}

/// A target named `name(i)`, last checked `checked_ago`.
fn aged(i: usize, checked_ago: Option<Duration>) -> fleet_core::ProbeTarget {
    fleet_core::ProbeTarget {
        id: ServerId::new(),
        name: name(i),
        api_url: "http://127.0.0.1:9".into(),
        token: None,
        unreadable_token: None,
        health: None,
        kind: Default::default(),
        metrics_path: None,
        ca_cert: None,
        fence: None,
        checked_ago,
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_checked_recently_is_held_until_due_within_the_cycle() {
    // Interval 10 s: due 9.02 s after the last check (0.9 x interval and 0.2 % for clock
    // drift). s000 was never checked, s001 4 s ago, s002 20 s ago; s001 waits 5.02 s into
    // the cycle, and the others are not held behind it.
    let targets = vec![
        aged(1, Some(4 * SEC)),
        aged(0, None),
        aged(2, Some(20 * SEC)),
    ];
    let mut store = MockStore::new();
    let selections = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = selections.clone();
    store.expect_health_targets().returning(move || {
        // The first selection works; the second fails, so the last targets are repeated; the
        // third works again, with ages as stale as a store that has not taken the results
        // of the repeat yet.
        match n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Ok(targets.clone().into()),
            1 => Err(fleet_core::StoreError::unavailable("down")),
            _ => Ok(targets
                .iter()
                .map(|t| fleet_core::ProbeTarget {
                    checked_ago: Some(60 * SEC),
                    ..t.clone()
                })
                .collect()),
        }
    });
    store.expect_record_health().returning(|_| Ok(()));
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let cancel = CancellationToken::new();
    let t0 = Instant::now();
    let h = HealthWork::new(Arc::new(store), probe.clone())
        .worker(
            health()
                .interval(10 * SEC)
                .timeout(2 * SEC)
                .batch_size(10)
                .build()
                .unwrap(),
            Rig::clock(),
        )
        .spawn(cancel.clone());
    wait_until(40 * SEC, || h.stats().snapshot().cycles == 3).await;
    cancel.cancel();
    h.stopped().await;
    assert_eq!(
        named_starts(&probe, t0),
        [
            ("s000".to_owned(), 0),
            ("s002".to_owned(), 0),
            ("s001".to_owned(), 5_020),
            // The repeat while selecting fails keeps each target's offset in its cycle.
            ("s000".to_owned(), 10_000),
            ("s002".to_owned(), 10_000),
            ("s001".to_owned(), 15_020),
            // The store's ages are stale; this process's own start times still hold s001
            // until 0.9 x interval after its last start.
            ("s000".to_owned(), 20_000),
            ("s002".to_owned(), 20_000),
            ("s001".to_owned(), 24_040),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_checks_only_what_is_due_between_cycles_and_keeps_the_grid() {
    // s000 is there from the start; s001 arrives (a bucket taken over) at 3 s, when a
    // catch-up is asked for.
    let (s0, s1) = (aged(0, None), aged(1, None));
    let mut store = MockStore::new();
    let selections = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = selections.clone();
    store.expect_health_targets().returning(move || {
        Ok(match n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => vec![s0.clone()].into(),
            _ => vec![s0.clone(), s1.clone()].into(),
        })
    });
    store.expect_record_health().returning(|_| Ok(()));
    let probe = Arc::new(ScriptedProbe::new(healthy()));
    let cancel = CancellationToken::new();
    let t0 = Instant::now();
    let worker = HealthWork::new(Arc::new(store), probe.clone()).worker(
        health()
            .interval(10 * SEC)
            .timeout(2 * SEC)
            .build()
            .unwrap(),
        Rig::clock(),
    );
    let catch_up = worker.catch_up();
    let h = worker.spawn(cancel.clone());
    sleep(3 * SEC).await;
    catch_up.request();
    wait_until(20 * SEC, || h.stats().snapshot().cycles == 2).await;
    sleep(3 * SEC).await;
    cancel.cancel();
    h.stopped().await;
    assert_eq!(
        named_starts(&probe, t0),
        [
            ("s000".to_owned(), 0),
            // The catch-up: s001 is due, s000 (checked 3 s ago) is not.
            ("s001".to_owned(), 3_000),
            // The next cycle keeps its tick; s001 waits until 0.9 x interval after 3 s.
            ("s000".to_owned(), 10_000),
            ("s001".to_owned(), 12_020),
        ]
    );
    assert_eq!(selections.load(std::sync::atomic::Ordering::SeqCst), 3);
}
