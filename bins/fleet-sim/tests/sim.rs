//! fleet-sim over real sockets: control API, counters, Prometheus text, manifest.

use std::sync::Arc;
use std::time::Duration;

use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request with `Connection: close`; the status and body.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if rest.len() >= len {
                    break;
                }
            }
        }
    })
    .await
    .expect("answer within 5 s");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn servers_count_requests_and_change_behaviour_through_the_control_api() {
    let fleet = Arc::new(
        SimFleet::start(SimConfig {
            count: 3,
            mix: "healthy=1".parse::<Mix>().unwrap(),
            seed: 3,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let control = fleet
        .serve_control("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .to_string();
    let s = fleet.servers()[0].clone();
    let addr = s.api_url().trim_start_matches("http://").to_owned();

    let (code, body) = call(&addr, "GET", "/health", Some(s.token()), "").await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""database":{"status":"ok"}"#), "{body}");
    assert_eq!(
        call(&addr, "GET", "/health", Some("wrong"), "").await.0,
        401
    );
    let (code, metrics) = call(&addr, "GET", "/api/v1/metrics/current", Some(s.token()), "").await;
    assert_eq!(code, 200);
    let values = fleet_wire::parse_metrics(metrics.as_bytes()).unwrap();
    assert!(values.total_services.is_some());
    let (code, prom) = call(&addr, "GET", "/metrics", None, "").await;
    assert_eq!(code, 200);
    assert!(
        prom.contains(&format!("sim_up{{server=\"{}\"}} 1", s.name())),
        "{prom}"
    );
    assert!(prom.contains("# TYPE sim_llm_requests_total counter"));

    let stats = s.stats();
    assert_eq!(
        (
            stats.requests,
            stats.health_requests,
            stats.open,
            stats.max_open
        ),
        (4, 2, 0, 1)
    );

    let path = format!("/servers/{}/behavior", s.name());
    let (code, _) = call(&control, "PUT", &path, None, "critical").await;
    assert_eq!(code, 200);
    assert_eq!(s.behavior(), Behavior::Critical);
    let (_, body) = call(&addr, "GET", "/health", Some(s.token()), "").await;
    assert!(body.contains(r#""database":{"status":"down"}"#), "{body}");
    assert_eq!(call(&control, "PUT", &path, None, "sick").await.0, 400);
    assert_eq!(
        call(&control, "PUT", "/servers/nobody/behavior", None, "healthy")
            .await
            .0,
        404
    );

    // Unreachable closes the port; back to healthy opens it again.
    fleet.set_behavior(s.name(), Behavior::Unreachable);
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the port still listens");
    fleet.set_behavior(s.name(), Behavior::Healthy);
    let mut back = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "the port did not come back");

    let (code, body) = call(&control, "GET", "/servers", None, "").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["servers"].as_array().unwrap().len(), 3);
    let (_, manifest) = call(&control, "GET", "/manifest", None, "").await;
    let m: fleet_sim::Manifest = serde_json::from_str(&manifest).unwrap();
    assert_eq!(m.servers.len(), 3);
    assert_eq!(m.servers[0].api_token, s.token());
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_hung_request_stays_open_until_the_client_gives_up() {
    let fleet = SimFleet::start(SimConfig {
        count: 1,
        mix: Mix::all(Behavior::Hang),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = &fleet.servers()[0];
    let addr = s.api_url().trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        s.token()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    for _ in 0..200 {
        if s.stats().open == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.stats().open, 1);
    drop(c);
    for _ in 0..200 {
        if s.stats().open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        s.stats().open,
        0,
        "a dropped connection still counts as open"
    );
    fleet.shutdown().await;
}
