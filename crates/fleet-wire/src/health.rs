//! The health report a server answers on [`HEALTH_PATH`](crate::HEALTH_PATH).
//!
//! A report is a JSON object. A component is `database`, `redis`, or any entry of an optional
//! `components` object; its value is an object with a string `status`, or a bare status string.
//! `ok`, `healthy`, `up` and `pass` (any case) are healthy, any other string is unhealthy, and
//! anything else (absent, null, another shape) is unknown and never a failure. Reading is
//! lenient on purpose: what a report means is decided by Fleet's classification rules.

use serde_json::{Map, Value, json};

/// What a report said of one component.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ComponentHealth {
    /// A healthy status string.
    Healthy,
    /// Any other status string, kept as reported.
    Unhealthy(String),
    /// Absent, null, or of another shape.
    #[default]
    Unknown,
}

impl ComponentHealth {
    fn from_json(value: Option<&Value>) -> Self {
        let status = match value {
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Object(obj)) => match obj.get("status") {
                Some(Value::String(s)) => s.as_str(),
                _ => return ComponentHealth::Unknown,
            },
            _ => return ComponentHealth::Unknown,
        };
        if ["ok", "healthy", "up", "pass"]
            .iter()
            .any(|h| status.eq_ignore_ascii_case(h))
        {
            ComponentHealth::Healthy
        } else {
            ComponentHealth::Unhealthy(truncate(status, 200))
        }
    }
}

/// The status a report may declare for itself, in a top-level `"status"`: a floor under what
/// its components make of it (a host has no database or redis to be critical by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Declared {
    /// `healthy` (or another healthy word): no floor.
    Healthy,
    /// `degraded`: at least degraded.
    Degraded,
    /// `critical`: critical.
    Critical,
}

impl Declared {
    fn from_json(value: Option<&Value>) -> Option<Self> {
        let Some(Value::String(s)) = value else {
            return None;
        };
        let s = s.trim();
        if ["ok", "healthy", "up", "pass"]
            .iter()
            .any(|h| s.eq_ignore_ascii_case(h))
        {
            Some(Declared::Healthy)
        } else if s.eq_ignore_ascii_case("degraded") {
            Some(Declared::Degraded)
        } else if s.eq_ignore_ascii_case("critical") {
            Some(Declared::Critical)
        } else {
            None
        }
    }

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Declared::Healthy => "healthy",
            Declared::Degraded => "degraded",
            Declared::Critical => "critical",
        }
    }
}

/// A health report as read from a server's [`HEALTH_PATH`](crate::HEALTH_PATH).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// The top-level `status`, when it is one of the declared statuses; other values are
    /// ignored, as unknown component statuses are.
    pub declared: Option<Declared>,
    /// The `database` component.
    pub database: ComponentHealth,
    /// The `redis` component.
    pub redis: ComponentHealth,
    /// `services.healthy` when it is a boolean.
    pub services_healthy: Option<bool>,
    /// The entries of `components`, in the report's order.
    pub components: Vec<(String, ComponentHealth)>,
}

/// A report that is not a JSON object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected a JSON object, got {0}")]
pub struct NotAnObject(&'static str);

impl HealthReport {
    /// Reads a report; anything but a JSON object is refused.
    pub fn from_json(value: &Value) -> Result<Self, NotAnObject> {
        let obj = match value {
            Value::Object(obj) => obj,
            Value::Null => return Err(NotAnObject("null")),
            Value::Bool(_) => return Err(NotAnObject("a boolean")),
            Value::Number(_) => return Err(NotAnObject("a number")),
            Value::String(_) => return Err(NotAnObject("a string")),
            Value::Array(_) => return Err(NotAnObject("an array")),
        };
        Ok(Self::from_object(obj))
    }

    fn from_object(obj: &Map<String, Value>) -> Self {
        let services_healthy = match obj.get("services") {
            Some(Value::Object(s)) => s.get("healthy").and_then(Value::as_bool),
            _ => None,
        };
        let components = match obj.get("components") {
            Some(Value::Object(c)) => c
                .iter()
                .map(|(name, v)| (truncate(name, 100), ComponentHealth::from_json(Some(v))))
                .collect(),
            _ => Vec::new(),
        };
        Self {
            declared: Declared::from_json(obj.get("status")),
            database: ComponentHealth::from_json(obj.get("database")),
            redis: ComponentHealth::from_json(obj.get("redis")),
            services_healthy,
            components,
        }
    }
}

impl HealthReport {
    /// Reads a report from a response body.
    pub fn parse(body: &[u8]) -> Result<Self, ReportError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ReportError::Empty);
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ReportError::NotJson(e.to_string()))?;
        Self::from_json(&value).map_err(ReportError::NotAnObject)
    }

    /// The JSON a server answers for this report.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        if let Some(d) = self.declared {
            obj.insert("status".into(), json!(d.as_str()));
        }
        for (name, c) in [("database", &self.database), ("redis", &self.redis)] {
            if let Some(v) = c.to_json() {
                obj.insert(name.to_owned(), v);
            }
        }
        if let Some(healthy) = self.services_healthy {
            obj.insert("services".into(), json!({ "healthy": healthy }));
        }
        if !self.components.is_empty() {
            let components: Map<String, Value> = self
                .components
                .iter()
                .filter_map(|(n, c)| Some((n.clone(), c.to_json()?)))
                .collect();
            obj.insert("components".into(), Value::Object(components));
        }
        Value::Object(obj)
    }
}

