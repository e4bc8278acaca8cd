//! Request and response bodies of the controller and host APIs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The class of an API error: one enum for the server that answers it and the client that
/// reads it. Unknown codes (from a newer host) read as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Invalid,
    Unauthorized,
    NotFound,
    Conflict,
    TooLarge,
    VersionMismatch,
    /// No leader could be reached in time; nothing was written.
    Unavailable,
    /// A write was sent but its fate is not known (the leader went away mid-request).
    UnknownOutcome,
    Timeout,
    /// Authenticated, but not allowed from where it came (a dashboard request from
    /// another origin, or without its CSRF token).
    Forbidden,
    /// Too many attempts (wrong logins) from one address: wait, then try again.
    TooManyRequests,
    /// The host's disk is full: nothing was kept, and sending again elsewhere may work.
    InsufficientStorage,
    Internal,
    #[serde(untagged)]
    Other(String),
}

impl ErrorCode {
    /// The HTTP status this class answers with.
    pub fn status(&self) -> u16 {
        match self {
            ErrorCode::Invalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Timeout => 408,
            ErrorCode::Conflict | ErrorCode::VersionMismatch => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::UnknownOutcome => 504,
            ErrorCode::InsufficientStorage => 507,
            ErrorCode::Internal | ErrorCode::Other(_) => 500,
        }
    }

    /// The class of a non-JSON error answer, from its status alone.
    pub fn from_status(status: u16) -> Self {
        match status {
            400 => ErrorCode::Invalid,
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            408 => ErrorCode::Timeout,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::TooLarge,
            429 => ErrorCode::TooManyRequests,
            502 | 503 => ErrorCode::Unavailable,
            504 => ErrorCode::UnknownOutcome,
            507 => ErrorCode::InsufficientStorage,
            other => ErrorCode::Other(format!("http_{other}")),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(s)) => f.write_str(&s),
            _ => f.write_str("other"),
        }
    }
}

/// Every error answer of every API carries this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateApp {
    pub name: String,
}

/// `POST /apps/{app}/env`: set and unset in one atomic change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnvUpdate {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub proc_type: Option<String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// `POST /apps/{app}/routes`: the state machine's own route spec.
pub type RouteRequest = flynn_model::RouteSpec;

/// `PUT /services/{service}/instances/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRegistration {
    pub addr: String,
    #[serde(default = "default_ttl_ms")]
    pub ttl_ms: u64,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

fn default_ttl_ms() -> u64 {
    10_000
}

/// One component's line on the status page (`status.$CLUSTER_DOMAIN`), as Flynn's status
/// app answers it: `status` is `healthy` or `unhealthy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What the check saw (a pool's health, a listener, an error).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl ComponentHealth {
    pub fn healthy(detail: serde_json::Value) -> Self {
        ComponentHealth {
            status: "healthy".into(),
            version: None,
            detail,
        }
    }

    pub fn unhealthy(detail: serde_json::Value) -> Self {
        ComponentHealth {
            status: "unhealthy".into(),
            version: None,
            detail,
        }
    }

    pub fn from_check(ok: bool, detail: serde_json::Value) -> Self {
        if ok {
            Self::healthy(detail)
        } else {
            Self::unhealthy(detail)
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.status == "healthy"
    }
}

/// `GET /host/health`: this host's own checks, by component.
pub type HostHealth = BTreeMap<String, ComponentHealth>;

/// `GET /status` on any host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub addr: String,
    pub version: String,
    pub role: Role,
    pub leader: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub last_applied_index: Option<u64>,
    pub revision: u64,
    pub bootstrapped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A voting member of the Raft group.
    Peer,
    /// A non-voting member: follows the log, serves reads, forwards writes.
    Proxy,
    /// Not (yet) part of a cluster.
    None,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Peer => "peer",
            Role::Proxy => "proxy",
            Role::None => "none",
        })
    }
}

