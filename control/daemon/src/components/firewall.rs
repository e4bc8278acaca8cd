//! The host firewall component: attached at start to the configured external interfaces,
//! its policy following the cluster config.
//!
//! Policy = the flags' base policy, plus, once the host is in a cluster:
//! - every cluster host's address is internal (from the Raft membership);
//! - the router app's env: `FIREWALL_INTERNAL_PREFIXES` (more internal prefixes) and
//!   `FIREWALL_TCP_PORTS` (replaces the allowed TCP set), else 80, 443 and the router's
//!   `TCP_PORT_RANGE`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use flynn_xdp::{CounterRow, Firewall, Mode, Policy};
use futures::future::BoxFuture;
use serde::Serialize;

use crate::component::{Component, LocalState};

/// XDP firewall flags of `flynn-host daemon`. With interfaces given, the host filters them;
/// the cluster config (router app env) extends these once the host is in a cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct FirewallArgs {
    /// External interfaces to filter (comma-separated or repeated).
    #[arg(long = "firewall-iface", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// TCP ports open to new connections from outside.
    #[arg(long = "firewall-tcp-ports", default_value = "80,443,3000-3500")]
    pub tcp_ports: String,
    /// UDP ports open to anyone.
    #[arg(long = "firewall-udp-ports", default_value = "")]
    pub udp_ports: String,
    /// Sources never filtered (ADDR/LEN, comma-separated); cluster hosts are added.
    #[arg(long = "firewall-internal", default_value = "")]
    pub internal: String,
    /// New TCP connections per second per source (0: unlimited).
    #[arg(long = "firewall-syn-rate", default_value_t = 1000)]
    pub syn_rate: u32,
    #[arg(long = "firewall-syn-burst", default_value_t = 2000)]
    pub syn_burst: u32,
    /// Drop ICMP echo requests from outside.
    #[arg(long = "firewall-no-echo")]
    pub no_echo: bool,
    /// Drop non-first IP fragments from outside.
    #[arg(long = "firewall-drop-fragments")]
    pub drop_fragments: bool,
}

impl FirewallArgs {
    /// The firewall's config, `None` when no interface is to be filtered.
    pub fn validate(&self) -> anyhow::Result<Option<FirewallConfig>> {
        if self.ifaces.is_empty() {
            return Ok(None);
        }
        let base = Policy {
            tcp_ports: Policy::parse_ports(&self.tcp_ports)?,
            udp_ports: Policy::parse_ports(&self.udp_ports)?,
            internal_prefixes: Policy::parse_prefixes(&self.internal)?,
            syn_rate: self.syn_rate,
            syn_burst: self.syn_burst,
            allow_echo: !self.no_echo,
            pass_fragments: !self.drop_fragments,
            ..Policy::default()
        };
        Ok(Some(FirewallConfig {
            interfaces: self.ifaces.clone(),
            base,
        }))
    }
}

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

    pub fn report(&self) -> FirewallStatus {
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

    pub fn metrics_text(&self) -> String {
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
pub fn cluster_policy(base: &Policy, local: &LocalState) -> Policy {
    let mut policy = base.clone();
    for (_, addr) in local.members() {
        let ip = addr.rsplit_once(':').map_or(addr.as_str(), |(ip, _)| ip);
        if let Ok(ip) = ip.trim_matches(['[', ']']).parse::<IpAddr>() {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            policy.internal_prefixes.push((ip, len));
        }
    }
    let router_env = local.read(|s| s.apps.get("router").map(|r| r.env.global.clone()));
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

impl Component for HostFirewall {
    fn name(&self) -> &'static str {
        "firewall"
    }

    /// Keeps the maps equal to what the cluster config asks for, on every applied change
    /// (router env, membership).
    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut changes = local.changes();
            loop {
                self.apply(&cluster_policy(&self.base, &local));
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.report()).unwrap_or_default()
    }

    fn prometheus(&self) -> String {
        self.metrics_text()
    }

    /// Healthy while attached to an interface and its counters can be read from the kernel.
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<flynn_client::ComponentHealth>> {
        Box::pin(async move {
            let fw = self.fw.lock().expect("firewall lock");
            let interfaces: Vec<String> = fw
                .interfaces()
                .into_iter()
                .map(|(name, mode)| format!("{name} ({mode:?})"))
                .collect();
            let counters = fw.counters();
            let ok = !interfaces.is_empty() && counters.is_ok();
            Some(flynn_client::ComponentHealth::from_check(
                ok,
                serde_json::json!({
                    "interfaces": interfaces,
                    "error": counters.err().map(|e| e.to_string()),
                }),
            ))
        })
    }

    /// A stopped host must not keep filtering with a policy nobody maintains.
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.detach() })
    }
}
