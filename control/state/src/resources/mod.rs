//! Resources: databases provisioned for apps (`flynn resource add postgres`), as Flynn's
//! controller kept them.
//!
//! A resource is one provider's database (Postgres and MariaDB: a database and user of
//! their own on the provider's server; Redis: an instance of its own) and the env that
//! reaches it. Provisioning and the app's new env are **one command**: the resource record,
//! the app's env and the release that env deploys are written together or not at all, so no
//! failure leaves a resource without its env or an env without its resource (Flynn did
//! these in two steps). Removing one unsets its env in the same way. An app that has
//! resources is not deleted: its databases would be orphaned.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{ApplyResult, ClusterState, Response, StateError};
pub use flynn_model::{DbMember, DbShape, Resource, ServiceAddr};

mod shape;
pub use shape::ShapeCommand;

pub const TABLE: Table = Table("resource/");
pub const SHAPES: Table = Table("dbshape/");

/// The providers the cluster offers: Flynn's names, and the system app serving each.
pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "postgres",
        app: "postgres",
        service: "postgres-postgres",
        addr: Some(([100, 100, 0, 2], 5432)),
        env_keys: &[
            "DATABASE_URL",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGPASSWORD",
            "PGDATABASE",
        ],
    },
    Provider {
        name: "mysql",
        app: "mariadb",
        service: "mariadb-mariadb",
        addr: Some(([100, 100, 0, 3], 3306)),
        env_keys: &[
            "DATABASE_URL",
            "MYSQL_HOST",
            "MYSQL_PORT",
            "MYSQL_USER",
            "MYSQL_PWD",
            "MYSQL_DATABASE",
        ],
    },
    Provider {
        name: "redis",
        app: "redis",
        service: "",
        addr: None,
        env_keys: &["REDIS_URL"],
    },
];

/// One kind of database the cluster provisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provider {
    /// What `flynn resource add` names (`postgres`, `mysql`, `redis`).
    pub name: &'static str,
    /// The system app whose jobs serve it (Redis: each resource has an app of its own,
    /// `redis-ID`).
    pub app: &'static str,
    /// The discovery service of its server; its leader is the primary.
    pub service: &'static str,
    /// The stable address jobs reach the primary at (Redis: one per resource).
    pub addr: Option<([u8; 4], u16)>,
    /// The env a resource of it sets on its app, exactly these keys.
    pub env_keys: &'static [&'static str],
}

/// The provider named `name` (Flynn's names; `mariadb` is taken for `mysql`).
pub fn provider(name: &str) -> Result<&'static Provider, StateError> {
    let name = if name == "mariadb" { "mysql" } else { name };
    PROVIDERS.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = PROVIDERS.iter().map(|p| p.name).collect();
        StateError::NotFound(format!(
            "provider {name:?} (the cluster provides {})",
            known.join(", ")
        ))
    })
}

/// Every service address and the service behind it: the providers' shared servers, then
/// each resource's own.
pub fn service_addrs(s: &ClusterState) -> Vec<ServiceAddr> {
    let shared = PROVIDERS.iter().filter_map(|p| {
        let (ip, port) = p.addr?;
        Some(ServiceAddr {
            service: p.service.to_string(),
            ip: Ipv4Addr::from(ip),
            port,
        })
    });
    shared
        .chain(
            s.resources
                .resources
                .values()
                .filter_map(|r| r.server.clone()),
        )
        .collect()
}

/// Where a service address points: the primary's job when the service's app has a
/// replicated shape (the shape is the authority, changed with the generation), else the
/// service's discovery leader.
pub fn service_target(s: &ClusterState, service: &str) -> Option<String> {
    let app = service.rsplit_once('-').map_or(service, |(app, _)| app);
    if let Some(shape) = s.resources.shapes.get(app).filter(|sh| sh.primary != 0) {
        return s
            .jobs
            .jobs
            .values()
            .find(|j| {
                j.app == app
                    && j.host == shape.primary
                    && !j.oneoff
                    && j.state == crate::JobState::Running
            })
            .and_then(|j| j.addr.clone());
    }
    Some(s.discovery.services.get(service)?.leader()?.addr.clone())
}

/// Whether `app` is a database server (a provider's app, or a resource's own), whose
/// volumes hold data no collection or plain `volume delete` may remove.
pub fn serves_databases(s: &ClusterState, app: &str) -> bool {
    PROVIDERS.iter().any(|p| p.app == app)
        || s.resources
            .resources
            .values()
            .any(|r| r.server.is_some() && r.name == app)
}

