//! The router component: Flynn's front door on every host (HTTP on 80, HTTPS on 443, TCP
//! routes in 3000-3500), following its own host's applied state in process, so it needs no
//! controller key and keeps following across key rotations.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use flynn_router::{Router, RouterConfig};
use flynn_router_table::{Follower, RouteTable};
use futures::future::BoxFuture;

use crate::component::{Component, LocalState};

/// Router flags of `flynn-host daemon`; what is not given takes [`RouterConfig::default`].
#[derive(clap::Args, Debug, Clone)]
pub struct RouterArgs {
    /// Do not run the router on this host (its ports stay free).
    #[arg(long)]
    pub no_router: bool,
    /// Plain-HTTP listener; repeat for extra ports.
    #[arg(long = "router-http", default_value = "0.0.0.0:80")]
    pub http: Vec<SocketAddr>,
    /// HTTPS listener; repeat for extra ports.
    #[arg(long = "router-https", default_value = "0.0.0.0:443")]
    pub https: Vec<SocketAddr>,
    /// Address TCP routes listen on.
    #[arg(long = "router-tcp-ip", default_value = "0.0.0.0")]
    pub tcp_ip: IpAddr,
    /// Default certificate (PEM) for names no route certificate covers (default: a
    /// self-signed one made once in the data dir).
    #[arg(long = "router-tls-cert", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long = "router-tls-key", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Router worker threads (default: one per core).
    #[arg(long = "router-workers")]
    pub workers: Option<usize>,
    /// Do not pin router workers to cores.
    #[arg(long = "router-no-pin")]
    pub no_pin: bool,
    /// Accept HTTP/2 with prior knowledge on the plain listeners.
    #[arg(long = "router-h2c")]
    pub h2c: bool,
    /// Expect a PROXY protocol v1 line on HTTP and HTTPS connections.
    #[arg(long = "router-proxy-protocol")]
    pub proxy_protocol: bool,
    /// Milliseconds a backend connect may take before the request goes to another backend
    /// (and this one is passed over for a while): well under a second suits hosts on one
    /// network; raise it for backends farther away.
    #[arg(
        long = "router-connect-timeout-ms",
        env = "FLYNN_ROUTER_CONNECT_TIMEOUT_MS",
        default_value_t = flynn_router::config::Timeouts::default().connect.as_millis() as u64
    )]
    pub connect_timeout_ms: u64,
    /// Socket I/O backend: io_uring where it works here (`auto`; falls back to epoll with
    /// one log line naming the reason), `uring` (or fail to start), or `epoll`.
    #[arg(
        long = "router-io",
        value_enum,
        env = "FLYNN_ROUTER_IO",
        default_value = "auto"
    )]
    pub io: flynn_router::io::IoMode,
}

impl RouterArgs {
    /// The router's config, `None` with `--no-router`. Without a default certificate one is
    /// made under `data_dir/router/` (once; later starts reuse it).
    pub fn validate(&self, data_dir: &Path) -> anyhow::Result<Option<RouterConfig>> {
        if self.no_router {
            return Ok(None);
        }
        anyhow::ensure!(
            !self.http.is_empty() || !self.https.is_empty(),
            "the router needs an HTTP or HTTPS listener (or --no-router)"
        );
        let mut config = RouterConfig {
            http: self.http.clone(),
            https: self.https.clone(),
            tcp_ip: self.tcp_ip,
            pin_workers: !self.no_pin,
            h2c: self.h2c,
            proxy_protocol: self.proxy_protocol,
            io: self.io,
            ..RouterConfig::default()
        };
        if let Some(n) = self.workers {
            anyhow::ensure!(n > 0, "--router-workers must be at least 1");
            config.workers = n;
        }
        config.timeouts.connect = flynn_router::config::connect_timeout(self.connect_timeout_ms)
            .map_err(|e| anyhow::anyhow!("--router-connect-timeout-ms: {e}"))?;
        (config.tls_cert, config.tls_key) = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
            _ if config.https.is_empty() => (None, None),
            _ => {
                let (c, k) = default_certificate(&data_dir.join("router"))?;
                (Some(c), Some(k))
            }
        };
        Ok(Some(config))
    }
}

/// A self-signed certificate for HTTPS requests no route certificate covers, made once.
fn default_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("default.crt"), dir.join("default.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let made = crate::tls::self_signed(&["flynn-default".to_string()])?;
    crate::hostdir::write_atomic(&key, made.key_pem.as_bytes(), 0o600)?;
    crate::hostdir::write_atomic(&cert, made.cert_pem.as_bytes(), 0o644)?;
    tracing::info!(cert = %cert.display(), "made the router's self-signed default certificate");
    Ok((cert, key))
}

impl RouterComponent {
    /// The I/O backend the router runs on (`uring` or `epoll`), once it started.
    fn io_backend(&self) -> Option<&'static str> {
        let m = self.metrics.lock().expect("metrics lock");
        m.as_ref()
            .and_then(|m| m.io.get().map(|c| c.backend.name()))
    }

    /// Why `--router-io auto` did not take io_uring, when it did not.
    fn io_fallback(&self) -> Option<String> {
        let m = self.metrics.lock().expect("metrics lock");
        m.as_ref()
            .and_then(|m| m.io.get().and_then(|c| c.fallback.clone()))
    }
}

