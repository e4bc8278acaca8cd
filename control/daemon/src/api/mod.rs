//! The HTTP API every host serves on one port, one module per area:
//!
//! - [`host`]: `/host/info`, `/host/status`, `/host/bootstrap` (open; bootstrap is refused
//!   once a host has a cluster secret), `/host/list|firewall|join|promote|demote` (cluster
//!   secret), `/metrics` (open).
//! - [`raft`]: `/raft/*`, host to host (cluster secret).
//! - [`status`]: `/` (the status page, open from private addresses, else the status key),
//!   `/host/health` (cluster secret).
//! - the controller API, behind a controller key ([`auth`]): [`apps`] (`/apps`, env),
//!   [`routes`] (routes, `/certificates`), [`services`] (`/services`), [`watch`] (`/watch`),
//!   [`jobs`] (layers, images, releases, formations, jobs, logs, `flynn run`, builds),
//!   [`attach`] (a one-off job's stdin, output and terminal size, forwarded to its host),
//!   [`volumes`], [`backup`] (`/backup`; restore is host to host) and [`export`]
//!   (export, import), and `/status`.
//! - [`dashboard`]: every request for `dashboard.$CLUSTER_DOMAIN` (the page, login,
//!   sessions, and the controller API under `/api` behind a session and a CSRF token).
//! - [`git`]: `/APP.git/info/refs`, `/APP.git/git-upload-pack|git-receive-pack` (git's
//!   smart HTTP at `git.$CLUSTER_DOMAIN`, a controller key as the Basic password).
//!
//! Handlers parse, call the host's services and answer; archive logic is in
//! [`crate::ops`], the blobstore's in [`crate::blobstore`], the job runner's in
//! [`crate::jobs`].
//!
//! Every answer that is not a success is a JSON [`flynn_client::ErrorBody`].

pub mod apps;
pub mod attach;
pub mod auth;
pub mod backup;
pub mod body;
pub mod dashboard;
pub mod export;
pub mod git;
pub mod host;
pub mod jobs;
pub mod raft;
pub mod resources;
pub mod routes;
pub mod services;
pub mod status;
pub mod volumes;
pub mod watch;

use std::sync::Arc;

use axum::{middleware, Router};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::host::Host;
use crate::node::Node;

/// Raft traffic carries log batches and snapshot chunks.
const MAX_RAFT_BODY: usize = 64 * 1024 * 1024;

pub use body::{JsonBody, BODY_TIMEOUT, MAX_API_BODY};

pub type AppState = Arc<Host>;

pub fn router(host: Arc<Host>) -> Router {
    let cluster = raft::routes()
        .merge(host::secret_routes())
        .merge(volumes::routes())
        .merge(jobs::secret_routes())
        .merge(status::secret_routes())
        .merge(backup::secret_routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RAFT_BODY))
        .layer(middleware::from_fn_with_state(
            host.clone(),
            auth::require_secret,
        ));
    let controller = controller_routes().layer(middleware::from_fn_with_state(
        host.clone(),
        auth::require_key,
    ));
    let git = git::routes(host.clone());
    let dashboard = dashboard::router(host.clone(), controller_routes());
    host::open_routes()
        .merge(status::open_routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .merge(cluster)
        .merge(controller)
        .merge(git)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(
            (host.clone(), dashboard),
            dashboard::dispatch,
        ))
        .layer(middleware::from_fn(crate::metrics::api))
        .with_state(host)
}

/// The controller API (what the CLI calls), before any check of who calls: behind a
/// controller key on the API port, behind a session on the dashboard.
fn controller_routes() -> Router<AppState> {
    apps::routes()
        .merge(routes::routes())
        .merge(services::routes())
        .merge(watch::routes())
        .merge(host::controller_routes())
        .merge(jobs::controller_routes())
        .merge(backup::controller_routes())
        .merge(export::routes())
        .merge(resources::routes())
        .merge(status::controller_routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
}

#[derive(Deserialize, Default)]
pub struct ReadOpts {
    /// Answer from this host's applied state without confirming with the leader.
    #[serde(default)]
    pub stale: bool,
    #[serde(rename = "type", default)]
    pub proc_type: Option<String>,
}

/// Reads the applied state: linearizable (after a read barrier) unless `stale`.
pub async fn read<T>(
    node: &Node,
    opts: &ReadOpts,
    f: impl FnOnce(&flynn_state::ClusterState) -> ApiResult<T>,
) -> ApiResult<T> {
    if !opts.stale {
        node.read_barrier().await?;
    }
    node.state.read(|a| f(&a.state))
}

pub use crate::serve::deleted;
