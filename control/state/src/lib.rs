//! The cluster state machine, split by area: apps and env, routes and certificates,
//! discovery, the cluster itself, volumes, blobs, jobs (releases, formations, jobs,
//! their backoff and subnets, and the deploy verdict), and git repositories.
//!
//! Pure and deterministic: [`ClusterState::apply`] takes a command and returns the result
//! plus the events it caused; it does no I/O and reads no clock (time arrives inside commands
//! from the proposing host). The Raft crate persists what [`ClusterState::take_dirty`] names.
//!
//! Each area is a module with its records (a struct implementing [`area::Area`]), its own
//! command enum and its tests; the `areas!` list below registers it, one line each.

pub mod apps;
pub mod area;
pub mod blobs;
pub mod cluster;
pub mod discovery;
pub mod git;
pub mod jobs;
pub mod resources;
pub mod routes;
pub mod sessions;
pub mod validate;
pub mod volumes;

use serde::{Deserialize, Serialize};

pub use apps::AppsCommand;
pub use area::{Area, Cx, Table};
pub use blobs::BlobsCommand;
pub use cluster::ClusterCommand;
pub use discovery::DiscoveryCommand;
pub use flynn_model::*;
pub use git::GitCommand;
pub use jobs::{build_memory, JobsCommand, BUILD_MEMORY_ENV};
pub use resources::ResourcesCommand;
pub use routes::RoutesCommand;
pub use sessions::SessionsCommand;
pub use volumes::VolumesCommand;

use area::to_json;

/// Registers the areas: each line is `field: Variant(CommandType) => AreaType`. It makes the
/// state's field (flattened into its JSON), the command variant (tagged `"area"`), the
/// `From` conversion, and the dispatch and record plumbing over every area.
macro_rules! areas {
    ($( $field:ident : $variant:ident ( $cmd:ty ) => $area:ty ),* $(,)?) => {
        /// The whole cluster state: a revision plus one part per area.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct ClusterState {
            /// Bumped by every command that changes something.
            pub revision: u64,
            $( #[serde(flatten)] pub $field: $area, )*
            #[serde(skip)]
            dirty: Vec<(Table, String)>,
        }

        /// A command proposed through Raft: one area's command, or one of the two that act
        /// on the whole state.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "area", rename_all = "snake_case")]
        pub enum Command {
            $( $variant($cmd), )*
            /// Replaces the whole state (quorum-loss recovery seeds a new cluster with this).
            Restore { state: Box<ClusterState> },
            /// Restores a cluster backup into this new cluster (`flynn-host bootstrap
            /// --from-backup`): refused unless the cluster is fresh; what names hosts stays
            /// this cluster's ([`ClusterState::restored_onto`]), in one step of the log.
            RestoreBackup { state: Box<ClusterState> },
            /// Several commands in one log entry, applied in order, each with its own result
            /// and revision. The leader batches concurrent proposals so one fsync serves many.
            Batch { commands: Vec<Command> },
        }

        /// What a log line says of a command: its area, or how many a batch holds.
        impl std::fmt::Display for Command {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self {
                    $( Command::$variant(_) => f.write_str(stringify!($variant)), )*
                    Command::Restore { .. } => f.write_str("Restore"),
                    Command::RestoreBackup { .. } => f.write_str("RestoreBackup"),
                    Command::Batch { commands } => write!(f, "Batch of {}", commands.len()),
                }
            }
        }

        $( impl From<$cmd> for Command {
            fn from(c: $cmd) -> Self {
                Command::$variant(c)
            }
        } )*

        impl ClusterState {
            fn dispatch(&mut self, cmd: Command, cx: &mut Cx) -> ApplyResult {
                match cmd {
                    $( Command::$variant(c) => <$area as Area>::apply(self, c, cx), )*
                    Command::Restore { state } => self.restore(*state, cx),
                    Command::RestoreBackup { state } => {
                        if !self.is_fresh() {
                            return Err(StateError::Conflict(
                                "a backup is restored only into a new cluster; this one has apps or releases already".into(),
                            ));
                        }
                        let merged = state.restored_onto(self);
                        self.restore(merged, cx)
                    }
                    Command::Batch { .. } => unreachable!("batches are unrolled in apply()"),
                }
            }

            fn area_tables(&self) -> Vec<(Table, &dyn area::Records)> {
                let mut v = Vec::new();
                $( v.extend(self.$field.tables()); )*
                v
            }

            fn area_tables_mut(&mut self) -> Vec<(Table, &mut dyn area::Records)> {
                let mut v = Vec::new();
                $( v.extend(self.$field.tables_mut()); )*
                v
            }

            /// Everything the data plane needs, as events, for a watcher starting from scratch.
            pub fn data_plane_snapshot(&self) -> Vec<Event> {
                let mut kinds = Vec::new();
                $( self.$field.data_plane_snapshot(&mut kinds); )*
                kinds
                    .into_iter()
                    .map(|kind| Event { revision: self.revision, kind })
                    .collect()
            }
        }
    };
}

