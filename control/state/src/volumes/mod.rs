//! Volumes: what the control plane knows of every host's volumes (the bytes stay on the
//! host): which host holds it, its size, its owner (app, job) and its snapshots. A volume
//! sent to another host is recorded there too, under the same id, so a record is keyed by
//! host and id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{ApplyResult, ClusterState, Response, StateError};

pub const TABLE: Table = Table("volume/");

/// One volume on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    /// Raft node id of the host that holds it.
    pub host: u64,
    /// `zfs` or `dir`.
    pub provider: String,
    /// Size limit in bytes, if any.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub job: Option<String>,
    /// For a job's data volume: the process type and the path it is mounted at, so a later
    /// job of that type on this host takes it up again (a redeploy, a restored backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<String>,
    pub created_ms: u64,
}

impl Volume {
    /// Whether this is a data volume of `app`'s `proc_type` mounted at `path` that no job
    /// that `is_active` holds: one a new job of that type may take up.
    pub fn free_for(
        &self,
        app: &str,
        proc_type: &str,
        path: &str,
        is_active: impl Fn(&str) -> bool,
    ) -> bool {
        self.app.as_deref() == Some(app)
            && self.proc_type.as_deref() == Some(proc_type)
            && self.path.as_deref() == Some(path)
            && self.job.as_deref().is_none_or(|j| !is_active(j))
    }

    pub fn key(host: u64, id: &str) -> String {
        format!("{host}/{id}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VolumesCommand {
    /// Records a volume a host made or received, or its new snapshots (replaces the record).
    PutVolume {
        volume: Volume,
    },
    RemoveVolume {
        host: u64,
        id: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volumes {
    /// `HOST/ID` → volume.
    #[serde(default)]
    pub volumes: BTreeMap<String, Volume>,
}

impl Area for Volumes {
    type Command = VolumesCommand;

    fn apply(s: &mut ClusterState, cmd: VolumesCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            VolumesCommand::PutVolume { volume } => {
                for name in std::iter::once(&volume.id).chain(&volume.snapshots) {
                    check_name(name)?;
                }
                if let Some(app) = &volume.app {
                    s.app(app)?;
                }
                let key = Volume::key(volume.host, &volume.id);
                if s.volumes.volumes.get(&key) != Some(&volume) {
                    s.volumes.volumes.insert(key.clone(), volume.clone());
                    cx.touch(TABLE, &key);
                }
                Ok(Response::Volume { volume })
            }
            VolumesCommand::RemoveVolume { host, id } => {
                let key = Volume::key(host, &id);
                if s.volumes.volumes.remove(&key).is_none() {
                    return Err(StateError::NotFound(format!(
                        "volume {id:?} on host {host}"
                    )));
                }
                cx.touch(TABLE, &key);
                Ok(Response::Done)
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.volumes)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.volumes)]
    }
}

fn check_name(name: &str) -> Result<(), StateError> {
    if crate::is_volume_name(name) {
        return Ok(());
    }
    Err(StateError::Invalid(format!(
        "{name:?} must be 1-64 letters, digits, '-' or '_'"
    )))
}

#[cfg(test)]
mod tests;
