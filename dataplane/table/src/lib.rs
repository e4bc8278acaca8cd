//! The router's route table: an immutable snapshot that workers read without locks, rebuilt
//! and swapped whole when the control plane's state moves.
//!
//! [`TableBuilder`] folds the watch stream's events (routes, certificates, service instances
//! and leaders) into the cluster's current data-plane state; [`TableBuilder::build`] turns it
//! into a [`RouteTable`]. [`follow`] keeps an [`arc_swap::ArcSwap`] current from a host's
//! watch stream, reconnecting and resuming from the last complete revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flynn_client::{ControllerClient, WatchLine};
use flynn_model::{Certificate, EventKind, HttpRoute, Instance, Route, TcpRoute};

/// A backend a route sends to: one live instance of its service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub addr: String,
}

#[derive(Debug, Clone)]
pub struct HttpEntry {
    pub route: HttpRoute,
    /// Live instances, or only the service leader for leader routes. Empty: answer 503.
    pub backends: Arc<[Backend]>,
}

#[derive(Debug, Clone)]
pub struct TcpEntry {
    pub route: TcpRoute,
    pub backends: Arc<[Backend]>,
}

/// One immutable snapshot of everything the router routes by.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The revision this snapshot reflects (0: nothing received yet).
    pub revision: u64,
    /// Exact domain → routes, longest path prefix first.
    exact: HashMap<String, Vec<HttpEntry>>,
    /// Wildcard suffix (`example.com` for `*.example.com`) → routes, longest prefix first.
    wildcard: HashMap<String, Vec<HttpEntry>>,
    tcp: HashMap<u16, TcpEntry>,
    certificates: HashMap<String, Arc<Certificate>>,
}

impl RouteTable {
    /// The route for a request: exact host, then the most specific wildcard, then the longest
    /// matching path prefix within it. `host` may carry a port and any case.
    pub fn http(&self, host: &str, path: &str) -> Option<&HttpEntry> {
        let host = normalize_host(host);
        if let Some(e) = self.exact.get(host.as_str()).and_then(|v| by_path(v, path)) {
            return Some(e);
        }
        let mut rest = host.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(e) = self.wildcard.get(parent).and_then(|v| by_path(v, path)) {
                return Some(e);
            }
            rest = parent;
        }
        None
    }

    pub fn tcp(&self, port: u16) -> Option<&TcpEntry> {
        self.tcp.get(&port)
    }

    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.tcp.keys().copied()
    }

    /// Every backend address any route sends to.
    pub fn backend_addrs(&self) -> std::collections::HashSet<&str> {
        let http = self
            .exact
            .values()
            .chain(self.wildcard.values())
            .flatten()
            .map(|e| &e.backends);
        http.chain(self.tcp.values().map(|e| &e.backends))
            .flat_map(|b| b.iter().map(|b| b.addr.as_str()))
            .collect()
    }

    /// The certificate for a TLS server name: exact, then wildcard.
    pub fn certificate(&self, server_name: &str) -> Option<&Arc<Certificate>> {
        let name = normalize_host(server_name);
        if let Some(c) = self.certificates.get(&name) {
            return Some(c);
        }
        let (_, parent) = name.split_once('.')?;
        self.certificates.get(&format!("*.{parent}"))
    }
}

