//! The blobstore's configuration, as the `blobstore` app's env holds it (Flynn's form):
//!
//! - `BACKEND_<NAME>="backend=s3 region=us-east-1 bucket=b access_key_id=.. secret_access_key=.."`:
//!   a space-separated `k=v` list;
//! - `BACKEND_<NAME>_<KEY>=value` adds a key (GCS: `BACKEND_GCSMAIN_KEY` is the service
//!   account JSON);
//! - `DEFAULT_BACKEND=<name>`; names are case-insensitive.
//!
//! What can be decided from the text alone is checked here, deterministically, so a
//! malformed configuration is refused at `env set` and the env stays as it was. Whether the
//! credentials work is the blobstore's to check against the backend itself.

use std::collections::BTreeMap;

use crate::StateError;

pub use flynn_model::BackendConfig;

/// Parses and checks every backend of a blobstore env ([`flynn_model::blob_backends`]), as
/// the state machine refuses a bad one.
pub fn backends(env: &BTreeMap<String, String>) -> Result<Vec<BackendConfig>, StateError> {
    flynn_model::blob_backends(env).map_err(StateError::Invalid)
}
