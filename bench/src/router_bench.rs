//! The router beside nginx and HAProxy, same upstream, same run.
//!
//! Every proxy runs pinned to core 0 doing the same work (Host routing, keep-alive to the
//! upstream, X-Forwarded-For/Proto/Port, X-Request-Start and X-Request-Id added, the same
//! certificate, TLS 1.3 with X25519); the load generator and the upstream (nginx, or a TCP
//! sink) share core 1. Systems are interleaved round by round and medians reported. The
//! deciding figure is requests per proxy CPU-second (utime+stime from /proc), since the
//! load generator's core caps raw requests/s on a 2-core machine. Latency is measured
//! separately, open-loop at a fixed rate (half the slowest proxy's peak), with h2load's
//! per-request log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Router vs nginx vs HAProxy, one core each, same run")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Interleaved rounds per case (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Cases to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Directory with flynn-host.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Internal: run the TCP sink on this address.
    #[arg(long, hide = true)]
    sink: Option<SocketAddr>,
    /// Internal: run the floor forwarder on this address.
    #[arg(long, hide = true)]
    floor: Option<SocketAddr>,
}

const HOST: &str = "bench.test";
const UPSTREAM: u16 = 19100;
const SINK: u16 = 19200;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    Direct,
    /// The router on its io_uring backend (what `--io auto` picks where io_uring works).
    Router,
    /// The router on its epoll backend.
    RouterEpoll,
    /// The least a proxy can do (see [`floor`]): the router's own cost is its gap to this.
    Floor,
    Nginx,
    /// nginx as a new user leaves it: default keepalive settings, no upstream keepalive.
    NginxDefault,
    Haproxy,
}

/// Column order of the table.
const COLUMNS: [System; 7] = [
    System::Router,
    System::RouterEpoll,
    System::Floor,
    System::Nginx,
    System::NginxDefault,
    System::Haproxy,
    System::Direct,
];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Router => "router_uring",
            System::RouterEpoll => "router_epoll",
            System::Floor => "floor",
            System::Nginx => "nginx",
            System::NginxDefault => "nginx_default",
            System::Haproxy => "haproxy",
        }
    }
    fn http(self) -> u16 {
        match self {
            System::Direct => UPSTREAM,
            System::Router => 18080,
            System::Nginx => 18081,
            System::Haproxy => 18082,
            System::Floor => 18083,
            System::NginxDefault => 18084,
            System::RouterEpoll => 18085,
        }
    }
    fn https(self) -> u16 {
        self.http() + 363 // 18443, 18444, 18445, .., 18448
    }
    fn tcp(self) -> u16 {
        match self {
            System::Direct => SINK,
            s => s.http() + 220, // 18300, 18301, 18302, .., 18305
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Case {
    Http1Keepalive0,
    Http1Keepalive0Conns512,
    Http1Keepalive1k,
    Http1Body64k,
    Http1Body1m,
    Http1NewConnection,
    HttpsKeepalive,
    TlsHandshakes,
    H2Tls,
    TcpThroughput,
}

impl Case {
    fn all() -> [Case; 10] {
        [
            Case::Http1Keepalive0,
            Case::Http1Keepalive0Conns512,
            Case::Http1Keepalive1k,
            Case::Http1Body64k,
            Case::Http1Body1m,
            Case::Http1NewConnection,
            Case::HttpsKeepalive,
            Case::TlsHandshakes,
            Case::H2Tls,
            Case::TcpThroughput,
        ]
    }
    fn name(self) -> &'static str {
        match self {
            Case::Http1Keepalive0 => "http1_keepalive_0b",
            Case::Http1Keepalive0Conns512 => "http1_keepalive_0b_512c",
            Case::Http1Keepalive1k => "http1_keepalive_1k",
            Case::Http1Body64k => "http1_body_64k",
            Case::Http1Body1m => "http1_body_1m",
            Case::Http1NewConnection => "http1_new_connection",
            Case::HttpsKeepalive => "https_keepalive_0b",
            Case::TlsHandshakes => "tls_handshakes",
            Case::H2Tls => "h2_tls_0b",
            Case::TcpThroughput => "tcp_throughput",
        }
    }
    fn systems(self) -> Vec<System> {
        let proxies = vec![
            System::Router,
            System::RouterEpoll,
            System::Nginx,
            System::Haproxy,
        ];
        match self {
            // Keep-alive HTTP/1.1: every column, the floor and nginx as installed included.
            Case::Http1Keepalive0 | Case::Http1Keepalive0Conns512 | Case::Http1Keepalive1k => vec![
                System::Direct,
                System::Router,
                System::RouterEpoll,
                System::Floor,
                System::Nginx,
                System::NginxDefault,
                System::Haproxy,
            ],
            Case::Http1NewConnection
            | Case::TcpThroughput
            | Case::Http1Body64k
            | Case::Http1Body1m => {
                let mut v = vec![System::Direct];
                v.extend(proxies);
                v
            }
            _ => proxies,
        }
    }
    /// Client connections of the load.
    fn connections(self) -> u32 {
        match self {
            Case::Http1Keepalive0Conns512 => 512,
            // Large bodies: fewer, busier connections (as downloads are).
            Case::Http1Body64k | Case::Http1Body1m => 16,
            _ => 64,
        }
    }
    /// Requests (or bytes, for TCP) per second are the unit.
    fn unit(self) -> &'static str {
        match self {
            Case::TcpThroughput => "MB",
            _ => "req",
        }
    }
}

