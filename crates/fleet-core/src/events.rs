//! Result events: the one seam for everything that consumes results.
//!
//! The engine publishes an [`Event`] for every completed check or collection, every finished
//! cycle and every worker problem. Consumers (alerts, live pages) [`Events::subscribe`]; they
//! never wrap the [`Store`](crate::Store), which would show them a retried write twice.
//!
//! Each subscription has a bounded queue of its own. Publishing never waits: when a
//! subscriber's queue is full, the event is dropped for that subscriber only, counted, and the
//! subscriber's next [`Subscription::recv`] says [`Received::Lagged`] so that it can
//! resynchronise from the store. The store writer is not a subscriber: its intake is the
//! engine's own bounded result buffer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use crate::engine::{CycleSummary, WorkerKind, WorkerStats};
use crate::model::{HealthCheck, HealthStatus, MetricsRecord};

/// Something a worker did or found.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A health check completed (in a cycle, or on demand).
    Checked {
        /// The server's name.
        server: String,
        /// The check as it is stored; its `status` is the server's new health.
        check: HealthCheck,
        /// The server's health before this check, `None` when it was never checked.
        previous: Option<HealthStatus>,
        /// Whether it was asked for outside a cycle (check-now).
        manual: bool,
    },
    /// A metrics collection completed, with its sample or its failure.
    Collected {
        /// The server's name.
        server: String,
        /// What was collected.
        record: MetricsRecord,
    },
    /// A worker's cycle finished.
    CycleFinished {
        /// Which worker.
        worker: WorkerKind,
        /// What the cycle did.
        summary: CycleSummary,
        /// The worker's statistics at the cycle's end.
        stats: Box<WorkerStats>,
    },
    /// A worker met a problem.
    Problem {
        /// Which worker.
        worker: WorkerKind,
        /// What happened.
        problem: Problem,
    },
}

/// A worker problem, raised once when it starts (and once when a write recovers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Ticks fell while a cycle was still running.
    Overrun {
        /// How many ticks.
        missed: u64,
    },
    /// Writing results started failing; they wait in the buffer and are retried.
    WriteFailing {
        /// The store's error.
        error: String,
        /// Results waiting.
        pending: u64,
    },
    /// Writing results works again after failing.
    WriteRecovered,
    /// Results were dropped (the buffer overflowed, or the store was down at shutdown).
    ResultsDropped {
        /// Dropped since the last report.
        dropped: u64,
        /// Dropped since start.
        total: u64,
    },
    /// The store's self-check found something wrong, e.g. a missing partition.
    StorageFinding(String),
    /// The store's self-check itself failed.
    StorageCheckFailed(String),
    /// Targets were not checked through Fleet's own fault (a local resource ran out, a token
    /// no configured key opens); raised once per cycle in which it happened.
    NotChecked {
        /// [`NotChecked::kind`](crate::NotChecked::kind).
        kind: &'static str,
        /// How many targets in the cycle.
        count: u64,
        /// The first one, and why.
        example: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Overrun { missed } => write!(f, "cycle overran: {missed} tick(s) missed"),
            Problem::WriteFailing { error, pending } => {
                write!(f, "writing results failed ({pending} waiting): {error}")
            }
            Problem::WriteRecovered => f.write_str("results are being written again"),
            Problem::ResultsDropped { dropped, total } => {
                write!(f, "{dropped} results dropped ({total} since start)")
            }
            Problem::StorageFinding(s) => f.write_str(s),
            Problem::StorageCheckFailed(e) => write!(f, "storage check failed: {e}"),
            Problem::NotChecked { count, example, .. } => {
                write!(f, "{count} targets not checked, e.g. {example}")
            }
        }
    }
}

/// What a subscription received.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// The next event.
    Event(Arc<Event>),
    /// Events were dropped because this subscriber's queue was full. Events still queued are
    /// delivered after this, but some that followed them are gone: read the current state
    /// from the store again.
    Lagged {
        /// Events dropped for this subscriber since the last signal.
        missed: u64,
    },
}

