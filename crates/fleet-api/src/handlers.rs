//! Route handlers. Input is validated here, with a 4xx and a clear message for anything bad.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::{
    ApiToken, ChangeQuery, GroupFields, GroupId, HealthStatus, HistoryQuery, NewServer, NotChecked,
    Resolution, ServerFilter, ServerId, ServerKind, ServerStatus, ServerUpdate,
};
use serde::de::{Deserialize, Deserializer};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use uuid::Uuid;

use super::views;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState};

type ApiResult = Result<Response, ApiError>;

fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Distinguishes an absent field (`None`) from an explicit null (`Some(None)`).
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

const MAX_METADATA: usize = 16 * 1024;

fn metadata(value: &Value) -> Result<(), ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "metadata must be a JSON object",
        ));
    }
    if value.to_string().len() > MAX_METADATA {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "metadata must be at most 16 KiB",
        ));
    }
    Ok(())
}

/// A list's `limit`: 1 to 1,000, 100 when absent.
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request("limit must be 1 to 1000"))
    }
}

fn parse<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

fn time_param(field: &str, value: &Option<String>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .as_deref()
        .map(|v| {
            OffsetDateTime::parse(v, &Rfc3339).map_err(|_| {
                ApiError::bad_request(format!(
                    "{field} must be an RFC 3339 time like 2026-11-28T06:00:00Z, got `{v}`"
                ))
            })
        })
        .transpose()
}

/// Servers by current health, every health present, `unknown` for never checked.
pub(crate) fn by_health<'a>(
    tallies: impl Iterator<Item = &'a fleet_core::ServerTally>,
) -> BTreeMap<String, u64> {
    let mut by: BTreeMap<String, u64> = HealthStatus::ALL
        .iter()
        .map(|h| (h.as_str().to_owned(), 0))
        .collect();
    by.insert("unknown".into(), 0);
    for t in tallies {
        *by.entry(t.health.map_or("unknown", |h| h.as_str()).to_owned())
            .or_default() += t.count;
    }
    by
}

/// Active servers by current health.
async fn active_by_health(app: &AppState) -> Result<BTreeMap<String, u64>, ApiError> {
    let tallies = app.tallies.get(&*app.store).await?;
    Ok(by_health(
        tallies.iter().filter(|t| t.status == ServerStatus::Active),
    ))
}

pub(crate) async fn healthz() -> ApiResult {
    ok(views::Alive {
        status: "ok".into(),
    })
}

pub(crate) async fn readyz(State(app): State<AppState>) -> ApiResult {
    let store_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await,
        Ok(Ok(()))
    );
    let (running, keys_ok) = {
        let w = app.workers.read().unwrap_or_else(|e| e.into_inner());
        let health = w.health.as_ref().map(|h| h.snapshot());
        let metrics = w.metrics.as_ref().map(|h| h.snapshot());
        let running = health.as_ref().is_some_and(|s| s.running)
            && metrics.as_ref().is_some_and(|s| s.running);
        let keys_ok = [health, metrics].iter().flatten().all(|s| {
            !s.last_cycle_not_checked.contains_key(
                NotChecked::TokenUnreadable {
                    key_id: String::new(),
                }
                .kind(),
            )
        });
        (running, keys_ok)
    };
    let ready = store_ok && running && keys_ok;
    let body = views::Ready {
        ready,
        store: if store_ok { "ok" } else { "unavailable" }.into(),
        workers_running: running,
        keys: if keys_ok { "ok" } else { "unopenable" }.into(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)).into_response())
}

pub(crate) async fn openapi() -> ApiResult {
    ok(super::openapi())
}

