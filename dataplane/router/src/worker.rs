//! One worker per core: its own single-threaded runtime, its own SO_REUSEPORT listeners
//! (the kernel spreads connections across workers), its own backend pools and counters.
//! Workers share only the route table (an atomically swapped snapshot) and the metrics
//! they publish once a second.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use flynn_router_table::RouteTable;
use flynn_uring::{Driver, UringListener};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::RouterConfig;
use crate::h1::{self, ConnCtx};
use crate::io::{IoBackend, Stream};
use crate::metrics::{Metrics, WorkerStats};
use crate::upstream::Upstreams;

/// What every worker shares, read-only.
pub struct Shared {
    pub config: RouterConfig,
    pub table: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub page_503: Option<Vec<u8>>,
    /// The I/O backend every worker starts on.
    pub io: IoBackend,
}

pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub upstreams: Upstreams,
    pub stats: RefCell<WorkerStats>,
    pub shutdown: watch::Receiver<bool>,
    // An Rc around the Arc on purpose: requests clone the worker-local Rc, never the
    // shared Arc, whose count lives on a cache line every core would fight over.
    #[allow(clippy::redundant_allocation)]
    table: RefCell<Rc<Arc<RouteTable>>>,
    /// Client connections this worker has open.
    pub open: Cell<usize>,
    /// This worker's io_uring, when it runs that backend (set once, at start).
    ring: std::cell::OnceCell<Rc<Driver>>,
}

impl Worker {
    pub fn new(id: usize, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Self {
        let cfg = &shared.config;
        let seed = (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let table = RefCell::new(Rc::new(shared.table.load_full()));
        Worker {
            id,
            upstreams: Upstreams::new(
                seed,
                cfg.max_idle_per_backend,
                cfg.timeouts.pool_idle,
                cfg.timeouts.connect,
            ),
            stats: RefCell::default(),
            shutdown,
            table,
            open: Cell::new(0),
            ring: std::cell::OnceCell::new(),
            shared,
        }
    }

    /// The current route table. The worker keeps its own handle and refreshes it only when
    /// the shared snapshot changed, so a request costs no shared reference-count traffic.
    pub fn table(&self) -> Rc<Arc<RouteTable>> {
        let current = self.shared.table.load();
        if !Arc::ptr_eq(&current, &self.table.borrow()) {
            *self.table.borrow_mut() = Rc::new(Arc::clone(&current));
        }
        self.table.borrow().clone()
    }

    /// The worker's io_uring, when it runs that backend: its sockets, backend ones too, go
    /// on it.
    pub(crate) fn ring(&self) -> Option<&Rc<Driver>> {
        self.ring.get()
    }

    fn publish(&self) {
        if let Some(d) = self.ring.get() {
            let mut s = self.stats.borrow_mut();
            s.uring_enters = d.stats.enters.get();
            s.uring_submitted = d.stats.submitted.get();
            s.uring_completions = d.stats.completions.get();
            s.uring_buffers_exhausted = d.stats.buffers_exhausted.get();
        }
        self.shared.metrics.publish(self.id, &self.stats.borrow());
    }

    /// Sets up this worker's ring (on its own thread, inside its runtime). A failure leaves
    /// the worker on epoll, with one log line naming the reason.
    fn start_ring(&self) {
        if self.shared.io != IoBackend::Uring {
            return;
        }
        match Driver::start(flynn_uring::Config::default()) {
            Ok(d) => {
                let _ = self.ring.set(d);
            }
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "io_uring ring setup failed: this worker uses epoll");
                self.shared
                    .metrics
                    .io_fallbacks
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Counts a client connection from accept to close (against `--max-connections`, and for
/// the drain to wait on).
pub(crate) struct Open(Rc<Worker>);

impl Open {
    pub(crate) fn new(w: &Rc<Worker>) -> Option<Open> {
        let metrics = &w.shared.metrics;
        let n = metrics.open_connections.fetch_add(1, Ordering::Relaxed);
        if n >= w.shared.config.max_connections {
            metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            w.stats.borrow_mut().refused_connections += 1;
            return None;
        }
        w.open.set(w.open.get() + 1);
        Some(Open(w.clone()))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .shared
            .metrics
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.0.open.set(self.0.open.get() - 1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Https,
}

/// Runs one worker until it has drained after shutdown (or the drain deadline passed).
pub fn run(w: Worker, listeners: Vec<(std::net::TcpListener, Kind)>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let w = Rc::new(w);
    local.block_on(&rt, async move {
        w.start_ring();
        for (l, kind) in listeners {
            let l = match w.ring() {
                Some(d) => UringListener::from_std(d, l).map(Listener::Uring),
                None => TcpListener::from_std(l).map(Listener::Epoll),
            };
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "listener");
                    continue;
                }
            };
            tokio::task::spawn_local(accept_loop(w.clone(), l, kind));
        }
        tokio::task::spawn_local(crate::tcp::manage(w.clone()));
        let mut shutdown = w.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    w.publish();
                    housekeeping(&w);
                }
                _ = shutdown.changed() => break,
            }
        }
        // Drain: listeners are closing; in-flight requests finish until the deadline.
        let deadline = tokio::time::Instant::now() + w.shared.config.timeouts.drain;
        while w.open.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.publish();
        }
        w.publish();
    });
}

