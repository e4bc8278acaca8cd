//! Job output on each host: `<log-dir>/<app>.log`, one JSON [`LogLine`] per line, rotated at
//! a size limit with one rotated file (`<app>.log.1`) kept.
//!
//! The pipe readers hand lines to one writer thread through a bounded queue and never wait
//! on it: a job is never blocked by its logging. If the queue is full (the disk stalls), the
//! line is dropped and counted in `flynn_job_log_lines_dropped_total`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flynn_state::{LogLine, LogQuery, MAX_LOG_LINES};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 65_536;
/// A longer line is cut (and marked) so one runaway write cannot fill memory.
pub const MAX_LINE: usize = 64 * 1024;

pub struct Logs {
    dir: PathBuf,
    tx: std::sync::mpsc::SyncSender<LogLine>,
    /// Lines queued for the writer now.
    queued: Arc<AtomicU64>,
    host: u64,
    seq: AtomicU64,
    pub dropped: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl Logs {
    pub fn open(dir: PathBuf, max_bytes: u64, host: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating log dir {}: {e}", dir.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        let mut writer = Writer {
            dir: dir.clone(),
            max_bytes,
            files: HashMap::new(),
            written: written.clone(),
        };
        let in_queue = queued.clone();
        std::thread::Builder::new()
            .name("job-logs".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    in_queue.fetch_sub(1, Ordering::Relaxed);
                    writer.write(&line);
                }
            })?;
        Ok(Logs {
            dir,
            tx,
            queued,
            host,
            seq: AtomicU64::new(0),
            dropped: Arc::new(AtomicU64::new(0)),
            written,
        })
    }

    /// Queues one line of a job's output; never waits.
    pub fn push(&self, app: &str, job: &str, proc_type: &str, stream: &str, msg: String) {
        self.push_at(app, job, proc_type, stream, msg, None)
    }

    /// [`Logs::push`], saying where the line ends in its stream (see [`LogLine::off`]).
    pub fn push_at(
        &self,
        app: &str,
        job: &str,
        proc_type: &str,
        stream: &str,
        msg: String,
        off: Option<u64>,
    ) {
        let line = LogLine {
            off,
            ts: crate::now_ms(),
            host: self.host,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            app: app.into(),
            job: job.into(),
            proc_type: proc_type.into(),
            stream: stream.into(),
            msg,
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(line).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits while the writer's queue is more than half full: a reader that can hold back
    /// (a job's shim keeps its output meanwhile) does, rather than have lines dropped.
    pub async fn room(&self) {
        while self.queued.load(Ordering::Relaxed) > QUEUE as u64 / 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The lines of this host's files that `q` asks for: the last `q.lines` (at most
    /// [`MAX_LOG_LINES`]), oldest first.
    pub fn read(&self, q: &LogQuery) -> Vec<LogLine> {
        read_files(&self.dir, q)
    }

    /// Where each of `app`'s jobs' streams (stdout, stderr) ends in this host's files: what
    /// a restarted daemon asks a job's shim for next. Lines the writer had not written when
    /// the daemon died are not there, so they are read again, not lost.
    pub fn resume_points(&self, app: &str) -> HashMap<String, [u64; 2]> {
        let mut ends: HashMap<String, [u64; 2]> = HashMap::new();
        if flynn_state::validate::app_name(app).is_err() {
            return ends;
        }
        for path in [rotated_of(&self.dir, app), file_of(&self.dir, app)] {
            let Ok(f) = File::open(&path) else { continue };
            for raw in BufReader::new(f).lines() {
                let Ok(raw) = raw else { break };
                // Only lines that carry an offset are parsed.
                if !raw.contains("\"off\":") {
                    continue;
                }
                let Ok(line) = serde_json::from_str::<LogLine>(&raw) else {
                    continue;
                };
                let (Some(off), Some(slot)) = (line.off, stream_slot(&line.stream)) else {
                    continue;
                };
                let end = &mut ends.entry(line.job).or_default()[slot];
                *end = (*end).max(off);
            }
        }
        ends
    }
}

/// Which of a job's two output streams a line came from (an init's messages came on
/// stderr).
fn stream_slot(stream: &str) -> Option<usize> {
    match stream {
        "stdout" => Some(0),
        "stderr" | "init" => Some(1),
        _ => None,
    }
}

/// Splits one output stream into lines as it arrives: a line ends at a newline, or at
/// [`MAX_LINE`] bytes (cut there). Each line is handed over with where it ends in the
/// stream.
#[derive(Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    /// Where the stream's bytes handed in so far end.
    end: u64,
}

impl LineSplitter {
    /// A splitter for a stream whose bytes before `offset` are already handled.
    pub fn at(offset: u64) -> Self {
        LineSplitter {
            line: Vec::new(),
            end: offset,
        }
    }

    /// Where the bytes handed in so far end.
    pub fn received(&self) -> u64 {
        self.end
    }

    /// Bytes of the stream, which continue where the last ended.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8], u64)) {
        while !data.is_empty() {
            let take = data.len().min(MAX_LINE - self.line.len());
            let nl = data[..take].iter().position(|b| *b == b'\n');
            let used = nl.map_or(take, |i| i + 1);
            self.line.extend_from_slice(&data[..used]);
            self.end += used as u64;
            data = &data[used..];
            if nl.is_some() || self.line.len() >= MAX_LINE {
                emit(&self.line, self.end);
                self.line.clear();
            }
        }
    }

    /// The stream ended: a last line without a newline is a line.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8], u64)) {
        if !self.line.is_empty() {
            emit(&self.line, self.end);
            self.line.clear();
        }
    }

    /// The stream goes on at `offset` (the bytes before it that were not handed in are
    /// lost): what was buffered is handed over as it is. How many bytes were lost.
    pub fn resume_at(&mut self, offset: u64, emit: impl FnMut(&[u8], u64)) -> u64 {
        if offset <= self.end {
            return 0;
        }
        self.flush(emit);
        let lost = offset - self.end;
        self.end = offset;
        lost
    }
}