pub(crate) async fn workers_status(State(app): State<AppState>) -> ApiResult {
    // The workers' own figures must show while the store is away: the counts are then null.
    let servers = active_by_health(&app).await.ok();
    let incidents = crate::alerts::open_incidents(&app).await;
    let w = app.workers.read().unwrap_or_else(|e| e.into_inner());
    let health = w.health.as_ref().map(|h| h.snapshot());
    let metrics = w.metrics.as_ref().map(|h| h.snapshot());
    ok(views::WorkersStatus {
        health_worker: views::HealthWorker::new(
            health.as_ref(),
            w.intervals.0,
            w.error.as_deref(),
            servers,
        ),
        metrics_worker: views::MetricsWorker::new(
            metrics.as_ref(),
            w.intervals.1,
            w.error.as_deref(),
        ),
        events: app.events.stats().into(),
        incidents,
        alerts: crate::alerts::stats(&app),
        instance: views::InstanceShare::new(
            app.cluster.as_ref().map(|c| c.stats.snapshot()).as_ref(),
        ),
        timestamp: views::ts(app.clock.now()),
    })
}

pub(crate) async fn instances(State(app): State<AppState>) -> ApiResult {
    let total = u64::from(fleet_core::cluster::BUCKETS);
    let Some(cluster) = &app.cluster else {
        // A store this process has alone: it is the only instance, and owns everything.
        let servers = active_by_health(&app).await?.values().sum();
        return ok(views::InstanceList {
            instances: vec![views::Instance {
                id: "local".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                heartbeat_age_seconds: 0.0,
                live: true,
                buckets: total,
                servers,
                leader: true,
                this: true,
            }],
            live: 1,
            buckets_total: total,
        });
    };
    let me = cluster.stats.snapshot().instance_id;
    let listed = cluster.leases.instances(cluster.ttl).await?;
    let instances: Vec<views::Instance> = listed
        .into_iter()
        .map(|r| views::Instance::new(r, &me))
        .collect();
    ok(views::InstanceList {
        live: instances.iter().filter(|i| i.live).count() as u64,
        instances,
        buckets_total: total,
    })
}