impl ComponentHealth {
    fn to_json(&self) -> Option<Value> {
        match self {
            ComponentHealth::Healthy => Some(json!({"status": "ok"})),
            ComponentHealth::Unhealthy(s) => Some(json!({ "status": s })),
            ComponentHealth::Unknown => None,
        }
    }

    /// True when healthy, false when unhealthy, `None` when unknown.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            ComponentHealth::Healthy => Some(true),
            ComponentHealth::Unhealthy(_) => Some(false),
            ComponentHealth::Unknown => None,
        }
    }
}

/// Why a health body is not a report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Nothing but whitespace.
    #[error("empty body")]
    Empty,
    /// Not JSON at all.
    #[error("not JSON ({0})")]
    NotJson(String),
    /// JSON, but not an object.
    #[error(transparent)]
    NotAnObject(NotAnObject),
}

/// Cuts a string to at most `max` characters, so that no report can bloat a row.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use ComponentHealth::*;

    #[track_caller]
    fn check(body: &str, expected: Result<HealthReport, &str>) {
        let got = HealthReport::parse(body.as_bytes());
        match expected {
            Ok(report) => assert_eq!(got.unwrap(), report, "{body}"),
            Err(message) => assert_eq!(got.unwrap_err().to_string(), message, "{body}"),
        }
    }

    fn report(database: ComponentHealth, redis: ComponentHealth) -> HealthReport {
        HealthReport {
            database,
            redis,
            ..Default::default()
        }
    }

    #[test]
    fn a_declared_status_is_read_in_any_case_and_odd_ones_are_ignored() {
        for (status, declared) in [
            (json!("critical"), Some(Declared::Critical)),
            (json!("Degraded"), Some(Declared::Degraded)),
            (json!("ok"), Some(Declared::Healthy)),
            (json!("HEALTHY"), Some(Declared::Healthy)),
            (json!("on fire"), None),
            (json!(2), None),
            (json!(null), None),
        ] {
            let r = HealthReport::from_json(&json!({ "status": status })).unwrap();
            assert_eq!(r.declared, declared, "{status}");
            if let Some(d) = declared {
                assert_eq!(
                    HealthReport::from_json(&r.to_json()).unwrap().declared,
                    Some(d)
                );
            }
        }
    }

    #[test]
    fn components_are_objects_or_bare_strings() {
        check(
            r#"{"database": {"status": "ok"}, "redis": "down", "services": {"healthy": false}}"#,
            Ok(HealthReport {
                services_healthy: Some(false),
                ..report(Healthy, Unhealthy("down".into()))
            }),
        );
        check(
            r#"{"components": {"queue": {"status": "stalled"}, "cache": "up"}}"#,
            Ok(HealthReport {
                components: vec![
                    ("cache".into(), Healthy),
                    ("queue".into(), Unhealthy("stalled".into())),
                ],
                ..Default::default()
            }),
        );
    }

    #[test]
    fn healthy_words_in_any_case() {
        for word in ["ok", "OK", "Healthy", "UP", "pass", "Pass"] {
            check(
                &json!({"database": word, "redis": {"status": word}}).to_string(),
                Ok(report(Healthy, Healthy)),
            );
        }
    }

    #[test]
    fn odd_shapes_are_unknown_never_failures() {
        check(
            r#"{"database": null, "redis": 5, "components": {"a": [1], "b": {"status": 3}}}"#,
            Ok(HealthReport {
                components: vec![("a".into(), Unknown), ("b".into(), Unknown)],
                ..Default::default()
            }),
        );
        check(
            r#"{"components": "nope", "services": {"healthy": "no"}, "extra": {"x": 1}}"#,
            Ok(HealthReport::default()),
        );
    }

    #[test]
    fn bodies_that_are_not_reports_are_refused() {
        check("", Err("empty body"));
        check(" \n", Err("empty body"));
        for (body, what) in [
            ("null", "null"),
            ("[]", "an array"),
            (r#""ok""#, "a string"),
            ("1", "a number"),
            ("true", "a boolean"),
        ] {
            check(body, Err(&format!("expected a JSON object, got {what}")));
        }
        assert!(
            HealthReport::parse(b"{oops")
                .unwrap_err()
                .to_string()
                .starts_with("not JSON")
        );
    }

    #[test]
    fn long_names_and_statuses_are_cut() {
        let long = "x".repeat(10_000);
        let r = HealthReport::parse(
            json!({ "database": long, "components": { long.clone(): "down" } })
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let Unhealthy(status) = &r.database else {
            panic!("{r:?}")
        };
        assert_eq!(status.chars().count(), 201);
        assert_eq!(r.components[0].0.chars().count(), 101);
    }

    #[test]
    fn reports_round_trip() {
        let r = HealthReport {
            declared: Some(Declared::Degraded),
            database: Healthy,
            redis: Unhealthy("error".into()),
            services_healthy: Some(true),
            components: vec![("queue".into(), Unhealthy("stalled".into()))],
        };
        assert_eq!(
            HealthReport::parse(r.to_json().to_string().as_bytes()).unwrap(),
            r
        );
    }
}
