//! What a host's store holds after a restart: the applied state, and the committed index
//! that openraft reported before the apply (it is written with the apply batch, not alone).

use flynn_raft::store::{self, LogStore, StateMachine};
use flynn_raft::{Entry, LogId, NodeId};
use flynn_state::{AppsCommand, Command};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::EntryPayload;

const NODE: NodeId = 1;

fn log_id(index: u64) -> LogId {
    LogId::new(
        LeaderId {
            term: 1,
            node_id: NODE,
        },
        index,
    )
}

fn create_app(index: u64, name: &str) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::from(AppsCommand::CreateApp { name: name.into() })),
    }
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
    let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.expect("apply");
}

fn reopen(dir: &std::path::Path) -> (LogStore, StateMachine) {
    store::open(dir).expect("open the store")
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_the_committed_index_and_the_applied_state_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = reopen(dir.path());
        let entries = vec![create_app(1, "web"), create_app(2, "api")];
        log.append(entries.clone(), IOFlushed::noop())
            .await
            .expect("append");
        log.save_committed(Some(log_id(2))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2)));
        apply(&mut sm, entries).await;
    }
    let (mut log, mut sm) = reopen(dir.path());
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(log_id(2)),
        "written with the apply batch"
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2)));
    let apps = sm.handle().read(|a| a.state.apps.len());
    assert_eq!(apps, 2);

    // A committed id no apply batch has written yet is not read back after a restart: the
    // restart reads the one the last apply batch wrote.
    log.append(vec![create_app(3, "db")], IOFlushed::noop())
        .await
        .expect("append");
    log.save_committed(Some(log_id(3))).await.unwrap();
    drop((log, sm));
    let (mut log, _sm) = reopen(dir.path());
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2)));
}
