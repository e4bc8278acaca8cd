//! The scheduler, a leader controller: makes the jobs running match the formations.
//!
//! Each pass is a pure [`plan`] over the applied state, proposed as one batch:
//! - a host with jobs but no live `flynn-host` instance is down: its jobs fail (and leave
//!   discovery), so the next pass places replacements on live hosts;
//! - a process type with fewer jobs of the formation's release than asked gets new ones,
//!   each on the live host with the fewest jobs of that type (then the fewest jobs), unless
//!   the type is backing off after repeated crashes; a host that failed to start jobs (no
//!   free address, its cgroups or disk) takes no new ones for a while (500 ms, doubling,
//!   at most 30 s), and the other hosts take them;
//! - extra jobs are stopped, the ones not yet running and the newest first;
//! - jobs of an older release are stopped only as jobs of the new release are running, so
//!   a rolling deploy never drops below the formation's count of running jobs;
//! - jobs whose app, formation or type is gone are stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use flynn_state::jobs::{JobsCommand, NewJob};
use flynn_state::{ClusterState, Command, Job, JobState};
use futures::future::BoxFuture;

use super::HOST_SERVICE;
use crate::leader::LeaderController;
use crate::node::Node;

#[derive(Default)]
pub struct Scheduler {
    /// When "no room" was last logged, so a formation that cannot fit is said every 30 s,
    /// not on every pass.
    warned: std::sync::Mutex<Option<std::time::Instant>>,
    clock: crate::leader::LeadershipClock,
}

impl LeaderController for Scheduler {
    fn name(&self) -> &'static str {
        "scheduler"
    }

    fn run<'a>(&'a self, node: &'a Arc<Node>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // Noted on every pass, so the clock starts with the term.
            let led = self.clock.led_for(node, super::HOST_TTL);
            let now = crate::now_ms();
            let mut no_room = Vec::new();
            let commands = node
                .state
                .read(|a| plan_noting(&a.state, now, &mut no_room));
            crate::metrics::JOBS_UNPLACED
                .store(no_room.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if !no_room.is_empty() {
                let mut warned = self.warned.lock().expect("warned lock");
                if warned.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(30)) {
                    *warned = Some(std::time::Instant::now());
                    tracing::warn!(wanted = %no_room.join("; "), "no live host has room for these jobs (memory and CPU limits)");
                }
            }
            if commands.is_empty() {
                return;
            }
            let downs = commands
                .iter()
                .any(|c| matches!(c, Command::Jobs(JobsCommand::HostDown { .. })));
            if downs && !led {
                // A new leader: heartbeats may have lapsed only for want of one.
                return;
            }
            for c in &commands {
                if let Command::Jobs(JobsCommand::HostDown { host, .. }) = c {
                    tracing::warn!(
                        host,
                        "a host with jobs stopped heartbeating: its jobs are marked failed"
                    );
                }
            }
            let placing: usize = commands
                .iter()
                .map(|c| match c {
                    Command::Jobs(JobsCommand::PlaceJobs { jobs, .. }) => jobs.len(),
                    _ => 0,
                })
                .sum();
            match node.propose(Command::Batch { commands }).await {
                Ok(_) => {
                    crate::metrics::JOBS_PLACED
                        .fetch_add(placing as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(controller = self.name(), error = %e, "not applied"),
            }
        })
    }
}

/// Hosts whose `flynn-host` instance is live at `now`, by node id.
pub fn live_hosts(s: &ClusterState, now: u64) -> BTreeSet<u64> {
    s.discovery
        .services
        .get(HOST_SERVICE)
        .map(|svc| {
            svc.instances
                .values()
                .filter(|i| i.expires_at_ms >= now)
                .filter_map(|i| flynn_state::host_of_instance(&i.id))
                .collect()
        })
        .unwrap_or_default()
}

/// What a job reserves on its host, or what a host takes in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reservation {
    /// Bytes of memory.
    memory: u64,
    /// Millicores of CPU.
    cpu: u64,
    /// Jobs (each takes one of its host's job addresses).
    jobs: u64,
}

impl Reservation {
    /// A process type's: its memory and CPU limits (a type without them reserves nothing,
    /// like a container without a request: it may use what is free), and a job address
    /// unless it runs in the host's network.
    fn of(proc: &flynn_state::ProcessType) -> Self {
        Reservation {
            memory: proc.limits.memory.unwrap_or(0),
            cpu: proc.limits.cpu_millis.unwrap_or(0),
            jobs: u64::from(!proc.host_network),
        }
    }

    fn add(&mut self, other: Reservation) {
        self.memory = self.memory.saturating_add(other.memory);
        self.cpu = self.cpu.saturating_add(other.cpu);
        self.jobs = self.jobs.saturating_add(other.jobs);
    }
}

/// What each live host takes: memory and CPU it said it has (`None`: it did not say, so
/// that resource has no limit there).
#[derive(Debug, Clone, Copy, Default)]
struct Capacity {
    memory: Option<u64>,
    cpu: Option<u64>,
    /// How many jobs it holds at once (its job addresses; `None` in the host's network).
    jobs: Option<u64>,
}

impl Capacity {
    fn fits(&self, reserved: Reservation, more: Reservation) -> bool {
        let within = |cap: Option<u64>, used: u64, need: u64| {
            need == 0 || cap.is_none_or(|cap| used.saturating_add(need) <= cap)
        };
        within(self.memory, reserved.memory, more.memory)
            && within(self.cpu, reserved.cpu, more.cpu)
            && within(self.jobs, reserved.jobs, more.jobs)
    }
}

fn capacities(s: &ClusterState, live: &BTreeSet<u64>) -> BTreeMap<u64, Capacity> {
    let svc = s.discovery.services.get(HOST_SERVICE);
    live.iter()
        .map(|h| {
            let meta = svc
                .and_then(|svc| svc.instances.get(&flynn_state::host_instance_id(*h)))
                .map(|i| &i.meta);
            let read = |key: &str| meta.and_then(|m| m.get(key)?.parse().ok());
            let cap = Capacity {
                memory: read(super::MEMORY_META),
                cpu: read(super::CPU_META),
                jobs: read(super::JOBS_META),
            };
            (*h, cap)
        })
        .collect()
}

