//! openraft's storage conformance suite, run against the real RocksDB store.

use flynn_raft::store::{self, LogStore, StateMachine};
use flynn_raft::TypeConfig;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path())
            .map_err(|e| StorageError::read(openraft::errors::ErrorSource::from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RocksBuilder).await {
        panic!("storage suite failed: {e}");
    }
}
