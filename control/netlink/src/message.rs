//! Netlink messages as bytes: a header, a fixed family header, then attributes (type,
//! length, value, each padded to 4 bytes), some nested.

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One message being written.
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
    /// An attribute past netlink's 64 KiB: `finish` refuses the message.
    too_long: bool,
}

impl Message {
    pub fn new(kind: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by `finish`
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's is 0
        Message {
            buf,
            nests: Vec::new(),
            too_long: false,
        }
    }

    /// The family header (ifinfomsg, rtmsg, nfgenmsg...), or raw bytes in an attribute.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = self.attr_len(NLA_HDRLEN + value.len());
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
        self
    }

    pub fn attr_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING`/`NLA_NUL_STRING` take.
    pub fn attr_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        self.attr(kind, &v)
    }

    /// Opens a nested attribute; [`Message::end`] closes it.
    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        let at = self.nests.pop().expect("a nested attribute to end");
        let len = self.attr_len(self.buf.len() - at);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// An attribute's length as its header holds it (16 bits).
    fn attr_len(&mut self, len: usize) -> u16 {
        u16::try_from(len).unwrap_or_else(|_| {
            self.too_long = true;
            0
        })
    }

    /// Adds `flags` to the header's.
    pub fn add_flags(&mut self, flags: u16) {
        let had = u16::from_ne_bytes(self.buf[6..8].try_into().expect("2 bytes"));
        self.buf[6..8].copy_from_slice(&(had | flags).to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// The message's bytes, numbered `seq`; `None` if an attribute outgrew 64 KiB.
    pub fn finish(mut self, seq: u32) -> Option<Vec<u8>> {
        assert!(self.nests.is_empty(), "a nested attribute left open");
        let len = u32::try_from(self.buf.len())
            .ok()
            .filter(|_| !self.too_long)?;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        Some(self.buf)
    }
}

/// One message received: its type, sequence number and payload (after the header).
pub struct Received<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages in one datagram from the kernel; stops at anything malformed.
pub fn parse(mut buf: &[u8]) -> Vec<Received<'_>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        out.push(Received {
            kind: u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// The attributes after a family header of `skip` bytes: (type without flags, value).
/// Only the tests read attributes back; the requests here need no more than an ack.
#[cfg(test)]
pub fn attributes(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = payload.get(align4(skip)..).unwrap_or_default();
    while rest.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes(rest[0..2].try_into().expect("2 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[2..4].try_into().expect("2 bytes")) & !NLA_F_NESTED;
        if len < NLA_HDRLEN || len > rest.len() {
            break;
        }
        out.push((kind, &rest[NLA_HDRLEN..len]));
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_nested_and_read_back() {
        let mut m = Message::new(16, NLM_F_REQUEST | NLM_F_ACK);
        m.bytes(&[1, 2, 3]) // padded to 4
            .attr_str(3, "eth0")
            .begin(18)
            .attr_str(1, "veth")
            .attr_u32(7, 42)
            .end();
        let buf = m.finish(9).expect("a small message");
        assert_eq!(buf.len() % 4, 0);
        let msgs = parse(&buf);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].kind, msgs[0].seq), (16, 9));
        let attrs = attributes(msgs[0].payload, 3);
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (3, &b"eth0\0"[..]));
        assert_eq!(attrs[1].0, 18, "the nested flag is not part of the type");
        let inner = attributes(attrs[1].1, 0);
        assert_eq!(inner[0], (1, &b"veth\0"[..]));
        assert_eq!(inner[1], (7, &42u32.to_ne_bytes()[..]));
    }

    #[test]
    fn an_attribute_past_64_kib_is_refused_not_wrapped() {
        let mut m = Message::new(16, 0);
        m.begin(3).attr(1, &vec![0u8; 70_000]).end();
        assert!(m.finish(1).is_none());
        let mut m = Message::new(16, 0);
        m.begin(3);
        for _ in 0..20 {
            m.attr(1, &[0u8; 4000]);
        }
        m.end();
        assert!(m.finish(1).is_none(), "a nest past 64 KiB");
    }

    #[test]
    fn truncated_input_yields_what_is_whole() {
        let buf = Message::new(2, 0).finish(1).expect("a small message");
        assert_eq!(parse(&buf[..10]).len(), 0);
        let mut two = buf.clone();
        two.extend_from_slice(&buf[..8]);
        assert_eq!(parse(&two).len(), 1);
        // An attribute claiming more than there is stops the walk, without a panic.
        assert!(attributes(&[200, 0, 1, 0, 9], 0).is_empty());
    }
}
