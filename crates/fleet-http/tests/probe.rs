//! The probe and collector over real sockets on 127.0.0.1, against fleet-sim and in-test servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::{
    ApiToken, CollectError, HealthProbe, HealthStatus, MetricsCollector, ProbeOutcome, ProbeTarget,
    ServerId, health_check,
};
use fleet_http::{HttpCollector, HttpConfig, HttpProbe, StaticResolver};
use fleet_sim::{Behavior, Mix, SimConfig, SimFleet};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_millis(1500);

fn target(name: &str, api_url: &str, token: Option<&str>) -> ProbeTarget {
    ProbeTarget {
        checked_ago: None,
        fence: None,
        id: ServerId::new(),
        name: name.into(),
        api_url: api_url.into(),
        token: token.map(ApiToken::new),
        unreadable_token: None,
        health: None,
        kind: Default::default(),
        metrics_path: None,
        ca_cert: None,
    }
}

async fn fleet(behaviors: &[Behavior]) -> SimFleet {
    let config = SimConfig {
        count: behaviors.len(),
        mix: Mix::all(Behavior::Healthy),
        slow: (Duration::from_millis(50), Duration::from_millis(100)),
        ..Default::default()
    };
    let fleet = SimFleet::start(config).await.unwrap();
    for (s, b) in fleet.servers().iter().zip(behaviors) {
        s.set_behavior(*b);
    }
    fleet
}

/// Probes the sim server with behaviour `b` and checks status, success and error message.
#[track_caller]
fn expect(
    check: &fleet_core::HealthCheck,
    status: HealthStatus,
    successful: bool,
    error: Option<&str>,
) {
    assert_eq!(check.status, status, "{check:?}");
    assert_eq!(check.successful, successful, "{check:?}");
    match error {
        None => assert_eq!(check.error_message, None, "{check:?}"),
        Some(prefix) => {
            let msg = check.error_message.as_deref().unwrap_or("");
            assert!(msg.starts_with(prefix), "expected `{prefix}…`, got `{msg}`");
        }
    }
}

async fn probe_all(behaviors: &[Behavior]) -> Vec<fleet_core::HealthCheck> {
    let fleet = fleet(behaviors).await;
    let probe = HttpProbe::new(&HttpConfig::default()).unwrap();
    let mut checks = Vec::new();
    for s in fleet.servers() {
        let t = target(s.name(), &s.api_url(), Some(s.token()));
        let started = Instant::now();
        let outcome = probe.probe(&t, Instant::now() + DEADLINE).await;
        assert!(
            started.elapsed() < DEADLINE + Duration::from_millis(500),
            "{} overran its deadline",
            s.behavior()
        );
        checks.push(health_check(&t, OffsetDateTime::now_utc(), outcome).unwrap());
    }
    fleet.shutdown().await;
    checks
}

#[tokio::test]
async fn every_behaviour_is_classified_as_specified() {
    use Behavior::*;
    let behaviors = [
        Healthy,
        Degraded,
        Critical,
        HttpError,
        Unreachable,
        Hang,
        Slow,
        Garbage,
        Huge,
        Reset,
        Cut,
        Auth,
        Redirect,
        Drip,
        GzipBomb,
        Nested,
        RateLimited,
    ];
    let checks = probe_all(&behaviors).await;
    let [
        healthy,
        degraded,
        critical,
        http_error,
        unreachable,
        hang,
        slow,
        garbage,
        huge,
        reset,
        cut,
        auth,
        redirect,
        drip,
        bomb,
        nested,
        rate_limited,
    ] = checks.try_into().unwrap();
    expect(
        &rate_limited,
        HealthStatus::Critical,
        false,
        Some("HTTP 429 rate limited"),
    );
    expect(&healthy, HealthStatus::Healthy, true, None);
    assert_eq!(
        (
            healthy.database_healthy,
            healthy.redis_healthy,
            healthy.services_healthy
        ),
        (Some(true), Some(true), Some(true))
    );
    assert!(healthy.responded);
    expect(
        &degraded,
        HealthStatus::Degraded,
        true,
        Some("unhealthy: services (unhealthy), worker (degraded)"),
    );
    expect(
        &critical,
        HealthStatus::Critical,
        true,
        Some("unhealthy: database (down)"),
    );
    assert_eq!(critical.database_healthy, Some(false));
    expect(&http_error, HealthStatus::Critical, false, Some("HTTP 50"));
    expect(
        &unreachable,
        HealthStatus::Unreachable,
        false,
        Some("connection refused"),
    );
    assert!(!unreachable.responded);
    expect(
        &hang,
        HealthStatus::Unreachable,
        false,
        Some("timeout after 1.5s"),
    );
    expect(&slow, HealthStatus::Healthy, true, None);
    assert!(slow.response_time_ms.unwrap() >= 50, "{slow:?}");
    expect(
        &garbage,
        HealthStatus::Critical,
        false,
        Some("invalid health response: not JSON"),
    );
    expect(
        &huge,
        HealthStatus::Critical,
        false,
        Some("body exceeds 1 MiB"),
    );
    expect(
        &reset,
        HealthStatus::Unreachable,
        false,
        Some("connection reset"),
    );
    expect(
        &cut,
        HealthStatus::Critical,
        false,
        Some("body read failed: "),
    );
    assert!(cut.responded);
    expect(
        &auth,
        HealthStatus::Critical,
        false,
        Some("HTTP 401: token rejected"),
    );
    expect(
        &redirect,
        HealthStatus::Critical,
        false,
        Some("HTTP 302 (redirects are not followed)"),
    );
    expect(
        &drip,
        HealthStatus::Critical,
        false,
        Some("body read failed: timeout after 1.5s"),
    );
    expect(
        &bomb,
        HealthStatus::Critical,
        false,
        Some("body exceeds 1 MiB"),
    );
    expect(
        &nested,
        HealthStatus::Critical,
        false,
        Some("invalid health response: not JSON (recursion limit exceeded"),
    );
}

