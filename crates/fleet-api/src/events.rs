//! The live stream, `GET /api/v1/fleet/events`: Server-Sent Events of state changes, incident
//! changes and cycle ends.
//!
//! State and incident events are read from the stored change log and incident timeline, so
//! an event's id names positions in both (`c-123.i-45`) and `Last-Event-ID` resumes across
//! restarts and instances. One watcher per process, running only while streams are open,
//! reads the two newest ids once a second and on every cycle end; a stream reads the store
//! only when a head has moved, so an idle stream costs nothing. Cycle ends come from the
//! in-process events, carry no id and are never replayed.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fleet_core::{Event, Received, StateChange};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::{ApiError, AppState};

/// How often the watcher reads the newest ids while streams are open.
const POLL: Duration = Duration::from_secs(1);
/// The keep-alive comment's period.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The newest ids of both sources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Heads {
    change: i64,
    timeline: i64,
}

/// A position in both sources: what an event id names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) change: i64,
    pub(crate) timeline: i64,
}

impl Position {
    /// `c-123.i-45`.
    pub(crate) fn id(&self) -> String {
        format!("c-{}.i-{}", self.change, self.timeline)
    }

    /// Parses `c-123.i-45`; either part may come alone (`c-123`, `i-45`).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let mut p = Position {
            change: -1,
            timeline: -1,
        };
        for part in s.split('.') {
            let (source, n) = part.split_once('-')?;
            let n: i64 = n.parse().ok().filter(|n| *n >= 0)?;
            match source {
                "c" => p.change = n,
                "i" => p.timeline = n,
                _ => return None,
            }
        }
        (p.change >= 0 || p.timeline >= 0).then_some(p)
    }
}

/// The streams' shared parts: the slots, the watcher's heads, and the counters.
#[derive(Debug)]
pub(crate) struct Streams {
    slots: Arc<Semaphore>,
    max_rate: usize,
    heads: watch::Sender<Heads>,
    cycles: broadcast::Sender<Arc<serde_json::Value>>,
    watching: Mutex<bool>,
    /// Streams open now.
    pub(crate) open: AtomicU64,
    /// Streams refused because `FLEET_SSE_MAX_STREAMS` were open.
    pub(crate) refused: AtomicU64,
    /// `resync` events sent.
    pub(crate) resyncs: AtomicU64,
    /// Events sent.
    pub(crate) sent: AtomicU64,
}

impl Streams {
    pub(crate) fn new(max_streams: usize, max_rate: u32) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_streams)),
            max_rate: max_rate.max(1) as usize,
            heads: watch::Sender::new(Heads::default()),
            cycles: broadcast::Sender::new(16),
            watching: Mutex::new(false),
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }
}

async fn read_heads(app: &AppState) -> Option<Heads> {
    let change = app
        .store
        .change_ids()
        .await
        .ok()?
        .map_or(0, |(_, newest)| newest);
    let timeline = match &app.alerts {
        Some(alerts) => alerts
            .store()
            .timeline_ids()
            .await
            .ok()?
            .map_or(0, |(_, newest)| newest),
        None => 0,
    };
    Some(Heads { change, timeline })
}

/// Starts the process's watcher unless it runs. It stops by itself once no stream is open.
fn ensure_watcher(app: &AppState) {
    let streams = app.streams.clone();
    let mut watching = streams.watching.lock().unwrap_or_else(|e| e.into_inner());
    if *watching {
        return;
    }
    *watching = true;
    drop(watching);
    let app = app.clone();
    tokio::spawn(async move {
        let mut events = app.events.subscribe("event stream", 1024);
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = app.shutdown.cancelled() => break,
                _ = tick.tick() => {}
                received = events.recv() => match received {
                    Some(Received::Event(e)) => match &*e {
                        Event::CycleFinished { worker, summary, stats } => {
                            let _ = app.streams.cycles.send(Arc::new(json!({
                                "worker": worker.as_str(),
                                "targets": summary.targets,
                                "completed": summary.completed,
                                "successful": summary.successful,
                                "failed": summary.failed,
                                "duration_ms": summary.duration.as_millis() as u64,
                                "pending_results": stats.pending,
                                "dropped_results": stats.dropped,
                            })));
                        }
                        // Results reach the stream through the stored log.
                        _ => continue,
                    },
                    Some(Received::Lagged { .. }) => continue,
                    None => break,
                },
            }
            {
                let mut watching = streams.watching.lock().unwrap_or_else(|e| e.into_inner());
                if streams.heads.receiver_count() == 0 {
                    *watching = false;
                    return;
                }
            }
            if let Some(heads) = read_heads(&app).await {
                streams.heads.send_if_modified(|h| {
                    let moved = *h != heads;
                    *h = heads;
                    moved
                });
            }
        }
        *streams.watching.lock().unwrap_or_else(|e| e.into_inner()) = false;
    });
}

fn change_event(c: &StateChange, at: Position) -> SseEvent {
    let data = json!({
        "source_id": format!("c-{}", c.id),
        "server_id": c.server_id.0,
        "server_name": c.server_name,
        "changed_at": crate::views::ts(c.changed_at),
        "from_status": c.from_status.map(|h| h.as_str()),
        "to_status": c.to_status.as_str(),
        "error": c.error_message,
    });
    SseEvent::default()
        .event("change")
        .id(at.id())
        .data(data.to_string())
}

fn incident_event(t: &fleet_alerts::TimelineEntry, at: Position) -> SseEvent {
    let data = json!({
        "source_id": format!("i-{}", t.id),
        "incident_id": t.incident_id,
        "kind": t.kind,
        "message": t.message,
        "at": crate::views::ts(t.at),
    });
    SseEvent::default()
        .event("incident")
        .id(at.id())
        .data(data.to_string())
}

