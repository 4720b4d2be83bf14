//! Attacks on the real binary over loopback: floods of idle and half-sent connections under a
//! low open-file limit must not blind the fleet.

use std::process::Command;
use std::time::{Duration, Instant};

use fleet_pg::testing::TestDb;
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use fleet_tests::{Client, Proc, binary, free_port, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "bootstrap-admin-token-hardening-0123456789";

async fn count(db_url: &str, sql: &str) -> i64 {
    let pool = fleet_pg::PgSettings::from_url(db_url).pool().unwrap();
    let client = pool.get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Reads until the server closes the connection, at most `limit`; what it sent.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + limit;
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_under_a_low_file_limit_does_not_blind_the_fleet() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let fleet = SimFleet::start(SimConfig {
        count: 10,
        mix: Mix::all(Behavior::Healthy),
        ..Default::default()
    })
    .await
    .unwrap();
    let manifest = std::env::temp_dir().join(format!("fleet-hard-{}.json", free_port()));
    std::fs::write(&manifest, serde_json::to_string(&fleet.manifest()).unwrap()).unwrap();
    let mut setup = fleet_tests::server_cmd(&url, &["migrate"]);
    assert!(setup.output().unwrap().status.success());
    fleet_tests::import(fleet_tests::server_cmd(&url, &[]), &manifest);
    let _ = std::fs::remove_file(&manifest);

    // 256 files in all, soft and hard: the probes' budget leaves the API 80 connections.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"])
        .arg(binary("fleet-server"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &url)
        .env("FLEET_SECRET_KEY", fleet_tests::SECRET_KEY)
        .env("FLEET_ADMIN_TOKEN", ADMIN)
        .env("FLEET_LISTEN", &listen)
        .env("FLEET_LOG", "info")
        .env("FLEET_HEALTH_INTERVAL", "0.5")
        .env("FLEET_HEALTH_TIMEOUT", "0.4")
        .env("FLEET_HEALTH_MAX_IN_FLIGHT", "32")
        .env("FLEET_METRICS_INTERVAL", "1")
        .env("FLEET_METRICS_TIMEOUT", "0.4")
        .env("FLEET_METRICS_MAX_IN_FLIGHT", "16")
        .env("FLEET_API_HEADER_TIMEOUT", "2")
        .env("FLEET_API_BODY_TIMEOUT", "2")
        .env("FLEET_SHUTDOWN_GRACE", "2");
    let mut server = Proc::start(cmd);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the first cycles", Duration::from_secs(20), || async {
        api.get("/api/v1/fleet/workers/status")
            .await
            .is_some_and(|(c, v)| c == 200 && v["health_worker"]["cycles"].as_u64() >= Some(2))
    })
    .await;
    let logs = server.stderr();
    assert!(
        logs.contains("open-file limit: soft 256 raised to 256 (hard 256)"),
        "{logs}"
    );
    assert!(logs.contains("API connections capped at 80"), "{logs}");

    // 300 clients send headers without their final blank line, and hold on.
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect(&listen).await {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
            held.push(s);
        }
    }
    let written = || count(&url, "SELECT count(*) FROM server_health_checks");
    let before = written().await;
    // Probes keep succeeding while the flood is held, and nothing is stored as unreachable.
    wait_for(
        "probes during the flood",
        Duration::from_secs(10),
        || async { written().await >= before + 30 },
    )
    .await;
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM server_health_checks WHERE status <> 'healthy'"
        )
        .await,
        0,
        "a check was stored as anything but healthy during the flood"
    );
    // Every held connection is closed: the excess at once, the rest at the header timeout.
    let started = Instant::now();
    for s in &mut held {
        assert!(
            until_closed(s, Duration::from_secs(10)).await.is_some(),
            "a half-sent request held its connection past the header timeout"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(held);

    // 100 KB of headers is refused at 64 KiB, not buffered.
    let mut s = TcpStream::connect(&listen).await.unwrap();
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        head.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "p".repeat(40)).as_bytes());
    }
    let _ = s.write_all(&head).await;
    let answer = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the connection was closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // An authenticated POST promising 5 bytes and sending 2 gets 408 at the body timeout.
    let mut s = TcpStream::connect(&listen).await.unwrap();
    s.write_all(
        format!(
            "POST /api/v1/fleet/groups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: 5\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the connection was closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // The API answers again, and says what it refused.
    let (code, metrics) = api.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap();
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fleet_api_connections_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 200, "{refused} refused of 300 held");
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM managed_servers WHERE health_status <> 'healthy'"
        )
        .await,
        0
    );
    server.terminate();
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    fleet.shutdown().await;
}
