//! The two ways Fleet asks a server something: a health probe and a metrics collector.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::model::{HealthStatus, MetricValues, ProbeTarget};
use fleet_wire::HealthReport;

/// Why a health probe failed. Each variant's message is the short `error_message` stored with
/// the result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    /// Nothing listened.
    #[error("connection refused")]
    ConnectionRefused,
    /// The connection dropped before a response head.
    #[error("connection reset")]
    ConnectionReset,
    /// The name did not resolve.
    #[error("dns error: {0}")]
    Dns(String),
    /// The TLS handshake failed.
    #[error("tls error: {0}")]
    Tls(String),
    /// Another failure before a response head.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The server's address is one a probe must not connect to (link-local, unspecified,
    /// multicast, or a denied network).
    #[error("{0}")]
    Refused(String),
    /// No complete response head within the deadline.
    #[error("timeout after {}", fmt_secs(*after))]
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
    /// A head arrived, then the body was cut off or stalled.
    #[error("body read failed: {0}")]
    Body(String),
    /// The body was larger than the cap.
    #[error("body exceeds {}", fmt_bytes(*limit))]
    BodyTooLarge {
        /// The cap, in bytes.
        limit: u64,
    },
    /// A 3xx answer.
    #[error("HTTP {code} (redirects are not followed)")]
    Redirect {
        /// The status code.
        code: u16,
    },
    /// A 401 or 403 answer.
    #[error("HTTP {code}: token rejected")]
    TokenRejected {
        /// The status code.
        code: u16,
    },
    /// Any other 4xx or 5xx answer.
    #[error("HTTP {code}{}", if *code == 429 { " rate limited" } else { "" })]
    Http {
        /// The status code.
        code: u16,
    },
    /// A 2xx answer whose body is not a health report.
    #[error("invalid health response: {0}")]
    Invalid(String),
}

impl ProbeFailure {
    /// Whether a complete response head arrived before the failure.
    pub fn responded(&self) -> bool {
        !matches!(
            self,
            ProbeFailure::ConnectionRefused
                | ProbeFailure::ConnectionReset
                | ProbeFailure::Dns(_)
                | ProbeFailure::Tls(_)
                | ProbeFailure::Connect(_)
                | ProbeFailure::Refused(_)
                | ProbeFailure::Timeout { .. }
        )
    }

    /// The health this failure implies: unreachable without a head, critical with one.
    pub fn status(&self) -> HealthStatus {
        if self.responded() {
            HealthStatus::Critical
        } else {
            HealthStatus::Unreachable
        }
    }
}

pub(crate) fn fmt_secs(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0}s")
    } else {
        format!("{}s", format!("{secs:.3}").trim_end_matches('0'))
    }
}

fn fmt_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// Why Fleet did not check a server. It is Fleet's own fault, never the server's: nothing is
/// stored for the server, its state does not move, and the worker counts it, logs it once per
/// cycle at error level and raises a problem event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotChecked {
    /// Fleet ran out of a local resource (open files, memory) while checking.
    #[error("local resource failure: {0}")]
    LocalResource(String),
    /// The server's probe token is sealed under a key that no configured key opens, so it is
    /// not sent a request that would only be refused.
    #[error("probe token sealed under key {key_id}, which no configured key opens")]
    TokenUnreadable {
        /// The id of the key that sealed it.
        key_id: String,
    },
}

impl NotChecked {
    /// [`NotChecked::kind`] of a local resource failure.
    pub const LOCAL_RESOURCE: &'static str = "local_resource";
    /// [`NotChecked::kind`] of a token no configured key opens.
    pub const TOKEN_UNREADABLE: &'static str = "token_unreadable";

    /// A stable name for counting: [`Self::LOCAL_RESOURCE`] or [`Self::TOKEN_UNREADABLE`].
    pub fn kind(&self) -> &'static str {
        match self {
            NotChecked::LocalResource(_) => Self::LOCAL_RESOURCE,
            NotChecked::TokenUnreadable { .. } => Self::TOKEN_UNREADABLE,
        }
    }
}

