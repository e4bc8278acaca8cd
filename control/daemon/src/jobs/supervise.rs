//! A prepared job, run: the container init started (on pipes or a pty), its output to the
//! host's log and any attached caller, up once its port answers (then running and
//! registered), stopped on request (SIGTERM, then SIGKILL after a grace), and its end
//! classified as done, crashed or failed.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_job::cgroup::JobCgroup;
use flynn_job::init::{EXIT_NOT_FOUND, EXIT_SETUP, INIT_PREFIX};
use flynn_state::jobs::{JobFault, JobsCommand};
use flynn_state::{Command, Job, JobState};
use tokio::io::AsyncRead;

use super::prepare::Prepared;
use super::runner::propose_retrying;
use super::state::State;
use super::{logs, oneoff, pty, JobRunner, RunningJob, STOP_GRACE, UP_TIMEOUT};

/// How the job's end is learned: its init's exit (a child of this daemon), or its shim's
/// word.
type EndFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32, String>> + Send>>;

/// A started job, as [`JobRunner::watch`] follows it.
pub(super) struct Started {
    pub(super) ended: EndFuture,
    /// Tasks copying its output; done once the output ended.
    pub(super) readers: Vec<tokio::task::JoinHandle<()>>,
    pub(super) init_error: Arc<Mutex<Option<String>>>,
    /// It is running already (taken up by a restarted daemon): no wait for its port.
    pub(super) up: bool,
}

/// How long a shim has to set the job up.
const SHIM_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

impl JobRunner {
    pub(super) async fn supervise(
        &self,
        local: &State,
        l: &Arc<RunningJob>,
        p: Prepared,
    ) -> Outcome {
        let started = match &p.shim {
            Some(dir) => self.start_with_shim(l, &p, dir.clone()).await,
            None => self.start_attached(l, &p),
        };
        match started {
            Ok(started) => self.watch(local, l, p, started).await,
            Err(outcome) => {
                self.release(&p).await;
                outcome
            }
        }
    }

