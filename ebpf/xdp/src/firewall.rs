//! XDP ingress filter and TC egress flow tracker.
//!
//! Verdict, in order:
//! 1. not IP (ARP, LLDP, ...) → pass; malformed or truncated IP → drop (counted);
//! 2. source inside a cluster-internal prefix → pass;
//! 3. non-first fragment → policy (`FLAG_PASS_FRAGMENTS`);
//! 4. TCP SYN without ACK to a port outside the allowed bitmap → drop; to an allowed port →
//!    the source's token bucket decides; every other TCP segment passes (established flows,
//!    replies to the host's own connections; the kernel answers strays with RST);
//! 5. UDP to an allowed port → pass; a reply to a flow the host opened (seen by the egress
//!    program) → pass; else drop;
//! 6. ICMP: errors needed for path MTU discovery and diagnostics pass, echo replies pass,
//!    echo requests by policy (`FLAG_ALLOW_ECHO`), IPv6 neighbour discovery and MLD pass,
//!    the rest drops;
//! 7. any other IP protocol → drop.

use aya_ebpf::bindings::{xdp_action, TC_ACT_OK};
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{TcContext, XdpContext};
use flynn_xdp_common::{
    addr_words, flow_set, flow_tag, flow_words, port_class, source_set, Config, Counter, Reason,
    UdpFlow, CLASS_NONE, COUNTER_CELLS, FLAG_ALLOW_ECHO, FLAG_PASS_FRAGMENTS, FLAG_USE_LPM,
    FLOW_SETS, FLOW_WAYS, INLINE_V4, INLINE_V6, PORT_CLASSES, PORT_WORDS, SYN_SETS, SYN_WAYS,
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static TCP_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
#[map]
static UDP_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
#[map]
static INTERNAL_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
static INTERNAL_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
static SYN_TABLE: Array<SynSet> = Array::with_max_entries(SYN_SETS, 0);
#[map]
static UDP_FLOWS: LruHashMap<UdpFlow, u64> = LruHashMap::with_max_entries(65536, 0);
/// Local ports that have sent UDP (one bit each): a cheap first test before the flow lookup,
/// so a flood to ports the host never used drops without touching the LRU map.
#[map]
static UDP_LOCAL_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
/// Reply flows, as sets of ways (see [`FLOW_SETS`]): a flow's replies pass on a hash, an
/// array index, compares and a jiffies read. Shared by all CPUs: egress on one CPU writes
/// what ingress on another reads, so each way carries a check word ([`flow_tag`]).
#[map]
static UDP_FLOW_TABLE: Array<FlowSet> = Array::with_max_entries(FLOW_SETS, 0);
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_CELLS, 0);

