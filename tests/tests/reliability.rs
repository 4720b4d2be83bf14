//! Faults, end to end: the database going away, a server flipping state, a process killed.
//! Short forms run in scripts/test; `FLEET_LONG=1` (scripts/reliability-long) runs the long
//! forms that docs/reliability.md reports.

use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::{PrivateCluster, TestDb};
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::{Client, Proc, SECRET_KEY as KEY, free_port, wait_for};
use serde_json::Value;

const ADMIN: &str = "bootstrap-admin-token-reliability-01";

fn long() -> bool {
    std::env::var("FLEET_LONG").is_ok_and(|v| v == "1")
}

fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = fleet_tests::server_cmd(db_url, args);
    cmd.env("FLEET_ADMIN_TOKEN", ADMIN);
    cmd
}

fn import(db_url: &str, fleet: &SimFleet) {
    let manifest = std::env::temp_dir().join(format!("fleet-rel-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
    fleet_tests::import(server_cmd(db_url, &[]), &manifest);
    let _ = std::fs::remove_file(manifest);
}

/// A database password that must never be logged (the test clusters trust local
/// connections, so any password is accepted).
const DB_PASSWORD: &str = "hunter2-db-password";

fn serve(db_url: &str, listen: &str, extra: &[(&str, &str)]) -> Proc {
    let with_password = db_url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DB_PASSWORD}@"),
        1,
    );
    assert_ne!(
        with_password, db_url,
        "the test URL has no user to give a password to"
    );
    let mut cmd = server_cmd(&with_password, &["serve"]);
    cmd.env("FLEET_LISTEN", listen)
        .env("FLEET_LOG", "debug")
        .env("FLEET_HEALTH_INTERVAL", "0.5")
        .env("FLEET_HEALTH_TIMEOUT", "0.4")
        .env("FLEET_METRICS_INTERVAL", "1")
        .env("FLEET_METRICS_TIMEOUT", "0.4")
        .env("FLEET_SHUTDOWN_GRACE", "3");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::start(cmd)
}

