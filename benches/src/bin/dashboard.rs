//! The dashboard's benchmark (docs/benchmarks.md): page latency, first paint and page weight at
//! 100,000 registered servers, and what idle live streams cost.
//!
//! Run with `scripts/bench-dashboard` (builds the release binaries, starts PostgreSQL). It
//! seeds the registry with SQL (100,000 servers, 30 checks each), starts the release
//! `fleet-server serve` on it with every feature on, waits for its first health cycle over
//! the whole fleet (every server answers "connection refused"; the next cycle may run during
//! the measurement, as it would for a user), then measures:
//! - each page's latency over 200 sequential requests on loopback, signed in with a cookie;
//! - first contentful paint in headless Chromium (1280×800), 5 loads of each page;
//! - page weight: the HTML, script and stylesheet as sent (gzip);
//! - the server's CPU time over 10 s with 100 idle streams open, against 10 s without.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_pg::testing::TestDb;
use fleet_tests::browser::Browser;
use fleet_tests::{Proc, SECRET_KEY, binary_in, cpu_seconds, free_port};

const ADMIN: &str = "bootstrap-admin-token-benchmark-01";

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("benchmark path");
    let target = exe.parent().and_then(Path::parent).expect("target folder");
    binary_in(
        &target.join("release"),
        "fleet-server",
        "cargo build --release --bins (scripts/bench-dashboard does)",
    )
}

async fn seed(db: &TestDb, servers: i64) {
    let store = db.store(std::sync::Arc::new(fleet_core::SystemClock)).await;
    store.ensure_partitions().await.expect("partitions");
    let client = store.pool().get().await.expect("connection");
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO managed_servers (id, name, hostname, api_url, region, environment, tags, \
             health_status, last_seen_at, last_health_check_at, last_response_time_ms, last_error) \
             SELECT gen_random_uuid(), 'srv-' || lpad(i::text, 6, '0'), 'srv-' || i || '.fleet.internal', \
             'http://127.0.0.1:9', (ARRAY['eu-west','eu-north','us-east','us-west','ap-south'])[1 + i % 5], \
             (ARRAY['production','staging'])[1 + i % 2], jsonb_build_array('tier-' || (i % 3)), \
             (ARRAY['healthy','healthy','healthy','healthy','degraded','critical','unreachable'])[1 + i % 7], \
             now() - (i % 300) * interval '1 second', now(), 5 + i % 200, \
             CASE WHEN i % 7 >= 4 THEN 'HTTP 503' END \
             FROM generate_series(1, $1::bigint) i",
            &[&servers],
        )
        .await
        .expect("seed servers");
    client
        .execute(
            "INSERT INTO server_health_checks (server_id, timestamp, status, response_time_ms, successful) \
             SELECT id, now() - k * interval '30 seconds', health_status, last_response_time_ms + k, \
             health_status <> 'unreachable' FROM managed_servers, generate_series(1, 30) k",
            &[],
        )
        .await
        .expect("seed checks");
    client.batch_execute("ANALYZE").await.expect("analyze");
    println!(
        "seeded {servers} servers and {} checks in {:.1} s",
        servers * 30,
        started.elapsed().as_secs_f64()
    );
}

struct Http {
    client: reqwest::Client,
    base: String,
    cookie: String,
}

impl Http {
    async fn sign_in(base: &str) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let res = client
            .post(format!("{base}/dashboard/sign-in"))
            .header("origin", base)
            .form(&[("token", ADMIN)])
            .send()
            .await
            .expect("sign in");
        assert_eq!(res.status(), 303, "sign-in failed");
        let cookie = res.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        Self {
            client,
            base: base.to_owned(),
            cookie,
        }
    }

    /// Milliseconds for one GET, and the bytes it carried.
    async fn get(&self, path: &str, gzip: bool) -> (f64, usize) {
        let started = Instant::now();
        let mut req = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie);
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let res = req.send().await.expect("request");
        assert!(res.status().is_success(), "{path}: {}", res.status());
        let body = res.bytes().await.expect("body");
        (started.elapsed().as_secs_f64() * 1e3, body.len())
    }
}

