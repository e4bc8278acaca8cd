//! GETs of files, answered on the connection itself: the head written by hand and, for a
//! copy this host holds, the body sent from the page cache with `sendfile(2)`, as nginx
//! does. Through hyper each byte was copied twice: out of the page cache into a buffer
//! (`pread`), and from there into the socket; here the kernel hands the socket the cached
//! pages.
//!
//! This is the blobstore listener's [`Front`]: it reads each request head of a new
//! connection and answers a plain `GET` of a file path itself, with the same [`answer`] and
//! [`source`] as the API's, so the same status, headers and errors, and the same checks:
//! a whole read of a copy not checked lately is hashed on its way out, and files held
//! elsewhere or on an external backend stream as the API streams them. At the first
//! request it does not take (another method, a body, `/_objects` and the other internal
//! routes, listings, percent escapes, HTTP/1.0, HTTP/2, an upgrade) it hands the
//! connection, with what it has read of it, to hyper for good. So a connection that starts
//! with a PUT stays with the API, and so do the hosts' own object transfers
//! (`/_objects`, on connections that also carry PUTs).
//!
//! `sendfile` reads what the page cache lacks from the disk, on the async worker. So before
//! each call the window it would send is looked up (`cachestat(2)`, Linux 6.5, and its last
//! page read with `RWF_NOWAIT`, since pages still being read in count as cached); a window
//! not all there is read as the API reads it, on the blocking pool, and written. It can
//! still wait now and then: a page in the middle of a window still being read in, or one
//! dropped between the look and the send. Kernels without `cachestat`, or where a seccomp
//! filter refuses it, always copy.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

use super::backends::IoStream;
use super::content::open;
use super::http::{answer, record, source, Answer, Source};
use super::Blobstore;
use crate::serve::{Front, Rewind, HEAD_TIMEOUT};

/// A head longer than this is left to hyper (whose own limit is larger).
const MAX_HEAD: usize = 16 << 10;
/// A body up to this long is read and written with its head, not sent with `sendfile`.
const SMALL: u64 = 64 << 10;
/// Bytes looked up in the page cache, then sent, at a time.
const WINDOW: u64 = 4 << 20;
/// Error bodies (JSON) are small; one larger is not ours to buffer.
const MAX_COMPLETE_BODY: usize = 64 << 10;

impl Front for Blobstore {
    fn serve(self: Arc<Self>, stream: TcpStream) -> BoxFuture<'static, Option<Rewind>> {
        Box::pin(serve(self, stream))
    }
}

/// A request this path answers.
struct Get {
    path: String,
    headers: HeaderMap,
    /// The client asked to close the connection after this answer.
    close: bool,
}

enum Head {
    /// A GET of ours, and the length of its head.
    Ours(Get, usize),
    /// Anything else: hyper's.
    NotOurs,
    /// Not complete yet.
    Partial,
}

enum Served {
    KeepAlive,
    Close,
}

async fn serve(b: Arc<Blobstore>, mut stream: TcpStream) -> Option<Rewind> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // As hyper's head timer: from waiting for a request to its head being whole.
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        let (get, len) = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Head::Ours(get, len) => break (get, len),
                    Head::NotOurs => return Some(Rewind::new(buf.freeze(), stream)),
                    Head::Partial if buf.len() > MAX_HEAD => {
                        return Some(Rewind::new(buf.freeze(), stream))
                    }
                    Head::Partial => {}
                }
            }
            buf.reserve(4096);
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, broken, or idle too long: done (hyper closes it the same way).
                _ => return None,
            }
        };
        match handle(&b, &stream, &get).await {
            Served::KeepAlive => buf.advance(len),
            Served::Close => return None,
        }
    }
}

/// The request at the start of `buf`, if it is a plain GET of a file path.
fn parse(buf: &[u8]) -> Head {
    let mut slots = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::NotOurs,
    };
    let (Some("GET"), Some(1), Some(path)) = (req.method, req.version, req.path) else {
        return Head::NotOurs;
    };
    // Internal routes, listings, queries and percent escapes (which axum decodes) are the
    // API's.
    let plain = path.starts_with('/')
        && !path.starts_with("/_")
        && path != "/"
        && !path.contains(['?', '%', '#'])
        // What hyper would refuse with 400 (`<`, `>`, a backtick), it refuses.
        && axum::http::uri::PathAndQuery::try_from(path).is_ok();
    if !plain {
        return Head::NotOurs;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Head::NotOurs;
        };
        headers.append(name, value);
    }
    // A body, or a protocol switch: hyper's.
    let bodyless = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.as_bytes() == b"0");
    if !bodyless
        || headers.contains_key(header::TRANSFER_ENCODING)
        || headers.contains_key(header::EXPECT)
        || headers.contains_key(header::UPGRADE)
    {
        return Head::NotOurs;
    }
    let mut close = false;
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        match token.trim().to_ascii_lowercase().as_str() {
            "close" => close = true,
            "upgrade" => return Head::NotOurs,
            _ => {}
        }
    }
    Head::Ours(
        Get {
            path: path.to_string(),
            headers,
            close,
        },
        len,
    )
}

