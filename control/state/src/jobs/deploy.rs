//! The deploy verdict: whether a release has finished rolling out, failed, or is still going.
//! Pure over the applied state, so the API's waiting loop only waits and the verdict is
//! tested here beside the area.

use crate::{ClusterState, Job, JobState, Release, Rollout, RolloutState, TypeRollout};

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
    let all_up = progress(release, f.processes.iter(), &jobs)
        .values()
        .all(|t| t.running >= t.want);
    if all_up {
        DeployStatus::Done
    } else {
        DeployStatus::Deploying
    }
}

/// Jobs of the release running per process type, against the formation's counts.
fn progress<'a>(
    release: &Release,
    counts: impl Iterator<Item = (&'a String, &'a u32)>,
    jobs: &[&Job],
) -> std::collections::BTreeMap<String, TypeRollout> {
    counts
        .map(|(t, n)| {
            let omni = release.processes.get(t).is_some_and(|p| p.omni);
            let running = jobs
                .iter()
                .filter(|j| j.proc_type == *t && j.state == JobState::Running)
                .count() as u32;
            let want = if omni { 1 } else { *n };
            (
                t.clone(),
                TypeRollout {
                    running,
                    want,
                    omni,
                },
            )
        })
        .collect()
}

/// The verdict with each type's progress, as a waiting deploy command shows it.
pub fn rollout(state: &ClusterState, release: &Release) -> Rollout {
    let (state_now, error) = match deploy_status(state, release) {
        DeployStatus::Deploying => (RolloutState::Deploying, None),
        DeployStatus::Done => (RolloutState::Done, None),
        DeployStatus::Failed(why) => (RolloutState::Failed, Some(why)),
    };
    let processes = match state.jobs.formations.get(&release.app) {
        Some(f) if f.release == release.id => {
            let jobs: Vec<&Job> = state
                .jobs
                .app_jobs(&release.app)
                .filter(|j| j.release == release.id && !j.oneoff)
                .collect();
            progress(release, f.processes.iter(), &jobs)
        }
        _ => Default::default(),
    };
    Rollout {
        release: release.id.clone(),
        state: state_now,
        error,
        waiting: None,
        processes,
    }
}