/// One measurement: work done, seconds, proxy CPU seconds.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    work: f64,
    seconds: f64,
    cpu: f64,
}

struct Procs {
    children: Vec<Child>,
    pids: BTreeMap<System, Vec<u32>>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers listening.
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.sink {
        return sink(addr);
    }
    if let Some(addr) = args.floor {
        return floor(addr, SocketAddr::from(([127, 0, 0, 1], UPSTREAM)));
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    certificate(d)?;
    let procs = start_all(&args, d)?;
    let cases: Vec<Case> = Case::all()
        .into_iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| n == c.name()))
        .collect();
    let mut table = Vec::new();
    for case in cases {
        let systems = case.systems();
        // Warm up each system once, then interleave rounds.
        for s in &systems {
            measure(case, *s, 1, &procs)?;
        }
        let mut samples: BTreeMap<System, Vec<Sample>> = BTreeMap::new();
        for _ in 0..args.rounds {
            for s in &systems {
                samples
                    .entry(*s)
                    .or_default()
                    .push(measure(case, *s, args.seconds, &procs)?);
            }
        }
        let mut fig: BTreeMap<System, (f64, f64)> = BTreeMap::new(); // (per second, per cpu second)
        for (s, v) in &samples {
            let rate = median(v.iter().map(|x| x.work / x.seconds).collect());
            let per_cpu = median(
                v.iter()
                    .filter(|x| x.cpu > 0.0)
                    .map(|x| x.work / x.cpu)
                    .collect(),
            );
            fig.insert(*s, (rate, per_cpu));
        }
        // Latency at half the slowest proxy's peak, open loop.
        let mut lat: BTreeMap<System, (f64, f64)> = BTreeMap::new();
        if matches!(
            case,
            Case::Http1Keepalive0
                | Case::Http1Keepalive0Conns512
                | Case::Http1Keepalive1k
                | Case::HttpsKeepalive
                | Case::H2Tls
        ) {
            let slowest = systems
                .iter()
                .filter(|s| **s != System::Direct)
                .map(|s| fig[s].0)
                .fold(f64::MAX, f64::min);
            let rate = (slowest * 0.5).max(100.0);
            for _ in 0..3 {
                for s in systems.iter().filter(|s| **s != System::Direct) {
                    let (p50, p99) = latency(case, *s, rate, args.seconds, d)?;
                    let e = lat.entry(*s).or_insert((0.0, 0.0));
                    // Keep per-round values; medians below.
                    e.0 += p50;
                    e.1 += p99;
                }
            }
            for v in lat.values_mut() {
                v.0 /= 3.0;
                v.1 /= 3.0;
            }
            lat.insert(System::Direct, (rate, 0.0)); // records the rate used
        }
        let mut json = serde_json::json!({ "case": case.name(), "unit": case.unit() });
        for (s, (rate, per_cpu)) in &fig {
            json[s.name()] = serde_json::json!({
                "per_second": round(*rate), "per_cpu_second": round(*per_cpu),
            });
            if let Some((p50, p99)) = lat.get(s).filter(|_| *s != System::Direct) {
                json[s.name()]["latency_ms"] =
                    serde_json::json!({ "p50": round3(*p50), "p99": round3(*p99) });
            }
        }
        if let Some((rate, _)) = lat.get(&System::Direct) {
            json["latency_rate_per_second"] = serde_json::json!(round(*rate));
        }
        let r = fig[&System::Router];
        for peer in [System::Nginx, System::NginxDefault, System::Haproxy] {
            let Some(p) = fig.get(&peer) else { continue };
            json["ratios"][format!("vs_{}", peer.name())] = serde_json::json!({
                "per_second": round3(r.0 / p.0), "per_cpu_second": round3(r.1 / p.1),
            });
        }
        // The io_uring backend against the epoll one, same router otherwise.
        if let Some(e) = fig.get(&System::RouterEpoll) {
            json["ratios"]["uring_vs_epoll"] = serde_json::json!({
                "per_second": round3(r.0 / e.0), "per_cpu_second": round3(r.1 / e.1),
            });
        }
        // The router's CPU per request over the floor's: 1.0 would be no cost of its own.
        if let Some(f) = fig.get(&System::Floor) {
            json["ratios"]["router_cpu_per_request_vs_floor"] =
                serde_json::json!(round3(f.1 / r.1));
        }
        println!("{json}");
        table.push((case, fig, lat));
    }
    println!();
    let mut head = "| case | unit |".to_string();
    for s in COLUMNS {
        head += &format!(" {} /s | {} /cpu-s |", s.name(), s.name());
    }
    head += " router vs nginx (cpu) | vs nginx_default | vs haproxy | uring vs epoll (cpu) | router cpu/req vs floor | p99 ms router / nginx / haproxy |";
    println!("{head}");
    println!("{}", "|---".repeat(2 + 2 * COLUMNS.len() + 6) + "|");
    for (case, fig, lat) in &table {
        let mut row = format!("| {} | {} |", case.name(), case.unit());
        for s in COLUMNS {
            match fig.get(&s) {
                Some((rate, _)) if s == System::Direct => row += &format!(" {rate:.0} | - |"),
                Some((rate, cpu)) => row += &format!(" {rate:.0} | {cpu:.0} |"),
                None => row += " - | - |",
            }
        }
        let r = fig[&System::Router].1;
        let vs = |s: System| {
            fig.get(&s)
                .map_or("-".into(), |p| format!("{:.2}", r / p.1))
        };
        let floor = fig
            .get(&System::Floor)
            .map_or("-".into(), |f| format!("{:.2}", f.1 / r));
        let p99 = |s: System| lat.get(&s).map_or("-".into(), |l| format!("{:.2}", l.1));
        row += &format!(
            " {} | {} | {} | {} | {} | {} / {} / {} |",
            vs(System::Nginx),
            vs(System::NginxDefault),
            vs(System::Haproxy),
            vs(System::RouterEpoll),
            floor,
            p99(System::Router),
            p99(System::Nginx),
            p99(System::Haproxy),
        );
        println!("{row}");
    }
    drop(procs);
    Ok(())
}

