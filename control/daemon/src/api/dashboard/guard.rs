//! What a dashboard session may do with the controller API. A session is an operator at
//! the page, not a holder of the controller key: it must never read a key, the login token
//! or a certificate's private key, nor make itself a key, nor run code that sees one. So,
//! after routing (axum's matched route and its percent-decoded parameters, never the raw
//! path):
//!
//! - only the calls the page makes are allowed ([`ALLOWED`]); anything else (watch
//!   streams, job output and stdin, one-off jobs, services, volumes, backups, exports) is
//!   403 with a pointer to the CLI;
//! - system apps, and any app whose env holds a controller key or the login token, are
//!   read-only: no env change, release, scale or route from a session;
//! - a route may not take a name or a certificate a system app's route uses, nor name a
//!   service (it routes to its own app's), so a session cannot put itself in front of the
//!   controller, git or the dashboard;
//! - every answer has each current controller key and the login token replaced by
//!   `(hidden)`, and certificates' `key_pem` hidden.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::RequestPartsExt;
use flynn_state::sessions::TOKEN_ENV;
use flynn_state::{ClusterState, SYSTEM_APPS};

use crate::error::ApiError;
use crate::host::Host;

/// Largest answer the guard reads to redact (the API's own answers are far smaller).
const MAX_ANSWER: usize = 64 << 20;
/// What a secret reads as on the dashboard.
const HIDDEN: &str = "(hidden)";

/// The calls the page makes: `(method, route)`. Every one answers JSON.
const ALLOWED: &[(Method, &str)] = &[
    (Method::GET, "/apps"),
    (Method::POST, "/apps"),
    (Method::GET, "/apps/{app}"),
    (Method::GET, "/apps/{app}/env"),
    (Method::POST, "/apps/{app}/env"),
    (Method::GET, "/apps/{app}/formation"),
    (Method::POST, "/apps/{app}/scale"),
    (Method::GET, "/apps/{app}/jobs"),
    (Method::GET, "/apps/{app}/log"),
    (Method::GET, "/apps/{app}/releases"),
    (Method::POST, "/apps/{app}/releases"),
    (Method::GET, "/apps/{app}/releases/{id}/rollout"),
    (Method::GET, "/apps/{app}/routes"),
    (Method::POST, "/apps/{app}/routes"),
    (Method::DELETE, "/apps/{app}/routes/{id}"),
    (Method::GET, "/apps/{app}/resources"),
    (Method::GET, "/layers/{sha}"),
    (Method::HEAD, "/layers/{sha}"),
    (Method::PUT, "/layers/{sha}"),
    (Method::GET, "/certificates"),
    (Method::POST, "/certificates"),
    (Method::DELETE, "/certificates/{id}"),
    (Method::GET, "/providers"),
    (Method::POST, "/providers/{provider}/resources"),
    (Method::DELETE, "/resources/{id}"),
    (Method::GET, "/hosts"),
    (Method::GET, "/hosts/details"),
    (Method::GET, "/status"),
    (Method::GET, "/status/page"),
];

fn refused(why: String) -> Response {
    ApiError::Forbidden(why).into_response()
}

/// Each current controller key and the login token.
fn secrets(s: &ClusterState) -> Vec<String> {
    let mut v = s.controller_keys();
    if let Some(t) = s
        .apps
        .get(super::APP)
        .and_then(|d| d.env.global.get(TOKEN_ENV))
    {
        v.push(t.clone());
    }
    v.retain(|x| !x.is_empty());
    v
}

/// Why `app` is read-only to a session, if it is.
fn read_only(s: &ClusterState, app: &str) -> Option<String> {
    if SYSTEM_APPS.contains(&app) {
        return Some(format!(
            "{app} is a system app: change it with the CLI (flynn -a {app} ...)"
        ));
    }
    let secrets = secrets(s);
    let app_env = s.apps.get(app)?;
    let holds = std::iter::once(&app_env.env.global)
        .chain(app_env.env.types.values())
        .flat_map(|m| m.values())
        .any(|v| secrets.iter().any(|k| v.contains(k.as_str())));
    holds.then(|| {
        format!("{app}'s env holds a controller key or the login token: change it with the CLI")
    })
}

