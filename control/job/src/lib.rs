//! Jobs as containers, the host side of them: image layers unpacked once per host
//! ([`layer`]), each job's writable layer ([`JobDir`]), its cgroups ([`cgroup`]) and the
//! container init that the job runner starts ([`init`]).

pub mod cgroup;
pub mod init;
pub mod layer;
pub mod shim;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Layer(String),
    /// The kernel refused one of the job's own limits (say, a `pids.max` over its
    /// maximum): the release's doing, not the host's.
    #[error("limit {value} in {}: {source}", path.display())]
    Limit {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One job's directory on its host: the overlay's writable layer and work directory, the
/// mount point of its root and its init spec. Removed with the job.
#[derive(Debug, Clone)]
pub struct JobDir {
    pub dir: PathBuf,
}

impl JobDir {
    pub fn create(base: &Path, id: &str) -> Result<Self, Error> {
        let dir = base.join(id);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["upper", "work", "root"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(JobDir { dir })
    }

    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }

    /// Writes the init's spec.
    pub fn write_spec(&self, spec: &init::ContainerSpec) -> Result<PathBuf, Error> {
        let path = self.spec();
        let json = serde_json::to_vec_pretty(spec).expect("specs serialize");
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Deletes the writable layer (the root was only ever mounted in the job's namespace).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "job directory not removed");
        }
    }
}