/// One source's token bucket. An empty way is all zeros: it reads as a full bucket, so it
/// is the first a new source takes.
#[repr(C)]
#[derive(Clone, Copy)]
struct SynWay {
    /// The source address as words (IPv4-mapped for IPv4).
    src: [u64; 2],
    /// Tokens × 1000 (so refills of less than one token per packet accumulate).
    milli_tokens: u64,
    /// jiffies at the bucket's last refill.
    jiffies: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SynSet {
    ways: [SynWay; SYN_WAYS],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FlowWay {
    remote: [u64; 2],
    ports: u32,
    /// [`flow_tag`] of the other fields; 0 while the way is empty.
    tag: u32,
    /// jiffies at the flow's last outbound packet.
    jiffies: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FlowSet {
    ways: [FlowWay; FLOW_WAYS],
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers walked before giving up on a packet (as malformed).
const MAX_EXT_HEADERS: usize = 6;

type Verdict = (u32, Reason, u32);

const fn pass(reason: Reason, class: u32) -> Verdict {
    (xdp_action::XDP_PASS, reason, class)
}

const fn drop(reason: Reason, class: u32) -> Verdict {
    (xdp_action::XDP_DROP, reason, class)
}

const MALFORMED: Verdict = drop(Reason::DropMalformed, CLASS_NONE);

/// Packet bytes behind a bounds check: every read goes through here. No read is a single
/// byte: LLVM turns `p + 1 > end` into `end > p`, which the verifier does not take as
/// proof that `p` itself is readable.
struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    fn u16(&self, off: usize) -> Option<u16> {
        let p = self.start + off;
        if p + 2 > self.end {
            return None;
        }
        // SAFETY: p..p+2 lies inside the packet, checked above.
        Some(u16::from_be(unsafe {
            core::ptr::read_unaligned(p as *const u16)
        }))
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: p..p+N lies inside the packet, checked above.
        Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    }
}

#[xdp]
pub fn flynn_firewall(ctx: XdpContext) -> u32 {
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let (action, reason, class) = classify(&pkt).unwrap_or(MALFORMED);
    count(reason, class, (pkt.end - pkt.start) as u64);
    action
}

/// Returns XDP_PASS and nothing else: the floor the firewall's cost is measured against.
#[xdp]
pub fn flynn_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Returns jiffies' low 32 bits, never a verdict: the loader times two test runs of it to
/// learn the kernel's HZ. Loaded, never attached.
#[xdp]
pub fn flynn_jiffies(_ctx: XdpContext) -> u32 {
    // SAFETY: no preconditions.
    unsafe { bpf_jiffies64() as u32 }
}

#[inline(always)]
fn count(reason: Reason, class: u32, bytes: u64) {
    let cell = reason as u32 * PORT_CLASSES + class;
    if let Some(c) = COUNTERS.get_ptr_mut(cell) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn flags() -> u32 {
    config().map_or(0, |c| c.flags)
}

/// Is the source inside a cluster-internal prefix? Asked only where the answer changes the
/// verdict (a packet on its way to a drop or a rate limit), so passing traffic never pays.
#[inline(always)]
fn internal(src: &[u8; 16], v6: bool) -> bool {
    let Some(cfg) = config() else {
        return false;
    };
    if cfg.flags & FLAG_USE_LPM != 0 {
        return if v6 {
            INTERNAL_V6.get(Key::new(128, *src)).is_some()
        } else {
            INTERNAL_V4
                .get(Key::new(32, [src[12], src[13], src[14], src[15]]))
                .is_some()
        };
    }
    if v6 {
        let a = u64::from_ne_bytes([
            src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
        ]);
        let b = u64::from_ne_bytes([
            src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
        ]);
        for i in 0..INLINE_V6 {
            if i as u32 >= cfg.v6_count {
                break;
            }
            let [pa, pb, ma, mb] = cfg.v6[i];
            if a & ma == pa && b & mb == pb {
                return true;
            }
        }
    } else {
        let a = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        for i in 0..INLINE_V4 {
            if i as u32 >= cfg.v4_count {
                break;
            }
            let [p, m] = cfg.v4[i];
            if a & m == p {
                return true;
            }
        }
    }
    false
}

#[inline(always)]
fn classify(pkt: &Packet) -> Option<Verdict> {
    let mut ethertype = pkt.u16(12)?;
    let mut off = 14;
    // 802.1Q / 802.1ad: up to two tags (QinQ).
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = pkt.u16(off + 2)?;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = pkt.u16(off + 2)?;
            off += 4;
        }
    }
    match ethertype {
        ETH_P_IP => ipv4(pkt, off),
        ETH_P_IPV6 => ipv6(pkt, off),
        _ => Some(pass(Reason::PassNotIp, CLASS_NONE)),
    }
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline(always)]
fn ipv4(pkt: &Packet, off: usize) -> Option<Verdict> {
    // The fixed header in one constant-offset read: the verifier tracks bounds per pointer,
    // so fixed fields must not rely on the variable-length (IHL) check below, which LLVM
    // would otherwise use to drop theirs.
    let h: [u8; 20] = pkt.bytes(off)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Some(MALFORMED);
    }
    // Options, if any, must be present too (their last 4 bytes; options come in words).
    if ihl > 20 {
        let _: [u8; 4] = pkt.bytes(off + ihl - 4)?;
    }
    let src = v4_mapped([h[12], h[13], h[14], h[15]]);
    let verdict = if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        fragment()
    } else {
        transport(pkt, h[9], off + ihl, src, false)?
    };
    Some(unless_internal(verdict, &src, false))
}

