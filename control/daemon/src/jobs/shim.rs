//! The daemon's side of a job's shim (`flynn_job::shim`): service jobs outlive their
//! daemon, and a restarted daemon takes them up again.
//!
//! - A service job (not one-off, no terminal, no stdin, not a build) starts with a shim:
//!   its output and exit come through the shim's socket, from where this host's log ends.
//! - What the runner needs to take a job up again (its address, port, registration) is in
//!   the job's directory ([`RUNTIME`]), written before the job starts.
//! - At start the runner keeps the directories of jobs whose shim is alive (or left a
//!   spool); the first pass over the state takes up those the cluster still wants here and
//!   kills the others (marked failed while this host was away: a replacement runs).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_job::shim::{self, Frame, HEADER, MAX_FRAME, STDERR, STDOUT};
use flynn_state::Job;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{logs, network};

/// What a restarted daemon needs of a running job besides its record: in its directory.
pub const RUNTIME: &str = "runtime.json";
/// How long a shim that is alive but not answering is waited for.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// Whether a job runs with a shim: one nobody is attached to through this daemon.
pub fn outlives_daemon(job: &Job) -> bool {
    !job.oneoff && job.tty.is_none() && !job.stdin && job.build.is_none()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runtime {
    pub port: Option<u16>,
    pub ip: String,
    pub net: Option<network::JobNet>,
    pub health_path: Option<String>,
    pub register: bool,
}

impl Runtime {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{RUNTIME}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self).expect("runtime serializes"))?;
        std::fs::rename(tmp, dir.join(RUNTIME))
    }

    pub fn read(dir: &Path) -> Option<Runtime> {
        serde_json::from_slice(&std::fs::read(dir.join(RUNTIME)).ok()?).ok()
    }
}

/// A job directory a previous daemon left: its job still runs (or ended and left its
/// spool) and can be taken up.
pub struct Survivor {
    pub dir: PathBuf,
    pub runtime: Runtime,
    /// The shim's pid, if it is alive.
    pub pid: Option<u32>,
}

