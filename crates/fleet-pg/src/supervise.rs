//! Long-running upkeep around a [`PgStore`]: bring the schema up before the workers start, and
//! keep the partitions in shape while they run. Both stop when their token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::PgStore;

/// The first and longest wait between attempts of [`until_ready`].
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// How [`until_ready`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Migrated, partitions in place, every sealed value opens: the workers may start.
    Ready,
    /// The token fired first.
    Cancelled,
    /// Running would be blind: sealed values exist under keys no configured key opens. The
    /// message names the key ids; the host should refuse to start.
    Refused(String),
}

/// Applies the migrations and the partition upkeep, retrying with backoff until both succeed,
/// then checks that every sealed value can be opened. Each failure is logged and handed to
/// `failed`, so the caller can say why it waits (the API reports it).
pub async fn until_ready(
    store: &PgStore,
    cancel: &CancellationToken,
    mut failed: impl FnMut(String),
) -> Readiness {
    let mut backoff = BACKOFF.0;
    loop {
        let ready = async {
            crate::migrate(store.pool())
                .await
                .map_err(|e| format!("PostgreSQL at {}: {e}", store.describe_target()))?;
            store.maintain().await.map_err(|e| e.to_string())?;
            store.unopenable_keys().await.map_err(|e| e.to_string())
        };
        let error = tokio::select! {
            () = cancel.cancelled() => return Readiness::Cancelled,
            ready = ready => match ready {
                Ok(unknown) if unknown.is_empty() => return Readiness::Ready,
                Ok(unknown) => return Readiness::Refused(crate::unopenable_message(&unknown)),
                Err(e) => e,
            },
        };
        tracing::error!(target: "fleet::pg", error = %error, "the database is not ready: {error}; retrying in {backoff:?}");
        failed(error);
        tokio::select! {
            () = cancel.cancelled() => return Readiness::Cancelled,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// Runs the partition upkeep every `period` until `cancel` fires, and at once the first time
/// `leads` says this instance leads (retention is a leader's job; a shared store also checks
/// the leader's fence itself). Failures are logged and retried at the next period; the
/// metrics worker's storage check repairs in between.
pub async fn maintain_every(
    store: &PgStore,
    period: Duration,
    cancel: &CancellationToken,
    leads: impl Fn() -> bool,
) {
    // Leadership is checked often, so that a new leader runs the retention it missed.
    let poll = period.min(Duration::from_secs(5));
    let mut next = tokio::time::Instant::now() + period;
    let mut led = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
        let leading = leads();
        let due = tokio::time::Instant::now() >= next || (leading && !led);
        led = leading;
        if !due {
            continue;
        }
        next = tokio::time::Instant::now() + period;
        if let Err(e) = store.maintain().await {
            tracing::error!(target: "fleet::pg", error = %e, "partition maintenance failed: {e}");
        }
    }
}

/// Runs the rollup job every minute while `leads` says this instance leads (a shared store
/// also checks the leader's fence itself), as many runs in a row as it takes to catch up (at
/// most 120 in a row, each bounded). Failures are logged and retried at the next minute.
pub async fn roll_up_every(store: &PgStore, cancel: &CancellationToken, leads: impl Fn() -> bool) {
    loop {
        if leads() {
            for _ in 0..120 {
                if cancel.is_cancelled() {
                    return;
                }
                match store.roll_up().await {
                    Ok(r) if r.five_minute_periods > 0 || r.hours > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(target: "fleet::pg", error = %e, "history rollup failed; retrying in a minute");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}