pub(crate) async fn prometheus(State(app): State<AppState>) -> ApiResult {
    let mut out = String::new();
    let (health, metrics) = {
        let w = app.workers.read().unwrap_or_else(|e| e.into_inner());
        (
            w.health.as_ref().map(|h| h.snapshot()),
            w.metrics.as_ref().map(|h| h.snapshot()),
        )
    };
    let families: [(&str, &str, &str); 9] = [
        (
            "fleet_worker_checks_total",
            "counter",
            "Checks completed, by worker and result.",
        ),
        ("fleet_worker_cycles_total", "counter", "Cycles completed."),
        (
            "fleet_worker_overruns_total",
            "counter",
            "Ticks that fell while a cycle still ran.",
        ),
        ("fleet_worker_in_flight", "gauge", "Checks running now."),
        (
            "fleet_worker_results_pending",
            "gauge",
            "Results waiting to be written.",
        ),
        (
            "fleet_worker_results_dropped_total",
            "counter",
            "Results dropped (buffer full or lost at shutdown).",
        ),
        (
            "fleet_worker_last_cycle_seconds",
            "gauge",
            "Duration of the last completed cycle.",
        ),
        ("fleet_worker_running", "gauge", "1 while the worker runs."),
        (
            "fleet_worker_starts_delayed_total",
            "counter",
            "Checks whose start waited for a free slot: more of the fleet hung than max_in_flight holds.",
        ),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in [&health, &metrics].into_iter().flatten() {
            let w = s.worker;
            let _ = match name {
                "fleet_worker_checks_total" => writeln!(
                    out,
                    "{name}{{worker=\"{w}\",result=\"success\"}} {}\n{name}{{worker=\"{w}\",result=\"failure\"}} {}",
                    s.successful, s.failed
                ),
                "fleet_worker_cycles_total" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.cycles)
                }
                "fleet_worker_overruns_total" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.overruns)
                }
                "fleet_worker_in_flight" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.in_flight)
                }
                "fleet_worker_results_pending" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.pending)
                }
                "fleet_worker_results_dropped_total" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.dropped)
                }
                "fleet_worker_starts_delayed_total" => {
                    writeln!(out, "{name}{{worker=\"{w}\"}} {}", s.starts_delayed)
                }
                "fleet_worker_last_cycle_seconds" => writeln!(
                    out,
                    "{name}{{worker=\"{w}\"}} {}",
                    s.last_duration_seconds.unwrap_or(0.0)
                ),
                _ => writeln!(out, "{name}{{worker=\"{w}\"}} {}", u8::from(s.running)),
            };
        }
    }
    let l = &app.listener;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let events = app.events.stats();
    let share =
        views::InstanceShare::new(app.cluster.as_ref().map(|c| c.stats.snapshot()).as_ref());
    for (name, kind, help, value) in [
        (
            "fleet_instances_live",
            "gauge",
            "Live instances sharing the fleet, this one included, at its last heartbeat.",
            share.live_instances,
        ),
        (
            "fleet_buckets_owned",
            "gauge",
            "Buckets (of 1,024) this instance owns.",
            share.buckets_owned,
        ),
        (
            "fleet_lease_takeovers_total",
            "counter",
            "Buckets this instance took (free or expired).",
            share.lease_takeovers,
        ),
        (
            "fleet_fenced_writes_rejected_total",
            "counter",
            "Results refused because their bucket changed hands, dropped as superseded.",
            share.fenced_writes_rejected,
        ),
        (
            "fleet_is_leader",
            "gauge",
            "1 while this instance leads fleet-wide jobs.",
            u64::from(share.leader),
        ),
        (
            "fleet_api_connections_refused_total",
            "counter",
            "API connections closed on arrival at FLEET_API_MAX_CONNECTIONS.",
            load(&l.refused),
        ),
        (
            "fleet_api_accept_errors_total",
            "counter",
            "Connections the API failed to accept (e.g. out of file descriptors).",
            load(&l.accept_errors),
        ),
        (
            "fleet_api_connections_open",
            "gauge",
            "API connections open now.",
            load(&l.open),
        ),
        (
            "fleet_events_published_total",
            "counter",
            "Result events published.",
            events.published,
        ),
        (
            "fleet_events_lost_total",
            "counter",
            "Events dropped because a subscriber's queue was full.",
            events.lost,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP fleet_event_subscriber_lost_total Events dropped for each current subscriber.\n# TYPE fleet_event_subscriber_lost_total counter"
    );
    for sub in &events.subscribers {
        let _ = writeln!(
            out,
            "fleet_event_subscriber_lost_total{{subscriber=\"{}\"}} {}",
            sub.name.replace(['\\', '"', '\n'], "_"),
            sub.lost
        );
    }
    if let Some(alerts) = &app.alerts {
        let a = alerts.stats();
        for (name, help, value) in [
            (
                "fleet_alert_results_total",
                "Results the alert rules evaluated.",
                a.results,
            ),
            (
                "fleet_alert_lagged_total",
                "Results the alert rules missed by falling behind.",
                a.lagged,
            ),
            (
                "fleet_alert_transitions_total",
                "Alert phase transitions written.",
                a.transitions,
            ),
            (
                "fleet_alert_incidents_opened_total",
                "Incidents opened.",
                a.opened,
            ),
            (
                "fleet_alert_notices_sent_total",
                "Notices delivered.",
                a.sent,
            ),
            (
                "fleet_alert_notices_retried_total",
                "Delivery attempts that failed and will be retried.",
                a.retried,
            ),
            (
                "fleet_alert_notices_failed_total",
                "Notices given up.",
                a.failed,
            ),
            (
                "fleet_alert_notices_dropped_total",
                "Notices dropped because a channel's backlog was full.",
                a.dropped,
            ),
            (
                "fleet_alert_write_errors_total",
                "Failed writes of alert state (retried).",
                a.write_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        if let Some(open) = crate::alerts::open_incidents(&app).await {
            let _ = writeln!(
                out,
                "# HELP fleet_incidents_open Open incidents, by severity.\n# TYPE fleet_incidents_open gauge"
            );
            for (severity, n) in open {
                let _ = writeln!(out, "fleet_incidents_open{{severity=\"{severity}\"}} {n}");
            }
        }
    }
    if let Ok(by) = active_by_health(&app).await {
        let _ = writeln!(
            out,
            "# HELP fleet_servers Active servers by current health.\n# TYPE fleet_servers gauge"
        );
        for (h, n) in by {
            let _ = writeln!(out, "fleet_servers{{health_status=\"{h}\"}} {n}");
        }
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    health_status: Option<String>,
    region: Option<String>,
    environment: Option<String>,
    tag: Option<String>,
    group: Option<Uuid>,
    search: Option<String>,
    sort: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

pub(crate) async fn list_servers(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult {
    let limit = page_limit(q.limit)?;
    for (param, value) in [
        ("search", &q.search),
        ("region", &q.region),
        ("environment", &q.environment),
        ("tag", &q.tag),
    ] {
        if let Some(v) = value {
            fleet_core::validate::text(param, v, 255)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
    }
    let filter = ServerFilter {
        status: q
            .status
            .as_deref()
            .map(|s| parse("status", s))
            .transpose()?,
        health_status: q
            .health_status
            .as_deref()
            .map(|s| parse("health_status", s))
            .transpose()?,
        region: q.region,
        environment: q.environment,
        tag: q.tag,
        search: q.search,
        group: q.group.map(GroupId),
        limit: Some(limit),
        offset: q.offset.unwrap_or(0).min(1_000_000_000),
        sort: q
            .sort
            .as_deref()
            .map(|s| parse("sort", s))
            .transpose()?
            .unwrap_or_default(),
    };
    let (servers, total) = tokio::try_join!(
        app.store.list_servers(&filter),
        app.store.count_servers(&filter)
    )?;
    ok(views::ServerList {
        servers: servers.iter().map(Into::into).collect(),
        total,
        limit,
        offset: filter.offset,
    })
}

/// A chart's range: the last `range` (1h, 24h, 7d or 30d; 24h when absent) or `from`..`to`,
/// cut into `points` buckets (1 to 1,000; 500 when absent).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SeriesQuery {
    range: Option<String>,
    from: Option<String>,
    to: Option<String>,
    points: Option<u32>,
}

impl SeriesQuery {
    fn window(&self, now: OffsetDateTime) -> Result<fleet_core::SeriesWindow, ApiError> {
        let points = self.points.unwrap_or(500);
        if !(1..=fleet_core::series::MAX_BUCKETS).contains(&points) {
            return Err(ApiError::bad_request("points must be 1 to 1000"));
        }
        let (from, to) = match (time_param("from", &self.from)?, time_param("to", &self.to)?) {
            (Some(from), Some(to)) => {
                if self.range.is_some() {
                    return Err(ApiError::bad_request(
                        "range: give either range or from and to",
                    ));
                }
                (from, to)
            }
            (None, None) => {
                let span = match self.range.as_deref().unwrap_or("24h") {
                    "1h" => time::Duration::hours(1),
                    "24h" => time::Duration::hours(24),
                    "7d" => time::Duration::days(7),
                    "30d" => time::Duration::days(30),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "range: unknown range `{other}`; expected 1h, 24h, 7d or 30d"
                        )));
                    }
                };
                (now - span, now)
            }
            _ => return Err(ApiError::bad_request("from and to go together")),
        };
        fleet_core::SeriesWindow::new(from, to, points)
            .ok_or_else(|| ApiError::bad_request("from must be before to"))
    }
}

/// A series' window, once the server is known to exist.
async fn series_window(
    app: &AppState,
    id: Uuid,
    q: &SeriesQuery,
) -> Result<fleet_core::SeriesWindow, ApiError> {
    let window = q.window(app.clock.now())?;
    known_server(app, id).await?;
    Ok(window)
}

pub(crate) async fn health_series(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> ApiResult {
    let window = series_window(&app, id, &q).await?;
    let buckets = app.store.health_series(ServerId(id), window).await?;
    ok(views::HealthSeries {
        server_id: id,
        from: views::ts(window.from),
        to: views::ts(window.to),
        step_seconds: window.step().as_seconds_f64(),
        buckets: buckets.iter().map(Into::into).collect(),
    })
}

pub(crate) async fn metrics_series(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<SeriesQuery>,
) -> ApiResult {
    let window = series_window(&app, id, &q).await?;
    let buckets = app.store.metrics_series(ServerId(id), window).await?;
    ok(views::MetricsSeries {
        server_id: id,
        from: views::ts(window.from),
        to: views::ts(window.to),
        step_seconds: window.step().as_seconds_f64(),
        buckets: buckets.iter().map(Into::into).collect(),
    })
}

/// A server to register.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServer {
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    /// An absolute http or https URL without credentials.
    #[schema(format = "uri")]
    api_url: String,
    /// Sent to the server as a bearer token; sealed at rest, never shown again. Required
    /// unless `kind` is `node_exporter`.
    #[schema(min_length = 1, max_length = 1024)]
    api_token: Option<String>,
    /// What the server speaks; `fleet` when absent.
    #[schema(value_type = Option<views::Kind>)]
    kind: Option<ServerKind>,
    /// The page a node_exporter server is read from; `/metrics` when absent.
    metrics_path: Option<String>,
    /// A PEM CA certificate the server's TLS is trusted by (an agent with its own CA).
    ca_cert: Option<String>,
    description: Option<String>,
    hostname: Option<String>,
    region: Option<String>,
    environment: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[schema(value_type = Option<views::Status>)]
    status: Option<ServerStatus>,
}

pub(crate) async fn create_server(
    State(app): State<AppState>,
    ApiJson(b): ApiJson<CreateServer>,
) -> ApiResult {
    let meta = b.metadata.unwrap_or_else(|| json!({}));
    metadata(&meta)?;
    let kind = b.kind.unwrap_or_default();
    if b.api_token.is_none() && kind != ServerKind::NodeExporter {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "api_token: required unless kind is node_exporter",
        ));
    }
    // Core's rules, the same for the API, `servers import` and embedders.
    let new = NewServer {
        name: b.name,
        api_url: b.api_url,
        api_token: b.api_token.map(ApiToken::new),
        kind,
        metrics_path: b.metrics_path,
        ca_cert: b.ca_cert,
        description: b.description,
        hostname: b.hostname,
        region: b.region,
        environment: b.environment,
        tags: b.tags,
        metadata: meta,
        status: b.status.unwrap_or(ServerStatus::Active),
    }
    .validated()?;
    let server = app.store.create_server(new).await?;
    Ok((StatusCode::CREATED, Json(views::Server::from(&server))).into_response())
}

