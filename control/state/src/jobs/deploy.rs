//! The deploy verdict: whether a release has finished rolling out, failed, or is still going.
//! Pure over the applied state, so the API's waiting loop only waits and the verdict is
//! tested here beside the area.

use crate::{ClusterState, Job, JobState, Release};

/// Where a release's rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployStatus {
    /// Not every process type runs its count of the release yet.
    Deploying,
    /// Every type runs its count (an omni type: at least one), or a newer release took over.
    Done,
    /// A job of the release crashed or failed, or the app's formation is gone: why.
    Failed(String),
}

/// The rollout of `release` as `state` shows it.
pub fn deploy_status(state: &ClusterState, release: &Release) -> DeployStatus {
    let Some(f) = state.jobs.formations.get(&release.app) else {
        return DeployStatus::Failed("the app's formation is gone".into());
    };
    if f.release != release.id {
        return DeployStatus::Done; // superseded by a newer deploy
    }
    let jobs: Vec<&Job> = state
        .jobs
        .app_jobs(&release.app)
        .filter(|j| j.release == release.id && !j.oneoff)
        .collect();
    if let Some(bad) = jobs
        .iter()
        .find(|j| matches!(j.state, JobState::Crashed | JobState::Failed))
    {
        return DeployStatus::Failed(format!(
            "job {} {}: {}",
            bad.id,
            if bad.state == JobState::Crashed {
                "crashed"
            } else {
                "failed"
            },
            bad.error.as_deref().unwrap_or("no reason given")
        ));
    }
    let all_up = f.processes.iter().all(|(t, n)| {
        let omni = release.processes.get(t).is_some_and(|p| p.omni);
        let running = jobs
            .iter()
            .filter(|j| j.proc_type == *t && j.state == JobState::Running)
            .count();
        if omni {
            running > 0
        } else {
            running >= *n as usize
        }
    });
    if all_up {
        DeployStatus::Done
    } else {
        DeployStatus::Deploying
    }
}
