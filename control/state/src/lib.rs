//! The cluster state machine: apps, env, routes, certificates and services.
//!
//! Pure and deterministic: [`ClusterState::apply`] takes a command and returns the result
//! plus the events it caused; it does no I/O and reads no clock (time arrives inside commands
//! from the proposing host). The Raft crate persists what [`ClusterState::take_dirty`] names.

mod command;
mod model;
pub mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use command::{ApplyResult, Command, NewCertificate, Response, RouteSpec, StateError};
pub use model::*;

/// A persisted table of the state; the storage layer keeps one record per `(Table, key)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Meta,
    App,
    Route,
    Certificate,
    Service,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Meta,
        Table::App,
        Table::Route,
        Table::Certificate,
        Table::Service,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            Table::Meta => "meta/",
            Table::App => "app/",
            Table::Route => "route/",
            Table::Certificate => "cert/",
            Table::Service => "service/",
        }
    }
}

const META_REVISION: &str = "revision";
const META_BOOTSTRAPPED: &str = "bootstrapped";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Bumped by every command that changes something.
    pub revision: u64,
    pub bootstrapped: bool,
    pub apps: BTreeMap<String, App>,
    pub routes: BTreeMap<String, Route>,
    pub certificates: BTreeMap<String, Certificate>,
    pub services: BTreeMap<String, Service>,
    #[serde(skip)]
    dirty: Vec<(Table, String)>,
}

impl ClusterState {
    /// Applies one command. On error nothing is changed.
    pub fn apply(&mut self, cmd: Command) -> (ApplyResult, Vec<Event>) {
        let mut events = Vec::new();
        if let Command::Batch { commands } = cmd {
            if commands.iter().any(|c| matches!(c, Command::Batch { .. })) {
                return (
                    Err(StateError::Invalid("batches do not nest".into())),
                    events,
                );
            }
            let results = commands
                .into_iter()
                .map(|c| {
                    let (r, ev) = self.apply(c);
                    events.extend(ev);
                    r
                })
                .collect();
            return (Ok(Response::Batch { results }), events);
        }
        let next = self.revision + 1;
        let dirty_before = self.dirty.len();
        let result = self.apply_inner(cmd, next, &mut events);
        match &result {
            Ok(_) if self.dirty.len() == dirty_before => {}
            Ok(_) => {
                self.revision = next;
                self.touch(Table::Meta, META_REVISION);
            }
            Err(_) => debug_assert_eq!(
                self.dirty.len(),
                dirty_before,
                "a refused command touched state"
            ),
        }
        (result, events)
    }