#[inline(always)]
fn ipv6(pkt: &Packet, off: usize) -> Option<Verdict> {
    let h: [u8; 40] = pkt.bytes(off)?;
    if h[0] >> 4 != 6 {
        return Some(MALFORMED);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let verdict = ipv6_chain(pkt, &h, off, src)?;
    Some(unless_internal(verdict, &src, true))
}

/// A drop turns into a pass when the source is internal (a truncated or malformed packet
/// stays dropped: there is nothing sound to pass).
#[inline(always)]
fn unless_internal(v: Verdict, src: &[u8; 16], v6: bool) -> Verdict {
    if v.0 == xdp_action::XDP_DROP && !matches!(v.1, Reason::DropMalformed) && internal(src, v6) {
        pass(Reason::PassInternal, CLASS_NONE)
    } else {
        v
    }
}

#[inline(always)]
fn ipv6_chain(pkt: &Packet, h: &[u8; 40], off: usize, src: [u8; 16]) -> Option<Verdict> {
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not
            // counting the first 8.
            0 | 43 | 60 => {
                let [n, len]: [u8; 2] = pkt.bytes(l4)?;
                next = n;
                l4 += (len as usize + 1) * 8;
            }
            // Fragment header: fixed 8 bytes; a non-zero offset means no L4 header here.
            44 => {
                let [n, _, hi, lo]: [u8; 4] = pkt.bytes(l4)?;
                next = n;
                if u16::from_be_bytes([hi, lo]) & 0xfff8 != 0 {
                    return Some(fragment());
                }
                l4 += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let [n, len]: [u8; 2] = pkt.bytes(l4)?;
                next = n;
                l4 += (len as usize + 2) * 4;
            }
            _ => break,
        }
    }
    match next {
        // Still inside the extension chain after the walk's bound: refused.
        0 | 43 | 44 | 51 | 60 => Some(MALFORMED),
        _ => transport(pkt, next, l4, src, true),
    }
}

#[inline(always)]
fn fragment() -> Verdict {
    if flags() & FLAG_PASS_FRAGMENTS != 0 {
        pass(Reason::PassFragment, CLASS_NONE)
    } else {
        drop(Reason::DropFragment, CLASS_NONE)
    }
}

#[inline(always)]
fn port_allowed(map: &Array<u64>, port: u16) -> bool {
    match map.get((port >> 6) as u32) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

#[inline(always)]
fn transport(pkt: &Packet, proto: u8, l4: usize, src: [u8; 16], v6: bool) -> Option<Verdict> {
    match proto {
        IPPROTO_TCP => {
            // Ports, sequence numbers, data offset and flags in one read.
            let t: [u8; 14] = pkt.bytes(l4)?;
            let dport = u16::from_be_bytes([t[2], t[3]]);
            let flags = t[13];
            let class = port_class(dport);
            if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
                return Some(pass(Reason::PassTcpEstablished, class));
            }
            if !port_allowed(&TCP_PORTS, dport) {
                return Some(drop(Reason::DropTcpPort, class));
            }
            if syn_allowed(&src, v6) {
                Some(pass(Reason::PassTcpAllowed, class))
            } else {
                Some(drop(Reason::DropSynFlood, class))
            }
        }
        IPPROTO_UDP => {
            let u: [u8; 4] = pkt.bytes(l4)?;
            let sport = u16::from_be_bytes([u[0], u[1]]);
            let dport = u16::from_be_bytes([u[2], u[3]]);
            let class = port_class(dport);
            if port_allowed(&UDP_PORTS, dport) {
                return Some(pass(Reason::PassUdpAllowed, class));
            }
            if udp_reply(src, sport, dport) {
                return Some(pass(Reason::PassUdpReply, class));
            }
            Some(drop(Reason::DropUdpPort, class))
        }
        IPPROTO_ICMP if !v6 => {
            // type, code, checksum
            let [ty, ..]: [u8; 4] = pkt.bytes(l4)?;
            Some(match ty {
                // echo reply, destination unreachable (incl. fragmentation needed),
                // time exceeded, parameter problem
                0 | 3 | 11 | 12 => pass(Reason::PassIcmp, CLASS_NONE),
                8 => echo(),
                _ => drop(Reason::DropIcmp, CLASS_NONE),
            })
        }
        IPPROTO_ICMPV6 if v6 => {
            let [ty, ..]: [u8; 4] = pkt.bytes(l4)?;
            Some(match ty {
                // errors: unreachable, packet too big (PMTUD), time exceeded, param problem
                1..=4 => pass(Reason::PassIcmp, CLASS_NONE),
                128 => echo(),
                // echo reply, MLD, neighbour discovery (without it IPv6 stops working)
                129..=137 | 143 => pass(Reason::PassIcmp, CLASS_NONE),
                _ => drop(Reason::DropIcmp, CLASS_NONE),
            })
        }
        _ => Some(drop(Reason::DropProtocol, CLASS_NONE)),
    }
}

