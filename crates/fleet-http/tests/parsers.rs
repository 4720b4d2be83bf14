//! Property tests: arbitrary bytes and JSON never panic either parser.

use fleet_http::parse_health;
use fleet_wire::parse_metrics;
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z]{0,8}".prop_map(Value::String),
        prop_oneof![Just("ok"), Just("down"), Just("UP"), Just("pass")]
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("database".to_owned()),
            Just("redis".to_owned()),
            Just("services".to_owned()),
            Just("healthy".to_owned()),
            Just("status".to_owned()),
            Just("components".to_owned()),
            Just("cpu_percent".to_owned()),
            Just("llm_requests".to_owned()),
            Just("llm_cost_usd".to_owned()),
            "[a-z_]{1,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_health(&bytes);
        let _ = parse_metrics(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_and_objects_always_classify(v in json()) {
        let body = v.to_string();
        let health = parse_health(body.as_bytes());
        prop_assert_eq!(health.is_ok(), v.is_object());
        if let Ok(answer) = health {
            let _ = fleet_core::classify(&answer);
        }
        let _ = parse_metrics(body.as_bytes());
    }
}
