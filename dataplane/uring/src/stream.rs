//! Sockets on the ring, as tokio `AsyncRead`/`AsyncWrite` streams, so the proxy logic above
//! is the same code on either backend.
//!
//! Reads come from a multishot receive into the provided buffer ring: each completion is a
//! filled buffer, queued on the stream until read and then given back. Writes are copied
//! into a buffer the send slot owns and go out at the end of the loop turn; `poll_write`
//! returns at once (a later write or flush reports a failure), `poll_flush` waits until the
//! kernel took everything, and data written before a drop is still sent.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use io_uring::cqueue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::driver::{set_waker, wake_all, AcceptOp, Conn, Driver, Op, RecvOp, SendOp, State};

/// Bytes a stream may have queued behind an in-flight send before writes wait.
const SEND_HIGH_WATER: usize = 256 * 1024;

/// Provided buffers a stream's sends may hold before [`UringStream::poll_send_bufs`] waits:
/// as many as its receive may queue unread, so a relay holds at most twice that.
const SEND_PROVIDED_HIGH_WATER: usize = crate::driver::MAX_QUEUED_BUFFERS;

/// A connected TCP socket driven by the ring.
pub struct UringStream {
    drv: Rc<Driver>,
    conn: Rc<Conn>,
    recv: usize,
    send: usize,
    /// The receive buffer being read: (buffer id, bytes read from it, its length). Cells, so
    /// a read half and a write half can share one `&UringStream`.
    cur: Cell<Option<(u16, usize, usize)>>,
    eof: Cell<bool>,
}

impl std::fmt::Debug for UringStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStream")
            .field("fd", &self.conn.tcp.as_raw_fd())
            .field("eof", &self.eof.get())
            .finish()
    }
}

impl UringStream {
    /// Moves a connected socket onto the ring.
    pub fn from_std(drv: &Rc<Driver>, tcp: std::net::TcpStream) -> io::Result<UringStream> {
        tcp.set_nonblocking(true)?;
        let target = drv.register(tcp.as_raw_fd());
        let conn = Rc::new(Conn {
            tcp,
            target,
            drv: Rc::downgrade(drv),
        });
        let mut st = drv.st.borrow_mut();
        let recv = st.ops.insert(Op::Recv(RecvOp::default()));
        let send = st.ops.insert(Op::Send(SendOp::new(target)));
        // The receive is armed by the first read, so a stream nobody read from can still
        // leave the ring (`into_std`).
        drop(st);
        Ok(UringStream {
            drv: drv.clone(),
            conn,
            recv,
            send,
            cur: Cell::new(None),
            eof: Cell::new(false),
        })
    }

    /// Takes the socket back off the ring, for code that needs the descriptor itself (splice).
    /// Only a stream that has not been read from and has no send in flight can leave; any
    /// other comes back as the error.
    pub fn into_std(self) -> Result<std::net::TcpStream, UringStream> {
        let idle = {
            let st = self.drv.st.borrow();
            let recv_idle = matches!(st.ops.get(self.recv), Some(Op::Recv(r)) if !r.armed && r.queue.is_empty());
            let send_idle = matches!(st.ops.get(self.send), Some(Op::Send(s)) if !s.busy);
            recv_idle && send_idle && self.cur.get().is_none() && Rc::strong_count(&self.conn) == 1
        };
        if !idle {
            return Err(self);
        }
        let dup = match self.conn.tcp.try_clone() {
            Ok(d) => d,
            Err(_) => return Err(self),
        };
        // Dropping the stream frees its slots and unregisters the file; the duplicate keeps
        // the socket itself open.
        drop(self);
        Ok(dup)
    }