    fn apply_inner(&mut self, cmd: Command, rev: u64, ev: &mut Vec<Event>) -> ApplyResult {
        match cmd {
            Command::Bootstrap { auth_key } => self.bootstrap(auth_key, rev),
            Command::CreateApp { name } => {
                validate::app_name(&name)?;
                if self.apps.contains_key(&name) {
                    return Err(StateError::Conflict(format!("app {name:?} already exists")));
                }
                let app = App {
                    name: name.clone(),
                    system: false,
                    created_revision: rev,
                    env: Env::default(),
                };
                self.apps.insert(name.clone(), app.clone());
                self.touch(Table::App, &name);
                Ok(Response::App { app })
            }
            Command::DeleteApp { name } => self.delete_app(&name, rev, ev),
            Command::UpdateEnv {
                app,
                proc_type,
                set,
                unset,
            } => self.update_env(&app, proc_type, set, unset),
            Command::AddRoute { app, route } => self.add_route(app, route, rev, ev),
            Command::RemoveRoute { app, id } => {
                match self.routes.get(&id) {
                    Some(r) if r.app() == app => {}
                    _ => return Err(StateError::NotFound(format!("route {id:?} of app {app:?}"))),
                }
                self.routes.remove(&id);
                self.touch(Table::Route, &id);
                ev.push(Event {
                    revision: rev,
                    kind: EventKind::RouteRemoved { id },
                });
                Ok(Response::Done)
            }
            Command::AddCertificate { certificate } => {
                validate::certificate(&certificate)?;
                let id = format!("cert-{rev}");
                let cert = Certificate {
                    id: id.clone(),
                    domains: certificate.domains,
                    cert_pem: certificate.cert_pem,
                    key_pem: certificate.key_pem,
                };
                self.certificates.insert(id.clone(), cert.clone());
                self.touch(Table::Certificate, &id);
                ev.push(Event {
                    revision: rev,
                    kind: EventKind::CertificateSet {
                        certificate: cert.clone(),
                    },
                });
                Ok(Response::Certificate { certificate: cert })
            }
            Command::RemoveCertificate { id } => {
                if let Some(r) = self
                    .routes
                    .values()
                    .find(|r| matches!(r, Route::Http(h) if h.certificate.as_deref() == Some(&id)))
                {
                    return Err(StateError::Conflict(format!(
                        "certificate {id:?} is used by route {:?}",
                        r.id()
                    )));
                }
                if self.certificates.remove(&id).is_none() {
                    return Err(StateError::NotFound(format!("certificate {id:?}")));
                }
                self.touch(Table::Certificate, &id);
                ev.push(Event {
                    revision: rev,
                    kind: EventKind::CertificateRemoved { id },
                });
                Ok(Response::Done)
            }
            Command::RegisterInstance {
                service,
                id,
                addr,
                meta,
                ttl_ms,
                now_ms,
            } => {
                validate::service_name(&service)?;
                validate::instance(&id, &addr, ttl_ms)?;
                let svc = self
                    .services
                    .entry(service.clone())
                    .or_insert_with(|| Service {
                        name: service.clone(),
                        ..Service::default()
                    });
                let leader_before = svc.leader().map(|i| i.id.clone());
                let registered_revision = svc
                    .instances
                    .get(&id)
                    .filter(|i| i.addr == addr)
                    .map_or(rev, |i| i.registered_revision);
                let instance = Instance {
                    id: id.clone(),
                    addr,
                    meta,
                    registered_revision,
                    ttl_ms,
                    expires_at_ms: now_ms.saturating_add(ttl_ms),
                };
                let changed = svc.instances.get(&id).map(|i| (&i.addr, &i.meta))
                    != Some((&instance.addr, &instance.meta));
                svc.instances.insert(id, instance.clone());
                if changed {
                    ev.push(Event {
                        revision: rev,
                        kind: EventKind::InstanceUp {
                            service: service.clone(),
                            instance: instance.clone(),
                        },
                    });
                }
                self.after_service_change(&service, leader_before, rev, ev);
                Ok(Response::Instance { instance })
            }
            Command::Heartbeat {
                service,
                id,
                now_ms,
            } => {
                let inst = self
                    .services
                    .get_mut(&service)
                    .and_then(|s| s.instances.get_mut(&id))
                    .ok_or_else(|| {
                        StateError::NotFound(format!("instance {id:?} of service {service:?}"))
                    })?;
                inst.expires_at_ms = now_ms.saturating_add(inst.ttl_ms);
                let instance = inst.clone();
                self.touch(Table::Service, &service);
                Ok(Response::Instance { instance })
            }
            Command::Deregister { service, id } => {
                let svc = self.services.get_mut(&service).ok_or_else(|| {
                    StateError::NotFound(format!("instance {id:?} of service {service:?}"))
                })?;
                let leader_before = svc.leader().map(|i| i.id.clone());
                if svc.instances.remove(&id).is_none() {
                    return Err(StateError::NotFound(format!(
                        "instance {id:?} of service {service:?}"
                    )));
                }
                ev.push(Event {
                    revision: rev,
                    kind: EventKind::InstanceDown {
                        service: service.clone(),
                        id,
                    },
                });
                self.after_service_change(&service, leader_before, rev, ev);
                Ok(Response::Done)
            }
            Command::ExpireInstances { now_ms } => {
                let mut count = 0;
                let names: Vec<String> = self.services.keys().cloned().collect();
                for name in names {
                    let svc = self.services.get_mut(&name).expect("listed above");
                    let leader_before = svc.leader().map(|i| i.id.clone());
                    let lapsed: Vec<String> = svc
                        .instances
                        .values()
                        .filter(|i| i.expires_at_ms < now_ms)
                        .map(|i| i.id.clone())
                        .collect();
                    if lapsed.is_empty() {
                        continue;
                    }
                    for id in lapsed {
                        svc.instances.remove(&id);
                        count += 1;
                        ev.push(Event {
                            revision: rev,
                            kind: EventKind::InstanceDown {
                                service: name.clone(),
                                id,
                            },
                        });
                    }
                    self.after_service_change(&name, leader_before, rev, ev);
                }
                Ok(Response::Expired { count })
            }
            Command::SetDiscoverdPeers { peers } => {
                let value = peers.join(",");
                let app = self
                    .apps
                    .get_mut("discoverd")
                    .ok_or_else(|| StateError::NotFound("app \"discoverd\"".into()))?;
                if app.env.global.get("DISCOVERD_PEERS") != Some(&value) {
                    app.env.global.insert("DISCOVERD_PEERS".into(), value);
                    self.touch(Table::App, "discoverd");
                }
                Ok(Response::Done)
            }
            Command::Batch { .. } => unreachable!("batches are unrolled in apply()"),
            Command::Restore { state } => {
                let old: Vec<(Table, String)> = self.all_keys();
                let revision = self.revision.max(state.revision);
                *self = ClusterState {
                    dirty: Vec::new(),
                    ..*state
                };
                self.revision = revision;
                self.dirty = old;
                let new = self.all_keys();
                self.dirty.extend(new);
                Ok(Response::Done)
            }
        }
    }

