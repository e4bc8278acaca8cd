//! The container init, run as `flynn-host container-init SPEC` by the job runner.
//!
//! Stage 1 (started by the daemon, in the host's namespaces) joins the job's cgroups, makes
//! new mount, PID, UTS and IPC namespaces, mounts the job's overlay root and starts stage 2.
//! Stage 2 is PID 1 of the new PID namespace: it mounts `/proc`, `/dev` and `/sys`, pivots
//! into the root (the host's root is then unreachable), sets the hostname and rlimits, and
//! runs the job's command as its user. Both stages forward signals down and exit with the
//! command's status, so the daemon supervises one process; when stage 2 ends, the kernel
//! kills whatever is left in the namespace. A service job's stage 1 is also its shim
//! ([`crate::shim`]): in a session of its own, not ended with the daemon.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

/// Exit status when the command cannot be started (as a shell's "command not found").
pub const EXIT_NOT_FOUND: i32 = 127;
/// This crate's version and a digest of its sources: a `flynn-init` binary that prints
/// another (`--build`) was built from other init code, and is not used.
pub const BUILD: &str = env!("FLYNN_JOB_BUILD");
/// Exit status when the container itself cannot be set up.
pub const EXIT_SETUP: i32 = 125;
/// Lines the init writes to stderr start with this, so the runner can report them.
pub const INIT_PREFIX: &str = "flynn-init: ";
/// The last line a shim's stage 1 writes to the runner: the job runs and the shim serves.
pub const SHIM_READY: &str = "flynn-init: shim ready";

/// Everything the init needs, written by the runner as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub id: String,
    pub hostname: String,
    /// Image layers, top first.
    pub lowerdirs: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where the overlay is mounted (inside the job's mount namespace only).
    pub root: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    /// `uid[:gid]` or a user name in the image; empty: `nobody` (65534).
    pub user: String,
    /// Files to join the job's cgroups by ([`crate::cgroup::join`]). Named as it was when
    /// these were always `cgroup.procs` files.
    #[serde(rename = "cgroup_procs")]
    pub cgroup_join: Vec<PathBuf>,
    #[serde(default)]
    pub max_fd: Option<u64>,
    /// A network namespace to join (`/run/netns/NAME`); none: the host's network.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Host directories (data volumes) bound into the job's filesystem.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// The init's stdin is a pty the command takes as its controlling terminal, in a
    /// session of its own (so the terminal's ^C reaches it as SIGINT).
    #[serde(default)]
    pub tty: bool,
    /// The job's directory, when stage 1 is the job's shim (`crate::shim`): it outlives the
    /// daemon, reads the job's output itself and serves it on a socket there. Without it
    /// the job's streams are the runner's own pipes, and the job ends with the runner.
    #[serde(default)]
    pub shim: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's directory on the host.
    pub host: PathBuf,
    /// Absolute path in the job's filesystem.
    pub path: String,
    /// Bound read-only (a build's SSH key), so the job can read it but never change it.
    #[serde(default)]
    pub readonly: bool,
    /// The whole tree is given to the job's user first (a directory the runner made for
    /// this job alone, such as a build's `/app`).
    #[serde(default)]
    pub chown: bool,
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("{INIT_PREFIX}{msg}");
    std::process::exit(code)
}

fn read_spec(path: &Path) -> ContainerSpec {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| fail(EXIT_SETUP, format!("reading {}: {e}", path.display())));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| fail(EXIT_SETUP, format!("bad spec: {e}")))
}

