//! The API's JSON shapes, mapped from core types. Timestamps are RFC 3339 in UTC.

use fleet_core::{HealthCheck, ManagedServer, MetricsSample, ServerGroup, WorkerStats};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub fn ts(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn opt_ts(t: Option<OffsetDateTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(ts(t)))
}

pub(crate) fn server(s: &ManagedServer) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "hostname": s.hostname,
        "api_url": s.api_url,
        "region": s.region,
        "environment": s.environment,
        "tags": s.tags,
        "metadata": s.metadata,
        "status": s.status.as_str(),
        "health_status": s.health_status.map(|h| h.as_str()),
        "last_seen_at": opt_ts(s.last_seen_at),
        "last_health_check_at": opt_ts(s.last_health_check_at),
        "last_metrics_error": s.last_metrics_error,
        "last_metrics_error_at": opt_ts(s.last_metrics_error_at),
    })
}

pub(crate) fn check(c: &HealthCheck) -> Value {
    json!({
        "server_id": c.server_id,
        "timestamp": ts(c.timestamp),
        "status": c.status.as_str(),
        "successful": c.successful,
        "response_time_ms": c.response_time_ms,
        "database_healthy": c.database_healthy,
        "redis_healthy": c.redis_healthy,
        "services_healthy": c.services_healthy,
        "error_message": c.error_message,
        "error_details": c.error_details,
    })
}

pub(crate) fn sample(s: &MetricsSample) -> Value {
    let v = &s.values;
    json!({
        "server_id": s.server_id,
        "timestamp": ts(s.timestamp),
        "period": s.period.as_str(),
        "cpu_percent": v.cpu_percent,
        "memory_percent": v.memory_percent,
        "disk_percent": v.disk_percent,
        "network_rx_bytes": v.network_rx_bytes,
        "network_tx_bytes": v.network_tx_bytes,
        "active_services": v.active_services,
        "failed_services": v.failed_services,
        "total_services": v.total_services,
        "llm_requests": v.llm_requests,
        "llm_cost_usd": v.llm_cost_usd,
        "active_users": v.active_users,
        "total_users": v.total_users,
    })
}

pub(crate) fn group(g: &ServerGroup) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "color": g.color,
        "tags": g.tags,
        "regions": g.regions,
        "environments": g.environments,
        "members": g.members,
    })
}

/// The seed's worker status shape, with Fleet's extra keys beside it.
pub(crate) fn worker(
    stats: Option<&WorkerStats>,
    interval: f64,
    error: Option<&str>,
    metrics: bool,
) -> Value {
    let default = WorkerStats::default();
    let s = stats.unwrap_or(&default);
    let (performed, successful, failed) = if metrics {
        (
            "collections_performed",
            "collections_successful",
            "collections_failed",
        )
    } else {
        ("checks_performed", "checks_successful", "checks_failed")
    };
    let mut v = json!({
        "running": stats.is_some_and(|s| s.running),
        "interval_seconds": if stats.is_some() { s.interval_seconds } else { interval },
        performed: s.performed,
        successful: s.successful,
        failed: s.failed,
        "success_rate": s.success_rate,
        "last_run": opt_ts(s.last_run),
        "last_duration_seconds": s.last_duration_seconds,
        "cycles": s.cycles,
        "overruns": s.overruns,
        "in_flight": s.in_flight,
        "results_pending": s.pending,
        "results_written": s.written,
        "results_dropped": s.dropped,
        "last_cycle_targets": s.last_cycle_targets,
        "batch_delay_seconds": s.batch_delay_seconds,
        "by_status": s.by_status,
        "last_error": error.map(str::to_owned).or_else(|| s.last_error.clone()),
    });
    if metrics {
        v["total_metrics_collected"] = json!(s.values_collected);
        v["partition_health"] = json!({
            "ok": s.storage_findings.is_empty(),
            "findings": s.storage_findings,
        });
    }
    v
}
