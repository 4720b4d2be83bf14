//! Serving the API on a socket without letting idle or slow clients hold it: headers and
//! bodies have deadlines, open connections have a cap (the excess is closed on arrival), and
//! running out of file descriptors on accept is logged and waited out instead of spinning.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::ApiError;

/// The most bytes of a request's head (request line and headers) held per connection.
pub const MAX_HEAD: usize = 64 * 1024;

/// How the listener treats connections. Plain data with documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Longest wait for a request's complete headers. Default 30 s.
    pub header_timeout: Duration,
    /// Longest time from a request's headers to its answer, body included. Default 30 s.
    pub body_timeout: Duration,
    /// Most connections open at once. Default 1,024.
    pub max_connections: usize,
    /// How long open connections get to finish at shutdown. Default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The listener's counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections closed on arrival because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Accepts that failed (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
}

/// Answers 408 when a request's body (and handling) does not finish by the deadline.
async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request was not complete within {}s",
                limit.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// [`serve`] on a standard listener, registered with the runtime this runs on (for serving
/// the API on a runtime of its own).
pub async fn serve_std(
    listener: std::net::TcpListener,
    router: Router,
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: "fleet::api", error = %e, "the API cannot listen: {e}");
            return;
        }
    };
    serve(listener, router, config, stats, shutdown).await;
}

/// Serves `router` on `listener` until `shutdown` fires, then gives open connections
/// `shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
) {
    let router = router.layer(middleware::from_fn_with_state(
        config.body_timeout,
        deadline,
    ));
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // A request's head may take 64 KiB of memory, not hyper's default of about 400 KiB:
        // with the connection cap, that bounds what unfinished heads can hold.
        .max_buf_size(MAX_HEAD);
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                accept_backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of file descriptors (or another passing failure): say so, and wait a
                // little instead of spinning on a listener that stays readable.
                let n = stats.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(target: "fleet::api", error = %e, failures = n, "the API cannot accept connections: {e}");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(accept_backoff) => {}
                }
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            let n = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(target: "fleet::api", refused = n, "API connection from {peer} closed: {} connections are open (FLEET_API_MAX_CONNECTIONS)", config.max_connections);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let stats = stats.clone();
        stats.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "fleet::api", error = %e, "API connection from {peer} ended: {e}");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(target: "fleet::api", "API connections still open at exit");
    }
}