areas! {
    apps: Apps(AppsCommand) => apps::Apps,
    routes: Routes(RoutesCommand) => routes::Routes,
    discovery: Discovery(DiscoveryCommand) => discovery::Discovery,
    cluster: Cluster(ClusterCommand) => cluster::Cluster,
    volumes: Volumes(VolumesCommand) => volumes::Volumes,
    blobs: Blobs(BlobsCommand) => blobs::Blobs,
    jobs: Jobs(JobsCommand) => jobs::Jobs,
    git: Git(GitCommand) => git::Git,
    resources: Resources(ResourcesCommand) => resources::Resources,
    sessions: Sessions(SessionsCommand) => sessions::Sessions,
}

/// The state's own record: its revision, stored as `meta/revision`.
const META: Table = Table("meta/");
const META_REVISION: &str = "revision";

/// What a successfully applied command returns to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Done,
    App { app: App },
    Route { route: Route },
    Certificate { certificate: Certificate },
    Instance { instance: Instance },
    Volume { volume: volumes::Volume },
    Blob { file: blobs::BlobFile },
    Release { release: Release },
    Formation { formation: Formation },
    Job { job: Job },
    Jobs { jobs: Vec<Job> },
    Subnet { index: u32 },
    Subnets { indexes: Vec<u32> },
    Expired { count: usize },
    Batch { results: Vec<ApplyResult> },
    GitRepo { repo: git::Repo },
    Resource { resource: resources::Resource },
    Shape { shape: resources::DbShape },
}

/// A result of another kind than the command promises: a bug, never the client's fault.
#[derive(Debug, thiserror::Error)]
#[error("expected a {expected} result, got {got:?}")]
pub struct UnexpectedResponse {
    pub expected: &'static str,
    pub got: Box<Response>,
}

/// Typed results: `App::try_from(response)` instead of matching the generic response.
macro_rules! typed_response {
    ($($variant:ident { $field:ident } => $ty:ty),* $(,)?) => {$(
        impl TryFrom<Response> for $ty {
            type Error = UnexpectedResponse;
            fn try_from(r: Response) -> Result<Self, UnexpectedResponse> {
                match r {
                    Response::$variant { $field } => Ok($field),
                    got => Err(UnexpectedResponse { expected: stringify!($field), got: Box::new(got) }),
                }
            }
        }
    )*};
}

typed_response! {
    App { app } => App,
    Route { route } => Route,
    Certificate { certificate } => Certificate,
    Instance { instance } => Instance,
    Volume { volume } => volumes::Volume,
    Blob { file } => blobs::BlobFile,
    Release { release } => Release,
    Formation { formation } => Formation,
    Job { job } => Job,
    Jobs { jobs } => Vec<Job>,
    GitRepo { repo } => git::Repo,
    Resource { resource } => resources::Resource,
    Shape { shape } => resources::DbShape,
}

