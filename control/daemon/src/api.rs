//! The HTTP API every host serves on one port:
//!
//! - `/host/info`, `/host/status`, `/host/bootstrap`: open (bootstrap is refused once a host
//!   has a cluster secret).
//! - `/raft/*`, `/host/list|join|promote|demote`: cluster secret (`x-flynn-cluster-secret`).
//! - the controller API (`/apps`, `/certificates`, `/services`, `/watch`, `/status`):
//!   a controller key (`Authorization: Bearer KEY`, or Basic with the key as password).
//! - `/metrics`: Prometheus text, open.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_client::{
    BootstrapRequest, ClusterStatus, CreateApp, EnvUpdate, HostInfo, InstanceRegistration,
    JoinRequest, MembershipRequest, RouteRequest, WatchLine, SECRET_HEADER,
};
use flynn_raft::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use flynn_raft::store::WatchItem;
use flynn_raft::TypeConfig;
use flynn_state::{Command, NewCertificate, Response as StateResponse};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::daemon::Host;
use crate::error::{ApiError, ApiResult};
use crate::node::{LeaderOp, Node};
use crate::now_ms;
use crate::version;

/// Largest request body the controller API accepts.
pub const MAX_API_BODY: usize = 1024 * 1024;
/// Raft traffic carries log batches and snapshot chunks.
const MAX_RAFT_BODY: usize = 64 * 1024 * 1024;

pub fn router(host: Arc<Host>) -> Router {
    let raft = Router::new()
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
        .route("/raft/leader", post(raft_leader))
        .route("/host/list", get(host_list))
        .route("/host/firewall", get(host_firewall))
        .route("/host/join", post(host_join))
        .route("/host/promote", post(host_promote))
        .route("/host/demote", post(host_demote))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RAFT_BODY))
        .layer(middleware::from_fn_with_state(host.clone(), require_secret));

    let controller = Router::new()
        .route("/status", get(status))
        .route("/apps", get(list_apps).post(create_app))
        .route("/apps/{app}", get(get_app).delete(delete_app))
        .route("/apps/{app}/env", get(get_env).post(update_env))
        .route("/apps/{app}/routes", get(list_routes).post(add_route))
        .route(
            "/apps/{app}/routes/{id}",
            axum::routing::delete(remove_route),
        )
        .route("/certificates", get(list_certs).post(add_cert))
        .route("/certificates/{id}", axum::routing::delete(remove_cert))
        .route("/services/{service}", get(get_service))
        .route(
            "/services/{service}/instances/{id}",
            put(register_instance).delete(deregister_instance),
        )
        .route(
            "/services/{service}/instances/{id}/heartbeat",
            post(heartbeat_instance),
        )
        .route("/watch", get(watch))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .layer(middleware::from_fn_with_state(host.clone(), require_key));

    Router::new()
        .route("/host/info", get(host_info))
        .route("/host/status", get(status))
        .route("/host/bootstrap", post(host_bootstrap))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .merge(raft)
        .merge(controller)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(host)
}

// ---------------------------------------------------------------- extractors and auth

