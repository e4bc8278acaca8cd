//! The I/O seam: which backend a worker's sockets run on (io_uring or epoll), chosen once at
//! start, and the one stream type the proxy logic sees either way.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use flynn_uring::{Driver, UringStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the operator asks for (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoMode {
    /// io_uring where it works here, else epoll (one log line says why).
    #[default]
    Auto,
    /// io_uring, or fail to start.
    Uring,
    /// epoll (tokio's reactor).
    Epoll,
}

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    Uring,
    Epoll,
}

impl IoBackend {
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

/// A ring whose round trips take longer than this at the median is not chosen by `auto`:
/// epoll answers a loopback round trip in tens of microseconds, a stalled ring in tens of
/// milliseconds, and a loaded machine stays well below this.
pub const SELF_TEST_LIMIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Round trips the `auto` self-test times.
const SELF_TEST_ROUNDS: usize = 20;

/// The backend chosen at start, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct IoChoice {
    pub backend: IoBackend,
    /// Why `auto` did not take io_uring (`None` when it did, or when the operator chose).
    pub fallback: Option<String>,
    /// The median round trip of the ring's self-test, where one ran.
    pub ring_round_trip: Option<std::time::Duration>,
}

/// Picks the backend for `mode`: `auto` probes io_uring's features, then times a loopback
/// self-test through a ring, and falls back to epoll with the reason when either fails or the
/// ring is slow; `uring` fails only when io_uring cannot run here.
pub fn resolve(mode: IoMode) -> Result<IoChoice, String> {
    resolve_with(mode, SELF_TEST_LIMIT)
}

/// [`resolve`] with the self-test's limit given (tests set it to zero to see a fallback).
pub fn resolve_with(mode: IoMode, limit: std::time::Duration) -> Result<IoChoice, String> {
    let epoll = |fallback: Option<String>, rtt| IoChoice {
        backend: IoBackend::Epoll,
        fallback,
        ring_round_trip: rtt,
    };
    match mode {
        IoMode::Epoll => Ok(epoll(None, None)),
        IoMode::Uring => {
            flynn_uring::probe().map_err(|why| format!("--io uring: {why}"))?;
            Ok(IoChoice {
                backend: IoBackend::Uring,
                fallback: None,
                ring_round_trip: None,
            })
        }
        IoMode::Auto => {
            if let Err(why) = flynn_uring::probe() {
                return Ok(epoll(Some(why), None));
            }
            match flynn_uring::self_test(SELF_TEST_ROUNDS) {
                Err(why) => Ok(epoll(Some(why), None)),
                Ok(t) if t.median > limit => Ok(epoll(
                    Some(format!(
                        "io_uring round trips took {:.3} ms at the median in the self-test \
                         (limit {:.3} ms)",
                        t.median.as_secs_f64() * 1e3,
                        limit.as_secs_f64() * 1e3
                    )),
                    Some(t.median),
                )),
                Ok(t) => Ok(IoChoice {
                    backend: IoBackend::Uring,
                    fallback: None,
                    ring_round_trip: Some(t.median),
                }),
            }
        }
    }
}

/// A client or backend connection on either backend.
pub enum Stream {
    Epoll(TcpStream),
    Uring(UringStream),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (backend, local) = match self {
            Stream::Epoll(s) => ("epoll", s.local_addr()),
            Stream::Uring(s) => ("uring", s.tcp().local_addr()),
        };
        f.debug_struct("Stream")
            .field("backend", &backend)
            .field("local", &local.ok())
            .finish()
    }
}

/// The ring socket a stream's bytes go to and come from unchanged, if any: a plain stream on
/// io_uring. A body relayed between two of them on one ring moves in the ring's own receive
/// buffers, uncopied ([`crate::body::pump`]); a TLS stream transforms its bytes, so it has
/// none, as has an epoll stream.
pub trait RingSocket {
    fn ring_socket(&self) -> Option<&UringStream> {
        None
    }
}

impl RingSocket for Stream {
    fn ring_socket(&self) -> Option<&UringStream> {
        match self {
            Stream::Uring(s) => Some(s),
            Stream::Epoll(_) => None,
        }
    }
}

impl RingSocket for ReadHalf<'_> {
    fn ring_socket(&self) -> Option<&UringStream> {
        match self {
            ReadHalf::Uring(s) => Some(s),
            ReadHalf::Epoll(_) => None,
        }
    }
}

impl RingSocket for WriteHalf<'_> {
    fn ring_socket(&self) -> Option<&UringStream> {
        match self {
            WriteHalf::Uring(s) => Some(s),
            WriteHalf::Epoll(_) => None,
        }
    }
}

impl<IO> RingSocket for tokio_rustls::server::TlsStream<IO> {}

