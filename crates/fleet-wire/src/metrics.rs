//! The metrics object a server answers on [`METRICS_PATH`](crate::METRICS_PATH), and its
//! validation.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// The values a server reports on its metrics endpoint, each optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricValues {
    /// Percent of the whole machine, 0 to 100.
    pub cpu_percent: Option<f64>,
    /// Percent of the whole machine, 0 to 100.
    pub memory_percent: Option<f64>,
    /// Percent of the whole machine, 0 to 100.
    pub disk_percent: Option<f64>,
    /// Counter since the server started.
    pub network_rx_bytes: Option<i64>,
    /// Counter since the server started.
    pub network_tx_bytes: Option<i64>,
    /// Gauge.
    pub active_services: Option<i64>,
    /// Gauge.
    pub failed_services: Option<i64>,
    /// Gauge.
    pub total_services: Option<i64>,
    /// Counter since the server started.
    pub llm_requests: Option<i64>,
    /// Counter since the server started, in US dollars.
    pub llm_cost_usd: Option<f64>,
    /// Gauge.
    pub active_users: Option<i64>,
    /// Gauge.
    pub total_users: Option<i64>,
}

impl MetricValues {
    /// How many of the twelve values are present.
    pub fn count(&self) -> u64 {
        let floats = [
            self.cpu_percent,
            self.memory_percent,
            self.disk_percent,
            self.llm_cost_usd,
        ];
        let ints = [
            self.network_rx_bytes,
            self.network_tx_bytes,
            self.active_services,
            self.failed_services,
            self.total_services,
            self.llm_requests,
            self.active_users,
            self.total_users,
        ];
        (floats.iter().filter(|v| v.is_some()).count()
            + ints.iter().filter(|v| v.is_some()).count()) as u64
    }

    /// The JSON a server answers on its metrics endpoint.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Why a metrics answer was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// The answer was not a JSON object.
    #[error("invalid metrics response: {0}")]
    Invalid(String),
    /// A field had the wrong type or was out of range.
    #[error("metrics response field {field} = {value} {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// The value as received (cut to a readable length).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Gauges in percent of the whole machine, 0 to 100.
pub const PERCENT_FIELDS: [&str; 3] = ["cpu_percent", "memory_percent", "disk_percent"];
/// Whole-number gauges.
pub const GAUGE_FIELDS: [&str; 5] = [
    "active_services",
    "failed_services",
    "total_services",
    "active_users",
    "total_users",
];
/// Whole-number counters since the server started.
pub const COUNTER_FIELDS: [&str; 3] = ["network_rx_bytes", "network_tx_bytes", "llm_requests"];
/// The cost counter, in US dollars (fractions allowed).
pub const COST_FIELD: &str = "llm_cost_usd";

fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

fn field_error(field: &'static str, v: &Value, reason: &'static str) -> MetricsError {
    MetricsError::Field {
        field,
        value: shown(v),
        reason,
    }
}

fn number<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<(&'a Value, &'a Number)>, MetricsError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => Ok(Some((v, n))),
        Some(v) => Err(field_error(field, v, "is not a number")),
    }
}

fn whole(obj: &Map<String, Value>, field: &'static str) -> Result<Option<i64>, MetricsError> {
    let Some((v, n)) = number(obj, field)? else {
        return Ok(None);
    };
    let value = if let Some(i) = n.as_i64() {
        i
    } else if n.is_u64() {
        return Err(field_error(field, v, "is past the 64-bit signed range"));
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if !f.is_finite() {
            return Err(field_error(field, v, "is not finite"));
        }
        if f.fract() != 0.0 {
            return Err(field_error(field, v, "is not a whole number"));
        }
        if f < i64::MIN as f64 || f >= i64::MAX as f64 {
            return Err(field_error(field, v, "is past the 64-bit signed range"));
        }
        f as i64
    };
    if value < 0 {
        return Err(field_error(field, v, "is negative"));
    }
    Ok(Some(value))
}

fn real(
    obj: &Map<String, Value>,
    field: &'static str,
    max: Option<f64>,
) -> Result<Option<f64>, MetricsError> {
    let Some((v, n)) = number(obj, field)? else {
        return Ok(None);
    };
    let f = n.as_f64().unwrap_or(f64::NAN);
    if !f.is_finite() {
        return Err(field_error(field, v, "is not finite"));
    }
    if let Some(max) = max
        && !(0.0..=max).contains(&f)
    {
        return Err(field_error(field, v, "is out of range 0..=100"));
    }
    if f < 0.0 {
        return Err(field_error(field, v, "is negative"));
    }
    Ok(Some(f))
}

