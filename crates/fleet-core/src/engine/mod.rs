//! The engine: one scheduler, dispatcher and writer, generic over the work it schedules.
//!
//! A [`Worker`] runs cycles start-to-start on a fixed grid, never two at once. Each cycle asks
//! its [`Work`] for targets, starts them in batches (`batch_size` together, `batch_delay`
//! apart), each under its own deadline, with at most `max_in_flight` running across batches, so
//! a hung target holds only its own slot. Results go into a bounded buffer that a writer task
//! drains to the store in groups; when the store fails they wait there and are retried.

mod buffer;
mod config;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, WorkerConfig, WorkerConfigBuilder, WorkerKind};
pub use stats::{CycleSummary, StatsHandle, Tally, WorkerStats};

use crate::clock::Clock;
use crate::events::{Event, Events, Problem};
use crate::probe::NotChecked;
use crate::store::{Findings, StoreError};
use buffer::ResultBuffer;

/// What a worker schedules: how to pick targets, check one, count and record the results.
#[async_trait]
pub trait Work: Send + Sync + 'static {
    /// What one check is run against. Cheap to clone (a handle, such as [`TargetRef`]): the
    /// engine keeps the last cycle's targets beside the running cycle's, and gives each check
    /// its own.
    ///
    /// [`TargetRef`]: crate::TargetRef
    type Target: Clone + Send + Sync + 'static;
    /// What one check produces.
    type Output: Send + Sync + 'static;

    /// Which worker this is.
    fn kind(&self) -> WorkerKind;

    /// The targets of one cycle, in the order they should start.
    async fn select(&self) -> Result<Vec<Self::Target>, StoreError>;

    /// A target's name, for logs.
    fn name<'a>(&self, target: &'a Self::Target) -> &'a str;

    /// How long ago this work last checked `target`, by the store's clock, when the
    /// selection says. A target checked less than 0.9 x the interval ago is held back within
    /// the cycle until then, so that no instance checks a server early (after a restart, or
    /// when its bucket changed hands). `None` by default: start at once.
    fn checked_ago(&self, _target: &Self::Target) -> Option<Duration> {
        None
    }

    /// Called as a cycle starts a check of `target`, at `at`: a work may remember it, so that
    /// [`Work::checked_ago`] knows of checks whose results the store has not taken yet.
    fn started(&self, _target: &Self::Target, _at: Instant) {}

    /// Runs one check, started at `started`, which must finish by `deadline`. `Err` when
    /// Fleet could not check through its own fault: nothing is recorded for the target.
    async fn run(
        &self,
        target: &Self::Target,
        started: OffsetDateTime,
        deadline: Instant,
    ) -> Result<Self::Output, NotChecked>;

    /// The result of a check that the engine cut off at its deadline.
    fn timed_out(
        &self,
        target: &Self::Target,
        started: OffsetDateTime,
        after: Duration,
    ) -> Self::Output;

    /// How a result counts in the statistics.
    fn tally(&self, output: &Self::Output) -> Tally;

    /// The event that announces a completed result. Called exactly once per result, in the
    /// order results complete, so the work may keep per-target state here (the previous
    /// health). `manual` marks a check asked for outside a cycle.
    fn event(&self, target: &Self::Target, output: &Self::Output, manual: bool) -> Event;

    /// Writes a batch of results in one store call.
    async fn record(&self, batch: &[Self::Output]) -> Result<(), StoreError>;

    /// A result's size in memory, estimated, for the buffer's byte bound. By default the size
    /// of the type alone.
    fn result_size(_output: &Self::Output) -> usize {
        std::mem::size_of::<Self::Output>()
    }

    /// The values a written batch stored, for `values_collected`; 0 by default.
    fn stored_values(&self, _batch: &[Self::Output]) -> u64 {
        0
    }

    /// Logs that a cycle of `targets` targets starts.
    fn log_start(&self, targets: usize);

    /// Logs a finished cycle's summary.
    fn log_summary(&self, summary: &CycleSummary);

    /// Runs after each completed cycle; returns what the store's self-check found wrong.
    async fn after_cycle(&self) -> Option<Result<Findings, StoreError>> {
        None
    }
}

/// What happened at shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// In-flight checks cut off when the grace period ran out.
    pub cancelled_checks: u64,
    /// Completed results that could not be written before the grace period ran out.
    pub lost_results: u64,
}

