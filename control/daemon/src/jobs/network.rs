//! Job networking: every job gets its own network namespace and address on one of its
//! host's subnets (`100.100.N.0/24`, N claimed in the cluster state), routed between hosts.
//! A host starts with one subnet (253 jobs) and claims extra ones as it fills (up to
//! `MAX_SUBNETS_PER_HOST`), giving back an extra one when no job has an address on it.
//!
//! Each job's namespace is joined to the host by a point-to-point veth (no bridge): the
//! job has `100.100.N.K/32` with the host side as its gateway (`100.100.N.1`), and the host
//! routes `100.100.N.K/32` to that veth. So traffic between two jobs, even on one host, is
//! routed through the host, where an nftables chain lets in only connections to a job's
//! published port (`$PORT`) and drops new connections to any other port of a job. Other
//! hosts' subnets are reached one of two ways ([`Overlay`]): routed via those hosts'
//! addresses (hosts on one network, as flannel's host-gw backend assumes), or through a
//! VXLAN device (hosts in different subnets, as flannel's vxlan backend does: each host's
//! VTEP has a MAC made from its subnet index, so no state is exchanged beyond the host
//! addresses the cluster already holds). Traffic from a job to anything that is not a job
//! leaves with its host's address (masquerade), so jobs reach networks beyond the cluster
//! (package mirrors, databases, APIs) that have no route back to job subnets.
//!
//! Databases are reached at stable service addresses (`100.100.0.0/24`, which no host's
//! subnet takes): every host rewrites a connection to one (`dnat`) to the current leader of
//! its service, so `DATABASE_URL` never changes when the primary moves.
//!
//! A job's own network (namespace, veth, addresses, routes, published port) is made and
//! removed in process over netlink (`flynn-netlink`): spawning `ip` twice and `nft` once
//! cost about 10 ms of every job's start. What is done once per host (the nftables table,
//! the VXLAN device, routes to other hosts) is done with `ip` and `nft`, as an operator
//! would; without them (or where they fail at start) jobs use the host's network and the
//! host says so.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use super::addresses::{index_of, JobAddresses};
use flynn_netlink::{concat_key, delete_netns, Ipv4Route, Netns, Nftables, Rtnl, VethEnd};

/// Every host's job subnet lies in this range; traffic between jobs keeps its addresses.
const JOB_NETWORK: &str = "100.100.0.0/16";

/// Where service addresses live; no host's job subnet is index 0.
const SERVICE_NETWORK: &str = "100.100.0.0/24";

/// The port a job with its own address serves on (as Flynn's jobs did).
pub const JOB_PORT: u16 = 8080;

/// The VXLAN device of a host's job network.
const VXLAN_DEV: &str = "flynnvx";
/// The VXLAN network id and UDP port (IANA's) of the job network.
const VXLAN_ID: u32 = 1;
const VXLAN_PORT: u16 = 4789;
/// A VXLAN packet carries 50 bytes of headers: jobs' interfaces leave room for them.
const VXLAN_MTU: u32 = 1450;

/// How a host reaches other hosts' job subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    /// Routes via the other hosts' addresses: every host on one network.
    HostRoutes,
    /// Through a VXLAN device to every other host.
    Vxlan,
    /// Per host: a route where it is on this host's network, VXLAN where it is not.
    Auto,
}

/// How one other host's subnet is reached now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerRoute {
    Via(String),
    /// Through the VTEP of that host's first subnet, at its address.
    Vxlan {
        ip: String,
        vtep: u32,
    },
}

impl PeerRoute {
    /// Whether it goes to the host at `ip` (through its VTEP `vtep`, over VXLAN).
    fn reaches(&self, ip: &str, vtep: u32) -> bool {
        match self {
            PeerRoute::Via(via) => via == ip,
            PeerRoute::Vxlan { ip: to, vtep: v } => to == ip && *v == vtep,
        }
    }
}

/// Another host's subnet: its address and its first subnet's index (its VTEP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ip: String,
    pub vtep: u32,
}

/// The VTEP MAC of the host with subnet `index`: locally administered, unicast, and the
/// same on every host that computes it.
fn vtep_mac(index: u32) -> String {
    format!(
        "0a:64:64:{:02x}:{:02x}:01",
        (index >> 8) & 0xff,
        index & 0xff
    )
}

