//! A job's cgroups: memory, CPU weight and process count, on cgroup v1 (one hierarchy per
//! controller, as this development machine mounts them) or v2 (one unified hierarchy, as
//! modern hosts do). Found from `/proc/self/mountinfo`, never assumed.

use std::fs;
use std::path::{Path, PathBuf};

use flynn_model::Limits;

use crate::Error;

/// The cgroup layout of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy with the memory controller: one directory per job.
    V2 { root: PathBuf },
    /// Per-controller hierarchies; a controller not mounted is not limited. `cpuacct` (CPU
    /// time, for the metrics) is often mounted with `cpu` (`cpu,cpuacct`): then both name
    /// the same directory.
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
}

/// Parent of every job's cgroup, under each hierarchy's root.
const PARENT: &str = "flynn";

impl Hierarchy {
    /// Reads the mounts: v2 if a cgroup2 mount offers the memory controller, else the v1
    /// controllers' mounts.
    pub fn detect() -> Result<Self, Error> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io(Path::new("/proc/self/mountinfo"), e))?;
        Ok(Self::from_mountinfo(&text, |p| {
            fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
        }))
    }

    fn from_mountinfo(text: &str, controllers: impl Fn(&Path) -> String) -> Self {
        let (mut memory, mut cpu, mut cpuacct, mut pids) = (None, None, None, None);
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_point), Some(fstype), Some(opts)) =
                (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
            else {
                continue;
            };
            let mount_point = PathBuf::from(mount_point);
            match *fstype {
                "cgroup2"
                    if controllers(&mount_point)
                        .split_whitespace()
                        .any(|c| c == "memory") =>
                {
                    return Hierarchy::V2 { root: mount_point };
                }
                "cgroup" => {
                    let has = |c: &str| opts.split(',').any(|o| o == c);
                    if has("memory") {
                        memory.get_or_insert(mount_point.clone());
                    }
                    if has("cpu") {
                        cpu.get_or_insert(mount_point.clone());
                    }
                    if has("cpuacct") {
                        cpuacct.get_or_insert(mount_point.clone());
                    }
                    if has("pids") {
                        pids.get_or_insert(mount_point);
                    }
                }
                _ => {}
            }
        }
        Hierarchy::V1 {
            memory,
            cpu,
            cpuacct,
            pids,
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V2 { .. } => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }

    /// The cgroup(s) a job was given before (by a previous daemon), as they are.
    pub fn existing(&self, job: &str) -> JobCgroup {
        JobCgroup {
            hierarchy: self.clone(),
            job: job.to_string(),
            dirs: self.dirs_of(job),
        }
    }

    /// A job's directories: one per mounted hierarchy (controllers mounted together share
    /// one).
    fn dirs_of(&self, job: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2 { root } => vec![root.join(PARENT).join(job)],
            Hierarchy::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => {
                let mut dirs: Vec<PathBuf> = Vec::new();
                for root in [memory, cpu, cpuacct, pids].into_iter().flatten() {
                    let dir = root.join(PARENT).join(job);
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                dirs
            }
        }
    }

    /// The root of the hierarchy that holds `controller`.
    fn root_of(&self, controller: &str) -> Option<&PathBuf> {
        match self {
            Hierarchy::V2 { root } => Some(root),
            Hierarchy::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => match controller {
                "memory" => memory.as_ref(),
                "cpu" => cpu.as_ref(),
                "cpuacct" => cpuacct.as_ref(),
                "pids" => pids.as_ref(),
                _ => None,
            },
        }
    }

    /// Makes the job's cgroup(s) with its limits.
    pub fn create(&self, job: &str, limits: &Limits) -> Result<JobCgroup, Error> {
        let dirs = match self {
            Hierarchy::V2 { root } => {
                // Controllers must be enabled down the path for a child to get them.
                let parent = root.join(PARENT);
                enable_v2(root)?;
                mkdir(&parent)?;
                enable_v2(&parent)?;
                vec![parent.join(job)]
            }
            Hierarchy::V1 { .. } => self.dirs_of(job),
        };
        for d in &dirs {
            mkdir(d)?;
        }
        let cg = JobCgroup {
            hierarchy: self.clone(),
            job: job.to_string(),
            dirs,
        };
        cg.limit(job, limits)?;
        Ok(cg)
    }
}

