//! The phases every proxied request goes through, whether the client speaks HTTP/1.1 or
//! HTTP/2: find the route, pick and connect a backend (sticky first, then least-outstanding
//! of two random choices; others on connect failure), send the request and read the
//! response head (replaying a bodiless idempotent request whose pooled connection proves
//! closed), set the sticky cookie, and hand the connection back to the pool or not.
//! `h1` and `h2` only translate their client's protocol to these phases and back.

use std::net::SocketAddr;
use std::time::Duration;

use flynn_router_table::{Backend, HttpEntry, RouteTable};
use tokio::io::AsyncWriteExt;

use crate::backend_h1::{self, ResponseHead};
use crate::error::{ErrorKind, ProxyError};
use crate::upstream::{self, InFlight, UpstreamConn};
use crate::worker::Worker;

/// The route for a request: `NoRoute` when none matches.
pub fn route<'t>(
    table: &'t RouteTable,
    host: &str,
    path: &str,
) -> Result<&'t HttpEntry, ProxyError> {
    table
        .http(host, path)
        .ok_or(ProxyError::new(ErrorKind::NoRoute))
}

/// `NoLiveBackend` when the route has no instance to send to.
pub fn has_backends(entry: &HttpEntry) -> Result<(), ProxyError> {
    if entry.backends.is_empty() {
        return Err(ProxyError::new(ErrorKind::NoLiveBackend));
    }
    Ok(())
}

/// Methods that may be sent twice with the effect of once (RFC 9110 §9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// One request's exchange with a backend.
pub struct Exchange<'w> {
    w: &'w Worker,
    entry: &'w HttpEntry,
    idx: usize,
    pub conn: UpstreamConn,
    in_flight: InFlight<'w>,
    tried: Vec<usize>,
    /// Sent again on a fresh connection when its pooled one proves closed: only a request
    /// with no body and an idempotent method (the backend may have acted before failing).
    replayable: bool,
    /// The backend the client's sticky cookie named, if the route is sticky.
    sticky: Option<usize>,
}

impl<'w> Exchange<'w> {
    /// Picks and connects a backend. `pooled`: an idle keep-alive connection may be used.
    pub async fn open(
        w: &'w Worker,
        entry: &'w HttpEntry,
        cookies: &[&[u8]],
        pooled: bool,
        replayable: bool,
    ) -> Result<Exchange<'w>, ProxyError> {
        let backends = &entry.backends;
        let sticky = if entry.route.sticky {
            upstream::sticky_backend(cookies, backends)
        } else {
            None
        };
        let mut tried = Vec::new();
        // A request that cannot be replayed gets a pooled connection only once it is seen
        // open.
        let (idx, conn) = connect_backend(w, backends, sticky, pooled, !replayable, &mut tried)
            .await
            .ok_or(ProxyError::new(ErrorKind::Unreachable))?;
        Ok(Exchange {
            w,
            entry,
            idx,
            conn,
            in_flight: w.upstreams.begin(&backends[idx].addr),
            tried,
            replayable,
            sticky,
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.entry.backends[self.idx]
    }

    /// Writes `out` (the whole request, or what is left of it) and reads the response head.
    /// A replayable request whose connection fails before any response byte goes again on a
    /// new connection to the same backend, or to another if that one is gone: as often as
    /// pooled connections turn out stale, and once after a fresh connection failed (the
    /// backend died mid-request, as nginx's `proxy_next_upstream error` does for idempotent
    /// requests; not twice, so a request that kills its backend is not replayed forever).
    pub async fn send(&mut self, out: &[u8]) -> Result<ResponseHead, ProxyError> {
        let mut fresh_failures = 0;
        loop {
            let result = match self.conn.stream.write_all(out).await {
                Ok(()) => self.read_head().await,
                Err(e) => {
                    self.vanished_if_timed_out(&e);
                    Err(backend_h1::UpstreamError::Io(e, true).into())
                }
            };
            match result {
                Err(e)
                    if e.retryable
                        && self.replayable
                        && (self.conn.reused || fresh_failures == 0) =>
                {
                    if !self.conn.reused {
                        fresh_failures += 1;
                    }
                    self.reconnect().await?;
                }
                // Silent past the response timeout: `read_head` passed the backend over, and
                // a request that can be replayed goes to another not yet tried (as nginx's
                // `proxy_next_upstream timeout`), so a wedged host costs it one timeout.
                Err(e) if e.kind == ErrorKind::UpstreamTimeout && self.replayable => {
                    let backends = &self.entry.backends;
                    let Some((i, c)) =
                        connect_backend(self.w, backends, None, false, false, &mut self.tried)
                            .await
                    else {
                        return Err(e);
                    };
                    self.idx = i;
                    self.in_flight = self.w.upstreams.begin(&backends[i].addr);
                    self.conn = c;
                }
                other => return other,
            }
        }
    }

    /// Reads the next response head (after an interim one, say).
    pub async fn read_head(&mut self) -> Result<ResponseHead, ProxyError> {
        // The route's own response timeout, where it has one.
        let timeout = self.entry.route.response_timeout_ms.map_or(
            self.w.shared.config.timeouts.upstream,
            Duration::from_millis,
        );
        let head = backend_h1::read_response_head(&mut self.conn, timeout).await;
        // Passive health: an answer clears the backend, silence past the timeout ejects it.
        match &head {
            Ok(_) => self.w.upstreams.answered(&self.conn.addr),
            Err(backend_h1::UpstreamError::Timeout) => eject(self.w, &self.conn.addr),
            Err(backend_h1::UpstreamError::Io(e, _)) => self.vanished_if_timed_out(e),
            Err(_) => {}
        }
        Ok(head?)
    }

    /// A connection the kernel gave up on (our data went unacknowledged past the socket's
    /// user timeout) means the backend's host is gone: passed over for a while, so a replay
    /// goes elsewhere at once.
    fn vanished_if_timed_out(&self, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            eject(self.w, &self.conn.addr);
        }
    }

