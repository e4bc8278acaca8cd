//! Serves the API with the router's limits on slow clients: a request head must be complete
//! within [`HEAD_TIMEOUT`] (the router's header timeout), a body within
//! `api::BODY_TIMEOUT` (the router's body timeout). axum's own `serve` sets no timer, so
//! a client dribbling a header line a second kept a connection open forever.
//!
//! hyper starts the head timer when a connection begins waiting for a request, so the same
//! timer closes idle keep-alive connections: the API's idle timeout is 10 s, not the
//! router's 60 s. Its clients keep pooled connections for 5 s, under that.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// From the moment a connection waits for a request head until the head is complete.
/// Clients keep idle pooled connections for less than this (see `flynn_client`).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown is asked for, in-flight requests get this long (watch streams never end
/// on their own).
const DRAIN: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HEAD_TIMEOUT));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Handlers that care who is asking (the status page) read the peer address.
        let app = app.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let mut app = app.clone();
                async move { tower::Service::call(&mut app, req.map(axum::body::Body::new)).await }
            },
        ));
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "api connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("api connections still open after the drain");
    }
}

/// The body of a successful delete.
pub fn deleted() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"deleted": true}))
}
