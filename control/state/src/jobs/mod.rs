//! Releases, formations and jobs.
//!
//! A release is immutable: a new image, new limits or a changed env make a new one, and the
//! formation moves to it (a deploy). The scheduler (a leader controller) places jobs on hosts
//! to match the formation; each host starts the jobs placed on it and reports their states
//! back. Crashes are counted per process type so the scheduler can back off; a host that
//! could not start jobs (its network, cgroups or disk) is counted apart, and the scheduler
//! places nothing new there for a while. Each host keeps a bounded history of stopped jobs
//! per app.

mod deploy;
pub use deploy::{deploy_status, rollout, DeployStatus};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{
    validate, ApplyResult, Build, ClusterState, Formation, Image, Job, JobState, Layer, Limits,
    NewRelease, ProcessType, Release, Response, StateError, TtySize,
};

pub const RELEASES: Table = Table("release/");
pub const FORMATIONS: Table = Table("formation/");
pub const JOBS: Table = Table("job/");
pub const BACKOFF: Table = Table("backoff/");
pub const HOST_FAULTS: Table = Table("host-fault/");
pub const SUBNETS: Table = Table("subnet/");
pub const EXTRA_SUBNETS: Table = Table("extra-subnet/");
pub const IMAGES: Table = Table("image/");

/// Stopped jobs a host keeps per app; older ones are forgotten.
pub const HISTORY_PER_APP_HOST: usize = 25;
/// Most jobs of one process type a formation may ask for.
pub const MAX_SCALE: i64 = 1000;
/// Most job subnets (of 253 addresses each) one host holds: its first and the extra ones
/// it claims as it fills. With 254 in all, a cluster of up to 63 hosts never runs short.
pub const MAX_SUBNETS_PER_HOST: usize = 4;
/// The most processes a job may be limited to: Linux's pid maximum (`PID_MAX_LIMIT`), past
/// which `pids.max` is refused.
pub const MAX_PROCS_LIMIT: u64 = 4 << 20;
/// A job that ran this long before crashing resets its type's crash count.
pub const CRASH_RESET_MS: u64 = 30_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JobsCommand {
    /// Makes a release from a new image and deploys it (the formation moves to it).
    CreateRelease {
        app: String,
        release: NewRelease,
        now_ms: u64,
    },
    /// Moves the formation to an existing release of the app (a rollback); `None` removes
    /// the formation (a first deploy that failed: the next one starts afresh).
    Deploy {
        app: String,
        release: Option<String>,
    },
    /// Sets counts of process types (`flynn scale web=3`); types not named keep theirs.
    Scale {
        app: String,
        processes: BTreeMap<String, i64>,
    },
    /// New limits for one process type: a new release, deployed.
    SetLimits {
        app: String,
        proc_type: String,
        limits: Limits,
        now_ms: u64,
    },
    /// The scheduler places new jobs (state `pending`); ids are assigned here.
    PlaceJobs { jobs: Vec<NewJob>, now_ms: u64 },
    /// A host reports a job's progress or end.
    UpdateJob {
        id: String,
        state: JobState,
        #[serde(default)]
        addr: Option<String>,
        #[serde(default)]
        exit_status: Option<i32>,
        #[serde(default)]
        error: Option<String>,
        now_ms: u64,
        /// Whom a failure counts against; the app unless the host says otherwise.
        #[serde(default, skip_serializing_if = "JobFault::is_app")]
        fault: JobFault,
    },
    /// Asks a job's host to stop it.
    StopJob { id: String },
    /// A host stopped answering: its active jobs failed and leave discovery.
    HostDown { host: u64, now_ms: u64 },
    /// Records a named image of the cluster (`base`: what `flynn deploy DIR` builds on).
    PutImage { name: String, image: Image },
    /// A host asks for its job subnet (`100.100.N.0/24`); it keeps the one it has. The
    /// answer lists every subnet it holds, the first first (a restarted daemon takes up
    /// its extra ones from it, not from a local state that may lag).
    ClaimSubnet { host: u64 },
    /// A host that is filling up asks for one more subnet: granted when it holds exactly
    /// `have` (its first included), so a retried claim gets what the first one got and no
    /// more. At most [`MAX_SUBNETS_PER_HOST`].
    ClaimExtraSubnet { host: u64, have: u32 },
    /// A host gives back an extra subnet none of its jobs has an address on.
    ReleaseExtraSubnet { host: u64, index: u32 },
}