    /// Starts a service job's init as its shim: the daemon reads its setup errors, then
    /// takes its output and exit from the shim's socket.
    async fn start_with_shim(
        &self,
        l: &Arc<RunningJob>,
        p: &Prepared,
        dir: std::path::PathBuf,
    ) -> Result<Started, Outcome> {
        use tokio::io::AsyncBufReadExt;
        let job = &l.job;
        let mut cmd = init_command()?;
        cmd.arg(&p.spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Outcome::failed(format!("starting the container: {e}")))?;
        l.pid
            .store(child.id().unwrap_or(0) as u64, Ordering::Relaxed);
        if let Some(cg) = &p.cgroup {
            *l.procs.lock().expect("procs lock") = cg.procs_files();
        }
        let init_error = Arc::new(Mutex::new(None::<String>));
        // Stage 1's own stderr carries its setup errors, then the word that the shim is up.
        let mut ready = false;
        if let Some(stderr) = child.stderr.take() {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let setup = async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == flynn_job::init::SHIM_READY {
                        return true;
                    }
                    emit_line(
                        &self.logs,
                        (&job.app, &job.id, &job.proc_type),
                        "stderr",
                        line.as_bytes(),
                        None,
                        Some(&init_error),
                    );
                }
                false
            };
            // Setting up is mounts and a fork: a stage 1 that has not said it is up by
            // then is stuck (a hung mount), and is killed.
            match tokio::time::timeout(SHIM_SETUP_TIMEOUT, setup).await {
                Ok(said) => ready = said,
                Err(_) => nix_kill(l, true),
            }
        }
        if !ready {
            // It failed setting up: its status and what it said.
            let code = child.wait().await.map(|s| s.code().unwrap_or(-1));
            l.pid.store(0, Ordering::SeqCst);
            let init_error = init_error.lock().expect("init error").take();
            return Err(match code {
                Ok(code) => Outcome::of(&Ended {
                    code,
                    stop_requested: l.stopping.load(Ordering::SeqCst),
                    oom: false,
                    init_error,
                    up: false,
                    registers: p.register,
                }),
                Err(e) => Outcome::failed(format!("waiting for the job: {e}")),
            });
        }
        l.mark("init");
        // The shim is a child of this daemon only until the daemon goes: reaped here.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let follow = super::shim::follow(
            self.logs.clone(),
            (job.app.clone(), job.id.clone(), job.proc_type.clone()),
            dir,
            [0, 0],
            init_error.clone(),
        );
        Ok(Started {
            ended: Box::pin(follow),
            readers: Vec::new(),
            init_error,
            up: false,
        })
    }

    /// Starts a one-off or build job's init as this daemon's child, on its pipes or a pty.
    fn start_attached(&self, l: &Arc<RunningJob>, p: &Prepared) -> Result<Started, Outcome> {
        let job = &l.job;
        let stdin_rx = l.stdin.lock().expect("stdin lock").take();
        let mut cmd = init_command()?;
        cmd.arg(&p.spec_path);
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
                    Err(e) => return Err(Outcome::failed(format!("allocating a terminal: {e}"))),
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
            Err(e) => return Err(Outcome::failed(format!("starting the container: {e}"))),
        };
        l.pid
            .store(child.id().unwrap_or(0) as u64, Ordering::Relaxed);
        if let Some(cg) = &p.cgroup {
            *l.procs.lock().expect("procs lock") = cg.procs_files();
        }
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
                        // Reaped in the background: this path does not wait.
                        tokio::spawn(async move {
                            let _ = child.wait().await;
                        });
                        return Err(Outcome::failed(format!("allocating a terminal: {e}")));
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
                (Some(sink), vec![out])
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
                (sink, readers.into_iter().flatten().collect())
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
        let ended = async move {
            child
                .wait()
                .await
                .map(|s| s.code().unwrap_or(-1))
                .map_err(|e| format!("waiting for the job: {e}"))
        };
        Ok(Started {
            ended: Box::pin(ended),
            readers,
            init_error,
            up: false,
        })
    }

    /// Follows a started job: up once its port answers (then running and registered),
    /// stopped on request (SIGTERM, then SIGKILL after a grace), cleaned up and its end
    /// classified once it ends.
    pub(super) async fn watch(
        &self,
        local: &State,
        l: &Arc<RunningJob>,
        p: Prepared,
        started: Started,
    ) -> Outcome {
        let job = &l.job;
        let Started {
            mut ended,
            readers,
            init_error,
            up: already_up,
        } = started;
        let started = Instant::now();
        let addr = p.port.map(|port| format!("{}:{port}", p.ip));

        // Up: its port answers (or its health path), then it is registered and running.
        let mut up = already_up;
        let wait_up = async {
            match p.port {
                Some(port) if p.register && !already_up => {
                    // A job in the host's network is reached on loopback (it may bind
                    // only that); one with its own network at its address.
                    let target = match &p.net {
                        Some(n) => std::net::SocketAddr::from((n.ip, port)),
                        None => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    };
                    wait_listening(target, p.health_path.as_deref(), UP_TIMEOUT).await
                }
                _ => true,
            }
        };
        let status = tokio::select! {
            ok = wait_up => { up = ok; None }
            s = &mut ended => Some(s),
            _ = l.stop.notified() => None,
        };
        let mut stop_requested = l.stopping.load(Ordering::SeqCst);
        if status.is_none() && !stop_requested {
            if up {
                l.mark("listening");
                let mut cmds: Vec<Command> = vec![JobsCommand::UpdateJob {
                    id: job.id.clone(),
                    state: JobState::Running,
                    addr: addr.clone(),
                    exit_status: None,
                    error: None,
                    now_ms: crate::now_ms(),
                    fault: Default::default(),
                }
                .into()];
                if p.register {
                    cmds.push(self.register(job, addr.clone().unwrap_or_default()).into());
                }
                propose_retrying(local, Command::Batch { commands: cmds }).await;
                l.mark("running");
                if let Some(t) = &l.timeline {
                    t.up(&job.id);
                }
            } else {
                nix_kill(l, true);
            }
        }
        // Stopping: SIGTERM now, and everything in the job SIGKILLed if it is still there
        // after the grace period (checked then: its pid may belong to another by now).
        let terminate = |l: &Arc<RunningJob>| {
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
                    s = &mut ended => break s,
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
        // Its pid is free from here on: nothing may signal it any more, and nothing is left
        // for a stop (the cluster may mark it done before this job leaves the runner's table).
        l.pid.store(0, Ordering::SeqCst);
        l.stopping.store(true, Ordering::SeqCst);
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        let oom = p.cgroup.as_ref().is_some_and(JobCgroup::oom_killed);
        self.release(&p).await;
        let code = match status {
            Ok(code) => code,
            // Its init went without a status (killed): a stop or the OOM killer says why,
            // else what was seen.
            Err(e) if !stop_requested && !oom => {
                tracing::info!(job = %job.id, error = %e, "job ended without a status");
                return Outcome {
                    state: JobState::Crashed,
                    exit_status: None,
                    error: Some(e),
                    fault: JobFault::App,
                };
            }
            Err(_) => -1,
        };
        let init_error = init_error.lock().expect("init error").take();
        let ran = started.elapsed();
        tracing::info!(job = %job.id, code, ?ran, oom, "job exited");
        Outcome::of(&Ended {
            code,
            stop_requested,
            oom,
            init_error,
            up,
            registers: p.register,
        })
    }

    /// Gives back what a job held on this host: its cgroup (whatever is left in it is
    /// killed), its network or host port.
    async fn release(&self, p: &Prepared) {
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
            let emit = |line: &[u8], _end: u64| {
                emit_line(
                    &logs,
                    (&app, &id, &ty),
                    stream,
                    line,
                    None,
                    init_error.as_ref(),
                );
            };
            let mut chunk = vec![0u8; 16 * 1024];
            let mut lines = logs::LineSplitter::default();
            loop {
                // A pty's master reads EIO once the job's side is closed: its end.
                let n = match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(io) = &io {
                    io.output(to, bytes::Bytes::copy_from_slice(&chunk[..n]))
                        .await;
                }
                lines.feed(&chunk[..n], emit);
            }
            lines.flush(emit);
        })
    }
}