#[inline(always)]
fn echo() -> Verdict {
    if flags() & FLAG_ALLOW_ECHO != 0 {
        pass(Reason::PassIcmp, CLASS_NONE)
    } else {
        drop(Reason::DropIcmp, CLASS_NONE)
    }
}

/// Token bucket per source: `syn_rate` new connections per second, bursts of `syn_burst`.
/// Buckets live in a seeded set-associative table and count time in jiffies: a hash, an
/// array index and a plain load, where a hash map of 16-byte keys and a clock helper cost
/// 3x more (`bash bench/xdp`). A new source takes its set's fullest bucket, the one whose
/// loss forgets least (an idle source's bucket is full again anyway).
#[inline(always)]
fn syn_allowed(src: &[u8; 16], v6: bool) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    if cfg.syn_rate == 0 {
        return true;
    }
    let hz = cfg.hz.max(1) as u64;
    let cap = cfg.syn_burst.max(1) as u64 * 1000;
    let key = addr_words(src);
    let Some(set) = SYN_TABLE.get_ptr_mut(source_set(&key, cfg.seed)) else {
        return true;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: a pointer to this set's array slot. CPUs updating one bucket at once can only
    // make it slightly more generous (a lost decrement), never unsafe.
    let set = unsafe { &mut *set };
    let mut victim = 0;
    let mut fullest = 0u64;
    for (i, way) in set.ways.iter_mut().enumerate() {
        let elapsed = now.wrapping_sub(way.jiffies);
        // A stamp from another CPU's later tick reads as no time passed; a long-idle bucket
        // refills at most 10 s worth, which also keeps the product below from overflowing.
        let elapsed = if elapsed > 1 << 62 {
            0
        } else {
            elapsed.min(10 * hz)
        };
        let tokens = (way.milli_tokens + elapsed * cfg.syn_rate as u64 * 1000 / hz).min(cap);
        if way.src == key {
            way.jiffies = now;
            if tokens >= 1000 {
                way.milli_tokens = tokens - 1000;
                return true;
            }
            way.milli_tokens = tokens;
            // Cluster hosts are never limited.
            return internal(src, v6);
        }
        if tokens > fullest {
            fullest = tokens;
            victim = i;
        }
    }
    if let Some(way) = set.ways.get_mut(victim) {
        *way = SynWay {
            src: key,
            milli_tokens: cap - 1000,
            jiffies: now,
        };
    }
    true
}

#[inline(always)]
fn udp_reply(src: [u8; 16], sport: u16, dport: u16) -> bool {
    if !port_allowed(&UDP_LOCAL_PORTS, dport) {
        return false;
    }
    let (remote, ports) = flow_words(&src, sport, dport);
    let (secs, hz) = config().map_or((0, 0), |c| (c.udp_reply_secs, c.hz));
    let window = secs as u64 * hz as u64;
    if let Some(set) = UDP_FLOW_TABLE.get(flow_set(&remote, ports)) {
        // SAFETY: no preconditions (a plain load of jiffies once the JIT inlines it).
        let now = unsafe { bpf_jiffies64() };
        for way in &set.ways {
            if way.remote == remote
                && way.ports == ports
                && now.wrapping_sub(way.jiffies) <= window
                && way.tag == flow_tag(&remote, ports, way.jiffies)
            {
                return true;
            }
        }
    }
    // Not in the table (its way went to newer flows, or was caught mid-rewrite): the flow
    // map is the authority.
    let key = UdpFlow {
        remote: src,
        remote_port: sport,
        local_port: dport,
    };
    let Some(seen) = UDP_FLOWS.get_ptr(key) else {
        return false;
    };
    // SAFETY: value pointer of a present entry.
    let seen = unsafe { *seen };
    // Seconds-long windows: the coarse clock (a tick's resolution) is enough.
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    now.saturating_sub(seen) <= secs as u64 * 1_000_000_000
}

