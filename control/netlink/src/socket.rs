//! A netlink socket that sends requests and waits for the kernel's answer to each.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::message::{self, Message, NLMSG_DONE, NLMSG_ERROR};
use crate::{sys, Error, Result};

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// A socket of `protocol` in the calling thread's network namespace.
    pub fn open(protocol: libc::c_int, what: &str) -> Result<Self> {
        let fd = sys::netlink_socket(protocol)
            .map_err(|e| Error::new(format!("opening a {what} netlink socket"), e))?;
        Ok(Socket {
            fd,
            seq: 0,
            buf: vec![0; 32 * 1024],
        })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `m` (with `NLM_F_ACK`) and waits for its acknowledgement.
    pub fn request(&mut self, m: Message, step: &str) -> Result<()> {
        let seq = self.next_seq();
        let bytes = m.finish(seq);
        self.send_and_wait(&bytes, seq..=seq, step, |_, _| None::<()>)
            .map(drop)
    }

    /// Sends `bytes` (one message, or a batch numbered `seqs`) and waits for an error
    /// about any of them, or the last one's answer: an acknowledgement (`Ok(None)`) or the
    /// first reply `read` takes. (nfnetlink reports a failed commit against the batch's
    /// first message, before it acknowledges the others.)
    pub fn send_and_wait<T>(
        &mut self,
        bytes: &[u8],
        seqs: std::ops::RangeInclusive<u32>,
        step: &str,
        mut read: impl FnMut(u16, &[u8]) -> Option<T>,
    ) -> Result<Option<T>> {
        sys::send(self.fd.as_fd(), bytes).map_err(|e| Error::new(step, e))?;
        loop {
            let n = sys::recv(self.fd.as_fd(), &mut self.buf).map_err(|e| Error::new(step, e))?;
            if n == 0 {
                return Err(Error::new(
                    step,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "netlink closed"),
                ));
            }
            for m in message::parse(&self.buf[..n]) {
                if !seqs.contains(&m.seq) {
                    continue; // an answer to an earlier request that gave up waiting
                }
                let last = m.seq == *seqs.end();
                match m.kind {
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(-libc::EPROTO);
                        if code != 0 {
                            return Err(Error::new(step, io::Error::from_raw_os_error(-code)));
                        }
                        if last {
                            return Ok(None);
                        }
                    }
                    NLMSG_DONE if last => return Ok(None),
                    kind if last => {
                        if let Some(v) = read(kind, m.payload) {
                            return Ok(Some(v));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
