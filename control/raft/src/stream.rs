//! A lasting stream to each peer for AppendEntries and Vote.
//!
//! A lone write costs the leader two AppendEntries per follower (the entry, then the new
//! commit index), and a request per RPC paid for a URL, a header map, hyper's client
//! connection task and an axum route on each side. Here each network client openraft makes
//! (one per peer for replication, one for heartbeats, one per election for votes) keeps one
//! TCP connection to its peer, opened as an HTTP/1.1 upgrade of `GET /raft/stream` (so the
//! cluster secret is checked as on every `/raft` route, and one port serves both), and
//! then carries length-prefixed frames, one answer per request, in order.
//!
//! Frames: a 4-byte big-endian length, then that many bytes. A request's bytes are a kind
//! byte ([`Kind`]) and the JSON of the request; an answer's bytes are the JSON the HTTP
//! route answers (`Result<Response, RaftError>`). Snapshots stay on HTTP, in chunks.
//!
//! A peer of an older build answers the upgrade with 404, and one that speaks another
//! protocol token 426: the caller then uses the HTTP routes (see `network`), which every
//! build still serves.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::{Raft, SECRET_HEADER};

pub const PATH_STREAM: &str = "/raft/stream";
/// The `Upgrade` protocol token; a new frame format gets a new token.
pub const PROTOCOL: &str = "flynn-raft-1";
/// The largest frame either side accepts: the `/raft` routes' body limit.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// A stream with no request for this long is closed by the peer serving it (a peer that
/// went away without a word, or a leader that had nothing to replicate).
const IDLE: Duration = Duration::from_secs(60);
/// The caller opens a new stream instead of one unused for this long, so it does not send
/// into one the peer is closing.
const REUSE_WITHIN: Duration = Duration::from_secs(45);
/// The most bytes of an upgrade answer's head.
const MAX_HEAD: usize = 8 * 1024;

/// What a request frame asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Append = 1,
    Vote = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Append),
            2 => Some(Kind::Vote),
            _ => None,
        }
    }
}

/// A request frame, whole: length, kind and the JSON of `req`, ready for one write; an
/// error when it is over [`MAX_FRAME`], which the peer would refuse.
pub fn request_frame<T: serde::Serialize>(kind: Kind, req: &T) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 5];
    serde_json::to_writer(&mut buf, req).map_err(std::io::Error::other)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request of {len} bytes is over the {MAX_FRAME}-byte frame limit"),
        ));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    buf[4] = kind as u8;
    Ok(buf)
}

/// Reads one frame; `None` when the stream ended cleanly before one began.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    // Grown as bytes come, not sized from the prefix up front.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the stream ended inside a frame",
        ));
    }
    Ok(Some(body))
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too long"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame).await
}

// ---------------------------------------------------------------- serving

/// Answers a peer's requests on an upgraded connection until it closes, goes idle for a
/// minute, or sends something that is not a request (then the connection is dropped and
/// the peer opens another).
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, raft: Raft) -> std::io::Result<()> {
    let mut io = BufReader::new(io);
    loop {
        let frame = match tokio::time::timeout(IDLE, read_frame(&mut io)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let (kind, body) = match frame.split_first() {
            Some((k, body)) => (Kind::from_byte(*k), body),
            None => (None, &[][..]),
        };
        let answer = match kind {
            Some(Kind::Append) => serde_json::to_vec(&raft.append_entries(decode(body)?).await),
            Some(Kind::Vote) => serde_json::to_vec(&raft.vote(decode(body)?).await),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown request kind {:?}", frame.first()),
                ))
            }
        }
        .map_err(std::io::Error::other)?;
        write_frame(&mut io, &answer).await?;
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

// ---------------------------------------------------------------- calling

/// One peer's open stream, on the caller's side.
pub struct PeerStream {
    io: BufReader<TcpStream>,
    /// Whether an answer has come over it: a fresh stream's failure is the peer's, one that
    /// had served may just have been closed by the peer while idle.
    answered: bool,
    /// A request was sent (or begun) and its answer not read whole: the call was given up
    /// (openraft's heartbeat wraps each call in a timeout of its own), and the next answer
    /// on this stream would be that request's, not the next one's.
    in_flight: bool,
    last_used: std::time::Instant,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    /// The peer answered the upgrade with 404: a build without streams.
    #[error("the peer does not offer {PATH_STREAM}")]
    NotOffered,
    #[error("the peer refused the stream: {0}")]
    Refused(String),
    #[error("opening the stream: {0}")]
    Io(#[from] std::io::Error),
}

impl PeerStream {
    /// Connects to `addr` (`host:port`) and asks for the upgrade.
    pub async fn open(
        addr: &str,
        secret: &str,
        connect_timeout: Duration,
    ) -> Result<Self, OpenError> {
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(OpenError::Connect(e)),
            Err(_) => {
                return Err(OpenError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                )))
            }
        };
        tcp.set_nodelay(true)?;
        let mut io = BufReader::new(tcp);
        let ask = format!(
            "GET {PATH_STREAM} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: {PROTOCOL}\r\n{SECRET_HEADER}: {secret}\r\n\r\n"
        );
        io.write_all(ask.as_bytes()).await?;
        let (status, body) = read_answer_head(&mut io).await?;
        match status {
            101 => Ok(PeerStream {
                io,
                answered: false,
                in_flight: false,
                last_used: std::time::Instant::now(),
            }),
            // An older build (no such route), or one with another protocol token.
            404 | 426 => Err(OpenError::NotOffered),
            s => Err(OpenError::Refused(format!("{s}: {body}"))),
        }
    }

    /// Sends one request frame and reads its answer.
    pub async fn call(&mut self, frame: &[u8]) -> std::io::Result<Vec<u8>> {
        self.in_flight = true;
        self.last_used = std::time::Instant::now();
        self.io.write_all(frame).await?;
        let answer = read_frame(&mut self.io).await?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the stream",
            )
        })?;
        self.in_flight = false;
        self.answered = true;
        Ok(answer)
    }

    /// Whether an earlier request was answered over this stream.
    pub fn answered_before(&self) -> bool {
        self.answered
    }

    /// Whether the next request may go over this stream: nothing of an abandoned call is
    /// pending on it, and the peer is not about to close it as idle.
    pub fn reusable(&self) -> bool {
        !self.in_flight && self.last_used.elapsed() < REUSE_WITHIN
    }
}

/// Reads the upgrade's answer head (and, for a refusal, a short body for the error), and
/// leaves the reader at the first byte after the head.
async fn read_answer_head(io: &mut BufReader<TcpStream>) -> Result<(u16, String), OpenError> {
    let mut head = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if io.read(&mut byte).await? == 0 {
            return Err(OpenError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the upgrade",
            )));
        }
        head.push(byte[0]);
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(OpenError::Refused("an answer head over 8 KiB".into()));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let parsed = answer
        .parse(&head)
        .map_err(|e| OpenError::Refused(format!("not an HTTP answer: {e}")))?;
    if !parsed.is_complete() {
        return Err(OpenError::Refused("an incomplete HTTP answer".into()));
    }
    let status = answer.code.unwrap_or(0);
    if status == 101 {
        return Ok((status, String::new()));
    }
    let length = answer
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0)
        .min(MAX_HEAD);
    let mut body = vec![0u8; length];
    io.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
