//! Message bodies in flight: decoding whatever framing the sender used into plain bytes, and
//! encoding them again for the receiver. Bodies move through in pieces of at most one read
//! buffer, never whole, so a 1 GiB upload costs no more memory than a 1 KiB one.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use flynn_http1::{ChunkedDecoder, Http1Error};
use flynn_uring::{Direct, Taken, UringStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::io::RingSocket;

/// Largest piece read at once.
pub const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub enum Framing {
    None,
    Length(u64),
    Chunked(Box<ChunkedDecoder>),
    /// Ends when the sender closes (responses only).
    Close,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Framing(#[from] Http1Error),
    #[error("connection closed mid-body")]
    Truncated,
}

/// Decodes one body from a connection's read buffer plus further reads.
#[derive(Debug)]
pub struct BodyReader {
    framing: Framing,
    done: bool,
}

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        let done = matches!(framing, Framing::None | Framing::Length(0));
        BodyReader { framing, done }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the sender chunked the body (it is re-chunked for receivers that can take it).
    pub fn is_chunked(&self) -> bool {
        matches!(self.framing, Framing::Chunked(_))
    }

    /// Whether the body ends only when the sender closes.
    pub fn close_delimited(&self) -> bool {
        matches!(self.framing, Framing::Close)
    }

    /// Moves the body bytes already in `buf` into `out`, leaving anything after the body (a
    /// pipelined message) in `buf`.
    pub fn take_buffered(
        &mut self,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<(), BodyError> {
        match &mut self.framing {
            Framing::None => {}
            Framing::Length(remaining) => {
                let n = (*remaining).min(buf.len() as u64) as usize;
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                *remaining -= n as u64;
                self.done = *remaining == 0;
            }
            Framing::Chunked(dec) => {
                let d = dec.decode(buf, out)?;
                buf.advance(d.consumed);
                self.done = d.done;
            }
            Framing::Close => {
                out.extend_from_slice(buf);
                buf.clear();
            }
        }
        Ok(())
    }

    /// Reads the next piece of the body into `out` (after whatever `buf` held). Returns false
    /// once the body is complete.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<bool, BodyError> {
        if self.done {
            return Ok(false);
        }
        loop {
            self.take_buffered(buf, out)?;
            if self.done || !out.is_empty() {
                return Ok(true);
            }
            buf.reserve(READ_CHUNK);
            let n = tokio::time::timeout(timeout, r.read_buf(buf))
                .await
                .map_err(|_| BodyError::Timeout)??;
            if n == 0 {
                if matches!(self.framing, Framing::Close) {
                    self.done = true;
                    return Ok(!out.is_empty());
                }
                return Err(BodyError::Truncated);
            }
        }
    }
}

/// How a body is written to its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// As is (Content-Length or close-delimited).
    Raw,
    Chunked,
}