/// Signals passed on to the job; SIGCHLD is how an init learns its child ended.
fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Waits for `child`, forwarding signals to it and reaping any other child (an init
/// inherits orphans), then exits with its status.
fn supervise(child: u32, set: SigSet) -> ! {
    std::process::exit(wait_child(child, set))
}

/// Waits for `child`, forwarding signals to it and reaping any other child; its status as
/// a shell gives it (128 + signal when killed).
fn wait_child(child: u32, set: SigSet) -> i32 {
    let child = Pid::from_raw(child as i32);
    // A child that ended before the signals were waited for is reaped on the first pass.
    let mut sig = Signal::SIGCHLD;
    loop {
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            sig = set.wait().unwrap_or(Signal::SIGCHLD);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        sig = set.wait().unwrap_or(Signal::SIGCHLD);
    }
}

/// Stage 1: cgroups, namespaces, the root mount; then stage 2.
pub fn stage1(spec_path: &Path) -> ! {
    let spec = read_spec(spec_path);
    let shim = match &spec.shim {
        // A one-off job does not outlive its host's daemon (nor stage 2 this process).
        None => {
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            if nix::unistd::getppid() == Pid::from_raw(1) {
                fail(EXIT_SETUP, "the job runner is gone");
            }
            None
        }
        // A service job does: out of the daemon's session, so no signal to the daemon's
        // process group (a terminal's ^C) reaches it; found again by its socket.
        Some(dir) => {
            let _ = nix::unistd::setsid();
            // The OOM killer takes the job's processes, not the shim that holds its output
            // and status (stage 2 gives its own back to 0, and so the command's).
            let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
            let bound = crate::shim::Shim::bind(dir).unwrap_or_else(|e| {
                fail(
                    EXIT_SETUP,
                    format!("the job's control socket in {}: {e}", dir.display()),
                )
            });
            Some(bound)
        }
    };
    // Still one thread here (`unshare` below needs it too), so `join` moves it the fast way.
    if let Err(e) = crate::cgroup::join(&spec.cgroup_join) {
        fail(EXIT_SETUP, format!("joining the job's cgroup: {e}"));
    }
    if let Some(ns) = &spec.netns {
        let f = std::fs::File::open(ns)
            .unwrap_or_else(|e| fail(EXIT_SETUP, format!("opening {}: {e}", ns.display())));
        nix::sched::setns(f, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| fail(EXIT_SETUP, format!("joining the job's network: {e}")));
    }
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    unshare(flags).unwrap_or_else(|e| fail(EXIT_SETUP, format!("unshare: {e}")));
    // Nothing mounted from here on propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap_or_else(|e| fail(EXIT_SETUP, format!("making mounts private: {e}")));
    let lower: Vec<String> = spec
        .lowerdirs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        spec.upper.display(),
        spec.work.display()
    );
    mount(
        Some("overlay"),
        &spec.root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap_or_else(|e| fail(EXIT_SETUP, format!("mounting the job's root: {e}")));

    let set = signals();
    let _ = set.thread_block();
    let mut stage2 = Command::new("/proc/self/exe");
    stage2.arg("container-init").arg("--stage2").arg(spec_path);
    if shim.is_some() {
        use std::process::Stdio;
        stage2
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A daemon gone mid-write is an error on that write, not the shim's end (the job's
        // command starts with SIGPIPE as it should: stage 2 resets it).
        let _ = ignore_sigpipe();
    }
    // The next process made is PID 1 of the new PID namespace.
    // Reaped by `supervise` (waitpid), not through the handle.
    #[allow(clippy::zombie_processes)]
    let mut child = stage2
        .spawn()
        .unwrap_or_else(|e| fail(EXIT_SETUP, format!("starting stage 2: {e}")));
    let Some(shim) = shim else {
        supervise(child.id(), set)
    };
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        fail(EXIT_SETUP, "stage 2 has no output pipes")
    };
    // Set up: stage 1's own streams were the runner's (its setup errors); from here on the
    // shim needs nothing of the daemon that started it.
    eprintln!("{SHIM_READY}");
    detach_stdio();
    std::process::exit(shim.run(out, err, child.id(), set))
}

/// SIGPIPE ignored in this process.
fn ignore_sigpipe() -> nix::Result<()> {
    use nix::sys::signal::{signal, SigHandler};
    // SAFETY: SIG_IGN installs no handler code; nothing else runs signal handlers here.
    #[allow(unsafe_code)]
    unsafe {
        signal(Signal::SIGPIPE, SigHandler::SigIgn).map(|_| ())
    }
}

/// Points stdin, stdout and stderr at /dev/null, closing the runner's pipes.
fn detach_stdio() {
    use std::os::fd::AsRawFd;
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which nothing else holds as an owned
        // handle in this process.
        #[allow(unsafe_code)]
        unsafe {
            libc::dup2(null.as_raw_fd(), fd);
        }
    }
}

fn mount_or_fail(src: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data).unwrap_or_else(|e| {
        fail(
            EXIT_SETUP,
            format!("mounting {fstype} on {}: {e}", target.display()),
        )
    });
}