pub(crate) async fn get_server(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    match app.store.get_server(ServerId(id)).await? {
        Some(s) => ok(views::Server::from(&s)),
        None => Err(ApiError::not_found("server")),
    }
}

/// Changes to a server; absent fields stay, `null` clears.
#[derive(Debug, Default, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateServer {
    #[schema(min_length = 1, max_length = 200)]
    name: Option<String>,
    #[schema(format = "uri")]
    api_url: Option<String>,
    /// A new token rotates the old one.
    api_token: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    hostname: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    region: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    environment: Option<Option<String>>,
    tags: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[schema(value_type = Option<views::Status>)]
    status: Option<ServerStatus>,
    #[schema(value_type = Option<views::Kind>)]
    kind: Option<ServerKind>,
    #[serde(default, deserialize_with = "nullable")]
    metrics_path: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    ca_cert: Option<Option<String>>,
}

pub(crate) async fn update_server(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(b): ApiJson<UpdateServer>,
) -> ApiResult {
    if let Some(v) = &b.metadata {
        metadata(v)?;
    }
    let update = ServerUpdate {
        name: b.name,
        api_url: b.api_url,
        api_token: b.api_token.map(ApiToken::new),
        description: b.description,
        hostname: b.hostname,
        region: b.region,
        environment: b.environment,
        tags: b.tags,
        metadata: b.metadata,
        status: b.status,
        kind: b.kind,
        metrics_path: b.metrics_path,
        ca_cert: b.ca_cert,
    }
    .validated()?;
    match app.store.update_server(ServerId(id), update).await? {
        Some(s) => ok(views::Server::from(&s)),
        None => Err(ApiError::not_found("server")),
    }
}

