//! The shim: stage 1 of a service job's init, kept up without the daemon that started it,
//! so a daemon crash, OOM kill or restart does not end the host's jobs (as Flynn's
//! containerinit did).
//!
//! The shim reads the job's stdout and stderr itself into a ring of the last
//! [`RING_BYTES`], each stream's bytes numbered from 0, and serves them on a unix socket in
//! the job's directory ([`SOCKET`]), all from one thread polling (a process that made a PID
//! namespace for its children cannot start threads). A daemon connects, says from which offset of each
//! stream it wants output (`FROM OUT ERR\n`: what its log already holds), and reads
//! [`Frame`]s: output, bytes lost while no daemon read them, and the job's exit status,
//! which it acknowledges (`ACK\n`). Signals reach the job through the shim's pid (in
//! [`PID_FILE`], with its start time, so a reused pid is never taken for it).
//!
//! When the job ends with no daemon attached, the shim writes what it still holds, and the
//! exit, as frames to [`SPOOL`] and exits: a daemon that comes back reads that instead.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The control socket, in the job's directory.
pub const SOCKET: &str = "control.sock";
/// `PID STARTTIME` of the shim.
pub const PID_FILE: &str = "shim.pid";
/// Frames left by a shim whose job ended with no daemon attached.
pub const SPOOL: &str = "exit.frames";
/// Output kept for a daemon that is away: the most recent bytes of both streams.
pub const RING_BYTES: usize = 4 << 20;

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
const KIND_LOST: u8 = 3;
const KIND_EXIT: u8 = 4;
/// Frame header: kind, a u64 (offset, bytes lost, or the exit status), data length.
pub const HEADER: usize = 1 + 8 + 4;

/// One message from the shim to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes of `stream` starting at `offset` of it.
    Output {
        stream: u8,
        offset: u64,
        data: Vec<u8>,
    },
    /// What the reader had not had of `stream` below offset `upto` was dropped from the
    /// ring unread.
    Lost { stream: u8, upto: u64 },
    /// The job ended: its status as a shell gives it (128 + signal when killed).
    Exit { code: i32 },
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, word, data): (u8, u64, &[u8]) = match self {
            Frame::Output {
                stream,
                offset,
                data,
            } => (*stream, *offset, data),
            Frame::Lost { stream, upto } => (KIND_LOST, *upto, std::slice::from_ref(stream)),
            Frame::Exit { code } => (KIND_EXIT, *code as u32 as u64, &[]),
        };
        let mut out = Vec::with_capacity(HEADER + data.len());
        out.push(kind);
        out.extend_from_slice(&word.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    /// The header's kind, word and data length.
    pub fn header(h: &[u8; HEADER]) -> (u8, u64, usize) {
        let word = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes")) as usize;
        (h[0], word, len)
    }

    /// A frame from its header's fields and data; `None` if they make no frame.
    pub fn decode(kind: u8, word: u64, data: Vec<u8>) -> Option<Frame> {
        match kind {
            STDOUT | STDERR => Some(Frame::Output {
                stream: kind,
                offset: word,
                data,
            }),
            KIND_LOST => Some(Frame::Lost {
                stream: *data.first()?,
                upto: word,
            }),
            KIND_EXIT => Some(Frame::Exit {
                code: word as u32 as i32,
            }),
            _ => None,
        }
    }

    /// Reads one frame; `None` at a clean end.
    pub fn read_from(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
        let mut h = [0u8; HEADER];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (kind, word, len) = Frame::header(&h);
        if len > MAX_FRAME {
            return Err(std::io::Error::other(format!("a frame of {len} bytes")));
        }
        let mut data = vec![0u8; len];
        r.read_exact(&mut data)?;
        Frame::decode(kind, word, data)
            .map(Some)
            .ok_or_else(|| std::io::Error::other(format!("unknown frame kind {kind}")))
    }
}

/// No frame is larger than one pipe read.
pub const MAX_FRAME: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// The output the shim holds, and how the job ended.
#[derive(Default)]
struct Ring {
    chunks: VecDeque<(u8, u64, Vec<u8>)>,
    bytes: usize,
    /// Next offset of each stream (stdout, stderr).
    next: [u64; 2],
    /// Each stream's bytes below this offset were dropped from the ring.
    dropped_to: [u64; 2],
    /// Each stream's pipe reached its end.
    eof: [bool; 2],
    exit: Option<i32>,
}

fn slot(stream: u8) -> usize {
    usize::from(stream == STDERR)
}

impl Ring {
    fn push(&mut self, stream: u8, data: Vec<u8>) {
        let s = slot(stream);
        let offset = self.next[s];
        self.next[s] += data.len() as u64;
        self.bytes += data.len();
        self.chunks.push_back((stream, offset, data));
        while self.bytes > RING_BYTES {
            let Some((st, off, d)) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= d.len();
            self.dropped_to[slot(st)] = off + d.len() as u64;
        }
    }

