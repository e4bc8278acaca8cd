//! A host's data directory: identity, init config, cluster secret and the Raft store.
//!
//! ```text
//! DATA_DIR/host.json      written by `flynn-host init`: external IP, port, peer IPs
//! DATA_DIR/node_id        this host's Raft node id, made once at first start
//! DATA_DIR/secret         cluster secret (mode 0600), from bootstrap or `init --secret`
//! DATA_DIR/recover.json   present only while a quorum-loss recovery is pending
//! DATA_DIR/raft/          RocksDB: Raft log, vote, state machine, snapshot
//! ```
//! Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
//! half-written one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `flynn-host init` records for the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Address other hosts reach this one at.
    #[serde(default)]
    pub external_ip: Option<String>,
    /// Port of the host API (Raft, host admin and controller API).
    #[serde(default)]
    pub port: Option<u16>,
    /// Host addresses of the cluster's peers: where a new host asks to join.
    #[serde(default)]
    pub peer_ips: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct HostDir {
    root: PathBuf,
}

impl HostDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)
    }

    pub fn init_config(&self) -> anyhow::Result<InitConfig> {
        let path = self.root.join("host.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is not valid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(InitConfig::default()),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn write_init_config(&self, cfg: &InitConfig) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(cfg).expect("init config serializes");
        self.write_atomic("host.json", &json, 0o644)
    }

    /// This host's node id, created on first use.
    pub fn node_id(&self) -> anyhow::Result<u64> {
        let path = self.root.join("node_id");
        match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{} is not a node id: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Random, never 0: ids must not collide across hosts, and a reused address
                // must not inherit another host's vote.
                let id = rand::random::<u64>() >> 1 | 1;
                self.write_atomic("node_id", id.to_string().as_bytes(), 0o644)?;
                Ok(id)
            }
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn secret(&self) -> anyhow::Result<Option<String>> {
        let path = self.root.join("secret");
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => anyhow::bail!("{} is empty", path.display()),
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn write_secret(&self, secret: &str) -> std::io::Result<()> {
        self.write_atomic("secret", secret.as_bytes(), 0o600)
    }

    pub fn recover_state(&self) -> anyhow::Result<Option<flynn_state::ClusterState>> {
        let path = self.root.join("recover.json");
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!("{} is not valid: {e}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn write_recover_state(&self, state: &flynn_state::ClusterState) -> std::io::Result<()> {
        let json = serde_json::to_vec(state).expect("state serializes");
        self.write_atomic("recover.json", &json, 0o600)
    }

    pub fn remove_recover_state(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.root.join("recover.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
        self.create()?;
        write_atomic(&self.root.join(name), data, mode)
    }
}

/// Writes a file under a temporary name, fsyncs it and renames it into place, so a crash
/// never leaves a half-written one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_stable_and_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let h = HostDir::new(dir.path());
        let id = h.node_id().unwrap();
        assert_ne!(id, 0);
        assert_eq!(h.node_id().unwrap(), id);
        assert_eq!(h.secret().unwrap(), None);
        h.write_secret("s3cret").unwrap();
        assert_eq!(h.secret().unwrap().as_deref(), Some("s3cret"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_init_config_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host.json"), "{not json").unwrap();
        let err = HostDir::new(dir.path())
            .init_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("host.json is not valid"), "{err}");
    }
}