/// gitreceive's setting of build jobs' memory limit (Flynn's name for it).
pub const BUILD_MEMORY_ENV: &str = "SLUGBUILDER_DEFAULT_MEMORY_LIMIT";
/// A build job's memory limit when gitreceive sets none (Flynn's default).
pub const BUILD_MEMORY_DEFAULT: u64 = 1 << 30;

/// Build jobs' memory limit from gitreceive's setting: at least 64 MiB.
pub fn build_memory(setting: Option<&str>) -> Result<u64, StateError> {
    let Some(v) = setting.filter(|v| !v.trim().is_empty()) else {
        return Ok(BUILD_MEMORY_DEFAULT);
    };
    let n = crate::parse_size(v)
        .map_err(|e| StateError::Invalid(format!("{BUILD_MEMORY_ENV}: {e}")))?;
    if n < 64 << 20 {
        return Err(StateError::Invalid(format!(
            "{BUILD_MEMORY_ENV}: {v:?} is less than 64MB, too little to build in"
        )));
    }
    Ok(n)
}

/// A job as the scheduler asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    pub app: String,
    pub release: String,
    #[serde(rename = "type")]
    pub proc_type: String,
    pub host: u64,
    #[serde(default)]
    pub oneoff: bool,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    /// A build job: it runs on the build's image, not on a release's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// A one-off job on a pty of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Env set over its release's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl NewJob {
    /// A one-off job (`run`) of `app`'s `release` running `args`, placed by whoever places
    /// it (host 0 until then), with nothing else set: the base the API's one-off jobs
    /// (`flynn run`, builds, database clients) are made from.
    pub fn one_off(app: impl Into<String>, release: String, args: Vec<String>) -> NewJob {
        NewJob {
            app: app.into(),
            release,
            proc_type: "run".into(),
            host: 0,
            oneoff: true,
            args,
            stdin: false,
            build: None,
            tty: None,
            env: BTreeMap::new(),
        }
    }
}

/// Recent crashes of one process type (`APP/TYPE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub crashes: u32,
    pub last_crash_ms: u64,
}

impl Backoff {
    /// How long after the last crash the scheduler waits before starting a replacement:
    /// immediate for the first three, then doubling from 1 s, at most 5 minutes.
    pub fn delay_ms(&self) -> u64 {
        match self.crashes {
            0..=3 => 0,
            n => (1000u64 << (n - 4).min(12)).min(300_000),
        }
    }

    /// How long after a host's last failure to start a job it takes no new jobs: 500 ms,
    /// doubling with each failure since a job last came up there (or since a minute
    /// without one), at most 30 s. Shorter than
    /// an app's: the other hosts take the jobs meanwhile, and on a one-host cluster every
    /// job waits for it.
    pub fn host_delay_ms(&self) -> u64 {
        match self.crashes {
            0 => 0,
            n => (500u64 << (n - 1).min(6)).min(HOST_FAULT_MAX_DELAY_MS),
        }
    }

    /// Until when a host with these failures takes no new jobs.
    pub fn host_paused_until(&self) -> u64 {
        self.last_crash_ms.saturating_add(self.host_delay_ms())
    }

    /// Whether, at `now_ms`, a host with these failures takes no new jobs.
    pub fn host_paused(&self, now_ms: u64) -> bool {
        now_ms < self.host_paused_until()
    }
}

