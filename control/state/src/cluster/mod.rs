//! The cluster itself: bootstrap (system apps, the first controller key, the cluster
//! domain) and what is derived from the Raft membership (`DISCOVERD_PEERS`).

use serde::{Deserialize, Serialize};

use crate::area::{to_json, Area, Cx, Records, Table};

use crate::routes::{Routes, RoutesCommand};
use crate::{
    validate, App, ApplyResult, ClusterState, Env, NewCertificate, Response, RouteSpec, StateError,
    SYSTEM_APPS, TCP_PORT_RANGE,
};

/// The service every host's controller API registers as.
pub const CONTROLLER_SERVICE: &str = "controller";
/// The service every host's status page registers as.
pub const STATUS_SERVICE: &str = "status";

pub const TABLE: Table = Table("cluster/");
const INFO: &str = "info";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClusterCommand {
    /// First command of a new cluster: creates the system apps and the controller key.
    Bootstrap {
        auth_key: String,
        /// The cluster domain: apps get `APP.$DOMAIN`, the controller `controller.$DOMAIN`.
        #[serde(default)]
        domain: Option<String>,
        /// With a domain: the certificate the router serves for `controller.$DOMAIN`,
        /// routed to the `controller` service (every host's API).
        #[serde(default)]
        controller_certificate: Option<NewCertificate>,
        /// Extra env of system apps set at bootstrap (app → key → value), e.g. the
        /// status app's key or the controller's TLS pin.
        #[serde(default)]
        system_env: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    },
    /// Sets `DISCOVERD_PEERS` from the Raft membership; proposed by the leader whenever the
    /// voter set it observes differs from the env, so the env is derived, never hand-kept.
    SetDiscoverdPeers { peers: Vec<String> },
    /// Marks a host draining (`flynn-host update` before it restarts the host): the
    /// scheduler places nothing there and moves its jobs to other hosts, new ones up before
    /// old ones stop. Unmarked again once the host is back.
    SetDraining { host: u64, draining: bool },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub bootstrapped: bool,
    #[serde(default)]
    pub domain: Option<String>,
    /// Hosts (node ids) being drained of jobs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub draining: std::collections::BTreeSet<u64>,
}

impl Area for Cluster {
    type Command = ClusterCommand;

    fn apply(s: &mut ClusterState, cmd: ClusterCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            ClusterCommand::Bootstrap {
                auth_key,
                domain,
                controller_certificate,
                system_env,
            } => {
                if s.cluster.bootstrapped {
                    return Err(StateError::Conflict(
                        "cluster is already bootstrapped".into(),
                    ));
                }
                validate::auth_keys(&auth_key)?;
                let domain = domain.map(|d| validate::domain(&d)).transpose()?;
                if let Some(d) = &domain {
                    if d.starts_with("*.") {
                        return Err(StateError::Invalid(format!(
                            "the cluster domain {d:?} may not be a wildcard"
                        )));
                    }
                }
                for (app, vars) in &system_env {
                    if !SYSTEM_APPS.contains(&app.as_str()) {
                        return Err(StateError::Invalid(format!("{app:?} is not a system app")));
                    }
                    for (k, v) in vars {
                        validate::env_pair(k, v)?;
                    }
                }
                for name in SYSTEM_APPS {
                    let mut env = Env::default();
                    match *name {
                        "controller" => {
                            env.global.insert("AUTH_KEY".into(), auth_key.clone());
                        }
                        "router" => {
                            let range =
                                format!("{}-{}", TCP_PORT_RANGE.start(), TCP_PORT_RANGE.end());
                            env.global.insert("TCP_PORT_RANGE".into(), range);
                        }
                        _ => {}
                    }
                    if let Some(extra) = system_env.get(*name) {
                        env.global.extend(extra.clone());
                    }
                    let app = App {
                        name: (*name).to_string(),
                        system: true,
                        created_revision: cx.revision,
                        env,
                    };
                    s.apps.insert(app, cx);
                }
                if let (Some(d), Some(cert)) = (&domain, controller_certificate) {
                    controller_route(s, d, cert, cx)?;
                }
                if let Some(d) = &domain {
                    status_route(s, d, cx)?;
                }
                s.cluster.bootstrapped = true;
                s.cluster.domain = domain;
                cx.touch(TABLE, INFO);
                Ok(Response::Done)
            }
            ClusterCommand::SetDraining { host, draining } => {
                let changed = if draining {
                    s.cluster.draining.insert(host)
                } else {
                    s.cluster.draining.remove(&host)
                };
                if changed {
                    cx.touch(TABLE, INFO);
                }
                Ok(Response::Done)
            }
            ClusterCommand::SetDiscoverdPeers { peers } => {
                if peers.is_empty() {
                    return Err(StateError::Invalid(
                        "a cluster has at least one peer".into(),
                    ));
                }
                s.apps
                    .set_global("discoverd", "DISCOVERD_PEERS", peers.join(","), cx)?;
                Ok(Response::Done)
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, self)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, self)]
    }
}

