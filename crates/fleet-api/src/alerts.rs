//! Alert routes: channels, incidents, acknowledgement, silences, maintenance windows and
//! escalation policies. Bodies refuse unknown fields; invalid values are 422 naming the field.

use std::collections::BTreeMap;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_alerts::{
    AckError, AlertStore, AlertsHandle, Channel, ChannelConfig, ChannelPatch, Incident,
    IncidentDetail, IncidentFilter, IncidentState, MaintenanceWindow, Matchers, Policy,
    PolicyPatch, Schedule, Scope, Severity, Silence, SmtpTls, Step, Weekly, WindowPatch,
};
use fleet_core::{GroupId, ServerId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::views::ts;
use crate::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller};

type ApiResult = Result<Response, ApiError>;

fn ok(v: impl Serialize) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

fn created(v: impl Serialize) -> ApiResult {
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        format!("{field}: {message}"),
    )
}

fn handle(app: &AppState) -> Result<&AlertsHandle, ApiError> {
    app.alerts.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "alerts_off",
            "alerts are not running in this instance",
        )
    })
}

fn store(app: &AppState) -> Result<&dyn AlertStore, ApiError> {
    Ok(&**handle(app)?.store())
}

/// Tells the pipeline its configuration changed.
fn changed(app: &AppState) {
    if let Some(h) = &app.alerts {
        h.reload();
    }
}

fn name_field(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(invalid("name", "must be 1 to 100 characters"));
    }
    Ok(name.to_owned())
}

fn time_field(field: &str, value: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|_| invalid(field, format!("`{value}` is not an RFC 3339 time")))
}

/// A receiver URL: http(s), with a host, without credentials.
fn url_field(field: &str, value: &str) -> Result<String, ApiError> {
    let url = url::Url::parse(value).map_err(|e| invalid(field, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(field, "must be an http or https URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            field,
            "must not hold credentials; put secrets in the path or use a token the receiver checks",
        ));
    }
    Ok(value.to_owned())
}

// ---- views ----

/// A channel, without its secrets.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelView {
    pub id: Uuid,
    pub name: String,
    /// `webhook`, `slack`, `pagerduty` or `email`.
    pub kind: String,
    /// What may be shown of its configuration: never a URL, routing key or password.
    #[schema(value_type = Object)]
    pub settings: Value,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<&Channel> for ChannelView {
    fn from(c: &Channel) -> Self {
        Self {
            id: c.id,
            name: c.name.clone(),
            kind: c.config.kind().to_owned(),
            settings: c.config.public(),
            created_at: ts(c.created_at),
        }
    }
}

/// Every channel.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

/// What `POST …/channels/{id}/test` found: the class and the latency, never the body.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestOutcome {
    /// `delivered`, `rate_limited`, `rejected`, `server_error`, `timeout`, `connect`,
    /// `refused` or `misconfigured`.
    pub outcome: String,
    /// The HTTP status or SMTP code, when there was one.
    pub status: Option<u16>,
    pub latency_ms: u64,
}

/// An incident.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentView {
    pub id: Uuid,
    pub group_key: String,
    pub rule: String,
    pub alertname: String,
    pub severity: String,
    pub region: Option<String>,
    /// `firing`, `acknowledged` or `resolved`.
    pub state: String,
    pub summary: String,
    #[schema(format = DateTime)]
    pub opened_at: String,
    #[schema(format = DateTime)]
    pub acknowledged_at: Option<String>,
    pub acknowledged_by: Option<String>,
    pub ack_reason: Option<String>,
    #[schema(format = DateTime)]
    pub resolved_at: Option<String>,
    /// Servers that were ever members.
    pub servers: u64,
    /// Servers it stands for now.
    pub covers: u64,
}

impl From<&Incident> for IncidentView {
    fn from(i: &Incident) -> Self {
        Self {
            id: i.id,
            group_key: i.group_key.clone(),
            rule: i.rule.as_str().into(),
            alertname: i.rule.alertname().into(),
            severity: i.severity.as_str().into(),
            region: i.region.clone(),
            state: i.state.as_str().into(),
            summary: i.summary.clone(),
            opened_at: ts(i.opened_at),
            acknowledged_at: i.acknowledged_at.map(ts),
            acknowledged_by: i.acknowledged_by.clone(),
            ack_reason: i.ack_reason.clone(),
            resolved_at: i.resolved_at.map(ts),
            servers: i.servers,
            covers: i.covers,
        }
    }
}

