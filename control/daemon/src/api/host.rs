//! The host's own endpoints: identity, status, bootstrap, membership and components.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use flynn_client::{
    BootstrapRequest, ClusterStatus, HostEntry, HostInfo, JoinRequest, MembershipRequest,
};

use super::{AppState, JsonBody};
use crate::error::ApiResult;
use crate::node::LeaderOp;
use crate::version;

/// Answered without any credential.
pub fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/host/info", get(info))
        .route("/host/status", get(status))
        .route("/host/bootstrap", post(bootstrap))
        .route("/metrics", get(metrics))
}

/// Behind the cluster secret.
pub fn secret_routes() -> Router<AppState> {
    Router::new()
        .route("/host/list", get(list))
        .route("/host/components", get(components))
        .route("/host/firewall", get(firewall))
        .route("/host/join", post(join))
        .route("/host/promote", post(promote))
        .route("/host/demote", post(demote))
        .route("/host/state", get(state_dump))
        .route("/host/drain", post(drain))
        .route(
            "/host/update",
            axum::routing::put(update).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

#[derive(serde::Deserialize)]
struct DrainRequest {
    /// The host (IP, IP:PORT or node id).
    host: String,
    draining: bool,
}

/// `POST /host/drain`: marks a host draining (or not); the scheduler moves its jobs.
async fn drain(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<DrainRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?;
    let id = node.resolve_host(&req.host)?;
    node.propose(flynn_state::ClusterCommand::SetDraining {
        host: id,
        draining: req.draining,
    })
    .await?;
    Ok(Json(
        serde_json::json!({"host": id, "draining": req.draining}),
    ))
}

#[derive(serde::Deserialize, Default)]
struct UpdateQuery {
    /// Refuse a binary of another version.
    expect: Option<String>,
    /// Go back to the binary kept by the last update (no body).
    #[serde(default)]
    rollback: bool,
}

/// `PUT /host/update`: the body is the new `flynn-host` binary. It is checked to run and
/// report its version, put in place of the running one (kept for a rollback), and the
/// daemon replaces itself by it once this answer is sent.
async fn update(
    State(host): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<UpdateQuery>,
    body: axum::body::Body,
) -> ApiResult<(axum::http::StatusCode, Json<serde_json::Value>)> {
    use futures::TryStreamExt;
    use tokio::io::AsyncWriteExt;
    let exe = std::env::current_exe()
        .map_err(|e| crate::error::ApiError::Internal(format!("this binary's path: {e}")))?;
    let internal = |e: std::io::Error| crate::error::ApiError::Internal(e.to_string());
    let new_version = if q.rollback {
        let old = crate::update::old_binary(&exe);
        let v = crate::update::binary_version(&old).await?;
        crate::update::swap_back(&exe).map_err(internal)?;
        v
    } else {
        let staged = exe.with_file_name(".flynn-host.update");
        let written: std::io::Result<()> = async {
            let mut f = tokio::fs::File::create(&staged).await?;
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream
                .try_next()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                f.write_all(&chunk).await?;
            }
            f.sync_all().await?;
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).await
        }
        .await;
        if let Err(e) = written {
            let _ = std::fs::remove_file(&staged);
            return Err(crate::error::ApiError::Invalid(format!(
                "receiving the new binary: {e}"
            )));
        }
        let v = match crate::update::binary_version(&staged).await {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        };
        if let Some(want) = &q.expect {
            if *want != v {
                let _ = std::fs::remove_file(&staged);
                return Err(crate::error::ApiError::Invalid(format!(
                    "asked for version {want}, but the binary sent is version {v}"
                )));
            }
        }
        crate::update::swap_in(&staged, &exe).map_err(internal)?;
        v
    };
    tracing::info!(from = version(), to = %new_version, "in-place update asked for");
    host.request_update(exe);
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(serde_json::json!({"from": version(), "to": new_version})),
    ))
}

#[derive(serde::Deserialize)]
struct StateQuery {
    /// Only records whose storage key starts with this (`app/`, `app/web`).
    #[serde(default)]
    prefix: String,
    /// This host's applied state without a read barrier.
    #[serde(default)]
    stale: bool,
}

/// `GET /host/state`: the cluster state's records as stored (`app/web`, `release/...`),
/// decoded, at one revision: what `flynn-host state dump|get` print.
async fn state_dump(
    State(host): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<StateQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?;
    if !q.stale {
        node.read_barrier().await?;
    }
    let (revision, records) = node.state.read(|a| (a.state.revision, a.state.records()));
    let mut out = serde_json::Map::new();
    for (key, bytes) in records {
        if !key.starts_with(&q.prefix) || key.starts_with("meta/") {
            continue;
        }
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        out.insert(key, value);
    }
    Ok(Json(
        serde_json::json!({"revision": revision, "records": out}),
    ))
}

/// Behind a controller key: this host's view of the cluster, and every host (what
/// `flynn-host list` shows, for the dashboard's hosts page).
pub fn controller_routes() -> Router<AppState> {
    Router::new()
        .route("/status", get(status))
        .route("/hosts", get(list))
        .route("/hosts/details", get(details))
}

