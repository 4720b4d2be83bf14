//! Fleet's HTTP API as a library: a route table from which both the router and the OpenAPI
//! document are built, bearer-token authentication, and JSON errors for every failure.
//!
//! An embedder mounts [`router`] in their own axum app; `fleet-server` serves it as is.

mod alerts;
pub mod auth;
mod bulk;
mod events;
mod handlers;
pub mod listener;
mod views;
pub mod web;

pub use views::ts;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use axum::{Json, Router};
use fleet_core::{
    AdminTokens, CancellationToken, ChangeLog, CheckError, Clock, Counts, Events, Groups,
    HealthWork, History, Ping, Registry, Role, Sessions, StatsHandle, Store, StoreError,
};
use serde_json::json;

use crate::auth::{Bootstrap, FailureLimiter};

/// Everything a store must offer the server.
pub trait FullStore:
    Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts + Ping + Sessions
{
}
impl<T: Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts + Ping + Sessions>
    FullStore for T
{
}

/// The dashboard's settings. Plain data with documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DashboardConfig {
    /// The origin pages are served from (`FLEET_PUBLIC_URL`'s); when `None`, the request's
    /// `Host` over http.
    pub origin: Option<String>,
    /// Whether the session cookie is `Secure` (when `FLEET_PUBLIC_URL` is https).
    pub secure_cookies: bool,
    /// Most change or incident events a stream carries in a second before it sends one
    /// `resync` instead (`FLEET_SSE_MAX_RATE`). Default 50.
    pub sse_max_rate: u32,
    /// Most streams open at once; past that, 503 (`FLEET_SSE_MAX_STREAMS`). Default 256.
    pub sse_max_streams: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            origin: None,
            secure_cookies: false,
            sse_max_rate: 50,
            sse_max_streams: 256,
        }
    }
}

impl DashboardConfig {
    /// Origin and cookie security from the public URL.
    pub fn with_public_url(mut self, url: Option<&url::Url>) -> Self {
        if let Some(url) = url {
            self.origin = Some(url.origin().ascii_serialization());
            self.secure_cookies = url.scheme() == "https";
        }
        self
    }
}

/// The workers as the API sees them.
#[derive(Debug, Default)]
pub struct Workers {
    /// The health worker's statistics, once it runs.
    pub health: Option<StatsHandle>,
    /// The metrics worker's statistics, once it runs.
    pub metrics: Option<StatsHandle>,
    /// Why the workers are not running, when they failed to start.
    pub error: Option<String>,
    /// Configured intervals, shown even before the workers start.
    pub intervals: (f64, f64),
}

/// The API's shared state.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: Arc<dyn FullStore>,
    /// The health worker's work, shared with it, so that check-now publishes as a cycle does.
    pub(crate) health: HealthWork,
    pub(crate) probe_timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) events: Events,
    pub(crate) workers: Arc<RwLock<Workers>>,
    pub(crate) bootstrap: Bootstrap,
    pub(crate) limiter: Arc<FailureLimiter>,
    pub(crate) trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    pub(crate) listener: Arc<listener::ListenerStats>,
    pub(crate) tallies: Arc<TallyCache>,
    pub(crate) alerts: Option<fleet_alerts::AlertsHandle>,
    pub(crate) bulk: Arc<bulk::BulkQueue>,
    pub(crate) dashboard: Arc<DashboardConfig>,
    pub(crate) streams: Arc<events::Streams>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) llm: Arc<web::LlmCache>,
    pub(crate) cluster: Option<Arc<ClusterView>>,
    pub(crate) tiers: fleet_core::Tiers,
}

/// What the API shows of a fleet shared among instances.
pub struct ClusterView {
    /// Where the instances and leases are listed from.
    pub leases: Arc<dyn fleet_core::cluster::Leases>,
    /// This instance's share and counters.
    pub stats: fleet_core::cluster::ClusterStats,
    /// The lease TTL: an instance is live while its heartbeat is younger.
    pub ttl: Duration,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("stats", &self.stats.snapshot())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Who called, by token name, for records such as an acknowledgement.
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub(crate) String);

/// The server tallies, read from the store at most once a second: `/metrics` is scraped, the
/// status endpoint polled and the summary reloaded by many clients, and counts a second old
/// serve all of them as well as fresh ones, without a query each.
#[derive(Debug, Default)]
pub(crate) struct TallyCache {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Vec<fleet_core::ServerTally>)>>,
}

