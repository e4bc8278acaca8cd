//! The blobstore on every host: Flynn's HTTP API (`PUT`/`GET`/`HEAD`/`DELETE` by path,
//! `Blobstore-Offset` appends, `Blobstore-Copy-From` copies, `GET /?dir=` lists) on its own
//! listener. File metadata lives in the Raft state (the `blobs` area), so a file is visible
//! from every host once its PUT is acknowledged. The default backend, `embedded`, keeps the
//! bytes on the hosts themselves: a PUT is acknowledged only once the object is stored on
//! two hosts (one in a one-host cluster), and a host without a copy streams it from one
//! that has it. Reads of a whole local object are checked against the recorded SHA-512.

pub mod backends;
mod content;
mod direct;
mod http;
mod metrics;
mod migrate;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use futures::future::BoxFuture;

use crate::component::{Component, LocalState};
use store::ObjectStore;

/// Blobstore flags of `flynn-host daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct BlobstoreArgs {
    /// Where the blobstore's HTTP API listens (every host serves it).
    #[arg(long = "blobstore-http", default_value = "0.0.0.0:5001")]
    pub blobstore_http: SocketAddr,
    /// Do not run the blobstore on this host.
    #[arg(long)]
    pub no_blobstore: bool,
}

#[derive(Debug, Clone)]
pub struct BlobstoreConfig {
    pub http: SocketAddr,
    pub root: std::path::PathBuf,
}

impl BlobstoreArgs {
    pub fn validate(&self, data_dir: &Path) -> anyhow::Result<Option<BlobstoreConfig>> {
        if self.no_blobstore {
            return Ok(None);
        }
        Ok(Some(BlobstoreConfig {
            http: self.blobstore_http,
            root: data_dir.join("blobstore").join("objects"),
        }))
    }
}

/// The discovery service every host's blobstore registers as.
pub const SERVICE: &str = "blobstore";
/// An external default backend's last probe: backend, when, outcome.
type Probed = (String, std::time::Instant, Result<(), String>);
/// How long the status page reuses an external backend's probe.
const PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Blobstore {
    store: ObjectStore,
    addr: SocketAddr,
    /// This host's state, once it is in a cluster.
    local: OnceLock<LocalState>,
    host: u64,
    peers: reqwest::Client,
    server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    backends: backends::Backends,
    /// The default backend's last probe for the status page: backend, when, outcome.
    probed: std::sync::Mutex<Option<Probed>>,
    pub(crate) metrics: metrics::Metrics,
}

impl Blobstore {
    /// Binds the listener now (a port in use stops the daemon) and serves; requests get 503
    /// until the host is in a cluster.
    pub async fn start(cfg: &BlobstoreConfig, host: u64) -> anyhow::Result<Arc<Self>> {
        let store = ObjectStore::open(cfg.root.clone())
            .with_context(|| format!("opening {}", cfg.root.display()))?;
        let listener = tokio::net::TcpListener::bind(cfg.http)
            .await
            .with_context(|| format!("blobstore cannot listen on {}", cfg.http))?;
        let addr = listener.local_addr()?;
        let me = Arc::new(Blobstore {
            store,
            addr,
            local: OnceLock::new(),
            host,
            peers: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .pool_idle_timeout(flynn_client::POOL_IDLE)
                .build()?,
            server: std::sync::Mutex::new(None),
            backends: backends::Backends::default(),
            probed: std::sync::Mutex::new(None),
            metrics: metrics::Metrics::default(),
        });
        let app = http::router(me.clone());
        // Local objects are sent with sendfile before hyper sees the connection.
        let front: Arc<dyn crate::serve::Front> = me.clone();
        let task = tokio::spawn(crate::serve::serve_with(
            listener,
            app,
            Some(front),
            futures::future::pending::<()>(),
        ));
        *me.server.lock().expect("server lock") = Some(task);
        tracing::info!(%addr, "blobstore listening");
        Ok(me)
    }
}

impl Component for Blobstore {
    fn name(&self) -> &'static str {
        "blobstore"
    }

    /// Registers this host's blobstore in discovery (service `blobstore`), so peers and
    /// clients reach it by name, at the address it really listens on.
    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        let _ = self.local.set(local.clone());
        Box::pin(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                if !local.read(|s| s.bootstrapped()) {
                    continue;
                }
                let ip = local
                    .members()
                    .into_iter()
                    .find(|(id, _)| *id == self.host)
                    .and_then(|(_, a)| Some(a.rsplit_once(':')?.0.to_string()));
                let Some(ip) = ip else { continue };
                let register = flynn_state::DiscoveryCommand::RegisterInstance {
                    service: SERVICE.into(),
                    id: flynn_state::host_instance_id(self.host),
                    addr: format!("{ip}:{}", self.addr.port()),
                    meta: Default::default(),
                    ttl_ms: 15_000,
                    now_ms: crate::now_ms(),
                };
                if let Err(e) = local.node().propose(register).await {
                    tracing::debug!(error = %e, "blobstore registration not applied");
                }
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        let default = self
            .local
            .get()
            .and_then(|l| backends::configured(l).ok())
            .map(|(_, d)| d);
        serde_json::json!({
            "listen": self.addr,
            "default_backend": default,
            "ready": self.local.get().is_some(),
        })
    }

    fn prometheus(&self) -> String {
        self.metrics.render()
    }

    /// Healthy once serving, with its default backend answering: the object directory for
    /// the embedded backend, a probe (list, write, read back, delete) for an external one,
    /// whose answer is kept for [`PROBE_TTL`] so a status page polled often does not write
    /// to the bucket on every request.
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<flynn_client::ComponentHealth>> {
        Box::pin(async move {
            let Some(local) = self.local.get() else {
                return Some(flynn_client::ComponentHealth::unhealthy(serde_json::json!(
                    "not serving yet: the host is not in a cluster"
                )));
            };
            let (name, backend) = match self.backends.default_backend(local) {
                Ok(d) => d,
                Err(e) => {
                    return Some(flynn_client::ComponentHealth::unhealthy(
                        serde_json::json!({"error": e.to_string()}),
                    ))
                }
            };
            let checked = match backend {
                None => self
                    .store
                    .writable()
                    .map_err(|e| format!("object directory: {e}")),
                Some(b) => {
                    let cached = self.probed.lock().expect("probe lock").clone();
                    match cached {
                        Some((n, at, r)) if n == name && at.elapsed() < PROBE_TTL => r,
                        _ => {
                            let r = b.probe().await.map_err(|e| e.to_string());
                            *self.probed.lock().expect("probe lock") =
                                Some((name.clone(), std::time::Instant::now(), r.clone()));
                            r
                        }
                    }
                }
            };
            Some(flynn_client::ComponentHealth::from_check(
                checked.is_ok(),
                serde_json::json!({
                    "default_backend": name,
                    "listen": self.addr,
                    "error": checked.err(),
                }),
            ))
        })
    }

    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(task) = self.server.lock().expect("server lock").take() {
                task.abort();
            }
        })
    }
}
