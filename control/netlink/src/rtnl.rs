//! rtnetlink: links, IPv4 addresses and routes in one network namespace.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::message::{Message, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use crate::socket::Socket;
use crate::{Error, Result};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFF_UP: u32 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

/// `struct ifinfomsg`: family, type, index, flags and the flags to change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// One end of a veth pair: its name, MAC (the kernel picks a random one without) and MTU.
/// Both ends need the same MTU: a veth drops, without a word, a frame longer than the
/// receiving end's.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
}

/// An IPv4 route in the main table: `dst/prefix` out of link `dev`, through `gateway`
/// or (without one) on the link itself.
pub struct Ipv4Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dev: u32,
}

/// rtnetlink in the network namespace its socket was opened in.
pub struct Rtnl {
    socket: Socket,
}

impl Rtnl {
    /// rtnetlink in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        Ok(Rtnl {
            socket: Socket::open(libc::NETLINK_ROUTE, "route")?,
        })
    }

    /// The index of the link `name`.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        let mut m = Message::new(RTM_GETLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        let seq = self.socket.next_seq();
        let step = format!("finding link {name}");
        let bytes = Socket::bytes(m, seq, &step)?;
        let index = self
            .socket
            .send_and_wait(&bytes, seq..=seq, &step, |kind, payload| {
                (kind == RTM_NEWLINK)
                    .then(|| payload.get(4..8))
                    .flatten()
                    .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
            })?;
        index.ok_or_else(|| Error::new(step, std::io::Error::from_raw_os_error(libc::ENODEV)))
    }

    /// Makes a veth pair: `here` in this namespace, `peer` in the namespace `peer_netns`
    /// (an open `/run/netns/...` or `/proc/.../ns/net`). Both start down: the kernel
    /// refuses to bring a veth up before its pair is joined (`ENOTCONN`).
    pub fn add_veth(
        &mut self,
        here: &VethEnd<'_>,
        peer: &VethEnd<'_>,
        peer_netns: BorrowedFd<'_>,
    ) -> Result<()> {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        let end = |m: &mut Message, end: &VethEnd<'_>| {
            m.attr_str(IFLA_IFNAME, end.name)
                .attr_u32(IFLA_MTU, end.mtu);
            if let Some(mac) = end.mac {
                m.attr(IFLA_ADDRESS, &mac);
            }
        };
        m.bytes(&ifinfomsg(0, 0, 0));
        end(&mut m, here);
        m.begin(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .begin(IFLA_INFO_DATA)
            .begin(VETH_INFO_PEER)
            .bytes(&ifinfomsg(0, 0, 0))
            .attr_u32(IFLA_NET_NS_FD, peer_netns.as_raw_fd() as u32);
        end(&mut m, peer);
        m.end().end().end();
        self.socket.request(
            m,
            &format!("making veth {} (peer {})", here.name, peer.name),
        )
    }

    /// Sets link `index` up or down, and its MTU if given.
    pub fn set_link(&mut self, index: u32, up: bool, mtu: Option<u32>) -> Result<()> {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(index, if up { IFF_UP } else { 0 }, IFF_UP));
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        self.socket
            .request(m, &format!("setting link {index} up={up} mtu={mtu:?}"))
    }

    /// Deletes the link `name` (and, for a veth, its peer wherever it is).
    pub fn delete_link(&mut self, name: &str) -> Result<()> {
        let mut m = Message::new(RTM_DELLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        self.socket.request(m, &format!("deleting link {name}"))
    }

    /// Adds `addr/prefix` to link `index`.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut m = Message::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        let mut hdr = [0u8; 8];
        hdr[0] = libc::AF_INET as u8;
        hdr[1] = prefix;
        hdr[3] = RT_SCOPE_UNIVERSE;
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        m.bytes(&hdr)
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets());
        self.socket
            .request(m, &format!("adding {addr}/{prefix} to link {index}"))
    }

    /// Says, for good, that `addr` on link `index` is at `mac` (a permanent neighbour
    /// entry, replacing any other): no ARP for it, and no entry of the kernel's ARP
    /// table that counts toward its limits (`gc_thresh3`, shared by every namespace).
    pub fn set_neighbour(&mut self, index: u32, addr: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let mut m = Message::new(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE);
        let mut hdr = [0u8; 12];
        hdr[0] = libc::AF_INET as u8;
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        hdr[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        m.bytes(&hdr)
            .attr(NDA_DST, &addr.octets())
            .attr(NDA_LLADDR, &mac);
        self.socket
            .request(m, &format!("setting the neighbour {addr} on link {index}"))
    }

    /// Adds `route`, or replaces the route to the same destination.
    pub fn replace_route(&mut self, route: &Ipv4Route) -> Result<()> {
        let mut m = Message::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE);
        let scope = if route.gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let mut hdr = [0u8; 12];
        hdr[0] = libc::AF_INET as u8;
        hdr[1] = route.prefix;
        hdr[4] = RT_TABLE_MAIN;
        hdr[5] = RTPROT_BOOT;
        hdr[6] = scope;
        hdr[7] = RTN_UNICAST;
        m.bytes(&hdr);
        if route.prefix > 0 {
            m.attr(RTA_DST, &route.dst.octets());
        }
        if let Some(gw) = route.gateway {
            m.attr(RTA_GATEWAY, &gw.octets());
        }
        m.attr_u32(RTA_OIF, route.dev);
        self.socket.request(
            m,
            &format!(
                "routing {}/{} via {:?} on link {}",
                route.dst, route.prefix, route.gateway, route.dev
            ),
        )
    }
}