impl TallyCache {
    const FRESH: Duration = Duration::from_secs(1);

    pub(crate) async fn get(
        &self,
        store: &dyn FullStore,
    ) -> Result<Vec<fleet_core::ServerTally>, StoreError> {
        let mut last = self.last.lock().await;
        if let Some((at, tallies)) = &*last
            && at.elapsed() < Self::FRESH
        {
            return Ok(tallies.clone());
        }
        let tallies = store.server_tallies().await?;
        *last = Some((tokio::time::Instant::now(), tallies.clone()));
        Ok(tallies)
    }
}

/// What the API is built from.
pub struct ApiParts {
    /// The store.
    pub store: Arc<dyn FullStore>,
    /// The health worker's work (check-now runs it).
    pub health: HealthWork,
    /// A check-now's deadline (the health worker's timeout).
    pub probe_timeout: Duration,
    /// Where timestamps come from.
    pub clock: Arc<dyn Clock>,
    /// The workers' event bus, whose figures the API reports.
    pub events: Events,
    /// The workers' slot.
    pub workers: Arc<RwLock<Workers>>,
    /// The bootstrap admin token (`FLEET_ADMIN_TOKEN`), if any.
    pub admin_token: Option<String>,
    /// Failed authentications per address per minute before 429.
    pub auth_failure_limit: u32,
    /// Proxies whose `X-Forwarded-For` is believed (`FLEET_TRUSTED_PROXIES`); none by default.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The listener's counters, for `/metrics`.
    pub listener: Arc<listener::ListenerStats>,
    /// The alert pipeline, when it runs.
    pub alerts: Option<fleet_alerts::AlertsHandle>,
    /// The most checks queued by group checks at once (`FLEET_BULK_CHECK_MAX`).
    pub bulk_check_max: usize,
    /// The dashboard's settings.
    pub dashboard: DashboardConfig,
    /// Fires at shutdown: live streams end then, instead of holding their connections.
    pub shutdown: CancellationToken,
    /// The instances sharing the fleet, when it is shared (PostgreSQL); `None` for a store
    /// this process has alone, which then owns every bucket.
    pub cluster: Option<ClusterView>,
    /// How long each history tier holds: the history routes read the finest source that
    /// covers the range asked for.
    pub tiers: fleet_core::Tiers,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ApiParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiParts")
            .field("probe_timeout", &self.probe_timeout)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The API's state.
    pub fn new(parts: ApiParts) -> Self {
        Self {
            store: parts.store,
            health: parts.health,
            probe_timeout: parts.probe_timeout,
            clock: parts.clock,
            events: parts.events,
            workers: parts.workers,
            bootstrap: Bootstrap::new(parts.admin_token.as_deref()),
            limiter: Arc::new(FailureLimiter::new(parts.auth_failure_limit)),
            trusted_proxies: Arc::new(parts.trusted_proxies),
            listener: parts.listener,
            tallies: Arc::default(),
            alerts: parts.alerts,
            bulk: Arc::new(bulk::BulkQueue::new(parts.bulk_check_max)),
            streams: Arc::new(events::Streams::new(
                parts.dashboard.sse_max_streams,
                parts.dashboard.sse_max_rate,
            )),
            dashboard: Arc::new(parts.dashboard),
            shutdown: parts.shutdown,
            cluster: parts.cluster.map(Arc::new),
            llm: Arc::default(),
            tiers: parts.tiers,
        }
    }
}

/// An API failure: a status and `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Invalid(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            StoreError::Unavailable { .. } => {
                tracing::warn!(target: "fleet::api", error = %e, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is unavailable; try again",
                )
            }
            StoreError::Backend { .. } => {
                tracing::error!(target: "fleet::api", error = %e, "store error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<fleet_core::validate::Invalid> for ApiError {
    fn from(e: fleet_core::validate::Invalid) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
    }
}

