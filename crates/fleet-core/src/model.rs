//! Domain types: managed servers, health checks and metrics samples.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::cluster::Fence;

/// The identity of a managed server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServerId(pub Uuid);

impl ServerId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for ServerId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The error for a string that names no known variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`, expected one of: {expected}")]
pub struct ParseEnumError {
    kind: &'static str,
    value: String,
    expected: String,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The lowercase name used on the wire and in storage.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseEnumError {
                        kind: $kind,
                        value: s.to_owned(),
                        expected: $name::ALL
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
        }
    };
}

string_enum!(
    /// Whether a server is under watch.
    ServerStatus, "server status", {
        /// Checked by both workers.
        Active => "active",
        /// Registered but not checked.
        Inactive => "inactive",
        /// Temporarily not checked.
        Maintenance => "maintenance",
    }
);

string_enum!(
    /// A server's health as its last check found it.
    HealthStatus, "health status", {
        /// Everything the server reported is healthy.
        Healthy => "healthy",
        /// A non-essential service or component is unhealthy.
        Degraded => "degraded",
        /// The database or redis is down, or the server answered with an error.
        Critical => "critical",
        /// No answer arrived.
        Unreachable => "unreachable",
    }
);

string_enum!(
    /// What a server speaks, and so how it is checked and collected.
    #[derive(Default)]
    ServerKind, "server kind", {
        /// Fleet's wire format (`/health`, `/api/v1/metrics/current`).
        #[default]
        Fleet => "fleet",
        /// The same format, served by fleet-agent on a plain host.
        Agent => "agent",
        /// Prometheus's node_exporter: its `/metrics` page.
        NodeExporter => "node_exporter",
    }
);

/// A probe token: sent to the managed server, never logged, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// A managed server as the registry knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManagedServer {
    /// Identity.
    pub id: ServerId,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Host name, for people and search.
    pub hostname: Option<String>,
    /// Base URL of the server's API: `{api_url}/health` is probed.
    pub api_url: String,
    /// Region label.
    pub region: Option<String>,
    /// Environment label (production, staging, ...).
    pub environment: Option<String>,
    /// Free labels.
    pub tags: Vec<String>,
    /// Free structured data.
    pub metadata: serde_json::Value,
    /// Whether the server is under watch.
    pub status: ServerStatus,
    /// What it speaks.
    #[serde(default)]
    pub kind: ServerKind,
    /// The page a `node_exporter` server is read from, when not `/metrics`.
    #[serde(default)]
    pub metrics_path: Option<String>,
    /// A PEM CA certificate this server's TLS is trusted by, beside the usual roots.
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// The last check's result, `None` until the first check.
    pub health_status: Option<HealthStatus>,
    /// When a complete response head last arrived.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
    /// When the last health check ran.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_health_check_at: Option<OffsetDateTime>,
    /// The last failed metrics collection's reason.
    pub last_metrics_error: Option<String>,
    /// When the last metrics collection failed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_metrics_error_at: Option<OffsetDateTime>,
    /// The last health check's response time, when an answer came.
    pub last_response_time_ms: Option<u32>,
    /// The last health check's error, `None` when it had none.
    pub last_error: Option<String>,
}

/// One change of a server's health, recorded with the check that made it.
///
/// The check is the history row of the same server at `changed_at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    /// The log's own id: increasing, unique across servers.
    pub id: i64,
    /// The server that changed.
    pub server_id: ServerId,
    /// Its name now, for display.
    pub server_name: String,
    /// When the check that made the change started.
    #[serde(with = "time::serde::rfc3339")]
    pub changed_at: OffsetDateTime,
    /// The health before, `None` when the server had never been checked.
    pub from_status: Option<HealthStatus>,
    /// The health after.
    pub to_status: HealthStatus,
    /// The check's error, if it had one.
    pub error_message: Option<String>,
}

