//! The `/metrics` listener: its own thread and runtime, so scrapes never queue behind
//! proxied traffic and proxied traffic never waits on a scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;

use crate::metrics::Metrics;

/// Serves `/metrics` on `addr` from a thread of its own; the address bound.
pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("router-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "metrics runtime"),
            };
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/metrics",
                    get(move || {
                        let m = metrics.clone();
                        async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
                    }),
                );
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            tracing::error!(error = %e, "metrics listener");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "metrics listener"),
                }
            });
        })?;
    Ok(bound)
}