/// `/dev`: a tmpfs with the usual device nodes bound from the host's, a private devpts
/// and shared memory.
fn populate_dev(root: &Path) {
    let dev = root.join("dev");
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME;
    mount_or_fail("tmpfs", &dev, "tmpfs", nodev, Some("mode=755,size=65536k"));
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        let _ = std::fs::File::create(&target);
        let host = Path::new("/dev").join(name);
        if let Err(e) = mount(
            Some(&host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            fail(EXIT_SETUP, format!("binding /dev/{name}: {e}"));
        }
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(to, dev.join(link));
    }
    mount_or_fail(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    mount_or_fail(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    );
}

/// `uid:gid` for the image's user: numeric, or a name from its /etc/passwd.
/// Gives a directory tree to `uid:gid`, symlinks themselves rather than their targets.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((65534, 65534));
    }
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let from_passwd = |n: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == n)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
    };
    let (uid, default_gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => from_passwd(name).ok_or_else(|| format!("user {name:?} is not in the image"))?,
    };
    let gid = match group {
        Some(g) => g
            .parse()
            .map_err(|_| format!("group {g:?} must be numeric"))?,
        None => default_gid,
    };
    Ok((uid, gid))
}

/// Stage 2: PID 1 of the job.
pub fn stage2(spec_path: &Path) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Not the shim's exemption from the OOM killer (a no-op without a shim).
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    let spec = read_spec(spec_path);
    let root = spec.root.clone();
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_or_fail("proc", &root.join("proc"), "proc", hardened, None);
    populate_dev(&root);
    mount_or_fail(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        hardened | MsFlags::MS_RDONLY,
        None,
    );
    let _ = std::fs::create_dir_all(root.join("tmp"));
    for v in &spec.volumes {
        let target = root.join(v.path.trim_start_matches('/'));
        let _ = std::fs::create_dir_all(&target);
        mount_or_fail(
            &v.host.to_string_lossy(),
            &target,
            "",
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        );
    }

    // Into the job's root; the host's root is detached and unreachable from here.
    std::env::set_current_dir(&root).unwrap_or_else(|e| fail(EXIT_SETUP, format!("chdir: {e}")));
    nix::unistd::pivot_root(".", ".")
        .unwrap_or_else(|e| fail(EXIT_SETUP, format!("pivot_root: {e}")));
    umount2(".", MntFlags::MNT_DETACH)
        .unwrap_or_else(|e| fail(EXIT_SETUP, format!("detaching the host's root: {e}")));
    let _ = std::env::set_current_dir("/");

    let _ = nix::unistd::sethostname(&spec.hostname);
    if let Some(n) = spec.max_fd {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n);
    }
    let (uid, gid) = resolve_user(&spec.user).unwrap_or_else(|e| fail(EXIT_SETUP, e));
    // A new (empty) data volume belongs to the job's user, so it can write there.
    for v in &spec.volumes {
        let empty = std::fs::read_dir(&v.path).is_ok_and(|mut d| d.next().is_none());
        let path = Path::new(&v.path);
        if v.chown {
            chown_tree(path, uid, gid)
                .unwrap_or_else(|e| fail(EXIT_SETUP, format!("chown {}: {e}", v.path)));
        } else if empty {
            let _ = nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        }
        if v.readonly {
            // A bind mount takes its read-only flag only on a remount.
            let flags = MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV;
            mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
                .unwrap_or_else(|e| fail(EXIT_SETUP, format!("making {} read-only: {e}", v.path)));
        }
    }
    let Some((program, args)) = spec.args.split_first() else {
        fail(EXIT_NOT_FOUND, "the job has no command")
    };
    let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };

    let set = signals();
    let _ = set.thread_block();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(cwd)
        .uid(uid)
        .gid(gid);
    // The job starts with no signal blocked or ignored, whatever its init inherited (the
    // mask and ignored dispositions survive exec, and std does not reset them).
    let tty = spec.tty;
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec only setsid, ioctl, sigprocmask and sigaction run, all
    // async-signal-safe; nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            use nix::sys::signal::{sigprocmask, SigHandler, SigmaskHow};
            if tty {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for sig in [
                Signal::SIGPIPE,
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGHUP,
                Signal::SIGTERM,
            ] {
                let _ = nix::sys::signal::signal(sig, SigHandler::SigDfl);
            }
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            Ok(())
        });
    }
    // Reaped by `supervise` (waitpid), not through the handle.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap_or_else(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::PermissionDenied => 126,
            _ => EXIT_NOT_FOUND,
        };
        fail(code, format!("cannot run {program:?}: {e}"))
    });
    supervise(child.id(), set)
}