/// `GET /host/info`: answered without the cluster secret, so bootstrap can find hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub node_id: u64,
    pub addr: String,
    pub version: String,
    /// The host holds a cluster secret (bootstrapped or told to join).
    pub initialized: bool,
    /// When the daemon's process image started (ms since the epoch): changes with an
    /// in-place update.
    #[serde(default)]
    pub started_ms: u64,
}

/// One row of `flynn-host list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostEntry {
    pub node_id: u64,
    pub addr: String,
    pub role: Role,
    pub leader: bool,
    pub reachable: bool,
    pub version: Option<String>,
}

/// `POST /host/bootstrap`: sent by `flynn-host bootstrap` to every initial peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootstrapRequest {
    pub secret: String,
    /// node id → host API address of every initial peer.
    pub members: BTreeMap<u64, String>,
    /// The one host that initializes Raft membership and proposes the first command.
    pub initializer: u64,
    pub auth_key: String,
    pub version: String,
    /// The cluster domain (`flynn-host bootstrap --domain`).
    #[serde(default)]
    pub domain: Option<String>,
    /// The certificate the router serves for `controller.$DOMAIN`.
    #[serde(default)]
    pub controller_certificate: Option<flynn_model::NewCertificate>,
    /// Env of system apps set at bootstrap (app → key → value).
    #[serde(default)]
    pub system_env: BTreeMap<String, BTreeMap<String, String>>,
}

/// Sent by a new host to join as a proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: u64,
    pub addr: String,
    pub version: String,
}

/// `POST /host/promote` and `/host/demote`: a host is named by IP or IP:port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipRequest {
    pub host: String,
    #[serde(default)]
    pub force: bool,
}

pub use flynn_model::{LogLine, LogQuery, WatchLine};

/// `POST /host/volumes`: a volume on that host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewVolume {
    /// Default: a random id.
    #[serde(default)]
    pub id: Option<String>,
    /// Size limit in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub job: Option<String>,
}

/// `POST /host/volumes/{id}/send`: a snapshot to another host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SendVolume {
    /// The receiving host (IP or IP:PORT).
    pub to: String,
    /// Default: the newest snapshot.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Incremental from this snapshot; default: the newest one the receiver has too.
    #[serde(default)]
    pub from: Option<String>,
}

/// `POST /apps/{app}/scale`: counts by process type (negative counts are refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub processes: BTreeMap<String, i64>,
}

/// `POST /apps/{app}/limits`: new limits for one process type (a new release, deployed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLimits {
    #[serde(rename = "type")]
    pub proc_type: String,
    pub limits: flynn_model::Limits,
}

/// `POST /apps/{app}/builds`: a build job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// The uploaded source: a layer holding `app/` with an executable `app/bin/compile`.
    pub source: flynn_model::Layer,
}

/// `POST /apps/{app}/run`: a one-off job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub args: Vec<String>,
    /// The caller uploads its stdin (`PUT .../stdin`); else the job's stdin is empty.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pty of this size (the caller is a terminal); stdin is then always passed
    /// and the output is one stream, as a terminal shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<flynn_model::TtySize>,
    /// Run on this provider's server image with the app's resource env instead of on the
    /// app's release (`flynn pg psql`: psql with the app's `PGHOST`, `PGUSER`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// `POST /providers/{provider}/resources`: the app the resource is for (`app`, or Flynn's
/// `apps` with one name).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProvisionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
}

/// A provisioned resource and the app's release that deployed its env (none while the app
/// has no release).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionedResource {
    #[serde(flatten)]
    pub resource: flynn_model::Resource,
    #[serde(default)]
    pub release: Option<String>,
}

/// `GET /providers`: what the cluster provisions, and how much of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderInfo {
    pub name: String,
    /// The system app serving it.
    pub app: String,
    pub resources: usize,
    /// Servers the provider runs now (Postgres, MariaDB: its formation's count).
    pub servers: usize,
    /// A replicated provider's roles (Postgres): primary, sync, asyncs, generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<flynn_model::DbShape>,
}