fn file_of(dir: &Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.log"))
}

fn rotated_of(dir: &Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.log.1"))
}

pub fn read_files(dir: &Path, q: &LogQuery) -> Vec<LogLine> {
    let limit = q.lines.unwrap_or(MAX_LOG_LINES).min(MAX_LOG_LINES);
    let mut out: VecDeque<LogLine> = VecDeque::with_capacity(limit.min(1024));
    if limit == 0 || flynn_state::validate::app_name(&q.app).is_err() {
        return Vec::new();
    }
    for path in [rotated_of(dir, &q.app), file_of(dir, &q.app)] {
        let Ok(f) = File::open(&path) else { continue };
        for raw in BufReader::new(f).lines() {
            let Ok(raw) = raw else { break };
            let Ok(line) = serde_json::from_str::<LogLine>(&raw) else {
                continue;
            };
            if !q.matches(&line) {
                continue;
            }
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(line);
        }
    }
    out.into()
}

struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    files: HashMap<String, (File, u64)>,
    written: Arc<AtomicU64>,
}

impl Writer {
    fn write(&mut self, line: &LogLine) {
        let Ok(mut json) = serde_json::to_vec(line) else {
            return;
        };
        json.push(b'\n');
        if !self.files.contains_key(&line.app) {
            let path = file_of(&self.dir, &line.app);
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(f) => {
                    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    self.files.insert(line.app.clone(), (f, size));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open job log");
                    return;
                }
            }
        }
        let (file, size) = self.files.get_mut(&line.app).expect("opened above");
        if file.write_all(&json).is_ok() {
            *size += json.len() as u64;
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        if *size >= self.max_bytes {
            // One rotated file is kept: the previous one is replaced.
            self.files.remove(&line.app);
            let from = file_of(&self.dir, &line.app);
            if let Err(e) = std::fs::rename(&from, rotated_of(&self.dir, &line.app)) {
                tracing::warn!(path = %from.display(), error = %e, "job log not rotated");
            }
        }
    }
}

/// The host's job log, once its runner started: where system apps' lines go.
static SYSTEM: std::sync::OnceLock<Arc<Logs>> = std::sync::OnceLock::new();

/// System apps that run inside flynn-host (not as jobs) log through `tracing`; their
/// lines are written to the host's job log under the app's name, so `flynn -a blobstore log`
/// shows the blobstore's log as it would a job's. By `tracing` target prefix.
const SYSTEM_APPS: &[(&str, &str)] = &[
    ("flynn_daemon::blobstore", "blobstore"),
    ("flynn_daemon::components::router", "router"),
    ("flynn_router", "router"),
    ("flynn_daemon::jobs::scheduler", "controller"),
    ("flynn_daemon::api", "controller"),
];