async fn handle(b: &Arc<Blobstore>, stream: &TcpStream, get: &Get) -> Served {
    b.metrics.answered_directly();
    let started = Instant::now();
    let (head, file, range, len) = match answer(b, &get.path, &get.headers).await {
        Err(e) => return complete(b, stream, e.into_response(), started, get.close).await,
        Ok(Answer::Complete(done)) => return complete(b, stream, done, started, get.close).await,
        Ok(Answer::Content {
            head,
            file,
            range,
            len,
        }) => (head, file, range, len),
    };
    let body = match source(b, &file, range, len).await {
        Err(e) => return complete(b, stream, e.into_response(), started, get.close).await,
        Ok(Source::Redirect(found)) => return complete(b, stream, found, started, get.close).await,
        Ok(Source::Trusted) => match std::fs::File::open(b.store.path(&file.sha512)) {
            Ok(object) => Body::Object(Arc::new(object)),
            // Dropped since (as bad): from another holder, as the API would.
            Err(_) => match open(b, &file, range).await {
                Ok(pieces) => Body::Pieces(pieces),
                Err(e) => return complete(b, stream, e.into_response(), started, get.close).await,
            },
        },
        Ok(Source::Stream(pieces)) => Body::Pieces(pieces),
    };
    let (parts, ()) = head.body(()).expect("static parts").into_parts();
    record(b, "get", parts.status, &parts.headers, started);
    let mut head = head_bytes(parts.status, &parts.headers, None, get.close);
    let start = range.map_or(0, |(s, _)| s);
    let sent = match body {
        // A small body goes with its head in one write: cheaper than a sendfile after it.
        Body::Object(object) if len <= SMALL => match read_whole(object, start, len).await {
            Ok(body) => {
                head.extend_from_slice(&body);
                send_all(stream, &head, 0).await
            }
            Err(e) => Err(e),
        },
        // `MSG_MORE` only where the body follows at once: a held-back head waits for the
        // kernel's 200 ms timer when nothing does (an empty or slow stream).
        Body::Object(object) => match send_all(stream, &head, libc::MSG_MORE).await {
            Err(e) => Err(e),
            Ok(()) => send_object(b, stream, object, start, len).await,
        },
        Body::Pieces(pieces) => match send_all(stream, &head, 0).await {
            Err(e) => Err(e),
            Ok(()) => send_pieces(stream, pieces, len).await,
        },
    };
    match sent {
        Ok(()) if !get.close => Served::KeepAlive,
        Ok(()) => Served::Close,
        Err(e) => {
            // The head promised `len` bytes: closing is how the client learns it got fewer
            // (a copy that failed its digest, a holder that went away).
            tracing::debug!(path = %get.path, error = %e, "blob body cut short");
            Served::Close
        }
    }
}

/// `len` bytes of `object` from `at`, in pieces (one may come back short).
async fn read_whole(object: Arc<std::fs::File>, mut at: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let piece =
            super::store::read_piece_soon(object.clone(), at, len - out.len() as u64).await?;
        if piece.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the object is shorter than its record",
            ));
        }
        at += piece.len() as u64;
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// A body to send.
enum Body {
    /// This host's copy, from the page cache where it holds it.
    Object(Arc<std::fs::File>),
    /// Pieces as they come.
    Pieces(IoStream),
}

/// Writes exactly `len` bytes of `pieces`; fewer is an error.
async fn send_pieces(stream: &TcpStream, mut pieces: IoStream, len: u64) -> std::io::Result<()> {
    let mut left = len;
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        if piece.len() as u64 > left {
            return Err(std::io::Error::other("more bytes than the answer's length"));
        }
        send_all(stream, &piece, 0).await?;
        left -= piece.len() as u64;
    }
    if left > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the body ended short of its length",
        ));
    }
    Ok(())
}

