//! The web dashboard at `dashboard.$CLUSTER_DOMAIN`: every host's API answers a request
//! whose `Host` is that name with the dashboard instead (the router sends it here with the
//! controller's certificate, so the page and its API share one origin and one certificate).
//!
//! - `GET /` and `/assets/*`: the page ([`flynn_dashboard::assets`]).
//! - `POST /login` `{"token": ...}`: the dashboard's `LOGIN_TOKEN` or a controller key,
//!   traded for a session cookie (the key never reaches the page); five wrong ones from an
//!   address in a minute make it wait ([`flynn_dashboard::limiter`]).
//! - `GET /session`: the session's CSRF token and expiry; `POST /logout` ends it.
//! - `GET /charts`: the live charts' figures, from every host's `/metrics` ([`charts`]).
//! - `/api/*`: the controller API the CLI uses, with the session instead of a key. Every
//!   change needs the CSRF token, and a request from another origin is refused.
//!
//! Sessions live in the cluster state ([`flynn_state::sessions`]), so any host behind the
//! router knows them, a logout ends them everywhere, and rotating a controller key out (or
//! changing the login token) ends the sessions opened with it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flynn_dashboard::session::{self, COOKIE, CSRF_HEADER, TOKEN_ENV, TTL_ENV};
use flynn_dashboard::{assets, limiter::LoginLimiter};
use flynn_state::sessions::{Credential, Session, SessionsCommand};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

mod charts;

use super::{AppState, JsonBody};
use crate::error::{ApiError, ApiResult};
use crate::host::Host;

/// The dashboard's app: its env holds the login token and the session length.
const APP: &str = "dashboard";

/// The dashboard's router: the page, login and logout, and the controller API under `/api`
/// (`controller` is the controller API's routes without their key check).
pub fn router(host: Arc<Host>, controller: Router<AppState>) -> Router {
    let api = controller.layer(middleware::from_fn_with_state(
        host.clone(),
        require_session,
    ));
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/session", get(current))
        .nest("/api", api)
        .merge(Router::new().route("/charts", get(charts::charts)).layer(
            middleware::from_fn_with_state(host.clone(), require_session),
        ))
        .fallback(|| async { ApiError::NotFound("no such dashboard path".into()) })
        .layer(middleware::from_fn(same_origin_only))
        .with_state(host)
}

/// Sends a request for `dashboard.$CLUSTER_DOMAIN` to the dashboard, everything else on.
pub async fn dispatch(
    State((host, dashboard)): State<(Arc<Host>, Router)>,
    req: Request,
    next: Next,
) -> Response {
    if is_dashboard_host(&host, req.headers()) {
        return match dashboard.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    next.run(req).await
}

fn is_dashboard_host(host: &Host, headers: &HeaderMap) -> bool {
    let Some(name) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = name.rsplit_once(':').map_or(name, |(n, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            n
        } else {
            name
        }
    });
    let Some(rest) = name
        .get(..APP.len() + 1)
        .filter(|p| p.eq_ignore_ascii_case("dashboard."))
        .map(|_| &name[APP.len() + 1..])
    else {
        return false;
    };
    let Ok(node) = host.node() else {
        return false;
    };
    node.state.read(|a| {
        a.state
            .cluster
            .domain
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case(rest))
    })
}

/// Refuses any dashboard request that says it comes from another origin: with
/// `SameSite=Strict` a browser sends no cookie then anyway, and this holds for clients that
/// would.
async fn same_origin_only(req: Request, next: Next) -> Response {
    let h = req.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    let host = text("host").unwrap_or_default();
    if !session::same_origin(host, text("origin"), text("sec-fetch-site")) {
        return ApiError::Forbidden(format!(
            "a dashboard request must come from the dashboard's own page (https://{host})"
        ))
        .into_response();
    }
    next.run(req).await
}

fn asset_response(a: &'static assets::Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(a.content_type)),
            // Served with the binary: a new version is a new daemon, checked again on load.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        a.body,
    )
        .into_response()
}

async fn index() -> Response {
    asset_response(assets::index())
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match assets::get(&name) {
        Some(a) => asset_response(a),
        None => ApiError::NotFound(format!("no dashboard asset {name:?}")).into_response(),
    }
}

#[derive(Deserialize)]
struct LoginRequest {
    token: String,
}

#[derive(Serialize)]
struct SessionInfo {
    csrf: String,
    /// `key` or `token`: what the session was opened with.
    credential: &'static str,
    expires_ms: u64,
}

/// Where a request comes from: the router's `X-Forwarded-For` when a router sent it.
fn client_addr(host: &Host, peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
    let Some(peer) = peer else {
        return IpAddr::from([0, 0, 0, 0]);
    };
    let routers: Vec<IpAddr> = host
        .node()
        .map(|n| {
            n.members()
                .iter()
                .filter_map(|(_, a)| a.parse::<SocketAddr>().ok().map(|s| s.ip()))
                .collect()
        })
        .unwrap_or_default();
    super::status::client_ip(peer.ip(), headers, &routers)
}

