//! Raft for the cluster state: openraft's type config, the RocksDB log store and state
//! machine, and the HTTP transport between hosts.

pub mod lease;
pub mod metrics;
pub mod network;
pub mod store;

use std::io::Cursor;

pub use openraft;
use openraft::BasicNode;

use flynn_state::{ApplyResult, Command};

openraft::declare_raft_types!(
    /// Raft types of the flynn control plane.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Membership = openraft::Membership<NodeId, BasicNode>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, BasicNode>;

/// Header that carries the cluster secret on every host-to-host request.
pub const SECRET_HEADER: &str = "x-flynn-cluster-secret";

/// Raft timing used by every host. Failover within a few seconds on a LAN, without elections
/// triggered by an fsync stall. Followers keep a leader's lease for `election_timeout_max`;
/// the leader's own read lease ([`lease::LeaderLease::TERM`]) is a third of it.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "flynn".into(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1500,
        install_snapshot_timeout: 10_000,
        max_payload_entries: 512,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 2_000,
        purge_batch_size: 1_000,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn t01_the_read_lease_is_well_inside_the_followers_promise() {
        let followers = std::time::Duration::from_millis(super::raft_config().election_timeout_max);
        assert!(super::lease::LeaderLease::TERM * 3 <= followers);
    }
}
