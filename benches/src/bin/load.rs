//! The load benchmark: fleet-sim and fleet-server as processes of their own, against the
//! throwaway PostgreSQL, for a sweep of fleet sizes, a fleet with hung servers, and the seed
//! design's settings as the baseline. Prints a table and appends it to docs/benchmarks.md.
//!
//! `scripts/bench-load` (builds the release binaries and starts PostgreSQL), or with
//! `DATABASE_URL` set: `cargo run --release -p fleet-benches --bin load -- [--sizes 1000,5000]`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_pg::testing::TestDb;
use fleet_tests::{
    SECRET_KEY as KEY, binary_in, cpu_seconds, free_port, import, peak_rss_mib, terminate,
};
use serde_json::Value;

const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const MIX: &str = "healthy=95,degraded=2,critical=1,unreachable=1,slow=1";
const MIX_HANG: &str = "healthy=94,degraded=2,critical=1,unreachable=1,slow=1,hang=1";

/// Fleet's settings for fleets of thousands: bigger batches started closer together.
const FLEET_SETTINGS: &[(&str, &str)] = &[
    ("FLEET_HEALTH_BATCH_SIZE", "200"),
    ("FLEET_HEALTH_BATCH_DELAY", "0.05"),
    ("FLEET_HEALTH_MAX_IN_FLIGHT", "512"),
    ("FLEET_METRICS_BATCH_SIZE", "100"),
    ("FLEET_METRICS_BATCH_DELAY", "0.1"),
    ("FLEET_METRICS_MAX_IN_FLIGHT", "256"),
];

/// The seed design's settings: batches of 10, 0.5 s apart, held fixed; its 30 s timeout equals
/// its interval, which Fleet refuses, so 29 s.
const SEED_SETTINGS: &[(&str, &str)] = &[
    ("FLEET_HEALTH_BATCH_SIZE", "10"),
    ("FLEET_HEALTH_BATCH_DELAY", "0.5"),
    ("FLEET_FIXED_BATCH_DELAY", "true"),
    ("FLEET_HEALTH_TIMEOUT", "29"),
    ("FLEET_METRICS_BATCH_SIZE", "5"),
    ("FLEET_METRICS_BATCH_DELAY", "1.0"),
];

struct Scenario {
    label: String,
    servers: usize,
    mix: &'static str,
    settings: Vec<(&'static str, &'static str)>,
    health_cycles: u64,
    metrics_cycles: u64,
    /// Right after Fleet's run, Prometheus scrapes the same simulated servers at the same
    /// interval for the same time.
    peer: bool,
}

/// What Prometheus cost over its run.
struct Peer {
    window: f64,
    scrapes: f64,
    cpu_seconds: f64,
    peak_rss_mb: f64,
}

