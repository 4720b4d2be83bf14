//! Health classification: the pure rules that turn a server's health report into a status.
//!
//! How a report is read (components, healthy words, odd shapes) is fleet-wire's. An unhealthy
//! database or redis is `critical`; otherwise `services.healthy == false` or any other unhealthy
//! component is `degraded`; otherwise `healthy`. A status the report declares (a top-level
//! `"status"`) is a floor: the result is the worse of it and what the components make.

use fleet_wire::{ComponentHealth, Declared, HealthReport, truncate};
use serde_json::{Map, Value};

use crate::model::HealthStatus;

/// The result of classifying a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    /// The resulting status.
    pub status: HealthStatus,
    /// The database component as true, false or unknown.
    pub database_healthy: Option<bool>,
    /// The redis component as true, false or unknown.
    pub redis_healthy: Option<bool>,
    /// `services.healthy` as true, false or unknown.
    pub services_healthy: Option<bool>,
    /// `unhealthy: database (down), queue (stalled)` when something is unhealthy.
    pub error_message: Option<String>,
    /// The unhealthy components and their statuses, when there are any.
    pub error_details: Option<Value>,
}

/// The most components kept in `error_details`.
pub const MAX_DETAILS: usize = 32;
/// The longest status kept per component in `error_details`, in characters.
pub const MAX_DETAIL_STATUS: usize = 120;
/// The most bytes of `error_details` per row.
pub const MAX_DETAILS_BYTES: usize = 8 * 1024;

/// The unhealthy components as stored: at most [`MAX_DETAILS`], each status cut, the whole
/// within [`MAX_DETAILS_BYTES`], and `"…"` saying how many were left out. A hostile server can
/// no longer make one check cost a megabyte of jsonb.
fn details(unhealthy: Vec<(String, String)>) -> Value {
    let total = unhealthy.len();
    let mut map = Map::new();
    let mut bytes = 2;
    for (name, status) in unhealthy.into_iter().take(MAX_DETAILS) {
        let status = truncate(&status, MAX_DETAIL_STATUS);
        // Quotes, colon and comma, beside the text itself.
        let cost = name.len() + status.len() + 6;
        if bytes + cost > MAX_DETAILS_BYTES - 64 {
            break;
        }
        bytes += cost;
        map.insert(name, Value::String(status));
    }
    let left_out = total - map.len();
    if left_out > 0 {
        map.insert("…".into(), Value::String(format!("{left_out} more")));
    }
    Value::Object(map)
}