impl Logs {
    /// Makes this the destination of system apps' lines (the first runner of the process).
    pub fn serve_system_apps(self: &Arc<Self>) {
        let _ = SYSTEM.set(self.clone());
    }
}

/// A `tracing` layer copying system apps' events into the host's job log.
pub struct SystemAppLayer;

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SystemAppLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(logs) = SYSTEM.get() else { return };
        let target = event.metadata().target();
        let Some((_, app)) = SYSTEM_APPS.iter().find(|(t, _)| target.starts_with(t)) else {
            return;
        };
        let mut msg = Message(String::new());
        event.record(&mut msg);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let job = format!("host-{}", logs.host);
        logs.push(app, &job, app, &level, msg.0.trim().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_written(logs: &Logs, n: u64) {
        for _ in 0..500 {
            if logs.written.load(Ordering::Relaxed) >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("lines not written");
    }

    #[test]
    fn t10_lines_keep_order_rotate_and_read_back_by_filter() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path().to_path_buf(), 4096, 1).unwrap();
        for i in 0..200 {
            let job = if i % 2 == 0 { "a" } else { "b" };
            logs.push("web1", job, "web", "stdout", format!("line {i}"));
        }
        wait_written(&logs, 200);
        // Rotated at 4 KiB with one old file kept: the oldest lines are gone.
        let all = logs.read(&LogQuery {
            app: "web1".into(),
            ..LogQuery::default()
        });
        assert!(all.len() < 200 && !all.is_empty(), "{}", all.len());
        assert!(
            std::fs::metadata(dir.path().join("web1.log.1"))
                .unwrap()
                .len()
                >= 4096
        );
        assert!(all.windows(2).all(|w| w[0].key() < w[1].key()), "in order");
        assert_eq!(all.last().unwrap().msg, "line 199");

        let q = LogQuery {
            app: "web1".into(),
            job: Some("a".into()),
            lines: Some(3),
            ..LogQuery::default()
        };
        let last_a: Vec<String> = logs.read(&q).into_iter().map(|l| l.msg).collect();
        assert_eq!(last_a, ["line 194", "line 196", "line 198"]);
        // After a cursor: only newer lines.
        let q = LogQuery {
            app: "web1".into(),
            after: Some(all[all.len() - 2].cursor()),
            ..LogQuery::default()
        };
        assert_eq!(logs.read(&q).len(), 1);
        // Another app, or a name that is not one, reads nothing.
        let q = LogQuery {
            app: "../etc".into(),
            ..LogQuery::default()
        };
        assert!(logs.read(&q).is_empty());
    }

    #[test]
    fn t11_lines_split_at_newlines_and_size_with_their_end_offsets() {
        let mut s = LineSplitter::at(10);
        let mut got: Vec<(String, u64)> = Vec::new();
        let mut emit = |l: &[u8], end: u64| got.push((String::from_utf8_lossy(l).into(), end));
        s.feed(b"ab\ncd", &mut emit);
        s.feed(b"e\n\n", &mut emit);
        s.feed(&vec![b'x'; MAX_LINE + 5], &mut emit);
        s.flush(&mut emit);
        let ends: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(got[0].0, "ab\n");
        assert_eq!(got[1].0, "cde\n");
        assert_eq!(got[2].0, "\n");
        assert_eq!(ends[..3], [13, 17, 18]);
        assert_eq!(got[3].0.len(), MAX_LINE);
        assert_eq!(ends[4], 18 + MAX_LINE as u64 + 5);
        assert_eq!(s.received(), ends[4]);
    }

    #[test]
    fn t12_resume_points_are_where_each_job_s_streams_end_in_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path().to_path_buf(), 1 << 20, 1).unwrap();
        logs.push_at("web1", "a", "web", "stdout", "x".into(), Some(5));
        logs.push_at("web1", "a", "web", "stdout", "y".into(), Some(9));
        logs.push_at("web1", "a", "web", "init", "cannot".into(), Some(4));
        logs.push_at("web1", "b", "web", "stderr", "z".into(), Some(3));
        logs.push("web1", "a", "web", "init", "from the runner".into());
        wait_written(&logs, 5);
        let points = logs.resume_points("web1");
        assert_eq!(points["a"], [9, 4]);
        assert_eq!(points["b"], [0, 3]);
        assert!(logs.resume_points("../x").is_empty());
    }
}
