//! Backend connections and the choice of backend, per worker: an idle pool per backend
//! address, outstanding-request counts for balancing, and the sticky-cookie token. All of it
//! is worker-local (`RefCell`), so no request takes a lock or touches another core's memory.

use crate::metrics::FastMap;
use std::cell::{Cell, RefCell};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flynn_router_table::Backend;
use flynn_uring::Driver;

use crate::io::Stream;

/// Read buffer per backend connection (kept with it in the pool).
const READ_BUF: usize = 32 * 1024;

/// One connection to a backend, with its read buffer.
#[derive(Debug)]
pub struct UpstreamConn {
    pub stream: Stream,
    pub buf: BytesMut,
    pub addr: String,
    /// Came from the idle pool: the backend may have closed it meanwhile.
    pub reused: bool,
}

/// A pooled connection: stream, its read buffer, and since when it has been idle.
type Idle = (Stream, BytesMut, Instant);

/// A backend picks avoid for a while: it refused a connect or gave no response head within
/// the upstream timeout. Each failure in a row doubles the pause, from [`EJECT_BASE`] to at
/// most [`EJECT_MAX`]; an answer clears it.
#[derive(Debug, Clone, Copy)]
struct Ejection {
    failures: u32,
    until: Instant,
}

const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(60);

pub struct Upstreams {
    idle: RefCell<FastMap<String, Vec<Idle>>>,
    outstanding: RefCell<FastMap<String, u32>>,
    /// Passive health, per worker: a wedged host whose instances are still registered (its
    /// kernel accepts, nothing answers) costs each worker one timed-out request, not one in
    /// every few until the registration expires.
    ejected: RefCell<FastMap<String, Ejection>>,
    rng: Cell<u64>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Upstreams {
    pub fn new(
        seed: u64,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Upstreams {
            idle: RefCell::default(),
            outstanding: RefCell::default(),
            ejected: RefCell::default(),
            rng: Cell::new(seed | 1),
            max_idle,
            idle_timeout,
            connect_timeout,
        }
    }

    /// xorshift64*: cheap, worker-local randomness for balancing and request ids.
    pub fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn outstanding_of(&self, addr: &str) -> u32 {
        self.outstanding.borrow().get(addr).copied().unwrap_or(0)
    }

    /// A backend failed (see [`Ejection`]): picks avoid it for a while, and its idle pooled
    /// connections go. Returns whether it was newly ejected.
    pub fn failed(&self, addr: &str) -> bool {
        let now = Instant::now();
        let mut map = self.ejected.borrow_mut();
        let e = map.entry(addr.to_string()).or_insert(Ejection {
            failures: 0,
            until: now,
        });
        let newly = e.until <= now;
        e.failures = e.failures.saturating_add(1);
        let pause = EJECT_BASE.saturating_mul(1 << (e.failures - 1).min(6));
        e.until = now + pause.min(EJECT_MAX);
        drop(map);
        self.idle.borrow_mut().remove(addr);
        newly
    }

    /// A backend answered: it is healthy again.
    pub fn answered(&self, addr: &str) {
        let mut map = self.ejected.borrow_mut();
        if !map.is_empty() {
            map.remove(addr);
        }
    }

    /// Whether picks avoid `addr` right now.
    pub fn is_ejected(&self, addr: &str) -> bool {
        let map = self.ejected.borrow();
        !map.is_empty() && map.get(addr).is_some_and(|e| e.until > Instant::now())
    }

    /// Least outstanding requests of two random choices among the backends not yet tried,
    /// passing over ejected ones unless every one left is ejected (a route whose backends
    /// all failed still gets tried: never fail closed on a guess).
    pub fn pick(&self, backends: &[Backend], tried: &[usize]) -> Option<usize> {
        let mut open: Vec<usize> = (0..backends.len()).filter(|i| !tried.contains(i)).collect();
        let ejected = self.ejected.borrow();
        if !ejected.is_empty() {
            let now = Instant::now();
            let healthy: Vec<usize> = open
                .iter()
                .copied()
                .filter(|&i| {
                    ejected
                        .get(&backends[i].addr)
                        .is_none_or(|e| e.until <= now)
                })
                .collect();
            if !healthy.is_empty() {
                open = healthy;
            }
        }
        drop(ejected);
        match open.len() {
            0 => None,
            1 => Some(open[0]),
            n => {
                let a = open[(self.random() % n as u64) as usize];
                let mut b = open[(self.random() % (n as u64 - 1)) as usize];
                if b == a {
                    b = open[n - 1];
                }
                let (la, lb) = (
                    self.outstanding_of(&backends[a].addr),
                    self.outstanding_of(&backends[b].addr),
                );
                Some(if lb < la { b } else { a })
            }
        }
    }

    /// Counts a request against a backend until the guard drops.
    pub fn begin<'a>(&'a self, addr: &'a str) -> InFlight<'a> {
        let mut map = self.outstanding.borrow_mut();
        match map.get_mut(addr) {
            Some(n) => *n += 1,
            None => {
                map.insert(addr.to_string(), 1);
            }
        }
        InFlight {
            upstreams: self,
            addr,
        }
    }

    /// A pooled connection if one is fresh, else a new one (on `ring`, the worker's
    /// io_uring, when it runs that backend).
    pub async fn connect(
        &self,
        addr: &str,
        pooled: bool,
        ring: Option<&Rc<Driver>>,
    ) -> io::Result<UpstreamConn> {
        if pooled {
            let mut idle = self.idle.borrow_mut();
            if let Some(list) = idle.get_mut(addr) {
                while let Some((stream, buf, since)) = list.pop() {
                    if since.elapsed() < self.idle_timeout {
                        return Ok(UpstreamConn {
                            stream,
                            buf,
                            addr: addr.to_string(),
                            reused: true,
                        });
                    }
                }
            }
        }
        self.connect_new(addr, ring).await
    }

    pub async fn connect_new(
        &self,
        addr: &str,
        ring: Option<&Rc<Driver>>,
    ) -> io::Result<UpstreamConn> {
        let connect = async {
            let sa = match addr.parse::<SocketAddr>() {
                Ok(sa) => sa,
                Err(_) => tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "backend name has no address")
                })?,
            };
            Stream::connect(ring, sa).await
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_user_timeout((self.connect_timeout * 2).max(Duration::from_secs(1)))?;
        Ok(UpstreamConn {
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            addr: addr.to_string(),
            reused: false,
        })
    }

    /// Returns a connection whose last exchange ended cleanly to the pool.
    pub fn release(&self, conn: UpstreamConn) {
        if !conn.buf.is_empty() {
            return; // the backend sent more than its response: do not trust the connection
        }
        let mut idle = self.idle.borrow_mut();
        let list = match idle.get_mut(conn.addr.as_str()) {
            Some(l) => l,
            None => idle.entry(conn.addr.clone()).or_default(),
        };
        if list.len() < self.max_idle {
            list.push((conn.stream, conn.buf, Instant::now()));
        }
    }

    /// Drops idle connections to backends no longer in `live`, and stale ones.
    pub fn sweep(&self, live: &std::collections::HashSet<&str>) {
        self.outstanding.borrow_mut().retain(|_, n| *n > 0);
        let mut idle = self.idle.borrow_mut();
        idle.retain(|addr, list| {
            list.retain(|(_, _, since)| since.elapsed() < self.idle_timeout);
            live.contains(addr.as_str()) && !list.is_empty()
        });
    }
}

pub struct InFlight<'a> {
    upstreams: &'a Upstreams,
    addr: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.upstreams.outstanding.borrow_mut();
        if let Some(n) = map.get_mut(self.addr) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The sticky cookie's value for a backend: a stable digest of its id (every router in the
/// cluster computes the same one), so the cookie names no address.
pub fn sticky_token(backend: &Backend) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "flynn-sticky".hash(&mut h);
    backend.id.hash(&mut h);
    format!("{:016x}", h.finish())
}

pub const STICKY_COOKIE: &str = "_flynn_backend";

/// The backend a request's sticky cookie names, if it is still live.
pub fn sticky_backend(cookie_headers: &[&[u8]], backends: &[Backend]) -> Option<usize> {
    for header in cookie_headers {
        for pair in header.split(|b| *b == b';') {
            let pair = String::from_utf8_lossy(pair);
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == STICKY_COOKIE {
                    return backends.iter().position(|b| sticky_token(b) == v);
                }
            }
        }
    }
    None
}
