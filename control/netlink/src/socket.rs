//! A netlink socket that sends requests and waits for the kernel's answer to each.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::message::{self, Message, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK};
use crate::{sys, Error, Result};

const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// A socket of `protocol` in the calling thread's network namespace.
    pub fn open(protocol: libc::c_int, what: &str) -> Result<Self> {
        let step = format!("opening a {what} netlink socket");
        let fd = sys::netlink_socket(protocol).map_err(|e| Error::new(&step, e))?;
        // The kernel answers every request at once; a wait this long means something is
        // wrong, and a job's start fails with it rather than hanging a worker.
        sys::set_receive_timeout(fd.as_fd(), RECEIVE_TIMEOUT).map_err(|e| Error::new(&step, e))?;
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

    /// `m`'s bytes numbered `seq`, or the error of a message netlink cannot carry.
    pub fn bytes(m: Message, seq: u32, step: &str) -> Result<Vec<u8>> {
        m.finish(seq).ok_or_else(|| {
            Error::new(
                step,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a netlink attribute over 64 KiB",
                ),
            )
        })
    }

    /// Sends `m` (asking for an acknowledgement) and waits for it.
    pub fn request(&mut self, mut m: Message, step: &str) -> Result<()> {
        m.add_flags(NLM_F_ACK);
        let seq = self.next_seq();
        let bytes = Self::bytes(m, seq, step)?;
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
            if n > self.buf.len() {
                // Cut short: the answer waited for may be in what was lost.
                return Err(Error::new(
                    step,
                    io::Error::other(format!(
                        "a netlink answer of {n} bytes, over {}",
                        self.buf.len()
                    )),
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
