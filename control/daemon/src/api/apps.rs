//! `/apps`: apps and their env.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use flynn_client::{CreateApp, EnvUpdate};
use flynn_state::{App, AppsCommand};

use super::{deleted, read, AppState, JsonBody, ReadOpts};
use crate::error::{ApiError, ApiResult};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/apps", get(list).post(create))
        .route("/apps/{app}", get(show).delete(delete))
        .route("/apps/{app}/env", get(env).post(update_env))
}

async fn list(
    State(host): State<AppState>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<App>>> {
    let apps = read(host.node()?, &opts, |s| {
        Ok(s.apps.values().cloned().collect())
    })
    .await?;
    Ok(Json(apps))
}

async fn show(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<App>> {
    let app = read(host.node()?, &opts, |s| Ok(s.app(&app)?.clone())).await?;
    Ok(Json(app))
}

async fn create(
    State(host): State<AppState>,
    JsonBody(req): JsonBody<CreateApp>,
) -> ApiResult<(StatusCode, Json<App>)> {
    flynn_state::validate::app_name(&req.name)?;
    let app: App = host
        .node()?
        .propose_as(AppsCommand::CreateApp { name: req.name })
        .await?;
    Ok((StatusCode::CREATED, Json(app)))
}

async fn delete(
    State(host): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    host.node()?
        .propose(AppsCommand::DeleteApp { name: app.clone() })
        .await?;
    // The app's build cache goes with it: a new app of the same name starts clean.
    if let Some(blobstore) = host.blobstore() {
        let cache = crate::jobs::build::cache_path(&app);
        if blobstore.file(&cache).is_some() {
            if let Err(e) = blobstore.delete_path(&cache).await {
                tracing::warn!(app, error = %e, "the deleted app's build cache was not removed");
            }
        }
    }
    Ok(deleted())
}

async fn env(
    State(host): State<AppState>,
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
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<EnvUpdate>,
) -> ApiResult<Json<App>> {
    let blobstore = app == "blobstore";
    if blobstore && req.proc_type.is_none() {
        // Credentials, buckets and servers are checked against the backends themselves
        // before anything is committed.
        let before = read(host.node()?, &ReadOpts::default(), |s| {
            Ok(s.apps
                .get("blobstore")
                .map(|a| a.env.clone())
                .unwrap_or_default())
        })
        .await?;
        let mut after = before.clone();
        flynn_state::apps::apply_env(&mut after, None, &req.set, &req.unset);
        let probed = crate::blobstore::backends::probe_changes(&before.global, &after.global).await;
        if let Err(e) = probed {
            tracing::warn!(target: "flynn_daemon::blobstore", "configuration refused: {e}");
            return Err(e);
        }
    }
    let updated = host
        .node()?
        .propose_as::<App>(AppsCommand::UpdateEnv {
            app,
            proc_type: req.proc_type,
            set: req.set,
            unset: req.unset,
            now_ms: crate::now_ms(),
        })
        .await;
    if let (true, Err(ApiError::Invalid(why))) = (blobstore, &updated) {
        // The operator sees it from `env set`; the blobstore's log says it too.
        tracing::warn!(target: "flynn_daemon::blobstore", "configuration refused: {why}");
    }
    Ok(Json(updated?))
}