pub struct RouterComponent {
    router: Mutex<Option<Router>>,
    /// The listening sockets (bound at start, or handed over by the previous image in an
    /// in-place update), not accepted on until the route table is built from the host's
    /// state (connections wait in their queues instead of meeting an empty table's 404).
    deferred: Mutex<Option<(RouterConfig, flynn_router::server::Inherited)>>,
    table: Arc<ArcSwap<RouteTable>>,
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    metrics: Mutex<Option<Arc<flynn_router::metrics::Metrics>>>,
}

impl RouterComponent {
    /// Stops accepting and lets in-flight requests finish, keeping the listening sockets
    /// for the next process image (an in-place update).
    pub async fn drain_for_update(&self) -> Vec<(SocketAddr, std::net::TcpListener)> {
        let router = self.router.lock().expect("router lock").take();
        match router {
            Some(r) => tokio::task::spawn_blocking(move || r.drain_keeping())
                .await
                .unwrap_or_default(),
            // Never started: hand on the sockets it was given.
            None => self
                .deferred
                .lock()
                .expect("deferred lock")
                .take()
                .map(|(_, inherited)| {
                    inherited
                        .into_iter()
                        .flat_map(|(a, ls)| ls.into_iter().map(move |l| (a, l)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Starts a deferred router (see `deferred`) once the table holds the host's state.
    fn start_deferred(&self) {
        let Some((config, mut inherited)) = self.deferred.lock().expect("deferred lock").take()
        else {
            return;
        };
        match Router::start_inheriting(config, self.table.clone(), &mut inherited) {
            Ok(router) => {
                tracing::info!("router serving, with the routes of this host's state");
                *self.metrics.lock().expect("metrics lock") = Some(router.metrics().clone());
                *self.router.lock().expect("router lock") = Some(router);
            }
            Err(e) => {
                tracing::error!(error = %e, "the router did not start on its sockets")
            }
        }
    }

    /// Binds every listener now (a port in use is a start error of the daemon), and serves
    /// on them once the route table holds the host's state: until then connections wait
    /// in the sockets' queues instead of meeting an empty table's 404. After an in-place
    /// update the sockets are the previous image's.
    pub fn start(config: RouterConfig) -> anyhow::Result<Self> {
        let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        let mut inherited = crate::update::inherited_listeners();
        if !inherited.is_empty() {
            tracing::info!(
                addrs = inherited.len(),
                "taking up the listening sockets of the previous daemon image"
            );
        } else {
            inherited = Router::bind(&config).context("starting the router")?;
        }
        let bound = |addrs: &[SocketAddr]| -> Vec<SocketAddr> {
            addrs
                .iter()
                .map(|a| {
                    inherited
                        .get(a)
                        .and_then(|ls| ls.first())
                        .and_then(|l| l.local_addr().ok())
                        .unwrap_or(*a)
                })
                .collect()
        };
        let (http, https) = (bound(&config.http), bound(&config.https));
        for a in &http {
            tracing::info!(addr = %a, "router http listener (serving once it has the routes)");
        }
        for a in &https {
            tracing::info!(addr = %a, "router https listener (serving once it has the routes)");
        }
        Ok(RouterComponent {
            http,
            https,
            metrics: Mutex::new(None),
            router: Mutex::new(None),
            deferred: Mutex::new(Some((config, inherited))),
            table,
        })
    }
}

impl Component for RouterComponent {
    fn name(&self) -> &'static str {
        "router"
    }

    /// Folds the host's data-plane changes into the table and publishes it at each
    /// `synced` mark, so the workers never see half a change.
    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut follower = Follower::default();
            loop {
                follower.reconnect();
                let mut lines = local.watch_lines(follower.revision());
                while let Some(line) = lines.recv().await {
                    if let Some(t) = follower.line(line) {
                        self.table.store(Arc::new(t));
                        self.start_deferred();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "http": self.http,
            "https": self.https,
            "revision": self.table.load().revision,
            "io": self.io_backend(),
            "io_fallback": self.io_fallback(),
        })
    }

    fn prometheus(&self) -> String {
        self.metrics
            .lock()
            .expect("metrics lock")
            .as_ref()
            .map(|m| m.render())
            .unwrap_or_default()
    }

    /// Healthy while running and its HTTP listener accepts a connection now.
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<flynn_client::ComponentHealth>> {
        Box::pin(async move {
            let running = self.router.lock().expect("router lock").is_some();
            let probe = self.http.first().or(self.https.first()).map(|a| {
                let ip = if a.ip().is_unspecified() {
                    IpAddr::from([127, 0, 0, 1])
                } else {
                    a.ip()
                };
                SocketAddr::new(ip, a.port())
            });
            let accepts = match probe {
                Some(a) => tokio::net::TcpStream::connect(a).await.map(|_| ()),
                None => Ok(()),
            };
            let detail = serde_json::json!({
                "http": self.http,
                "https": self.https,
                "revision": self.table.load().revision,
                "io": self.io_backend(),
                "io_fallback": self.io_fallback(),
                "error": accepts.as_ref().err().map(|e| e.to_string()),
            });
            Some(flynn_client::ComponentHealth::from_check(
                running && accepts.is_ok(),
                detail,
            ))
        })
    }

    /// Stops accepting and lets in-flight requests finish.
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let router = self.router.lock().expect("router lock").take();
            if let Some(router) = router {
                flynn_router::standalone::drain(router).await;
            }
        })
    }
}