/// JSON body whose rejections are JSON errors too (axum's own answer plain text).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!(
                    "request body is over the {MAX_API_BODY} byte limit"
                ))
            } else {
                ApiError::Invalid(format!("cannot read request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::Invalid(format!("malformed JSON body: {e}")))
    }
}

async fn require_secret(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
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

async fn require_key(State(host): State<Arc<Host>>, req: Request, next: Next) -> Response {
    let node = match host.node() {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    if host.is_recovering() {
        return ApiError::Unavailable("quorum-loss recovery in progress; retry shortly".into())
            .into_response();
    }
    let Some(given) = presented_key(req.headers()) else {
        return ApiError::Unauthorized("a controller key is required".into()).into_response();
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

fn presented_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        // Flynn's clients send the key as the password of HTTP basic auth.
        let decoded = base64_decode(rest.trim())?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, pw)| pw.to_string());
    }
    None
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[derive(Deserialize, Default)]
struct ReadOpts {
    /// Answer from this host's applied state without confirming with the leader.
    #[serde(default)]
    stale: bool,
    #[serde(rename = "type", default)]
    proc_type: Option<String>,
}

async fn read<T>(
    node: &Node,
    opts: &ReadOpts,
    f: impl FnOnce(&flynn_state::ClusterState) -> ApiResult<T>,
) -> ApiResult<T> {
    if !opts.stale {
        node.read_barrier().await?;
    }
    node.state.read(|a| f(&a.state))
}

// ---------------------------------------------------------------- host endpoints

async fn host_info(State(host): State<Arc<Host>>) -> Json<HostInfo> {
    Json(host.info())
}

async fn status(State(host): State<Arc<Host>>) -> ApiResult<Json<ClusterStatus>> {
    let node = host.node()?;
    let m = node.metrics();
    let (revision, bootstrapped) = node
        .state
        .read(|a| (a.state.revision, a.state.bootstrapped));
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

async fn host_bootstrap(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<BootstrapRequest>,
) -> ApiResult<Json<HostInfo>> {
    host.accept_bootstrap(req).await?;
    Ok(Json(host.info()))
}

async fn host_list(State(host): State<Arc<Host>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(host.node()?.list_hosts().await))
}

async fn host_firewall(State(host): State<Arc<Host>>) -> impl IntoResponse {
    match host.firewall() {
        Some(fw) => Json(serde_json::to_value(fw.status()).unwrap_or_default()),
        None => Json(serde_json::json!({"enabled": false, "interfaces": [], "counters": []})),
    }
}

async fn host_join(
    State(host): State<Arc<Host>>,
    JsonBody(request): JsonBody<JoinRequest>,
) -> ApiResult<impl IntoResponse> {
    host.node()?.on_leader(LeaderOp::Join { request }).await?;
    Ok(Json(serde_json::json!({"joined": true})))
}

async fn host_promote(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<MembershipRequest>,
) -> ApiResult<impl IntoResponse> {
    let node = host.node()?;
    let node_id = node.resolve_host(&req.host)?;
    node.on_leader(LeaderOp::Promote { node_id }).await?;
    Ok(Json(node.list_hosts().await))
}

async fn host_demote(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<MembershipRequest>,
) -> ApiResult<impl IntoResponse> {
    let node = host.node()?;
    let node_id = node.resolve_host(&req.host)?;
    node.on_leader(LeaderOp::Demote {
        node_id,
        force: req.force,
    })
    .await?;
    Ok(Json(node.list_hosts().await))
}

async fn metrics(State(host): State<Arc<Host>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        host.prometheus(),
    )
}

// ---------------------------------------------------------------- raft endpoints

async fn raft_append(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<AppendEntriesRequest<TypeConfig>>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(host.node()?.raft.append_entries(req).await))
}

async fn raft_vote(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<VoteRequest<u64>>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(host.node()?.raft.vote(req).await))
}

async fn raft_snapshot(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<InstallSnapshotRequest<TypeConfig>>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(host.node()?.raft.install_snapshot(req).await))
}

async fn raft_leader(
    State(host): State<Arc<Host>>,
    JsonBody(op): JsonBody<LeaderOp>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(host.node()?.leader_endpoint(op).await?))
}

// ---------------------------------------------------------------- controller API

