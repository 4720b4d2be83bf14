//! Alerts end to end: the real binary, fleet-sim, PostgreSQL, real HTTP receivers and a real
//! SMTP sink on loopback. These tests start processes and wait on time, so they run one at a
//! time (a lock), in their own test binary, with generous bounds.

use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::TestDb;
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::{Answer, Client, Proc, Receiver, SmtpSink, free_port, wait_for};
use serde_json::{Value, json};

const ADMIN: &str = "bootstrap-admin-token-alerts-0001";

/// One test at a time: each runs a server, a fleet and receivers, and waits on their timing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = fleet_tests::server_cmd(db_url, args);
    cmd.env("FLEET_ADMIN_TOKEN", ADMIN);
    cmd
}

/// Registers the fleet's servers, the first `eu` of them in region eu, the rest in us.
async fn register(api: &Client, fleet: &SimFleet, eu: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, s) in fleet.servers().iter().enumerate() {
        let region = if i < eu { "eu" } else { "us" };
        let (status, v) = api
            .post(
                "/api/v1/fleet/servers",
                &json!({"name": s.name(), "api_url": s.api_url(), "api_token": s.token(), "region": region}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// `fleet-server serve` with fast checks and short alert timings, plus `extra`.
fn serve(db_url: &str, listen: &str, extra: &[(&str, &str)]) -> Proc {
    let mut cmd = server_cmd(db_url, &["serve"]);
    cmd.env("FLEET_LISTEN", listen)
        .env("FLEET_LOG", "info")
        .env("FLEET_HEALTH_INTERVAL", "0.5")
        .env("FLEET_HEALTH_TIMEOUT", "0.4")
        .env("FLEET_METRICS_INTERVAL", "5")
        .env("FLEET_METRICS_TIMEOUT", "1")
        .env("FLEET_SHUTDOWN_GRACE", "2")
        .env("FLEET_ALERT_CRITICAL_AFTER", "2")
        .env("FLEET_ALERT_UNREACHABLE_FOR", "1")
        .env("FLEET_ALERT_RESOLVE_AFTER", "2")
        .env("FLEET_ALERT_GROUP_WAIT", "2")
        .env("FLEET_ALERT_GROUP_INTERVAL", "60")
        .env("FLEET_ALERT_SEND_TIMEOUT", "2");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::start(cmd)
}

async fn setup(count: usize) -> (TestDb, String, SimFleet) {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = server_cmd(&url, &["migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (db, url, fleet)
}

async fn cycles(api: &Client) -> u64 {
    api.get("/api/v1/fleet/workers/status")
        .await
        .and_then(|(c, v)| (c == 200).then(|| v["health_worker"]["cycles"].as_u64()))
        .flatten()
        .unwrap_or(0)
}

/// Waits for `n` more health cycles: time passing, shown by the server, not slept.
async fn more_cycles(api: &Client, n: u64) {
    let start = cycles(api).await;
    wait_for(
        &format!("{n} more health cycles"),
        Duration::from_secs(60),
        || async { cycles(api).await >= start + n },
    )
    .await;
}

async fn channel(api: &Client, body: Value) -> String {
    let (status, v) = api
        .post("/api/v1/fleet/alerts/channels", &body)
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

async fn incidents(api: &Client, query: &str) -> Value {
    let (status, v) = api
        .get(&format!("/api/v1/fleet/incidents?{query}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// Notices of one incident, of one kind (`firing`, `reminder`, `acknowledged`, `resolved`…).
fn notices(r: &Receiver, path: &str, incident: &str, kind: &str) -> usize {
    r.at(path)
        .iter()
        .filter(|d| d.body["incident"]["id"] == incident && d.body["incident"]["notice"] == kind)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_storm_is_one_incident_and_one_notice_per_channel_through_restart_ack_and_recovery()
 {
    let _serial = SERIAL.lock().await;
    let (_db, url, fleet) = setup(22).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(20), || async {
        cycles(&api).await >= 1
    })
    .await;
    let ids = register(&api, &fleet, 20).await;
    let r = Receiver::start().await;
    let smtp = SmtpSink::start().await;
    channel(
        &api,
        json!({"name": "hook", "kind": "webhook", "url": r.url("/hook")}),
    )
    .await;
    channel(
        &api,
        json!({"name": "slack", "kind": "slack", "url": r.url("/slack")}),
    )
    .await;
    channel(&api, json!({"name": "pager", "kind": "pagerduty", "routing_key": "R0UTING-KEY", "url": r.url("/pd")})).await;
    channel(&api, json!({"name": "mail", "kind": "email", "to": ["ops@fleet.test"], "from": "fleet@fleet.test",
                          "smtp_host": "127.0.0.1", "smtp_port": smtp.addr.port(), "smtp_tls": "none"}))
    .await;
    more_cycles(&api, 4).await;

    // The storm: every server of eu unreachable.
    for s in &fleet.servers()[..20] {
        s.set_behavior(Behavior::Unreachable);
    }
    wait_for("the storm's notice", Duration::from_secs(30), || async {
        !r.at("/hook").is_empty()
    })
    .await;
    let first = r.at("/hook")[0].body.clone();
    let incident = first["incident"]["id"].as_str().unwrap().to_owned();
    assert_eq!(first["version"], "4");
    assert_eq!(first["status"], "firing");
    assert_eq!(first["groupLabels"]["alertname"], "RegionUnreachable");
    assert_eq!(first["groupLabels"]["region"], "eu");
    assert_eq!(first["receiver"], "hook");
    assert_eq!(
        first["alerts"].as_array().unwrap().len() as u64
            + first["truncatedAlerts"].as_u64().unwrap(),
        20
    );
    let a0 = &first["alerts"][0];
    assert_eq!(a0["labels"]["region"], "eu");
    assert!(ids.contains(&a0["labels"]["server_id"].as_str().unwrap().to_owned()));
    assert!(
        a0["generatorURL"]
            .as_str()
            .unwrap()
            .starts_with(&format!("http://{listen}/dashboard/servers/"))
    );
    wait_for(
        "every channel's notice",
        Duration::from_secs(20),
        || async { r.at("/slack").len() == 1 && r.at("/pd").len() == 1 && smtp.mail().len() == 1 },
    )
    .await;
    more_cycles(&api, 8).await;
    assert_eq!(
        r.at("/hook").len(),
        1,
        "one notice for the storm: {:?}",
        r.at("/hook")
    );
    assert_eq!(r.at("/slack").len(), 1);
    assert_eq!(r.at("/pd").len(), 1);
    assert_eq!(smtp.mail().len(), 1);
    let open = incidents(&api, "state=firing").await;
    assert_eq!(open["total"], 1, "{open}");
    assert_eq!(open["incidents"][0]["covers"], 20);
    // Each channel in its own form.
    let slack = &r.at("/slack")[0].body;
    assert!(slack["text"].as_str().unwrap().contains("[FIRING]"));
    assert!(slack["blocks"].as_array().unwrap().len() <= 50);
    let pd = &r.at("/pd")[0].body;
    assert_eq!(pd["event_action"], "trigger");
    assert_eq!(pd["dedup_key"], incident.as_str());
    assert_eq!(pd["routing_key"], "R0UTING-KEY");
    let (to, text) = &smtp.mail()[0];
    assert!(to[0].contains("ops@fleet.test"), "{to:?}");
    assert!(
        text.contains("Subject: [FIRING] 20 servers unreachable in region eu (20 server(s))"),
        "{text}"
    );
    // The same key on every channel's row is per channel: keys differ across channels.
    assert_ne!(r.at("/hook")[0].key, r.at("/slack")[0].key);

    // A restart loses no incident and sends nothing again.
    server.terminate();
    assert_eq!(
        server.wait(Duration::from_secs(15)),
        Some(0),
        "{}",
        server.stderr()
    );
    let logs_before = server.stderr();
    // From here on, reminders every 3 s, so that unacknowledged incidents show them.
    let mut server = serve(&url, &listen, &[("FLEET_ALERT_REPEAT_INTERVAL", "3")]);
    more_cycles(&api, 8).await;
    let open = incidents(&api, "state=firing").await;
    assert_eq!(open["total"], 1, "{open}");
    assert_eq!(open["incidents"][0]["id"], incident.as_str());

    // Acknowledged with a reason: the channels hear of it, then no reminder comes. Another
    // incident, not acknowledged, gets its reminders meanwhile.
    // Through the CLI, as an operator would: it lists the incident and acknowledges it.
    let cli = |args: &[&str]| {
        let out = server_cmd(&url, &["alerts"])
            .args(args)
            .env("FLEET_URL", format!("http://{listen}"))
            .env("FLEET_TOKEN", ADMIN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = cli(&["incidents", "--state", "firing"]);
    assert!(
        listed.contains(&incident) && listed.contains("1 incident(s) in all"),
        "{listed}"
    );
    let said = cli(&["ack", &incident, "--reason", "network team on it"]);
    assert_eq!(said.trim(), format!("incident {incident} is acknowledged"));
    // Reminders queued before the acknowledgement may still arrive; none may be queued after.
    let reminders_queued = |timeline: &Value| -> (usize, usize) {
        let lines = timeline.as_array().unwrap();
        let ack = lines
            .iter()
            .position(|t| t["kind"] == "acknowledged")
            .unwrap();
        let reminder = |t: &&Value| t["message"] == "reminder notice queued for hook";
        (
            lines[..ack].iter().filter(reminder).count(),
            lines[ack..].iter().filter(reminder).count(),
        )
    };
    fleet.servers()[20].set_behavior(Behavior::Critical);
    wait_for(
        "the second incident's reminders",
        Duration::from_secs(40),
        || async {
            r.at("/hook")
                .iter()
                .filter(|d| {
                    d.body["incident"]["id"] != incident.as_str()
                        && d.body["incident"]["notice"] == "reminder"
                })
                .count()
                >= 2
        },
    )
    .await;
    assert_eq!(notices(&r, "/hook", &incident, "acknowledged"), 1);
    let (_, d) = api
        .get(&format!("/api/v1/fleet/incidents/{incident}"))
        .await
        .unwrap();
    let (before, after) = reminders_queued(&d["timeline"]);
    assert_eq!(
        after, 0,
        "an acknowledged incident got a reminder: {}",
        d["timeline"]
    );
    assert_eq!(notices(&r, "/hook", &incident, "reminder"), before);
    assert!(
        r.at("/pd")
            .iter()
            .any(|d| d.body["event_action"] == "acknowledge")
    );
    assert_eq!(
        notices(&r, "/hook", &incident, "firing"),
        1,
        "announced again after the restart"
    );

    // Recovery: one resolved notice per channel; the acknowledgement ends with it.
    for s in &fleet.servers()[..20] {
        s.set_behavior(Behavior::Healthy);
    }
    wait_for("the resolved notices", Duration::from_secs(30), || async {
        notices(&r, "/hook", &incident, "resolved") == 1
            && r.at("/pd")
                .iter()
                .any(|d| d.body["event_action"] == "resolve")
            && smtp.mail().iter().any(|(_, t)| t.contains("[RESOLVED]"))
    })
    .await;
    more_cycles(&api, 6).await;
    assert_eq!(notices(&r, "/hook", &incident, "resolved"), 1);
    assert_eq!(
        r.at("/pd")
            .iter()
            .filter(
                |d| d.body["event_action"] == "resolve" && d.body["dedup_key"] == incident.as_str()
            )
            .count(),
        1
    );
    let (_, d) = api
        .get(&format!("/api/v1/fleet/incidents/{incident}"))
        .await
        .unwrap();
    assert_eq!(d["incident"]["state"], "resolved");
    assert_eq!(d["incident"]["ack_reason"], "network team on it");
    let kinds: Vec<&str> = d["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    for k in [
        "opened",
        "announced",
        "acknowledged",
        "resolved",
        "notification",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(15)), Some(0));
    // No secret of a channel in any log.
    for logs in [logs_before, server.stderr()] {
        for secret in ["R0UTING-KEY", "/hook", "/slack", "/pd"] {
            assert!(!logs.contains(secret), "`{secret}` was logged");
        }
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_one_delivery_with_one_key_and_a_hung_one_blocks_nothing() {
    let _serial = SERIAL.lock().await;
    let (_db, url, fleet) = setup(2).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let server = serve(&url, &listen, &[("FLEET_ALERT_SEND_TIMEOUT", "5")]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(20), || async {
        cycles(&api).await >= 1
    })
    .await;
    register(&api, &fleet, 2).await;
    let (flaky, hung, ok) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    flaky.answer([
        Answer::Status(500),
        Answer::Status(503),
        Answer::Status(500),
    ]);
    hung.answer(std::iter::repeat_n(Answer::Hang, 50));
    channel(
        &api,
        json!({"name": "flaky", "kind": "webhook", "url": flaky.url("/h")}),
    )
    .await;
    channel(
        &api,
        json!({"name": "hung", "kind": "webhook", "url": hung.url("/h")}),
    )
    .await;
    channel(
        &api,
        json!({"name": "ok", "kind": "webhook", "url": ok.url("/h")}),
    )
    .await;
    more_cycles(&api, 2).await;

    fleet.servers()[0].set_behavior(Behavior::Critical);
    wait_for(
        "the healthy receiver's notice",
        Duration::from_secs(20),
        || async { ok.got().len() == 1 && hung.got().len() == 1 },
    )
    .await;
    // While the hung receiver holds its request, checks go on and a second incident
    // reaches the healthy receiver.
    let before = cycles(&api).await;
    fleet.servers()[1].set_behavior(Behavior::Unreachable);
    wait_for("the second notice", Duration::from_secs(20), || async {
        ok.got().len() == 2
    })
    .await;
    assert!(cycles(&api).await > before, "health cycles stopped");

    // 500, 503, 500, then 200: one delivery, the same key every time.
    // Every notice reached it exactly once, after its failures, with the same key on every
    // attempt (the three failures may fall on either incident's notice).
    more_cycles(&api, 6).await;
    wait_for(
        "every notice to succeed once",
        Duration::from_secs(60),
        || async {
            let got = flaky.got();
            let keys: std::collections::BTreeSet<&str> =
                got.iter().map(|d| d.key.as_str()).collect();
            keys.len() == 2
                && keys
                    .iter()
                    .all(|k| got.iter().any(|d| d.key == *k && d.answer == 200))
        },
    )
    .await;
    more_cycles(&api, 6).await;
    let got = flaky.got();
    assert_eq!(got.iter().filter(|d| d.answer != 200).count(), 3, "{got:?}");
    for key in got
        .iter()
        .map(|d| d.key.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        assert!(!key.is_empty());
        let answers: Vec<u16> = got
            .iter()
            .filter(|d| d.key == key)
            .map(|d| d.answer)
            .collect();
        assert_eq!(answers.last(), Some(&200), "{key}: {answers:?}");
        assert_eq!(
            answers.iter().filter(|a| **a == 200).count(),
            1,
            "{key}: delivered twice: {answers:?}"
        );
    }
    // The hung receiver was tried again after each timeout, always with one key.
    let first = ok.got()[0].body["incident"]["id"].clone();
    wait_for(
        "a second try of the hung receiver",
        Duration::from_secs(30),
        || async {
            hung.got()
                .iter()
                .filter(|d| d.body["incident"]["id"] == first)
                .count()
                >= 2
        },
    )
    .await;
    let hung_keys: std::collections::BTreeSet<String> = hung
        .got()
        .iter()
        .filter(|d| d.body["incident"]["id"] == first)
        .map(|d| d.key.clone())
        .collect();
    assert_eq!(hung_keys.len(), 1);
    drop(server);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_send_and_mark_resends_at_most_once_with_the_same_key() {
    let _serial = SERIAL.lock().await;
    let (_db, url, fleet) = setup(1).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(20), || async {
        cycles(&api).await >= 1
    })
    .await;
    register(&api, &fleet, 1).await;
    let r = Receiver::start().await;
    // The first delivery is held: the sender has sent and not yet marked it.
    r.answer([Answer::Hang]);
    channel(
        &api,
        json!({"name": "hook", "kind": "webhook", "url": r.url("/h")}),
    )
    .await;
    fleet.servers()[0].set_behavior(Behavior::Critical);
    wait_for("the delivery", Duration::from_secs(20), || async {
        r.got().len() == 1
    })
    .await;
    // kill -9 now.
    drop(server);
    let server = serve(&url, &listen, &[]);
    // The claim expires (2 x 2 s + 5 s) and the notice goes again, with the same key.
    wait_for("the resend", Duration::from_secs(40), || async {
        r.got().len() == 2
    })
    .await;
    more_cycles(&api, 10).await;
    let got = r.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].key, got[1].key);
    assert_eq!(got[1].answer, 200);
    assert_eq!(got[0].body, got[1].body);
    drop(server);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_holds_incidents_and_a_server_still_down_after_it_opens_one_at_once() {
    let _serial = SERIAL.lock().await;
    let (_db, url, fleet) = setup(2).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let server = serve(&url, &listen, &[]);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(20), || async {
        cycles(&api).await >= 1
    })
    .await;
    let ids = register(&api, &fleet, 2).await;
    let r = Receiver::start().await;
    channel(
        &api,
        json!({"name": "hook", "kind": "webhook", "url": r.url("/h")}),
    )
    .await;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (status, w) = api
        .post(
            "/api/v1/fleet/maintenance-windows",
            &json!({"name": "swap disks", "server_id": ids[0], "starts_at": fmt(now - time::Duration::seconds(1)),
                    "ends_at": fmt(now + time::Duration::seconds(15))}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{w}");
    let window = w["id"].as_str().unwrap().to_owned();
    // The router re-reads windows every few seconds: wait until it has.
    more_cycles(&api, 12).await;
    fleet.servers()[0].set_behavior(Behavior::Critical);
    wait_for("the window's end", Duration::from_secs(30), || async {
        let (_, w) = api
            .get(&format!("/api/v1/fleet/maintenance-windows/{window}"))
            .await
            .unwrap();
        w["active"] == false
    })
    .await;
    // Probing went on (the server shows critical).
    let (_, s) = api
        .get(&format!("/api/v1/fleet/servers/{}", ids[0]))
        .await
        .unwrap();
    assert_eq!(s["health_status"], "critical");
    // Still down after it: an incident at once, announced without waiting for group_wait.
    // (It may already be open by now, so what the window held back is judged by times.)
    wait_for(
        "the incident after the window",
        Duration::from_secs(10),
        || async { r.got().len() == 1 },
    )
    .await;
    let inc = incidents(&api, "").await;
    assert_eq!(inc["total"], 1, "{inc}");
    let theirs = incidents(&api, &format!("server_id={}", ids[0])).await;
    assert_eq!(theirs["total"], 1, "{theirs}");
    // Nothing was opened or sent during the window: the one incident opened at its end.
    let at = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(
        at(&inc["incidents"][0]["opened_at"]) >= at(&w["ends_at"]),
        "opened during maintenance: {inc} (window {w})"
    );
    assert_eq!(r.got().len(), 1, "sent during maintenance: {:?}", r.got());
    drop(server);
    fleet.shutdown().await;
}
