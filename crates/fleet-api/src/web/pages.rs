//! The dashboard's pages, rendered on the server. Every value goes through maud, which escapes
//! it: a server named `<script>` is shown, never run. Parts that live updates refresh carry
//! `data-live` and an id; the script fetches the page again and swaps just those.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_alerts::{IncidentFilter, IncidentState, Scope, Severity};
use fleet_core::{
    ChangeQuery, GroupId, HealthCheck, HealthStatus, HistoryQuery, ManagedServer, Role,
    ServerFilter, ServerId, ServerStatus, StateChange,
};
use maud::{DOCTYPE, Markup, html};
use time::OffsetDateTime;
use uuid::Uuid;

use super::session::Session;
use super::{PageError, asset_url};
use crate::{ApiError, AppState};

type Page = Result<Response, PageError>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Overview,
    Servers,
    Groups,
    Incidents,
    Maintenance,
}

/// A page's `<head>`: `extra` goes after the stylesheet (the script and CSRF token of
/// signed-in pages).
fn head(title: &str, extra: Markup) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Fleet" }
            link rel="stylesheet" href=(asset_url("app.css"));
            (extra)
        }
    }
}

/// The frame of every signed-in page.
async fn layout(app: &AppState, s: &Session, title: &str, nav: Nav, main: Markup) -> Response {
    let open_incidents: Option<u64> = match &app.alerts {
        Some(a) => a
            .store()
            .open_by_severity()
            .await
            .ok()
            .map(|v| v.iter().map(|(_, n)| n).sum()),
        None => None,
    };
    let link = |to: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(to == nav).then_some("page")] { (label) }
        }
    };
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, html! {
                meta name="csrf-token" content=(s.csrf);
                meta name="fleet-role" content=(s.role.as_str());
                script src=(asset_url("app.js")) defer {}
            }))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/dashboard/" { "Fleet" }
                        (link(Nav::Overview, "/dashboard/", "Overview"))
                        (link(Nav::Servers, "/dashboard/servers", "Servers"))
                        (link(Nav::Groups, "/dashboard/groups", "Groups"))
                        @if app.alerts.is_some() {
                            a href="/dashboard/incidents" aria-current=[(nav == Nav::Incidents).then_some("page")] {
                                "Incidents"
                                span #nav-incidents data-live {
                                    @if let Some(n) = open_incidents.filter(|n| *n > 0) {
                                        " " span.badge.critical title="open incidents" { (n) span.sr { " open" } }
                                    }
                                }
                            }
                            (link(Nav::Maintenance, "/dashboard/maintenance", "Silences & windows"))
                        }
                    }
                    div.who {
                        span { (s.name) " (" (s.role.as_str()) ")" }
                        form method="post" action="/dashboard/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                div #live-status .banner role="status" aria-live="polite" hidden { }
                main #main tabindex="-1" { (main) }
                div #toasts aria-live="polite" aria-atomic="false" { }
            }
        }
    };
    let mut response = markup.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The sign-in page, with a message after a failure.
pub(crate) fn sign_in(next: &str, message: Option<&str>, status: StatusCode) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in", html! {}))
            body.signin {
                main #main {
                    h1 { "Fleet" }
                    form.card method="post" action="/dashboard/sign-in" {
                        @if let Some(m) = message {
                            p.error role="alert" { (m) }
                        }
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        input type="hidden" name="next" value=(next);
                        button type="submit" { "Sign in" }
                        p.hint { "An admin token may change things; a viewer token only looks." }
                    }
                }
            }
        }
    };
    let mut response = (status, markup).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An error as a page, with the API's status.
pub(crate) fn error_page(e: ApiError) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Error", html! {}))
            body {
                main #main {
                    h1 { "Something is wrong" }
                    p.error role="alert" { (e.message) }
                    p { a href="/dashboard/" { "Back to the overview" } }
                }
            }
        }
    };
    (e.status, markup).into_response()
}

fn bad(message: impl Into<String>) -> PageError {
    PageError::Api(ApiError::bad_request(message))
}

// ---- small pieces ----------------------------------------------------------------------

fn health_class(h: Option<HealthStatus>) -> &'static str {
    h.map_or("unknown", |h| h.as_str())
}

fn health_text(h: Option<HealthStatus>) -> &'static str {
    h.map_or("never checked", |h| h.as_str())
}

/// A status shown by a shape and a word, never by colour alone.
fn health_badge(h: Option<HealthStatus>) -> Markup {
    html! {
        span class=(format!("health {}", health_class(h))) {
            span.dot aria-hidden="true" {}
            (health_text(h))
        }
    }
}

fn absolute(t: OffsetDateTime) -> String {
    crate::views::ts(t)
}

fn relative(now: OffsetDateTime, t: OffsetDateTime) -> String {
    let secs = (now - t).whole_seconds();
    let (n, unit, suffix) = match secs.abs() {
        s if s < 60 => (s, "s", ""),
        s if s < 3_600 => (s / 60, "min", ""),
        s if s < 86_400 => (s / 3_600, "h", ""),
        s => (s / 86_400, "d", ""),
    };
    if secs >= 0 {
        format!("{n} {unit} ago{suffix}")
    } else {
        format!("in {n} {unit}")
    }
}