/// The longest a host that keeps failing to start jobs is left out of placement.
pub const HOST_FAULT_MAX_DELAY_MS: u64 = 30_000;
/// A host failure this long after the one before starts the count again.
pub const HOST_FAULT_FORGET_MS: u64 = 60_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jobs {
    #[serde(default)]
    pub releases: BTreeMap<String, Release>,
    #[serde(default)]
    pub formations: BTreeMap<String, Formation>,
    #[serde(default)]
    pub jobs: BTreeMap<String, Job>,
    #[serde(default)]
    pub backoff: BTreeMap<String, Backoff>,
    /// Recent failures of each host to start jobs (its own trouble, not the apps'), by host
    /// id: `crashes` counts them since a job last came up there.
    #[serde(default)]
    pub host_faults: BTreeMap<String, Backoff>,
    /// Named images of the cluster (`base`).
    #[serde(default)]
    pub images: BTreeMap<String, Image>,
    /// Job subnet index (`100.100.N.0/24`) of each host, by host id.
    #[serde(default)]
    pub subnets: BTreeMap<String, u32>,
    /// The extra job subnets a host claimed beyond its first, by host id.
    #[serde(default)]
    pub extra_subnets: BTreeMap<String, Vec<u32>>,
}

impl Jobs {
    /// A host's job subnets: its first, then the extra ones in the order it claimed them.
    pub fn host_subnets(&self, host: u64) -> Vec<u32> {
        let key = host.to_string();
        self.subnets
            .get(&key)
            .into_iter()
            .chain(self.extra_subnets.get(&key).into_iter().flatten())
            .copied()
            .collect()
    }

    /// The lowest subnet index no host holds (0 is the service addresses', 255 is left
    /// out as a broadcast-looking range).
    fn free_subnet(&self) -> Result<u32, StateError> {
        let taken: std::collections::BTreeSet<u32> = self
            .subnets
            .values()
            .chain(self.extra_subnets.values().flatten())
            .copied()
            .collect();
        (1..=254u32)
            .find(|i| !taken.contains(i))
            .ok_or_else(|| StateError::Conflict("every job subnet (254) is taken".into()))
    }

    /// The release an app's formation runs, if it has one.
    pub fn current_release(&self, app: &str) -> Option<&Release> {
        self.formations
            .get(app)
            .and_then(|f| self.releases.get(&f.release))
    }

    pub fn app_jobs<'a>(&'a self, app: &'a str) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs.values().filter(move |j| j.app == app)
    }

    /// The jobs placed on `host` that have not ended.
    pub fn active_on(&self, host: u64) -> impl Iterator<Item = &Job> + '_ {
        self.jobs
            .values()
            .filter(move |j| j.host == host && j.state.is_active())
    }

    fn next_version(&self, app: &str) -> u64 {
        self.releases
            .values()
            .filter(|r| r.app == app)
            .map(|r| r.version)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// Adds a release made from `base` and moves the formation to it.
    fn deploy(&mut self, mut release: Release, cx: &mut Cx) -> Release {
        release.version = self.next_version(&release.app);
        release.id = format!("{}-v{}", release.app, release.version);
        let formation = self
            .formations
            .entry(release.app.clone())
            .or_insert_with(|| Formation {
                app: release.app.clone(),
                ..Formation::default()
            });
        if formation.release.is_empty() && release.processes.contains_key("web") {
            // The first release of an app runs one web process, as Flynn's first deploy.
            formation.processes.insert("web".into(), 1);
        }
        formation.release = release.id.clone();
        // Counts of types the new release no longer has are dropped.
        formation
            .processes
            .retain(|t, _| release.processes.contains_key(t));
        cx.touch(FORMATIONS, &release.app);
        cx.touch(RELEASES, &release.id);
        self.releases.insert(release.id.clone(), release.clone());
        release
    }

    /// Forgets the oldest stopped jobs of `app` on `host` beyond the history bound.
    fn prune_history(&mut self, app: &str, host: u64, cx: &mut Cx) {
        let mut stopped: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.app == app && j.host == host && !j.state.is_active())
            .map(|j| (j.ended_ms.unwrap_or(0), j.id.clone()))
            .collect();
        if stopped.len() <= HISTORY_PER_APP_HOST {
            return;
        }
        stopped.sort();
        let excess = stopped.len() - HISTORY_PER_APP_HOST;
        for (_, id) in stopped.into_iter().take(excess) {
            self.jobs.remove(&id);
            cx.touch(JOBS, &id);
        }
    }
}

