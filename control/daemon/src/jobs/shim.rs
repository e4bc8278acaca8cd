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

use flynn_job::shim::{self, Frame, HEADER, MAX_FRAME, STDERR};
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
                // A shim that cannot be taken up (its runtime unreadable) ends with its
                // job (stage 2 dies with it) before its directory goes from under it.
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
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
    let lost = |name: &str, bytes: u64| {
        if bytes > 0 {
            logs.push(
                app,
                id,
                ty,
                "init",
                format!(
                    "{bytes} bytes of {name} were lost: more than the shim keeps came while this host's daemon was away"
                ),
            );
        }
    };
    let handle = |frame: Frame, splitters: &mut [logs::LineSplitter; 2]| -> Option<i32> {
        let (stream, upto, data) = match frame {
            Frame::Exit { code } => return Some(code),
            Frame::Lost { stream, upto } => (stream, upto, None),
            Frame::Output {
                stream,
                offset,
                data,
            } => (stream, offset, Some(data)),
        };
        let (slot, name) = if stream == STDERR {
            (1, "stderr")
        } else {
            (0, "stdout")
        };
        let err = (slot == 1).then_some(&init_error);
        let emit = |line: &[u8], end: u64| {
            super::supervise::emit_line(&logs, (app, id, ty), name, line, Some(end), err)
        };
        let s = &mut splitters[slot];
        // A gap before what follows (bytes dropped from the shim's ring) is said; bytes
        // already handled (a spool holds the ring from its start) are skipped.
        lost(name, s.resume_at(upto, emit));
        if let Some(data) = data {
            let skip = s.received().saturating_sub(upto).min(data.len() as u64) as usize;
            s.feed(&data[skip..], emit);
        }
        None
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
                    // The log writer's pace: the shim holds the output meanwhile.
                    logs.room().await;
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
                        logs.room().await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use flynn_job::shim::STDOUT;

    /// Follows a spool of `frames` from `from`; the log's lines (stream, text) once the
    /// writer has written `expect` of them.
    async fn follow_spool(
        frames: &[Frame],
        from: [u64; 2],
        expect: u64,
    ) -> (i32, Vec<(String, String)>) {
        let dir = tempfile::tempdir().unwrap();
        let job_dir = dir.path().join("web1-web-1");
        std::fs::create_dir_all(&job_dir).unwrap();
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        std::fs::write(job_dir.join(shim::SPOOL), bytes).unwrap();
        let logs = Arc::new(logs::Logs::open(dir.path().join("log"), 1 << 20, 1).unwrap());
        let job = (
            "web1".to_string(),
            "web1-web-1".to_string(),
            "web".to_string(),
        );
        let code = follow(logs.clone(), job, job_dir, from, Default::default())
            .await
            .unwrap();
        let q = flynn_state::LogQuery {
            app: "web1".into(),
            ..Default::default()
        };
        // The writer is a thread of its own: lines reach the file a moment later.
        for _ in 0..400 {
            if logs.written.load(std::sync::atomic::Ordering::Relaxed) >= expect {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = logs
            .read(&q)
            .into_iter()
            .map(|l| (l.stream, l.msg))
            .collect();
        (code, got)
    }

    fn spool_after_drops() -> Vec<Frame> {
        vec![
            // The ring dropped stdout below 100; it holds 100..110.
            Frame::Lost {
                stream: STDOUT,
                upto: 100,
            },
            Frame::Output {
                stream: STDOUT,
                offset: 100,
                data: b"aaaa\nbbbb\n".to_vec(),
            },
            Frame::Exit { code: 3 },
        ]
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn t01_a_spool_resumes_where_the_log_ends_whatever_the_ring_dropped() {
        // The log holds stdout to 105 ("aaaa\n"): only "bbbb" is new, nothing was lost.
        let (code, got) = follow_spool(&spool_after_drops(), [105, 0], 1).await;
        assert_eq!(code, 3);
        assert_eq!(got, [("stdout".to_string(), "bbbb".to_string())]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn t02_bytes_the_ring_dropped_before_the_log_s_end_are_said_lost() {
        let (_, got) = follow_spool(&spool_after_drops(), [40, 0], 3).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, "init");
        assert!(
            got[0].1.starts_with("60 bytes of stdout were lost"),
            "{got:?}"
        );
        assert_eq!(got[1].1, "aaaa");
        assert_eq!(got[2].1, "bbbb");
    }
}