/// One host with what it runs: `GET /hosts/details` (the dashboard's hosts page).
#[derive(serde::Serialize)]
struct HostDetails {
    #[serde(flatten)]
    entry: HostEntry,
    /// The node id as text: JavaScript's numbers cannot hold 64 bits.
    id: String,
    /// Its components and their status, as `flynn-host components` shows them; null when
    /// it did not answer within 1.5 s.
    components: Option<serde_json::Value>,
    /// Its jobs that have not ended: `[id, app, type, state]`.
    jobs: Vec<[String; 4]>,
    /// Its volumes: `[id, app, provider, size in bytes]`.
    volumes: Vec<(String, Option<String>, String, Option<u64>)>,
    /// Jobs it failed to start since one last came up there (its own trouble: no free
    /// address or port, cgroups, disk); null when none.
    start_failures: Option<StartFailures>,
}

#[derive(serde::Serialize)]
struct StartFailures {
    count: u32,
    last_ms: u64,
    /// Until when the scheduler places no new jobs there.
    paused_until_ms: u64,
}

async fn details(State(host): State<AppState>) -> ApiResult<Json<Vec<HostDetails>>> {
    let node = host.node()?;
    let entries = node.list_hosts().await;
    let secret = node.secret().to_string();
    let asks = entries.into_iter().map(|entry| {
        let (host, secret) = (host.clone(), secret.clone());
        let own = entry.node_id == node.id;
        async move {
            let components = if own {
                Some(host.components().status())
            } else {
                let c = flynn_client::HostClient::new(
                    &format!("http://{}", entry.addr),
                    Some(&secret),
                    std::time::Duration::from_millis(1500),
                );
                c.components().await.ok()
            };
            (entry, components)
        }
    });
    let answers = futures::future::join_all(asks).await;
    let out = node.state.read(|a| {
        answers
            .into_iter()
            .map(|(entry, components)| {
                let id = entry.node_id;
                let jobs = a
                    .state
                    .jobs
                    .jobs
                    .values()
                    .filter(|j| j.host == id && j.ended_ms.is_none())
                    .map(|j| {
                        let state = serde_json::to_value(j.state)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default();
                        [j.id.clone(), j.app.clone(), j.proc_type.clone(), state]
                    })
                    .collect();
                let volumes = a
                    .state
                    .volumes
                    .volumes
                    .values()
                    .filter(|v| v.host == id)
                    .map(|v| (v.id.clone(), v.app.clone(), v.provider.clone(), v.size))
                    .collect();
                let start_failures =
                    a.state
                        .jobs
                        .host_faults
                        .get(&id.to_string())
                        .map(|f| StartFailures {
                            count: f.crashes,
                            last_ms: f.last_crash_ms,
                            paused_until_ms: f.host_paused_until(),
                        });
                HostDetails {
                    id: id.to_string(),
                    entry,
                    components,
                    jobs,
                    volumes,
                    start_failures,
                }
            })
            .collect()
    });
    Ok(Json(out))
}

async fn info(State(host): State<AppState>) -> Json<HostInfo> {
    Json(host.info())
}

async fn status(State(host): State<AppState>) -> ApiResult<Json<ClusterStatus>> {
    let node = host.node()?;
    let m = node.metrics();
    let (revision, bootstrapped) = node
        .state
        .read(|a| (a.state.revision, a.state.bootstrapped()));
    Ok(Json(ClusterStatus {
        node_id: node.id,
        addr: node.addr.clone(),
        version: version().to_string(),
        role: node.role(),
        leader: m.current_leader,
        leader_addr: node.leader().map(|(_, a)| a),
        term: m.current_term,
        last_applied_index: m.last_applied.map(|l| l.index),
        revision,
        bootstrapped,
    }))
}

async fn bootstrap(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<BootstrapRequest>,
) -> ApiResult<Json<HostInfo>> {
    host.accept_bootstrap(req).await?;
    Ok(Json(host.info()))
}

async fn list(State(host): State<AppState>) -> ApiResult<Json<Vec<HostEntry>>> {
    Ok(Json(host.node()?.list_hosts().await))
}

/// Every component this host runs, with its status.
async fn components(State(host): State<AppState>) -> Json<serde_json::Value> {
    Json(host.components().status())
}

async fn firewall(State(host): State<AppState>) -> Json<serde_json::Value> {
    Json(
        host.components().status_of("firewall").unwrap_or_else(
            || serde_json::json!({"enabled": false, "interfaces": [], "counters": []}),
        ),
    )
}

async fn join(
    State(host): State<AppState>,
    JsonBody(request): JsonBody<JoinRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    host.node()?.on_leader(LeaderOp::Join { request }).await?;
    Ok(Json(serde_json::json!({"joined": true})))
}

async fn promote(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<MembershipRequest>,
) -> ApiResult<Json<Vec<HostEntry>>> {
    let node = host.node()?;
    let node_id = node.resolve_host(&req.host)?;
    node.on_leader(LeaderOp::Promote { node_id }).await?;
    Ok(Json(node.list_hosts().await))
}

async fn demote(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<MembershipRequest>,
) -> ApiResult<Json<Vec<HostEntry>>> {
    let node = host.node()?;
    let node_id = node.resolve_host(&req.host)?;
    node.on_leader(LeaderOp::Demote {
        node_id,
        force: req.force,
    })
    .await?;
    Ok(Json(node.list_hosts().await))
}

async fn metrics(State(host): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        host.prometheus(),
    )
}
