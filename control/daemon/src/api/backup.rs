//! Cluster backup and restore, as archives ([`crate::archive`]) streamed over HTTP.
//!
//! - `GET /backup` (controller key): `state.json` (the whole cluster state at one
//!   revision: apps, env, releases, formations, routes, certificates, keys, blob
//!   metadata), `blobs/PATH` (the bytes of every file on the embedded or a Postgres
//!   backend), `volumes/ID/NNNNNN` (each ZFS volume's full `zfs send` stream, in chunks),
//!   then `MANIFEST.json`. Files on S3, GCS or Azure are referenced, not copied: their
//!   records are in the state and the manifest lists them.
//! - `PUT /host/restore` (cluster secret; `flynn-host bootstrap --from-backup` sends it
//!   after checking the archive whole): into a new cluster only. Blob bytes go through the
//!   blobstore's checked write, volumes to ZFS hosts in turn, and last the state, merged
//!   with the new cluster's hosts in one command ([`flynn_state::Command::RestoreBackup`]).

use std::collections::BTreeMap;
use std::io;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use flynn_client::SECRET_HEADER;
use flynn_state::blobs::BlobFile;
use flynn_state::volumes::Volume;
use flynn_state::ClusterState;
use futures::TryStreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use crate::archive::{ArchiveError, TarReader, TarWriter};
use crate::error::{ApiError, ApiResult};

pub const STATE_ENTRY: &str = "state.json";
/// Backend kinds whose bytes a backup carries (the others are the cloud's to keep).
const CARRIED: [&str; 2] = ["embedded", "postgres"];

pub fn controller_routes() -> Router<AppState> {
    Router::new().route("/backup", get(backup))
}

pub fn secret_routes() -> Router<AppState> {
    Router::new().route(
        "/host/restore",
        put(restore).layer(axum::extract::DefaultBodyLimit::disable()),
    )
}

/// What a backup of `state` holds besides the state itself.
pub struct Plan {
    pub blobs: Vec<BlobFile>,
    /// Files referenced, not copied: path → backend.
    pub external: BTreeMap<String, String>,
    /// ZFS volumes, with the API address of the host holding each.
    pub volumes: Vec<(Volume, String)>,
    /// What cannot be carried, and why.
    pub skipped: Vec<String>,
}

impl Plan {
    pub fn of(state: &ClusterState, members: &BTreeMap<u64, String>) -> Plan {
        let env = state
            .apps
            .get(crate::blobstore::SERVICE)
            .map(|a| a.env.global.clone())
            .unwrap_or_default();
        let kinds: BTreeMap<String, String> = flynn_state::blobs::config::backends(&env)
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.name, c.backend))
            .collect();
        let mut plan = Plan {
            blobs: Vec::new(),
            external: BTreeMap::new(),
            volumes: Vec::new(),
            skipped: Vec::new(),
        };
        for f in state.blobs.blobs.values() {
            let kind = kinds
                .get(&f.backend)
                .map(String::as_str)
                .unwrap_or(f.backend.as_str());
            if CARRIED.contains(&kind) {
                plan.blobs.push(f.clone());
            } else {
                plan.external.insert(f.path.clone(), f.backend.clone());
            }
        }
        for v in state.volumes.volumes.values() {
            match (v.provider.as_str(), members.get(&v.host)) {
                ("zfs", Some(addr)) => plan.volumes.push((v.clone(), addr.clone())),
                ("zfs", None) => plan
                    .skipped
                    .push(format!("volume {}: its host is no longer a member", v.id)),
                (p, _) => plan.skipped.push(format!(
                    "volume {}: on a {p} provider, which has no send stream",
                    v.id
                )),
            }
        }
        plan
    }
}