/// The active jobs on `host` that take a job address there, as the scheduler counts them
/// against the host's `JOBS_META`.
pub(super) fn addressed_jobs(s: &ClusterState, host: u64) -> u64 {
    s.jobs.active_on(host).map(|j| takes_address(s, j)).sum()
}

/// 1 if the active job `j` takes a job address on its host, as [`addressed_jobs`] counts.
pub(super) fn takes_address(s: &ClusterState, j: &Job) -> u64 {
    reserves(s, j).jobs
}

/// What a job reserves: its process type's limits, and a place among its host's jobs.
fn reserves(s: &ClusterState, j: &Job) -> Reservation {
    s.jobs
        .releases
        .get(&j.release)
        .and_then(|r| r.processes.get(&j.proc_type))
        .map(Reservation::of)
        .unwrap_or(Reservation {
            jobs: 1,
            ..Default::default()
        })
}

/// One process type's jobs of any release, in id order: those that count, and those
/// being stopped.
#[derive(Default)]
struct TypeJobs<'s> {
    counted: Vec<&'s Job>,
    stopping: Vec<&'s Job>,
}

fn stopping_rank(j: &Job) -> (u8, std::cmp::Reverse<u64>) {
    let rank = match j.state {
        JobState::Pending => 0,
        JobState::Starting => 1,
        _ => 2,
    };
    (rank, std::cmp::Reverse(j.created_ms))
}

/// What the scheduler proposes now: host failures first (alone), else placements and stops.
pub fn plan(s: &ClusterState, now: u64) -> Vec<Command> {
    plan_noting(s, now, &mut Vec::new())
}