/// Why a command was refused. Refusal is deterministic: every host refuses the same command
/// the same way, and a refused command changes nothing (not even the revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum StateError {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
}

/// The result of applying one log entry, as stored in the Raft response.
pub type ApplyResult = Result<Response, StateError>;

impl ClusterState {
    /// Whether applying this replaces the whole state (watchers then start over).
    pub fn replaces_all(cmd: &Command) -> bool {
        match cmd {
            Command::Restore { .. } | Command::RestoreBackup { .. } => true,
            Command::Batch { commands } => commands.iter().any(Self::replaces_all),
            _ => false,
        }
    }

    /// Applies one command. On error nothing is changed.
    pub fn apply(&mut self, cmd: Command) -> (ApplyResult, Vec<Event>) {
        if let Command::Batch { commands } = cmd {
            if commands.iter().any(|c| matches!(c, Command::Batch { .. })) {
                let nested = StateError::Invalid("batches do not nest".into());
                return (Err(nested), Vec::new());
            }
            let mut events = Vec::new();
            let results = commands
                .into_iter()
                .map(|c| {
                    let (r, ev) = self.apply(c);
                    events.extend(ev);
                    r
                })
                .collect();
            return (Ok(Response::Batch { results }), events);
        }
        let mut cx = Cx::new(self.revision + 1);
        let result = self.dispatch(cmd, &mut cx);
        match &result {
            Ok(_) if cx.dirty.is_empty() => {}
            Ok(_) => {
                self.revision = cx.revision;
                self.dirty.append(&mut cx.dirty);
                self.dirty.push((META, META_REVISION.into()));
            }
            Err(_) => debug_assert!(cx.dirty.is_empty(), "a refused command touched state"),
        }
        (result, cx.events)
    }

    /// Replaces everything; every old and new record is rewritten, and the revision moves
    /// past both the old and the restored one, so watchers never see it go backwards.
    fn restore(&mut self, state: ClusterState, cx: &mut Cx) -> ApplyResult {
        cx.revision = cx.revision.max(state.revision + 1);
        cx.dirty.extend(self.all_keys());
        *self = ClusterState {
            dirty: std::mem::take(&mut self.dirty),
            ..state
        };
        cx.dirty.extend(self.all_keys());
        Ok(Response::Done)
    }

    /// This state, read from a backup, as it is restored into the new cluster `into`:
    /// apps, env, releases, formations, images, routes, certificates, keys and the domain
    /// come from the backup; what names hosts (discovery instances, jobs, volumes, job
    /// subnets, `DISCOVERD_PEERS`) is the new cluster's, and the scheduler starts the
    /// formations' jobs afresh. Blob files uploaded into the new cluster already are kept
    /// as uploaded (with their new copies); the backup's other files (those on S3, GCS or
    /// Azure, which a backup references) keep their records.
    pub fn restored_onto(mut self, into: &ClusterState) -> ClusterState {
        self.discovery = into.discovery.clone();
        // Volumes received from the backup are recorded as the new hosts hold them, and
        // keep the owners they had (their apps did not exist yet when they arrived).
        let owners: std::collections::BTreeMap<String, volumes::Volume> = self
            .volumes
            .volumes
            .values()
            .map(|v| (v.id.clone(), v.clone()))
            .collect();
        self.volumes = into.volumes.clone();
        for v in self.volumes.volumes.values_mut() {
            if let (None, Some(old)) = (&v.app, owners.get(&v.id)) {
                v.app = old.app.clone();
                v.job = old.job.clone();
                v.proc_type = old.proc_type.clone();
                v.path = old.path.clone();
            }
        }
        // A replicated database's shape names the old hosts; its servers start afresh and
        // the leader names their roles again.
        self.resources.shapes.clear();
        self.jobs.jobs = into.jobs.jobs.clone();
        self.jobs.backoff = into.jobs.backoff.clone();
        self.jobs.host_faults = into.jobs.host_faults.clone();
        self.jobs.subnets = into.jobs.subnets.clone();
        self.jobs.extra_subnets = into.jobs.extra_subnets.clone();
        let mut blobs = into.blobs.blobs.clone();
        for (path, file) in std::mem::take(&mut self.blobs.blobs) {
            blobs.entry(path).or_insert(file);
        }
        self.blobs.blobs = blobs;
        // The backup's repositories live on none of the new hosts: the first to serve one
        // restores it from its copy in the blobstore.
        for repo in self.git.repos.values_mut() {
            repo.host = 0;
            repo.lock = None;
        }
        // A session belongs to the cluster that opened it.
        self.sessions = into.sessions.clone();
        let peers = into
            .apps
            .get("discoverd")
            .and_then(|a| a.env.global.get("DISCOVERD_PEERS").cloned());
        if let (Some(peers), Some(d)) = (peers, self.apps.apps.get_mut("discoverd")) {
            d.env.global.insert("DISCOVERD_PEERS".into(), peers);
        }
        self.revision = into.revision;
        self
    }

