//! `/apps/{app}/routes` and `/certificates`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use flynn_client::RouteRequest;
use flynn_state::{Certificate, NewCertificate, Route, RoutesCommand};

use super::{deleted, read, AppState, JsonBody, ReadOpts};
use crate::error::ApiResult;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/apps/{app}/routes", get(list).post(add))
        .route("/apps/{app}/routes/{id}", delete(remove))
        .route("/certificates", get(list_certs).post(add_cert))
        .route("/certificates/{id}", delete(remove_cert))
}

async fn list(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Route>>> {
    let routes = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        Ok(s.routes
            .routes
            .values()
            .filter(|r| r.app() == app)
            .cloned()
            .collect())
    })
    .await?;
    Ok(Json(routes))
}

async fn add(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(route): JsonBody<RouteRequest>,
) -> ApiResult<(StatusCode, Json<Route>)> {
    let route: Route = host
        .node()?
        .propose_as(RoutesCommand::AddRoute { app, route })
        .await?;
    Ok((StatusCode::CREATED, Json(route)))
}

async fn remove(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    host.node()?
        .propose(RoutesCommand::RemoveRoute { app, id })
        .await?;
    Ok(deleted())
}

async fn list_certs(
    State(host): State<AppState>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Certificate>>> {
    let certs = read(host.node()?, &opts, |s| {
        Ok(s.routes.certificates.values().cloned().collect())
    })
    .await?;
    Ok(Json(certs))
}

async fn add_cert(
    State(host): State<AppState>,
    JsonBody(certificate): JsonBody<NewCertificate>,
) -> ApiResult<(StatusCode, Json<Certificate>)> {
    flynn_state::validate::certificate(&certificate)?;
    let certificate: Certificate = host
        .node()?
        .propose_as(RoutesCommand::AddCertificate { certificate })
        .await?;
    Ok((StatusCode::CREATED, Json(certificate)))
}

async fn remove_cert(
    State(host): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    host.node()?
        .propose(RoutesCommand::RemoveCertificate { id })
        .await?;
    Ok(deleted())
}
