//! Commands proposed through Raft, and what applying one answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{App, Certificate, Instance, Route};
use crate::ClusterState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// First command of a new cluster: creates the system apps and the controller key.
    Bootstrap {
        auth_key: String,
    },
    CreateApp {
        name: String,
    },
    DeleteApp {
        name: String,
    },
    UpdateEnv {
        app: String,
        #[serde(default)]
        proc_type: Option<String>,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        unset: Vec<String>,
    },
    AddRoute {
        app: String,
        route: RouteSpec,
    },
    RemoveRoute {
        app: String,
        id: String,
    },
    AddCertificate {
        certificate: NewCertificate,
    },
    RemoveCertificate {
        id: String,
    },
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
    /// Sets `DISCOVERD_PEERS` from the Raft membership; proposed by the leader whenever the
    /// voter set it observes differs from the env, so the env is derived, never hand-kept.
    SetDiscoverdPeers {
        peers: Vec<String>,
    },
    /// Replaces the whole state (quorum-loss recovery seeds a new cluster with this).
    Restore {
        state: Box<ClusterState>,
    },
    /// Several commands in one log entry, applied in order, each with its own result and
    /// revision. The leader batches concurrent proposals so one fsync serves many writes.
    Batch {
        commands: Vec<Command>,
    },
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCertificate {
    pub domains: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a successfully applied command returns to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Done,
    App { app: App },
    Route { route: Route },
    Certificate { certificate: Certificate },
    Instance { instance: Instance },
    Expired { count: usize },
    Batch { results: Vec<ApplyResult> },
}

/// Why a command was refused. Refusal is deterministic: every host refuses the same command
/// the same way, and a refused command changes nothing (not even the revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum StateError {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
}

/// The result of applying one log entry, as stored in the Raft response.
pub type ApplyResult = Result<Response, StateError>;
