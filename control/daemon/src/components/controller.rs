//! The host API's registration in discovery: every host serves the controller API and the
//! status page, and registers its API as an instance of services `controller` and `status`,
//! so the routes `controller.$CLUSTER_DOMAIN` and `status.$CLUSTER_DOMAIN` made at
//! bootstrap reach it through any host's router.

use std::sync::Arc;
use std::time::Duration;

use flynn_state::DiscoveryCommand;
use futures::future::BoxFuture;

use crate::component::{Component, LocalState};

/// The services the host API registers as.
pub const SERVICES: [&str; 2] = ["controller", STATUS_SERVICE];
/// The service `status.$CLUSTER_DOMAIN` routes to (the status page, on every host's API).
pub const STATUS_SERVICE: &str = "status";
/// An instance not heard from for this long is dropped by the leader.
const TTL: Duration = Duration::from_secs(15);
const HEARTBEAT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(250);

pub struct ControllerRegistration {
    /// Instance id: this host's node id.
    id: String,
    /// Where the controller API answers (`IP:PORT`).
    addr: String,
    local: std::sync::OnceLock<LocalState>,
}

impl ControllerRegistration {
    pub fn new(node_id: u64, addr: String) -> Self {
        ControllerRegistration {
            id: flynn_state::host_instance_id(node_id),
            addr,
            local: std::sync::OnceLock::new(),
        }
    }

    fn register(&self) -> flynn_state::Command {
        let now_ms = crate::now_ms();
        flynn_state::Command::Batch {
            commands: SERVICES
                .iter()
                .map(|service| {
                    DiscoveryCommand::RegisterInstance {
                        service: service.to_string(),
                        id: self.id.clone(),
                        addr: self.addr.clone(),
                        meta: Default::default(),
                        ttl_ms: TTL.as_millis() as u64,
                        now_ms,
                    }
                    .into()
                })
                .collect(),
        }
    }
}

impl Component for ControllerRegistration {
    fn name(&self) -> &'static str {
        "controller-registration"
    }

    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        let _ = self.local.set(local.clone());
        Box::pin(async move {
            // Registered as soon as the cluster exists (bootstrap waits for it), then
            // refreshed every heartbeat.
            let mut changes = local.changes();
            while !local.read(|s| s.bootstrapped()) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
            loop {
                // Registering again refreshes the TTL and keeps the instance's seniority. A
                // registration not applied (no leader yet, say) is tried again soon.
                let next = match local.node().propose(self.register()).await {
                    Ok(_) => HEARTBEAT,
                    Err(e) => {
                        tracing::debug!(error = %e, "controller registration not applied");
                        RETRY
                    }
                };
                tokio::time::sleep(next).await;
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({"services": SERVICES, "id": self.id, "addr": self.addr})
    }

    /// Leaves discovery at once, so routers stop sending here before the API closes.
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Some(local) = self.local.get() else {
                return;
            };
            let deregister = flynn_state::Command::Batch {
                commands: SERVICES
                    .iter()
                    .map(|service| {
                        DiscoveryCommand::Deregister {
                            service: service.to_string(),
                            id: self.id.clone(),
                        }
                        .into()
                    })
                    .collect(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), local.node().propose(deregister))
                .await;
        })
    }
}