fn round(v: f64) -> f64 {
    v.round()
}
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn certificate(d: &Path) -> anyhow::Result<()> {
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .args([
            "-days",
            "2",
            "-subj",
            "/CN=bench.test",
            "-addext",
            "subjectAltName=DNS:bench.test",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl")?
        .success();
    if !ok {
        bail!("openssl could not make the certificate");
    }
    std::fs::write(
        d.join("both.pem"),
        std::fs::read_to_string(d.join("cert.pem"))? + &std::fs::read_to_string(d.join("key.pem"))?,
    )?;
    Ok(())
}

fn spawn_pinned(core: &str, cmd: &str, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new("taskset")
        .args(["-c", core, cmd])
        .args(args)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {cmd}"))
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Every process of a system (nginx: master and worker): the child and its children.
fn pids_of(child: &Child) -> Vec<u32> {
    let parent = child.id();
    let mut pids = vec![parent];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

fn start_all(args: &Args, d: &Path) -> anyhow::Result<Procs> {
    let one_k = "x".repeat(1024);
    let p = |f: &str| d.join(f).display().to_string();
    let upstream = format!(
        "worker_processes 1; daemon off; pid {pid}; error_log {err};\n\
         events {{ worker_connections 8192; }}\n\
         http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;\n\
           server {{ listen 127.0.0.1:{UPSTREAM} reuseport backlog=4096;\n\
             location = /0 {{ return 200 \"\"; }}\n\
             location = /1k {{ return 200 \"{one_k}\"; }}\n\
             location = /64k {{ sendfile on; alias {k64}; }}\n\
             location = /1m {{ sendfile on; alias {one_m}; }} }} }}\n",
        pid = p("up.pid"),
        err = p("up.err"),
        one_m = p("1m.bin"),
        k64 = p("64k.bin"),
    );
    std::fs::write(d.join("64k.bin"), vec![b'k'; 64 << 10])?;
    std::fs::write(d.join("1m.bin"), vec![b'm'; 1 << 20])?;
    std::fs::write(d.join("upstream.conf"), upstream)?;
    let headers = "proxy_set_header Host $host;\n\
        proxy_set_header Connection \"\";\n\
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
        proxy_set_header X-Forwarded-Proto $scheme;\n\
        proxy_set_header X-Forwarded-Port $server_port;\n\
        proxy_set_header X-Request-Start $msec;\n\
        proxy_set_header X-Request-Id $request_id;\n\
        proxy_http_version 1.1; proxy_buffering off;";
    let stream_module = [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .into_iter()
    .find(|m| Path::new(m).exists())
    .map_or(String::new(), |m| format!("load_module {m};\n"));
    let nginx = format!(
        "{stream_module}worker_processes 1; daemon off; pid {pid}; error_log {err};\n\
         events {{ worker_connections 8192; }}\n\
         http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;\n\
           upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 1024; }}\n\
           ssl_protocols TLSv1.2 TLSv1.3; ssl_ecdh_curve X25519; ssl_session_cache shared:S:10m;\n\
           server {{ listen 127.0.0.1:{h} reuseport backlog=4096; listen 127.0.0.1:{s} ssl http2 reuseport backlog=4096;\n\
             server_name {HOST}; ssl_certificate {cert}; ssl_certificate_key {key};\n\
             location / {{ proxy_pass http://up; {headers} }} }} }}\n\
         stream {{ server {{ listen 127.0.0.1:{t}; proxy_pass 127.0.0.1:{SINK}; proxy_half_close on; }} }}\n",
        pid = p("nginx.pid"),
        err = p("nginx.err"),
        h = System::Nginx.http(),
        s = System::Nginx.https(),
        t = System::Nginx.tcp(),
        cert = p("cert.pem"),
        key = p("key.pem"),
    );
    std::fs::write(d.join("nginx.conf"), nginx)?;
    // As installed: default keepalive_requests (1000) and keepalive_timeout (75s), and no
    // upstream keepalive (nginx's default: a new HTTP/1.0 connection per request). Only
    // worker_connections is raised, or the 512-connection case would refuse clients.
    let nginx_default = format!(
        "worker_processes 1; daemon off; pid {pid}; error_log {err};\n\
         events {{ worker_connections 8192; }}\n\
         http {{ access_log off;\n\
           server {{ listen 127.0.0.1:{h}; server_name {HOST};\n\
             location / {{ proxy_pass http://127.0.0.1:{UPSTREAM};\n\
               proxy_set_header Host $host;\n\
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
               proxy_set_header X-Forwarded-Proto $scheme;\n\
               proxy_set_header X-Forwarded-Port $server_port;\n\
               proxy_set_header X-Request-Start $msec;\n\
               proxy_set_header X-Request-Id $request_id; }} }} }}\n",
        pid = p("nginx-default.pid"),
        err = p("nginx-default.err"),
        h = System::NginxDefault.http(),
    );
    std::fs::write(d.join("nginx-default.conf"), nginx_default)?;
    let haproxy = format!(
        "global\n  nbthread 1\n  maxconn 8000\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{h}\n  bind 127.0.0.1:{s} ssl crt {both} alpn h2,http/1.1 curves X25519\n\
           option forwardfor\n  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n\
           http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}\n\
           http-request set-header X-Forwarded-Port %[dst_port]\n\
           http-request set-header X-Request-Start %[date(0,ms)]\n\
           unique-id-format %{{+X}}o%ci%cp%fp%Ts%rt\n  unique-id-header X-Request-Id\n\
           acl bench hdr(host) -i {HOST}\n  use_backend up if bench\n\
         backend up\n  server u 127.0.0.1:{UPSTREAM}\n\
         listen tcp\n  mode tcp\n  bind 127.0.0.1:{t}\n  server s 127.0.0.1:{SINK}\n",
        h = System::Haproxy.http(),
        s = System::Haproxy.https(),
        t = System::Haproxy.tcp(),
        both = p("both.pem"),
    );
    std::fs::write(d.join("haproxy.cfg"), haproxy)?;
    for r in [System::Router, System::RouterEpoll] {
        std::fs::write(
            d.join(format!("routes-{}.toml", r.name())),
            format!(
                "[[http]]\ndomain = \"{HOST}\"\nbackends = [\"127.0.0.1:{UPSTREAM}\"]\n\n[[tcp]]\nport = {}\nbackends = [\"127.0.0.1:{SINK}\"]\n",
                r.tcp()
            ),
        )?;
    }
    let mut procs = Procs {
        children: Vec::new(),
        pids: BTreeMap::new(),
    };
    let ports = [
        UPSTREAM,
        SINK,
        System::Floor.http(),
        System::NginxDefault.http(),
    ]
    .into_iter()
    .chain(
        [
            System::Router,
            System::RouterEpoll,
            System::Nginx,
            System::Haproxy,
        ]
        .into_iter()
        .flat_map(|s| [s.http(), s.https(), s.tcp()]),
    );
    for port in ports {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("port {port} is in use already: stop what listens there first");
        }
    }
    let me = std::env::current_exe()?;
    procs.children.push(spawn_pinned(
        "1",
        "nginx",
        &["-c", &p("upstream.conf")],
        &d.join("upstream.log"),
    )?);
    procs.children.push(spawn_pinned(
        "1",
        me.to_str().unwrap(),
        &["--sink", &format!("127.0.0.1:{SINK}")],
        &d.join("sink.log"),
    )?);
    let router_bin = args.bin_dir.join("flynn-host");
    let start_router = |r: System, io: &str| {
        spawn_pinned(
            "0",
            router_bin.to_str().unwrap(),
            &[
                "router",
                "--routes",
                &p(&format!("routes-{}.toml", r.name())),
                "--http",
                &format!("127.0.0.1:{}", r.http()),
                "--https",
                &format!("127.0.0.1:{}", r.https()),
                "--tls-cert",
                &p("cert.pem"),
                "--tls-key",
                &p("key.pem"),
                "--tcp-ip",
                "127.0.0.1",
                "--workers",
                "1",
                "--no-pin",
                "--io",
                io,
            ],
            &d.join(format!("{}.log", r.name())),
        )
    };
    let router = start_router(System::Router, "uring")?;
    let router_epoll = start_router(System::RouterEpoll, "epoll")?;
    let nginx = spawn_pinned(
        "0",
        "nginx",
        &["-c", &p("nginx.conf")],
        &d.join("nginx.log"),
    )?;
    let haproxy = spawn_pinned(
        "0",
        "haproxy",
        &["-f", &p("haproxy.cfg")],
        &d.join("haproxy.log"),
    )?;
    let nginx_default = spawn_pinned(
        "0",
        "nginx",
        &["-c", &p("nginx-default.conf")],
        &d.join("nginx_default.log"),
    )?;
    let floor = spawn_pinned(
        "0",
        me.to_str().unwrap(),
        &["--floor", &format!("127.0.0.1:{}", System::Floor.http())],
        &d.join("floor.log"),
    )?;
    for port in [UPSTREAM, SINK] {
        wait_port(port)?;
    }
    for s in [
        System::Router,
        System::RouterEpoll,
        System::Nginx,
        System::Haproxy,
    ] {
        wait_port(s.http()).with_context(|| {
            let log =
                std::fs::read_to_string(d.join(format!("{}.log", s.name()))).unwrap_or_default();
            format!("{} did not start: {log}", s.name())
        })?;
        wait_port(s.https())?;
    }
    for s in [System::Floor, System::NginxDefault] {
        wait_port(s.http()).with_context(|| format!("{} did not start", s.name()))?;
    }
    wait_port(System::Router.tcp())?;
    wait_port(System::RouterEpoll.tcp())?;
    std::thread::sleep(Duration::from_millis(300));
    procs.pids.insert(System::Router, pids_of(&router));
    procs
        .pids
        .insert(System::RouterEpoll, pids_of(&router_epoll));
    procs.pids.insert(System::Nginx, pids_of(&nginx));
    procs.pids.insert(System::Haproxy, pids_of(&haproxy));
    procs
        .pids
        .insert(System::NginxDefault, pids_of(&nginx_default));
    procs.pids.insert(System::Floor, pids_of(&floor));
    procs.pids.insert(System::Direct, vec![]);
    eprintln!("proxy processes: {:?}", procs.pids);
    procs
        .children
        .extend([router, router_epoll, nginx, haproxy, nginx_default, floor]);
    // Every system answers the bench host before anything is measured.
    for s in COLUMNS {
        let mut c = TcpStream::connect(("127.0.0.1", s.http()))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            c,
            "GET /1k HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.1 200") || !out.ends_with(&one_k) {
            bail!(
                "{} answered: {}",
                s.name(),
                out.lines().next().unwrap_or("")
            );
        }
    }
    Ok(procs)
}