fn resync(at: Position, reason: &str) -> SseEvent {
    SseEvent::default()
        .event("resync")
        .id(at.id())
        .data(json!({"reason": reason}).to_string())
}

/// What one stream holds: its slot, where it is, and what it waits on.
struct Stream {
    app: AppState,
    _permit: OwnedSemaphorePermit,
    at: Position,
    heads: watch::Receiver<Heads>,
    cycles: broadcast::Receiver<Arc<serde_json::Value>>,
    queue: std::collections::VecDeque<SseEvent>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.app.streams.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stream {
    /// Reads what is new since `at` into the queue, or one `resync` (skipping to `heads`, the
    /// newest ids the watcher saw) when there is more than the stream carries.
    async fn catch_up(&mut self, heads: Heads) -> Result<(), fleet_core::StoreError> {
        let limit = self.app.streams.max_rate;
        let changes = self
            .app
            .store
            .changes_after(self.at.change, limit + 1)
            .await?;
        if changes.len() > limit {
            self.jump("more changes than the stream carries; reload", heads);
            return Ok(());
        }
        for c in &changes {
            self.at.change = c.id;
            self.queue.push_back(change_event(c, self.at));
        }
        if let Some(alerts) = &self.app.alerts {
            let lines = alerts
                .store()
                .timeline_after(self.at.timeline, limit + 1)
                .await?;
            if lines.len() > limit {
                self.jump(
                    "more incident changes than the stream carries; reload",
                    heads,
                );
                return Ok(());
            }
            for t in &lines {
                self.at.timeline = t.id;
                self.queue.push_back(incident_event(t, self.at));
            }
        }
        Ok(())
    }

    /// Skips to `heads` (never back) and queues a `resync`.
    fn jump(&mut self, reason: &str, heads: Heads) {
        self.at.change = self.at.change.max(heads.change);
        self.at.timeline = self.at.timeline.max(heads.timeline);
        self.app.streams.resyncs.fetch_add(1, Ordering::Relaxed);
        self.queue.push_back(resync(self.at, reason));
    }

    /// The next event, waiting for one as long as it takes; `None` at shutdown.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                self.app.streams.sent.fetch_add(1, Ordering::Relaxed);
                return Some(e);
            }
            tokio::select! {
                () = self.app.shutdown.cancelled() => return None,
                changed = self.heads.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let heads = *self.heads.borrow_and_update();
                    let behind = heads.change > self.at.change || heads.timeline > self.at.timeline;
                    if behind && let Err(e) = self.catch_up(heads).await {
                        tracing::debug!(target: "fleet::api", error = %e, "the event stream could not read the log: {e}");
                    }
                }
                cycle = self.cycles.recv() => match cycle {
                    Ok(data) => {
                        self.queue.push_back(SseEvent::default().event("cycle").data(data.to_string()));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

/// `GET /api/v1/fleet/events`.
pub(crate) async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let resume = match last {
        None => None,
        Some(v) => Some(Position::parse(v).ok_or_else(|| {
            ApiError::bad_request("last-event-id: expected an id of this stream, like c-12.i-3")
        })?),
    };
    let Ok(permit) = app.streams.slots.clone().try_acquire_owned() else {
        app.streams.refused.fetch_add(1, Ordering::Relaxed);
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "the live stream is full (FLEET_SSE_MAX_STREAMS); the page polls instead",
        )
        .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("30"),
        );
        return Ok(response);
    };
    app.streams.open.fetch_add(1, Ordering::Relaxed);
    let heads = app.streams.heads.subscribe();
    let cycles = app.streams.cycles.subscribe();
    ensure_watcher(&app);
    let now = read_heads(&app).await.unwrap_or_default();
    let mut stream = Stream {
        app: app.clone(),
        _permit: permit,
        at: Position {
            change: now.change,
            timeline: now.timeline,
        },
        heads,
        cycles,
        queue: Default::default(),
    };
    // A first event names where the stream starts, so a client that reconnects before any
    // change still resumes from here.
    match resume {
        Some(from) => {
            stream.at = Position {
                change: if from.change >= 0 {
                    from.change
                } else {
                    now.change
                },
                timeline: if from.timeline >= 0 {
                    from.timeline
                } else {
                    now.timeline
                },
            };
            // A position the log no longer holds cannot be resumed: rows between it and the
            // oldest kept are gone. Checked once here; a live stream never falls that far.
            let gone =
                app.store.change_ids().await?.is_some_and(|(oldest, _)| {
                    stream.at.change > 0 && stream.at.change + 1 < oldest
                });
            if gone {
                stream.jump("your last event is past the log's retention", now);
            } else {
                stream.catch_up(now).await?;
            }
        }
        None => stream.queue.push_back(
            SseEvent::default()
                .event("hello")
                .id(stream.at.id())
                .data(json!({"position": stream.at.id()}).to_string()),
        ),
    }
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let e = s.next().await?;
        Some((Ok::<_, Infallible>(e), s))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_parts_may_come_alone() {
        let p = Position {
            change: 123,
            timeline: 45,
        };
        assert_eq!(p.id(), "c-123.i-45");
        assert_eq!(Position::parse("c-123.i-45"), Some(p));
        assert_eq!(
            Position::parse("c-7"),
            Some(Position {
                change: 7,
                timeline: -1
            })
        );
        assert_eq!(
            Position::parse("i-9"),
            Some(Position {
                change: -1,
                timeline: 9
            })
        );
        for bad in ["", "x-1", "c-", "c--1", "c-1.q-2", "c1", "c-1.i-x"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
