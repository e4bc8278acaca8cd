//! Map keys and values shared by the XDP firewall (kernel side) and its loader.
//! Everything is `#[repr(C)]` and plain data; the `user` feature adds aya's `Pod`.
#![no_std]

/// Internal prefixes kept inline in `Config` (checked by mask compare, no map lookup);
/// a policy with more uses the LPM tries instead (`FLAG_USE_LPM`).
pub const INLINE_V4: usize = 16;
pub const INLINE_V6: usize = 8;

/// Policy switches, in the single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// New TCP connections per second one source may open (0: no limit).
    pub syn_rate: u32,
    /// How many new connections a source may open in a burst.
    pub syn_burst: u32,
    /// How long (seconds) a UDP reply is accepted after the host's own outbound packet.
    pub udp_reply_secs: u32,
    pub v4_count: u32,
    pub v6_count: u32,
    /// The kernel's tick rate (CONFIG_HZ), measured by the loader: the fast paths count time
    /// in jiffies, which are a plain load, where a clock helper call is not.
    pub hz: u32,
    /// Random per load: keys the SYN limiter's set hash, so a flooder cannot pick sources
    /// that push one another's buckets out (each eviction would hand out a fresh burst).
    pub seed: u32,
    /// (network-order address, network-order mask) pairs.
    pub v4: [[u32; 2]; INLINE_V4],
    /// (address halves, mask halves), each as two u64 read from the bytes in memory order.
    pub v6: [[u64; 4]; INLINE_V6],
}

/// The internal prefixes did not fit inline: look sources up in the LPM tries.
pub const FLAG_USE_LPM: u32 = 1 << 2;

/// ICMP/ICMPv6 echo requests from outside are answered.
pub const FLAG_ALLOW_ECHO: u32 = 1;
/// Non-first IP fragments from outside pass (the first fragment, which carries the ports,
/// is filtered like any packet; without it the kernel never reassembles the rest).
pub const FLAG_PASS_FRAGMENTS: u32 = 1 << 1;

/// Port bitmaps: 65536 bits as 1024 words.
pub const PORT_WORDS: u32 = 1024;

/// The SYN limiter's table of per-source token buckets: sets of [`SYN_WAYS`] sources,
/// picked by [`source_set`].
pub const SYN_SETS: u32 = 16384;
pub const SYN_WAYS: usize = 4;

/// Which set of the SYN limiter's table a source lives in: murmur3's 64-bit finalizer over
/// the address words and the load's seed.
pub fn source_set(src: &[u64; 2], seed: u32) -> u32 {
    let mut x = src[0] ^ src[1].rotate_left(31) ^ (seed as u64) << 32 ^ seed as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x as u32) % SYN_SETS
}

/// An outbound UDP flow of the host, seen on egress; replies to it are let in.
/// Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlow {
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
}

/// The reply-flow table: an array of sets of [`FLOW_WAYS`] flows, written by the egress
/// program and read by ingress with a multiply-and-shift hash, an array index and compares.
/// It answers a flow's replies (its first one too) without the flow map's hash of a 20-byte
/// key; a flow that lost its way to newer ones is still answered by the flow map.
pub const FLOW_SETS: u32 = 16384;
pub const FLOW_WAYS: usize = 4;