/// A page of incidents.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentList {
    pub incidents: Vec<IncidentView>,
    /// How many match, over all pages.
    pub total: u64,
}

/// A server in an incident.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberView {
    pub server_id: Uuid,
    pub server_name: String,
    pub region: Option<String>,
    pub detail: String,
    #[schema(format = DateTime)]
    pub joined_at: String,
    #[schema(format = DateTime)]
    pub resolved_at: Option<String>,
}

/// A timeline line.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimelineView {
    pub id: i64,
    #[schema(format = DateTime)]
    pub at: String,
    pub kind: String,
    pub message: String,
    pub channel_id: Option<Uuid>,
}

/// An incident with its members and timeline.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentDetailView {
    pub incident: IncidentView,
    pub members: Vec<MemberView>,
    pub timeline: Vec<TimelineView>,
}

impl From<&IncidentDetail> for IncidentDetailView {
    fn from(d: &IncidentDetail) -> Self {
        Self {
            incident: (&d.incident).into(),
            members: d
                .members
                .iter()
                .map(|m| MemberView {
                    server_id: m.server_id.0,
                    server_name: m.server_name.clone(),
                    region: m.region.clone(),
                    detail: m.detail.clone(),
                    joined_at: ts(m.joined_at),
                    resolved_at: m.resolved_at.map(ts),
                })
                .collect(),
            timeline: d
                .timeline
                .iter()
                .map(|t| TimelineView {
                    id: t.id,
                    at: ts(t.at),
                    kind: t.kind.clone(),
                    message: t.message.clone(),
                    channel_id: t.channel_id,
                })
                .collect(),
        }
    }
}

/// Matchers; every one given must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchersBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A rule's name, e.g. `server_unreachable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl MatchersBody {
    fn into_matchers(self, field: &str) -> Result<Matchers, ApiError> {
        let rule =
            match self.rule {
                None => None,
                Some(r) => Some(fleet_alerts::Rule::parse(&r).ok_or_else(|| {
                    invalid(&format!("{field}.rule"), format!("unknown rule `{r}`"))
                })?),
            };
        Ok(Matchers {
            server_id: self.server_id.map(ServerId),
            group_id: self.group_id.map(GroupId),
            region: self.region,
            rule,
        })
    }

    fn from_matchers(m: &Matchers) -> Self {
        Self {
            server_id: m.server_id.map(|s| s.0),
            group_id: m.group_id.map(|g| g.0),
            region: m.region.clone(),
            rule: m.rule.map(|r| r.as_str().to_owned()),
        }
    }
}

/// A silence.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceView {
    pub id: Uuid,
    pub matchers: MatchersBody,
    #[schema(format = DateTime)]
    pub starts_at: String,
    #[schema(format = DateTime)]
    pub ends_at: String,
    pub comment: String,
    /// In force now.
    pub active: bool,
    #[schema(format = DateTime)]
    pub created_at: String,
}

fn silence_view(s: &Silence, now: OffsetDateTime) -> SilenceView {
    SilenceView {
        id: s.id,
        matchers: MatchersBody::from_matchers(&s.matchers),
        starts_at: ts(s.starts_at),
        ends_at: ts(s.ends_at),
        comment: s.comment.clone(),
        active: s.active(now),
        created_at: ts(s.created_at),
    }
}

/// Silences not yet over.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceList {
    pub silences: Vec<SilenceView>,
}

/// A maintenance window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowView {
    pub id: Uuid,
    pub name: String,
    pub server_id: Option<Uuid>,
    pub group_id: Option<Uuid>,
    pub region: Option<String>,
    #[schema(format = DateTime)]
    pub starts_at: Option<String>,
    #[schema(format = DateTime)]
    pub ends_at: Option<String>,
    pub weekdays: Option<Vec<String>>,
    pub start_time: Option<String>,
    pub duration_seconds: Option<u64>,
    pub time_zone: Option<String>,
    /// Open now.
    pub active: bool,
    #[schema(format = DateTime)]
    pub created_at: String,
}

