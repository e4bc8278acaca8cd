//! The standalone route source: a TOML file (`flynn-host router --routes FILE`), reloaded on
//! SIGHUP. It is folded through the same [`TableBuilder`] as the control plane's stream, so
//! both sources route identically.
//!
//! ```toml
//! [[http]]
//! domain = "app.example.com"     # or "*.example.com"
//! path = "/api"                  # optional, default "/"
//! backends = ["127.0.0.1:8080"]
//! sticky = false                 # optional route options, Flynn's defaults
//! backend_keepalive = true
//! https_redirect = false
//! certificate = "main"
//!
//! [[tcp]]
//! port = 3000
//! backends = ["127.0.0.1:5432"]
//!
//! [[certificate]]
//! id = "main"
//! domains = ["app.example.com", "*.example.com"]
//! cert_file = "/etc/flynn/app.crt"   # PEM chain
//! key_file = "/etc/flynn/app.key"    # PEM key
//! ```

use std::path::{Path, PathBuf};

use flynn_client::WatchLine;
use flynn_model::{Certificate, Event, EventKind, HttpRoute, Instance, Route, TcpRoute};
use flynn_router_table::{RouteTable, TableBuilder};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    http: Vec<HttpEntry>,
    #[serde(default)]
    tcp: Vec<TcpEntry>,
    #[serde(default)]
    certificate: Vec<CertEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpEntry {
    domain: String,
    #[serde(default)]
    path: Option<String>,
    backends: Vec<String>,
    #[serde(default)]
    sticky: bool,
    #[serde(default = "yes")]
    backend_keepalive: bool,
    #[serde(default = "yes")]
    drain_backends: bool,
    #[serde(default)]
    https_redirect: bool,
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    response_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpEntry {
    port: u16,
    backends: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertEntry {
    id: String,
    domains: Vec<String>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn yes() -> bool {
    true
}

/// Reads and validates a routes file; any error leaves the caller's current table in place.
pub fn load(path: &Path) -> Result<RouteTable, RoutesFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| RoutesFileError::Read(path.into(), e))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| RoutesFileError::Parse(path.into(), e))
}

/// Parses a routes file's text; relative certificate paths are taken from `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<RouteTable, String> {
    let file: RoutesFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut events = Vec::new();
    let instance = |service: &str, addr: &str, n: usize| -> Result<EventKind, String> {
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            return Err(format!("backend {addr:?} is not HOST:PORT"));
        }
        Ok(EventKind::InstanceUp {
            service: service.to_string(),
            instance: Instance {
                id: format!("{service}-{n}"),
                addr: addr.to_string(),
                meta: Default::default(),
                registered_revision: n as u64,
                ttl_ms: 0,
                expires_at_ms: u64::MAX,
            },
        })
    };
    let mut seen_http = std::collections::HashSet::new();
    for (i, h) in file.http.iter().enumerate() {
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            return Err(format!("http route {}: path must start with /", h.domain));
        }
        if h.domain.is_empty() || h.domain.contains(['/', ' ']) {
            return Err(format!("http route {:?}: bad domain", h.domain));
        }
        if !seen_http.insert((h.domain.to_ascii_lowercase(), path.clone())) {
            return Err(format!("http route {}{path} appears twice", h.domain));
        }
        let service = format!("http-{i}");
        for (n, b) in h.backends.iter().enumerate() {
            events.push(instance(&service, b, n)?);
        }
        events.push(EventKind::RouteSet {
            route: Route::Http(HttpRoute {
                id: service.clone(),
                app: "routes-file".into(),
                domain: h.domain.to_ascii_lowercase(),
                path,
                service,
                sticky: h.sticky,
                leader: false,
                backend_keepalive: h.backend_keepalive,
                drain_backends: h.drain_backends,
                certificate: h.certificate.clone(),
                https_redirect: h.https_redirect,
                response_timeout_ms: h.response_timeout_ms,
            }),
        });
    }
    let mut ports = std::collections::HashSet::new();
    for (i, t) in file.tcp.iter().enumerate() {
        if !ports.insert(t.port) || t.port == 0 {
            return Err(format!("tcp port {} repeated or zero", t.port));
        }
        let service = format!("tcp-{i}");
        for (n, b) in t.backends.iter().enumerate() {
            events.push(instance(&service, b, n)?);
        }
        events.push(EventKind::RouteSet {
            route: Route::Tcp(TcpRoute {
                id: service.clone(),
                app: "routes-file".into(),
                port: t.port,
                service,
                leader: false,
            }),
        });
    }
    for c in &file.certificate {
        let read = |p: &Path| {
            let p = dir.join(p);
            std::fs::read_to_string(&p)
                .map_err(|e| format!("certificate {}: {}: {e}", c.id, p.display()))
        };
        let certificate = Certificate {
            id: c.id.clone(),
            domains: c.domains.clone(),
            cert_pem: read(&c.cert_file)?,
            key_pem: read(&c.key_file)?,
        };
        crate::tls::certified_key(&certificate)
            .map_err(|e| format!("certificate {}: {e}", c.id))?;
        events.push(EventKind::CertificateSet { certificate });
    }
    let mut builder = TableBuilder::default();
    for (n, kind) in events.into_iter().enumerate() {
        builder.apply(WatchLine::Event(Event {
            revision: n as u64 + 1,
            kind,
        }));
    }
    builder.apply(WatchLine::Synced {
        revision: builder.revision() + 1,
    });
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::path::Path;

    #[test]
    fn t10_routes_file_builds_the_table() {
        let t = parse(
            "[[http]]\ndomain = \"App.Example.com\"\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nsticky = true\n\n\
             [[http]]\ndomain = \"*.example.com\"\npath = \"/api\"\nbackends = []\nhttps_redirect = true\n\n\
             [[tcp]]\nport = 3000\nbackends = [\"127.0.0.1:5432\"]\n",
            Path::new("."),
        )
        .unwrap();
        let e = t.http("app.example.com", "/x").unwrap();
        assert!(e.route.sticky && e.route.backend_keepalive);
        assert_eq!(e.backends.len(), 2);
        let w = t.http("x.example.com", "/api/v").unwrap();
        assert!(w.route.https_redirect && w.backends.is_empty());
        assert!(t.http("x.example.com", "/other").is_none());
        assert_eq!(t.tcp(3000).unwrap().backends[0].addr, "127.0.0.1:5432");
    }

    #[test]
    fn t11_bad_files_are_refused_with_a_reason() {
        for (text, want) in [
            ("[[http]]\ndomain = \"a\"\nbackends = [\"nope\"]\n", "not HOST:PORT"),
            ("[[http]]\ndomain = \"a\"\npath = \"x\"\nbackends = []\n", "must start with /"),
            ("[[http]]\ndomain = \"a\"\nbackends = []\n[[http]]\ndomain = \"A\"\nbackends = []\n", "twice"),
            ("[[tcp]]\nport = 1\nbackends = []\n[[tcp]]\nport = 1\nbackends = []\n", "repeated"),
            ("[[http]]\ndomain = \"a\"\nbackend = []\n", "unknown field"),
            ("[[certificate]]\nid = \"c\"\ndomains = [\"a\"]\ncert_file = \"/no/such\"\nkey_file = \"/no/such\"\n", "/no/such"),
            ("[[http]\n", "invalid"),
        ] {
            let err = parse(text, Path::new(".")).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