/// 204 when the change was made, 404 naming `what` when there was nothing to change.
fn done(changed: bool, what: &str) -> ApiResult {
    if changed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(what))
    }
}

pub(crate) async fn delete_server(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    done(app.store.delete_server(ServerId(id)).await?, "server")
}

pub(crate) async fn check_now(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let Some(server) = app.store.get_server(ServerId(id)).await? else {
        return Err(ApiError::not_found("server"));
    };
    // Nobody watches an inactive server, so its stored token is not sent to its URL.
    if server.status == ServerStatus::Inactive {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "inactive",
            format!(
                "server {} is inactive: set its status to active or maintenance to check it",
                server.name
            ),
        ));
    }
    let Some(target) = app.store.probe_target(ServerId(id)).await? else {
        return Err(ApiError::not_found("server"));
    };
    // The same check, deadline, recording and event as the health worker's.
    let check = fleet_core::check_now(
        &app.health,
        &fleet_core::TargetRef::single(target),
        app.probe_timeout,
        &*app.clock,
        &app.events,
    )
    .await?;
    ok(views::Check::from(&check))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    resolution: Option<String>,
}

impl WindowQuery {
    /// The source to read: as asked, or the finest that covers `from` on.
    fn resolution(
        &self,
        app: &AppState,
        from: Option<OffsetDateTime>,
    ) -> Result<Resolution, ApiError> {
        match self.resolution.as_deref() {
            None => Ok(app.tiers.finest(from, app.clock.now())),
            Some(r) => Resolution::parse(r).ok_or_else(|| {
                ApiError::bad_request(format!("resolution must be raw, 5m or 1h, got `{r}`"))
            }),
        }
    }

