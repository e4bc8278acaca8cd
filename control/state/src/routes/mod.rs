//! HTTP and TCP routes, and the certificates HTTPS routes serve.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{
    validate, ApplyResult, Certificate, ClusterState, EventKind, HttpRoute, NewCertificate,
    Response, Route, RouteSpec, StateError, TcpRoute, TCP_PORT_RANGE,
};

pub const ROUTES: Table = Table("route/");
pub const CERTIFICATES: Table = Table("cert/");

/// Ports a TCP route may never take, whatever the router's env says: the router's default
/// HTTP and HTTPS listeners and the host API.
pub const RESERVED_TCP_PORTS: [(u16, &str); 3] = [
    (80, "the router's HTTP listener"),
    (443, "the router's HTTPS listener"),
    (1113, "the host API"),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoutesCommand {
    AddRoute { app: String, route: RouteSpec },
    RemoveRoute { app: String, id: String },
    AddCertificate { certificate: NewCertificate },
    RemoveCertificate { id: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub routes: BTreeMap<String, Route>,
    pub certificates: BTreeMap<String, Certificate>,
}

impl Area for Routes {
    type Command = RoutesCommand;

    fn apply(s: &mut ClusterState, cmd: RoutesCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            RoutesCommand::AddRoute { app, route } => add_route(s, app, route, cx),
            RoutesCommand::RemoveRoute { app, id } => {
                match s.routes.routes.get(&id) {
                    Some(r) if r.app() == app => {}
                    _ => return Err(StateError::NotFound(format!("route {id:?} of app {app:?}"))),
                }
                s.routes.remove_route(&id, cx);
                Ok(Response::Done)
            }
            RoutesCommand::AddCertificate { certificate } => {
                validate::certificate(&certificate)?;
                let id = unique_id(&s.routes.certificates, "cert", cx.revision);
                let cert = Certificate {
                    id: id.clone(),
                    domains: certificate.domains,
                    cert_pem: certificate.cert_pem,
                    key_pem: certificate.key_pem,
                };
                s.routes.certificates.insert(id.clone(), cert.clone());
                cx.touch(CERTIFICATES, &id);
                cx.emit(EventKind::CertificateSet {
                    certificate: cert.clone(),
                });
                Ok(Response::Certificate { certificate: cert })
            }
            RoutesCommand::RemoveCertificate { id } => {
                if let Some(r) =
                    s.routes.routes.values().find(
                        |r| matches!(r, Route::Http(h) if h.certificate.as_deref() == Some(&id)),
                    )
                {
                    return Err(StateError::Conflict(format!(
                        "certificate {id:?} is used by route {:?}",
                        r.id()
                    )));
                }
                if s.routes.certificates.remove(&id).is_none() {
                    return Err(StateError::NotFound(format!("certificate {id:?}")));
                }
                cx.touch(CERTIFICATES, &id);
                cx.emit(EventKind::CertificateRemoved { id });
                Ok(Response::Done)
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(ROUTES, &self.routes), (CERTIFICATES, &self.certificates)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![
            (ROUTES, &mut self.routes),
            (CERTIFICATES, &mut self.certificates),
        ]
    }

    fn data_plane_snapshot(&self, out: &mut Vec<EventKind>) {
        out.extend(
            self.certificates
                .values()
                .map(|c| EventKind::CertificateSet {
                    certificate: c.clone(),
                }),
        );
        out.extend(
            self.routes
                .values()
                .map(|r| EventKind::RouteSet { route: r.clone() }),
        );
    }
}

impl Routes {
    fn remove_route(&mut self, id: &str, cx: &mut Cx) {
        self.routes.remove(id);
        cx.touch(ROUTES, id);
        cx.emit(EventKind::RouteRemoved { id: id.into() });
    }
}

/// Removes every route of an app (the app is being deleted).
pub(crate) fn remove_app_routes(s: &mut ClusterState, app: &str, cx: &mut Cx) {
    let ids: Vec<String> = s
        .routes
        .routes
        .values()
        .filter(|r| r.app() == app)
        .map(|r| r.id().to_string())
        .collect();
    for id in ids {
        s.routes.remove_route(&id, cx);
    }
}

/// Why a TCP route may not take `port`, if it may not: the router listens there itself.
pub fn reserved_port(s: &ClusterState, port: u16) -> Option<String> {
    if let Some((_, what)) = RESERVED_TCP_PORTS.iter().find(|(p, _)| *p == port) {
        return Some(format!("port {port} is reserved for {what}"));
    }
    // The router app's env may move its listeners (Flynn's HTTP_PORT / HTTPS_PORT).
    let env = &s.apps.get("router")?.env;
    ["HTTP_PORT", "HTTPS_PORT"].iter().find_map(|k| {
        (env.get(None, k)?.parse::<u16>().ok()? == port)
            .then(|| format!("port {port} is reserved for the router's {k}"))
    })
}

/// `PREFIX-REV`, or `PREFIX-REV-N` when one command adds several (bootstrap's controller
/// and status routes): ids never collide.
fn unique_id<T>(taken: &std::collections::BTreeMap<String, T>, prefix: &str, rev: u64) -> String {
    let first = format!("{prefix}-{rev}");
    if !taken.contains_key(&first) {
        return first;
    }
    (2..)
        .map(|n| format!("{prefix}-{rev}-{n}"))
        .find(|id| !taken.contains_key(id))
        .expect("an unused id")
}

pub(crate) fn add_route(
    s: &mut ClusterState,
    app: String,
    spec: RouteSpec,
    cx: &mut Cx,
) -> ApplyResult {
    s.app(&app)?;
    let rev = cx.revision;
    let route = match spec {
        RouteSpec::Http {
            domain,
            path,
            service,
            sticky,
            leader,
            disable_keepalive,
            no_drain_backends,
            certificate,
            https_redirect,
            response_timeout_ms,
        } => {
            let domain = validate::domain(&domain)?;
            if let Some(ms) = response_timeout_ms {
                if !(1..=3_600_000).contains(&ms) {
                    return Err(StateError::Invalid(format!(
                        "a route's response timeout must be from 1 ms to an hour, not {ms} ms"
                    )));
                }
            }
            let path = validate::path(path.as_deref().unwrap_or("/"))?;
            let service = service.unwrap_or_else(|| format!("{app}-web"));
            validate::service_name(&service)?;
            if let Some(c) = &certificate {
                if !s.routes.certificates.contains_key(c) {
                    return Err(StateError::NotFound(format!("certificate {c:?}")));
                }
            }
            if let Some(r) = s
                .routes
                .routes
                .values()
                .find(|r| matches!(r, Route::Http(h) if h.domain == domain && h.path == path))
            {
                return Err(StateError::Conflict(format!(
                    "http route {domain}{path} exists already ({})",
                    r.id()
                )));
            }
            Route::Http(HttpRoute {
                id: unique_id(&s.routes.routes, "http", rev),
                app,
                domain,
                path,
                service,
                sticky,
                leader,
                backend_keepalive: !disable_keepalive,
                drain_backends: !no_drain_backends,
                certificate,
                https_redirect,
                response_timeout_ms,
            })
        }
        RouteSpec::Tcp {
            port,
            service,
            leader,
        } => {
            let used = |p: u16| {
                s.routes
                    .routes
                    .values()
                    .any(|r| matches!(r, Route::Tcp(t) if t.port == p))
            };
            let port = match port {
                Some(0) => return Err(StateError::Invalid("port 0 is not a port".into())),
                Some(p) => {
                    if let Some(why) = reserved_port(s, p) {
                        return Err(StateError::Conflict(why));
                    }
                    if used(p) {
                        return Err(StateError::Conflict(format!("tcp port {p} is taken")));
                    }
                    p
                }
                None => TCP_PORT_RANGE
                    .clone()
                    .find(|p| !used(*p) && reserved_port(s, *p).is_none())
                    .ok_or_else(|| {
                        StateError::Conflict("no free port in the tcp route range".into())
                    })?,
            };
            let service = service.unwrap_or_else(|| format!("{app}-web"));
            validate::service_name(&service)?;
            Route::Tcp(TcpRoute {
                id: unique_id(&s.routes.routes, "tcp", rev),
                app,
                port,
                service,
                leader,
            })
        }
    };
    let id = route.id().to_string();
    s.routes.routes.insert(id.clone(), route.clone());
    cx.touch(ROUTES, &id);
    cx.emit(EventKind::RouteSet {
        route: route.clone(),
    });
    Ok(Response::Route { route })
}

#[cfg(test)]
mod tests;
