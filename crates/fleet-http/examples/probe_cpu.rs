//! The CPU one health check costs Fleet's probe alone, on a single-threaded runtime as
//! fleet-server runs it, with no idle connections kept (fleet-server's default): the floor
//! under fleet-server's own figure, which adds the engine, the writers and the alerts.
//!
//! Run against a fleet-sim manifest (docs/benchmarks.md quotes the figures):
//!
//! ```text
//! fleet-sim --count 5000 --manifest /tmp/m.json &
//! cargo run --release -p fleet-http --example probe_cpu -- /tmp/m.json 40000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_core::{ApiToken, HealthProbe, ProbeOutcome, ProbeTarget, ServerId};
use fleet_http::{HttpConfig, HttpProbe};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Checks in flight at once.
const IN_FLIGHT: usize = 64;

/// This process's user and system CPU time so far, from `/proc/self/stat` (clock ticks of
/// 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("a process name") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks = |i: usize| fields[i].parse::<u64>().expect("a tick count");
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn targets(manifest: &str) -> Vec<ProbeTarget> {
    let text = std::fs::read_to_string(manifest).expect("the manifest");
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("a fleet-sim manifest");
    let field = |s: &serde_json::Value, k: &str| s[k].as_str().expect(k).to_owned();
    manifest["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| ProbeTarget {
            id: ServerId::new(),
            name: field(s, "name"),
            api_url: field(s, "api_url"),
            token: Some(ApiToken::new(field(s, "api_token"))),
            unreadable_token: None,
            health: None,
            kind: Default::default(),
            metrics_path: None,
            ca_cert: None,
            fence: None,
            checked_ago: None,
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(manifest), Some(count)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: probe_cpu MANIFEST CHECKS");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("CHECKS is a number");
    let targets: Vec<Arc<ProbeTarget>> = targets(manifest).into_iter().map(Arc::new).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let config = HttpConfig {
        idle_per_host: 0,
        ..HttpConfig::default()
    };
    let probe = Arc::new(HttpProbe::new(&config).expect("a client"));
    runtime.block_on(async {
        for round in 1..=2 {
            let (cpu, wall) = (cpu_time(), std::time::Instant::now());
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let answered = Arc::new(AtomicUsize::new(0));
            let mut running = JoinSet::new();
            for target in targets.iter().cycle().take(count) {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                let (probe, target, answered) = (probe.clone(), target.clone(), answered.clone());
                running.spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    if let ProbeOutcome::Report { .. } = probe.probe(&target, deadline).await {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(slot);
                });
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
            let per_check = (cpu_time() - cpu).as_secs_f64() * 1e6 / count as f64;
            println!(
                "round {round}: {count} checks, {} answered, {per_check:.1} µs of CPU per check, {:.2} s",
                answered.load(Ordering::Relaxed),
                wall.elapsed().as_secs_f64()
            );
        }
    });
}
