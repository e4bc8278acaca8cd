//! nftables set elements over nfnetlink: what `nft add element` and `nft delete element`
//! send, one batch (one transaction) per call.

use crate::message::{Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use crate::socket::Socket;
use crate::Result;

/// The `inet` family (IPv4 and IPv6 tables).
pub const NFPROTO_INET: u8 = 1;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

/// `struct nfgenmsg`: family, version 0, resource id (big-endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

/// The key of a set whose type is a concatenation (`ipv4_addr . inet_service`): each
/// part in network order, padded to 4 bytes, as nftables' registers hold them.
pub fn concat_key(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::new();
    for p in parts {
        key.extend_from_slice(p);
        key.resize(crate::message::align4(key.len()), 0);
    }
    key
}

/// nfnetlink in the network namespace its socket was opened in.
pub struct Nftables {
    socket: Socket,
}

impl Nftables {
    /// nfnetlink in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        Ok(Nftables {
            socket: Socket::open(libc::NETLINK_NETFILTER, "netfilter")?,
        })
    }

    /// Adds `keys` to the set `set` of table `table` (adding one already there is not an
    /// error, as with `nft add element`).
    pub fn add_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        keys: &[&[u8]],
    ) -> Result<()> {
        self.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, family, table, set, keys)
    }

    /// Removes `keys` from the set; one that is not there fails the whole call (check
    /// [`crate::Error::is_not_found`]) and nothing is removed.
    pub fn delete_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        keys: &[&[u8]],
    ) -> Result<()> {
        self.elements(NFT_MSG_DELSETELEM, 0, family, table, set, keys)
    }

    fn elements(
        &mut self,
        verb: u16,
        flags: u16,
        family: u8,
        table: &str,
        set: &str,
        keys: &[&[u8]],
    ) -> Result<()> {
        let (begin_seq, seq, end_seq) = (
            self.socket.next_seq(),
            self.socket.next_seq(),
            self.socket.next_seq(),
        );
        let mut begin = Message::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST);
        begin.bytes(&nfgenmsg(libc::AF_UNSPEC as u8, NFNL_SUBSYS_NFTABLES));
        let mut m = Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | verb,
            NLM_F_REQUEST | NLM_F_ACK | flags,
        );
        m.bytes(&nfgenmsg(family, 0))
            .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, set)
            .begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for key in keys {
            m.begin(NFTA_LIST_ELEM)
                .begin(NFTA_SET_ELEM_KEY)
                .attr(NFTA_DATA_VALUE, key)
                .end()
                .end();
        }
        m.end();
        let mut end = Message::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST);
        end.bytes(&nfgenmsg(libc::AF_UNSPEC as u8, NFNL_SUBSYS_NFTABLES));
        let what = if verb == NFT_MSG_NEWSETELEM {
            "adding"
        } else {
            "deleting"
        };
        let step = format!("{what} {} element(s) of set {table} {set}", keys.len());
        let mut batch = Socket::bytes(begin, begin_seq, &step)?;
        batch.extend(Socket::bytes(m, seq, &step)?);
        batch.extend(Socket::bytes(end, end_seq, &step)?);
        self.socket
            .send_and_wait(&batch, begin_seq..=seq, &step, |_, _| None::<()>)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_keys_pad_each_part_to_a_register() {
        let key = concat_key(&[&[100, 100, 1, 2], &8080u16.to_be_bytes()]);
        assert_eq!(key, vec![100, 100, 1, 2, 0x1f, 0x90, 0, 0]);
    }
}
