//! What an operator sets: listeners, workers, limits, timeouts and the options Flynn's
//! router had (PROXY protocol, a custom 503 page, extra listener ports).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flynn_http1::Limits;

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Plain-HTTP listeners (Flynn: :80, plus any extra ports).
    pub http: Vec<SocketAddr>,
    /// HTTPS listeners (Flynn: :443, plus any extra ports).
    pub https: Vec<SocketAddr>,
    /// Address TCP routes listen on (their port comes from the route).
    pub tcp_ip: std::net::IpAddr,
    /// Prometheus `/metrics` listener, served off the worker threads.
    pub metrics: Option<SocketAddr>,
    /// Worker threads, one per core by default; each is pinned to a core.
    pub workers: usize,
    pub pin_workers: bool,
    /// Expect a PROXY protocol v1 line first on HTTP and HTTPS connections.
    pub proxy_protocol: bool,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners.
    pub h2c: bool,
    /// Default certificate and key (PEM files) for names no route certificate covers.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Body served with every 503 (no live backend); a built-in page otherwise.
    pub error_503_page: Option<PathBuf>,
    /// One log line per request (target `flynn_router::access`).
    pub access_log: bool,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Client connections across all workers; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams one client connection may have open.
    pub h2_max_streams: u32,
    /// Idle keep-alive connections kept per backend per worker.
    pub max_idle_per_backend: usize,
    /// The sockets' I/O backend: io_uring, epoll, or io_uring where it works (`auto`).
    pub io: crate::io::IoMode,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a request's first byte to the end of its head: beyond it, 408.
    pub header: Duration,
    /// Between requests on a keep-alive client connection.
    pub idle: Duration,
    /// Longest wait for the next piece of a request body: beyond it, 408.
    pub body: Duration,
    /// Backend connect: beyond it the backend counts as gone (passed over for a while) and
    /// the request goes to another. Short, because a connect that fails sent nothing: on a
    /// cluster network a live backend answers a SYN in well under a millisecond, and a
    /// vanished host (a blackhole, not a refusal) would otherwise hold every request that
    /// picks it for this long. Backend sockets also give up on data unacknowledged for
    /// twice this (at least a second), so a pooled connection to a vanished host fails as
    /// fast.
    pub connect: Duration,
    /// Backend's response head, and each later read of its body: beyond it, 504.
    pub upstream: Duration,
    /// After SIGTERM: in-flight work may finish until then.
    pub drain: Duration,
    /// A pooled backend connection idle longer than this is not reused.
    pub pool_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            body: Duration::from_secs(30),
            connect: Duration::from_millis(500),
            upstream: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            pool_idle: Duration::from_secs(30),
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            http: vec![SocketAddr::from(([0, 0, 0, 0], 80))],
            https: vec![],
            tcp_ip: [0, 0, 0, 0].into(),
            metrics: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_workers: true,
            proxy_protocol: false,
            h2c: false,
            tls_cert: None,
            tls_key: None,
            error_503_page: None,
            access_log: false,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            max_connections: 100_000,
            h2_max_streams: 128,
            max_idle_per_backend: 1024,
            io: crate::io::IoMode::Auto,
        }
    }
}

/// A backend connect timeout in milliseconds, checked: from 1 ms to a minute.
pub fn connect_timeout(ms: u64) -> Result<Duration, String> {
    if !(1..=60_000).contains(&ms) {
        return Err(format!(
            "the backend connect timeout must be from 1 to 60000 ms, not {ms}"
        ));
    }
    Ok(Duration::from_millis(ms))
}
