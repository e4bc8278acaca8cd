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

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use flynn_dashboard::assets;
use tower::ServiceExt;

mod charts;
mod guard;
mod session;

use super::AppState;
use crate::error::ApiError;
use crate::host::Host;

/// The dashboard's app: its env holds the login token and the session length.
const APP: &str = "dashboard";

/// The dashboard's router: the page, login and logout, and the controller API under `/api`
/// (`controller` is the controller API's routes without their key check).
pub fn router(host: Arc<Host>, controller: Router<AppState>) -> Router {
    // The session is checked before routing; the guard runs after it, on the matched route.
    let api = controller
        .route_layer(middleware::from_fn_with_state(host.clone(), guard::guard))
        .layer(middleware::from_fn_with_state(
            host.clone(),
            session::require_session,
        ));
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/login", post(session::login))
        .route("/logout", post(session::logout))
        .route("/session", get(session::current))
        .nest("/api", api)
        .merge(Router::new().route("/charts", get(charts::charts)).layer(
            middleware::from_fn_with_state(host.clone(), session::require_session),
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
    if !flynn_dashboard::session::same_origin(host, text("origin"), text("sec-fetch-site")) {
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
