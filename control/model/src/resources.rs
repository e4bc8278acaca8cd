//! Databases provisioned for apps (`flynn resource`): the record and its stable address.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One provisioned database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// 1 to 64 lowercase letters, digits and `-`, chosen by the provisioning host.
    pub id: String,
    pub provider: String,
    /// The app whose env reaches it.
    pub app: String,
    /// What it put in the app's env.
    pub env: BTreeMap<String, String>,
    /// The provider's own name for it: the database and user (Postgres, MariaDB), or the
    /// instance's app (Redis).
    pub name: String,
    /// A server of its own (Redis): its discovery service and stable address
    /// (`100.100.0.N:PORT`), given by the provisioning host and unique in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServiceAddr>,
    #[serde(default)]
    pub created_ms: u64,
}

/// A stable address in `100.100.0.0/24` that every host forwards to the leader of a
/// discovery service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub service: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}
