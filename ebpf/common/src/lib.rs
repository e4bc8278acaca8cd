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

/// Per-source token bucket for new TCP connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens × 1000 (so refills of less than one token per packet accumulate).
    pub milli_tokens: u64,
    pub last_ns: u64,
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
    unsafe impl aya::Pod for super::SynBucket {}
    unsafe impl aya::Pod for super::UdpFlow {}
    unsafe impl aya::Pod for super::Counter {}
}
