//! The attached side of one-off jobs (`flynn run`): stdin uploaded to the job, and its
//! output and exit status streamed to whoever attaches.
//!
//! Output is kept (up to [`MAX_OUTPUT`]) so an attach that arrives after the job started, or
//! after it ended, still sees it. While someone is attached, nothing they have not read is
//! dropped: a job that writes faster than they read waits for them (a dump streamed to a
//! file must arrive whole). With nobody attached, the oldest output goes, and a later
//! reader is told (`"dropped": true`). Finished jobs' output stays for [`KEEP_FINISHED`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;

/// Output kept per job for attaches.
const MAX_OUTPUT: usize = 8 << 20;
/// How long a finished job's output and status stay attachable.
const KEEP_FINISHED: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Inner {
    /// (stream, bytes); index 0 is frame number `dropped`.
    frames: Vec<(u8, Bytes)>,
    dropped: usize,
    size: usize,
    exit: Option<i32>,
    /// What the job left besides its status (a build's slug), sent with it.
    result: Option<serde_json::Value>,
    stdin: Option<tokio::sync::mpsc::Sender<Bytes>>,
    /// The master of a job's pty, for resizes.
    pty: Option<std::fs::File>,
    /// Readers attached now, and the frame number the furthest has read up to.
    readers: usize,
    consumed: usize,
}

impl Inner {
    /// Bytes kept that no reader has read yet.
    fn unread(&self) -> usize {
        let from = self
            .consumed
            .saturating_sub(self.dropped)
            .min(self.frames.len());
        self.frames[from..].iter().map(|(_, d)| d.len()).sum()
    }

    fn push(&mut self, stream: u8, data: Bytes) {
        self.size += data.len();
        self.frames.push((stream, data));
        // Over the bound, the oldest goes: only what was read while someone reads.
        while self.size > MAX_OUTPUT
            && self.frames.len() > 1
            && (self.readers == 0 || self.dropped < self.consumed)
        {
            let (_, old) = self.frames.remove(0);
            self.size -= old.len();
            self.dropped += 1;
        }
    }
}

#[derive(Default)]
pub struct OneOffIo {
    inner: Mutex<Inner>,
    changed: tokio::sync::Notify,
    /// A reader read some, or went.
    drained: tokio::sync::Notify,
}

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

impl OneOffIo {
    pub fn new(stdin: Option<tokio::sync::mpsc::Sender<Bytes>>) -> Arc<Self> {
        let io = OneOffIo::default();
        io.inner.lock().expect("io lock").stdin = stdin;
        Arc::new(io)
    }

    /// Output from the runner itself: kept, never waited for.
    pub fn push(&self, stream: u8, data: Bytes) {
        self.inner.lock().expect("io lock").push(stream, data);
        self.changed.notify_waiters();
    }