fn mkdir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn enable_v2(dir: &Path) -> Result<(), Error> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .map(|c| format!("+{c}"))
        .collect();
    let file = dir.join("cgroup.subtree_control");
    fs::write(&file, wanted.join(" ")).map_err(|e| Error::io(&file, e))
}

/// Moves the calling process into a job's cgroups, given [`JobCgroup::join_files`].
///
/// Why `tasks` on v1: moving a whole process (`cgroup.procs`) takes the kernel's threadgroup
/// lock for writing, which waits for an RCU grace period, 8-24 ms measured here and most of
/// a job's start. Moving the calling thread (`0` written to `tasks`) skips that lock
/// (measured on Linux 6.18; a kernel that takes it anyway is no slower), and a
/// single-threaded process (a job's init before it starts anything) is its one thread, so
/// it moves whole: 0.35 ms for three hierarchies. A process with more threads moves whole
/// through `cgroup.procs`, as v2 always does (it refuses to move one thread alone between
/// domain cgroups).
pub fn join(files: &[PathBuf]) -> Result<(), Error> {
    let pid = std::process::id().to_string();
    let one_thread = fs::read_to_string("/proc/self/status").is_ok_and(|s| one_thread(&s));
    for f in files {
        let (file, who) = if f.file_name().is_some_and(|n| n == "tasks") {
            if one_thread {
                (f.clone(), "0")
            } else {
                (f.with_file_name("cgroup.procs"), pid.as_str())
            }
        } else {
            (f.clone(), pid.as_str())
        };
        fs::write(&file, who).map_err(|e| Error::io(&file, e))?;
    }
    Ok(())
}

/// Whether `/proc/PID/status` text says the process has one thread.
fn one_thread(status: &str) -> bool {
    status
        .lines()
        .any(|l| l.split_whitespace().eq(["Threads:", "1"]))
}

/// One job's cgroup directories (one on v2; one per mounted controller on v1).
#[derive(Debug, Clone)]
pub struct JobCgroup {
    hierarchy: Hierarchy,
    job: String,
    dirs: Vec<PathBuf>,
}

/// What a job uses, as its cgroups count it; `None` where this host does not count it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Memory in use less the page cache the kernel may drop (the working set, as
    /// Kubernetes and Docker report it).
    pub memory_bytes: Option<u64>,
    /// CPU time used since the job started.
    pub cpu_seconds: Option<f64>,
}