/// What one health probe found.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeOutcome {
    /// A complete 2xx answer with a valid report.
    Report {
        /// The parsed report.
        answer: HealthReport,
        /// From the request's start to the end of the body.
        response_time: Duration,
    },
    /// Anything else.
    Failed {
        /// Why.
        failure: ProbeFailure,
        /// From the request's start to the end of the body, when a head arrived.
        response_time: Option<Duration>,
    },
    /// Fleet could not check, through no fault of the server's.
    NotChecked(NotChecked),
}

/// Asks one server how it is.
///
/// Implementations never panic on a server's answer and report every failure as a
/// [`ProbeOutcome::Failed`]. The engine calls [`HealthProbe::probe`] with the check's deadline
/// and also cancels it at that deadline, so an implementation may use the deadline to tell a
/// stalled body (critical) from a missing head (unreachable).
#[async_trait]
pub trait HealthProbe: Send + Sync {
    /// Probes `target`, finishing by `deadline`.
    async fn probe(&self, target: &ProbeTarget, deadline: Instant) -> ProbeOutcome;
}

/// Why a metrics collection failed. The message names the field and value where there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CollectError {
    /// The exchange failed (no answer, an HTTP error, a cut body).
    #[error("{0}")]
    Transport(String),
    /// The answer was not a valid metrics object.
    #[error(transparent)]
    Wire(#[from] fleet_wire::MetricsError),
    /// Fleet could not collect, through no fault of the server's.
    #[error(transparent)]
    NotChecked(#[from] NotChecked),
    /// No answer within the deadline.
    #[error("timeout after {}", fmt_secs(*after))]
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
}

/// Collects one server's current metrics.
#[async_trait]
pub trait MetricsCollector: Send + Sync {
    /// Collects from `target`, finishing by `deadline`.
    async fn collect(
        &self,
        target: &ProbeTarget,
        deadline: Instant,
    ) -> Result<MetricValues, CollectError>;
}

#[async_trait]
impl<T: HealthProbe + ?Sized> HealthProbe for Arc<T> {
    async fn probe(&self, target: &ProbeTarget, deadline: Instant) -> ProbeOutcome {
        (**self).probe(target, deadline).await
    }
}

#[async_trait]
impl<T: HealthProbe + ?Sized> HealthProbe for &T {
    async fn probe(&self, target: &ProbeTarget, deadline: Instant) -> ProbeOutcome {
        (**self).probe(target, deadline).await
    }
}

#[async_trait]
impl<T: MetricsCollector + ?Sized> MetricsCollector for Arc<T> {
    async fn collect(
        &self,
        target: &ProbeTarget,
        deadline: Instant,
    ) -> Result<MetricValues, CollectError> {
        (**self).collect(target, deadline).await
    }
}

#[async_trait]
impl<T: MetricsCollector + ?Sized> MetricsCollector for &T {
    async fn collect(
        &self,
        target: &ProbeTarget,
        deadline: Instant,
    ) -> Result<MetricValues, CollectError> {
        (**self).collect(target, deadline).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages_are_the_stored_error_messages() {
        let cases = [
            (
                ProbeFailure::ConnectionRefused,
                "connection refused",
                HealthStatus::Unreachable,
            ),
            (
                ProbeFailure::Timeout {
                    after: Duration::from_secs(10),
                },
                "timeout after 10s",
                HealthStatus::Unreachable,
            ),
            (
                ProbeFailure::Timeout {
                    after: Duration::from_millis(1500),
                },
                "timeout after 1.5s",
                HealthStatus::Unreachable,
            ),
            (
                ProbeFailure::BodyTooLarge { limit: 1 << 20 },
                "body exceeds 1 MiB",
                HealthStatus::Critical,
            ),
            (
                ProbeFailure::Redirect { code: 301 },
                "HTTP 301 (redirects are not followed)",
                HealthStatus::Critical,
            ),
            (
                ProbeFailure::TokenRejected { code: 401 },
                "HTTP 401: token rejected",
                HealthStatus::Critical,
            ),
            (
                ProbeFailure::Http { code: 503 },
                "HTTP 503",
                HealthStatus::Critical,
            ),
            (
                ProbeFailure::Http { code: 429 },
                "HTTP 429 rate limited",
                HealthStatus::Critical,
            ),
        ];
        for (failure, message, status) in cases {
            assert_eq!(failure.to_string(), message);
            assert_eq!(failure.status(), status, "{message}");
        }
    }
}
