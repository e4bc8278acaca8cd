//! The blobstore on every host: Flynn's HTTP API (`PUT`/`GET`/`HEAD`/`DELETE` by path,
//! `Blobstore-Offset` appends, `Blobstore-Copy-From` copies, `GET /?dir=` lists) on its own
//! listener. File metadata lives in the Raft state (the `blobs` area), so a file is visible
//! from every host once its PUT is acknowledged. The default backend, `embedded`, keeps the
//! bytes on the hosts themselves: a PUT is acknowledged only once the object is stored on
//! two hosts (one in a one-host cluster), and a host without a copy streams it from one
//! that has it. Reads of a whole local object are checked against the recorded SHA-512.

pub mod backends;
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

pub struct Blobstore {
    store: ObjectStore,
    addr: SocketAddr,
    /// This host's state, once it is in a cluster.
    local: OnceLock<LocalState>,
    host: u64,
    peers: reqwest::Client,
    server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    backends: backends::Backends,
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
            metrics: metrics::Metrics::default(),
        });
        let app = http::router(me.clone());
        let task = tokio::spawn(crate::api::serve::serve(
            listener,
            app,
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

    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(task) = self.server.lock().expect("server lock").take() {
                task.abort();
            }
        })
    }
}