/// utime + stime of every process of a system, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            // Fields after the command's closing paren; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (ut + st) / tick
        })
        .sum()
}

fn run_pinned(cmd: &str, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new("taskset")
        .args(["-c", "1", cmd])
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn measure(case: Case, s: System, seconds: u64, procs: &Procs) -> anyhow::Result<Sample> {
    let pids = &procs.pids[&s];
    let cpu0 = cpu_seconds(pids);
    let t0 = Instant::now();
    let work = match case {
        Case::TcpThroughput => {
            tcp_load(s.tcp(), seconds).with_context(|| format!("tcp load through {}", s.name()))?
                / 1e6
        }
        Case::H2Tls => {
            let out = run_pinned(
                "h2load",
                &[
                    "-t1".into(),
                    "-c16".into(),
                    "-m10".into(),
                    "-D".into(),
                    seconds.to_string(),
                    "-H".into(),
                    format!(":authority: {HOST}"),
                    format!("https://127.0.0.1:{}/0", s.https()),
                ],
            )?;
            h2load_done(&out)?
        }
        _ => {
            let (scheme, port, path) = match case {
                Case::HttpsKeepalive | Case::TlsHandshakes => ("https", s.https(), "/0"),
                Case::Http1Keepalive1k => ("http", s.http(), "/1k"),
                Case::Http1Body64k => ("http", s.http(), "/64k"),
                Case::Http1Body1m => ("http", s.http(), "/1m"),
                _ => ("http", s.http(), "/0"),
            };
            let mut a = vec![
                "-t1".to_string(),
                format!("-c{}", case.connections()),
                format!("-d{seconds}s"),
                "-H".into(),
                format!("Host: {HOST}"),
            ];
            if matches!(case, Case::Http1NewConnection | Case::TlsHandshakes) {
                a.extend(["-H".into(), "Connection: close".into()]);
            }
            a.push(format!("{scheme}://127.0.0.1:{port}{path}"));
            let out = run_pinned("wrk", &a)?;
            wrk_requests(&out).with_context(|| format!("{} {}: {out}", case.name(), s.name()))?
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pids) - cpu0;
    Ok(Sample { work, seconds, cpu })
}

fn wrk_requests(out: &str) -> anyhow::Result<f64> {
    if let Some(l) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("errors: {l}");
    }
    let line = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .context("no wrk summary")?;
    Ok(line.split_whitespace().next().context("count")?.parse()?)
}

fn h2load_done(out: &str) -> anyhow::Result<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no h2load summary")?;
    // requests: N total, N started, N done, N succeeded, N failed, ...
    let succeeded = line
        .split(',')
        .find(|p| p.contains("succeeded"))
        .and_then(|p| p.split_whitespace().next())
        .context("succeeded")?;
    Ok(succeeded.parse()?)
}

