//! `/raft/*`: Raft RPCs between hosts, and the leader endpoint other hosts forward to.
//! `/raft/stream` upgrades a connection to the peer stream that carries AppendEntries and
//! Vote (`flynn_raft::stream`); the per-RPC routes stay for snapshots and older builds.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flynn_raft::openraft::raft::{AppendEntriesRequest, VoteRequest};
use flynn_raft::openraft_legacy::network_v1::{ChunkedSnapshotReceiver, InstallSnapshotRequest};
use flynn_raft::stream;
use flynn_raft::TypeConfig;

use super::{AppState, JsonBody};
use crate::error::ApiResult;
use crate::node::{LeaderOp, LeaderReply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/leader", post(leader))
        .route(stream::PATH_STREAM, get(open_stream))
}

/// Switches the connection to the peer stream and serves it on a task of its own. The
/// cluster secret was checked before this, as on every `/raft` route.
async fn open_stream(State(host): State<AppState>, mut req: Request) -> ApiResult<Response> {
    let raft = host.node()?.raft.clone();
    let asked = req.headers().get(header::UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(stream::PROTOCOL.as_bytes())
    });
    let upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let Some(upgrade) = upgrade.filter(|_| asked) else {
        // 426 names the protocol spoken here; a caller asking for another one (a newer
        // build) falls back to the per-RPC routes on it.
        let mut refusal = crate::error::ApiError::Invalid(format!(
            "{} is an HTTP/1.1 upgrade to {}",
            stream::PATH_STREAM,
            stream::PROTOCOL
        ))
        .into_response();
        *refusal.status_mut() = StatusCode::UPGRADE_REQUIRED;
        refusal.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static(stream::PROTOCOL),
        );
        return Ok(refusal);
    };
    tokio::spawn(async move {
        let served = match upgrade.await {
            Ok(io) => stream::serve(hyper_util::rt::TokioIo::new(io), raft).await,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, "a peer's raft stream ended");
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, stream::PROTOCOL),
        ],
    )
        .into_response())
}

async fn append(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<AppendEntriesRequest<TypeConfig>>,
) -> ApiResult<Json<impl serde::Serialize>> {
    Ok(Json(host.node()?.raft.append_entries(req).await))
}

async fn vote(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<VoteRequest<TypeConfig>>,
) -> ApiResult<Json<impl serde::Serialize>> {
    Ok(Json(host.node()?.raft.vote(req).await))
}

async fn snapshot(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<InstallSnapshotRequest<TypeConfig>>,
) -> ApiResult<Json<impl serde::Serialize>> {
    Ok(Json(host.node()?.raft.install_snapshot(req).await))
}

async fn leader(
    State(host): State<AppState>,
    JsonBody(op): JsonBody<LeaderOp>,
) -> ApiResult<Json<LeaderReply>> {
    Ok(Json(host.node()?.leader_endpoint(op).await?))
}
