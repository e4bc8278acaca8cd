//! `/host/volumes`: this host's volumes (behind the cluster secret), and the cluster-wide
//! records of every host's volumes. Sending streams `zfs send` from this host straight into
//! the receiving host's `zfs receive`; nothing is held in memory or spooled to disk.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_client::{NewVolume, SendVolume};
use flynn_state::volumes::{Volume, VolumesCommand};
use flynn_volume::{VolumeError, VolumeInfo};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{deleted, AppState, JsonBody};
use crate::components::volumes::VolumesComponent;
use crate::error::{ApiError, ApiResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/host/volumes", get(list).post(create))
        .route("/host/volumes/{id}", get(inspect).delete(remove))
        .route("/host/volumes/{id}/snapshots", post(snapshot))
        .route("/host/volumes/{id}/send", post(send))
        .route("/host/volumes/{id}/export", get(export))
        // A volume stream is as large as the volume.
        .route(
            "/host/volumes/{id}/receive",
            put(receive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NotFound(_) => ApiError::NotFound(e.to_string()),
            VolumeError::Exists(_) => ApiError::Conflict(e.to_string()),
            VolumeError::Invalid(_) | VolumeError::Unsupported(_) => {
                ApiError::Invalid(e.to_string())
            }
            VolumeError::Command { .. } | VolumeError::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Runs a blocking volume operation off the async threads.
async fn blocking<T: Send + 'static>(
    v: &Arc<VolumesComponent>,
    f: impl FnOnce(&VolumesComponent) -> Result<T, VolumeError> + Send + 'static,
) -> ApiResult<T> {
    let v = v.clone();
    tokio::task::spawn_blocking(move || f(&v))
        .await
        .map_err(|e| ApiError::Internal(format!("volume task: {e}")))?
        .map_err(ApiError::from)
}

/// Records a volume of this host in the cluster state, keeping its owner.
async fn record(
    host: &AppState,
    info: &VolumeInfo,
    app: Option<String>,
    job: Option<String>,
) -> ApiResult<Volume> {
    record_owned(host, info, app, job, None).await
}

/// [`record`], also naming the process type and mount path of a job's data volume.
async fn record_owned(
    host: &AppState,
    info: &VolumeInfo,
    app: Option<String>,
    job: Option<String>,
    mount: Option<(String, String)>,
) -> ApiResult<Volume> {
    let node = host.node()?;
    let v = host.volumes();
    let old = node.state.read(|a| {
        a.state
            .volumes
            .volumes
            .get(&Volume::key(v.host(), &info.id))
            .cloned()
    });
    let mut volume = v.record(info, old.as_ref(), app, job);
    if let Some((proc_type, path)) = mount {
        volume.proc_type = Some(proc_type);
        volume.path = Some(path);
    }
    node.propose_as(VolumesCommand::PutVolume { volume }).await
}

#[derive(Deserialize, Default)]
struct ListOpts {
    /// Every host's volumes, from the cluster state.
    #[serde(default)]
    all: bool,
}

async fn list(
    State(host): State<AppState>,
    Query(opts): Query<ListOpts>,
) -> ApiResult<Json<serde_json::Value>> {
    if opts.all {
        let node = host.node()?;
        let all: Vec<Volume> = node
            .state
            .read(|a| a.state.volumes.volumes.values().cloned().collect());
        return Ok(Json(serde_json::to_value(all).unwrap_or_default()));
    }
    let local = blocking(host.volumes(), |v| v.provider.list()).await?;
    Ok(Json(serde_json::to_value(local).unwrap_or_default()))
}

async fn create(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<NewVolume>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    let id = req
        .id
        .clone()
        .unwrap_or_else(|| crate::bootstrap::random_hex(8));
    flynn_volume::validate_name("volume id", &id)?;
    if let Some(app) = &req.app {
        host.node()?.state.read(|a| a.state.app(app).map(|_| ()))?;
    }
    let size = req.size;
    let vid = id.clone();
    let info = blocking(host.volumes(), move |v| v.provider.create(&vid, size)).await?;
    match record(&host, &info, req.app, req.job).await {
        Ok(volume) => Ok((StatusCode::CREATED, Json(volume))),
        Err(e) => {
            // Not recorded: do not leave an unknown volume behind.
            let _ = blocking(host.volumes(), move |v| v.provider.delete(&id)).await;
            Err(e)
        }
    }
}

async fn inspect(
    State(host): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<VolumeInfo>> {
    Ok(Json(
        blocking(host.volumes(), move |v| v.provider.inspect(&id)).await?,
    ))
}

#[derive(Deserialize, Default)]
struct RemoveOpts {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(host): State<AppState>,
    Path(id): Path<String>,
    Query(opts): Query<RemoveOpts>,
) -> ApiResult<Json<serde_json::Value>> {
    if !opts.force {
        // A database's data goes only when asked for by name and --force.
        let holder = host.node()?.state.read(|a| {
            let s = &a.state;
            s.volumes
                .volumes
                .values()
                .find(|v| v.host == host.volumes().host() && v.id == id)
                .and_then(|v| v.app.clone())
                .filter(|app| flynn_state::resources::serves_databases(s, app))
        });
        if let Some(app) = holder {
            return Err(ApiError::Conflict(format!(
                "volume {id} holds the data of the {app} database server; `flynn-host volume delete --force {id}` deletes it anyway"
            )));
        }
    }
    let vid = id.clone();
    blocking(host.volumes(), move |v| v.provider.delete(&vid)).await?;
    let node = host.node()?;
    let remove = VolumesCommand::RemoveVolume {
        host: host.volumes().host(),
        id,
    };
    match node.propose(remove).await {
        Ok(_) | Err(ApiError::NotFound(_)) => Ok(deleted()),
        Err(e) => Err(e),
    }
}

#[derive(Deserialize, Default)]
struct SnapshotReq {
    #[serde(default)]
    name: Option<String>,
}

async fn snapshot(
    State(host): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<SnapshotReq>>,
) -> ApiResult<Json<Volume>> {
    let name = body
        .and_then(|b| b.0.name)
        .unwrap_or_else(|| format!("s{}", crate::now_ms()));
    let info = blocking(host.volumes(), move |v| v.provider.snapshot(&id, &name)).await?;
    Ok(Json(record(&host, &info, None, None).await?))
}

/// Sends a snapshot to another host: incremental from the newest snapshot both have,
/// unless `from` says otherwise.
async fn send(
    State(host): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SendVolume>,
) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?;
    let vid = id.clone();
    let info = blocking(host.volumes(), move |v| v.provider.inspect(&vid)).await?;
    let snapshot = match req.snapshot.or_else(|| info.snapshots.last().cloned()) {
        Some(s) => s,
        None => {
            return Err(ApiError::Invalid(format!(
                "volume {id:?} has no snapshot to send; take one first"
            )))
        }
    };
    let target = node.resolve_host(&req.to)?;
    let target_addr = node
        .metrics()
        .membership_config
        .membership()
        .get_node(&target)
        .map(|n| n.addr.clone())
        .ok_or_else(|| ApiError::NotFound(format!("host {}", req.to)))?;
    let peer = crate::ops::peer(&target_addr, node.secret());
    // What the target has decides the base of an incremental stream.
    let from = match req.from {
        Some(f) => Some(f),
        None => {
            let theirs = peer
                .volume(&id)
                .await
                .ok()
                .and_then(|v| serde_json::from_value::<VolumeInfo>(v).ok());
            theirs.and_then(|theirs| {
                info.snapshots
                    .iter()
                    .rev()
                    .find(|s| theirs.snapshots.contains(s) && **s != snapshot)
                    .cloned()
            })
        }
    };
    let (mut child, stdout) = zfs_send(&host, &id, &snapshot, from.clone()).await?;
    let stream = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(stdout));
    let sent = peer.receive_volume(&id, None, stream).await;
    let status = tokio::task::spawn_blocking(move || child.wait()).await;
    // A refusal explains a broken-pipe exit of `zfs send`, so it is reported first.
    let body =
        sent.map_err(|e| ApiError::Internal(format!("{target_addr} refused the stream: {e}")))?;
    if !matches!(status, Ok(Ok(s)) if s.success()) {
        return Err(ApiError::Internal(format!(
            "zfs send of {id}@{snapshot} failed"
        )));
    }
    Ok(Json(
        serde_json::json!({"sent": snapshot, "from": from, "to": target_addr, "volume": body}),
    ))
}

/// Starts `zfs send` of `id@snapshot` (incremental from `from`): the process and its
/// output.
async fn zfs_send(
    host: &AppState,
    id: &str,
    snapshot: &str,
    from: Option<String>,
) -> ApiResult<(std::process::Child, tokio::process::ChildStdout)> {
    let (sid, ssnap) = (id.to_string(), snapshot.to_string());
    let mut child = blocking(host.volumes(), move |v| {
        v.provider.zfs()?.send(&sid, &ssnap, from.as_deref())
    })
    .await?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ApiError::Internal("zfs send has no stdout".into()))?;
    let stdout = tokio::process::ChildStdout::from_std(stdout)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((child, stdout))
}