fn normalize_host(host: &str) -> String {
    let host = match host.rsplit_once(':') {
        // Strip a port, but not the colons of a bracketless IPv6 literal.
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The longest prefix that matches on a path-segment boundary (`/api` matches `/api`,
/// `/api/x` and `/api?q`, not `/apis`).
fn by_path<'a>(routes: &'a [HttpEntry], path: &str) -> Option<&'a HttpEntry> {
    routes.iter().find(|e| {
        let prefix = e.route.path.as_str();
        match path.strip_prefix(prefix) {
            Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
            None => false,
        }
    })
}

/// The cluster's data-plane state as the watch stream describes it.
#[derive(Debug, Default, Clone)]
pub struct TableBuilder {
    revision: u64,
    routes: BTreeMap<String, Route>,
    certificates: BTreeMap<String, Certificate>,
    instances: BTreeMap<String, BTreeMap<String, Instance>>,
    leaders: BTreeMap<String, Option<String>>,
}

impl TableBuilder {
    /// Folds one watch line in. Returns true when the state is complete up to a revision
    /// (a `synced` mark), i.e. when a snapshot should be published.
    pub fn apply(&mut self, line: WatchLine) -> bool {
        match line {
            WatchLine::Reset { revision } => {
                *self = TableBuilder {
                    revision,
                    ..TableBuilder::default()
                };
                false
            }
            WatchLine::Event(e) => {
                self.apply_event(e.kind);
                false
            }
            WatchLine::Synced { revision } => {
                self.revision = self.revision.max(revision);
                true
            }
            WatchLine::Heartbeat { .. } => false,
        }
    }

    fn apply_event(&mut self, kind: EventKind) {
        match kind {
            EventKind::RouteSet { route } => {
                self.routes.insert(route.id().to_string(), route);
            }
            EventKind::RouteRemoved { id } => {
                self.routes.remove(&id);
            }
            EventKind::CertificateSet { certificate } => {
                self.certificates
                    .insert(certificate.id.clone(), certificate);
            }
            EventKind::CertificateRemoved { id } => {
                self.certificates.remove(&id);
            }
            EventKind::InstanceUp { service, instance } => {
                self.instances
                    .entry(service)
                    .or_default()
                    .insert(instance.id.clone(), instance);
            }
            EventKind::InstanceDown { service, id } => {
                if let Some(s) = self.instances.get_mut(&service) {
                    s.remove(&id);
                }
            }
            EventKind::ServiceLeader { service, leader } => {
                self.leaders.insert(service, leader);
            }
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn backends(&self, service: &str, leader_only: bool) -> Arc<[Backend]> {
        let Some(instances) = self.instances.get(service) else {
            return Arc::from(Vec::new());
        };
        let leader = self.leaders.get(service).cloned().flatten();
        instances
            .values()
            .filter(|i| !leader_only || Some(&i.id) == leader.as_ref())
            .map(|i| Backend {
                id: i.id.clone(),
                addr: i.addr.clone(),
            })
            .collect::<Vec<_>>()
            .into()
    }

    pub fn build(&self) -> RouteTable {
        let mut t = RouteTable {
            revision: self.revision,
            ..RouteTable::default()
        };
        for route in self.routes.values() {
            match route {
                Route::Http(h) => {
                    let entry = HttpEntry {
                        backends: self.backends(&h.service, h.leader),
                        route: h.clone(),
                    };
                    let bucket = match h.domain.strip_prefix("*.") {
                        Some(suffix) => t.wildcard.entry(suffix.to_string()).or_default(),
                        None => t.exact.entry(h.domain.clone()).or_default(),
                    };
                    bucket.push(entry);
                }
                Route::Tcp(r) => {
                    t.tcp.insert(
                        r.port,
                        TcpEntry {
                            backends: self.backends(&r.service, r.leader),
                            route: r.clone(),
                        },
                    );
                }
            }
        }
        for routes in t.exact.values_mut().chain(t.wildcard.values_mut()) {
            routes.sort_by_key(|e| std::cmp::Reverse(e.route.path.len()));
        }
        for cert in self.certificates.values() {
            let cert = Arc::new(cert.clone());
            for d in &cert.domains {
                t.certificates.insert(d.to_ascii_lowercase(), cert.clone());
            }
        }
        t
    }
}

/// Follows a watch stream, one connection at a time, for every route-table follower (a
/// remote host's stream in [`follow`], the daemon's own host's lines in process): lines
/// apply to a copy of the table's builder, and each complete batch keeps the copy and
/// gives the table to publish. A connection that breaks mid-batch leaves the builder at
/// the last complete revision, where the next connection resumes.
#[derive(Default)]
pub struct Follower {
    builder: TableBuilder,
    pending: TableBuilder,
}

impl Follower {
    /// The revision the next connection resumes after.
    pub fn revision(&self) -> u64 {
        self.builder.revision()
    }

    /// Starts over from the last complete batch (a new connection).
    pub fn reconnect(&mut self) {
        self.pending = self.builder.clone();
    }

    /// Applies one line; the table to publish when it completed a batch.
    pub fn line(&mut self, line: WatchLine) -> Option<RouteTable> {
        if !self.pending.apply(line) {
            return None;
        }
        self.builder = self.pending.clone();
        Some(self.builder.build())
    }
}

/// Keeps `table` equal to the cluster's data-plane state as `client`'s host sees it,
/// forever: on a broken stream it waits and resumes from the last complete revision.
pub async fn follow(client: ControllerClient, table: Arc<ArcSwap<RouteTable>>) {
    let mut follower = Follower::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        follower.reconnect();
        let before = follower.revision();
        let result = client
            .watch_from(follower.revision(), true, |line| {
                if let Some(t) = follower.line(line) {
                    table.store(Arc::new(t));
                }
                true
            })
            .await;
        match result {
            Ok(()) => tracing::warn!("watch stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "watch stream failed; reconnecting"),
        }
        if follower.revision() > before {
            backoff = Duration::from_millis(100); // that connection made progress
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests;