#[tokio::main]
async fn main() {
    let servers: i64 = std::env::args()
        .skip_while(|a| a != "--servers")
        .nth(1)
        .map_or(100_000, |v| v.parse().expect("--servers N"));
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let bin = server_binary();
    let env = |cmd: &mut Command| {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &url)
            .env("FLEET_SECRET_KEY", SECRET_KEY)
            .env("FLEET_ADMIN_TOKEN", ADMIN);
    };
    let mut migrate = Command::new(&bin);
    migrate.arg("migrate");
    env(&mut migrate);
    assert!(migrate.status().unwrap().success(), "migrate");
    seed(&db, servers).await;

    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(&bin);
    cmd.arg("serve");
    env(&mut cmd);
    cmd.env("FLEET_LISTEN", &listen)
        .env("FLEET_LOG", "warn")
        .env("FLEET_HEALTH_INTERVAL", "120")
        .env("FLEET_METRICS_INTERVAL", "240");
    let server = Proc::start(cmd);
    let base = format!("http://{listen}");
    let api = fleet_tests::Client::new(base.clone(), Some(ADMIN.to_owned()));
    let started = Instant::now();
    loop {
        let cycles = api
            .get("/api/v1/fleet/workers/status")
            .await
            .and_then(|(_, v)| v["health_worker"]["cycles"].as_u64())
            .unwrap_or(0);
        if cycles >= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no health cycle in 5 min: {}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "first health cycle over {servers} servers done after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let http = Http::sign_in(&base).await;
    let (_, list) = api
        .get("/api/v1/fleet/servers?limit=1&search=srv-050000")
        .await
        .unwrap();
    let one = list["servers"][0]["id"].as_str().unwrap().to_owned();
    let pages = [
        ("overview", "/dashboard/".to_owned()),
        ("servers, first page", "/dashboard/servers".to_owned()),
        (
            "servers, page 200 (the deepest)",
            "/dashboard/servers?page=200".to_owned(),
        ),
        (
            "servers, search",
            "/dashboard/servers?q=srv-0123".to_owned(),
        ),
        (
            "servers, filtered, worst first",
            "/dashboard/servers?region=eu-west&health=critical&sort=-health".to_owned(),
        ),
        ("server details", format!("/dashboard/servers/{one}")),
        (
            "health series, 30 d",
            format!("/api/v1/fleet/servers/{one}/health-series?range=30d"),
        ),
    ];
    println!("\n| page | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    for (name, path) in &pages {
        for _ in 0..20 {
            http.get(path, false).await;
        }
        let mut ms = Vec::new();
        for _ in 0..200 {
            ms.push(http.get(path, false).await.0);
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            percentile(&ms, 50.0),
            percentile(&ms, 99.0),
            percentile(&ms, 100.0)
        );
    }

    // Page weight, as sent.
    let html = http.get("/dashboard/", true).await.1;
    let page = reqwest::get(format!("{base}/dashboard/sign-in"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let asset = |name: &str| {
        page.split('"')
            .find(|s| s.starts_with("/dashboard/assets/") && s.ends_with(name))
            .map(str::to_owned)
    };
    let css = asset("app.css").expect("stylesheet link");
    let js = format!("{}app.js", &css[..css.len() - "app.css".len()]);
    let (css_bytes, js_bytes) = (http.get(&css, true).await.1, http.get(&js, true).await.1);
    let (css_raw, js_raw) = (http.get(&css, false).await.1, http.get(&js, false).await.1);
    println!(
        "\npage weight (gzip): overview HTML {html} B, app.js {js_bytes} B ({js_raw} B raw), \
         app.css {css_bytes} B ({css_raw} B raw); total {} B",
        html + js_bytes + css_bytes
    );

    // First contentful paint in a real browser.
    let browser = Browser::start(1280, 800).await;
    browser.goto(&format!("{base}/dashboard/sign-in")).await;
    browser.fill("input[name=token]", ADMIN).await;
    browser.click("form button[type=submit]").await;
    println!("\n| page | first contentful paint, median ms | max ms |\n|---|---|---|");
    for (name, path) in pages.iter().take(2) {
        let mut fcp = Vec::new();
        for _ in 0..5 {
            browser.goto(&format!("{base}{path}")).await;
            browser
                .wait_until(
                    "a paint",
                    Duration::from_secs(10),
                    "return performance.getEntriesByName('first-contentful-paint').length > 0;",
                )
                .await;
            let v = browser
                .js("return performance.getEntriesByName('first-contentful-paint')[0].startTime;")
                .await;
            fcp.push(v.as_f64().unwrap_or(f64::NAN));
        }
        println!(
            "| {name} | {:.0} | {:.0} |",
            percentile(&fcp, 50.0),
            percentile(&fcp, 100.0)
        );
    }
    browser.close().await;

    // Idle streams: CPU over 10 s without, then with 100 open.
    let pid = server.id();
    let quiet = |secs: u64| async move {
        let before = cpu_seconds(pid);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        cpu_seconds(pid) - before
    };
    let without = quiet(10).await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let res = http
            .client
            .get(format!("{base}/api/v1/fleet/events"))
            .header("cookie", &http.cookie)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("open a stream");
        assert_eq!(res.status(), 200);
        streams.push(res);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = quiet(10).await;
    println!(
        "\nserver CPU over 10 s: {:.3} s without streams, {:.3} s with 100 idle streams open",
        without, with
    );
    drop(streams);
    server.terminate();
    println!("peak RSS of fleet-server: {:.0} MiB", server.peak_rss_mib());
}