    /// Whether nothing but what bootstrap makes is here yet: a restore goes only into
    /// such a cluster.
    pub fn is_fresh(&self) -> bool {
        self.apps.values().all(|a| a.system)
            && self.jobs.releases.is_empty()
            && self.jobs.formations.is_empty()
    }

    pub fn bootstrapped(&self) -> bool {
        self.cluster.bootstrapped
    }

    pub fn app(&self, name: &str) -> Result<&App, StateError> {
        self.apps
            .get(name)
            .ok_or_else(|| StateError::NotFound(format!("app {name:?}")))
    }

    /// The controller keys accepted by the API: the `web` override of `AUTH_KEY` if set,
    /// else the global one; a comma-separated list.
    pub fn controller_keys(&self) -> Vec<String> {
        self.apps
            .get("controller")
            .and_then(|a| a.env.get(Some("web"), "AUTH_KEY"))
            .map(|keys| {
                keys.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    // ---- persistence: one record per key, over every area's tables ----

    /// Keys changed since the last call, each once, as `(table, key)`.
    pub fn take_dirty(&mut self) -> Vec<(Table, String)> {
        let mut d = std::mem::take(&mut self.dirty);
        d.sort();
        d.dedup();
        d
    }

    /// Drops pending dirty marks (after a full rewrite of the stored state).
    pub fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    fn all_keys(&self) -> Vec<(Table, String)> {
        let mut keys = vec![(META, META_REVISION.to_string())];
        for (table, records) in self.area_tables() {
            keys.extend(records.keys().into_iter().map(|k| (table, k)));
        }
        keys
    }

    /// Every record of the state as `(storage key, bytes)`, for a full rewrite.
    pub fn records(&self) -> Vec<(String, Vec<u8>)> {
        self.all_keys()
            .into_iter()
            .filter_map(|(t, k)| self.record(t, &k).map(|v| (format!("{}{k}", t.0), v)))
            .collect()
    }

    /// The stored form of one record, `None` if it no longer exists.
    pub fn record(&self, table: Table, key: &str) -> Option<Vec<u8>> {
        if table == META {
            return (key == META_REVISION).then(|| to_json(&self.revision));
        }
        self.area_tables()
            .into_iter()
            .find(|(t, _)| *t == table)
            .and_then(|(_, records)| records.encode(key))
    }

    /// Loads one stored record by its storage key (the inverse of [`ClusterState::records`]).
    pub fn load_record(&mut self, storage_key: &str, bytes: &[u8]) -> Result<(), String> {
        if let Some(key) = storage_key.strip_prefix(META.0) {
            if key != META_REVISION {
                return Err(format!("unknown meta record {key:?}"));
            }
            self.revision = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            return Ok(());
        }
        let (key, records) = self
            .area_tables_mut()
            .into_iter()
            .find_map(|(t, r)| storage_key.strip_prefix(t.0).map(|k| (k, r)))
            .ok_or_else(|| format!("no table holds {storage_key:?}"))?;
        records.decode(key, bytes)
    }
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
