//! HTTP/1.1 from clients: one loop per client connection, one request at a time (pipelined
//! requests wait in the buffer, so responses leave in order), bodies streamed both ways.
//!
//! The phases of a request, each with its own failure answer: read the head (408/4xx),
//! route (404, 301 to HTTPS, 503 without backends), pick and connect a backend (other
//! backends on connect failure; 503 when none answers), send the request, read the response
//! head (502/504), stream the body, then decide whether both connections live on.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use flynn_http1::{BodyFraming, ChunkedDecoder, RequestHead};
use flynn_router_table::HttpEntry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::{self, BodyReader, Encoding, Framing, PumpError};
use crate::upstream::{self, UpstreamConn};
use crate::worker::Worker;

/// What a client connection is, for the headers the router adds.
#[derive(Debug, Clone, Copy)]
pub struct ConnCtx {
    /// The client (from the PROXY line when one was sent).
    pub peer: SocketAddr,
    pub local_port: u16,
    pub tls: bool,
}

const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;

/// Serves a client connection until it closes, errs, times out or the router drains.
pub async fn serve<S>(w: Rc<Worker>, mut client: S, mut buf: BytesMut, ctx: ConnCtx)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut shutdown = w.shutdown.clone();
    loop {
        let head = match read_head(&w, &mut client, &mut buf, &mut shutdown).await {
            HeadRead::Head(head, n) => {
                w.stats.borrow_mut().bytes_in += n as u64;
                buf.advance(n);
                head
            }
            HeadRead::Closed => return,
            HeadRead::Refuse(status, why) => {
                refuse(&w, &mut client, status, why, Instant::now()).await;
                let _ = client.shutdown().await;
                return;
            }
        };
        match request(&w, &mut client, &mut buf, head, ctx).await {
            Next::KeepAlive if !*shutdown.borrow() => continue,
            Next::KeepAlive | Next::Close => {
                let _ = client.shutdown().await;
                return;
            }
            Next::Gone => return,
        }
    }
}

