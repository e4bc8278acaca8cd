//! `flynn-host daemon`: one host's seat in the cluster.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use flynn_client::{BootstrapRequest, ErrorCode, HostClient, HostInfo, JoinRequest};
use flynn_raft::network::HttpNetwork;
use flynn_raft::openraft::BasicNode;
use flynn_raft::{store, NodeId, Raft};
use flynn_state::ClusterCommand;
use tokio::sync::mpsc;

use crate::component::{Components, LocalState};
use crate::components::firewall::{FirewallConfig, HostFirewall};
use crate::components::volumes::VolumesComponent;
use crate::components::{controller::ControllerRegistration, router::RouterComponent};
use crate::error::{ApiError, ApiResult};
use crate::hostdir::HostDir;
use crate::node::Node;
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

pub struct Host {
    pub dir: HostDir,
    pub id: NodeId,
    pub addr: String,
    port: u16,
    node: OnceLock<Arc<Node>>,
    /// Set while a quorum-loss recovery has not yet restored the saved state: the
    /// controller API answers 503 instead of serving the empty new cluster.
    recovering: std::sync::atomic::AtomicBool,
    start: tokio::sync::Mutex<()>,
    fatal: mpsc::UnboundedSender<anyhow::Error>,
    /// Asks the daemon to replace itself by the binary at this path (an in-place update).
    update: mpsc::UnboundedSender<std::path::PathBuf>,
    /// When this process image started (ms): an update shows as a new start.
    started_ms: u64,
    router: Option<Arc<RouterComponent>>,
    components: Components,
    volumes: Arc<VolumesComponent>,
    jobs: Option<Arc<crate::jobs::JobRunner>>,
    blobstore: Option<Arc<crate::blobstore::Blobstore>>,
    /// This host's own health lines, kept fresh in the background (the status page and
    /// peers asking read them at once).
    pub health: crate::api::status::HealthCache,
}

impl Host {
    pub fn info(&self) -> HostInfo {
        HostInfo {
            node_id: self.id,
            addr: self.addr.clone(),
            version: version().to_string(),
            initialized: self.node.get().is_some(),
            started_ms: self.started_ms,
        }
    }

    /// Replaces the daemon by `binary` once the current request is answered.
    pub fn request_update(&self, binary: std::path::PathBuf) {
        let _ = self.update.send(binary);
    }

    pub fn components(&self) -> &Components {
        &self.components
    }

    pub fn volumes(&self) -> &Arc<VolumesComponent> {
        &self.volumes
    }

    /// This host's blobstore, unless `--no-blobstore`.
    pub fn blobstore(&self) -> Option<&Arc<crate::blobstore::Blobstore>> {
        self.blobstore.as_ref()
    }

    /// The job runner, unless this host runs no jobs.
    pub fn jobs(&self) -> Option<&Arc<crate::jobs::JobRunner>> {
        self.jobs.as_ref()
    }

