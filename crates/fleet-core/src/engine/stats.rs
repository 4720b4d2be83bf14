//! Worker statistics: a plain snapshot, and the shared cell the engine updates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use time::OffsetDateTime;

/// A worker's statistics at one moment. Cheap to clone; the API maps it to its JSON shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkerStats {
    /// `health` or `metrics`.
    pub worker: &'static str,
    /// Whether the worker's loop is running.
    pub running: bool,
    /// The configured interval.
    pub interval_seconds: f64,
    /// Checks (or collections) completed since start.
    pub performed: u64,
    /// Completed with a valid answer.
    pub successful: u64,
    /// Completed without one.
    pub failed: u64,
    /// `successful / performed` in percent, one decimal; 0 before the first check.
    pub success_rate: f64,
    /// When the last completed cycle started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_run: Option<OffsetDateTime>,
    /// How long the last completed cycle took.
    pub last_duration_seconds: Option<f64>,
    /// Cycles completed.
    pub cycles: u64,
    /// Ticks that fell while a cycle was still running (never queued).
    pub overruns: u64,
    /// Checks running now.
    pub in_flight: u64,
    /// Results waiting to be written.
    pub pending: u64,
    /// Results written to the store.
    pub written: u64,
    /// Results dropped because the buffer was full, or lost at shutdown.
    pub dropped: u64,
    /// The latest error (a failed selection or write), cleared by the next success.
    pub last_error: Option<String>,
    /// Completed checks by resulting label (health status, or `collected` / `failed`).
    pub by_status: BTreeMap<&'static str, u64>,
    /// Metric values written to the store (the metrics worker's `total_metrics_collected`):
    /// counted when their batch is written, not when they are collected.
    pub values_collected: u64,
    /// Targets selected for the last cycle.
    pub last_cycle_targets: u64,
    /// The delay between batch starts in use, after any shortening.
    pub batch_delay_seconds: f64,
    /// Checks started together in the last cycle, after any growth for a large fleet.
    pub batch_size: u64,
    /// Checks allowed to run at once in the last cycle, after any growth for a large fleet.
    pub max_in_flight: u64,
    /// Checks whose start waited for a free slot, since start: more of the fleet hung (or
    /// answered slowly) than `max_in_flight` holds. The cycle stretches instead of failing.
    pub starts_delayed: u64,
    /// What the store's self-check found wrong after the last cycle (a missing partition).
    pub storage_findings: Vec<String>,
    /// Targets not checked through Fleet's own fault, since start, by
    /// [`NotChecked::kind`](crate::NotChecked::kind). Not in `performed`.
    pub not_checked: BTreeMap<&'static str, u64>,
    /// The same, in the last completed cycle only.
    pub last_cycle_not_checked: BTreeMap<&'static str, u64>,
}

impl WorkerStats {
    /// Clears `last_error` when it is the one that starts with `kind` (a later success of
    /// that kind of operation), leaving other errors in place.
    pub(crate) fn clear_error(&mut self, kind: &str) {
        if self
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(kind))
        {
            self.last_error = None;
        }
    }

    fn refresh_rate(&mut self) {
        self.success_rate = if self.performed == 0 {
            0.0
        } else {
            (self.successful as f64 * 1000.0 / self.performed as f64).round() / 10.0
        };
    }
}

/// How one completed check counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Whether it succeeded.
    pub successful: bool,
    /// Its label for `by_status`.
    pub label: &'static str,
}

/// What one cycle did, for its summary log line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CycleSummary {
    /// Targets selected.
    pub targets: usize,
    /// Checks completed.
    pub completed: u64,
    /// Of those, successful.
    pub successful: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Completed checks by label.
    pub by_label: BTreeMap<&'static str, u64>,
    /// Names of the first failed targets (at most [`CycleSummary::MAX_NAMES`]).
    pub failed_names: Vec<String>,
    /// Names of the first targets with each label (at most [`CycleSummary::NAMES_PER_LABEL`]).
    pub names_by_label: BTreeMap<&'static str, Vec<String>>,
    /// How long the cycle took.
    pub duration: std::time::Duration,
    /// Targets not checked through Fleet's own fault, by kind: how many, and the first reason.
    pub not_checked: BTreeMap<&'static str, (u64, String)>,
}

impl CycleSummary {
    /// The most failed names kept for the log line.
    pub const MAX_NAMES: usize = 20;
    /// The most names kept per label.
    pub const NAMES_PER_LABEL: usize = 5;

