//! The dashboard in a real headless Chromium, against the real binary, fleet-sim and
//! PostgreSQL. Each test starts processes and waits on their timing, so they run one at a
//! time (a lock), in their own test binary, with generous bounds. Screenshots of each page at
//! 1280×800 and 390×844 land in target/screenshots.

use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::TestDb;
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::browser::Browser;
use fleet_tests::{Client, Proc, free_port, wait_for};
use serde_json::{Value, json};

const ADMIN: &str = "bootstrap-admin-token-dashboard-01";
const XSS: &str = "<script>window.__xss=1</script>";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = fleet_tests::server_cmd(db_url, args);
    cmd.env("FLEET_ADMIN_TOKEN", ADMIN);
    cmd
}

struct Stack {
    _db: TestDb,
    url: String,
    fleet: SimFleet,
    server: Proc,
    listen: String,
    base: String,
    api: Client,
    ids: Vec<String>,
}

/// `fleet-server serve` on `listen`, checking twice a second with quick alert timings.
fn serve(url: &str, listen: &str, extra: &[(&str, &str)]) -> Proc {
    let mut cmd = server_cmd(url, &["serve"]);
    cmd.env("FLEET_LISTEN", listen)
        .env("FLEET_LOG", "info")
        .env("FLEET_HEALTH_INTERVAL", "0.5")
        .env("FLEET_HEALTH_TIMEOUT", "0.4")
        .env("FLEET_METRICS_INTERVAL", "1")
        .env("FLEET_METRICS_TIMEOUT", "0.5")
        .env("FLEET_SHUTDOWN_GRACE", "2")
        .env("FLEET_ALERT_CRITICAL_AFTER", "2")
        .env("FLEET_ALERT_GROUP_WAIT", "1")
        .env("FLEET_ALERT_RESOLVE_AFTER", "2");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc::start(cmd)
}