fn window_view(w: &MaintenanceWindow, now: OffsetDateTime) -> WindowView {
    let (server_id, group_id, region) = match &w.scope {
        Scope::ServerId(s) => (Some(s.0), None, None),
        Scope::GroupId(g) => (None, Some(g.0), None),
        Scope::Region(r) => (None, None, Some(r.clone())),
    };
    let (starts_at, ends_at, weekly) = match &w.schedule {
        Schedule::Once { starts_at, ends_at } => (Some(ts(*starts_at)), Some(ts(*ends_at)), None),
        Schedule::Weekly(wk) => (None, None, Some(wk)),
    };
    WindowView {
        id: w.id,
        name: w.name.clone(),
        server_id,
        group_id,
        region,
        starts_at,
        ends_at,
        weekdays: weekly.map(|w| w.weekdays.clone()),
        start_time: weekly.map(|w| w.start_time.clone()),
        duration_seconds: weekly.map(|w| w.duration_seconds),
        time_zone: weekly.map(|w| w.time_zone.clone()),
        active: w.schedule.contains(now),
        created_at: ts(w.created_at),
    }
}

/// Every maintenance window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowList {
    pub windows: Vec<WindowView>,
}

/// An escalation step.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    /// Seconds after the first announcement, unacknowledged.
    pub after_seconds: u64,
    pub channel_ids: Vec<Uuid>,
}

/// An escalation policy.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyView {
    pub id: Uuid,
    pub name: String,
    pub matchers: MatchersBody,
    pub steps: Vec<StepBody>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

fn policy_view(p: &Policy) -> PolicyView {
    PolicyView {
        id: p.id,
        name: p.name.clone(),
        matchers: MatchersBody::from_matchers(&p.matchers),
        steps: p
            .steps
            .iter()
            .map(|s| StepBody {
                after_seconds: s.after_seconds,
                channel_ids: s.channel_ids.clone(),
            })
            .collect(),
        created_at: ts(p.created_at),
    }
}

/// Every policy.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyList {
    pub policies: Vec<PolicyView>,
}

// ---- channels ----

/// A channel: `name`, `kind` and that kind's fields. On PATCH every field is optional; the
/// fields given replace the stored ones.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    pub name: Option<String>,
    /// `webhook`, `slack`, `pagerduty` or `email`.
    pub kind: Option<String>,
    /// webhook, slack, pagerduty (optional there): where to POST. A secret.
    pub url: Option<String>,
    /// webhook: send resolved notices (default true).
    pub send_resolved: Option<bool>,
    /// pagerduty: the integration's routing key. A secret.
    pub routing_key: Option<String>,
    /// email: recipients.
    pub to: Option<Vec<String>>,
    /// email: sender.
    pub from: Option<String>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    pub smtp_tls: Option<String>,
    pub smtp_username: Option<String>,
    /// A secret.
    pub smtp_password: Option<String>,
}

fn required<T>(field: &str, kind: &str, v: Option<T>) -> Result<T, ApiError> {
    v.ok_or_else(|| invalid(field, format!("required for kind {kind}")))
}

fn address(field: &str, a: &str) -> Result<String, ApiError> {
    let a = a.trim();
    match a.split_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() && !a.contains(char::is_whitespace) => {
            Ok(a.to_owned())
        }
        _ => Err(invalid(field, format!("`{a}` is not an email address"))),
    }
}