pub(super) async fn guard(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let route = route.strip_prefix("/api").unwrap_or(&route).to_string();
    if !ALLOWED
        .iter()
        .any(|(m, r)| *m == parts.method && *r == route)
    {
        return refused(format!(
            "{} {route} is not available from the dashboard: use the CLI with a controller key",
            parts.method
        ));
    }
    let params: Vec<(String, String)> = match parts.extract::<RawPathParams>().await {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        Err(e) => return e.into_response(),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let Ok(node) = host.node() else {
        return ApiError::Unavailable("this host is not in a cluster".into()).into_response();
    };
    let changes = !matches!(parts.method, Method::GET | Method::HEAD);
    let mut body = body;
    if changes {
        if let Some(app) = param("app") {
            if let Some(why) = node.state.read(|a| read_only(&a.state, &app)) {
                return refused(why);
            }
        }
        if route == "/apps/{app}/routes" {
            match own_route(node, body).await {
                Ok(b) => body = b,
                Err(r) => return r,
            }
        }
        if route == "/providers/{provider}/resources" {
            match provisioned_app(node, body).await {
                Ok(b) => body = b,
                Err(r) => return r,
            }
        }
        if route == "/certificates/{id}" {
            let id = param("id").unwrap_or_default();
            if node.state.read(|a| system_certificate(&a.state, &id)) {
                return refused("that certificate serves a system app's route".into());
            }
        }
    }
    let answer = next.run(Request::from_parts(parts, body)).await;
    redact(&host, answer).await
}

/// Whether some system app's HTTP route is `like`.
fn system_route(s: &ClusterState, like: impl Fn(&flynn_state::HttpRoute) -> bool) -> bool {
    s.routes.routes.values().any(|r| match r {
        flynn_state::Route::Http(h) => SYSTEM_APPS.contains(&h.app.as_str()) && like(h),
        flynn_state::Route::Tcp(_) => false,
    })
}

/// Whether a system app's route serves certificate `id`.
fn system_certificate(s: &ClusterState, id: &str) -> bool {
    system_route(s, |h| h.certificate.as_deref() == Some(id))
}

/// A request body read whole (within the API's limit) and parsed, with its bytes to hand
/// on to the handler.
async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<(T, Bytes), Response> {
    let bytes = axum::body::to_bytes(body, crate::api::body::MAX_API_BODY)
        .await
        .map_err(|e| ApiError::Invalid(format!("cannot read request body: {e}")).into_response())?;
    let value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid(format!("malformed JSON body: {e}")).into_response())?;
    Ok((value, bytes))
}

/// A new route must route to its own app, on a name and with a certificate no system
/// app's route uses.
async fn own_route(node: &crate::node::Node, body: Body) -> Result<Body, Response> {
    let (spec, bytes): (flynn_state::RouteSpec, _) = read_json(body).await?;
    let (service, domain, certificate) = match &spec {
        flynn_state::RouteSpec::Http {
            service,
            domain,
            certificate,
            ..
        } => (service, Some(domain.as_str()), certificate.as_deref()),
        flynn_state::RouteSpec::Tcp { service, .. } => (service, None, None),
    };
    if service.is_some() {
        return Err(refused(
            "a route from the dashboard goes to its app's own service: name a service with the CLI"
                .into(),
        ));
    }
    let taken = node.state.read(|a| {
        domain.is_some_and(|d| system_route(&a.state, |h| h.domain.eq_ignore_ascii_case(d)))
            || certificate.is_some_and(|c| system_certificate(&a.state, c))
    });
    if taken {
        return Err(refused(
            "that name or certificate serves a system app: change its routes with the CLI".into(),
        ));
    }
    Ok(Body::from(bytes))
}

/// A database is provisioned only for an app a session may change (its env gains the
/// database's).
async fn provisioned_app(node: &crate::node::Node, body: Body) -> Result<Body, Response> {
    let (req, bytes): (flynn_client::ProvisionRequest, _) = read_json(body).await?;
    for app in req.app.iter().chain(req.apps.iter()) {
        if let Some(why) = node.state.read(|a| read_only(&a.state, app)) {
            return Err(refused(why));
        }
    }
    Ok(Body::from(bytes))
}

/// Replaces every current controller key and the login token in an answer, and hides
/// certificates' private keys.
async fn redact(host: &Host, answer: Response) -> Response {
    let Ok(node) = host.node() else {
        return answer;
    };
    let secrets = node.state.read(|a| secrets(&a.state));
    let (mut parts, body) = answer.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_ANSWER).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::Internal(format!("the answer could not be read to hide secrets: {e}"))
                .into_response()
        }
    };
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    let mut changed = false;
    if text.contains("\"key_pem\"") {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
            hide_private_keys(&mut v);
            text = v.to_string();
            changed = true;
        }
    }
    for s in &secrets {
        // As the secret appears in JSON text (escaped), and as it is.
        let escaped = serde_json::to_string(s).unwrap_or_default();
        let escaped = escaped.trim_matches('"');
        for form in [s.as_str(), escaped] {
            if !form.is_empty() && text.contains(form) {
                text = text.replace(form, HIDDEN);
                changed = true;
            }
        }
    }
    if !changed {
        return Response::from_parts(parts, Body::from(bytes));
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(text))
}

/// Replaces every `key_pem` value in a JSON document.
fn hide_private_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, inner) in map.iter_mut() {
                if k == "key_pem" {
                    *inner = serde_json::Value::String(HIDDEN.into());
                } else {
                    hide_private_keys(inner);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(hide_private_keys),
        _ => {}
    }
}
