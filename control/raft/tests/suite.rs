//! openraft's storage conformance suite, run against the real RocksDB store.

use flynn_raft::store::{self, LogStore, StateMachine};
use flynn_raft::TypeConfig;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

/// The store as a host opens it; `own_id` set makes every append of another node's term
/// a follower's, synced as it is written.
struct RocksBuilder {
    own_id: Option<flynn_raft::NodeId>,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path())
            .map_err(|e| StorageError::read(openraft::errors::ErrorSource::from_error(&e)))?;
        let log = match self.own_id {
            Some(id) => log.for_node(id),
            None => log,
        };
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RocksBuilder { own_id: None }).await {
        panic!("storage suite failed: {e}");
    }
}

/// No entry of the suite is of this node's term: every append is synced inline (which
/// takes a runtime of two workers or more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_as_a_follower() {
    if let Err(e) = Suite::test_all(RocksBuilder {
        own_id: Some(u64::MAX),
    })
    .await
    {
        panic!("storage suite failed: {e}");
    }
}
