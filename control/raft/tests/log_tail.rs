//! What the log answers after appends, truncations and purges, whether the entries come
//! from its in-memory tail or from RocksDB; and how a follower's appends are synced.

use std::sync::atomic::Ordering;

use flynn_raft::store::{self, LogStore, StateMachine};
use flynn_raft::{Entry, LogId, NodeId, TypeConfig};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::EntryPayload;

fn log_id(term: u64, node_id: NodeId, index: u64) -> LogId {
    LogId::new(LeaderId { term, node_id }, index)
}

fn blank(term: u64, node_id: NodeId, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, node_id, index),
        payload: EntryPayload::Blank,
    }
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.append(entries, IOFlushed::noop())
        .await
        .expect("append");
}

/// (term, index) of what the log answers for `from..=to`.
async fn read(log: &mut LogStore, from: u64, to: u64) -> Vec<(u64, u64)> {
    log.try_get_log_entries(from..=to)
        .await
        .expect("read")
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

fn open(dir: &std::path::Path) -> (LogStore, StateMachine) {
    store::open(dir).expect("open the store")
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_reads_match_the_log_through_truncation_purge_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, sm) = open(dir.path());
    append(&mut log, (1..=5).map(|i| blank(1, 1, i)).collect()).await;
    assert_eq!(read(&mut log, 2, 4).await, [(1, 2), (1, 3), (1, 4)]);

    // A new leader replaces 3.. with its own entries.
    log.truncate_after(Some(log_id(1, 1, 2))).await.unwrap();
    assert_eq!(
        read(&mut log, 1, 4).await,
        [(1, 1), (1, 2)],
        "3..5 are gone"
    );
    append(&mut log, vec![blank(2, 2, 3)]).await;
    assert_eq!(read(&mut log, 1, 10).await, [(1, 1), (1, 2), (2, 3)]);

    // Purged entries are not answered, from memory or from disk.
    log.purge(log_id(1, 1, 1)).await.unwrap();
    assert_eq!(read(&mut log, 1, 3).await, [(1, 2), (2, 3)]);

    // A reopened store (nothing in memory) answers the same.
    let want = read(&mut log, 2, 3).await;
    drop((log, sm));
    let (mut log, _sm) = open(dir.path());
    assert_eq!(read(&mut log, 2, 3).await, want);
    assert_eq!(read(&mut log, 1, 3).await, [(1, 2), (2, 3)]);
    // And once it appends again, what it reads spans both.
    append(&mut log, vec![blank(2, 2, 4)]).await;
    assert_eq!(read(&mut log, 2, 4).await, [(1, 2), (2, 3), (2, 4)]);
}

/// Two workers: a follower syncs inline only where another worker can run the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_a_followers_appends_are_acknowledged_when_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _sm) = open(dir.path());
    let mut log = log.for_node(2);
    let inline = || flynn_raft::metrics::WAL_FSYNC_INLINE.load(Ordering::Relaxed);

    // Entries of node 1's term: node 2 follows, and its append is synced (a synced RocksDB
    // write) and acknowledged before it returns.
    let before = inline();
    let (tx, rx) = TypeConfig::oneshot();
    log.append(vec![blank(1, 1, 1)], IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed = futures::FutureExt::now_or_never(rx);
    assert!(
        matches!(flushed, Some(Ok(Ok(())))),
        "flushed when append returned: {flushed:?}"
    );
    assert_eq!(inline(), before + 1);

    // Its own term's entries go to the sync thread and are flushed soon after.
    let (tx, rx) = TypeConfig::oneshot();
    log.append(vec![blank(2, 2, 2)], IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
        .await
        .expect("flushed in time");
    assert!(matches!(flushed, Ok(Ok(()))), "{flushed:?}");
    assert_eq!(
        inline(),
        before + 1,
        "the leader's append was not synced inline"
    );
}
