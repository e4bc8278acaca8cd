//! Service discovery: instances register with a TTL, heartbeat, deregister or lapse. The
//! leader of a service is its longest-registered live instance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{
    validate, ApplyResult, ClusterState, EventKind, Instance, Response, Service, StateError,
};

pub const TABLE: Table = Table("service/");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DiscoveryCommand {
    RegisterInstance {
        service: String,
        id: String,
        addr: String,
        #[serde(default)]
        meta: BTreeMap<String, String>,
        ttl_ms: u64,
        now_ms: u64,
    },
    Heartbeat {
        service: String,
        id: String,
        now_ms: u64,
    },
    Deregister {
        service: String,
        id: String,
    },
    /// Proposed by the leader on a timer: drops instances whose TTL lapsed before `now_ms`.
    ExpireInstances {
        now_ms: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    pub services: BTreeMap<String, Service>,
}

impl Discovery {
    /// Whether some instance's TTL lapsed before `now_ms` (the leader then expires it).
    pub fn any_lapsed(&self, now_ms: u64) -> bool {
        self.services
            .values()
            .any(|svc| svc.instances.values().any(|i| i.expires_at_ms < now_ms))
    }
}

impl Area for Discovery {
    type Command = DiscoveryCommand;

    fn apply(s: &mut ClusterState, cmd: DiscoveryCommand, cx: &mut Cx) -> ApplyResult {
        let d = &mut s.discovery;
        match cmd {
            DiscoveryCommand::RegisterInstance {
                service,
                id,
                addr,
                meta,
                ttl_ms,
                now_ms,
            } => {
                validate::service_name(&service)?;
                validate::instance(&id, &addr, ttl_ms)?;
                let svc = d
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
                    .map_or(cx.revision, |i| i.registered_revision);
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
                    cx.emit(EventKind::InstanceUp {
                        service: service.clone(),
                        instance: instance.clone(),
                    });
                }
                d.after_change(&service, leader_before, cx);
                Ok(Response::Instance { instance })
            }
            DiscoveryCommand::Heartbeat {
                service,
                id,
                now_ms,
            } => {
                let inst = d
                    .services
                    .get_mut(&service)
                    .and_then(|s| s.instances.get_mut(&id))
                    .ok_or_else(|| {
                        StateError::NotFound(format!("instance {id:?} of service {service:?}"))
                    })?;
                inst.expires_at_ms = now_ms.saturating_add(inst.ttl_ms);
                let instance = inst.clone();
                cx.touch(TABLE, &service);
                Ok(Response::Instance { instance })
            }
            DiscoveryCommand::Deregister { service, id } => {
                let known = d
                    .services
                    .get(&service)
                    .is_some_and(|svc| svc.instances.contains_key(&id));
                if !known {
                    return Err(StateError::NotFound(format!(
                        "instance {id:?} of service {service:?}"
                    )));
                }
                remove_instance(s, &service, &id, cx);
                Ok(Response::Done)
            }
            DiscoveryCommand::ExpireInstances { now_ms } => {
                let mut count = 0;
                let names: Vec<String> = d.services.keys().cloned().collect();
                for name in names {
                    let svc = d.services.get_mut(&name).expect("listed above");
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
                        cx.emit(EventKind::InstanceDown {
                            service: name.clone(),
                            id,
                        });
                    }
                    d.after_change(&name, leader_before, cx);
                }
                Ok(Response::Expired { count })
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.services)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.services)]
    }

    fn data_plane_snapshot(&self, out: &mut Vec<EventKind>) {
        for svc in self.services.values() {
            out.extend(svc.instances.values().map(|i| EventKind::InstanceUp {
                service: svc.name.clone(),
                instance: i.clone(),
            }));
            out.push(EventKind::ServiceLeader {
                service: svc.name.clone(),
                leader: svc.leader().map(|i| i.id.clone()),
            });
        }
    }
}

/// Drops one registered instance (the caller checked it exists), telling the routers.
pub(crate) fn remove_instance(s: &mut ClusterState, service: &str, id: &str, cx: &mut Cx) {
    let d = &mut s.discovery;
    let Some(svc) = d.services.get_mut(service) else {
        return;
    };
    let leader_before = svc.leader().map(|i| i.id.clone());
    if svc.instances.remove(id).is_none() {
        return;
    }
    cx.emit(EventKind::InstanceDown {
        service: service.to_string(),
        id: id.to_string(),
    });
    d.after_change(service, leader_before, cx);
}

impl Discovery {
    /// Records the leader change (if any) and drops a service left with no instances.
    fn after_change(&mut self, service: &str, leader_before: Option<String>, cx: &mut Cx) {
        let svc = &self.services[service];
        let leader_now = svc.leader().map(|i| i.id.clone());
        if svc.instances.is_empty() {
            self.services.remove(service);
        }
        cx.touch(TABLE, service);
        if leader_now != leader_before {
            cx.emit(EventKind::ServiceLeader {
                service: service.to_string(),
                leader: leader_now,
            });
        }
    }
}

#[cfg(test)]
mod tests;
