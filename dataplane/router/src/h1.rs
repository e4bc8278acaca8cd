//! HTTP/1.1 from clients: one loop per client connection, one request at a time (pipelined
//! requests wait in the buffer, so responses leave in order), bodies streamed both ways.
//!
//! This module speaks HTTP/1.1 to the client: it reads the head (408/4xx), answers
//! redirects, `Expect: 100-continue` and upgrades, streams bodies and decides whether the
//! client connection lives on. Routing, the backend choice, sending and replaying, and the
//! sticky cookie are the shared phases in [`crate::forward`]; the backend side of HTTP/1 is
//! [`crate::backend_h1`]; every failure is a [`ProxyError`].

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use flynn_http1::{BodyFraming, ChunkedDecoder, RequestHead};
use flynn_router_table::HttpEntry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend_h1::{self, ResponseHead};
use crate::body::{self, BodyReader, Encoding, Framing, PumpError};
use crate::conn::ConnCtx;
use crate::error::{ErrorKind, ProxyError};
use crate::forward::{self, Exchange};
use crate::io::RingSocket;
use crate::respond::{error_response, json_string};
use crate::upstream::UpstreamConn;
use crate::worker::Worker;

/// Serves a client connection until it closes, errs, times out or the router drains.
pub async fn serve<S>(w: Rc<Worker>, mut client: S, mut buf: BytesMut, ctx: ConnCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + RingSocket,
{
    let mut shutdown = w.shutdown.clone();
    let mut first = true;
    loop {
        let head = match read_head(&w, &mut client, &mut buf, &mut shutdown, first).await {
            HeadRead::Head(head, n) => {
                buf.advance(n);
                head
            }
            HeadRead::Closed => return,
            HeadRead::Refuse(status, why) => {
                refuse(&w, &mut client, ctx.peer, status, why, Instant::now()).await;
                let _ = client.shutdown().await;
                return;
            }
        };
        first = false;
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

/// Reads the next request head. `first`: the connection's first request, which a drain
/// does not cut short: the connection was accepted, so its client may have sent the request
/// already (closing then would reset it); it gets the header timeout to arrive.
async fn read_head<S: AsyncRead + Unpin>(
    w: &Worker,
    client: &mut S,
    buf: &mut BytesMut,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    first: bool,
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
            // Between requests: idle timeout, and a drain closes idle connections at once
            // (but not a new one before its first request: see above).
            None if *shutdown.borrow() => {
                if !first {
                    return HeadRead::Closed;
                }
                match tokio::time::timeout(t.header, client.read_buf(buf)).await {
                    Ok(r) => r,
                    Err(_) => return HeadRead::Closed,
                }
            }
            None => {
                tokio::select! {
                    r = tokio::time::timeout(t.idle, client.read_buf(buf)) => match r {
                        Ok(r) => r,
                        Err(_) => return HeadRead::Closed,
                    },
                    _ = shutdown.changed() => {
                        if first {
                            continue;
                        }
                        return HeadRead::Closed;
                    }
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
    /// The client, for the access log.
    peer: SocketAddr,
    head: RequestHead,
    framing: BodyFraming,
    keep_alive: bool,
    start: Instant,
    route_id: String,
}

const PROTO: &str = "HTTP/1.1";

/// Counts a request and writes its access-log line ([`forward::account`]).
fn account(w: &Worker, req: &Req, status: u16, backend: Option<&str>, body_in: u64, body_out: u64) {
    let served = forward::Served {
        client: req.peer,
        proto: PROTO,
        method: &req.head.method,
        host: request_host(&req.head).unwrap_or_default(),
        path: &req.head.target,
        status,
        route: &req.route_id,
        backend,
        elapsed: req.start.elapsed(),
        body_in,
        body_out,
    };
    forward::account(w, &served);
}

async fn request<S>(
    w: &Rc<Worker>,
    client: &mut S,
    buf: &mut BytesMut,
    head: RequestHead,
    ctx: ConnCtx,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin + RingSocket,
{
    let start = Instant::now();
    let framing = match head.framing() {
        Ok(f) => f,
        Err(e) => {
            let why = refusal_text(e.status());
            return refuse(w, client, ctx.peer, e.status(), why, start).await;
        }
    };
    let mut req = Req {
        peer: ctx.peer,
        keep_alive: head.keep_alive(),
        head,
        framing,
        start,
        route_id: String::new(),
    };
    let table = w.table();
    let host = request_host(&req.head).unwrap_or_default();
    let path = origin_path(&req.head.target).to_string();
    let body_unread = !matches!(req.framing, BodyFraming::None);
    let entry = match forward::route(&table, host, &path) {
        Ok(e) => e,
        Err(e) => return fail(w, client, &req, e, body_unread).await,
    };
    req.route_id.clone_from(&entry.route.id);
    if entry.route.https_redirect && !ctx.tls {
        return redirect(w, client, &req, host, &path).await;
    }
    if let Err(e) = forward::has_backends(entry) {
        return fail(w, client, &req, e, body_unread).await;
    }
    proxy(w, client, buf, req, entry, ctx, &path).await
}

/// The request's host: the absolute-form target's authority, else the Host header. A Host
/// that is not UTF-8 matches no route, as its lossy decoding would not.
fn request_host(head: &RequestHead) -> Option<&str> {
    if let Some(rest) = head
        .target
        .strip_prefix("http://")
        .or_else(|| head.target.strip_prefix("https://"))
    {
        return Some(rest.split(['/', '?']).next().unwrap_or(""));
    }
    head.header("host")
        .and_then(|h| std::str::from_utf8(h).ok())
        .map(str::trim)
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
    S: AsyncRead + AsyncWrite + Unpin + RingSocket,
{
    let t = w.shared.config.timeouts;
    let upgrade = wants_upgrade(&req.head);
    let has_body = !matches!(req.framing, BodyFraming::None);
    let replayable = !has_body && forward::idempotent(&req.head.method);
    let expect_continue = req.head.minor_version >= 1 && req.head.expects_continue();
    let upstream_keepalive = entry.route.backend_keepalive && !upgrade;

    let cookies: Vec<&[u8]> = req
        .head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .map(|h| h.value.as_slice())
        .collect();
    let opened = Exchange::open(w, entry, &cookies, upstream_keepalive, replayable).await;
    drop(cookies);
    let mut ex = match opened {
        Ok(ex) => ex,
        Err(e) => return fail(w, client, &req, e, has_body).await,
    };

    req.head.strip_hop_by_hop();
    let mut out = Vec::with_capacity(1024);
    backend_h1::write_request_head(
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

    // Send the request and read the response head; a body streams while the backend may
    // already answer.
    let mut reader = BodyReader::new(request_framing(req.framing));
    let mut body_in = 0;
    let sent = if has_body {
        send_with_body(
            client,
            buf,
            &mut ex.conn,
            &mut reader,
            &mut out,
            &mut body_in,
            t.body,
            t.upstream,
        )
        .await
    } else {
        ex.send(&out).await
    };
    let body_done = reader.is_done();
    let first = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(backend = %ex.backend().addr, error = %e, "request failed");
            return fail(w, client, &req, e, !body_done).await;
        }
    };

    // Interim responses (1xx other than 101) go straight through; the final one follows.
    let mut interims = Vec::new();
    let response = ex
        .final_head(first, |r| {
            if r.status != 100 || !expect_continue {
                write_response_head(r, None, &[], None, &mut interims);
            }
        })
        .await;
    if !interims.is_empty() && send(client, &interims).await.is_err() {
        return Next::Gone;
    }
    let response = match response {
        Ok(r) => r,
        Err(e) => return fail(w, client, &req, e, true).await,
    };

    if response.status == 101 {
        if !upgrade {
            let e = ProxyError::new(ErrorKind::BadResponse("backend switched protocols unasked"));
            return fail(w, client, &req, e, true).await;
        }
        let mut head = Vec::new();
        write_response_head(&response, None, &[], Some("upgrade"), &mut head);
        let backend = ex.backend().addr.clone();
        account(w, &req, 101, Some(&backend), body_in, 0);
        return splice_upgraded(client, buf, ex.into_conn(), head).await;
    }

    let head_request = req.head.method == "HEAD";
    let framing = match backend_h1::response_framing(head_request, &response) {
        Ok(f) => f,
        Err(why) => {
            let e = ProxyError::new(ErrorKind::BadResponse(why));
            return fail(w, client, &req, e, true).await;
        }
    };
    let mut resp_reader = BodyReader::new(framing);
    let upstream_reusable = upstream_keepalive
        && forward::reusable(entry, &response, resp_reader.close_delimited(), body_done);
    // The client connection lives on only if its request was read whole and the response
    // can be delimited for it.
    let chunked_out = resp_reader.is_chunked();
    let client_can_chunk = req.head.minor_version >= 1;
    let (encoding, length_header, delimit_by_close) = if chunked_out {
        if client_can_chunk {
            (Encoding::Chunked, Some("transfer-encoding: chunked"), false)
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
    let cookie = ex.sticky_cookie();
    let mut head = Vec::with_capacity(512);
    write_response_head(
        &response,
        length_header,
        cookie.as_slice(),
        connection,
        &mut head,
    );
    let status = response.status;
    let moved = body::pump(
        &mut resp_reader,
        &mut ex.conn.stream,
        &mut ex.conn.buf,
        client,
        encoding,
        head,
        t.upstream,
    )
    .await;
    let body_out = moved.as_ref().map_or(0, |n| *n);
    account(w, &req, status, Some(&ex.backend().addr), body_in, body_out);
    match moved {
        Ok(_) => {
            ex.finish(upstream_reusable);
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

/// Streams the request body to the backend while watching for its response: a backend may
/// answer early (413, say) and stop reading, and must not be left writing against a full
/// socket.
#[allow(clippy::too_many_arguments)]
async fn send_with_body<S>(
    client: &mut S,
    buf: &mut BytesMut,
    conn: &mut UpstreamConn,
    reader: &mut BodyReader,
    head: &mut Vec<u8>,
    body_in: &mut u64,
    body_timeout: Duration,
    upstream_timeout: Duration,
) -> Result<ResponseHead, ProxyError>
where
    S: AsyncRead + Unpin + RingSocket,
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
        let read = backend_h1::read_head_from(&mut up_r, up_buf, upstream_timeout);
        tokio::pin!(pump);
        tokio::pin!(read);
        let mut pumped = false;
        response = loop {
            // Biased to the pump: when the body's last write and the response are both
            // ready (a backend answers once it has read the body), the pump's count must
            // be taken first, or the access line says no body was sent (router_tls t21
            // caught it on epoll, where the write completes before the backend reads).
            tokio::select! {
                biased;
                r = &mut pump, if !pumped => {
                    pumped = true;
                    match r {
                        Ok(n) => sent_bytes = n,
                        Err(PumpError::Read(body::BodyError::Timeout)) => return Err(ProxyError::new(ErrorKind::ClientBody(408))),
                        Err(PumpError::Read(body::BodyError::Framing(e))) => return Err(ProxyError::new(ErrorKind::ClientBody(e.status()))),
                        Err(PumpError::Read(_)) => return Err(ProxyError::new(ErrorKind::ClientGone)),
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
    *body_in = sent_bytes;
    // A request with a body is never replayed: whatever failed is final.
    response.map_err(|e| ProxyError {
        retryable: false,
        ..e.into()
    })
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
    backend_h1::push_decimal(out, r.status as u64);
    out.push(b' ');
    out.extend_from_slice(r.reason());
    out.extend_from_slice(b"\r\n");
    let rechunk = length_header.is_some();
    for (name, value) in r.end_to_end() {
        if rechunk && name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if r.status != 101 && r.status / 100 != 1 {
        // Backends framing by transfer-encoding without chunked: keep their coding header.
        for (name, value) in r.raw_headers() {
            if name.eq_ignore_ascii_case(b"transfer-encoding")
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

/// Writes and flushes (a TLS stream may hold records back otherwise).
async fn send<S: AsyncWrite + Unpin>(client: &mut S, data: &[u8]) -> io::Result<()> {
    client.write_all(data).await?;
    client.flush().await
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
    S: AsyncRead + AsyncWrite + Unpin + RingSocket,
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
    account(w, req, 308, None, 0, body.len() as u64);
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
    peer: SocketAddr,
    status: u16,
    why: &str,
    start: Instant,
) -> Next {
    let (resp, body_out) = error_response(w, status, why, true);
    let served = forward::Served {
        client: peer,
        proto: PROTO,
        method: "-",
        host: "-",
        path: "-",
        status,
        route: "",
        backend: None,
        elapsed: start.elapsed(),
        body_in: 0,
        body_out,
    };
    forward::account(w, &served);
    let _ = send(client, &resp).await;
    Next::Close
}

/// Answers a request that failed with the router's own response. `body_unread`: the
/// request's body was not read whole, so the connection cannot carry another request.
async fn fail<S: AsyncWrite + Unpin>(
    w: &Worker,
    client: &mut S,
    req: &Req,
    e: ProxyError,
    body_unread: bool,
) -> Next {
    let Some(status) = e.status() else {
        return Next::Gone;
    };
    let close = body_unread || !e.keeps_connection() || !req.keep_alive || *w.shutdown.borrow();
    let (resp, body_out) = error_response(w, status, e.why(), close);
    account(w, req, status, None, 0, body_out);
    if send(client, &resp).await.is_err() {
        return Next::Gone;
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}