impl ChannelBody {
    /// The configuration these fields make, over `base` (the stored one, on PATCH).
    fn config(self, base: Option<&ChannelConfig>) -> Result<ChannelConfig, ApiError> {
        let base_kind = base.map(ChannelConfig::kind);
        let kind = match (&self.kind, base_kind) {
            (Some(k), _) => k.clone(),
            (None, Some(k)) => k.to_owned(),
            (None, None) => {
                return Err(invalid(
                    "kind",
                    "required: webhook, slack, pagerduty or email",
                ));
            }
        };
        // On PATCH, a field not given keeps its stored value (of the same kind only).
        let same = base.filter(|b| b.kind() == kind);
        let old = |f: &str| -> Option<Value> {
            same.and_then(|b| serde_json::to_value(b).ok())
                .and_then(|v| v.get(f).cloned())
                .filter(|v| !v.is_null())
        };
        let old_str = |f: &str| old(f).and_then(|v| v.as_str().map(str::to_owned));
        let stray = |fields: &[(&str, bool)]| -> Result<(), ApiError> {
            for (f, given) in fields {
                if *given {
                    return Err(invalid(f, format!("not a field of kind {kind}")));
                }
            }
            Ok(())
        };
        let email_given = [
            ("to", self.to.is_some()),
            ("from", self.from.is_some()),
            ("smtp_host", self.smtp_host.is_some()),
            ("smtp_port", self.smtp_port.is_some()),
            ("smtp_tls", self.smtp_tls.is_some()),
            ("smtp_username", self.smtp_username.is_some()),
            ("smtp_password", self.smtp_password.is_some()),
        ];
        match kind.as_str() {
            "webhook" | "slack" => {
                stray(&email_given)?;
                stray(&[("routing_key", self.routing_key.is_some())])?;
                let url = url_field(
                    "url",
                    &required("url", &kind, self.url.or_else(|| old_str("url")))?,
                )?;
                if kind == "webhook" {
                    let send_resolved = self
                        .send_resolved
                        .or_else(|| old("send_resolved").and_then(|v| v.as_bool()))
                        .unwrap_or(true);
                    Ok(ChannelConfig::Webhook { url, send_resolved })
                } else {
                    stray(&[("send_resolved", self.send_resolved.is_some())])?;
                    Ok(ChannelConfig::Slack { url })
                }
            }
            "pagerduty" => {
                stray(&email_given)?;
                stray(&[("send_resolved", self.send_resolved.is_some())])?;
                let routing_key = required(
                    "routing_key",
                    &kind,
                    self.routing_key.or_else(|| old_str("routing_key")),
                )?;
                if routing_key.trim().is_empty() || routing_key.len() > 200 {
                    return Err(invalid("routing_key", "must be 1 to 200 characters"));
                }
                let url = match self.url.or_else(|| old_str("url")) {
                    Some(u) => Some(url_field("url", &u)?),
                    None => None,
                };
                Ok(ChannelConfig::Pagerduty { routing_key, url })
            }
            "email" => {
                stray(&[
                    ("url", self.url.is_some()),
                    ("routing_key", self.routing_key.is_some()),
                    ("send_resolved", self.send_resolved.is_some()),
                ])?;
                let to = match self.to {
                    Some(t) => t,
                    None => old("to")
                        .and_then(|v| serde_json::from_value(v).ok())
                        .ok_or_else(|| invalid("to", "required for kind email"))?,
                };
                if to.is_empty() || to.len() > 50 {
                    return Err(invalid("to", "name 1 to 50 recipients"));
                }
                let to = to
                    .iter()
                    .map(|a| address("to", a))
                    .collect::<Result<Vec<_>, _>>()?;
                let from = address(
                    "from",
                    &required("from", &kind, self.from.or_else(|| old_str("from")))?,
                )?;
                let smtp_host = required(
                    "smtp_host",
                    &kind,
                    self.smtp_host.or_else(|| old_str("smtp_host")),
                )?;
                if smtp_host.trim().is_empty() || smtp_host.contains(['/', ' ', '@']) {
                    return Err(invalid("smtp_host", "must be a host name or address"));
                }
                let smtp_port = self
                    .smtp_port
                    .or_else(|| old("smtp_port").and_then(|v| v.as_u64()).map(|p| p as u16))
                    .ok_or_else(|| invalid("smtp_port", "required for kind email"))?;
                if smtp_port == 0 {
                    return Err(invalid("smtp_port", "must be 1 to 65535"));
                }
                let smtp_tls = match self.smtp_tls.or_else(|| old_str("smtp_tls")).as_deref() {
                    None | Some("starttls") => SmtpTls::Starttls,
                    Some("tls") => SmtpTls::Tls,
                    Some("none") => SmtpTls::None,
                    Some(other) => {
                        return Err(invalid(
                            "smtp_tls",
                            format!("`{other}`: expected starttls, tls or none"),
                        ));
                    }
                };
                let smtp_username = self.smtp_username.or_else(|| old_str("smtp_username"));
                let smtp_password = self.smtp_password.or_else(|| old_str("smtp_password"));
                if smtp_username.is_some() != smtp_password.is_some() {
                    return Err(invalid(
                        "smtp_password",
                        "give smtp_username and smtp_password together",
                    ));
                }
                Ok(ChannelConfig::Email {
                    to,
                    from,
                    smtp_host,
                    smtp_port,
                    smtp_tls,
                    smtp_username,
                    smtp_password,
                })
            }
            other => Err(invalid(
                "kind",
                format!("unknown kind `{other}`: expected webhook, slack, pagerduty or email"),
            )),
        }
    }
}

