//! `flynn-host router`: the router as its own process, fed by a routes file (reloaded on
//! SIGHUP) or by a cluster's watch stream. SIGTERM or SIGINT drains it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use flynn_client::ControllerClient;
use flynn_router::{Router, RouterConfig};
use flynn_router_table::RouteTable;
use tokio::signal::unix::{signal, SignalKind};

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
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,
    /// Idle keep-alive connections kept per backend, per worker.
    #[arg(long, default_value_t = 256)]
    max_idle_per_backend: usize,
    /// Seconds a request head may take.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a keep-alive connection may sit idle.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds between pieces of a request body.
    #[arg(long, default_value_t = 30)]
    body_timeout: u64,
    /// Seconds to wait for a backend's response.
    #[arg(long, default_value_t = 60)]
    upstream_timeout: u64,
    /// Seconds in-flight requests get after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
}

pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let mut config = RouterConfig {
        http: args.http,
        https: args.https,
        tcp_ip: args.tcp_ip,
        metrics: args.metrics,
        pin_workers: !args.no_pin,
        proxy_protocol: args.proxy_protocol,
        h2c: args.h2c,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        error_503_page: args.error_503_page,
        access_log: args.access_log,
        max_connections: args.max_connections,
        max_idle_per_backend: args.max_idle_per_backend,
        ..RouterConfig::default()
    };
    if let Some(n) = args.workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        config.workers = n;
    }
    let t = &mut config.timeouts;
    t.header = Duration::from_secs(args.header_timeout);
    t.idle = Duration::from_secs(args.idle_timeout);
    t.body = Duration::from_secs(args.body_timeout);
    t.upstream = Duration::from_secs(args.upstream_timeout);
    t.drain = Duration::from_secs(args.drain_timeout);

    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    match (&args.routes, &args.controller) {
        (Some(path), _) => {
            let first = flynn_router::routes_file::load(path)?;
            table.store(Arc::new(first));
        }
        (None, Some(url)) => {
            let client = ControllerClient::new(url, args.key.as_deref().unwrap_or(""));
            tokio::spawn(flynn_router_table::follow(client, table.clone()));
        }
        (None, None) => anyhow::bail!("give --routes FILE or --controller URL"),
    }
    let router = Router::start(config, table.clone()).context("starting the router")?;
    for a in &router.http_addrs {
        tracing::info!(addr = %a, "http listener");
    }
    for a in &router.https_addrs {
        tracing::info!(addr = %a, "https listener");
    }
    if let Some(a) = router.metrics_addr {
        tracing::info!(addr = %a, "metrics listener");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let Some(path) = &args.routes else { continue };
                match flynn_router::routes_file::load(path) {
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
    tokio::task::spawn_blocking(move || router.drain()).await?;
    tracing::info!("drained");
    Ok(())
}
