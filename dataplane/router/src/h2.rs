//! HTTP/2 from clients (over TLS by ALPN, or h2c with prior knowledge), each stream proxied
//! to an HTTP/1.1 backend through the shared request path ([`crate::forward`]). The `h2` crate does the framing, the concurrent-stream limit and
//! flow control; the router releases receive window only as a body is forwarded and sends
//! only into the window the client grants, so memory stays bounded per stream. A drain
//! sends GOAWAY and lets open streams finish.

use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use flynn_http1::{BodyFraming, Header, RequestHead};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderValue, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::backend_h1;
use crate::body::{BodyReader, Encoding};
use crate::conn::ConnCtx;
use crate::error::{ErrorKind, ProxyError};
use crate::forward::{self, Exchange};
use crate::respond;
use crate::worker::Worker;

pub async fn serve<S>(w: Rc<Worker>, io: S, ctx: ConnCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let cfg = &w.shared.config;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(cfg.h2_max_streams)
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_header_list_size(cfg.limits.max_head as u32)
        .max_send_buffer_size(256 * 1024)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(cfg.timeouts.header, handshake).await {
        Ok(Ok(c)) => c,
        _ => return,
    };
    let mut shutdown = w.shutdown.clone();
    let mut draining = *shutdown.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tokio::task::spawn_local(stream(w.clone(), req, respond, ctx));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "h2 connection ended");
                    break;
                }
                None => break,
            },
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// Answers a stream the router could not proxy with its own response.
fn error(
    w: &Worker,
    respond: &mut SendResponse<Bytes>,
    served: &mut forward::Served<'_>,
    why: &str,
) {
    let status = served.status;
    let (ctype, body) = respond::error_body(w, status, why);
    served.body_out = body.len() as u64;
    forward::account(w, served);
    let body = Bytes::from(body);
    let resp = Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("content-length", body.len())
        .body(())
        .expect("static response parts");
    if let Ok(mut s) = respond.send_response(resp, false) {
        let _ = s.send_data(body, true);
    }
}

/// Headers that exist only per connection in HTTP/1.1 and are not allowed in HTTP/2.
fn connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

async fn stream(
    w: Rc<Worker>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    ctx: ConnCtx,
) {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut done = Done::default();
    let result = proxy_stream(&w, &parts, body, &host, &path, &mut respond, ctx, &mut done).await;
    let mut served = forward::Served {
        client: ctx.peer,
        proto: "HTTP/2",
        method: parts.method.as_str(),
        host: &host,
        path: &path,
        status: 0,
        route: &done.route,
        backend: done.backend.as_deref(),
        elapsed: start.elapsed(),
        body_in: done.body_in,
        body_out: done.body_out,
    };
    match result {
        Ok(status) => {
            served.status = status;
            forward::account(&w, &served);
        }
        // No status: the client reset the stream, and there is no one to answer.
        Err(e) => {
            if let Some(status) = e.status() {
                served.status = status;
                served.backend = None;
                error(&w, &mut respond, &mut served, e.why());
            }
        }
    }
}

/// What a stream's exchange got to, for its accounting.
#[derive(Default)]
struct Done {
    route: String,
    backend: Option<String>,
    body_in: u64,
    body_out: u64,
}

