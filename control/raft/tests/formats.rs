//! The JSON of everything Raft keeps on disk and sends between hosts, frozen.
//!
//! A host's log, vote and snapshot outlive the binary that wrote them, and during a rolling
//! update hosts of two builds exchange RPCs. The fixtures under `tests/formats/` were written
//! by openraft 0.9.25, before the move to 0.10: each case decodes its fixture with today's
//! types and encodes it again; a difference names the record. Where 0.10 writes more than
//! 0.9 did, the case names the added fields, which 0.9 ignores. `FLYNN_WRITE_FIXTURES=1`
//! (only `1`) rewrites the fixtures (only for a deliberate format change, which then needs a
//! migration of its own).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use flynn_raft::{Entry, LogId, Membership, NodeId, StoredMembership, TypeConfig, Vote};
use flynn_state::{AppsCommand, Command};
use openraft::error::{Fatal, RaftError};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, EntryPayload};
use openraft_legacy::network_v1::{
    InstallSnapshotError, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotMeta,
    SnapshotMismatch, SnapshotSegmentId,
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
    frozen_but_added(name, value, &[]);
}

/// [`frozen`], but today's types also write the top-level fields `added`, which the
/// fixture's writer did not know (and, like any serde reader, ignores).
fn frozen_but_added<T: Serialize + DeserializeOwned + std::fmt::Debug>(
    name: &str,
    value: &T,
    added: &[&str],
) {
    let path = fixture(name);
    let without_added = |mut v: serde_json::Value| {
        if let Some(map) = v.as_object_mut() {
            for field in added {
                assert!(map.remove(*field).is_some(), "{name}: no field {field}");
            }
        }
        v
    };
    let ours = without_added(serde_json::to_value(value).expect("encode"));
    if std::env::var("FLYNN_WRITE_FIXTURES").as_deref() == Ok("1") {
        let text = serde_json::to_string_pretty(&ours).expect("pretty");
        std::fs::write(&path, text + "\n").expect("write fixture");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let decoded: T = serde_json::from_value(theirs.clone())
        .unwrap_or_else(|e| panic!("{name}: the fixture no longer decodes: {e}"));
    assert_eq!(
        without_added(serde_json::to_value(&decoded).expect("encode")),
        theirs,
        "{name}: decoded and encoded again, the record changed"
    );
    assert_eq!(
        ours, theirs,
        "{name}: today's types write another format than the fixture"
    );
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    LogId::new(
        LeaderId {
            term,
            node_id: node,
        },
        index,
    )
}

fn membership() -> Membership {
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
    .expect("a valid membership")
}

fn entries() -> Vec<Entry> {
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

/// A snapshot's meta as the store keeps it and as a snapshot chunk carries it: with the id
/// of 0.9's layout (`openraft-legacy` keeps it; 0.10's own meta has none).
fn snapshot_meta() -> SnapshotMeta<TypeConfig> {
    SnapshotMeta {
        last_log_id: Some(log_id(3, A, 43)),
        last_membership: StoredMembership::new(Some(log_id(3, A, 43)), membership()),
        snapshot_id: "T3-N425190113261630419-43-97".into(),
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
    frozen("disk-log-id-none", &None::<LogId>);
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
    type AppendReply = Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>>;
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
    // A follower's storage failure is written in another shape than 0.9's: a host of the
    // other build reads it as a network error and retries, as for a host that is down.
    let fatal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("rpc-append-storage-error")).expect("fixture"),
    )
    .expect("JSON");
    assert!(
        serde_json::from_value::<AppendReply>(fatal).is_err(),
        "0.9's storage error now reads: make it a frozen case"
    );

    frozen_but_added(
        "rpc-vote-request",
        &VoteRequest::<TypeConfig>::new(Vote::new(4, B), Some(log_id(3, A, 43))),
        &["leadership_transfer"],
    );
    type VoteReply = Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>;
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
    type SnapshotReply =
        Result<InstallSnapshotResponse<TypeConfig>, RaftError<TypeConfig, InstallSnapshotError>>;
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
