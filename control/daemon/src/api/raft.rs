//! `/raft/*`: Raft RPCs between hosts, and the leader endpoint other hosts forward to.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use flynn_raft::openraft::raft::{AppendEntriesRequest, VoteRequest};
use flynn_raft::openraft_legacy::network_v1::{ChunkedSnapshotReceiver, InstallSnapshotRequest};
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