    /// What a reader at `cursor` has not seen, in the order it was written, and the
    /// cursor after it.
    fn pending(&self, cursor: [u64; 2]) -> (Vec<Frame>, [u64; 2]) {
        let mut frames = Vec::new();
        let mut cur = cursor;
        for (s, stream) in [(0, STDOUT), (1, STDERR)] {
            if cur[s] < self.dropped_to[s] {
                frames.push(Frame::Lost {
                    stream,
                    upto: self.dropped_to[s],
                });
                cur[s] = self.dropped_to[s];
            }
        }
        for (stream, offset, data) in &self.chunks {
            let s = slot(*stream);
            let end = offset + data.len() as u64;
            if end <= cur[s] {
                continue;
            }
            let skip = cur[s].saturating_sub(*offset) as usize;
            frames.push(Frame::Output {
                stream: *stream,
                offset: offset + skip as u64,
                data: data[skip..].to_vec(),
            });
            cur[s] = end;
        }
        (frames, cur)
    }

    /// The job ended and all its output is in.
    fn complete(&self) -> Option<i32> {
        self.exit.filter(|_| self.eof == [true, true])
    }
}

/// The running shim, for stage 1 of the init.
pub struct Shim {
    dir: PathBuf,
    listener: UnixListener,
}

/// The start time of process `pid`, for [`PID_FILE`]; `None` once it ended (a zombie too).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), from its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    if rest.starts_with('Z') {
        return None;
    }
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The shim's pid if the shim in `dir` is alive (its pid is the process that wrote it).
pub fn live_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let (pid, started) = text.trim().split_once(' ')?;
    let (pid, started): (u32, u64) = (pid.parse().ok()?, started.parse().ok()?);
    (start_time(pid)? == started).then_some(pid)
}

/// A daemon's connection.
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Where its reading stands in each stream, once it said (`FROM`).
    cursor: Option<[u64; 2]>,
    exit_sent: bool,
}

/// How long the job's pipes may stay open after it ended (its processes are gone with its
/// PID namespace: they close at once).
const PIPES_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a daemon attached when the job ended has to take the exit.
const ACK_WAIT: Duration = Duration::from_secs(7);

impl Shim {
    /// Binds the control socket in `dir` and writes the pid file: before anything else, so
    /// a daemon that finds the directory finds the shim.
    pub fn bind(dir: &Path) -> std::io::Result<Shim> {
        let path = dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let pid = std::process::id();
        let started = start_time(pid).ok_or_else(|| std::io::Error::other("no /proc/self/stat"))?;
        let tmp = dir.join(format!("{PID_FILE}.tmp"));
        std::fs::write(&tmp, format!("{pid} {started}\n"))?;
        std::fs::rename(&tmp, dir.join(PID_FILE))?;
        Ok(Shim {
            dir: dir.to_path_buf(),
            listener,
        })
    }