/// The first service address no provider or resource holds (for a new resource's server).
pub fn free_service_ip(s: &ClusterState) -> Option<Ipv4Addr> {
    let taken: Vec<Ipv4Addr> = service_addrs(s).iter().map(|a| a.ip).collect();
    (10..=254u8)
        .map(|n| Ipv4Addr::new(100, 100, 0, n))
        .find(|ip| !taken.contains(ip))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ResourcesCommand {
    /// Records a database the provider has made, sets its env on the app and deploys that
    /// env as a new release, all in this one command. Refused (nothing changed) for an
    /// unknown provider or app, a taken id, env keys other than the provider's, or an app
    /// that already has a resource of this provider (its env would be overwritten).
    Provision { resource: Resource, now_ms: u64 },
    /// Forgets a resource and unsets its env on its app (a new release, deployed), in one
    /// command. The provider's database is dropped after this commits.
    Remove { id: String, now_ms: u64 },
    /// Changes or reports on a replicated database's shape (`shape.rs`).
    Shape(ShapeCommand),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Resource id → the resource.
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    /// Server app → its replicated shape.
    #[serde(default)]
    pub shapes: BTreeMap<String, DbShape>,
}

impl Resources {
    /// The resources of `app`, oldest first.
    pub fn of_app(&self, app: &str) -> Vec<&Resource> {
        let mut v: Vec<&Resource> = self.resources.values().filter(|r| r.app == app).collect();
        v.sort_by_key(|r| (r.created_ms, r.id.clone()));
        v
    }
}

fn check_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StateError::Invalid(format!(
            "resource id {id:?}: 1 to 64 lowercase letters, digits and -"
        )))
    }
}

impl Area for Resources {
    type Command = ResourcesCommand;

    fn apply(s: &mut ClusterState, cmd: ResourcesCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            ResourcesCommand::Provision {
                mut resource,
                now_ms,
            } => {
                let p = provider(&resource.provider)?;
                resource.provider = p.name.to_string();
                check_id(&resource.id)?;
                if s.resources.resources.contains_key(&resource.id) {
                    return Err(StateError::Conflict(format!(
                        "resource {} exists",
                        resource.id
                    )));
                }
                if s.app(&resource.app)?.system {
                    return Err(StateError::Invalid(format!(
                        "{} is a system app; resources are for apps",
                        resource.app
                    )));
                }
                if let Some(r) = s
                    .resources
                    .of_app(&resource.app)
                    .into_iter()
                    .find(|r| r.provider == p.name)
                {
                    return Err(StateError::Conflict(format!(
                        "{} already has a {} resource ({}): remove it first (flynn resource remove {})",
                        resource.app, p.name, r.id, r.id
                    )));
                }
                let keys: Vec<&str> = resource.env.keys().map(String::as_str).collect();
                if keys.len() != p.env_keys.len() || keys.iter().any(|k| !p.env_keys.contains(k)) {
                    return Err(StateError::Invalid(format!(
                        "a {} resource sets exactly {}",
                        p.name,
                        p.env_keys.join(", ")
                    )));
                }
                if let Some(server) = &resource.server {
                    let octets = server.ip.octets();
                    if octets[..3] != [100, 100, 0] || octets[3] < 10 || octets[3] == 255 {
                        return Err(StateError::Invalid(format!(
                            "a resource's server address is 100.100.0.10 to 100.100.0.254, not {}",
                            server.ip
                        )));
                    }
                    if service_addrs(s).iter().any(|a| a.ip == server.ip) {
                        return Err(StateError::Conflict(format!(
                            "service address {} is taken",
                            server.ip
                        )));
                    }
                }
                resource.created_ms = now_ms;
                // The env first: it checks everything before it changes anything, so a
                // refusal here leaves no record behind either.
                crate::apps::update_env(
                    s,
                    &resource.app,
                    None,
                    resource.env.clone(),
                    Vec::new(),
                    now_ms,
                    cx,
                )?;
                s.resources
                    .resources
                    .insert(resource.id.clone(), resource.clone());
                cx.touch(TABLE, &resource.id);
                Ok(Response::Resource { resource })
            }
            ResourcesCommand::Remove { id, now_ms } => {
                let resource = s
                    .resources
                    .resources
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| StateError::NotFound(format!("resource {id:?}")))?;
                // Only the variables still holding what this resource set: a value the
                // user changed since is theirs.
                let env = s.app(&resource.app)?.env.global.clone();
                let unset: Vec<String> = resource
                    .env
                    .iter()
                    .filter(|(k, v)| env.get(*k) == Some(*v))
                    .map(|(k, _)| k.clone())
                    .collect();
                if !unset.is_empty() {
                    crate::apps::update_env(
                        s,
                        &resource.app,
                        None,
                        BTreeMap::new(),
                        unset,
                        now_ms,
                        cx,
                    )?;
                }
                s.resources.resources.remove(&id);
                cx.touch(TABLE, &id);
                Ok(Response::Resource { resource })
            }
            ResourcesCommand::Shape(cmd) => shape::apply(s, cmd, cx),
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.resources), (SHAPES, &self.shapes)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.resources), (SHAPES, &mut self.shapes)]
    }
}

#[cfg(test)]
mod tests;