enum HeadRead {
    Head(RequestHead, usize),
    Closed,
    Refuse(u16, &'static str),
}

async fn read_head<S: AsyncRead + Unpin>(
    w: &Worker,
    client: &mut S,
    buf: &mut BytesMut,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> HeadRead {
    let t = &w.shared.config.timeouts;
    let limits = &w.shared.config.limits;
    let mut deadline = (!buf.is_empty()).then(|| tokio::time::Instant::now() + t.header);
    loop {
        if !buf.is_empty() {
            match flynn_http1::parse_request(buf, limits) {
                Ok(Some((head, n))) => return HeadRead::Head(head, n),
                Ok(None) => {}
                Err(e) => {
                    return HeadRead::Refuse(e.status(), refusal_text(e.status()));
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let read = match deadline {
            // Mid-head: the header timeout runs from the first byte.
            Some(d) => match tokio::time::timeout_at(d, client.read_buf(buf)).await {
                Ok(r) => r,
                Err(_) => return HeadRead::Refuse(408, "request head not received in time"),
            },
            // Between requests: idle timeout, and a drain closes idle connections at once.
            None => {
                if *shutdown.borrow() {
                    return HeadRead::Closed;
                }
                tokio::select! {
                    r = tokio::time::timeout(t.idle, client.read_buf(buf)) => match r {
                        Ok(r) => r,
                        Err(_) => return HeadRead::Closed,
                    },
                    _ = shutdown.changed() => return HeadRead::Closed,
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(_) => {
                if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + t.header);
                }
            }
        }
    }
}

fn refusal_text(status: u16) -> &'static str {
    match status {
        414 => "request line too long",
        431 => "request headers too large",
        501 => "unsupported transfer coding",
        _ => "malformed request",
    }
}

enum Next {
    KeepAlive,
    Close,
    /// The client is gone or the connection is unusable: just drop it.
    Gone,
}

/// Per-request facts the phases share.
struct Req {
    head: RequestHead,
    framing: BodyFraming,
    keep_alive: bool,
    start: Instant,
    route_id: String,
}

async fn request<S>(
    w: &Rc<Worker>,
    client: &mut S,
    buf: &mut BytesMut,
    head: RequestHead,
    ctx: ConnCtx,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let framing = match head.framing() {
        Ok(f) => f,
        Err(e) => return refuse(w, client, e.status(), refusal_text(e.status()), start).await,
    };
    let mut req = Req {
        keep_alive: head.keep_alive(),
        head,
        framing,
        start,
        route_id: String::new(),
    };
    let table = w.table();
    let host = request_host(&req.head).unwrap_or_default();
    let path = origin_path(&req.head.target).to_string();
    let Some(entry) = table.http(&host, &path) else {
        let close = !matches!(req.framing, BodyFraming::None);
        return answer(
            w,
            client,
            &req,
            404,
            "no route for this host and path",
            close,
        )
        .await;
    };
    req.route_id.clone_from(&entry.route.id);
    if entry.route.https_redirect && !ctx.tls {
        return redirect(w, client, &req, &host, &path).await;
    }
    if entry.backends.is_empty() {
        let close = !matches!(req.framing, BodyFraming::None);
        return answer(
            w,
            client,
            &req,
            503,
            "no live backend for this route",
            close,
        )
        .await;
    }
    proxy(w, client, buf, req, entry, ctx, &path).await
}

/// The request's host: the absolute-form target's authority, else the Host header.
fn request_host(head: &RequestHead) -> Option<String> {
    if let Some(rest) = head
        .target
        .strip_prefix("http://")
        .or_else(|| head.target.strip_prefix("https://"))
    {
        return Some(rest.split(['/', '?']).next().unwrap_or("").to_string());
    }
    head.header("host")
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
}

/// The origin-form path of a target (absolute-form targets lose their scheme and authority).
fn origin_path(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return match rest.find(['/', '?']) {
                Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
                _ => "/",
            };
        }
    }
    target
}

#[allow(clippy::too_many_arguments)]
async fn proxy<S>(
    w: &Rc<Worker>,
    client: &mut S,
    buf: &mut BytesMut,
    mut req: Req,
    entry: &HttpEntry,
    ctx: ConnCtx,
    path: &str,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &w.shared.config;
    let t = cfg.timeouts;
    let route = &entry.route;
    let backends = &entry.backends;
    let upgrade = wants_upgrade(&req.head);
    let has_body = !matches!(req.framing, BodyFraming::None);
    // A request may be sent again only if nothing of it is lost (no body) and doing it twice
    // is harmless (an idempotent method): the backend may have acted before it failed.
    let replayable = !has_body && idempotent(&req.head.method);
    let expect_continue = req.head.minor_version >= 1 && req.head.expects_continue();

    let cookies: Vec<&[u8]> = req
        .head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .map(|h| h.value.as_slice())
        .collect();
    let sticky = if route.sticky {
        upstream::sticky_backend(&cookies, backends)
    } else {
        None
    };
    drop(cookies);
    let pooled = route.backend_keepalive && !upgrade;
    let mut tried = Vec::new();
    let Some((mut idx, mut conn)) =
        upstream::connect_backend(w, backends, sticky, pooled, !replayable, &mut tried).await
    else {
        return answer(
            w,
            client,
            &req,
            503,
            "no backend could be reached",
            has_body,
        )
        .await;
    };
    let mut in_flight = w.upstreams.begin(&backends[idx].addr);

    req.head.strip_hop_by_hop();
    let upstream_keepalive = route.backend_keepalive && !upgrade;
    let mut out = Vec::with_capacity(1024);
    write_request_head(
        w,
        &req.head,
        req.framing,
        ctx,
        path,
        upstream_keepalive,
        upgrade,
        &mut out,
    );

    if expect_continue && has_body {
        // The router answers the expectation itself once the route is known to be served,
        // then streams the body; the backend never sees `Expect`.
        if send(client, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
        {
            return Next::Gone;
        }
    }

    // Send the request and read the response head. A pooled connection the backend closed
    // in the meantime fails before any response byte: a replayable request is then sent
    // again on a new connection to the same backend, or, if that backend is gone, another.
    let mut reader = BodyReader::new(request_framing(req.framing));
    let mut body_done;
    let response = loop {
        let sent = if has_body {
            send_with_body(
                w,
                client,
                buf,
                &mut conn,
                &mut reader,
                &mut out,
                t.body,
                t.upstream,
            )
            .await
        } else {
            match conn.stream.write_all(&out).await {
                Ok(()) => read_response_head(&mut conn, t.upstream)
                    .await
                    .map_err(SendError::Upstream),
                Err(e) => Err(SendError::Upstream(UpstreamError::Io(e, true))),
            }
        };
        body_done = reader.is_done();
        match sent {
            Ok(r) => break r,
            Err(SendError::Upstream(e)) if replayable && conn.reused && e.before_response() => {
                let Some((i, c)) = upstream::reconnect(w, backends, idx, &mut tried).await else {
                    return answer(w, client, &req, 503, "no backend could be reached", false)
                        .await;
                };
                if i != idx {
                    idx = i;
                    in_flight = w.upstreams.begin(&backends[idx].addr);
                }
                conn = c;
            }
            Err(SendError::Upstream(UpstreamError::Timeout)) => {
                return answer(w, client, &req, 504, "backend did not answer in time", true).await;
            }
            Err(SendError::Upstream(e)) => {
                tracing::debug!(backend = %backends[idx].addr, error = %e, "backend failed");
                return answer(w, client, &req, 502, "backend failed", true).await;
            }
            Err(SendError::ClientBody(status)) => {
                return answer(w, client, &req, status, "request body not received", true).await;
            }
            Err(SendError::ClientGone) => return Next::Gone,
        }
    };
    let mut response = response;
    let backend = &backends[idx];
    let _in_flight = in_flight;
    let set_cookie = (route.sticky && sticky != Some(idx)).then(|| upstream::sticky_token(backend));

    // Interim responses (1xx other than 101) go straight through; the final one follows.
    while response.status / 100 == 1 && response.status != 101 {
        let mut interim = Vec::new();
        write_response_head(&response, None, &[], None, &mut interim);
        if (response.status != 100 || !expect_continue) && send(client, &interim).await.is_err() {
            return Next::Gone;
        }
        response = match read_response_head(&mut conn, t.upstream).await {
            Ok(r) => r,
            Err(_) => return answer(w, client, &req, 502, "backend failed", true).await,
        };
    }

    if response.status == 101 {
        if !upgrade {
            return answer(
                w,
                client,
                &req,
                502,
                "backend switched protocols unasked",
                true,
            )
            .await;
        }
        let mut head = Vec::new();
        write_response_head(&response, None, &[], Some("upgrade"), &mut head);
        w.stats
            .borrow_mut()
            .request(&req.route_id, 101, req.start.elapsed());
        return splice_upgraded(client, buf, conn, head).await;
    }

    let head_request = req.head.method == "HEAD";
    let framing = match response_framing(head_request, &response) {
        Ok(f) => f,
        Err(why) => return answer(w, client, &req, 502, why, true).await,
    };
    let mut resp_reader = BodyReader::new(framing);
    let upstream_reusable = upstream_keepalive
        && response.minor_version == 1
        && !response.connection_close()
        && !resp_reader.close_delimited()
        && body_done;
    // The client connection lives on only if its request was read whole and the response
    // can be delimited for it.
    let chunked_out = resp_reader.is_chunked();
    let client_can_chunk = req.head.minor_version >= 1;
    let (encoding, length_header, delimit_by_close) = if chunked_out {
        if client_can_chunk {
            (
                Encoding::Chunked,
                Some("transfer-encoding: chunked".to_string()),
                false,
            )
        } else {
            (Encoding::Raw, None, true)
        }
    } else {
        (Encoding::Raw, None, resp_reader.close_delimited())
    };
    let keep = req.keep_alive && body_done && !delimit_by_close && !*w.shutdown.borrow();
    let connection = if keep {
        (req.head.minor_version == 0).then_some("keep-alive")
    } else {
        Some("close")
    };
    let cookie =
        set_cookie.map(|token| format!("{}={token}; Path=/; HttpOnly", upstream::STICKY_COOKIE));
    let mut head = Vec::with_capacity(512);
    write_response_head(
        &response,
        length_header.as_deref(),
        cookie.as_slice(),
        connection,
        &mut head,
    );
    let head_len = head.len() as u64;
    let status = response.status;
    let moved = body::pump(
        &mut resp_reader,
        &mut conn.stream,
        &mut conn.buf,
        client,
        encoding,
        head,
        t.upstream,
    )
    .await;
    let elapsed = req.start.elapsed();
    {
        let mut s = w.stats.borrow_mut();
        s.request(&req.route_id, status, elapsed);
        if let Ok(n) = &moved {
            s.bytes_out += head_len + n;
        }
    }
    if w.shared.config.access_log {
        tracing::info!(
            target: "flynn_router::access",
            client = %ctx.peer, method = %req.head.method, host = %request_host(&req.head).unwrap_or_default(),
            path = %req.head.target, status, route = %req.route_id, backend = %backend.addr,
            ms = elapsed.as_secs_f64() * 1000.0,
        );
    }
    match moved {
        Ok(_) => {
            if upstream_reusable {
                conn.reused = false;
                w.upstreams.release(conn);
            }
            if keep {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        // Mid-body failures cannot be answered any more: the status line is out.
        Err(PumpError::Read(_)) | Err(PumpError::Write(_)) => Next::Gone,
    }
}

/// Methods that may be sent twice with the effect of once (RFC 9110 §9.2.2).
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

fn wants_upgrade(head: &RequestHead) -> bool {
    head.header("upgrade").is_some()
        && head
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .any(|t| {
                String::from_utf8_lossy(t)
                    .trim()
                    .eq_ignore_ascii_case("upgrade")
            })
}

fn request_framing(f: BodyFraming) -> Framing {
    match f {
        BodyFraming::None => Framing::None,
        BodyFraming::Length(n) => Framing::Length(n),
        BodyFraming::Chunked => Framing::Chunked(Box::new(ChunkedDecoder::new())),
    }
}

enum SendError {
    Upstream(UpstreamError),
    /// The client's body stopped coming (status to answer).
    ClientBody(u16),
    ClientGone,
}

/// Streams the request body to the backend while watching for its response: a backend may
/// answer early (413, say) and stop reading, and must not be left writing against a full
/// socket.
#[allow(clippy::too_many_arguments)]
async fn send_with_body<S>(
    w: &Worker,
    client: &mut S,
    buf: &mut BytesMut,
    conn: &mut UpstreamConn,
    reader: &mut BodyReader,
    head: &mut Vec<u8>,
    body_timeout: Duration,
    upstream_timeout: Duration,
) -> Result<ResponseHead, SendError>
where
    S: AsyncRead + Unpin,
{
    let encoding = if reader.is_chunked() {
        Encoding::Chunked
    } else {
        Encoding::Raw
    };
    let pending = std::mem::take(head);
    let (mut up_r, mut up_w) = conn.stream.split();
    let up_buf = &mut conn.buf;
    let mut sent_bytes = 0u64;
    let response;
    {
        let pump = body::pump(
            reader,
            client,
            buf,
            &mut up_w,
            encoding,
            pending,
            body_timeout,
        );
        let read = read_head_from(&mut up_r, up_buf, upstream_timeout);
        tokio::pin!(pump);
        tokio::pin!(read);
        let mut pumped = false;
        response = loop {
            tokio::select! {
                r = &mut pump, if !pumped => {
                    pumped = true;
                    match r {
                        Ok(n) => sent_bytes = n,
                        Err(PumpError::Read(body::BodyError::Timeout)) => return Err(SendError::ClientBody(408)),
                        Err(PumpError::Read(body::BodyError::Framing(e))) => return Err(SendError::ClientBody(e.status())),
                        Err(PumpError::Read(_)) => return Err(SendError::ClientGone),
                        Err(PumpError::Write(e)) => {
                            // The backend stopped reading; its response may still explain why.
                            tracing::debug!(error = %e, "backend stopped reading the body");
                        }
                    }
                }
                r = &mut read => break r,
            }
        };
    }
    w.stats.borrow_mut().bytes_in += sent_bytes;
    response.map_err(SendError::Upstream)
}

/// A backend's response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub minor_version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    fn tokens(&self, name: &str) -> impl Iterator<Item = String> + '_ {
        let name = name.to_string();
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
    }

    pub fn connection_close(&self) -> bool {
        self.tokens("connection").any(|t| t == "close")
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

async fn read_head_from<R: AsyncRead + Unpin>(
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
                    let head = ResponseHead {
                        status: resp.code.ok_or(UpstreamError::Malformed)?,
                        reason: resp.reason.unwrap_or("").to_string(),
                        minor_version: resp.version.ok_or(UpstreamError::Malformed)?,
                        headers: resp
                            .headers
                            .iter()
                            .map(|h| (h.name.to_string(), h.value.to_vec()))
                            .collect(),
                    };
                    buf.advance(n);
                    return Ok(head);
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
    let te: Vec<String> = r
        .tokens("transfer-encoding")
        .filter(|t| !t.is_empty())
        .collect();
    if !te.is_empty() {
        return if te.last().map(String::as_str) == Some("chunked") && te.len() == 1 {
            Ok(Framing::Chunked(Box::new(ChunkedDecoder::new())))
        } else if te.last().map(String::as_str) != Some("chunked") {
            // Not chunked last: the body runs to the close, its codings passed on as is.
            Ok(Framing::Close)
        } else {
            Err("backend sent stacked transfer codings")
        };
    }
    let mut length = None;
    for v in r.tokens("content-length") {
        let n: u64 = v.parse().map_err(|_| "backend sent a bad Content-Length")?;
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

fn is_hop_by_hop(name: &str) -> bool {
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

/// Writes a response head for the client: hop-by-hop headers replaced by the router's own.
/// `length_header` replaces the backend's framing when the body is re-encoded.
fn write_response_head(
    r: &ResponseHead,
    length_header: Option<&str>,
    set_cookies: &[String],
    connection: Option<&str>,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, r.status as u64);
    out.push(b' ');
    out.extend_from_slice(r.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let rechunk = length_header.is_some();
    for (name, value) in &r.headers {
        let keep_upgrade = r.status == 101 && name.eq_ignore_ascii_case("upgrade");
        if (is_hop_by_hop(name) && !keep_upgrade)
            || (rechunk && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if r.status != 101 && r.status / 100 != 1 {
        // Backends framing by transfer-encoding without chunked: keep their coding header.
        for (name, value) in &r.headers {
            if name.eq_ignore_ascii_case("transfer-encoding")
                && !rechunk
                && !value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"))
            {
                out.extend_from_slice(b"transfer-encoding: ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    if let Some(h) = length_header {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for c in set_cookies {
        let _ = write!(out, "set-cookie: {c}\r\n");
    }
    if let Some(c) = connection {
        let _ = write!(out, "connection: {c}\r\n");
    }
    out.extend_from_slice(b"\r\n");
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
    let _ = write!(out, "{}\r\n", ctx.peer.ip());
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

/// Writes and flushes (a TLS stream may hold records back otherwise).
async fn send<S: AsyncWrite + Unpin>(client: &mut S, data: &[u8]) -> io::Result<()> {
    client.write_all(data).await?;
    client.flush().await
}

/// A random UUID (version 4 layout) for requests that arrive without an id.
fn push_request_id(w: &Worker, out: &mut Vec<u8>) {
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

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
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

/// After a 101: the bytes each side already sent go across first, then both directions
/// are copied until each side closes its half.
async fn splice_upgraded<S>(
    client: &mut S,
    buf: &mut BytesMut,
    mut conn: UpstreamConn,
    head: Vec<u8>,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut first = head;
    first.extend_from_slice(&conn.buf);
    conn.buf.clear();
    if send(client, &first).await.is_err() {
        return Next::Gone;
    }
    if !buf.is_empty() {
        if conn.stream.write_all(buf).await.is_err() {
            return Next::Gone;
        }
        buf.clear();
    }
    let _ = tokio::io::copy_bidirectional(client, &mut conn.stream).await;
    Next::Gone
}

async fn redirect<S>(w: &Worker, client: &mut S, req: &Req, host: &str, path: &str) -> Next
where
    S: AsyncWrite + Unpin,
{
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let location = format!("https://{host}{path}");
    let body = format!(
        "{{\"error\":\"use HTTPS\",\"location\":{}}}",
        json_string(&location)
    );
    let close = !matches!(req.framing, BodyFraming::None) || !req.keep_alive;
    let resp = format!(
        "HTTP/1.1 308 Permanent Redirect\r\nlocation: {location}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    w.stats
        .borrow_mut()
        .request(&req.route_id, 308, req.start.elapsed());
    if send(client, resp.as_bytes()).await.is_err() {
        return Next::Gone;
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Answers a request that could not be read (malformed, too large, too slow); the
/// connection is closed after it.
async fn refuse<S: AsyncWrite + Unpin>(
    w: &Worker,
    client: &mut S,
    status: u16,
    why: &str,
    start: Instant,
) -> Next {
    let resp = error_response(w, status, why, true);
    w.stats.borrow_mut().request("", status, start.elapsed());
    let _ = send(client, &resp).await;
    Next::Close
}

/// Answers a request the router itself responds to. `close`: the request's body was not
/// read, so the connection cannot carry another request.
async fn answer<S: AsyncWrite + Unpin>(
    w: &Worker,
    client: &mut S,
    req: &Req,
    status: u16,
    why: &str,
    close: bool,
) -> Next {
    let close = close || !req.keep_alive || *w.shutdown.borrow();
    let resp = error_response(w, status, why, close);
    w.stats
        .borrow_mut()
        .request(&req.route_id, status, req.start.elapsed());
    if send(client, &resp).await.is_err() {
        return Next::Gone;
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// An error response, whole, for an HTTP/1.1 client.
pub fn error_response(w: &Worker, status: u16, why: &str, close: bool) -> Vec<u8> {
    let (ctype, body) = error_body(w, status, why);
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The body of an answer the router gives itself, and its content type: the operator's
/// page for 503s when one is configured, else `{"error": ..., "status": ...}`.
pub fn error_body(w: &Worker, status: u16, why: &str) -> (&'static str, Vec<u8>) {
    match (&w.shared.page_503, status) {
        (Some(page), 503) => ("text/html; charset=utf-8", page.clone()),
        _ => (
            "application/json",
            format!("{{\"error\":{},\"status\":{status}}}", json_string(why)).into_bytes(),
        ),
    }
}

pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
