//! The host firewall's userspace side: loads the embedded XDP/TC object, keeps the policy
//! maps, attaches to interfaces, and reads the per-CPU counters.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, PerCpuArray};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::Ebpf;
use flynn_xdp_common::{
    Config, Counter, Reason, CLASS_NAMES, COUNTER_CELLS, FLAG_ALLOW_ECHO, FLAG_PASS_FRAGMENTS,
    FLAG_USE_LPM, INLINE_V4, INLINE_V6, PORT_CLASSES, PORT_WORDS,
};
use serde::Serialize;

pub use flynn_xdp_common as common;

/// The compiled kernel object, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flynn-xdp"));

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("loading the firewall program: {0}")]
    Load(String),
    #[error("invalid policy: {0}")]
    Policy(String),
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("firewall map {map}: {reason}")]
    Map { map: &'static str, reason: String },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> FirewallError {
    move |e| FirewallError::Map {
        map,
        reason: e.to_string(),
    }
}

/// What the firewall lets in from outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// TCP ports new connections may reach (inclusive ranges).
    pub tcp_ports: Vec<(u16, u16)>,
    /// UDP ports open to anyone (replies to the host's own traffic always pass).
    pub udp_ports: Vec<(u16, u16)>,
    /// Sources never filtered: the cluster's own hosts.
    pub internal_prefixes: Vec<(IpAddr, u8)>,
    /// New TCP connections per second per source (0: unlimited), and the burst allowed.
    pub syn_rate: u32,
    pub syn_burst: u32,
    pub allow_echo: bool,
    pub pass_fragments: bool,
    /// How long replies to an outbound UDP packet are accepted.
    pub udp_reply_secs: u32,
}

impl Default for Policy {
    /// Flynn's production rule: only 80, 443 and 3000-3500 from outside.
    fn default() -> Self {
        Policy {
            tcp_ports: vec![(80, 80), (443, 443), (3000, 3500)],
            udp_ports: vec![],
            internal_prefixes: vec![],
            syn_rate: 1000,
            syn_burst: 2000,
            allow_echo: true,
            pass_fragments: true,
            udp_reply_secs: 120,
        }
    }
}