/// A subscriber's counters, shared between the bus and its subscription.
#[derive(Debug, Default)]
struct Counters {
    /// Dropped since start.
    lost: AtomicU64,
    /// Dropped since the subscriber was last told.
    unsignalled: AtomicU64,
    /// Delivered into its queue.
    delivered: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    name: String,
    capacity: usize,
    tx: mpsc::Sender<Arc<Event>>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Bus {
    slots: RwLock<Vec<Slot>>,
    published: AtomicU64,
    /// Losses of subscribers that have since gone away, so the total never goes down.
    lost_by_gone: AtomicU64,
}

/// The event bus: cheap to clone, shared by both workers and whoever publishes on their
/// behalf (check-now).
#[derive(Clone, Debug, Default)]
pub struct Events {
    bus: Arc<Bus>,
}

/// One subscriber's figures, for `/metrics` and the status endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberStats {
    /// The name it subscribed with.
    pub name: String,
    /// Its queue's bound.
    pub capacity: usize,
    /// Events waiting in its queue.
    pub queued: usize,
    /// Events put in its queue since it subscribed.
    pub delivered: u64,
    /// Events dropped because its queue was full.
    pub lost: u64,
}

/// The bus's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventStats {
    /// Events published since start.
    pub published: u64,
    /// Events dropped for any subscriber since start, including ones since gone.
    pub lost: u64,
    /// The current subscribers.
    pub subscribers: Vec<SubscriberStats>,
}

impl Events {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.bus.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes under `name` (for the figures) with a queue of `capacity` events (at least 1).
    pub fn subscribe(&self, name: impl Into<String>, capacity: usize) -> Subscription {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let counters = Arc::new(Counters::default());
        self.bus
            .slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Slot {
                name: name.into(),
                capacity,
                tx,
                counters: counters.clone(),
            });
        Subscription { rx, counters }
    }

    /// Whether anyone listens; publishers may skip building an event when nobody does.
    pub fn has_subscribers(&self) -> bool {
        !self.slots().is_empty()
    }

    /// Publishes `event` to every subscriber without waiting: a full queue drops it for that
    /// subscriber and counts the loss.
    pub fn publish(&self, event: Event) {
        self.bus.published.fetch_add(1, Ordering::Relaxed);
        let event = Arc::new(event);
        let mut closed = false;
        for slot in self.slots().iter() {
            match slot.tx.try_send(event.clone()) {
                Ok(()) => {
                    slot.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.counters.lost.fetch_add(1, Ordering::Relaxed);
                    slot.counters.unsignalled.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
            }
        }
        if closed {
            let mut slots = self.bus.slots.write().unwrap_or_else(|e| e.into_inner());
            slots.retain(|s| {
                if s.tx.is_closed() {
                    let lost = s.counters.lost.load(Ordering::Relaxed);
                    self.bus.lost_by_gone.fetch_add(lost, Ordering::Relaxed);
                    false
                } else {
                    true
                }
            });
        }
    }

    /// The bus's figures now.
    pub fn stats(&self) -> EventStats {
        let slots = self.slots();
        let subscribers: Vec<SubscriberStats> = slots
            .iter()
            .map(|s| SubscriberStats {
                name: s.name.clone(),
                capacity: s.capacity,
                queued: s.capacity - s.tx.capacity(),
                delivered: s.counters.delivered.load(Ordering::Relaxed),
                lost: s.counters.lost.load(Ordering::Relaxed),
            })
            .collect();
        EventStats {
            published: self.bus.published.load(Ordering::Relaxed),
            lost: self.bus.lost_by_gone.load(Ordering::Relaxed)
                + subscribers.iter().map(|s| s.lost).sum::<u64>(),
            subscribers,
        }
    }
}

/// One subscriber's end of the bus. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Arc<Event>>,
    counters: Arc<Counters>,
}

impl Subscription {
    fn lag(&self) -> Option<Received> {
        let missed = self.counters.unsignalled.swap(0, Ordering::Relaxed);
        (missed > 0).then_some(Received::Lagged { missed })
    }

    /// The next event, or the news that some were lost. `None` once every publisher is gone.
    pub async fn recv(&mut self) -> Option<Received> {
        if let Some(lagged) = self.lag() {
            return Some(lagged);
        }
        self.rx.recv().await.map(Received::Event)
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        if let Some(lagged) = self.lag() {
            return Some(lagged);
        }
        self.rx.try_recv().ok().map(Received::Event)
    }

    /// Events dropped for this subscriber since it subscribed.
    pub fn lost(&self) -> u64 {
        self.counters.lost.load(Ordering::Relaxed)
    }
}