/// A full `zfs send` stream of volume `id` as it is now (a snapshot `backup-MS` is taken
/// for it): what a cluster backup holds. A send that fails ends the body with an error,
/// never as a short stream that looks whole.
async fn export(
    State(host): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    host.node()?;
    let name = format!("backup-{}", crate::now_ms());
    let (vid, snap) = (id.clone(), name.clone());
    let info = blocking(host.volumes(), move |v| {
        v.provider.zfs()?;
        v.provider.snapshot(&vid, &snap)
    })
    .await?;
    record(&host, &info, None, None).await?;
    let (mut child, stdout) = zfs_send(&host, &id, &name, None).await?;
    let status = futures::stream::once(async move {
        match tokio::task::spawn_blocking(move || child.wait()).await {
            Ok(Ok(s)) if s.success() => None,
            _ => Some(Err(std::io::Error::other(format!(
                "zfs send of {id}@{name} failed"
            )))),
        }
    })
    .filter_map(futures::future::ready);
    let stream = tokio_util::io::ReaderStream::new(stdout).chain(status);
    Ok(axum::response::Response::new(Body::from_stream(stream)))
}

#[derive(Deserialize, Default)]
struct ReceiveOpts {
    /// The owners to record (a restored backup's volume keeps its app).
    app: Option<String>,
    job: Option<String>,
    /// For a job's data volume: its process type and mount path.
    proc_type: Option<String>,
    path: Option<String>,
}