fn housekeeping(w: &Worker) {
    let table = w.table();
    w.shared
        .metrics
        .table_revision
        .store(table.revision, Ordering::Relaxed);
    let live = table.backend_addrs();
    w.upstreams.sweep(&live);
}

/// A worker's listening socket on its backend.
enum Listener {
    Epoll(TcpListener),
    Uring(UringListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Epoll(l) => l.accept().await.map(|(s, a)| (Stream::Epoll(s), a)),
            Listener::Uring(l) => l.accept().await.map(|(s, a)| (Stream::Uring(s), a)),
        }
    }
}

async fn accept_loop(w: Rc<Worker>, listener: Listener, kind: Kind) {
    let mut shutdown = w.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => serve(&w, stream, peer, kind),
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // A multishot accept takes connections off the shared socket before anyone asks: those
    // it took are this process's to answer (closing them would reset their clients while a
    // successor process takes over the socket).
    if let Listener::Uring(l) = listener {
        for (stream, peer) in l.close().await {
            serve(&w, Stream::Uring(stream), peer, kind);
        }
    }
}

/// Starts a task for an accepted connection (or closes it at once over the connection limit).
fn serve(w: &Rc<Worker>, stream: Stream, peer: SocketAddr, kind: Kind) {
    let Some(open) = Open::new(w) else {
        drop(stream);
        return;
    };
    tokio::task::spawn_local(async move {
        let w = open.0.clone();
        connection(w, stream, peer, kind).await;
        drop(open);
    });
}

async fn connection(w: Rc<Worker>, mut stream: Stream, peer: SocketAddr, kind: Kind) {
    let _ = stream.set_nodelay();
    let local_port = stream.local_addr().map_or(0, |a| a.port());
    let cfg = &w.shared.config;
    let mut ctx = ConnCtx {
        peer,
        local_port,
        tls: kind == Kind::Https,
    };
    if cfg.proxy_protocol {
        match tokio::time::timeout(
            cfg.timeouts.header,
            crate::proxy_protocol::read(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(addr))) => ctx.peer = addr,
            Ok(Ok(None)) => {}
            _ => return, // no valid PROXY line: the connection is not from the load balancer
        }
    }
    match kind {
        Kind::Http => {
            if cfg.h2c && starts_with_h2_preface(&mut stream, cfg.timeouts.header).await {
                crate::h2::serve(w, stream, ctx).await;
                return;
            }
            h1::serve(w, stream, BytesMut::with_capacity(16 * 1024), ctx).await;
        }
        Kind::Https => {
            let Some(acceptor) = w.shared.tls.clone() else {
                return;
            };
            let tls = match tokio::time::timeout(cfg.timeouts.header, acceptor.accept(stream)).await
            {
                Ok(Ok(s)) => {
                    w.stats.borrow_mut().tls_handshakes += 1;
                    s
                }
                _ => {
                    w.stats.borrow_mut().tls_failures += 1;
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                crate::h2::serve(w, tls, ctx).await;
            } else {
                h1::serve(w, tls, BytesMut::with_capacity(16 * 1024), ctx).await;
            }
        }
    }
}

/// Whether a plain connection opens with the HTTP/2 preface (h2c with prior knowledge).
async fn starts_with_h2_preface(stream: &mut Stream, timeout: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut peek = [0u8; 24];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut peek)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || !PREFACE.starts_with(&peek[..n]) {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // A partial preface so far: wait for the rest without consuming it.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
