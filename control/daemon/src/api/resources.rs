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