/// A worker: a [`Work`] with its settings, ready to run.
#[derive(Debug)]
pub struct Worker<W: Work> {
    work: Arc<W>,
    config: WorkerConfig,
    clock: Arc<dyn Clock>,
    buffer: Arc<ResultBuffer<W::Output>>,
    stats: StatsHandle,
    /// The last successful selection, checked again while selecting fails, with the offset
    /// from its cycle's start at which each target last started (so that a repeat keeps
    /// each target's spacing). Targets are cheap handles (see [`Work::Target`]), so keeping
    /// them copies no target.
    last_targets: std::sync::Mutex<LastCycle<W::Target>>,
    events: Events,
    /// Dropped results already announced as a problem.
    reported_drops: std::sync::atomic::AtomicU64,
    catch_up: CatchUp,
}

/// Asks a worker for a catch-up between its cycles: one extra pass over the targets that are
/// due now (a bucket just taken over), without waiting for the next tick. Cheap to clone; a
/// request made while a cycle runs is kept until it ends.
#[derive(Clone, Debug, Default)]
pub struct CatchUp(pub(crate) Arc<tokio::sync::Notify>);

impl CatchUp {
    /// Requests a catch-up.
    pub fn request(&self) {
        self.0.notify_one();
    }
}

/// A worker running on its own task.
#[derive(Debug)]
pub struct WorkerHandle {
    stats: StatsHandle,
    task: tokio::task::JoinHandle<ShutdownReport>,
}

impl WorkerHandle {
    /// The worker's statistics.
    pub fn stats(&self) -> &StatsHandle {
        &self.stats
    }

    /// Waits for the worker to stop (after its cancellation token fires).
    pub async fn stopped(self) -> ShutdownReport {
        match self.task.await {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(target: "fleet::engine", error = %e, "worker task failed");
                ShutdownReport::default()
            }
        }
    }
}

