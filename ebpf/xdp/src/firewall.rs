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
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{TcContext, XdpContext};
use flynn_xdp_common::{
    port_class, Config, Counter, Reason, SynBucket, UdpFlow, CLASS_NONE, COUNTER_CELLS,
    FLAG_ALLOW_ECHO, FLAG_PASS_FRAGMENTS, FLAG_USE_LPM, INLINE_V4, INLINE_V6, PORT_CLASSES,
    PORT_WORDS,
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
static SYN_BUCKETS: LruHashMap<[u8; 16], SynBucket> = LruHashMap::with_max_entries(65536, 0);
#[map]
static UDP_FLOWS: LruHashMap<UdpFlow, u64> = LruHashMap::with_max_entries(65536, 0);
/// Local ports that have sent UDP (one bit each): a cheap first test before the flow lookup,
/// so a flood to ports the host never used drops without touching the LRU map.
#[map]
static UDP_LOCAL_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
/// Per-CPU, direct-mapped: the reply flows this CPU let in last. A busy flow's replies
/// pass on a compare and a jiffies read, instead of the LRU map's hash of a 20-byte key and
/// a clock read (the flow's first reply, and any whose slot another flow took, still look
/// there). An entry is trusted for [`CACHE_TRUST_JIFFIES`] and is made only while the flow
/// has more than [`CACHE_MIN_LEFT_NS`] of its reply window left, which is longer than that
/// at any HZ, so the cache never lets a reply in after the flow table would stop it.
#[map]
static UDP_FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_CELLS, 0);

const FLOW_CACHE_SLOTS: u32 = 256;
/// How long a cached flow is trusted: 250 jiffies, 2.5 s at HZ=100 and 0.25 s at HZ=1000.
const CACHE_TRUST_JIFFIES: u64 = 250;
/// A flow is cached only with more than this left of its window (> 250 jiffies at HZ=100).
const CACHE_MIN_LEFT_NS: u64 = 3_000_000_000;

#[repr(C)]
#[derive(Clone, Copy)]
struct CachedFlow {
    /// The flow as words: remote address (two u64), then remote and local port.
    remote: [u64; 2],
    ports: u32,
    /// Non-zero once filled (an all-zero flow is a real, if unlikely, key).
    filled: u32,
    /// jiffies when the flow table last vouched for the flow.
    jiffies: u64,
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
#[inline(always)]
fn syn_allowed(src: &[u8; 16], v6: bool) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    if cfg.syn_rate == 0 {
        return true;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = cfg.syn_burst.max(1) as u64 * 1000;
    match SYN_BUCKETS.get_ptr_mut(*src) {
        Some(b) => {
            // SAFETY: the pointer is to this entry's value; concurrent updates from other
            // CPUs can only make the bucket slightly more generous, never unsafe.
            let b = unsafe { &mut *b };
            let elapsed = now.saturating_sub(b.last_ns);
            // Refill: rate tokens per second, in milli-tokens; capped before multiplying so
            // a long-idle source cannot overflow.
            let refill = (elapsed.min(10_000_000_000) / 1000) * cfg.syn_rate as u64 / 1000;
            let tokens = (b.milli_tokens + refill).min(cap);
            b.last_ns = now;
            if tokens >= 1000 {
                b.milli_tokens = tokens - 1000;
                true
            } else {
                b.milli_tokens = tokens;
                // Cluster hosts are never limited.
                internal(src, v6)
            }
        }
        None => {
            let bucket = SynBucket {
                milli_tokens: cap - 1000,
                last_ns: now,
            };
            let _ = SYN_BUCKETS.insert(*src, bucket, 0);
            true
        }
    }
}

#[inline(always)]
fn udp_reply(src: [u8; 16], sport: u16, dport: u16) -> bool {
    if !port_allowed(&UDP_LOCAL_PORTS, dport) {
        return false;
    }
    let remote = [
        u64::from_ne_bytes([
            src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
        ]),
        u64::from_ne_bytes([
            src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
        ]),
    ];
    let ports = (sport as u32) << 16 | dport as u32;
    // Fibonacci hashing of the flow's low bits picks the slot.
    let slot = ((remote[1] as u32 ^ (remote[1] >> 32) as u32 ^ ports).wrapping_mul(0x9e37_79b1)
        >> 24)
        % FLOW_CACHE_SLOTS;
    // SAFETY: no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let cached = UDP_FLOW_CACHE.get_ptr_mut(slot);
    if let Some(c) = cached {
        // SAFETY: this CPU's slot; nothing else runs on this CPU while the program does.
        let c = unsafe { &*c };
        if c.filled != 0
            && c.remote == remote
            && c.ports == ports
            && jiffies.wrapping_sub(c.jiffies) < CACHE_TRUST_JIFFIES
        {
            return true;
        }
    }
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
    let window = config().map_or(0, |c| c.udp_reply_secs) as u64 * 1_000_000_000;
    let age = now.saturating_sub(seen);
    if age > window {
        return false;
    }
    if window - age <= CACHE_MIN_LEFT_NS {
        return true;
    }
    if let Some(c) = cached {
        // SAFETY: as above, this CPU's own slot.
        unsafe {
            *c = CachedFlow {
                remote,
                ports,
                filled: 1,
                jiffies,
            };
        }
    }
    true
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
    // The same (coarse) clock the ingress side compares against.
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    UDP_FLOWS.insert(key, now, 0).ok()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}