async fn login(
    State(host): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Response {
    let addr = client_addr(&host, peer.map(|p| p.0 .0), &headers);
    match try_login(&host, addr, req).await {
        Ok((id, ttl, info)) => {
            let mut r = Json(info).into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, ttl)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err((e, wait)) => {
            let mut r = e.into_response();
            if let Some(w) = wait {
                if let Ok(v) = HeaderValue::from_str(&w.as_secs().max(1).to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            r
        }
    }
}

type LoginError = (ApiError, Option<Duration>);

async fn try_login(
    host: &Host,
    addr: IpAddr,
    req: LoginRequest,
) -> Result<(String, Duration, SessionInfo), LoginError> {
    let limiter = login_limiter();
    if let Some(wait) = limiter.wait(addr, Instant::now()) {
        let e = ApiError::TooManyRequests(format!(
            "too many wrong logins from {addr}; try again in {} s",
            wait.as_secs().max(1)
        ));
        return Err((e, Some(wait)));
    }
    let node = host.node().map_err(|e| (e, None))?;
    let given = req.token.trim();
    let (keys, token, ttl) = node.state.read(|a| {
        let app = a.state.apps.get(APP);
        let env = |k: &str| app.and_then(|a| a.env.global.get(k).cloned());
        (a.state.controller_keys(), env(TOKEN_ENV), env(TTL_ENV))
    });
    // Every credential is compared, so the time taken does not say which came close.
    let mut by_key = false;
    for k in &keys {
        by_key |= session::same_secret(given, k);
    }
    let by_token = token
        .as_deref()
        .is_some_and(|t| !t.is_empty() && session::same_secret(given, t));
    let credential = if by_key {
        Credential::Key {
            fingerprint: session::fingerprint(given),
        }
    } else if by_token {
        Credential::Token {
            fingerprint: session::fingerprint(given),
        }
    } else {
        limiter.failed(addr, Instant::now());
        tracing::info!(target: "flynn_daemon::dashboard", %addr, "wrong dashboard login");
        return Err((
            ApiError::Unauthorized("wrong login token or controller key".into()),
            None,
        ));
    };
    let ttl = match ttl.as_deref().map(session::parse_ttl) {
        None => session::DEFAULT_TTL,
        Some(Ok(t)) => t,
        Some(Err(why)) => {
            tracing::warn!(target: "flynn_daemon::dashboard", "{why}; sessions last {} h", session::DEFAULT_TTL.as_secs() / 3600);
            session::DEFAULT_TTL
        }
    };
    let id = session::new_id();
    let now = crate::now_ms();
    let expires_ms = now + ttl.as_millis() as u64;
    let kind = match credential {
        Credential::Key { .. } => "key",
        Credential::Token { .. } => "token",
    };
    node.propose(SessionsCommand::Open {
        session: Session {
            id_hash: session::id_hash(&id),
            credential,
            created_ms: now,
            expires_ms,
        },
        now_ms: now,
    })
    .await
    .map_err(|e| (e, None))?;
    tracing::info!(target: "flynn_daemon::dashboard", %addr, credential = kind, "dashboard login");
    let info = SessionInfo {
        csrf: session::csrf_token(&id),
        credential: kind,
        expires_ms,
    };
    Ok((id, ttl, info))
}

/// Every host (daemon process) keeps its own count of wrong logins.
fn login_limiter() -> &'static LoginLimiter {
    static LIMITER: std::sync::OnceLock<LoginLimiter> = std::sync::OnceLock::new();
    LIMITER.get_or_init(LoginLimiter::default)
}

/// The request's session, checked: alive, opened with a credential the cluster still
/// accepts.
struct Checked {
    id: String,
    session: Session,
}

async fn check_session(host: &Host, headers: &HeaderMap) -> ApiResult<Checked> {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::id_from_cookies)
        .ok_or_else(|| ApiError::Unauthorized(format!("no dashboard session ({COOKIE})")))?;
    let node = host.node()?;
    let hash = session::id_hash(cookie);
    let lookup = |now: u64| {
        node.state.read(|a| {
            let s = a.state.sessions.live(&hash, now)?.clone();
            let still_valid = match &s.credential {
                Credential::Key { fingerprint } => a
                    .state
                    .controller_keys()
                    .iter()
                    .any(|k| session::same_secret(&session::fingerprint(k), fingerprint)),
                Credential::Token { fingerprint } => a
                    .state
                    .apps
                    .get(APP)
                    .and_then(|app| app.env.global.get(TOKEN_ENV))
                    .is_some_and(|t| session::same_secret(&session::fingerprint(t), fingerprint)),
            };
            still_valid.then_some(s)
        })
    };
    let found = match lookup(crate::now_ms()) {
        Some(s) => Some(s),
        // Opened a moment ago through another host: this one may not have applied it yet.
        None => {
            node.read_barrier().await?;
            lookup(crate::now_ms())
        }
    };
    let session = found.ok_or_else(|| {
        ApiError::Unauthorized("the dashboard session has ended; log in again".into())
    })?;
    Ok(Checked {
        id: cookie.to_string(),
        session,
    })
}

fn check_csrf(req_headers: &HeaderMap, id: &str) -> ApiResult<()> {
    let given = req_headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "a change needs the session's CSRF token in {CSRF_HEADER}"
        )));
    }
    if !session::same_secret(given, &session::csrf_token(id)) {
        return Err(ApiError::Forbidden(format!(
            "wrong CSRF token in {CSRF_HEADER}"
        )));
    }
    Ok(())
}

async fn require_session(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    let checked = match check_session(&host, req.headers()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        if let Err(e) = check_csrf(req.headers(), &checked.id) {
            return e.into_response();
        }
    }
    next.run(req).await
}

async fn current(State(host): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let c = check_session(&host, &headers).await?;
    let kind = match c.session.credential {
        Credential::Key { .. } => "key",
        Credential::Token { .. } => "token",
    };
    let mut r = Json(SessionInfo {
        csrf: session::csrf_token(&c.id),
        credential: kind,
        expires_ms: c.session.expires_ms,
    })
    .into_response();
    // The token is a secret of this session: no cache keeps it.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn logout(State(host): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let c = check_session(&host, &headers).await?;
    check_csrf(&headers, &c.id)?;
    host.node()?
        .propose(SessionsCommand::Close {
            id_hash: c.session.id_hash,
        })
        .await?;
    let mut r = (
        StatusCode::OK,
        Json(serde_json::json!({"logged_out": true})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}
