//! The wire format of the servers Fleet watches: what a server answers on [`HEALTH_PATH`] and
//! [`METRICS_PATH`], how Fleet reads it, and how a server (the simulated fleet, the host
//! agent) writes it. serde only: no HTTP, no runtime.
//!
//! ```
//! use fleet_wire::{ComponentHealth, HealthReport, MetricValues, parse_metrics};
//!
//! let report = HealthReport::parse(br#"{"database": {"status": "down"}, "redis": "ok"}"#).unwrap();
//! assert_eq!(report.database, ComponentHealth::Unhealthy("down".into()));
//! assert_eq!(HealthReport::parse(&report.to_json().to_string().into_bytes()).unwrap(), report);
//!
//! let values = parse_metrics(br#"{"cpu_percent": 12.5, "llm_requests": 7}"#).unwrap();
//! assert_eq!(values, MetricValues { cpu_percent: Some(12.5), llm_requests: Some(7), ..Default::default() });
//! assert!(parse_metrics(br#"{"cpu_percent": 140}"#).is_err());
//! ```

mod health;
pub mod host;
mod metrics;

pub use health::{ComponentHealth, Declared, HealthReport, NotAnObject, ReportError, truncate};
pub use metrics::{
    COST_FIELD, COUNTER_FIELDS, GAUGE_FIELDS, MetricValues, MetricsError, PERCENT_FIELDS,
    parse_metrics,
};

/// The health endpoint, under a server's `api_url`.
pub const HEALTH_PATH: &str = "/health";
/// The metrics endpoint, under a server's `api_url`.
pub const METRICS_PATH: &str = "/api/v1/metrics/current";
