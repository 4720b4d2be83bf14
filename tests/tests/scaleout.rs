//! Several fleet-server processes sharing one fleet through PostgreSQL: a killed instance, a
//! paused one, a joiner and a database outage. Short forms with shortened intervals, run
//! one at a time, each with generous bounds. The long forms
//! (`FLEET_LONG=1`, scripts/reliability-long) repeat the kill and pause trials and report the
//! figures of docs/reliability.md.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::{PrivateCluster, TestDb};
use fleet_sim::{Mix, SimConfig, SimFleet};
use fleet_tests::{Client, Proc, free_port, wait_for};
use serde_json::Value;

const ADMIN: &str = "bootstrap-admin-token-scaleout-0001";

/// The tests time processes against each other: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
fn long() -> bool {
    std::env::var("FLEET_LONG").is_ok_and(|v| v == "1")
}

/// The health interval, in seconds (metrics every twice that), the lease TTL and the
/// heartbeat: short here, the harness's in the long forms.
fn times() -> (f64, f64, f64) {
    if long() {
        (5.0, 6.0, 1.0)
    } else {
        (2.0, 2.0, 0.5)
    }
}

/// The simulated fleet's size: `short` here, 3,000 in the long forms.
fn servers(short: usize) -> usize {
    if long() { 3_000 } else { short }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One fleet-server instance.
struct Instance {
    id: String,
    proc: Proc,
    api: Client,
}

impl Instance {
    fn start(db_url: &str, id: &str) -> Self {
        Self::start_with(db_url, id, &[("FLEET_ALERTS", "false")])
    }

    fn start_with(db_url: &str, id: &str, extra: &[(&str, &str)]) -> Self {
        let (interval, ttl, heartbeat) = times();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = fleet_tests::server_cmd(db_url, &["serve"]);
        cmd.env("FLEET_ADMIN_TOKEN", ADMIN)
            .env("FLEET_LISTEN", &listen)
            .env("FLEET_INSTANCE_ID", id)
            .env("FLEET_LOG", "info")
            .env("FLEET_HEALTH_INTERVAL", interval.to_string())
            .env("FLEET_HEALTH_TIMEOUT", "1")
            .env("FLEET_METRICS_INTERVAL", (2.0 * interval).to_string())
            .env("FLEET_METRICS_TIMEOUT", "1")
            .env("FLEET_HEARTBEAT_INTERVAL", heartbeat.to_string())
            .env("FLEET_LEASE_TTL", ttl.to_string())
            .env("FLEET_SHUTDOWN_GRACE", "2");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Self {
            id: id.to_owned(),
            proc: Proc::start(cmd),
            api: Client::new(format!("http://{listen}"), Some(ADMIN.to_owned())),
        }
    }

    async fn status(&self) -> Option<Value> {
        self.api
            .get("/api/v1/fleet/workers/status")
            .await
            .filter(|(c, _)| *c == 200)
            .map(|(_, v)| v)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.proc.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.id);
    }
}

/// The test's view of the database.
struct Db {
    pool: deadpool_postgres::Pool,
}

impl Db {
    fn new(url: &str) -> Self {
        Self {
            pool: fleet_pg::PgSettings::from_url(url).pool().unwrap(),
        }
    }

