//! Raft for the cluster state: openraft's type config, the RocksDB log store and state
//! machine, and the transport between hosts (a stream per peer, HTTP beside it).

pub mod lease;
pub mod metrics;
pub mod network;
pub mod store;
pub mod stream;

pub use openraft;
use openraft::type_config::alias;
use openraft::BasicNode;
pub use openraft_legacy;

use flynn_state::{ApplyResult, Command};

openraft::declare_raft_types!(
    /// Raft types of the flynn control plane. Term, leader id, vote and entry are openraft's
    /// defaults, which read and write what 0.9 kept on disk and sent (`tests/formats.rs`).
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, store::StateMachine>;
pub type LogId = alias::LogIdOf<TypeConfig>;
pub type Vote = alias::VoteOf<TypeConfig>;
pub type Entry = alias::EntryOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, BasicNode>;
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
/// A snapshot's bytes, whole in memory: as built, stored, sent in chunks and received.
pub type SnapshotData = std::io::Cursor<Vec<u8>>;

/// Header that carries the cluster secret on every host-to-host request.
pub const SECRET_HEADER: &str = "x-flynn-cluster-secret";

/// Raft timing used by every host. Failover within a few seconds on a LAN, without elections
/// triggered by an fsync stall. Followers keep a leader's lease for `election_timeout_max`;
/// the leader's own read lease ([`lease::LeaderLease::TERM`]) is a third of it.
///
/// A snapshot is taken every 20,000 entries; 2,000 entries are kept behind it for peers that
/// lag a little, and the log is purged 1,000 entries at a time. `FLYNN_RAFT_SNAPSHOT_LOGS=N`
/// scales the three from `N` (the tests use it to make a lagging peer need a snapshot).
/// A snapshot goes to a peer in chunks of 3 MiB, or `FLYNN_RAFT_SNAPSHOT_CHUNK` bytes.
pub fn raft_config() -> openraft::Config {
    let snapshot_logs = env_u64("FLYNN_RAFT_SNAPSHOT_LOGS", 10, 20_000);
    let snapshot_chunk = env_u64("FLYNN_RAFT_SNAPSHOT_CHUNK", 1024, 3 << 20);
    openraft::Config {
        cluster_name: "flynn".into(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1500,
        install_snapshot_timeout: 10_000,
        max_payload_entries: 512,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs),
        max_in_snapshot_log_to_keep: snapshot_logs / 10,
        purge_batch_size: (snapshot_logs / 20).max(1),
        snapshot_max_chunk_size: snapshot_chunk,
        ..Default::default()
    }
}

/// `name`'s value when it is a number of at least `min`; otherwise `default`.
fn env_u64(name: &str, min: u64, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n >= min)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    #[test]
    fn t01_the_read_lease_is_well_inside_the_followers_promise() {
        let followers = std::time::Duration::from_millis(super::raft_config().election_timeout_max);
        assert!(super::lease::LeaderLease::TERM * 3 <= followers);
    }
}