    /// Connects to `addr` (through tokio's reactor, which connection pooling makes rare),
    /// then moves the socket onto the ring. It receives on demand (one receive per read, not
    /// a multishot): a backend's large response then waits in its socket until relayed,
    /// instead of filling the ring's shared buffers first.
    pub async fn connect(drv: &Rc<Driver>, addr: SocketAddr) -> io::Result<UringStream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let s = UringStream::from_std(drv, s.into_std()?)?;
        if let Some(Op::Recv(r)) = drv.st.borrow_mut().ops.get_mut(s.recv) {
            r.on_demand = true;
        }
        Ok(s)
    }

    pub fn tcp(&self) -> &std::net::TcpStream {
        &self.conn.tcp
    }

    /// Whether the peer has not closed or reset (non-blocking; what the ring has seen so far).
    pub fn still_open(&self) -> bool {
        if self.eof.get() || self.cur.get().is_some() {
            return false;
        }
        let armed = {
            let st = self.drv.st.borrow();
            match st.ops.get(self.recv) {
                Some(Op::Recv(r)) if !r.queue.is_empty() => return false,
                Some(Op::Recv(r)) => r.armed,
                _ => return false,
            }
        };
        if armed {
            return true;
        }
        // No receive in the kernel to have seen a close: ask the socket, as epoll would.
        let mut probe = [0u8; 1];
        // SAFETY: a non-blocking peek of one byte into a local buffer of that size.
        let n = unsafe {
            libc::recv(
                self.conn.tcp.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// Copies received bytes into `out` without consuming them; waits for the first.
    pub fn poll_peek(&mut self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut st = self.drv.st.borrow_mut();
        let mut n = 0;
        if let Some((bid, off, len)) = self.cur.get() {
            let data = &st.bufs.data(bid, len)[off..];
            let k = data.len().min(out.len());
            out[..k].copy_from_slice(&data[..k]);
            n = k;
        }
        let Some(Op::Recv(r)) = st.ops.get(self.recv) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let mut eof = self.eof.get();
        for &(res, flags) in &r.queue {
            if n == out.len() {
                break;
            }
            if res == 0 {
                eof = true;
                break;
            }
            if res < 0 {
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
                }
                break;
            }
            let Some(bid) = cqueue::buffer_select(flags) else {
                break;
            };
            let data = st.bufs.data(bid, res as usize);
            let k = data.len().min(out.len() - n);
            out[n..n + k].copy_from_slice(&data[..k]);
            n += k;
        }
        let more_wanted = r.on_demand && !r.armed && r.direct.is_none() && n < out.len();
        if n > 0 || eof {
            if more_wanted && !eof {
                // On demand, nothing receives unless asked: ask, so a later peek sees more.
                self.drv.arm_recv(&mut st, self.recv, self.conn.target);
            }
            return Poll::Ready(Ok(n));
        }
        self.wait_for_data(&mut st, cx);
        Poll::Pending
    }

    /// Registers to be woken by the next completion, re-arming the receive if it ended.
    fn wait_for_data(&self, st: &mut State, cx: &mut Context<'_>) {
        let armed = match st.ops.get_mut(self.recv) {
            Some(Op::Recv(r)) => {
                set_waker(&mut r.waker, cx);
                // A direct receive owns the slot until its taker collects it (a relay never
                // leaves one behind on a stream that is read again).
                r.armed || r.direct.is_some()
            }
            _ => return,
        };
        if !armed {
            if st.bufs.available() == 0 {
                // The ring is empty: wait until some reader gives a buffer back.
                st.buf_waiters.push(cx.waker().clone());
                return;
            }
            self.drv.arm_recv(st, self.recv, self.conn.target);
        }
    }
}

impl UringStream {
    fn read_into(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        if this.eof.get() {
            return Poll::Ready(Ok(()));
        }
        let mut st = this.drv.st.borrow_mut();
        let mut copied = false;
        loop {
            if let Some((bid, off, len)) = this.cur.get() {
                let data = &st.bufs.data(bid, len)[off..];
                let k = data.len().min(buf.remaining());
                buf.put_slice(&data[..k]);
                copied |= k > 0;
                if off + k < len {
                    this.cur.set(Some((bid, off + k, len)));
                    return Poll::Ready(Ok(()));
                }
                this.cur.set(None);
                st.bufs.recycle(bid);
                wake_all(&mut st.buf_waiters);
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            let next = match st.ops.get_mut(this.recv) {
                Some(Op::Recv(r)) => r.queue.pop_front(),
                _ => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            };
            match next {
                Some((res, flags)) if res > 0 => match cqueue::buffer_select(flags) {
                    Some(bid) => this.cur.set(Some((bid, 0, res as usize))),
                    None => return Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
                },
                Some((0, _)) => {
                    this.eof.set(true);
                    return Poll::Ready(Ok(()));
                }
                Some((err, _)) if copied => {
                    // Hand over the data first; the error comes with the next read.
                    if let Some(Op::Recv(r)) = st.ops.get_mut(this.recv) {
                        r.queue.push_front((err, 0));
                    }
                    return Poll::Ready(Ok(()));
                }
                Some((err, _)) => return Poll::Ready(Err(io::Error::from_raw_os_error(-err))),
                None if copied => return Poll::Ready(Ok(())),
                None => {
                    this.wait_for_data(&mut st, cx);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Received bytes still in the ring's provided buffer they arrived in, handed out of a
/// stream without a copy ([`UringStream::poll_take`]). The buffer goes back to the ring when
/// this is dropped, or once a send of it ([`UringStream::poll_send_bufs`]) completes.
pub struct RecvBuf {
    drv: Rc<Driver>,
    /// The bytes: in the buffer ring's memory, which never moves while the driver lives.
    ptr: *const u8,
    bid: u16,
    off: u32,
    len: u32,
}

impl RecvBuf {
    /// (buffer id, offset, length), leaving the buffer out of the ring: the caller now owns
    /// giving it back.
    fn into_raw(self) -> (u16, u32, u32) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so its Rc is moved out exactly once.
        drop(unsafe { std::ptr::read(&this.drv) });
        (this.bid, this.off, this.len)
    }
}

impl std::ops::Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies in the buffer ring's memory (checked by `data` when it
        // was taken), which lives as long as the driver this value keeps alive; the buffer
        // is out of the ring while this value holds it, so nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }
}

impl std::fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvBuf({} bytes)", self.len)
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        let mut st = self.drv.st.borrow_mut();
        st.bufs.recycle(self.bid);
        wake_all(&mut st.buf_waiters);
    }
}

/// What [`UringStream::poll_recv_direct`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// Received this many bytes into the buffer (0 only when the buffer had no room).
    Filled(usize),
    /// The multishot receive had queued bytes, which come first: nothing was received.
    Queued,
    /// The peer closed its side.
    Eof,
}

/// What [`UringStream::poll_take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// This many bytes, in the buffers handed out.
    Bytes(usize),
    /// The peer closed its side.
    Eof,
    /// The next received buffer holds more than the bytes asked for: read those the
    /// ordinary way (they are copied), and the rest stays for the next read.
    Straddles,
}

impl UringStream {
    /// Hands out received buffers as they are, without copying them: every whole one queued,
    /// up to `max` bytes in all; waits for the first.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<RecvBuf>,
    ) -> Poll<io::Result<Taken>> {
        if self.eof.get() {
            return Poll::Ready(Ok(Taken::Eof));
        }
        let mut st = self.drv.st.borrow_mut();
        let mut n = 0usize;
        if let Some((bid, off, len)) = self.cur.get() {
            if len - off > max {
                return Poll::Ready(Ok(Taken::Straddles));
            }
            self.cur.set(None);
            out.push(self.recv_buf(&st, bid, off, len - off));
            n += len - off;
        }
        loop {
            let Some(Op::Recv(r)) = st.ops.get_mut(self.recv) else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let Some(&(res, flags)) = r.queue.front() else {
                break;
            };
            if res > 0 {
                let Some(bid) = cqueue::buffer_select(flags) else {
                    return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
                };
                if n + res as usize > max {
                    if n == 0 {
                        return Poll::Ready(Ok(Taken::Straddles));
                    }
                    break;
                }
                r.queue.pop_front();
                out.push(self.recv_buf(&st, bid, 0, res as usize));
                n += res as usize;
                continue;
            }
            if n > 0 {
                break; // the data first; the end or the error with the next call
            }
            r.queue.pop_front();
            if res == 0 {
                self.eof.set(true);
                return Poll::Ready(Ok(Taken::Eof));
            }
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        if n > 0 {
            return Poll::Ready(Ok(Taken::Bytes(n)));
        }
        self.wait_for_data(&mut st, cx);
        Poll::Pending
    }

    /// [`UringStream::poll_take`] as a future.
    pub async fn take_bufs(&self, max: usize, out: &mut Vec<RecvBuf>) -> io::Result<Taken> {
        std::future::poll_fn(|cx| self.poll_take(cx, max, out)).await
    }

    fn recv_buf(&self, st: &State, bid: u16, off: usize, len: usize) -> RecvBuf {
        RecvBuf {
            drv: self.drv.clone(),
            ptr: st.bufs.data(bid, off + len)[off..].as_ptr(),
            bid,
            off: off as u32,
            len: len as u32,
        }
    }

    /// Receives into `buf` (after its contents, up to its capacity and at most `max` bytes)
    /// with a one-shot receive
    /// the stream owns, for a bulk relay: the filled buffer is sent on as it is
    /// ([`UringStream::poll_send_owned`]), one receive and one send per buffer, like a
    /// read/write loop but with nothing copied in user space. Bytes the multishot receive
    /// already queued come first: then this returns [`Direct::Queued`] and takes nothing
    /// (hand them out with [`UringStream::poll_take`]). A running multishot receive is
    /// stopped first; the next ordinary read starts it again.
    pub fn poll_recv_direct(
        &self,
        cx: &mut Context<'_>,
        buf: &mut Option<Vec<u8>>,
        max: usize,
    ) -> Poll<io::Result<Direct>> {
        if self.cur.get().is_some() {
            return Poll::Ready(Ok(Direct::Queued));
        }
        if self.eof.get() {
            return Poll::Ready(Ok(Direct::Eof));
        }
        let mut st = self.drv.st.borrow_mut();
        let Some(Op::Recv(r)) = st.ops.get_mut(self.recv) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        set_waker(&mut r.waker, cx);
        if let Some(res) = r.direct_res.take() {
            let mut got = r.direct.take().expect("a direct result has its buffer");
            return Poll::Ready(match res {
                0 => {
                    self.eof.set(true);
                    *buf = Some(got);
                    Ok(Direct::Eof)
                }
                n if n > 0 => {
                    // SAFETY: the kernel wrote `n` bytes into the spare capacity after `len`.
                    unsafe { got.set_len(got.len() + n as usize) };
                    *buf = Some(got);
                    Ok(Direct::Filled(n as usize))
                }
                e => {
                    *buf = Some(got);
                    Err(io::Error::from_raw_os_error(-e))
                }
            });
        }
        if !r.queue.is_empty() {
            return Poll::Ready(Ok(Direct::Queued));
        }
        if r.armed {
            // The multishot receive (or the direct one, not done yet): wait for its last
            // completion, cancelling a multishot so it stops taking the ring's buffers.
            if r.direct.is_none() && !r.cancelling {
                r.cancelling = true;
                drop(st);
                self.drv.cancel(self.recv);
            }
            return Poll::Pending;
        }
        let Some(b) = buf.take() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a direct receive needs a buffer",
            )));
        };
        if b.capacity() == b.len() || max == 0 {
            *buf = Some(b);
            return Poll::Ready(Ok(Direct::Filled(0)));
        }
        r.direct = Some(b);
        self.drv
            .arm_direct(&mut st, self.recv, self.conn.target, max);
        Poll::Pending
    }

    /// [`UringStream::poll_recv_direct`] as a future.
    pub async fn recv_direct(&self, buf: &mut Option<Vec<u8>>, max: usize) -> io::Result<Direct> {
        std::future::poll_fn(|cx| self.poll_recv_direct(cx, buf, max)).await
    }

    /// Queues `buf` to be sent as it is, without copying it (see
    /// [`UringStream::poll_recv_direct`]); waits first while much is queued already.
    pub fn poll_send_owned(
        &self,
        cx: &mut Context<'_>,
        buf: &mut Option<Vec<u8>>,
    ) -> Poll<io::Result<()>> {
        let Some(b) = buf.take().filter(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(()));
        };
        let mut b = Some(b);
        let r = self.enqueue(cx, false, |s| s.push_owned(b.take().unwrap_or_default()));
        if b.is_some() {
            *buf = b; // not queued (waiting, or an error): the caller keeps it
        }
        r
    }

    /// [`UringStream::poll_send_owned`] as a future.
    pub async fn send_owned(&self, buf: Vec<u8>) -> io::Result<()> {
        let mut buf = Some(buf);
        std::future::poll_fn(|cx| self.poll_send_owned(cx, &mut buf)).await
    }

    /// Whether at least a quarter of the ring's receive buffers are free: enough that
    /// holding some in a relay's sends starves no other stream.
    pub fn ring_has_room(&self) -> bool {
        let free = self.drv.free_buffers();
        free * 4 >= self.drv.config().buffers as usize
    }

    /// Whether `other` runs on this stream's ring (so buffers pass between them uncopied).
    pub fn same_ring(&self, other: &UringStream) -> bool {
        Rc::ptr_eq(&self.drv, &other.drv)
    }
}