/// A release of `app` for the new image: the current release's process types, or a `web`
/// type running the image's own command.
fn release_for(s: &ClusterState, app: &str, new: NewRelease, now_ms: u64) -> Release {
    let env = s.apps.get(app).map(|a| a.env.clone()).unwrap_or_default();
    let processes = new.processes.unwrap_or_else(|| {
        s.jobs
            .current_release(app)
            .map(|r| r.processes.clone())
            .unwrap_or_else(|| {
                [(
                    "web".to_string(),
                    ProcessType {
                        ports: true,
                        ..ProcessType::default()
                    },
                )]
                .into()
            })
    });
    Release {
        id: String::new(),
        app: app.into(),
        version: 0,
        image: new.image,
        processes,
        env: env.global,
        type_env: env.types,
        created_ms: now_ms,
    }
}

/// A process limit the kernel would refuse (`pids.max` over its pid maximum), said why.
fn check_procs_limit(limits: &Limits) -> Result<(), String> {
    match limits.max_procs {
        Some(n) if n > MAX_PROCS_LIMIT => Err(format!(
            "a process limit over {MAX_PROCS_LIMIT} (the kernel's most) cannot be set"
        )),
        _ => Ok(()),
    }
}

fn check_release(r: &Release) -> Result<(), StateError> {
    if r.processes.is_empty() {
        return Err(StateError::Invalid(
            "a release needs at least one process type".into(),
        ));
    }
    for (name, p) in &r.processes {
        validate::proc_type(name)?;
        check_procs_limit(&p.limits)
            .map_err(|why| StateError::Invalid(format!("process type {name:?}: {why}")))?;
        let mut paths = std::collections::BTreeSet::new();
        for v in &p.volumes {
            let bad = !v.path.starts_with('/')
                || v.path == "/"
                || v.path.split('/').any(|seg| seg == ".." || seg == ".")
                || v.path.contains('\0');
            if bad || !paths.insert(v.path.trim_end_matches('/')) {
                return Err(StateError::Invalid(format!(
                    "process type {name:?}: volume path {:?} must be an absolute path below /, once",
                    v.path
                )));
            }
        }
        if p.args.is_empty()
            && r.image.config.entrypoint.is_empty()
            && r.image.config.cmd.is_empty()
        {
            return Err(StateError::Invalid(format!(
                "process type {name:?} has no command and the image has no entrypoint or cmd"
            )));
        }
    }
    check_layers(&r.image)
}

fn check_layers(image: &Image) -> Result<(), StateError> {
    check_digests(&image.layers)
}

fn check_digests<'a>(layers: impl IntoIterator<Item = &'a Layer>) -> Result<(), StateError> {
    for l in layers {
        if l.sha512.len() != 128 || !l.sha512.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StateError::Invalid(format!(
                "layer digest {:?} is not a hex SHA-512",
                l.sha512
            )));
        }
    }
    Ok(())
}

/// The env changed: if the app runs a release, a new one with the new env is deployed.
pub(crate) fn redeploy_with_env(s: &mut ClusterState, app: &str, now_ms: u64, cx: &mut Cx) {
    let Some(current) = s.jobs.current_release(app).cloned() else {
        return;
    };
    let env = s.apps.get(app).map(|a| a.env.clone()).unwrap_or_default();
    let release = Release {
        env: env.global,
        type_env: env.types,
        created_ms: now_ms,
        ..current
    };
    s.jobs.deploy(release, cx);
}

