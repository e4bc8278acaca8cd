//! What a dashboard session may not do with the controller API, so the browser never holds
//! the controller key (nor the login token) and a session cannot make itself one:
//!
//! - every JSON answer has each current controller key and the login token replaced by
//!   `(hidden)`, wherever they appear (`AUTH_KEY`, other apps' `CONTROLLER_KEY`);
//! - the controller's `AUTH_KEY` and the dashboard's `LOGIN_TOKEN` are not set or unset
//!   from a session (403: rotate them with the CLI);
//! - a cluster backup and an app export (which carry the keys) are not downloaded;
//! - certificates' private keys (`key_pem`) read as `(hidden)`: a session may add a
//!   certificate with its key, never read one back.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flynn_state::sessions::TOKEN_ENV;

use crate::error::ApiError;
use crate::host::Host;

/// Largest JSON answer the guard reads to redact (the API's own answers are far smaller).
const MAX_ANSWER: usize = 64 << 20;
/// What a secret reads as on the dashboard.
const HIDDEN: &str = "(hidden)";

/// The env variables a session may not change, per app.
const KEPT: &[(&str, &str)] = &[("controller", "AUTH_KEY"), ("dashboard", TOKEN_ENV)];

pub(super) async fn guard(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let refused = |why: &str| ApiError::Forbidden(why.to_string()).into_response();
    if req.method() == Method::GET
        && (path == "/backup" || (path.starts_with("/apps/") && path.ends_with("/export")))
    {
        return refused(
            "backups and exports carry the controller keys: take them with the CLI (flynn cluster backup, flynn export)",
        );
    }
    let req = if req.method() == Method::POST && path.ends_with("/env") {
        match kept_env_change(&path, req).await {
            Ok(req) => req,
            Err(r) => return r,
        }
    } else {
        req
    };
    let answer = next.run(req).await;
    redact(&host, answer).await
}

/// Refuses an env change of a kept variable; hands the request on otherwise.
async fn kept_env_change(path: &str, req: Request) -> Result<Request, Response> {
    let app = path
        .strip_prefix("/apps/")
        .and_then(|p| p.strip_suffix("/env"))
        .unwrap_or_default()
        .to_string();
    let kept: Vec<&str> = KEPT
        .iter()
        .filter(|(a, _)| *a == app)
        .map(|(_, k)| *k)
        .collect();
    if kept.is_empty() {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, crate::api::MAX_API_BODY)
        .await
        .map_err(|e| ApiError::Invalid(format!("cannot read request body: {e}")).into_response())?;
    let update: flynn_client::EnvUpdate = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid(format!("malformed JSON body: {e}")).into_response())?;
    if let Some(k) = kept
        .iter()
        .find(|k| update.set.contains_key(**k) || update.unset.iter().any(|u| u == *k))
    {
        return Err(ApiError::Forbidden(format!(
            "{app}'s {k} is changed with the CLI (flynn -a {app} env set {k}=...), not from the dashboard"
        ))
        .into_response());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Replaces every current controller key and the login token in a JSON answer.
async fn redact(host: &Host, answer: Response) -> Response {
    let json = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !json {
        return answer;
    }
    let Ok(node) = host.node() else {
        return answer;
    };
    let secrets: Vec<String> = node.state.read(|a| {
        let mut v = a.state.controller_keys();
        if let Some(t) = a
            .state
            .apps
            .get(super::APP)
            .and_then(|d| d.env.global.get(TOKEN_ENV))
        {
            v.push(t.clone());
        }
        v
    });
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
    // Keys are at least 16 characters (validated): nothing short is ever replaced.
    for s in secrets.iter().filter(|s| s.len() >= 16) {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), HIDDEN);
            changed = true;
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
