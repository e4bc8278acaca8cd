//! Serves the API with the router's limits on slow clients: a request head must be complete
//! within [`HEAD_TIMEOUT`] (the router's header timeout), a body within
//! `api::BODY_TIMEOUT` (the router's body timeout). axum's own `serve` sets no timer, so
//! a client dribbling a header line a second kept a connection open forever.
//!
//! hyper starts the head timer when a connection begins waiting for a request, so the same
//! timer closes idle keep-alive connections: the API's idle timeout is 10 s, not the
//! router's 60 s. Its clients keep pooled connections for 5 s, under that.
//!
//! A listener may put a [`Front`] before hyper: it answers the requests it can on a new
//! connection itself and hands the connection to hyper, with the bytes it has read, at the
//! first request it leaves to the API (the blobstore sends local objects with `sendfile`,
//! which hyper cannot, since it owns the socket's writes).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// From the moment a connection waits for a request head until the head is complete.
/// Clients keep idle pooled connections for less than this (see `flynn_client`).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown is asked for, in-flight requests get this long (watch streams never end
/// on their own).
const DRAIN: Duration = Duration::from_secs(5);

/// Answers requests of a new connection before the API sees it (see the module's doc).
pub trait Front: Send + Sync + 'static {
    /// Serves `stream` until a request it leaves to the API (then the connection, with what
    /// was read of it, goes on to hyper) or until the connection is done (`None`).
    fn serve(self: Arc<Self>, stream: TcpStream) -> BoxFuture<'static, Option<Rewind>>;
}

/// A connection with the bytes already read from it put back in front.
pub struct Rewind {
    read: bytes::Bytes,
    stream: TcpStream,
}

impl Rewind {
    pub fn new(read: bytes::Bytes, stream: TcpStream) -> Self {
        Rewind { read, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let taken = self.read.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    serve_with(listener, app, None, shutdown).await
}

/// [`serve`], with `front` answering what it can of each connection first.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    front: Option<Arc<dyn Front>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HEAD_TIMEOUT));
    let builder = Arc::new(builder);
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
        let (app, builder, front) = (app.clone(), builder.clone(), front.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let io = match front {
                Some(front) => match front.serve(stream).await {
                    Some(io) => io,
                    None => return,
                },
                None => Rewind::new(bytes::Bytes::new(), stream),
            };
            // Handlers that care who is asking (the status page) read the peer address.
            let service = TowerToHyperService::new(tower::service_fn(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req.map(axum::body::Body::new)).await }
                },
            ));
            // Upgrades: host-to-host Raft streams (`flynn_raft::stream`).
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
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
