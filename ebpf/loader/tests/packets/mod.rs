//! Builds test frames: Ethernet (optionally VLAN-tagged), IPv4 (with options, fragments),
//! IPv6 (with extension headers), TCP, UDP, ICMP. Checksums are left zero: XDP ignores them.
#![allow(dead_code)]

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

pub fn icmp(ty: u8) -> Vec<u8> {
    vec![ty, 0, 0, 0, 0, 0, 0, 0]
}

pub struct V4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units, and the more-fragments flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
}

impl V4 {
    pub fn from(src: [u8; 4]) -> Self {
        V4 {
            src,
            dst: [10, 9, 9, 1],
            options: vec![],
            frag_offset: 0,
            more_fragments: false,
        }
    }

    pub fn packet(&self, proto: u8, l4: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 5 + self.options.len() / 4;
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | ihl as u8;
        h[2..4].copy_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        let frag = self.frag_offset | if self.more_fragments { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        h.extend_from_slice(l4);
        h
    }
}

/// An IPv6 packet with extension headers, each (type, body after the 2 leading
/// next-header/length bytes, sized to the header's unit).
pub fn v6(src: [u8; 16], ext: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    let types: Vec<u8> = ext.iter().map(|(t, _)| *t).chain([proto]).collect();
    for (i, (ty, body)) in ext.iter().enumerate() {
        let next = types[i + 1];
        let total = 2 + body.len();
        let len_byte = match ty {
            44 => {
                assert_eq!(body.len(), 6, "fragment header body is 6 bytes");
                0
            }
            51 => {
                assert!(total.is_multiple_of(4));
                (total / 4 - 2) as u8
            }
            _ => {
                assert!(total.is_multiple_of(8));
                (total / 8 - 1) as u8
            }
        };
        chain.push(next);
        chain.push(len_byte);
        chain.extend_from_slice(body);
    }
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    h[6] = types[0];
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&chain);
    h.extend_from_slice(l4);
    h
}

/// Wraps an IP packet in Ethernet, with VLAN tags (tag protocol ids, outermost first).
pub fn eth(ethertype: u16, vlans: &[u16], ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (i, tpid) in vlans.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

pub fn eth4(ip: &[u8]) -> Vec<u8> {
    eth(0x0800, &[], ip)
}

pub fn eth6(ip: &[u8]) -> Vec<u8> {
    eth(0x86dd, &[], ip)
}

pub const OUTSIDE: [u8; 4] = [203, 0, 113, 7];
pub const OUTSIDE6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

/// Up to `n` IPv4 addresses `first_octet.x.y.z`, other than `first`, that `set` puts where
/// it puts `first`: sources or flows that share a table set.
pub fn same_set(
    first: [u8; 4],
    first_octet: u8,
    n: usize,
    set: impl Fn([u8; 4]) -> u32,
) -> Vec<[u8; 4]> {
    let want = set(first);
    (0..1u32 << 24)
        .map(|i| {
            let b = i.to_be_bytes();
            [first_octet, b[1], b[2], b[3]]
        })
        .filter(|&a| a != first && set(a) == want)
        .take(n)
        .collect()
}

/// Other remote addresses (203.x.y.z) whose flow between the same ports lands in the same
/// reply-flow-table set as `first`'s: enough of them push `first`'s flow out of the table.
pub fn colliding_remotes(
    first: [u8; 4],
    remote_port: u16,
    local_port: u16,
    n: usize,
) -> Vec<[u8; 4]> {
    same_set(first, 203, n, |a| {
        let (r, p) = flynn_xdp_common::flow_words(&v4_mapped(a), remote_port, local_port);
        flynn_xdp_common::flow_set(&r, p)
    })
}

/// `::ffff:a.b.c.d`, as the firewall keys IPv4 addresses.
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&a);
    m
}
