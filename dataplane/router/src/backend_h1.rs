//! The backend side of every proxied request, whatever protocol the client speaks: the
//! HTTP/1.1 request head the backend gets, and its response head and body framing.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use flynn_http1::{BodyFraming, ChunkedDecoder, RequestHead};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::body::Framing;
use crate::conn::ConnCtx;
use crate::error::{ErrorKind, ProxyError};
use crate::upstream::UpstreamConn;
use crate::worker::Worker;

const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;

/// A backend's response head: the head's bytes as read, with the offsets of its parts, so
/// reading a response allocates once (the field list), not twice per header.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    raw: Bytes,
    reason: (u32, u32),
    /// (name start, name end, value start, value end) in `raw`.
    fields: Vec<[u32; 4]>,
    /// A `Connection` header names something other than `close`/`keep-alive`: only then
    /// does each header need checking against it (most responses skip that work).
    names_hop_headers: bool,
}

/// Trims optional whitespace (RFC 9110 §5.6.3) around a list element.
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

impl ResponseHead {
    fn part(&self, (a, b): (u32, u32)) -> &[u8] {
        &self.raw[a as usize..b as usize]
    }

    /// The reason phrase, as the backend wrote it.
    pub fn reason(&self) -> &[u8] {
        self.part(self.reason)
    }

