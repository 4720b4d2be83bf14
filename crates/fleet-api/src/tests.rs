//! Router tests without a socket: every route, every auth case, bad bodies, unknown ids.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use fleet_core::conformance::{base_time, check_at, sample_at};
use fleet_core::testing::{ManualClock, Script, ScriptedProbe, degraded};
use fleet_core::{
    AdminTokens, Events, HealthWork, InMemoryStore, MetricsRecord, NewServer, Registry, Role,
    ServerId, Store,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::auth;

struct Api {
    router: Router,
    memory: Arc<InMemoryStore>,
    alerts: Arc<fleet_alerts::MemoryAlertStore>,
    notifier: Arc<fleet_alerts::testing::RecordingNotifier>,
    /// An open incident, made before the alert pipeline started.
    incident: uuid::Uuid,
    _stop: tokio_util::sync::DropGuard,
    probe: Arc<ScriptedProbe>,
    events: Events,
    admin: String,
    viewer: String,
}

const BOOTSTRAP: &str = "bootstrap-admin-token-0123456789";

async fn api_with_limit(limit: u32) -> Api {
    let memory = Arc::new(InMemoryStore::new());
    let admin = auth::generate();
    let viewer = auth::generate();
    memory
        .insert_token("admin", Role::Admin, auth::hash(&admin))
        .await
        .unwrap();
    memory
        .insert_token("viewer", Role::Viewer, auth::hash(&viewer))
        .await
        .unwrap();
    let probe = Arc::new(ScriptedProbe::new(degraded()));
    let clock = Arc::new(ManualClock::new(base_time() + time::Duration::minutes(30)));
    let workers = Arc::new(RwLock::new(Workers {
        intervals: (30.0, 60.0),
        ..Default::default()
    }));
    let events = Events::new();
    // The alert pipeline on the in-memory alert store, with one open incident to show.
    let alerts = Arc::new(fleet_alerts::MemoryAlertStore::new());
    let incident = open_incident(&alerts).await;
    let notifier = Arc::new(fleet_alerts::testing::RecordingNotifier::new());
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = fleet_alerts::AlertService::spawn(
        fleet_alerts::AlertParts {
            leads: None,
            store: alerts.clone(),
            servers: memory.clone(),
            notifier: notifier.clone(),
            config: fleet_alerts::AlertConfig::default(),
            clock: clock.clone(),
            events: events.clone(),
            health_interval: Duration::from_secs(30),
        },
        cancel.clone(),
        &tokio_util::task::TaskTracker::new(),
    );
    let state = AppState::new(ApiParts {
        tiers: fleet_core::Tiers::default(),
        store: memory.clone(),
        health: HealthWork::new(memory.clone(), probe.clone()),
        probe_timeout: Duration::from_secs(2),
        clock,
        events: events.clone(),
        workers,
        admin_token: Some(BOOTSTRAP.to_owned()),
        auth_failure_limit: limit,
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        listener: Default::default(),
        alerts: Some(handle),
        bulk_check_max: 3,
        dashboard: DashboardConfig {
            sse_max_streams: 2,
            sse_max_rate: 5,
            ..Default::default()
        },
        shutdown: cancel.clone(),
        cluster: None,
    });
    Api {
        router: router(state),
        memory,
        alerts,
        notifier,
        incident,
        _stop: cancel.drop_guard(),
        probe,
        events,
        admin,
        viewer,
    }
}

/// An open, announced incident of one server, stored as the engine would have.
async fn open_incident(store: &fleet_alerts::MemoryAlertStore) -> uuid::Uuid {
    use fleet_alerts::{AlertStore, Effect, Incident, IncidentState, Rule, Snapshot};
    let id = uuid::Uuid::new_v4();
    let t = base_time();
    let snap = Snapshot {
        incident: Incident {
            id,
            group_key: "server_critical/eu".into(),
            rule: Rule::ServerCritical,
            severity: Rule::ServerCritical.severity(),
            region: Some("eu".into()),
            state: IncidentState::Firing,
            summary: "ServerCritical in region eu".into(),
            opened_at: t,
            acknowledged_at: None,
            acknowledged_by: None,
            ack_reason: None,
            resolved_at: None,
            servers: 1,
            covers: 1,
        },
        seq: 1,
        announced_at: Some(t),
        notified_at: Some(t),
        additions: false,
        immediate: false,
        escalated_until: 0,
        told: Default::default(),
    };
    let member = fleet_alerts::Member {
        server_id: ServerId::new(),
        server_name: "web-1".into(),
        region: Some("eu".into()),
        detail: String::new(),
        joined_at: t,
        resolved_at: None,
    };
    store
        .apply(
            &[],
            &[
                Effect::Save(Box::new(snap)),
                Effect::Join {
                    incident: id,
                    member,
                },
                Effect::Timeline {
                    incident: id,
                    at: t,
                    kind: "opened",
                    message: "opened".into(),
                    channel: None,
                },
            ],
        )
        .await
        .unwrap();
    id
}

async fn api() -> Api {
    api_with_limit(20).await
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        self.call_from(method, path, token, body, [127, 0, 0, 1])
            .await
    }

    async fn call_from(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        ip: [u8; 4],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let www = res.headers().get(header::WWW_AUTHENTICATE).cloned();
        if is_stream(&res) {
            // A live stream never ends: its first frame stands for its body.
            return (status, Value::String(first_frame(res).await));
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                www.as_ref().map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "401 without WWW-Authenticate"
            );
        }
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        // Every failure has the error shape; /readyz's 503 is its own report instead.
        if !status.is_success() && path.split('?').next() != Some("/readyz") {
            assert!(
                value["error"]["code"].is_string() && value["error"]["message"].is_string(),
                "{status}: {value}"
            );
        }
        (status, value)
    }

    /// The one request-and-assert of these tests: sends `method path` with `token` and
    /// `body`, asserts the status, and returns the body.
    async fn check(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        expected: StatusCode,
    ) -> Value {
        let m = method.clone();
        let (status, value) = self.call(method, path, token, body).await;
        assert_eq!(status, expected, "{m} {path}: {value}");
        value
    }

    /// A viewer's GET of `path` that must answer `expected`.
    async fn view(&self, path: &str, expected: StatusCode) -> Value {
        self.check(Method::GET, path, Some(&self.viewer), None, expected)
            .await
    }

    /// A GET with a raw `Authorization` header and `X-Forwarded-For`, from `ip`.
    async fn raw(
        &self,
        path: &str,
        authorization: Option<String>,
        ip: [u8; 4],
        forwarded_for: Option<&str>,
    ) -> axum::response::Response {
        let mut req = Request::builder().method(Method::GET).uri(path);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(f) = forwarded_for {
            req = req.header("x-forwarded-for", f);
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
        self.router.clone().oneshot(req).await.unwrap()
    }

    async fn admin(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin), body).await
    }

    async fn server(&self, name: &str) -> String {
        let body = json!({"name": name, "api_url": "http://127.0.0.1:9", "api_token": format!("probe-secret-{name}")}).to_string();
        let v = self
            .check(
                Method::POST,
                "/api/v1/fleet/servers",
                Some(&self.admin),
                Some(&body),
                StatusCode::CREATED,
            )
            .await;
        v["id"].as_str().unwrap().to_owned()
    }
}

fn is_stream(res: &axum::response::Response) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The next frame of a live stream's body, as text; fails after 5 s.
async fn next_frame(body: &mut Body) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame within 5 s")
            .expect("the stream is open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            return String::from_utf8(data.to_vec()).unwrap();
        }
    }
}

async fn first_frame(res: axum::response::Response) -> String {
    let mut body = res.into_body();
    next_frame(&mut body).await
}

fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-4000-8000-000000000001")
        .replace("{server_id}", "00000000-0000-4000-8000-000000000002")
}

fn body_for(r: &Route) -> Option<&'static str> {
    r.body.map(|_| "{}")
}

#[tokio::test]
async fn every_route_enforces_its_access_uniformly() {
    // No failure limit here: this test fails on purpose many times from one address.
    let a = api_with_limit(0).await;
    let revoked = auth::generate();
    a.memory
        .insert_token("gone", Role::Admin, auth::hash(&revoked))
        .await
        .unwrap();
    a.memory.revoke_token("gone").await.unwrap();
    for r in routes() {
        let path = concrete(r.path);
        let body = body_for(&r);
        let m = r.method.clone();
        if r.access == Access::Public {
            let (status, _) = a.call(m, &path, None, body).await;
            let not_ready =
                matches!(r.reply, Reply::Readiness(_)) && status == StatusCode::SERVICE_UNAVAILABLE;
            assert!(
                status.is_success() || not_ready,
                "{} {path}: public route gave {status}",
                r.method
            );
            continue;
        }
        for bad in [
            None,
            Some("not-a-token"),
            Some("fleet_unknownunknownunknownunknown"),
            Some(revoked.as_str()),
        ] {
            a.check(m.clone(), &path, bad, body, StatusCode::UNAUTHORIZED)
                .await;
        }
        let (status, _) = a.call(m.clone(), &path, Some(&a.viewer), body).await;
        if r.access == Access::Admin {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{} {path}: viewer on an admin route",
                r.method
            );
        } else {
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{} {path}: viewer gave {status}",
                r.method
            );
        }
        for good in [a.admin.as_str(), BOOTSTRAP] {
            let (status, _) = a.call(m.clone(), &path, Some(good), body).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{} {path}: admin gave {status}",
                r.method
            );
            assert!(!status.is_server_error(), "{} {path}: {status}", r.method);
        }
    }
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let a = api().await;
    let doc = a
        .check(
            Method::GET,
            "/api/v1/openapi.json",
            None,
            None,
            StatusCode::OK,
        )
        .await;
    for r in routes() {
        let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
        assert!(
            op.is_object(),
            "{} {} missing from the OpenAPI document",
            r.method,
            r.path
        );
        assert_eq!(op["security"].is_array(), r.access != Access::Public);
    }
}

