//! The job runner: a host component that starts the jobs the scheduler placed on this host,
//! as containers (`flynn-job`), reports their states, registers those with ports in
//! discovery as `APP-TYPE`, captures their output into the host's log files, and stops them
//! when asked. It also keeps this host registered as alive (service `flynn-host`), which is
//! how the scheduler notices a host that stopped answering.
//!
//! Each job has its own network namespace and address on its host's subnet, routed between
//! hosts ([`network`]); a process type may ask for the host's network instead, and a host
//! without `ip`/`nft` runs every job in its network (a free host port as `$PORT`).

pub mod build;
pub mod logs;
pub mod network;
pub mod oneoff;
pub mod pty;
pub mod scheduler;
pub mod system_image;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flynn_job::cgroup::{Hierarchy, JobCgroup};
use flynn_job::init::{ContainerSpec, EXIT_NOT_FOUND, EXIT_SETUP, INIT_PREFIX};
use flynn_job::layer::LayerStore;
use flynn_job::JobDir;
use flynn_state::jobs::JobsCommand;
use flynn_state::{Command, DiscoveryCommand, Job, JobState, ProcessType, Release};
use futures::future::BoxFuture;
use tokio::io::AsyncRead;

use crate::blobstore::Blobstore;
use crate::component::{Component, LocalState};

/// The service every host running jobs registers in, so the scheduler knows it is alive.
pub const HOST_SERVICE: &str = "flynn-host";
/// The `flynn-host` instance's meta key for the bytes of job memory it takes.
pub const MEMORY_META: &str = "memory";
/// A host not heard from for this long is down: its jobs are started elsewhere.
pub const HOST_TTL: Duration = Duration::from_secs(10);
const HOST_HEARTBEAT: Duration = Duration::from_secs(2);
/// Job instances' TTL in discovery (refreshed every few host heartbeats).
const JOB_TTL: Duration = Duration::from_secs(30);
/// How long a stopping job has after SIGTERM before everything in it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a job's port has to start answering before the job counts as failed.
const UP_TIMEOUT: Duration = Duration::from_secs(60);

/// Job runner flags of `flynn-host daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct JobsArgs {
    /// Run no jobs on this host.
    #[arg(long)]
    pub no_jobs: bool,
    /// Where job output is written, one file per app.
    #[arg(long, default_value = "/var/log/flynn")]
    pub log_dir: PathBuf,
    /// Size at which an app's log file rotates (K, M, G suffixes).
    #[arg(long, default_value = "100M")]
    pub log_max_size: String,
    /// Ports of this host given as `$PORT` to jobs in the host's network (FIRST-LAST).
    #[arg(long, default_value = "49152-59999")]
    pub job_ports: String,
    /// Job networking: `routed` (an address of its own per job, on this host's subnet),
    /// `host` (the host's network), `auto` (routed if this host can, else host, saying so).
    #[arg(long, default_value = "auto", value_parser = ["auto", "routed", "host"])]
    pub job_network: String,
    /// Memory the scheduler may reserve for jobs on this host (the sum of their process
    /// types' memory limits): a size, or `auto` for the host's total memory.
    #[arg(long, default_value = "auto")]
    pub job_memory: String,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub layers_dir: PathBuf,
    pub jobs_dir: PathBuf,
    pub ports: std::ops::RangeInclusive<u16>,
    pub network: String,
    /// Bytes of job memory limits this host takes (see `--job-memory`).
    pub memory: u64,
}

/// The host's total memory, from /proc/meminfo.
fn total_memory() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no MemTotal in /proc/meminfo"))?;
    Ok(kib * 1024)
}

impl JobsArgs {
    pub fn validate(&self, data_dir: &std::path::Path) -> anyhow::Result<Option<JobsConfig>> {
        if self.no_jobs {
            return Ok(None);
        }
        let log_max_bytes = crate::components::volumes::parse_size(&self.log_max_size)
            .map_err(|e| anyhow::anyhow!("--log-max-size: {e}"))?;
        anyhow::ensure!(log_max_bytes >= 1024, "--log-max-size must be at least 1K");
        let ports = self
            .job_ports
            .split_once('-')
            .and_then(|(a, b)| Some(a.trim().parse::<u16>().ok()?..=b.trim().parse::<u16>().ok()?))
            .filter(|r| !r.is_empty() && *r.start() > 0)
            .ok_or_else(|| anyhow::anyhow!("--job-ports {:?} is not FIRST-LAST", self.job_ports))?;
        let memory = match self.job_memory.as_str() {
            "auto" => total_memory()?,
            size => crate::components::volumes::parse_size(size)
                .map_err(|e| anyhow::anyhow!("--job-memory: {e}"))?,
        };
        Ok(Some(JobsConfig {
            memory,
            log_dir: self.log_dir.clone(),
            log_max_bytes,
            layers_dir: data_dir.join("images").join("layers"),
            jobs_dir: data_dir.join("jobs"),
            ports,
            network: self.job_network.clone(),
        }))
    }
}

/// A job this host started and has not yet cleaned up.
struct Local {
    job: Job,
    /// The container init's pid, once started.
    pid: AtomicU64,
    stop: tokio::sync::Notify,
    stopping: AtomicBool,
    /// A one-off job's attachable output, and its stdin as uploaded.
    io: Option<Arc<oneoff::OneOffIo>>,
    stdin: Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>,
}

impl Local {
    /// A line from the runner to whoever is attached to a one-off job (its stderr).
    fn tell(&self, msg: &str) {
        if let Some(io) = &self.io {
            io.output(oneoff::STDERR, format!("flynn: {msg}\n").into());
        }
    }
}