/// What a new server is registered with.
#[derive(Clone, Debug)]
pub struct NewServer {
    /// Unique name.
    pub name: String,
    /// Base URL of the server's API.
    pub api_url: String,
    /// The token the probe sends.
    pub api_token: Option<ApiToken>,
    /// Free text.
    pub description: Option<String>,
    /// Host name.
    pub hostname: Option<String>,
    /// Region label.
    pub region: Option<String>,
    /// Environment label.
    pub environment: Option<String>,
    /// Free labels.
    pub tags: Vec<String>,
    /// Free structured data.
    pub metadata: serde_json::Value,
    /// Initial status.
    pub status: ServerStatus,
    /// What it speaks.
    pub kind: ServerKind,
    /// The page a `node_exporter` server is read from, when not `/metrics`.
    pub metrics_path: Option<String>,
    /// A PEM CA certificate its TLS is trusted by.
    pub ca_cert: Option<String>,
}

impl NewServer {
    /// An active server with nothing but a name and URL.
    pub fn new(name: impl Into<String>, api_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            api_url: api_url.into(),
            api_token: None,
            description: None,
            hostname: None,
            region: None,
            environment: None,
            tags: Vec::new(),
            metadata: serde_json::Value::Object(Default::default()),
            status: ServerStatus::Active,
            kind: ServerKind::Fleet,
            metrics_path: None,
            ca_cert: None,
        }
    }

    /// Sets the probe token.
    pub fn with_token(mut self, token: ApiToken) -> Self {
        self.api_token = Some(token);
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: ServerStatus) -> Self {
        self.status = status;
        self
    }
}

/// What a probe or collector needs to reach a server: its identity, URL and token.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeTarget {
    /// Identity.
    pub id: ServerId,
    /// Name, for logs.
    pub name: String,
    /// Base URL.
    pub api_url: String,
    /// The token to send, if the server has one.
    pub token: Option<ApiToken>,
    /// The id of the key that sealed the server's token, when no configured key opens it: the
    /// server is then not checked (see [`NotChecked::TokenUnreadable`](crate::NotChecked)).
    pub unreadable_token: Option<String>,
    /// The server's stored health when it was selected; `None` when never checked.
    pub health: Option<HealthStatus>,
    /// What it speaks.
    pub kind: ServerKind,
    /// The page a `node_exporter` server is read from, when not `/metrics`.
    pub metrics_path: Option<String>,
    /// A PEM CA certificate its TLS is trusted by.
    pub ca_cert: Option<String>,
    /// The lease it was selected under, when the store shares the fleet among instances: its
    /// results are written only while that lease holds.
    pub fence: Option<Fence>,
    /// How long ago the selecting worker last checked it, by the store's clock, when known:
    /// a scheduled check waits until 0.9 x the interval has passed since.
    pub checked_ago: Option<std::time::Duration>,
}

/// One health check's result: a row of history and the server's new current state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The server checked.
    pub server_id: ServerId,
    /// When the check started.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// The resulting health.
    pub status: HealthStatus,
    /// From the request's start to the end of the body, when an answer came.
    pub response_time_ms: Option<u32>,
    /// The database component, if reported.
    pub database_healthy: Option<bool>,
    /// The redis component, if reported.
    pub redis_healthy: Option<bool>,
    /// `services.healthy`, if reported.
    pub services_healthy: Option<bool>,
    /// A short reason when the check failed or a component is unhealthy.
    pub error_message: Option<String>,
    /// The unhealthy components, when there are any.
    pub error_details: Option<serde_json::Value>,
    /// Whether a complete response head arrived: `last_seen_at` moves only then.
    pub responded: bool,
    /// Whether the check counts as successful: a complete 2xx answer with a valid report.
    pub successful: bool,
    /// The lease the check was selected under; `None` for a check outside the lease scheme
    /// (check-now, or a store that does not share the fleet).
    #[serde(skip)]
    pub fence: Option<Fence>,
}

/// How long a metrics sample covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A single reading, as collected by the metrics worker.
    Raw,
    /// Aggregated over an hour.
    Hour,
    /// Aggregated over a day.
    Day,
}

impl Period {
    /// The name used in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Raw => "raw",
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }
}

