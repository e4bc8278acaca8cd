//! One error for everything that keeps a job from running. Its text is what the job's
//! record says, and what a caller attached to a one-off job or build is told.

use flynn_state::jobs::JobFault;

/// Why a job could not be prepared, or its build kept.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The release was deleted between placement and start.
    #[error("release {0} no longer exists")]
    ReleaseGone(String),
    /// Image layers, slugs and build caches live in the blobstore, and this host has none.
    #[error("this host runs no blobstore{0}")]
    NoBlobstore(&'static str),
    #[error("fetching layer {layer}: {why}")]
    FetchLayer { layer: String, why: String },
    #[error("unpacking layer {layer}: {why}")]
    UnpackLayer { layer: String, why: String },
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// The kernel refused one of the process type's limits.
    #[error("the process type's limits: {0}")]
    Limits(String),
    /// `--job-network routed` and the host's job network is not there.
    #[error("this host cannot give jobs their own network: {0}")]
    NoJobNetwork(String),
    /// The job's network namespace, veth or address could not be made.
    #[error("{0}")]
    Network(String),
    #[error("no free port on this host")]
    NoPort,
    #[error("data volume for {path}: {why}")]
    Volume { path: String, why: String },
    #[error("recording the data volume for {path}: {why}")]
    RecordVolume { path: String, why: String },
    #[error("taking up data volume {id} for {path}: {why}")]
    TakeUpVolume {
        id: String,
        path: String,
        why: String,
    },
    /// A build's inputs, or packing its outputs.
    #[error("{0}")]
    Build(String),
    #[error("storing the slug: {0}")]
    StoreSlug(String),
    /// Storing a packed build output in the blobstore.
    #[error("{0}")]
    Store(String),
    /// The job's directory or spec on this host.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Dir(#[from] flynn_job::Error),
}

impl JobError {
    /// Whom the job's failure counts against. The host's own trouble (its network, cgroups,
    /// job directory) pauses placement on that host instead of backing the app off. Whatever
    /// the release itself could cause (its layers, volumes, builds) stays the app's: put on
    /// the host, a broken release would take every host out of placement, for every app.
    pub fn fault(&self) -> JobFault {
        match self {
            JobError::ReleaseGone(_) => JobFault::Neither,
            JobError::NoBlobstore(_)
            | JobError::Cgroup(_)
            | JobError::NoJobNetwork(_)
            | JobError::Network(_)
            | JobError::NoPort
            | JobError::Io(_)
            | JobError::Dir(_) => JobFault::Host,
            // A volume recorded or taken up through the cluster state is a failed write
            // to it: the app's backoff keeps that from spinning.
            JobError::FetchLayer { .. }
            | JobError::UnpackLayer { .. }
            | JobError::Limits(_)
            | JobError::Volume { .. }
            | JobError::RecordVolume { .. }
            | JobError::TakeUpVolume { .. }
            | JobError::Build(_)
            | JobError::StoreSlug(_)
            | JobError::Store(_) => JobFault::App,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_the_host_s_own_trouble_is_the_host_s_and_the_release_s_the_app_s() {
        let host = [
            JobError::Network("no free job address on this host".into()),
            JobError::NoPort,
            JobError::Cgroup("mkdir: no space left on device".into()),
            JobError::NoJobNetwork("no job subnet".into()),
            JobError::NoBlobstore(""),
            JobError::Io(std::io::Error::other("job directory")),
        ];
        for e in &host {
            assert_eq!(e.fault(), JobFault::Host, "{e}");
        }
        // A broken release fails on every host: put on the hosts, it would stop placement
        // for every app.
        let app = [
            JobError::FetchLayer {
                layer: "sha512-ab".into(),
                why: "not found".into(),
            },
            JobError::UnpackLayer {
                layer: "sha512-ab".into(),
                why: "not a tar".into(),
            },
            JobError::Volume {
                path: "/data".into(),
                why: "size over the pool's".into(),
            },
            JobError::Limits("pids.max 5000000: invalid argument".into()),
            JobError::TakeUpVolume {
                id: "v1".into(),
                path: "/data".into(),
                why: "no leader".into(),
            },
        ];
        for e in &app {
            assert_eq!(e.fault(), JobFault::App, "{e}");
        }
        assert_eq!(
            JobError::ReleaseGone("r1".into()).fault(),
            JobFault::Neither
        );
    }
}
