//! A stream's send slot: the chunks the kernel is sending now and those queued behind them.
//!
//! A chunk is either bytes copied in from a write, or part of a provided receive buffer that
//! goes out as it came in (a body relayed from one ring stream to another: no copy in user
//! space). Several chunks go out in one vectored send. A provided buffer goes back to the
//! ring when the send that carried it completes, or when the slot gives up.

use io_uring::{opcode, squeue, types};

use crate::bufring::BufRing;
use crate::driver::Target;

/// Keeps this many emptied write buffers for reuse (one in flight, one filling).
const SPARE_BUFFERS: usize = 2;

/// Chunks one vectored send carries at most (the kernel's UIO_MAXIOV is 1024).
const MAX_IOV: usize = 64;

pub(crate) enum Chunk {
    /// Bytes copied in by a write.
    Owned(Vec<u8>),
    /// `len` bytes at `off` of provided buffer `bid`.
    Provided { bid: u16, off: u32, len: u32 },
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Owned(v) => v.len(),
            Chunk::Provided { len, .. } => *len as usize,
        }
    }

    fn bytes<'a>(&'a self, bufs: &'a BufRing) -> &'a [u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Provided { bid, off, len } => {
                let (off, len) = (*off as usize, *len as usize);
                &bufs.data(*bid, off + len)[off..]
            }
        }
    }
}

pub(crate) struct SendOp {
    pub target: Target,
    /// What the kernel is sending now, from `off` bytes in. Owned here and neither changed
    /// nor freed while `busy`, so the kernel's pointers stay valid whatever happens to the
    /// stream.
    inflight: Vec<Chunk>,
    off: usize,
    /// A vectored send's iovecs and header (boxed: the slot may move in its slab while the
    /// kernel holds a pointer to them).
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    /// Chunks written while a send was in flight, sent next.
    queued: Vec<Chunk>,
    queued_bytes: usize,
    /// Provided buffers held, in flight or queued: a relay to a slow reader may hold only a
    /// few of the ring's buffers, so it cannot starve the other streams' receives.
    provided: usize,
    spare: Vec<Vec<u8>>,
    pub busy: bool,
    /// The first send error (negative errno), returned to every later write.
    pub err: Option<i32>,
    pub waker: Option<std::task::Waker>,
    /// Keeps the socket open while data written before the stream was dropped still goes out.
    pub keep: Option<std::rc::Rc<crate::driver::Conn>>,
}

/// What a send's completion leaves to do.
pub(crate) enum Sent {
    /// Submit the slot's send (the rest of a short send, or what was queued).
    Again,
    /// Nothing in flight any more.
    Idle,
}

impl SendOp {
    pub fn new(target: Target) -> SendOp {
        SendOp {
            target,
            inflight: Vec::new(),
            off: 0,
            iov: Vec::new(),
            // SAFETY: msghdr is plain data; all zeros is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            queued: Vec::new(),
            queued_bytes: 0,
            provided: 0,
            spare: Vec::new(),
            busy: false,
            err: None,
            waker: None,
            keep: None,
        }
    }

    /// Bytes waiting behind the send in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Provided buffers this slot holds, in flight or queued.
    pub fn provided_buffers(&self) -> usize {
        self.provided
    }

    /// Appends a copy of `data`.
    pub fn write(&mut self, data: &[u8]) {
        if let Some(Chunk::Owned(v)) = self.queued.last_mut() {
            v.extend_from_slice(data);
        } else {
            let mut v = self.spare.pop().unwrap_or_default();
            v.extend_from_slice(data);
            self.queued.push(Chunk::Owned(v));
        }
        self.queued_bytes += data.len();
    }

    /// Appends `buf`, to be sent as it is.
    pub fn push_owned(&mut self, buf: Vec<u8>) {
        self.queued_bytes += buf.len();
        self.queued.push(Chunk::Owned(buf));
    }

    /// Appends part of a provided buffer, to be sent as it is.
    pub fn push_provided(&mut self, bid: u16, off: u32, len: u32) {
        self.queued.push(Chunk::Provided { bid, off, len });
        self.queued_bytes += len as usize;
        self.provided += 1;
    }

    /// Moves what is queued into flight, when nothing is; true when there is a send to submit.
    pub fn start(&mut self) -> bool {
        if self.busy || self.queued.is_empty() {
            return false;
        }
        std::mem::swap(&mut self.inflight, &mut self.queued);
        self.queued_bytes = 0;
        self.off = 0;
        self.busy = true;
        true
    }

    /// The submission for what is in flight, from `off`: one plain send for one chunk, a
    /// vectored one for several.
    pub fn sqe(&mut self, ud: u64, bufs: &BufRing) -> squeue::Entry {
        let mut skip = self.off;
        let mut first = 0;
        while first < self.inflight.len() && skip >= self.inflight[first].len() {
            skip -= self.inflight[first].len();
            first += 1;
        }
        let rest = &self.inflight[first..];
        let target = self.target;
        if rest.len() == 1 {
            let data = &rest[0].bytes(bufs)[skip..];
            let (ptr, len) = (data.as_ptr(), data.len() as u32);
            return match target {
                Target::Fixed(i) => opcode::Send::new(types::Fixed(i), ptr, len),
                Target::Fd(f) => opcode::Send::new(types::Fd(f), ptr, len),
            }
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        }
        self.iov.clear();
        for (i, c) in rest.iter().take(MAX_IOV).enumerate() {
            let data = &c.bytes(bufs)[if i == 0 { skip } else { 0 }..];
            self.iov.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        let msg: *const libc::msghdr = &*self.msg;
        match target {
            Target::Fixed(i) => opcode::SendMsg::new(types::Fixed(i), msg),
            Target::Fd(f) => opcode::SendMsg::new(types::Fd(f), msg),
        }
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(ud)
    }

    /// Takes a send's result; gives finished provided buffers back to `bufs`.
    pub fn completed(&mut self, res: i32, bufs: &mut BufRing) -> Sent {
        if res < 0 {
            self.err.get_or_insert(res);
            self.release(bufs);
            return Sent::Idle;
        }
        self.off += res as usize;
        let total: usize = self.inflight.iter().map(Chunk::len).sum();
        if self.off < total {
            // A short send: the rest goes now, whether or not anybody polls.
            return Sent::Again;
        }
        self.finish_inflight(bufs);
        self.busy = false;
        if self.start() {
            Sent::Again
        } else {
            Sent::Idle
        }
    }

    fn finish_inflight(&mut self, bufs: &mut BufRing) {
        for c in self.inflight.drain(..) {
            match c {
                Chunk::Provided { bid, .. } => {
                    bufs.recycle(bid);
                    self.provided -= 1;
                }
                Chunk::Owned(mut v) if self.spare.len() < SPARE_BUFFERS => {
                    v.clear();
                    self.spare.push(v);
                }
                Chunk::Owned(_) => {}
            }
        }
        self.off = 0;
    }

    /// Gives up on everything, in flight or queued (after an error, or when the slot goes):
    /// provided buffers go back to the ring.
    pub fn release(&mut self, bufs: &mut BufRing) {
        self.finish_inflight(bufs);
        for c in self.queued.drain(..) {
            if let Chunk::Provided { bid, .. } = c {
                bufs.recycle(bid);
                self.provided -= 1;
            }
        }
        self.queued_bytes = 0;
        self.busy = false;
    }
}