    fn query(&self) -> Result<HistoryQuery, ApiError> {
        let limit = page_limit(self.limit)?;
        let from = time_param("from", &self.from)?;
        let to = time_param("to", &self.to)?;
        if let (Some(from), Some(to)) = (from, to)
            && from > to
        {
            return Err(ApiError::bad_request("from must not be after to"));
        }
        Ok(HistoryQuery { from, to, limit })
    }
}

/// 404 unless the server exists: its history or log would otherwise read as empty.
async fn known_server(app: &AppState, id: Uuid) -> Result<(), ApiError> {
    match app.store.get_server(ServerId(id)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found("server")),
    }
}

pub(crate) async fn health_history(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<WindowQuery>,
) -> ApiResult {
    let query = q.query()?;
    let resolution = q.resolution(&app, query.from)?;
    known_server(&app, id).await?;
    let items = if resolution == Resolution::Raw {
        let checks = app.store.health_history(ServerId(id), query).await?;
        views::HealthItems::Raw(checks.iter().map(Into::into).collect())
    } else {
        let rollups = app
            .store
            .health_rollups(ServerId(id), resolution, query)
            .await?;
        views::HealthItems::Rollups(rollups.iter().map(Into::into).collect())
    };
    ok(views::HealthHistory {
        server_id: id,
        resolution: resolution.as_str(),
        health_checks: items,
    })
}