    async fn one(&self, sql: &str) -> i64 {
        let client = self.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn try_one(&self, sql: &str) -> Option<i64> {
        let client = self.pool.get().await.ok()?;
        client.query_one(sql, &[]).await.ok().map(|r| r.get(0))
    }

    /// Each bucket's owner.
    async fn owners(&self) -> BTreeMap<i16, Option<String>> {
        let client = self.pool.get().await.unwrap();
        client
            .query("SELECT bucket, owner FROM fleet_bucket_leases", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn buckets_of(&self, id: &str) -> usize {
        self.owners()
            .await
            .values()
            .filter(|o| o.as_deref() == Some(id))
            .count()
    }

    /// Scheduled checks (health, then metrics) of one server less than 0.9 x interval apart,
    /// over the whole stored history.
    async fn duplicates(&self) -> (i64, i64) {
        let (interval, _, _) = times();
        let health = self
            .one(&format!(
                "SELECT count(*) FROM (
                     SELECT timestamp - lag(timestamp) OVER (PARTITION BY server_id ORDER BY timestamp) AS gap
                     FROM server_health_checks WHERE NOT manual) g
                 WHERE gap < make_interval(secs => {})",
                0.9 * interval
            ))
            .await;
        let metrics = self
            .one(&format!(
                "SELECT count(*) FROM (
                     SELECT timestamp - lag(timestamp) OVER (PARTITION BY server_id ORDER BY timestamp) AS gap
                     FROM server_metrics_aggregated) g
                 WHERE gap < make_interval(secs => {})",
                0.9 * 2.0 * interval
            ))
            .await;
        (health, metrics)
    }

    /// Whether the leader's lease is held, unexpired, by a live instance.
    async fn leader_is_live(&self) -> bool {
        let (_, ttl, _) = times();
        self.one(&format!(
            "SELECT count(*) FROM fleet_leader l JOIN fleet_instances i ON i.id = l.owner
             WHERE l.expires_at > now() AND i.heartbeat_at > now() - make_interval(secs => {ttl})"
        ))
        .await
            == 1
    }
}

struct Rig {
    url: String,
    db: Db,
    fleet: SimFleet,
    _test_db: TestDb,
}

impl Rig {
    async fn start(count: usize, mix: &str, admin_url: Option<&str>) -> Self {
        let test_db = match admin_url {
            Some(url) => TestDb::create_on(url).await,
            None => TestDb::create().await,
        };
        let url = test_db.settings.url.clone().unwrap();
        let fleet = SimFleet::start(SimConfig {
            count,
            mix: mix.parse::<Mix>().unwrap(),
            slow: (Duration::from_millis(400), Duration::from_millis(900)),
            ..Default::default()
        })
        .await
        .unwrap();
        let out = fleet_tests::server_cmd(&url, &["migrate"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let manifest = std::env::temp_dir().join(format!("fleet-scale-{}.json", free_port()));
        std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
        fleet_tests::import(fleet_tests::server_cmd(&url, &[]), &manifest);
        let _ = std::fs::remove_file(manifest);
        Self {
            db: Db::new(&url),
            url,
            fleet,
            _test_db: test_db,
        }
    }

    fn instance(&self, id: &str) -> Instance {
        Instance::start(&self.url, id)
    }

    /// Waits until the live instances own every bucket between them, each its share.
    async fn settled(&self, ids: &[&str]) {
        let wanted: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        wait_for(
            "the buckets to be shared among the instances",
            Duration::from_secs(60),
            || async {
                let owners = self.db.owners().await;
                owners
                    .iter()
                    .all(|(b, o)| o.as_deref() == fleet_core::cluster::owner_of(*b as u16, &wanted))
            },
        )
        .await;
    }

    /// Waits until every server has at least `n` scheduled health checks stored.
    async fn every_server_checked(&self, n: i64) {
        let total = self.fleet.servers().len() as i64;
        wait_for("every server checked", Duration::from_secs(90), || async {
            self.db
                .one(&format!(
                    "SELECT count(*) FROM (SELECT server_id FROM server_health_checks
                     GROUP BY server_id HAVING count(*) >= {n}) s"
                ))
                .await
                == total
        })
        .await;
    }

    async fn assert_no_duplicates(&self) {
        let found = self.db.duplicates().await;
        if found != (0, 0) {
            let (interval, _, _) = times();
            let client = self.db.pool.get().await.unwrap();
            let rows = client
                .query(
                    &format!(
                        "(SELECT server_id::text, prev::text, timestamp::text FROM (
                             SELECT server_id, timestamp,
                                    lag(timestamp) OVER (PARTITION BY server_id ORDER BY timestamp) AS prev
                             FROM server_health_checks WHERE NOT manual) g
                         WHERE timestamp - prev < make_interval(secs => {}) LIMIT 10)
                         UNION ALL (
                         SELECT 'metrics ' || server_id::text, prev::text, timestamp::text FROM (
                             SELECT server_id, timestamp,
                                    lag(timestamp) OVER (PARTITION BY server_id ORDER BY timestamp) AS prev
                             FROM server_metrics_aggregated) g
                         WHERE timestamp - prev < make_interval(secs => {}) LIMIT 10)",
                        0.9 * interval,
                        1.8 * interval
                    ),
                    &[],
                )
                .await
                .unwrap();
            let pairs: Vec<(String, String, String)> = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            panic!(
                "scheduled checks less than 0.9 x interval apart: {found:?}; health: {pairs:#?}"
            );
        }
    }
}