    pub fn is_recovering(&self) -> bool {
        self.recovering.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn node(&self) -> ApiResult<&Arc<Node>> {
        self.node.get().ok_or_else(|| {
            ApiError::Unavailable(
                "this host is not part of a cluster yet (run `flynn-host bootstrap`, or init it with the cluster secret to join)".into(),
            )
        })
    }

    /// Handles `POST /host/bootstrap` from `flynn-host bootstrap`.
    pub async fn accept_bootstrap(self: &Arc<Self>, req: BootstrapRequest) -> ApiResult<()> {
        let _guard = self.start.lock().await;
        if self.node.get().is_some() {
            return Err(ApiError::Conflict(format!(
                "host {} already belongs to a cluster",
                self.addr
            )));
        }
        if req.version != version() {
            return Err(ApiError::VersionMismatch(format!(
                "host {} runs version {}, but the bootstrapping cluster runs version {}",
                self.addr,
                version(),
                req.version
            )));
        }
        let is_member = req.members.contains_key(&self.id);
        if is_member && req.members.get(&self.id) != Some(&self.addr) {
            return Err(ApiError::Invalid(format!(
                "the member list names this host ({}) at another address than {}",
                self.id, self.addr
            )));
        }
        if req.secret.len() < 32 {
            return Err(ApiError::Invalid("the cluster secret is too short".into()));
        }
        self.dir
            .write_secret(&req.secret)
            .map_err(|e| ApiError::Internal(format!("saving the cluster secret: {e}")))?;
        let node = self
            .start_node(req.secret.clone())
            .await
            .map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        if !is_member {
            // More hosts than peers: this one joins the new cluster as a proxy.
            let peers = req.members.values().cloned().collect();
            tokio::spawn(self.clone().join(node, peers, req.secret));
            return Ok(());
        }
        if req.initializer == self.id {
            let members: BTreeMap<NodeId, BasicNode> = req
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            node.raft
                .initialize(members)
                .await
                .map_err(|e| ApiError::Internal(format!("initializing raft: {e}")))?;
            let command = ClusterCommand::Bootstrap {
                auth_key: req.auth_key.clone(),
                domain: req.domain.clone(),
                controller_certificate: req.controller_certificate.clone(),
                system_env: req.system_env.clone(),
            };
            tokio::spawn(async move {
                // Seeds the system apps; retried until some leader has it.
                loop {
                    match node.propose(command.clone()).await {
                        Ok(_) | Err(ApiError::Conflict(_)) => break,
                        Err(e) => tracing::warn!(error = %e, "bootstrap command not committed yet"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tracing::info!("cluster bootstrapped");
            });
        }
        Ok(())
    }

    async fn start_node(&self, secret: String) -> anyhow::Result<Arc<Node>> {
        if let Some(n) = self.node.get() {
            return Ok(n.clone());
        }
        let raft_dir = self.dir.raft_dir();
        let (log, sm) = store::open(&raft_dir)
            .with_context(|| format!("opening the raft store in {}", raft_dir.display()))?;
        let handle = sm.handle();
        let config = Arc::new(flynn_raft::raft_config().validate()?);
        let raft = Raft::new(self.id, config, HttpNetwork::new(secret.clone()), log, sm)
            .await
            .context("starting raft")?;
        let node = Node::new(self.id, self.addr.clone(), raft, handle, secret);
        let _ = self.node.set(node.clone());
        crate::metrics::follow_leader(node.raft.clone());
        self.components.follow(&LocalState::new(node.clone()));
        tokio::spawn(crate::leader::run(
            node.clone(),
            crate::leader::controllers(),
        ));
        tracing::info!(node_id = self.id, addr = %self.addr, "raft node started");
        Ok(node)
    }

    /// Asks the configured peers to admit this host as a proxy until one accepts.
    async fn join(self: Arc<Self>, node: Arc<Node>, peers: Vec<String>, secret: String) {
        let request = JoinRequest {
            node_id: self.id,
            addr: self.addr.clone(),
            version: version().to_string(),
        };
        loop {
            if node.role() != flynn_client::Role::None {
                return;
            }
            for peer in &peers {
                let url = if peer.contains(':') {
                    format!("http://{peer}")
                } else {
                    format!("http://{peer}:{}", self.port)
                };
                let client = HostClient::new(&url, Some(&secret), Duration::from_secs(20));
                match client.join(&request).await {
                    Ok(_) => {
                        tracing::info!(peer = %url, "joined the cluster as a proxy");
                        return;
                    }
                    Err(flynn_client::ClientError::Api {
                        code: ErrorCode::VersionMismatch | ErrorCode::Unauthorized,
                        message,
                        ..
                    }) => {
                        let _ = self
                            .fatal
                            .send(anyhow::anyhow!("cannot join the cluster: {message}"));
                        return;
                    }
                    Err(e) => tracing::warn!(peer = %url, error = %e, "join attempt failed"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Recovery from quorum loss: this host starts a new one-member cluster that holds the
    /// state it had applied (see `flynn-host recover`).
    async fn finish_recovery(self: Arc<Self>, node: Arc<Node>, state: flynn_state::ClusterState) {
        let members = BTreeMap::from([(self.id, BasicNode::new(&self.addr))]);
        if let Err(e) = node.raft.initialize(members).await {
            tracing::warn!(error = %e, "initialize during recovery (already done?)");
        }
        loop {
            match node
                .propose(flynn_state::Command::Restore {
                    state: Box::new(state.clone()),
                })
                .await
            {
                Ok(_) => break,
                Err(e) => tracing::warn!(error = %e, "restoring state not committed yet"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.recovering
            .store(false, std::sync::atomic::Ordering::SeqCst);
        match self.dir.remove_recover_state() {
            Ok(()) => tracing::info!("recovery finished: this host is the only peer; add hosts back as proxies and promote them"),
            Err(e) => tracing::error!(error = %e, "recovery applied, but recover.json could not be removed"),
        }
    }

    pub fn prometheus(&self) -> String {
        let firewall = self.components.prometheus();
        let mut out = String::new();
        // The data dir's filesystem: when it fills, Raft's log, blobs and volumes all stop.
        if let Ok(st) = nix::sys::statvfs::statvfs(self.dir.root()) {
            let unit = st.fragment_size();
            flynn_metrics::single(
                &mut out,
                "flynn_host_data_free_bytes",
                "gauge",
                "Bytes an unprivileged writer may still use on the data dir's filesystem.",
                st.blocks_available() * unit,
            );
            flynn_metrics::single(
                &mut out,
                "flynn_host_data_size_bytes",
                "gauge",
                "Size of the data dir's filesystem in bytes.",
                st.blocks() * unit,
            );
        }
        let mut gauge = |name: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        };
        let Some(node) = self.node.get() else {
            gauge(
                "flynn_host_in_cluster",
                "1 once the host belongs to a cluster",
                0,
            );
            return out + &firewall;
        };
        let m = node.metrics();
        let membership = m.membership_config.membership();
        gauge(
            "flynn_host_in_cluster",
            "1 once the host belongs to a cluster",
            1,
        );
        gauge("flynn_raft_term", "current Raft term", m.current_term);
        gauge(
            "flynn_raft_is_leader",
            "1 if this host leads",
            u64::from(node.is_leader()),
        );
        gauge(
            "flynn_raft_last_log_index",
            "index of the last log entry",
            m.last_log_index.unwrap_or(0),
        );
        gauge(
            "flynn_raft_last_applied_index",
            "index of the last applied entry",
            m.last_applied.map_or(0, |l| l.index),
        );
        gauge(
            "flynn_raft_voters",
            "voting peers in the membership",
            membership.voter_ids().count() as u64,
        );
        gauge(
            "flynn_raft_members",
            "peers and proxies in the membership",
            membership.nodes().count() as u64,
        );
        gauge(
            "flynn_cluster_revision",
            "cluster state revision applied here",
            node.state.read(|a| a.state.revision),
        );
        gauge(
            "flynn_raft_has_leader",
            "1 while this host knows a leader",
            u64::from(m.current_leader.is_some()),
        );
        // The cluster's jobs by state, as this host's state holds them (every host reports
        // the same cluster-wide view; dashboards take the max over hosts).
        let (by_state, apps) = node.state.read(|a| {
            let mut by: std::collections::BTreeMap<String, u64> = [
                "pending", "starting", "running", "stopping", "done", "crashed",
            ]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
            for j in a.state.jobs.jobs.values() {
                let name = serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                *by.entry(name).or_default() += 1;
            }
            (by, a.state.apps.len() as u64)
        });
        flynn_metrics::header(
            &mut out,
            "flynn_cluster_jobs",
            "gauge",
            "Jobs in the cluster state, by state.",
        );
        for (state, n) in &by_state {
            flynn_metrics::sample(&mut out, "flynn_cluster_jobs", &[("state", state)], n);
        }
        flynn_metrics::single(
            &mut out,
            "flynn_cluster_apps",
            "gauge",
            "Apps in the cluster.",
            apps,
        );
        crate::metrics::render(&mut out);
        out + &firewall
    }
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
    crate::api::serve::serve(listener, app, shutdown).await;
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
