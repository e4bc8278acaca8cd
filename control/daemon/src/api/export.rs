//! App export and import (`flynn -a APP export`, `flynn import`), as archives
//! ([`crate::archive`]): `app.json` (the app with its env, current release, formation,
//! routes and their certificates, volumes, databases), `blobs/layers/SHA` (the release's
//! image layers, whatever backend holds them, so the export carries to any cluster),
//! `volumes/ID/NNNNNN` (the app's ZFS volumes as `zfs send` streams),
//! `databases/ID/NNNNNN` (a dump of each of its databases), then `MANIFEST.json`.
//!
//! An import is refused before anything is written when the name is taken. It creates the
//! app (which routes `NAME.$CLUSTER_DOMAIN`), stores the layers through the blobstore's
//! checked write, receives the volumes, then deploys the release, provisions new databases
//! and restores the dumps into them, scales the formation and, with `routes=true`, adds the
//! exported routes. If any step fails the databases and the app are deleted again, so a
//! failed import leaves nothing behind.

use std::collections::BTreeMap;
use std::io;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use flynn_state::jobs::JobsCommand;
use flynn_state::routes::RoutesCommand;
use flynn_state::volumes::Volume;
use flynn_state::{
    App, AppsCommand, Certificate, NewCertificate, NewRelease, Release, Route, RouteSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use crate::archive::{ArchiveError, TarReader, TarWriter};
use crate::databases::dumps;
use crate::error::{ApiError, ApiResult};
use crate::ops::{APP_ENTRY, APP_EXPORT};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/apps/{app}/export", get(export))
        .route(
            "/apps/import",
            put(import).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

/// `app.json`: everything about the app except bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppExport {
    pub app: App,
    #[serde(default)]
    pub release: Option<Release>,
    #[serde(default)]
    pub formation: BTreeMap<String, u32>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// SHA-512 of the app's git repository as a bundle (entry [`REPOSITORY_ENTRY`]), when
    /// it has one (its last deployed push's copy in the blobstore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The app's databases (`flynn resource`), each with its dump as entries
    /// `databases/ID/NNNNNN`. An import provisions new ones and restores the dumps.
    #[serde(default)]
    pub resources: Vec<flynn_state::resources::Resource>,
}

/// The archive entry holding the app's git repository, as `git bundle` wrote it.
const REPOSITORY_ENTRY: &str = "git/repository.bundle";

async fn export(State(host): State<AppState>, Path(app): Path<String>) -> ApiResult<Response> {
    let node = host.node()?.clone();
    node.read_barrier().await?;
    let (export, layers, repository) = node.state.read(|a| {
        let s = &a.state;
        let app = s.app(&app)?.clone();
        if app.system {
            return Err(flynn_state::StateError::Invalid(format!(
                "{:?} is a system app: it is part of every cluster, and is backed up with it",
                app.name
            )));
        }
        let release = s.jobs.current_release(&app.name).cloned();
        let formation = s
            .jobs
            .formations
            .get(&app.name)
            .map(|f| f.processes.clone())
            .unwrap_or_default();
        let routes: Vec<Route> = s
            .routes
            .routes
            .values()
            .filter(|r| r.app() == app.name)
            .cloned()
            .collect();
        let certificates = routes
            .iter()
            .filter_map(|r| match r {
                Route::Http(h) => h.certificate.as_ref(),
                Route::Tcp(_) => None,
            })
            .filter_map(|id| s.routes.certificates.get(id).cloned())
            .collect();
        let volumes: Vec<Volume> = s
            .volumes
            .volumes
            .values()
            .filter(|v| v.app.as_deref() == Some(app.name.as_str()) && v.provider == "zfs")
            .cloned()
            .collect();
        let repository = s
            .git
            .repos
            .get(&app.name)
            .filter(|r| r.app_revision == app.created_revision)
            .and_then(|r| {
                s.blobs
                    .blobs
                    .get(&crate::git::bundle_path(&r.dir_name()))
                    .cloned()
            });
        let layers: Vec<flynn_state::blobs::BlobFile> = release
            .iter()
            .flat_map(|r| r.image.layers.iter())
            .filter_map(|l| {
                s.blobs
                    .blobs
                    .get(&flynn_state::layer_path(&l.sha512))
                    .cloned()
            })
            .collect();
        let resources = s.resources.of_app(&app.name).into_iter().cloned().collect();
        Ok((
            AppExport {
                app,
                release,
                formation,
                routes,
                certificates,
                volumes,
                repository: repository.as_ref().map(|f| f.sha512.clone()),
                resources,
            },
            layers,
            repository,
        ))
    })?;
    let hosts: BTreeMap<u64, String> = node.members().into_iter().collect();
    if let Some(r) = &export.release {
        if layers.len() != r.image.layers.len() {
            return Err(ApiError::Unavailable(format!(
                "release {} has layers the blobstore does not hold; it cannot be exported",
                r.id
            )));
        }
    }
    let blobstore = host.blobstore().cloned().ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore; export through another".into())
    })?;
    let app_json = Bytes::from(
        serde_json::to_vec_pretty(&export).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    let secret = node.secret().to_string();
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let name = export.app.name.clone();
    tokio::spawn(async move {
        let mut w = TarWriter::new(tx);
        let written: io::Result<()> = async {
            w.bytes(APP_ENTRY, app_json).await?;
            for f in &layers {
                let content = blobstore
                    .open(f, None)
                    .await
                    .map_err(|e| io::Error::other(format!("layer {}: {e}", f.path)))?;
                w.stream(&format!("blobs{}", f.path), f.size, content)
                    .await?;
            }
            if let Some(f) = &repository {
                let content = blobstore
                    .open(f, None)
                    .await
                    .map_err(|e| io::Error::other(format!("the git repository: {e}")))?;
                w.stream(REPOSITORY_ENTRY, f.size, content).await?;
            }
            for v in &export.volumes {
                let addr = hosts.get(&v.host).ok_or_else(|| {
                    io::Error::other(format!("volume {}: its host left the cluster", v.id))
                })?;
                crate::ops::write_volume(&mut w, addr, &secret, &v.id).await?;
            }
            for r in &export.resources {
                let dump = dumps::dump(&host, r)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                w.chunked(&dumps::entry_prefix(&r.id), dump).await?;
            }
            Ok(())
        }
        .await;
        match written {
            Ok(()) => {
                let extra = BTreeMap::from([("app".to_string(), json!(name))]);
                if let Err(e) = w.finish("app-export", extra).await {
                    tracing::warn!(error = %e, "export not finished");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, app = %name, "export failed");
                w.fail(e.to_string()).await;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[derive(Deserialize, Default)]
struct ImportOpts {
    name: Option<String>,
    #[serde(default)]
    routes: bool,
}

fn broken(e: ArchiveError) -> ApiError {
    ApiError::Invalid(format!("{APP_EXPORT}: {e}"))
}

/// A name an imported app may take: valid, and no app's yet.
async fn check_new_app_name(node: &crate::node::Node, name: &str) -> ApiResult<()> {
    flynn_state::validate::app_name(name)?;
    node.read_barrier().await?;
    if node.state.read(|a| a.state.apps.contains_key(name)) {
        return Err(ApiError::Conflict(format!(
            "an app named {name:?} exists; import under another name with --name"
        )));
    }
    Ok(())
}

/// A route of the exported app as a request to add it to `app`: the service moves with the
/// app's name when it was the app's own (`OLD-web` → `NEW-web`).
fn route_spec(r: &Route, old: &str, new: &str, certs: &BTreeMap<String, String>) -> RouteSpec {
    let service = |s: &str| match s.strip_prefix(&format!("{old}-")) {
        Some(rest) => format!("{new}-{rest}"),
        None => s.to_string(),
    };
    match r {
        Route::Http(h) => RouteSpec::Http {
            domain: h.domain.clone(),
            path: Some(h.path.clone()),
            service: Some(service(&h.service)),
            sticky: h.sticky,
            leader: h.leader,
            disable_keepalive: !h.backend_keepalive,
            no_drain_backends: !h.drain_backends,
            certificate: h.certificate.as_ref().and_then(|c| certs.get(c).cloned()),
            https_redirect: h.https_redirect,
            response_timeout_ms: h.response_timeout_ms,
        },
        Route::Tcp(t) => RouteSpec::Tcp {
            port: Some(t.port),
            service: Some(service(&t.service)),
            leader: t.leader,
        },
    }
}

async fn import(
    State(host): State<AppState>,
    Query(opts): Query<ImportOpts>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let mut tar = crate::ops::archive_body(body);
    let result = import_archive(&host, &opts, &mut tar).await;
    if result.is_err() {
        // The refusal reaches the client whole only once its upload was read: answered
        // early, it would see a broken pipe instead of the reason.
        tar.drain().await;
    }
    result
}

async fn import_archive<R: tokio::io::AsyncRead + Unpin>(
    host: &AppState,
    opts: &ImportOpts,
    tar: &mut TarReader<R>,
) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?.clone();
    let blobstore = host.blobstore().cloned().ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore; import through another".into())
    })?;
    // A name given is checked before a byte of the upload is read.
    if let Some(name) = &opts.name {
        check_new_app_name(&node, name).await?;
    }
    let head = crate::ops::read_head(tar, APP_ENTRY, 64 * 1024 * 1024, APP_EXPORT).await?;
    let export: AppExport = serde_json::from_slice(&head)
        .map_err(|e| ApiError::Invalid(format!("{APP_EXPORT}: {APP_ENTRY}: {e}")))?;
    let old = export.app.name.clone();
    let name = opts.name.clone().unwrap_or_else(|| old.clone());
    check_new_app_name(&node, &name).await?;
    node.propose(AppsCommand::CreateApp { name: name.clone() })
        .await?;
    let mut received: Vec<(String, String)> = Vec::new();
    let outcome = import_into(
        host,
        &blobstore,
        tar,
        &export,
        &name,
        opts.routes,
        &mut received,
    )
    .await;
    match outcome {
        Ok(v) => Ok(Json(v)),
        Err(e) => {
            // Leave nothing half-imported behind: the databases provisioned, then the app.
            let resources: Vec<String> = node.state.read(|a| {
                a.state
                    .resources
                    .of_app(&name)
                    .iter()
                    .map(|r| r.id.clone())
                    .collect()
            });
            for id in resources {
                if let Err(undo) = crate::databases::remove(host, None, &id).await {
                    tracing::warn!(%id, error = %undo, "a failed import's resource was not removed");
                }
            }
            let _ = node
                .propose(AppsCommand::DeleteApp { name: name.clone() })
                .await;
            let secret = node.secret().to_string();
            for (addr, id) in received {
                let _ = crate::ops::peer(&addr, &secret)
                    .delete_volume(&id, false)
                    .await;
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn import_into<R: tokio::io::AsyncRead + Unpin>(
    host: &AppState,
    blobstore: &std::sync::Arc<crate::blobstore::Blobstore>,
    tar: &mut TarReader<R>,
    export: &AppExport,
    name: &str,
    with_routes: bool,
    received: &mut Vec<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let layers: BTreeMap<String, String> = export
        .release
        .iter()
        .flat_map(|r| r.image.layers.iter())
        .map(|l| (flynn_state::layer_path(&l.sha512), l.sha512.clone()))
        .collect();
    let node = host.node()?;
    let secret = node.secret().to_string();
    let zfs_hosts = crate::ops::zfs_hosts(node, &secret).await;
    // Dumps wait on disk until their new databases exist (after the release).
    let mut dumps_in = crate::ops::DumpSpool::new(host)?;
    let mut volume_ids: BTreeMap<String, String> = BTreeMap::new();
    let mut receiving: Option<crate::ops::Receiving> = None;
    while let Some((entry, _)) = tar.next().await.map_err(broken)? {
        let volume = entry
            .strip_prefix("volumes/")
            .and_then(|r| r.split_once('/'))
            .map(|(id, _)| id.to_string());
        if receiving.as_ref().map(|r| Some(&r.id) != volume.as_ref()) == Some(true) {
            receiving.take().expect("receiving").finish().await?;
        }
        if entry == REPOSITORY_ENTRY {
            let sha = export.repository.as_deref().ok_or_else(|| {
                ApiError::Invalid(format!("{APP_EXPORT}: {entry} is not named in {APP_ENTRY}"))
            })?;
            // Kept as the new app's repository copy; its first git request restores it.
            let created = node
                .state
                .read(|a| a.state.app(name).map(|a| a.created_revision))?;
            let repo = flynn_state::git::Repo::new(name, created, 0);
            let path = crate::git::bundle_path(&repo.dir_name());
            crate::ops::put_blob(blobstore, tar, &path, sha, APP_EXPORT).await?;
            node.propose(flynn_state::GitCommand::Claim {
                app: name.to_string(),
                host: 0,
            })
            .await?;
        } else if let Some(rid) = dumps::entry_resource(&entry) {
            if !export.resources.iter().any(|r| r.id == rid) {
                return Err(ApiError::Invalid(format!(
                    "{APP_EXPORT}: {entry} is the dump of no resource named in {APP_ENTRY}"
                )));
            }
            dumps_in.take(tar, rid, APP_EXPORT).await?;
        } else if let Some(path) = entry.strip_prefix("blobs") {
            let sha = layers.get(path).ok_or_else(|| {
                ApiError::Invalid(format!("{APP_EXPORT}: {entry} is no layer of its release"))
            })?;
            crate::ops::put_blob(blobstore, tar, path, sha, APP_EXPORT).await?;
        } else if let Some(old_id) = volume {
            if receiving.is_none() {
                if zfs_hosts.is_empty() {
                    return Err(ApiError::Invalid(
                        "the export holds ZFS volumes, and no host of this cluster runs ZFS volumes"
                            .into(),
                    ));
                }
                // A new id: the exported volume may still exist in this very cluster.
                let id = crate::bootstrap::random_hex(8);
                let target = zfs_hosts[volume_ids.len() % zfs_hosts.len()].clone();
                received.push((target.clone(), id.clone()));
                volume_ids.insert(old_id.clone(), id.clone());
                let exported = export.volumes.iter().find(|v| v.id == old_id);
                receiving = Some(crate::ops::Receiving::start(
                    &target,
                    &secret,
                    &old_id,
                    &id,
                    exported.map(|v| (name, v)),
                )?);
            }
            receiving
                .as_ref()
                .expect("receiving")
                .feed(tar, APP_EXPORT)
                .await?;
        }
    }
    if let Some(r) = receiving.take() {
        r.finish().await?;
    }

    // The app's config, then its release, databases, formation and routes. The env the
    // exported databases set is left out: the new databases set their own.
    let env = &export.app.env;
    let mut global = env.global.clone();
    for r in &export.resources {
        global.retain(|k, v| r.env.get(k) != Some(v));
    }
    if !global.is_empty() {
        node.propose(AppsCommand::UpdateEnv {
            app: name.into(),
            proc_type: None,
            set: global,
            unset: Vec::new(),
            now_ms: crate::now_ms(),
        })
        .await?;
    }
    for (t, vars) in &env.types {
        node.propose(AppsCommand::UpdateEnv {
            app: name.into(),
            proc_type: Some(t.clone()),
            set: vars.clone(),
            unset: Vec::new(),
            now_ms: crate::now_ms(),
        })
        .await?;
    }
    let mut release_id = None;
    if let Some(r) = &export.release {
        let created = node
            .propose(JobsCommand::CreateRelease {
                app: name.into(),
                release: NewRelease {
                    image: r.image.clone(),
                    processes: Some(r.processes.clone()),
                },
                now_ms: crate::now_ms(),
            })
            .await?;
        if let flynn_state::Response::Release { release } = created {
            release_id = Some(release.id);
        }
    }
    let mut databases = Vec::new();
    for old in &export.resources {
        let dump = dumps_in.get(&old.id).ok_or_else(|| {
            ApiError::Invalid(format!(
                "{APP_EXPORT}: resource {} has no dump (entries {}/...)",
                old.id,
                dumps::entry_prefix(&old.id)
            ))
        })?;
        let new = crate::databases::provision(host, &old.provider, name).await?;
        dumps::restore(host, &new, dump).await?;
        databases.push(json!({"provider": new.provider, "id": new.id, "from": old.id}));
    }
    if export.release.is_some() {
        // Provisioning deployed the databases' env as a release of its own.
        release_id = node
            .state
            .read(|a| a.state.jobs.current_release(name).map(|r| r.id.clone()))
            .or(release_id);
        if export.formation.values().any(|n| *n > 0) {
            node.propose(JobsCommand::Scale {
                app: name.into(),
                processes: export
                    .formation
                    .iter()
                    .map(|(k, v)| (k.clone(), i64::from(*v)))
                    .collect(),
            })
            .await?;
        }
    }
    if with_routes {
        let mut certs = BTreeMap::new();
        for c in &export.certificates {
            let added = node
                .propose(RoutesCommand::AddCertificate {
                    certificate: NewCertificate {
                        domains: c.domains.clone(),
                        cert_pem: c.cert_pem.clone(),
                        key_pem: c.key_pem.clone(),
                    },
                })
                .await?;
            if let flynn_state::Response::Certificate { certificate } = added {
                certs.insert(c.id.clone(), certificate.id);
            }
        }
        for r in &export.routes {
            // Importing under the same name, `NAME.$CLUSTER_DOMAIN` is there already.
            let exists = node.state.read(|a| {
                a.state.routes.routes.values().any(|have| match (have, r) {
                    (Route::Http(x), Route::Http(y)) => {
                        x.app == name && x.domain == y.domain && x.path == y.path
                    }
                    _ => false,
                })
            });
            if exists {
                continue;
            }
            let spec = route_spec(r, &export.app.name, name, &certs);
            node.propose(RoutesCommand::AddRoute {
                app: name.into(),
                route: spec,
            })
            .await?;
        }
    }
    let routes: Vec<String> = node.state.read(|a| {
        a.state
            .routes
            .routes
            .values()
            .filter(|r| r.app() == name)
            .map(|r| match r {
                Route::Http(h) => {
                    format!("{}{}", h.domain, if h.path == "/" { "" } else { &h.path })
                }
                Route::Tcp(t) => format!("tcp:{}", t.port),
            })
            .collect()
    });
    Ok(json!({
        "app": name,
        "release": release_id,
        "routes": routes,
        "volumes": volume_ids,
        "databases": databases,
    }))
}