/// Reads and validates a metrics answer. Absent or null keys are `None`, unknown keys are
/// ignored; a value of the wrong type or out of range fails the whole answer, naming the field.
pub fn parse_metrics(body: &[u8]) -> Result<MetricValues, MetricsError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        let e = e.to_string();
        MetricsError::Invalid(if body.is_empty() {
            "empty body".into()
        } else {
            format!("not JSON ({e})")
        })
    })?;
    let Value::Object(obj) = value else {
        return Err(MetricsError::Invalid(format!(
            "expected a JSON object, got {}",
            kind(&value)
        )));
    };
    let [cpu, mem, disk] = PERCENT_FIELDS;
    let [active_s, failed_s, total_s, active_u, total_u] = GAUGE_FIELDS;
    let [rx, tx, llm] = COUNTER_FIELDS;
    Ok(MetricValues {
        cpu_percent: real(&obj, cpu, Some(100.0))?,
        memory_percent: real(&obj, mem, Some(100.0))?,
        disk_percent: real(&obj, disk, Some(100.0))?,
        network_rx_bytes: whole(&obj, rx)?,
        network_tx_bytes: whole(&obj, tx)?,
        active_services: whole(&obj, active_s)?,
        failed_services: whole(&obj, failed_s)?,
        total_services: whole(&obj, total_s)?,
        llm_requests: whole(&obj, llm)?,
        llm_cost_usd: real(&obj, COST_FIELD, None)?,
        active_users: whole(&obj, active_u)?,
        total_users: whole(&obj, total_u)?,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[track_caller]
    fn check(body: Value, expected: Result<MetricValues, &str>) {
        let got = parse_metrics(body.to_string().as_bytes());
        match expected {
            Ok(v) => assert_eq!(got.unwrap(), v),
            Err(msg) => assert_eq!(got.unwrap_err().to_string(), msg),
        }
    }

    #[test]
    fn a_full_answer_reads_every_field() {
        let all = json!({
            "cpu_percent": 12.5, "memory_percent": 50, "disk_percent": 100,
            "network_rx_bytes": 1024, "network_tx_bytes": 2048, "active_services": 3, "failed_services": 0,
            "total_services": 3, "llm_requests": 42, "llm_cost_usd": 1.25, "active_users": 2, "total_users": 9,
            "unknown": "ignored"
        });
        check(
            all,
            Ok(MetricValues {
                cpu_percent: Some(12.5),
                memory_percent: Some(50.0),
                disk_percent: Some(100.0),
                network_rx_bytes: Some(1024),
                network_tx_bytes: Some(2048),
                active_services: Some(3),
                failed_services: Some(0),
                total_services: Some(3),
                llm_requests: Some(42),
                llm_cost_usd: Some(1.25),
                active_users: Some(2),
                total_users: Some(9),
            }),
        );
    }

    #[test]
    fn absent_and_null_are_none() {
        check(json!({}), Ok(MetricValues::default()));
        check(
            json!({"cpu_percent": null, "total_users": null}),
            Ok(MetricValues::default()),
        );
        check(
            json!({"llm_requests": 5.0}),
            Ok(MetricValues {
                llm_requests: Some(5),
                ..Default::default()
            }),
        );
    }

    #[test]
    fn bad_values_name_the_field_and_value() {
        check(
            json!({"cpu_percent": 140}),
            Err("metrics response field cpu_percent = 140 is out of range 0..=100"),
        );
        check(
            json!({"memory_percent": -1}),
            Err("metrics response field memory_percent = -1 is out of range 0..=100"),
        );
        check(
            json!({"disk_percent": "50"}),
            Err("metrics response field disk_percent = \"50\" is not a number"),
        );
        check(
            json!({"active_users": 1.5}),
            Err("metrics response field active_users = 1.5 is not a whole number"),
        );
        check(
            json!({"llm_requests": -3}),
            Err("metrics response field llm_requests = -3 is negative"),
        );
        check(
            json!({"llm_cost_usd": -0.5}),
            Err("metrics response field llm_cost_usd = -0.5 is negative"),
        );
        check(
            json!({"network_rx_bytes": 18446744073709551615u64}),
            Err(
                "metrics response field network_rx_bytes = 18446744073709551615 is past the 64-bit signed range",
            ),
        );
        check(
            json!({"network_tx_bytes": 1e30}),
            Err("metrics response field network_tx_bytes = 1e+30 is past the 64-bit signed range"),
        );
        check(
            json!({"total_services": true}),
            Err("metrics response field total_services = true is not a number"),
        );
    }

    #[test]
    fn non_objects_fail() {
        check(
            json!([1]),
            Err("invalid metrics response: expected a JSON object, got an array"),
        );
        check(
            json!(null),
            Err("invalid metrics response: expected a JSON object, got null"),
        );
        assert_eq!(
            parse_metrics(b"").unwrap_err().to_string(),
            "invalid metrics response: empty body"
        );
        assert!(
            parse_metrics(b"{oops")
                .unwrap_err()
                .to_string()
                .starts_with("invalid metrics response: not JSON")
        );
    }

    #[test]
    fn values_round_trip_through_the_wire() {
        let v = MetricValues {
            cpu_percent: Some(1.5),
            llm_requests: Some(7),
            ..Default::default()
        };
        assert_eq!(
            parse_metrics(v.to_json().to_string().as_bytes()).unwrap(),
            v
        );
    }
}