impl From<CheckError> for ApiError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Store(e) => e.into(),
            CheckError::NotChecked(why) => {
                tracing::error!(target: "fleet::api", error = %why, "check-now not performed: {why}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_checked",
                    format!("Fleet could not check the server: {why}"),
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ),
            JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "request bodies are limited to 64 KiB",
                )
            }
            JsonRejection::JsonSyntaxError(e) => {
                Self::bad_request(format!("body is not valid JSON: {}", e.body_text()))
            }
            JsonRejection::JsonDataError(e) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.body_text())
            }
            other => Self::bad_request(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::bad_request(format!("bad path parameter: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(format!("bad query: {}", r.body_text()))
    }
}

/// `Json` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `Path` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `Query` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// A viewer or admin token.
    Viewer,
    /// An admin token.
    Admin,
}

/// Writes a type's JSON schema, and those it refers to, into the document's components and
/// returns a reference to it.
pub type SchemaFn = fn(&mut serde_json::Map<String, serde_json::Value>) -> serde_json::Value;

fn schema<T: utoipa::ToSchema>(
    components: &mut serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    nested.push((T::name().into_owned(), T::schema()));
    for (name, s) in nested {
        components.insert(name, serde_json::to_value(s).unwrap_or_default());
    }
    json!({"$ref": format!("#/components/schemas/{}", T::name())})
}

/// What a route answers on success.
#[derive(Clone, Copy)]
pub enum Reply {
    /// JSON of a schema, with this status.
    Json(StatusCode, SchemaFn),
    /// JSON of a schema, with 200 when ready and 503 when not (`/readyz`).
    Readiness(SchemaFn),
    /// Prometheus text.
    Text,
    /// `204 No Content`.
    Empty,
    /// The OpenAPI document itself.
    Document,
    /// A Server-Sent Events stream.
    EventStream,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Json(status, _) => write!(f, "Json({status})"),
            Reply::Readiness(_) => f.write_str("Readiness"),
            Reply::Text => f.write_str("Text"),
            Reply::Empty => f.write_str("Empty"),
            Reply::Document => f.write_str("Document"),
            Reply::EventStream => f.write_str("EventStream"),
        }
    }
}

/// One route: where, who, what, and its handler.
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path, with `{param}`s.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// What it does.
    pub summary: &'static str,
    /// Its query parameters.
    pub query: &'static [&'static str],
    /// The schema of its JSON body, when it takes one.
    pub body: Option<SchemaFn>,
    /// What it answers on success.
    pub reply: Reply,
    handler: MethodRouter<AppState>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("access", &self.access)
            .field("reply", &self.reply)
            .finish_non_exhaustive()
    }
}

fn route(
    (method, path): (Method, &'static str),
    access: Access,
    summary: &'static str,
    reply: Reply,
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        access,
        summary,
        query: &[],
        body: None,
        reply,
        handler,
    }
}

impl Route {
    /// Declares the route's JSON body by its type.
    fn with_body(mut self, schema: SchemaFn) -> Self {
        self.body = Some(schema);
        self
    }

    /// Declares the route's query parameters.
    fn with_query(mut self, query: &'static [&'static str]) -> Self {
        self.query = query;
        self
    }
}

fn ok_json(schema: SchemaFn) -> Reply {
    Reply::Json(StatusCode::OK, schema)
}

