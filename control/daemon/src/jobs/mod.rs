//! The job runner: a host component that starts the jobs the scheduler placed on this host,
//! as containers (`flynn-job`), reports their states, registers those with ports in
//! discovery as `APP-TYPE`, captures their output into the host's log files, and stops them
//! when asked. It also keeps this host registered as alive (service `flynn-host`), which is
//! how the scheduler notices a host that stopped answering.
//!
//! Each job has its own network namespace and address on its host's subnet, routed between
//! hosts ([`network`]); a process type may ask for the host's network instead, and a host
//! without `ip`/`nft` runs every job in its network (a free host port as `$PORT`).
//!
//! A job's life goes through one file per phase, as nomad's task runner has a hook per
//! concern: `runner` (reconcile the jobs placed here, run one, report, heartbeat) calls
//! `prepare` (layers, directory, cgroup, network, env, data volumes from `volumes`, a
//! build's inputs from `build`), then `supervise` (the init, its pipes, up and health,
//! stop and kill), then back in `runner` the report and cleanup. Every failure on the way is
//! one [`JobError`], whose text is what the job's record and an attached caller are told.
//! What the runner reads of the state and proposes goes through [`RunnerState`], so the
//! phases are tested without a cluster.

mod addresses;
pub mod build;
mod config;
mod error;
pub mod logs;
pub mod network;
pub mod oneoff;
mod prepare;
pub mod pty;
mod runner;
pub mod scheduler;
mod shim;
mod state;
mod subnets;
mod supervise;
pub mod system_image;
pub(crate) mod timeline;
mod volumes;

pub use config::{JobsArgs, JobsConfig};
pub use error::JobError;
pub use state::RunnerState;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flynn_job::cgroup::Hierarchy;
use flynn_job::layer::LayerStore;
use flynn_state::Job;
use futures::future::BoxFuture;

use crate::blobstore::Blobstore;
use crate::component::{Component, LocalState};
use state::State;
use supervise::nix_kill;

/// The service every host running jobs registers in, so the scheduler knows it is alive.
pub const HOST_SERVICE: &str = "flynn-host";
/// The `flynn-host` instance's meta key for the bytes of job memory it takes.
pub const MEMORY_META: &str = "memory";
/// The `flynn-host` instance's meta key for the millicores of job CPU it takes.
pub const CPU_META: &str = "cpu";
/// The `flynn-host` instance's meta key for how many jobs it holds at once: one job address
/// each in its job subnets (absent when jobs share the host's network).
pub const JOBS_META: &str = "jobs";
/// A host not heard from for this long is down: its jobs are started elsewhere.
pub const HOST_TTL: Duration = Duration::from_secs(10);
const HOST_HEARTBEAT: Duration = Duration::from_secs(2);
/// Job instances' TTL in discovery (refreshed every few host heartbeats).
const JOB_TTL: Duration = Duration::from_secs(30);
/// How long a stopping job has after SIGTERM before everything in it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a job's port has to start answering before the job counts as failed.
const UP_TIMEOUT: Duration = Duration::from_secs(60);

/// A job this host started and has not yet cleaned up.
pub(crate) struct RunningJob {
    job: Job,
    /// The container init's pid, once started.
    pid: AtomicU64,
    stop: tokio::sync::Notify,
    stopping: AtomicBool,
    /// A one-off job's attachable output, and its stdin as uploaded.
    io: Option<Arc<oneoff::OneOffIo>>,
    stdin: Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>,
    /// Its cgroup's process lists, once made (a fence kills everything listed).
    procs: Mutex<Vec<std::path::PathBuf>>,
    /// How long each stage of its start took (a job taken up from a previous daemon has
    /// none to tell).
    timeline: Option<timeline::StartTimeline>,
}

impl RunningJob {
    /// Notes that a stage of its start ended now.
    fn mark(&self, stage: &'static str) {
        if let Some(t) = &self.timeline {
            t.mark(stage);
        }
    }

    /// A line from the runner to whoever is attached to a one-off job (its stderr).
    fn tell(&self, msg: &str) {
        if let Some(io) = &self.io {
            io.push(oneoff::STDERR, format!("flynn: {msg}\n").into());
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
    /// Claims and give-backs of extra job subnets.
    subnet_fit: subnets::Fitting,
    /// One registration of this host in flight at a time, so the capacity it says last is
    /// the one it has now.
    registering: tokio::sync::Mutex<()>,
    running: Mutex<HashMap<String, Arc<RunningJob>>>,
    ports: Mutex<BTreeSet<u16>>,
    /// Data volumes taken up by jobs starting on this host (volume → job), so two jobs
    /// never take the same one before the state says so.
    claimed: Mutex<HashMap<String, String>>,
    /// One layer unpacks at a time (two jobs of one image share the work).
    unpack: tokio::sync::Mutex<()>,
    started: AtomicU64,
    /// Jobs a previous daemon started that still run (or ended and left their spool), not
    /// yet taken up or ended by a pass over the state.
    survivors: Mutex<HashMap<String, shim::Survivor>>,
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
        // Service jobs outlive their daemon: those a previous one left are taken up (or
        // ended) by the first pass over the state; other directories are dead jobs'.
        let survivors = shim::survivors(&cfg.jobs_dir);
        let ports: BTreeSet<u16> = survivors
            .values()
            .filter(|s| s.runtime.net.is_none())
            .filter_map(|s| s.runtime.port)
            .collect();
        if !survivors.is_empty() {
            tracing::info!(
                jobs = survivors.len(),
                "jobs a previous daemon started are still here: taking them up"
            );
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
            subnet_fit: subnets::Fitting::default(),
            registering: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            ports: Mutex::new(ports),
            claimed: Mutex::new(HashMap::new()),
            unpack: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
            survivors: Mutex::new(survivors),
        })
    }

