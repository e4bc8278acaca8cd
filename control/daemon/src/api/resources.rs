//! `/providers` and `/resources`: databases provisioned for apps (`flynn resource`), as
//! Flynn's controller served them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use flynn_client::{ProviderInfo, ProvisionRequest, ProvisionedResource};
use flynn_state::resources::{provider, Resource, PROVIDERS};

use super::{read, AppState, JsonBody, ReadOpts};
use crate::error::{ApiError, ApiResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/providers", get(providers))
        .route(
            "/providers/{provider}/resources",
            get(list_of_provider).post(add),
        )
        .route(
            "/providers/{provider}/resources/{id}",
            get(one_of_provider).delete(remove_of_provider),
        )
        .route("/resources", get(list_all))
        .route("/resources/{id}", get(one).delete(remove))
        .route("/apps/{app}/resources", get(list_of_app))
        .route("/apps/{app}/pg/backups", get(pg_backups).post(pg_capture))
        .route("/apps/{app}/pg/restore", axum::routing::post(pg_restore))
}

/// The app's Postgres resource.
fn pg_resource(host: &AppState, app: &str) -> ApiResult<Resource> {
    host.node()?.state.read(|a| {
        let s = &a.state;
        s.app(app)?;
        s.resources
            .of_app(app)
            .into_iter()
            .find(|r| r.provider == "postgres")
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{app} has no postgres resource (flynn -a {app} resource add postgres)"
                ))
            })
    })
}

/// `GET /apps/{app}/pg/backups`: the server's base backups (each covers every resource's
/// database on it) and how many WAL segments the archive holds.
async fn pg_backups(
    State(host): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    pg_resource(&host, &app)?;
    let node = host.node()?;
    node.read_barrier().await?;
    Ok(Json(node.state.read(|a| {
        let s = &a.state;
        let backups: Vec<_> = crate::databases::archive::backups(s)
            .into_iter()
            .map(|b| {
                serde_json::json!({
                    "path": b.path,
                    "bytes": b.size,
                    "taken_ms": crate::databases::archive::base_ms(&b.path),
                })
            })
            .collect();
        let segments = s
            .blobs
            .blobs
            .keys()
            .filter(|p| p.starts_with(crate::databases::archive::WAL_DIR))
            .count();
        serde_json::json!({"backups": backups, "wal_segments": segments})
    })))
}

/// `POST /apps/{app}/pg/backups`: a base backup of the server now.
async fn pg_capture(
    State(host): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    pg_resource(&host, &app)?;
    let b = crate::databases::archive::capture(&host).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "path": b.path,
            "bytes": b.size,
            "taken_ms": crate::databases::archive::base_ms(&b.path),
        })),
    ))
}

#[derive(serde::Deserialize)]
struct PgRestore {
    /// RFC 3339 (`2026-12-06T12:00:00Z`); none: the last archived commit.
    #[serde(default)]
    to: Option<String>,
}

/// `POST /apps/{app}/pg/restore`: the app's database as it was at `to`.
async fn pg_restore(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<PgRestore>,
) -> ApiResult<Json<serde_json::Value>> {
    let r = pg_resource(&host, &app)?;
    let to = match &req.to {
        None => None,
        Some(t) => {
            let ms = crate::databases::archive::parse_rfc3339_ms(t).ok_or_else(|| {
                ApiError::Invalid(format!(
                    "{t:?} is not a time in RFC 3339 form (2026-12-06T12:00:00Z, or with an offset: +01:00)"
                ))
            })?;
            if ms > crate::now_ms() {
                return Err(ApiError::Invalid(format!("{t} is in the future")));
            }
            // As Postgres's recovery_target_time reads it: a space for the T, +00 for Z.
            let mut pg = t.replacen(['T', 't'], " ", 1);
            if pg.ends_with(['Z', 'z']) {
                pg.pop();
                pg.push_str("+00");
            }
            Some((pg, ms))
        }
    };
    crate::databases::archive::restore(&host, &r, to.clone()).await?;
    Ok(Json(serde_json::json!({
        "app": app,
        "database": r.name,
        "to": req.to,
    })))
}