/// Every route of the API. The router and the OpenAPI document are both built from this.
pub fn routes() -> Vec<Route> {
    use Access::*;
    use Method as M;
    use alerts as a;
    use bulk as b;
    use handlers as h;
    use views as v;
    const SERVER_FILTERS: &[&str] = &[
        "status",
        "health_status",
        "region",
        "environment",
        "tag",
        "group",
        "search",
        "sort",
        "limit",
        "offset",
    ];
    const WINDOW: &[&str] = &["from", "to", "limit"];
    const PAGE: &[&str] = &["limit", "offset"];
    const SERIES: &[&str] = &["range", "from", "to", "points"];
    let created = |schema| Reply::Json(StatusCode::CREATED, schema);
    vec![
        route((M::GET, "/healthz"), Public, "The process is alive.", ok_json(schema::<v::Alive>), get(h::healthz)),
        route((M::GET, "/readyz"), Public, "Ready: the store answers, both workers run, every probe token opens (503 otherwise).", Reply::Readiness(schema::<v::Ready>), get(h::readyz)),
        route((M::GET, "/metrics"), Public, "Prometheus text: worker counters, cycle durations, events, fleet health.", Reply::Text, get(h::prometheus)),
        route((M::GET, "/api/v1/openapi.json"), Public, "This document.", Reply::Document, get(h::openapi)),
        route((M::GET, "/api/v1/fleet/workers/status"), Admin, "Both workers' statistics, this instance's share of the fleet and the result events' figures.", ok_json(schema::<v::WorkersStatus>), get(h::workers_status)),
        route((M::GET, "/api/v1/fleet/instances"), Admin, "The instances sharing the fleet: heartbeat age, buckets and servers owned, the leader, the version.", ok_json(schema::<v::InstanceList>), get(h::instances)),
        route((M::GET, "/api/v1/fleet/servers"), Viewer, "List servers, filtered and paginated.", ok_json(schema::<v::ServerList>), get(h::list_servers))
            .with_query(SERVER_FILTERS),
        route((M::POST, "/api/v1/fleet/servers"), Admin, "Register a server.", created(schema::<v::Server>), post(h::create_server))
            .with_body(schema::<h::CreateServer>),
        route((M::GET, "/api/v1/fleet/servers/{id}"), Viewer, "One server.", ok_json(schema::<v::Server>), get(h::get_server)),
        route((M::PATCH, "/api/v1/fleet/servers/{id}"), Admin, "Change a server; a new api_token rotates it.", ok_json(schema::<v::Server>), patch(h::update_server))
            .with_body(schema::<h::UpdateServer>),
        route((M::DELETE, "/api/v1/fleet/servers/{id}"), Admin, "Remove a server and its history.", Reply::Empty, delete(h::delete_server)),
        route((M::POST, "/api/v1/fleet/servers/{id}/check"), Admin, "Run a health check now, record and publish it, and return it.", ok_json(schema::<v::Check>), post(h::check_now)),
        route((M::GET, "/api/v1/fleet/servers/{id}/health-checks"), Viewer, "A server's health history, newest first.", ok_json(schema::<v::HealthHistory>), get(h::health_history))
            .with_query(WINDOW),
        route((M::GET, "/api/v1/fleet/servers/{id}/metrics"), Viewer, "A server's metrics history, newest first.", ok_json(schema::<v::MetricsHistory>), get(h::metrics_history))
            .with_query(WINDOW),
        route((M::GET, "/api/v1/fleet/servers/{id}/health-series"), Viewer, "A server's health over a range, aggregated into at most `points` buckets: checks, failures, worst health, mean and longest response time.", ok_json(schema::<v::HealthSeries>), get(h::health_series))
            .with_query(SERIES),
        route((M::GET, "/api/v1/fleet/servers/{id}/metrics-series"), Viewer, "A server's metrics over a range, aggregated into at most `points` buckets.", ok_json(schema::<v::MetricsSeries>), get(h::metrics_series))
            .with_query(SERIES),
        route((M::GET, "/api/v1/fleet/servers/{id}/state-changes"), Viewer, "A server's changes of health, newest first.", ok_json(schema::<v::ChangeList>), get(h::server_state_changes))
            .with_query(PAGE),
        route((M::GET, "/api/v1/fleet/state-changes"), Viewer, "Every server's changes of health, newest first.", ok_json(schema::<v::ChangeList>), get(h::state_changes))
            .with_query(PAGE),
        route((M::GET, "/api/v1/fleet/groups"), Viewer, "List groups.", ok_json(schema::<v::GroupList>), get(h::list_groups)),
        route((M::POST, "/api/v1/fleet/groups"), Admin, "Create a group.", created(schema::<v::Group>), post(h::create_group))
            .with_body(schema::<h::GroupBody>),
        route((M::GET, "/api/v1/fleet/groups/{id}"), Viewer, "One group.", ok_json(schema::<v::Group>), get(h::get_group)),
        route((M::PATCH, "/api/v1/fleet/groups/{id}"), Admin, "Change a group.", ok_json(schema::<v::Group>), patch(h::update_group))
            .with_body(schema::<h::GroupBody>),
        route((M::DELETE, "/api/v1/fleet/groups/{id}"), Admin, "Remove a group (not its servers).", Reply::Empty, delete(h::delete_group)),
        route((M::POST, "/api/v1/fleet/groups/{id}/members"), Admin, "Add up to 1,000 servers to a group.", ok_json(schema::<b::MembershipChange>), post(b::add_members))
            .with_body(schema::<b::MemberIds>),
        route((M::DELETE, "/api/v1/fleet/groups/{id}/members"), Admin, "Remove up to 1,000 servers from a group.", ok_json(schema::<b::MembershipChange>), delete(b::remove_members))
            .with_body(schema::<b::MemberIds>),
        route((M::POST, "/api/v1/fleet/groups/{id}/check"), Admin, "Queue a check of every member ahead of the cycle (at most FLEET_BULK_CHECK_MAX queued); results arrive in the history and on the event stream.", Reply::Json(StatusCode::ACCEPTED, schema::<b::BulkCheck>), post(b::check_group)),
        route((M::PUT, "/api/v1/fleet/groups/{id}/members/{server_id}"), Admin, "Add a server to a group.", Reply::Empty, put(h::add_member)),
        route((M::DELETE, "/api/v1/fleet/groups/{id}/members/{server_id}"), Admin, "Remove a server from a group.", Reply::Empty, delete(h::remove_member)),
        route((M::GET, "/api/v1/fleet/alerts/channels"), Viewer, "Alert channels, without their secrets.", ok_json(schema::<a::ChannelList>), get(a::list_channels)),
        route((M::POST, "/api/v1/fleet/alerts/channels"), Admin, "Add a channel: webhook, slack, pagerduty or email. Its secrets are sealed and never shown again.", created(schema::<a::ChannelView>), post(a::create_channel))
            .with_body(schema::<a::ChannelBody>),
        route((M::GET, "/api/v1/fleet/alerts/channels/{id}"), Viewer, "One channel.", ok_json(schema::<a::ChannelView>), get(a::get_channel)),
        route((M::PATCH, "/api/v1/fleet/alerts/channels/{id}"), Admin, "Change a channel; fields not given keep their value.", ok_json(schema::<a::ChannelView>), patch(a::update_channel))
            .with_body(schema::<a::ChannelBody>),
        route((M::DELETE, "/api/v1/fleet/alerts/channels/{id}"), Admin, "Remove a channel and its queued notices.", Reply::Empty, delete(a::delete_channel)),
        route((M::POST, "/api/v1/fleet/alerts/channels/{id}/test"), Admin, "Send a test notice now: the outcome class and latency, never the receiver's answer.", ok_json(schema::<a::TestOutcome>), post(a::test_channel)),
        route((M::GET, "/api/v1/fleet/alerts/policies"), Viewer, "Escalation policies.", ok_json(schema::<a::PolicyList>), get(a::list_policies)),
        route((M::POST, "/api/v1/fleet/alerts/policies"), Admin, "Add an escalation policy: matchers and steps.", created(schema::<a::PolicyView>), post(a::create_policy))
            .with_body(schema::<a::PolicyBody>),
        route((M::GET, "/api/v1/fleet/alerts/policies/{id}"), Viewer, "One policy.", ok_json(schema::<a::PolicyView>), get(a::get_policy)),
        route((M::PATCH, "/api/v1/fleet/alerts/policies/{id}"), Admin, "Change a policy.", ok_json(schema::<a::PolicyView>), patch(a::update_policy))
            .with_body(schema::<a::PolicyBody>),
        route((M::DELETE, "/api/v1/fleet/alerts/policies/{id}"), Admin, "Remove a policy.", Reply::Empty, delete(a::delete_policy)),
        route((M::GET, "/api/v1/fleet/incidents"), Viewer, "Incidents, newest first, filtered and paginated.", ok_json(schema::<a::IncidentList>), get(a::list_incidents))
            .with_query(&["state", "severity", "server_id", "group_id", "region", "limit", "offset"]),
        route((M::GET, "/api/v1/fleet/incidents/{id}"), Viewer, "One incident with its members and timeline.", ok_json(schema::<a::IncidentDetailView>), get(a::get_incident)),
        route((M::POST, "/api/v1/fleet/incidents/{id}/ack"), Admin, "Acknowledge an incident with a reason: reminders and escalation stop until it resolves.", ok_json(schema::<a::IncidentView>), post(a::ack_incident))
            .with_body(schema::<a::AckBody>),
        route((M::GET, "/api/v1/fleet/silences"), Viewer, "Silences not yet over.", ok_json(schema::<a::SilenceList>), get(a::list_silences)),
        route((M::POST, "/api/v1/fleet/silences"), Admin, "Mute notifications for matching alerts between two times; incidents are still recorded.", created(schema::<a::SilenceView>), post(a::create_silence))
            .with_body(schema::<a::SilenceBody>),
        route((M::GET, "/api/v1/fleet/silences/{id}"), Viewer, "One silence.", ok_json(schema::<a::SilenceView>), get(a::get_silence)),
        route((M::DELETE, "/api/v1/fleet/silences/{id}"), Admin, "End a silence.", Reply::Empty, delete(a::delete_silence)),
        route((M::GET, "/api/v1/fleet/maintenance-windows"), Viewer, "Maintenance windows.", ok_json(schema::<a::WindowList>), get(a::list_windows)),
        route((M::POST, "/api/v1/fleet/maintenance-windows"), Admin, "Add a maintenance window: servers inside it open no incidents (probing goes on).", created(schema::<a::WindowView>), post(a::create_window))
            .with_body(schema::<a::WindowBody>),
        route((M::GET, "/api/v1/fleet/maintenance-windows/{id}"), Viewer, "One maintenance window.", ok_json(schema::<a::WindowView>), get(a::get_window)),
        route((M::PATCH, "/api/v1/fleet/maintenance-windows/{id}"), Admin, "Change a maintenance window.", ok_json(schema::<a::WindowView>), patch(a::update_window))
            .with_body(schema::<a::WindowBody>),
        route((M::DELETE, "/api/v1/fleet/maintenance-windows/{id}"), Admin, "Remove a maintenance window.", Reply::Empty, delete(a::delete_window)),
        route((M::GET, "/api/v1/fleet/events"), Viewer, "Live Server-Sent Events: state changes and incident changes from the stored logs (ids `c-N.i-M` resume with Last-Event-ID), cycle ends, and `resync` when a client is too far behind. 503 past FLEET_SSE_MAX_STREAMS.", Reply::EventStream, get(events::stream)),
        route((M::GET, "/api/v1/fleet/summary"), Viewer, "Servers by status, health, region and environment; LLM cost and requests over a window.", ok_json(schema::<v::Summary>), get(h::summary))
            .with_query(&["from", "to", "hours", "limit"]),
    ]
}