#[tokio::test]
async fn the_token_is_sent_and_a_wrong_one_is_rejected() {
    let fleet = fleet(&[Behavior::Healthy]).await;
    let s = &fleet.servers()[0];
    let probe = HttpProbe::new(&HttpConfig::default()).unwrap();
    for (token, status) in [
        (Some(s.token()), HealthStatus::Healthy),
        (Some("wrong"), HealthStatus::Critical),
        (None, HealthStatus::Critical),
    ] {
        let t = target("a", &s.api_url(), token);
        let check = health_check(
            &t,
            OffsetDateTime::now_utc(),
            probe.probe(&t, Instant::now() + DEADLINE).await,
        )
        .unwrap();
        assert_eq!(check.status, status, "{token:?}: {check:?}");
        if status == HealthStatus::Critical {
            assert_eq!(
                check.error_message.as_deref(),
                Some("HTTP 401: token rejected")
            );
            assert!(!check.error_message.unwrap().contains(s.token()));
        }
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_unreachable_and_localhost_works() {
    let fleet = fleet(&[Behavior::Healthy]).await;
    let s = &fleet.servers()[0];
    let port: u16 = s.api_url().rsplit(':').next().unwrap().parse().unwrap();
    // The resolver is the test's own: no query leaves the machine.
    let resolver = StaticResolver::new([(
        "localhost".to_owned(),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )]);
    let probe = HttpProbe::new(&HttpConfig {
        resolver: Some(Arc::new(resolver)),
        ..Default::default()
    })
    .unwrap();
    let t = target("dns", "http://no-such-host.invalid", Some(s.token()));
    let check = health_check(
        &t,
        OffsetDateTime::now_utc(),
        probe.probe(&t, Instant::now() + DEADLINE).await,
    )
    .unwrap();
    expect(&check, HealthStatus::Unreachable, false, Some("dns error"));
    let t = target(
        "local",
        &format!("http://localhost:{port}"),
        Some(s.token()),
    );
    let check = health_check(
        &t,
        OffsetDateTime::now_utc(),
        probe.probe(&t, Instant::now() + DEADLINE).await,
    )
    .unwrap();
    expect(&check, HealthStatus::Healthy, true, None);
    fleet.shutdown().await;
}

#[tokio::test]
async fn probes_refuse_metadata_unspecified_and_denied_addresses() {
    let fleet = fleet(&[Behavior::Healthy]).await;
    let s = &fleet.servers()[0];
    let port: u16 = s.api_url().rsplit(':').next().unwrap().parse().unwrap();
    let resolver = StaticResolver::new([
        (
            "localhost".to_owned(),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ),
        (
            "metadata.test".to_owned(),
            SocketAddr::from(([169, 254, 169, 254], 80)),
        ),
    ]);
    let probe_with = |deny: &[&str]| {
        HttpProbe::new(&HttpConfig {
            resolver: Some(Arc::new(resolver.clone())),
            guard: fleet_http::AddressGuard {
                deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
            },
            ..Default::default()
        })
        .unwrap()
    };
    let check = |probe: HttpProbe, url: String| async move {
        let t = target("guarded", &url, Some(s.token()));
        health_check(
            &t,
            OffsetDateTime::now_utc(),
            probe.probe(&t, Instant::now() + DEADLINE).await,
        )
        .unwrap()
    };
    let open = probe_with(&[]);
    for (url, refused) in [
        (
            "http://169.254.169.254/latest".to_owned(),
            "address 169.254.169.254 refused: link-local",
        ),
        (
            "http://metadata.test".to_owned(),
            "address 169.254.169.254 refused: link-local",
        ),
        (
            "http://[fe80::1]:80".to_owned(),
            "address fe80::1 refused: link-local",
        ),
        (
            "http://0.0.0.0:80".to_owned(),
            "address 0.0.0.0 refused: unspecified",
        ),
        (
            "http://224.0.0.1:80".to_owned(),
            "address 224.0.0.1 refused: multicast",
        ),
    ] {
        let c = check(open.clone(), url.clone()).await;
        assert_eq!(c.status, HealthStatus::Unreachable, "{url}");
        let message = c.error_message.unwrap();
        assert!(message.starts_with(refused), "{url}: {message}");
    }
    // Loopback is allowed by default (the demo lives there), and refused when denied, by
    // address and by name alike.
    let c = check(open.clone(), format!("http://localhost:{port}")).await;
    assert_eq!(c.status, HealthStatus::Healthy);
    let closed = probe_with(&["127.0.0.0/8"]);
    for url in [s.api_url(), format!("http://localhost:{port}")] {
        let c = check(closed.clone(), url.clone()).await;
        assert_eq!(c.status, HealthStatus::Unreachable, "{url}");
        assert!(
            c.error_message
                .as_deref()
                .unwrap()
                .contains("refused: in FLEET_PROBE_DENY_NETS"),
            "{url}: {c:?}"
        );
    }
    assert_eq!(
        fleet.servers()[0].stats().requests,
        1,
        "a refused address is never connected to"
    );
    fleet.shutdown().await;
}

/// Serves `body` with `status` to every request on a port of its own.
async fn fixed_server(status: u16, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn metrics_are_collected_and_bad_fields_fail_with_the_field_named() {
    let collector = HttpCollector::new(&HttpConfig::default()).unwrap();
    let fleet = fleet(&[Behavior::Healthy]).await;
    let s = &fleet.servers()[0];
    let t = target("a", &s.api_url(), Some(s.token()));
    let first = collector
        .collect(&t, Instant::now() + DEADLINE)
        .await
        .unwrap();
    let second = collector
        .collect(&t, Instant::now() + DEADLINE)
        .await
        .unwrap();
    assert!(
        first
            .cpu_percent
            .is_some_and(|c| (0.0..=100.0).contains(&c))
    );
    assert!(
        second.llm_requests >= first.llm_requests,
        "counters only grow"
    );
    assert!(second.network_rx_bytes >= first.network_rx_bytes);
    fleet.shutdown().await;

    for (status, body, expected) in [
        (
            200,
            r#"{"cpu_percent": 140}"#,
            "metrics response field cpu_percent = 140 is out of range 0..=100",
        ),
        (
            200,
            r#"{"total_users": "many"}"#,
            "metrics response field total_users = \"many\" is not a number",
        ),
        (
            200,
            r#"[1, 2]"#,
            "invalid metrics response: expected a JSON object, got an array",
        ),
        (503, r#"{}"#, "HTTP 503"),
        (302, r#"{}"#, "HTTP 302 (redirects are not followed)"),
    ] {
        let url = fixed_server(status, body).await;
        let err = collector
            .collect(&target("b", &url, None), Instant::now() + DEADLINE)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
    let refused = target("c", "http://127.0.0.1:9", None);
    let err = collector
        .collect(&refused, Instant::now() + DEADLINE)
        .await
        .unwrap_err();
    assert_eq!(err, CollectError::Transport("connection refused".into()));
}

#[tokio::test]
async fn an_invalid_api_url_is_a_failure_not_a_panic() {
    let probe = HttpProbe::new(&HttpConfig::default()).unwrap();
    for url in ["not a url", "", "http://"] {
        let t = target("x", url, None);
        match probe.probe(&t, Instant::now() + DEADLINE).await {
            ProbeOutcome::Failed { failure, .. } => {
                assert_eq!(failure.status(), HealthStatus::Unreachable)
            }
            other => panic!("{url}: {other:?}"),
        }
    }
}
