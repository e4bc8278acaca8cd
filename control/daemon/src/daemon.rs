//! `flynn-host daemon`: one host's seat in the cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use flynn_raft::store;
use tokio::sync::mpsc;

use crate::component::Components;
use crate::components::firewall::{FirewallConfig, HostFirewall};
use crate::components::volumes::VolumesComponent;
use crate::components::{controller::ControllerRegistration, router::RouterComponent};
use crate::host::Host;
use crate::hostdir::HostDir;
use crate::version;

/// Default port of the host API (as Flynn's host API).
pub const DEFAULT_PORT: u16 = 1113;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    /// Address other hosts use to reach this one.
    pub external_ip: String,
    pub port: u16,
    /// Address to bind; defaults to all interfaces.
    pub listen_ip: IpAddr,
    /// Peers to ask for admission when this host has a secret but no cluster state yet.
    pub peer_ips: Vec<String>,
    /// The XDP firewall, when external interfaces are configured.
    pub firewall: Option<FirewallConfig>,
    /// The router, unless `--no-router`.
    pub router: Option<flynn_router::RouterConfig>,
    pub volumes: crate::components::volumes::VolumeConfig,
    /// The blobstore, unless `--no-blobstore`.
    pub blobstore: Option<crate::blobstore::BlobstoreConfig>,
    /// The job runner, unless `--no-jobs`.
    pub jobs: Option<crate::jobs::JobsConfig>,
}

/// Runs the daemon until SIGTERM/SIGINT or a fatal error.
pub async fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    let dir = HostDir::new(&cfg.data_dir);
    dir.create()
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let id = dir.node_id()?;
    let listen = SocketAddr::new(cfg.listen_ip, cfg.port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let addr = format!("{}:{}", cfg.external_ip, cfg.port);
    // Components start before anything is served: a host told to filter must never run
    // open, and a router port in use stops the daemon here.
    let mut components = Components::default();
    let mut router = None;
    let (update_tx, mut update_rx) = mpsc::unbounded_channel();
    if let Some(fc) = &cfg.firewall {
        let fw = HostFirewall::start(fc).context("starting the XDP firewall")?;
        components.add(Arc::new(fw));
    }
    if let Some(rc) = cfg.router.clone() {
        let r = Arc::new(RouterComponent::start(rc)?);
        components.add(r.clone());
        router = Some(r);
    }
    let volumes = Arc::new(VolumesComponent::start(&cfg.volumes, id)?);
    components.add(volumes.clone());
    let mut blobstore = None;
    if let Some(bc) = &cfg.blobstore {
        let b = crate::blobstore::Blobstore::start(bc, id).await?;
        components.add(b.clone());
        blobstore = Some(b);
    }
    let mut jobs = None;
    if let Some(jc) = &cfg.jobs {
        let runner =
            crate::jobs::JobRunner::start(jc, id, addr.clone(), blobstore.clone(), volumes.clone())
                .context("starting the job runner")?;
        let runner = Arc::new(runner);
        components.add(runner.clone());
        // The keeper of a Postgres server this host may run.
        components.add(Arc::new(crate::databases::keeper::Keeper::new(
            id,
            runner.clone(),
            volumes.clone(),
            blobstore.clone(),
        )));
        jobs = Some(runner);
    }
    components.add(Arc::new(ControllerRegistration::new(id, addr.clone())));
    let host = Arc::new(Host {
        dir: dir.clone(),
        id,
        addr,
        port: cfg.port,
        node: OnceLock::new(),
        recovering: std::sync::atomic::AtomicBool::new(false),
        start: tokio::sync::Mutex::new(()),
        fatal: fatal_tx,
        update: update_tx,
        started_ms: crate::now_ms(),
        router,
        components,
        volumes,
        jobs,
        blobstore,
        health: Default::default(),
    });
    tracing::info!(node_id = id, addr = %host.addr, version = version(), "flynn-host daemon starting");
    tokio::spawn(crate::api::status::keep_health_fresh(host.clone()));

    if let Some(secret) = dir.secret()? {
        let recovering = dir.recover_state()?;
        let node = host.start_node(secret.clone()).await?;
        if let Some(state) = recovering {
            host.recovering
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(host.clone().finish_recovery(node, state));
        } else if node.role() == flynn_client::Role::None && !cfg.peer_ips.is_empty() {
            tokio::spawn(host.clone().join(node, cfg.peer_ips.clone(), secret));
        }
    } else {
        tracing::info!(
            "waiting to be bootstrapped (flynn-host bootstrap) or given a cluster secret"
        );
    }

    let app = crate::api::router(host.clone());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let r = tokio::select! {
            _ = term.recv() => Ok(None),
            _ = tokio::signal::ctrl_c() => Ok(None),
            Some(e) = fatal_rx.recv() => Err(e),
            Some(binary) = update_rx.recv() => Ok(Some(binary)),
        };
        let _ = done_tx.send(r);
    };
    crate::serve::serve(listener, app, shutdown).await;
    let outcome = done_rx.await.unwrap_or(Ok(None));
    if let Ok(Some(binary)) = &outcome {
        tracing::info!(binary = %binary.display(), "stopping for an in-place update");
        // The router stops accepting but keeps its sockets for the next image.
        let listeners = match &host.router {
            Some(r) => r.drain_for_update().await,
            None => Vec::new(),
        };
        host.components.stop().await;
        if let Some(node) = host.node.get() {
            let _ = tokio::time::timeout(Duration::from_secs(5), node.raft.shutdown()).await;
        }
        let e = crate::update::exec(binary, &listeners);
        return Err(anyhow::anyhow!(
            "replacing the daemon by {}: {e}",
            binary.display()
        ));
    }
    tracing::info!("stopping");
    // Components first (the router drains, the controller leaves discovery), Raft last.
    host.components.stop().await;
    if let Some(node) = host.node.get() {
        let _ = tokio::time::timeout(Duration::from_secs(5), node.raft.shutdown()).await;
    }
    outcome.map(|_| ())
}

/// `flynn-host recover`: prepares a stopped host's data dir to restart as the single peer of
/// a new cluster holding its applied state. Used when a cluster has lost its quorum for good.
pub fn prepare_recovery(data_dir: &std::path::Path) -> anyhow::Result<(usize, u64)> {
    let dir = HostDir::new(data_dir);
    if dir.secret()?.is_none() {
        anyhow::bail!("{} holds no cluster state (no secret)", data_dir.display());
    }
    let raft_dir = dir.raft_dir();
    let (state, _) = store::read_applied_state(&raft_dir).with_context(|| {
        format!(
            "reading {}: is the daemon still running?",
            raft_dir.display()
        )
    })?;
    // Keep the old store until the seed is safely written, then move it aside.
    dir.write_recover_state(&state)?;
    let aside = data_dir.join(format!(
        "raft.before-recovery.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    ));
    std::fs::rename(&raft_dir, &aside)
        .with_context(|| format!("moving {} aside", raft_dir.display()))?;
    Ok((state.apps.len(), state.revision))
}
