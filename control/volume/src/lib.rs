//! Host volumes. On a host with ZFS, the pool `flynn-default` (on a sparse file under the
//! data dir by default, or a device) holds one dataset per volume, `POOL/data/ID`, with
//! snapshots and send/receive between hosts. ZFS is driven through its `zfs` and `zpool`
//! commands behind [`Zfs`], so kernel ZFS and Debian's `zfs-fuse` are driven alike. A host
//! without ZFS falls back to plain directories ([`Provider::Dir`]), which have no snapshots
//! and no send; it says so in its status.

pub mod pool;
mod zfs;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use pool::{PoolConfig, DEFAULT_POOL};
pub use zfs::{Zfs, ZfsCli};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no volume {0:?} on this host")]
    NotFound(String),
    #[error("volume {0:?} exists already")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} needs ZFS; this host stores volumes in plain directories")]
    Unsupported(&'static str),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{0}")]
    Io(String),
}

impl From<std::io::Error> for VolumeError {
    fn from(e: std::io::Error) -> Self {
        VolumeError::Io(e.to_string())
    }
}

/// What a host reports about one of its volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: String,
    /// Where the volume's files are.
    pub path: PathBuf,
    /// Bytes used.
    pub used: u64,
    /// Size limit in bytes, if any.
    pub size: Option<u64>,
    pub snapshots: Vec<String>,
}

/// Volume ids and snapshot names: letters, digits, `-` and `_`, 1 to 64 of them (they name
/// datasets and directories).
pub fn validate_name(what: &str, name: &str) -> Result<(), VolumeError> {
    if flynn_model::is_volume_name(name) {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "{what} {name:?} must be 1-64 letters, digits, '-' or '_'"
        )))
    }
}

/// Where a host keeps its volumes.
pub enum Provider {
    Zfs(pool::ZfsPool),
    /// Plain directories under this root: no snapshots, no send.
    Dir(PathBuf),
}

impl Provider {
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::Zfs(_) => "zfs",
            Provider::Dir(_) => "dir",
        }
    }

    pub fn create(&self, id: &str, size: Option<u64>) -> Result<VolumeInfo, VolumeError> {
        validate_name("volume id", id)?;
        match self {
            Provider::Zfs(p) => p.create(id, size),
            Provider::Dir(root) => {
                let path = root.join(id);
                if path.exists() {
                    return Err(VolumeError::Exists(id.into()));
                }
                std::fs::create_dir_all(&path)?;
                self.inspect(id)
            }
        }
    }

    pub fn inspect(&self, id: &str) -> Result<VolumeInfo, VolumeError> {
        validate_name("volume id", id)?;
        match self {
            Provider::Zfs(p) => p.inspect(id),
            Provider::Dir(root) => {
                let path = root.join(id);
                if !path.is_dir() {
                    return Err(VolumeError::NotFound(id.into()));
                }
                Ok(VolumeInfo {
                    id: id.into(),
                    used: dir_size(&path),
                    path,
                    size: None,
                    snapshots: Vec::new(),
                })
            }
        }
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        match self {
            Provider::Zfs(p) => p.list(),
            Provider::Dir(root) => {
                let mut out = Vec::new();
                if let Ok(entries) = std::fs::read_dir(root) {
                    for e in entries.flatten() {
                        if let Some(id) = e.file_name().to_str() {
                            if validate_name("volume id", id).is_ok() {
                                out.push(self.inspect(id)?);
                            }
                        }
                    }
                }
                out.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(out)
            }
        }
    }

    pub fn delete(&self, id: &str) -> Result<(), VolumeError> {
        validate_name("volume id", id)?;
        match self {
            Provider::Zfs(p) => p.delete(id),
            Provider::Dir(root) => {
                let path = root.join(id);
                if !path.is_dir() {
                    return Err(VolumeError::NotFound(id.into()));
                }
                std::fs::remove_dir_all(path)?;
                Ok(())
            }
        }
    }

    pub fn snapshot(&self, id: &str, name: &str) -> Result<VolumeInfo, VolumeError> {
        validate_name("volume id", id)?;
        validate_name("snapshot", name)?;
        match self {
            Provider::Zfs(p) => p.snapshot(id, name),
            Provider::Dir(_) => Err(VolumeError::Unsupported("a snapshot")),
        }
    }

    pub fn zfs(&self) -> Result<&pool::ZfsPool, VolumeError> {
        match self {
            Provider::Zfs(p) => Ok(p),
            Provider::Dir(_) => Err(VolumeError::Unsupported("sending a volume")),
        }
    }
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests;