    /// Serves until the job (`child`) has ended and its status is taken or spooled: one
    /// thread (a process that made a PID namespace for its children cannot start threads),
    /// one poll over the job's pipes, the socket and the signals in `signals` (blocked by
    /// the caller), which are passed on to the job. Its status as a shell gives it.
    pub fn run(
        self,
        stdout: std::process::ChildStdout,
        stderr: std::process::ChildStderr,
        child: u32,
        signals: nix::sys::signal::SigSet,
    ) -> i32 {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        use std::os::fd::AsFd;

        let child = nix::unistd::Pid::from_raw(child as i32);
        let sigfd = nix::sys::signalfd::SignalFd::with_flags(
            &signals,
            nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
        )
        .ok();
        let _ = self.listener.set_nonblocking(true);
        let mut pipes: [Option<Box<dyn ReadFd>>; 2] =
            [Some(Box::new(stdout)), Some(Box::new(stderr))];
        for p in pipes.iter().flatten() {
            set_nonblocking(p.as_fd());
        }
        let mut ring = Ring::default();
        let mut conn: Option<Conn> = None;
        let mut ended: Option<(i32, Instant)> = None;
        let mut acked = false;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // Wait for anything: a pipe, a daemon, a signal (or the job's end, checked below
            // at least every 100 ms whatever the signals do).
            {
                let mut fds: Vec<PollFd> = Vec::with_capacity(5);
                if let Some(s) = &sigfd {
                    fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
                }
                for p in pipes.iter().flatten() {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                }
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
                if let Some(c) = &conn {
                    let mut flags = PollFlags::POLLIN;
                    if !c.output.is_empty() {
                        flags |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.stream.as_fd(), flags));
                }
                let _ = poll(&mut fds, PollTimeout::from(100u8));
            }
            if let Some(s) = &sigfd {
                while let Ok(Some(info)) = s.read_signal() {
                    let sig = nix::sys::signal::Signal::try_from(info.ssi_signo as i32).ok();
                    // Not once it is reaped: its pid may be another's by then.
                    let sig = sig.filter(|s| *s != nix::sys::signal::Signal::SIGCHLD);
                    if let (Some(sig), None) = (sig, ended) {
                        let _ = nix::sys::signal::kill(child, sig);
                    }
                }
            }
            if ended.is_none() {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => ended = Some((code, Instant::now())),
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        ended = Some((128 + sig as i32, Instant::now()))
                    }
                    Err(nix::errno::Errno::ECHILD) => ended = Some((-1, Instant::now())),
                    _ => {}
                }
            }
            for (slot, stream) in [(0, STDOUT), (1, STDERR)] {
                let Some(p) = pipes[slot].as_mut() else {
                    continue;
                };
                loop {
                    match p.read(&mut buf) {
                        Ok(0) => {
                            pipes[slot] = None;
                            ring.eof[slot] = true;
                            break;
                        }
                        Ok(n) => ring.push(stream, buf[..n].to_vec()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            pipes[slot] = None;
                            ring.eof[slot] = true;
                            break;
                        }
                    }
                }
            }
            if let Some((_, at)) = ended {
                if at.elapsed() > PIPES_AFTER_EXIT {
                    pipes = [None, None];
                    ring.eof = [true, true];
                }
            }
            ring.exit = ended.map(|(code, _)| code);
            // A new daemon replaces the one before.
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(true);
                        conn = Some(Conn {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            cursor: None,
                            exit_sent: false,
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // Out of descriptors, say: not a spin on a listener that stays ready.
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
            if let Some(c) = conn.as_mut() {
                if !c.serve(&ring, &mut buf, &mut acked) {
                    conn = None;
                }
            }
            if let Some((code, at)) = ended {
                if acked {
                    return code;
                }
                let complete = ring.complete().is_some();
                if complete && (conn.is_none() || at.elapsed() > ACK_WAIT) {
                    self.spool(&ring, code);
                    return code;
                }
            }
        }
    }

    /// Leaves what the ring holds, and the exit, for a daemon to come; then no socket.
    fn spool(&self, ring: &Ring, code: i32) {
        let (mut frames, _) = ring.pending([0, 0]);
        frames.push(Frame::Exit { code });
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let tmp = self.dir.join(format!("{SPOOL}.tmp"));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(SPOOL));
        }
        let _ = std::fs::remove_file(self.dir.join(SOCKET));
    }
}

/// A pipe the shim reads.
trait ReadFd: Read + std::os::fd::AsFd {}
impl<T: Read + std::os::fd::AsFd> ReadFd for T {}

fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags));
    }
}