    fn bootstrap(&mut self, auth_key: String, rev: u64) -> ApplyResult {
        if self.bootstrapped {
            return Err(StateError::Conflict(
                "cluster is already bootstrapped".into(),
            ));
        }
        validate::auth_keys(&auth_key)?;
        for name in SYSTEM_APPS {
            let mut env = Env::default();
            match *name {
                "controller" => {
                    env.global.insert("AUTH_KEY".into(), auth_key.clone());
                }
                "router" => {
                    let range = format!("{}-{}", TCP_PORT_RANGE.start(), TCP_PORT_RANGE.end());
                    env.global.insert("TCP_PORT_RANGE".into(), range);
                }
                _ => {}
            }
            self.apps.insert(
                (*name).to_string(),
                App {
                    name: (*name).to_string(),
                    system: true,
                    created_revision: rev,
                    env,
                },
            );
            self.touch(Table::App, name);
        }
        self.bootstrapped = true;
        self.touch(Table::Meta, META_BOOTSTRAPPED);
        Ok(Response::Done)
    }

    fn delete_app(&mut self, name: &str, rev: u64, ev: &mut Vec<Event>) -> ApplyResult {
        let app = self
            .apps
            .get(name)
            .ok_or_else(|| StateError::NotFound(format!("app {name:?}")))?;
        if app.system {
            return Err(StateError::Invalid(format!(
                "{name:?} is a system app and cannot be deleted"
            )));
        }
        self.apps.remove(name);
        self.touch(Table::App, name);
        let ids: Vec<String> = self
            .routes
            .values()
            .filter(|r| r.app() == name)
            .map(|r| r.id().to_string())
            .collect();
        for id in ids {
            self.routes.remove(&id);
            self.touch(Table::Route, &id);
            ev.push(Event {
                revision: rev,
                kind: EventKind::RouteRemoved { id },
            });
        }
        Ok(Response::Done)
    }

    fn update_env(
        &mut self,
        app: &str,
        proc_type: Option<String>,
        set: BTreeMap<String, String>,
        unset: Vec<String>,
    ) -> ApplyResult {
        if set.is_empty() && unset.is_empty() {
            return Err(StateError::Invalid("nothing to set or unset".into()));
        }
        if let Some(t) = &proc_type {
            validate::proc_type(t)?;
        }
        for (k, v) in &set {
            validate::env_pair(k, v)?;
        }
        for k in &unset {
            validate::env_key(k)?;
        }
        if app == "controller" {
            // A controller key list that would lock every client out is refused.
            let mut env = self.app(app)?.env.clone();
            apply_env(&mut env, proc_type.as_deref(), &set, &unset);
            match env.get(Some("web"), "AUTH_KEY") {
                Some(keys) => validate::auth_keys(keys)?,
                None => {
                    return Err(StateError::Invalid(
                        "the controller must keep an AUTH_KEY".into(),
                    ))
                }
            }
        }
        let entry = self
            .apps
            .get_mut(app)
            .ok_or_else(|| StateError::NotFound(format!("app {app:?}")))?;
        apply_env(&mut entry.env, proc_type.as_deref(), &set, &unset);
        let app = entry.clone();
        self.touch(Table::App, &app.name);
        Ok(Response::App { app })
    }