impl<W: Work> Worker<W>
where
    W::Output: std::fmt::Debug,
{
    /// A worker for `work` with `config`, taking timestamps from `clock`.
    pub fn new(work: W, config: WorkerConfig, clock: Arc<dyn Clock>) -> Self {
        let buffer = Arc::new(ResultBuffer::bounded(
            config.result_buffer,
            config.result_buffer_bytes,
            config.write_batch_size,
            W::result_size,
        ));
        let stats = StatsHandle::new(work.kind().as_str(), buffer.clone());
        {
            let mut g = stats.lock();
            g.stats.interval_seconds = config.interval.as_secs_f64();
            g.stats.batch_delay_seconds = config.batch_delay.as_secs_f64();
        }
        Self {
            work: Arc::new(work),
            config,
            clock,
            buffer,
            stats,
            last_targets: std::sync::Mutex::new((Arc::from(Vec::new()), Vec::new())),
            events: Events::new(),
            reported_drops: std::sync::atomic::AtomicU64::new(0),
            catch_up: CatchUp::default(),
        }
    }

    /// The handle that asks this worker for a catch-up (see [`CatchUp`]).
    pub fn catch_up(&self) -> CatchUp {
        self.catch_up.clone()
    }

    /// Publishes this worker's events on `events` (each worker has a bus of its own until
    /// given a shared one).
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The worker's statistics, readable while it runs.
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Runs the worker on its own task until `cancel` fires.
    pub fn spawn(self, cancel: CancellationToken) -> WorkerHandle {
        let stats = self.stats.clone();
        let task = tokio::spawn(self.run(cancel));
        WorkerHandle { stats, task }
    }

    /// Runs cycles until `cancel` fires, then drains in-flight checks and flushes results
    /// within `shutdown_grace`.
    pub async fn run(self, cancel: CancellationToken) -> ShutdownReport {
        let kind = self.work.kind().as_str();
        self.stats.lock().stats.running = true;
        let flush_now = CancellationToken::new();
        let mut writer = tokio::spawn(write_loop(
            self.work.clone(),
            self.buffer.clone(),
            self.stats.clone(),
            self.events.clone(),
            self.config.clone(),
            flush_now.clone(),
        ));

        let interval = self.config.interval;
        let anchor = Instant::now() + self.config.phase;
        let mut tick: u64 = 0;
        let mut next = anchor;
        let mut cancelled_checks = 0;
        let mut announced_delay = None;
        let stop_at = loop {
            let catch_up = tokio::select! {
                biased;
                () = cancel.cancelled() => break Instant::now(),
                () = sleep_until(next) => false,
                () = self.catch_up.0.notified() => true,
            };
            let cycle = self
                .run_cycle(&cancel, &mut announced_delay, catch_up)
                .await;
            if let Some((stop_at, cut)) = cycle {
                cancelled_checks = cut;
                break stop_at;
            }
            if catch_up {
                // Off the grid: the next cycle keeps its tick (at once if it passed).
                continue;
            }
            // Keep the cadence on the grid anchor + k * interval. Ticks that fell while
            // this cycle ran are counted, never queued: the next cycle starts at once and
            // stands for the latest of them.
            let now = Instant::now();
            let latest = ((now - anchor).as_nanos() / interval.as_nanos()) as u64;
            if latest > tick {
                let missed = latest - tick;
                self.stats.lock().stats.overruns += missed;
                tracing::warn!(
                    target: "fleet::engine",
                    worker = kind,
                    missed,
                    "{} cycle overran its {}s interval: {missed} tick(s) fell while it ran; the next cycle starts now",
                    capitalized(kind),
                    interval.as_secs_f64(),
                );
                self.problem(Problem::Overrun { missed });
                tick = latest;
                next = now;
            } else {
                tick += 1;
                next =
                    anchor + Duration::from_nanos((interval.as_nanos() * u128::from(tick)) as u64);
            }
        };

        // Flush what completed, bounded by what is left of the grace period.
        flush_now.cancel();
        let flush_deadline = stop_at + self.config.shutdown_grace;
        let lost = match timeout_at(flush_deadline, &mut writer).await {
            Ok(_) => 0,
            Err(_) => {
                writer.abort();
                let _ = writer.await;
                self.buffer.pending()
            }
        };
        if lost > 0 {
            self.buffer.add_dropped(lost);
            tracing::error!(
                target: "fleet::engine",
                worker = kind,
                lost,
                "{} worker stopped with {lost} results not stored: the store did not take them within the {}s grace period",
                capitalized(kind),
                self.config.shutdown_grace.as_secs_f64(),
            );
        }
        self.report_drops();
        self.stats.lock().stats.running = false;
        tracing::info!(target: "fleet::engine", worker = kind, cancelled_checks, lost, "{} worker stopped", capitalized(kind));
        ShutdownReport {
            cancelled_checks,
            lost_results: lost,
        }
    }

    /// How a cycle of `targets` targets is paced: see [`pace`].
    fn pace_for(&self, targets: usize) -> Pace {
        pace(&self.config, targets)
    }

    /// Runs one cycle in four steps: select, dispatch, drain, finish. Returns
    /// `Some((stop_at, cut_checks))` when cancelled during it.
    ///
    /// A catch-up runs only the targets due now, and leaves the cycle figures alone.
    async fn run_cycle(
        &self,
        cancel: &CancellationToken,
        announced_delay: &mut Option<Duration>,
        catch_up: bool,
    ) -> Option<(Instant, u64)> {
        let started = Instant::now();
        let started_at = self.clock.now();
        let mut targets = match self.select(cancel, started, catch_up).await {
            Selected::Targets(t) => t,
            Selected::Nothing => return None,
            Selected::Cancelled => return Some((Instant::now(), 0)),
        };
        if catch_up {
            targets = targets
                .iter()
                .filter(|(_, hold)| hold.is_zero())
                .cloned()
                .collect();
            if targets.is_empty() {
                return None;
            }
            tracing::info!(target: "fleet::engine", worker = self.work.kind().as_str(), due = targets.len(), "{} catch-up: {} targets due now", capitalized(self.work.kind().as_str()), targets.len());
        }
        let pace = if catch_up {
            self.pace_for(targets.len())
        } else {
            self.begin(targets.len(), announced_delay)
        };
        let mut running = JoinSet::new();
        let stop_at = match self
            .dispatch(targets, started, pace, cancel, &mut running, !catch_up)
            .await
        {
            Some(stop_at) => Some(stop_at),
            None => drain(&mut running, cancel).await,
        };
        if let Some(stop_at) = stop_at {
            return Some((stop_at, self.cut(stop_at, running).await));
        }
        if catch_up {
            self.flushed(cancel).await;
        } else {
            self.finish(started, started_at, cancel).await;
        }
        None
    }

    /// Step 1: the cycle's targets, each with the time after the cycle's start before which
    /// it may not start: a target checked less than 0.9 x the interval ago waits until then
    /// (the selection is then ordered by that time, stably). While selecting fails, the last
    /// cycle's targets are checked again, each at its offset of that cycle, so monitoring
    /// goes on through a store outage; their results wait in the buffer until it is back.
    ///
    /// A catch-up's selection is not kept: the repeat goes on from the last whole cycle.
    async fn select(
        &self,
        cancel: &CancellationToken,
        started: Instant,
        catch_up: bool,
    ) -> Selected<W::Target> {
        let kind = self.work.kind().as_str();
        let selected = tokio::select! {
            biased;
            () = cancel.cancelled() => return Selected::Cancelled,
            selected = self.work.select() => selected,
        };
        // Ages are measured when the selection ran; counting from its end only errs late.
        let selected_after = started.elapsed();
        let mut guard = self.last_targets.lock().unwrap_or_else(|e| e.into_inner());
        let (last, last_starts) = &mut *guard;
        match selected {
            Ok(targets) => {
                self.stats.lock().stats.clear_error(SELECT_FAILED);
                // 0.9 x interval, and 0.2 % more for the drift between the monotonic clock
                // the hold counts on and the wall clock the stored timestamps come from.
                let due = self.config.interval.mul_f64(0.902);
                let mut held: Vec<(W::Target, Offset)> = targets
                    .into_iter()
                    .map(|t| {
                        let hold = match self.work.checked_ago(&t) {
                            Some(ago) if ago < due => Offset::ceil(selected_after + (due - ago)),
                            _ => Offset::ZERO,
                        };
                        (t, hold)
                    })
                    .collect();
                if held.iter().any(|(_, hold)| !hold.is_zero()) {
                    held.sort_by_key(|(_, hold)| *hold);
                }
                let held: Arc<[(W::Target, Offset)]> = held.into();
                if !catch_up {
                    *last = held.clone();
                    last_starts.clear();
                }
                Selected::Targets(held)
            }
            Err(e) => {
                let message = if last.is_empty() {
                    format!("{SELECT_FAILED}: {e}")
                } else {
                    format!(
                        "{SELECT_FAILED}: {e}; checking the {} targets of the last cycle",
                        last.len()
                    )
                };
                tracing::error!(target: "fleet::engine", worker = kind, error = %e, "{} cycle: {message}", capitalized(kind));
                self.stats.lock().stats.last_error = Some(message);
                if last.is_empty() || catch_up {
                    Selected::Nothing
                } else {
                    let starts = last_starts
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(Offset::ZERO));
                    Selected::Targets(last.iter().map(|(t, _)| t.clone()).zip(starts).collect())
                }
            }
        }
    }

    /// Resets the cycle's figures and picks the batch delay for `total` targets.
    fn begin(&self, total: usize, announced_delay: &mut Option<Duration>) -> Pace {
        let kind = self.work.kind().as_str();
        let pace = self.pace_for(total);
        let delay = pace.delay;
        let c = &self.config;
        let changed = delay != c.batch_delay
            || pace.batch_size != c.batch_size
            || pace.max_in_flight != c.max_in_flight;
        if changed && *announced_delay != Some(delay) {
            tracing::info!(
                target: "fleet::engine",
                worker = kind,
                "{} pace for {total} targets: {} batches of {} (configured {}), {:?} apart (configured {:?}), so that all start within a quarter of the {:?} interval; at most {} checks at once (configured {}), enough for a tenth of the fleet to hang",
                capitalized(kind),
                total.div_ceil(pace.batch_size),
                pace.batch_size,
                c.batch_size,
                delay,
                c.batch_delay,
                c.interval,
                pace.max_in_flight,
                c.max_in_flight,
            );
            *announced_delay = Some(delay);
        }
        {
            let mut g = self.stats.lock();
            g.cycle = CycleSummary {
                targets: total,
                ..Default::default()
            };
            g.stats.last_cycle_targets = total as u64;
            g.stats.batch_delay_seconds = delay.as_secs_f64();
            g.stats.batch_size = pace.batch_size as u64;
            g.stats.max_in_flight = pace.max_in_flight as u64;
        }
        self.work.log_start(total);
        pace
    }

    /// Step 2: starts the targets in batches as `pace` says, none before its hold ends;
    /// keeps their offsets for a repeat when `keep_starts`. A start that waits for a free
    /// slot is counted, and the cycle says so once. Returns when cancelled before every
    /// target started.
    async fn dispatch(
        &self,
        targets: Arc<[(W::Target, Offset)]>,
        started: Instant,
        pace: Pace,
        cancel: &CancellationToken,
        running: &mut JoinSet<()>,
        keep_starts: bool,
    ) -> Option<Instant> {
        let delay = pace.delay;
        // Two limits: every check holds one of `max_in_flight` slots (files) while it runs,
        // and one of the configured fresh slots (the work competing for CPU) until it has run
        // `SLOW_AFTER`. So a healthy fleet is paced by how fast checks complete, and hung
        // servers, which soon leave their fresh slot, hold back no start until the budget is
        // spent.
        let slots = Arc::new(Semaphore::new(pace.max_in_flight));
        let fresh = Arc::new(Semaphore::new(pace.fresh));
        let slow_after = SLOW_AFTER.min(self.config.timeout / 2);
        let mut delayed = 0u64;
        let mut starts = Vec::with_capacity(targets.len());
        let mut targets = targets.iter().cloned();
        let mut batch = 0u32;
        while targets.len() > 0 {
            if batch > 0 {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Some(Instant::now()),
                    () = sleep_until(started + delay * batch) => {}
                }
            }
            for (target, hold) in targets.by_ref().take(pace.batch_size) {
                if !hold.is_zero() {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return Some(Instant::now()),
                        () = sleep_until(started + hold.get()) => {}
                    }
                }
                let fresh_permit = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Some(Instant::now()),
                    permit = fresh.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                };
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        if delayed == 0 {
                            tracing::warn!(target: "fleet::engine", worker = self.work.kind().as_str(), max_in_flight = pace.max_in_flight, "{} checks wait for a free slot: all {} are taken by hung or slow servers; this cycle's starts stretch", capitalized(self.work.kind().as_str()), pace.max_in_flight);
                        }
                        delayed += 1;
                        self.stats.lock().stats.starts_delayed += 1;
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => return Some(Instant::now()),
                            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                        }
                    }
                };
                // The check's timestamp and its start as the hold rule counts it are taken
                // together, here, not when its task first runs (which can be later).
                let now = Instant::now();
                let started_at = self.clock.now();
                starts.push(Offset::ceil(now - started));
                self.work.started(&target, now);
                let check = self.check();
                running.spawn(async move {
                    let run = check.run(target, started_at);
                    tokio::pin!(run);
                    tokio::select! {
                        () = &mut run => {}
                        () = sleep_until(now + slow_after) => {
                            drop(fresh_permit);
                            run.await;
                        }
                    }
                    drop(permit);
                });
                // Reap finished checks as we go so the set stays small.
                while running.try_join_next().is_some() {}
            }
            batch += 1;
        }
        let mut guard = self.last_targets.lock().unwrap_or_else(|e| e.into_inner());
        if keep_starts && guard.0.len() == starts.len() {
            guard.1 = starts;
        }
        None
    }

    fn check(&self) -> Check<W> {
        Check {
            work: self.work.clone(),
            buffer: self.buffer.clone(),
            stats: self.stats.clone(),
            events: self.events.clone(),
            timeout: self.config.timeout,
        }
    }

    /// On cancel: gives the checks still running most of the grace period, then cuts them
    /// off. Returns how many were cut.
    async fn cut(&self, stop_at: Instant, mut running: JoinSet<()>) -> u64 {
        // Checks get most of the grace period; the rest is kept for the final flush.
        let drain_until = stop_at + self.config.shutdown_grace.mul_f64(0.8);
        let _ = timeout_at(drain_until, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        let cut = running.len() as u64;
        running.shutdown().await;
        if cut > 0 {
            tracing::warn!(target: "fleet::engine", worker = self.work.kind().as_str(), cut, "{} checks still running at shutdown were cancelled", cut);
        }
        cut
    }

    /// Step 4: a cycle is done when its results are stored. Asks the writer to write them
    /// now and waits a little for it (a store that is down does not hold the cycle up for
    /// long; its results wait in the buffer), then records, logs and publishes the cycle.
    async fn finish(
        &self,
        started: Instant,
        started_at: OffsetDateTime,
        cancel: &CancellationToken,
    ) {
        self.flushed(cancel).await;

        let duration = started.elapsed();
        let summary = {
            let mut g = self.stats.lock();
            g.cycle.duration = duration;
            g.stats.cycles += 1;
            g.stats.last_run = Some(started_at);
            g.stats.last_duration_seconds = Some(duration.as_secs_f64());
            g.stats.last_cycle_not_checked = g
                .cycle
                .not_checked
                .iter()
                .map(|(kind, (n, _))| (*kind, *n))
                .collect();
            g.cycle.clone()
        };
        self.work.log_summary(&summary);
        for (kind, (count, example)) in &summary.not_checked {
            tracing::error!(
                target: "fleet::engine",
                worker = self.work.kind().as_str(),
                kind,
                count,
                "{} cycle: {count} targets not checked through Fleet's own fault, e.g. {example}",
                capitalized(self.work.kind().as_str()),
            );
            self.problem(Problem::NotChecked {
                kind,
                count: *count,
                example: example.clone(),
            });
        }
        if let Some(found) = self.work.after_cycle().await {
            let problems = {
                let mut g = self.stats.lock();
                match found {
                    Ok(findings) => {
                        g.stats.clear_error(STORAGE_CHECK_FAILED);
                        let problems = findings
                            .iter()
                            .cloned()
                            .map(Problem::StorageFinding)
                            .collect();
                        g.stats.storage_findings = findings;
                        problems
                    }
                    Err(e) => {
                        g.stats.last_error = Some(format!("{STORAGE_CHECK_FAILED}: {e}"));
                        vec![Problem::StorageCheckFailed(e.to_string())]
                    }
                }
            };
            for problem in problems {
                self.problem(problem);
            }
        }
        self.report_drops();
        self.events.publish(Event::CycleFinished {
            worker: self.work.kind(),
            summary,
            stats: Box::new(self.stats.snapshot()),
        });
    }

    /// Asks the writer to write what waits now, and waits a little for it: a store that is
    /// down does not hold the cycle up for long (its results wait in the buffer).
    async fn flushed(&self, cancel: &CancellationToken) {
        let drained = async {
            loop {
                let wrote = self.buffer.wrote.notified();
                if self.buffer.pending() == 0 {
                    break;
                }
                self.buffer.full_enough.notify_one();
                wrote.await;
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => {}
            _ = tokio::time::timeout(self.config.flush_interval * 2, drained) => {}
        }
    }

    /// Publishes a problem of this worker.
    fn problem(&self, problem: Problem) {
        self.events.publish(Event::Problem {
            worker: self.work.kind(),
            problem,
        });
    }

    /// Publishes the results dropped since the last report, if any.
    fn report_drops(&self) {
        let total = self.buffer.dropped();
        let before = self
            .reported_drops
            .swap(total, std::sync::atomic::Ordering::Relaxed);
        if total > before {
            self.problem(Problem::ResultsDropped {
                dropped: total - before,
                total,
            });
        }
    }
}

const SELECT_FAILED: &str = "selecting targets failed";
const STORAGE_CHECK_FAILED: &str = "storage check failed";

/// A whole cycle's targets and the offset from its start at which each started.
/// The last whole cycle: its targets with their holds, shared with the dispatch that ran
/// them, and the offset at which each started.
type LastCycle<T> = (Arc<[(T, Offset)]>, Vec<Offset>);

/// A time after a cycle's start, in whole milliseconds rounded up (so a hold never ends
/// early): 4 bytes a target where a `Duration` takes 16, which at 100,000 targets is 1.2 MB
/// for each of the cycle's lists. 49 days at most, far beyond any interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Offset(u32);

impl Offset {
    pub(crate) const ZERO: Self = Self(0);

    pub(crate) fn ceil(d: Duration) -> Self {
        let ms = d.as_nanos().div_ceil(1_000_000);
        Self(u32::try_from(ms).unwrap_or(u32::MAX))
    }

    pub(crate) fn get(self) -> Duration {
        Duration::from_millis(u64::from(self.0))
    }

    pub(crate) fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// What step 1 found.
enum Selected<T> {
    /// Each target with the time after the cycle's start before which it may not start.
    Targets(Arc<[(T, Offset)]>),
    /// Selecting failed and there is no earlier selection to fall back on.
    Nothing,
    Cancelled,
}

/// Step 3: waits for the checks in flight. Returns when cancelled first.
async fn drain(running: &mut JoinSet<()>, cancel: &CancellationToken) -> Option<Instant> {
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Some(Instant::now()),
            next = running.join_next() => {
                next.as_ref()?;
            }
        }
    }
}