impl Conn {
    /// Reads what the daemon said and writes what it has not had; false once it is gone.
    fn serve(&mut self, ring: &Ring, buf: &mut [u8], acked: &mut bool) -> bool {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return false,
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
            if self.input.len() > 4096 {
                return false; // not a daemon
            }
        }
        while let Some(nl) = self.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(from) = parse_from(&line) {
                self.cursor = Some(from);
            } else if line.trim() == "ACK" && self.exit_sent {
                *acked = true;
            }
        }
        if let Some(cursor) = self.cursor {
            if self.output.is_empty() {
                let (frames, next) = ring.pending(cursor);
                self.cursor = Some(next);
                for f in &frames {
                    self.output.extend(f.encode());
                }
                if let (Some(code), true) = (ring.complete(), !self.exit_sent) {
                    if frames.is_empty() {
                        self.output.extend(Frame::Exit { code }.encode());
                        self.exit_sent = true;
                    }
                }
            }
        }
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// `FROM OUT ERR`: where the daemon's log ends for each stream.
fn parse_from(line: &str) -> Option<[u64; 2]> {
    let mut words = line.split_whitespace();
    (words.next()? == "FROM").then_some(())?;
    Some([words.next()?.parse().ok()?, words.next()?.parse().ok()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_frames_round_trip() {
        for f in [
            Frame::Output {
                stream: STDERR,
                offset: 7,
                data: b"hello\n".to_vec(),
            },
            Frame::Lost {
                stream: STDOUT,
                upto: 1 << 33,
            },
            Frame::Exit { code: -1 },
            Frame::Exit { code: 137 },
        ] {
            let bytes = f.encode();
            let back = Frame::read_from(&mut bytes.as_slice()).unwrap().unwrap();
            assert_eq!(back, f);
        }
        assert!(Frame::read_from(&mut [].as_slice()).unwrap().is_none());
        let mut bad = Frame::Exit { code: 0 }.encode();
        bad[0] = 9;
        assert!(Frame::read_from(&mut bad.as_slice()).is_err());
    }

    #[test]
    fn t02_a_reader_resumes_where_its_log_ends_and_is_told_what_was_dropped() {
        let mut ring = Ring::default();
        ring.push(STDOUT, b"one\ntw".to_vec());
        ring.push(STDERR, b"oops\n".to_vec());
        ring.push(STDOUT, b"o\n".to_vec());
        // From the start: everything, in order.
        let (frames, cur) = ring.pending([0, 0]);
        assert_eq!(frames.len(), 3);
        assert_eq!(cur, [8, 5]);
        // The log holds "one\n" and nothing of stderr: the rest of stdout from offset 4.
        let (frames, _) = ring.pending([4, 0]);
        assert_eq!(
            frames[0],
            Frame::Output {
                stream: STDOUT,
                offset: 4,
                data: b"tw".to_vec()
            }
        );
        assert_eq!(frames.len(), 3);
        assert!(ring.pending([8, 5]).0.is_empty());
        // Past the ring's size the oldest go, and a reader behind them is told how much.
        for _ in 0..(RING_BYTES / READ_CHUNK + 1) {
            ring.push(STDOUT, vec![b'x'; READ_CHUNK]);
        }
        assert!(ring.bytes <= RING_BYTES);
        let (frames, _) = ring.pending([0, 5]);
        match &frames[0] {
            Frame::Lost { stream, upto } => {
                assert_eq!(*stream, STDOUT);
                assert_eq!(*upto, ring.dropped_to[0]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn t03_a_live_pid_is_the_process_that_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let _shim = Shim::bind(dir.path()).unwrap();
        assert_eq!(live_pid(dir.path()), Some(std::process::id()));
        // The same pid with another start time is another process.
        std::fs::write(
            dir.path().join(PID_FILE),
            format!("{} 1\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(live_pid(dir.path()), None);
        std::fs::write(dir.path().join(PID_FILE), "garbage").unwrap();
        assert_eq!(live_pid(dir.path()), None);
    }

    /// A shim over `sh -c script`, run on a thread of its own; its status when it ends.
    fn shim_over(dir: &Path, script: &str) -> std::thread::JoinHandle<i32> {
        let shim = Shim::bind(dir).unwrap();
        // Reaped by the shim (waitpid), as stage 2 is.
        #[allow(clippy::zombie_processes)]
        let mut child = std::process::Command::new("sh")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let pid = child.id();
        std::thread::spawn(move || shim.run(out, err, pid, nix::sys::signal::SigSet::empty()))
    }

    fn read_all(r: &mut impl Read) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = Frame::read_from(r).unwrap() {
            let end = matches!(f, Frame::Exit { .. });
            frames.push(f);
            if end {
                break;
            }
        }
        frames
    }

    #[test]
    fn t04_a_daemon_reads_output_and_the_exit_and_acknowledges_it() {
        let dir = tempfile::tempdir().unwrap();
        let shim = shim_over(dir.path(), "echo out; sleep 0.3; echo err >&2; exit 4");
        let mut conn = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        conn.write_all(b"FROM 0 0\n").unwrap();
        let got = read_all(&mut conn);
        conn.write_all(b"ACK\n").unwrap();
        assert_eq!(shim.join().unwrap(), 4);
        assert_eq!(
            got,
            [
                Frame::Output {
                    stream: STDOUT,
                    offset: 0,
                    data: b"out\n".to_vec()
                },
                Frame::Output {
                    stream: STDERR,
                    offset: 0,
                    data: b"err\n".to_vec()
                },
                Frame::Exit { code: 4 }
            ]
        );
        assert!(!dir.path().join(SPOOL).exists(), "taken: no spool");
    }

    #[test]
    fn t05_a_new_daemon_resumes_where_its_log_ends_and_with_none_the_end_is_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let shim = shim_over(dir.path(), "echo one; echo two; sleep 0.5; echo three");
        // A first daemon reads a little and goes away.
        let mut first = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        first.write_all(b"FROM 0 0\n").unwrap();
        let f = Frame::read_from(&mut first).unwrap().unwrap();
        assert!(matches!(f, Frame::Output { offset: 0, .. }), "{f:?}");
        drop(first);
        // The next one says its log holds "one\n": it gets the rest.
        let mut second = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        second.write_all(b"FROM 4 0\n").unwrap();
        let got = read_all(&mut second);
        let text: Vec<u8> = got
            .iter()
            .filter_map(|f| match f {
                Frame::Output { data, .. } => Some(data.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(text, b"two\nthree\n");
        // It never acknowledges, and goes: the shim spools the end for a daemon to come.
        drop(second);
        assert_eq!(shim.join().unwrap(), 0);
        let spool = std::fs::read(dir.path().join(SPOOL)).unwrap();
        let frames = read_all(&mut spool.as_slice());
        assert_eq!(frames.last(), Some(&Frame::Exit { code: 0 }));
        assert!(!dir.path().join(SOCKET).exists());
    }
}