/// One line of a job's output into the host's log (`job` is app, id and type). A line of
/// the init's own, on stderr, is the init's: kept in `init_error` as what went wrong.
pub(super) fn emit_line(
    logs: &logs::Logs,
    job: (&str, &str, &str),
    stream: &str,
    line: &[u8],
    off: Option<u64>,
    init_error: Option<&Arc<Mutex<Option<String>>>>,
) {
    let text = String::from_utf8_lossy(line)
        .trim_end_matches(['\n', '\r'])
        .to_string();
    let (stream, text) = match (init_error, text.strip_prefix(INIT_PREFIX)) {
        (Some(slot), Some(msg)) => {
            *slot.lock().expect("init error") = Some(msg.to_string());
            ("init", msg.to_string())
        }
        _ => (stream, text),
    };
    let (app, id, ty) = job;
    logs.push_at(app, id, ty, stream, text, off);
}

pub(crate) struct Outcome {
    pub(super) state: JobState,
    pub(super) exit_status: Option<i32>,
    pub(super) error: Option<String>,
    /// Whom a failure counts against.
    pub(super) fault: JobFault,
}

impl Outcome {
    /// The host could not start or follow the job (a process it could not spawn or wait
    /// for, a terminal it could not open).
    pub(super) fn failed(why: String) -> Self {
        Outcome {
            state: JobState::Failed,
            exit_status: None,
            error: Some(why),
            fault: JobFault::Host,
        }
    }

    /// The job could not be prepared: whom that counts against depends on why.
    pub(super) fn not_prepared(e: &super::error::JobError) -> Self {
        Outcome {
            fault: e.fault(),
            ..Outcome::failed(e.to_string())
        }
    }
}

/// How a job's init ended, as far as its outcome goes.
pub(crate) struct Ended {
    pub(super) code: i32,
    /// The runner asked it to stop.
    pub(super) stop_requested: bool,
    /// The cgroup's OOM killer fired.
    pub(super) oom: bool,
    /// What the init itself said went wrong, if it did.
    pub(super) init_error: Option<String>,
    /// Its port answered (or it has none to wait for).
    pub(super) up: bool,
    /// It serves a port and is registered in discovery once up.
    pub(super) registers: bool,
}