/// The controller's HTTPS routes, `controller.$DOMAIN`, `git.$DOMAIN` and
/// `dashboard.$DOMAIN`, with its certificate.
fn controller_route(
    s: &mut ClusterState,
    domain: &str,
    certificate: NewCertificate,
    cx: &mut Cx,
) -> Result<(), StateError> {
    let add_cert = RoutesCommand::AddCertificate { certificate };
    let Response::Certificate { certificate } = Routes::apply(s, add_cert, cx)? else {
        unreachable!("AddCertificate answers with the certificate")
    };
    // The git server (`git push flynn main`) and the dashboard are served by the same
    // hosts' API, with the same certificate (bootstrap makes it for every name): one
    // certificate to trust, and the dashboard's calls stay on its own origin.
    for (name, app) in [
        ("controller", "controller"),
        ("git", "gitreceive"),
        ("dashboard", "dashboard"),
    ] {
        let mut route = RouteSpec::http(&format!("{name}.{domain}"));
        if let RouteSpec::Http {
            service,
            certificate: cert,
            https_redirect,
            response_timeout_ms,
            ..
        } = &mut route
        {
            *service = Some(CONTROLLER_SERVICE.into());
            *cert = Some(certificate.id.clone());
            *https_redirect = true;
            // Some calls answer when their work is done: a deploy that waits for its
            // jobs, a database provisioned, a build. The router's default (60 s) would cut
            // them off mid-way.
            *response_timeout_ms = Some(CONTROLLER_RESPONSE_TIMEOUT_MS);
        }
        let add_route = RoutesCommand::AddRoute {
            app: app.into(),
            route,
        };
        Routes::apply(s, add_route, cx)?;
    }
    Ok(())
}

/// How long the controller API may take to start an answer through the routers.
pub const CONTROLLER_RESPONSE_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// How long a host may take to start answering the status page through the routers.
pub const STATUS_RESPONSE_TIMEOUT_MS: u64 = 1500;

/// The status page's route `status.$DOMAIN` (plain HTTP, as monitors poll it), to the
/// service every host's API registers for it.
fn status_route(s: &mut ClusterState, domain: &str, cx: &mut Cx) -> Result<(), StateError> {
    let mut route = RouteSpec::http(&format!("status.{domain}"));
    if let RouteSpec::Http {
        service,
        response_timeout_ms,
        ..
    } = &mut route
    {
        *service = Some(STATUS_SERVICE.into());
        // The page answers within 1 s whatever is hung; a host silent past this is hung
        // itself, and the router asks another.
        *response_timeout_ms = Some(STATUS_RESPONSE_TIMEOUT_MS);
    }
    let add_route = RoutesCommand::AddRoute {
        app: "status".into(),
        route,
    };
    Routes::apply(s, add_route, cx)?;
    Ok(())
}

/// The cluster's settings are one record, `cluster/info`.
impl Records for Cluster {
    fn keys(&self) -> Vec<String> {
        vec![INFO.into()]
    }

    fn encode(&self, key: &str) -> Option<Vec<u8>> {
        (key == INFO).then(|| to_json(self))
    }

    fn decode(&mut self, key: &str, bytes: &[u8]) -> Result<(), String> {
        if key != INFO {
            return Err(format!("unknown cluster record {key:?}"));
        }
        *self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