pub(crate) async fn list_channels(State(app): State<AppState>) -> ApiResult {
    let channels = store(&app)?.list_channels().await?;
    ok(ChannelList {
        channels: channels.iter().map(ChannelView::from).collect(),
    })
}

pub(crate) async fn create_channel(
    State(app): State<AppState>,
    ApiJson(body): ApiJson<ChannelBody>,
) -> ApiResult {
    let name = name_field(body.name.as_deref().unwrap_or_default())?;
    let config = body.config(None)?;
    let c = store(&app)?
        .create_channel(&name, config, app.clock.now())
        .await?;
    tracing::info!(target: "fleet::alerts", channel = %c.name, kind = c.config.kind(), "channel added");
    changed(&app);
    created(ChannelView::from(&c))
}

async fn channel(app: &AppState, id: Uuid) -> Result<Channel, ApiError> {
    store(app)?
        .get_channel(id)
        .await?
        .ok_or_else(|| ApiError::not_found("channel"))
}

pub(crate) async fn get_channel(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    ok(ChannelView::from(&channel(&app, id).await?))
}

pub(crate) async fn update_channel(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(mut body): ApiJson<ChannelBody>,
) -> ApiResult {
    let current = channel(&app, id).await?;
    let name = body.name.take().map(|n| name_field(&n)).transpose()?;
    let config = body.config(Some(&current.config))?;
    let patch = ChannelPatch {
        name,
        config: Some(config),
    };
    let c = store(&app)?
        .update_channel(id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("channel"))?;
    changed(&app);
    ok(ChannelView::from(&c))
}

pub(crate) async fn delete_channel(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let done = store(&app)?.delete_channel(id).await?;
    changed(&app);
    if done {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("channel"))
    }
}

pub(crate) async fn test_channel(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let c = channel(&app, id).await?;
    let (class, status, latency) = handle(&app)?.test(&c).await;
    ok(TestOutcome {
        outcome: class.as_str().into(),
        status,
        latency_ms: latency.as_millis() as u64,
    })
}

// ---- incidents ----

/// Filters of the incident list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IncidentQuery {
    state: Option<String>,
    severity: Option<String>,
    server_id: Option<String>,
    group_id: Option<String>,
    region: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

fn uuid_param(field: &str, v: &Option<String>) -> Result<Option<Uuid>, ApiError> {
    v.as_deref()
        .map(|s| {
            Uuid::parse_str(s)
                .map_err(|_| ApiError::bad_request(format!("{field}: `{s}` is not a UUID")))
        })
        .transpose()
}

pub(crate) async fn list_incidents(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<IncidentQuery>,
) -> ApiResult {
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(IncidentState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state: unknown `{s}`, expected firing, acknowledged or resolved"
            ))
        })?),
    };
    let severity = match q.severity.as_deref() {
        None => None,
        Some(s) => Some(Severity::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "severity: unknown `{s}`, expected critical or warning"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 500"));
    }
    let offset = q.offset.unwrap_or(0);
    if offset > 100_000 {
        return Err(ApiError::bad_request("offset must be at most 100000"));
    }
    let filter = IncidentFilter {
        state,
        severity,
        server: uuid_param("server_id", &q.server_id)?.map(ServerId),
        group: uuid_param("group_id", &q.group_id)?.map(GroupId),
        region: q.region,
        limit,
        offset,
    };
    let (incidents, total) = store(&app)?.list_incidents(&filter).await?;
    ok(IncidentList {
        incidents: incidents.iter().map(IncidentView::from).collect(),
        total,
    })
}