/// One stream through the shared request path. `Ok(status)` once a response has started;
/// an error before that is answered by the caller.
#[allow(clippy::too_many_arguments)]
async fn proxy_stream(
    w: &Worker,
    parts: &http::request::Parts,
    mut body: RecvStream,
    host: &str,
    path: &str,
    respond: &mut SendResponse<Bytes>,
    ctx: ConnCtx,
    done: &mut Done,
) -> Result<u16, ProxyError> {
    let table = w.table();
    let entry = forward::route(&table, host, path)?;
    done.route.clone_from(&entry.route.id);
    forward::has_backends(entry)?;
    let length = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<u64>());
    let framing = match length {
        Some(Ok(0)) => BodyFraming::None,
        Some(Ok(n)) => BodyFraming::Length(n),
        Some(Err(_)) => return Err(ProxyError::new(ErrorKind::ClientBody(400))),
        None if body.is_end_stream() => BodyFraming::None,
        None => BodyFraming::Chunked,
    };
    // The request as an HTTP/1.1 head, so the headers the router adds are the same.
    let mut headers = vec![Header {
        name: "host".into(),
        value: host.as_bytes().to_vec(),
    }];
    let mut cookies: Vec<Vec<u8>> = Vec::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if connection_specific(n) || n == "host" {
            continue;
        }
        if n == "cookie" {
            cookies.push(value.as_bytes().to_vec());
            continue;
        }
        headers.push(Header {
            name: n.to_string(),
            value: value.as_bytes().to_vec(),
        });
    }
    if !cookies.is_empty() {
        // HTTP/2 may split cookies across fields; HTTP/1.1 wants one.
        headers.push(Header {
            name: "cookie".into(),
            value: cookies.join(&b"; "[..]),
        });
    }
    let head = RequestHead {
        method: parts.method.as_str().to_string(),
        target: path.to_string(),
        minor_version: 1,
        headers,
    };
    let has_body = framing != BodyFraming::None;
    let replayable = !has_body && forward::idempotent(parts.method.as_str());
    let cookie_values: Vec<&[u8]> = cookies.iter().map(Vec::as_slice).collect();
    let keepalive = entry.route.backend_keepalive;
    let mut ex = Exchange::open(w, entry, &cookie_values, keepalive, replayable).await?;
    let t = w.shared.config.timeouts;
    let mut out = Vec::with_capacity(1024);
    backend_h1::write_request_head(w, &head, framing, ctx, path, keepalive, false, &mut out);

    // Request body: forwarded as it arrives, window released only once it is written.
    let encoding = if framing == BodyFraming::Chunked {
        Encoding::Chunked
    } else {
        Encoding::Raw
    };
    if has_body {
        while let Some(data) = body.data().await {
            let data = data.map_err(|_| ProxyError::new(ErrorKind::ClientGone))?;
            done.body_in += data.len() as u64;
            encoding.frame(&data, &mut out);
            if let Err(e) = ex.conn.stream.write_all(&out).await {
                tracing::debug!(error = %e, "backend stopped reading the body");
                return Err(ProxyError::new(ErrorKind::UpstreamFailed));
            }
            out.clear();
            let _ = body.flow_control().release_capacity(data.len());
        }
        encoding.finish(&mut out);
    }
    let first = ex.send(&out).await?;
    // Interim responses are not passed on over HTTP/2.
    let response = ex.final_head(first, |_| {}).await?;
    done.backend = Some(ex.backend().addr.clone());
    if response.status == 101 {
        return Err(ProxyError::new(ErrorKind::BadResponse(
            "backend switched protocols unasked",
        )));
    }
    let head_request = parts.method == http::Method::HEAD;
    let framing = backend_h1::response_framing(head_request, &response)
        .map_err(|why| ProxyError::new(ErrorKind::BadResponse(why)))?;
    let mut reader = BodyReader::new(framing);
    let mut builder = Response::builder().status(response.status);
    for (name, value) in response.end_to_end() {
        // HeaderName lowercases (and knows the standard names) without allocating.
        let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if connection_specific(name.as_str())
            || (reader.is_chunked() && name == http::header::CONTENT_LENGTH)
        {
            continue;
        }
        if let Ok(v) = HeaderValue::from_bytes(value) {
            builder = builder.header(name, v);
        }
    }
    if let Some(cookie) = ex.sticky_cookie() {
        builder = builder.header("set-cookie", cookie);
    }
    let resp = builder
        .body(())
        .map_err(|_| ProxyError::new(ErrorKind::BadResponse("backend sent an unusable header")))?;
    let status = response.status;
    let end = reader.is_done();
    let Ok(mut send) = respond.send_response(resp, end) else {
        return Err(ProxyError::new(ErrorKind::ClientGone));
    };
    let mut ok = true;
    if !end {
        let mut piece = Vec::new();
        let mut scratch = BytesMut::new();
        std::mem::swap(&mut scratch, &mut ex.conn.buf);
        loop {
            piece.clear();
            match reader
                .next(&mut ex.conn.stream, &mut scratch, &mut piece, t.upstream)
                .await
            {
                Ok(more) => {
                    done.body_out += piece.len() as u64;
                    if !send_within_window(&mut send, Bytes::copy_from_slice(&piece)).await {
                        ok = false;
                        break;
                    }
                    if !more || reader.is_done() {
                        let _ = send.send_data(Bytes::new(), true);
                        break;
                    }
                }
                Err(_) => {
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    ok = false;
                    break;
                }
            }
        }
        std::mem::swap(&mut scratch, &mut ex.conn.buf);
    }
    let reusable = forward::reusable(entry, &response, reader.close_delimited(), true);
    ex.finish(ok && reusable && reader.is_done());
    Ok(status)
}

/// Sends `data` only as the client's flow-control window allows.
async fn send_within_window(send: &mut h2::SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return false,
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        if send.send_data(chunk, false).is_err() {
            return false;
        }
    }
    true
}
