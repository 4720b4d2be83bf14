//! Dashboard sessions: a random id in an HttpOnly, SameSite=Strict cookie, stored only as a
//! hash; a CSRF token derived from the id; and the `Origin` check for unsafe methods.

use axum::http::{HeaderMap, HeaderValue, Method, header};
use base64::Engine;
use fleet_core::{Role, SessionRecord};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::Duration;

use crate::{ApiError, AppState, FullStore};

/// The cookie's name.
pub const COOKIE: &str = "fleet_session";
/// The header a cookie-authenticated unsafe request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session ends after this long unused.
pub const IDLE: Duration = Duration::hours(8);
/// A session ends after this long whatever happens.
pub const ABSOLUTE: Duration = Duration::days(7);
/// A session's idle end moves forward at most this often, so that a busy page does not write
/// on every request.
const TOUCH_EVERY: Duration = Duration::minutes(1);

/// A signed-in browser, as a request sees it.
#[derive(Clone, Debug)]
pub struct Session {
    /// The hash under which the session is stored.
    pub sha256: [u8; 32],
    /// The token's name.
    pub name: String,
    /// The token's role.
    pub role: Role,
    /// The CSRF token the session's pages send back.
    pub csrf: String,
}

impl Session {
    /// Whether the session may change things.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The CSRF token of a session id: a hash of it under its own label, so that it can be
/// recomputed from the cookie and never needs storing, and does not reveal the id.
fn csrf_of(id: &str) -> String {
    b64(&Sha256::digest(format!("fleet-csrf:{id}").as_bytes()))
}

/// The session id in the request's cookies, if any.
pub fn cookie_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| (20..=100).contains(&v.len()))
}

/// The live session named by the request's cookie; its idle end moves forward.
pub async fn from_cookie(app: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(id) = cookie_id(headers) else {
        return Ok(None);
    };
    let sha256: [u8; 32] = Sha256::digest(id.as_bytes()).into();
    let now = app.clock.now();
    let Some(record) = app.store.find_session(sha256, now).await? else {
        return Ok(None);
    };
    // A session of the bootstrap token stands only while that token is still the one set.
    let stored: &dyn FullStore = &*app.store;
    if record.token_name == BOOTSTRAP_NAME && !app.bootstrap.matches(&record.token_sha256) {
        stored.delete_session(sha256).await?;
        return Ok(None);
    }
    if record.idle_expires_at - now < IDLE - TOUCH_EVERY {
        stored.touch_session(sha256, now + IDLE).await?;
    }
    Ok(Some(Session {
        sha256,
        name: record.token_name,
        role: record.role,
        csrf: csrf_of(id),
    }))
}

/// The name sessions of the bootstrap admin token are recorded under.
pub const BOOTSTRAP_NAME: &str = "FLEET_ADMIN_TOKEN";

/// Starts a session for a token; returns the `Set-Cookie` value.
pub async fn start(
    app: &AppState,
    token_sha256: [u8; 32],
    name: String,
    role: Role,
) -> Result<HeaderValue, ApiError> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let id = b64(&bytes);
    let now = app.clock.now();
    app.store
        .create_session(SessionRecord {
            sha256: Sha256::digest(id.as_bytes()).into(),
            token_sha256,
            token_name: name,
            role,
            created_at: now,
            idle_expires_at: now + IDLE,
            expires_at: now + ABSOLUTE,
        })
        .await?;
    Ok(set_cookie(&app.dashboard, &id, ABSOLUTE.whole_seconds()))
}

/// A `Set-Cookie` that clears the session cookie.
pub fn clear_cookie(config: &crate::DashboardConfig) -> HeaderValue {
    set_cookie(config, "", 0)
}

fn set_cookie(config: &crate::DashboardConfig, value: &str, max_age: i64) -> HeaderValue {
    let secure = if config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("fleet_session=; Path=/; Max-Age=0"))
}

/// Whether a method changes something, and so needs the CSRF token and a same origin.
pub fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses a cross-site request: the `Origin` must be the dashboard's own (from
/// `FLEET_PUBLIC_URL`, or else the request's `Host`). A request without `Origin` is refused
/// too: browsers send it on every unsafe request.
pub fn same_origin(config: &crate::DashboardConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |m: &str| ApiError::new(axum::http::StatusCode::FORBIDDEN, "cross_origin", m);
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Err(forbidden("Origin: a signed-in change must name its origin"));
    };
    let expected = match &config.origin {
        Some(o) => o.clone(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            format!("http://{host}")
        }
    };
    if origin.eq_ignore_ascii_case(&expected) {
        Ok(())
    } else {
        Err(forbidden("Origin: this request came from another site"))
    }
}

/// Checks an unsafe cookie-authenticated request: the CSRF token `given` must be the
/// session's, and the origin the dashboard's.
pub fn check_unsafe(
    config: &crate::DashboardConfig,
    session: &Session,
    headers: &HeaderMap,
    given: Option<&str>,
) -> Result<(), ApiError> {
    let given = given.unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(session.csrf.as_bytes())) {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "csrf",
            "x-csrf-token: missing or not this session's; reload the page",
        ));
    }
    same_origin(config, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_bounded() {
        let mut h = HeaderMap::new();
        let id = "a".repeat(43);
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("x=1; {COOKIE}={id}; y=2")).unwrap(),
        );
        assert_eq!(cookie_id(&h), Some(id.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("fleet_session=short"),
        );
        assert_eq!(cookie_id(&h), None);
        assert_eq!(cookie_id(&HeaderMap::new()), None);
    }

    #[test]
    fn the_csrf_token_is_bound_to_the_session_and_reveals_nothing() {
        let (a, b) = ("a".repeat(43), "b".repeat(43));
        assert_eq!(csrf_of(&a), csrf_of(&a));
        assert_ne!(csrf_of(&a), csrf_of(&b));
        assert!(!csrf_of(&a).contains(&a));
    }

    #[test]
    fn the_origin_must_be_the_dashboards_own() {
        let config = crate::DashboardConfig::default();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&config, &h).is_err(), "no Origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&config, &h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&config, &h).is_err());
        let public = crate::DashboardConfig {
            origin: Some("https://fleet.example".into()),
            ..Default::default()
        };
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://fleet.example"),
        );
        assert!(same_origin(&public, &h).is_ok());
    }
}