    /// The job's output: while someone is attached and has [`MAX_OUTPUT`] unread, this
    /// waits for them to read (so the job waits on its pipe).
    pub async fn output(&self, stream: u8, data: Bytes) {
        loop {
            let drained = self.drained.notified();
            {
                let mut g = self.inner.lock().expect("io lock");
                if g.readers == 0 || g.unread() <= MAX_OUTPUT {
                    g.push(stream, data);
                    drop(g);
                    self.changed.notify_waiters();
                    return;
                }
            }
            // Rechecked now and then: a reader that went notifies, but is not waited on.
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
    }

    pub fn finish(&self, exit: i32, result: Option<serde_json::Value>) {
        let mut g = self.inner.lock().expect("io lock");
        g.exit = Some(exit);
        g.result = result;
        g.pty = None;
        g.stdin = None;
        drop(g);
        self.changed.notify_waiters();
    }

    /// The job runs on a pty with this master.
    pub fn set_pty(&self, master: std::fs::File) {
        self.inner.lock().expect("io lock").pty = Some(master);
    }

    /// Sets the window size of the job's pty; an error if it has none (or no more).
    pub fn resize(&self, size: flynn_state::TtySize) -> Result<(), String> {
        let g = self.inner.lock().expect("io lock");
        let master = g.pty.as_ref().ok_or("the job has no terminal")?;
        super::pty::resize(master, size).map_err(|e| format!("resizing its terminal: {e}"))
    }

    /// The job's stdin, once (the first upload takes it).
    pub fn take_stdin(&self) -> Option<tokio::sync::mpsc::Sender<Bytes>> {
        self.inner.lock().expect("io lock").stdin.take()
    }

    /// Output as NDJSON lines (`{"stream":"stdout","data":BASE64}`), then `{"exit":N}`.
    pub fn stream(
        self: Arc<Self>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        self.inner.lock().expect("io lock").readers += 1;
        let reader = Reader(self);
        futures::stream::unfold(
            (reader, 0usize, false),
            |(reader, mut next, done)| async move {
                if done {
                    return None;
                }
                let io = reader.0.clone();
                loop {
                    let notified = io.changed.notified();
                    let (batch, exit) = {
                        let mut g = io.inner.lock().expect("io lock");
                        let mut out = String::new();
                        if next < g.dropped {
                            out.push_str(&format!(
                                "{{\"stream\":\"stderr\",\"dropped\":true,\"data\":\"{}\"}}\n",
                                base64::engine::general_purpose::STANDARD
                                    .encode(b"[flynn: earlier output was dropped]\n")
                            ));
                            next = g.dropped;
                        }
                        for (stream, data) in &g.frames[next - g.dropped..] {
                            let name = if *stream == STDOUT {
                                "stdout"
                            } else {
                                "stderr"
                            };
                            let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                            out.push_str(&format!(
                                "{{\"stream\":\"{name}\",\"data\":\"{b64}\"}}\n"
                            ));
                        }
                        next = g.dropped + g.frames.len();
                        if next > g.consumed {
                            g.consumed = next;
                            io.drained.notify_waiters();
                        }
                        // The end line, once everything before it is out.
                        let exit = g.exit.filter(|_| out.is_empty()).map(|code| {
                            let mut line = serde_json::json!({ "exit": code });
                            if let Some(r) = &g.result {
                                line["result"] = r.clone();
                            }
                            line
                        });
                        (out, exit)
                    };
                    match (batch.is_empty(), exit) {
                        (false, _) => {
                            drop(notified);
                            return Some((Ok(Bytes::from(batch)), (reader, next, false)));
                        }
                        (true, Some(end)) => {
                            drop(notified);
                            let line = Bytes::from(format!("{end}\n"));
                            return Some((Ok(line), (reader, next, true)));
                        }
                        (true, None) => {
                            // Idle: a heartbeat now and then keeps proxies from closing it.
                            let idle = tokio::time::timeout(Duration::from_secs(15), notified)
                                .await
                                .is_err();
                            if idle {
                                return Some((
                                    Ok(Bytes::from_static(b"{}\n")),
                                    (reader, next, false),
                                ));
                            }
                        }
                    }
                }
            },
        )
    }
}

/// An attached reader of a job's output; it counts as one while its stream lives.
struct Reader(Arc<OneOffIo>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.inner.lock().expect("io lock").readers -= 1;
        self.0.drained.notify_waiters();
    }
}

/// A job's I/O and when the job ended (if it has).
type Attachment = (Arc<OneOffIo>, Option<Instant>);

/// One-off jobs' attachable I/O on this host, while they run and a while after.
#[derive(Default)]
pub struct Attachments {
    map: Mutex<HashMap<String, Attachment>>,
}

impl Attachments {
    pub fn insert(&self, id: &str, io: Arc<OneOffIo>) {
        let mut m = self.map.lock().expect("attach lock");
        m.retain(|_, (_, ended)| ended.is_none_or(|t| t.elapsed() < KEEP_FINISHED));
        m.insert(id.to_string(), (io, None));
    }

