//! Logging in and out, and checking a request's session and CSRF token.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flynn_dashboard::limiter::LoginLimiter;
use flynn_dashboard::session::{self, COOKIE, CSRF_HEADER, TTL_ENV};
use flynn_state::sessions::{fingerprint, Credential, Session, SessionsCommand, TOKEN_ENV};
use serde::{Deserialize, Serialize};

use super::APP;
use crate::api::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::host::Host;
use crate::node::Node;

#[derive(Deserialize)]
pub(super) struct LoginRequest {
    token: String,
}

#[derive(Serialize)]
struct SessionInfo {
    csrf: String,
    /// `key` or `token`: what the session was opened with.
    credential: &'static str,
    expires_ms: u64,
}

fn kind(c: &Credential) -> &'static str {
    match c {
        Credential::Key { .. } => "key",
        Credential::Token { .. } => "token",
    }
}

/// Where a request comes from: the router's `X-Forwarded-For` when a router sent it.
fn client_addr(host: &Host, peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
    let Some(peer) = peer else {
        return IpAddr::from([0, 0, 0, 0]);
    };
    let routers = host
        .node()
        .map(|n| crate::api::status::member_ips(n))
        .unwrap_or_default();
    crate::api::status::client_ip(peer.ip(), headers, &routers)
}

/// Every host (daemon process) keeps its own count of wrong logins.
fn login_limiter() -> &'static LoginLimiter {
    static LIMITER: std::sync::OnceLock<LoginLimiter> = std::sync::OnceLock::new();
    LIMITER.get_or_init(LoginLimiter::default)
}

/// A read barrier shared by every request that waits for one: a request that misses a
/// session (or a credential) asks the leader only if no barrier has started since it
/// arrived, so made-up cookies cost the leader at most one read index at a time. The
/// outcome is shared too: when the leader cannot be reached, the requests queued behind
/// the failed barrier fail with it instead of each waiting out another.
async fn caught_up(node: &Node, arrived: Instant) -> ApiResult<()> {
    type Outcome = (Instant, Result<(), String>);
    static LAST: tokio::sync::Mutex<Option<Outcome>> = tokio::sync::Mutex::const_new(None);
    let mut last = LAST.lock().await;
    if let Some((started, outcome)) = last.as_ref() {
        if *started >= arrived {
            return outcome.clone().map_err(ApiError::Unavailable);
        }
    }
    let started = Instant::now();
    let outcome = node.read_barrier().await.map_err(|e| e.to_string());
    *last = Some((started, outcome.clone()));
    outcome.map_err(ApiError::Unavailable)
}

/// The session length: the dashboard app's `SESSION_TTL`, else the default.
fn session_ttl(s: &flynn_state::ClusterState) -> Duration {
    let set = s
        .apps
        .get(APP)
        .and_then(|a| a.env.global.get(TTL_ENV).cloned());
    match set.as_deref().map(session::parse_ttl) {
        None => session::DEFAULT_TTL,
        Some(Ok(t)) => t,
        Some(Err(why)) => {
            tracing::warn!(target: "flynn_daemon::dashboard", "{why}; sessions last {} h", session::DEFAULT_TTL.as_secs() / 3600);
            session::DEFAULT_TTL
        }
    }
}

/// The credential `given` is, if the cluster accepts it (every one compared, in constant
/// time, so the time taken does not say which came close).
fn credential_of(s: &flynn_state::ClusterState, given: &str) -> Option<Credential> {
    let mut by_key = false;
    for k in &s.controller_keys() {
        by_key |= session::same_secret(given, k);
    }
    let token = s.apps.get(APP).and_then(|a| a.env.global.get(TOKEN_ENV));
    let by_token = token.is_some_and(|t| !t.is_empty() && session::same_secret(given, t));
    let fingerprint = fingerprint(given);
    if by_key {
        Some(Credential::Key { fingerprint })
    } else if by_token {
        Some(Credential::Token { fingerprint })
    } else {
        None
    }
}

pub(super) async fn login(
    State(host): State<Arc<Host>>,
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
    let arrived = Instant::now();
    let limiter = login_limiter();
    if let Some(wait) = limiter.wait(addr, arrived) {
        let e = ApiError::TooManyRequests(format!(
            "too many wrong logins from {addr}; try again in {} s",
            wait.as_secs().max(1)
        ));
        return Err((e, Some(wait)));
    }
    let node = crate::api::auth::serving_node(host).map_err(|e| (e, None))?;
    // Counted as wrong until it proves right, so a burst of tries at once from one address
    // is bounded as tries one after another are.
    limiter.failed(addr, arrived);
    let given = req.token.trim();
    let mut found = node.state.read(|a| credential_of(&a.state, given));
    if found.is_none() {
        // A key or token changed a moment ago through another host: this one may not have
        // applied it yet. Ask before calling the login wrong.
        caught_up(node, arrived).await.map_err(|e| (e, None))?;
        found = node.state.read(|a| credential_of(&a.state, given));
    }
    let Some(credential) = found else {
        tracing::info!(target: "flynn_daemon::dashboard", %addr, "wrong dashboard login");
        return Err((
            ApiError::Unauthorized("wrong login token or controller key".into()),
            None,
        ));
    };
    limiter.forgive(addr, arrived);
    let ttl = node.state.read(|a| session_ttl(&a.state));
    let id = session::new_id();
    let now = crate::now_ms();
    let expires_ms = now + ttl.as_millis() as u64;
    let kind = kind(&credential);
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

/// The request's session, checked: alive (by its expiry and by the session length now
/// set), opened with a credential the cluster still accepts.
pub(super) struct Checked {
    id: String,
    session: Session,
}

/// The live session among `ids`, as this host's state has it.
fn lookup(node: &Node, ids: &[&str]) -> Option<(String, Session)> {
    let now = crate::now_ms();
    node.state.read(|a| {
        let ttl = session_ttl(&a.state).as_millis() as u64;
        ids.iter().find_map(|id| {
            let s = a.state.sessions.live(&session::id_hash(id), now)?;
            let young = now < s.created_ms.saturating_add(ttl);
            (young && s.credential.accepted(&a.state)).then(|| (id.to_string(), s.clone()))
        })
    })
}

pub(super) async fn check_session(host: &Host, headers: &HeaderMap) -> ApiResult<Checked> {
    let arrived = Instant::now();
    let ids: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(session::ids_from_cookies)
        .take(4)
        .collect();
    if ids.is_empty() {
        return Err(ApiError::Unauthorized(format!(
            "no dashboard session ({COOKIE})"
        )));
    }
    let node = crate::api::auth::serving_node(host)?;
    let found = match lookup(node, &ids) {
        Some(s) => Some(s),
        // Opened a moment ago through another host: this one may not have applied it yet.
        None => {
            caught_up(node, arrived).await?;
            lookup(node, &ids)
        }
    };
    let (id, session) = found.ok_or_else(|| {
        ApiError::Unauthorized("the dashboard session has ended; log in again".into())
    })?;
    Ok(Checked { id, session })
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

pub(super) async fn require_session(
    State(host): State<Arc<Host>>,
    req: Request,
    next: Next,
) -> Response {
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

pub(super) async fn current(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let c = check_session(&host, &headers).await?;
    let mut r = Json(SessionInfo {
        csrf: session::csrf_token(&c.id),
        credential: kind(&c.session.credential),
        expires_ms: c.session.expires_ms,
    })
    .into_response();
    // The token is a secret of this session: no cache keeps it.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

pub(super) async fn logout(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
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
