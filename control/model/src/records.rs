//! The records the cluster state is made of, and the requests that create them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Apps every cluster has from bootstrap on. They carry their configuration as env, exactly
/// like user apps, so `flynn -a blobstore env set ...` is the one way to configure them.
pub const SYSTEM_APPS: &[&str] = &[
    "controller",
    "router",
    "blobstore",
    "discoverd",
    "status",
    "gitreceive",
    "docker-receive",
    "taffy",
    "dashboard",
    "postgres",
    "redis",
    "mariadb",
    "mongodb",
];

/// Default TCP route port range, as Flynn's router serves it.
pub const TCP_PORT_RANGE: std::ops::RangeInclusive<u16> = 3000..=3500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub system: bool,
    /// Revision at which the app was created.
    pub created_revision: u64,
    pub env: Env,
}

/// Env of an app: global variables plus per-process-type overrides. A lookup for a process
/// type sees the override first, then the global value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    #[serde(default)]
    pub global: BTreeMap<String, String>,
    #[serde(default)]
    pub types: BTreeMap<String, BTreeMap<String, String>>,
}

impl Env {
    /// The value a process of `proc_type` sees for `key`.
    pub fn get(&self, proc_type: Option<&str>, key: &str) -> Option<&str> {
        proc_type
            .and_then(|t| self.types.get(t))
            .and_then(|vars| vars.get(key))
            .or_else(|| self.global.get(key))
            .map(String::as_str)
    }

    /// The full env a process of `proc_type` sees (global merged with the override).
    pub fn resolved(&self, proc_type: Option<&str>) -> BTreeMap<String, String> {
        let mut out = self.global.clone();
        if let Some(vars) = proc_type.and_then(|t| self.types.get(t)) {
            out.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Route {
    Http(HttpRoute),
    Tcp(TcpRoute),
}

impl Route {
    pub fn id(&self) -> &str {
        match self {
            Route::Http(r) => &r.id,
            Route::Tcp(r) => &r.id,
        }
    }
    pub fn app(&self) -> &str {
        match self {
            Route::Http(r) => &r.app,
            Route::Tcp(r) => &r.app,
        }
    }
    pub fn service(&self) -> &str {
        match self {
            Route::Http(r) => &r.service,
            Route::Tcp(r) => &r.service,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub id: String,
    pub app: String,
    pub domain: String,
    /// Path prefix, always starting with `/`.
    pub path: String,
    pub service: String,
    #[serde(default)]
    pub sticky: bool,
    /// Only the service's leader instance receives traffic.
    #[serde(default)]
    pub leader: bool,
    /// Keep-alive connections to backends; Flynn's `--disable-keep-alives` turns it off.
    #[serde(default = "yes")]
    pub backend_keepalive: bool,
    /// Drain a removed backend's in-flight requests instead of cutting them.
    #[serde(default = "yes")]
    pub drain_backends: bool,
    /// Id of the certificate served for this domain, if any.
    #[serde(default)]
    pub certificate: Option<String>,
    /// Answer plain-HTTP requests with a redirect to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
    /// How long a backend may take to start its response on this route (the router's own
    /// upstream timeout otherwise). A request that can be replayed goes to another backend
    /// when it passes, as the router's passive health passes the silent one over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    pub id: String,
    pub app: String,
    pub port: u16,
    pub service: String,
    #[serde(default)]
    pub leader: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub id: String,
    pub domains: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A discoverable service and its live instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub instances: BTreeMap<String, Instance>,
}

impl Service {
    /// The leader is the longest-registered live instance: stable while it lives, and every
    /// host computes the same answer from the same state.
    pub fn leader(&self) -> Option<&Instance> {
        self.instances
            .values()
            .min_by_key(|i| (i.registered_revision, &i.id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    /// `host:port` the instance serves on.
    pub addr: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub registered_revision: u64,
    pub ttl_ms: u64,
    /// Wall-clock deadline (ms since the epoch, from the proposing host's clock).
    pub expires_at_ms: u64,
}

/// A route as a client asks for it (`POST /apps/{app}/routes`); the state machine assigns
/// the id (and a TCP port if none is given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RouteSpec {
    Http {
        domain: String,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        sticky: bool,
        #[serde(default)]
        leader: bool,
        #[serde(default)]
        disable_keepalive: bool,
        #[serde(default)]
        no_drain_backends: bool,
        #[serde(default)]
        certificate: Option<String>,
        #[serde(default)]
        https_redirect: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response_timeout_ms: Option<u64>,
    },
    Tcp {
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        leader: bool,
    },
}

impl RouteSpec {
    /// A plain HTTP route for `domain` (path `/`, the app's web service, defaults elsewhere).
    pub fn http(domain: &str) -> Self {
        RouteSpec::Http {
            domain: domain.into(),
            path: None,
            service: None,
            sticky: false,
            leader: false,
            disable_keepalive: false,
            no_drain_backends: false,
            certificate: None,
            https_redirect: false,
            response_timeout_ms: None,
        }
    }
}

/// A certificate as a client uploads it; the state machine assigns the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCertificate {
    pub domains: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Volume ids, snapshot and pool names name ZFS datasets and directories: 1 to 64 letters,
/// digits, `-` and `_`.
pub fn is_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The discovery instance id a host registers its own services under (`host-N`, N its
/// Raft node id): the controller API, the blobstore, the host's job runner.
pub fn host_instance_id(node: u64) -> String {
    format!("host-{node}")
}

/// The node id of a host instance id made by [`host_instance_id`].
pub fn host_of_instance(id: &str) -> Option<u64> {
    id.strip_prefix("host-")?.parse().ok()
}

/// Names that become hostnames (apps, services, process types): DNS-label shaped, as Flynn
/// requires. `what` names the kind in the error. Shared by the state machine, the API and
/// the CLI (which checks before it uploads anything).
pub fn check_dns_label(name: &str, what: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}