    /// Reads past interim (1xx) responses to the final one, calling `interim` for each.
    pub async fn final_head(
        &mut self,
        mut head: ResponseHead,
        mut interim: impl FnMut(&ResponseHead),
    ) -> Result<ResponseHead, ProxyError> {
        while head.status / 100 == 1 && head.status != 101 {
            interim(&head);
            head = self.read_head().await?;
        }
        Ok(head)
    }

    async fn reconnect(&mut self) -> Result<(), ProxyError> {
        let backends = &self.entry.backends;
        let (i, c) = reconnect(self.w, backends, self.idx, &mut self.tried)
            .await
            .ok_or(ProxyError::new(ErrorKind::Unreachable))?;
        if i != self.idx {
            self.idx = i;
            self.in_flight = self.w.upstreams.begin(&backends[i].addr);
        }
        self.conn = c;
        Ok(())
    }

    /// The `Set-Cookie` value pinning the client to this backend, when the route is sticky
    /// and the client's cookie did not already name it.
    pub fn sticky_cookie(&self) -> Option<String> {
        (self.entry.route.sticky && self.sticky != Some(self.idx)).then(|| {
            format!(
                "{}={}; Path=/; HttpOnly",
                upstream::STICKY_COOKIE,
                upstream::sticky_token(self.backend())
            )
        })
    }

    /// Ends the exchange: the connection goes back to the pool if `reusable`.
    pub fn finish(self, reusable: bool) {
        let mut conn = self.conn;
        if reusable {
            conn.reused = false;
            self.w.upstreams.release(conn);
        }
    }

    /// Takes the connection out of the exchange (an upgraded connection is spliced).
    pub fn into_conn(self) -> UpstreamConn {
        self.conn
    }
}

/// One request as the router accounts for it, the same over HTTP/1 and HTTP/2: counted in
/// the metrics and, with `--access-log`, written as one access-log line (target
/// `flynn_router::access`). Only body bytes count, since heads are encoded differently by
/// the two protocols.
pub struct Served<'a> {
    pub client: SocketAddr,
    pub proto: &'static str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: &'a str,
    /// The backend that answered; none for the router's own answers.
    pub backend: Option<&'a str>,
    pub elapsed: Duration,
    /// Request body bytes read from the client.
    pub body_in: u64,
    /// Response body bytes written to the client.
    pub body_out: u64,
}

