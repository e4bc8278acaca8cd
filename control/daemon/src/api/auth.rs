//! Who may call what: the cluster secret for host-to-host and host-admin calls, a controller
//! key for the controller API.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flynn_client::SECRET_HEADER;

use crate::error::ApiError;
use crate::host::Host;

pub async fn require_secret(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    let node = match host.node() {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let given = req
        .headers()
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !node.secret_matches(given) {
        return ApiError::Unauthorized("missing or wrong cluster secret".into()).into_response();
    }
    next.run(req).await
}

/// The node, if this host may serve the controller API now: not while a quorum-loss
/// recovery may still overwrite what it accepts, nor before it has the cluster's state.
/// Every way in (a key, a dashboard session) passes here first.
pub fn serving_node(host: &Host) -> Result<&crate::node::Node, ApiError> {
    let node = host.node()?;
    if host.is_recovering() {
        return Err(ApiError::Unavailable(
            "quorum-loss recovery in progress; retry shortly".into(),
        ));
    }
    if !node.state.read(|a| a.state.bootstrapped()) {
        // A host still joining knows no key yet: that is not the client's fault.
        return Err(ApiError::Unavailable(
            "this host has not caught up with the cluster yet; retry shortly".into(),
        ));
    }
    Ok(node)
}

pub async fn require_key(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    if host.is_recovering() {
        return ApiError::Unavailable("quorum-loss recovery in progress; retry shortly".into())
            .into_response();
    }
    let Some(given) = presented_key(req.headers()) else {
        return ApiError::Unauthorized("a controller key is required".into()).into_response();
    };
    let node = match serving_node(&host) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let keys = node.state.read(|a| a.state.controller_keys());
    // Check every key so the time taken does not say which one came close.
    let mut ok = subtle::Choice::from(0);
    for k in &keys {
        ok |= subtle::ConstantTimeEq::ct_eq(given.as_bytes(), k.as_bytes());
    }
    if !bool::from(ok) {
        return ApiError::Unauthorized("invalid controller key".into()).into_response();
    }
    next.run(req).await
}

pub(crate) fn presented_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        // Flynn's clients send the key as the password of HTTP basic auth.
        let decoded = flynn_state::validate::base64_decode(rest.trim())?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, pw)| pw.to_string());
    }
    None
}
