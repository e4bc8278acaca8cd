//! What the data plane follows: events of the applied state, and the watch stream's lines.

use serde::{Deserialize, Serialize};

use crate::{Certificate, Instance, Route};

/// A change the data plane follows: everything routers need, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    RouteSet {
        route: Route,
    },
    RouteRemoved {
        id: String,
    },
    CertificateSet {
        certificate: Certificate,
    },
    CertificateRemoved {
        id: String,
    },
    InstanceUp {
        service: String,
        instance: Instance,
    },
    InstanceDown {
        service: String,
        id: String,
    },
    ServiceLeader {
        service: String,
        leader: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A line of the watch stream (`GET /watch`, newline-delimited JSON), and what an in-process
/// follower of a host's own state receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchLine {
    /// History from the requested revision was not available: forget what you know; the
    /// events that follow (up to `Synced`) are the full current state.
    Reset {
        revision: u64,
    },
    Event(Event),
    /// Everything up to `revision` has been sent.
    Synced {
        revision: u64,
    },
    /// Sent while idle so a client can tell a quiet stream from a dead one.
    Heartbeat {
        revision: u64,
    },
}