async fn backup(State(host): State<AppState>) -> ApiResult<Response> {
    let node = host.node()?.clone();
    node.read_barrier().await?;
    let state = node.state.read(|a| a.state.clone());
    let members: BTreeMap<u64, String> = node.members().into_iter().collect();
    let plan = Plan::of(&state, &members);
    let blobstore = host.blobstore().cloned().ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore; ask another host for the backup".into())
    })?;
    let state_json =
        Bytes::from(serde_json::to_vec(&state).map_err(|e| ApiError::Internal(e.to_string()))?);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header("x-flynn-backup-revision", state.revision)
        .header("x-flynn-backup-blobs", plan.blobs.len())
        .header(
            "x-flynn-backup-blob-bytes",
            plan.blobs.iter().map(|b| b.size).sum::<u64>(),
        )
        .header("x-flynn-backup-external-blobs", plan.external.len())
        .header("x-flynn-backup-volumes", plan.volumes.len());
    if !plan.skipped.is_empty() {
        resp = resp.header("x-flynn-backup-skipped", plan.skipped.len());
    }
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let secret = node.secret().to_string();
    let domain = state.cluster.domain.clone();
    let revision = state.revision;
    tokio::spawn(async move {
        let mut w = TarWriter::new(tx);
        let mut volumes = Vec::new();
        let written: io::Result<()> = async {
            w.bytes(STATE_ENTRY, state_json).await?;
            for f in &plan.blobs {
                let content = blobstore
                    .open(f, None)
                    .await
                    .map_err(|e| io::Error::other(format!("blob {}: {e}", f.path)))?;
                w.stream(&format!("blobs{}", f.path), f.size, content)
                    .await?;
            }
            for (v, addr) in &plan.volumes {
                let bytes = write_volume(&mut w, addr, &secret, &v.id).await?;
                volumes.push(json!({"id": v.id, "app": v.app, "job": v.job, "bytes": bytes}));
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "backup failed");
            w.fail(e.to_string()).await;
            return;
        }
        let extra = BTreeMap::from([
            ("domain".to_string(), json!(domain)),
            ("revision".to_string(), json!(revision)),
            ("blobs".to_string(), json!(plan.blobs.len())),
            ("external_blobs".to_string(), json!(plan.external)),
            ("volumes".to_string(), json!(volumes)),
            ("skipped".to_string(), json!(plan.skipped)),
        ]);
        match w.finish("cluster-backup", extra).await {
            Ok(m) => tracing::info!(entries = m.entries.len(), revision, "backup written"),
            Err(e) => tracing::warn!(error = %e, "backup not finished"),
        }
    });
    resp.body(Body::from_stream(ReceiverStream::new(rx)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// What the archive is called in errors: the kind the user gave.
pub const BACKUP: &str = "backup archive";
pub const APP_EXPORT: &str = "app export archive";

fn broken(what: &str, e: ArchiveError) -> ApiError {
    ApiError::Invalid(format!("{what}: {e}"))
}

/// A volume stream being received on some host while its chunks are read from an archive.
pub struct Receiving {
    /// The volume's id in the archive.
    pub id: String,
    tx: mpsc::Sender<io::Result<Bytes>>,
    done: tokio::task::JoinHandle<Result<String, String>>,
}

impl Receiving {
    /// Starts receiving into volume `new_id` on the host at `target`, recorded as a data
    /// volume of `owner` (app, process type, mount path) when given.
    pub fn start(
        target: &str,
        secret: &str,
        id: &str,
        new_id: &str,
        owner: Option<(&str, &Volume)>,
    ) -> ApiResult<Receiving> {
        let mut url =
            reqwest::Url::parse(&format!("http://{target}/host/volumes/{new_id}/receive"))
                .map_err(|e| ApiError::Invalid(e.to_string()))?;
        if let Some((app, v)) = owner {
            url.query_pairs_mut().append_pair("app", app);
            if let (Some(t), Some(p)) = (&v.proc_type, &v.path) {
                url.query_pairs_mut()
                    .append_pair("proc_type", t)
                    .append_pair("path", p);
            }
        }
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let req = reqwest::Client::new()
            .put(url)
            .header(SECRET_HEADER, secret)
            .body(reqwest::Body::wrap_stream(ReceiverStream::new(rx)));
        let (target, vid) = (target.to_string(), new_id.to_string());
        let done = tokio::spawn(async move {
            let r = req.send().await.map_err(|e| e.to_string())?;
            let ok = r.status().is_success();
            let text = r.text().await.unwrap_or_default();
            if ok {
                Ok(format!("{vid} on {target}"))
            } else {
                Err(format!("{target} refused it: {text}"))
            }
        });
        Ok(Receiving {
            id: id.to_string(),
            tx,
            done,
        })
    }

    /// Sends the archive's current entry (one chunk of the stream); `what` names the archive.
    pub async fn feed<R: tokio::io::AsyncRead + Unpin>(
        &self,
        tar: &mut TarReader<R>,
        what: &str,
    ) -> ApiResult<()> {
        let tx = self.tx.clone();
        tar.for_each_chunk(|c| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(c)).await.map_err(|_| {
                    ArchiveError::Io(io::Error::other("the volume's host stopped reading"))
                })
            }
        })
        .await
        .map_err(|e| broken(what, e))?;
        Ok(())
    }

    /// Ends the stream and waits for the host to apply it.
    pub async fn finish(self) -> ApiResult<String> {
        drop(self.tx);
        self.done
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("volume {}: {e}", self.id)))
    }
}