/// The job directories under `jobs_dir` whose jobs can be taken up; every other one is
/// removed (its job died with the daemon that ran it).
pub fn survivors(jobs_dir: &Path) -> std::collections::HashMap<String, Survivor> {
    let mut found = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return found;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let id = e.file_name().to_string_lossy().to_string();
        let pid = shim::live_pid(&dir);
        let spooled = dir.join(shim::SPOOL).exists();
        match Runtime::read(&dir) {
            Some(runtime) if pid.is_some() || spooled => {
                found.insert(id, Survivor { dir, runtime, pid });
            }
            _ => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    found
}

/// Reads a job's output and exit from its shim (or its spool), into the host's log from
/// `from` on (each stream's offset), until the job ends: its status.
pub async fn follow(
    logs: Arc<logs::Logs>,
    job: (String, String, String),
    dir: PathBuf,
    from: [u64; 2],
    init_error: Arc<Mutex<Option<String>>>,
) -> Result<i32, String> {
    let mut splitters = [
        logs::LineSplitter::at(from[0]),
        logs::LineSplitter::at(from[1]),
    ];
    let (app, id, ty) = (&job.0, &job.1, &job.2);
    let handle = |frame: Frame, splitters: &mut [logs::LineSplitter; 2]| -> Option<i32> {
        match frame {
            Frame::Output {
                stream,
                offset,
                data,
            } => {
                let (slot, name) = if stream == STDERR {
                    (1, "stderr")
                } else {
                    (0, "stdout")
                };
                let s = &mut splitters[slot];
                // Bytes already handled (a spool holds the ring from its start) are skipped.
                let skip = s.received().saturating_sub(offset) as usize;
                if skip < data.len() {
                    let emit = |line: &[u8], end: u64| {
                        let err = (slot == 1).then_some(&init_error);
                        super::supervise::emit_line(
                            &logs,
                            (app, id, ty),
                            name,
                            line,
                            Some(end),
                            err,
                        );
                    };
                    s.feed(&data[skip..], emit);
                }
                None
            }
            Frame::Lost { stream, bytes } => {
                let slot = usize::from(stream == STDERR);
                let name = if stream == STDOUT { "stdout" } else { "stderr" };
                splitters[slot].skip(bytes, |line: &[u8], end: u64| {
                    super::supervise::emit_line(&logs, (app, id, ty), name, line, Some(end), None)
                });
                logs.push(
                    app,
                    id,
                    ty,
                    "init",
                    format!(
                        "{bytes} bytes of {name} were lost: more than the shim keeps came while this host's daemon was away"
                    ),
                );
                None
            }
            Frame::Exit { code } => Some(code),
        }
    };
    let finish = |splitters: &mut [logs::LineSplitter; 2]| {
        for (slot, name) in [(0, "stdout"), (1, "stderr")] {
            splitters[slot].flush(|line: &[u8], end: u64| {
                let err = (slot == 1).then_some(&init_error);
                super::supervise::emit_line(&logs, (app, id, ty), name, line, Some(end), err)
            });
        }
    };
    let mut waited_since: Option<Instant> = None;
    loop {
        let socket = dir.join(shim::SOCKET);
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(mut conn) => {
                waited_since = None;
                let at = [splitters[0].received(), splitters[1].received()];
                if conn
                    .write_all(format!("FROM {} {}\n", at[0], at[1]).as_bytes())
                    .await
                    .is_err()
                {
                    continue;
                }
                loop {
                    let frame = match read_frame(&mut conn).await {
                        Ok(Some(f)) => f,
                        // The shim went without a word: its spool, or it is gone.
                        Ok(None) | Err(_) => break,
                    };
                    if let Some(code) = handle(frame, &mut splitters) {
                        finish(&mut splitters);
                        let _ = conn.write_all(b"ACK\n").await;
                        return Ok(code);
                    }
                }
            }
            Err(_) => {
                let spool = dir.join(shim::SPOOL);
                if let Ok(bytes) = tokio::fs::read(&spool).await {
                    let mut r = bytes.as_slice();
                    while let Ok(Some(frame)) = Frame::read_from(&mut r) {
                        if let Some(code) = handle(frame, &mut splitters) {
                            finish(&mut splitters);
                            let _ = std::fs::remove_file(&spool);
                            return Ok(code);
                        }
                    }
                    return Err("the job's shim left an incomplete spool".into());
                }
                if shim::live_pid(&dir).is_none() {
                    // It may have spooled and exited between the two looks.
                    if tokio::fs::metadata(&spool).await.is_ok() {
                        continue;
                    }
                    finish(&mut splitters);
                    return Err("the job's init is gone".into());
                }
                let since = *waited_since.get_or_insert_with(Instant::now);
                if since.elapsed() > CONNECT_PATIENCE {
                    finish(&mut splitters);
                    return Err("the job's shim does not answer on its socket".into());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reaps a taken-up job's shim once it exits, if it is this process's child: an in-place
/// update execs the daemon under the same pid, so the shims it started are still its
/// children, and nothing else waits for them. Another's shim is its own parent's to reap
/// (`ECHILD` here).
pub fn reap_when_ended(pid: u32) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    tokio::spawn(async move {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        for _ in 0..200 {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => return,
            }
        }
    });
}

async fn read_frame(conn: &mut tokio::net::UnixStream) -> std::io::Result<Option<Frame>> {
    let mut h = [0u8; HEADER];
    match conn.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, word, len) = Frame::header(&h);
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {len} bytes")));
    }
    let mut data = vec![0u8; len];
    conn.read_exact(&mut data).await?;
    Frame::decode(kind, word, data)
        .map(Some)
        .ok_or_else(|| std::io::Error::other(format!("unknown frame kind {kind}")))
}