async fn providers(
    State(host): State<AppState>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<ProviderInfo>>> {
    let list = read(host.node()?, &opts, |s| {
        Ok(PROVIDERS
            .iter()
            .map(|p| ProviderInfo {
                name: p.name.into(),
                app: p.app.into(),
                resources: s
                    .resources
                    .resources
                    .values()
                    .filter(|r| r.provider == p.name)
                    .count(),
                servers: server_count(s, p),
                shape: s.resources.shapes.get(p.app).cloned(),
            })
            .collect())
    })
    .await?;
    Ok(Json(list))
}

/// How many servers the provider runs (Postgres and MariaDB: the formation's count).
fn server_count(s: &flynn_state::ClusterState, p: &flynn_state::resources::Provider) -> usize {
    s.jobs
        .formations
        .get(p.app)
        .map(|f| f.processes.values().map(|n| *n as usize).sum())
        .unwrap_or(0)
}

async fn list_filtered(
    host: &AppState,
    opts: &ReadOpts,
    keep: impl Fn(&Resource) -> bool,
) -> ApiResult<Vec<Resource>> {
    read(host.node()?, opts, |s| {
        let mut v: Vec<Resource> = s
            .resources
            .resources
            .values()
            .filter(|r| keep(r))
            .cloned()
            .collect();
        v.sort_by_key(|r| (r.created_ms, r.id.clone()));
        Ok(v)
    })
    .await
}

async fn list_all(
    State(host): State<AppState>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Resource>>> {
    Ok(Json(list_filtered(&host, &opts, |_| true).await?))
}

async fn list_of_provider(
    State(host): State<AppState>,
    Path(name): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Resource>>> {
    let p = provider(&name).map_err(ApiError::from)?;
    Ok(Json(
        list_filtered(&host, &opts, |r| r.provider == p.name).await?,
    ))
}

async fn list_of_app(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Resource>>> {
    read(host.node()?, &opts, |s| {
        s.app(&app).map(|_| ()).map_err(ApiError::from)
    })
    .await?;
    Ok(Json(list_filtered(&host, &opts, |r| r.app == app).await?))
}

async fn find(host: &AppState, opts: &ReadOpts, id: &str, of: Option<&str>) -> ApiResult<Resource> {
    let of = of.map(provider).transpose().map_err(ApiError::from)?;
    read(host.node()?, opts, |s| {
        s.resources
            .resources
            .get(id)
            .filter(|r| of.is_none_or(|p| p.name == r.provider))
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("resource {id:?}")))
    })
    .await
}

async fn one(
    State(host): State<AppState>,
    Path(id): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Resource>> {
    Ok(Json(find(&host, &opts, &id, None).await?))
}

async fn one_of_provider(
    State(host): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Resource>> {
    Ok(Json(find(&host, &opts, &id, Some(&name)).await?))
}

/// Provisions one for the app named (`{"app": APP}`, or Flynn's `{"apps": [APP]}`) and
/// answers it with its env and the release that env deployed.
async fn add(
    State(host): State<AppState>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ProvisionRequest>,
) -> ApiResult<(StatusCode, Json<ProvisionedResource>)> {
    let app = match (req.app, req.apps.as_slice()) {
        (Some(app), []) => app,
        (None, [app]) => app.clone(),
        _ => {
            return Err(ApiError::Invalid(
                "name the one app the resource is for: {\"app\": APP}".into(),
            ))
        }
    };
    let resource = crate::databases::provision(&host, &name, &app).await?;
    let release = host.node()?.state.read(|a| {
        a.state
            .jobs
            .current_release(&resource.app)
            .map(|r| r.id.clone())
    });
    Ok((
        StatusCode::CREATED,
        Json(ProvisionedResource { resource, release }),
    ))
}

async fn remove(State(host): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Resource>> {
    Ok(Json(crate::databases::remove(&host, None, &id).await?))
}

async fn remove_of_provider(
    State(host): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Resource>> {
    Ok(Json(
        crate::databases::remove(&host, Some(&name), &id).await?,
    ))
}