impl Outcome {
    /// The job's end as its record says it: done, crashed (with why), or failed.
    pub(super) fn of(e: &Ended) -> Outcome {
        if e.stop_requested {
            return Outcome {
                state: JobState::Done,
                exit_status: Some(e.code),
                error: None,
                fault: JobFault::App,
            };
        }
        if e.oom {
            return Outcome {
                state: JobState::Crashed,
                exit_status: Some(e.code),
                error: Some("out of memory".into()),
                fault: JobFault::App,
            };
        }
        if let (Some(why), true) = (
            e.init_error.clone(),
            matches!(e.code, EXIT_SETUP | EXIT_NOT_FOUND | 126),
        ) {
            return Outcome {
                state: JobState::Failed,
                exit_status: Some(e.code),
                error: Some(why),
                fault: JobFault::App,
            };
        }
        if !e.up && status_ok(e.code) && e.registers {
            return Outcome {
                state: JobState::Crashed,
                exit_status: Some(e.code),
                error: Some("exited before its port answered".into()),
                fault: JobFault::App,
            };
        }
        match e.code {
            0 => Outcome {
                state: JobState::Done,
                exit_status: Some(0),
                error: None,
                fault: JobFault::App,
            },
            c if c > 128 => Outcome {
                state: JobState::Crashed,
                exit_status: Some(c),
                error: Some(format!("killed by signal {}", c - 128)),
                fault: JobFault::App,
            },
            c => Outcome {
                state: JobState::Crashed,
                exit_status: Some(c),
                error: Some(format!("exited with status {c}")),
                fault: JobFault::App,
            },
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

/// The command that starts a job's container init: `flynn-init` beside this binary when it
/// was built from the same init code (it starts in about 1 ms where flynn-host takes 8,
/// most of it loading RocksDB's C++ library), else this binary's own `container-init`.
fn init_command() -> Result<tokio::process::Command, Outcome> {
    use std::os::unix::fs::MetadataExt;
    /// Which file was checked (device, inode, mtime, size), and what it decided: a binary
    /// replaced under a running daemon (install-flynn) is checked again.
    type Checked = (Option<(u64, u64, i64, u64)>, Option<std::path::PathBuf>);
    static CHECKED: std::sync::Mutex<Option<Checked>> = std::sync::Mutex::new(None);
    let exe = std::env::current_exe()
        .map_err(|e| Outcome::failed(format!("cannot find flynn-host itself: {e}")))?;
    let candidate = exe.with_file_name("flynn-init");
    let id = std::fs::metadata(&candidate).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
            m.size(),
        )
    });
    let separate = {
        let mut checked = CHECKED.lock().expect("init check lock");
        match &*checked {
            Some((seen, chosen)) if *seen == id => chosen.clone(),
            _ => {
                let chosen = id.and_then(|_| separate_init(&candidate));
                *checked = Some((id, chosen.clone()));
                chosen
            }
        }
    };
    // This binary itself as the fallback: `/proc/self/exe` still runs after an update
    // replaced the file (its path then ends in " (deleted)").
    let mut cmd = tokio::process::Command::new(
        separate.unwrap_or_else(|| std::path::PathBuf::from("/proc/self/exe")),
    );
    cmd.arg("container-init");
    Ok(cmd)
}

/// `candidate` if it is a `flynn-init` of this build (`--build` says the same).
pub(super) fn separate_init(candidate: &std::path::Path) -> Option<std::path::PathBuf> {
    if !candidate.is_file() {
        return None;
    }
    let said = std::process::Command::new(candidate)
        .arg("--build")
        .stdin(Stdio::null())
        .output();
    let build = match &said {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => String::new(),
    };
    if build == flynn_job::init::BUILD {
        tracing::info!(path = %candidate.display(), "job inits start from flynn-init");
        Some(candidate.to_path_buf())
    } else {
        tracing::warn!(
            path = %candidate.display(),
            found = %build,
            want = flynn_job::init::BUILD,
            "flynn-init beside flynn-host is another build: jobs start from flynn-host container-init"
        );
        None
    }
}

pub(crate) fn nix_kill(l: &RunningJob, hard: bool) {
    kill_pid(l.pid.load(Ordering::Relaxed), hard)
}

/// Waits until something accepts connections on the job's port (and, with a health path,
/// answers it with a 2xx or 3xx).
pub(super) async fn wait_listening(
    target: std::net::SocketAddr,
    health_path: Option<&str>,
    timeout: Duration,
) -> bool {
    let began = Instant::now();
    let deadline = began + timeout;
    let mut pause = Duration::from_millis(1);
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
        // Every millisecond while a quick server would be coming up (a refused connect to
        // a local address costs microseconds), then gentler for a hundred that are slow.
        tokio::time::sleep(pause).await;
        if began.elapsed() > Duration::from_millis(30) {
            pause = (pause + Duration::from_millis(2)).min(Duration::from_millis(50));
        }
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