    fn add_route(
        &mut self,
        app: String,
        route: RouteSpec,
        rev: u64,
        ev: &mut Vec<Event>,
    ) -> ApplyResult {
        let route =
            match route {
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
                } => {
                    self.app(&app)?;
                    let domain = validate::domain(&domain)?;
                    let path = validate::path(path.as_deref().unwrap_or("/"))?;
                    let service = service.unwrap_or_else(|| format!("{app}-web"));
                    validate::service_name(&service)?;
                    if let Some(c) = &certificate {
                        if !self.certificates.contains_key(c) {
                            return Err(StateError::NotFound(format!("certificate {c:?}")));
                        }
                    }
                    if let Some(r) = self.routes.values().find(
                        |r| matches!(r, Route::Http(h) if h.domain == domain && h.path == path),
                    ) {
                        return Err(StateError::Conflict(format!(
                            "http route {domain}{path} exists already ({})",
                            r.id()
                        )));
                    }
                    Route::Http(HttpRoute {
                        id: format!("http-{rev}"),
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
                    })
                }
                RouteSpec::Tcp {
                    port,
                    service,
                    leader,
                } => {
                    self.app(&app)?;
                    let used = |p: u16| {
                        self.routes
                            .values()
                            .any(|r| matches!(r, Route::Tcp(t) if t.port == p))
                    };
                    let port = match port {
                        Some(0) => return Err(StateError::Invalid("port 0 is not a port".into())),
                        Some(p) if used(p) => {
                            return Err(StateError::Conflict(format!("tcp port {p} is taken")))
                        }
                        Some(p) => p,
                        None => TCP_PORT_RANGE.clone().find(|p| !used(*p)).ok_or_else(|| {
                            StateError::Conflict("no free port in the tcp route range".into())
                        })?,
                    };
                    let service = service.unwrap_or_else(|| format!("{app}-web"));
                    validate::service_name(&service)?;
                    Route::Tcp(TcpRoute {
                        id: format!("tcp-{rev}"),
                        app,
                        port,
                        service,
                        leader,
                    })
                }
            };
        let id = route.id().to_string();
        self.routes.insert(id.clone(), route.clone());
        self.touch(Table::Route, &id);
        ev.push(Event {
            revision: rev,
            kind: EventKind::RouteSet {
                route: route.clone(),
            },
        });
        Ok(Response::Route { route })
    }

    /// Records the leader change (if any) and drops a service left with no instances.
    fn after_service_change(
        &mut self,
        service: &str,
        leader_before: Option<String>,
        rev: u64,
        ev: &mut Vec<Event>,
    ) {
        let svc = &self.services[service];
        let leader_now = svc.leader().map(|i| i.id.clone());
        if svc.instances.is_empty() {
            self.services.remove(service);
        }
        self.touch(Table::Service, service);
        if leader_now != leader_before {
            ev.push(Event {
                revision: rev,
                kind: EventKind::ServiceLeader {
                    service: service.to_string(),
                    leader: leader_now,
                },
            });
        }
    }

    pub fn app(&self, name: &str) -> Result<&App, StateError> {
        self.apps
            .get(name)
            .ok_or_else(|| StateError::NotFound(format!("app {name:?}")))
    }

    /// The controller keys accepted by the API: the `web` override of `AUTH_KEY` if set,
    /// else the global one; a comma-separated list.
    pub fn controller_keys(&self) -> Vec<String> {
        self.apps
            .get("controller")
            .and_then(|a| a.env.get(Some("web"), "AUTH_KEY"))
            .map(|keys| {
                keys.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything the data plane needs, as events, for a watcher starting from scratch.
    pub fn data_plane_snapshot(&self) -> Vec<Event> {
        let revision = self.revision;
        let ev = |kind| Event { revision, kind };
        let mut out: Vec<Event> = Vec::new();
        out.extend(self.certificates.values().map(|c| {
            ev(EventKind::CertificateSet {
                certificate: c.clone(),
            })
        }));
        out.extend(
            self.routes
                .values()
                .map(|r| ev(EventKind::RouteSet { route: r.clone() })),
        );
        for svc in self.services.values() {
            out.extend(svc.instances.values().map(|i| {
                ev(EventKind::InstanceUp {
                    service: svc.name.clone(),
                    instance: i.clone(),
                })
            }));
            out.push(ev(EventKind::ServiceLeader {
                service: svc.name.clone(),
                leader: svc.leader().map(|i| i.id.clone()),
            }));
        }
        out
    }

    // ---- persistence: the storage layer writes one record per dirty key ----

    fn touch(&mut self, table: Table, key: &str) {
        self.dirty.push((table, key.to_string()));
    }

    /// Keys changed since the last call, each once.
    pub fn take_dirty(&mut self) -> Vec<(Table, String)> {
        let mut d = std::mem::take(&mut self.dirty);
        d.sort();
        d.dedup();
        d
    }

    /// Drops pending dirty marks (after a full rewrite of the stored state).
    pub fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    fn all_keys(&self) -> Vec<(Table, String)> {
        let mut keys = vec![
            (Table::Meta, META_REVISION.to_string()),
            (Table::Meta, META_BOOTSTRAPPED.to_string()),
        ];
        keys.extend(self.apps.keys().map(|k| (Table::App, k.clone())));
        keys.extend(self.routes.keys().map(|k| (Table::Route, k.clone())));
        keys.extend(
            self.certificates
                .keys()
                .map(|k| (Table::Certificate, k.clone())),
        );
        keys.extend(self.services.keys().map(|k| (Table::Service, k.clone())));
        keys
    }

    /// Every record of the state, for a full rewrite.
    pub fn records(&self) -> Vec<(Table, String, Vec<u8>)> {
        self.all_keys()
            .into_iter()
            .filter_map(|(t, k)| self.record(t, &k).map(|v| (t, k, v)))
            .collect()
    }

    /// The stored form of one record, `None` if it no longer exists.
    pub fn record(&self, table: Table, key: &str) -> Option<Vec<u8>> {
        let enc = |v: &dyn erased::Ser| v.to_json();
        match table {
            Table::Meta => match key {
                META_REVISION => Some(enc(&self.revision)),
                META_BOOTSTRAPPED => Some(enc(&self.bootstrapped)),
                _ => None,
            },
            Table::App => self.apps.get(key).map(|v| enc(v)),
            Table::Route => self.routes.get(key).map(|v| enc(v)),
            Table::Certificate => self.certificates.get(key).map(|v| enc(v)),
            Table::Service => self.services.get(key).map(|v| enc(v)),
        }
    }

    /// Loads one stored record (the inverse of [`ClusterState::record`]).
    pub fn load_record(&mut self, table: Table, key: &str, bytes: &[u8]) -> Result<(), String> {
        fn de<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        }
        match table {
            Table::Meta => match key {
                META_REVISION => self.revision = de(bytes)?,
                META_BOOTSTRAPPED => self.bootstrapped = de(bytes)?,
                other => return Err(format!("unknown meta record {other:?}")),
            },
            Table::App => {
                self.apps.insert(key.to_string(), de(bytes)?);
            }
            Table::Route => {
                self.routes.insert(key.to_string(), de(bytes)?);
            }
            Table::Certificate => {
                self.certificates.insert(key.to_string(), de(bytes)?);
            }
            Table::Service => {
                self.services.insert(key.to_string(), de(bytes)?);
            }
        }
        Ok(())
    }
}

fn apply_env(
    env: &mut Env,
    proc_type: Option<&str>,
    set: &BTreeMap<String, String>,
    unset: &[String],
) {
    let vars = match proc_type {
        Some(t) => env.types.entry(t.to_string()).or_default(),
        None => &mut env.global,
    };
    vars.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    for k in unset {
        vars.remove(k);
    }
    if let Some(t) = proc_type {
        if env.types.get(t).is_some_and(BTreeMap::is_empty) {
            env.types.remove(t);
        }
    }
}

mod erased {
    /// Object-safe JSON encoding, so `record` can treat every table alike.
    pub trait Ser {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("state records always serialize")
        }
    }
}

#[cfg(test)]
mod tests;
