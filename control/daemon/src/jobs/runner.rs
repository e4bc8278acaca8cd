//! The runner's loop: reconcile the jobs placed on this host with those it runs, run each
//! from placement to cleanup (prepare, supervise, report), keep this host and its jobs
//! registered, and set up the host's job network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flynn_state::jobs::{JobFault, JobsCommand};
use flynn_state::{Command, DiscoveryCommand, Job, JobState};

use super::state::State;
use super::supervise::Outcome;
use super::{
    network, oneoff, JobRunner, RunningJob, CPU_META, HOST_HEARTBEAT, HOST_SERVICE, HOST_TTL,
    JOBS_META, JOB_TTL, MEMORY_META,
};

impl JobRunner {
    /// Reports a job's state; `fault` says whom a failure counts against.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn report(
        &self,
        local: &State,
        id: &str,
        state: JobState,
        addr: Option<String>,
        exit_status: Option<i32>,
        error: Option<String>,
        fault: JobFault,
    ) {
        let cmd = JobsCommand::UpdateJob {
            id: id.into(),
            state,
            addr,
            exit_status,
            error,
            now_ms: crate::now_ms(),
            fault,
        };
        propose_retrying(local, cmd.into()).await;
    }

    /// Claims this host's job subnet and sets up routed job networking, unless this host
    /// runs jobs in its own network (`--job-network host`, or `auto` where it cannot).
    pub(super) async fn setup_network(&self, local: &State) {
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
        let host = self.host;
        // The first subnet, and any extra ones it claimed before (a restarted daemon), with
        // jobs on them or not: from the cluster's answer, not a local state that may lag.
        let (index, extra) = loop {
            let claim = JobsCommand::ClaimSubnet { host };
            match local.propose(claim.into()).await {
                Ok(flynn_state::Response::Subnets { indexes }) if !indexes.is_empty() => {
                    break (indexes[0], indexes[1..].to_vec())
                }
                // A leader from before extra subnets (a rolling update) says only the first.
                Ok(flynn_state::Response::Subnet { index }) => break (index, Vec::new()),
                Ok(other) => {
                    tracing::error!(?other, "unexpected answer to a subnet claim");
                    *self.net_note.lock().expect("net note") =
                        Some(format!("unexpected answer to a subnet claim: {other:?}"));
                    let _ = self.net.set(None);
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
        // The networks of jobs that outlived the previous daemon are kept as they are.
        let kept: Vec<network::JobNet> = self
            .survivors
            .lock()
            .expect("survivors lock")
            .values()
            .filter_map(|s| s.runtime.net.clone())
            .collect();
        let overlay = match self.cfg.network.as_str() {
            "routed" => network::Overlay::HostRoutes,
            "vxlan" => network::Overlay::Vxlan,
            _ => network::Overlay::Auto,
        };
        let own_ip = self.ip.clone();
        let started = tokio::task::spawn_blocking(move || {
            network::HostNet::start(host, index, &extra, &kept, overlay, &own_ip)
        });
        match started.await {
            Ok(Ok(hn)) => {
                tracing::info!(subnet = %hn.subnet(), "jobs get addresses of their own");
                let _ = self.net.set(Some(hn));
            }
            Ok(Err(why)) => {
                let level_error = self.cfg.network != "auto";
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

    /// Points the service addresses (databases' stable addresses) at their primaries (a
    /// replicated shape's, else the service's leader); one with none is left out
    /// (connections are refused).
    pub(super) fn route_services(&self, local: &State) {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return;
        };
        let map: network::ServiceMap = local.read(|s| {
            flynn_state::resources::service_addrs(s)
                .into_iter()
                .filter_map(|a| {
                    let target = flynn_state::resources::service_target(s, &a.service)?;
                    let to: std::net::SocketAddrV4 = target.parse().ok()?;
                    Some(((a.ip, a.port), (*to.ip(), to.port())))
                })
                .collect()
        });
        tokio::task::block_in_place(|| hn.set_services(&map));
    }

    /// One pass over the jobs placed on this host.
    pub(super) fn reconcile(self: &Arc<Self>, local: &State) {
        self.route_subnets(local);
        self.route_services(local);
        // One pass over the jobs: this host's, and how many of them take an address here
        // (as the scheduler counts them against its capacity).
        let (mine, addressed): (Vec<Job>, u64) = local.read(|s| {
            let mine: Vec<Job> = s.jobs.active_on(self.host).cloned().collect();
            let addressed = mine
                .iter()
                .map(|j| super::scheduler::takes_address(s, j))
                .sum();
            (mine, addressed)
        });
        self.fit_subnets(local, addressed);
        let mut running = self.running.lock().expect("jobs lock");
        let mut survivors = self.survivors.lock().expect("survivors lock");
        for job in mine {
            if !running.contains_key(&job.id) {
                if let Some(s) = survivors.remove(&job.id) {
                    // Started by the previous daemon and still running (or just ended):
                    // taken up, not started again nor reported lost.
                    let l = Arc::new(RunningJob {
                        job: job.clone(),
                        pid: AtomicU64::new(s.pid.map_or(0, u64::from)),
                        stop: tokio::sync::Notify::new(),
                        stopping: AtomicBool::new(false),
                        io: None,
                        stdin: Mutex::new(None),
                        procs: Mutex::new(Vec::new()),
                        timeline: None,
                    });
                    running.insert(job.id.clone(), l.clone());
                    tokio::spawn(self.clone().take_up(local.clone(), l, s));
                    continue;
                }
            }
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
                    let l = Arc::new(RunningJob {
                        job: job.clone(),
                        pid: AtomicU64::new(0),
                        stop: tokio::sync::Notify::new(),
                        stopping: AtomicBool::new(false),
                        io,
                        stdin: Mutex::new(stdin),
                        procs: Mutex::new(Vec::new()),
                        timeline: (!job.oneoff && job.build.is_none())
                            .then(|| super::timeline::StartTimeline::begin(job.created_ms)),
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
                        // Not the app's doing, nor a fault of the host's: no one's.
                        me.report(&local, &job.id, next, None, None, why, JobFault::Neither)
                            .await;
                    });
                }
                _ => {}
            }
        }
        // Jobs the previous daemon left that the cluster no longer wants here (marked failed
        // while this host was away, or gone): a replacement may run already, so they end.
        let unwanted: Vec<(String, super::shim::Survivor)> = survivors.drain().collect();
        drop(survivors);
        for (id, s) in unwanted {
            tracing::warn!(job = %id, "a job the previous daemon ran is no longer wanted here: killing it");
            let me = self.clone();
            tokio::spawn(async move { me.end_survivor(&id, s).await });
        }
        // A job this host runs that the cluster has ended without it (marked failed while
        // this host seemed down) may already have a replacement, which may take its data
        // volume: it is killed now, not left running beside it.
        let ended: Vec<Arc<RunningJob>> = local.read(|s| {
            running
                .values()
                .filter(|l| !l.stopping.load(Ordering::SeqCst))
                .filter(|l| {
                    s.jobs
                        .jobs
                        .get(&l.job.id)
                        .is_none_or(|j| !j.state.is_active())
                })
                .cloned()
                .collect()
        });
        for l in ended {
            tracing::warn!(job = %l.job.id, "the cluster ended this job while it ran here: killing it");
            l.stopping.store(true, Ordering::SeqCst);
            super::supervise::nix_kill(&l, true);
            Self::kill_procs(&l);
            l.stop.notify_one();
        }
    }

    /// Runs one job from placement to cleanup.
    async fn run_job(self: Arc<Self>, local: State, l: Arc<RunningJob>) {
        let id = l.job.id.clone();
        self.started.fetch_add(1, Ordering::Relaxed);
        // Said while it is prepared, not before: the state machine never moves a job back
        // from running to starting, so this may land after a later report.
        {
            let (me, local, id) = (self.clone(), local.clone(), id.clone());
            tokio::spawn(async move {
                me.report(
                    &local,
                    &id,
                    JobState::Starting,
                    None,
                    None,
                    None,
                    JobFault::App,
                )
                .await
            });
        }
        let outcome = match self.prepare(&local, &l).await {
            Ok(prepared) => {
                l.mark("prepare");
                self.supervise(&local, &l, prepared).await
            }
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(job = %id, error = %why, "job could not start");
                self.logs
                    .push(&l.job.app, &id, &l.job.proc_type, "init", why.clone());
                l.tell(&why);
                Outcome::not_prepared(&e)
            }
        };
        // A build that succeeded leaves its slug; one that cannot be stored failed.
        let mut slug = None;
        let mut outcome = outcome;
        if l.job.build.is_some() && outcome.exit_status == Some(0) {
            let storing = std::time::Instant::now();
            match self.store_slug(&id).await {
                Ok(layer) => {
                    let mut result = super::build::built(&self.cfg.jobs_dir.join(&id));
                    result["slug"] = serde_json::json!(layer);
                    result["slug_ms"] = serde_json::json!(storing.elapsed().as_millis() as u64);
                    slug = Some(result);
                    if let Err(why) = self.store_build_cache(&l.job.app, &id).await {
                        tracing::warn!(job = %id, error = %why, "build cache not kept");
                        l.tell(&format!("the build cache was not kept ({why})"));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    l.tell(&why);
                    outcome = Outcome {
                        state: JobState::Failed,
                        exit_status: Some(1),
                        error: Some(why),
                        fault: JobFault::App,
                    };
                }
            }
        }
        self.finish(&local, &l, outcome, slug).await;
    }

    /// A job that outlived the previous daemon, followed again from where this host's log
    /// of it ends, to its end.
    async fn take_up(self: Arc<Self>, local: State, l: Arc<RunningJob>, s: super::shim::Survivor) {
        let job = &l.job;
        let cgroup = self
            .cgroups
            .as_ref()
            .map(|h| h.existing(&self.cgroup_name(&job.id)));
        if let Some(cg) = &cgroup {
            *l.procs.lock().expect("procs lock") = cg.procs_files();
        }
        let logs = self.logs.clone();
        let app = job.app.clone();
        let from = tokio::task::spawn_blocking(move || logs.resume_points(&app))
            .await
            .unwrap_or_default()
            .get(&job.id)
            .copied()
            .unwrap_or([0, 0]);
        tracing::info!(job = %job.id, pid = ?s.pid, stdout_from = from[0], stderr_from = from[1], "taking up a job the previous daemon started");
        let rt = s.runtime;
        let p = super::prepare::Prepared {
            spec_path: s.dir.join("spec.json"),
            cgroup,
            port: rt.port,
            ip: rt.ip,
            net: rt.net,
            health_path: rt.health_path,
            register: rt.register,
            shim: Some(s.dir.clone()),
        };
        let init_error = Arc::new(Mutex::new(None));
        let ended = super::shim::follow(
            self.logs.clone(),
            (job.app.clone(), job.id.clone(), job.proc_type.clone()),
            s.dir,
            from,
            init_error.clone(),
        );
        let up = job.state == JobState::Running;
        // Being stopped when the previous daemon went: its end is a stop's (done).
        if job.state == JobState::Stopping {
            l.stopping.store(true, Ordering::SeqCst);
        }
        let started = super::supervise::Started {
            ended: Box::pin(ended),
            readers: Vec::new(),
            init_error,
            up,
        };
        let outcome = self.watch(&local, &l, p, started).await;
        if let Some(pid) = s.pid {
            super::shim::reap_when_ended(pid);
        }
        self.finish(&local, &l, outcome, None).await;
    }

    /// Ends a job the previous daemon left that is not wanted here: everything in it is
    /// killed and what it held on this host given back.
    async fn end_survivor(&self, id: &str, s: super::shim::Survivor) {
        if let Some(pid) = s.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            super::shim::reap_when_ended(pid);
        }
        if let Some(h) = &self.cgroups {
            let cg = h.existing(&self.cgroup_name(id));
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        match &s.runtime.net {
            Some(n) => {
                if let Some(hn) = self.net.get().and_then(Option::as_ref) {
                    tokio::task::block_in_place(|| hn.release(n));
                }
            }
            None => {
                if let Some(port) = s.runtime.port {
                    self.ports.lock().expect("ports lock").remove(&port);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&s.dir);
    }

    /// Reports a job's end, tells an attached caller, and lets it go.
    async fn finish(
        &self,
        local: &State,
        l: &Arc<RunningJob>,
        outcome: Outcome,
        slug: Option<serde_json::Value>,
    ) {
        let id = l.job.id.clone();
        // What `flynn run` exits with: the command's status, 126 if it never ran.
        let outcome_exit = outcome.exit_status.unwrap_or(126);
        // Its kept volumes are free for the next job before the end is reported: once it
        // lands, a stop-first deploy starts that job here at once, and a claim still held
        // would send it to a new, empty volume.
        self.release_volume_claims(&id);
        self.report(
            local,
            &id,
            outcome.state,
            None,
            outcome.exit_status,
            outcome.error,
            outcome.fault,
        )
        .await;
        if let Some(io) = &l.io {
            io.finish(outcome_exit, slug);
            self.attachments.ended(&id);
        }
        self.running.lock().expect("jobs lock").remove(&id);
        let _ = std::fs::remove_dir_all(self.cfg.jobs_dir.join(&id));
        self.drop_volumes(local, &l.job).await;
    }

    pub(super) fn register(&self, job: &Job, addr: String) -> DiscoveryCommand {
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

    /// This host's registration in service `flynn-host`, with what the scheduler may place
    /// here (see `scheduler::Capacity`).
    fn host_registration(&self) -> Command {
        let jobs = self
            .net
            .get()
            .and_then(Option::as_ref)
            .map(|hn| (JOBS_META.to_string(), hn.capacity().to_string()));
        DiscoveryCommand::RegisterInstance {
            service: HOST_SERVICE.into(),
            id: self.instance_id(),
            addr: self.api_addr.clone(),
            meta: [
                (MEMORY_META.to_string(), self.cfg.memory.to_string()),
                (CPU_META.to_string(), self.cfg.cpu_millis.to_string()),
            ]
            .into_iter()
            .chain(jobs)
            .collect(),
            ttl_ms: HOST_TTL.as_millis() as u64,
            now_ms: crate::now_ms(),
        }
        .into()
    }

    /// Says this host's capacity now, not at the next heartbeat (its subnets changed);
    /// whether the cluster applied it.
    pub(super) async fn announce_capacity(&self, local: &State) -> bool {
        let _one = self.registering.lock().await;
        let registration = self.host_registration();
        match tokio::time::timeout(HOST_HEARTBEAT, local.propose(registration)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "host capacity not applied");
                false
            }
            Err(_) => {
                tracing::debug!("host capacity timed out");
                false
            }
        }
    }

    /// The capacity the state says this host has (its registration's `JOBS_META`).
    pub(super) fn said_capacity(&self, local: &State) -> Option<u64> {
        let id = self.instance_id();
        local.read(|s| {
            s.discovery
                .services
                .get(HOST_SERVICE)?
                .instances
                .get(&id)?
                .meta
                .get(JOBS_META)?
                .parse()
                .ok()
        })
    }

    /// Keeps this host, and its jobs' instances, registered.
    pub(super) async fn heartbeat(&self, local: &State, tick: u64) {
        let _one = self.registering.lock().await;
        let mut commands: Vec<Command> = vec![self.host_registration()];
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
        // Bounded: a write forwarded to a leader that was just cut off waits for an answer
        // that never comes, and the next beat must go to whichever leader there is then.
        match tokio::time::timeout(HOST_HEARTBEAT, local.propose(Command::Batch { commands })).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "host heartbeat not applied"),
            Err(_) => tracing::debug!("host heartbeat timed out"),
        }
    }
}

/// Proposes until applied (or refused: a refusal will not change by retrying), for reports
/// that must not be lost to a leader change.
pub(super) async fn propose_retrying(local: &State, cmd: Command) {
    // A lost report would leave a job `starting` (or running) in the state forever, so it
    // is retried until it lands; reports are idempotent, and one that already landed is
    // refused (an ended job) or changes nothing.
    let mut attempt = 0u32;
    loop {
        match local.propose(cmd.clone()).await {
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