/// The client's address: the peer's, or past trusted proxies the one they forwarded.
fn client_addr(req: &Request, trusted: &[ipnet::IpNet]) -> Option<std::net::IpAddr> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    auth::client_addr(peer, forwarded, trusted)
}

fn too_many(left: Duration) -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failures",
        "too many failed authentications from this address; wait and retry",
    )
    .into_response();
    let secs = left.as_secs().max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&secs) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Checks the bearer token against `access`.
async fn require(
    State((app, access)): State<(AppState, Access)>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let addr = client_addr(&req, &app.trusted_proxies);
    // Before any lookup: a client over its limit costs no query, whatever it sends.
    if let Some(left) = app.limiter.blocked(addr) {
        return Ok(too_many(left));
    }
    let header = req.headers().get(header::AUTHORIZATION);
    let Some(header) = header else {
        // No bearer token: a dashboard session's cookie stands in for one.
        if web::session::cookie_id(req.headers()).is_none() {
            return Err(unauthorized("missing bearer token"));
        }
        let Some(session) = web::session::from_cookie(&app, req.headers()).await? else {
            return Err(unauthorized("the session is over; sign in again"));
        };
        if web::session::is_unsafe(req.method()) {
            let given = req
                .headers()
                .get(web::session::CSRF_HEADER)
                .and_then(|v| v.to_str().ok());
            web::session::check_unsafe(&app.dashboard, &session, req.headers(), given)?;
        }
        if access == Access::Admin && !session.is_admin() {
            return Err(forbidden());
        }
        let mut req = req;
        req.extensions_mut().insert(Caller(session.name.clone()));
        req.extensions_mut().insert(session);
        return Ok(next.run(req).await);
    };
    let token = header.to_str().ok().and_then(auth::bearer);
    let who = match token.filter(|t| auth::well_formed(t)) {
        None => None,
        Some(token) => {
            let hashed = auth::hash(token);
            if app.bootstrap.matches(&hashed) {
                Some((Role::Admin, "FLEET_ADMIN_TOKEN".to_owned()))
            } else {
                app.store
                    .find_token(hashed)
                    .await?
                    .map(|t| (t.role, t.name))
            }
        }
    };
    let Some((role, name)) = who else {
        if app.limiter.fail(addr) {
            return Ok(too_many(
                app.limiter.blocked(addr).unwrap_or(Duration::from_secs(60)),
            ));
        }
        return Err(unauthorized("unknown or malformed token"));
    };
    if access == Access::Admin && role != Role::Admin {
        return Err(forbidden());
    }
    let mut req = req;
    req.extensions_mut().insert(Caller(name));
    Ok(next.run(req).await)
}

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "this route needs an admin token",
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The API as a router, without a socket.
pub fn router(state: AppState) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<AppState>> = BTreeMap::new();
    for r in routes() {
        let handler = match r.access {
            Access::Public => r.handler,
            access => r.handler.route_layer(middleware::from_fn_with_state(
                (state.clone(), access),
                require,
            )),
        };
        let merged = match by_path.remove(r.path) {
            Some(existing) => existing.merge(handler),
            None => handler,
        };
        by_path.insert(r.path, merged);
    }
    let mut router = Router::new();
    for (path, mr) in by_path {
        router = router.route(path, mr);
    }
    router
        .merge(web::router(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn(web::security_headers))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
            .into_response()
        }))
        .with_state(state)
}