/// Members whose volumes are on ZFS (a send stream can be received there).
pub async fn zfs_hosts(node: &crate::node::Node, secret: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, addr) in node.members() {
        let c = flynn_client::HostClient::new(
            &format!("http://{addr}"),
            Some(secret),
            std::time::Duration::from_secs(10),
        );
        if let Ok(v) = c.components().await {
            if v["volumes"]["provider"] == "zfs" {
                out.push(addr);
            }
        }
    }
    out
}

/// Stores the archive's current entry at blob `path` through the blobstore's checked
/// write: content whose SHA-512 is not `sha512` stores nothing.
pub async fn put_blob<R: tokio::io::AsyncRead + Unpin>(
    blobstore: &std::sync::Arc<crate::blobstore::Blobstore>,
    tar: &mut TarReader<R>,
    path: &str,
    sha512: &str,
    what: &str,
) -> ApiResult<()> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let (b, p, sha) = (blobstore.clone(), path.to_string(), sha512.to_string());
    let put = tokio::spawn(async move { b.put_checked(&p, ReceiverStream::new(rx), &sha).await });
    let fed = tar
        .for_each_chunk(|c| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(c)).await.map_err(|_| {
                    ArchiveError::Io(io::Error::other("the blobstore stopped reading"))
                })
            }
        })
        .await;
    drop(tx);
    let stored = put.await.map_err(|e| ApiError::Internal(e.to_string()))?;
    fed.map_err(|e| broken(what, e))?;
    stored.map_err(|e| ApiError::Internal(format!("blob {path}: {e}")))?;
    Ok(())
}

/// An archive arriving as a request body.
pub fn archive_body(body: Body) -> TarReader<impl tokio::io::AsyncRead + Unpin> {
    TarReader::new(tokio_util::io::StreamReader::new(
        body.into_data_stream().map_err(io::Error::other),
    ))
}

/// Reads the archive's first entry, which must be `first` (at most `limit` bytes, read
/// whole); `what` names the archive in errors, which say what was given instead.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    tar: &mut TarReader<R>,
    first: &str,
    limit: u64,
    what: &str,
) -> ApiResult<Vec<u8>> {
    match tar.next().await.map_err(|e| broken(what, e))? {
        Some((name, _)) if name == first => {}
        Some((name, _)) => {
            let hint = match name.as_str() {
                STATE_ENTRY => " (it is a cluster backup: restore it with `flynn-host bootstrap --from-backup`)",
                super::export::APP_ENTRY => " (it is an app export: import it with `flynn import`)",
                _ => "",
            };
            return Err(ApiError::Invalid(format!(
                "{what}: the first entry is {name}, not {first}{hint}"
            )));
        }
        None => return Err(ApiError::Invalid(format!("{what}: the archive is empty"))),
    }
    tar.read_all(limit).await.map_err(|e| broken(what, e))
}

/// Appends volume `id`'s full `zfs send` stream, asked of the host at `addr`, as chunk
/// entries `volumes/ID/NNNNNN`; the bytes written.
pub async fn write_volume(
    w: &mut TarWriter,
    addr: &str,
    secret: &str,
    id: &str,
) -> io::Result<u64> {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/host/volumes/{id}/export"))
        .header(SECRET_HEADER, secret)
        .send()
        .await
        .map_err(|e| io::Error::other(format!("volume {id} at {addr}: {e}")))?;
    if !r.status().is_success() {
        let body = r.text().await.unwrap_or_default();
        return Err(io::Error::other(format!("volume {id} at {addr}: {body}")));
    }
    w.chunked(
        &format!("volumes/{id}"),
        r.bytes_stream().map_err(io::Error::other),
    )
    .await
}