/// An address (IPv6, or IPv4-mapped) as two words read in memory order.
pub fn addr_words(a: &[u8; 16]) -> [u64; 2] {
    let w = |i: usize| {
        u64::from_ne_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    [w(0), w(8)]
}

/// A flow as words: the remote address's, and (remote port << 16 | local port).
pub fn flow_words(remote: &[u8; 16], remote_port: u16, local_port: u16) -> ([u64; 2], u32) {
    (
        addr_words(remote),
        (remote_port as u32) << 16 | local_port as u32,
    )
}

/// Which set of the flow table a flow lives in (Fibonacci hashing of all its words).
pub fn flow_set(remote: &[u64; 2], ports: u32) -> u32 {
    let folded = remote[0] ^ remote[1].rotate_left(29) ^ (ports as u64).rotate_left(47);
    let mixed = (folded ^ (folded >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((mixed >> 32) as u32) % FLOW_SETS
}

/// A way's check word over every field, written last: a reader that meets a way half
/// rewritten by another CPU sees a mismatch and asks the flow map instead of trusting a
/// mix of two flows. Never 0, which marks an empty way.
pub fn flow_tag(remote: &[u64; 2], ports: u32, jiffies: u64) -> u32 {
    let x = (remote[0].wrapping_mul(0xff51_afd7_ed55_8ccd) ^ remote[1])
        .wrapping_mul(0xc4ce_b9fe_1a85_ec53)
        ^ ((ports as u64) << 32 | (jiffies & 0xffff_ffff)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ jiffies >> 32;
    ((x >> 32) as u32 ^ x as u32) | 1
}

/// Packet and byte counts of one (reason, port class) cell.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet passed or was dropped. The counter index is `reason * PORT_CLASSES + class`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    PassInternal = 0,
    PassNotIp = 1,
    PassTcpAllowed = 2,
    PassTcpEstablished = 3,
    PassUdpAllowed = 4,
    PassUdpReply = 5,
    PassIcmp = 6,
    PassFragment = 7,
    DropTcpPort = 8,
    DropUdpPort = 9,
    DropSynFlood = 10,
    DropIcmp = 11,
    DropFragment = 12,
    DropProtocol = 13,
    DropMalformed = 14,
}

pub const REASONS: u32 = 15;

impl Reason {
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::PassInternal,
        Reason::PassNotIp,
        Reason::PassTcpAllowed,
        Reason::PassTcpEstablished,
        Reason::PassUdpAllowed,
        Reason::PassUdpReply,
        Reason::PassIcmp,
        Reason::PassFragment,
        Reason::DropTcpPort,
        Reason::DropUdpPort,
        Reason::DropSynFlood,
        Reason::DropIcmp,
        Reason::DropFragment,
        Reason::DropProtocol,
        Reason::DropMalformed,
    ];

    pub fn is_drop(self) -> bool {
        (self as u32) >= Reason::DropTcpPort as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::PassInternal => "internal",
            Reason::PassNotIp => "not_ip",
            Reason::PassTcpAllowed => "tcp_allowed",
            Reason::PassTcpEstablished => "tcp_established",
            Reason::PassUdpAllowed => "udp_allowed",
            Reason::PassUdpReply => "udp_reply",
            Reason::PassIcmp => "icmp",
            Reason::PassFragment => "fragment",
            Reason::DropTcpPort => "tcp_port",
            Reason::DropUdpPort => "udp_port",
            Reason::DropSynFlood => "syn_flood",
            Reason::DropIcmp => "icmp",
            Reason::DropFragment => "fragment",
            Reason::DropProtocol => "protocol",
            Reason::DropMalformed => "malformed",
        }
    }
}

/// Destination port classes counters are split by.
pub const PORT_CLASSES: u32 = 5;
pub const CLASS_HTTP: u32 = 0;
pub const CLASS_HTTPS: u32 = 1;
pub const CLASS_TCP_ROUTES: u32 = 2;
pub const CLASS_OTHER: u32 = 3;
/// No port: ICMP, fragments, non-IP, malformed.
pub const CLASS_NONE: u32 = 4;

pub const CLASS_NAMES: [&str; PORT_CLASSES as usize] =
    ["http", "https", "tcp_routes", "other", "none"];

/// Counter cells in the per-CPU array.
pub const COUNTER_CELLS: u32 = REASONS * PORT_CLASSES;

pub fn port_class(port: u16) -> u32 {
    match port {
        80 => CLASS_HTTP,
        443 => CLASS_HTTPS,
        3000..=3500 => CLASS_TCP_ROUTES,
        _ => CLASS_OTHER,
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod user {
    // SAFETY: plain #[repr(C)] data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UdpFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
}