pub struct JobRunner {
    host: u64,
    /// The address other hosts' routers reach this host's jobs at.
    ip: String,
    /// The host's API address, its identity in service `flynn-host`.
    api_addr: String,
    cfg: JobsConfig,
    cgroups: Option<Hierarchy>,
    layers: LayerStore,
    blobstore: Option<Arc<Blobstore>>,
    /// Where jobs' data volumes are made.
    volumes: Arc<crate::components::volumes::VolumesComponent>,
    pub logs: Arc<logs::Logs>,
    /// One-off jobs' output and stdin, for `flynn run`.
    pub attachments: oneoff::Attachments,
    /// Routed job networking, once set up (`None`: jobs use the host's network).
    net: OnceLock<Option<network::HostNet>>,
    /// Why jobs use the host's network, if they do.
    net_note: Mutex<Option<String>>,
    local: OnceLock<LocalState>,
    running: Mutex<HashMap<String, Arc<Local>>>,
    ports: Mutex<BTreeSet<u16>>,
    /// Data volumes taken up by jobs starting on this host (volume → job), so two jobs
    /// never take the same one before the state says so.
    claimed: Mutex<HashMap<String, String>>,
    /// One layer unpacks at a time (two jobs of one image share the work).
    unpack: tokio::sync::Mutex<()>,
    started: AtomicU64,
}