/// Receives a `zfs send` stream into volume `id`. ZFS applies it only whole: a cut stream
/// fails and leaves the volume as it was.
async fn receive(
    State(host): State<AppState>,
    Path(id): Path<String>,
    Query(owner): Query<ReceiveOpts>,
    body: Body,
) -> ApiResult<Json<Volume>> {
    host.node()?;
    let rid = id.clone();
    let mut child = blocking(host.volumes(), move |v| v.provider.zfs()?.receive(&rid)).await?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| ApiError::Internal("zfs receive has no stdin".into()))?;
    let mut stdin = tokio::process::ChildStdin::from_std(stdin)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut cut = None;
    loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => {
                if let Err(e) = stdin.write_all(&chunk).await {
                    cut = Some(format!("zfs receive stopped reading: {e}"));
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                cut = Some(format!("the stream broke off: {e}"));
                break;
            }
        }
    }
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if !out.status.success() || cut.is_some() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = cut.unwrap_or_else(|| {
            stderr
                .lines()
                .next()
                .unwrap_or("zfs receive failed")
                .to_string()
        });
        // A failed receive may leave the volume unmounted; it is to stay as it was.
        let rid = id.clone();
        let _ = blocking(host.volumes(), move |v| {
            v.provider.zfs()?.remount(&rid);
            Ok(())
        })
        .await;
        return Err(ApiError::Invalid(format!(
            "volume {id:?} not received: {why}; it is unchanged"
        )));
    }
    let info = blocking(host.volumes(), move |v| v.provider.inspect(&id)).await?;
    let mount = owner.proc_type.zip(owner.path);
    Ok(Json(
        record_owned(&host, &info, owner.app, owner.job, mount).await?,
    ))
}
