//! Starting and stopping the router: bind every listener up front (a port in use is an
//! error at start, not a log line later), start one pinned worker thread per core, serve
//! metrics from a thread of their own, and drain on request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use flynn_router_table::RouteTable;
use tokio::sync::watch;

use crate::accept::{self, Kind};
use crate::config::RouterConfig;
pub use crate::listen::reuseport_listener;
use crate::metrics::Metrics;
use crate::worker::{Shared, Worker};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("starting a worker: {0}")]
    Spawn(std::io::Error),
}

/// Listening sockets a previous process image left open for this one (an in-place
/// update), by the address they were configured for.
pub type Inherited = std::collections::BTreeMap<SocketAddr, Vec<std::net::TcpListener>>;

/// `n` sockets on one address; port 0 picks one port for all of them. Sockets inherited for
/// the address are used first: connections that queued on them while no process accepted
/// are served, none refused.
fn bind_group(
    addr: SocketAddr,
    n: usize,
    inherited: &mut Inherited,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), RouterError> {
    if let Some(mut kept) = inherited.remove(&addr).filter(|k| !k.is_empty()) {
        let bound = kept[0]
            .local_addr()
            .map_err(|e| RouterError::Bind(addr, e))?;
        for l in &kept {
            l.set_nonblocking(true)
                .map_err(|e| RouterError::Bind(addr, e))?;
        }
        while kept.len() < n {
            kept.push(reuseport_listener(bound).map_err(|e| RouterError::Bind(bound, e))?);
        }
        return Ok((bound, kept));
    }
    let first = reuseport_listener(addr).map_err(|e| RouterError::Bind(addr, e))?;
    let bound = first.local_addr().map_err(|e| RouterError::Bind(addr, e))?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(reuseport_listener(bound).map_err(|e| RouterError::Bind(bound, e))?);
    }
    Ok((bound, all))
}

pub struct Router {
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    pub http_addrs: Vec<SocketAddr>,
    pub https_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// A second handle on every listening socket, by configured address: kept open through
    /// a drain, so an in-place update can hand the sockets to the next process image.
    kept: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl Router {
    /// Binds everything and starts the workers, routing by whatever `table` holds.
    pub fn start(
        config: RouterConfig,
        table: Arc<ArcSwap<RouteTable>>,
    ) -> Result<Router, RouterError> {
        Self::start_inheriting(config, table, &mut Inherited::new())
    }

    /// Binds every listener without accepting on any, and checks what the configuration
    /// names (the TLS key, the 503 page), so a port in use or a bad file is an error now.
    /// [`Router::start_inheriting`] with them later serves the connections that queued
    /// meanwhile: a router that must not answer before it has its routes.
    pub fn bind(config: &RouterConfig) -> Result<Inherited, RouterError> {
        if config.http.is_empty() && config.https.is_empty() {
            return Err(RouterError::Config(
                "no HTTP or HTTPS listener configured".into(),
            ));
        }
        if let Some(p) = &config.error_503_page {
            std::fs::read(p).map_err(|e| RouterError::Read(p.clone(), e))?;
        }
        if !config.https.is_empty() {
            crate::tls::default_key(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
        }
        let n = config.workers.max(1);
        let mut bound = Inherited::new();
        for addr in config.http.iter().chain(&config.https) {
            let (_, group) = bind_group(*addr, n, &mut Inherited::new())?;
            bound.insert(*addr, group);
        }
        Ok(bound)
    }

    /// [`Router::start`], taking up listening sockets a previous process left (see
    /// [`Inherited`]); those of addresses no longer configured are closed.
    pub fn start_inheriting(
        config: RouterConfig,
        table: Arc<ArcSwap<RouteTable>>,
        inherited: &mut Inherited,
    ) -> Result<Router, RouterError> {
        let n = config.workers.max(1);
        if config.http.is_empty() && config.https.is_empty() {
            return Err(RouterError::Config(
                "no HTTP or HTTPS listener configured".into(),
            ));
        }
        let page_503 = match &config.error_503_page {
            Some(p) => Some(std::fs::read(p).map_err(|e| RouterError::Read(p.clone(), e))?),
            None => None,
        };
        let tls = if config.https.is_empty() {
            None
        } else {
            let default =
                crate::tls::default_key(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
            if default.is_none() && (config.tls_cert.is_some() || config.tls_key.is_some()) {
                return Err(RouterError::Config(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
            let resolver = Arc::new(crate::tls::SniResolver::new(table.clone(), default));
            Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                resolver, true,
            )?))
        };
        let mut per_worker: Vec<Vec<(std::net::TcpListener, Kind)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut http_addrs = Vec::new();
        let mut https_addrs = Vec::new();
        let mut kept = Vec::new();
        for (addrs, kind, bound) in [
            (&config.http, Kind::Http, &mut http_addrs),
            (&config.https, Kind::Https, &mut https_addrs),
        ] {
            for addr in addrs {
                let (at, group) = bind_group(*addr, n, inherited)?;
                bound.push(at);
                for (i, l) in group.into_iter().enumerate() {
                    kept.push((*addr, l.try_clone().map_err(|e| RouterError::Bind(at, e))?));
                    per_worker[i % n].push((l, kind));
                }
            }
        }
        inherited.clear();
        let choice = crate::io::resolve(config.io).map_err(RouterError::Config)?;
        let io = choice.backend;
        match &choice.fallback {
            Some(why) => {
                tracing::warn!(reason = %why, "io_uring not chosen: the router uses epoll")
            }
            None => tracing::info!(
                backend = io.name(),
                self_test_round_trip_us = choice.ring_round_trip.map(|d| d.as_micros() as u64),
                "router I/O backend"
            ),
        }
        let metrics = Arc::new(Metrics::new(n));
        let _ = metrics.io.set(choice);
        let metrics_addr = match config.metrics {
            Some(addr) => Some(
                crate::metrics_server::start(addr, metrics.clone())
                    .map_err(|e| RouterError::Bind(addr, e))?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            config,
            table,
            metrics: metrics.clone(),
            tls,
            page_503,
            io,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut workers = Vec::new();
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let (shared, rx) = (shared.clone(), shutdown_rx.clone());
            let core =
                (shared.config.pin_workers && !cores.is_empty()).then(|| cores[i % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    accept::run(Worker::new(i, shared, rx), listeners);
                })
                .map_err(RouterError::Spawn)?;
            workers.push(handle);
        }
        Ok(Router {
            shutdown,
            workers,
            metrics,
            http_addrs,
            https_addrs,
            metrics_addr,
            kept,
        })
    }

    /// The listening sockets by configured address, for handing to the next process image.
    pub fn listeners(&self) -> Vec<(SocketAddr, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.kept.iter().map(|(a, l)| (*a, l.as_raw_fd())).collect()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// [`Router::drain`], keeping the listening sockets open: connections that arrive
    /// meanwhile wait in their queues for the next process image, which takes them up.
    pub fn drain_keeping(self) -> Vec<(SocketAddr, std::net::TcpListener)> {
        let _ = self.shutdown.send(true);
        for w in self.workers {
            let _ = w.join();
        }
        self.kept
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and
    /// returns when every worker has stopped.
    pub fn drain(mut self) {
        // The kept handles go first: no socket may go on queueing connections nobody takes.
        self.kept.clear();
        let _ = self.shutdown.send(true);
        for w in self.workers {
            let _ = w.join();
        }
    }
}