pub(crate) async fn get_incident(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let d = store(&app)?
        .incident(id)
        .await?
        .ok_or_else(|| ApiError::not_found("incident"))?;
    ok(IncidentDetailView::from(&d))
}

/// An acknowledgement: why, required.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    pub reason: Option<String>,
}

pub(crate) async fn ack_incident(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AckBody>,
) -> ApiResult {
    let reason = body.reason.unwrap_or_default();
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 1000 {
        return Err(invalid("reason", "required, up to 1000 characters"));
    }
    match handle(&app)?.acknowledge(id, &caller.0, reason).await {
        Ok(i) => {
            tracing::info!(target: "fleet::alerts", incident = %id, by = %caller.0, reason, "incident acknowledged");
            ok(IncidentView::from(&i))
        }
        Err(AckError::NotFound) => Err(ApiError::not_found("incident")),
        Err(AckError::Resolved) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "resolved",
            "the incident is resolved; there is nothing to acknowledge",
        )),
        Err(AckError::Stopped) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "alerts_off",
            "the alert pipeline is not running",
        )),
        Err(AckError::NotLeader) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            "another instance leads alert evaluation: acknowledge the incident through the leader (GET /api/v1/fleet/instances names it)",
        )),
        Err(AckError::Store(e)) => Err(e.into()),
    }
}

// ---- silences ----

/// A silence.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceBody {
    #[serde(default)]
    pub matchers: MatchersBody,
    #[schema(format = DateTime)]
    pub starts_at: String,
    #[schema(format = DateTime)]
    pub ends_at: String,
    #[serde(default)]
    pub comment: String,
}

pub(crate) async fn list_silences(State(app): State<AppState>) -> ApiResult {
    let now = app.clock.now();
    let s = store(&app)?.list_silences(now).await?;
    ok(SilenceList {
        silences: s.iter().map(|s| silence_view(s, now)).collect(),
    })
}

pub(crate) async fn create_silence(
    State(app): State<AppState>,
    ApiJson(body): ApiJson<SilenceBody>,
) -> ApiResult {
    let matchers = body.matchers.into_matchers("matchers")?;
    if matchers.is_empty() {
        return Err(invalid(
            "matchers",
            "name at least one of server_id, group_id, region, rule",
        ));
    }
    let starts = time_field("starts_at", &body.starts_at)?;
    let ends = time_field("ends_at", &body.ends_at)?;
    if ends <= starts {
        return Err(invalid("ends_at", "must be after starts_at"));
    }
    if body.comment.chars().count() > 1000 {
        return Err(invalid("comment", "at most 1000 characters"));
    }
    let now = app.clock.now();
    let s = store(&app)?
        .create_silence(matchers, starts, ends, &body.comment, now)
        .await?;
    changed(&app);
    created(silence_view(&s, now))
}

pub(crate) async fn get_silence(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let s = store(&app)?
        .get_silence(id)
        .await?
        .ok_or_else(|| ApiError::not_found("silence"))?;
    ok(silence_view(&s, app.clock.now()))
}

pub(crate) async fn delete_silence(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let done = store(&app)?.delete_silence(id).await?;
    changed(&app);
    if done {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("silence"))
    }
}

// ---- maintenance windows ----

/// A maintenance window: a name, one scope (`server_id`, `group_id` or `region`), and either
/// `starts_at`/`ends_at` or `weekdays`/`start_time`/`duration_seconds`/`time_zone`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowBody {
    pub name: Option<String>,
    pub server_id: Option<Uuid>,
    pub group_id: Option<Uuid>,
    pub region: Option<String>,
    #[schema(format = DateTime)]
    pub starts_at: Option<String>,
    #[schema(format = DateTime)]
    pub ends_at: Option<String>,
    pub weekdays: Option<Vec<String>>,
    /// `HH:MM`, local time.
    pub start_time: Option<String>,
    pub duration_seconds: Option<u64>,
    /// An IANA zone, e.g. `Europe/Berlin`.
    pub time_zone: Option<String>,
}