impl Policy {
    /// Parses `80,443,3000-3500`.
    pub fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, FirewallError> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let bad =
                    || FirewallError::Policy(format!("{p:?} is not a port or PORT-PORT range"));
                let (a, b) = match p.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (p, p),
                };
                let (a, b): (u16, u16) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a == 0 || a > b {
                    return Err(bad());
                }
                Ok((a, b))
            })
            .collect()
    }

    /// Parses `10.0.0.0/8,fd00::/8,192.0.2.7` (a bare address is a host prefix).
    pub fn parse_prefixes(s: &str) -> Result<Vec<(IpAddr, u8)>, FirewallError> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let bad = || FirewallError::Policy(format!("{p:?} is not ADDR/LEN"));
                let (addr, len) = match p.split_once('/') {
                    Some((a, l)) => (
                        a.parse::<IpAddr>().map_err(|_| bad())?,
                        Some(l.parse::<u8>().map_err(|_| bad())?),
                    ),
                    None => (p.parse::<IpAddr>().map_err(|_| bad())?, None),
                };
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let len = len.unwrap_or(max);
                if len > max {
                    return Err(bad());
                }
                Ok((addr, len))
            })
            .collect()
    }

    fn bitmap(ranges: &[(u16, u16)]) -> Vec<u64> {
        let mut words = vec![0u64; PORT_WORDS as usize];
        for &(a, b) in ranges {
            for port in a..=b {
                words[(port >> 6) as usize] |= 1 << (port & 63);
            }
        }
        words
    }

    /// The policy as the kernel reads it, with what the loader measured (`hz`) and chose
    /// (`seed`) at load.
    fn config(&self, hz: u32, seed: u32) -> Config {
        let mut cfg = Config {
            flags: 0,
            hz,
            seed,
            syn_rate: self.syn_rate,
            syn_burst: self.syn_burst,
            udp_reply_secs: self.udp_reply_secs,
            ..Config::default()
        };
        if self.allow_echo {
            cfg.flags |= FLAG_ALLOW_ECHO;
        }
        if self.pass_fragments {
            cfg.flags |= FLAG_PASS_FRAGMENTS;
        }
        let v4: Vec<[u32; 2]> = self
            .internal_prefixes
            .iter()
            .filter_map(|(a, len)| match a {
                IpAddr::V4(a) => {
                    let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                    let mask = u32::from_ne_bytes(mask.to_be_bytes());
                    Some([u32::from_ne_bytes(a.octets()) & mask, mask])
                }
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<[u64; 4]> = self
            .internal_prefixes
            .iter()
            .filter_map(|(a, len)| match a {
                IpAddr::V6(a) => {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    let (m, o) = (mask.to_be_bytes(), a.octets());
                    let half = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
                    let (ma, mb) = (half(&m[..8]), half(&m[8..]));
                    Some([half(&o[..8]) & ma, half(&o[8..]) & mb, ma, mb])
                }
                IpAddr::V4(_) => None,
            })
            .collect();
        if v4.len() > INLINE_V4 || v6.len() > INLINE_V6 {
            cfg.flags |= FLAG_USE_LPM;
        } else {
            cfg.v4_count = v4.len() as u32;
            cfg.v6_count = v6.len() as u32;
            cfg.v4[..v4.len()].copy_from_slice(&v4);
            cfg.v6[..v6.len()].copy_from_slice(&v6);
        }
        cfg
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: the driver has no XDP support.
    Generic,
}

#[derive(Debug)]
struct Attachment {
    iface: String,
    mode: Mode,
    xdp: XdpLinkId,
    tc: Option<SchedClassifierLinkId>,
}

/// One counter cell, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterRow {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub port_class: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub struct Firewall {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    prefixes: BTreeSet<(IpAddr, u8)>,
    policy: Policy,
    /// The kernel's CONFIG_HZ, as measured at load.
    hz: u32,
    /// Keys the SYN limiter's set hash (see `Config::seed`).
    seed: u32,
}

impl Firewall {
    /// Loads and verifies the programs, with the default policy in the maps.
    pub fn load() -> Result<Self, FirewallError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| FirewallError::Load(e.to_string()))?;
        for name in ["flynn_firewall", "flynn_pass", "flynn_jiffies"] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| FirewallError::Load(format!("{name}: {e}")))?;
        }
        let egress: &mut SchedClassifier = program(&mut ebpf, "flynn_egress")?;
        egress
            .load()
            .map_err(|e| FirewallError::Load(format!("flynn_egress: {e}")))?;
        let mut fw = Firewall {
            ebpf,
            attached: Vec::new(),
            prefixes: BTreeSet::new(),
            policy: Policy::default(),
            hz: 0,
            seed: rand::random(),
        };
        fw.hz = fw.measure_hz()?;
        fw.set_policy(&Policy::default())?;
        Ok(fw)
    }

    /// The seed of the SYN limiter's set hash (tests use it to build colliding sources).
    pub fn syn_seed(&self) -> u32 {
        self.seed
    }

    /// The kernel's tick rate (CONFIG_HZ) the fast paths count time in.
    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// Learns CONFIG_HZ by timing jiffies over a short sleep, snapped to the rates the kernel
    /// can be built with (x86 offers 100, 250, 300 and 1000; others are rare and are not
    /// guessed at). The reply window is then `udp_reply_secs × HZ` jiffies. A wrong snap
    /// cannot widen it by much: the rates are ≥ 20% apart and 80 ms of ticks tell them apart.
    fn measure_hz(&self) -> Result<u32, FirewallError> {
        let jiffies = || -> Result<u32, FirewallError> {
            Ok(self.test_run("flynn_jiffies", &[0u8; 64], 1)?.0)
        };
        // Start on a tick edge so the count is not off by a partial tick.
        let edge = |from: u32| -> Result<(u32, std::time::Instant), FirewallError> {
            let deadline = std::time::Instant::now() + Duration::from_millis(100);
            loop {
                let j = jiffies()?;
                if j != from || std::time::Instant::now() > deadline {
                    return Ok((j, std::time::Instant::now()));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        let (j0, t0) = edge(jiffies()?)?;
        std::thread::sleep(Duration::from_millis(80));
        let (j1, t1) = edge(jiffies()?)?;
        let measured = j1.wrapping_sub(j0) as f64 / (t1 - t0).as_secs_f64();
        if !(50.0..2000.0).contains(&measured) {
            return Err(FirewallError::Load(format!(
                "jiffies advanced at {measured:.0}/s, not a kernel tick rate"
            )));
        }
        let off = |c: &u32| (measured / *c as f64).ln().abs();
        Ok([100u32, 250, 300, 1000]
            .into_iter()
            .min_by(|a, b| off(a).total_cmp(&off(b)))
            .unwrap_or(100))
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Writes a policy into the maps; attached programs see it at once (no reattach).
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), FirewallError> {
        if policy.syn_rate > 0 && policy.syn_burst == 0 {
            return Err(FirewallError::Policy("syn_burst must be at least 1".into()));
        }
        for (name, ranges) in [
            ("TCP_PORTS", &policy.tcp_ports),
            ("UDP_PORTS", &policy.udp_ports),
        ] {
            let words = Policy::bitmap(ranges);
            let mut map: Array<_, u64> =
                Array::try_from(self.map(name)?).map_err(map_err("ports"))?;
            for (i, w) in words.iter().enumerate() {
                map.set(i as u32, *w, 0).map_err(map_err("ports"))?;
            }
        }
        let config = policy.config(self.hz, self.seed);
        let mut cfg: Array<_, Config> =
            Array::try_from(self.map("CONFIG")?).map_err(map_err("CONFIG"))?;
        cfg.set(0, config, 0).map_err(map_err("CONFIG"))?;

        let wanted: BTreeSet<(IpAddr, u8)> = policy.internal_prefixes.iter().copied().collect();
        for (addr, len) in wanted.difference(&self.prefixes.clone()) {
            self.prefix(*addr, *len, true)?;
        }
        for (addr, len) in self.prefixes.clone().difference(&wanted) {
            self.prefix(*addr, *len, false)?;
        }
        self.prefixes = wanted;
        self.policy = policy.clone();
        Ok(())
    }

    fn prefix(&mut self, addr: IpAddr, len: u8, insert: bool) -> Result<(), FirewallError> {
        match addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<_, [u8; 4], u8> =
                    LpmTrie::try_from(self.map("INTERNAL_V4")?).map_err(map_err("INTERNAL_V4"))?;
                let key = Key::new(len as u32, a.octets());
                if insert {
                    trie.insert(&key, 1, 0).map_err(map_err("INTERNAL_V4"))
                } else {
                    trie.remove(&key).map_err(map_err("INTERNAL_V4"))
                }
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<_, [u8; 16], u8> =
                    LpmTrie::try_from(self.map("INTERNAL_V6")?).map_err(map_err("INTERNAL_V6"))?;
                let key = Key::new(len as u32, a.octets());
                if insert {
                    trie.insert(&key, 1, 0).map_err(map_err("INTERNAL_V6"))
                } else {
                    trie.remove(&key).map_err(map_err("INTERNAL_V6"))
                }
            }
        }
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, FirewallError> {
        self.ebpf.map_mut(name).ok_or(FirewallError::Map {
            map: name,
            reason: "missing from the object".into(),
        })
    }

    /// Attaches to `iface`: XDP in driver mode, else generic mode (with a warning); and the
    /// egress flow tracker on the interface's clsact qdisc.
    pub fn attach(&mut self, iface: &str) -> Result<Mode, FirewallError> {
        let attach_err = |reason: String| FirewallError::Attach {
            iface: iface.to_string(),
            reason,
        };
        let prog: &mut Xdp = program(&mut self.ebpf, "flynn_firewall")?;
        let (xdp, mode) = match prog.attach(iface, XdpMode::Driver) {
            Ok(link) => (link, Mode::Driver),
            Err(driver_err) => {
                let link = prog.attach(iface, XdpMode::Skb).map_err(|e| {
                    attach_err(format!("driver mode: {driver_err}; generic mode: {e}"))
                })?;
                tracing::warn!(%iface, error = %driver_err, "no driver-mode XDP; using generic (skb) mode");
                (link, Mode::Generic)
            }
        };
        // The egress tracker is what lets UDP replies in; without it they are dropped, so
        // failing to attach it is an error, not a warning.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            let exists = match &e {
                tc::TcError::AlreadyAttached => true,
                tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
                _ => false,
            };
            if !exists {
                let _ = program::<Xdp>(&mut self.ebpf, "flynn_firewall").map(|p| p.detach(xdp));
                return Err(attach_err(format!("adding clsact qdisc: {e}")));
            }
        }
        let egress: &mut SchedClassifier = program(&mut self.ebpf, "flynn_egress")?;
        let tc = match egress.attach(iface, TcAttachType::Egress) {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = program::<Xdp>(&mut self.ebpf, "flynn_firewall").map(|p| p.detach(xdp));
                return Err(attach_err(format!("egress tracker: {e}")));
            }
        };
        self.attached.push(Attachment {
            iface: iface.to_string(),
            mode,
            xdp,
            tc,
        });
        Ok(mode)
    }

    pub fn interfaces(&self) -> Vec<(String, Mode)> {
        self.attached
            .iter()
            .map(|a| (a.iface.clone(), a.mode))
            .collect()
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            if let Ok(p) = program::<Xdp>(&mut self.ebpf, "flynn_firewall") {
                let _ = p.detach(a.xdp);
            }
            if let (Some(l), Ok(p)) = (
                a.tc,
                program::<SchedClassifier>(&mut self.ebpf, "flynn_egress"),
            ) {
                let _ = p.detach(l);
            }
        }
    }

    /// Every non-zero counter cell, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterRow>, FirewallError> {
        let map = self.ebpf.map("COUNTERS").ok_or(FirewallError::Map {
            map: "COUNTERS",
            reason: "missing from the object".into(),
        })?;
        let arr: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).map_err(map_err("COUNTERS"))?;
        let mut rows = Vec::new();
        for cell in 0..COUNTER_CELLS {
            let values = arr.get(&cell, 0).map_err(map_err("COUNTERS"))?;
            let (packets, bytes) = values
                .iter()
                .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            if packets == 0 {
                continue;
            }
            let reason = Reason::ALL[(cell / PORT_CLASSES) as usize];
            rows.push(CounterRow {
                verdict: if reason.is_drop() { "drop" } else { "pass" },
                reason: reason.name(),
                port_class: CLASS_NAMES[(cell % PORT_CLASSES) as usize],
                packets,
                bytes,
            });
        }
        Ok(rows)
    }

    /// Counters in Prometheus text format.
    pub fn prometheus(&self) -> Result<String, FirewallError> {
        let rows = self.counters()?;
        let mut out = String::new();
        for (metric, help, pick) in [
            (
                "flynn_firewall_packets_total",
                "packets seen by the XDP firewall",
                0,
            ),
            (
                "flynn_firewall_bytes_total",
                "bytes seen by the XDP firewall",
                1,
            ),
        ] {
            flynn_metrics::header(&mut out, metric, "counter", help);
            for r in &rows {
                let v = if pick == 0 { r.packets } else { r.bytes };
                let labels = [
                    ("verdict", r.verdict),
                    ("reason", r.reason),
                    ("port_class", r.port_class),
                ];
                flynn_metrics::sample(&mut out, metric, &labels, v);
            }
        }
        Ok(out)
    }

    /// Runs an XDP program of the object over `packet` in the kernel (BPF_PROG_TEST_RUN):
    /// returns the verdict and the mean time per run.
    pub fn test_run(
        &self,
        program: &str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), FirewallError> {
        let prog: &Xdp = self
            .ebpf
            .program(program)
            .ok_or_else(|| FirewallError::Load(format!("no program {program}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| FirewallError::Load(e.to_string()))?;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: repeat.max(1),
                ..Default::default()
            })
            .map_err(|e| FirewallError::Load(format!("test run: {e}")))?;
        Ok((r.return_value, r.duration))
    }

    /// Runs the egress tracker over an outbound frame (BPF_PROG_TEST_RUN), as if sent.
    pub fn test_egress(&self, packet: &[u8]) -> Result<(), FirewallError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program("flynn_egress")
            .ok_or_else(|| FirewallError::Load("no program flynn_egress".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| FirewallError::Load(e.to_string()))?;
        prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat: 1,
            ..Default::default()
        })
        .map_err(|e| FirewallError::Load(format!("test run: {e}")))?;
        Ok(())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, FirewallError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| FirewallError::Load(format!("no program {name} in the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| FirewallError::Load(format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_prefixes_parse_and_refuse_garbage() {
        assert_eq!(
            Policy::parse_ports("80, 443,3000-3500").unwrap(),
            vec![(80, 80), (443, 443), (3000, 3500)]
        );
        assert!(Policy::parse_ports("0").is_err());
        assert!(Policy::parse_ports("90-80").is_err());
        assert!(Policy::parse_ports("http").is_err());
        let p = Policy::parse_prefixes("10.0.0.0/8,fd00::/8,192.0.2.7").unwrap();
        assert_eq!(p[2].1, 32);
        assert!(Policy::parse_prefixes("10.0.0.0/33").is_err());
        assert!(Policy::parse_prefixes("nope/8").is_err());
    }

    #[test]
    fn bitmap_sets_exactly_the_ports() {
        let words = Policy::bitmap(&[(80, 80), (3000, 3001)]);
        let set = |p: u16| words[(p >> 6) as usize] & (1 << (p & 63)) != 0;
        assert!(set(80) && set(3000) && set(3001));
        assert!(!set(79) && !set(81) && !set(2999) && !set(3002) && !set(22));
    }
}