    /// Every header in order: (name, value). Names are tokens, so ASCII.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.fields.iter().map(|[ns, ne, vs, ve]| {
            let name = std::str::from_utf8(self.part((*ns, *ne))).unwrap_or("");
            (name, self.part((*vs, *ve)))
        })
    }

    /// Every header in order, as bytes (no UTF-8 check: for lookups by name).
    pub fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields
            .iter()
            .map(|[ns, ne, vs, ve]| (self.part((*ns, *ne)), self.part((*vs, *ve))))
    }

    /// The comma-separated elements of every `name` header, trimmed.
    fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.raw_headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .map(trim_ows)
    }

    pub fn connection_close(&self) -> bool {
        self.tokens("connection")
            .any(|t| t.eq_ignore_ascii_case(b"close"))
    }

    /// Is `name` named by this response's `Connection` header: hop-by-hop by declaration,
    /// never passed on (RFC 9110 §7.6.1)? A 101 keeps `Upgrade`, which it switches to.
    pub fn connection_names(&self, name: &str) -> bool {
        let keep_upgrade = self.status == 101 && name.eq_ignore_ascii_case("upgrade");
        !keep_upgrade
            && self
                .tokens("connection")
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// The headers the client gets: neither hop-by-hop nor named by `Connection`.
    pub fn end_to_end(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.headers().filter(move |(name, _)| {
            let keep_upgrade = self.status == 101 && name.eq_ignore_ascii_case("upgrade");
            (!is_hop_by_hop(name) || keep_upgrade)
                && !(self.names_hop_headers && self.connection_names(name))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Io(io::Error, bool),
    #[error("closed before responding")]
    ClosedEarly,
    #[error("no response in time")]
    Timeout,
    #[error("malformed response head")]
    Malformed,
}

impl UpstreamError {
    /// Failed before the backend sent any response byte (the request may be replayed if it
    /// had no body).
    pub(crate) fn before_response(&self) -> bool {
        matches!(
            self,
            UpstreamError::ClosedEarly | UpstreamError::Io(_, true)
        )
    }
}

pub async fn read_response_head(
    conn: &mut UpstreamConn,
    timeout: Duration,
) -> Result<ResponseHead, UpstreamError> {
    read_head_from(&mut conn.stream, &mut conn.buf, timeout).await
}

pub(crate) async fn read_head_from<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<ResponseHead, UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !buf.is_empty() {
            let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
                MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
            {
                Ok(httparse::Status::Complete(n)) => {
                    // Offsets of the parsed slices within the buffer they borrow from.
                    let base = buf.as_ptr() as usize;
                    let span = |part: &[u8]| {
                        let start = (part.as_ptr() as usize - base) as u32;
                        (start, start + part.len() as u32)
                    };
                    let status = resp.code.ok_or(UpstreamError::Malformed)?;
                    let minor_version = resp.version.ok_or(UpstreamError::Malformed)?;
                    let reason = resp.reason.map_or((0, 0), |r| span(r.as_bytes()));
                    let fields = resp
                        .headers
                        .iter()
                        .map(|h| {
                            let (ns, ne) = span(h.name.as_bytes());
                            let (vs, ve) = span(h.value);
                            [ns, ne, vs, ve]
                        })
                        .collect();
                    let names_hop_headers = resp
                        .headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                        .flat_map(|h| h.value.split(|b| *b == b','))
                        .map(trim_ows)
                        .any(|t| {
                            !t.is_empty()
                                && !t.eq_ignore_ascii_case(b"close")
                                && !t.eq_ignore_ascii_case(b"keep-alive")
                        });
                    let raw = buf.split_to(n).freeze();
                    return Ok(ResponseHead {
                        status,
                        minor_version,
                        raw,
                        reason,
                        fields,
                        names_hop_headers,
                    });
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {}
                _ => return Err(UpstreamError::Malformed),
            }
        }
        buf.reserve(16 * 1024);
        let was_empty = buf.is_empty();
        match tokio::time::timeout_at(deadline, r.read_buf(buf)).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Ok(0)) if was_empty => return Err(UpstreamError::ClosedEarly),
            Ok(Ok(0)) => return Err(UpstreamError::Malformed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(UpstreamError::Io(e, was_empty)),
        }
    }
}

/// The response body's framing (RFC 9112 §6.3), refusing what a client could misread.
pub(crate) fn response_framing(
    head_request: bool,
    r: &ResponseHead,
) -> Result<Framing, &'static str> {
    if head_request || r.status == 204 || r.status == 304 || r.status / 100 == 1 {
        return Ok(Framing::None);
    }
    let (mut codings, mut last) = (0, &b""[..]);
    for t in r.tokens("transfer-encoding").filter(|t| !t.is_empty()) {
        codings += 1;
        last = t;
    }
    if codings > 0 {
        let chunked_last = last.eq_ignore_ascii_case(b"chunked");
        return if chunked_last && codings == 1 {
            Ok(Framing::Chunked(Box::new(ChunkedDecoder::new())))
        } else if !chunked_last {
            // Not chunked last: the body runs to the close, its codings passed on as is.
            Ok(Framing::Close)
        } else {
            Err("backend sent stacked transfer codings")
        };
    }
    let mut length = None;
    for v in r.tokens("content-length") {
        let n: u64 = std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or("backend sent a bad Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("backend sent conflicting Content-Lengths");
        }
        length = Some(n);
    }
    Ok(match length {
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The request head as the backend gets it: origin-form target, the client's headers minus
/// hop-by-hop ones, the router's X-Forwarded-* / X-Request-* headers, and its own framing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_request_head(
    w: &Worker,
    head: &RequestHead,
    framing: BodyFraming,
    ctx: ConnCtx,
    path: &str,
    keepalive: bool,
    upgrade: bool,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    // Written by hand, not with `write!`: formatting was 3% of the router's CPU.
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Option<&[u8]> = None;
    let mut request_id = false;
    for h in &head.headers {
        let n = h.name.as_str();
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(&h.value);
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-proto")
            || n.eq_ignore_ascii_case("x-forwarded-port")
            || n.eq_ignore_ascii_case("x-request-start")
            || n.eq_ignore_ascii_case("expect")
            || n.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-request-id") {
            request_id = true;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(prev) = forwarded_for {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    match ctx.peer.ip() {
        // By hand for IPv4, as the other numbers here: formatting costs per request.
        std::net::IpAddr::V4(ip) => {
            let [a, b, c, d] = ip.octets();
            for (i, o) in [a, b, c, d].into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, o as u64);
            }
            out.extend_from_slice(b"\r\n");
        }
        ip => {
            let _ = write!(out, "{ip}\r\n");
        }
    }
    out.extend_from_slice(if ctx.tls {
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: "
    } else {
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: "
    });
    push_decimal(out, ctx.local_port as u64);
    out.extend_from_slice(b"\r\nX-Request-Start: ");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    push_decimal(out, now_ms);
    out.extend_from_slice(b"\r\n");
    if !request_id {
        out.extend_from_slice(b"X-Request-Id: ");
        push_request_id(w, out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if !keepalive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A random UUID (version 4 layout) for requests that arrive without an id.
pub(crate) fn push_request_id(w: &Worker, out: &mut Vec<u8>) {
    let a = w.upstreams.random();
    let b = w.upstreams.random();
    push_hex(out, a >> 32, 8);
    out.push(b'-');
    push_hex(out, (a >> 16) & 0xffff, 4);
    out.extend_from_slice(b"-4");
    push_hex(out, a & 0xfff, 3);
    out.push(b'-');
    push_hex(out, ((b >> 48) & 0x3fff) | 0x8000, 4);
    out.push(b'-');
    push_hex(out, b & 0xffff_ffff_ffff, 12);
}

fn push_hex(out: &mut Vec<u8>, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for k in (0..digits).rev() {
        out.push(HEX[((v >> (k * 4)) & 0xf) as usize]);
    }
}

pub(crate) fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// How a failed exchange with the backend is classified for the client.
impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        let retryable = e.before_response();
        let kind = match e {
            UpstreamError::Timeout => ErrorKind::UpstreamTimeout,
            UpstreamError::Malformed => ErrorKind::BadResponse("backend sent a malformed response"),
            UpstreamError::Io(..) | UpstreamError::ClosedEarly => ErrorKind::UpstreamFailed,
        };
        ProxyError { kind, retryable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head(raw: &[u8]) -> (Result<ResponseHead, UpstreamError>, BytesMut) {
        let mut buf = BytesMut::new();
        let mut src = raw;
        let r = read_head_from(&mut src, &mut buf, Duration::from_secs(1)).await;
        (r, buf)
    }

    #[tokio::test]
    async fn t01_response_head_keeps_end_to_end_headers_only() {
        let (r, rest) = head(
            b"HTTP/1.1 200 Fine\r\nConnection: X-Hop ,\tclose\r\nX-Hop: 1\r\nKeep-Alive: t=5\r\n\
              X-Kept: y\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        let r = r.unwrap();
        assert_eq!(
            (r.status, r.minor_version, r.reason()),
            (200, 1, &b"Fine"[..])
        );
        assert!(r.connection_close());
        let kept: Vec<(&str, &[u8])> = r.end_to_end().collect();
        assert_eq!(
            kept,
            vec![("X-Kept", &b"y"[..]), ("Content-Length", &b"5"[..])]
        );
        assert!(matches!(
            response_framing(false, &r),
            Ok(Framing::Length(5))
        ));
        assert_eq!(
            &rest[..],
            b"hello",
            "the body's first bytes stay in the buffer"
        );
    }

    #[tokio::test]
    async fn t02_framing_refuses_what_a_client_could_misread() {
        let framing = |raw: &'static [u8]| async move {
            let (r, _) = head(raw).await;
            response_framing(false, &r.unwrap()).map(|f| format!("{f:?}"))
        };
        assert!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
                .await
                .is_err()
        );
        assert!(framing(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
            .await
            .is_err());
        assert!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n")
                .await
                .is_err()
        );
        let chunked = framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n").await;
        assert!(chunked.unwrap().starts_with("Chunked"));
        let gzip = framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").await;
        assert_eq!(gzip.unwrap(), "Close");
        // A 101 keeps Upgrade, which it switches to.
        let (r, _) = head(b"HTTP/1.1 101 S\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n").await;
        let r = r.unwrap();
        assert_eq!(
            r.end_to_end().collect::<Vec<_>>(),
            vec![("Upgrade", &b"ws"[..])]
        );
    }
}