impl WindowBody {
    fn scope(&self) -> Result<Option<Scope>, ApiError> {
        let given = [
            self.server_id.map(|s| Scope::ServerId(ServerId(s))),
            self.group_id.map(|g| Scope::GroupId(GroupId(g))),
            self.region.clone().map(Scope::Region),
        ];
        let mut scopes: Vec<Scope> = given.into_iter().flatten().collect();
        match scopes.len() {
            0 => Ok(None),
            1 => Ok(scopes.pop()),
            _ => Err(invalid(
                "server_id",
                "give one of server_id, group_id or region",
            )),
        }
    }

    fn schedule(&self) -> Result<Option<Schedule>, ApiError> {
        let once = self.starts_at.is_some() || self.ends_at.is_some();
        let weekly = self.weekdays.is_some()
            || self.start_time.is_some()
            || self.duration_seconds.is_some()
            || self.time_zone.is_some();
        let schedule = match (once, weekly) {
            (false, false) => return Ok(None),
            (true, true) => {
                return Err(invalid(
                    "starts_at",
                    "give starts_at and ends_at, or weekdays, start_time, duration_seconds and time_zone, not both",
                ));
            }
            (true, false) => Schedule::Once {
                starts_at: time_field(
                    "starts_at",
                    self.starts_at
                        .as_deref()
                        .ok_or_else(|| invalid("starts_at", "required with ends_at"))?,
                )?,
                ends_at: time_field(
                    "ends_at",
                    self.ends_at
                        .as_deref()
                        .ok_or_else(|| invalid("ends_at", "required with starts_at"))?,
                )?,
            },
            (false, true) => Schedule::Weekly(Weekly {
                weekdays: self.weekdays.clone().unwrap_or_default(),
                start_time: self
                    .start_time
                    .clone()
                    .ok_or_else(|| invalid("start_time", "required for a weekly window"))?,
                duration_seconds: self
                    .duration_seconds
                    .ok_or_else(|| invalid("duration_seconds", "required for a weekly window"))?,
                time_zone: self
                    .time_zone
                    .clone()
                    .ok_or_else(|| invalid("time_zone", "required for a weekly window"))?,
            }),
        };
        schedule
            .validate()
            .map_err(|e| invalid(e.field, e.message))?;
        Ok(Some(schedule))
    }
}

pub(crate) async fn list_windows(State(app): State<AppState>) -> ApiResult {
    let now = app.clock.now();
    let w = store(&app)?.list_windows().await?;
    ok(WindowList {
        windows: w.iter().map(|w| window_view(w, now)).collect(),
    })
}

pub(crate) async fn create_window(
    State(app): State<AppState>,
    ApiJson(body): ApiJson<WindowBody>,
) -> ApiResult {
    let name = name_field(body.name.as_deref().unwrap_or_default())?;
    let scope = body
        .scope()?
        .ok_or_else(|| invalid("server_id", "give one of server_id, group_id or region"))?;
    let schedule = body.schedule()?.ok_or_else(|| {
        invalid(
            "starts_at",
            "give starts_at and ends_at, or weekdays, start_time, duration_seconds and time_zone",
        )
    })?;
    let now = app.clock.now();
    let w = store(&app)?
        .create_window(&name, scope, schedule, now)
        .await?;
    changed(&app);
    created(window_view(&w, now))
}

pub(crate) async fn get_window(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let w = store(&app)?
        .get_window(id)
        .await?
        .ok_or_else(|| ApiError::not_found("maintenance window"))?;
    ok(window_view(&w, app.clock.now()))
}

pub(crate) async fn update_window(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<WindowBody>,
) -> ApiResult {
    let patch = WindowPatch {
        name: body.name.as_deref().map(name_field).transpose()?,
        scope: body.scope()?,
        schedule: body.schedule()?,
    };
    let w = store(&app)?
        .update_window(id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("maintenance window"))?;
    changed(&app);
    ok(window_view(&w, app.clock.now()))
}

