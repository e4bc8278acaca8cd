//! The router as its own process (`flynn-host router`), fed by a routes file (reloaded on
//! SIGHUP) or by a cluster's watch stream; SIGTERM or SIGINT drains it. Inside
//! `flynn-host daemon` the router follows its host's state directly instead.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::{Router, RouterConfig, RouterError, Timeouts};
use arc_swap::ArcSwap;
use flynn_client::ControllerClient;
use flynn_router_table::RouteTable;
use tokio::signal::unix::{signal, SignalKind};

/// Flags of `flynn-host router`; what is not given takes [`RouterConfig::default`].
#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    /// Routes file (TOML), reloaded on SIGHUP.
    #[arg(long, conflicts_with = "controller")]
    routes: Option<PathBuf>,
    /// Controller URL whose watch stream drives the routes (e.g. http://127.0.0.1:1113).
    #[arg(long, requires = "key")]
    controller: Option<String>,
    /// Controller key for --controller.
    #[arg(long, env = "FLYNN_CONTROLLER_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Plain-HTTP listener; repeat for extra ports.
    #[arg(long = "http", default_value = "0.0.0.0:80")]
    http: Vec<SocketAddr>,
    /// HTTPS listener; repeat for extra ports.
    #[arg(long = "https")]
    https: Vec<SocketAddr>,
    /// Address TCP routes listen on.
    #[arg(long, default_value = "0.0.0.0")]
    tcp_ip: IpAddr,
    /// Prometheus /metrics listener.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Expect a PROXY protocol v1 line on HTTP and HTTPS connections.
    #[arg(long)]
    proxy_protocol: bool,
    /// Accept HTTP/2 with prior knowledge on the plain listeners.
    #[arg(long)]
    h2c: bool,
    /// Default certificate (PEM) for HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Default certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Page served with 503 responses.
    #[arg(long)]
    error_503_page: Option<PathBuf>,
    /// Log every request (target flynn_router::access).
    #[arg(long)]
    access_log: bool,
    /// Client connections across all workers.
    #[arg(long, default_value_t = RouterConfig::default().max_connections)]
    max_connections: usize,
    /// Idle keep-alive connections kept per backend, per worker.
    #[arg(long, default_value_t = RouterConfig::default().max_idle_per_backend)]
    max_idle_per_backend: usize,
    /// Seconds a request head may take.
    #[arg(long, default_value_t = Timeouts::default().header.as_secs())]
    header_timeout: u64,
    /// Seconds a keep-alive connection may sit idle.
    #[arg(long, default_value_t = Timeouts::default().idle.as_secs())]
    idle_timeout: u64,
    /// Seconds between pieces of a request body.
    #[arg(long, default_value_t = Timeouts::default().body.as_secs())]
    body_timeout: u64,
    /// Seconds to wait for a backend's response.
    #[arg(long, default_value_t = Timeouts::default().upstream.as_secs())]
    upstream_timeout: u64,
    /// Milliseconds a backend connect may take before the request goes to another backend
    /// (and this one is passed over for a while).
    #[arg(long, default_value_t = Timeouts::default().connect.as_millis() as u64)]
    connect_timeout_ms: u64,
    /// Seconds in-flight requests get after SIGTERM.
    #[arg(long, default_value_t = Timeouts::default().drain.as_secs())]
    drain_timeout: u64,
    /// Socket I/O backend: io_uring where it works here (`auto`, the default; falls back to
    /// epoll with one log line naming the reason), `uring` (or fail to start), or `epoll`.
    #[arg(long, value_enum, env = "FLYNN_ROUTER_IO", default_value = "auto")]
    pub io: crate::io::IoMode,
}

/// Where the standalone router's routes come from.
pub enum RouteSource {
    /// A TOML routes file, reloaded on SIGHUP (a broken file keeps the working routes).
    File(PathBuf),
    /// A controller's watch stream.
    Controller { url: String, key: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error(transparent)]
    Routes(#[from] crate::routes_file::RoutesFileError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

impl RouterArgs {
    /// The router's config and route source, checked.
    pub fn validate(&self) -> Result<(RouterConfig, RouteSource), StandaloneError> {
        let mut config = RouterConfig {
            http: self.http.clone(),
            https: self.https.clone(),
            tcp_ip: self.tcp_ip,
            metrics: self.metrics,
            pin_workers: !self.no_pin,
            proxy_protocol: self.proxy_protocol,
            h2c: self.h2c,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            error_503_page: self.error_503_page.clone(),
            access_log: self.access_log,
            max_connections: self.max_connections,
            max_idle_per_backend: self.max_idle_per_backend,
            io: self.io,
            ..RouterConfig::default()
        };
        if let Some(n) = self.workers {
            if n == 0 {
                return Err(StandaloneError::Config(
                    "--workers must be at least 1".into(),
                ));
            }
            config.workers = n;
        }
        let t = &mut config.timeouts;
        t.header = Duration::from_secs(self.header_timeout);
        t.idle = Duration::from_secs(self.idle_timeout);
        t.body = Duration::from_secs(self.body_timeout);
        t.upstream = Duration::from_secs(self.upstream_timeout);
        t.drain = Duration::from_secs(self.drain_timeout);
        t.connect = crate::config::connect_timeout(self.connect_timeout_ms)
            .map_err(StandaloneError::Config)?;
        let source = match (&self.routes, &self.controller) {
            (Some(path), _) => RouteSource::File(path.clone()),
            (None, Some(url)) => RouteSource::Controller {
                url: url.clone(),
                key: self.key.clone().unwrap_or_default(),
            },
            (None, None) => {
                return Err(StandaloneError::Config(
                    "give --routes FILE or --controller URL".into(),
                ))
            }
        };
        Ok((config, source))
    }
}

/// Runs the router until SIGTERM or SIGINT, then drains it.
pub async fn run(config: RouterConfig, source: RouteSource) -> Result<(), StandaloneError> {
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let routes_file = match source {
        RouteSource::File(path) => {
            let first = crate::routes_file::load(&path)?;
            table.store(Arc::new(first));
            Some(path)
        }
        RouteSource::Controller { url, key } => {
            let client = ControllerClient::new(&url, &key);
            tokio::spawn(flynn_router_table::follow(client, table.clone()));
            None
        }
    };
    let router = Router::start(config, table.clone())?;
    for a in &router.http_addrs {
        tracing::info!(addr = %a, "http listener");
    }
    for a in &router.https_addrs {
        tracing::info!(addr = %a, "https listener");
    }
    if let Some(a) = router.metrics_addr {
        tracing::info!(addr = %a, "metrics listener");
    }
    let sig = |k| signal(k).map_err(StandaloneError::Signals);
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let Some(path) = &routes_file else { continue };
                match crate::routes_file::load(path) {
                    Ok(t) => {
                        table.store(Arc::new(t));
                        tracing::info!(file = %path.display(), "routes reloaded");
                    }
                    // A bad file keeps the routes that were working.
                    Err(e) => tracing::error!(error = %e, "routes not reloaded"),
                }
            }
        }
    }
    tracing::info!("draining");
    drain(router).await;
    tracing::info!("drained");
    Ok(())
}

/// Drains the router off the async runtime (its workers are threads to join).
pub async fn drain(router: Router) {
    if let Err(e) = tokio::task::spawn_blocking(move || router.drain()).await {
        tracing::error!(error = %e, "router drain");
    }
}