pub fn account(w: &Worker, s: &Served<'_>) {
    {
        let mut stats = w.stats.borrow_mut();
        stats.request(s.route, s.status, s.elapsed);
        stats.bytes_in += s.body_in;
        stats.bytes_out += s.body_out;
    }
    if w.shared.config.access_log {
        tracing::info!(
            target: "flynn_router::access",
            client = %s.client, proto = s.proto, method = %s.method, host = %s.host,
            path = %s.path, status = s.status, route = %s.route,
            backend = %s.backend.unwrap_or("-"), ms = s.elapsed.as_secs_f64() * 1000.0,
            bytes_in = s.body_in, bytes_out = s.body_out,
        );
    }
}

/// Picks and connects a backend: the sticky one first when the cookie names a live one,
/// then least-outstanding of two random choices among those not yet tried, until one
/// connects. `None`: none could be reached.
pub(crate) async fn connect_backend(
    w: &Worker,
    backends: &[Backend],
    sticky: Option<usize>,
    pooled: bool,
    must_be_open: bool,
    tried: &mut Vec<usize>,
) -> Option<(usize, UpstreamConn)> {
    loop {
        let idx = match (tried.is_empty(), sticky) {
            // A sticky client follows its backend, unless that one is ejected.
            (true, Some(i)) if !w.upstreams.is_ejected(&backends[i].addr) => i,
            _ => w.upstreams.pick(backends, tried)?,
        };
        tried.push(idx);
        match w
            .upstreams
            .connect(&backends[idx].addr, pooled, w.ring())
            .await
        {
            Ok(mut c) => {
                // A request that cannot be replayed gets a connection known to be open: a
                // pooled one the backend has closed reads EOF (or a reset) here.
                if must_be_open && c.reused && !c.stream.still_open() {
                    match w.upstreams.connect_new(&backends[idx].addr, w.ring()).await {
                        Ok(n) => c = n,
                        Err(e) => {
                            connect_failed(w, &backends[idx].addr, &e);
                            continue;
                        }
                    }
                }
                return Some((idx, c));
            }
            Err(e) => connect_failed(w, &backends[idx].addr, &e),
        }
    }
}

/// A backend refused (or timed out) a new connection: counted, and passed over for a
/// while. Its pooled connections having closed too is no excuse: it is down.
fn connect_failed(w: &Worker, addr: &str, e: &dyn std::fmt::Display) {
    w.stats.borrow_mut().connect_errors += 1;
    tracing::debug!(backend = %addr, error = %e, "backend connect failed");
    eject(w, addr);
}

/// Marks a backend failed, counting a new ejection.
pub(crate) fn eject(w: &Worker, addr: &str) {
    if w.upstreams.failed(addr) {
        w.stats.borrow_mut().ejections += 1;
        tracing::info!(backend = %addr, "backend ejected for a while: it refused a connect or did not answer in time");
    }
}

/// A fresh connection for a request whose pooled connection proved closed before any
/// response byte: the same backend first, then any other not yet tried.
pub(crate) async fn reconnect(
    w: &Worker,
    backends: &[Backend],
    idx: usize,
    tried: &mut Vec<usize>,
) -> Option<(usize, UpstreamConn)> {
    if w.upstreams.is_ejected(&backends[idx].addr) {
        // It failed just now (its host vanished, say): straight to another.
        return connect_backend(w, backends, None, false, false, tried).await;
    }
    match w.upstreams.connect_new(&backends[idx].addr, w.ring()).await {
        Ok(c) => Some((idx, c)),
        Err(e) => {
            connect_failed(w, &backends[idx].addr, &e);
            connect_backend(w, backends, None, false, false, tried).await
        }
    }
}

/// Whether the backend connection can serve another request after this response: the
/// route keeps backends alive, the response was HTTP/1.1 without `Connection: close`, its
/// body is delimited, and the request body went whole.
pub fn reusable(
    entry: &HttpEntry,
    response: &ResponseHead,
    close_delimited: bool,
    request_done: bool,
) -> bool {
    entry.route.backend_keepalive
        && response.minor_version == 1
        && !response.connection_close()
        && !close_delimited
        && request_done
}