    /// The first names of targets with `label`.
    pub fn names(&self, label: &str) -> &[String] {
        self.names_by_label.get(label).map_or(&[], Vec::as_slice)
    }

    /// How many completed checks carried `label`.
    pub fn count(&self, label: &str) -> u64 {
        self.by_label.get(label).copied().unwrap_or(0)
    }

    /// The failed names, with `and N more` when they were cut.
    pub fn failed_list(&self) -> String {
        let mut s = self.failed_names.join(", ");
        let more = self.failed as usize - self.failed_names.len().min(self.failed as usize);
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        s
    }
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) stats: WorkerStats,
    pub(crate) cycle: CycleSummary,
}

/// Where the pending and dropped counts live (the result buffer).
pub(crate) trait BufferCounts: Send + Sync {
    fn pending(&self) -> u64;
    fn dropped(&self) -> u64;
}

/// The engine's shared, lock-protected statistics. Read with [`StatsHandle::snapshot`].
#[derive(Clone)]
pub struct StatsHandle {
    inner: Arc<Mutex<Inner>>,
    buffer: Arc<dyn BufferCounts>,
}

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsHandle")
            .field("stats", &self.snapshot())
            .finish()
    }
}

impl StatsHandle {
    pub(crate) fn new(worker: &'static str, buffer: Arc<dyn BufferCounts>) -> Self {
        let inner = Inner {
            stats: WorkerStats {
                worker,
                ..Default::default()
            },
            cycle: CycleSummary::default(),
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            buffer,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters inconsistent beyond one
        // check, so a poisoned lock is still used.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The statistics now.
    pub fn snapshot(&self) -> WorkerStats {
        let mut s = self.lock().stats.clone();
        s.pending = self.buffer.pending();
        s.dropped = self.buffer.dropped();
        s
    }

    pub(crate) fn not_checked(&self, why: &crate::NotChecked, name: &str) {
        let mut g = self.lock();
        let Inner { stats, cycle } = &mut *g;
        *stats.not_checked.entry(why.kind()).or_default() += 1;
        cycle
            .not_checked
            .entry(why.kind())
            .or_insert_with(|| (0, format!("{name}: {why}")))
            .0 += 1;
    }

    pub(crate) fn record(&self, tally: Tally, name: &str) {
        let mut g = self.lock();
        let Inner { stats, cycle } = &mut *g;
        stats.performed += 1;
        cycle.completed += 1;
        if tally.successful {
            stats.successful += 1;
            cycle.successful += 1;
        } else {
            stats.failed += 1;
            cycle.failed += 1;
            if cycle.failed_names.len() < CycleSummary::MAX_NAMES {
                cycle.failed_names.push(name.to_owned());
            }
        }
        *stats.by_status.entry(tally.label).or_default() += 1;
        *cycle.by_label.entry(tally.label).or_default() += 1;
        let names = cycle.names_by_label.entry(tally.label).or_default();
        if names.len() < CycleSummary::NAMES_PER_LABEL {
            names.push(name.to_owned());
        }
        stats.refresh_rate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_rate_is_a_percent_with_one_decimal() {
        struct NoBuffer;
        impl BufferCounts for NoBuffer {
            fn pending(&self) -> u64 {
                0
            }
            fn dropped(&self) -> u64 {
                0
            }
        }
        let h = StatsHandle::new("health", Arc::new(NoBuffer));
        assert_eq!(h.snapshot().success_rate, 0.0);
        let ok = Tally {
            successful: true,
            label: "healthy",
        };
        let bad = Tally {
            successful: false,
            label: "unreachable",
        };
        h.record(ok, "a");
        h.record(ok, "b");
        h.record(bad, "c");
        let s = h.snapshot();
        assert_eq!((s.performed, s.successful, s.failed), (3, 2, 1));
        assert_eq!(s.success_rate, 66.7);
        assert_eq!(s.by_status.get("healthy"), Some(&2));
        assert_eq!(h.lock().cycle.failed_names, vec!["c".to_owned()]);
    }

    #[test]
    fn failed_list_says_how_many_were_cut() {
        let c = CycleSummary {
            failed: 22,
            failed_names: (0..20).map(|i| format!("s{i}")).collect(),
            ..Default::default()
        };
        assert!(c.failed_list().ends_with("s19 and 2 more"));
    }
}