    pub fn ended(&self, id: &str) {
        if let Some(e) = self.map.lock().expect("attach lock").get_mut(id) {
            e.1 = Some(Instant::now());
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<OneOffIo>> {
        self.map
            .lock()
            .expect("attach lock")
            .get(id)
            .map(|(io, _)| io.clone())
    }
}

/// Places a one-off job on host `here` if given (the host that took the request runs jobs:
/// its output then needs no second hop), else on the live host with the fewest active jobs.
pub async fn place(
    node: &crate::node::Node,
    here: Option<u64>,
    mut job: flynn_state::jobs::NewJob,
) -> crate::error::ApiResult<flynn_state::Job> {
    let now = crate::now_ms();
    job.host = node.state.read(|a| {
        let s = &a.state;
        let live = crate::jobs::scheduler::live_hosts(s, now);
        let target = match here.filter(|h| live.contains(h)) {
            Some(h) => Some(h),
            None => live
                .iter()
                .copied()
                .min_by_key(|h| s.jobs.active_on(*h).count()),
        };
        target.ok_or_else(|| crate::error::ApiError::Unavailable("no host can run jobs now".into()))
    })?;
    let jobs: Vec<flynn_state::Job> = node
        .propose_as(flynn_state::jobs::JobsCommand::PlaceJobs {
            jobs: vec![job],
            now_ms: now,
        })
        .await?;
    jobs.into_iter()
        .next()
        .ok_or_else(|| crate::error::ApiError::Internal("no job placed".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn t10_late_attach_sees_all_output_then_the_exit() {
        let io = OneOffIo::new(None);
        io.push(STDOUT, Bytes::from_static(b"hello\n"));
        io.push(STDERR, Bytes::from_static(b"oops\n"));
        io.finish(3, None);
        let all: Vec<Bytes> = io.clone().stream().map(|b| b.unwrap()).collect().await;
        let text = String::from_utf8(all.concat()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["stream"], "stdout");
        assert_eq!(lines[1]["stream"], "stderr");
        assert_eq!(lines[2]["exit"], 3);
    }

    #[tokio::test]
    async fn t11_an_attached_reader_gets_every_byte_however_slowly_it_reads() {
        let io = OneOffIo::new(None);
        let mut out = Box::pin(io.clone().stream());
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let total = 3 * MAX_OUTPUT / chunk.len();
        let writer = {
            let (io, chunk) = (io.clone(), chunk.clone());
            tokio::spawn(async move {
                for _ in 0..total {
                    io.output(STDOUT, chunk.clone()).await;
                }
                io.finish(0, None);
            })
        };
        let mut got = 0usize;
        let mut pending = String::new();
        loop {
            tokio::time::sleep(Duration::from_millis(2)).await; // a slow reader
            let Some(b) = out.next().await else { break };
            pending.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
            let mut ended = false;
            while let Some(nl) = pending.find('\n') {
                let line: String = pending.drain(..=nl).collect();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_ne!(v["dropped"], true, "nothing is dropped while attached");
                if let Some(d) = v["data"].as_str() {
                    got += base64::engine::general_purpose::STANDARD
                        .decode(d)
                        .unwrap()
                        .len();
                }
                ended |= v["exit"].is_i64();
            }
            if ended {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, total * chunk.len());
    }

    #[tokio::test]
    async fn t12_with_nobody_attached_the_oldest_goes_and_a_late_reader_is_told() {
        let io = OneOffIo::new(None);
        let chunk = Bytes::from(vec![1u8; 1 << 20]);
        for _ in 0..(2 * MAX_OUTPUT / chunk.len()) {
            io.output(STDOUT, chunk.clone()).await; // never waits: nobody reads
        }
        io.finish(0, None);
        let all: Vec<Bytes> = io.clone().stream().map(|b| b.unwrap()).collect().await;
        let text = String::from_utf8(all.concat()).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["dropped"], true);
    }
}