    /// Kills job `id` now, every process of it, without asking the cluster (a database
    /// primary that lost its lease stops taking writes even when it cannot reach Raft).
    /// Its end is reported as a crash; the scheduler starts it again. Whether it was here.
    pub fn fence(&self, id: &str) -> bool {
        let Some(l) = self.running.lock().expect("jobs lock").get(id).cloned() else {
            return false;
        };
        supervise::nix_kill(&l, true);
        Self::kill_procs(&l);
        true
    }

    /// SIGKILLs every process in a job's cgroup.
    fn kill_procs(l: &RunningJob) {
        for file in l.procs.lock().expect("procs lock").iter() {
            let pids = std::fs::read_to_string(file).unwrap_or_default();
            for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    fn cgroup_name(&self, job: &str) -> String {
        format!("h{}-{job}", self.host)
    }

    fn instance_id(&self) -> String {
        flynn_state::host_instance_id(self.host)
    }

    /// Each running job's memory working set and CPU time, from its cgroups, as
    /// Prometheus text (`flynn_job_memory_bytes`, `flynn_job_cpu_seconds_total`, labelled by
    /// app, process type and job): what the dashboard's charts and any scraper read.
    pub fn render_usage(&self, out: &mut String) {
        let Some(h) = &self.cgroups else {
            return;
        };
        let jobs: Vec<Job> = self
            .running
            .lock()
            .expect("jobs lock")
            .values()
            .map(|l| l.job.clone())
            .collect();
        let usage: Vec<(Job, flynn_job::cgroup::Usage)> = jobs
            .into_iter()
            .map(|j| {
                let u = h.existing(&self.cgroup_name(&j.id)).usage();
                (j, u)
            })
            .collect();
        fn labels(j: &Job) -> [(&'static str, &str); 3] {
            [
                ("app", j.app.as_str()),
                ("type", j.proc_type.as_str()),
                ("job", j.id.as_str()),
            ]
        }
        flynn_metrics::header(
            out,
            "flynn_job_memory_bytes",
            "gauge",
            "A running job's memory in use, less the page cache the kernel may drop.",
        );
        for (j, u) in &usage {
            if let Some(m) = u.memory_bytes {
                flynn_metrics::sample(out, "flynn_job_memory_bytes", &labels(j), m);
            }
        }
        flynn_metrics::header(
            out,
            "flynn_job_cpu_seconds_total",
            "counter",
            "CPU time a running job has used since it started.",
        );
        for (j, u) in &usage {
            if let Some(c) = u.cpu_seconds {
                let v = format!("{c:.3}");
                flynn_metrics::sample(out, "flynn_job_cpu_seconds_total", &labels(j), v);
            }
        }
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
}

impl Component for JobRunner {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        let local: State = Arc::new(local);
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
                Some(Some(hn)) => serde_json::json!({
                    "mode": "routed",
                    "subnet": hn.subnet(),
                    "subnets": hn.indexes().into_iter().map(network::subnet_of).collect::<Vec<_>>(),
                    "capacity": hn.capacity(),
                    "between_hosts": hn.overlay(),
                }),
                _ => serde_json::json!({
                    "mode": "host",
                    "why": *self.net_note.lock().expect("net note"),
                }),
            },
            "log_dir": self.cfg.log_dir,
        })
    }

    fn prometheus(&self) -> String {
        let mut out = String::new();
        let running = self.running.lock().expect("jobs lock").len();
        let lines = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "flynn_jobs_running",
                "gauge",
                "Jobs running on this host.",
                running as u64,
            ),
            (
                "flynn_jobs_started_total",
                "counter",
                "Jobs this host started.",
                self.started.load(Ordering::Relaxed),
            ),
            (
                "flynn_job_log_lines_total",
                "counter",
                "Job output lines written to the host's log files.",
                lines(&self.logs.written),
            ),
            (
                "flynn_job_log_lines_dropped_total",
                "counter",
                "Job output lines dropped because the log writer fell behind.",
                lines(&self.logs.dropped),
            ),
        ] {
            flynn_metrics::single(&mut out, name, kind, help, value);
        }
        out
    }

    /// Service jobs outlive their daemon (a restarted one takes them up); one-off jobs and
    /// builds, whose callers came through it, are stopped (SIGTERM, then SIGKILL).
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (locals, staying): (Vec<Arc<RunningJob>>, Vec<Arc<RunningJob>>) = self
                .running
                .lock()
                .expect("jobs lock")
                .values()
                .cloned()
                .partition(|l| !shim::outlives_daemon(&l.job));
            for l in &locals {
                nix_kill(l, false);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let ended = |me: &Self| {
                let running = me.running.lock().expect("jobs lock");
                locals.iter().all(|l| !running.contains_key(&l.job.id))
            };
            while Instant::now() < deadline && !ended(&self) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for l in &locals {
                nix_kill(l, true);
            }
            // The filter stays for jobs that stay (their published ports, service
            // addresses); the next daemon replaces it whole.
            let none_left =
                staying.is_empty() && self.survivors.lock().expect("survivors lock").is_empty();
            if let (Some(Some(hn)), true) = (self.net.get(), none_left) {
                hn.stop();
            }
        })
    }
}

#[cfg(test)]
mod tests;
