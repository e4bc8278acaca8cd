//! `/services`: discovery: instances register with a TTL, heartbeat and deregister.

use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flynn_client::InstanceRegistration;
use flynn_state::{DiscoveryCommand, Instance};

use super::{deleted, read, AppState, JsonBody, ReadOpts};
use crate::error::{ApiError, ApiResult};
use crate::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/services/{service}", get(show))
        .route(
            "/services/{service}/instances/{id}",
            put(register).delete(deregister),
        )
        .route(
            "/services/{service}/instances/{id}/heartbeat",
            post(heartbeat),
        )
}

async fn show(
    State(host): State<AppState>,
    Path(service): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<serde_json::Value>> {
    let svc = read(host.node()?, &opts, |s| {
        s.discovery
            .services
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

async fn register(
    State(host): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    JsonBody(reg): JsonBody<InstanceRegistration>,
) -> ApiResult<Json<Instance>> {
    flynn_state::validate::service_name(&service)?;
    flynn_state::validate::instance(&id, &reg.addr, reg.ttl_ms)?;
    let instance: Instance = host
        .node()?
        .propose_as(DiscoveryCommand::RegisterInstance {
            service,
            id,
            addr: reg.addr,
            meta: reg.meta,
            ttl_ms: reg.ttl_ms,
            now_ms: now_ms(),
        })
        .await?;
    Ok(Json(instance))
}

async fn heartbeat(
    State(host): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> ApiResult<Json<Instance>> {
    let instance: Instance = host
        .node()?
        .propose_as(DiscoveryCommand::Heartbeat {
            service,
            id,
            now_ms: now_ms(),
        })
        .await?;
    Ok(Json(instance))
}

async fn deregister(
    State(host): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    host.node()?
        .propose(DiscoveryCommand::Deregister { service, id })
        .await?;
    Ok(deleted())
}