impl JobCgroup {
    /// The files a process writes to, to join the job (see [`join`]): on v1 each
    /// hierarchy's `tasks`, on v2 the one `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let file = match self.hierarchy {
            Hierarchy::V2 { .. } => "cgroup.procs",
            Hierarchy::V1 { .. } => "tasks",
        };
        self.dirs.iter().map(|d| d.join(file)).collect()
    }

    /// The `cgroup.procs` files, which list the job's processes.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn dir_of(&self, controller: &str) -> Option<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2 { .. } => self.dirs.first().cloned(),
            Hierarchy::V1 { .. } => self
                .hierarchy
                .root_of(controller)
                .map(|root| root.join(PARENT).join(&self.job)),
        }
    }

    fn read(&self, controller: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.dir_of(controller)?.join(file)).ok()
    }

    /// The job's memory working set and CPU time now.
    pub fn usage(&self) -> Usage {
        let stat = |text: &str, key: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        let v2 = matches!(self.hierarchy, Hierarchy::V2 { .. });
        let (current, inactive_key, cpu) = if v2 {
            let cpu = self
                .read("cpu", "cpu.stat")
                .and_then(|t| stat(&t, "usage_usec"))
                .map(|us| us as f64 / 1e6);
            (self.read("memory", "memory.current"), "inactive_file", cpu)
        } else {
            let cpu = self
                .read("cpuacct", "cpuacct.usage")
                .and_then(|t| t.trim().parse::<u64>().ok())
                .map(|ns| ns as f64 / 1e9);
            (
                self.read("memory", "memory.usage_in_bytes"),
                "total_inactive_file",
                cpu,
            )
        };
        let memory = current
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|used| {
                let inactive = self
                    .read("memory", "memory.stat")
                    .and_then(|t| stat(&t, inactive_key))
                    .unwrap_or(0);
                used.saturating_sub(inactive)
            });
        Usage {
            memory_bytes: memory,
            cpu_seconds: cpu,
        }
    }

    /// Writes one of the job's limits. The kernel refusing the value (EINVAL, ERANGE) is
    /// [`Error::Limit`]. A limit file missing from the job's cgroup directory is a controller
    /// this host does not give a job (on v2, one not delegated): not limited, as with an
    /// unmounted v1 controller. Anything else, the directory itself gone included, stays the
    /// host's [`Error::Io`].
    fn write_limit(&self, controller: &str, file: &str, value: &str) -> Result<(), Error> {
        let Some(dir) = self.dir_of(controller) else {
            return Ok(());
        };
        let path = dir.join(file);
        if dir.is_dir() && !path.exists() {
            tracing::warn!(
                cgroup = %dir.display(),
                file,
                value,
                "this host gives jobs no such limit (a cgroup controller not enabled): not limited"
            );
            return Ok(());
        }
        fs::write(&path, value).map_err(|source| {
            if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ERANGE)) {
                Error::Limit {
                    path,
                    value: value.to_string(),
                    source,
                }
            } else {
                Error::io(&path, source)
            }
        })
    }

    fn limit(&self, _job: &str, limits: &Limits) -> Result<(), Error> {
        let v2 = matches!(self.hierarchy, Hierarchy::V2 { .. });
        if let Some(bytes) = limits.memory {
            if v2 {
                self.write_limit("memory", "memory.max", &bytes.to_string())?;
                // No swap either, so the limit is the limit.
                let _ = self.write_limit("memory", "memory.swap.max", "0");
            } else {
                self.write_limit("memory", "memory.limit_in_bytes", &bytes.to_string())?;
                let _ =
                    self.write_limit("memory", "memory.memsw.limit_in_bytes", &bytes.to_string());
            }
        }
        // A reservation weighs as Flynn's did: 1024 shares (one default job) per core.
        let shares = limits
            .cpu_shares
            .or(limits.cpu_millis.map(|m| (m * 1024 / 1000).max(2)));
        if let Some(shares) = shares {
            if v2 {
                // The kernel's own mapping of v1 shares (2..262144) onto v2 weights (1..10000).
                let shares = shares.clamp(2, 262_144);
                let weight = 1 + ((shares - 2) * 9999) / 262_142;
                self.write_limit("cpu", "cpu.weight", &weight.to_string())?;
            } else {
                self.write_limit("cpu", "cpu.shares", &shares.to_string())?;
            }
        }
        if let Some(n) = limits.max_procs {
            self.write_limit("pids", "pids.max", &n.to_string())?;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed something in the job.
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = self.dir_of("memory") else {
            return false;
        };
        let file = match self.hierarchy {
            Hierarchy::V2 { .. } => "memory.events",
            Hierarchy::V1 { .. } => "memory.oom_control",
        };
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
    }

    /// Every process still in the job.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .flat_map(|f| {
                fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything left in the job.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup(s) once empty; kills what is left first.
    pub fn remove(&self) {
        for _ in 0..50 {
            self.kill_all();
            let mut left = false;
            for d in &self.dirs {
                if d.exists() && fs::remove_dir(d).is_err() {
                    left = true;
                }
            }
            if !left {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!(dirs = ?self.dirs, "job cgroup could not be removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 25 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
32 25 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn t10_hybrid_hosts_use_v1_and_pure_v2_hosts_use_v2() {
        // cgroup2 here has no memory controller (only hugetlb): the v1 mounts are used.
        let h = Hierarchy::from_mountinfo(HYBRID, |_| "hugetlb".into());
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: Some("/sys/fs/cgroup/memory".into()),
                cpu: Some("/sys/fs/cgroup/cpu".into()),
                cpuacct: Some("/sys/fs/cgroup/cpuacct".into()),
                pids: Some("/sys/fs/cgroup/pids".into()),
            }
        );
        let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        let h = Hierarchy::from_mountinfo(pure, |_| "cpuset cpu io memory pids".into());
        assert_eq!(
            h,
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
    }

    #[test]
    fn t12_controllers_mounted_together_share_one_directory() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct";
        let h = Hierarchy::from_mountinfo(text, |_| String::new());
        let cg = h.existing("j1");
        assert_eq!(
            cg.dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/flynn/j1"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/flynn/j1"),
            ]
        );
        assert_eq!(
            cg.dir_of("cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/flynn/j1")),
            "cpu.shares goes to the co-mounted directory"
        );
        assert_eq!(cg.dir_of("cpuacct"), cg.dir_of("cpu"));
        assert_eq!(cg.dir_of("pids"), None, "not mounted: not limited");
    }

    #[test]
    fn t11_limits_are_written_on_this_host() {
        let h = Hierarchy::detect().unwrap();
        let job = format!("fltest-{}", std::process::id());
        let limits = Limits {
            memory: Some(64 << 20),
            cpu_millis: Some(500),
            cpu_shares: None,
            max_procs: Some(20),
            max_fd: None,
        };
        let cg = h.create(&job, &limits).unwrap();
        let read = |controller: &str, v1: &str, v2: &str| {
            let f = if h.version() == 2 { v2 } else { v1 };
            fs::read_to_string(cg.dir_of(controller).unwrap().join(f)).unwrap()
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes", "memory.max").trim(),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max", "pids.max").trim(), "20");
        // Half a core weighs half a default job: 512 shares (v2: the kernel's mapping).
        assert_eq!(
            read("cpu", "cpu.shares", "cpu.weight").trim(),
            if h.version() == 2 { "20" } else { "512" }
        );
        assert!(cg.pids().is_empty());
        assert!(!cg.oom_killed());
        // A process that joins as `join` does (`0`: itself) is counted with the processes it
        // starts after: they touch 8 MiB and spin a little.
        let procs = cg.join_files();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for f in {}; do echo 0 > $f; done; \
                 head -c 8388608 /dev/zero | tr '\\0' x > /dev/shm/{job}; \
                 i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 5",
                procs
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
            .spawn()
            .unwrap();
        // Whatever happens below, what the child wrote and the cgroup go (removing it kills
        // what is in it; a child that never joined ends by itself within 5 s).
        let (shm, left) = (format!("/dev/shm/{job}"), cg.clone());
        let _cleanup = OnDrop(move || {
            let _ = fs::remove_file(&shm);
            left.remove();
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let used = loop {
            let u = cg.usage();
            if u.memory_bytes.unwrap_or(0) >= 8 << 20 && u.cpu_seconds.unwrap_or(0.0) > 0.01 {
                break u;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "usage never counted: {u:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(used.memory_bytes.unwrap() < 64 << 20, "{used:?}");
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_file(format!("/dev/shm/{job}"));
        cg.remove();
        assert!(cg.dirs.iter().all(|d| !d.exists()));
    }

    /// Runs its closure when dropped: a test's cleanup, on failure too.
    struct OnDrop<F: FnMut()>(F);

    impl<F: FnMut()> Drop for OnDrop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }

    #[test]
    fn t13_a_limit_the_kernel_refuses_is_the_limit_s_error() {
        let h = Hierarchy::detect().unwrap();
        let job = format!("fltest-limit-{}", std::process::id());
        // Over the kernel's pid maximum (4,194,304): pids.max says EINVAL.
        let limits = Limits {
            max_procs: Some(5_000_000),
            ..Limits::default()
        };
        let result = h.create(&job, &limits);
        let cleanup = h.existing(&job);
        match result {
            Err(Error::Limit {
                path,
                value,
                source,
            }) => {
                assert!(path.ends_with("pids.max"), "{}", path.display());
                assert_eq!(value, "5000000");
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            }
            // A host without the pids controller limits nothing.
            Ok(cg)
                if cg
                    .dir_of("pids")
                    .is_none_or(|d| !d.join("pids.max").exists()) => {}
            other => panic!("{other:?}"),
        }
        cleanup.remove();
    }

    #[test]
    fn t14_a_limit_file_the_host_does_not_give_limits_nothing_but_a_lost_cgroup_fails() {
        let h = Hierarchy::detect().unwrap();
        let job = format!("fltest-nofile-{}", std::process::id());
        let cg = h.create(&job, &Limits::default()).unwrap();
        // A controller file this host does not have (on v2, one not delegated).
        assert!(cg
            .write_limit("memory", "memory.no-such-limit", "1")
            .is_ok());
        // The job's own cgroup gone: the host's trouble, said as such.
        cg.remove();
        match cg.write_limit("memory", "memory.no-such-limit", "1") {
            Err(Error::Io { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// A forked child (see [`fork_and_join`]) and its cgroup: both gone when dropped,
    /// whether the test passed or not.
    struct Joined {
        pid: i32,
        cg: JobCgroup,
    }

    impl Drop for Joined {
        fn drop(&mut self) {
            self.cg.remove();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
        }
    }

    /// Forks a child that starts `threads - 1` more threads and then joins `cg` with
    /// [`join`]: on success it waits to be killed; on failure it says why on stderr and
    /// exits 1 at once. The child only makes system calls and allocates (glibc's allocator
    /// is usable after a fork).
    #[allow(unsafe_code)]
    fn fork_and_join(cg: JobCgroup, threads: usize) -> Joined {
        let files = cg.join_files();
        // SAFETY: the child calls nothing that could hold a lock the parent's other threads
        // held at the fork, other than the allocator, which glibc resets in the child.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                for _ in 1..threads {
                    std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(30)));
                }
                let code = match join(&files) {
                    Ok(()) => {
                        std::thread::sleep(std::time::Duration::from_secs(30));
                        0
                    }
                    Err(e) => {
                        eprintln!("join: {e}");
                        1
                    }
                };
                // SAFETY: ends the forked child without running the parent's exit handlers.
                unsafe { libc::_exit(code) }
            }
            pid => Joined { pid, cg },
        }
    }

    /// Whether every thread of `pid` is in `job`'s cgroup in every hierarchy it uses.
    fn all_threads_in(pid: i32, job: &str, hierarchies: usize) -> bool {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let tasks: Vec<_> = tasks.filter_map(|t| Some(t.ok()?.path())).collect();
        !tasks.is_empty()
            && tasks.iter().all(|t| {
                let text = fs::read_to_string(t.join("cgroup")).unwrap_or_default();
                text.lines()
                    .filter(|l| l.ends_with(&format!("/{PARENT}/{job}")))
                    .count()
                    >= hierarchies
            })
    }

    #[test]
    fn t15_a_process_joins_whole_with_one_thread_or_many() {
        let h = Hierarchy::detect().unwrap();
        for threads in [1, 3] {
            let job = format!("fltest-join{threads}-{}", std::process::id());
            let cg = h.create(&job, &Limits::default()).unwrap();
            let hierarchies = cg.dirs.len();
            let child = fork_and_join(cg, threads);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !(child.cg.pids() == vec![child.pid]
                && all_threads_in(child.pid, &job, hierarchies))
            {
                let ended = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(child.pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                assert!(
                    matches!(ended, Ok(nix::sys::wait::WaitStatus::StillAlive)),
                    "{threads} thread(s): the child ended: {ended:?} (its stderr says why)"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "{threads} thread(s): pids {:?}; {}",
                    child.cg.pids(),
                    fs::read_to_string(format!("/proc/{}/cgroup", child.pid)).unwrap_or_default()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(
                fs::read_dir(format!("/proc/{}/task", child.pid))
                    .unwrap()
                    .count(),
                threads
            );
            let dirs = child.cg.dirs.clone();
            drop(child);
            assert!(dirs.iter().all(|d| !d.exists()));
        }
    }

    #[test]
    fn t16_the_thread_count_is_read_from_proc_status() {
        let status = |n: &str| format!("Name:\tflynn-init\nTgid:\t7\nThreads:\t{n}\nSigQ:\t0/1\n");
        assert!(one_thread(&status("1")));
        assert!(!one_thread(&status("2")));
        assert!(!one_thread(&status("12")));
        assert!(!one_thread("Name:\tx\n"), "no count: not known to be one");
        // This test binary runs tests on threads of their own.
        let ours = fs::read_to_string("/proc/self/status").unwrap();
        assert!(!one_thread(&ours), "{ours}");
    }
}