/// Egress: remembers the host's own outbound UDP flows so their replies get in.
#[classifier]
pub fn flynn_egress(ctx: TcContext) -> i32 {
    let _ = track_udp(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn track_udp(ctx: &TcContext) -> Option<()> {
    let mut ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut off = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(ctx.load::<u16>(off + 2).ok()?);
        off += 4;
    }
    let (remote, l4) = match ethertype {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(off).ok()?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            let frag = u16::from_be(ctx.load::<u16>(off + 6).ok()?);
            if ctx.load::<u8>(off + 9).ok()? != IPPROTO_UDP || ihl < 20 || frag & 0x1fff != 0 {
                return None;
            }
            (v4_mapped(ctx.load::<[u8; 4]>(off + 16).ok()?), off + ihl)
        }
        // Outbound IPv6 UDP without extension headers (what the host's own stack sends).
        ETH_P_IPV6 => {
            if ctx.load::<u8>(off + 6).ok()? != IPPROTO_UDP {
                return None;
            }
            (ctx.load::<[u8; 16]>(off + 24).ok()?, off + 40)
        }
        _ => return None,
    };
    let local_port = u16::from_be(ctx.load::<u16>(l4).ok()?);
    let remote_port = u16::from_be(ctx.load::<u16>(l4 + 2).ok()?);
    let key = UdpFlow {
        remote,
        remote_port,
        local_port,
    };
    if let Some(word) = UDP_LOCAL_PORTS.get_ptr_mut((local_port >> 6) as u32) {
        let bit = 1u64 << (local_port & 63);
        // SAFETY: pointer to an array slot. No atomic OR on this target: two CPUs setting
        // bits of one word at the same instant may lose one; every outbound packet checks
        // again, so the port's next packet restores it (the flow table, the authority on
        // replies, is unaffected).
        unsafe {
            if *word & bit == 0 {
                *word |= bit;
            }
        }
    }
    remember_flow(&remote, remote_port, local_port);
    // The same (coarse) clock the ingress side compares against.
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    UDP_FLOWS.insert(key, now, 0).ok()
}

/// Puts the flow in its table set: its own way if there (stamped again once a tick has
/// passed, so a busy flow does not rewrite a shared cache line per packet), else the
/// oldest way.
#[inline(always)]
fn remember_flow(remote: &[u8; 16], remote_port: u16, local_port: u16) {
    let (remote, ports) = flow_words(remote, remote_port, local_port);
    let Some(set) = UDP_FLOW_TABLE.get_ptr_mut(flow_set(&remote, ports)) else {
        return;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: a pointer to this set's array slot. Other CPUs may write the same set at the
    // same time; the check word turns any torn way into a miss (see `flow_tag`).
    let set = unsafe { &mut *set };
    let mut victim = 0;
    let mut oldest = 0u64;
    for (i, way) in set.ways.iter_mut().enumerate() {
        if way.remote == remote && way.ports == ports {
            if way.jiffies != now {
                way.jiffies = now;
                way.tag = flow_tag(&remote, ports, now);
            }
            return;
        }
        let age = if way.tag == 0 {
            u64::MAX
        } else {
            now.wrapping_sub(way.jiffies)
        };
        if age > oldest {
            oldest = age;
            victim = i;
        }
    }
    if let Some(way) = set.ways.get_mut(victim) {
        *way = FlowWay {
            remote,
            ports,
            tag: flow_tag(&remote, ports, now),
            jiffies: now,
        };
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}