/// Writes an answer that has no object behind it (an error, 304, 416).
async fn complete(
    b: &Blobstore,
    stream: &TcpStream,
    resp: Response,
    started: Instant,
    close: bool,
) -> Served {
    let (parts, body) = resp.into_parts();
    record(b, "get", parts.status, &parts.headers, started);
    let Ok(body) = axum::body::to_bytes(body, MAX_COMPLETE_BODY).await else {
        return Served::Close;
    };
    // 304 has no body and no length of its own (RFC 9110, 8.6).
    let length = (parts.status != StatusCode::NOT_MODIFIED).then_some(body.len());
    let mut out = head_bytes(parts.status, &parts.headers, length, close);
    out.extend_from_slice(&body);
    match send_all(stream, &out, 0).await {
        Ok(()) if !close => Served::KeepAlive,
        _ => Served::Close,
    }
}

/// The status line and headers, with `date` as hyper adds it, and `content-length` when
/// given.
fn head_bytes(
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<usize>,
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes all of `bytes` (`MSG_MORE`: more follows at once, so the head and the first
/// body bytes share a segment).
async fn send_all(stream: &TcpStream, mut bytes: &[u8], flags: libc::c_int) -> std::io::Result<()> {
    let fd = stream.as_raw_fd();
    while !bytes.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                #[allow(unsafe_code)]
                // SAFETY: `bytes` is a live slice; the kernel reads at most its length.
                let n = unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        flags | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(n as usize)
            })
            .await;
        match n {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `object` from `at`: what the page cache holds with `sendfile`, the
/// rest read on the blocking pool and written. The cache is asked again before every
/// `sendfile`, also after waiting for the socket, since pages may be dropped meanwhile.
async fn send_object(
    b: &Blobstore,
    stream: &TcpStream,
    object: Arc<std::fs::File>,
    mut at: u64,
    mut left: u64,
) -> std::io::Result<()> {
    let (sock, fd) = (stream.as_raw_fd(), object.as_raw_fd());
    while left > 0 {
        let window = left.min(WINDOW);
        let sent = stream
            .async_io(Interest::WRITABLE, || {
                if !cached(fd, at, window) {
                    return Ok(None);
                }
                sendfile(sock, fd, at, window as usize).map(Some)
            })
            .await?;
        let n = match sent {
            Some(n) => {
                b.metrics.sent_uncopied(n as u64);
                n as u64
            }
            None => {
                let piece = super::store::read_piece_soon(object.clone(), at, window).await?;
                send_all(stream, &piece, 0).await?;
                b.metrics.copied_uncached(piece.len() as u64);
                piece.len() as u64
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the object is shorter than its record",
            ));
        }
        at += n;
        left -= n;
    }
    Ok(())
}

/// One `sendfile(2)`. A peer gone raises SIGPIPE, which Rust's runtime ignores: it is
/// EPIPE here.
fn sendfile(sock: RawFd, file: RawFd, at: u64, count: usize) -> std::io::Result<usize> {
    let mut offset = libc::off_t::try_from(at)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    loop {
        #[allow(unsafe_code)]
        // SAFETY: plain descriptors and a local offset the kernel updates.
        let n = unsafe { libc::sendfile(sock, file, &mut offset, count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the page cache holds every page of `len` bytes of `fd` from `at`, read in
/// (`cachestat(2)`; false where the kernel cannot say).
fn cached(fd: RawFd, at: u64, len: u64) -> bool {
    /// Set once the kernel said it has no `cachestat`.
    static MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (the unified syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return true;
    }
    if MISSING.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    /// The page size, asked once.
    static PAGE: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        page.max(4096) as u64
    });
    let page = *PAGE;
    let pages = (at + len - 1) / page - at / page + 1;
    let range = Range { off: at, len };
    let mut stat = Stat::default();
    #[allow(unsafe_code)]
    // SAFETY: both structs are laid out as the kernel's and live across the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        // Not in this kernel, or refused by a seccomp filter: copy from now on.
        let errno = std::io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS | libc::EPERM)) {
            MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return false;
    }
    if stat.nr_cache < pages {
        return false;
    }
    // Pages still being read in (readahead) count as cached: the window's last byte must
    // read without waiting.
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let Ok(last) = libc::off_t::try_from(at + len - 1) else {
        return false;
    };
    #[allow(unsafe_code)]
    // SAFETY: `iov` points at one local byte.
    let n = unsafe { libc::preadv2(fd, &iov, 1, last, libc::RWF_NOWAIT) };
    n == 1
}