impl UringStream {
    fn write_from(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return match send_slot(&mut self.drv.st.borrow_mut().ops, self.send) {
                Ok(_) => Poll::Ready(Ok(0)),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        self.enqueue(cx, false, |s| s.write(data))
            .map_ok(|()| data.len())
    }

    /// Queues a send through `add` and starts it if nothing is in flight; waits first while
    /// much is queued already (or, with `holds_provided`, while the slot holds its share of
    /// the ring's buffers).
    fn enqueue(
        &self,
        cx: &mut Context<'_>,
        holds_provided: bool,
        add: impl FnOnce(&mut SendOp),
    ) -> Poll<io::Result<()>> {
        let mut st = self.drv.st.borrow_mut();
        let State { ops, bufs, .. } = &mut *st;
        let s = match send_slot(ops, self.send) {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let full = s.queued_bytes() >= SEND_HIGH_WATER
            || (holds_provided && s.provided_buffers() >= SEND_PROVIDED_HIGH_WATER);
        if s.busy && full {
            set_waker(&mut s.waker, cx);
            return Poll::Pending;
        }
        add(s);
        if s.start() {
            self.drv.submit_send(self.send, s, bufs);
            self.drv.wake_with(&st);
        }
        Poll::Ready(Ok(()))
    }

    /// Sends received buffers (from [`UringStream::poll_take`] of a stream on the same ring)
    /// as they are, without copying them, then gives them back to the ring. Like a write it
    /// returns once they are queued ([`poll_flush`](AsyncWrite::poll_flush) waits until the
    /// kernel took them), and waits first while much is queued already.
    pub fn poll_send_bufs(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut Vec<RecvBuf>,
    ) -> Poll<io::Result<()>> {
        if bufs.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if bufs.iter().any(|b| !Rc::ptr_eq(&b.drv, &self.drv)) {
            // Another ring's buffers: copied, as any write is.
            while let Some(b) = bufs.first() {
                match self.write_from(cx, b) {
                    Poll::Ready(Ok(_)) => drop(bufs.remove(0)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            return Poll::Ready(Ok(()));
        }
        self.enqueue(cx, true, |s| {
            for b in bufs.drain(..) {
                let (bid, off, len) = b.into_raw();
                s.push_provided(bid, off, len);
            }
        })
    }

    /// [`UringStream::poll_send_bufs`] as a future.
    pub async fn send_bufs(&self, bufs: &mut Vec<RecvBuf>) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send_bufs(cx, bufs)).await
    }

    fn flush_sends(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.drv.st.borrow_mut();
        let s = match send_slot(&mut st.ops, self.send) {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if s.busy {
            set_waker(&mut s.waker, cx);
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn shutdown_write(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.flush_sends(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        match self.conn.tcp.shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Send slot `ud`, or the error every write and flush of its stream now returns.
fn send_slot(ops: &mut slab::Slab<Op>, ud: usize) -> io::Result<&mut SendOp> {
    match ops.get_mut(ud) {
        Some(Op::Send(s)) => match s.err {
            Some(e) => Err(io::Error::from_raw_os_error(-e)),
            None => Ok(s),
        },
        _ => Err(io::ErrorKind::NotConnected.into()),
    }
}

macro_rules! stream_io {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                self.read_into(cx, buf)
            }
        }

        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                data: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.write_from(cx, data)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.flush_sends(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.shutdown_write(cx)
            }
        }
    };
}

// The stream, and a shared reference to it: reads and writes use separate slots and state,
// so one task can read and write the same stream at once (a read half and a write half).
stream_io!(UringStream);
stream_io!(&UringStream);

impl Drop for UringStream {
    fn drop(&mut self) {
        let mut st = self.drv.st.borrow_mut();
        if let Some((bid, _, _)) = self.cur.take() {
            st.bufs.recycle(bid);
        }
        // Receive: give queued buffers back; a live multishot is cancelled and its slot freed
        // at its last completion.
        let mut cancel = false;
        let State {
            ops,
            bufs,
            buf_waiters,
            ..
        } = &mut *st;
        if let Some(Op::Recv(r)) = ops.get_mut(self.recv) {
            for (res, flags) in r.queue.drain(..) {
                if let Some(bid) = cqueue::buffer_select(flags).filter(|_| res > 0) {
                    bufs.recycle(bid);
                }
            }
            r.waker = None;
            if r.armed {
                r.orphan = true;
                cancel = true;
            } else {
                ops.remove(self.recv);
            }
        }
        wake_all(buf_waiters);
        // Send: what was written still goes out; the slot keeps the socket open until then.
        let State { ops, bufs, .. } = &mut *st;
        if let Some(Op::Send(s)) = ops.get_mut(self.send) {
            s.waker = None;
            if s.busy {
                s.keep = Some(self.conn.clone());
            } else {
                s.release(bufs);
                ops.remove(self.send);
            }
        }
        drop(st);
        if cancel {
            self.drv.cancel(self.recv);
        }
    }
}

/// A listening socket whose connections arrive through a multishot accept.
pub struct UringListener {
    drv: Rc<Driver>,
    tcp: std::net::TcpListener,
    op: usize,
}

impl UringListener {
    pub fn from_std(drv: &Rc<Driver>, tcp: std::net::TcpListener) -> io::Result<UringListener> {
        tcp.set_nonblocking(true)?;
        let op = drv
            .st
            .borrow_mut()
            .ops
            .insert(Op::Accept(AcceptOp::default()));
        Ok(UringListener {
            drv: drv.clone(),
            tcp,
            op,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(UringStream, SocketAddr)>> {
        let mut st = self.drv.st.borrow_mut();
        let Some(Op::Accept(a)) = st.ops.get_mut(self.op) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        match a.queue.pop_front() {
            Some(fd) if fd >= 0 => {
                drop(st);
                // SAFETY: the kernel just accepted this descriptor for us; nobody else owns it.
                let tcp = unsafe { std::net::TcpStream::from_raw_fd(fd) };
                let peer = tcp.peer_addr()?;
                Poll::Ready(Ok((UringStream::from_std(&self.drv, tcp)?, peer)))
            }
            Some(err) => Poll::Ready(Err(io::Error::from_raw_os_error(-err))),
            None => {
                set_waker(&mut a.waker, cx);
                if !a.armed {
                    self.drv.arm_accept(&mut st, self.op, self.tcp.as_raw_fd());
                }
                Poll::Pending
            }
        }
    }

    pub async fn accept(&self) -> io::Result<(UringStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Stops accepting and returns the connections the kernel already accepted for us (a
    /// multishot accept takes them off the socket before anyone asks; dropping them would
    /// reset their clients). Waits, at most a second, for the cancel to be confirmed.
    pub async fn close(self) -> Vec<(UringStream, SocketAddr)> {
        let armed = matches!(self.drv.st.borrow().ops.get(self.op), Some(Op::Accept(a)) if a.armed);
        if armed {
            self.drv.cancel(self.op);
            let confirmed = std::future::poll_fn(|cx| {
                let mut st = self.drv.st.borrow_mut();
                match st.ops.get_mut(self.op) {
                    Some(Op::Accept(a)) if a.armed => {
                        set_waker(&mut a.waker, cx);
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            });
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), confirmed).await;
        }
        let fds: Vec<i32> = match self.drv.st.borrow_mut().ops.get_mut(self.op) {
            Some(Op::Accept(a)) => a.queue.drain(..).filter(|fd| *fd >= 0).collect(),
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for fd in fds {
            // SAFETY: a descriptor the kernel accepted for us and nobody took.
            let tcp = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            let Ok(peer) = tcp.peer_addr() else { continue };
            if let Ok(s) = UringStream::from_std(&self.drv, tcp) {
                out.push((s, peer));
            }
        }
        out
    }
}

impl Drop for UringListener {
    fn drop(&mut self) {
        let mut st = self.drv.st.borrow_mut();
        let mut cancel = false;
        if let Some(Op::Accept(a)) = st.ops.get_mut(self.op) {
            for fd in a.queue.drain(..).filter(|fd| *fd >= 0) {
                // SAFETY: accepted descriptors nobody took; closing them refuses the client.
                drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
            a.waker = None;
            if a.armed {
                a.orphan = true;
                cancel = true;
            } else {
                st.ops.remove(self.op);
            }
        }
        drop(st);
        if cancel {
            self.drv.cancel(self.op);
        }
    }
}
