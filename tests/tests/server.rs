//! The real fleet-server binary against the throwaway PostgreSQL and a fleet-sim fleet.

use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::TestDb;
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::{Client, Proc, SECRET_KEY as KEY, binary, free_port, wait_for};
use serde_json::Value;

fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = fleet_tests::server_cmd(db_url, args);
    cmd.env("FLEET_LOG", "info");
    cmd
}

fn run(db_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = server_cmd(db_url, args).output().expect("run fleet-server");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn rows(db: &TestDb, sql: &str) -> i64 {
    let pool = db.settings.pool().unwrap();
    let client = pool.get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_watches_an_imported_fleet_and_stops_cleanly_on_sigterm() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let mix: Mix = "healthy=6,degraded=2,critical=1,unreachable=1,hang=2"
        .parse()
        .unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 12,
        mix,
        seed: 11,
        ..Default::default()
    })
    .await
    .unwrap();
    let manifest = std::env::temp_dir().join(format!("fleet-e2e-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();

    let (code, out, err) = run(&url, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("V1__initial"), "{out}");
    let (code, out, err) = run(&url, &["servers", "import", manifest.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "imported 12 servers, skipped 0 already registered"
    );
    let (_, out, _) = run(&url, &["servers", "import", manifest.to_str().unwrap()]);
    assert_eq!(
        out.trim(),
        "imported 0 servers, skipped 12 already registered"
    );
    let (code, token, err) = run(
        &url,
        &["token", "create", "--name", "e2e", "--role", "admin"],
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    let (_, listed, _) = run(&url, &["token", "list"]);
    assert!(
        listed.contains("e2e") && !listed.contains(&token),
        "{listed}"
    );
    let (_, table, _) = run(&url, &["servers", "list"]);
    assert_eq!(table.lines().count(), 13, "{table}");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = server_cmd(&url, &["serve"]);
    cmd.env("FLEET_LISTEN", &listen)
        .env("FLEET_HEALTH_INTERVAL", "1")
        .env("FLEET_HEALTH_TIMEOUT", "0.5")
        .env("FLEET_METRICS_INTERVAL", "1.5")
        .env("FLEET_METRICS_TIMEOUT", "0.5")
        .env("FLEET_SHUTDOWN_GRACE", "3");
    let mut server = Proc::start(cmd);
    let api = Client::new(format!("http://{listen}"), Some(token.clone()));

    let status = || async {
        api.get("/api/v1/fleet/workers/status")
            .await
            .filter(|(c, _)| *c == 200)
            .map(|(_, v)| v)
    };
    wait_for(
        "two health cycles and a metrics collection",
        Duration::from_secs(30),
        || async {
            status().await.is_some_and(|v| {
                v["health_worker"]["cycles"].as_u64() >= Some(2)
                    && v["metrics_worker"]["collections_successful"].as_u64() > Some(0)
            })
        },
    )
    .await;

    // The registry agrees with what each simulated server does.
    let (_, list) = api.get("/api/v1/fleet/servers?limit=100").await.unwrap();
    for s in list["servers"].as_array().unwrap() {
        let sim = fleet.server(s["name"].as_str().unwrap()).unwrap();
        let expected = match sim.behavior() {
            Behavior::Healthy => "healthy",
            Behavior::Degraded => "degraded",
            Behavior::Critical => "critical",
            _ => "unreachable",
        };
        assert_eq!(s["health_status"], expected, "{}", s["name"]);
        assert!(
            sim.stats().max_open <= 1,
            "{} was checked twice at once",
            s["name"]
        );
    }

    // A behaviour change shows up as a health transition in the history.
    let flip = fleet
        .servers()
        .iter()
        .find(|s| s.behavior() == Behavior::Healthy)
        .unwrap()
        .clone();
    let id = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == flip.name())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    flip.set_behavior(Behavior::Critical);
    wait_for(
        "the transition to critical",
        Duration::from_secs(15),
        || async {
            api.get(&format!("/api/v1/fleet/servers/{id}"))
                .await
                .is_some_and(|(_, v)| v["health_status"] == "critical")
        },
    )
    .await;
    let (_, history) = api
        .get(&format!(
            "/api/v1/fleet/servers/{id}/health-checks?limit=50"
        ))
        .await
        .unwrap();
    let statuses: Vec<&str> = history["health_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "critical");
    assert!(statuses.contains(&"healthy"), "{statuses:?}");

    // The status endpoint's counts agree with the history in the database: the stored rows
    // are at least what the status said was written before they were counted, and the status
    // catches up with them (a write is counted just after it commits).
    let before = status().await.unwrap();
    let health_rows = rows(&db, "SELECT count(*) FROM server_health_checks").await;
    let metrics_rows = rows(&db, "SELECT count(*) FROM server_metrics_aggregated").await;
    let written = |v: &Value, w: &str| v[w]["results_written"].as_i64().unwrap();
    assert!(
        written(&before, "health_worker") <= health_rows,
        "{health_rows} rows, status said {before}"
    );
    wait_for(
        "the status to count the rows stored",
        Duration::from_secs(5),
        || async {
            status()
                .await
                .is_some_and(|v| written(&v, "health_worker") >= health_rows)
        },
    )
    .await;
    let after = status().await.unwrap();
    // Metrics results include failed collections, which store no row.
    assert!(
        metrics_rows > 0
            && metrics_rows
                <= after["metrics_worker"]["collections_performed"]
                    .as_i64()
                    .unwrap()
    );
    assert_eq!(
        after["metrics_worker"]["collections_successful"]
            .as_i64()
            .unwrap()
            * 12,
        after["metrics_worker"]["total_metrics_collected"]
            .as_i64()
            .unwrap(),
        "every successful collection of fleet-sim stores all twelve values"
    );
    assert!(after["health_worker"]["running"].as_bool().unwrap());
    assert_eq!(after["metrics_worker"]["partition_health"]["ok"], true);

    // SIGTERM mid-cycle (two servers hang): exit 0 within the grace period, every completed
    // result stored.
    server.terminate();
    let code = server.wait(Duration::from_secs(8));
    assert_eq!(code, Some(0), "exit status; stderr:\n{}", server.stderr());
    let stored = rows(&db, "SELECT count(*) FROM server_health_checks").await;
    let answered: u64 = fleet
        .servers()
        .iter()
        .filter(|s| !matches!(s.behavior(), Behavior::Hang | Behavior::Unreachable))
        .map(|s| s.stats().health_requests)
        .sum();
    let hung_or_refused_rows = rows(
        &db,
        "SELECT count(*) FROM server_health_checks WHERE status = 'unreachable'",
    )
    .await;
    assert_eq!(
        stored - hung_or_refused_rows,
        answered as i64,
        "every answered check is stored exactly once"
    );
    let logs = server.stderr();
    assert!(logs.contains("Health checks complete"), "{logs}");
    assert!(!logs.contains(&token), "the admin token was logged");
    for s in fleet.servers() {
        assert!(!logs.contains(s.token()), "a probe token was logged");
    }
    assert!(!logs.contains(KEY), "the secret key was logged");
    fleet.shutdown().await;
    let _ = std::fs::remove_file(manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_cannot_start_leave_the_api_up_and_say_why() {
    let dead = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin = "bootstrap-admin-token-for-e2e-0001";
    let mut cmd = server_cmd(&dead, &["serve"]);
    cmd.env("FLEET_LISTEN", &listen)
        .env("FLEET_ADMIN_TOKEN", admin);
    let mut server = Proc::start(cmd);
    let api = Client::new(format!("http://{listen}"), Some(admin.to_owned()));
    wait_for(
        "the status to report the failure",
        Duration::from_secs(20),
        || async {
            api.get("/api/v1/fleet/workers/status")
                .await
                .is_some_and(|(c, v)| {
                    c == 200
                        && v["health_worker"]["running"] == false
                        && v["health_worker"]["last_error"]
                            .as_str()
                            .is_some_and(|e| e.contains("workers not started"))
                })
        },
    )
    .await;
    let (code, ready) = api.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    server.terminate();
    assert_eq!(
        server.wait(Duration::from_secs(8)),
        Some(0),
        "{}",
        server.stderr()
    );
    assert!(!server.stderr().contains(admin));
}

/// Environment, arguments, and what the error message must name.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);

#[test]
fn bad_settings_exit_non_zero_naming_the_setting_and_value() {
    let cases: [Case; 12] = [
        (
            &[("FLEET_ALERT_CPU_PERCENT", "150")],
            &["demo"],
            &["FLEET_ALERT_CPU_PERCENT", "150"],
        ),
        (
            &[("FLEET_PUBLIC_URL", "ftp://fleet.example")],
            &["demo"],
            &["FLEET_PUBLIC_URL", "ftp://fleet.example"],
        ),
        (
            &[("FLEET_ALERT_GROUP_WAIT", "soon")],
            &["demo"],
            &["FLEET_ALERT_GROUP_WAIT", "soon"],
        ),
        (
            &[("FLEET_HEALTH_INTERVAL", "abc")],
            &["demo"],
            &["FLEET_HEALTH_INTERVAL", "abc"],
        ),
        (
            &[],
            &["demo", "--health-timeout", "30"],
            &["FLEET_HEALTH_TIMEOUT", "30"],
        ),
        (
            &[("FLEET_LISTEN", "nowhere")],
            &["demo"],
            &["FLEET_LISTEN", "nowhere"],
        ),
        (
            &[("FLEET_SECRET_KEY", "short")],
            &["serve"],
            &["FLEET_SECRET_KEY"],
        ),
        (
            &[("FLEET_LOG_FORMAT", "xml")],
            &["demo"],
            &["FLEET_LOG_FORMAT", "xml"],
        ),
        (
            &[("FLEET_ADMIN_TOKEN", "letmein")],
            &["demo"],
            &["FLEET_ADMIN_TOKEN", "at least 32", "openssl rand"],
        ),
        (
            &[("FLEET_ADMIN_TOKEN", "0123456789 0123456789 0123456789 x")],
            &["demo"],
            &["FLEET_ADMIN_TOKEN", "whitespace"],
        ),
        (
            &[("FLEET_TRUSTED_PROXIES", "10.0.0.0/8,proxy.example")],
            &["demo"],
            &["FLEET_TRUSTED_PROXIES", "proxy.example"],
        ),
        (
            &[("FLEET_PROBE_DENY_NETS", "10.0.0.0/33")],
            &["demo"],
            &["FLEET_PROBE_DENY_NETS", "10.0.0.0/33"],
        ),
    ];
    for (env, args, says) in cases {
        let mut cmd = Command::new(binary("fleet-server"));
        cmd.args(args)
            .env_clear()
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} {env:?} succeeded");
        for s in says {
            assert!(err.contains(s), "{args:?} {env:?}: `{s}` not in:\n{err}");
        }
    }
    let out = Command::new(binary("fleet-server"))
        .arg("serve")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_a_live_fleet_and_its_incidents() {
    let port = free_port();
    let mut cmd = Command::new(binary("fleet-server"));
    cmd.arg("demo")
        .env_clear()
        .env("FLEET_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLEET_DEMO_SERVERS", "12")
        .env("FLEET_DEMO_CHANGE_EVERY", "10");
    let mut demo = Proc::start(cmd);
    let token = {
        let mut token = None;
        for _ in 0..200 {
            if let Some(t) = demo
                .stdout()
                .split_whitespace()
                .find(|w| w.starts_with("fleet_"))
            {
                token = Some(t.to_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        token.unwrap_or_else(|| panic!("no token printed: {}{}", demo.stdout(), demo.stderr()))
    };
    let api = Client::new(format!("http://127.0.0.1:{port}"), Some(token.clone()));
    wait_for("a health cycle", Duration::from_secs(20), || async {
        api.get("/api/v1/fleet/workers/status")
            .await
            .is_some_and(|(_, v): (u16, Value)| v["health_worker"]["cycles"].as_u64() >= Some(1))
    })
    .await;
    let (_, list) = api.get("/api/v1/fleet/servers").await.unwrap();
    assert_eq!(list["servers"].as_array().unwrap().len(), 12);
    // Its faults become incidents: announced to the demo's own receiver, which prints them,
    // and resolved once the fault heals.
    wait_for("an announced incident", Duration::from_secs(90), || async {
        demo.stdout().contains("webhook received: [FIRING]")
    })
    .await;
    let (_, open) = api.get("/api/v1/fleet/incidents").await.unwrap();
    assert!(open["total"].as_u64() >= Some(1), "{open}");
    wait_for("a resolved incident", Duration::from_secs(180), || async {
        demo.stdout().contains("webhook received: [RESOLVED]")
    })
    .await;
    demo.terminate();
    assert_eq!(
        demo.wait(Duration::from_secs(15)),
        Some(0),
        "{}",
        demo.stderr()
    );
    assert!(!demo.stderr().contains(&token), "the token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_run_blind_and_keys_rotate_to_a_new_key() {
    const NEW_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 2,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    let manifest = std::env::temp_dir().join(format!("fleet-keys-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
    assert_eq!(run(&url, &["migrate"]).0, 0);
    // Sealed under the old key (the tests' usual one).
    fleet_tests::import(server_cmd(&url, &[]), &manifest);
    let _ = std::fs::remove_file(&manifest);
    let old_id = fleet_pg::SecretKey::from_base64(KEY)
        .unwrap()
        .id()
        .to_owned();

    // With only the new key, serve refuses to start, naming the key that sealed the tokens.
    let serve = |key: &str, previous: Option<&str>| {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = server_cmd(&url, &["serve"]);
        cmd.env("FLEET_SECRET_KEY", key)
            .env("FLEET_LISTEN", &listen)
            .env("FLEET_HEALTH_INTERVAL", "0.5")
            .env("FLEET_HEALTH_TIMEOUT", "0.4")
            .env("FLEET_ADMIN_TOKEN", "bootstrap-admin-token-keys-0123456789");
        if let Some(p) = previous {
            cmd.env("FLEET_SECRET_KEY_PREVIOUS", p);
        }
        (Proc::start(cmd), listen)
    };
    let (mut blind, _) = serve(NEW_KEY, None);
    assert_eq!(
        blind.wait(Duration::from_secs(20)),
        Some(2),
        "serve ran blind"
    );
    let err = blind.stderr();
    assert!(
        err.contains(&old_id) && err.contains("FLEET_SECRET_KEY_PREVIOUS"),
        "{err}"
    );

    // New key current, old key previous: it runs and probes with the tokens.
    let healthy = |listen: String| async move {
        let api = Client::new(
            format!("http://{listen}"),
            Some("bootstrap-admin-token-keys-0123456789".into()),
        );
        wait_for("both servers healthy", Duration::from_secs(20), || async {
            api.get("/api/v1/fleet/servers")
                .await
                .is_some_and(|(_, v)| {
                    v["servers"].as_array().is_some_and(|s| {
                        s.len() == 2 && s.iter().all(|s| s["health_status"] == "healthy")
                    })
                })
        })
        .await;
    };
    let (mut both, listen) = serve(NEW_KEY, Some(KEY));
    healthy(listen).await;
    both.terminate();
    assert_eq!(both.wait(Duration::from_secs(10)), Some(0));

    // Rotate, then drop the old key: it still runs and probes.
    let mut rotate = server_cmd(&url, &["keys", "rotate"]);
    rotate
        .env("FLEET_SECRET_KEY", NEW_KEY)
        .env("FLEET_SECRET_KEY_PREVIOUS", KEY);
    let out = rotate.output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        said.trim(),
        "alert_channels.config: 0 re-sealed, 0 already under the current key\n\
         managed_servers.api_token: 2 re-sealed, 0 already under the current key"
    );
    let (mut after, listen) = serve(NEW_KEY, None);
    healthy(listen).await;
    after.terminate();
    assert_eq!(after.wait(Duration::from_secs(10)), Some(0));
    for p in [&blind, &both, &after] {
        let logs = p.stderr();
        assert!(
            !logs.contains(KEY) && !logs.contains(NEW_KEY),
            "a key was logged"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_bad_inputs_are_refused_by_the_api_import_and_core() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    assert_eq!(run(&url, &["migrate"]).0, 0);
    let admin = "bootstrap-admin-token-validation-0123456789";
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = server_cmd(&url, &["serve"]);
    cmd.env("FLEET_LISTEN", &listen)
        .env("FLEET_ADMIN_TOKEN", admin);
    let mut server = Proc::start(cmd);
    let api = Client::new(format!("http://{listen}"), Some(admin.to_owned()));
    wait_for("the API", Duration::from_secs(20), || async {
        api.get("/api/v1/fleet/servers")
            .await
            .is_some_and(|(c, _)| c == 200)
    })
    .await;

    let entry = |name: &str, api_url: &str, token: &str| serde_json::json!({"name": name, "api_url": api_url, "api_token": token});
    let ok_url = "http://127.0.0.1:9";
    let long = "x".repeat(5000);
    let bad = [
        (entry("", ok_url, "t"), "name must not be empty"),
        (
            entry(&long, ok_url, "t"),
            "name must be at most 255 characters",
        ),
        (
            entry("web\u{1b}[31m", ok_url, "t"),
            "name must not contain control",
        ),
        (
            entry("ring\u{7}", ok_url, "t"),
            "name must not contain control",
        ),
        (entry("nul\0", ok_url, "t"), "name must not contain control"),
        (
            entry("creds", "http://admin:hunter2@host", "t"),
            "api_url must not carry credentials",
        ),
        (
            entry("empty-token", ok_url, ""),
            "api_token must be 1 to 1024",
        ),
        (
            entry("crlf", ok_url, "t\r\nX-Evil: 1"),
            "api_token must be printable",
        ),
    ];
    let file = std::env::temp_dir().join(format!("fleet-import-{}.json", free_port()));
    for (e, says) in &bad {
        // Core.
        let new =
            fleet_core::NewServer::new(e["name"].as_str().unwrap(), e["api_url"].as_str().unwrap())
                .with_token(fleet_core::ApiToken::new(e["api_token"].as_str().unwrap()));
        let core = new.validated().unwrap_err().to_string();
        assert!(core.starts_with(says), "core: {core}");
        // The API.
        let (code, v) = api.post("/api/v1/fleet/servers", e).await.unwrap();
        assert_eq!(code, 422, "{v}");
        assert_eq!(
            v["error"]["message"],
            core.as_str(),
            "the API says what core says"
        );
        // Import: a good entry beside the bad one, and nothing stored.
        let body = serde_json::json!({"servers": [entry("good", ok_url, "t"), e]});
        std::fs::write(&file, body.to_string()).unwrap();
        let (code, _, err) = run(&url, &["servers", "import", file.to_str().unwrap()]);
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains("entry 1 (name ") && err.contains(&core),
            "import: {err}"
        );
        assert!(err.contains("nothing was imported"), "{err}");
        assert_eq!(rows(&db, "SELECT count(*) FROM managed_servers").await, 0);
    }
    // --skip-invalid stores the good ones and names every bad one by index.
    let mut servers = vec![entry("good", ok_url, "t")];
    servers.extend(bad.iter().map(|(e, _)| e.clone()));
    let mut extra = entry("tagged", ok_url, "t");
    extra["region"] = "eu".into();
    extra["status"] = "maintenance".into();
    extra["tags"] = serde_json::json!(["edge"]);
    servers.push(extra);
    servers.push(entry("GOOD", ok_url, "t"));
    std::fs::write(&file, serde_json::json!({ "servers": servers }).to_string()).unwrap();
    let (code, out, err) = run(
        &url,
        &[
            "servers",
            "import",
            file.to_str().unwrap(),
            "--skip-invalid",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for i in 1..=bad.len() {
        assert!(err.contains(&format!("invalid: entry {i} ")), "{err}");
    }
    assert!(
        err.contains("skipped: a server named `GOOD` already exists"),
        "{err}"
    );
    assert_eq!(
        out.trim(),
        format!(
            "imported 2 servers, skipped 1 already registered, {} invalid not imported",
            bad.len()
        )
    );
    assert_eq!(
        rows(
            &db,
            "SELECT count(*) FROM managed_servers WHERE name = 'tagged' AND region = 'eu' \
             AND status = 'maintenance' AND tags = '[\"edge\"]'::jsonb"
        )
        .await,
        1
    );
    let _ = std::fs::remove_file(&file);
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_database_that_does_not_answer_is_named_once_with_host_and_port_never_the_password() {
    let port = free_port();
    let out = Command::new(binary("fleet-server"))
        .arg("migrate")
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://fleet:hunter2-db@127.0.0.1:{port}/fleetdb"),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}/fleetdb")), "{err}");
    assert!(!err.contains("hunter2-db"), "the password was shown: {err}");
    let cause = "Connection refused";
    assert_eq!(err.matches(cause).count(), 1, "said more than once: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cycles_run_a_third_of_the_health_interval_behind_health_cycles() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 3,
        seed: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let manifest = std::env::temp_dir().join(format!("fleet-phase-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
    assert_eq!(run(&url, &["migrate"]).0, 0);
    assert_eq!(
        run(&url, &["servers", "import", manifest.to_str().unwrap()]).0,
        0
    );
    let mut cmd = server_cmd(&url, &["serve"]);
    cmd.env("FLEET_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("FLEET_HEALTH_INTERVAL", "3")
        .env("FLEET_HEALTH_TIMEOUT", "1")
        .env("FLEET_METRICS_INTERVAL", "6")
        .env("FLEET_METRICS_TIMEOUT", "1");
    let mut server = Proc::start(cmd);
    let first_sample = "SELECT count(*) FROM server_metrics_aggregated";
    let sampled = tokio::time::timeout(Duration::from_secs(20), async {
        while rows(&db, first_sample).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        sampled.is_ok(),
        "no metrics sample in 20 s: {}",
        server.stderr()
    );
    server.terminate();
    assert_eq!(
        server.wait(Duration::from_secs(15)),
        Some(0),
        "{}",
        server.stderr()
    );
    // Both timestamps are the starts of their cycles' first checks, so the gap between them,
    // on the health worker's 3 s grid, is the phase: 1 s, not 0 (the two grids aligned).
    let pool = db.settings.pool().unwrap();
    let client = pool.get().await.unwrap();
    let gap: f64 = client
        .query_one(
            "SELECT extract(epoch FROM (SELECT min(timestamp) FROM server_metrics_aggregated)
                                    - (SELECT min(timestamp) FROM server_health_checks))::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let phase = gap.rem_euclid(3.0);
    assert!(
        (0.7..1.6).contains(&phase),
        "metrics started {gap:.3} s after health: {phase:.3} s into a health interval"
    );
}
