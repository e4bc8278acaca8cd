//! The blobstore's backends as the `blobstore` app's env configures them. Every request
//! reads the configuration from the replicated state, so `flynn -a blobstore env set`
//! reconfigures every host at once; connected clients are kept while their configuration
//! stays the same.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flynn_blobs::{Backend, BackendConfig, BackendError};
use futures::stream::{BoxStream, StreamExt};

use crate::component::LocalState;
use crate::error::ApiError;

/// The built-in backend: bytes on the hosts' own disks.
pub const EMBEDDED: &str = "embedded";

/// A stream of content, whatever it comes from.
pub type IoStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

#[derive(Default)]
pub struct Backends {
    connected: Mutex<BTreeMap<String, (BackendConfig, Arc<Backend>)>>,
}

/// The configured backends and the default's name, as the state holds them now.
pub fn configured(local: &LocalState) -> Result<(Vec<BackendConfig>, String), ApiError> {
    let env = local.read(|s| {
        s.apps
            .get(super::SERVICE)
            .map(|a| a.env.global.clone())
            .unwrap_or_default()
    });
    from_env(&env)
}

fn from_env(env: &BTreeMap<String, String>) -> Result<(Vec<BackendConfig>, String), ApiError> {
    let all = flynn_state::blobs::config::backends(env)?;
    let default = env
        .get("DEFAULT_BACKEND")
        .map(|d| d.to_lowercase())
        .unwrap_or_else(|| EMBEDDED.to_string());
    Ok((all, default))
}

impl Backends {
    /// A connected client for backend `name` (`None`: the embedded one).
    pub fn get(&self, local: &LocalState, name: &str) -> Result<Option<Arc<Backend>>, ApiError> {
        let (all, _) = configured(local)?;
        let cfg = all.into_iter().find(|c| c.name == name).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "blobstore backend {name:?} is no longer configured; its files cannot be read"
            ))
        })?;
        if cfg.backend == EMBEDDED {
            return Ok(None);
        }
        let mut connected = self.connected.lock().expect("backends lock");
        if let Some((c, b)) = connected.get(name) {
            if *c == cfg {
                return Ok(Some(b.clone()));
            }
        }
        let backend = Arc::new(Backend::connect(&cfg).map_err(from_backend)?);
        connected.insert(name.to_string(), (cfg, backend.clone()));
        Ok(Some(backend))
    }

    /// The default backend's name and client (`None`: embedded).
    pub fn default_backend(
        &self,
        local: &LocalState,
    ) -> Result<(String, Option<Arc<Backend>>), ApiError> {
        let (_, default) = configured(local)?;
        let backend = self.get(local, &default)?;
        Ok((default, backend))
    }
}

pub fn from_backend(e: BackendError) -> ApiError {
    match e {
        BackendError::NotFound { .. } => ApiError::NotFound(e.to_string()),
        BackendError::Config { .. } => ApiError::Invalid(e.to_string()),
        BackendError::Body(_) => ApiError::Invalid(e.to_string()),
        BackendError::Backend { .. } => ApiError::Unavailable(e.to_string()),
    }
}

/// Checks, against the backends themselves, every external backend that an env change
/// adds or changes: a configuration whose credentials or bucket do not work is refused
/// before it is committed. Unchanged backends are not probed again.
pub async fn probe_changes(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let (old, _) = from_env(before).unwrap_or_default();
    let (new, _) = from_env(after)?;
    for cfg in new {
        if cfg.backend == EMBEDDED || old.contains(&cfg) {
            continue;
        }
        let backend = Backend::connect(&cfg).map_err(from_backend)?;
        let probed = tokio::time::timeout(std::time::Duration::from_secs(45), backend.probe())
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Backend {
                    backend: cfg.name.clone(),
                    op: "probe",
                    why: "no answer within 45 s".into(),
                })
            });
        probed.map_err(|e| ApiError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// A backend's stream as content.
pub fn io_stream(s: flynn_blobs::ByteStream) -> IoStream {
    s.map(|r| r.map_err(std::io::Error::other)).boxed()
}

/// Content as a backend's input.
pub fn backend_stream(s: IoStream) -> flynn_blobs::ByteStream {
    s.map(|r| r.map_err(|e| BackendError::Body(e.to_string())))
        .boxed()
}