/// Classifies a report by the rules in this module's docs.
pub fn classify(answer: &HealthReport) -> Classification {
    let services = ComponentHealth::Unhealthy("unhealthy".to_owned());
    let services = (answer.services_healthy == Some(false)).then_some(("services", &services));
    let declared = match answer.declared {
        Some(d @ (Declared::Degraded | Declared::Critical)) => {
            Some(ComponentHealth::Unhealthy(d.as_str().to_owned()))
        }
        _ => None,
    };
    let declared_part = declared.as_ref().map(|d| ("status", d));
    let unhealthy: Vec<(String, String)> = declared_part
        .into_iter()
        .chain([("database", &answer.database), ("redis", &answer.redis)])
        .chain(services)
        .chain(answer.components.iter().map(|(n, c)| (n.as_str(), c)))
        .filter_map(|(name, c)| match c {
            ComponentHealth::Unhealthy(status) => Some((name.to_owned(), status.clone())),
            _ => None,
        })
        .collect();

    let core_down = matches!(answer.database, ComponentHealth::Unhealthy(_))
        || matches!(answer.redis, ComponentHealth::Unhealthy(_));
    let status = if core_down || answer.declared == Some(Declared::Critical) {
        HealthStatus::Critical
    } else if unhealthy.is_empty() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    };

    let (error_message, error_details) = if unhealthy.is_empty() {
        (None, None)
    } else {
        let message = unhealthy
            .iter()
            .take(MAX_DETAILS)
            .map(|(n, s)| format!("{n} ({s})"))
            .collect::<Vec<_>>()
            .join(", ");
        (
            Some(truncate(&format!("unhealthy: {message}"), 500)),
            Some(details(unhealthy)),
        )
    };

    Classification {
        status,
        database_healthy: answer.database.as_bool(),
        redis_healthy: answer.redis.as_bool(),
        services_healthy: answer.services_healthy,
        error_message,
        error_details,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use HealthStatus::*;

    #[track_caller]
    fn check(
        report: Value,
        status: HealthStatus,
        flags: [Option<bool>; 3],
        details: Option<Value>,
    ) {
        let answer = HealthReport::from_json(&report).expect("an object");
        let c = classify(&answer);
        assert_eq!(c.status, status, "status of {report}");
        assert_eq!(
            [c.database_healthy, c.redis_healthy, c.services_healthy],
            flags,
            "flags of {report}"
        );
        assert_eq!(c.error_details, details, "details of {report}");
        assert_eq!(c.error_message.is_some(), c.error_details.is_some());
    }

    const T: Option<bool> = Some(true);
    const F: Option<bool> = Some(false);
    const U: Option<bool> = None;

    #[test]
    fn a_declared_status_is_a_floor() {
        // A host with no database or redis declares itself critical.
        check(
            json!({"status": "critical", "components": {"disk": "98% full"}}),
            Critical,
            [U, U, U],
            Some(json!({"status": "critical", "disk": "98% full"})),
        );
        check(
            json!({"status": "degraded", "database": "ok"}),
            Degraded,
            [T, U, U],
            Some(json!({"status": "degraded"})),
        );
        // Declaring healthy lifts nothing: the components still decide.
        check(
            json!({"status": "healthy", "redis": "down"}),
            Critical,
            [U, F, U],
            Some(json!({"redis": "down"})),
        );
        check(json!({"status": "ok"}), Healthy, [U, U, U], None);
        // A status it does not know is ignored, as unknown component shapes are.
        check(json!({"status": "on fire"}), Healthy, [U, U, U], None);
    }

    #[test]
    fn all_ok_is_healthy() {
        check(
            json!({"database": {"status": "ok"}, "redis": {"status": "ok"}, "services": {"healthy": true}}),
            Healthy,
            [T, T, T],
            None,
        );
    }

    #[test]
    fn empty_object_is_healthy_and_unknown() {
        check(json!({}), Healthy, [U, U, U], None);
    }

    #[test]
    fn healthy_words_in_any_case() {
        for word in ["ok", "OK", "Healthy", "UP", "pass", "Pass"] {
            check(
                json!({"database": word, "redis": {"status": word}}),
                Healthy,
                [T, T, U],
                None,
            );
        }
    }

    #[test]
    fn database_down_is_critical() {
        check(
            json!({"database": {"status": "down"}, "redis": "ok"}),
            Critical,
            [F, T, U],
            Some(json!({"database": "down"})),
        );
    }

    #[test]
    fn redis_down_is_critical_even_with_services_false() {
        check(
            json!({"redis": "error", "services": {"healthy": false}}),
            Critical,
            [U, F, F],
            Some(json!({"redis": "error", "services": "unhealthy"})),
        );
    }

    #[test]
    fn services_false_is_degraded() {
        check(
            json!({"database": "ok", "redis": "ok", "services": {"healthy": false}}),
            Degraded,
            [T, T, F],
            Some(json!({"services": "unhealthy"})),
        );
    }

    #[test]
    fn services_of_another_type_is_unknown() {
        check(
            json!({"services": {"healthy": "no"}}),
            Healthy,
            [U, U, U],
            None,
        );
        check(json!({"services": true}), Healthy, [U, U, U], None);
    }

    #[test]
    fn unhealthy_extra_component_is_degraded() {
        check(
            json!({"database": "ok", "components": {"queue": {"status": "stalled"}, "cache": "up"}}),
            Degraded,
            [T, U, U],
            Some(json!({"queue": "stalled"})),
        );
    }

    #[test]
    fn odd_shapes_are_unknown_never_failures() {
        check(
            json!({"database": null, "redis": 5, "components": {"a": [1], "b": {"status": 3}}}),
            Healthy,
            [U, U, U],
            None,
        );
        check(
            json!({"components": "nope", "extra": {"x": 1}}),
            Healthy,
            [U, U, U],
            None,
        );
    }

    #[test]
    fn message_names_each_unhealthy_component() {
        let answer =
            HealthReport::from_json(&json!({"database": "down", "components": {"q": "slow"}}))
                .unwrap();
        assert_eq!(
            classify(&answer).error_message.as_deref(),
            Some("unhealthy: database (down), q (slow)")
        );
    }

    #[test]
    fn details_are_bounded_whatever_the_server_sends() {
        let components: Vec<(String, ComponentHealth)> = (0..5000)
            .map(|i| {
                (
                    format!("component-{i:04}-{}", "n".repeat(80)),
                    ComponentHealth::Unhealthy("s".repeat(200)),
                )
            })
            .collect();
        let report = HealthReport {
            components,
            ..Default::default()
        };
        let c = classify(&report);
        let details = c.error_details.unwrap();
        let stored = details.to_string();
        assert!(stored.len() <= MAX_DETAILS_BYTES, "{} bytes", stored.len());
        let map = details.as_object().unwrap();
        assert!(map.len() <= MAX_DETAILS + 1);
        let omitted = map["…"].as_str().unwrap();
        assert_eq!(omitted, format!("{} more", 5000 - (map.len() - 1)));
        assert!(
            map.values()
                .all(|v| v.as_str().unwrap().chars().count() <= MAX_DETAIL_STATUS + 1)
        );
        assert!(c.error_message.unwrap().chars().count() <= 501);
    }

    #[test]
    fn long_statuses_are_cut() {
        let long = "x".repeat(10_000);
        let answer = HealthReport::from_json(&json!({ "database": long })).unwrap();
        let c = classify(&answer);
        assert!(c.error_message.unwrap().chars().count() <= 501);
    }
}