/// Open-loop latency at `rate` requests/s over 16 connections: (p50, p99) in ms.
fn latency(case: Case, s: System, rate: f64, seconds: u64, d: &Path) -> anyhow::Result<(f64, f64)> {
    let log = d.join(format!("lat-{}-{}.tsv", case.name(), s.name()));
    let _ = std::fs::remove_file(&log);
    let clients = 16.0;
    let mut a = vec![
        "-t1".to_string(),
        "-c16".into(),
        format!("--rps={}", (rate / clients).max(1.0).round()),
        "-D".into(),
        seconds.to_string(),
        format!("--log-file={}", log.display()),
        "-H".into(),
        format!(":authority: {HOST}"),
    ];
    let url = match case {
        Case::H2Tls => format!("https://127.0.0.1:{}/0", s.https()),
        Case::HttpsKeepalive => {
            a.push("--h1".into());
            format!("https://127.0.0.1:{}/0", s.https())
        }
        Case::Http1Keepalive1k => {
            a.push("--h1".into());
            format!("http://127.0.0.1:{}/1k", s.http())
        }
        _ => {
            a.push("--h1".into());
            format!("http://127.0.0.1:{}/0", s.http())
        }
    };
    a.push(url);
    run_pinned("h2load", &a)?;
    let text = std::fs::read_to_string(&log)?;
    let mut us: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.get(1) == Some(&"200"))
                .then(|| f.get(2)?.parse::<f64>().ok())
                .flatten()
        })
        .collect();
    if us.is_empty() {
        bail!("no successful requests in {}", log.display());
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)] / 1000.0;
    Ok((q(0.5), q(0.99)))
}