pub(crate) async fn metrics_history(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<WindowQuery>,
) -> ApiResult {
    let query = q.query()?;
    let resolution = q.resolution(&app, query.from)?;
    known_server(&app, id).await?;
    let items = if resolution == Resolution::Raw {
        let samples = app.store.metrics_history(ServerId(id), query).await?;
        views::MetricsItems::Raw(samples.iter().map(Into::into).collect())
    } else {
        let rollups = app
            .store
            .metrics_rollups(ServerId(id), resolution, query)
            .await?;
        views::MetricsItems::Rollups(rollups.iter().map(Into::into).collect())
    };
    ok(views::MetricsHistory {
        server_id: id,
        resolution: resolution.as_str(),
        metrics: items,
    })
}

/// A group's fields; `name` is required to create one.
#[derive(Debug, Default, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupBody {
    #[schema(min_length = 1, max_length = 200)]
    name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    color: Option<Option<String>>,
    tags: Option<Vec<String>>,
    regions: Option<Vec<String>>,
    environments: Option<Vec<String>>,
}

impl GroupBody {
    fn fields(self) -> Result<GroupFields, ApiError> {
        use fleet_core::validate;
        let name = self.name.as_deref().map(validate::name).transpose()?;
        if let Some(d) = self.description.clone().flatten() {
            validate::text("description", &d, 2000)?;
        }
        if let Some(c) = self.color.clone().flatten() {
            validate::text("color", &c, 32)?;
        }
        for list in [&self.tags, &self.regions, &self.environments]
            .into_iter()
            .flatten()
        {
            validate::tags(list)?;
        }
        Ok(GroupFields {
            name,
            description: self.description,
            color: self.color,
            tags: self.tags,
            regions: self.regions,
            environments: self.environments,
        })
    }
}

pub(crate) async fn list_groups(State(app): State<AppState>) -> ApiResult {
    let groups = app.store.list_groups().await?;
    ok(views::GroupList {
        groups: groups.iter().map(Into::into).collect(),
    })
}

pub(crate) async fn create_group(
    State(app): State<AppState>,
    ApiJson(b): ApiJson<GroupBody>,
) -> ApiResult {
    if b.name.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "name is required",
        ));
    }
    let group = app.store.create_group(b.fields()?).await?;
    Ok((StatusCode::CREATED, Json(views::Group::from(&group))).into_response())
}

pub(crate) async fn get_group(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    match app.store.get_group(GroupId(id)).await? {
        Some(g) => ok(views::Group::from(&g)),
        None => Err(ApiError::not_found("group")),
    }
}

pub(crate) async fn update_group(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(b): ApiJson<GroupBody>,
) -> ApiResult {
    match app.store.update_group(GroupId(id), b.fields()?).await? {
        Some(g) => ok(views::Group::from(&g)),
        None => Err(ApiError::not_found("group")),
    }
}

pub(crate) async fn delete_group(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    done(app.store.delete_group(GroupId(id)).await?, "group")
}