impl FromStr for Period {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Period::Raw),
            "hour" => Ok(Period::Hour),
            "day" => Ok(Period::Day),
            _ => Err(ParseEnumError {
                kind: "period",
                value: s.to_owned(),
                expected: "raw, hour, day".to_owned(),
            }),
        }
    }
}

/// The values a server reports on its metrics endpoint: the wire format's own type.
pub use fleet_wire::MetricValues;

/// One stored metrics reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsSample {
    /// The server measured.
    pub server_id: ServerId,
    /// When the collection started.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// What the sample covers.
    pub period: Period,
    /// The values.
    #[serde(flatten)]
    pub values: MetricValues,
    /// The lease the collection was selected under, as [`HealthCheck::fence`].
    #[serde(skip)]
    pub fence: Option<Fence>,
}

/// A metrics collection that failed: kept as the server's last metrics error.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsFailure {
    /// The server.
    pub server_id: ServerId,
    /// When the collection started.
    pub timestamp: OffsetDateTime,
    /// Why it failed.
    pub error: String,
    /// The lease the collection was selected under, as [`HealthCheck::fence`].
    pub fence: Option<Fence>,
}

/// One metrics collection's result, as the store records it.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricsRecord {
    /// Values to store.
    Sample(MetricsSample),
    /// A failure to remember.
    Failure(MetricsFailure),
}

impl MetricsRecord {
    /// The server this record is about.
    pub fn server_id(&self) -> ServerId {
        match self {
            MetricsRecord::Sample(s) => s.server_id,
            MetricsRecord::Failure(f) => f.server_id,
        }
    }
}

/// Changes to a registered server; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ServerUpdate {
    /// A new unique name.
    pub name: Option<String>,
    /// A new base URL.
    pub api_url: Option<String>,
    /// A new probe token (rotates it).
    pub api_token: Option<ApiToken>,
    /// New free text (`Some(None)` clears it).
    pub description: Option<Option<String>>,
    /// New host name (`Some(None)` clears it).
    pub hostname: Option<Option<String>>,
    /// New region (`Some(None)` clears it).
    pub region: Option<Option<String>>,
    /// New environment (`Some(None)` clears it).
    pub environment: Option<Option<String>>,
    /// New labels.
    pub tags: Option<Vec<String>>,
    /// New structured data.
    pub metadata: Option<serde_json::Value>,
    /// New status.
    pub status: Option<ServerStatus>,
    /// A new kind.
    pub kind: Option<ServerKind>,
    /// A new metrics path; `Some(None)` clears it.
    pub metrics_path: Option<Option<String>>,
    /// A new CA certificate; `Some(None)` clears it.
    pub ca_cert: Option<Option<String>>,
}

/// The identity of a server group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub Uuid);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A named set of servers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerGroup {
    /// Identity.
    pub id: GroupId,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// A display colour, e.g. `#3b82f6`.
    pub color: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Regions it covers.
    pub regions: Vec<String>,
    /// Environments it covers.
    pub environments: Vec<String>,
    /// Its members.
    pub members: Vec<ServerId>,
}

/// A group's fields, for creating one or (each `Some`) changing one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupFields {
    /// Unique name (required when creating).
    pub name: Option<String>,
    /// Free text.
    pub description: Option<Option<String>>,
    /// Display colour.
    pub color: Option<Option<String>>,
    /// Labels.
    pub tags: Option<Vec<String>>,
    /// Regions.
    pub regions: Option<Vec<String>>,
    /// Environments.
    pub environments: Option<Vec<String>>,
}

string_enum!(
    /// What an admin API token may do.
    Role, "role", {
        /// Everything.
        Admin => "admin",
        /// Read only.
        Viewer => "viewer",
    }
);

/// An admin API token as stored: never the token, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Identity.
    pub id: Uuid,
    /// Unique name, to list and revoke it by.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// A server's LLM use over a window: the increase of its counters, resets handled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlmUsage {
    /// The server.
    pub server_id: ServerId,
    /// Requests made in the window.
    pub requests: i64,
    /// Dollars spent in the window.
    pub cost_usd: f64,
}

