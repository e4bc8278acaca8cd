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
        let send = st.ops.insert(Op::Send(SendOp {
            target,
            inflight: Vec::new(),
            off: 0,
            queued: Vec::new(),
            busy: false,
            err: None,
            waker: None,
            keep: None,
        }));
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
    /// then moves the socket onto the ring.
    pub async fn connect(drv: &Rc<Driver>, addr: SocketAddr) -> io::Result<UringStream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        UringStream::from_std(drv, s.into_std()?)
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
        if n > 0 || eof {
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
                r.armed
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

impl UringStream {
    /// This stream's send slot, or the error every write and flush now returns.
    fn send_slot<'a>(&self, st: &'a mut State) -> io::Result<&'a mut SendOp> {
        match st.ops.get_mut(self.send) {
            Some(Op::Send(s)) => match s.err {
                Some(e) => Err(io::Error::from_raw_os_error(-e)),
                None => Ok(s),
            },
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn write_from(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
        let mut st = this.drv.st.borrow_mut();
        let s = match this.send_slot(&mut st) {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if s.busy {
            if s.queued.len() >= SEND_HIGH_WATER {
                set_waker(&mut s.waker, cx);
                return Poll::Pending;
            }
            s.queued.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        s.inflight.clear();
        s.inflight.extend_from_slice(data);
        s.off = 0;
        s.busy = true;
        this.drv.submit_send(this.send, s);
        this.drv.wake_with(&st);
        Poll::Ready(Ok(data.len()))
    }

    fn flush_sends(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.drv.st.borrow_mut();
        let s = match self.send_slot(&mut st) {
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
        if let Some(Op::Send(s)) = st.ops.get_mut(self.send) {
            s.waker = None;
            if s.busy {
                s.keep = Some(self.conn.clone());
            } else {
                st.ops.remove(self.send);
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