pub(crate) async fn delete_window(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let done = store(&app)?.delete_window(id).await?;
    changed(&app);
    if done {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("maintenance window"))
    }
}

// ---- policies ----

/// An escalation policy.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub name: Option<String>,
    pub matchers: Option<MatchersBody>,
    pub steps: Option<Vec<StepBody>>,
}

async fn steps(app: &AppState, steps: Vec<StepBody>) -> Result<Vec<Step>, ApiError> {
    if steps.len() > 20 {
        return Err(invalid("steps", "at most 20 steps"));
    }
    let known: Vec<Uuid> = store(app)?
        .list_channels()
        .await?
        .iter()
        .map(|c| c.id)
        .collect();
    let mut out = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        if s.channel_ids.is_empty() {
            return Err(invalid(
                &format!("steps[{i}].channel_ids"),
                "name at least one channel",
            ));
        }
        if let Some(unknown) = s.channel_ids.iter().find(|c| !known.contains(c)) {
            return Err(invalid(
                &format!("steps[{i}].channel_ids"),
                format!("no channel {unknown}"),
            ));
        }
        if s.after_seconds > 30 * 86_400 {
            return Err(invalid(
                &format!("steps[{i}].after_seconds"),
                "at most 30 days",
            ));
        }
        out.push(Step {
            after_seconds: s.after_seconds,
            channel_ids: s.channel_ids,
        });
    }
    out.sort_by_key(|s| s.after_seconds);
    Ok(out)
}

pub(crate) async fn list_policies(State(app): State<AppState>) -> ApiResult {
    let p = store(&app)?.list_policies().await?;
    ok(PolicyList {
        policies: p.iter().map(policy_view).collect(),
    })
}

pub(crate) async fn create_policy(
    State(app): State<AppState>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> ApiResult {
    let name = name_field(body.name.as_deref().unwrap_or_default())?;
    let matchers = body
        .matchers
        .unwrap_or_default()
        .into_matchers("matchers")?;
    let steps = steps(
        &app,
        body.steps.ok_or_else(|| invalid("steps", "required"))?,
    )
    .await?;
    if steps.is_empty() {
        return Err(invalid("steps", "name at least one step"));
    }
    let p = store(&app)?
        .create_policy(&name, matchers, steps, app.clock.now())
        .await?;
    changed(&app);
    created(policy_view(&p))
}

pub(crate) async fn get_policy(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let p = store(&app)?
        .get_policy(id)
        .await?
        .ok_or_else(|| ApiError::not_found("policy"))?;
    ok(policy_view(&p))
}

pub(crate) async fn update_policy(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> ApiResult {
    let steps = match body.steps {
        Some(s) => {
            let s = steps(&app, s).await?;
            if s.is_empty() {
                return Err(invalid("steps", "name at least one step"));
            }
            Some(s)
        }
        None => None,
    };
    let patch = PolicyPatch {
        name: body.name.as_deref().map(name_field).transpose()?,
        matchers: body
            .matchers
            .map(|m| m.into_matchers("matchers"))
            .transpose()?,
        steps,
    };
    let p = store(&app)?
        .update_policy(id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("policy"))?;
    changed(&app);
    ok(policy_view(&p))
}

pub(crate) async fn delete_policy(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult {
    let done = store(&app)?.delete_policy(id).await?;
    changed(&app);
    if done {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("policy"))
    }
}

/// Open incidents by severity, for the summary and the status endpoint; `None` without
/// alerts or when the store does not answer.
pub(crate) async fn open_incidents(app: &AppState) -> Option<BTreeMap<String, u64>> {
    let store = app.alerts.as_ref()?.store();
    let counts = store.open_by_severity().await.ok()?;
    Some(
        counts
            .into_iter()
            .map(|(s, n)| (s.as_str().to_owned(), n))
            .collect(),
    )
}

/// The alert pipeline's figures, for the status endpoint.
pub(crate) fn stats(app: &AppState) -> Option<Value> {
    app.alerts.as_ref().map(|h| json!(h.stats()))
}