/// Debian's Prometheus.
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Scrapes Prometheus has timed so far (one per scrape after each target's first).
async fn scrapes(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("prometheus_target_interval_length_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Runs Prometheus over the manifest's servers, scraping `/metrics` every `interval` seconds,
/// for `seconds` after one interval of warm-up; `None` when it is not installed.
async fn prometheus_peer(manifest: &Path, dir: &Path, interval: f64, seconds: f64) -> Option<Peer> {
    if !Path::new(PROMETHEUS).exists() {
        eprintln!(
            "{PROMETHEUS} not found: no peer row (scripts/bench-load installs Debian's prometheus)"
        );
        return None;
    }
    let text = std::fs::read_to_string(manifest).ok()?;
    let manifest: Value = serde_json::from_str(&text).ok()?;
    let targets: Vec<String> = manifest["servers"]
        .as_array()?
        .iter()
        .filter_map(|s| s["api_url"].as_str())
        .map(|u| {
            u.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    // JSON is YAML: the configuration is written as JSON.
    let config = serde_json::json!({
        "global": {"scrape_interval": format!("{interval}s"), "scrape_timeout": "10s"},
        "scrape_configs": [{"job_name": "fleet-sim", "metrics_path": "/metrics",
                            "static_configs": [{"targets": targets}]}]
    });
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config.to_string()).ok()?;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut prom = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = prom.id();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .ok()?;
    let ready = Instant::now() + Duration::from_secs(60);
    while scrapes(&http, &base).await.is_none() {
        if Instant::now() > ready {
            let _ = terminate(&mut prom, Duration::from_secs(10));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every target's first scrape falls somewhere in the first interval.
    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    let (s0, c0, t0) = (
        scrapes(&http, &base).await?,
        cpu_seconds(pid),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let (s1, c1) = (scrapes(&http, &base).await?, cpu_seconds(pid));
    let peer = Peer {
        window: t0.elapsed().as_secs_f64(),
        scrapes: s1 - s0,
        cpu_seconds: c1 - c0,
        peak_rss_mb: peak_rss_mib(pid),
    };
    let _ = terminate(&mut prom, Duration::from_secs(20));
    Some(peer)
}

#[derive(Default)]
struct Outcome {
    health_durations: Vec<f64>,
    metrics_durations: Vec<f64>,
    cpu_seconds: f64,
    checks: u64,
    window: f64,
    written: u64,
    peak_rss_mb: f64,
    max_pending_at_cycle_end: u64,
    dropped: u64,
    latency_ms: Vec<f64>,
    metrics_ms: Vec<f64>,
    summary_ms: Vec<f64>,
    exit_code: Option<i32>,
    /// Stored health checks of one server less than 0.9 x interval apart.
    duplicates: i64,
    /// The longest time between two stored checks of one server, in seconds.
    longest_gap: f64,
    /// Deadlocks PostgreSQL detected in the run's database.
    deadlocks: i64,
    /// Prometheus on the same servers right after, when the scenario asks for it.
    peer: Option<Peer>,
}

fn binary(target: &Path, name: &str) -> PathBuf {
    binary_in(
        &target.join("release"),
        name,
        "cargo build --release --bins (scripts/bench-load does)",
    )
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

async fn status(http: &reqwest::Client, base: &str) -> Option<Value> {
    let res = http
        .get(format!("{base}/api/v1/fleet/workers/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    res.json().await.ok()
}

async fn run(scenario: &Scenario, target: &Path, db_url: &str) -> Outcome {
    let db = TestDb::create_on(db_url).await;
    let url = db.settings.url.clone().expect("url");
    let dir = std::env::temp_dir().join(format!("fleet-load-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let manifest = dir.join("manifest.json");
    let spread = scenario.servers.div_ceil(8_000).max(1);
    let mut sim = Command::new(binary(target, "fleet-sim"))
        .args([
            "--count",
            &scenario.servers.to_string(),
            "--mix",
            scenario.mix,
            "--seed",
            "7",
        ])
        .args([
            "--per-process",
            "5000",
            "--spread",
            &spread.to_string(),
            "--manifest",
        ])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet-sim");
    let mut line = String::new();
    BufReader::new(sim.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("fleet-sim ready line");
    assert!(line.starts_with("ready"), "fleet-sim did not start: {line}");

    let server_bin = binary(target, "fleet-server");
    let base_cmd = |args: &[&str]| {
        let mut c = Command::new(&server_bin);
        c.args(args)
            .env("DATABASE_URL", &url)
            .env("FLEET_SECRET_KEY", KEY)
            .env("FLEET_LOG", "warn");
        c
    };
    assert!(
        base_cmd(&["migrate"])
            .output()
            .expect("migrate")
            .status
            .success()
    );
    import(base_cmd(&[]), &manifest);

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = base_cmd(&["serve"]);
    cmd.env("FLEET_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLEET_ADMIN_TOKEN", TOKEN);
    for (k, v) in &scenario.settings {
        cmd.env(k, v);
    }
    let mut server = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet-server");
    let pid = server.id();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .expect("client");
    let mut o = Outcome::default();
    let deadline = Instant::now() + Duration::from_secs(30 * (scenario.health_cycles + 2) + 120);
    let (mut seen_h, mut seen_m) = (0u64, 0u64);
    let mut window_start: Option<(Instant, f64, u64, u64)> = None;
    let mut latency_done = false;
    loop {
        assert!(
            Instant::now() < deadline,
            "{}: the cycles did not complete in time",
            scenario.label
        );
        let Some(s) = status(&http, &base).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let h = &s["health_worker"];
        let m = &s["metrics_worker"];
        let hc = h["cycles"].as_u64().unwrap_or(0);
        let mc = m["cycles"].as_u64().unwrap_or(0);
        if hc > seen_h {
            seen_h = hc;
            o.health_durations
                .push(h["last_duration_seconds"].as_f64().unwrap_or(f64::NAN));
            o.max_pending_at_cycle_end = o
                .max_pending_at_cycle_end
                .max(h["results_pending"].as_u64().unwrap_or(0));
            if window_start.is_none() {
                let done = h["checks_performed"].as_u64().unwrap_or(0)
                    + m["collections_performed"].as_u64().unwrap_or(0);
                let written = h["results_written"].as_u64().unwrap_or(0)
                    + m["results_written"].as_u64().unwrap_or(0);
                window_start = Some((Instant::now(), cpu_seconds(pid), done, written));
            }
        }
        if mc > seen_m && m["last_cycle_targets"].as_u64().unwrap_or(0) > 0 {
            o.metrics_durations
                .push(m["last_duration_seconds"].as_f64().unwrap_or(f64::NAN));
        }
        seen_m = mc;
        // The status endpoint's latency, measured while a health cycle runs.
        // The same for /metrics and /summary, which count the fleet.
        if !latency_done && hc >= 1 && h["in_flight"].as_u64().unwrap_or(0) > 0 {
            for (path, into) in [
                ("/api/v1/fleet/workers/status", &mut o.latency_ms),
                ("/metrics", &mut o.metrics_ms),
                ("/api/v1/fleet/summary", &mut o.summary_ms),
            ] {
                for _ in 0..200 {
                    let t = Instant::now();
                    let ok = http
                        .get(format!("{base}{path}"))
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        into.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            latency_done = true;
        }
        if seen_h >= scenario.health_cycles
            && o.metrics_durations.len() as u64 >= scenario.metrics_cycles
        {
            if let Some((t0, cpu0, done0, written0)) = window_start {
                let done = h["checks_performed"].as_u64().unwrap_or(0)
                    + m["collections_performed"].as_u64().unwrap_or(0);
                let written = h["results_written"].as_u64().unwrap_or(0)
                    + m["results_written"].as_u64().unwrap_or(0);
                o.window = t0.elapsed().as_secs_f64();
                o.cpu_seconds = cpu_seconds(pid) - cpu0;
                o.checks = done - done0;
                o.written = written - written0;
            }
            o.dropped = h["results_dropped"].as_u64().unwrap_or(0)
                + m["results_dropped"].as_u64().unwrap_or(0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    o.peak_rss_mb = peak_rss_mib(pid);
    o.exit_code = terminate(&mut server, Duration::from_secs(20));
    if scenario.peer {
        eprintln!(
            "running: Prometheus on the same {} servers",
            scenario.servers
        );
        o.peer = prometheus_peer(&manifest, &dir, 30.0, o.window).await;
    }
    let _ = terminate(&mut sim, Duration::from_secs(10));
    // Once per interval, never early: the gaps between each server's stored checks.
    let interval: f64 = scenario
        .settings
        .iter()
        .find(|(k, _)| *k == "FLEET_HEALTH_INTERVAL")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(30.0);
    let pool = db.settings.pool().expect("pool");
    let client = pool.get().await.expect("connection");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE gap < 0.9 * $1::float8), coalesce(max(gap), 0) FROM (
                 SELECT extract(epoch FROM timestamp - lag(timestamp)
                        OVER (PARTITION BY server_id ORDER BY timestamp))::float8 AS gap
                 FROM server_health_checks WHERE NOT manual) g",
            &[&interval],
        )
        .await
        .expect("gaps");
    o.duplicates = row.get(0);
    o.longest_gap = row.get(1);
    o.deadlocks = client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("deadlocks")
        .get(0);
    let _ = std::fs::remove_dir_all(&dir);
    o
}

/// Prometheus's version line, e.g. `2.42.0`.
fn prometheus_version() -> String {
    Command::new(PROMETHEUS)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split_whitespace().nth(2).map(str::to_owned)
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1048576.0);
    format!("{cores} cores ({cpu}), {mem:.0} GiB")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(db_url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "set DATABASE_URL, or run scripts/bench-load, which starts a throwaway PostgreSQL"
        );
        std::process::exit(2);
    };
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 5_000, 10_000, 20_000]);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"));

    let fleet = |servers: usize, mix: &'static str, label: &str, health_cycles: u64| Scenario {
        label: label.to_owned(),
        servers,
        mix,
        settings: FLEET_SETTINGS.to_vec(),
        health_cycles,
        metrics_cycles: 1,
        peer: false,
    };
    let mut scenarios = vec![Scenario {
        label: "seed settings, 1,000".into(),
        servers: 1_000,
        mix: MIX,
        settings: SEED_SETTINGS.to_vec(),
        health_cycles: 1,
        metrics_cycles: 0,
        peer: false,
    }];
    // `--defaults`: every setting at its default, the batches too (the engine paces itself).
    let defaults = args.iter().any(|a| a == "--defaults");
    for &n in &sizes {
        let mut s = fleet(n, MIX, &format!("Fleet, {n}"), 3);
        s.peer = n == 10_000;
        if defaults {
            s.label = format!("Fleet defaults, {n}");
            s.settings = Vec::new();
        }
        scenarios.push(s);
    }
    if sizes.contains(&10_000) {
        scenarios.push(fleet(10_000, MIX_HANG, "Fleet, 10,000, 1% hanging", 3));
    }

    let mut rows = Vec::new();
    for s in &scenarios {
        eprintln!("running: {} ({} servers)", s.label, s.servers);
        let o = run(s, &target, &db_url).await;
        rows.push((s, o));
    }

    let mut table = String::new();
    table.push_str("| scenario | servers | health cycle median / max (s) | metrics cycle median / max (s) | checks/s in a cycle | CPU µs per check | peak RSS (MB) | rows written/s | pending at cycle end (max) | dropped | status p50 / p99 (ms) | /metrics p50 / p99 (ms) | /summary p50 / p99 (ms) | checks < 0.9 × interval apart | longest gap between a server's checks (s) | exit |\n");
    table.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (s, o) in &rows {
        let checks_per_s = s.servers as f64 / median(&o.health_durations);
        let cpu_us = if o.checks > 0 {
            o.cpu_seconds * 1e6 / o.checks as f64
        } else {
            f64::NAN
        };
        let rows_per_s = if o.window > 0.0 {
            o.written as f64 / o.window
        } else {
            f64::NAN
        };
        table.push_str(&format!(
            "| {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {:.1} | {} |\n",
            s.label,
            s.servers,
            median(&o.health_durations),
            max(&o.health_durations),
            median(&o.metrics_durations),
            max(&o.metrics_durations),
            checks_per_s,
            cpu_us,
            o.peak_rss_mb,
            rows_per_s,
            o.max_pending_at_cycle_end,
            o.dropped,
            median(&o.latency_ms),
            percentile(&o.latency_ms, 99.0),
            median(&o.metrics_ms),
            percentile(&o.metrics_ms, 99.0),
            median(&o.summary_ms),
            percentile(&o.summary_ms, 99.0),
            o.duplicates,
            o.longest_gap,
            o.exit_code.map_or("killed".into(), |c| c.to_string()),
        ));
    }
    let seed = rows
        .iter()
        .find(|(s, _)| s.label.starts_with("seed"))
        .map(|(_, o)| median(&o.health_durations));
    let fleet_1k = rows
        .iter()
        .find(|(s, _)| s.label == "Fleet, 1000")
        .map(|(_, o)| median(&o.health_durations));
    let ratio = match (seed, fleet_1k) {
        (Some(a), Some(b)) if b > 0.0 => format!(
            "At 1,000 servers the seed's settings take {a:.1} s a cycle and Fleet's {b:.2} s: {:.0}× faster.",
            a / b
        ),
        _ => "No 1,000-server pair in this run.".into(),
    };
    let deadlocks: Vec<String> = rows
        .iter()
        .map(|(s, o)| format!("{}: {}", s.label, o.deadlocks))
        .collect();
    let ratio = format!(
        "{ratio} Deadlocks PostgreSQL detected: {}.",
        deadlocks.join(", ")
    );
    let mut peers = String::new();
    for (s, o) in &rows {
        let Some(p) = &o.peer else { continue };
        let fleet_us = o.cpu_seconds * 1e6 / o.checks.max(1) as f64;
        peers.push_str(&format!(
            "\n| {} servers, 30 s interval | window (s) | requests | CPU µs per request | peak RSS (MB) |\n|---|---:|---:|---:|---:|\n\
             | Fleet (checks and collections, every setting but the batches at its default) | {:.0} | {} | {fleet_us:.0} | {:.0} |\n\
             | Prometheus {} (`/metrics` scrapes of the same servers, right after) | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            s.servers,
            o.window,
            o.checks,
            o.peak_rss_mb,
            prometheus_version(),
            p.window,
            p.scrapes,
            p.cpu_seconds * 1e6 / p.scrapes.max(1.0),
            p.peak_rss_mb,
        ));
    }
    let ratio = format!("{ratio}\n{peers}");
    println!("{table}\n{ratio}");

    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&workspace)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = time::OffsetDateTime::now_utc().date();
    let settings: Vec<String> = if defaults {
        vec!["every one at its default, the batches too".to_owned()]
    } else {
        FLEET_SETTINGS
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    };
    let section = format!(
        "\n### Load run {date}, commit {commit}\n\nMachine: {}. Command: `scripts/bench-load` (sizes {}).\n\
         Fleet's settings: {} (intervals, timeouts and the rest at their defaults, \
         so FLEET_HTTP_IDLE_PER_HOST=0: no idle connections kept). Mix: {MIX}; the hanging run: {MIX_HANG}.\n\n{table}\n{ratio}\n",
        machine(),
        sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        settings.join(", "),
    );
    let doc = workspace.join("docs/benchmarks.md");
    let mut text = std::fs::read_to_string(&doc).unwrap_or_default();
    text.push_str(&section);
    std::fs::write(&doc, text).expect("write docs/benchmarks.md");
    eprintln!("appended to {}", doc.display());
}
