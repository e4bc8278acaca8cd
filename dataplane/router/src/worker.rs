//! One worker's state: its own backend pools and counters, its ring, its view of the route
//! table. Workers share only the route table (an atomically swapped snapshot) and the
//! metrics they publish once a second. The worker's runtime and accept loops are
//! [`crate::accept`]; every request path takes a `&Worker` from here.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use flynn_router_table::RouteTable;
use flynn_uring::Driver;
use tokio::sync::watch;

use crate::config::RouterConfig;
use crate::io::IoBackend;
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

    pub(crate) fn publish(&self) {
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
    pub(crate) fn start_ring(&self) {
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
pub(crate) struct Open(pub(crate) Rc<Worker>);

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
