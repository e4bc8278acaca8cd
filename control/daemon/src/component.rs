//! Host components: the parts of flynn-host that run on every host from that host's own
//! applied state: the router, the firewall, volumes, the blobstore, the job runner and the
//! controller's registration.
//!
//! A component is built from its config before the API serves (so a port in use or an
//! interface that cannot be filtered stops the daemon at start), then follows its host's
//! applied state once the host is in a cluster, through [`LocalState`]: one subscription to
//! applied changes, no polling, and no HTTP call to its own host, so it needs no controller
//! key and rotating keys cannot cut it off.
//!
//! Adding a component: a module in `components/` with a clap `Args` struct (its flags and
//! defaults) and `validate()` into its config; a type implementing [`Component`]; one line
//! in `daemon::run` that builds it from the daemon's config and adds it to [`Components`].
//! The host's own health lines, measured in the background from every component's
//! `health()`, are kept here too ([`HealthCache`]).

use std::sync::Arc;

use flynn_client::{ComponentHealth, HostHealth, WatchLine};
use flynn_raft::NodeId;
use flynn_state::ClusterState;
use futures::future::BoxFuture;

use crate::node::Node;

pub trait Component: Send + Sync + 'static {
    /// Its name in `/host/components`, logs and metrics.
    fn name(&self) -> &'static str;

    /// Follows the host's applied state for as long as the daemon runs. Started once the
    /// host belongs to a cluster.
    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()>;

    /// What it is doing, for `/host/components` and `flynn-host status`.
    fn status(&self) -> serde_json::Value;

    /// Prometheus text, appended to the daemon's `/metrics`.
    fn prometheus(&self) -> String {
        String::new()
    }

    /// This component's line on the status page, checked now (`None`: not listed). The
    /// caller bounds the time: a check that hangs shows as unhealthy.
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<ComponentHealth>> {
        Box::pin(async { None })
    }

    /// Stops on daemon shutdown: drains, detaches, deregisters.
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A host's view of its own applied state, as components read it.
#[derive(Clone)]
pub struct LocalState {
    node: Arc<Node>,
}

impl LocalState {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        LocalState { node }
    }

    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        self.node.state.read(|a| f(&a.state))
    }

    /// Wakes on every change of the applied state (entries, snapshots, membership). The
    /// current value counts as seen: call `changed()` after reading.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.node.state.changes()
    }

    /// The data-plane change stream after `since` (0: a reset and the full state first).
    pub fn watch_lines(&self, since: u64) -> tokio::sync::mpsc::Receiver<WatchLine> {
        crate::watch::stream(self.node.clone(), since)
    }

    /// Every member host (peers and proxies): node id and host API address.
    pub fn members(&self) -> Vec<(NodeId, String)> {
        self.node.members()
    }

    /// This host's Raft node, for components that write (through the leader).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

/// The components a host runs.
#[derive(Default)]
pub struct Components {
    list: Vec<Arc<dyn Component>>,
}

impl Components {
    pub fn add(&mut self, c: Arc<dyn Component>) {
        self.list.push(c);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|c| c.name()).collect()
    }

    /// Starts every component following `local`, each in its own task.
    pub fn follow(&self, local: &LocalState) {
        for c in &self.list {
            tracing::info!(component = c.name(), "following the host's state");
            tokio::spawn(c.clone().follow(local.clone()));
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .list
            .iter()
            .map(|c| (c.name().to_string(), c.status()))
            .collect();
        serde_json::Value::Object(map)
    }

    pub fn status_of(&self, name: &str) -> Option<serde_json::Value> {
        self.list
            .iter()
            .find(|c| c.name() == name)
            .map(|c| c.status())
    }

    pub fn prometheus(&self) -> String {
        self.list.iter().map(|c| c.prometheus()).collect()
    }

    /// Every listed component's health, each check bounded by `limit`.
    pub async fn health(&self, limit: std::time::Duration) -> HostHealth {
        let checks = self.list.iter().map(|c| {
            let c = c.clone();
            async move {
                let name = c.name().to_string();
                match tokio::time::timeout(limit, c.health()).await {
                    Ok(h) => h.map(|h| (name, h)),
                    Err(_) => Some((
                        name,
                        ComponentHealth::unhealthy(serde_json::json!(format!(
                            "no answer within {} ms",
                            limit.as_millis()
                        ))),
                    )),
                }
            }
        });
        futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stops every component, in reverse order of starting.
    pub async fn stop(&self) {
        for c in self.list.iter().rev() {
            c.clone().stop().await;
        }
    }
}

/// A host's own health lines and when they were measured.
#[derive(Default)]
pub struct HealthCache(std::sync::Mutex<Option<(flynn_client::HostHealth, std::time::Instant)>>);

impl HealthCache {
    /// The lines, unless they are older than `stale`.
    pub fn fresh(&self, stale: std::time::Duration) -> Option<flynn_client::HostHealth> {
        let last = self.0.lock().expect("health cache");
        last.as_ref()
            .filter(|(_, at)| at.elapsed() < stale)
            .map(|(h, _)| h.clone())
    }

    pub fn store(&self, h: flynn_client::HostHealth) {
        *self.0.lock().expect("health cache") = Some((h, std::time::Instant::now()));
    }
}
