//! flynn-host's daemon: the Raft node, the controller and host APIs (one module per area),
//! bootstrap, join and recovery, the host components (router, firewall, ...) and the leader
//! controllers. The `flynn-host` binary is a thin CLI over this crate.

pub mod api;
pub mod archive;
pub mod blobstore;
pub mod bootstrap;
pub mod component;
pub mod components;
pub mod config;
pub mod daemon;
pub mod databases;
pub mod error;
pub mod git;
pub mod host;
pub mod hostdir;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod serve;
pub mod tls;
pub mod update;
pub mod watch;

pub use daemon::{prepare_recovery, run, DaemonConfig, DEFAULT_PORT};

/// The version this host reports and checks at bootstrap and join. Operators testing an
/// upgrade path can set `FLYNN_HOST_VERSION` to stand in for another build.
pub fn version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        std::env::var("FLYNN_HOST_VERSION")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    })
}

/// Wall-clock milliseconds since the epoch: the time that enters commands (TTLs, expiry).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
