//! Fixtures for the router's tests: the real `flynn-host router` process, real backend
//! servers on real sockets, and a plain HTTP/1.1 client that can also send what no
//! well-behaved client would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::bin_dir;

/// Makes `cmd`'s process refuse `io_uring_setup` with EPERM (a real seccomp filter in the
/// kernel, as Docker's default profile installs), so the router's `--io auto` must fall back.
#[allow(unsafe_code)]
pub fn deny_io_uring(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // seccomp_data.nr is at offset 0; io_uring_setup is syscall 425 on x86_64 and aarch64.
    const NR_IO_URING_SETUP: u32 = 425;
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl, which
    // is async-signal-safe; `filter` is moved into the closure and outlives both calls.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running `flynn-host router`, killed on drop.
pub struct RouterProc {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    /// Every plain-HTTP listener, in the order given.
    pub http_all: Vec<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub metrics: SocketAddr,
}

impl RouterProc {
    /// Starts a router on loopback with `routes` (TOML) and extra flags.
    pub fn start(routes: &str, extra: &[&str]) -> RouterProc {
        Self::from_file(routes, extra, false)
    }

    /// [`RouterProc::start`] under a seccomp filter that refuses `io_uring_setup` with EPERM,
    /// as Docker's default profile does.
    pub fn start_without_io_uring(routes: &str, extra: &[&str]) -> RouterProc {
        Self::from_file(routes, extra, true)
    }

    fn from_file(routes: &str, extra: &[&str], no_io_uring: bool) -> RouterProc {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("routes.toml"), routes).expect("routes file");
        let source = vec![
            "--routes".into(),
            dir.path().join("routes.toml").display().to_string(),
        ];
        Self::spawn(dir, source, extra, no_io_uring)
    }

    /// Starts a router that follows a cluster's controller.
    pub fn follow(controller: &str, key: &str, extra: &[&str]) -> RouterProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = vec![
            "--controller".into(),
            controller.into(),
            "--key".into(),
            key.into(),
        ];
        Self::spawn(dir, source, extra, false)
    }

    fn spawn(
        dir: tempfile::TempDir,
        source: Vec<String>,
        extra: &[&str],
        no_io_uring: bool,
    ) -> RouterProc {
        let mut args: Vec<String> = vec!["router".into()];
        args.extend(source);
        args.extend([
            "--http".into(),
            "127.0.0.1:0".into(),
            "--metrics".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            "2".into(),
            "--no-pin".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(bin_dir().join("flynn-host"));
        cmd.args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if no_io_uring {
            deny_io_uring(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn flynn-host router");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let wants_https = extra.contains(&"--https");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = log.lock().unwrap().clone();
            let find = |what: &str| {
                text.lines()
                    .find(|l| l.contains(what))
                    .and_then(|l| {
                        l.rsplit_once("addr=")
                            .map(|(_, a)| a.trim().parse::<SocketAddr>().ok())
                    })
                    .flatten()
            };
            if let (Some(http), Some(metrics)) = (find("http listener"), find("metrics listener")) {
                let https = find("https listener");
                if https.is_some() || !wants_https {
                    let http_all = text
                        .lines()
                        .filter(|l| l.contains(" http listener"))
                        .filter_map(|l| {
                            l.rsplit_once("addr=")
                                .and_then(|(_, a)| a.trim().parse().ok())
                        })
                        .collect();
                    return RouterProc {
                        child: Some(child),
                        log,
                        dir,
                        http,
                        http_all,
                        https,
                        metrics,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("router exited ({status}) at start:\n{text}");
            }
            assert!(Instant::now() < deadline, "router did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Replaces the routes file and signals the router to reload it.
    pub fn reload(&self, routes: &str) {
        std::fs::write(self.dir.path().join("routes.toml"), routes).expect("routes file");
        self.signal("HUP");
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit; its success, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s.success());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub async fn metrics_text(&self) -> String {
        let resp = request(
            self.metrics,
            "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        )
        .await;
        String::from_utf8_lossy(&resp.body).into_owned()
    }

    /// Sums a metric's samples whose line contains every one of `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|s| l.contains(s)))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A response as the client saw it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection that reads responses one at a time.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// A client on a connection opened already (part of a request may be written on it).
    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.expect("connect router"),
            buf: Vec::new(),
        }
    }

    /// [`Client::connect_from`], with the connect error returned (a peer that drops SYNs).
    pub async fn connect_from_checked(
        source: std::net::IpAddr,
        addr: SocketAddr,
    ) -> std::io::Result<Client> {
        let socket = if source.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.bind(SocketAddr::new(source, 0))?;
        Ok(Client {
            stream: socket.connect(addr).await?,
            buf: Vec::new(),
        })
    }

    /// Connects from `source` (an address of this namespace), as a client elsewhere would.
    pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Client {
        Self::connect_from_checked(source, addr)
            .await
            .expect("connect")
    }

    pub async fn send(&mut self, raw: impl AsRef<[u8]>) {
        self.stream.write_all(raw.as_ref()).await.expect("write");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no response within 30 s"),
        }
    }

    /// Reads one response; `None` if the connection closed first. A connection closed
    /// inside a body fails the test: a router that cuts a response short is a bug.
    pub async fn read(&mut self, head_request: bool) -> Option<Resp> {
        self.read_response(head_request, true).await
    }

    /// Reads one response; `None` if the connection closed first or inside the body. For
    /// load that runs while the router is killed: a response cut then is the kill's doing,
    /// and the caller decides whether it counts.
    pub async fn read_or_cut(&mut self, head_request: bool) -> Option<Resp> {
        self.read_response(head_request, false).await
    }

    /// One more chunk of the body; a close there fails the test if `strict`, else `false`.
    async fn fill_body(&mut self, strict: bool, what: &str) -> bool {
        let more = self.fill().await;
        assert!(more || !strict, "closed inside {what}");
        more
    }

    async fn read_response(&mut self, head_request: bool, strict: bool) -> Option<Resp> {
        let (status, headers, n) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (r.code.unwrap(), headers, n);
            }
            if !self.fill().await {
                return None;
            }
        };
        self.buf.drain(..n);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status / 100 == 1 || status == 204 || status == 304 {
            return Some(resp);
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !self.fill_body(strict, "a chunked body").await {
                        return None;
                    }
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line_end])
                        .unwrap()
                        .split(';')
                        .next()
                        .unwrap()
                        .trim(),
                    16,
                )
                .expect("chunk size");
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill_body(strict, "a chunk").await {
                        return None;
                    }
                }
                resp.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 {
                    return Some(resp);
                }
            }
        } else if let Some(len) = resp
            .header("content-length")
            .map(|v| v.trim().parse::<usize>().unwrap())
        {
            while self.buf.len() < len {
                if !self.fill_body(strict, "a body").await {
                    return None;
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Some(resp)
    }

    /// Whether the peer has closed (reads EOF within `within`).
    pub async fn closed(&mut self, within: Duration) -> bool {
        let mut b = [0u8; 1024];
        matches!(
            tokio::time::timeout(within, self.stream.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// One request on a new connection.
pub async fn request(addr: SocketAddr, raw: &str) -> Resp {
    let mut c = Client::connect(addr).await;
    c.send(raw).await;
    c.read(raw.starts_with("HEAD ")).await.expect("response")
}

/// `GET path` for `host` on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// A backend: a real HTTP/1.1 server on a real socket, whose behaviour is chosen by path.
///
/// - any path: JSON echo of what arrived (`backend`, `method`, `path`, `headers`,
///   `body_len`, `body_sum`), with Content-Length
/// - `/bytes/N`, `/chunked/N`: N pattern bytes, by Content-Length or chunked, streamed
/// - `/status/N`: that status, no body (`Content-Length: 0` unless 204/304)
/// - `/slow/MS`: answers after MS milliseconds
/// - `/early413`: answers 413 without reading the body, then closes
/// - `/ws` with `Upgrade`: 101, then echoes bytes upper-cased until EOF, then "BYE"
/// - `/close`: a body delimited by closing the connection
/// - `/interim`: a 103 before the 200
/// - `/hop`: a 200 whose `Connection` header names `X-Hop`, which it also sends
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    /// The listening socket, shared with the accept loop, so a kill closes it at once.
    listener: std::net::TcpListener,
    /// Each connection's task and a handle on its socket, held only while the task serves.
    open: Arc<Mutex<Vec<(tokio::task::AbortHandle, SocketSlot)>>>,
}

/// A second handle on a backend connection's socket, for closing it from outside; the
/// serving task empties it when it ends, so it never keeps a closed connection open.
type SocketSlot = Arc<Mutex<Option<std::net::TcpStream>>>;

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1").await
    }

    /// A backend listening on `ip` (e.g. the test's bridge address, which every test host
    /// reaches).
    pub async fn start_on(name: &str, ip: &str) -> Backend {
        let std_listener = std::net::TcpListener::bind((ip, 0)).expect("bind backend");
        Backend::serve(name, std_listener)
    }

    /// A backend serving on a listener bound already (in another network namespace, say).
    pub fn serve(name: &str, std_listener: std::net::TcpListener) -> Backend {
        std_listener.set_nonblocking(true).expect("nonblocking");
        let kept = std_listener.try_clone().expect("listener clone");
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r, n) = (connections.clone(), requests.clone(), name.to_string());
        let open: Arc<Mutex<Vec<(tokio::task::AbortHandle, SocketSlot)>>> = Arc::default();
        let tasks = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let Ok((handle, s)) = s.into_std().and_then(|s| Ok((s.try_clone()?, s))) else {
                    continue;
                };
                let Ok(s) = TcpStream::from_std(s) else {
                    continue;
                };
                let slot: SocketSlot = Arc::new(Mutex::new(Some(handle)));
                let mine = slot.clone();
                let (n, r) = (n.clone(), r.clone());
                let t = tokio::spawn(async move {
                    serve_backend(s, n, r).await;
                    mine.lock().unwrap().take();
                });
                tasks.lock().unwrap().push((t.abort_handle(), slot));
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            connections,
            requests,
            task,
            listener: kept,
            open,
        }
    }

    /// Dies as a process does: the listener and every open connection close at once (no
    /// connection is accepted after this returns), mid-request or not; then the tasks go.
    pub fn kill(&self) {
        // A shut-down listening socket refuses new connections and resets those waiting
        // in its backlog; aborting the accept task alone would leave it open a moment.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        self.task.abort();
        for (task, slot) in self.open.lock().unwrap().drain(..) {
            if let Some(socket) = slot.lock().unwrap().take() {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            task.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_backend(mut s: TcpStream, name: String, requests: Arc<AtomicUsize>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Head.
        let (method, path, headers, n) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (
                    req.method.unwrap().to_string(),
                    req.path.unwrap().to_string(),
                    headers,
                    n,
                );
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        buf.drain(..n);
        requests.fetch_add(1, Ordering::SeqCst);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if path == "/early413" {
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
        // Body: counted, never kept.
        let mut body_len = 0u64;
        let mut body_sum = 0u64;
        let mut eat = |data: &[u8]| {
            body_len += data.len() as u64;
            for b in data {
                body_sum = body_sum.wrapping_add(*b as u64);
            }
        };
        if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..line_end]).unwrap_or("x").trim(),
                    16,
                );
                let Ok(size) = size else { return };
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                eat(&buf[..size]);
                buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let mut left = len;
            while left > 0 {
                if buf.is_empty() {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let take = (left as usize).min(buf.len());
                eat(&buf[..take]);
                buf.drain(..take);
                left -= take as u64;
            }
        }
        let close = header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let head_only = method == "HEAD";
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (first, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let ok = match first {
            "bytes" | "chunked" => {
                let n: u64 = arg.parse().unwrap_or(0);
                let chunked = first == "chunked";
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n")
                };
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if !head_only {
                    let piece: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
                    let mut left = n;
                    while left > 0 {
                        let k = (left as usize).min(piece.len());
                        let r = if chunked {
                            let mut framed = format!("{k:x}\r\n").into_bytes();
                            framed.extend_from_slice(&piece[..k]);
                            framed.extend_from_slice(b"\r\n");
                            s.write_all(&framed).await
                        } else {
                            s.write_all(&piece[..k]).await
                        };
                        if r.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                    if chunked && s.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
                true
            }
            "status" => {
                let code: u16 = arg.parse().unwrap_or(200);
                let len = if code == 204 || code == 304 {
                    ""
                } else {
                    "Content-Length: 0\r\n"
                };
                s.write_all(format!("HTTP/1.1 {code} X\r\n{len}\r\n").as_bytes())
                    .await
                    .is_ok()
            }
            // A response header declared hop-by-hop by the response's own Connection header.
            "hop" => s
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_ok(),
            "ws" if header("upgrade").is_some() => {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                if !buf.is_empty() {
                    let up = buf.to_ascii_uppercase();
                    let _ = s.write_all(&up).await;
                }
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if s.write_all(&chunk[..k].to_ascii_uppercase()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"BYE").await;
                return;
            }
            "close" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclosed-body")
                    .await;
                return;
            }
            _ => {
                if first == "slow" {
                    tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(1000))).await;
                }
                if first == "interim"
                    && s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
                        .await
                        .is_err()
                {
                    return;
                }
                let mut hmap: HashMap<String, String> = HashMap::new();
                for (n, v) in &headers {
                    hmap.entry(n.clone())
                        .and_modify(|e| {
                            e.push_str(", ");
                            e.push_str(v);
                        })
                        .or_insert_with(|| v.clone());
                }
                let body = serde_json::json!({
                    "backend": name, "method": method, "path": path, "headers": hmap,
                    "body_len": body_len, "body_sum": body_sum,
                })
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{}",
                    body.len(),
                    if close { "Connection: close\r\n" } else { "" },
                    if head_only { "" } else { body.as_str() }
                );
                s.write_all(resp.as_bytes()).await.is_ok()
            }
        };
        if !ok || close {
            return;
        }
    }
}