impl Encoding {
    /// Appends one piece of body in this encoding.
    pub fn frame(self, data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        match self {
            Encoding::Raw => out.extend_from_slice(data),
            Encoding::Chunked => {
                use std::io::Write;
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Appends the end of the body.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self == Encoding::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
}

/// Copies a whole body from `r` to `w`, re-encoded. `pending` is written first (a head,
/// usually), so a small message goes out in one write. Returns the body bytes moved.
#[allow(clippy::too_many_arguments)]
pub async fn pump<R, W>(
    reader: &mut BodyReader,
    r: &mut R,
    buf: &mut BytesMut,
    w: &mut W,
    encoding: Encoding,
    mut pending: Vec<u8>,
    timeout: Duration,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin + RingSocket,
    W: AsyncWrite + Unpin + RingSocket,
{
    if encoding == Encoding::Raw && !reader.is_chunked() {
        return pump_raw(reader, r, buf, w, pending, timeout).await;
    }
    let mut moved = 0u64;
    let mut piece = Vec::new();
    loop {
        piece.clear();
        let more = reader
            .next(r, buf, &mut piece, timeout)
            .await
            .map_err(PumpError::Read)?;
        moved += piece.len() as u64;
        encoding.frame(&piece, &mut pending);
        if !more || reader.is_done() {
            encoding.finish(&mut pending);
            write_timed(w, &pending, timeout).await?;
            return Ok(moved);
        }
        if pending.len() >= 16 * 1024 || buf.is_empty() {
            write_timed(w, &pending, timeout).await?;
            pending.clear();
        }
    }
}

/// [`pump`] for a body that goes out as it came in (Content-Length or close-delimited, not
/// re-chunked): each read is written straight from the connection's read buffer, instead of
/// being copied into a piece and then into an output buffer first. Two copies fewer per byte
/// on a large download. Between two plain streams on one io_uring ring it copies nothing at
/// all: the ring's receive buffers themselves are sent on ([`relay_uncopied`]).
async fn pump_raw<R, W>(
    reader: &mut BodyReader,
    r: &mut R,
    buf: &mut BytesMut,
    w: &mut W,
    mut pending: Vec<u8>,
    timeout: Duration,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin + RingSocket,
    W: AsyncWrite + Unpin + RingSocket,
{
    // The head, with whatever of the body arrived with it, in one write.
    let before = pending.len();
    reader
        .take_buffered(buf, &mut pending)
        .map_err(PumpError::Read)?;
    let mut moved = (pending.len() - before) as u64;
    let ring = match (r.ring_socket(), w.ring_socket()) {
        (Some(src), Some(dst)) if src.same_ring(dst) && !reader.done => Some((src, dst)),
        _ => None,
    };
    if let Some((src, dst)) = ring {
        // Queued, not flushed: the body follows in the same sends.
        write_only(dst, &pending, timeout).await?;
        drop(pending);
        moved += relay_uncopied(reader, src, dst, timeout).await?;
        flush_timed(dst, timeout).await?;
    } else {
        write_timed(w, &pending, timeout).await?;
        drop(pending);
    }
    while !reader.done {
        buf.reserve(READ_CHUNK);
        let n = tokio::time::timeout(timeout, r.read_buf(buf))
            .await
            .map_err(|_| PumpError::Read(BodyError::Timeout))?
            .map_err(|e| PumpError::Read(e.into()))?;
        let take = match &mut reader.framing {
            Framing::Length(remaining) => {
                if n == 0 {
                    return Err(PumpError::Read(BodyError::Truncated));
                }
                // Bytes past the body (a pipelined message) stay in `buf`.
                let k = (*remaining).min(buf.len() as u64) as usize;
                *remaining -= k as u64;
                reader.done = *remaining == 0;
                k
            }
            Framing::Close => {
                if n == 0 {
                    reader.done = true;
                }
                buf.len()
            }
            // Never here: chunked bodies take the general path, and None is done.
            Framing::None | Framing::Chunked(_) => {
                reader.done = true;
                0
            }
        };
        if take > 0 {
            write_timed(w, &buf[..take], timeout).await?;
            buf.advance(take);
            moved += take as u64;
        }
    }
    Ok(moved)
}

/// Below this many body bytes left, a relay takes what the ring's multishot receive queued
/// instead of starting a direct receive of its own.
const DIRECT_MIN: usize = 16 * 1024;

/// Relays a raw body from `src` to `dst` without copying it in user space. Bulk goes by
/// direct receives into a buffer of up to [`READ_CHUNK`] that is then sent as it is (one
/// receive and one send per buffer, as a read/write loop does); bytes the ring's multishot
/// receive already queued, and small rests, go in the provided buffers they arrived in.
/// Stops when the body is done, or earlier where its last bytes share a provided buffer
/// with what follows (the caller reads those the ordinary way), or while the ring runs
/// short of free buffers (its copying loop gives each back at once). Returns the bytes
/// relayed.
async fn relay_uncopied(
    reader: &mut BodyReader,
    src: &UringStream,
    dst: &UringStream,
    timeout: Duration,
) -> Result<u64, PumpError> {
    let mut moved = 0u64;
    let mut bufs = Vec::new();
    let read_err = |e: io::Error| PumpError::Read(e.into());
    while !reader.done {
        let max = match reader.framing {
            Framing::Length(remaining) => usize::try_from(remaining).unwrap_or(usize::MAX),
            Framing::Close => usize::MAX,
            Framing::None | Framing::Chunked(_) => break,
        };
        let mut n = 0;
        if max >= DIRECT_MIN {
            let mut buf = Some(Vec::with_capacity(READ_CHUNK));
            let direct = tokio::time::timeout(timeout, src.recv_direct(&mut buf, max))
                .await
                .map_err(|_| PumpError::Read(BodyError::Timeout))?
                .map_err(read_err)?;
            match direct {
                Direct::Filled(k) => {
                    n = k;
                    let buf = buf.take().unwrap_or_default();
                    tokio::time::timeout(timeout, dst.send_owned(buf))
                        .await
                        .map_err(|_| write_timed_out())?
                        .map_err(PumpError::Write)?;
                }
                Direct::Eof => return finish_at_eof(reader).map(|()| moved),
                Direct::Queued => {}
            }
        }
        if n == 0 {
            if !src.ring_has_room() {
                break;
            }
            let taken = tokio::time::timeout(timeout, src.take_bufs(max, &mut bufs))
                .await
                .map_err(|_| PumpError::Read(BodyError::Timeout))?
                .map_err(read_err)?;
            n = match taken {
                Taken::Bytes(n) => n,
                Taken::Straddles => break,
                Taken::Eof => return finish_at_eof(reader).map(|()| moved),
            };
            tokio::time::timeout(timeout, dst.send_bufs(&mut bufs))
                .await
                .map_err(|_| write_timed_out())?
                .map_err(PumpError::Write)?;
        }
        if let Framing::Length(remaining) = &mut reader.framing {
            *remaining -= n as u64;
            reader.done = *remaining == 0;
        }
        moved += n as u64;
    }
    Ok(moved)
}

/// The sender closed: the end of a close-delimited body, a truncated one otherwise.
fn finish_at_eof(reader: &mut BodyReader) -> Result<(), PumpError> {
    match reader.framing {
        Framing::Close => {
            reader.done = true;
            Ok(())
        }
        _ => Err(PumpError::Read(BodyError::Truncated)),
    }
}

fn write_timed_out() -> PumpError {
    PumpError::Write(io::Error::new(io::ErrorKind::TimedOut, "write timed out"))
}

async fn write_only(dst: &UringStream, data: &[u8], timeout: Duration) -> Result<(), PumpError> {
    let mut dst = dst;
    match tokio::time::timeout(timeout, dst.write_all(data)).await {
        Ok(r) => r.map_err(PumpError::Write),
        Err(_) => Err(write_timed_out()),
    }
}

async fn flush_timed(dst: &UringStream, timeout: Duration) -> Result<(), PumpError> {
    let mut dst = dst;
    match tokio::time::timeout(timeout, dst.flush()).await {
        Ok(r) => r.map_err(PumpError::Write),
        Err(_) => Err(write_timed_out()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("reading body: {0}")]
    Read(BodyError),
    #[error("writing body: {0}")]
    Write(io::Error),
}

async fn write_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    timeout: Duration,
) -> Result<(), PumpError> {
    // Flushed too: a TLS stream may hold records back when the socket was full.
    let write = async {
        w.write_all(data).await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(r) => r.map_err(PumpError::Write),
        Err(_) => Err(write_timed_out()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its pieces one read at a time, then EOF.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(p) = self.0.pop_front() {
                out.put_slice(&p);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl crate::io::RingSocket for Pieces {}

    fn pieces(p: &[&[u8]]) -> Pieces {
        Pieces(p.iter().map(|x| x.to_vec()).collect())
    }

    async fn run(
        framing: Framing,
        encoding: Encoding,
        buffered: &[u8],
        r: &mut Pieces,
    ) -> (Result<u64, PumpError>, Vec<u8>, BytesMut) {
        let mut reader = BodyReader::new(framing);
        let mut buf = BytesMut::from(buffered);
        let mut out = Vec::new();
        let res = pump(
            &mut reader,
            r,
            &mut buf,
            &mut out,
            encoding,
            b"HEAD|".to_vec(),
            Duration::from_secs(5),
        )
        .await;
        (res, out, buf)
    }

    #[tokio::test]
    async fn a_length_body_across_reads_stops_at_its_end_and_keeps_the_next_message() {
        let mut r = pieces(&[b"bcd", b"ef", b"ghNEXT /"]);
        let (res, out, buf) = run(Framing::Length(8), Encoding::Raw, b"a", &mut r).await;
        assert_eq!(res.unwrap(), 8);
        assert_eq!(out, b"HEAD|abcdefgh");
        assert_eq!(&buf[..], b"NEXT /", "the pipelined message stays buffered");
    }

    #[tokio::test]
    async fn a_length_body_cut_short_is_an_error_not_a_short_success() {
        let mut r = pieces(&[b"bcd"]);
        let (res, out, _) = run(Framing::Length(8), Encoding::Raw, b"a", &mut r).await;
        assert!(matches!(res, Err(PumpError::Read(BodyError::Truncated))));
        assert_eq!(out, b"HEAD|abcd", "what arrived went out");
    }

    #[tokio::test]
    async fn a_close_delimited_body_runs_to_eof_and_rechunks_when_asked() {
        let mut r = pieces(&[b"bc", b"d"]);
        let (res, out, _) = run(Framing::Close, Encoding::Raw, b"a", &mut r).await;
        assert_eq!(res.unwrap(), 4);
        assert_eq!(out, b"HEAD|abcd");
        let mut r = pieces(&[b"bc"]);
        let (res, out, _) = run(Framing::Close, Encoding::Chunked, b"a", &mut r).await;
        assert_eq!(res.unwrap(), 3);
        assert_eq!(out, b"HEAD|1\r\na\r\n2\r\nbc\r\n0\r\n\r\n");
    }
}