/// A time shown relative, with the absolute time beside it for whoever needs it.
fn when(now: OffsetDateTime, t: Option<OffsetDateTime>) -> Markup {
    match t {
        None => html! { span.muted { "never" } },
        Some(t) => html! {
            time datetime=(absolute(t)) title=(absolute(t)) { (relative(now, t)) }
        },
    }
}

/// The last checks as bars, oldest on the left: height by response time, colour and a
/// text summary by health.
fn sparkline(checks: &[HealthCheck]) -> Markup {
    if checks.is_empty() {
        return html! { span.muted { "no checks yet" } };
    }
    let max = checks
        .iter()
        .filter_map(|c| c.response_time_ms)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in checks {
        *counts.entry(c.status.as_str()).or_default() += 1;
    }
    let summary = format!(
        "last {} checks: {}",
        checks.len(),
        counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let width = 3 * 30;
    html! {
        svg.spark width=(width) height="20" viewBox=(format!("0 0 {width} 20")) role="img" aria-label=(summary) {
            title { (summary) }
            @for (i, c) in checks.iter().rev().enumerate() {
                @let h = match c.response_time_ms {
                    Some(ms) if c.status != HealthStatus::Unreachable => 3 + (17 * ms / max) as usize,
                    _ => 20,
                };
                rect class=(c.status.as_str()) x=(i * 3) y=(20 - h) width="2" height=(h) {}
            }
        }
    }
}

/// A stacked bar of counts, with the numbers as text beside it.
fn bar(parts: &[(&str, &str, u64)]) -> Markup {
    let total: u64 = parts.iter().map(|p| p.2).sum();
    let mut x = 0.0;
    let mut rects = Vec::new();
    for (class, label, n) in parts.iter().filter(|p| p.2 > 0) {
        let w = 1000.0 * *n as f64 / total as f64;
        rects.push((*class, *label, *n, x, w));
        x += w;
    }
    html! {
        svg.bar viewBox="0 0 1000 16" preserveAspectRatio="none" role="img" aria-label="health distribution" {
            @if total == 0 {
                rect.unknown x="0" y="0" width="1000" height="16" {}
            }
            @for (class, label, n, x, w) in rects {
                rect class=(class) x=(format!("{x:.1}")) y="0" width=(format!("{w:.1}")) height="16" {
                    title { (label) ": " (n) }
                }
            }
        }
    }
}

fn status_options(selected: Option<&str>) -> Markup {
    html! {
        option value="" { "any" }
        @for s in ServerStatus::ALL {
            option value=(s.as_str()) selected[selected == Some(s.as_str())] { (s.as_str()) }
        }
    }
}

fn action(
    method: &str,
    url: &str,
    body: Option<&str>,
    label: &str,
    confirm: Option<&str>,
) -> Markup {
    html! {
        button type="button" data-method=(method) data-url=(url) data-body=[body] data-confirm=[confirm] { (label) }
    }
}

// ---- overview --------------------------------------------------------------------------

pub(crate) async fn overview(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
) -> Page {
    let now = app.clock.now();
    let tallies = app.tallies.get(&*app.store).await?;
    let total: u64 = tallies.iter().map(|t| t.count).sum();
    let by_status = |st: ServerStatus| -> u64 {
        tallies
            .iter()
            .filter(|t| t.status == st)
            .map(|t| t.count)
            .sum()
    };
    let by_health = crate::handlers::by_health(tallies.iter());
    let health = |k: &str| by_health.get(k).copied().unwrap_or(0);
    let changes = app
        .store
        .state_changes(ChangeQuery {
            server: None,
            limit: 20,
            offset: 0,
        })
        .await?;
    let incidents = crate::alerts::open_incidents(&app).await;
    let llm = app.llm.get(&app).await.ok();
    let workers = {
        let w = app.workers.read().unwrap_or_else(|e| e.into_inner());
        [
            ("health", w.health.as_ref().map(|h| h.snapshot())),
            ("metrics", w.metrics.as_ref().map(|h| h.snapshot())),
        ]
    };
    let parts = [
        ("healthy", "healthy", health("healthy")),
        ("degraded", "degraded", health("degraded")),
        ("critical", "critical", health("critical")),
        ("unreachable", "unreachable", health("unreachable")),
        ("unknown", "never checked", health("unknown")),
    ];
    let main = html! {
        h1 { "Overview" }
        div.grid {
            section.card #ov-servers data-live aria-labelledby="h-servers" {
                h2 #h-servers { "Servers" }
                dl.figures {
                    div { dt { "total" } dd #count-total { (total) } }
                    @for st in ServerStatus::ALL {
                        div { dt { (st.as_str()) } dd id=(format!("count-{}", st.as_str())) { (by_status(*st)) } }
                    }
                }
            }
            section.card #ov-health data-live aria-labelledby="h-health" {
                h2 #h-health { "Health" }
                (bar(&parts))
                dl.figures {
                    @for (class, label, n) in parts {
                        div {
                            dt { span class=(format!("health {class}")) { span.dot aria-hidden="true" {} (label) } }
                            dd id=(format!("health-{class}")) {
                                a href=(format!("/dashboard/servers?health={}", if class == "unknown" { "" } else { class })) { (n) }
                            }
                        }
                    }
                }
            }
            @if let Some(incidents) = &incidents {
                section.card #ov-incidents data-live aria-labelledby="h-incidents" {
                    h2 #h-incidents { "Open incidents" }
                    dl.figures {
                        @for sev in Severity::ALL {
                            div {
                                dt { (sev.as_str()) }
                                dd id=(format!("incidents-{}", sev.as_str())) {
                                    a href=(format!("/dashboard/incidents?state=open&severity={}", sev.as_str())) {
                                        (incidents.get(sev.as_str()).copied().unwrap_or(0))
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card #ov-llm aria-labelledby="h-llm" {
                h2 #h-llm { "LLM use, last 24 h" }
                @match llm {
                    Some((requests, cost)) => dl.figures {
                        div { dt { "requests" } dd #llm-requests { (requests) } }
                        div { dt { "cost" } dd #llm-cost { (format!("${cost:.2}")) } }
                    },
                    None => p.muted { "unavailable while the store is away" },
                }
            }
        }
        @if s.role == Role::Admin {
            section.card #ov-workers data-live aria-labelledby="h-workers" {
                h2 #h-workers { "Workers" }
                table {
                    thead { tr {
                        th scope="col" { "worker" } th scope="col" { "last cycle" } th scope="col" { "duration" }
                        th scope="col" { "success rate" } th scope="col" { "overruns" } th scope="col" { "pending" } th scope="col" { "dropped" }
                    } }
                    tbody {
                        @for (name, stats) in &workers {
                            tr {
                                th scope="row" { (name) }
                                @match stats {
                                    Some(w) => {
                                        td { (when(now, w.last_run)) }
                                        td { (w.last_duration_seconds.map(|d| format!("{d:.2} s")).unwrap_or_else(|| "–".into())) }
                                        td { (format!("{:.1} %", w.success_rate)) }
                                        td { (w.overruns) }
                                        td { (w.pending) }
                                        td { (w.dropped) }
                                    }
                                    None => td colspan="6" { span.muted { "not running" } },
                                }
                            }
                        }
                    }
                }
            }
        }
        section.card #ov-changes data-live aria-labelledby="h-changes" {
            h2 #h-changes { "Latest state changes" }
            (change_list(now, &changes))
        }
    };
    Ok(layout(&app, &s, "Overview", Nav::Overview, main).await)
}

fn change_list(now: OffsetDateTime, changes: &[StateChange]) -> Markup {
    html! {
        @if changes.is_empty() {
            p.muted { "No changes yet." }
        } @else {
            ol.changes {
                @for c in changes {
                    li {
                        (when(now, Some(c.changed_at))) " "
                        a href=(format!("/dashboard/servers/{}", c.server_id.0)) { (c.server_name) } " "
                        (health_badge(c.from_status)) " → " (health_badge(Some(c.to_status)))
                        @if let Some(e) = &c.error_message {
                            " " span.err { (e) }
                        }
                    }
                }
            }
        }
    }
}

// ---- server list -----------------------------------------------------------------------

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ListParams {
    q: Option<String>,
    status: Option<String>,
    health: Option<String>,
    region: Option<String>,
    environment: Option<String>,
    group: Option<String>,
    sort: Option<String>,
    page: Option<String>,
}

const PER_PAGE: usize = 50;
/// The deepest page of servers: an offset costs the rows it skips, so paging stops 10,000
/// rows in, where a filter or the reverse sort reaches the rest.
const MAX_PAGE: usize = 200;

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl ListParams {
    fn filter(&self) -> Result<(ServerFilter, usize), PageError> {
        let text = |field: &'static str, v: &Option<String>| -> Result<Option<String>, PageError> {
            match nonempty(v) {
                None => Ok(None),
                Some(v) => fleet_core::validate::text(field, v, 255)
                    .map(|()| Some(v.to_owned()))
                    .map_err(|e| bad(e.to_string())),
            }
        };
        let page = match nonempty(&self.page) {
            None => 1,
            Some(p) => p
                .parse::<usize>()
                .ok()
                .filter(|p| (1..=MAX_PAGE).contains(p))
                .ok_or_else(|| {
                    bad(format!(
                        "page must be 1 to {MAX_PAGE}: narrow the filters, or sort the other way, to reach further"
                    ))
                })?,
        };
        Ok((
            ServerFilter {
                status: nonempty(&self.status)
                    .map(|s| s.parse().map_err(|e| bad(format!("status: {e}"))))
                    .transpose()?,
                health_status: nonempty(&self.health)
                    .map(|s| s.parse().map_err(|e| bad(format!("health: {e}"))))
                    .transpose()?,
                region: text("region", &self.region)?,
                environment: text("environment", &self.environment)?,
                tag: None,
                search: text("q", &self.q)?,
                group: nonempty(&self.group)
                    .map(|g| {
                        g.parse::<Uuid>()
                            .map(GroupId)
                            .map_err(|_| bad("group: not a group id"))
                    })
                    .transpose()?,
                limit: Some(PER_PAGE),
                offset: (page - 1) * PER_PAGE,
                sort: nonempty(&self.sort)
                    .map(|s| s.parse().map_err(|e| bad(format!("sort: {e}"))))
                    .transpose()?
                    .unwrap_or_default(),
            },
            page,
        ))
    }

    /// This view's URL on another page.
    fn url(&self, page: usize) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("q", &self.q),
            ("status", &self.status),
            ("health", &self.health),
            ("region", &self.region),
            ("environment", &self.environment),
            ("group", &self.group),
            ("sort", &self.sort),
        ] {
            if let Some(v) = nonempty(v) {
                q.append_pair(k, v);
            }
        }
        if page > 1 {
            q.append_pair("page", &page.to_string());
        }
        format!("/dashboard/servers?{}", q.finish())
    }
}

/// The maintenance windows in force now that name a server, by server.
async fn windows_now(app: &AppState) -> BTreeMap<ServerId, Uuid> {
    let Some(alerts) = &app.alerts else {
        return BTreeMap::new();
    };
    let now = app.clock.now();
    alerts
        .store()
        .list_windows()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.schedule.contains(now))
        .filter_map(|w| match w.scope {
            Scope::ServerId(s) => Some((s, w.id)),
            _ => None,
        })
        .collect()
}

fn server_actions(app: &AppState, s: &ManagedServer, window: Option<&Uuid>) -> Markup {
    let id = s.id.0;
    html! {
        div.actions {
            (action("POST", &format!("/api/v1/fleet/servers/{id}/check"), None, "Check now", None))
            @if s.status == ServerStatus::Maintenance {
                (action("PATCH", &format!("/api/v1/fleet/servers/{id}"), Some(r#"{"status":"active"}"#), "Resume probing", None))
            } @else {
                (action("PATCH", &format!("/api/v1/fleet/servers/{id}"), Some(r#"{"status":"maintenance"}"#), "Pause probing", Some("Stop checking this server until resumed?")))
            }
            @if app.alerts.is_some() {
                @match window {
                    Some(w) => (action("DELETE", &format!("/api/v1/fleet/maintenance-windows/{w}"), None, "End alert window", None)),
                    None => button type="button" data-window-for=(id) data-window-name=(format!("dashboard: {}", s.name)) title="Open no incidents for 1 hour; probing goes on" { "Mute alerts 1 h" },
                }
            }
        }
    }
}

pub(crate) async fn servers(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
    Query(params): Query<ListParams>,
) -> Page {
    let (filter, page) = params.filter()?;
    let now = app.clock.now();
    let (servers, total, groups, tallies) = tokio::try_join!(
        app.store.list_servers(&filter),
        app.store.count_servers(&filter),
        app.store.list_groups(),
        app.tallies.get(&*app.store),
    )?;
    let ids: Vec<ServerId> = servers.iter().map(|s| s.id).collect();
    let recent: BTreeMap<ServerId, Vec<HealthCheck>> = app
        .store
        .recent_checks(&ids, 30)
        .await?
        .into_iter()
        .collect();
    let windows = if s.is_admin() {
        windows_now(&app).await
    } else {
        BTreeMap::new()
    };
    let regions: std::collections::BTreeSet<&str> =
        tallies.iter().filter_map(|t| t.region.as_deref()).collect();
    let environments: std::collections::BTreeSet<&str> = tallies
        .iter()
        .filter_map(|t| t.environment.as_deref())
        .collect();
    let pages = (total as usize).div_ceil(PER_PAGE).clamp(1, MAX_PAGE);
    let first = filter.offset + 1;
    let last = filter.offset + servers.len();
    let sel = |v: &Option<String>, x: &str| nonempty(v) == Some(x);
    let admin = s.is_admin();
    let main = html! {
        h1 { "Servers" }
        form.filters method="get" action="/dashboard/servers" role="search" {
            label { "Search" input type="search" name="q" value=[nonempty(&params.q)] placeholder="name, host, region, tag"; }
            label { "Status" select name="status" { (status_options(nonempty(&params.status))) } }
            label { "Health" select name="health" {
                option value="" { "any" }
                @for h in HealthStatus::ALL { option value=(h.as_str()) selected[sel(&params.health, h.as_str())] { (h.as_str()) } }
            } }
            label { "Region" select name="region" {
                option value="" { "any" }
                @for r in &regions { option value=(r) selected[sel(&params.region, r)] { (r) } }
            } }
            label { "Environment" select name="environment" {
                option value="" { "any" }
                @for e in &environments { option value=(e) selected[sel(&params.environment, e)] { (e) } }
            } }
            label { "Group" select name="group" {
                option value="" { "any" }
                @for g in &groups { option value=(g.id.0) selected[sel(&params.group, &g.id.0.to_string())] { (g.name) } }
            } }
            label { "Sort" select name="sort" {
                @for (v, l) in [("name", "name A–Z"), ("-name", "name Z–A"), ("-health", "worst health first"), ("health", "best health first"), ("-last_seen", "seen most recently"), ("last_seen", "seen longest ago"), ("-response_time", "slowest first"), ("response_time", "fastest first")] {
                    option value=(v) selected[sel(&params.sort, v)] { (l) }
                }
            } }
            button type="submit" { "Apply" }
            a href="/dashboard/servers" { "Clear" }
        }
        @if admin && !groups.is_empty() {
            form.bulk #bulk aria-label="Selected servers" {
                label { "Group" select name="group" {
                    @for g in &groups { option value=(g.id.0) { (g.name) } }
                } }
                button type="button" data-bulk="POST" { "Add selected to group" }
                button type="button" data-bulk="DELETE" { "Remove selected from group" }
                span.muted #selected-count { "0 selected" }
            }
        }
        div #server-list data-live {
            p.count #server-count { @if total == 0 { "No servers match." } @else { "Showing " (first) "–" (last) " of " (total) } }
            div.table-wrap {
                table.servers {
                    caption.sr { "Servers" }
                    thead { tr {
                        @if admin { th scope="col" { span.sr { "select" } } }
                        th scope="col" { "health" } th scope="col" { "name" } th scope="col" { "region" }
                        th scope="col" { "last seen" } th scope="col" { "response" } th scope="col" { "last error" }
                        th scope="col" { "last 30 checks" } th scope="col" { "actions" }
                    } }
                    tbody {
                        @for srv in &servers {
                            tr data-server-id=(srv.id.0) {
                                @if admin { td { input type="checkbox" name="select" value=(srv.id.0) aria-label=(format!("select {}", srv.name)); } }
                                td.h { (health_badge(srv.health_status))
                                    @if srv.status != ServerStatus::Active { " " span.tag { (srv.status.as_str()) } } }
                                td { a href=(format!("/dashboard/servers/{}", srv.id.0)) { (srv.name) }
                                    @if srv.kind != fleet_core::ServerKind::Fleet { " " span.tag { (srv.kind.as_str()) } }
                                    @if let Some(h) = &srv.hostname { br; span.muted { (h) } } }
                                td data-label="region" { (srv.region.as_deref().unwrap_or("–")) }
                                td data-label="last seen" { (when(now, srv.last_seen_at)) }
                                td data-label="response" { (srv.last_response_time_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "–".into())) }
                                td.err { (srv.last_error.as_deref().unwrap_or("")) }
                                td data-label="last 30 checks" { (sparkline(recent.get(&srv.id).map(Vec::as_slice).unwrap_or(&[]))) }
                                td {
                                    a href=(format!("/dashboard/servers/{}", srv.id.0)) { "Details" }
                                    @if admin { (server_actions(&app, srv, windows.get(&srv.id))) }
                                }
                            }
                        }
                    }
                }
            }
            nav.pages aria-label="Pages" {
                @if page > 1 { a rel="prev" href=(params.url(page - 1)) { "← Previous" } }
                span { "Page " (page) " of " (pages) }
                @if page < pages { a rel="next" href=(params.url(page + 1)) { "Next →" } }
                @if page == MAX_PAGE && (total as usize) > MAX_PAGE * PER_PAGE {
                    span.muted { "Paging stops here: narrow the filters, or sort the other way." }
                }
            }
        }
    };
    Ok(layout(&app, &s, "Servers", Nav::Servers, main).await)
}

// ---- server details --------------------------------------------------------------------

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct RangeParams {
    range: Option<String>,
}

pub(crate) async fn server(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<RangeParams>,
) -> Page {
    let id: Uuid = id.parse().map_err(|_| bad("not a server id"))?;
    let range = q.range.as_deref().unwrap_or("24h");
    if !["1h", "24h", "7d", "30d"].contains(&range) {
        return Err(bad("range must be 1h, 24h, 7d or 30d"));
    }
    let Some(srv) = app.store.get_server(ServerId(id)).await? else {
        return Err(PageError::Api(ApiError::not_found("server")));
    };
    let now = app.clock.now();
    // The last errors: from the newest 500 checks, the 10 newest that had one.
    let history = app
        .store
        .health_history(
            srv.id,
            HistoryQuery {
                limit: 500,
                ..Default::default()
            },
        )
        .await?;
    let errors: Vec<&HealthCheck> = history
        .iter()
        .filter(|c| c.error_message.is_some())
        .take(10)
        .collect();
    let incidents = match &app.alerts {
        Some(a) => Some(
            a.store()
                .list_incidents(&IncidentFilter {
                    server: Some(srv.id),
                    limit: 10,
                    ..Default::default()
                })
                .await?
                .0,
        ),
        None => None,
    };
    let windows = if s.is_admin() {
        windows_now(&app).await
    } else {
        BTreeMap::new()
    };
    let api = format!("/api/v1/fleet/servers/{id}");
    let main = html! {
        h1 { (srv.name) " " (health_badge(srv.health_status)) }
        @if s.is_admin() { (server_actions(&app, &srv, windows.get(&srv.id))) }
        nav.ranges aria-label="Range" {
            @for r in ["1h", "24h", "7d", "30d"] {
                a href=(format!("/dashboard/servers/{id}?range={r}")) aria-current=[(r == range).then_some("page")] { (r) }
            }
        }
        section.card aria-labelledby="h-health-chart" {
            h2 #h-health-chart { "Health, last " (range) }
            figure.chart data-chart="timeline" data-series=(format!("{api}/health-series?range={range}")) data-changes=(format!("{api}/state-changes?limit=500")) {
                figcaption { "State timeline" }
            }
            figure.chart data-chart="response" data-series=(format!("{api}/health-series?range={range}")) {
                figcaption { "Response time (ms): mean and longest per interval" }
            }
        }
        section.card aria-labelledby="h-metrics-chart" {
            h2 #h-metrics-chart { "Resources and LLM use, last " (range) }
            figure.chart data-chart="resources" data-series=(format!("{api}/metrics-series?range={range}")) {
                figcaption { "CPU, memory and disk (%)" }
            }
            figure.chart data-chart="llm" data-series=(format!("{api}/metrics-series?range={range}")) {
                figcaption { "LLM requests and cost per interval" }
            }
        }
        section.card #server-facts data-live aria-labelledby="h-facts" {
            h2 #h-facts { "Details" }
            dl.facts {
                dt { "status" } dd { (srv.status.as_str()) }
                dt { "kind" } dd { (srv.kind.as_str())
                    @if let Some(p) = &srv.metrics_path { " (" code { (p) } ")" }
                    @if srv.ca_cert.is_some() { ", own CA certificate" } }
                dt { "health" } dd { (health_badge(srv.health_status)) }
                dt { "last seen" } dd { (when(now, srv.last_seen_at)) }
                dt { "last check" } dd { (when(now, srv.last_health_check_at)) }
                dt { "response time" } dd { (srv.last_response_time_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "–".into())) }
                dt { "last error" } dd class=[srv.last_error.as_ref().map(|_| "err")] { (srv.last_error.as_deref().unwrap_or("none")) }
                dt { "API URL" } dd { code { (srv.api_url) } }
                dt { "hostname" } dd { (srv.hostname.as_deref().unwrap_or("–")) }
                dt { "region" } dd { (srv.region.as_deref().unwrap_or("–")) }
                dt { "environment" } dd { (srv.environment.as_deref().unwrap_or("–")) }
                dt { "tags" } dd { @if srv.tags.is_empty() { "–" } @for t in &srv.tags { span.tag { (t) } " " } }
                dt { "description" } dd { (srv.description.as_deref().unwrap_or("–")) }
                dt { "last metrics error" } dd class=[srv.last_metrics_error.as_ref().map(|_| "err")] { (srv.last_metrics_error.as_deref().unwrap_or("none"))
                    @if let Some(t) = srv.last_metrics_error_at { " (" (when(now, Some(t))) ")" } }
                dt { "metadata" } dd { code { (srv.metadata.to_string()) } }
                dt { "id" } dd { code { (srv.id.0) } }
            }
        }
        @if let Some(incidents) = &incidents {
            section.card #server-incidents data-live aria-labelledby="h-srv-incidents" {
                h2 #h-srv-incidents { "Recent incidents" }
                (incident_table(now, incidents))
            }
        }
        section.card #server-errors data-live aria-labelledby="h-errors" {
            h2 #h-errors { "Last errors" }
            @if errors.is_empty() { p.muted { "No errors in the last 500 checks." } }
            ol.errors {
                @for c in &errors {
                    li {
                        (when(now, Some(c.timestamp))) " " (health_badge(Some(c.status))) " "
                        span.err { (c.error_message.as_deref().unwrap_or_default()) }
                        @if let Some(d) = &c.error_details { pre { (serde_json::to_string_pretty(d).unwrap_or_default()) } }
                    }
                }
            }
        }
    };
    Ok(layout(&app, &s, &srv.name, Nav::Servers, main).await)
}