pub(crate) async fn add_member(
    State(app): State<AppState>,
    ApiPath((group, server)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult {
    let added = app
        .store
        .add_member(GroupId(group), ServerId(server))
        .await?;
    done(added, "group or server")
}

pub(crate) async fn remove_member(
    State(app): State<AppState>,
    ApiPath((group, server)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult {
    let removed = app
        .store
        .remove_member(GroupId(group), ServerId(server))
        .await?;
    done(removed, "membership")
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SummaryQuery {
    from: Option<String>,
    to: Option<String>,
    hours: Option<u32>,
    limit: Option<usize>,
    resolution: Option<String>,
}

/// The longest window a summary covers.
const MAX_WINDOW_DAYS: i64 = 400;

pub(crate) async fn summary(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<SummaryQuery>,
) -> ApiResult {
    let now = app.clock.now();
    if q.hours.is_some() && q.from.is_some() {
        return Err(ApiError::bad_request(
            "hours and from: give one of them, not both",
        ));
    }
    let to = time_param("to", &q.to)?.unwrap_or(now);
    let hours = q.hours.unwrap_or(24);
    if !(1..=24 * MAX_WINDOW_DAYS as u32).contains(&hours) {
        return Err(ApiError::bad_request("hours must be 1 to 9600"));
    }
    let from = time_param("from", &q.from)?.unwrap_or(to - time::Duration::hours(i64::from(hours)));
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    if to - from > time::Duration::days(MAX_WINDOW_DAYS) {
        return Err(ApiError::bad_request(format!(
            "the window from {} to {} is longer than {MAX_WINDOW_DAYS} days",
            views::ts(from),
            views::ts(to)
        )));
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100"));
    }
    // The summary counts samples or whole hours: no 5-minute totals are kept.
    let resolution = match q.resolution.as_deref() {
        None => None,
        Some(r) => Some(
            Resolution::parse(r)
                .filter(|res| *res != Resolution::FiveMinutes)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("resolution must be raw or 1h, got `{r}`"))
                })?,
        ),
    };
    let tallies = app.tallies.get(&*app.store).await?;
    let mut by_status: BTreeMap<String, u64> = ServerStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut regions: BTreeMap<String, u64> = BTreeMap::new();
    let mut environments: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        *by_status.entry(t.status.as_str().to_owned()).or_default() += t.count;
        *regions
            .entry(t.region.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += t.count;
        *environments
            .entry(t.environment.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += t.count;
    }
    // Only the top `limit` servers by cost are named and returned; the store chooses how to
    // total the rest (from two running totals at whole hours, when it keeps them).
    let llm = app.store.llm_summary((from, to), resolution, limit).await?;
    let mut per_server = Vec::with_capacity(llm.top.len());
    for u in &llm.top {
        per_server.push(views::ServerLlm {
            server_id: u.server_id.0,
            name: app.store.get_server(u.server_id).await?.map(|s| s.name),
            llm_requests: u.requests,
            llm_cost_usd: (u.cost_usd * 1e6).round() / 1e6,
        });
    }
    let incidents = crate::alerts::open_incidents(&app).await;
    ok(views::Summary {
        incidents,
        servers: views::ServerCounts {
            total: tallies.iter().map(|t| t.count as usize).sum(),
            by_status,
            by_health_status: by_health(tallies.iter()),
            by_region: regions,
            by_environment: environments,
        },
        llm: views::Llm {
            from: views::ts(llm.from),
            to: views::ts(llm.to),
            resolution: llm.resolution.as_str(),
            total_requests: llm.total_requests,
            total_cost_usd: (llm.total_cost_usd * 1e6).round() / 1e6,
            per_server,
        },
        timestamp: views::ts(now),
    })
}

/// A page: `limit` 1 to 1,000 (default 100) from `offset` (at most 100,000, since a deep
/// offset costs the store the rows it skips).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

impl PageQuery {
    const MAX_OFFSET: usize = 100_000;

    fn query(&self, server: Option<ServerId>) -> Result<ChangeQuery, ApiError> {
        let limit = page_limit(self.limit)?;
        let offset = self.offset.unwrap_or(0);
        if offset > Self::MAX_OFFSET {
            return Err(ApiError::bad_request(format!(
                "offset must be at most {}",
                Self::MAX_OFFSET
            )));
        }
        Ok(ChangeQuery {
            server,
            limit,
            offset,
        })
    }
}

fn changes(query: ChangeQuery, log: &[fleet_core::StateChange]) -> views::ChangeList {
    views::ChangeList {
        state_changes: log.iter().map(Into::into).collect(),
        limit: query.limit,
        offset: query.offset,
    }
}

pub(crate) async fn state_changes(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult {
    let query = q.query(None)?;
    let log = app.store.state_changes(query).await?;
    ok(changes(query, &log))
}

pub(crate) async fn server_state_changes(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult {
    let query = q.query(Some(ServerId(id)))?;
    known_server(&app, id).await?;
    let log = app.store.state_changes(query).await?;
    ok(changes(query, &log))
}