async fn count(db_url: &str, sql: &str) -> i64 {
    let pool = fleet_pg::PgSettings::from_url(db_url).pool().unwrap();
    let client = pool.get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn ids(db_url: &str, sql: &str) -> Vec<String> {
    let pool = fleet_pg::PgSettings::from_url(db_url).pool().unwrap();
    let client = pool.get().await.unwrap();
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn status(api: &Client) -> Option<Value> {
    api.get("/api/v1/fleet/workers/status")
        .await
        .filter(|(c, _)| *c == 200)
        .map(|(_, v)| v)
}

/// No token, key or password in any log line, debug level included.
fn assert_no_secrets(logs: &str, fleet: &SimFleet) {
    assert!(!logs.contains(ADMIN), "the admin token was logged");
    assert!(!logs.contains(KEY), "the secret key was logged");
    assert!(
        !logs.contains(DB_PASSWORD),
        "the database password was logged"
    );
    for s in fleet.servers() {
        assert!(
            !logs.contains(s.token()),
            "the probe token of {} was logged",
            s.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_buffered_reported_and_written_when_it_returns() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster.url()).await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 20,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = server_cmd(&url, &["migrate"]).output().unwrap();
    assert!(out.status.success());
    import(&url, &fleet);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("two health cycles", Duration::from_secs(30), || async {
        status(&api)
            .await
            .is_some_and(|v| v["health_worker"]["cycles"].as_u64() >= Some(2))
    })
    .await;

    tokio::task::block_in_place(|| cluster.stop());
    let before = status(&api).await.unwrap()["health_worker"]["checks_performed"]
        .as_u64()
        .unwrap();
    // Meanwhile: probing goes on, results wait, and both endpoints say what is happening.
    wait_for(
        "results waiting while the database is down",
        Duration::from_secs(30),
        || async {
            status(&api).await.is_some_and(|v| {
                let h = &v["health_worker"];
                h["checks_performed"].as_u64().unwrap() >= before + 40
                    && h["results_pending"].as_u64().unwrap() >= 40
                    && h["last_error"].as_str().is_some()
            })
        },
    )
    .await;
    let (code, ready) = api.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    let outage = if long() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(2)
    };
    tokio::time::sleep(outage).await;

    tokio::task::block_in_place(|| cluster.start_again());
    wait_for(
        "everything written after the database returned",
        Duration::from_secs(60),
        || async {
            status(&api).await.is_some_and(|v| {
                let h = &v["health_worker"];
                h["results_pending"] == 0
                    && h["results_written"] == h["checks_performed"]
                    && h["results_dropped"] == 0
            })
        },
    )
    .await;
    let (code, _) = api.get("/readyz").await.unwrap();
    assert_eq!(code, 200, "the pool did not reconnect");
    let v = status(&api).await.unwrap();
    let performed = v["health_worker"]["checks_performed"].as_i64().unwrap();
    server.terminate();
    assert_eq!(
        server.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.stderr()
    );
    let stored = count(&url, "SELECT count(*) FROM server_health_checks").await;
    assert!(stored >= performed, "stored {stored} of {performed} checks");
    assert_no_secrets(&server.stderr(), &fleet);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_changes_state_shows_each_state_in_its_history() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 5,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        server_cmd(&url, &["migrate"])
            .output()
            .unwrap()
            .status
            .success()
    );
    import(&url, &fleet);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    let target = fleet.servers()[0].clone();
    let (_, list) = loop {
        if let Some(r) = api
            .get(&format!("/api/v1/fleet/servers?search={}", target.name()))
            .await
        {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = list["servers"][0]["id"].as_str().unwrap().to_owned();
    let current = |want: &'static str| {
        let api = &api;
        let id = id.clone();
        async move {
            api.get(&format!("/api/v1/fleet/servers/{id}"))
                .await
                .is_some_and(|(_, v)| v["health_status"] == want)
        }
    };
    for (behavior, want) in [
        (Behavior::Healthy, "healthy"),
        (Behavior::Critical, "critical"),
        (Behavior::Healthy, "healthy"),
    ] {
        target.set_behavior(behavior);
        // Within one cycle (0.5 s), plus the write.
        wait_for(want, Duration::from_secs(5), || current(want)).await;
    }
    let (_, h) = api
        .get(&format!(
            "/api/v1/fleet/servers/{id}/health-checks?limit=1000"
        ))
        .await
        .unwrap();
    let mut states: Vec<&str> = h["health_checks"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    states.dedup();
    assert_eq!(
        states,
        ["healthy", "critical", "healthy"],
        "the history in time order"
    );
    // The change log holds each change once, newest first, in the server's log and the
    // fleet's, and the log says each one at info.
    let changes = |v: &Value| -> Vec<(String, String)> {
        v["state_changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["server_id"] == id.as_str())
            .map(|c| {
                (
                    c["from_status"].as_str().unwrap_or("never").to_owned(),
                    c["to_status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let expected = [
        ("critical", "healthy"),
        ("healthy", "critical"),
        ("never", "healthy"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    let (_, own) = api
        .get(&format!("/api/v1/fleet/servers/{id}/state-changes"))
        .await
        .unwrap();
    assert_eq!(changes(&own), expected, "{own}");
    let (_, all) = api
        .get("/api/v1/fleet/state-changes?limit=1000")
        .await
        .unwrap();
    assert_eq!(changes(&all), expected, "{all}");
    let logs = server.stderr();
    for line in [
        format!(
            "{}: healthy → critical (unhealthy: database (down))",
            target.name()
        ),
        format!("{}: critical → healthy", target.name()),
    ] {
        assert!(logs.contains(&line), "no `{line}` in the log");
    }
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_no_secrets(&server.stderr(), &fleet);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_a_restart_continues_from_the_stored_state() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 30,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        server_cmd(&url, &["migrate"])
            .output()
            .unwrap()
            .status
            .success()
    );
    import(&url, &fleet);
    let listen = format!("127.0.0.1:{}", free_port());
    let server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("two cycles", Duration::from_secs(30), || async {
        status(&api)
            .await
            .is_some_and(|v| v["health_worker"]["cycles"].as_u64() >= Some(2))
    })
    .await;
    // SIGKILL: no drain, no flush.
    drop(server);
    let rows = count(&url, "SELECT count(*) FROM server_health_checks").await;
    let dup = count(&url, "SELECT count(*) FROM (SELECT server_id, timestamp FROM server_health_checks GROUP BY 1, 2 HAVING count(*) > 1) d").await;
    assert_eq!(dup, 0);
    let stalest = count(
        &url,
        "SELECT (extract(epoch FROM min(last_health_check_at)) * 1000000)::int8 FROM managed_servers",
    )
    .await;

    let order_before = ids(
        &url,
        "SELECT id::text FROM managed_servers ORDER BY last_health_check_at NULLS FIRST, id",
    )
    .await;
    let marker = count(
        &url,
        "SELECT (extract(epoch FROM max(timestamp)) * 1000000)::int8 FROM server_health_checks",
    )
    .await;

    // A restarted instance holds a server checked less than 0.9 x interval ago until it is
    // due, so that it never checks early; wait until none is, so that the cycle's start
    // order shows.
    wait_for(
        "every stored check older than 0.9 x the new interval",
        Duration::from_secs(30),
        || async {
            count(
                &url,
                "SELECT count(*) FROM managed_servers WHERE last_health_check_at > now() - interval '4.5 seconds'",
            )
            .await
                == 0
        },
    )
    .await;
    // One server per batch, so the start order shows in the stored timestamps.
    let one_by_one = [
        ("FLEET_HEALTH_BATCH_SIZE", "1"),
        // 50 ms apart: under the load of the tests running beside it, a task can wait 20 ms.
        ("FLEET_HEALTH_BATCH_DELAY", "0.05"),
        ("FLEET_HEALTH_INTERVAL", "5"),
    ];
    let mut server = serve(&url, &listen, &one_by_one);
    wait_for(
        "a cycle after the restart",
        Duration::from_secs(30),
        || async {
            status(&api)
                .await
                .is_some_and(|v| v["health_worker"]["cycles"].as_u64() >= Some(1))
        },
    )
    .await;
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    let after = count(&url, "SELECT count(*) FROM server_health_checks").await;
    assert!(
        after >= rows + 30,
        "the restart checked every server again: {rows} then {after}"
    );
    let order_after = ids(
        &url,
        &format!(
            "SELECT server_id::text FROM server_health_checks \
             WHERE (extract(epoch FROM timestamp) * 1000000)::int8 > {marker} \
             GROUP BY server_id ORDER BY min(timestamp)"
        ),
    )
    .await;
    assert_eq!(
        order_after, order_before,
        "the first cycle after the restart did not go stalest first"
    );
    let still_stale = count(&url, &format!("SELECT count(*) FROM managed_servers WHERE (extract(epoch FROM last_health_check_at) * 1000000)::int8 <= {stalest}")).await;
    assert_eq!(
        still_stale, 0,
        "every server moved past the stalest stored check"
    );
    let dup = count(&url, "SELECT count(*) FROM (SELECT server_id, timestamp FROM server_health_checks GROUP BY 1, 2 HAVING count(*) > 1) d").await;
    assert_eq!(dup, 0);
    fleet.shutdown().await;
}

/// Follows the status endpoint until `cycles` health cycles are done; the longest cycle.
async fn longest_cycle(api: &Client, cycles: u64, limit: Duration) -> f64 {
    let end = std::time::Instant::now() + limit;
    let (mut seen, mut longest) = (0u64, 0f64);
    while seen < cycles {
        assert!(
            std::time::Instant::now() < end,
            "waited {limit:?} for {cycles} cycles"
        );
        if let Some(v) = status(api).await {
            let h = &v["health_worker"];
            let c = h["cycles"].as_u64().unwrap_or(0);
            if c > seen {
                seen = c;
                longest = longest.max(h["last_duration_seconds"].as_f64().unwrap_or(0.0));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_hanging_servers_hold_up_nobody() {
    let servers = if long() { 1_000 } else { 100 };
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let mix: Mix = "healthy=9,hang=1".parse().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: servers,
        mix,
        seed: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        server_cmd(&url, &["migrate"])
            .output()
            .unwrap()
            .status
            .success()
    );
    import(&url, &fleet);
    let listen = format!("127.0.0.1:{}", free_port());
    let settings = [
        ("FLEET_HEALTH_INTERVAL", "3"),
        ("FLEET_HEALTH_TIMEOUT", "1"),
        ("FLEET_HEALTH_BATCH_SIZE", "100"),
        ("FLEET_HEALTH_BATCH_DELAY", "0.05"),
        ("FLEET_METRICS_INTERVAL", "60"),
    ];
    let mut server = serve(&url, &listen, &settings);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    let cycles = if long() { 10 } else { 3 };
    let longest = longest_cycle(&api, cycles, Duration::from_secs(120)).await;
    eprintln!(
        "{servers} servers, 10% hanging: longest of {cycles} health cycles {longest:.2} s (timeout 1 s)"
    );
    // Timeout plus a little: the batches' start span and the cycle's final write.
    assert!(
        longest <= 3.0,
        "a cycle took {longest:.2} s with a 1 s timeout"
    );
    // The healthy 90 % are all recorded healthy, the hung 10 % unreachable at the deadline.
    let healthy = count(
        &url,
        "SELECT count(*) FROM managed_servers WHERE health_status = 'healthy'",
    )
    .await;
    let hung = count(&url, "SELECT count(DISTINCT server_id) FROM server_health_checks WHERE error_message = 'timeout after 1s'").await;
    assert_eq!(
        (healthy as usize, hung as usize),
        (servers * 9 / 10, servers / 10)
    );
    for s in fleet.servers() {
        assert!(
            s.stats().max_open <= 1,
            "{} was checked twice at once",
            s.name()
        );
    }
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_no_secrets(&server.stderr(), &fleet);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_recorded_and_memory_stays_bounded() {
    let per_kind = if long() { 25 } else { 3 };
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let mix: Mix = "huge=1,gzip_bomb=1,nested=1,drip=1,garbage=1,cut=1,reset=1,http_error=1,redirect=1,healthy=1".parse().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: per_kind * 10,
        mix,
        seed: 9,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        server_cmd(&url, &["migrate"])
            .output()
            .unwrap()
            .status
            .success()
    );
    import(&url, &fleet);
    let listen = format!("127.0.0.1:{}", free_port());
    let settings = [
        ("FLEET_HEALTH_INTERVAL", "2"),
        ("FLEET_HEALTH_TIMEOUT", "1"),
        ("FLEET_HEALTH_BATCH_SIZE", "50"),
    ];
    let mut server = serve(&url, &listen, &settings);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    let cycles = if long() { 30 } else { 3 };
    longest_cycle(&api, cycles, Duration::from_secs(200)).await;
    let peak = server.peak_rss_mib();
    eprintln!(
        "{} bad servers, {cycles} cycles: fleet-server peak resident memory {peak:.1} MiB",
        per_kind * 10
    );
    // Bodies are read up to 1 MiB each: a bound of a few MiB per bad server at once.
    assert!(peak < 200.0, "peak resident memory {peak:.1} MiB");
    for (behavior, status, error) in [
        ("huge", "critical", "body exceeds 1 MiB"),
        ("gzip_bomb", "critical", "body exceeds 1 MiB"),
        ("nested", "critical", "invalid health response: not JSON"),
        ("drip", "critical", "body read failed: timeout after 1s"),
        ("garbage", "critical", "invalid health response: not JSON"),
        ("cut", "critical", "body read failed"),
        ("reset", "unreachable", "connection reset"),
        ("http_error", "critical", "HTTP 50"),
        (
            "redirect",
            "critical",
            "HTTP 302 (redirects are not followed)",
        ),
    ] {
        for s in fleet
            .servers()
            .iter()
            .filter(|s| s.behavior().as_str() == behavior)
        {
            let (_, list) = api
                .get(&format!("/api/v1/fleet/servers?search={}", s.name()))
                .await
                .unwrap();
            let id = list["servers"][0]["id"].as_str().unwrap();
            let (_, h) = api
                .get(&format!("/api/v1/fleet/servers/{id}/health-checks?limit=1"))
                .await
                .unwrap();
            let last = &h["health_checks"][0];
            assert_eq!(last["status"], status, "{behavior}: {last}");
            assert!(
                last["error_message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(error),
                "{behavior}: {last}"
            );
        }
    }
    let healthy = count(
        &url,
        "SELECT count(*) FROM managed_servers WHERE health_status = 'healthy'",
    )
    .await;
    assert_eq!(
        healthy as usize, per_kind,
        "the healthy servers beside the bad ones were affected"
    );
    server.terminate();
    assert_eq!(
        server.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.stderr()
    );
    assert!(
        !server.stderr().contains("panicked"),
        "a panic: {}",
        server.stderr()
    );
    assert_no_secrets(&server.stderr(), &fleet);
    fleet.shutdown().await;
}