/// One check, with what it needs to run on its own task.
struct Check<W: Work> {
    work: Arc<W>,
    buffer: Arc<ResultBuffer<W::Output>>,
    stats: StatsHandle,
    events: Events,
    timeout: Duration,
}

/// Counts a check as in flight for as long as it lives, also when it is cancelled.
struct InFlight(StatsHandle);

impl InFlight {
    fn new(stats: StatsHandle) -> Self {
        stats.lock().stats.in_flight += 1;
        Self(stats)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().stats.in_flight -= 1;
    }
}

impl<W: Work> Check<W> {
    /// Runs the check stamped `started_at`; its deadline counts from when its task runs, so
    /// that a check's full timeout is its own however late the task starts.
    async fn run(self, target: W::Target, started_at: OffsetDateTime) {
        let _in_flight = InFlight::new(self.stats.clone());
        let output = match run_until(
            &*self.work,
            &target,
            started_at,
            Instant::now(),
            self.timeout,
        )
        .await
        {
            Ok(output) => output,
            Err(why) => {
                self.stats.not_checked(&why, self.work.name(&target));
                return;
            }
        };
        let tally = self.work.tally(&output);
        self.stats.record(tally, self.work.name(&target));
        // Published once, here, never by the writer: a retried write announces nothing twice.
        let event = self.work.event(&target, &output, false);
        self.buffer.push(output);
        self.events.publish(event);
    }
}

