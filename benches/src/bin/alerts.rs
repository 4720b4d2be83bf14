//! The alert pipeline's cost (docs/benchmarks.md), `scripts/bench-alerts`:
//!
//! 1. per result: 100,000 servers' rule state fed steady results, the cost of one result
//!    through `ServerRules::observe` and the evaluator's map, on top of a check's cost;
//! 2. a storm: 10 % of 100,000 servers in 10 regions turn unreachable at once. The real
//!    shell (`AlertService`) on the real event bus, writing to PostgreSQL (`DATABASE_URL`)
//!    and sending to a recording notifier: notices sent, time to the first, rows written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_alerts::testing::RecordingNotifier;
use fleet_alerts::{
    AlertConfig, AlertParts, AlertService, AlertStore, ChannelConfig, Observation, ServerRules,
};
use fleet_core::{Event, Events, HealthStatus, NewServer, Registry, ServerId, SystemClock};
use fleet_pg::testing::TestDb;

const SERVERS: usize = 100_000;
const REGIONS: usize = 10;

/// A check of `id` now.
fn check(id: ServerId, status: HealthStatus) -> fleet_core::HealthCheck {
    fleet_core::conformance::check_at(id, time::OffsetDateTime::now_utc(), status)
}

fn per_result() {
    let cfg = AlertConfig::default();
    let ids: Vec<ServerId> = (0..SERVERS).map(|_| ServerId::new()).collect();
    let mut rules: HashMap<ServerId, ServerRules> = HashMap::new();
    let now = time::OffsetDateTime::now_utc();
    // Warm: every server known.
    for id in &ids {
        rules
            .entry(*id)
            .or_insert_with(|| ServerRules::new(*id))
            .observe(Observation::Health(HealthStatus::Healthy), now, &cfg);
    }
    for (label, status) in [
        ("healthy", HealthStatus::Healthy),
        ("critical, firing", HealthStatus::Critical),
    ] {
        let rounds = 10;
        let started = Instant::now();
        let mut changes = 0usize;
        for r in 0..rounds {
            let at = now + Duration::from_secs(30 * (r + 1) as u64);
            for id in &ids {
                let step = rules
                    .entry(*id)
                    .or_insert_with(|| ServerRules::new(*id))
                    .observe(Observation::Health(status), at, &cfg);
                changes += step.changes.len();
            }
        }
        let per = started.elapsed().as_nanos() as f64 / (rounds * SERVERS) as f64;
        println!(
            "per result ({label}): {per:.0} ns over {} results at {SERVERS} servers ({changes} alert changes)",
            rounds * SERVERS
        );
    }
}

async fn storm() {
    let db = TestDb::create().await;
    let pg = db.store(Arc::new(SystemClock)).await;
    // 100,000 servers in 10 regions.
    let mut ids = Vec::with_capacity(SERVERS);
    let started = Instant::now();
    for i in 0..SERVERS {
        let mut new = NewServer::new(format!("s{i:06}"), format!("http://127.0.0.1:9/{i}"));
        new.region = Some(format!("r{}", i % REGIONS));
        ids.push(pg.create_server(new).await.unwrap().id);
    }
    println!(
        "registered {SERVERS} servers in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for name in ["hook", "slack"] {
        pg.create_channel(
            name,
            ChannelConfig::Webhook {
                url: format!("http://127.0.0.1:9/{name}"),
                send_resolved: true,
            },
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    }
    let events = Events::new();
    let notifier = Arc::new(RecordingNotifier::new());
    let cancel = fleet_core::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let cfg = AlertConfig {
        unreachable_for: Duration::from_secs(1),
        group_wait: Duration::from_secs(5),
        ..AlertConfig::default()
    };
    let handle = AlertService::spawn(
        AlertParts {
            leads: None,
            store: Arc::new(pg.clone()),
            servers: Arc::new(pg.clone()),
            notifier: notifier.clone(),
            config: cfg,
            clock: Arc::new(SystemClock),
            events: events.clone(),
            health_interval: Duration::from_secs(30),
        },
        cancel.clone(),
        &tracker,
    );
    // Everyone healthy first, spread as a cycle spreads them (a cycle of 100,000 takes some
    // 20 s; here 10,000 at a time, each burst taken before the next).
    for (i, chunk) in ids.chunks(10_000).enumerate() {
        for id in chunk {
            events.publish(Event::Checked {
                server: String::new(),
                check: check(*id, HealthStatus::Healthy),
                previous: None,
                manual: false,
            });
        }
        let want = ((i + 1) * 10_000) as u64;
        while handle.stats().results + handle.stats().lagged < want {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let rows_before = rows(&db).await;
    // The storm: 10 % of the fleet, 10 % of each region, unreachable twice 1 s apart
    // (pending, then firing).
    let storm: Vec<ServerId> = (0..SERVERS)
        .filter(|i| (i / REGIONS).is_multiple_of(10))
        .map(|i| ids[i])
        .collect();
    let t0 = Instant::now();
    for round in 0..2 {
        for id in &storm {
            events.publish(Event::Checked {
                server: String::new(),
                check: check(*id, HealthStatus::Unreachable),
                previous: None,
                manual: false,
            });
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
    let first = loop {
        if !notifier.received().is_empty() {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no notice");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Let the group settle past its wait, then count.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let got = notifier.received();
    let stats = handle.stats();
    let rows_after = rows(&db).await;
    println!(
        "storm: {} of {SERVERS} servers unreachable in {REGIONS} regions, 2 channels",
        storm.len()
    );
    println!(
        "  notices sent: {} (target: one per region and channel = {})",
        got.len(),
        REGIONS * 2
    );
    println!(
        "  first notice after {:.2} s (the storm's second result at 1.1 s, group_wait 5 s)",
        first.as_secs_f64()
    );
    println!(
        "  alert events lost: {}, write errors: {}",
        stats.lagged, stats.write_errors
    );
    for (table, (before, after)) in rows_before
        .iter()
        .zip(rows_after.iter())
        .map(|(b, a)| (b.0, (b.1, a.1)))
    {
        println!("  rows written to {table}: {}", after - before);
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

async fn rows(db: &TestDb) -> Vec<(&'static str, i64)> {
    let pool = db.settings.pool().unwrap();
    let client = pool.get().await.unwrap();
    let mut out = Vec::new();
    for table in [
        "alert_phases",
        "incidents",
        "incident_members",
        "incident_timeline",
        "alert_outbox",
    ] {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        out.push((table, n));
    }
    out
}

#[tokio::main]
async fn main() {
    per_result();
    if std::env::var("DATABASE_URL").is_ok() {
        storm().await;
    } else {
        println!("storm: skipped (no DATABASE_URL; scripts/bench-alerts starts one)");
    }
}