impl JobRunner {
    /// `api_addr` is the host's API address (`IP:PORT`): its jobs serve on that IP.
    pub fn start(
        cfg: &JobsConfig,
        host: u64,
        api_addr: String,
        blobstore: Option<Arc<Blobstore>>,
        volumes: Arc<crate::components::volumes::VolumesComponent>,
    ) -> anyhow::Result<Self> {
        let ip = match api_addr.rsplit_once(':') {
            Some((ip, _)) => ip.trim_matches(['[', ']']).to_string(),
            None => api_addr.clone(),
        };
        let cgroups = match Hierarchy::detect() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "no cgroups: job limits are not enforced on this host");
                None
            }
        };
        let layers = LayerStore::open(cfg.layers_dir.clone())?;
        std::fs::create_dir_all(&cfg.jobs_dir)?;
        // Job directories left by a daemon that stopped abruptly belong to dead jobs.
        if let Ok(entries) = std::fs::read_dir(&cfg.jobs_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let logs = Arc::new(logs::Logs::open(
            cfg.log_dir.clone(),
            cfg.log_max_bytes,
            host,
        )?);
        logs.serve_system_apps();
        tracing::info!(
            cgroups = cgroups.as_ref().map(|h| h.version()),
            log_dir = %cfg.log_dir.display(),
            "job runner ready"
        );
        Ok(JobRunner {
            host,
            ip,
            api_addr,
            cfg: cfg.clone(),
            cgroups,
            layers,
            blobstore,
            volumes,
            logs,
            attachments: oneoff::Attachments::default(),
            net: OnceLock::new(),
            net_note: Mutex::new(None),
            local: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
            ports: Mutex::new(BTreeSet::new()),
            claimed: Mutex::new(HashMap::new()),
            unpack: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
        })
    }

    fn cgroup_name(&self, job: &str) -> String {
        format!("h{}-{job}", self.host)
    }

    fn instance_id(&self) -> String {
        flynn_state::host_instance_id(self.host)
    }

    /// The jobs this host runs now (for `flynn-host ps`).
    pub fn local_jobs(&self) -> Vec<(Job, u64)> {
        self.running
            .lock()
            .expect("jobs lock")
            .values()
            .map(|l| (l.job.clone(), l.pid.load(Ordering::Relaxed)))
            .collect()
    }

    fn alloc_port(&self) -> Option<u16> {
        let mut used = self.ports.lock().expect("ports lock");
        let port =
            self.cfg.ports.clone().find(|p| {
                !used.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok()
            })?;
        used.insert(port);
        Some(port)
    }

    async fn report(
        &self,
        local: &LocalState,
        id: &str,
        state: JobState,
        addr: Option<String>,
        exit_status: Option<i32>,
        error: Option<String>,
    ) {
        let cmd = JobsCommand::UpdateJob {
            id: id.into(),
            state,
            addr,
            exit_status,
            error,
            now_ms: crate::now_ms(),
        };
        propose_retrying(local, cmd.into()).await;
    }

    /// Claims this host's job subnet and sets up routed job networking, unless this host
    /// runs jobs in its own network (`--job-network host`, or `auto` where it cannot).
    async fn setup_network(&self, local: &LocalState) {
        if self.cfg.network == "host" {
            let _ = self.net.set(None);
            *self.net_note.lock().expect("net note") = Some("--job-network host".into());
            return;
        }
        let mut changes = local.changes();
        while !local.read(|s| s.bootstrapped()) {
            if changes.changed().await.is_err() {
                return;
            }
        }
        let index = loop {
            let claim = JobsCommand::ClaimSubnet { host: self.host };
            match local.node().propose(claim).await {
                Ok(flynn_state::Response::Subnet { index }) => break index,
                Ok(other) => {
                    tracing::error!(?other, "unexpected answer to a subnet claim");
                    return;
                }
                Err(e) if e.is_refusal() => {
                    tracing::error!(error = %e, "no job subnet for this host");
                    *self.net_note.lock().expect("net note") = Some(e.to_string());
                    let _ = self.net.set(None);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "subnet claim not applied; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let host = self.host;
        match tokio::task::spawn_blocking(move || network::HostNet::start(host, index)).await {
            Ok(Ok(hn)) => {
                tracing::info!(subnet = %hn.subnet(), "jobs get addresses of their own");
                let _ = self.net.set(Some(hn));
            }
            Ok(Err(why)) => {
                let level_error = self.cfg.network == "routed";
                if level_error {
                    tracing::error!(error = %why, "jobs cannot have their own network");
                } else {
                    tracing::warn!(error = %why, "jobs run in the host's network");
                }
                *self.net_note.lock().expect("net note") = Some(why);
                let _ = self.net.set(None);
            }
            Err(e) => {
                *self.net_note.lock().expect("net note") = Some(e.to_string());
                let _ = self.net.set(None);
            }
        }
    }

    /// Routes to the other hosts' job subnets.
    fn route_subnets(&self, local: &LocalState) {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return;
        };
        let members: BTreeMap<u64, String> = local
            .members()
            .into_iter()
            .filter_map(|(id, addr)| Some((id, addr.rsplit_once(':')?.0.to_string())))
            .collect();
        let peers: BTreeMap<u32, String> = local.read(|s| {
            s.jobs
                .subnets
                .iter()
                .filter_map(|(host, index)| {
                    let ip = members.get(&host.parse().ok()?)?;
                    Some((*index, ip.clone()))
                })
                .collect()
        });
        // `ip` runs here: off the async workers' hands.
        tokio::task::block_in_place(|| hn.route_peers(&peers, &self.ip));
    }

    /// One pass over the jobs placed on this host.
    fn reconcile(self: &Arc<Self>, local: &LocalState) {
        self.route_subnets(local);
        let mine: Vec<Job> = local.read(|s| {
            s.jobs
                .jobs
                .values()
                .filter(|j| j.host == self.host && j.state.is_active())
                .cloned()
                .collect()
        });
        let mut running = self.running.lock().expect("jobs lock");
        for job in mine {
            match (job.state, running.get(&job.id)) {
                (JobState::Pending, None) => {
                    let (io, stdin) = if job.oneoff {
                        let (tx, rx) = tokio::sync::mpsc::channel(16);
                        let io = oneoff::OneOffIo::new(job.stdin.then_some(tx));
                        self.attachments.insert(&job.id, io.clone());
                        (Some(io), job.stdin.then_some(rx))
                    } else {
                        (None, None)
                    };
                    let l = Arc::new(Local {
                        job: job.clone(),
                        pid: AtomicU64::new(0),
                        stop: tokio::sync::Notify::new(),
                        stopping: AtomicBool::new(false),
                        io,
                        stdin: Mutex::new(stdin),
                    });
                    running.insert(job.id.clone(), l.clone());
                    tokio::spawn(self.clone().run_job(local.clone(), l));
                }
                (JobState::Stopping, Some(l)) if !l.stopping.swap(true, Ordering::SeqCst) => {
                    l.stop.notify_one();
                }
                (state, None) => {
                    // Placed here but not run by this daemon: it was lost with a restart.
                    let (next, why) = match state {
                        JobState::Stopping => (JobState::Done, None),
                        _ => (
                            JobState::Failed,
                            Some("its host restarted while it ran".to_string()),
                        ),
                    };
                    let me = self.clone();
                    let local = local.clone();
                    tokio::spawn(async move {
                        me.report(&local, &job.id, next, None, None, why).await;
                    });
                }
                _ => {}
            }
        }
    }

    /// Runs one job from placement to cleanup.
    async fn run_job(self: Arc<Self>, local: LocalState, l: Arc<Local>) {
        let id = l.job.id.clone();
        self.started.fetch_add(1, Ordering::Relaxed);
        // Said while it is prepared, not before: the state machine never moves a job back
        // from running to starting, so this may land after a later report.
        {
            let (me, local, id) = (self.clone(), local.clone(), id.clone());
            tokio::spawn(async move {
                me.report(&local, &id, JobState::Starting, None, None, None)
                    .await
            });
        }
        let outcome = match self.prepare(&local, &l).await {
            Ok(prepared) => self.supervise(&local, &l, prepared).await,
            Err(why) => {
                tracing::warn!(job = %id, error = %why, "job could not start");
                self.logs
                    .push(&l.job.app, &id, &l.job.proc_type, "init", why.clone());
                l.tell(&why);
                Outcome {
                    state: JobState::Failed,
                    exit_status: None,
                    error: Some(why),
                }
            }
        };
        // A build that succeeded leaves its slug; one that cannot be stored failed.
        let mut slug = None;
        let mut outcome = outcome;
        if l.job.build.is_some() && outcome.exit_status == Some(0) {
            match self.store_slug(&id).await {
                Ok(layer) => {
                    slug = Some(layer);
                    if let Err(why) = self.store_build_cache(&l.job.app, &id).await {
                        tracing::warn!(job = %id, error = %why, "build cache not kept");
                        l.tell(&format!("the build cache was not kept ({why})"));
                    }
                }
                Err(why) => {
                    l.tell(&why);
                    outcome = Outcome {
                        state: JobState::Failed,
                        exit_status: Some(1),
                        error: Some(why),
                    };
                }
            }
        }
        // What `flynn run` exits with: the command's status, 126 if it never ran.
        let outcome_exit = outcome.exit_status.unwrap_or(126);
        self.report(
            &local,
            &id,
            outcome.state,
            None,
            outcome.exit_status,
            outcome.error,
        )
        .await;
        if let Some(io) = &l.io {
            let result = slug.map(|layer| serde_json::json!({ "slug": layer }));
            io.finish(outcome_exit, result);
            self.attachments.ended(&id);
        }
        self.running.lock().expect("jobs lock").remove(&id);
        let _ = std::fs::remove_dir_all(self.cfg.jobs_dir.join(&id));
        self.drop_volumes(&local, &l.job).await;
    }

    /// Packs a finished build's `/app` and stores it in the blobstore as a layer.
    async fn store_slug(&self, id: &str) -> Result<flynn_state::Layer, String> {
        let packed = self.pack_build(id, "slug.tar.gz", build::pack_slug).await?;
        let path = flynn_state::layer_path(&packed.sha512);
        self.store_packed(&path, &packed)
            .await
            .map_err(|e| format!("storing the slug: {e}"))?;
        Ok(flynn_state::Layer {
            sha512: packed.sha512,
            size: packed.size,
            compression: flynn_state::LayerCompression::Gzip,
        })
    }

    /// Packs part of a finished build into `name` in its job directory: the file, its
    /// SHA-512 and size.
    async fn pack_build(
        &self,
        id: &str,
        name: &str,
        pack: build::Packer,
    ) -> Result<build::Packed, String> {
        let job_dir = self.cfg.jobs_dir.join(id);
        let out = job_dir.join(name);
        let target = out.clone();
        let (sha512, size) = tokio::task::spawn_blocking(move || pack(&job_dir, &target))
            .await
            .map_err(|e| e.to_string())??;
        Ok(build::Packed {
            file: out,
            sha512,
            size,
        })
    }

    /// Stores a packed file at `path` in the blobstore, checked against its digest.
    async fn store_packed(&self, path: &str, packed: &build::Packed) -> Result<(), String> {
        let blobstore = self
            .blobstore
            .as_ref()
            .ok_or("this host runs no blobstore")?;
        let file = tokio::fs::File::open(&packed.file)
            .await
            .map_err(|e| e.to_string())?;
        let body = tokio_util::io::ReaderStream::new(file);
        blobstore
            .put(path, body, Some(&packed.sha512))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Unpacks the app's last build cache, if the blobstore holds one, into a build's
    /// `/tmp/cache`.
    async fn restore_build_cache(
        &self,
        app: &str,
        job_dir: &std::path::Path,
    ) -> Result<(), String> {
        let Some(blobstore) = &self.blobstore else {
            return Ok(());
        };
        let path = build::cache_path(app);
        if blobstore.file(&path).is_none() {
            return Ok(());
        }
        let archive = blobstore
            .local_copy(&path)
            .await
            .map_err(|e| e.to_string())?;
        let job_dir = job_dir.to_path_buf();
        tokio::task::spawn_blocking(move || build::restore_cache(&job_dir, &archive))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Keeps a finished build's `/tmp/cache` for the app's next build (unless unchanged).
    async fn store_build_cache(&self, app: &str, id: &str) -> Result<(), String> {
        let Some(blobstore) = &self.blobstore else {
            return Ok(());
        };
        let packed = self
            .pack_build(id, "cache.tar.gz", build::pack_cache)
            .await?;
        let path = build::cache_path(app);
        if blobstore
            .file(&path)
            .is_some_and(|f| f.sha512 == packed.sha512)
        {
            return Ok(());
        }
        self.store_packed(&path, &packed).await
    }

    /// The id of the job's `i`th data volume.
    fn volume_id(job: &str, i: usize) -> String {
        let mut id: String = job.chars().take(58).collect();
        id.push_str(&format!("-v{i}"));
        id
    }

    /// Makes and records the job's data volumes; where each is mounted.
    async fn data_volumes(
        &self,
        local: &LocalState,
        job: &Job,
        proc: &flynn_state::ProcessType,
    ) -> Result<Vec<flynn_job::init::VolumeMount>, String> {
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
                .map_err(|e| format!("data volume for {}: {e}", req.path))?;
            let mut record =
                self.volumes
                    .record(&info, None, Some(job.app.clone()), Some(job.id.clone()));
            record.proc_type = Some(job.proc_type.clone());
            record.path = Some(req.path.clone());
            let put = flynn_state::VolumesCommand::PutVolume { volume: record };
            if let Err(e) = local.node().propose(put).await {
                let _ = tokio::task::block_in_place(|| self.volumes.provider.delete(&id));
                return Err(format!("recording the data volume for {}: {e}", req.path));
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
        local: &LocalState,
        job: &Job,
        path: &str,
    ) -> Result<Option<flynn_job::init::VolumeMount>, String> {
        let found = {
            let mut claimed = self.claimed.lock().expect("claimed lock");
            let found = local.read(|s| {
                let active: Vec<&str> = s
                    .jobs
                    .jobs
                    .values()
                    .filter(|j| j.state.is_active() && j.id != job.id)
                    .map(|j| j.id.as_str())
                    .collect();
                s.volumes
                    .volumes
                    .values()
                    .filter(|v| v.host == self.host && !claimed.contains_key(&v.id))
                    .find(|v| v.free_for(&job.app, &job.proc_type, path, &active))
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
        if let Err(e) = local.node().propose(put).await {
            self.claimed.lock().expect("claimed lock").remove(&id);
            return Err(format!("taking up data volume {id} for {path}: {e}"));
        }
        tracing::info!(volume = %id, job = %job.id, path, "data volume taken up again");
        Ok(Some(flynn_job::init::VolumeMount {
            host: info.path,
            path: path.to_string(),
            readonly: false,
            chown: false,
        }))
    }

    /// Deletes the job's data volumes that ask to go with it; the others stay, recorded
    /// with the job as owner.
    async fn drop_volumes(&self, local: &LocalState, job: &Job) {
        self.claimed
            .lock()
            .expect("claimed lock")
            .retain(|_, j| *j != job.id);
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
                    if let Err(e) = local.node().propose(rm).await {
                        tracing::warn!(error = %e, "a deleted data volume is still recorded");
                    }
                }
                Err(e) => tracing::warn!(volume = %id, error = %e, "data volume not deleted"),
            }
        }
    }

    /// Layers, directories, cgroups and the init's spec; the container is not started yet.
    async fn prepare(&self, local: &LocalState, l: &Local) -> Result<Prepared, String> {
        let job = &l.job;
        // A build runs on its own image with no process type; other jobs on their release.
        let build = job
            .build
            .as_ref()
            .map(|b| (b, local.read(|s| build::Inputs::from_state(s, &job.app))));
        let (image, proc, release_env) = match &build {
            Some((b, inputs)) => {
                let mut proc = ProcessType::default();
                proc.limits.memory = Some(inputs.memory);
                (b.image.clone(), proc, BTreeMap::new())
            }
            None => {
                let release: Release =
                    local
                        .read(|s| s.jobs.releases.get(&job.release).cloned())
                        .ok_or_else(|| format!("release {} no longer exists", job.release))?;
                let proc = release
                    .processes
                    .get(&job.proc_type)
                    .cloned()
                    .unwrap_or_default();
                let env = release.env_for(&job.proc_type);
                (release.image, proc, env)
            }
        };
        let mut lowerdirs = Vec::new();
        for layer in &image.layers {
            lowerdirs.push(self.layer(layer).await?);
        }
        lowerdirs.reverse(); // overlayfs wants the top layer first
        let dir = JobDir::create(&self.cfg.jobs_dir, &job.id).map_err(|e| e.to_string())?;
        let build_mounts = match &build {
            Some((b, inputs)) => {
                let source = self.layer(&b.source).await?;
                let job_dir = dir.dir.clone();
                let mounts =
                    tokio::task::block_in_place(|| build::prepare(&job_dir, &source, inputs))?;
                if let Err(why) = self.restore_build_cache(&job.app, &job_dir).await {
                    // A cache only saves time: the build goes on without it.
                    l.tell(&format!("the build cache was not restored ({why})"));
                }
                mounts
            }
            None => Vec::new(),
        };
        let cgroup = match &self.cgroups {
            Some(h) => Some(
                h.create(&self.cgroup_name(&job.id), &proc.limits)
                    .map_err(|e| format!("cgroup: {e}"))?,
            ),
            None => None,
        };
        let routed = self
            .net
            .get()
            .and_then(Option::as_ref)
            .filter(|_| !proc.host_network);
        if routed.is_none() && !proc.host_network && self.cfg.network == "routed" {
            let why = self.net_note.lock().expect("net note").clone();
            return Err(format!(
                "this host cannot give jobs their own network: {}",
                why.unwrap_or_else(|| "it is not set up yet".into())
            ));
        }
        let (port, net) = match routed {
            Some(hn) => {
                let published = (proc.ports && !job.oneoff).then_some(network::JOB_PORT);
                (
                    Some(network::JOB_PORT),
                    Some(tokio::task::block_in_place(|| {
                        hn.create(&job.id, published)
                    })?),
                )
            }
            None if proc.ports || job.oneoff => (
                Some(self.alloc_port().ok_or("no free port on this host")?),
                None,
            ),
            None => (None, None),
        };
        // Env: the image's, then the release's, then Flynn's own.
        let mut env: BTreeMap<String, String> = image
            .config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(release_env);
        env.entry("PATH".into()).or_insert_with(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        if job.build.is_some() {
            env.insert("HOME".into(), build::HOME.into());
        }
        env.entry("HOME".into()).or_insert_with(|| "/".into());
        if let Some(p) = port {
            env.insert("PORT".into(), p.to_string());
        }
        env.insert("FLYNN_APP_ID".into(), job.app.clone());
        env.insert("FLYNN_RELEASE_ID".into(), job.release.clone());
        env.insert("FLYNN_PROCESS_TYPE".into(), job.proc_type.clone());
        env.insert("FLYNN_JOB_ID".into(), job.id.clone());
        env.insert("EXTERNAL_IP".into(), self.ip.clone());
        let config = &image.config;
        let args = if !job.args.is_empty() {
            job.args.clone()
        } else if !proc.args.is_empty() {
            proc.args.clone()
        } else {
            config
                .entrypoint
                .iter()
                .chain(&config.cmd)
                .cloned()
                .collect()
        };
        let mut volumes = self.data_volumes(local, job, &proc).await?;
        volumes.extend(build_mounts);
        let spec = ContainerSpec {
            id: job.id.clone(),
            hostname: job.id.chars().take(63).collect(),
            lowerdirs,
            upper: dir.upper(),
            work: dir.work(),
            root: dir.root(),
            args,
            env,
            cwd: if job.build.is_some() {
                "/app".into()
            } else {
                config.working_dir.clone()
            },
            user: config.user.clone(),
            cgroup_procs: cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default(),
            max_fd: proc.limits.max_fd,
            netns: net.as_ref().map(|n| PathBuf::from(n.netns_path())),
            volumes,
            tty: job.tty.is_some(),
        };
        let spec_path = dir.write_spec(&spec).map_err(|e| e.to_string())?;
        let ip = net
            .as_ref()
            .map_or_else(|| self.ip.clone(), |n| n.ip.to_string());
        Ok(Prepared {
            spec_path,
            cgroup,
            port,
            ip,
            net,
            health_path: proc.health_path.clone(),
            register: proc.ports && !job.oneoff,
        })
    }

    /// A layer unpacked on this host, from the blobstore.
    async fn layer(&self, layer: &flynn_state::Layer) -> Result<PathBuf, String> {
        if self.layers.has(&layer.sha512) {
            return Ok(self.layers.path(&layer.sha512));
        }
        let _one_at_a_time = self.unpack.lock().await;
        if self.layers.has(&layer.sha512) {
            return Ok(self.layers.path(&layer.sha512));
        }
        let blobstore = self
            .blobstore
            .as_ref()
            .ok_or("this host runs no blobstore to fetch image layers from")?;
        let path = flynn_state::layer_path(&layer.sha512);
        let object = blobstore
            .local_copy(&path)
            .await
            .map_err(|e| format!("fetching layer {}: {e}", &layer.sha512[..16]))?;
        let store = self.layers.clone();
        let (sha, compression) = (layer.sha512.clone(), layer.compression);
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&object).map_err(|e| e.to_string())?;
            store
                .ensure(&sha, compression, f)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn supervise(&self, local: &LocalState, l: &Arc<Local>, p: Prepared) -> Outcome {
        let job = &l.job;
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return Outcome::failed(format!("cannot find flynn-host itself: {e}")),
        };
        let stdin_rx = l.stdin.lock().expect("stdin lock").take();
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("container-init").arg(&p.spec_path);
        // On a pty the job's three streams are its slave; the runner keeps the master.
        let master = match job.tty {
            Some(size) => {
                let opened = pty::open(size).and_then(|pty| {
                    let (out, err) = (pty.slave.try_clone()?, pty.slave.try_clone()?);
                    cmd.stdin(Stdio::from(pty.slave))
                        .stdout(Stdio::from(out))
                        .stderr(Stdio::from(err));
                    Ok(pty.master)
                });
                match opened {
                    Ok(m) => Some(m),
                    Err(e) => return Outcome::failed(format!("allocating a terminal: {e}")),
                }
            }
            None => {
                cmd.stdin(if stdin_rx.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
                None
            }
        };
        let spawned = cmd.spawn();
        // Its copies of a pty's slave close here, so the master sees the job's end.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => return Outcome::failed(format!("starting the container: {e}")),
        };
        l.pid
            .store(child.id().unwrap_or(0) as u64, Ordering::Relaxed);
        let init_error = Arc::new(Mutex::new(None::<String>));
        let (stdin_sink, readers) = match master {
            Some(master) => {
                let clones = master
                    .try_clone()
                    .and_then(|w| Ok((w, master.try_clone()?)));
                let (writer, reader) = match clones {
                    Ok(c) => c,
                    Err(e) => {
                        nix_kill(l, true);
                        let _ = child.wait().await;
                        return Outcome::failed(format!("allocating a terminal: {e}"));
                    }
                };
                if let Some(io) = &l.io {
                    io.set_pty(master);
                }
                let sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> =
                    Box::new(tokio::fs::File::from_std(writer));
                let reader = tokio::fs::File::from_std(reader);
                let out = self.pipe(
                    job,
                    "stdout",
                    reader,
                    Some(init_error.clone()),
                    l.io.clone(),
                );
                (Some(sink), [Some(out), None])
            }
            None => {
                let sink = child
                    .stdin
                    .take()
                    .map(|p| -> Box<dyn tokio::io::AsyncWrite + Unpin + Send> { Box::new(p) });
                let readers = [
                    child
                        .stdout
                        .take()
                        .map(|s| self.pipe(job, "stdout", s, None, l.io.clone())),
                    child.stderr.take().map(|s| {
                        self.pipe(job, "stderr", s, Some(init_error.clone()), l.io.clone())
                    }),
                ];
                (sink, readers)
            }
        };
        if let (Some(mut rx), Some(mut sink)) = (stdin_rx, stdin_sink) {
            // The caller's upload, as it arrives; its end closes the job's stdin (on a pty,
            // the caller's own ^D does).
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Some(chunk) = rx.recv().await {
                    if sink.write_all(&chunk).await.is_err() || sink.flush().await.is_err() {
                        break;
                    }
                }
            });
        }
        let started = Instant::now();
        let addr = p.port.map(|port| format!("{}:{port}", p.ip));

        // Up: its port answers (or its health path), then it is registered and running.
        let mut up = false;
        let wait_up = async {
            match p.port {
                Some(port) if p.register => {
                    // A job in the host's network is reached on loopback (it may bind
                    // only that); one with its own network at its address.
                    let target = match &p.net {
                        Some(n) => std::net::SocketAddr::from((n.ip, port)),
                        None => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    };
                    wait_listening(target, p.health_path.as_deref()).await
                }
                _ => true,
            }
        };
        let status = tokio::select! {
            ok = wait_up => { up = ok; None }
            s = child.wait() => Some(s),
            _ = l.stop.notified() => None,
        };
        let mut stop_requested = l.stopping.load(Ordering::SeqCst);
        if status.is_none() && !stop_requested {
            if up {
                let mut cmds: Vec<Command> = vec![JobsCommand::UpdateJob {
                    id: job.id.clone(),
                    state: JobState::Running,
                    addr: addr.clone(),
                    exit_status: None,
                    error: None,
                    now_ms: crate::now_ms(),
                }
                .into()];
                if p.register {
                    cmds.push(self.register(job, addr.clone().unwrap_or_default()).into());
                }
                propose_retrying(local, Command::Batch { commands: cmds }).await;
            } else {
                nix_kill(l, true);
            }
        }
        // Stopping: SIGTERM now, and everything in the job SIGKILLed if it is still there
        // after the grace period (checked then: its pid may belong to another by now).
        let terminate = |l: &Arc<Local>| {
            nix_kill(l, false);
            let (l, cgroup) = (l.clone(), p.cgroup.clone());
            tokio::spawn(async move {
                tokio::time::sleep(STOP_GRACE).await;
                if l.pid.load(Ordering::SeqCst) != 0 {
                    if let Some(c) = cgroup {
                        c.kill_all()
                    }
                    nix_kill(&l, true);
                }
            });
        };
        if status.is_none() && stop_requested {
            // Asked to stop before it was up (so never registered): no drain needed.
            terminate(l);
        }
        let status = match status {
            Some(s) => s,
            None => loop {
                tokio::select! {
                    s = child.wait() => break s,
                    _ = l.stop.notified(), if !stop_requested => {
                        stop_requested = true;
                        // Out of discovery already (StopJob); give routers a moment to
                        // follow, then ask the job to stop.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        terminate(l);
                    }
                }
            },
        };
        // Its pid is free from here on: nothing may signal it any more.
        l.pid.store(0, Ordering::SeqCst);
        for r in readers.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        let oom = p.cgroup.as_ref().is_some_and(JobCgroup::oom_killed);
        if let Some(c) = &p.cgroup {
            let c = c.clone();
            let _ = tokio::task::spawn_blocking(move || c.remove()).await;
        }
        match &p.net {
            Some(n) => {
                if let Some(hn) = self.net.get().and_then(Option::as_ref) {
                    tokio::task::block_in_place(|| hn.release(n));
                }
            }
            None => {
                if let Some(port) = p.port {
                    self.ports.lock().expect("ports lock").remove(&port);
                }
            }
        }
        let code = match status {
            Ok(s) => s.code().unwrap_or(-1),
            Err(e) => return Outcome::failed(format!("waiting for the job: {e}")),
        };
        let init_error = init_error.lock().expect("init error").take();
        let ran = started.elapsed();
        tracing::info!(job = %job.id, code, ?ran, oom, "job exited");
        if stop_requested {
            return Outcome {
                state: JobState::Done,
                exit_status: Some(code),
                error: None,
            };
        }
        if oom {
            return Outcome {
                state: JobState::Crashed,
                exit_status: Some(code),
                error: Some("out of memory".into()),
            };
        }
        if let (Some(e), true) = (
            init_error,
            matches!(code, EXIT_SETUP | EXIT_NOT_FOUND | 126),
        ) {
            return Outcome {
                state: JobState::Failed,
                exit_status: Some(code),
                error: Some(e),
            };
        }
        if !up && status_ok(code) && p.register {
            return Outcome {
                state: JobState::Crashed,
                exit_status: Some(code),
                error: Some("exited before its port answered".into()),
            };
        }
        match code {
            0 => Outcome {
                state: JobState::Done,
                exit_status: Some(0),
                error: None,
            },
            c if c > 128 => Outcome {
                state: JobState::Crashed,
                exit_status: Some(c),
                error: Some(format!("killed by signal {}", c - 128)),
            },
            c => Outcome {
                state: JobState::Crashed,
                exit_status: Some(c),
                error: Some(format!("exited with status {c}")),
            },
        }
    }

    fn register(&self, job: &Job, addr: String) -> DiscoveryCommand {
        DiscoveryCommand::RegisterInstance {
            service: job.service(),
            id: job.id.clone(),
            addr,
            meta: [
                ("job".to_string(), job.id.clone()),
                ("release".to_string(), job.release.clone()),
                ("host".to_string(), self.host.to_string()),
            ]
            .into(),
            ttl_ms: JOB_TTL.as_millis() as u64,
            now_ms: crate::now_ms(),
        }
    }

    /// Copies one of the job's output pipes (or its pty) into the host's log, line by line
    /// (a line over [`logs::MAX_LINE`] is split), and to an attached caller as it comes:
    /// a prompt without a newline shows at once.
    fn pipe(
        &self,
        job: &Job,
        stream: &'static str,
        mut pipe: impl AsyncRead + Unpin + Send + 'static,
        init_error: Option<Arc<Mutex<Option<String>>>>,
        io: Option<Arc<oneoff::OneOffIo>>,
    ) -> tokio::task::JoinHandle<()> {
        use tokio::io::AsyncReadExt;
        let logs = self.logs.clone();
        let (app, id, ty) = (job.app.clone(), job.id.clone(), job.proc_type.clone());
        let to = if stream == "stdout" {
            oneoff::STDOUT
        } else {
            oneoff::STDERR
        };
        tokio::spawn(async move {
            let emit = |line: &mut Vec<u8>| {
                let text = String::from_utf8_lossy(line)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                line.clear();
                let (stream, text) = match (&init_error, text.strip_prefix(INIT_PREFIX)) {
                    (Some(slot), Some(msg)) => {
                        *slot.lock().expect("init error") = Some(msg.to_string());
                        ("init", msg.to_string())
                    }
                    _ => (stream, text),
                };
                logs.push(&app, &id, &ty, stream, text);
            };
            let mut chunk = vec![0u8; 16 * 1024];
            let mut line: Vec<u8> = Vec::new();
            loop {
                // A pty's master reads EIO once the job's side is closed: its end.
                let n = match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(io) = &io {
                    io.output(to, bytes::Bytes::copy_from_slice(&chunk[..n]));
                }
                let mut rest = &chunk[..n];
                while !rest.is_empty() {
                    let take = rest.len().min(logs::MAX_LINE - line.len());
                    let end = rest[..take].iter().position(|b| *b == b'\n');
                    let used = end.map_or(take, |i| i + 1);
                    line.extend_from_slice(&rest[..used]);
                    rest = &rest[used..];
                    if end.is_some() || line.len() >= logs::MAX_LINE {
                        emit(&mut line);
                    }
                }
            }
            if !line.is_empty() {
                emit(&mut line);
            }
        })
    }

    /// Keeps this host, and its jobs' instances, registered.
    async fn heartbeat(&self, local: &LocalState, tick: u64) {
        let mut commands: Vec<Command> = vec![DiscoveryCommand::RegisterInstance {
            service: HOST_SERVICE.into(),
            id: self.instance_id(),
            addr: self.api_addr.clone(),
            // What the scheduler may place here (see `scheduler::room`).
            meta: [(MEMORY_META.to_string(), self.cfg.memory.to_string())].into(),
            ttl_ms: HOST_TTL.as_millis() as u64,
            now_ms: crate::now_ms(),
        }
        .into()];
        if tick.is_multiple_of(5) {
            let now = crate::now_ms();
            let instances: Vec<(String, String)> = local.read(|s| {
                s.jobs
                    .jobs
                    .values()
                    .filter(|j| j.host == self.host && j.state == JobState::Running)
                    .filter(|j| {
                        s.discovery
                            .services
                            .get(&j.service())
                            .is_some_and(|svc| svc.instances.contains_key(&j.id))
                    })
                    .map(|j| (j.service(), j.id.clone()))
                    .collect()
            });
            commands.extend(instances.into_iter().map(|(service, id)| {
                Command::from(DiscoveryCommand::Heartbeat {
                    service,
                    id,
                    now_ms: now,
                })
            }));
        }
        if let Err(e) = local.node().propose(Command::Batch { commands }).await {
            tracing::debug!(error = %e, "host heartbeat not applied");
        }
    }
}

struct Prepared {
    spec_path: PathBuf,
    cgroup: Option<JobCgroup>,
    port: Option<u16>,
    /// The address the job serves on: its own, or the host's.
    ip: String,
    net: Option<network::JobNet>,
    health_path: Option<String>,
    register: bool,
}

struct Outcome {
    state: JobState,
    exit_status: Option<i32>,
    error: Option<String>,
}

impl Outcome {
    fn failed(why: String) -> Self {
        Outcome {
            state: JobState::Failed,
            exit_status: None,
            error: Some(why),
        }
    }
}

fn status_ok(code: i32) -> bool {
    code == 0
}

fn kill_pid(pid: u64, hard: bool) {
    if pid == 0 {
        return;
    }
    let sig = if hard {
        nix::sys::signal::Signal::SIGKILL
    } else {
        nix::sys::signal::Signal::SIGTERM
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn nix_kill(l: &Local, hard: bool) {
    kill_pid(l.pid.load(Ordering::Relaxed), hard)
}

/// Waits until something accepts connections on the job's port (and, with a health path,
/// answers it with a 2xx or 3xx).
async fn wait_listening(target: std::net::SocketAddr, health_path: Option<&str>) -> bool {
    let deadline = Instant::now() + UP_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    while Instant::now() < deadline {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(target),
        )
        .await
        {
            let Some(path) = health_path else {
                return true;
            };
            if http_ok(&mut s, path).await {
                return true;
            }
        }
        // Fast for a job that comes up at once, gentler for a hundred that do not.
        tokio::time::sleep(pause).await;
        pause = (pause + Duration::from_millis(2)).min(Duration::from_millis(50));
    }
    false
}

async fn http_ok(s: &mut tokio::net::TcpStream, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head)).await {
        Ok(Ok(_)) => matches!(head.get(9), Some(b'2') | Some(b'3')),
        _ => false,
    }
}

/// Proposes until applied (or refused: a refusal will not change by retrying), for reports
/// that must not be lost to a leader change.
async fn propose_retrying(local: &LocalState, cmd: Command) {
    // A lost report would leave a job `starting` (or running) in the state forever, so it
    // is retried until it lands; reports are idempotent, and one that already landed is
    // refused (an ended job) or changes nothing.
    let mut attempt = 0u32;
    loop {
        match local.node().propose(cmd.clone()).await {
            Ok(_) => return,
            Err(e) if e.is_refusal() => {
                tracing::debug!(error = %e, "job report refused");
                return;
            }
            Err(e) => {
                attempt += 1;
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt, "job report not applied yet; retrying");
                }
                let backoff = Duration::from_millis(100 * u64::from(attempt.min(20)));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

impl Component for JobRunner {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        let _ = self.local.set(local.clone());
        Box::pin(async move {
            self.setup_network(&local).await;
            let mut changes = local.changes();
            let mut tick = tokio::time::interval(HOST_HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                if local.read(|s| s.bootstrapped()) {
                    self.reconcile(&local);
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tick.tick() => {
                        if local.read(|s| s.bootstrapped()) {
                            self.heartbeat(&local, n).await;
                            n += 1;
                        }
                    }
                }
            }
        })
    }

    /// Jobs and their logs: healthy while the log directory takes writes (job output that
    /// cannot be written is lost).
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<flynn_client::ComponentHealth>> {
        Box::pin(async move {
            let dir = self.cfg.log_dir.clone();
            let write = tokio::task::spawn_blocking(move || {
                let probe = dir.join(".health-check");
                std::fs::write(&probe, b"ok")?;
                std::fs::remove_file(&probe)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            Some(flynn_client::ComponentHealth::from_check(
                write.is_ok(),
                serde_json::json!({
                    "running": self.running.lock().expect("jobs lock").len(),
                    "log_dir": self.cfg.log_dir,
                    "error": write.err().map(|e| format!("log dir not writable: {e}")),
                }),
            ))
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "running": self.running.lock().expect("jobs lock").len(),
            "started_total": self.started.load(Ordering::Relaxed),
            "cgroups": self.cgroups.as_ref().map(|h| format!("v{}", h.version())),
            "network": match self.net.get() {
                Some(Some(hn)) => serde_json::json!({"mode": "routed", "subnet": hn.subnet()}),
                _ => serde_json::json!({
                    "mode": "host",
                    "why": *self.net_note.lock().expect("net note"),
                }),
            },
            "log_dir": self.cfg.log_dir,
        })
    }

    fn prometheus(&self) -> String {
        format!(
            "# HELP flynn_jobs_running Jobs running on this host.\n# TYPE flynn_jobs_running gauge\nflynn_jobs_running {}\n\
             # HELP flynn_jobs_started_total Jobs this host started.\n# TYPE flynn_jobs_started_total counter\nflynn_jobs_started_total {}\n\
             # HELP flynn_job_log_lines_total Job output lines written to the host's log files.\n# TYPE flynn_job_log_lines_total counter\nflynn_job_log_lines_total {}\n\
             # HELP flynn_job_log_lines_dropped_total Job output lines dropped because the log writer fell behind.\n# TYPE flynn_job_log_lines_dropped_total counter\nflynn_job_log_lines_dropped_total {}\n",
            self.running.lock().expect("jobs lock").len(),
            self.started.load(Ordering::Relaxed),
            self.logs.written.load(Ordering::Relaxed),
            self.logs.dropped.load(Ordering::Relaxed),
        )
    }

    /// Jobs end with their host's daemon: each is stopped (SIGTERM, then SIGKILL).
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let locals: Vec<Arc<Local>> = self
                .running
                .lock()
                .expect("jobs lock")
                .values()
                .cloned()
                .collect();
            for l in &locals {
                nix_kill(l, false);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !self.running.lock().expect("jobs lock").is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for l in &locals {
                nix_kill(l, true);
            }
            if let Some(Some(hn)) = self.net.get() {
                hn.stop();
            }
        })
    }
}