/// Bytes collected in memory (tests).
#[cfg(test)]
impl RingSocket for Vec<u8> {}

/// The reading side of a [`Stream::split`].
pub enum ReadHalf<'a> {
    Epoll(tokio::net::tcp::ReadHalf<'a>),
    Uring(&'a UringStream),
}

/// The writing side of a [`Stream::split`].
pub enum WriteHalf<'a> {
    Epoll(tokio::net::tcp::WriteHalf<'a>),
    Uring(&'a UringStream),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Epoll(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Uring(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Epoll(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Uring(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Epoll(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Uring(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Epoll(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Uring(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Epoll(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Uring(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Connects to a backend on the worker's backend.
    pub async fn connect(ring: Option<&Rc<Driver>>, addr: SocketAddr) -> io::Result<Stream> {
        let s = match ring {
            Some(d) => Stream::Uring(UringStream::connect(d, addr).await?),
            None => Stream::Epoll(TcpStream::connect(addr).await?),
        };
        s.set_nodelay()?;
        Ok(s)
    }

    /// Borrowed read and write halves, to read a response while a body is still being sent.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Epoll(s) => {
                let (r, w) = s.split();
                (ReadHalf::Epoll(r), WriteHalf::Epoll(w))
            }
            Stream::Uring(s) => (ReadHalf::Uring(s), WriteHalf::Uring(s)),
        }
    }

    /// The socket as tokio's epoll stream, for splice: a ring stream leaves its ring (which
    /// only a stream not yet read from can do; `None` otherwise).
    pub fn into_epoll(self) -> Option<TcpStream> {
        match self {
            Stream::Epoll(s) => Some(s),
            Stream::Uring(s) => TcpStream::from_std(s.into_std().ok()?).ok(),
        }
    }

    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Epoll(s) => s.set_nodelay(true),
            Stream::Uring(s) => s.tcp().set_nodelay(true),
        }
    }

    /// Makes the kernel fail the connection (ETIMEDOUT) once sent data has gone
    /// unacknowledged this long: how a backend whose host vanished shows on a pooled
    /// connection, instead of silence until the response timeout.
    pub fn set_user_timeout(&self, d: std::time::Duration) -> io::Result<()> {
        let sock = match self {
            Stream::Epoll(s) => socket2::SockRef::from(s),
            Stream::Uring(s) => socket2::SockRef::from(s.tcp()),
        };
        sock.set_tcp_user_timeout(Some(d))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::Epoll(s) => s.local_addr(),
            Stream::Uring(s) => s.tcp().local_addr(),
        }
    }

    /// Whether an idle connection is still open: no EOF, reset or stray bytes seen.
    pub fn still_open(&self) -> bool {
        match self {
            Stream::Epoll(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Uring(s) => s.still_open(),
        }
    }

    /// Copies what has arrived into `buf` without consuming it; waits for the first byte.
    pub async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Epoll(s) => s.peek(buf).await,
            Stream::Uring(s) => std::future::poll_fn(|cx| s.poll_peek(cx, buf)).await,
        }
    }
}

// The whole stream reads and writes through its borrowed halves (one place that matches on
// the backend; splitting is only taking references).
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().split().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().split().1).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().split().1).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Epoll(s) => s.is_write_vectored(),
            Stream::Uring(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().split().1).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().split().1).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn auto_takes_a_prompt_ring_and_passes_over_a_slow_one_saying_why() {
        // This machine's ring answers in microseconds: auto takes it and keeps the figure.
        let fast = resolve(IoMode::Auto).unwrap();
        assert_eq!(fast.backend, IoBackend::Uring, "{fast:?}");
        assert_eq!(fast.fallback, None);
        let rtt = fast.ring_round_trip.expect("the self-test's figure");
        assert!(rtt < SELF_TEST_LIMIT, "{rtt:?}");
        // Any ring is too slow for a limit of zero: epoll, with the measured delay named.
        let slow = resolve_with(IoMode::Auto, Duration::ZERO).unwrap();
        assert_eq!(slow.backend, IoBackend::Epoll);
        let why = slow.fallback.expect("a reason");
        assert!(why.contains("ms at the median in the self-test"), "{why}");
        assert!(slow.ring_round_trip.is_some());
        // Chosen outright, neither mode runs the self-test.
        assert_eq!(
            resolve_with(IoMode::Uring, Duration::ZERO).unwrap().backend,
            IoBackend::Uring
        );
        assert_eq!(
            resolve_with(IoMode::Epoll, Duration::ZERO).unwrap(),
            IoChoice {
                backend: IoBackend::Epoll,
                fallback: None,
                ring_round_trip: None
            }
        );
    }
}