/// The VTEP address of the host with subnet `index` (its subnet's `.0`, unused by jobs).
fn vtep_ip(index: u32) -> String {
    format!("100.100.{index}.0")
}

/// Whether `ip` is on one of this host's networks (reached without a gateway).
fn on_link(ip: &str) -> bool {
    Command::new("ip")
        .args(["-o", "route", "get", ip])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !String::from_utf8_lossy(&o.stdout).contains(" via "))
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip [OPTS] -batch -` with one command per line; the first failure fails it.
fn ip_batch(opts: &[&str], commands: &str) -> Result<(), String> {
    piped("ip", &[opts, &["-batch", "-"]].concat(), commands)
}

fn nft(script: &str) -> Result<(), String> {
    piped("nft", &["-f", "-"], script)
}

fn piped(program: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{program}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Job namespaces of one host are named by this prefix, so a restarted daemon finds its own.
fn netns_prefix(host: u64) -> String {
    format!("flynn-{:08x}-", host & 0xffff_ffff)
}

/// Removes what a daemon that died left behind: the namespaces and veths of its jobs that
/// died with it, not those of `kept` (jobs that outlived it). A job's veth is named by its
/// namespace's tag, so only this host's are touched: hosts sharing one network namespace
/// (the bench's, on one machine) each have jobs' veths there.
fn sweep(host: u64, kept: &[JobNet]) {
    let prefix = netns_prefix(host);
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let mut rtnl = Rtnl::open().ok();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(tag) = name.strip_prefix(&prefix) else {
            continue;
        };
        if kept.iter().any(|k| k.netns == name) {
            continue;
        }
        if let Some(rtnl) = rtnl.as_mut() {
            let _ = rtnl.delete_link(&host_veth(tag));
        }
        let _ = delete_netns(&e.path());
    }
}

/// The host's end of the veth of the job whose namespace has `tag`.
fn host_veth(tag: &str) -> String {
    format!("fj{}", tag.get(..12).unwrap_or(tag))
}

/// The host's VTEP: a VXLAN device with the MAC and address other hosts compute for
/// subnet `index`, sending from `own_ip` (made again if it is there: a restarted daemon
/// finds its predecessor's, routes and all).
fn vxlan_device(index: u32, own_ip: &str) -> Result<(), String> {
    let mac = vtep_mac(index);
    let shown = Command::new("ip")
        .args(["-d", "-o", "link", "show", VXLAN_DEV])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let same = shown.contains(&format!("vxlan id {VXLAN_ID} "))
        && shown.contains(&format!("local {own_ip} "))
        && shown.contains(&mac);
    if same {
        // Kept as it is: jobs that outlived the previous daemon talk through it now.
        return ip_batch(
            &[],
            &format!(
                "addr replace {}/32 dev {VXLAN_DEV}\nlink set {VXLAN_DEV} up\n",
                vtep_ip(index)
            ),
        )
        .map_err(|e| format!("the VXLAN device: {e}"));
    }
    let _ = sh(&["ip", "link", "del", VXLAN_DEV]);
    ip_batch(
        &[],
        &format!(
            "link add {VXLAN_DEV} type vxlan id {VXLAN_ID} dstport {VXLAN_PORT} local {own_ip} nolearning\n\
             link set {VXLAN_DEV} address {mac} mtu {VXLAN_MTU}\n\
             addr add {vtep}/32 dev {VXLAN_DEV}\n\
             link set {VXLAN_DEV} up\n",
            vtep = vtep_ip(index),
        ),
    )
    .map_err(|e| format!("making the VXLAN device: {e}"))
}

/// The MACs of a job's veth pair, made from its address: the job's end, then the host's
/// (locally administered, unicast, unique while addresses are).
fn job_macs(ip: Ipv4Addr) -> ([u8; 6], [u8; 6]) {
    let [a, b, c, d] = ip.octets();
    ([0x0a, 0x58, a, b, c, d], [0x0a, 0x59, a, b, c, d])
}

pub fn subnet_of(index: u32) -> String {
    format!("100.100.{index}.0/24")
}

/// A host's subnet index is 1 to 254 (0 holds the service addresses).
fn check_index(index: u32) -> Result<(), String> {
    if (1..=254).contains(&index) {
        Ok(())
    } else {
        Err(format!("subnet index {index} is out of range"))
    }
}

/// The filter table's set of this host's subnets, as nft writes its elements.
fn subnet_elements(indexes: impl IntoIterator<Item = u32>) -> String {
    indexes
        .into_iter()
        .map(subnet_of)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One job's network: its namespace (by name under /run/netns) and address.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobNet {
    pub netns: String,
    pub ip: Ipv4Addr,
    host_veth: String,
    published: Option<u16>,
}

impl JobNet {
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

/// This host's job network.
pub struct HostNet {
    host: u64,
    /// The first subnet's index: the VTEP's address and MAC, and the filter table's name.
    index: u32,
    table: String,
    /// The host's subnets and the addresses its jobs hold.
    addresses: Mutex<JobAddresses>,
    routes: Mutex<BTreeMap<u32, PeerRoute>>,
    services: Mutex<ServiceMap>,
    overlay: Overlay,
    /// The VXLAN device is up (with `Overlay::Auto` it may not be: then host routes only).
    vxlan: bool,
}

/// Service address → the address of the instance serving it now.
pub type ServiceMap = BTreeMap<(Ipv4Addr, u16), (Ipv4Addr, u16)>;

impl HostNet {
    /// Sets up forwarding, the VXLAN device the overlay needs (at `own_ip`), and the host's
    /// filter for its first subnet `index` and its `extra` ones, keeping the networks of
    /// `kept` (jobs that outlived the previous daemon, on these subnets).
    pub fn start(
        host: u64,
        index: u32,
        extra: &[u32],
        kept: &[JobNet],
        overlay: Overlay,
        own_ip: &str,
    ) -> Result<Self, String> {
        for i in std::iter::once(index).chain(extra.iter().copied()) {
            check_index(i)?;
        }
        let mut addresses = JobAddresses::new(index, extra);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("enabling IP forwarding: {e}"))?;
        let kept: Vec<JobNet> = kept
            .iter()
            .filter(|k| index_of(k.ip).is_some_and(|i| addresses.holds(i)))
            .cloned()
            .collect();
        sweep(host, &kept);
        let table = format!("flynn_jobs_{index}");
        // Replaced whole on every start, in one transaction (no rule of a previous run
        // survives, and jobs still running are never unfiltered): the published ports of
        // kept jobs go in with it.
        let published: String = kept
            .iter()
            .filter_map(|k| {
                k.published.map(|port| {
                    format!(
                        "add element inet {table} published {{ {} . {port} }}\n",
                        k.ip
                    )
                })
            })
            .collect();
        nft(&format!(
            "table inet {table} {{}}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
               set published {{ type ipv4_addr . inet_service; }}\n\
               map services {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; }}\n\
               set subnets {{ type ipv4_addr; flags interval; elements = {{ {elements} }}; }}\n\
               chain forward {{\n\
                 type filter hook forward priority 0; policy accept;\n\
                 ct state established,related accept\n\
                 ip daddr . tcp dport @published accept\n\
                 ip daddr @subnets ct state new drop\n\
               }}\n\
               chain prerouting {{\n\
                 type nat hook prerouting priority dstnat; policy accept;\n\
                 ip daddr {SERVICE_NETWORK} dnat ip to ip daddr . tcp dport map @services\n\
               }}\n\
               chain output {{\n\
                 type nat hook output priority -100; policy accept;\n\
                 ip daddr {SERVICE_NETWORK} dnat ip to ip daddr . tcp dport map @services\n\
               }}\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr @subnets ip daddr != {JOB_NETWORK} masquerade\n\
               }}\n\
             }}\n\
             {published}",
            elements = subnet_elements(addresses.indexes()),
        ))?;
        for k in &kept {
            addresses.mark(k.ip);
        }
        let vxlan = match overlay {
            Overlay::HostRoutes => false,
            Overlay::Vxlan => {
                vxlan_device(index, own_ip)?;
                true
            }
            Overlay::Auto => match vxlan_device(index, own_ip) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "no VXLAN device: hosts in other subnets cannot reach this host's jobs");
                    false
                }
            },
        };
        Ok(HostNet {
            host,
            index,
            table,
            addresses: Mutex::new(addresses),
            routes: Mutex::new(BTreeMap::new()),
            services: Mutex::new(ServiceMap::new()),
            overlay,
            vxlan,
        })
    }

    /// How other hosts' jobs are reached, as `flynn-host components` says it: the mode,
    /// and in `auto` how many hosts each way.
    pub fn overlay(&self) -> serde_json::Value {
        // Routes are per subnet; a host with extra subnets counts once.
        let (mut by_route, mut by_vxlan) = (BTreeSet::new(), BTreeSet::new());
        for route in self.routes.lock().expect("routes lock").values() {
            match route {
                PeerRoute::Via(ip) => by_route.insert(ip.clone()),
                PeerRoute::Vxlan { ip, .. } => by_vxlan.insert(ip.clone()),
            };
        }
        let mode = match self.overlay {
            Overlay::HostRoutes => "host-routes",
            Overlay::Vxlan => "vxlan",
            Overlay::Auto => "auto",
        };
        serde_json::json!({
            "mode": mode,
            "vxlan_device": self.vxlan.then_some(VXLAN_DEV),
            "hosts_by_route": by_route.len(),
            "hosts_by_vxlan": by_vxlan.len(),
        })
    }

    /// The host's first subnet.
    pub fn subnet(&self) -> String {
        subnet_of(self.index)
    }

    fn addresses(&self) -> std::sync::MutexGuard<'_, JobAddresses> {
        self.addresses.lock().expect("addresses lock")
    }

    /// The host's subnets' indexes, lowest first.
    pub fn indexes(&self) -> Vec<u32> {
        self.addresses().indexes()
    }

    /// How many jobs with addresses of their own the host says it holds (a subnet on its
    /// way back does not count).
    pub fn capacity(&self) -> u64 {
        self.addresses().capacity()
    }

    /// Takes up the subnets among `indexes` the host does not have yet (claimed in the
    /// state just now): filtered as its own, and no longer routed elsewhere (a subnet
    /// given back by another host may still be routed to it here).
    pub fn add_subnets(&self, indexes: &[u32]) -> Result<(), String> {
        for &index in indexes {
            check_index(index)?;
            {
                let mut addresses = self.addresses();
                if addresses.holds(index) {
                    // Perhaps leaving: it stays.
                    addresses.add(index);
                    continue;
                }
            }
            let subnet = subnet_of(index);
            nft(&format!(
                "add element inet {} subnets {{ {subnet} }}\n",
                self.table
            ))?;
            let mut routes = self.routes.lock().expect("routes lock");
            routes.remove(&index);
            // No route is the usual case: nothing to tell.
            let _ = sh(&["ip", "route", "del", &subnet]);
            self.addresses().add(index);
            drop(routes);
            tracing::info!(subnet = %subnet, "this host's jobs have another subnet");
        }
        Ok(())
    }

    /// Starts giving back an extra subnet no job has an address on: left out of the
    /// capacity from now on, used only when the others are full. Which one, if any.
    pub fn start_leaving(&self) -> Option<u32> {
        self.addresses().start_leaving()
    }

    /// Keeps the subnet that was leaving.
    pub fn stay(&self) {
        self.addresses().stay();
    }

    /// Drops the leaving subnet if no job took an address on it meanwhile (no job gets
    /// one on it from now on); which one, if it was dropped.
    pub fn finish_leaving(&self) -> Option<u32> {
        let index = self.addresses().finish_leaving()?;
        let subnet = subnet_of(index);
        if let Err(e) = nft(&format!(
            "delete element inet {} subnets {{ {subnet} }}\n",
            self.table
        )) {
            tracing::warn!(error = %e, "a given-back subnet is still filtered");
        }
        tracing::info!(subnet = %subnet, "this host gives back a subnet no job uses");
        Some(index)
    }

    /// Routes other hosts' subnets: via their addresses, or through the VXLAN device to
    /// their VTEP; hosts sharing this host's address (one network namespace) need none.
    /// Nothing runs for a subnet whose route is as it was.
    pub fn route_peers(&self, peers: &BTreeMap<u32, Peer>, own_ip: &str) {
        // The routes lock first, as `add_subnets` takes it: a subnet this host claims
        // meanwhile is never routed away again.
        let mut routes = self.routes.lock().expect("routes lock");
        let own = self.indexes();
        // Reached without a route of this host's: its own subnets, and those of a host
        // sharing its address (one network namespace).
        let unrouted = |index: &u32, p: &Peer| own.contains(index) || p.ip == own_ip;
        // Routes no longer wanted: subnets given back (and not claimed by anyone since),
        // or now reached without one (a route left from before would point elsewhere).
        let gone: Vec<u32> = routes
            .keys()
            .copied()
            .filter(|i| peers.get(i).is_none_or(|p| unrouted(i, p)))
            .collect();
        for index in gone {
            let subnet = subnet_of(index);
            match sh(&["ip", "route", "del", &subnet]) {
                Ok(()) => tracing::info!(subnet = %subnet, "a job subnet is no longer routed"),
                Err(e) => tracing::debug!(error = %e, "no route to remove"),
            }
            routes.remove(&index);
        }
        for (index, peer) in peers {
            if unrouted(index, peer) {
                continue;
            }
            let Peer { ip, vtep } = peer;
            // In `auto`, a subnet still routed to the same host keeps its way: asking the
            // kernel again ran `ip route get` for every peer subnet on every pass.
            if self.overlay == Overlay::Auto
                && routes.get(index).is_some_and(|r| r.reaches(ip, *vtep))
            {
                continue;
            }
            let want = match self.overlay {
                Overlay::HostRoutes => PeerRoute::Via(ip.clone()),
                Overlay::Vxlan => PeerRoute::Vxlan {
                    ip: ip.clone(),
                    vtep: *vtep,
                },
                Overlay::Auto if self.vxlan && !on_link(ip) => PeerRoute::Vxlan {
                    ip: ip.clone(),
                    vtep: *vtep,
                },
                Overlay::Auto => PeerRoute::Via(ip.clone()),
            };
            if routes.get(index) == Some(&want) {
                continue;
            }
            let subnet = subnet_of(*index);
            let done = match &want {
                PeerRoute::Via(ip) => sh(&["ip", "route", "replace", &subnet, "via", ip]),
                PeerRoute::Vxlan { ip, vtep } => {
                    let (vtep, mac) = (vtep_ip(*vtep), vtep_mac(*vtep));
                    ip_batch(
                        &[],
                        &format!(
                            "neigh replace {vtep} lladdr {mac} dev {VXLAN_DEV} nud permanent\n\
                             route replace {subnet} via {vtep} dev {VXLAN_DEV} onlink\n"
                        ),
                    )
                    .and_then(|()| {
                        sh(&[
                            "bridge",
                            "fdb",
                            "replace",
                            &mac,
                            "dev",
                            VXLAN_DEV,
                            "dst",
                            ip,
                            "self",
                            "permanent",
                        ])
                    })
                }
            };
            match done {
                Ok(()) => {
                    tracing::info!(subnet = %subnet, route = ?want, "a host's job subnet is reachable");
                    routes.insert(*index, want);
                }
                Err(e) => tracing::warn!(error = %e, "no route to a host's job subnet"),
            }
        }
    }

    /// Points each service address at its instance, replacing the whole map in one
    /// transaction (a connection never sees a half-written one); nothing runs if it is
    /// unchanged.
    pub fn set_services(&self, map: &ServiceMap) {
        let mut current = self.services.lock().expect("services lock");
        if *current == *map {
            return;
        }
        let mut script = format!("flush map inet {} services\n", self.table);
        for ((vip, vport), (ip, port)) in map {
            script.push_str(&format!(
                "add element inet {} services {{ {vip} . {vport} : {ip} . {port} }}\n",
                self.table
            ));
        }
        match nft(&script) {
            Ok(()) => *current = map.clone(),
            Err(e) => tracing::warn!(error = %e, "service addresses not updated"),
        }
    }

    /// A namespace with an address for a job, published on `port` if it serves one.
    pub fn create(&self, job: &str, port: Option<u16>) -> Result<JobNet, String> {
        let ip = self
            .addresses()
            .take()
            .ok_or("no free job address on this host")?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.host, job).hash(&mut h);
        let tag = format!("{:012x}", h.finish() & 0xffff_ffff_ffff);
        let net = JobNet {
            netns: format!("{}{tag}", netns_prefix(self.host)),
            ip,
            host_veth: host_veth(&tag),
            published: port,
        };
        if let Err(e) = self.configure(&net) {
            self.release(&net);
            return Err(e);
        }
        Ok(net)
    }

    /// The published-port key of `ip . port` in the host's `published` set.
    fn published_key(ip: Ipv4Addr, port: u16) -> Vec<u8> {
        concat_key(&[&ip.octets(), &port.to_be_bytes()])
    }

    /// Makes the job's namespace and joins it to the host, each step one netlink request.
    fn configure(&self, n: &JobNet) -> Result<(), String> {
        // The gateway of the job's own subnet.
        let [a, b, c, _] = n.ip.octets();
        let gw = Ipv4Addr::new(a, b, c, 1);
        let path = n.netns_path();
        let path = Path::new(&path);
        let e = |e: flynn_netlink::Error| e.to_string();
        // What an earlier try for this job may have left.
        let _ = delete_netns(path);
        let mut host = Rtnl::open().map_err(e)?;
        let _ = host.delete_link(&n.host_veth);
        let mut ns = Netns::create(path).map_err(e)?;
        // Room for VXLAN's headers where jobs may talk across it.
        let mtu = if self.vxlan { VXLAN_MTU } else { 1500 };
        // Both ends' MACs follow from the job's address, so each side's one neighbour is
        // written as permanent: no ARP before a job's first packet, and none of the
        // kernel's ARP table (one for every namespace: 1,024 entries by default, two per
        // job) filled by jobs, which past ~500 jobs on a machine dropped new flows.
        let (job_mac, host_mac) = job_macs(n.ip);
        let here = VethEnd {
            name: &n.host_veth,
            mac: Some(host_mac),
            mtu,
        };
        let peer = VethEnd {
            name: "eth0",
            mac: Some(job_mac),
            mtu,
        };
        host.add_veth(&here, &peer, ns.fd()).map_err(e)?;
        let veth = host.link_index(&n.host_veth).map_err(e)?;
        host.add_address(veth, gw, 32).map_err(e)?;
        host.set_neighbour(veth, n.ip, job_mac).map_err(e)?;
        host.set_link(veth, true, None).map_err(e)?;
        let on_link = |dst, dev| Ipv4Route {
            dst,
            prefix: 32,
            gateway: None,
            dev,
        };
        host.replace_route(&on_link(n.ip, veth)).map_err(e)?;
        let inside = ns.rtnl();
        let lo = inside.link_index("lo").map_err(e)?;
        inside.set_link(lo, true, None).map_err(e)?;
        let eth0 = inside.link_index("eth0").map_err(e)?;
        inside.add_address(eth0, n.ip, 32).map_err(e)?;
        inside.set_neighbour(eth0, gw, host_mac).map_err(e)?;
        inside.set_link(eth0, true, None).map_err(e)?;
        inside.replace_route(&on_link(gw, eth0)).map_err(e)?;
        inside
            .replace_route(&Ipv4Route {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                gateway: Some(gw),
                dev: eth0,
            })
            .map_err(e)?;
        if let Some(port) = n.published {
            let key = Self::published_key(n.ip, port);
            Nftables::open()
                .and_then(|mut nft| {
                    nft.add_elements(
                        flynn_netlink::NFPROTO_INET,
                        &self.table,
                        "published",
                        &[&key],
                    )
                })
                .map_err(e)?;
        }
        Ok(())
    }

    /// Removes a job's namespace, veth, route and published port.
    pub fn release(&self, n: &JobNet) {
        if let Some(port) = n.published {
            let key = Self::published_key(n.ip, port);
            let _ = Nftables::open().and_then(|mut nft| {
                nft.delete_elements(
                    flynn_netlink::NFPROTO_INET,
                    &self.table,
                    "published",
                    &[&key],
                )
            });
        }
        // The veth's route goes with it.
        let _ = Rtnl::open().and_then(|mut r| r.delete_link(&n.host_veth));
        let _ = delete_netns(Path::new(&n.netns_path()));
        self.addresses().give(n.ip);
    }

    /// Removes the host's filter and VXLAN device (daemon stop, no job left).
    pub fn stop(&self) {
        let _ = nft(&format!("delete table inet {}\n", self.table));
        if self.vxlan {
            let _ = sh(&["ip", "link", "del", VXLAN_DEV]);
        }
    }
}
