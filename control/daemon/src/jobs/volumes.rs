//! Jobs' data volumes: made per job (or an earlier job's kept one taken up again), recorded
//! in the state with the job as owner, deleted with the job when they ask to be.

use super::state::State;
use super::{JobError, JobRunner};
use flynn_state::Job;

impl JobRunner {
    /// The id of the job's `i`th data volume.
    pub(super) fn volume_id(job: &str, i: usize) -> String {
        let mut id: String = job.chars().take(58).collect();
        id.push_str(&format!("-v{i}"));
        id
    }

    /// Makes and records the job's data volumes; where each is mounted.
    pub(super) async fn data_volumes(
        &self,
        local: &State,
        job: &Job,
        proc: &flynn_state::ProcessType,
    ) -> Result<Vec<flynn_job::init::VolumeMount>, JobError> {
        let mut mounts = Vec::new();
        for (i, req) in proc.volumes.iter().enumerate() {
            if !req.delete_on_stop {
                if let Some(mount) = self.take_up_volume(local, job, &req.path).await? {
                    mounts.push(mount);
                    continue;
                }
            }
            let id = Self::volume_id(&job.id, i);
            let info = tokio::task::block_in_place(|| self.volumes.provider.create(&id, None))
                .map_err(|e| JobError::Volume {
                    path: req.path.clone(),
                    why: e.to_string(),
                })?;
            let mut record =
                self.volumes
                    .record(&info, None, Some(job.app.clone()), Some(job.id.clone()));
            record.proc_type = Some(job.proc_type.clone());
            record.path = Some(req.path.clone());
            let put = flynn_state::VolumesCommand::PutVolume { volume: record };
            if let Err(e) = local.propose(put.into()).await {
                let _ = tokio::task::block_in_place(|| self.volumes.provider.delete(&id));
                return Err(JobError::RecordVolume {
                    path: req.path.clone(),
                    why: e.to_string(),
                });
            }
            mounts.push(flynn_job::init::VolumeMount {
                host: info.path,
                path: req.path.clone(),
                readonly: false,
                chown: false,
            });
        }
        Ok(mounts)
    }

    /// A kept data volume of this host that an earlier job of the same app and type left
    /// (a redeploy, a restored backup), taken up by `job`: recorded with it as owner.
    async fn take_up_volume(
        &self,
        local: &State,
        job: &Job,
        path: &str,
    ) -> Result<Option<flynn_job::init::VolumeMount>, JobError> {
        let found = {
            let mut claimed = self.claimed.lock().expect("claimed lock");
            let found = local.read(|s| {
                // Held by another job still active (a lookup, not a scan: hosts hold many).
                let is_active = |id: &str| {
                    id != job.id && s.jobs.jobs.get(id).is_some_and(|j| j.state.is_active())
                };
                s.volumes
                    .volumes
                    .values()
                    .filter(|v| v.host == self.host && !claimed.contains_key(&v.id))
                    .find(|v| v.free_for(&job.app, &job.proc_type, path, is_active))
                    .cloned()
            });
            if let Some(v) = &found {
                claimed.insert(v.id.clone(), job.id.clone());
            }
            found
        };
        let Some(mut volume) = found else {
            return Ok(None);
        };
        let id = volume.id.clone();
        let info = match tokio::task::block_in_place(|| self.volumes.provider.inspect(&id)) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "a recorded data volume is not on disk");
                self.claimed.lock().expect("claimed lock").remove(&id);
                return Ok(None);
            }
        };
        volume.job = Some(job.id.clone());
        let put = flynn_state::VolumesCommand::PutVolume { volume };
        if let Err(e) = local.propose(put.into()).await {
            self.claimed.lock().expect("claimed lock").remove(&id);
            return Err(JobError::TakeUpVolume {
                id,
                path: path.to_string(),
                why: e.to_string(),
            });
        }
        tracing::info!(volume = %id, job = %job.id, path, "data volume taken up again");
        Ok(Some(flynn_job::init::VolumeMount {
            host: info.path,
            path: path.to_string(),
            readonly: false,
            chown: false,
        }))
    }

    /// Lets the volumes job `id` took up be taken up by another job (its processes ended;
    /// until its end lands in the state, the state itself keeps others off them).
    pub(super) fn release_volume_claims(&self, id: &str) {
        self.claimed
            .lock()
            .expect("claimed lock")
            .retain(|_, j| j != id);
    }

    /// Deletes the job's data volumes that ask to go with it; the others stay, recorded
    /// with the job as owner.
    pub(super) async fn drop_volumes(&self, local: &State, job: &Job) {
        self.release_volume_claims(&job.id);
        let proc = local.read(|s| {
            s.jobs
                .releases
                .get(&job.release)
                .and_then(|r| r.processes.get(&job.proc_type).cloned())
        });
        let Some(proc) = proc else { return };
        for (i, req) in proc.volumes.iter().enumerate() {
            if !req.delete_on_stop {
                continue;
            }
            let id = Self::volume_id(&job.id, i);
            match tokio::task::block_in_place(|| self.volumes.provider.delete(&id)) {
                Ok(()) => {
                    let rm = flynn_state::VolumesCommand::RemoveVolume {
                        host: self.host,
                        id,
                    };
                    if let Err(e) = local.propose(rm.into()).await {
                        tracing::warn!(error = %e, "a deleted data volume is still recorded");
                    }
                }
                Err(e) => tracing::warn!(volume = %id, error = %e, "data volume not deleted"),
            }
        }
    }
}