async fn restore(State(host): State<AppState>, body: Body) -> ApiResult<Json<serde_json::Value>> {
    let mut tar = archive_body(body);
    let result = restore_archive(&host, &mut tar).await;
    if result.is_err() {
        // The refusal reaches the client whole only once its upload was read: answered
        // early, it would see a broken pipe instead of the reason.
        tar.drain().await;
    }
    result
}

async fn restore_archive<R: tokio::io::AsyncRead + Unpin>(
    host: &AppState,
    tar: &mut TarReader<R>,
) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?.clone();
    node.read_barrier().await?;
    let blobstore = host.blobstore().cloned().ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore; restore through another".into())
    })?;
    if !node.state.read(|a| a.state.is_fresh()) {
        return Err(ApiError::Conflict(
            "a backup is restored only into a new cluster; this one has apps or releases already"
                .into(),
        ));
    }
    let head = read_head(tar, STATE_ENTRY, 256 * 1024 * 1024, BACKUP).await?;
    let backup: ClusterState = serde_json::from_slice(&head)
        .map_err(|e| ApiError::Invalid(format!("{BACKUP}: {STATE_ENTRY}: {e}")))?;

    // Volumes go to the hosts that can take a send stream, in turn.
    let secret = node.secret().to_string();
    let zfs_hosts = zfs_hosts(&node, &secret).await;
    let owners: BTreeMap<String, &Volume> = backup
        .volumes
        .volumes
        .values()
        .map(|v| (v.id.clone(), v))
        .collect();
    if !owners.is_empty() && zfs_hosts.is_empty() {
        return Err(ApiError::Invalid(format!(
            "the backup holds {} ZFS volume(s), and no host of this cluster runs ZFS volumes",
            owners.len()
        )));
    }

    let (mut blobs, mut blob_bytes, mut volumes) = (0u64, 0u64, Vec::new());
    let mut receiving: Option<Receiving> = None;
    while let Some((name, size)) = tar.next().await.map_err(|e| broken(BACKUP, e))? {
        let volume = name
            .strip_prefix("volumes/")
            .and_then(|r| r.split_once('/'))
            .map(|(id, _)| id.to_string());
        if receiving.as_ref().map(|r| Some(&r.id) != volume.as_ref()) == Some(true) {
            let r = receiving.take().expect("receiving");
            volumes.push(r.finish().await?);
        }
        if let Some(path) = name.strip_prefix("blobs") {
            let file =
                backup.blobs.blobs.get(path).ok_or_else(|| {
                    ApiError::Invalid(format!("{BACKUP}: {name} has no blob record"))
                })?;
            put_blob(&blobstore, tar, path, &file.sha512, BACKUP).await?;
            blobs += 1;
            blob_bytes += size;
        } else if let Some(id) = volume {
            if receiving.is_none() {
                // Owners come back with the state: their apps do not exist yet.
                let target = &zfs_hosts[volumes.len() % zfs_hosts.len()];
                receiving = Some(Receiving::start(target, &secret, &id, &id, None)?);
            }
            receiving
                .as_ref()
                .expect("receiving")
                .feed(tar, BACKUP)
                .await?;
        }
        // The manifest was checked whole by the sender; the entries were checked above.
    }
    if let Some(r) = receiving.take() {
        volumes.push(r.finish().await?);
    }
    node.propose(flynn_state::Command::RestoreBackup {
        state: Box::new(backup.clone()),
    })
    .await?;
    let apps: Vec<String> = backup
        .apps
        .values()
        .filter(|a| !a.system)
        .map(|a| a.name.clone())
        .collect();
    tracing::info!(blobs, volumes = volumes.len(), "backup restored");
    Ok(Json(json!({
        "apps": apps,
        "blobs": blobs,
        "blob_bytes": blob_bytes,
        "volumes": volumes,
        "domain": backup.cluster.domain,
    })))
}