// ---- groups ----------------------------------------------------------------------------

pub(crate) async fn groups(State(app): State<AppState>, Extension(s): Extension<Session>) -> Page {
    let groups = app.store.list_groups().await?;
    let admin = s.is_admin();
    let main = html! {
        h1 { "Groups" }
        @if admin {
            section.card aria-labelledby="h-new-group" {
                h2 #h-new-group { "New group" }
                form.api data-method="POST" data-url="/api/v1/fleet/groups" {
                    label { "Name" input name="name" required maxlength="200"; }
                    label { "Description" input name="description" maxlength="1000"; }
                    button type="submit" { "Create group" }
                    p.error role="alert" hidden {}
                }
            }
        }
        section.card #group-list data-live aria-labelledby="h-groups" {
            h2 #h-groups { "All groups" }
            @if groups.is_empty() { p.muted { "No groups yet." } }
            table {
                thead { tr { th scope="col" { "name" } th scope="col" { "description" } th scope="col" { "members" } th scope="col" { "actions" } } }
                tbody {
                    @for g in &groups {
                        tr data-group-id=(g.id.0) {
                            td { a href=(format!("/dashboard/servers?group={}", g.id.0)) { (g.name) } }
                            td { (g.description.as_deref().unwrap_or("")) }
                            td { (g.members.len()) }
                            td.actions {
                                a href=(format!("/dashboard/servers?group={}", g.id.0)) { "Servers" }
                                @if admin {
                                    (action("POST", &format!("/api/v1/fleet/groups/{}/check", g.id.0), None, "Check all now", None))
                                    details {
                                        summary { "Edit" }
                                        form.api data-method="PATCH" data-url=(format!("/api/v1/fleet/groups/{}", g.id.0)) {
                                            label { "Name" input name="name" value=(g.name) required maxlength="200"; }
                                            label { "Description" input name="description" value=[g.description.as_deref()] maxlength="1000"; }
                                            button type="submit" { "Save" }
                                            p.error role="alert" hidden {}
                                        }
                                    }
                                    (action("DELETE", &format!("/api/v1/fleet/groups/{}", g.id.0), None, "Delete", Some("Delete this group? Its servers stay.")))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&app, &s, "Groups", Nav::Groups, main).await)
}

// ---- incidents -------------------------------------------------------------------------

fn incident_table(now: OffsetDateTime, incidents: &[fleet_alerts::Incident]) -> Markup {
    html! {
        @if incidents.is_empty() {
            p.muted { "No incidents." }
        } @else {
            table.incidents {
                thead { tr { th scope="col" { "severity" } th scope="col" { "state" } th scope="col" { "summary" } th scope="col" { "servers" } th scope="col" { "opened" } } }
                tbody {
                    @for i in incidents {
                        tr data-incident-id=(i.id) {
                            td { span class=(format!("sev {}", i.severity.as_str())) { (i.severity.as_str()) } }
                            td { (i.state.as_str()) }
                            td { a href=(format!("/dashboard/incidents/{}", i.id)) { (i.summary) } }
                            td { (i.servers) }
                            td { (when(now, Some(i.opened_at))) }
                        }
                    }
                }
            }
        }
    }
}

fn alerts_of(app: &AppState) -> Result<&fleet_alerts::AlertsHandle, PageError> {
    app.alerts.as_ref().ok_or_else(|| {
        PageError::Api(ApiError::new(
            StatusCode::NOT_FOUND,
            "alerts_off",
            "alerts are off (FLEET_ALERTS=off)",
        ))
    })
}

#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct IncidentParams {
    state: Option<String>,
    severity: Option<String>,
    group: Option<String>,
    page: Option<String>,
}

pub(crate) async fn incidents(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
    Query(p): Query<IncidentParams>,
) -> Page {
    let alerts = alerts_of(&app)?;
    let now = app.clock.now();
    let state = match nonempty(&p.state) {
        None => None,
        Some("open") => Some(IncidentState::Firing),
        Some("acknowledged") => Some(IncidentState::Acknowledged),
        Some("resolved") => Some(IncidentState::Resolved),
        Some(other) => return Err(bad(format!("state: unknown state `{other}`"))),
    };
    let severity = match nonempty(&p.severity) {
        None => None,
        Some(v) => Some(
            Severity::ALL
                .into_iter()
                .find(|s| s.as_str() == v)
                .ok_or_else(|| bad(format!("severity: unknown severity `{v}`")))?,
        ),
    };
    let page = match nonempty(&p.page) {
        None => 1,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|p| (1..=2_000).contains(p))
            .ok_or_else(|| bad("page must be 1 to 2000"))?,
    };
    let group = nonempty(&p.group)
        .map(|g| {
            g.parse::<Uuid>()
                .map(GroupId)
                .map_err(|_| bad("group: not a group id"))
        })
        .transpose()?;
    let groups = app.store.list_groups().await?;
    let (list, total) = alerts
        .store()
        .list_incidents(&IncidentFilter {
            state,
            severity,
            group,
            limit: PER_PAGE,
            offset: (page - 1) * PER_PAGE,
            ..Default::default()
        })
        .await?;
    let pages = (total as usize).div_ceil(PER_PAGE).max(1);
    let link = |page: usize| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(v) = nonempty(&p.state) {
            q.append_pair("state", v);
        }
        if let Some(v) = nonempty(&p.severity) {
            q.append_pair("severity", v);
        }
        if let Some(v) = nonempty(&p.group) {
            q.append_pair("group", v);
        }
        q.append_pair("page", &page.to_string());
        format!("/dashboard/incidents?{}", q.finish())
    };
    let main = html! {
        h1 { "Incidents" }
        form.filters method="get" action="/dashboard/incidents" {
            label { "State" select name="state" {
                option value="" { "any" }
                @for (v, l) in [("open", "open (firing)"), ("acknowledged", "acknowledged"), ("resolved", "resolved")] {
                    option value=(v) selected[nonempty(&p.state) == Some(v)] { (l) }
                }
            } }
            label { "Severity" select name="severity" {
                option value="" { "any" }
                @for sev in Severity::ALL { option value=(sev.as_str()) selected[nonempty(&p.severity) == Some(sev.as_str())] { (sev.as_str()) } }
            } }
            label { "Group" select name="group" {
                option value="" { "any" }
                @for g in &groups { option value=(g.id.0) selected[nonempty(&p.group) == Some(g.id.0.to_string().as_str())] { (g.name) } }
            } }
            button type="submit" { "Apply" }
        }
        div #incident-list data-live {
            p.count { (total) " incidents" }
            (incident_table(now, &list))
            nav.pages aria-label="Pages" {
                @if page > 1 { a rel="prev" href=(link(page - 1)) { "← Previous" } }
                span { "Page " (page) " of " (pages) }
                @if page < pages { a rel="next" href=(link(page + 1)) { "Next →" } }
            }
        }
    };
    Ok(layout(&app, &s, "Incidents", Nav::Incidents, main).await)
}

pub(crate) async fn incident(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Page {
    let alerts = alerts_of(&app)?;
    let id: Uuid = id.parse().map_err(|_| bad("not an incident id"))?;
    let Some(detail) = alerts.store().incident(id).await? else {
        return Err(PageError::Api(ApiError::not_found("incident")));
    };
    let now = app.clock.now();
    let i = &detail.incident;
    let main = html! {
        h1 { (i.summary) }
        div #incident-detail data-live {
            dl.facts {
                dt { "severity" } dd { span class=(format!("sev {}", i.severity.as_str())) { (i.severity.as_str()) } }
                dt { "state" } dd #incident-state { (i.state.as_str()) }
                dt { "rule" } dd { (i.rule.as_str()) }
                dt { "region" } dd { (i.region.as_deref().unwrap_or("–")) }
                dt { "opened" } dd { (when(now, Some(i.opened_at))) }
                @if let Some(t) = i.acknowledged_at {
                    dt { "acknowledged" } dd { (when(now, Some(t))) " by " (i.acknowledged_by.as_deref().unwrap_or("?")) ": "
                        q #ack-reason { (i.ack_reason.as_deref().unwrap_or("")) } }
                }
                @if let Some(t) = i.resolved_at { dt { "resolved" } dd { (when(now, Some(t))) } }
                dt { "servers" } dd { (i.servers) }
            }
            @if s.is_admin() && i.state == IncidentState::Firing {
                form.api #ack-form data-method="POST" data-url=(format!("/api/v1/fleet/incidents/{id}/ack")) {
                    label { "Reason" input name="reason" required maxlength="1000" placeholder="who is on it, and what they do"; }
                    button type="submit" { "Acknowledge" }
                    p.error role="alert" hidden {}
                }
            }
            h2 { "Servers" }
            table {
                thead { tr { th scope="col" { "server" } th scope="col" { "region" } th scope="col" { "detail" } th scope="col" { "joined" } th scope="col" { "resolved" } } }
                tbody {
                    @for m in &detail.members {
                        tr {
                            td { a href=(format!("/dashboard/servers/{}", m.server_id.0)) { (m.server_name) } }
                            td { (m.region.as_deref().unwrap_or("–")) }
                            td.err { (m.detail) }
                            td { (when(now, Some(m.joined_at))) }
                            td { (when(now, m.resolved_at)) }
                        }
                    }
                }
            }
            h2 { "Timeline" }
            ol.timeline {
                @for t in &detail.timeline {
                    li { (when(now, Some(t.at))) " " span.tag { (t.kind) } " " (t.message) }
                }
            }
        }
    };
    Ok(layout(&app, &s, "Incident", Nav::Incidents, main).await)
}

pub(crate) async fn maintenance(
    State(app): State<AppState>,
    Extension(s): Extension<Session>,
) -> Page {
    let alerts = alerts_of(&app)?;
    let now = app.clock.now();
    let silences = alerts.store().list_silences(now).await?;
    let windows = alerts.store().list_windows().await?;
    let admin = s.is_admin();
    let scope = |sc: &Scope| match sc {
        Scope::ServerId(id) => {
            html! { "server " a href=(format!("/dashboard/servers/{}", id.0)) { code { (id.0) } } }
        }
        Scope::GroupId(g) => {
            html! { "group " a href=(format!("/dashboard/servers?group={}", g.0)) { code { (g.0) } } }
        }
        Scope::Region(r) => html! { "region " (r) },
    };
    let main = html! {
        h1 { "Silences and maintenance windows" }
        p.hint { "A silence mutes notifications; incidents are still recorded. A maintenance window opens no incidents for its servers. Neither stops probing: to stop probing a server, pause it from the server list." }
        section.card #silences data-live aria-labelledby="h-silences" {
            h2 #h-silences { "Silences" }
            @if silences.is_empty() { p.muted { "No silences." } }
            ul {
                @for x in &silences {
                    li {
                        (if x.active(now) { "active" } else { "scheduled" }) ": "
                        code { (serde_json::to_string(&x.matchers).unwrap_or_default()) }
                        " until " (when(now, Some(x.ends_at))) " — " (x.comment)
                        @if admin { " " (action("DELETE", &format!("/api/v1/fleet/silences/{}", x.id), None, "End", None)) }
                    }
                }
            }
            @if admin {
                form.api data-method="POST" data-url="/api/v1/fleet/silences" {
                    fieldset {
                        legend { "New silence" }
                        label { "Region" input name="matchers.region"; }
                        label { "Rule" input name="matchers.rule" placeholder="e.g. server_unreachable"; }
                        label { "Starts" input type="datetime-local" name="starts_at" required; }
                        label { "Ends" input type="datetime-local" name="ends_at" required; }
                        label { "Comment" input name="comment" required; }
                        button type="submit" { "Add silence" }
                        p.error role="alert" hidden {}
                    }
                }
            }
        }
        section.card #windows data-live aria-labelledby="h-windows" {
            h2 #h-windows { "Maintenance windows" }
            @if windows.is_empty() { p.muted { "No windows." } }
            ul {
                @for w in &windows {
                    li {
                        (if w.schedule.contains(now) { "in force" } else { "not now" }) ": " (w.name) " — " (scope(&w.scope))
                        @if admin { " " (action("DELETE", &format!("/api/v1/fleet/maintenance-windows/{}", w.id), None, "Remove", Some("Remove this window?"))) }
                    }
                }
            }
            @if admin {
                form.api data-method="POST" data-url="/api/v1/fleet/maintenance-windows" {
                    fieldset {
                        legend { "New one-off window" }
                        label { "Name" input name="name" required; }
                        label { "Region" input name="region"; }
                        label { "Starts" input type="datetime-local" name="starts_at" required; }
                        label { "Ends" input type="datetime-local" name="ends_at" required; }
                        button type="submit" { "Add window" }
                        p.error role="alert" hidden {}
                    }
                }
            }
        }
    };
    Ok(layout(&app, &s, "Silences & windows", Nav::Maintenance, main).await)
}