/// Bulk upload through a TCP port for `seconds` over 4 connections; bytes moved.
fn tcp_load(port: u16, seconds: u64) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                let buf = vec![7u8; 256 * 1024];
                let mut sent = 0u64;
                while Instant::now() < until {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                // The sink answers with the count it received once it sees EOF.
                let mut ack = String::new();
                s.read_to_string(&mut ack)?;
                let got: u64 = ack.trim().parse().context("sink count")?;
                if got != sent {
                    bail!("sink got {got} of {sent} bytes");
                }
                Ok(got)
            })
        })
        .collect();
    // The load runs in this (pinned) process: pin it to core 1 with the sink.
    let mut total = 0u64;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    Ok(total as f64)
}

/// Reads each connection to EOF and answers with the byte count.
fn sink(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    for s in l.incoming() {
        let mut s = s?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k as u64,
                }
            }
            let _ = write!(s, "{n}");
        });
    }
    Ok(())
}

/// The floor: a forwarder that does only what any HTTP/1.1 proxy must. It reads a request
/// head, writes it unchanged to its own keep-alive connection to the upstream, reads the
/// response head, and relays head and body by Content-Length. No routing, no header work,
/// no request ID, no metrics. The same runtime as the router (tokio, current thread, epoll),
/// so the router's gap to it is the router's own cost per request. Bodiless requests only
/// (the benchmark sends GETs).
fn floor(addr: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (client, _) = listener.accept().await?;
            let _ = client.set_nodelay(true);
            tokio::task::spawn_local(async move {
                let _ = floor_connection(client, upstream).await;
            });
        }
    })
}

