//! Request and response bodies of the controller and host APIs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every error answer of every API carries this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable class: `invalid`, `unauthorized`, `not_found`, `conflict`,
    /// `too_large`, `unavailable`, `unknown_outcome`, `version_mismatch`, `internal`.
    pub error: String,
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
pub type RouteRequest = flynn_state::RouteSpec;

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

/// A line of the `GET /watch` stream (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchLine {
    /// History from the requested revision was not available: forget what you know; the
    /// events that follow (up to `Synced`) are the full current state.
    Reset {
        revision: u64,
    },
    Event(flynn_state::Event),
    /// Everything up to `revision` has been sent.
    Synced {
        revision: u64,
    },
    /// Sent while idle so a client can tell a quiet stream from a dead one.
    Heartbeat {
        revision: u64,
    },
}