/// Runs one check of `target` under its deadline, as a cycle does: the result of a check the
/// deadline cuts off is [`Work::timed_out`]. For checks outside a cycle (an API's "check now").
pub async fn check_once<W: Work>(
    work: &W,
    target: &W::Target,
    timeout: Duration,
    clock: &dyn Clock,
) -> Result<W::Output, NotChecked> {
    run_until(work, target, clock.now(), Instant::now(), timeout).await
}

/// Runs one check started at `started_at` (`started` in tokio time) under its deadline.
async fn run_until<W: Work>(
    work: &W,
    target: &W::Target,
    started_at: OffsetDateTime,
    started: Instant,
    timeout: Duration,
) -> Result<W::Output, NotChecked> {
    let deadline = started + timeout;
    match timeout_at(deadline, work.run(target, started_at, deadline)).await {
        Ok(output) => output,
        Err(_) => Ok(work.timed_out(target, started_at, timeout)),
    }
}

/// Why a check-now produced no result.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Fleet could not check, through its own fault.
    #[error(transparent)]
    NotChecked(#[from] NotChecked),
    /// The result could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs one check outside a cycle (an API's "check now"), as a cycle does: under its
/// deadline, recorded, and published with `manual` set. Unlike a cycle's, the result is
/// written before this returns, and published only once it is written.
pub async fn check_now<W: Work>(
    work: &W,
    target: &W::Target,
    timeout: Duration,
    clock: &dyn Clock,
    events: &Events,
) -> Result<W::Output, CheckError> {
    let output = check_once(work, target, timeout, clock).await?;
    work.record(std::slice::from_ref(&output)).await?;
    events.publish(work.event(target, &output, true));
    Ok(output)
}

/// Drains the buffer to the store in groups of up to `write_batch_size`, at once when that
/// many wait, else after `flush_interval`. On a store error the group goes back and is retried
/// with backoff. After `flush_now` fires it writes without waiting and returns once empty.
async fn write_loop<W: Work>(
    work: Arc<W>,
    buffer: Arc<ResultBuffer<W::Output>>,
    stats: StatsHandle,
    events: Events,
    config: WorkerConfig,
    flush_now: CancellationToken,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let kind = work.kind().as_str();
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        if !flush_now.is_cancelled() && buffer.len() < config.write_batch_size {
            tokio::select! {
                () = flush_now.cancelled() => {}
                () = buffer.full_enough.notified() => {}
                () = tokio::time::sleep(config.flush_interval) => {}
            }
        }
        let batch = buffer.take(config.write_batch_size);
        if batch.is_empty() {
            if flush_now.is_cancelled() {
                return;
            }
            continue;
        }
        let n = batch.len();
        let result = work.record(&batch).await;
        match result {
            Ok(()) => {
                buffer.written(n);
                buffer.wrote.notify_waiters();
                backoff = MIN_BACKOFF;
                let values = work.stored_values(&batch);
                let mut g = stats.lock();
                g.stats.written += n as u64;
                g.stats.values_collected += values;
                if failing {
                    failing = false;
                    g.stats.last_error = None;
                    drop(g);
                    tracing::info!(target: "fleet::engine", worker = kind, "{} results are being written again", capitalized(kind));
                    events.publish(Event::Problem {
                        worker: work.kind(),
                        problem: Problem::WriteRecovered,
                    });
                }
            }
            Err(e) => {
                buffer.restore(batch);
                buffer.wrote.notify_waiters();
                let pending = buffer.pending();
                tracing::error!(
                    target: "fleet::engine",
                    worker = kind,
                    error = %e,
                    pending,
                    "writing {n} {kind} results failed, {pending} waiting; retrying in {:?}: {e}",
                    backoff,
                );
                if !failing {
                    events.publish(Event::Problem {
                        worker: work.kind(),
                        problem: Problem::WriteFailing {
                            error: e.to_string(),
                            pending,
                        },
                    });
                }
                failing = true;
                stats.lock().stats.last_error = Some(format!("writing results failed: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// How one cycle starts its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pace {
    /// Checks started together.
    pub batch_size: usize,
    /// Time between batch starts.
    pub delay: Duration,
    /// Checks running at once.
    pub max_in_flight: usize,
    /// Checks in their first [`SLOW_AFTER`] at once: the configured `max_in_flight`, or four
    /// batches when the batches grow past it, within `max_in_flight`.
    pub fresh: usize,
}

/// The least time between batch starts: a fleet too large to start within a quarter of the
/// interval at this pace gets larger batches instead of shorter gaps.
pub(crate) const MIN_BATCH_DELAY: Duration = Duration::from_millis(10);

/// How long a check runs before it stops counting against the configured `max_in_flight`
/// (it is hung or slow, not competing for CPU) and only holds its file slot; at most half
/// the timeout.
pub(crate) const SLOW_AFTER: Duration = Duration::from_secs(2);

/// The share of a fleet whose checks may hang for their whole timeout without holding back
/// any other start, when the worker has a file budget to grow into.
pub(crate) const HUNG_SHARE: f64 = 0.1;

/// The share of the interval a cycle's starts are spread over: a quarter, so that the
/// selection before them and the slowest answers after them still end the cycle within a
/// third of the interval.
pub(crate) const START_SPAN: u32 = 4;

/// The pace of a cycle of `targets` targets. The configured batches and delay when they start
/// every target within a quarter of the interval ([`START_SPAN`]); otherwise the delay shortens, down to
/// [`MIN_BATCH_DELAY`], and then the batches grow. Unless the delay is held fixed (the seed's
/// settings), which keeps both. With a file budget, `max_in_flight` rises to hold a tenth of
/// the fleet hanging for the whole timeout, plus four batches, within the budget.
pub(crate) fn pace(c: &WorkerConfig, targets: usize) -> Pace {
    let mut p = Pace {
        batch_size: c.batch_size,
        delay: c.batch_delay,
        max_in_flight: c.max_in_flight,
        fresh: c.max_in_flight,
    };
    if c.fixed_batch_delay {
        return p;
    }
    let budget = c.interval / START_SPAN;
    let batches = targets.div_ceil(p.batch_size);
    if batches > 1 && c.batch_delay * (batches - 1) as u32 > budget {
        let gaps = (batches - 1) as u32;
        p.delay = budget / gaps;
        if p.delay < MIN_BATCH_DELAY {
            let most_gaps = (budget.as_nanos() / MIN_BATCH_DELAY.as_nanos()).max(1) as usize;
            p.batch_size = targets.div_ceil(most_gaps + 1);
            let gaps = targets.div_ceil(p.batch_size).saturating_sub(1).max(1) as u32;
            p.delay = budget / gaps;
        }
    }
    if let Some(files) = c.file_budget {
        // Hung checks hold a slot for the timeout; starts spread over the batches' span.
        let span = p.delay * targets.div_ceil(p.batch_size).saturating_sub(1) as u32;
        let hung = targets as f64 * HUNG_SHARE;
        let held = if span.is_zero() || c.timeout >= span {
            hung
        } else {
            hung * c.timeout.as_secs_f64() / span.as_secs_f64()
        };
        let wanted = held.ceil() as usize + 4 * p.batch_size;
        p.max_in_flight = c.max_in_flight.max(wanted.min(files));
    }
    // A batch starts every few milliseconds at the largest sizes, and a check on a busy box
    // takes a few of those: four batches may be fresh at once, or the batches could not start
    // on time however few servers hang.
    p.fresh = c.max_in_flight.max(4 * p.batch_size).min(p.max_in_flight);
    p
}

#[cfg(test)]
mod pace_tests {
    use super::*;
    use crate::WorkerKind;

    #[test]
    fn small_fleets_keep_the_configured_pace() {
        let c = WorkerConfig::defaults(WorkerKind::Health);
        let p = pace(&c, 20);
        assert_eq!(
            (p.batch_size, p.delay, p.max_in_flight),
            (10, c.batch_delay, 256)
        );
    }

    #[test]
    fn large_fleets_get_larger_batches_not_gaps_under_ten_milliseconds() {
        let mut c = WorkerConfig::defaults(WorkerKind::Health);
        let p = pace(&c, 1_000);
        assert_eq!(p.batch_size, 10, "100 batches fit at 101 ms");
        let p = pace(&c, 100_000);
        assert!(p.delay >= MIN_BATCH_DELAY, "{p:?}");
        assert!(p.batch_size >= 100, "{p:?}");
        let span = p.delay * (100_000usize.div_ceil(p.batch_size) - 1) as u32;
        assert!(span <= c.interval / START_SPAN, "{span:?}");
        c.fixed_batch_delay = true;
        assert_eq!(pace(&c, 100_000).batch_size, 10, "the seed's settings stay");
    }

    #[test]
    fn in_flight_grows_to_hold_a_hung_tenth_within_the_file_budget() {
        let mut c = WorkerConfig::defaults(WorkerKind::Health);
        assert_eq!(
            pace(&c, 100_000).max_in_flight,
            256,
            "no budget: as configured"
        );
        assert_eq!(
            pace(&c, 100_000).fresh,
            256,
            "no budget: none past the configured"
        );
        c.file_budget = Some(14_000);
        let p = pace(&c, 100_000);
        // 10,000 hung, each held 10 s, started over 7.5 s: all at once.
        assert!((10_000..=14_000).contains(&p.max_in_flight), "{p:?}");
        assert_eq!(
            p.fresh,
            4 * p.batch_size,
            "four of the grown batches fresh at once"
        );
        c.file_budget = Some(2_000);
        assert_eq!(
            pace(&c, 100_000).max_in_flight,
            2_000,
            "never past the budget"
        );
        c.file_budget = Some(100);
        assert_eq!(
            pace(&c, 100_000).max_in_flight,
            256,
            "never below the configured"
        );
    }
}