async fn floor_connection(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up: Option<tokio::net::TcpStream> = None;
    let mut req = Vec::with_capacity(4096);
    let mut resp = Vec::with_capacity(4096);
    loop {
        let head = loop {
            if let Some(end) = head_end(&req) {
                break end;
            }
            if client.read_buf(&mut req).await? == 0 {
                return Ok(());
            }
        };
        let conn = match &mut up {
            Some(c) => c,
            None => {
                let c = tokio::net::TcpStream::connect(upstream).await?;
                c.set_nodelay(true)?;
                up.insert(c)
            }
        };
        conn.write_all(&req[..head]).await?;
        let close = wants_close(&req[..head]);
        req.drain(..head);
        resp.clear();
        let resp_head = loop {
            if let Some(end) = head_end(&resp) {
                break end;
            }
            if conn.read_buf(&mut resp).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let total = resp_head + content_length(&resp[..resp_head]);
        while resp.len() < total {
            if conn.read_buf(&mut resp).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        client.write_all(&resp[..total]).await?;
        if close {
            return Ok(());
        }
    }
}

/// `Connection: close` in a request head: the one header a forwarder cannot ignore.
fn wants_close(head: &[u8]) -> bool {
    head.split(|b| *b == b'\n').any(|line| {
        std::str::from_utf8(line).is_ok_and(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            })
        })
    })
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn content_length(head: &[u8]) -> usize {
    head.split(|b| *b == b'\n')
        .find_map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}