/// An app is deleted: its formation and releases go; its jobs are stopped by the scheduler.
pub(crate) fn remove_app(s: &mut ClusterState, app: &str, cx: &mut Cx) {
    if s.jobs.formations.remove(app).is_some() {
        cx.touch(FORMATIONS, app);
    }
    let ids: Vec<String> = s
        .jobs
        .releases
        .values()
        .filter(|r| r.app == app)
        .map(|r| r.id.clone())
        .collect();
    for id in ids {
        s.jobs.releases.remove(&id);
        cx.touch(RELEASES, &id);
    }
}

impl Area for Jobs {
    type Command = JobsCommand;

    fn apply(s: &mut ClusterState, cmd: JobsCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            JobsCommand::CreateRelease {
                app,
                release,
                now_ms,
            } => {
                s.app(&app)?;
                let release = release_for(s, &app, release, now_ms);
                check_release(&release)?;
                let release = s.jobs.deploy(release, cx);
                Ok(Response::Release { release })
            }
            JobsCommand::Deploy { app, release } => {
                s.app(&app)?;
                let Some(release) = release else {
                    if s.jobs.formations.remove(&app).is_some() {
                        cx.touch(FORMATIONS, &app);
                    }
                    return Ok(Response::Done);
                };
                if s.jobs.releases.get(&release).is_none_or(|r| r.app != app) {
                    return Err(StateError::NotFound(format!(
                        "release {release:?} of app {app:?}"
                    )));
                }
                let formation = s
                    .jobs
                    .formations
                    .entry(app.clone())
                    .or_insert_with(|| Formation {
                        app: app.clone(),
                        ..Formation::default()
                    });
                formation.release = release;
                let formation = formation.clone();
                cx.touch(FORMATIONS, &app);
                Ok(Response::Formation { formation })
            }
            JobsCommand::Scale { app, processes } => {
                s.app(&app)?;
                let release = s.jobs.current_release(&app).ok_or_else(|| {
                    StateError::Invalid(format!(
                        "app {app:?} has no release to scale: deploy one first"
                    ))
                })?;
                for (t, n) in &processes {
                    if !release.processes.contains_key(t) {
                        let known: Vec<&str> =
                            release.processes.keys().map(String::as_str).collect();
                        return Err(StateError::Invalid(format!(
                            "unknown process type {t:?} (release {} has {})",
                            release.id,
                            known.join(", ")
                        )));
                    }
                    if !(0..=MAX_SCALE).contains(n) {
                        return Err(StateError::Invalid(format!(
                            "{t}={n}: a count must be between 0 and {MAX_SCALE}"
                        )));
                    }
                }
                let formation = s.jobs.formations.get_mut(&app).expect("has a release");
                for (t, n) in processes {
                    if n == 0 {
                        formation.processes.remove(&t);
                    } else {
                        formation.processes.insert(t, n as u32);
                    }
                }
                let formation = formation.clone();
                cx.touch(FORMATIONS, &app);
                // Scaling up again after a crash loop starts without waiting out the backoff.
                let keys: Vec<String> = s
                    .jobs
                    .backoff
                    .keys()
                    .filter(|k| k.split_once('/').is_some_and(|(a, _)| a == app))
                    .cloned()
                    .collect();
                for k in keys {
                    s.jobs.backoff.remove(&k);
                    cx.touch(BACKOFF, &k);
                }
                Ok(Response::Formation { formation })
            }
            JobsCommand::SetLimits {
                app,
                proc_type,
                limits,
                now_ms,
            } => {
                s.app(&app)?;
                let mut release =
                    s.jobs.current_release(&app).cloned().ok_or_else(|| {
                        StateError::Invalid(format!("app {app:?} has no release"))
                    })?;
                let p = release.processes.get_mut(&proc_type).ok_or_else(|| {
                    StateError::Invalid(format!("unknown process type {proc_type:?}"))
                })?;
                if limits.memory.is_some_and(|m| m < 4 << 20) {
                    return Err(StateError::Invalid(
                        "a memory limit under 4MB cannot run anything".into(),
                    ));
                }
                if limits.max_procs == Some(0)
                    || limits.cpu_shares == Some(0)
                    || limits.cpu_millis == Some(0)
                {
                    return Err(StateError::Invalid("limits must be positive".into()));
                }
                check_procs_limit(&limits).map_err(StateError::Invalid)?;
                p.limits = limits;
                release.created_ms = now_ms;
                let release = s.jobs.deploy(release, cx);
                Ok(Response::Release { release })
            }
            JobsCommand::PlaceJobs { jobs, now_ms } => {
                for j in &jobs {
                    if j.tty.is_some() && !j.oneoff {
                        return Err(StateError::Invalid(
                            "only a one-off job runs on a terminal".into(),
                        ));
                    }
                    if let Some(b) = &j.build {
                        // A build may come before the app's first release.
                        s.app(&j.app)?;
                        if !j.oneoff {
                            return Err(StateError::Invalid("a build job is a one-off".into()));
                        }
                        check_digests(b.image.layers.iter().chain([&b.source]))?;
                        continue;
                    }
                    let r =
                        s.jobs.releases.get(&j.release).ok_or_else(|| {
                            StateError::NotFound(format!("release {:?}", j.release))
                        })?;
                    if r.app != j.app || (!j.oneoff && !r.processes.contains_key(&j.proc_type)) {
                        return Err(StateError::Invalid(format!(
                            "release {} has no process type {:?}",
                            r.id, j.proc_type
                        )));
                    }
                }
                let placed: Vec<Job> = jobs
                    .into_iter()
                    .enumerate()
                    .map(|(i, j)| Job {
                        id: format!("{}-{}-{}{}", j.app, j.proc_type, cx.revision, i),
                        app: j.app,
                        release: j.release,
                        proc_type: j.proc_type,
                        host: j.host,
                        state: JobState::Pending,
                        oneoff: j.oneoff,
                        args: j.args,
                        stdin: j.stdin,
                        build: j.build,
                        tty: j.tty,
                        env: j.env,
                        addr: None,
                        exit_status: None,
                        error: None,
                        created_ms: now_ms,
                        started_ms: None,
                        ended_ms: None,
                    })
                    .collect();
                for j in &placed {
                    cx.touch(JOBS, &j.id);
                    s.jobs.jobs.insert(j.id.clone(), j.clone());
                }
                Ok(Response::Jobs { jobs: placed })
            }
            JobsCommand::UpdateJob {
                id,
                state,
                addr,
                exit_status,
                error,
                now_ms,
                fault,
            } => {
                let report = Report {
                    state,
                    addr,
                    exit_status,
                    error,
                    now_ms,
                    fault,
                };
                update_job(s, &id, report, cx)
            }
            JobsCommand::StopJob { id } => {
                let job = s
                    .jobs
                    .jobs
                    .get_mut(&id)
                    .ok_or_else(|| StateError::NotFound(format!("job {id:?}")))?;
                if !job.state.is_active() {
                    return Err(StateError::Conflict(format!(
                        "job {id:?} is not running (it is {:?})",
                        job.state
                    )));
                }
                if job.state != JobState::Stopping {
                    job.state = JobState::Stopping;
                    cx.touch(JOBS, &id);
                }
                let job = job.clone();
                // Routers stop sending to it now, before its host signals it.
                let registered = s
                    .discovery
                    .services
                    .get(&job.service())
                    .is_some_and(|svc| svc.instances.contains_key(&job.id));
                if registered {
                    crate::discovery::remove_instance(s, &job.service(), &job.id, cx);
                }
                Ok(Response::Job { job })
            }
            JobsCommand::PutImage { name, image } => {
                if !crate::is_volume_name(&name) {
                    return Err(StateError::Invalid(format!(
                        "image name {name:?}: 1 to 64 letters, digits, - and _"
                    )));
                }
                check_layers(&image)?;
                if image.layers.is_empty() {
                    return Err(StateError::Invalid(
                        "an image needs at least one layer".into(),
                    ));
                }
                s.jobs.images.insert(name.clone(), image);
                cx.touch(IMAGES, &name);
                Ok(Response::Done)
            }
            JobsCommand::ClaimSubnet { host } => {
                let key = host.to_string();
                if !s.jobs.subnets.contains_key(&key) {
                    let index = s.jobs.free_subnet()?;
                    s.jobs.subnets.insert(key.clone(), index);
                    cx.touch(SUBNETS, &key);
                }
                Ok(Response::Subnets {
                    indexes: s.jobs.host_subnets(host),
                })
            }
            JobsCommand::ClaimExtraSubnet { host, have } => {
                let key = host.to_string();
                if !s.jobs.subnets.contains_key(&key) {
                    return Err(StateError::Invalid(
                        "a host claims its first job subnet before any other".into(),
                    ));
                }
                let held = s.jobs.host_subnets(host);
                if held.len() != have as usize {
                    return Ok(Response::Subnets { indexes: held });
                }
                if held.len() >= MAX_SUBNETS_PER_HOST {
                    return Err(StateError::Conflict(format!(
                        "a host holds at most {MAX_SUBNETS_PER_HOST} job subnets"
                    )));
                }
                let index = s.jobs.free_subnet()?;
                s.jobs
                    .extra_subnets
                    .entry(key.clone())
                    .or_default()
                    .push(index);
                cx.touch(EXTRA_SUBNETS, &key);
                Ok(Response::Subnets {
                    indexes: s.jobs.host_subnets(host),
                })
            }
            JobsCommand::ReleaseExtraSubnet { host, index } => {
                let key = host.to_string();
                if s.jobs.subnets.get(&key) == Some(&index) {
                    return Err(StateError::Invalid(
                        "a host keeps its first job subnet".into(),
                    ));
                }
                if let Some(extra) = s.jobs.extra_subnets.get_mut(&key) {
                    extra.retain(|i| *i != index);
                    if extra.is_empty() {
                        s.jobs.extra_subnets.remove(&key);
                    }
                    cx.touch(EXTRA_SUBNETS, &key);
                }
                Ok(Response::Subnets {
                    indexes: s.jobs.host_subnets(host),
                })
            }
            JobsCommand::HostDown { host, now_ms } => {
                let ids: Vec<String> = s.jobs.active_on(host).map(|j| j.id.clone()).collect();
                for id in &ids {
                    let report = Report {
                        state: JobState::Failed,
                        addr: None,
                        exit_status: None,
                        error: Some(format!("host {host} stopped answering")),
                        now_ms,
                        // Not the app's fault: no backoff for its replacement.
                        fault: JobFault::Neither,
                    };
                    update_job(s, id, report, cx)?;
                }
                Ok(Response::Expired { count: ids.len() })
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![
            (RELEASES, &self.releases),
            (FORMATIONS, &self.formations),
            (JOBS, &self.jobs),
            (BACKOFF, &self.backoff),
            (HOST_FAULTS, &self.host_faults),
            (SUBNETS, &self.subnets),
            (EXTRA_SUBNETS, &self.extra_subnets),
            (IMAGES, &self.images),
        ]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![
            (RELEASES, &mut self.releases),
            (FORMATIONS, &mut self.formations),
            (JOBS, &mut self.jobs),
            (BACKOFF, &mut self.backoff),
            (HOST_FAULTS, &mut self.host_faults),
            (SUBNETS, &mut self.subnets),
            (EXTRA_SUBNETS, &mut self.extra_subnets),
            (IMAGES, &mut self.images),
        ]
    }
}

/// A job's new state as its host (or the scheduler, for a lost host) reports it.
struct Report {
    state: JobState,
    addr: Option<String>,
    exit_status: Option<i32>,
    error: Option<String>,
    now_ms: u64,
    /// Whom a failure counts against.
    fault: JobFault,
}

/// Whom a job's failure counts against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobFault {
    /// The app's crash backoff: a crash, or a failure of the job itself.
    #[default]
    App,
    /// The host's: it could not start the job (its network, cgroups or disk).
    Host,
    /// No one's: the host lost the job (went down, or restarted before starting it).
    Neither,
}

