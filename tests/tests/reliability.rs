//! Faults, end to end: the database going away, a server flipping state, a process killed.
//! Short forms run in scripts/test; `FLEET_LONG=1` (scripts/reliability-long) runs the long
//! forms that docs/reliability.md reports.

use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::{PrivateCluster, TestDb};
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::{Client, Proc, binary, free_port, wait_for};
use serde_json::Value;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const ADMIN: &str = "bootstrap-admin-token-reliability-01";

fn long() -> bool {
    std::env::var("FLEET_LONG").is_ok_and(|v| v == "1")
}

fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("fleet-server"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.env("DATABASE_URL", db_url)
        .env("FLEET_SECRET_KEY", KEY)
        .env("FLEET_ADMIN_TOKEN", ADMIN);
    cmd
}

fn import(db_url: &str, fleet: &SimFleet) {
    let manifest = std::env::temp_dir().join(format!("fleet-rel-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
    let out = server_cmd(db_url, &["servers", "import", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(manifest);
}

fn serve(db_url: &str, listen: &str, extra: &[(&str, &str)]) -> Proc {
    let mut cmd = server_cmd(db_url, &["serve"]);
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
        "SELECT extract(epoch FROM min(last_health_check_at))::int8 FROM managed_servers",
    )
    .await;

    let mut server = serve(&url, &listen, &[]);
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
    let still_stale = count(&url, &format!("SELECT count(*) FROM managed_servers WHERE extract(epoch FROM last_health_check_at)::int8 <= {stalest}")).await;
    assert_eq!(
        still_stale, 0,
        "every server moved past the stalest stored check"
    );
    let dup = count(&url, "SELECT count(*) FROM (SELECT server_id, timestamp FROM server_health_checks GROUP BY 1, 2 HAVING count(*) > 1) d").await;
    assert_eq!(dup, 0);
    fleet.shutdown().await;
}
