//! Attaching to a one-off job (`flynn run`): its stdin uploaded, its output streamed, its
//! terminal resized. Asked of any host, each goes to the host that runs the job (the
//! cluster secret between hosts), which serves it from the job's attachment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::jobs::oneoff::OneOffIo;

pub fn controller_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/apps/{app}/jobs/{id}/stdin",
            axum::routing::put(job_stdin).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/apps/{app}/jobs/{id}/output", get(job_output))
        .route("/apps/{app}/jobs/{id}/resize", post(job_resize))
}

pub fn secret_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/host/jobs/{id}/stdin",
            axum::routing::put(host_stdin).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/host/jobs/{id}/output", get(host_output))
        .route("/host/jobs/{id}/resize", post(host_resize))
}

/// Where a job runs: `None` for this host, else the host API address of its host.
async fn job_host(host: &AppState, app: &str, id: &str) -> ApiResult<Option<String>> {
    let node = host.node()?;
    // The job may have been placed through the leader a moment ago.
    node.read_barrier().await?;
    let on = node.state.read(|a| {
        a.state
            .jobs
            .jobs
            .get(id)
            .filter(|j| j.app == app)
            .map(|j| j.host)
    });
    let on = on.ok_or_else(|| ApiError::NotFound(format!("job {id:?} of app {app:?}")))?;
    if on == host.id {
        return Ok(None);
    }
    let m = node.metrics();
    let addr = m
        .membership_config
        .membership()
        .get_node(&on)
        .map(|n| n.addr.clone())
        .ok_or_else(|| ApiError::Unavailable(format!("job {id:?}'s host is not a member")))?;
    Ok(Some(addr))
}

/// A client for another host's streamed answers (a job's output): no overall timeout, a
/// connection that is refused or unanswered fails within `connect`.
pub(crate) fn streaming_client(connect: Duration) -> ApiResult<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .build()
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Forwards a streamed request to the job's host's API and streams its answer back.
async fn forward(
    host: &AppState,
    method: reqwest::Method,
    addr: &str,
    path: &str,
    body: Option<Body>,
) -> ApiResult<axum::response::Response> {
    let secret = host.node()?.secret().to_string();
    let mut rb = streaming_client(Duration::from_secs(2))?
        .request(method, format!("http://{addr}{path}"))
        .header(flynn_client::SECRET_HEADER, secret);
    if let Some(b) = body {
        rb = rb.body(reqwest::Body::wrap_stream(b.into_data_stream()));
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("the job's host {addr}: {e}")))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = Body::from_stream(resp.bytes_stream());
    Ok((status, [("content-type", "application/x-ndjson")], body).into_response())
}

async fn job_stdin(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Body,
) -> ApiResult<axum::response::Response> {
    match job_host(&host, &app, &id).await? {
        None => local_stdin(&host, &id, body).await,
        Some(addr) => {
            let path = format!("/host/jobs/{id}/stdin");
            forward(&host, reqwest::Method::PUT, &addr, &path, Some(body)).await
        }
    }
}

async fn job_output(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<axum::response::Response> {
    match job_host(&host, &app, &id).await? {
        None => local_output(&host, &id).await,
        Some(addr) => {
            let path = format!("/host/jobs/{id}/output");
            forward(&host, reqwest::Method::GET, &addr, &path, None).await
        }
    }
}

/// `POST /apps/{app}/jobs/{id}/resize`: the window size of a one-off job's terminal.
async fn job_resize(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: bytes::Bytes,
) -> ApiResult<axum::response::Response> {
    match job_host(&host, &app, &id).await? {
        None => local_resize(&host, &id, &body).await,
        Some(addr) => {
            let path = format!("/host/jobs/{id}/resize");
            forward(
                &host,
                reqwest::Method::POST,
                &addr,
                &path,
                Some(body.into()),
            )
            .await
        }
    }
}

async fn host_resize(
    State(host): State<AppState>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> ApiResult<axum::response::Response> {
    local_resize(&host, &id, &body).await
}

async fn local_resize(
    host: &AppState,
    id: &str,
    body: &[u8],
) -> ApiResult<axum::response::Response> {
    let size: flynn_state::TtySize = serde_json::from_slice(body).map_err(|e| {
        ApiError::Invalid(format!(
            "not a terminal size ({{\"cols\": N, \"rows\": N}}): {e}"
        ))
    })?;
    if size.cols == 0 || size.rows == 0 {
        return Err(ApiError::Invalid(
            "a terminal has at least one row and column".into(),
        ));
    }
    let io = attachment(host, id).await?;
    io.resize(size).map_err(ApiError::Conflict)?;
    Ok(Json(serde_json::json!({"cols": size.cols, "rows": size.rows})).into_response())
}

/// A one-off job's I/O on this host, waiting briefly for a job just placed to start.
async fn attachment(host: &AppState, id: &str) -> ApiResult<Arc<OneOffIo>> {
    let runner = host
        .jobs()
        .ok_or_else(|| ApiError::NotFound("this host runs no jobs".into()))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(io) = runner.attachments.get(id) {
            return Ok(io);
        }
        if Instant::now() > deadline {
            return Err(ApiError::NotFound(format!(
                "job {id:?} is not a one-off job running on this host"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn local_stdin(host: &AppState, id: &str, body: Body) -> ApiResult<axum::response::Response> {
    use futures::StreamExt;
    let io = attachment(host, id).await?;
    let tx = io.take_stdin().ok_or_else(|| {
        ApiError::Conflict(format!("job {id:?} takes no stdin, or it was sent already"))
    })?;
    let mut stream = body.into_data_stream();
    let mut sent = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Invalid(format!("reading stdin: {e}")))?;
        sent += chunk.len() as u64;
        if tx.send(chunk).await.is_err() {
            break; // the job closed its stdin or ended
        }
    }
    Ok(Json(serde_json::json!({"stdin_bytes": sent})).into_response())
}

async fn local_output(host: &AppState, id: &str) -> ApiResult<axum::response::Response> {
    let io = attachment(host, id).await?;
    let body = Body::from_stream(io.stream());
    Ok(([("content-type", "application/x-ndjson")], body).into_response())
}

async fn host_stdin(
    State(host): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<axum::response::Response> {
    local_stdin(&host, &id, body).await
}

async fn host_output(
    State(host): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    local_output(&host, &id).await
}