/// The fleet's LLM use over a window, as the summary shows it: the totals of every server
/// and the top spenders by cost.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmSummary {
    /// The window the figures cover, which at [`Resolution::Hour`](crate::Resolution) is the
    /// asked one on whole hours, ending at the last hour rolled up.
    pub from: OffsetDateTime,
    /// The end of that window (exclusive).
    pub to: OffsetDateTime,
    /// Raw: every sample in the window counts. Hour: the window is on whole hours.
    pub resolution: crate::Resolution,
    /// Requests made by every server in the window.
    pub total_requests: i64,
    /// Dollars spent by every server in the window.
    pub total_cost_usd: f64,
    /// The servers that spent the most, most first, at most the asked number; servers that
    /// used nothing in the window are left out.
    pub top: Vec<LlmUsage>,
}

impl LlmSummary {
    /// The summary of every server's use in `[from, to)` at `resolution`, keeping the `limit`
    /// largest spenders.
    pub fn of(
        (from, to): (OffsetDateTime, OffsetDateTime),
        resolution: crate::Resolution,
        mut usage: Vec<LlmUsage>,
        limit: usize,
    ) -> Self {
        let total_requests = usage.iter().map(|u| u.requests).sum();
        let total_cost_usd = usage.iter().map(|u| u.cost_usd).sum();
        usage.retain(|u| u.requests != 0 || u.cost_usd != 0.0);
        usage.sort_by(|a, b| {
            b.cost_usd
                .total_cmp(&a.cost_usd)
                .then(b.requests.cmp(&a.requests))
                .then(a.server_id.cmp(&b.server_id))
        });
        usage.truncate(limit);
        Self {
            from,
            to,
            resolution,
            total_requests,
            total_cost_usd,
            top: usage,
        }
    }
}

/// The increase of a counter over `samples` (in time order), as Prometheus's `increase()`
/// counts it: a drop means the counter restarted from zero, so the new value is all increase.
pub fn counter_increase<T>(samples: impl IntoIterator<Item = T>) -> T
where
    T: Copy + PartialOrd + std::ops::Sub<Output = T> + std::ops::Add<Output = T> + Default,
{
    let mut total = T::default();
    let mut last: Option<T> = None;
    for v in samples {
        if let Some(prev) = last {
            total = total + if v >= prev { v - prev } else { v };
        }
        last = Some(v);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_names() {
        for s in ServerStatus::ALL {
            assert_eq!(s.as_str().parse::<ServerStatus>().unwrap(), *s);
        }
        for s in HealthStatus::ALL {
            assert_eq!(s.as_str().parse::<HealthStatus>().unwrap(), *s);
        }
        let err = "sick".parse::<HealthStatus>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown health status `sick`, expected one of: healthy, degraded, critical, unreachable"
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = ApiToken::new("s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        let target = ProbeTarget {
            checked_ago: None,
            fence: None,
            id: ServerId::new(),
            name: "a".into(),
            api_url: "http://127.0.0.1:1".into(),
            token: Some(t),
            unreadable_token: None,
            health: None,
            kind: Default::default(),
            metrics_path: None,
            ca_cert: None,
        };
        assert!(!format!("{target:?}").contains("s3cret"));
    }

    #[test]
    fn counter_increase_handles_restarts() {
        assert_eq!(counter_increase([10, 15, 20]), 10);
        assert_eq!(counter_increase([10, 15, 3, 8]), 5 + 3 + 5);
        assert_eq!(counter_increase::<i64>([]), 0);
        assert_eq!(counter_increase([7]), 0);
        assert_eq!(counter_increase([1.5, 2.0, 0.25]), 0.75);
    }

    #[test]
    fn metric_values_count_present_ones() {
        let v = MetricValues {
            cpu_percent: Some(1.0),
            llm_requests: Some(3),
            ..Default::default()
        };
        assert_eq!(v.count(), 2);
        assert_eq!(MetricValues::default().count(), 0);
    }
}