/// Validates `body` against the document's schema of what `route` answers with `status`.
#[track_caller]
fn conforms(doc: &Value, method: &Method, path: &str, status: StatusCode, body: &Value) {
    let op = &doc["paths"][path][method.as_str().to_lowercase()];
    let response = &op["responses"][status.as_str()];
    let response = match response["$ref"].as_str() {
        Some("#/components/responses/Error") => &doc["components"]["responses"]["Error"],
        _ => response,
    };
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} answered {status}, which the document does not list"
    );
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "allOf": [schema],
    });
    let validator = jsonschema::validator_for(&root).expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match the document: {errors:?}\n{body}"
    );
}

#[tokio::test]
async fn every_route_answers_what_the_openapi_document_says() {
    let a = api().await;
    let (_, doc) = a
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(doc["openapi"], "3.1.0");
    // Something in every list: two servers with checks, a change of health, metrics with LLM
    // counters, and a group holding one of them.
    let server = a.server("s1").await;
    let other = a.server("s2").await;
    let id = ServerId(server.parse().unwrap());
    let t0 = base_time();
    a.memory
        .record_health(&[
            check_at(id, t0, fleet_core::HealthStatus::Healthy),
            check_at(
                id,
                t0 + time::Duration::minutes(1),
                fleet_core::HealthStatus::Critical,
            ),
        ])
        .await
        .unwrap();
    a.memory
        .record_metrics(&[
            MetricsRecord::Sample(sample_at(id, t0, 10.0)),
            MetricsRecord::Sample(sample_at(id, t0 + time::Duration::minutes(1), 20.0)),
        ])
        .await
        .unwrap();
    let (status, group) = a
        .admin(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(r#"{"name": "g1"}"#),
        )
        .await;
    conforms(&doc, &Method::POST, "/api/v1/fleet/groups", status, &group);
    let group = group["id"].as_str().unwrap().to_owned();
    // Something in every alert list too.
    let mut alert_ids = std::collections::BTreeMap::new();
    for (path, body) in [
        (
            "/api/v1/fleet/alerts/channels",
            json!({"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/hook"}),
        ),
        (
            "/api/v1/fleet/silences",
            json!({"matchers": {"region": "eu"}, "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-02T00:00:00Z", "comment": "move"}),
        ),
        (
            "/api/v1/fleet/maintenance-windows",
            json!({"name": "nightly", "region": "eu", "weekdays": ["sat"], "start_time": "02:00", "duration_seconds": 7200, "time_zone": "Europe/Berlin"}),
        ),
    ] {
        let (status, v) = a.admin(Method::POST, path, Some(&body.to_string())).await;
        conforms(&doc, &Method::POST, path, status, &v);
        alert_ids.insert(path, v["id"].as_str().unwrap().to_owned());
    }
    let channel = alert_ids["/api/v1/fleet/alerts/channels"].clone();
    let (status, v) = a
        .admin(
            Method::POST,
            "/api/v1/fleet/alerts/policies",
            Some(&json!({"name": "p1", "matchers": {"rule": "server_critical"}, "steps": [{"after_seconds": 0, "channel_ids": [channel]}]}).to_string()),
        )
        .await;
    conforms(
        &doc,
        &Method::POST,
        "/api/v1/fleet/alerts/policies",
        status,
        &v,
    );
    alert_ids.insert(
        "/api/v1/fleet/alerts/policies",
        v["id"].as_str().unwrap().to_owned(),
    );
    alert_ids.insert("/api/v1/fleet/incidents", a.incident.to_string());

    // Deletions last, the server's after its membership's and its group's.
    let mut all = routes();
    all.sort_by_key(|r| match (r.method.clone(), r.path) {
        (Method::DELETE, p) if p.contains("members") => 1,
        (Method::DELETE, p) if p.contains("groups") => 2,
        (Method::DELETE, _) => 3,
        _ => 0,
    });
    for r in all {
        let id = alert_ids
            .iter()
            .find(|(prefix, _)| r.path.starts_with(*prefix))
            .map(|(_, id)| id.as_str());
        let path = r
            .path
            .replace(
                "{id}",
                match id {
                    Some(id) => id,
                    None if r.path.starts_with("/api/v1/fleet/groups") => &group,
                    None => &other,
                },
            )
            .replace("{server_id}", &other);
        let path = if r.method == Method::DELETE && r.path == "/api/v1/fleet/servers/{id}" {
            path.replace(&other, &server)
        } else {
            path
        };
        let body = match (r.method.as_str(), r.path) {
            ("POST", "/api/v1/fleet/servers") => Some(
                json!({"name": "s3", "api_url": "http://127.0.0.1:9", "api_token": "probe-secret"})
                    .to_string(),
            ),
            ("PATCH", "/api/v1/fleet/servers/{id}") => Some(r#"{"description": "edge"}"#.into()),
            ("POST", "/api/v1/fleet/groups") => Some(r#"{"name": "g2"}"#.into()),
            ("PATCH", "/api/v1/fleet/groups/{id}") => Some(r#"{"color": "ff8800"}"#.into()),
            ("POST", "/api/v1/fleet/groups/{id}/members") => Some(json!({"server_ids": [other]}).to_string()),
            ("DELETE", "/api/v1/fleet/groups/{id}/members") => Some(json!({"server_ids": [server]}).to_string()),
            ("POST", "/api/v1/fleet/alerts/channels") => Some(
                json!({"name": "pager", "kind": "pagerduty", "routing_key": "rk", "url": "http://127.0.0.1:9/pd"}).to_string(),
            ),
            ("PATCH", "/api/v1/fleet/alerts/channels/{id}") => Some(r#"{"send_resolved": false}"#.into()),
            ("POST", "/api/v1/fleet/alerts/policies") => Some(
                json!({"name": "p2", "steps": [{"after_seconds": 1800, "channel_ids": [channel]}]}).to_string(),
            ),
            ("PATCH", "/api/v1/fleet/alerts/policies/{id}") => Some(r#"{"name": "p1 renamed"}"#.into()),
            ("POST", "/api/v1/fleet/incidents/{id}/ack") => Some(r#"{"reason": "on it"}"#.into()),
            ("POST", "/api/v1/fleet/silences") => Some(
                json!({"matchers": {"rule": "server_degraded"}, "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-01T01:00:00Z"}).to_string(),
            ),
            ("POST", "/api/v1/fleet/maintenance-windows") => Some(
                json!({"name": "once", "server_id": other, "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-01T01:00:00Z"}).to_string(),
            ),
            ("PATCH", "/api/v1/fleet/maintenance-windows/{id}") => Some(r#"{"name": "weekly"}"#.into()),
            _ => None,
        };
        // Histories and logs of the server that has them.
        let path = if r.path.ends_with("health-checks")
            || r.path.ends_with("metrics")
            || r.path.ends_with("series")
            || r.path.ends_with("state-changes")
        {
            path.replace(&other, &server)
        } else {
            path
        };
        let (status, value) = a.admin(r.method.clone(), &path, body.as_deref()).await;
        match r.reply {
            Reply::Readiness(_) => {
                assert_eq!(
                    status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no workers run here"
                );
                conforms(&doc, &r.method, r.path, status, &value);
            }
            Reply::Json(expected, _) => {
                assert_eq!(status, expected, "{} {path}: {value}", r.method);
                conforms(&doc, &r.method, r.path, status, &value);
                if let Some(list) = [
                    "servers",
                    "health_checks",
                    "metrics",
                    "state_changes",
                    "groups",
                    "channels",
                    "incidents",
                    "silences",
                    "windows",
                    "policies",
                ]
                .iter()
                .find_map(|k| value[k].as_array())
                {
                    assert!(
                        !list.is_empty(),
                        "{} {path}: an empty list proves little",
                        r.method
                    );
                }
            }
            Reply::Empty => {
                assert_eq!(
                    status,
                    StatusCode::NO_CONTENT,
                    "{} {path}: {value}",
                    r.method
                );
                assert_eq!(value, Value::String(String::new()));
            }
            Reply::Text => {
                assert_eq!(status, StatusCode::OK);
                assert!(value.as_str().unwrap().contains("# TYPE"));
            }
            Reply::Document => assert_eq!(value, doc),
            Reply::EventStream => {
                assert_eq!(status, StatusCode::OK, "{path}");
                assert!(value.as_str().unwrap().contains("event: hello"), "{value}");
            }
        }
    }
    // Errors have their documented shape too.
    let (status, value) = a
        .admin(
            Method::GET,
            "/api/v1/fleet/servers/00000000-0000-4000-8000-000000000009",
            None,
        )
        .await;
    conforms(
        &doc,
        &Method::GET,
        "/api/v1/fleet/servers/{id}",
        status,
        &value,
    );
    let value = a
        .check(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(&a.admin),
            Some(r#"{"name": ""}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    conforms(&doc, &Method::POST, "/api/v1/fleet/groups", status, &value);
}

#[tokio::test]
async fn servers_are_created_listed_changed_and_deleted_without_their_token() {
    let a = api().await;
    let body = json!({
        "name": "web-1", "api_url": "https://127.0.0.1:8443", "api_token": "probe-secret-xyz",
        "region": "eu", "environment": "production", "tags": ["edge"], "metadata": {"rack": 3}, "hostname": "web-1.local"
    });
    let created = a
        .check(
            Method::POST,
            "/api/v1/fleet/servers",
            Some(&a.admin),
            Some(&body.to_string()),
            StatusCode::CREATED,
        )
        .await;
    assert!(
        !created.to_string().contains("probe-secret"),
        "the token came back: {created}"
    );
    assert_eq!(created["status"], "active");
    assert_eq!(created["health_status"], Value::Null);
    let id = created["id"].as_str().unwrap();

    a.check(
        Method::POST,
        "/api/v1/fleet/servers",
        Some(&a.admin),
        Some(&body.to_string()),
        StatusCode::CONFLICT,
    )
    .await;

    let list = a
        .check(
            Method::GET,
            "/api/v1/fleet/servers?region=eu&tag=edge&search=WEB",
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(list["servers"].as_array().unwrap().len(), 1);
    let (_, list) = a
        .call(
            Method::GET,
            "/api/v1/fleet/servers?region=us",
            Some(&a.viewer),
            None,
        )
        .await;
    assert!(list["servers"].as_array().unwrap().is_empty());
    a.check(
        Method::GET,
        "/api/v1/fleet/servers?status=sleepy",
        Some(&a.viewer),
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    // A NUL (or any control character) in a filter is the caller's mistake: 400, never 500.
    for q in ["search=%00", "region=eu%0A", "tag=%1B%5B2J"] {
        let v = a
            .check(
                Method::GET,
                &format!("/api/v1/fleet/servers?{q}"),
                Some(&a.viewer),
                None,
                StatusCode::BAD_REQUEST,
            )
            .await;
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("must not contain control"),
            "{q}: {v}"
        );
    }
    a.check(
        Method::GET,
        "/api/v1/fleet/servers?limit=0",
        Some(&a.viewer),
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.check(
        Method::GET,
        "/api/v1/fleet/servers?colour=red",
        Some(&a.viewer),
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;

    let patch =
        json!({"api_token": "rotated-secret", "region": null, "status": "maintenance"}).to_string();
    let changed = a
        .check(
            Method::PATCH,
            &format!("/api/v1/fleet/servers/{id}"),
            Some(&a.admin),
            Some(&patch),
            StatusCode::OK,
        )
        .await;
    assert_eq!(changed["region"], Value::Null);
    assert_eq!(changed["status"], "maintenance");
    assert!(!changed.to_string().contains("rotated-secret"));
    let target = a
        .memory
        .probe_target(fleet_core::ServerId(id.parse().unwrap()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(target.token.unwrap().expose(), "rotated-secret");

    a.check(
        Method::DELETE,
        &format!("/api/v1/fleet/servers/{id}"),
        Some(&a.admin),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    a.check(
        Method::GET,
        &format!("/api/v1/fleet/servers/{id}"),
        Some(&a.admin),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    a.check(
        Method::DELETE,
        &format!("/api/v1/fleet/servers/{id}"),
        Some(&a.admin),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn bad_bodies_get_a_clear_4xx_and_store_nothing() {
    let a = api().await;
    let long_name = "x".repeat(10_000);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (json!({"name": "a", "api_url": "file:///etc/passwd", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "http or https"),
        (json!({"name": "a", "api_url": "gopher://127.0.0.1:70/", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "http or https"),
        (json!({"name": "a", "api_url": "127.0.0.1:8080", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "api_url"),
        (json!({"name": "a", "api_url": "http://user:pw@127.0.0.1", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "credentials"),
        (json!({"name": long_name, "api_url": "http://127.0.0.1", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "name must be at most 255 characters"),
        (json!({"name": "", "api_url": "http://127.0.0.1", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "name must not be empty"),
        (json!({"name": "bell\u{7}", "api_url": "http://127.0.0.1", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "name must not contain control"),
        (json!({"name": "a", "api_url": "http://127.0.0.1", "api_token": "t\r\nX: y"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "api_token must be printable"),
        (json!({"name": "a", "api_url": "http://127.0.0.1", "api_token": "t", "colour": "red"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "unknown field"),
        (json!({"name": 5, "api_url": "http://127.0.0.1", "api_token": "t"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "invalid type"),
        (json!({"name": "a", "api_url": "http://127.0.0.1"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "api_token"),
        (json!({"name": "a", "api_url": "http://127.0.0.1", "api_token": "t", "metadata": [1]}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "metadata"),
        (json!({"name": "a", "api_url": "http://127.0.0.1", "api_token": "t", "status": "asleep"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "unknown variant"),
        ("{not json".to_owned(), StatusCode::BAD_REQUEST, "not valid JSON"),
        ("[]".to_owned(), StatusCode::UNPROCESSABLE_ENTITY, "expected struct"),
        (format!("{{\"name\": \"{}\"}}", "y".repeat(70_000)), StatusCode::PAYLOAD_TOO_LARGE, "64 KiB"),
    ];
    for (body, expected, says) in cases {
        let (status, v) = a
            .admin(Method::POST, "/api/v1/fleet/servers", Some(&body))
            .await;
        assert_eq!(status, expected, "{}: {v}", &body[..body.len().min(80)]);
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "expected `{says}` in `{message}`");
    }
    assert!(
        a.memory
            .list_servers(&Default::default())
            .await
            .unwrap()
            .is_empty(),
        "something was stored"
    );

    // No content type: refused as such.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/fleet/servers")
        .header(header::AUTHORIZATION, format!("Bearer {}", a.admin))
        .body(Body::from("{}"))
        .unwrap();
    let res = a.router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    a.check(
        Method::GET,
        "/api/v1/fleet/servers/not-a-uuid",
        Some(&a.admin),
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.check(
        Method::GET,
        "/api/v1/nowhere",
        Some(&a.admin),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    a.check(
        Method::PUT,
        "/api/v1/fleet/servers",
        Some(&a.admin),
        Some("{}"),
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
}

#[tokio::test]
async fn check_now_probes_records_publishes_and_returns_the_check() {
    let a = api().await;
    let mut sub = a.events.subscribe("test", 10);
    let id = a.server("s1").await;
    let check = a
        .check(
            Method::POST,
            &format!("/api/v1/fleet/servers/{id}/check"),
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(check["status"], "degraded");
    assert_eq!(check["successful"], true);
    let (_, server) = a
        .admin(Method::GET, &format!("/api/v1/fleet/servers/{id}"), None)
        .await;
    assert_eq!(server["health_status"], "degraded");
    let (_, history) = a
        .admin(
            Method::GET,
            &format!("/api/v1/fleet/servers/{id}/health-checks?limit=5"),
            None,
        )
        .await;
    assert_eq!(history["health_checks"].as_array().unwrap().len(), 1);
    a.probe.set("s1", Script::Never);
    let check = a
        .check(
            Method::POST,
            &format!("/api/v1/fleet/servers/{id}/check"),
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(check["status"], "unreachable");
    assert_eq!(check["error_message"], "timeout after 2s");
    // Each check-now is published once, marked manual, with the true previous health.
    let published: Vec<_> = std::iter::from_fn(|| sub.try_recv())
        .map(|r| match r {
            fleet_core::Received::Event(e) => match &*e {
                fleet_core::Event::Checked {
                    server,
                    check,
                    previous,
                    manual,
                } => (server.clone(), *previous, check.status, *manual),
                other => panic!("{other:?}"),
            },
            lagged => panic!("{lagged:?}"),
        })
        .collect();
    use fleet_core::HealthStatus::*;
    assert_eq!(
        published,
        [
            ("s1".to_owned(), None, Degraded, true),
            ("s1".to_owned(), Some(Degraded), Unreachable, true)
        ]
    );
    a.check(
        Method::POST,
        "/api/v1/fleet/servers/00000000-0000-4000-8000-000000000009/check",
        Some(&a.admin),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn history_reads_rollups_by_resolution_and_says_which_it_read() {
    let a = api().await;
    let id = a.server("s1").await;
    let sid = fleet_core::ServerId(id.parse().unwrap());
    use fleet_core::HealthStatus;
    let t0 = time::macros::datetime!(2026-03-31 22:00 UTC);
    let base = format!("/api/v1/fleet/servers/{id}");
    // Before any hour has closed, 1h answers an empty list.
    a.memory
        .record_health(&[check_at(sid, t0, HealthStatus::Healthy)])
        .await
        .unwrap();
    let v = a
        .view(
            &format!("{base}/health-checks?resolution=1h"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["resolution"], "1h");
    assert_eq!(v["health_checks"], json!([]));

    // Two hours of checks and samples, a counter reset in the first.
    let mut checks = Vec::new();
    let mut records = Vec::new();
    for i in 1..240 {
        let at = t0 + time::Duration::seconds(30 * i);
        let status = if i % 10 == 0 {
            HealthStatus::Critical
        } else {
            HealthStatus::Healthy
        };
        checks.push(check_at(sid, at, status));
        let mut s = sample_at(sid, at, (i % 50) as f64);
        s.values.llm_requests = Some(if i < 60 { i } else { i - 60 });
        records.push(MetricsRecord::Sample(s));
    }
    a.memory.record_health(&checks).await.unwrap();
    a.memory.record_metrics(&records).await.unwrap();
    let v = a
        .view(
            &format!("{base}/health-checks?resolution=1h"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["resolution"], "1h");
    let hour = &v["health_checks"][0];
    assert_eq!(hour["period_start"], "2026-03-31T22:00:00.000000Z", "{v}");
    assert_eq!(hour["checks"]["healthy"], 109);
    assert_eq!(hour["checks"]["critical"], 11);
    assert_eq!(hour["response_time_ms"]["p95"], 12);
    assert_eq!(hour["last_error"], "unhealthy: services (unhealthy)");
    let v = a
        .view(&format!("{base}/metrics?resolution=1h"), StatusCode::OK)
        .await;
    let hour = &v["metrics"][0];
    assert_eq!(hour["samples"], 119);
    assert_eq!(hour["cpu_percent"]["max"], 49.0);
    // 1 → 59, then a restart at 0 → 59 more: 58 + 0 + 59.
    assert_eq!(hour["llm_requests"]["increase"], 117.0, "{hour}");
    let v = a
        .view(
            &format!("{base}/metrics?resolution=5m&limit=3"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["resolution"], "5m");
    assert_eq!(v["metrics"].as_array().unwrap().len(), 3);
    // Raw keeps today's shape.
    let v = a
        .view(&format!("{base}/health-checks?limit=1"), StatusCode::OK)
        .await;
    assert_eq!(v["resolution"], "raw");
    assert!(v["health_checks"][0]["timestamp"].is_string());
    let v = a
        .view(
            &format!("{base}/health-checks?resolution=2h"),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("resolution"),
        "{v}"
    );
}

#[tokio::test]
async fn history_windows_parse_times_and_refuse_bad_ones() {
    let a = api().await;
    let id = a.server("s1").await;
    let sid = fleet_core::ServerId(id.parse().unwrap());
    let t0 = base_time();
    let records: Vec<MetricsRecord> = (0..5)
        .map(|i| MetricsRecord::Sample(sample_at(sid, t0 + time::Duration::minutes(i), 5.0)))
        .collect();
    a.memory.record_metrics(&records).await.unwrap();
    let path = format!(
        "/api/v1/fleet/servers/{id}/metrics?from=2026-03-31T23:59:00Z&to=2026-04-01T00:02:00Z"
    );
    let v = a
        .check(Method::GET, &path, Some(&a.viewer), None, StatusCode::OK)
        .await;
    assert_eq!(v["metrics"].as_array().unwrap().len(), 3);
    assert_eq!(v["metrics"][0]["timestamp"], "2026-04-01T00:01:00.000000Z");
    let v = a
        .check(
            Method::GET,
            &format!("/api/v1/fleet/servers/{id}/metrics?from=yesterday"),
            Some(&a.viewer),
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("RFC 3339"));
    a.check(
        Method::GET,
        &format!(
            "/api/v1/fleet/servers/{id}/health-checks?from=2026-04-01T00:02:00Z&to=2026-03-31T23:59:00Z"
        ),
        Some(&a.viewer),
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.check(
        Method::GET,
        "/api/v1/fleet/servers/00000000-0000-4000-8000-000000000009/metrics",
        Some(&a.viewer),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn groups_gather_servers_and_filter_the_list() {
    let a = api().await;
    let s1 = a.server("s1").await;
    a.server("s2").await;
    let g = a
        .check(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(&a.admin),
            Some(r##"{"name": "edge", "color": "#00ff00"}"##),
            StatusCode::CREATED,
        )
        .await;
    let gid = g["id"].as_str().unwrap();
    a.check(
        Method::POST,
        "/api/v1/fleet/groups",
        Some(&a.admin),
        Some(r#"{"name": "edge"}"#),
        StatusCode::CONFLICT,
    )
    .await;
    a.check(
        Method::POST,
        "/api/v1/fleet/groups",
        Some(&a.admin),
        Some(r#"{"color": "red"}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    a.check(
        Method::PUT,
        &format!("/api/v1/fleet/groups/{gid}/members/{s1}"),
        Some(&a.admin),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (_, list) = a
        .admin(
            Method::GET,
            &format!("/api/v1/fleet/servers?group={gid}"),
            None,
        )
        .await;
    assert_eq!(list["servers"].as_array().unwrap().len(), 1);
    assert_eq!(list["servers"][0]["name"], "s1");
    let (status, g) = a
        .admin(
            Method::PATCH,
            &format!("/api/v1/fleet/groups/{gid}"),
            Some(r#"{"description": "the edge"}"#),
        )
        .await;
    assert_eq!(
        (status, g["description"].as_str()),
        (StatusCode::OK, Some("the edge"))
    );
    a.check(
        Method::DELETE,
        &format!("/api/v1/fleet/groups/{gid}/members/{s1}"),
        Some(&a.admin),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    a.check(
        Method::DELETE,
        &format!("/api/v1/fleet/groups/{gid}"),
        Some(&a.admin),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    a.check(
        Method::GET,
        &format!("/api/v1/fleet/groups/{gid}"),
        Some(&a.admin),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn the_summary_counts_servers_and_llm_spend_over_a_window() {
    let a = api().await;
    let mut new = NewServer::new("a", "http://127.0.0.1:9");
    new.region = Some("eu".into());
    let s = a.memory.create_server(new).await.unwrap();
    let t0 = base_time();
    let sample = |m: i64, req: i64, cost: f64| {
        let mut x = sample_at(s.id, t0 + time::Duration::minutes(m), 1.0);
        x.values.llm_requests = Some(req);
        x.values.llm_cost_usd = Some(cost);
        MetricsRecord::Sample(x)
    };
    a.memory
        .record_metrics(&[sample(0, 10, 1.0), sample(1, 30, 2.0), sample(2, 5, 0.5)])
        .await
        .unwrap();
    let v = a
        .check(
            Method::GET,
            "/api/v1/fleet/summary?hours=1",
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["servers"]["total"], 1);
    assert_eq!(v["servers"]["by_status"]["active"], 1);
    assert_eq!(v["servers"]["by_health_status"]["unknown"], 1);
    assert_eq!(v["servers"]["by_region"]["eu"], 1);
    assert_eq!(v["llm"]["total_requests"], 20 + 5);
    assert_eq!(v["llm"]["total_cost_usd"], 1.5);
    assert_eq!(v["llm"]["per_server"][0]["name"], "a");
    assert_eq!(v["llm"]["resolution"], "raw");
    for bad in [
        "resolution=5m",
        "resolution=hourly",
        "hours=0",
        "hours=2&from=2026-03-31T00:00:00Z",
        "from=2026-04-01T00:00:00Z&to=2026-03-31T00:00:00Z",
        "from=2025-01-01T00:00:00Z&to=2026-03-31T00:00:00Z",
        "limit=0",
        "limit=101",
    ] {
        a.check(
            Method::GET,
            &format!("/api/v1/fleet/summary?{bad}"),
            Some(&a.viewer),
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
}

#[tokio::test]
async fn the_summary_names_the_top_spenders_only() {
    let a = api().await;
    let t0 = base_time();
    for i in 0..25 {
        let s = a
            .memory
            .create_server(NewServer::new(format!("s{i:02}"), "http://127.0.0.1:9"))
            .await
            .unwrap();
        let sample = |m: i64, cost: f64| {
            let mut x = sample_at(s.id, t0 + time::Duration::minutes(m), 1.0);
            x.values.llm_cost_usd = Some(cost);
            MetricsRecord::Sample(x)
        };
        a.memory
            .record_metrics(&[sample(0, 0.0), sample(1, f64::from(i))])
            .await
            .unwrap();
    }
    let v = a
        .check(
            Method::GET,
            "/api/v1/fleet/summary?hours=1",
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    let names: Vec<&str> = v["llm"]["per_server"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 20, "the top 20 by default");
    assert_eq!(names[..3], ["s24", "s23", "s22"]);
    assert_eq!(
        v["llm"]["total_cost_usd"], 300.0,
        "the total covers every server"
    );
    let v = a
        .check(
            Method::GET,
            "/api/v1/fleet/summary?hours=1&limit=2",
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["llm"]["per_server"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_status_endpoint_has_the_seeds_shape_and_says_why_workers_are_down() {
    let a = api().await;
    let v = a
        .check(
            Method::GET,
            "/api/v1/fleet/workers/status",
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
        .await;
    for key in [
        "running",
        "interval_seconds",
        "checks_performed",
        "checks_successful",
        "checks_failed",
        "success_rate",
        "last_run",
        "last_duration_seconds",
    ] {
        assert!(
            v["health_worker"].get(key).is_some(),
            "health_worker.{key} missing: {v}"
        );
    }
    for key in [
        "collections_performed",
        "collections_successful",
        "collections_failed",
        "total_metrics_collected",
        "partition_health",
    ] {
        assert!(
            v["metrics_worker"].get(key).is_some(),
            "metrics_worker.{key} missing"
        );
    }
    assert_eq!(v["health_worker"]["running"], false);
    assert_eq!(
        v["health_worker"]["interval_seconds"],
        json!(30),
        "an integer when whole"
    );
    let stamp = v["timestamp"].as_str().unwrap();
    assert_eq!(stamp.len(), "2026-01-26T14:30:15.123456Z".len(), "{stamp}");
    assert!(stamp.ends_with('Z'));
    // Checks since start keep the seed's name and get a clear one; servers now are apart.
    let h = &v["health_worker"];
    assert_eq!(h["checks_by_status"], h["by_status"]);
    assert_eq!(h["servers_by_health"]["unknown"], 0);
    a.server("s1").await;
    let status = || {
        a.check(
            Method::GET,
            "/api/v1/fleet/workers/status",
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
    };
    // Counts are read at most once a second.
    let v = status().await;
    assert_eq!(
        v["health_worker"]["servers_by_health"]["unknown"], 0,
        "a second old"
    );
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(1100)).await;
    let v = status().await;
    assert_eq!(v["health_worker"]["servers_by_health"]["unknown"], 1);
    assert_eq!(v["health_worker"]["servers_by_health"]["healthy"], 0);
}

#[tokio::test]
async fn a_process_with_its_store_alone_is_the_one_instance_and_owns_every_bucket() {
    let a = api().await;
    a.server("s1").await;
    a.server("s2").await;
    let v = a
        .check(
            Method::GET,
            "/api/v1/fleet/instances",
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["live"], 1);
    assert_eq!(v["instances"][0]["buckets"], 1024);
    assert_eq!(v["instances"][0]["servers"], 2);
    assert_eq!(v["instances"][0]["leader"], true);
    a.check(
        Method::GET,
        "/api/v1/fleet/instances",
        Some(&a.viewer),
        None,
        StatusCode::FORBIDDEN,
    )
    .await;
    let status = a
        .check(
            Method::GET,
            "/api/v1/fleet/workers/status",
            Some(&a.admin),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(status["instance"]["share"], 1.0);
    assert_eq!(status["instance"]["id"], Value::Null);
    let metrics = a
        .check(Method::GET, "/metrics", None, None, StatusCode::OK)
        .await;
    let text = metrics.as_str().unwrap();
    for line in [
        "fleet_instances_live 1",
        "fleet_buckets_owned 1024",
        "fleet_lease_takeovers_total 0",
        "fleet_fenced_writes_rejected_total 0",
        "fleet_is_leader 1",
    ] {
        assert!(text.contains(line), "{line} missing");
    }
}

#[tokio::test]
async fn an_address_over_its_failure_limit_gets_429_before_any_lookup() {
    let a = api_with_limit(3).await;
    let path = "/api/v1/fleet/servers";
    let me = [127, 0, 0, 5];
    let wrong = Some("fleet_wrongwrongwrongwrongwrong");
    for _ in 0..3 {
        let (status, _) = a.call_from(Method::GET, path, wrong, None, me).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = a.call_from(Method::GET, path, wrong, None, me).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Over the limit, whatever it sends, the address gets 429 and costs no lookup.
    let lookups = a.memory.token_lookups();
    for token in [
        wrong,
        Some("bad"),
        None,
        Some(a.viewer.as_str()),
        Some(BOOTSTRAP),
    ] {
        let res = a
            .raw(path, token.map(|t| format!("Bearer {t}")), me, None)
            .await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{token:?}");
        let retry: u64 = res.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    }
    assert_eq!(
        a.memory.token_lookups(),
        lookups,
        "a limited client caused a lookup"
    );
    // Another address is not limited.
    let (status, _) = a
        .call_from(Method::GET, path, Some(&a.viewer), None, [127, 0, 0, 6])
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn forwarded_for_counts_only_through_a_trusted_proxy() {
    let a = api_with_limit(1).await;
    let path = "/api/v1/fleet/servers";
    let bad = Some("Bearer fleet_wrongwrongwrongwrongwrong".to_owned());
    // From an untrusted peer, X-Forwarded-For is ignored: changing it does not escape.
    for xff in ["1.1.1.1", "2.2.2.2"] {
        a.raw(path, bad.clone(), [127, 0, 0, 9], Some(xff)).await;
    }
    let res = a
        .raw(path, bad.clone(), [127, 0, 0, 9], Some("3.3.3.3"))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // Through a trusted proxy (10.0.0.0/8 here), each forwarded client is counted alone.
    for _ in 0..2 {
        a.raw(path, bad.clone(), [10, 0, 0, 1], Some("4.4.4.4"))
            .await;
    }
    let res = a
        .raw(path, bad.clone(), [10, 0, 0, 1], Some("4.4.4.4"))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let res = a
        .raw(
            path,
            Some(format!("Bearer {}", a.viewer)),
            [10, 0, 0, 1],
            Some("5.5.5.5"),
        )
        .await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "another client behind the same proxy"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let a = api().await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let res = a
            .raw(
                "/api/v1/fleet/servers",
                Some(format!("{scheme} {}", a.viewer)),
                [127, 0, 0, 1],
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
    }
}

#[tokio::test]
async fn the_public_endpoints_answer() {
    let a = api().await;
    a.server("s1").await;
    let (status, v) = a.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let v = a
        .check(
            Method::GET,
            "/readyz",
            None,
            None,
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    // The store answers; no worker runs in these router tests, so it is not ready.
    assert_eq!(
        v,
        json!({"ready": false, "store": "ok", "workers_running": false, "keys": "ok"})
    );
    let v = a
        .check(Method::GET, "/metrics", None, None, StatusCode::OK)
        .await;
    let text = v.as_str().unwrap();
    assert!(
        text.contains("fleet_servers{health_status=\"unknown\"} 1"),
        "{text}"
    );
    assert!(!text.contains("probe-secret"));
    for counter in [
        "fleet_api_connections_refused_total 0",
        "fleet_api_accept_errors_total 0",
        "fleet_events_lost_total 0",
    ] {
        assert!(text.contains(counter), "no `{counter}` in /metrics");
    }
}

mod fuzz {
    //! Every route of the table, driven by generated paths, queries and bodies: never a 5xx,
    //! never a panic, always the JSON error shape.

    use proptest::prelude::*;

    use super::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,40}".prop_map(Value::String),
            prop_oneof![
                Just("http://127.0.0.1:9"),
                Just("file:///etc/passwd"),
                Just("active"),
                Just("")
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            let keys = prop_oneof![
                Just("name".to_owned()),
                Just("api_url".to_owned()),
                Just("api_token".to_owned()),
                Just("tags".to_owned()),
                Just("metadata".to_owned()),
                Just("status".to_owned()),
                Just("region".to_owned()),
                Just("color".to_owned()),
                "[a-z_]{1,10}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("00000000-0000-4000-8000-000000000001".to_owned()),
            Just("not-a-uuid".to_owned()),
            "[a-zA-Z0-9%._~-]{0,40}",
        ]
    }

    fn query() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("limit"),
            Just("offset"),
            Just("from"),
            Just("to"),
            Just("hours"),
            Just("status"),
            Just("health_status"),
            Just("group"),
            Just("tag"),
            Just("search"),
            Just("bogus"),
        ];
        let value = prop_oneof![
            Just("-1".to_owned()),
            Just("0".to_owned()),
            Just("99999999999999999999".to_owned()),
            Just("2026-11-28T06:00:00Z".to_owned()),
            Just("healthy".to_owned()),
            "[a-zA-Z0-9%]{0,12}",
        ];
        prop::collection::vec((key, value), 0..4).prop_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn no_route_answers_5xx(route in 0..routes().len(), a in segment(), b in segment(), q in query(), body in json_value(), raw in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let api = api().await;
                let r = &routes()[route];
                let path = r.path.replace("{id}", &a).replace("{server_id}", &b);
                let path = if q.is_empty() { path } else { format!("{path}?{q}") };
                let body = if raw { body.to_string().chars().rev().collect::<String>() } else { body.to_string() };
                let body = r.body.map(|_| body.as_str());
                let (status, v) = api.call(r.method.clone(), &path, Some(&api.admin), body).await;
                // /readyz answers 503 by design when not ready (no workers run here).
                let readiness = matches!(r.reply, Reply::Readiness(_));
                assert!(
                    !status.is_server_error() || readiness && status == StatusCode::SERVICE_UNAVAILABLE,
                    "{} {path} -> {status}: {v}",
                    r.method
                );
            });
        }
    }
}

#[tokio::test]
async fn alert_bodies_name_the_bad_field_and_secrets_never_come_back() {
    let a = api().await;
    let admin = Some(a.admin.as_str());
    let channels = "/api/v1/fleet/alerts/channels";
    let cases = [
        (
            json!({"name": "x", "kind": "webhook", "url": "file:///etc/passwd"}),
            "url",
        ),
        (
            json!({"name": "x", "kind": "webhook", "url": "http://user:pw@127.0.0.1/h"}),
            "url",
        ),
        (json!({"name": "x", "kind": "webhook"}), "url"),
        (json!({"name": "x", "kind": "carrier-pigeon"}), "kind"),
        (
            json!({"name": "", "kind": "slack", "url": "http://127.0.0.1/h"}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "slack", "url": "http://127.0.0.1/h", "routing_key": "k"}),
            "routing_key",
        ),
        (
            json!({"name": "x", "kind": "email", "to": ["nobody"], "from": "f@x.test", "smtp_host": "127.0.0.1", "smtp_port": 25}),
            "to",
        ),
        (
            json!({"name": "x", "kind": "email", "to": ["a@x.test"], "from": "f@x.test", "smtp_host": "127.0.0.1", "smtp_port": 25, "smtp_tls": "maybe"}),
            "smtp_tls",
        ),
    ];
    for (body, field) in cases {
        let v = a
            .check(
                Method::POST,
                channels,
                admin,
                Some(&body.to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{field}:")), "{body}: {msg}");
    }
    // Unknown fields are refused; malformed JSON is 400.
    a.check(
        Method::POST,
        channels,
        admin,
        Some(r#"{"name": "x", "kind": "slack", "url": "http://127.0.0.1/h", "colour": 1}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    a.check(
        Method::POST,
        channels,
        admin,
        Some("{"),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Secrets go in and never come out.
    let body = json!({"name": "mail", "kind": "email", "to": ["ops@x.test"], "from": "fleet@x.test", "smtp_host": "127.0.0.1", "smtp_port": 2525, "smtp_tls": "none", "smtp_username": "u", "smtp_password": "hunter2-secret"});
    let c = a
        .check(
            Method::POST,
            channels,
            admin,
            Some(&body.to_string()),
            StatusCode::CREATED,
        )
        .await;
    let hook =
        json!({"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/hook-secret-path"});
    let h = a
        .check(
            Method::POST,
            channels,
            admin,
            Some(&hook.to_string()),
            StatusCode::CREATED,
        )
        .await;
    let list = a
        .check(Method::GET, channels, Some(&a.viewer), None, StatusCode::OK)
        .await;
    for shown in [c.to_string(), h.to_string(), list.to_string()] {
        assert!(
            !shown.contains("hunter2-secret") && !shown.contains("hook-secret-path"),
            "{shown}"
        );
    }
    // A PATCH keeps what it does not name, secrets included.
    let id = c["id"].as_str().unwrap();
    a.check(
        Method::PATCH,
        &format!("{channels}/{id}"),
        admin,
        Some(r#"{"smtp_port": 2526}"#),
        StatusCode::OK,
    )
    .await;
    let stored = fleet_alerts::AlertStore::get_channel(&*a.alerts, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(stored.config, fleet_alerts::ChannelConfig::Email { smtp_port: 2526, ref smtp_password, .. } if smtp_password.as_deref() == Some("hunter2-secret"))
    );
    // Viewers read, never change.
    a.check(
        Method::POST,
        channels,
        Some(&a.viewer),
        Some(&hook.to_string()),
        StatusCode::FORBIDDEN,
    )
    .await;

    // Test sends: the outcome class and latency only.
    let hid = h["id"].as_str().unwrap();
    let t = a
        .check(
            Method::POST,
            &format!("{channels}/{hid}/test"),
            admin,
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(t["outcome"], "delivered");
    assert_eq!(a.notifier.received().len(), 1);

    // Silences and windows.
    let silences = "/api/v1/fleet/silences";
    for (body, field) in [
        (
            json!({"matchers": {"region": "eu"}, "starts_at": "2026-04-02T00:00:00Z", "ends_at": "2026-04-01T00:00:00Z"}),
            "ends_at",
        ),
        (
            json!({"matchers": {}, "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-02T00:00:00Z"}),
            "matchers",
        ),
        (
            json!({"matchers": {"rule": "server_sad"}, "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-02T00:00:00Z"}),
            "matchers.rule",
        ),
        (
            json!({"matchers": {"region": "eu"}, "starts_at": "yesterday", "ends_at": "2026-04-02T00:00:00Z"}),
            "starts_at",
        ),
    ] {
        let v = a
            .check(
                Method::POST,
                silences,
                admin,
                Some(&body.to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{v}"
        );
    }
    let windows = "/api/v1/fleet/maintenance-windows";
    for (body, field) in [
        (
            json!({"name": "w", "region": "eu", "weekdays": ["sat"], "start_time": "02:00", "duration_seconds": 60, "time_zone": "Mars/Olympus"}),
            "time_zone",
        ),
        (
            json!({"name": "w", "region": "eu", "group_id": "00000000-0000-4000-8000-000000000001", "starts_at": "2026-04-01T00:00:00Z", "ends_at": "2026-04-02T00:00:00Z"}),
            "server_id",
        ),
        (
            json!({"name": "w", "region": "eu", "starts_at": "2026-04-02T00:00:00Z", "ends_at": "2026-04-01T00:00:00Z"}),
            "ends_at",
        ),
        (
            json!({"name": "w", "region": "eu", "weekdays": ["caturday"], "start_time": "02:00", "duration_seconds": 60, "time_zone": "UTC"}),
            "weekdays",
        ),
    ] {
        let v = a
            .check(
                Method::POST,
                windows,
                admin,
                Some(&body.to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{v}"
        );
    }
    // A policy naming a channel that does not exist.
    let v = a
        .check(Method::POST, "/api/v1/fleet/alerts/policies", admin, Some(&json!({"name": "p", "steps": [{"after_seconds": 0, "channel_ids": [uuid::Uuid::new_v4()]}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY)
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("steps[0].channel_ids:"),
        "{v}"
    );

    // Incidents: bad filters are 400; an ack needs a reason, and records who gave it.
    a.check(
        Method::GET,
        "/api/v1/fleet/incidents?state=sad",
        admin,
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.check(
        Method::GET,
        "/api/v1/fleet/incidents?server_id=nope",
        admin,
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    a.check(
        Method::GET,
        "/api/v1/fleet/incidents?limit=0",
        admin,
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let ack = format!("/api/v1/fleet/incidents/{}/ack", a.incident);
    let v = a
        .check(
            Method::POST,
            &ack,
            admin,
            Some("{}"),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("reason:")
    );
    a.check(
        Method::POST,
        &ack,
        Some(&a.viewer),
        Some(r#"{"reason": "x"}"#),
        StatusCode::FORBIDDEN,
    )
    .await;
    let v = a
        .check(
            Method::POST,
            &ack,
            admin,
            Some(r#"{"reason": "disk swap under way"}"#),
            StatusCode::OK,
        )
        .await;
    assert_eq!(v["state"], "acknowledged");
    assert_eq!(v["acknowledged_by"], "admin");
    assert_eq!(v["ack_reason"], "disk swap under way");
    let d = a
        .check(
            Method::GET,
            &format!("/api/v1/fleet/incidents/{}", a.incident),
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    assert!(
        d["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "acknowledged")
    );
    a.check(
        Method::POST,
        &format!("/api/v1/fleet/incidents/{}/ack", uuid::Uuid::new_v4()),
        admin,
        Some(r#"{"reason": "x"}"#),
        StatusCode::NOT_FOUND,
    )
    .await;
    // The summary counts open incidents by severity.
    let s = a
        .check(
            Method::GET,
            "/api/v1/fleet/summary",
            admin,
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(s["incidents"]["critical"], 1);
}

#[tokio::test]
async fn groups_gain_members_in_bulk_and_queue_their_checks() {
    let a = api().await;
    let admin = Some(a.admin.as_str());
    let mut servers = Vec::new();
    for i in 0..5 {
        servers.push(a.server(&format!("bulk-{i}")).await);
    }
    let g = a
        .check(
            Method::POST,
            "/api/v1/fleet/groups",
            admin,
            Some(r#"{"name": "bulk"}"#),
            StatusCode::CREATED,
        )
        .await;
    let members = format!("/api/v1/fleet/groups/{}/members", g["id"].as_str().unwrap());
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut ids: Vec<String> = servers.clone();
    ids.push(unknown);
    let v = a
        .check(
            Method::POST,
            &members,
            admin,
            Some(&json!({"server_ids": ids}).to_string()),
            StatusCode::OK,
        )
        .await;
    assert_eq!(
        (
            v["requested"].as_u64(),
            v["changed"].as_u64(),
            v["members"].as_u64()
        ),
        (Some(6), Some(5), Some(5))
    );
    // Listing by group shows them.
    let list = a
        .check(
            Method::GET,
            &format!("/api/v1/fleet/servers?group={}", g["id"].as_str().unwrap()),
            admin,
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(list["servers"].as_array().unwrap().len(), 5);
    // At most 1,000 ids, at least one; viewers may not; an unknown group is 404.
    let many: Vec<String> = (0..1001)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let v = a
        .check(
            Method::POST,
            &members,
            admin,
            Some(&json!({"server_ids": many}).to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("server_ids:")
    );
    a.check(
        Method::POST,
        &members,
        admin,
        Some(r#"{"server_ids": []}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    a.check(
        Method::POST,
        &members,
        Some(&a.viewer),
        Some(&json!({"server_ids": [servers[0]]}).to_string()),
        StatusCode::FORBIDDEN,
    )
    .await;
    a.check(
        Method::POST,
        &format!("/api/v1/fleet/groups/{}/members", uuid::Uuid::new_v4()),
        admin,
        Some(&json!({"server_ids": [servers[0]]}).to_string()),
        StatusCode::NOT_FOUND,
    )
    .await;

    // A group check queues at most FLEET_BULK_CHECK_MAX (3 here); the results are stored.
    let mut sub = a.events.subscribe("test", 64);
    let check = format!("/api/v1/fleet/groups/{}/check", g["id"].as_str().unwrap());
    let v = a
        .check(Method::POST, &check, admin, None, StatusCode::ACCEPTED)
        .await;
    assert_eq!(
        (v["queued"].as_u64(), v["skipped"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    let mut checked = std::collections::BTreeSet::new();
    while checked.len() < 3 {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap()
            .unwrap();
        if let fleet_core::Received::Event(e) = got
            && let fleet_core::Event::Checked { check, manual, .. } = &*e
        {
            assert!(manual);
            checked.insert(check.server_id);
        }
    }
    // Removal in bulk.
    let v = a
        .check(
            Method::DELETE,
            &members,
            admin,
            Some(&json!({"server_ids": servers[..2]}).to_string()),
            StatusCode::OK,
        )
        .await;
    assert_eq!(
        (v["changed"].as_u64(), v["members"].as_u64()),
        (Some(2), Some(3))
    );
}

// ---- the dashboard ------------------------------------------------------------------------

const ORIGIN: &str = "http://fleet.test";

/// What a browser request answered: status, headers, body as text.
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Api {
    /// A browser-like request: Host `fleet.test`, a cookie, extra headers, a body.
    async fn browse(
        &self,
        method: Method,
        path: &str,
        cookie: Option<&str>,
        extra: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "fleet.test");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, format!("{}={c}", web::session::COOKIE));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((content_type, b)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                Body::from(b)
            }
            None => Body::empty(),
        };
        let mut req = req.body(body).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 9], 40000))));
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = if is_stream(&res) {
            first_frame(res).await
        } else {
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Signs in with `token` and returns the session cookie's value.
    async fn sign_in(&self, token: &str) -> String {
        let a = self
            .browse(
                Method::POST,
                "/dashboard/sign-in",
                None,
                &[("origin", ORIGIN)],
                Some((
                    "application/x-www-form-urlencoded",
                    format!("token={token}&next=%2Fdashboard%2Fservers"),
                )),
            )
            .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        assert_eq!(a.headers[header::LOCATION], "/dashboard/servers");
        let cookie = a.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        let value = cookie
            .strip_prefix("fleet_session=")
            .and_then(|c| c.split(';').next())
            .unwrap();
        value.to_owned()
    }
}

fn csrf_in(page: &str) -> String {
    let at = page
        .find("name=\"csrf-token\" content=\"")
        .expect("a csrf meta tag")
        + 27;
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn signing_in_sets_a_strict_http_only_cookie_and_pages_need_it() {
    let a = api().await;
    let away = a.browse(Method::GET, "/dashboard/", None, &[], None).await;
    assert_eq!(away.status, StatusCode::SEE_OTHER);
    assert_eq!(
        away.headers[header::LOCATION],
        "/dashboard/sign-in?next=%2Fdashboard%2F"
    );
    let form = a
        .browse(Method::GET, "/dashboard/sign-in", None, &[], None)
        .await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("type=\"password\""));

    let bad = a
        .browse(
            Method::POST,
            "/dashboard/sign-in",
            None,
            &[("origin", ORIGIN)],
            Some((
                "application/x-www-form-urlencoded",
                "token=fleet_wrongwrongwrongwrong".into(),
            )),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(bad.body.contains("That token is not valid"), "{}", bad.body);
    assert!(bad.headers.get(header::SET_COOKIE).is_none());
    // A sign-in posted by another site is refused: it would sign the browser in as the
    // other site's token.
    let forged = a
        .browse(
            Method::POST,
            "/dashboard/sign-in",
            None,
            &[("origin", "http://evil.example")],
            Some((
                "application/x-www-form-urlencoded",
                format!("token={}", a.viewer),
            )),
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);

    let ok = a
        .browse(
            Method::POST,
            "/dashboard/sign-in",
            None,
            &[("origin", ORIGIN)],
            Some((
                "application/x-www-form-urlencoded",
                format!("token={}", a.viewer),
            )),
        )
        .await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    let cookie = ok.headers[header::SET_COOKIE].to_str().unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain http without FLEET_PUBLIC_URL: {cookie}"
    );
    let session = a.sign_in(&a.viewer).await;
    for path in [
        "/dashboard/",
        "/dashboard/servers",
        "/dashboard/groups",
        "/dashboard/incidents",
        "/dashboard/maintenance",
    ] {
        let page = a.browse(Method::GET, path, Some(&session), &[], None).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        let csp = page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(page.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(page.headers[header::CACHE_CONTROL], "no-store");
        assert!(!page.body.contains("<script>"), "{path}: an inline script");
    }
    // An unknown cookie is no session.
    let stale = a
        .browse(Method::GET, "/dashboard/", Some(&"x".repeat(43)), &[], None)
        .await;
    assert_eq!(stale.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn sign_ins_count_against_the_failure_limit() {
    let a = api_with_limit(2).await;
    let attempt = || async {
        a.browse(
            Method::POST,
            "/dashboard/sign-in",
            None,
            &[("origin", ORIGIN)],
            Some((
                "application/x-www-form-urlencoded",
                "token=fleet_wrongwrongwrongwrong".into(),
            )),
        )
        .await
        .status
    };
    assert_eq!(attempt().await, StatusCode::UNAUTHORIZED);
    assert_eq!(attempt().await, StatusCode::UNAUTHORIZED);
    assert_eq!(attempt().await, StatusCode::UNAUTHORIZED);
    assert_eq!(attempt().await, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn cookie_changes_need_the_csrf_token_and_the_origin_and_bearer_ones_do_not() {
    let a = api().await;
    let session = a.sign_in(&a.admin).await;
    let page = a
        .browse(Method::GET, "/dashboard/servers", Some(&session), &[], None)
        .await;
    let csrf = csrf_in(&page.body);
    let body = || Some(("application/json", r#"{"name": "edge"}"#.to_owned()));
    let post = |extra: Vec<(&'static str, String)>, name: &'static str| {
        let session = session.clone();
        let a = &a;
        async move {
            let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            a.browse(
                Method::POST,
                "/api/v1/fleet/groups",
                Some(&session),
                &extra,
                Some(("application/json", format!(r#"{{"name": "{name}"}}"#))),
            )
            .await
        }
    };
    let none = post(vec![("origin", ORIGIN.into())], "g1").await;
    assert_eq!(none.status, StatusCode::FORBIDDEN);
    assert!(none.body.contains("csrf"), "{}", none.body);
    let wrong = post(
        vec![("origin", ORIGIN.into()), ("x-csrf-token", "nope".into())],
        "g1",
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let cross = post(
        vec![
            ("origin", "http://evil.example".into()),
            ("x-csrf-token", csrf.clone()),
        ],
        "g1",
    )
    .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);
    assert!(cross.body.contains("cross_origin"), "{}", cross.body);
    let no_origin = post(vec![("x-csrf-token", csrf.clone())], "g1").await;
    assert_eq!(no_origin.status, StatusCode::FORBIDDEN);
    let good = post(
        vec![("origin", ORIGIN.into()), ("x-csrf-token", csrf.clone())],
        "g1",
    )
    .await;
    assert_eq!(good.status, StatusCode::CREATED, "{}", good.body);
    // Reading with the cookie needs no token.
    let read = a
        .browse(
            Method::GET,
            "/api/v1/fleet/groups",
            Some(&session),
            &[],
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    // A bearer request is not a browser's: no CSRF token, no Origin.
    let (status, _) = a
        .call(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(&a.admin),
            Some(r#"{"name": "g2"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let _ = body;
    // A viewer's session may read, not change.
    let viewer = a.sign_in(&a.viewer).await;
    let vpage = a
        .browse(Method::GET, "/dashboard/servers", Some(&viewer), &[], None)
        .await;
    let vcsrf = csrf_in(&vpage.body);
    let refused = a
        .browse(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(&viewer),
            &[("origin", ORIGIN), ("x-csrf-token", &vcsrf)],
            Some(("application/json", r#"{"name": "g3"}"#.into())),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.body.contains("forbidden"));
}

#[tokio::test]
async fn sessions_end_on_sign_out_and_when_their_token_is_revoked() {
    let a = api().await;
    let session = a.sign_in(&a.viewer).await;
    let read = |s: String| {
        let a = &a;
        async move {
            a.browse(Method::GET, "/api/v1/fleet/servers", Some(&s), &[], None)
                .await
                .status
        }
    };
    assert_eq!(read(session.clone()).await, StatusCode::OK);
    a.memory.revoke_token("viewer").await.unwrap();
    assert_eq!(read(session.clone()).await, StatusCode::UNAUTHORIZED);

    let admin = a.sign_in(&a.admin).await;
    let page = a
        .browse(Method::GET, "/dashboard/", Some(&admin), &[], None)
        .await;
    let csrf = csrf_in(&page.body);
    let forged = a
        .browse(
            Method::POST,
            "/dashboard/sign-out",
            Some(&admin),
            &[("origin", ORIGIN)],
            Some(("application/x-www-form-urlencoded", "csrf=wrong".into())),
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        read(admin.clone()).await,
        StatusCode::OK,
        "a forged sign-out did nothing"
    );
    let out = a
        .browse(
            Method::POST,
            "/dashboard/sign-out",
            Some(&admin),
            &[("origin", ORIGIN)],
            Some(("application/x-www-form-urlencoded", format!("csrf={csrf}"))),
        )
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(read(admin).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn names_render_as_text_and_viewers_see_no_admin_action() {
    let a = api().await;
    let xss = "<script>alert(1)</script>";
    let body = json!({"name": xss, "api_url": "http://127.0.0.1:9", "api_token": "t"}).to_string();
    let (status, v) = a
        .call(
            Method::POST,
            "/api/v1/fleet/servers",
            Some(&a.admin),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let viewer = a.sign_in(&a.viewer).await;
    let admin = a.sign_in(&a.admin).await;
    for path in [
        "/dashboard/servers".to_owned(),
        format!("/dashboard/servers/{id}"),
    ] {
        let page = a.browse(Method::GET, &path, Some(&viewer), &[], None).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}"
        );
        assert!(
            !page.body.contains(xss),
            "{path}: the name went out as markup"
        );
        for admin_only in ["Check now", "Pause probing", "data-method", "data-bulk"] {
            assert!(
                !page.body.contains(admin_only),
                "{path}: a viewer sees {admin_only}"
            );
        }
        let page = a.browse(Method::GET, &path, Some(&admin), &[], None).await;
        assert!(
            page.body.contains("Check now") && page.body.contains("Pause probing"),
            "{path}"
        );
        assert!(
            page.body.contains("Mute alerts 1 h"),
            "{path}: the window action is apart"
        );
    }
    let groups = a
        .browse(Method::GET, "/dashboard/groups", Some(&viewer), &[], None)
        .await;
    assert!(!groups.body.contains("Create group"));
    let overview = a
        .browse(Method::GET, "/dashboard/", Some(&viewer), &[], None)
        .await;
    assert!(
        !overview.body.contains("Workers"),
        "worker status is for admins"
    );
    let overview = a
        .browse(Method::GET, "/dashboard/", Some(&admin), &[], None)
        .await;
    assert!(overview.body.contains("Workers"));
}

#[tokio::test]
async fn the_server_list_is_searched_filtered_sorted_and_paginated_in_the_url() {
    let a = api().await;
    for i in 0..60 {
        let body = json!({"name": format!("web-{i:02}"), "api_url": "http://127.0.0.1:9", "api_token": "t", "region": if i % 2 == 0 { "eu" } else { "us" }}).to_string();
        let (status, v) = a
            .call(
                Method::POST,
                "/api/v1/fleet/servers",
                Some(&a.admin),
                Some(&body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let s = a.sign_in(&a.viewer).await;
    let page = |path: &str| {
        let (a, s, path) = (&a, s.clone(), path.to_owned());
        async move { a.browse(Method::GET, &path, Some(&s), &[], None).await }
    };
    let first = page("/dashboard/servers?q=web-&sort=-name").await;
    assert!(first.body.contains("Showing 1–50 of 60"), "{}", first.body);
    assert!(first.body.find("web-59").unwrap() < first.body.find("web-58").unwrap());
    assert!(
        first
            .body
            .contains("href=\"/dashboard/servers?q=web-&amp;sort=-name&amp;page=2\"")
    );
    let second = page("/dashboard/servers?q=web-&sort=-name&page=2").await;
    assert!(second.body.contains("Showing 51–60 of 60"));
    let eu = page("/dashboard/servers?q=web-&region=eu").await;
    assert!(eu.body.contains("of 30"), "{}", eu.body);
    assert!(!eu.body.contains(">web-01<"));
    for bad in ["?page=0", "?status=broken", "?sort=size", "?group=nope"] {
        let p = page(&format!("/dashboard/servers{bad}")).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // Incidents filter by group too: the fixture's one incident is in no group.
    let all = page("/dashboard/incidents").await;
    assert!(all.body.contains("1 incidents"), "{}", all.body);
    let (_, g) = a
        .call(
            Method::POST,
            "/api/v1/fleet/groups",
            Some(&a.admin),
            Some(r#"{"name": "empty"}"#),
        )
        .await;
    let none = page(&format!(
        "/dashboard/incidents?group={}",
        g["id"].as_str().unwrap()
    ))
    .await;
    assert!(none.body.contains("0 incidents"), "{}", none.body);
    for bad in ["?group=nope", "?state=sleepy", "?severity=meh", "?page=0"] {
        let p = page(&format!("/dashboard/incidents{bad}")).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn assets_are_cached_by_hash_and_compressed() {
    let a = api().await;
    let url = web::asset_url("app.js");
    let first = a
        .browse(
            Method::GET,
            &url,
            None,
            &[("accept-encoding", "gzip")],
            None,
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers[header::CONTENT_ENCODING], "gzip");
    assert!(
        first.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    let etag = first.headers[header::ETAG].to_str().unwrap().to_owned();
    let again = a
        .browse(Method::GET, &url, None, &[("if-none-match", &etag)], None)
        .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let missing = a
        .browse(Method::GET, "/dashboard/assets/0/none.js", None, &[], None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

/// Three changes of one server's health, recorded as the writer would.
async fn changes(a: &Api, n: usize) {
    let s = a
        .memory
        .create_server(NewServer::new(
            format!("flip-{}", uuid::Uuid::new_v4()),
            "http://127.0.0.1:9",
        ))
        .await
        .unwrap();
    let t0 = base_time();
    let checks: Vec<_> = (0..n)
        .map(|i| {
            let status = if i % 2 == 0 {
                fleet_core::HealthStatus::Critical
            } else {
                fleet_core::HealthStatus::Healthy
            };
            check_at(s.id, t0 + time::Duration::seconds(i as i64), status)
        })
        .collect();
    a.memory.record_health(&checks).await.unwrap();
}

#[tokio::test]
async fn the_stream_resumes_by_id_resyncs_past_its_rate_and_has_a_cap() {
    let a = api().await;
    changes(&a, 3).await;
    let (oldest, newest) = fleet_core::ChangeLog::change_ids(&*a.memory)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(newest - oldest, 2);
    let open = |last: Option<String>| {
        let a = &a;
        async move {
            let mut req = Request::builder()
                .uri("/api/v1/fleet/events")
                .header(header::AUTHORIZATION, format!("Bearer {}", a.viewer));
            if let Some(l) = last {
                req = req.header("last-event-id", l);
            }
            let res = a
                .router
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            (res.status(), res.into_body())
        }
    };
    // Resuming from before the three: all three, in order, ids naming both sources.
    let (status, mut body) = open(Some(format!("c-{}", oldest - 1))).await;
    assert_eq!(status, StatusCode::OK);
    let mut text = String::new();
    while text.matches("event: change").count() < 3 {
        text.push_str(&next_frame(&mut body).await);
    }
    for id in oldest..=newest {
        assert!(text.contains(&format!("id: c-{id}.i-")), "{text}");
    }
    assert!(
        text.find(&format!("c-{oldest}.")).unwrap() < text.find(&format!("c-{newest}.")).unwrap()
    );
    // A later change arrives live, without asking.
    changes(&a, 1).await;
    let live = next_frame(&mut body).await;
    assert!(
        live.contains("event: change") && live.contains("flip-"),
        "{live}"
    );
    // Two streams are the cap here: a third gets 503, and a slot frees when one closes.
    let (second, second_body) = open(None).await;
    assert_eq!(second, StatusCode::OK);
    let (third, _) = open(None).await;
    assert_eq!(third, StatusCode::SERVICE_UNAVAILABLE);
    drop(second_body);
    // Far behind, with more than FLEET_SSE_MAX_RATE (5 here) changes to carry: one resync.
    drop(body);
    changes(&a, 8).await;
    let (status, mut body) = open(Some(format!("c-{newest}"))).await;
    assert_eq!(status, StatusCode::OK);
    let first = next_frame(&mut body).await;
    assert!(first.starts_with("event: resync"), "{first}");
    let (status, _) = open(Some("bogus".into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_series_come_in_buckets_and_bad_ranges_are_refused() {
    let a = api().await;
    let s = a.server("charted").await;
    let id = ServerId(s.parse().unwrap());
    let t0 = base_time();
    let checks: Vec<_> = (0..120)
        .map(|i| {
            check_at(
                id,
                t0 + time::Duration::seconds(30 * i),
                fleet_core::HealthStatus::Healthy,
            )
        })
        .collect();
    a.memory.record_health(&checks).await.unwrap();
    // The clock stands at base + 30 min: the last hour holds 60 checks, in 6 buckets of 10.
    let v = a
        .check(
            Method::GET,
            &format!("/api/v1/fleet/servers/{s}/health-series?range=1h&points=6"),
            Some(&a.viewer),
            None,
            StatusCode::OK,
        )
        .await;
    let counts: Vec<u64> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["checks"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 60, "{v}");
    assert!(counts.len() <= 6);
    assert_eq!(v["step_seconds"], 600.0);
    for bad in [
        "range=2h",
        "points=0",
        "points=1001",
        "from=2026-01-01T00:00:00Z",
        "range=1h&from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
    ] {
        a.check(
            Method::GET,
            &format!("/api/v1/fleet/servers/{s}/health-series?{bad}"),
            Some(&a.viewer),
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
}

#[tokio::test]
async fn node_exporter_servers_need_no_token_and_others_do() {
    let a = api().await;
    let (status, v) = a
        .call(
            Method::POST,
            "/api/v1/fleet/servers",
            Some(&a.admin),
            Some(
                r#"{"name": "db-7", "api_url": "http://127.0.0.1:9100", "kind": "node_exporter"}"#,
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["kind"].as_str(), v["metrics_path"].as_str()),
        (Some("node_exporter"), None)
    );
    let id = v["id"].as_str().unwrap().to_owned();
    let (status, v) = a
        .call(
            Method::PATCH,
            &format!("/api/v1/fleet/servers/{id}"),
            Some(&a.admin),
            Some(r#"{"metrics_path": "/node/metrics"}"#),
        )
        .await;
    assert_eq!(
        (status, v["metrics_path"].as_str()),
        (StatusCode::OK, Some("/node/metrics"))
    );
    for (body, field) in [
        (
            r#"{"name": "web-9", "api_url": "http://127.0.0.1:9"}"#,
            "api_token",
        ),
        (
            r#"{"name": "db-8", "api_url": "http://127.0.0.1:9", "kind": "node_exporter", "metrics_path": "metrics?x=1"}"#,
            "metrics_path",
        ),
        (
            r#"{"name": "db-9", "api_url": "http://127.0.0.1:9", "kind": "snmp"}"#,
            "kind",
        ),
    ] {
        let (status, v) = a
            .call(
                Method::POST,
                "/api/v1/fleet/servers",
                Some(&a.admin),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
}