/// [`plan`], noting in `no_room` each `app/type` that wants jobs no live host has room for.
pub fn plan_noting(s: &ClusterState, now: u64, no_room: &mut Vec<String>) -> Vec<Command> {
    if !s.bootstrapped() {
        return Vec::new();
    }
    let live = live_hosts(s, now);
    let active: Vec<&Job> = s
        .jobs
        .jobs
        .values()
        .filter(|j| j.state.is_active())
        .collect();
    let down: BTreeSet<u64> = active
        .iter()
        .map(|j| j.host)
        .filter(|h| !live.contains(h))
        .collect();
    if !down.is_empty() {
        return down
            .into_iter()
            .map(|host| JobsCommand::HostDown { host, now_ms: now }.into())
            .collect();
    }

    // One pass over the active jobs builds every index the formations' loop reads, so a
    // pass is linear in jobs, not jobs × process types (the simulation in
    // `bench/scheduler` keeps it so at 1,000 hosts and 10,000 jobs).
    let mut load: HashMap<u64, usize> = live.iter().map(|h| (*h, 0)).collect();
    let capacity = capacities(s, &live);
    let mut reserved: HashMap<u64, Reservation> = HashMap::new();
    // Spreading a type counts its jobs that stay: those of the release it runs, not ones
    // stopping or about to be replaced.
    let mut type_load: HashMap<(&str, &str, u64), usize> = HashMap::new();
    // Hosts holding a job of a type, in any release (a one-per-host type skips them).
    let mut held_hosts: HashSet<(&str, &str, u64)> = HashSet::new();
    let mut by_type: HashMap<(&str, &str), TypeJobs> = HashMap::new();
    // Jobs that count: active and not already being stopped.
    let mut counted: Vec<&Job> = Vec::new();
    for j in &active {
        reserved.entry(j.host).or_default().add(reserves(s, j));
        *load.entry(j.host).or_default() += 1;
        if j.oneoff {
            continue;
        }
        held_hosts.insert((&j.app, &j.proc_type, j.host));
        let of_type = by_type.entry((&j.app, &j.proc_type)).or_default();
        if j.state == JobState::Stopping {
            of_type.stopping.push(j);
            continue;
        }
        of_type.counted.push(j);
        counted.push(j);
        let current = s
            .jobs
            .formations
            .get(&j.app)
            .is_some_and(|f| f.release == j.release);
        if current {
            *type_load.entry((&j.app, &j.proc_type, j.host)).or_default() += 1;
        }
    }

    // Kept data volumes no active job holds, by app, type and host: a job of that type goes
    // where one waits for it, so it takes its data up again. Counted in jobs: a job that
    // left one at each kept path, so a host's count is its most at any kept path the type's
    // current release declares (a path it no longer declares is never taken up).
    let is_active = |id: &str| s.jobs.jobs.get(id).is_some_and(|j| j.state.is_active());
    let kept = |app: &str, ty: &str, path: &str| {
        s.jobs
            .current_release(app)
            .and_then(|r| r.processes.get(ty))
            .is_some_and(|p| {
                p.volumes
                    .iter()
                    .any(|v| !v.delete_on_stop && v.path == path)
            })
    };
    let mut free_at: HashMap<(&str, &str, u64, &str), usize> = HashMap::new();
    for v in s.volumes.volumes.values() {
        if let (Some(app), Some(ty), Some(path)) = (&v.app, &v.proc_type, &v.path) {
            if kept(app, ty, path) && v.free_for(app, ty, path, is_active) {
                *free_at.entry((app, ty, v.host, path)).or_default() += 1;
            }
        }
    }
    let mut free_volumes: HashMap<(&str, &str, u64), usize> = HashMap::new();
    for ((app, ty, host, _), n) in free_at {
        let most = free_volumes.entry((app, ty, host)).or_default();
        *most = (*most).max(n);
    }

    let mut place: Vec<NewJob> = Vec::new();
    let mut stop: Vec<String> = Vec::new();
    let mut stopping: HashSet<&str> = HashSet::new();
    let mut keep: HashSet<&str> = HashSet::new();
    // Draining hosts take no new jobs, and their jobs are replaced like old releases'.
    let draining = &s.cluster.draining;
    let placeable: BTreeSet<u64> = live.difference(draining).copied().collect();
    // Hosts that just failed to start jobs take none for a while either, but their jobs
    // count and stay as any others do.
    let paused: HashSet<u64> = live
        .iter()
        .copied()
        .filter(|h| {
            s.jobs
                .host_faults
                .get(&h.to_string())
                .is_some_and(|f| f.host_paused(now))
        })
        .collect();
    let none = TypeJobs::default();

    for (app, f) in &s.jobs.formations {
        let Some(release) = s.jobs.releases.get(&f.release) else {
            continue;
        };
        for (ty, proc) in &release.processes {
            let count = f.processes.get(ty).copied().unwrap_or(0) as usize;
            let (app, ty) = (app.as_str(), ty.as_str());
            let jobs = by_type.get(&(app, ty)).unwrap_or(&none);
            let (mut current, old): (Vec<&Job>, Vec<&Job>) = jobs
                .counted
                .iter()
                .copied()
                .partition(|j| j.release == f.release && !draining.contains(&j.host));
            // A type with kept data volumes deploys stop-first: a new job can take an old
            // one's volume up only once that job has ended (started alongside, it would get
            // an empty one). Jobs on draining hosts still go new-before-old: their volumes
            // cannot move with them anyway.
            let stop_first = proc.volumes.iter().any(|v| !v.delete_on_stop);
            let holds = |j: &Job| stop_first && !draining.contains(&j.host);
            let leaving: Vec<&Job> = jobs.stopping.iter().copied().filter(|j| holds(j)).collect();
            // Omni types run `count` jobs on every live host; others `count` in all.
            let groups: Vec<(Option<u64>, usize)> = if proc.omni {
                placeable.iter().map(|h| (Some(*h), count)).collect()
            } else {
                vec![(None, count)]
            };
            // An omni type's jobs by host, so each host's group is a lookup.
            let mut current_on: HashMap<u64, Vec<&Job>> = HashMap::new();
            let mut held_on: HashMap<u64, usize> = HashMap::new();
            if proc.omni {
                for j in &current {
                    current_on.entry(j.host).or_default().push(j);
                }
                for j in old.iter().chain(&leaving).filter(|j| holds(j)) {
                    *held_on.entry(j.host).or_default() += 1;
                }
            }
            let mut dropped: HashSet<&str> = HashSet::new();
            let mut want_total = 0;
            for (only_host, want) in groups {
                want_total += want;
                let (mine, held): (Vec<&Job>, usize) = match only_host {
                    Some(h) => (
                        current_on.get(&h).cloned().unwrap_or_default(),
                        held_on.get(&h).copied().unwrap_or(0),
                    ),
                    // Slots still held by old or leaving jobs of a stop-first type.
                    None => (
                        current.clone(),
                        old.iter().chain(&leaving).filter(|j| holds(j)).count(),
                    ),
                };
                let want_now = want.saturating_sub(held);
                // A paused host's own group (an omni type) waits for it, quietly.
                if only_host.is_some_and(|h| paused.contains(&h)) {
                    continue;
                }
                if mine.len() < want_now {
                    let backoff = s
                        .jobs
                        .backoff
                        .get(&format!("{app}/{ty}"))
                        .copied()
                        .unwrap_or_default();
                    if now < backoff.last_crash_ms.saturating_add(backoff.delay_ms()) {
                        continue;
                    }
                    let need = Reservation::of(proc);
                    let room = |h: u64, reserved: &HashMap<u64, Reservation>| {
                        capacity
                            .get(&h)
                            .copied()
                            .unwrap_or_default()
                            .fits(reserved.get(&h).copied().unwrap_or_default(), need)
                    };
                    // Where the next job goes: a host with one of the type's free volumes,
                    // then the fewest jobs of the type, then the fewest jobs.
                    let rank = |h: u64,
                                free_volumes: &HashMap<(&str, &str, u64), usize>,
                                type_load: &HashMap<(&str, &str, u64), usize>,
                                load: &HashMap<u64, usize>| {
                        (
                            free_volumes.get(&(app, ty, h)).copied().unwrap_or(0) == 0,
                            type_load.get(&(app, ty, h)).copied().unwrap_or(0),
                            load.get(&h).copied().unwrap_or(0),
                            h,
                        )
                    };
                    // A host that could take a job of the type now, pause aside: placeable,
                    // with room for its memory and CPU, and not holding a one-per-host type.
                    let could_take = |h: &u64| {
                        placeable.contains(h)
                            && room(*h, &reserved)
                            && !(proc.one_per_host && held_hosts.contains(&(app, ty, *h)))
                    };
                    // Those not paused; ordered, so each placement takes the first and puts
                    // that host back re-ranked.
                    let mut candidates: BTreeSet<(bool, usize, usize, u64)> = match only_host {
                        Some(h) => vec![h],
                        None => placeable.iter().copied().collect(),
                    }
                    .into_iter()
                    .filter(|h| !paused.contains(h) && could_take(h))
                    .map(|h| rank(h, &free_volumes, &type_load, &load))
                    .collect();
                    // A job whose kept volume waits on a paused host (one that could take it)
                    // waits for that host: placed elsewhere, it would start on a new, empty
                    // volume. Hosts where a volume waits come first among the candidates; a
                    // job goes where none does only if more are wanted than volumes wait on
                    // paused hosts. (An omni type's group is one host, not paused.)
                    let on_paused: usize = match only_host {
                        Some(_) => 0,
                        None => paused
                            .iter()
                            .filter(|h| could_take(h))
                            .filter_map(|h| free_volumes.get(&(app, ty, *h)))
                            .sum(),
                    };
                    // How many may still go where no volume waits, once one would.
                    let mut bare_left: Option<usize> = None;
                    for placing in mine.len()..want_now {
                        let Some((no_volume, _, _, host)) = candidates.pop_first() else {
                            let why = match paused.iter().filter(|h| placeable.contains(h)).count() {
                                0 => String::new(),
                                n => format!(
                                    " ({n} host(s) take no new jobs for up to {} s after failing to start some)",
                                    flynn_state::jobs::HOST_FAULT_MAX_DELAY_MS / 1000
                                ),
                            };
                            no_room.push(format!(
                                "{app}/{ty}: {} more wanted, {} MiB and {}m CPU and a job address each{why}",
                                want_now - mine.len(),
                                need.memory >> 20,
                                need.cpu
                            ));
                            break;
                        };
                        if no_volume && on_paused > 0 {
                            let left = bare_left
                                .get_or_insert((want_now - placing).saturating_sub(on_paused));
                            if *left == 0 {
                                // The rest wait for their data on a paused host.
                                break;
                            }
                            *left -= 1;
                        }
                        if let Some(n) = free_volumes.get_mut(&(app, ty, host)) {
                            *n = n.saturating_sub(1);
                        }
                        *type_load.entry((app, ty, host)).or_default() += 1;
                        *load.entry(host).or_default() += 1;
                        reserved.entry(host).or_default().add(need);
                        // A one-per-host type has had its one here.
                        if !proc.one_per_host && room(host, &reserved) {
                            candidates.insert(rank(host, &free_volumes, &type_load, &load));
                        }
                        place.push(NewJob {
                            app: app.to_string(),
                            release: f.release.clone(),
                            proc_type: ty.to_string(),
                            host,
                            oneoff: false,
                            args: Vec::new(),
                            stdin: false,
                            build: None,
                            tty: None,
                            env: Default::default(),
                        });
                    }
                } else if mine.len() > want {
                    let mut extra = mine;
                    extra.sort_by_key(|j| stopping_rank(j));
                    let n = extra.len() - want;
                    for j in extra.into_iter().take(n) {
                        stop.push(j.id.clone());
                        stopping.insert(&j.id);
                        dropped.insert(&j.id);
                    }
                }
            }
            current.retain(|j| !dropped.contains(j.id.as_str()));
            // Old-release jobs go as new ones come up, never below the count running.
            let running_new = current
                .iter()
                .filter(|j| j.state == JobState::Running)
                .count();
            let allowed_old = if old.iter().any(|j| holds(j)) {
                // One at a time, and the next only once the last replacement runs.
                let settled = leaving.is_empty()
                    && current.iter().all(|j| j.state == JobState::Running)
                    && current.len() + old.len() >= want_total;
                want_total.saturating_sub(current.len() + usize::from(settled))
            } else {
                want_total.saturating_sub(running_new)
            };
            let mut old = old;
            old.sort_by_key(|j| stopping_rank(j));
            let n = old.len().saturating_sub(allowed_old);
            for j in &old[..n] {
                stop.push(j.id.clone());
                stopping.insert(&j.id);
            }
            for j in current.iter().chain(&old[n..]) {
                keep.insert(&j.id);
            }
        }
    }
    // Anything else that counts has lost its formation, release or type.
    for j in &counted {
        if !keep.contains(j.id.as_str()) && !stopping.contains(j.id.as_str()) {
            stop.push(j.id.clone());
        }
    }

    let mut commands: Vec<Command> = Vec::new();
    if !place.is_empty() {
        commands.push(
            JobsCommand::PlaceJobs {
                jobs: place,
                now_ms: now,
            }
            .into(),
        );
    }
    commands.extend(
        stop.into_iter()
            .map(|id| Command::from(JobsCommand::StopJob { id })),
    );
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use flynn_state::{
        AppsCommand, ClusterCommand, DiscoveryCommand, Image, ImageConfig, NewRelease,
    };

    fn state(hosts: &[u64]) -> ClusterState {
        let mut s = ClusterState::default();
        let apply = |s: &mut ClusterState, c: Command| s.apply(c).0.unwrap();
        apply(
            &mut s,
            ClusterCommand::Bootstrap {
                auth_key: "0123456789abcdef0123".into(),
                domain: None,
                controller_certificate: None,
                system_env: Default::default(),
            }
            .into(),
        );
        apply(
            &mut s,
            AppsCommand::CreateApp {
                name: "web1".into(),
            }
            .into(),
        );
        apply(
            &mut s,
            JobsCommand::CreateRelease {
                app: "web1".into(),
                release: NewRelease {
                    image: Image {
                        layers: vec![],
                        config: ImageConfig {
                            cmd: vec!["httpd".into()],
                            ..ImageConfig::default()
                        },
                    },
                    processes: None,
                },
                now_ms: 0,
            }
            .into(),
        );
        for h in hosts {
            alive(&mut s, *h, 0);
        }
        s
    }

    fn alive(s: &mut ClusterState, host: u64, now: u64) {
        alive_with(s, host, now, None);
    }

    /// A host heartbeat, saying how much job memory it takes.
    fn alive_with(s: &mut ClusterState, host: u64, now: u64, memory: Option<u64>) {
        let meta: Vec<(&str, u64)> = memory
            .map(|m| vec![(crate::jobs::MEMORY_META, m)])
            .unwrap_or_default();
        alive_saying(s, host, now, &meta)
    }

    /// A host heartbeat saying what it takes (`MEMORY_META`, `CPU_META`).
    fn alive_saying(s: &mut ClusterState, host: u64, now: u64, meta: &[(&str, u64)]) {
        let meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.apply(
            DiscoveryCommand::RegisterInstance {
                service: HOST_SERVICE.into(),
                id: flynn_state::host_instance_id(host),
                addr: "10.0.0.1:1113".into(),
                meta,
                ttl_ms: 10_000,
                now_ms: now,
            }
            .into(),
        )
        .0
        .unwrap();
    }

    /// Applies the plan and marks every new job running, as hosts would.
    fn step(s: &mut ClusterState, now: u64) -> usize {
        let plan = plan(s, now);
        let n = plan.len();
        for c in plan {
            s.apply(c).0.unwrap();
        }
        let pending: Vec<String> = s
            .jobs
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Pending | JobState::Stopping))
            .map(|j| j.id.clone())
            .collect();
        for id in pending {
            let state = match s.jobs.jobs[&id].state {
                JobState::Stopping => JobState::Done,
                _ => JobState::Running,
            };
            s.apply(
                JobsCommand::UpdateJob {
                    id,
                    state,
                    addr: None,
                    exit_status: None,
                    error: None,
                    now_ms: now,
                    fault: Default::default(),
                }
                .into(),
            )
            .0
            .unwrap();
        }
        n
    }

    fn running_jobs(s: &ClusterState) -> Vec<&Job> {
        s.jobs
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .collect()
    }

    fn running_on(s: &ClusterState) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for j in running_jobs(s) {
            *m.entry(j.host).or_default() += 1;
        }
        m
    }

    fn scale(s: &mut ClusterState, n: i64) {
        s.apply(
            JobsCommand::Scale {
                app: "web1".into(),
                processes: [("web".to_string(), n)].into(),
            }
            .into(),
        )
        .0
        .unwrap();
    }

    /// An env change: a new release of web1, deployed; its id.
    fn redeploy(s: &mut ClusterState, now: u64) -> String {
        let env = AppsCommand::UpdateEnv {
            app: "web1".into(),
            proc_type: None,
            set: [("K".to_string(), format!("v{now}"))].into(),
            unset: vec![],
            now_ms: now,
        };
        s.apply(env.into()).0.unwrap();
        s.jobs.formations["web1"].release.clone()
    }

    #[test]
    fn t10_jobs_spread_over_hosts_and_scale_down() {
        let mut s = state(&[1, 2, 3]);
        scale(&mut s, 3);
        step(&mut s, 1);
        assert_eq!(running_on(&s), [(1, 1), (2, 1), (3, 1)].into());
        assert_eq!(step(&mut s, 2), 0, "a settled formation plans nothing");
        scale(&mut s, 1);
        step(&mut s, 3);
        assert_eq!(running_on(&s).values().sum::<usize>(), 1);
    }

    #[test]
    fn t11_a_down_host_s_jobs_move_to_live_hosts() {
        let mut s = state(&[1, 2]);
        scale(&mut s, 2);
        step(&mut s, 1);
        assert_eq!(running_on(&s), [(1, 1), (2, 1)].into());
        // Host 2 stops heartbeating; host 1 keeps on.
        alive(&mut s, 1, 20_000);
        step(&mut s, 20_001); // host down
        step(&mut s, 20_002); // replacement
        assert_eq!(running_on(&s), [(1, 2)].into());
    }

    #[test]
    fn t12_rolling_deploy_keeps_the_count_running() {
        let mut s = state(&[1, 2, 3]);
        scale(&mut s, 3);
        step(&mut s, 1);
        let new = redeploy(&mut s, 2);
        // Pass 1 places the new jobs and stops nothing: none of them runs yet.
        let plan1 = plan(&s, 2);
        assert!(plan1
            .iter()
            .all(|c| !matches!(c, Command::Jobs(JobsCommand::StopJob { .. }))));
        step(&mut s, 2);
        step(&mut s, 3);
        let running = running_jobs(&s);
        assert_eq!(running.len(), 3);
        assert!(running.iter().all(|j| j.release == new));
    }

    #[test]
    fn t13_crash_loops_back_off() {
        let mut s = state(&[1]);
        let mut placed = 0;
        for i in 0..10u64 {
            let now = 1_000 + i * 100;
            for c in plan(&s, now) {
                if matches!(c, Command::Jobs(JobsCommand::PlaceJobs { .. })) {
                    placed += 1;
                }
                s.apply(c).0.unwrap();
            }
            let ids: Vec<String> = s
                .jobs
                .jobs
                .values()
                .filter(|j| j.state.is_active())
                .map(|j| j.id.clone())
                .collect();
            for id in ids {
                s.apply(
                    JobsCommand::UpdateJob {
                        id,
                        state: JobState::Crashed,
                        addr: None,
                        exit_status: Some(1),
                        error: None,
                        now_ms: now,
                        fault: Default::default(),
                    }
                    .into(),
                )
                .0
                .unwrap();
            }
        }
        // Ten passes 100 ms apart: the first four restarts are immediate, then it waits.
        assert!((4..=5).contains(&placed), "placed {placed}");
    }

    /// Every active job on `host` failed as the host's fault (say, no free address there).
    fn host_failed_all(s: &mut ClusterState, host: u64, now: u64) {
        let ids: Vec<String> = s.jobs.active_on(host).map(|j| j.id.clone()).collect();
        for id in ids {
            let fail = JobsCommand::UpdateJob {
                id,
                state: JobState::Failed,
                addr: None,
                exit_status: None,
                error: Some("no free job address on this host".into()),
                now_ms: now,
                fault: flynn_state::jobs::JobFault::Host,
            };
            s.apply(fail.into()).0.unwrap();
        }
    }

    fn placed_on(plan: &[Command]) -> BTreeMap<u64, usize> {
        let mut on = BTreeMap::new();
        for c in plan {
            if let Command::Jobs(JobsCommand::PlaceJobs { jobs, .. }) = c {
                for j in jobs {
                    *on.entry(j.host).or_default() += 1;
                }
            }
        }
        on
    }

    #[test]
    fn t18_a_host_that_fails_to_start_jobs_is_passed_over_not_the_app() {
        let mut s = state(&[1, 2]);
        scale(&mut s, 4);
        let first = plan(&s, 1_000);
        assert_eq!(placed_on(&first), [(1, 2), (2, 2)].into());
        for c in first {
            s.apply(c).0.unwrap();
        }
        // Host 1 cannot start its two: they go to host 2 at once, the app not backed off.
        host_failed_all(&mut s, 1, 1_000);
        let again = plan(&s, 1_001);
        assert_eq!(placed_on(&again), [(2, 2)].into());
        for c in again {
            s.apply(c).0.unwrap();
        }
        // Host 2 fails too: nothing is placed until a pause ends, and "no room" says why.
        host_failed_all(&mut s, 2, 1_002);
        let mut no_room = Vec::new();
        let none = plan_noting(&s, 1_003, &mut no_room);
        assert_eq!(placed_on(&none), BTreeMap::new());
        assert!(
            no_room.len() == 1 && no_room[0].contains("2 host(s) take no new jobs"),
            "{no_room:?}"
        );
        // Host 1's two failures pause it 1 s; host 2's four, 4 s.
        assert_eq!(placed_on(&plan(&s, 1_999)), BTreeMap::new());
        let later = plan(&s, 2_000);
        assert_eq!(placed_on(&later), [(1, 4)].into());
        // A job that comes up on a host clears its record; host 2 stays paused.
        for c in later {
            s.apply(c).0.unwrap();
        }
        step(&mut s, 2_001);
        assert_eq!(
            s.jobs.host_faults.keys().collect::<Vec<_>>(),
            ["2"],
            "{:?}",
            s.jobs.host_faults
        );
        assert!(!s.jobs.backoff.contains_key("web1/web"));
    }

    #[test]
    fn t19_an_omni_type_s_job_on_a_paused_host_counts_through_a_deploy() {
        let mut s = state(&[1, 2, 3]);
        let web = flynn_state::ProcessType {
            omni: true,
            ..Default::default()
        };
        let image = s.jobs.current_release("web1").unwrap().image.clone();
        let release = NewRelease {
            image,
            processes: Some([("web".to_string(), web)].into()),
        };
        let create = JobsCommand::CreateRelease {
            app: "web1".into(),
            release,
            now_ms: 1,
        };
        s.apply(create.into()).0.unwrap();
        scale(&mut s, 1);
        step(&mut s, 2);
        assert_eq!(running_on(&s), [(1, 1), (2, 1), (3, 1)].into());
        // Host 1 failed to start jobs a moment ago: it is paused for 30 s.
        let fault = flynn_state::jobs::Backoff {
            crashes: 7,
            last_crash_ms: 3,
        };
        s.jobs.host_faults.insert("1".into(), fault);
        let new = redeploy(&mut s, 3);
        // The new release's jobs go to hosts 2 and 3; no old job stops before they run.
        let first = plan(&s, 4);
        assert_eq!(placed_on(&first), [(2, 1), (3, 1)].into());
        assert!(
            !first
                .iter()
                .any(|c| matches!(c, Command::Jobs(JobsCommand::StopJob { .. }))),
            "{first:?}"
        );
        step(&mut s, 4);
        step(&mut s, 5);
        // Three still run (old jobs go one for one as new ones run, as in any omni deploy),
        // and none of the new release on host 1 until its pause ends.
        assert_eq!(running_jobs(&s).len(), 3);
        assert!(!running_jobs(&s)
            .iter()
            .any(|j| j.host == 1 && j.release == new));
        // Then it gets the new one, and the old one goes.
        for h in [1, 2, 3] {
            alive(&mut s, h, 30_000);
        }
        step(&mut s, 30_004);
        step(&mut s, 30_005);
        assert!(running_jobs(&s).iter().all(|j| j.release == new));
        assert_eq!(running_on(&s), [(1, 1), (2, 1), (3, 1)].into());
    }

    #[test]
    fn t14_jobs_go_only_where_their_memory_limit_fits() {
        const MIB: u64 = 1 << 20;
        let mut s = state(&[1, 2]);
        alive_with(&mut s, 1, 0, Some(1024 * MIB));
        alive_with(&mut s, 2, 0, Some(2048 * MIB));
        s.apply(
            JobsCommand::SetLimits {
                app: "web1".into(),
                proc_type: "web".into(),
                limits: flynn_state::Limits {
                    memory: Some(768 * MIB),
                    ..Default::default()
                },
                now_ms: 0,
            }
            .into(),
        )
        .0
        .unwrap();
        scale(&mut s, 4);
        step(&mut s, 1);
        step(&mut s, 2);
        // 768 MiB jobs: one fits in host 1's 1 GiB, two in host 2's 2 GiB; the fourth waits.
        assert_eq!(running_on(&s), [(1, 1), (2, 2)].into());
        let mut no_room = Vec::new();
        let again = plan_noting(&s, 3, &mut no_room);
        assert!(
            again
                .iter()
                .all(|c| !matches!(c, Command::Jobs(JobsCommand::PlaceJobs { .. }))),
            "{again:?}"
        );
        assert_eq!(
            no_room,
            ["web1/web: 1 more wanted, 768 MiB and 0m CPU and a job address each"]
        );
        // Host 2 says it has more room: the fourth job goes there.
        alive_with(&mut s, 2, 4, Some(4096 * MIB));
        step(&mut s, 5);
        assert_eq!(running_on(&s), [(1, 1), (2, 3)].into());
    }

    #[test]
    fn t14d_a_host_takes_no_more_jobs_than_it_has_addresses_for() {
        use crate::jobs::JOBS_META;
        let mut s = state(&[1, 2]);
        alive_saying(&mut s, 1, 0, &[(JOBS_META, 2)]);
        alive_saying(&mut s, 2, 0, &[(JOBS_META, 1)]);
        scale(&mut s, 5);
        step(&mut s, 1);
        step(&mut s, 2);
        // Three addresses in all: three run, two wait, and none is started to fail.
        assert_eq!(running_on(&s), [(1, 2), (2, 1)].into());
        let mut no_room = Vec::new();
        plan_noting(&s, 3, &mut no_room);
        assert_eq!(
            no_room,
            ["web1/web: 2 more wanted, 0 MiB and 0m CPU and a job address each"]
        );
    }

    #[test]
    fn t14c_jobs_go_only_where_their_cpu_reservation_fits() {
        use crate::jobs::{CPU_META, MEMORY_META};
        let mut s = state(&[1, 2]);
        // Host 1 has two cores, host 2 one (and memory to spare on both).
        alive_saying(&mut s, 1, 0, &[(CPU_META, 2000), (MEMORY_META, 1 << 30)]);
        alive_saying(&mut s, 2, 0, &[(CPU_META, 1000), (MEMORY_META, 1 << 30)]);
        s.apply(
            JobsCommand::SetLimits {
                app: "web1".into(),
                proc_type: "web".into(),
                limits: flynn_state::Limits {
                    cpu_millis: Some(750),
                    ..Default::default()
                },
                now_ms: 0,
            }
            .into(),
        )
        .0
        .unwrap();
        scale(&mut s, 4);
        step(&mut s, 1);
        step(&mut s, 2);
        // 750m each: two fit in host 1's 2000m, one in host 2's 1000m; the fourth waits.
        assert_eq!(running_on(&s), [(1, 2), (2, 1)].into());
        let mut no_room = Vec::new();
        let again = plan_noting(&s, 3, &mut no_room);
        assert!(
            again
                .iter()
                .all(|c| !matches!(c, Command::Jobs(JobsCommand::PlaceJobs { .. }))),
            "{again:?}"
        );
        assert_eq!(
            no_room,
            ["web1/web: 1 more wanted, 0 MiB and 750m CPU and a job address each"]
        );
        // A type that reserves nothing still goes where the cores are all reserved.
        s.apply(
            JobsCommand::SetLimits {
                app: "web1".into(),
                proc_type: "web".into(),
                limits: flynn_state::Limits::default(),
                now_ms: 4,
            }
            .into(),
        )
        .0
        .unwrap();
        step(&mut s, 5);
        step(&mut s, 6);
        let placed: usize = running_on(&s).values().sum();
        assert!(placed >= 4, "{:?}", running_on(&s));
    }

    #[test]
    fn t14b_a_one_per_host_type_never_doubles_up_on_a_host() {
        let mut s = state(&[1, 2, 3]);
        s.apply(
            JobsCommand::CreateRelease {
                app: "web1".into(),
                release: NewRelease {
                    image: Image {
                        layers: vec![],
                        config: ImageConfig {
                            cmd: vec!["postgres".into()],
                            ..ImageConfig::default()
                        },
                    },
                    processes: Some(
                        [(
                            "web".to_string(),
                            flynn_state::ProcessType {
                                ports: true,
                                one_per_host: true,
                                ..Default::default()
                            },
                        )]
                        .into(),
                    ),
                },
                now_ms: 0,
            }
            .into(),
        )
        .0
        .unwrap();
        scale(&mut s, 4);
        step(&mut s, 1);
        step(&mut s, 2);
        // Four wanted, three hosts: one each, and the fourth waits for a host.
        assert_eq!(running_on(&s), [(1, 1), (2, 1), (3, 1)].into());
    }

    /// A volume of web1 at /data that job `gone` left on `host`.
    fn left_volume(id: &str, ty: &str, host: u64) -> flynn_state::volumes::Volume {
        flynn_state::volumes::Volume {
            id: id.into(),
            host,
            provider: "zfs".into(),
            size: None,
            app: Some("web1".into()),
            job: Some("gone".into()),
            proc_type: Some(ty.into()),
            path: Some("/data".into()),
            snapshots: Vec::new(),
            created_ms: 1,
        }
    }

    /// A release of web1 whose web type keeps its data at /data.
    fn keeps_data(s: &mut ClusterState) {
        keeps(s, &["/data"]);
    }

    /// A release of web1 whose web type keeps its data at each of `paths`.
    fn keeps(s: &mut ClusterState, paths: &[&str]) {
        let web = flynn_state::ProcessType {
            ports: true,
            volumes: paths
                .iter()
                .map(|p| flynn_state::VolumeReq {
                    path: p.to_string(),
                    delete_on_stop: false,
                })
                .collect(),
            ..Default::default()
        };
        let image = s.jobs.current_release("web1").unwrap().image.clone();
        let create = JobsCommand::CreateRelease {
            app: "web1".into(),
            release: NewRelease {
                image,
                processes: Some([("web".to_string(), web)].into()),
            },
            now_ms: 1,
        };
        s.apply(create.into()).0.unwrap();
    }

    #[test]
    fn t15_a_job_goes_where_a_kept_data_volume_of_its_type_waits() {
        let mut s = state(&[1, 2, 3]);
        keeps_data(&mut s);
        // Host 3 holds a volume web1/web left (a restored backup, an earlier job).
        // A volume of another type on host 2 does not draw it.
        let volume = |ty: &str, host: u64| left_volume(&format!("{ty}-v0"), ty, host);
        for v in [volume("web", 3), volume("worker", 2)] {
            s.apply(flynn_state::VolumesCommand::PutVolume { volume: v }.into())
                .0
                .unwrap();
        }
        scale(&mut s, 1);
        step(&mut s, 1);
        assert_eq!(running_on(&s), [(3, 1)].into());
        // Its host's runner takes the volume up (records the job as its owner).
        let job = s.jobs.jobs.values().next().unwrap().id.clone();
        let mut taken = volume("web", 3);
        taken.job = Some(job);
        s.apply(flynn_state::VolumesCommand::PutVolume { volume: taken }.into())
            .0
            .unwrap();
        // A second job has no volume waiting: it spreads as usual.
        scale(&mut s, 2);
        step(&mut s, 2);
        assert_eq!(running_on(&s).get(&3), Some(&1));
    }

    /// A web volume left on each of `hosts`.
    fn volumes_left_on(s: &mut ClusterState, hosts: &[u64]) {
        for h in hosts {
            let volume = left_volume(&format!("web-v{h}"), "web", *h);
            s.apply(flynn_state::VolumesCommand::PutVolume { volume }.into())
                .0
                .unwrap();
        }
    }

    /// `host` failed to start a job at 10 ms: paused until 510 ms.
    fn paused_at_10(s: &mut ClusterState, host: u64) {
        let fault = flynn_state::jobs::Backoff {
            crashes: 1,
            last_crash_ms: 10,
        };
        s.jobs.host_faults.insert(host.to_string(), fault);
    }

    #[test]
    fn t20_a_kept_volume_on_a_paused_host_waits_for_its_host() {
        let mut s = state(&[1, 2, 3]);
        keeps_data(&mut s);
        volumes_left_on(&mut s, &[3]);
        // Host 3 failed to start a job a moment ago (another app's, say).
        paused_at_10(&mut s, 3);
        scale(&mut s, 2);
        // One job goes elsewhere; the one whose data waits on host 3 is not placed on an
        // empty volume somewhere else.
        let paused = plan(&s, 11);
        assert_eq!(placed_on(&paused).values().sum::<usize>(), 1, "{paused:?}");
        assert!(!placed_on(&paused).contains_key(&3));
        for c in paused {
            s.apply(c).0.unwrap();
        }
        // Once the pause ends, it goes to its volume.
        let after = plan(&s, 10 + 500);
        assert_eq!(placed_on(&after), [(3, 1)].into());
    }

    #[test]
    fn t21_a_job_takes_a_waiting_volume_on_a_host_not_paused_first() {
        let mut s = state(&[1, 2, 3]);
        keeps_data(&mut s);
        volumes_left_on(&mut s, &[2, 3]);
        paused_at_10(&mut s, 3);
        // One job wanted, and a volume waits on host 2 too: it goes there now.
        scale(&mut s, 1);
        assert_eq!(placed_on(&plan(&s, 11)), [(2, 1)].into());
    }

    /// web1's web jobs take 64 MiB each; host 2 takes `mib` MiB of jobs.
    fn host_2_takes_mib(s: &mut ClusterState, mib: u64) {
        const MIB: u64 = 1 << 20;
        let limits = JobsCommand::SetLimits {
            app: "web1".into(),
            proc_type: "web".into(),
            limits: flynn_state::Limits {
                memory: Some(64 * MIB),
                ..Default::default()
            },
            now_ms: 1,
        };
        s.apply(limits.into()).0.unwrap();
        alive_with(s, 2, 0, Some(mib * MIB));
    }

    #[test]
    fn t22_a_volume_on_a_host_that_cannot_take_the_job_does_not_end_the_wait() {
        let mut s = state(&[1, 2, 3]);
        keeps_data(&mut s);
        volumes_left_on(&mut s, &[2, 3]);
        paused_at_10(&mut s, 3);
        // 64 MiB jobs; host 2 takes 32 MiB of jobs.
        host_2_takes_mib(&mut s, 32);
        // Host 2 has no room, host 3 is paused: the job waits for its data on host 3,
        // and does not start on host 1 with an empty volume.
        scale(&mut s, 1);
        assert_eq!(placed_on(&plan(&s, 11)), BTreeMap::new());
        assert_eq!(placed_on(&plan(&s, 510)), [(3, 1)].into());
    }

    #[test]
    fn t24_volumes_elsewhere_count_only_as_far_as_their_host_has_room() {
        let mut s = state(&[1, 2, 3]);
        keeps_data(&mut s);
        // Two jobs left their data on host 2, one on host 3, which is paused.
        for (id, host) in [("a", 2), ("b", 2), ("c", 3)] {
            let volume = left_volume(id, "web", host);
            s.apply(flynn_state::VolumesCommand::PutVolume { volume }.into())
                .0
                .unwrap();
        }
        paused_at_10(&mut s, 3);
        // 64 MiB jobs; host 2 takes one.
        host_2_takes_mib(&mut s, 100);
        // Two wanted: one to host 2; the other waits for host 3, not host 1's empty disk.
        scale(&mut s, 2);
        assert_eq!(placed_on(&plan(&s, 11)), [(2, 1)].into());
    }

    #[test]
    fn t23_a_release_that_adds_a_kept_path_still_draws_a_job_to_its_old_data() {
        let mut s = state(&[1, 2, 3]);
        keeps(&mut s, &["/cache", "/data"]);
        volumes_left_on(&mut s, &[3]);
        scale(&mut s, 1);
        assert_eq!(placed_on(&plan(&s, 11)), [(3, 1)].into());
    }

    #[test]
    fn t16_a_draining_host_s_jobs_move_new_before_old() {
        let mut s = state(&[1, 2, 3]);
        scale(&mut s, 3);
        step(&mut s, 1);
        assert_eq!(running_on(&s), [(1, 1), (2, 1), (3, 1)].into());
        s.apply(
            flynn_state::ClusterCommand::SetDraining {
                host: 2,
                draining: true,
            }
            .into(),
        )
        .0
        .unwrap();
        // First a replacement elsewhere; host 2's job still runs meanwhile.
        let first = plan(&s, 2);
        assert!(
            first
                .iter()
                .all(|c| !matches!(c, Command::Jobs(JobsCommand::StopJob { .. }))),
            "{first:?}"
        );
        step(&mut s, 3);
        step(&mut s, 4);
        assert_eq!(running_on(&s).get(&2), None, "{:?}", running_on(&s));
        assert_eq!(running_on(&s).values().sum::<usize>(), 3);
        // Undrained, it takes jobs again as the count asks.
        s.apply(
            flynn_state::ClusterCommand::SetDraining {
                host: 2,
                draining: false,
            }
            .into(),
        )
        .0
        .unwrap();
        scale(&mut s, 4);
        step(&mut s, 5);
        assert_eq!(running_on(&s).get(&2), Some(&1));
    }

    #[test]
    fn t17_a_type_with_kept_volumes_deploys_stop_first_one_at_a_time() {
        let mut s = state(&[1, 2]);
        keeps_data(&mut s);
        scale(&mut s, 2);
        step(&mut s, 2);
        assert_eq!(running_on(&s), [(1, 1), (2, 1)].into());
        let new = redeploy(&mut s, 3);
        let kinds = |plan: &[Command]| -> (usize, usize) {
            let stops = plan
                .iter()
                .filter(|c| matches!(c, Command::Jobs(JobsCommand::StopJob { .. })))
                .count();
            let places = plan
                .iter()
                .filter(|c| matches!(c, Command::Jobs(JobsCommand::PlaceJobs { .. })))
                .count();
            (stops, places)
        };
        // First one old job stops, and nothing starts beside it.
        let first = plan(&s, 4);
        assert_eq!(kinds(&first), (1, 0), "{first:?}");
        for c in first {
            s.apply(c).0.unwrap();
        }
        // While it is still stopping, nothing more happens: its volume is not free yet.
        assert!(plan(&s, 5).is_empty());
        // Then, step by step, never more than the count active and never none running.
        for now in 6..20 {
            step(&mut s, now);
            let active = s.jobs.jobs.values().filter(|j| j.state.is_active()).count();
            let running = running_on(&s).values().sum::<usize>();
            assert!(
                active <= 2 && running >= 1,
                "at {now}: {active} active, {running} running"
            );
        }
        let running = running_jobs(&s);
        assert_eq!(running.len(), 2);
        assert!(running.iter().all(|j| j.release == new));
    }
}