/// Servers (by id) in the buckets `id` owns.
async fn servers_of(db: &Db, id: &str) -> BTreeSet<String> {
    let client = db.pool.get().await.unwrap();
    client
        .query(
            "SELECT s.id::text FROM managed_servers s JOIN fleet_bucket_leases l ON l.bucket = s.bucket
             WHERE l.owner = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_servers_are_checked_again_by_the_others_without_duplicates() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start(servers(150), "healthy=1", None).await;
    let (interval, ttl, _) = times();
    let mut instances: Vec<Instance> = ["i1", "i2", "i3"]
        .iter()
        .map(|id| rig.instance(id))
        .collect();
    rig.settled(&["i1", "i2", "i3"]).await;
    rig.every_server_checked(2).await;
    let trials = if long() { 20 } else { 1 };
    let mut worst_gap: f64 = 0.0;
    let mut slowest_recheck = Duration::ZERO;
    for trial in 0..trials {
        // Kill the instance that owns the most servers, without a word (SIGKILL).
        let victim = trial % instances.len();
        let id = instances[victim].id.clone();
        let orphans = servers_of(&rig.db, &id).await;
        assert!(!orphans.is_empty());
        let killed_at = rig
            .db
            .one("SELECT (extract(epoch FROM now()) * 1000)::int8")
            .await;
        instances[victim].signal("-KILL");
        let killed = std::time::Instant::now();
        // Each of its servers is checked again by another instance: after the TTL, a
        // heartbeat and at most a cycle.
        let list = orphans
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(",");
        let orphan_count = orphans.len() as i64;
        wait_for(
            "the killed instance's servers checked again",
            Duration::from_secs(60),
            || async {
                rig.db
                    .one(&format!(
                        "SELECT count(DISTINCT server_id) FROM server_health_checks
                         WHERE server_id IN ({list}) AND timestamp > to_timestamp({killed_at} / 1000.0)"
                    ))
                    .await
                    == orphan_count
            },
        )
        .await;
        slowest_recheck = slowest_recheck.max(killed.elapsed());
        // The longest gap of any of them across the kill: the TTL and one check window, plus
        // a heartbeat and the pace of a cycle.
        let gap_ms = rig
            .db
            .one(&format!(
                "SELECT coalesce(max(gap_ms), 0)::int8 FROM (
                     SELECT extract(epoch FROM timestamp - lag(timestamp) OVER (PARTITION BY server_id ORDER BY timestamp)) * 1000 AS gap_ms
                     FROM server_health_checks WHERE server_id IN ({list})) g"
            ))
            .await;
        worst_gap = worst_gap.max(gap_ms as f64 / 1000.0);
        assert!(
            (gap_ms as f64) < 1000.0 * (ttl + 3.0 * interval + 2.0),
            "a server waited {gap_ms} ms"
        );
        wait_for("a live leader", Duration::from_secs(15), || async {
            rig.db.leader_is_live().await
        })
        .await;
        // The instance restarts under the same id and takes its share back.
        let _ = instances[victim].proc.wait(Duration::from_secs(5));
        instances[victim] = rig.instance(&id);
        rig.settled(&["i1", "i2", "i3"]).await;
    }
    eprintln!(
        "FIGURE kill: {trials} trials, {} servers, interval {interval}s, TTL {ttl}s: every server of the killed instance checked again within {:.1}s of the kill (slowest trial); longest gap of any of them {worst_gap:.2}s; duplicates {:?}",
        rig.fleet.servers().len(),
        slowest_recheck.as_secs_f64(),
        rig.db.duplicates().await
    );
    rig.assert_no_duplicates().await;
    for i in &instances {
        i.proc.terminate_quietly();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_cannot_write_over_its_successor_and_rejoins() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start(servers(120), "healthy=1,slow=1", None).await;
    let (interval, _, _) = times();
    let instances: Vec<Instance> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| rig.instance(id))
        .collect();
    rig.settled(&["p1", "p2", "p3"]).await;
    rig.every_server_checked(2).await;
    let trials = if long() { 20 } else { 1 };
    let mut rejected_total = 0;
    for trial in 0..trials {
        let paused = &instances[trial % instances.len()];
        let before = paused.status().await.unwrap()["instance"]["fenced_writes_rejected"]
            .as_u64()
            .unwrap();
        // Pause it while its checks against slow servers are in flight.
        wait_for("checks in flight", Duration::from_secs(20), || async {
            paused
                .status()
                .await
                .is_some_and(|v| v["health_worker"]["in_flight"].as_u64() > Some(0))
        })
        .await;
        paused.signal("-STOP");
        // Longer than the TTL: the others take its buckets.
        let id = paused.id.clone();
        wait_for(
            "the paused instance's buckets taken over",
            Duration::from_secs(20),
            || async { rig.db.buckets_of(&id).await == 0 },
        )
        .await;
        tokio::time::sleep(secs(interval)).await;
        paused.signal("-CONT");
        // Its late writes are refused and counted, and it rejoins.
        wait_for(
            "late writes refused and counted",
            Duration::from_secs(20),
            || async {
                paused.status().await.is_some_and(|v| {
                    v["instance"]["fenced_writes_rejected"].as_u64() > Some(before)
                })
            },
        )
        .await;
        rig.settled(&["p1", "p2", "p3"]).await;
        let after = paused.status().await.unwrap();
        rejected_total += after["instance"]["fenced_writes_rejected"]
            .as_u64()
            .unwrap()
            - before;
        assert_eq!(after["health_worker"]["results_dropped"], 0, "{after}");
    }
    eprintln!(
        "FIGURE pause: {trials} trials, {} servers (half slow), each paused past the TTL with checks in flight: {rejected_total} late writes refused and counted, every instance rejoined; duplicates {:?}",
        rig.fleet.servers().len(),
        rig.db.duplicates().await
    );
    rig.assert_no_duplicates().await;
    for i in &instances {
        i.proc.terminate_quietly();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_takes_about_its_share_and_a_leaver_hands_its_own_over_at_once() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start(servers(100), "healthy=1", None).await;
    let a = rig.instance("j1");
    let b = rig.instance("j2");
    let c = rig.instance("j3");
    rig.settled(&["j1", "j2", "j3"]).await;
    rig.every_server_checked(2).await;
    let before = rig.db.owners().await;

    let d = rig.instance("j4");
    rig.settled(&["j1", "j2", "j3", "j4"]).await;
    let after = rig.db.owners().await;
    let moved: Vec<_> = before
        .iter()
        .filter(|(b, o)| after[*b] != **o)
        .map(|(b, _)| *b)
        .collect();
    assert!(
        moved.iter().all(|b| after[b].as_deref() == Some("j4")),
        "a bucket moved between old instances"
    );
    assert!(
        (180..=340).contains(&moved.len()),
        "{} buckets moved to the 4th instance, expected about 256",
        moved.len()
    );
    eprintln!(
        "FIGURE join: {} servers; a 4th instance joined 3: {} of 1024 buckets moved, all to it, none between the others",
        rig.fleet.servers().len(),
        moved.len()
    );
    let listed = a.api.get("/api/v1/fleet/instances").await.unwrap().1;
    assert_eq!(listed["live"], 4, "{listed}");
    let j4 = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "j4")
        .unwrap();
    assert_eq!(j4["buckets"], moved.len());
    let d_status = d.status().await.unwrap();
    assert_eq!(d_status["instance"]["buckets_owned"], moved.len());
    let metrics = reqwest::get(format!("{}/metrics", a.api.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("fleet_instances_live 4"), "{metrics}");

    // SIGTERM: the leaver releases its buckets and removes its row, so they move at once,
    // well before its leases would have expired.
    d.proc.terminate();
    wait_for(
        "the leaver's row removed and its buckets released",
        Duration::from_secs(10),
        || async {
            rig.db
                .one("SELECT count(*) FROM fleet_instances WHERE id = 'j4'")
                .await
                == 0
        },
    )
    .await;
    rig.settled(&["j1", "j2", "j3"]).await;
    rig.every_server_checked(4).await;
    rig.assert_no_duplicates().await;
    for i in [&a, &b, &c] {
        i.proc.terminate_quietly();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_three_instances_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = PrivateCluster::start();
    let rig = Rig::start(servers(90), "healthy=1", Some(&cluster.url())).await;
    let (_, ttl, _) = times();
    let instances: Vec<Instance> = ["o1", "o2", "o3"]
        .iter()
        .map(|id| rig.instance(id))
        .collect();
    rig.settled(&["o1", "o2", "o3"]).await;
    rig.every_server_checked(2).await;

    // Refused writes before the outage come from the start-up handovers (checks selected
    // under a bucket's old epoch): harmless, and not the outage's.
    let mut refused_before = Vec::new();
    for i in &instances {
        let v = i.status().await.unwrap();
        refused_before.push(v["instance"]["fenced_writes_rejected"].as_u64().unwrap());
    }
    let outage = if long() { 120.0 } else { 4.0 * ttl };
    tokio::task::block_in_place(|| cluster.stop());
    tokio::time::sleep(secs(outage)).await;
    tokio::task::block_in_place(|| cluster.start_again());
    let start_rows = rig
        .db
        .try_one("SELECT count(*) FROM server_health_checks")
        .await;
    wait_for(
        "every buffered result written",
        Duration::from_secs(60),
        || async {
            let mut all = true;
            for i in &instances {
                all &= i.status().await.is_some_and(|v| {
                    v["health_worker"]["results_pending"] == 0
                        && v["health_worker"]["last_error"].is_null()
                });
            }
            all
        },
    )
    .await;
    rig.settled(&["o1", "o2", "o3"]).await;
    // Nothing lost: every result each instance wrote is stored (the writes are idempotent,
    // so rows can only be fewer if something was lost), none dropped, none refused.
    let mut written = 0;
    for (i, before) in instances.iter().zip(&refused_before) {
        let v = i.status().await.unwrap();
        assert_eq!(v["health_worker"]["results_dropped"], 0, "{v}");
        let refused = v["instance"]["fenced_writes_rejected"].as_u64().unwrap();
        assert_eq!(refused, *before, "results refused after the outage: {v}");
        written += v["health_worker"]["results_written"].as_u64().unwrap() - refused;
    }
    let stored = rig
        .db
        .one("SELECT count(*) FROM server_health_checks WHERE NOT manual")
        .await as u64;
    assert!(
        stored >= written,
        "stored {stored} of {written} written (rows when the database came back: {start_rows:?})"
    );
    eprintln!(
        "FIGURE outage: {} servers, 3 instances, PostgreSQL stopped {outage}s: {stored} rows stored >= {written} written, 0 dropped, 0 refused; duplicates {:?}",
        rig.fleet.servers().len(),
        rig.db.duplicates().await
    );
    rig.assert_no_duplicates().await;
    for i in &instances {
        i.proc.terminate_quietly();
    }
}

/// Alerts with short timings, for [`Instance::start_with`].
const ALERTS: &[(&str, &str)] = &[
    ("FLEET_ALERTS", "true"),
    ("FLEET_ALERT_CRITICAL_AFTER", "2"),
    ("FLEET_ALERT_RESOLVE_AFTER", "2"),
    ("FLEET_ALERT_GROUP_WAIT", "1"),
    ("FLEET_ALERT_GROUP_INTERVAL", "1"),
    ("FLEET_ALERT_SEND_TIMEOUT", "2"),
    ("FLEET_ALERT_SELF", "false"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_judged_by_each_owner_decided_by_the_leader_and_each_notice_sent_once() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start(servers(90), "healthy=1", None).await;
    let ids = ["a1", "a2", "a3"];
    let mut instances: Vec<Instance> = ids
        .iter()
        .map(|id| Instance::start_with(&rig.url, id, ALERTS))
        .collect();
    rig.settled(&ids).await;
    rig.every_server_checked(2).await;
    let hook = fleet_tests::Receiver::start().await;
    let (status, v) = instances[0]
        .api
        .post(
            "/api/v1/fleet/alerts/channels",
            &serde_json::json!({"name": "hook", "kind": "webhook", "url": hook.url("/hook")}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let names: BTreeMap<String, String> = {
        let client = rig.db.pool.get().await.unwrap();
        client
            .query("SELECT id::text, name FROM managed_servers", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let all: Vec<(String, String)> = names.into_iter().collect();
    let trials = if long() { 21 } else { 3 };
    let mut kinds_run = BTreeMap::<&str, usize>::new();
    for trial in 0..trials {
        // Six servers go critical, spread over the fleet (so over every instance's buckets).
        let step = all.len() / 6;
        let broken: Vec<&(String, String)> = (0..6)
            .map(|k| &all[(k * step + trial) % all.len()])
            .collect();
        let owners: BTreeSet<Option<String>> = {
            let owners = rig.db.owners().await;
            broken
                .iter()
                .map(|(id, _)| {
                    owners[&(fleet_core::cluster::bucket_of(fleet_core::ServerId(
                        id.parse().unwrap(),
                    )) as i16)]
                        .clone()
                })
                .collect()
        };
        assert!(
            owners.len() >= 2,
            "the broken servers are all one instance's"
        );
        for (_, name) in &broken {
            assert!(rig.fleet.set_behavior(name, fleet_sim::Behavior::Critical));
        }
        // Meanwhile, one instance is killed, paused past the TTL, or restarted.
        let victim = trial % instances.len();
        let kind = ["kill", "pause", "restart"][trial % 3];
        *kinds_run.entry(kind).or_default() += 1;
        let id = instances[victim].id.clone();
        match kind {
            "kill" => instances[victim].signal("-KILL"),
            "pause" => instances[victim].signal("-STOP"),
            _ => instances[victim].proc.terminate(),
        }
        // Every broken server is announced, whoever owns it.
        let wanted: BTreeSet<String> = broken.iter().map(|(id, _)| id.clone()).collect();
        wait_for(
            "every broken server announced",
            Duration::from_secs(60),
            || async {
                let announced: BTreeSet<String> = hook
                    .got()
                    .iter()
                    .filter(|d| d.body["status"] == "firing")
                    .flat_map(|d| d.body["alerts"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a["labels"]["server_id"].as_str().map(str::to_owned))
                    .collect();
                wanted.is_subset(&announced)
            },
        )
        .await;
        match kind {
            "pause" => instances[victim].signal("-CONT"),
            _ => {
                let _ = instances[victim].proc.wait(Duration::from_secs(10));
                instances[victim] = Instance::start_with(&rig.url, &id, ALERTS);
            }
        }
        rig.settled(&ids).await;
        for (_, name) in &broken {
            rig.fleet.set_behavior(name, fleet_sim::Behavior::Healthy);
        }
        // Every incident resolves and every notice is out.
        wait_for(
            "the incidents resolved and every notice sent",
            Duration::from_secs(90),
            || async {
                rig.db
                    .one(
                        "SELECT (SELECT count(*) FROM incidents WHERE state <> 'resolved')
                              + (SELECT count(*) FROM alert_outbox WHERE state <> 'sent')",
                    )
                    .await
                    == 0
            },
        )
        .await;
    }
    // Each idempotency key delivered once; twice only when a sender died (or was paused past
    // its claim) between sending and marking.
    let mut per_key = BTreeMap::<String, usize>::new();
    for d in hook.got() {
        *per_key.entry(d.key).or_default() += 1;
    }
    let rows = rig.db.one("SELECT count(*) FROM alert_outbox").await as usize;
    let twice = per_key.values().filter(|n| **n == 2).count();
    assert_eq!(
        per_key.len(),
        rows,
        "a key delivered that has no row, or a row never delivered"
    );
    assert!(
        per_key.values().all(|n| *n <= 2),
        "a key delivered more than twice: {per_key:?}"
    );
    assert!(
        twice <= trials,
        "{twice} keys delivered twice in {trials} trials"
    );
    let resolved = hook
        .got()
        .iter()
        .filter(|d| d.body["status"] == "resolved")
        .count();
    assert!(
        resolved >= trials,
        "{resolved} resolved notices for {trials} trials"
    );
    eprintln!(
        "FIGURE alerts: {trials} trials ({kinds_run:?}), {} servers, 3 instances, 6 servers broken per trial across owners: {} idempotency keys, {} delivered once, {twice} twice; duplicates {:?}",
        rig.fleet.servers().len(),
        per_key.len(),
        per_key.len() - twice,
        rig.db.duplicates().await
    );
    rig.assert_no_duplicates().await;
    for i in &instances {
        i.proc.terminate_quietly();
    }
}
