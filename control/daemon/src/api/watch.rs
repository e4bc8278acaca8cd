//! `GET /watch?since=REV`: the data-plane change stream as newline-delimited JSON.

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::AppState;
use crate::error::ApiResult;

pub fn routes() -> Router<AppState> {
    Router::new().route("/watch", get(watch))
}

#[derive(Deserialize)]
struct WatchOpts {
    #[serde(default)]
    since: u64,
    /// Start from this host's applied state even if it lags (a router on a cut-off host
    /// keeps its routes); by default the stream starts at least as new as every write
    /// acknowledged before it was opened.
    #[serde(default)]
    stale: bool,
}

async fn watch(State(host): State<AppState>, Query(opts): Query<WatchOpts>) -> ApiResult<Response> {
    let node = host.node()?.clone();
    if !opts.stale {
        node.read_barrier().await?;
    }
    let lines = crate::watch::stream(node, opts.since);
    let body = tokio_stream::wrappers::ReceiverStream::new(lines).map(|line| {
        let mut buf = serde_json::to_vec(&line).expect("watch lines serialize");
        buf.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(buf))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .expect("static response parts"))
}