/// A routes file with one HTTP route per (domain, backends) and extra TOML appended.
pub fn routes(http: &[(&str, &[SocketAddr])], extra: &str) -> String {
    let mut t = String::new();
    for (domain, backends) in http {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        t.push_str(&format!(
            "[[http]]\ndomain = \"{domain}\"\nbackends = [{}]\n\n",
            list.join(", ")
        ));
    }
    t.push_str(extra);
    t
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A network namespace with one address, joined to the test's own by a veth pair: a host a
/// test can make vanish. Removed on drop.
pub struct NetHost {
    pub ns: String,
    pub ip: String,
    link: String,
}

impl NetHost {
    /// Host `i` (0..60) of this test process: `10.197.P.4i+2`, its peer side `.4i+1`.
    pub fn new(i: u8) -> NetHost {
        let pid = std::process::id();
        let (ns, link) = (
            format!("frb{}n{i}", pid % 10000),
            format!("frb{}v{i}", pid % 10000),
        );
        let net = format!("10.197.{}", pid % 250);
        let (here, there) = (
            format!("{net}.{}", 4 * i + 1),
            format!("{net}.{}", 4 * i + 2),
        );
        let sh = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "addr", "add", &format!("{here}/30"), "dev", &link]);
        sh(&["ip", "link", "set", &link, "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{there}/30"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        NetHost {
            ns,
            ip: there,
            link,
        }
    }

    /// A listening socket on this host's address, made inside its namespace (a socket stays
    /// in the namespace it was made in, whichever thread serves it).
    #[allow(unsafe_code)]
    pub fn listen(&self) -> std::net::TcpListener {
        let (ns, ip) = (self.ns.clone(), self.ip.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns on this short-lived thread only, with a valid namespace fd.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind((ip.as_str(), 0)).expect("bind in the namespace")
        })
        .join()
        .expect("listen thread")
    }

    /// The host vanishes: everything sent to it is dropped without an answer (nftables in
    /// its namespace), as when a machine loses power or its network.
    pub fn blackhole(&self) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"table inet blackhole { chain drop_all { type filter hook input priority -300; policy drop; }; }\n")?;
                c.wait_with_output()
            })
            .expect("nft");
        assert!(out.status.success(), "nft blackhole failed");
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
    }
}