/// The OpenAPI document of every route, from the route table: request and response schemas
/// are derived from the very types the handlers read and write.
pub fn openapi() -> serde_json::Value {
    let mut components = serde_json::Map::new();
    let error = schema::<views::ErrorBody>(&mut components);
    let mut paths = serde_json::Map::new();
    for r in routes() {
        let mut params: Vec<serde_json::Value> = Vec::new();
        for segment in r.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}));
            }
        }
        for q in r.query {
            let schema = match *q {
                "limit" | "offset" | "hours" | "points" => json!({"type": "integer", "minimum": 0}),
                "range" => json!({"type": "string", "enum": ["1h", "24h", "7d", "30d"]}),
                "sort" => {
                    json!({"type": "string", "pattern": "^-?(name|health|last_seen|response_time)$"})
                }
                "from" | "to" => json!({"type": "string", "format": "date-time"}),
                "group" => json!({"type": "string", "format": "uuid"}),
                "status" => {
                    json!({"type": "string", "enum": ["active", "inactive", "maintenance"]})
                }
                "health_status" => {
                    json!({"type": "string", "enum": ["healthy", "degraded", "critical", "unreachable"]})
                }
                _ => json!({"type": "string"}),
            };
            params.push(json!({"name": q, "in": "query", "required": false, "schema": schema}));
        }
        let (status, success) = match r.reply {
            Reply::Json(status, schema) => (
                status,
                json!({"description": "OK", "content": {"application/json": {"schema": schema(&mut components)}}}),
            ),
            Reply::Readiness(schema) => (
                StatusCode::OK,
                json!({"description": "Ready, or (503) not ready", "content": {"application/json": {"schema": schema(&mut components)}}}),
            ),
            Reply::Text => (
                StatusCode::OK,
                json!({"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}),
            ),
            Reply::Empty => (StatusCode::NO_CONTENT, json!({"description": "Done"})),
            Reply::Document => (
                StatusCode::OK,
                json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}),
            ),
            Reply::EventStream => (
                StatusCode::OK,
                json!({"description": "Events: `change`, `incident`, `cycle`, `resync` (and `hello` at the start)", "content": {"text/event-stream": {"schema": {"type": "string"}}}}),
            ),
        };
        let mut responses = serde_json::Map::new();
        if matches!(r.reply, Reply::Readiness(_)) {
            responses.insert("503".into(), success.clone());
        }
        responses.insert(status.as_u16().to_string(), success);
        let mut errors = vec!["400", "404"];
        if r.body.is_some() {
            errors.extend(["409", "413", "415", "422"]);
        }
        if r.access != Access::Public {
            errors.extend(["401", "403", "429"]);
        }
        if matches!(r.reply, Reply::EventStream) {
            errors.push("503");
        }
        for e in errors {
            responses.insert(e.into(), json!({"$ref": "#/components/responses/Error"}));
        }
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}_{}", r.method.as_str().to_lowercase(), r.path.trim_start_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if r.access != Access::Public {
            op["security"] = json!([{"bearer": []}]);
        }
        if let Some(schema) = r.body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema(&mut components)}}});
        }
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method.as_str().to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Fleet admin API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "An error", "content": {"application/json": {"schema": error}}}},
        },
    })
}

#[cfg(test)]
mod tests;
