//! The JSON of everything Raft keeps on disk and sends between hosts, frozen.
//!
//! A host's log, vote and snapshot outlive the binary that wrote them, and during a rolling
//! update hosts of two builds exchange RPCs. So a dependency upgrade (openraft 0.10 changes
//! most of these types) must read what the fixtures under `tests/formats/` hold and write it
//! back the same. Each case decodes its fixture with today's types and encodes it again; a
//! difference names the record. `FLYNN_WRITE_FIXTURES=1` (only `1`) rewrites the fixtures (only for a
//! deliberate format change, which then needs a migration of its own).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use flynn_raft::{NodeId, TypeConfig};
use flynn_state::{AppsCommand, Command};
use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    AnyError, BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    SnapshotSegmentId, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

const A: NodeId = 425_190_113_261_630_419;
const B: NodeId = 7_011_223_344_556_677_889;
const C: NodeId = 12;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/formats")
        .join(format!("{name}.json"))
}

/// Checks that `name`'s fixture decodes to `value` and that `value` encodes to the fixture.
fn frozen<T: Serialize + DeserializeOwned + std::fmt::Debug>(name: &str, value: &T) {
    let path = fixture(name);
    let ours = serde_json::to_value(value).expect("encode");
    if std::env::var("FLYNN_WRITE_FIXTURES").as_deref() == Ok("1") {
        let text = serde_json::to_string_pretty(&ours).expect("pretty");
        std::fs::write(&path, text + "\n").expect("write fixture");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let decoded: T = serde_json::from_value(theirs.clone())
        .unwrap_or_else(|e| panic!("{name}: the fixture no longer decodes: {e}"));
    assert_eq!(
        serde_json::to_value(&decoded).expect("encode"),
        theirs,
        "{name}: decoded and encoded again, the record changed"
    );
    assert_eq!(
        ours, theirs,
        "{name}: today's types write another format than the fixture"
    );
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn membership() -> Membership<NodeId, BasicNode> {
    let nodes: BTreeMap<NodeId, BasicNode> = [
        (A, BasicNode::new("10.0.0.1:1113")),
        (B, BasicNode::new("10.0.0.2:1113")),
        (C, BasicNode::new("[fd00::3]:1113")),
    ]
    .into();
    // Two configurations: a joint one, as in a membership change.
    Membership::new(
        vec![BTreeSet::from([A, B]), BTreeSet::from([A, B, C])],
        nodes,
    )
}

fn entries() -> Vec<Entry<TypeConfig>> {
    let create: Command = AppsCommand::CreateApp { name: "web".into() }.into();
    vec![
        Entry {
            log_id: log_id(3, A, 41),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(3, A, 42),
            payload: EntryPayload::Normal(Command::Batch {
                commands: vec![create.clone(), create],
            }),
        },
        Entry {
            log_id: log_id(3, A, 43),
            payload: EntryPayload::Membership(membership()),
        },
    ]
}

fn snapshot_meta() -> SnapshotMeta<NodeId, BasicNode> {
    SnapshotMeta {
        last_log_id: Some(log_id(3, A, 43)),
        last_membership: StoredMembership::new(Some(log_id(3, A, 43)), membership()),
        snapshot_id: format!("{}-43-97", CommittedLeaderId::new(3, A)),
    }
}

#[test]
fn t01_what_a_host_keeps_on_disk() {
    for (i, entry) in entries().iter().enumerate() {
        frozen(&format!("disk-entry-{i}"), entry);
    }
    frozen("disk-vote", &Vote::new_committed(3, A));
    frozen("disk-vote-uncommitted", &Vote::new(4, B));
    frozen("disk-log-id", &Some(log_id(3, A, 43)));
    frozen("disk-log-id-none", &None::<LogId<NodeId>>);
    frozen(
        "disk-membership",
        &StoredMembership::new(Some(log_id(3, A, 43)), membership()),
    );
    frozen("disk-snapshot-meta", &snapshot_meta());
}

#[test]
fn t02_what_hosts_send_each_other() {
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, A),
        prev_log_id: Some(log_id(2, B, 40)),
        entries: entries(),
        leader_commit: Some(log_id(2, B, 40)),
    };
    frozen("rpc-append-request", &append);
    type AppendReply = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;
    frozen::<AppendReply>("rpc-append-success", &Ok(AppendEntriesResponse::Success));
    frozen::<AppendReply>(
        "rpc-append-partial",
        &Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(
            3, A, 42,
        )))),
    );
    frozen::<AppendReply>("rpc-append-conflict", &Ok(AppendEntriesResponse::Conflict));
    frozen::<AppendReply>(
        "rpc-append-higher-vote",
        &Ok(AppendEntriesResponse::HigherVote(Vote::new(5, C))),
    );
    frozen::<AppendReply>("rpc-append-stopped", &Err(RaftError::Fatal(Fatal::Stopped)));
    frozen::<AppendReply>(
        "rpc-append-panicked",
        &Err(RaftError::Fatal(Fatal::Panicked)),
    );
    frozen::<AppendReply>(
        "rpc-append-storage-error",
        &Err(RaftError::Fatal(Fatal::StorageError(
            StorageIOError::write_logs(AnyError::error("No space left on device (os error 28)"))
                .into(),
        ))),
    );

    frozen(
        "rpc-vote-request",
        &VoteRequest::new(Vote::new(4, B), Some(log_id(3, A, 43))),
    );
    type VoteReply = Result<VoteResponse<NodeId>, RaftError<NodeId>>;
    frozen::<VoteReply>(
        "rpc-vote-response",
        &Ok(VoteResponse::new(
            Vote::new(4, B),
            Some(log_id(3, A, 43)),
            true,
        )),
    );

    frozen(
        "rpc-snapshot-request",
        &InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, A),
            meta: snapshot_meta(),
            offset: 1_048_576,
            data: b"{\"meta\":".to_vec(),
            done: false,
        },
    );
    type SnapshotReply = Result<
        InstallSnapshotResponse<NodeId>,
        RaftError<NodeId, openraft::error::InstallSnapshotError>,
    >;
    // The leader starts the transfer again from 0 on this answer.
    let segment = |offset| SnapshotSegmentId {
        id: snapshot_meta().snapshot_id,
        offset,
    };
    frozen::<SnapshotReply>(
        "rpc-snapshot-mismatch",
        &Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
            SnapshotMismatch {
                expect: segment(0),
                got: segment(1_048_576),
            },
        ))),
    );
    frozen::<SnapshotReply>(
        "rpc-snapshot-response",
        &Ok(InstallSnapshotResponse {
            vote: Vote::new_committed(3, A),
        }),
    );
}
