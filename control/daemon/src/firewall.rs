//! The host firewall as the daemon runs it: attached at start to the configured external
//! interfaces, its policy following the cluster config.
//!
//! Policy = the flags' base policy, plus, once the host is in a cluster:
//! - every cluster host's address is internal (from the Raft membership);
//! - the router app's env: `FIREWALL_INTERNAL_PREFIXES` (more internal prefixes) and
//!   `FIREWALL_TCP_PORTS` (replaces the allowed TCP set), else 80, 443 and the router's
//!   `TCP_PORT_RANGE`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_xdp::{CounterRow, Firewall, Mode, Policy};
use serde::Serialize;

use crate::daemon::Host;

#[derive(Debug, Clone)]
pub struct FirewallConfig {
    pub interfaces: Vec<String>,
    pub base: Policy,
}

pub struct HostFirewall {
    fw: Mutex<Firewall>,
    base: Policy,
}

#[derive(Debug, Serialize)]
pub struct FirewallStatus {
    pub enabled: bool,
    pub interfaces: Vec<InterfaceStatus>,
    pub policy: Option<Policy>,
    pub counters: Vec<CounterRow>,
}

#[derive(Debug, Serialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub mode: Mode,
}

impl HostFirewall {
    /// Loads, applies the base policy and attaches to every interface; any failure is fatal
    /// (a host that was told to filter must not run unfiltered).
    pub fn start(cfg: &FirewallConfig) -> anyhow::Result<Self> {
        let mut fw = Firewall::load()?;
        fw.set_policy(&cfg.base)?;
        for iface in &cfg.interfaces {
            let mode = fw.attach(iface)?;
            tracing::info!(%iface, ?mode, "XDP firewall attached");
        }
        Ok(HostFirewall {
            fw: Mutex::new(fw),
            base: cfg.base.clone(),
        })
    }

    pub fn status(&self) -> FirewallStatus {
        let fw = self.fw.lock().expect("firewall lock");
        FirewallStatus {
            enabled: true,
            interfaces: fw
                .interfaces()
                .into_iter()
                .map(|(name, mode)| InterfaceStatus { name, mode })
                .collect(),
            policy: Some(fw.policy().clone()),
            counters: fw.counters().unwrap_or_default(),
        }
    }

    /// Detaches from every interface (on shutdown: a stopped host must not keep filtering
    /// with a policy nobody maintains).
    pub fn detach(&self) {
        self.fw.lock().expect("firewall lock").detach_all();
        tracing::info!("XDP firewall detached");
    }

    pub fn prometheus(&self) -> String {
        self.fw
            .lock()
            .expect("firewall lock")
            .prometheus()
            .unwrap_or_default()
    }

    fn apply(&self, policy: &Policy) {
        let mut fw = self.fw.lock().expect("firewall lock");
        if fw.policy() == policy {
            return;
        }
        match fw.set_policy(policy) {
            Ok(()) => tracing::info!(?policy, "firewall policy updated"),
            Err(e) => tracing::error!(error = %e, "firewall policy not applied"),
        }
    }
}

/// The policy the cluster config asks for, on top of `base`.
pub fn cluster_policy(base: &Policy, host: &Host) -> Policy {
    let mut policy = base.clone();
    let Ok(node) = host.node() else {
        return policy;
    };
    let m = node.metrics();
    for (_, n) in m.membership_config.membership().nodes() {
        let ip = n
            .addr
            .rsplit_once(':')
            .map_or(n.addr.as_str(), |(ip, _)| ip);
        if let Ok(ip) = ip.trim_matches(['[', ']']).parse::<IpAddr>() {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            policy.internal_prefixes.push((ip, len));
        }
    }
    let router_env = node
        .state
        .read(|a| a.state.apps.get("router").map(|r| r.env.global.clone()));
    if let Some(env) = router_env {
        if let Some(v) = env.get("FIREWALL_INTERNAL_PREFIXES") {
            match Policy::parse_prefixes(v) {
                Ok(p) => policy.internal_prefixes.extend(p),
                Err(e) => tracing::warn!(error = %e, "ignoring router FIREWALL_INTERNAL_PREFIXES"),
            }
        }
        let ports = match env.get("FIREWALL_TCP_PORTS") {
            Some(v) => Some(v.clone()),
            None => env.get("TCP_PORT_RANGE").map(|r| format!("80,443,{r}")),
        };
        if let Some(v) = ports {
            match Policy::parse_ports(&v) {
                Ok(p) => policy.tcp_ports = p,
                Err(e) => tracing::warn!(error = %e, "ignoring router firewall ports"),
            }
        }
    }
    policy.internal_prefixes.sort();
    policy.internal_prefixes.dedup();
    policy
}

/// Keeps the maps equal to what the cluster config asks for.
pub async fn follow_cluster(host: Arc<Host>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Some(fw) = host.firewall() {
            fw.apply(&cluster_policy(&fw.base, &host));
        }
    }
}
