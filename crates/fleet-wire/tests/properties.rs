//! Property tests: what a server writes, Fleet reads back unchanged; no input panics a reader.

use fleet_wire::{HealthReport, MetricValues, parse_metrics};
use proptest::prelude::*;

fn percent() -> impl Strategy<Value = Option<f64>> {
    proptest::option::of(0.0..=100.0f64)
}

fn count() -> impl Strategy<Value = Option<i64>> {
    proptest::option::of(0..i64::MAX / 2)
}

fn values() -> impl Strategy<Value = MetricValues> {
    (
        (percent(), percent(), percent(), count(), count(), count()),
        (
            count(),
            count(),
            count(),
            proptest::option::of(0.0..1e9f64),
            count(),
            count(),
        ),
    )
        .prop_map(
            |((cpu, mem, disk, rx, tx, active), (failed, total, llm, cost, au, tu))| MetricValues {
                cpu_percent: cpu,
                memory_percent: mem,
                disk_percent: disk,
                network_rx_bytes: rx,
                network_tx_bytes: tx,
                active_services: active,
                failed_services: failed,
                total_services: total,
                llm_requests: llm,
                llm_cost_usd: cost,
                active_users: au,
                total_users: tu,
            },
        )
}

proptest! {
    #[test]
    fn valid_metrics_round_trip(v in values()) {
        let body = v.to_json().to_string();
        prop_assert_eq!(parse_metrics(body.as_bytes()).unwrap(), v);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_metrics(&bytes);
        let _ = HealthReport::parse(&bytes);
    }
}