/// PostgreSQL, a fleet of `count` healthy servers (half in eu, half in us), and the real
/// server checking them.
async fn stack(count: usize, extra: &[(&str, &str)]) -> Stack {
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
    let listen = format!("127.0.0.1:{}", free_port());
    let server = serve(&url, &listen, extra);
    let base = format!("http://{listen}");
    let api = Client::new(base.clone(), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(30), || async {
        api.get("/healthz").await.is_some()
    })
    .await;
    let mut ids = Vec::new();
    for (i, s) in fleet.servers().iter().enumerate() {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        let (status, v) = api
            .post(
                "/api/v1/fleet/servers",
                &json!({"name": s.name(), "api_url": s.api_url(), "api_token": s.token(), "region": region, "environment": "production"}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    wait_for("every server checked", Duration::from_secs(30), || async {
        api.get("/api/v1/fleet/summary")
            .await
            .is_some_and(|(_, v)| v["servers"]["by_health_status"]["healthy"] == json!(count))
    })
    .await;
    Stack {
        _db: db,
        url,
        fleet,
        server,
        listen,
        base,
        api,
        ids,
    }
}

/// A token made with the CLI.
fn token(url: &str, name: &str, role: &str) -> String {
    let out = server_cmd(url, &["token", "create", "--name", name, "--role", role])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn sign_in(b: &Browser, base: &str, token: &str) {
    b.goto(&format!("{base}/dashboard/")).await;
    b.wait_until(
        "the sign-in form",
        Duration::from_secs(10),
        "return !!document.querySelector('input[name=token]');",
    )
    .await;
    b.fill("input[name=token]", token).await;
    b.click("form button[type=submit]").await;
    b.wait_until(
        "the overview",
        Duration::from_secs(10),
        "return location.pathname === '/dashboard/' && !!document.querySelector('meta[name=csrf-token]');",
    )
    .await;
}

/// Waits until the page's live stream is open.
async fn live(b: &Browser) {
    b.wait_until(
        "the live stream to open",
        Duration::from_secs(15),
        "return document.documentElement.dataset.live === 'open';",
    )
    .await;
}

async fn shots(b: &Browser, name: &str) {
    for (size, (w, h)) in [("desktop", DESKTOP), ("phone", PHONE)] {
        b.resize(w, h).await;
        b.screenshot(&format!("{name}-{size}")).await;
    }
    b.resize(DESKTOP.0, DESKTOP.1).await;
}

fn count(text: &Option<String>) -> u64 {
    text.as_deref()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_watches_the_fleet_change_and_acts() {
    let _serial = SERIAL.lock().await;
    let s = stack(12, &[]).await;
    let b = Browser::start(DESKTOP.0, DESKTOP.1).await;

    // A bad token is refused, and the page says so.
    b.goto(&format!("{}/dashboard/sign-in", s.base)).await;
    b.fill("input[name=token]", "fleet_notatokennotatokennotatoken")
        .await;
    b.click("form button[type=submit]").await;
    b.wait_until(
        "the refusal",
        Duration::from_secs(10),
        "return document.body.innerText.includes('That token is not valid');",
    )
    .await;
    let cookies = b.js("return document.cookie;").await;
    assert_eq!(cookies, json!(""), "no readable cookie, and no session");

    sign_in(&b, &s.base, ADMIN).await;
    live(&b).await;
    // The overview's numbers are the API's.
    let (_, summary) = s.api.get("/api/v1/fleet/summary").await.unwrap();
    assert_eq!(
        count(&b.text_of("#count-total").await),
        summary["servers"]["total"].as_u64().unwrap()
    );
    assert_eq!(
        count(&b.text_of("#count-active").await),
        summary["servers"]["by_status"]["active"].as_u64().unwrap()
    );
    assert_eq!(
        count(&b.text_of("#health-healthy").await),
        summary["servers"]["by_health_status"]["healthy"]
            .as_u64()
            .unwrap()
    );
    assert_eq!(count(&b.text_of("#health-critical").await), 0);
    assert!(
        b.text().await.contains("Workers"),
        "an admin sees the workers"
    );
    shots(&b, "overview").await;

    // Search and filters narrow the list.
    b.goto(&format!("{}/dashboard/servers", s.base)).await;
    let rows = "return document.querySelectorAll('tr[data-server-id]').length;";
    assert_eq!(b.js(rows).await, json!(12));
    let name = s.fleet.servers()[3].name().to_owned();
    b.fill("input[name=q]", &name).await;
    b.click("form.filters button[type=submit]").await;
    b.wait_until(
        "one row",
        Duration::from_secs(10),
        "return document.querySelectorAll('tr[data-server-id]').length === 1;",
    )
    .await;
    assert!(
        b.js("return location.search;")
            .await
            .as_str()
            .unwrap()
            .contains("q="),
        "the view is in the URL"
    );
    b.goto(&format!("{}/dashboard/servers?region=eu", s.base))
        .await;
    assert_eq!(b.js(rows).await, json!(6));
    shots(&b, "servers").await;

    // A server that turns critical changes on the open page, without a reload.
    b.goto(&format!("{}/dashboard/servers", s.base)).await;
    live(&b).await;
    b.js("window.__same_page = true; return true;").await;
    let victim = s.fleet.servers()[0].name().to_owned();
    s.fleet.set_behavior(&victim, Behavior::Critical);
    let id = &s.ids[0];
    b.wait_until(
        "the row to turn critical",
        Duration::from_secs(20),
        &format!("const r = document.querySelector('tr[data-server-id=\"{id}\"] .health'); return !!r && r.innerText.includes('critical');"),
    )
    .await;
    assert_eq!(
        b.js("return window.__same_page === true;").await,
        json!(true),
        "the page was reloaded"
    );
    b.wait_until(
        "a toast",
        Duration::from_secs(10),
        &format!(
            "return document.getElementById('toasts').innerText.includes({});",
            json!(victim)
        ),
    )
    .await;

    // A group is made on its page, then filled from the list's selection.
    b.goto(&format!("{}/dashboard/groups", s.base)).await;
    b.fill("form.api input[name=name]", "frontends").await;
    b.click("form.api button[type=submit]").await;
    b.wait_until(
        "the new group",
        Duration::from_secs(10),
        "return document.querySelector('#group-list').innerText.includes('frontends');",
    )
    .await;
    b.goto(&format!("{}/dashboard/servers?region=us", s.base))
        .await;
    for i in 0..3 {
        b.click(&format!(
            "tr[data-server-id=\"{}\"] input[name=select]",
            s.ids[2 * i + 1]
        ))
        .await;
    }
    assert_eq!(
        b.text_of("#selected-count").await.as_deref(),
        Some("3 selected")
    );
    b.click("button[data-bulk=POST]").await;
    let groups = || async {
        s.api.get("/api/v1/fleet/groups").await.unwrap().1["groups"]
            .as_array()
            .unwrap()
            .clone()
    };
    wait_for("three members", Duration::from_secs(10), || async {
        groups().await.iter().any(|g| {
            g["name"] == "frontends"
                && g["member_count"]
                    .as_u64()
                    .or_else(|| g["members"].as_array().map(|m| m.len() as u64))
                    == Some(3)
        })
    })
    .await;
    let group_id = groups()
        .await
        .iter()
        .find(|g| g["name"] == "frontends")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.goto(&format!("{}/dashboard/servers?group={group_id}", s.base))
        .await;
    assert_eq!(b.js(rows).await, json!(3), "filtered by group");

    // The incident the critical server opened is acknowledged with a reason.
    wait_for("an incident", Duration::from_secs(30), || async {
        s.api
            .get("/api/v1/fleet/incidents?state=firing")
            .await
            .is_some_and(|(_, v)| v["total"].as_u64() > Some(0))
    })
    .await;
    let (_, list) = s
        .api
        .get("/api/v1/fleet/incidents?state=firing")
        .await
        .unwrap();
    let incident = list["incidents"][0]["id"].as_str().unwrap().to_owned();
    b.goto(&format!("{}/dashboard/", s.base)).await;
    b.wait_until(
        "the incident badge",
        Duration::from_secs(10),
        "return document.querySelector('#nav-incidents .badge') !== null;",
    )
    .await;
    b.goto(&format!("{}/dashboard/incidents/{incident}", s.base))
        .await;
    b.fill("#ack-form input[name=reason]", "replacing the disk")
        .await;
    b.click("#ack-form button[type=submit]").await;
    wait_for("the acknowledgement", Duration::from_secs(10), || async {
        s.api
            .get(&format!("/api/v1/fleet/incidents/{incident}"))
            .await
            .is_some_and(|(_, v)| {
                v["incident"]["state"] == "acknowledged" || v["state"] == "acknowledged"
            })
    })
    .await;
    b.wait_until(
        "the reason on the page",
        Duration::from_secs(10),
        "return (document.querySelector('#ack-reason') || {}).innerText === 'replacing the disk';",
    )
    .await;

    // Details: facts, charts drawn from the series, the last errors in full.
    b.goto(&format!("{}/dashboard/servers/{id}?range=1h", s.base))
        .await;
    b.wait_until(
        "the charts",
        Duration::from_secs(15),
        "return document.querySelectorAll('figure[data-chart=response] svg, figure[data-chart=timeline] svg, figure[data-chart=resources] svg').length === 3;",
    )
    .await;
    assert!(b.text().await.contains("critical"), "the last errors");
    shots(&b, "details").await;

    // The CSP blocks an injected inline script; a hostile name renders as text.
    let blocked = b
        .js("const s = document.createElement('script'); s.textContent = 'window.__injected = 1'; document.body.appendChild(s); return window.__injected === undefined;")
        .await;
    assert_eq!(blocked, json!(true), "an inline script ran");
    let (status, v) = s
        .api
        .post(
            "/api/v1/fleet/servers",
            &json!({"name": XSS, "api_url": "http://127.0.0.1:9", "api_token": "t"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    b.goto(&format!("{}/dashboard/servers?q=__xss", s.base))
        .await;
    assert!(b.text().await.contains(XSS), "the name is shown as text");
    assert_eq!(
        b.js("return window.__xss === undefined;").await,
        json!(true),
        "the name ran"
    );

    b.close().await;
    s.server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_admin_action_forged_changes_are_refused_and_the_stream_recovers() {
    let _serial = SERIAL.lock().await;
    let mut s = stack(4, &[("FLEET_SSE_MAX_STREAMS", "1")]).await;
    let viewer = token(&s.url, "watcher", "viewer");
    let b = Browser::start(DESKTOP.0, DESKTOP.1).await;
    sign_in(&b, &s.base, &viewer).await;
    for path in [
        "/dashboard/",
        "/dashboard/servers",
        format!("/dashboard/servers/{}", s.ids[0]).as_str(),
        "/dashboard/groups",
        "/dashboard/incidents",
        "/dashboard/maintenance",
    ] {
        b.goto(&format!("{}{path}", s.base)).await;
        let admin_bits = b
            .js("return document.querySelectorAll('[data-method], [data-bulk], [data-window-for], form.api, #ov-workers').length;")
            .await;
        assert_eq!(admin_bits, json!(0), "{path}: a viewer sees admin actions");
    }
    // The server refuses a viewer's change anyway, even with the session's CSRF token.
    let refused = b
        .fetch_status(
            "/api/v1/fleet/groups",
            "{method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}, body: JSON.stringify({name: 'sneaky'})}",
        )
        .await;
    assert_eq!(refused, json!(403));
    b.close().await;

    // An admin session: a change without the CSRF token is refused, even same-site.
    let b = Browser::start(DESKTOP.0, DESKTOP.1).await;
    sign_in(&b, &s.base, ADMIN).await;
    let no_token = b
        .fetch_status(
            "/api/v1/fleet/groups",
            "{method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({name: 'forged'})}",
        )
        .await;
    assert_eq!(no_token, json!(403));
    // A form on another site posting to Fleet: the cookie stays home and nothing changes.
    let form = format!(
        "data:text/html,<form id=f method=post action='{}/dashboard/sign-out'><input name=csrf value=x></form><script>document.getElementById('f').submit()</script>",
        s.base
    );
    b.goto(&form).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.goto(&format!("{}/dashboard/groups", s.base)).await;
    assert!(
        b.js("return location.pathname;").await == json!("/dashboard/groups"),
        "the cross-site post signed the admin out"
    );
    let (_, groups) = s.api.get("/api/v1/fleet/groups").await.unwrap();
    assert!(!groups.to_string().contains("forged"));

    // The one stream allowed here is this page's: a second tab is refused one, says so, and
    // polls instead.
    b.goto(&format!("{}/dashboard/servers", s.base)).await;
    live(&b).await;
    let other = Browser::start(DESKTOP.0, DESKTOP.1).await;
    sign_in(&other, &s.base, ADMIN).await;
    other
        .wait_until(
            "the polling notice",
            Duration::from_secs(15),
            "const b = document.getElementById('live-status'); return !b.hidden && b.innerText.includes('refreshes every 30 s');",
        )
        .await;
    other.close().await;

    // The server goes away: the page says so; it comes back: the page reconnects by itself,
    // resumes from its last event id, and shows a change made while it was away.
    s.server.terminate();
    s.server.wait(Duration::from_secs(10));
    b.wait_until(
        "the lost-stream notice",
        Duration::from_secs(15),
        "const b = document.getElementById('live-status'); return !b.hidden && b.innerText.includes('Live updates lost');",
    )
    .await;
    s.fleet
        .set_behavior(s.fleet.servers()[1].name(), Behavior::Critical);
    s.server = serve(&s.url, &s.listen, &[("FLEET_SSE_MAX_STREAMS", "1")]);
    let id = &s.ids[1];
    b.wait_until(
        "the reconnected page to show the change",
        Duration::from_secs(40),
        &format!("const r = document.querySelector('tr[data-server-id=\"{id}\"] .health'); return document.getElementById('live-status').hidden && !!r && r.innerText.includes('critical');"),
    )
    .await;
    b.close().await;
    s.server.terminate();
}

/// The demo a newcomer runs: its printed URL and token sign in, and the page comes alive.
/// Its screenshots are the ones in docs/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_is_alive_within_a_minute() {
    let _serial = SERIAL.lock().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(fleet_tests::binary("fleet-server"));
    cmd.args(["demo", "--servers", "40"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_LISTEN", &listen)
        .env("FLEET_HEALTH_INTERVAL", "3");
    let demo = Proc::start(cmd);
    let mut url_token: Option<(String, String)> = None;
    wait_for(
        "the demo's dashboard URL and token",
        Duration::from_secs(30),
        || {
            let out = demo.stdout();
            let url = out.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("Dashboard: ")
                    .map(|r| r.split_whitespace().next().unwrap_or_default().to_owned())
            });
            let tok = out.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("Admin token (shown once): ")
                    .map(str::to_owned)
            });
            let found = url.zip(tok);
            let done = found.is_some();
            url_token = found;
            async move { done }
        },
    )
    .await;
    let (url, token) = url_token.unwrap();
    let base = url.trim_end_matches("/dashboard/").to_owned();
    let b = Browser::start(DESKTOP.0, DESKTOP.1).await;
    sign_in(&b, &base, &token).await;
    live(&b).await;
    // Alive: a change of health arrives on the open page as a toast, within a minute.
    b.wait_until(
        "a live change on the demo's page",
        Duration::from_secs(60),
        "return document.getElementById('toasts').children.length > 0;",
    )
    .await;
    b.screenshot("demo-overview").await;
    b.goto(&format!("{base}/dashboard/servers?sort=-health"))
        .await;
    b.screenshot("demo-servers").await;
    let first: Value = b.js("const a = document.querySelector('tr[data-server-id] td a'); return a ? a.getAttribute('href') : null;").await;
    b.goto(&format!("{base}{}?range=1h", first.as_str().unwrap()))
        .await;
    b.wait_until(
        "the demo's charts",
        Duration::from_secs(15),
        "return document.querySelectorAll('figure[data-chart=response] svg').length === 1;",
    )
    .await;
    b.screenshot("demo-details").await;
    b.close().await;
    demo.terminate();
}