async fn list_apps(
    State(host): State<Arc<Host>>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<impl IntoResponse> {
    let apps = read(host.node()?, &opts, |s| {
        Ok(s.apps.values().cloned().collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(apps))
}

async fn get_app(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<impl IntoResponse> {
    let app = read(host.node()?, &opts, |s| Ok(s.app(&app)?.clone())).await?;
    Ok(Json(app))
}

fn expect_app(r: StateResponse) -> ApiResult<flynn_state::App> {
    match r {
        StateResponse::App { app } => Ok(app),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn create_app(
    State(host): State<Arc<Host>>,
    JsonBody(req): JsonBody<CreateApp>,
) -> ApiResult<impl IntoResponse> {
    flynn_state::validate::app_name(&req.name)?;
    let r = host
        .node()?
        .propose(Command::CreateApp { name: req.name })
        .await?;
    Ok((StatusCode::CREATED, Json(expect_app(r)?)))
}

async fn delete_app(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
) -> ApiResult<impl IntoResponse> {
    host.node()?
        .propose(Command::DeleteApp { name: app })
        .await?;
    Ok(Json(serde_json::json!({"deleted": true})))
}

async fn get_env(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<BTreeMap<String, String>>> {
    let env = read(host.node()?, &opts, |s| {
        Ok(s.app(&app)?.env.resolved(opts.proc_type.as_deref()))
    })
    .await?;
    Ok(Json(env))
}

async fn update_env(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<EnvUpdate>,
) -> ApiResult<impl IntoResponse> {
    let r = host
        .node()?
        .propose(Command::UpdateEnv {
            app,
            proc_type: req.proc_type,
            set: req.set,
            unset: req.unset,
        })
        .await?;
    Ok(Json(expect_app(r)?))
}

async fn list_routes(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<impl IntoResponse> {
    let routes = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        Ok(s.routes
            .values()
            .filter(|r| r.app() == app)
            .cloned()
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(routes))
}

async fn add_route(
    State(host): State<Arc<Host>>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<RouteRequest>,
) -> ApiResult<impl IntoResponse> {
    match host
        .node()?
        .propose(Command::AddRoute { app, route: req })
        .await?
    {
        StateResponse::Route { route } => Ok((StatusCode::CREATED, Json(route))),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn remove_route(
    State(host): State<Arc<Host>>,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    host.node()?
        .propose(Command::RemoveRoute { app, id })
        .await?;
    Ok(Json(serde_json::json!({"deleted": true})))
}

async fn list_certs(
    State(host): State<Arc<Host>>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<impl IntoResponse> {
    let certs = read(host.node()?, &opts, |s| {
        Ok(s.certificates.values().cloned().collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(certs))
}

async fn add_cert(
    State(host): State<Arc<Host>>,
    JsonBody(certificate): JsonBody<NewCertificate>,
) -> ApiResult<impl IntoResponse> {
    flynn_state::validate::certificate(&certificate)?;
    match host
        .node()?
        .propose(Command::AddCertificate { certificate })
        .await?
    {
        StateResponse::Certificate { certificate } => Ok((StatusCode::CREATED, Json(certificate))),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn remove_cert(
    State(host): State<Arc<Host>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    host.node()?
        .propose(Command::RemoveCertificate { id })
        .await?;
    Ok(Json(serde_json::json!({"deleted": true})))
}

async fn get_service(
    State(host): State<Arc<Host>>,
    Path(service): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<impl IntoResponse> {
    let svc = read(host.node()?, &opts, |s| {
        s.services
            .get(&service)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("service {service:?} has no instances")))
    })
    .await?;
    let leader = svc.leader().map(|i| i.id.clone());
    Ok(Json(serde_json::json!({
        "name": svc.name,
        "leader": leader,
        "instances": svc.instances,
    })))
}

fn expect_instance(r: StateResponse) -> ApiResult<impl IntoResponse> {
    match r {
        StateResponse::Instance { instance } => Ok(Json(instance)),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

async fn register_instance(
    State(host): State<Arc<Host>>,
    Path((service, id)): Path<(String, String)>,
    JsonBody(reg): JsonBody<InstanceRegistration>,
) -> ApiResult<impl IntoResponse> {
    flynn_state::validate::service_name(&service)?;
    flynn_state::validate::instance(&id, &reg.addr, reg.ttl_ms)?;
    let r = host
        .node()?
        .propose(Command::RegisterInstance {
            service,
            id,
            addr: reg.addr,
            meta: reg.meta,
            ttl_ms: reg.ttl_ms,
            now_ms: now_ms(),
        })
        .await?;
    expect_instance(r)
}

async fn heartbeat_instance(
    State(host): State<Arc<Host>>,
    Path((service, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let r = host
        .node()?
        .propose(Command::Heartbeat {
            service,
            id,
            now_ms: now_ms(),
        })
        .await?;
    expect_instance(r)
}

async fn deregister_instance(
    State(host): State<Arc<Host>>,
    Path((service, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    host.node()?
        .propose(Command::Deregister { service, id })
        .await?;
    Ok(Json(serde_json::json!({"deleted": true})))
}

#[derive(Deserialize)]
struct WatchOpts {
    #[serde(default)]
    since: u64,
    /// Start from this host's applied state even if it lags (a router on a cut-off host
    /// keeps its routes); by default the stream starts at least as new as every write
    /// acknowledged before it was opened.
    #[serde(default)]
    stale: bool,
}

/// Streams data-plane changes after `since` as newline-delimited JSON, then follows live.
async fn watch(
    State(host): State<Arc<Host>>,
    Query(opts): Query<WatchOpts>,
) -> ApiResult<Response> {
    let node = host.node()?.clone();
    if !opts.stale {
        node.read_barrier().await?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    tokio::spawn(async move {
        // Subscribe before reading history so nothing falls between the two.
        let mut live = node.state.subscribe();
        let mut sent = opts.since;
        let mut lines = catch_up(&node, opts.since);
        // Inside a reset every event is current state, whatever revision it carries.
        let mut resyncing = false;
        loop {
            for line in lines.drain(..) {
                match &line {
                    WatchLine::Event(e) if e.revision <= sent && !resyncing => continue,
                    WatchLine::Reset { .. } => resyncing = true,
                    WatchLine::Synced { revision } => {
                        sent = sent.max(*revision);
                        resyncing = false;
                    }
                    _ => {}
                }
                let mut buf = serde_json::to_vec(&line).expect("watch lines serialize");
                buf.push(b'\n');
                if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                    return; // client went away
                }
            }
            let item = tokio::time::timeout(Duration::from_secs(10), live.recv()).await;
            match item {
                Err(_) => {
                    let revision = node.state.read(|a| a.state.revision);
                    lines.push(WatchLine::Heartbeat { revision });
                }
                Ok(Ok(WatchItem::Event(e))) => {
                    if e.revision > sent {
                        // Take what else is queued, then mark progress up to the last event
                        // taken (not the state's revision: later events may still be queued).
                        let mut revision = e.revision;
                        lines.push(WatchLine::Event(e));
                        loop {
                            match live.try_recv() {
                                Ok(WatchItem::Event(next)) => {
                                    revision = revision.max(next.revision);
                                    lines.push(WatchLine::Event(next));
                                }
                                Ok(WatchItem::Reset)
                                | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                                    lines = catch_up(&node, 0);
                                    sent = 0;
                                    revision = 0;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if revision > 0 {
                            lines.push(WatchLine::Synced { revision });
                        }
                    }
                }
                // A snapshot replaced history, or we fell behind: resync from scratch.
                Ok(Ok(WatchItem::Reset))
                | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    lines = catch_up(&node, 0);
                    sent = 0;
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static response parts"))
}

/// The lines that bring a watcher from `since` to now: the missed events if still in
/// memory, else a reset followed by the full current data-plane state.
fn catch_up(node: &Node, since: u64) -> Vec<WatchLine> {
    node.state.read(|a| {
        let revision = a.state.revision;
        let mut lines = Vec::new();
        match (since, a.events_since(since)) {
            (s, Some(events)) if s > 0 => lines.extend(events.into_iter().map(WatchLine::Event)),
            _ => {
                lines.push(WatchLine::Reset { revision });
                lines.extend(
                    a.state
                        .data_plane_snapshot()
                        .into_iter()
                        .map(WatchLine::Event),
                );
            }
        }
        lines.push(WatchLine::Synced { revision });
        lines
    })
}
