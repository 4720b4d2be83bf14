//! The dashboard: server-rendered pages under `/dashboard/`, signed in with an API token
//! whose session lives in an HttpOnly cookie, with a small embedded script for live updates,
//! charts and actions. Pages read the store the way the API does and cost what they show.

mod pages;
pub mod session;

use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use fleet_core::{Role, StoreError};
use rust_embed::RustEmbed;

use crate::{ApiError, AppState, auth};
use session::Session;

/// The policy every response carries: no inline script or style, nothing framed, nothing
/// loaded from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to every response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

#[derive(RustEmbed)]
#[folder = "assets/"]
struct Assets;

/// An embedded asset's URL: its content hash is in the path, so it can be cached for a year.
pub(crate) fn asset_url(name: &str) -> String {
    let version = Assets::get(name)
        .map(|f| hex(&f.metadata.sha256_hash()[..8]))
        .unwrap_or_default();
    format!("/dashboard/assets/{version}/{name}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn asset(Path((version, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(file) = Assets::get(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let hash = hex(&file.metadata.sha256_hash());
    let etag = format!("\"{hash}\"");
    let content_type = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    // A stale version in the path still gets the current file, but not for long.
    let cache = if hash.starts_with(&version) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let matched = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if matched {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, content_type)],
            file.data.into_owned(),
        )
            .into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

/// The fleet's LLM figures over the last 24 hours, read at most once a minute: a store
/// without running totals sums every server's samples for them, and the overview should not
/// pay for that on each load.
#[derive(Debug, Default)]
pub(crate) struct LlmCache {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, (i64, f64))>>,
}

impl LlmCache {
    const FRESH: Duration = Duration::from_secs(60);

    pub(crate) async fn get(&self, app: &AppState) -> Result<(i64, f64), StoreError> {
        let mut last = self.last.lock().await;
        if let Some((at, v)) = &*last
            && at.elapsed() < Self::FRESH
        {
            return Ok(*v);
        }
        let now = app.clock.now();
        let llm = app
            .store
            .llm_summary((now - time::Duration::hours(24), now), None, 1)
            .await?;
        let v = (llm.total_requests, llm.total_cost_usd);
        *last = Some((tokio::time::Instant::now(), v));
        Ok(v)
    }
}

/// A page's failure: the sign-in page when the session is over, or an error page.
pub(crate) enum PageError {
    SignIn(String),
    Api(ApiError),
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::Api(e)
    }
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        PageError::Api(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn(next) => {
                let to = format!("/dashboard/sign-in?next={}", urlencode(&next));
                Redirect::to(&to).into_response()
            }
            PageError::Api(e) => pages::error_page(e),
        }
    }
}

pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Pages need a session: without one, the browser goes to the sign-in page and back.
async fn signed_in(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    match session::from_cookie(&app, req.headers()).await {
        Ok(Some(s)) => {
            req.extensions_mut().insert(s);
            next.run(req).await
        }
        Ok(None) => {
            let next_url = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            PageError::SignIn(next_url).into_response()
        }
        Err(e) => pages::error_page(e),
    }
}

/// Where to go after signing in: only a path of the dashboard itself.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/dashboard/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/dashboard/".to_owned(),
    }
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct SignInQuery {
    next: Option<String>,
}

async fn sign_in_page(axum::extract::Query(q): axum::extract::Query<SignInQuery>) -> Response {
    pages::sign_in(&safe_next(q.next.as_deref()), None, StatusCode::OK)
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct SignInForm {
    token: String,
    next: Option<String>,
}

/// Signs in with an API token. Failures count against the address's limit, as the API's do.
async fn sign_in(
    State(app): State<AppState>,
    headers: HeaderMap,
    connect: Option<axum::Extension<ConnectInfo<std::net::SocketAddr>>>,
    Form(form): Form<SignInForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    // A sign-in forged by another site would sign the browser into its token.
    if let Err(e) = session::same_origin(&app.dashboard, &headers) {
        return pages::error_page(e);
    }
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let addr = auth::client_addr(
        connect.map(|c| (c.0).0.ip()),
        forwarded,
        &app.trusted_proxies,
    );
    if let Some(left) = app.limiter.blocked(addr) {
        let message = format!(
            "Too many failed sign-ins from this address. Wait {} s and try again.",
            left.as_secs().max(1)
        );
        return pages::sign_in(&next, Some(&message), StatusCode::TOO_MANY_REQUESTS);
    }
    let token = form.token.trim();
    let hashed = auth::hash(token);
    let who = if !auth::well_formed(token) {
        None
    } else if app.bootstrap.matches(&hashed) {
        Some((session::BOOTSTRAP_NAME.to_owned(), Role::Admin))
    } else {
        match app.store.find_token(hashed).await {
            Ok(t) => t.map(|t| (t.name, t.role)),
            Err(e) => return pages::error_page(e.into()),
        }
    };
    let Some((name, role)) = who else {
        app.limiter.fail(addr);
        return pages::sign_in(
            &next,
            Some(
                "That token is not valid. Use an admin or viewer token made with `fleet-server token create`.",
            ),
            StatusCode::UNAUTHORIZED,
        );
    };
    match session::start(&app, hashed, name, role).await {
        Ok(cookie) => {
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
        }
        Err(e) => pages::error_page(e),
    }
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct SignOutForm {
    csrf: String,
}

async fn sign_out(
    State(app): State<AppState>,
    headers: HeaderMap,
    axum::Extension(s): axum::Extension<Session>,
    Form(form): Form<SignOutForm>,
) -> Response {
    if let Err(e) = session::check_unsafe(&app.dashboard, &s, &headers, Some(&form.csrf)) {
        return pages::error_page(e);
    }
    if let Err(e) = app.store.delete_session(s.sha256).await {
        return pages::error_page(e.into());
    }
    let mut response = Redirect::to("/dashboard/sign-in").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(&app.dashboard));
    response
}

/// The dashboard's routes.
pub(crate) fn router(state: AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/dashboard/", get(pages::overview))
        .route("/dashboard/servers", get(pages::servers))
        .route("/dashboard/servers/{id}", get(pages::server))
        .route("/dashboard/groups", get(pages::groups))
        .route("/dashboard/incidents", get(pages::incidents))
        .route("/dashboard/incidents/{id}", get(pages::incident))
        .route("/dashboard/maintenance", get(pages::maintenance))
        .route("/dashboard/sign-out", post(sign_out))
        .route_layer(middleware::from_fn_with_state(state, signed_in));
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard/sign-in", get(sign_in_page).post(sign_in))
        .route("/dashboard/assets/{version}/{name}", get(asset))
        .merge(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dashboard_paths_are_followed_after_sign_in() {
        assert_eq!(
            safe_next(Some("/dashboard/servers?q=a")),
            "/dashboard/servers?q=a"
        );
        for bad in [
            None,
            Some("https://evil.example/"),
            Some("//evil.example"),
            Some("/dashboard\\@evil"),
            Some("/api/v1/fleet/servers"),
        ] {
            assert_eq!(safe_next(bad), "/dashboard/", "{bad:?}");
        }
    }

    #[test]
    fn assets_are_embedded_with_a_hash_in_their_url() {
        let url = asset_url("app.js");
        assert!(
            url.starts_with("/dashboard/assets/") && url.ends_with("/app.js"),
            "{url}"
        );
        assert_eq!(url.len(), "/dashboard/assets//app.js".len() + 16);
        assert!(Assets::get("app.css").is_some());
    }
}