impl JobFault {
    fn is_app(&self) -> bool {
        *self == JobFault::App
    }
}

fn update_job(s: &mut ClusterState, id: &str, report: Report, cx: &mut Cx) -> ApplyResult {
    let Report {
        state,
        addr,
        exit_status,
        error,
        now_ms,
        fault,
    } = report;
    let job = s
        .jobs
        .jobs
        .get_mut(id)
        .ok_or_else(|| StateError::NotFound(format!("job {id:?}")))?;
    if !job.state.is_active() {
        return Err(StateError::Conflict(format!(
            "job {id:?} already ended ({:?})",
            job.state
        )));
    }
    if state == JobState::Pending {
        return Err(StateError::Invalid(
            "a host cannot make a job pending".into(),
        ));
    }
    // A job asked to stop stays `stopping` until it ends, whatever its host last saw.
    let state = match (job.state, state) {
        (JobState::Stopping, JobState::Starting | JobState::Running) => JobState::Stopping,
        // Reports may land out of order; a job never goes back from running to starting.
        (JobState::Running, JobState::Starting) => JobState::Running,
        (_, s) => s,
    };
    let before = job.state;
    job.state = state;
    if addr.is_some() {
        job.addr = addr;
    }
    let came_up = state == JobState::Running && job.started_ms.is_none();
    if came_up {
        job.started_ms = Some(now_ms);
    }
    if !state.is_active() {
        job.exit_status = exit_status;
        job.error = error;
        job.ended_ms = Some(now_ms);
    }
    let job = job.clone();
    cx.touch(JOBS, id);
    // A job came up on its host: the host works again.
    let host = job.host.to_string();
    if came_up && s.jobs.host_faults.remove(&host).is_some() {
        cx.touch(HOST_FAULTS, &host);
    }
    if !state.is_active() {
        // It leaves discovery with its end, whoever noticed it.
        if let Some(svc) = s.discovery.services.get(&job.service()) {
            if svc.instances.contains_key(&job.id) {
                crate::discovery::remove_instance(s, &job.service(), &job.id, cx);
            }
        }
        let failed = matches!(state, JobState::Crashed | JobState::Failed);
        if failed && fault == JobFault::Host {
            let key = job.host.to_string();
            let f = s.jobs.host_faults.entry(key.clone()).or_default();
            // An old run of failures says little about a host now.
            if now_ms.saturating_sub(f.last_crash_ms) >= HOST_FAULT_FORGET_MS {
                f.crashes = 0;
            }
            f.crashes = f.crashes.saturating_add(1);
            f.last_crash_ms = now_ms;
            cx.touch(HOST_FAULTS, &key);
        }
        if failed && !job.oneoff && fault == JobFault::App && before != JobState::Stopping {
            let key = format!("{}/{}", job.app, job.proc_type);
            let b = s.jobs.backoff.entry(key.clone()).or_default();
            let ran_long = job
                .started_ms
                .is_some_and(|t| now_ms.saturating_sub(t) >= CRASH_RESET_MS);
            b.crashes = if ran_long { 1 } else { b.crashes + 1 };
            b.last_crash_ms = now_ms;
            cx.touch(BACKOFF, &key);
        }
        s.jobs.prune_history(&job.app, job.host, cx);
    }
    Ok(Response::Job { job })
}

#[cfg(test)]
mod tests;
