//! One error for everything that keeps a job from running. Its text is what the job's
//! record says, and what a caller attached to a one-off job or build is told.

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
