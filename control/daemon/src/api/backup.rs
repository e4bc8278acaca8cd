//! Cluster backup and restore, as archives ([`crate::archive`]) streamed over HTTP.
//!
//! - `GET /backup` (controller key): `state.json` (the whole cluster state at one
//!   revision: apps, env, releases, formations, routes, certificates, keys, blob
//!   metadata), `blobs/PATH` (the bytes of every file on the embedded or a Postgres
//!   backend), `volumes/ID/NNNNNN` (each ZFS volume's full `zfs send` stream, in chunks),
//!   `databases/ID/NNNNNN` (each database resource's dump, in place of its servers'
//!   volumes), then `MANIFEST.json`. Files on S3, GCS or Azure are referenced, not copied: their
//!   records are in the state and the manifest lists them.
//! - `PUT /host/restore` (cluster secret; `flynn-host bootstrap --from-backup` sends it
//!   after checking the archive whole): into a new cluster only. Blob bytes go through the
//!   blobstore's checked write, volumes to ZFS hosts in turn, and last the state, merged
//!   with the new cluster's hosts in one command ([`flynn_state::Command::RestoreBackup`]).
//!   The database servers then start afresh; each resource's database and user are made
//!   again with the credentials its app's env holds, and its dump restored into them.

use std::collections::BTreeMap;
use std::io;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use flynn_state::volumes::Volume;
use flynn_state::ClusterState;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use crate::archive::{TarReader, TarWriter};
use crate::databases::dumps;
use crate::error::{ApiError, ApiResult};
use crate::ops::{
    archive_body, broken, put_blob, read_head, write_volume, zfs_hosts, Plan, Receiving, BACKUP,
    STATE_ENTRY,
};

pub fn controller_routes() -> Router<AppState> {
    Router::new().route("/backup", get(backup))
}

pub fn secret_routes() -> Router<AppState> {
    Router::new().route(
        "/host/restore",
        put(restore).layer(axum::extract::DefaultBodyLimit::disable()),
    )
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
        .header("x-flynn-backup-volumes", plan.volumes.len())
        .header("x-flynn-backup-databases", plan.databases.len());
    if !plan.skipped.is_empty() {
        resp = resp.header("x-flynn-backup-skipped", plan.skipped.len());
    }
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let secret = node.secret().to_string();
    let domain = state.cluster.domain.clone();
    let revision = state.revision;
    let host = host.clone();
    tokio::spawn(async move {
        let mut w = TarWriter::new(tx);
        let mut volumes = Vec::new();
        let mut databases = Vec::new();
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
            for r in &plan.databases {
                let dump = dumps::dump(&host, r)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let bytes = w.chunked(&dumps::entry_prefix(&r.id), dump).await?;
                databases.push(
                    json!({"id": r.id, "provider": r.provider, "app": r.app, "bytes": bytes}),
                );
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
            ("databases".to_string(), json!(databases)),
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
        // The volumes the backup carries (database servers' are carried as dumps).
        .filter(|v| {
            v.provider == "zfs"
                && !v
                    .app
                    .as_deref()
                    .is_some_and(|a| flynn_state::resources::serves_databases(&backup, a))
        })
        .map(|v| (v.id.clone(), v))
        .collect();
    if !owners.is_empty() && zfs_hosts.is_empty() {
        return Err(ApiError::Invalid(format!(
            "the backup holds {} ZFS volume(s), and no host of this cluster runs ZFS volumes",
            owners.len()
        )));
    }

    let mut dumps_in = crate::ops::DumpSpool::new(host)?;
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
        } else if let Some(rid) = dumps::entry_resource(&name) {
            if !backup.resources.resources.contains_key(rid) {
                return Err(ApiError::Invalid(format!(
                    "{BACKUP}: {name} is the dump of no resource in {STATE_ENTRY}"
                )));
            }
            dumps_in.take(tar, rid, BACKUP).await?;
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
    // The databases last: their servers start with the restored state.
    let mut databases = Vec::new();
    for r in backup.resources.resources.values() {
        let outcome = match dumps_in.get(&r.id) {
            None => Err(ApiError::Invalid("the backup holds no dump of it".into())),
            Some(dump) => crate::databases::reseed(host, r, dump).await,
        };
        if let Err(e) = &outcome {
            tracing::warn!(id = %r.id, provider = %r.provider, app = %r.app, error = %e, "a database was not restored");
        }
        databases.push(json!({
            "id": r.id,
            "provider": r.provider,
            "app": r.app,
            "restored": outcome.is_ok(),
            "error": outcome.err().map(|e| e.to_string()),
        }));
    }
    Ok(Json(json!({
        "apps": apps,
        "blobs": blobs,
        "blob_bytes": blob_bytes,
        "volumes": volumes,
        "databases": databases,
        "domain": backup.cluster.domain,
    })))
}
