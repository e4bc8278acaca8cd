//! The host: this process's seat in the cluster (its Raft node once it has one) and the
//! components it runs. The API serves from it; [`crate::daemon::run`] builds it.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use flynn_client::{BootstrapRequest, ErrorCode, HostClient, HostInfo, JoinRequest};
use flynn_raft::network::HttpNetwork;
use flynn_raft::openraft::BasicNode;
use flynn_raft::{store, NodeId, Raft};
use flynn_state::ClusterCommand;
use tokio::sync::mpsc;

use crate::component::{Components, HealthCache, LocalState};
use crate::components::router::RouterComponent;
use crate::components::volumes::VolumesComponent;
use crate::error::{ApiError, ApiResult};
use crate::hostdir::HostDir;
use crate::node::Node;
use crate::version;

pub struct Host {
    pub dir: HostDir,
    pub id: NodeId,
    pub addr: String,
    pub(crate) port: u16,
    pub(crate) node: OnceLock<Arc<Node>>,
    /// Set while a quorum-loss recovery has not yet restored the saved state: the
    /// controller API answers 503 instead of serving the empty new cluster.
    pub(crate) recovering: std::sync::atomic::AtomicBool,
    pub(crate) start: tokio::sync::Mutex<()>,
    pub(crate) fatal: mpsc::UnboundedSender<anyhow::Error>,
    /// Asks the daemon to replace itself by the binary at this path (an in-place update).
    pub(crate) update: mpsc::UnboundedSender<std::path::PathBuf>,
    /// When this process image started (ms): an update shows as a new start.
    pub(crate) started_ms: u64,
    pub(crate) router: Option<Arc<RouterComponent>>,
    pub(crate) components: Components,
    pub(crate) volumes: Arc<VolumesComponent>,
    pub(crate) jobs: Option<Arc<crate::jobs::JobRunner>>,
    pub(crate) blobstore: Option<Arc<crate::blobstore::Blobstore>>,
    /// This host's own health lines, kept fresh in the background (the status page and
    /// peers asking read them at once).
    pub health: HealthCache,
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

    pub(crate) async fn start_node(&self, secret: String) -> anyhow::Result<Arc<Node>> {
        if let Some(n) = self.node.get() {
            return Ok(n.clone());
        }
        let raft_dir = self.dir.raft_dir();
        let (log, sm) = store::open(&raft_dir)
            .with_context(|| format!("opening the raft store in {}", raft_dir.display()))?;
        let log = log.for_node(self.id);
        let handle = sm.handle();
        let config = Arc::new(flynn_raft::raft_config().validate()?);
        let network = HttpNetwork::new(secret.clone());
        let lease = network.lease();
        let raft = Raft::new(self.id, config, network, log, sm)
            .await
            .context("starting raft")?;
        let node = Node::new(self.id, self.addr.clone(), raft, handle, secret, lease);
        let _ = self.node.set(node.clone());
        crate::metrics::follow_leader(node.raft.clone());
        self.components.follow(&LocalState::new(node.clone()));
        tokio::spawn(crate::leader::run(node.clone(), leader_controllers()));
        tracing::info!(node_id = self.id, addr = %self.addr, "raft node started");
        Ok(node)
    }

    /// Asks the configured peers to admit this host as a proxy until one accepts.
    pub(crate) async fn join(self: Arc<Self>, node: Arc<Node>, peers: Vec<String>, secret: String) {
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
    pub(crate) async fn finish_recovery(
        self: Arc<Self>,
        node: Arc<Node>,
        state: flynn_state::ClusterState,
    ) {
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
        // The host's load, beside its size: what the dashboard's host charts show.
        if let Ok(text) = std::fs::read_to_string("/proc/loadavg") {
            if let Some(load1) = text.split_whitespace().next() {
                flynn_metrics::single(
                    &mut out,
                    "flynn_host_load1",
                    "gauge",
                    "The host's load average over one minute (/proc/loadavg).",
                    load1,
                );
            }
        }
        flynn_metrics::single(
            &mut out,
            "flynn_host_cpus",
            "gauge",
            "CPUs this host's processes may run on.",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        let mut gauge = |name: &str, help: &str, value: u64| {
            flynn_metrics::single(&mut out, name, "gauge", help, value);
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
            "flynn_raft_purged_index",
            "index of the last entry purged from the log: a peer behind it catches up from a snapshot",
            m.purged.map_or(0, |l| l.index),
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
        if let Some(jobs) = &self.jobs {
            jobs.render_usage(&mut out);
        }
        crate::metrics::render(&mut out);
        out + &firewall
    }
}

/// Every leader controller, in the order they run: discovery upkeep, then the scheduler.
fn leader_controllers() -> Vec<Box<dyn crate::leader::LeaderController>> {
    let mut all = crate::leader::discovery_controllers();
    all.push(Box::new(crate::jobs::scheduler::Scheduler::default()));
    all.push(Box::new(crate::databases::failover::Failover::default()));
    all
}
