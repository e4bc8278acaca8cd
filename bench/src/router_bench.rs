//! The router beside nginx and HAProxy, same upstream, same run.
//!
//! Every proxy runs pinned to core 0 doing the same work (Host routing, keep-alive to the
//! upstream, X-Forwarded-For/Proto/Port, X-Request-Start and X-Request-Id added, the same
//! certificate, TLS 1.3 with X25519); the load generator and the upstream (nginx, or a TCP
//! sink) share core 1. Systems are interleaved round by round and medians reported.
//!
//! Two kinds of figure, both per case and system, because either alone misleads:
//! - what a client sees: requests/s and the p50/p99 latency of a closed loop (wrk
//!   `--latency`, or h2load's per-request log), at the case's connections and at one
//!   connection, where a proxy's added latency is plainest (the direct path is measured
//!   the same way, so each proxy's added latency is its gap to it);
//! - efficiency: requests per proxy CPU-second (utime+stime from /proc). The load
//!   generator's core caps raw requests/s on a 2-core machine, so at 64 connections this is
//!   where proxies differ. A proxy that sleeps between requests also spends few CPU-seconds,
//!   which is why it is never read alone.

mod proc_cpu;

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
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Interleaved rounds per case (medians are reported).
    #[arg(long, default_value_t = 3)]
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
    Http1Keepalive0Conns8,
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
    fn all() -> [Case; 11] {
        [
            Case::Http1Keepalive0,
            Case::Http1Keepalive0Conns8,
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
            Case::Http1Keepalive0Conns8 => "http1_keepalive_0b_8c",
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
            Case::Http1Keepalive0
            | Case::Http1Keepalive0Conns8
            | Case::Http1Keepalive0Conns512
            | Case::Http1Keepalive1k => vec![
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
            Case::Http1Keepalive0Conns8 => 8,
            Case::Http1Keepalive0Conns512 => 512,
            // Large bodies: fewer, busier connections (as downloads are).
            Case::Http1Body64k | Case::Http1Body1m => 16,
            // Four bulk flows.
            Case::TcpThroughput => 4,
            _ => 64,
        }
    }
    /// The client connections each system is measured at: the case's own, and one (a lone
    /// client's latency), but where another case already has that one.
    fn concurrencies(self) -> Vec<u32> {
        match self {
            Case::TcpThroughput => vec![self.connections()],
            Case::Http1Keepalive0Conns8 | Case::Http1Keepalive0Conns512 => {
                vec![self.connections()]
            }
            _ => vec![self.connections(), 1],
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

/// One measurement: work done, seconds, proxy CPU seconds, and the latency the client saw
/// (ms; none for the TCP case).
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    work: f64,
    seconds: f64,
    cpu: f64,
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Medians of a system's rounds at one concurrency.
#[derive(Clone, Copy, Debug, Default)]
struct Figure {
    per_second: f64,
    per_cpu_second: f64,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Figure {
    fn of(v: &[Sample]) -> Figure {
        let opt = |f: fn(&Sample) -> Option<f64>| {
            let xs: Vec<f64> = v.iter().filter_map(f).collect();
            (!xs.is_empty()).then(|| median(xs))
        };
        Figure {
            per_second: median(v.iter().map(|x| x.work / x.seconds).collect()),
            per_cpu_second: median(
                v.iter()
                    .filter(|x| x.cpu > 0.0)
                    .map(|x| x.work / x.cpu)
                    .collect(),
            ),
            p50: opt(|x| x.p50),
            p99: opt(|x| x.p99),
        }
    }

    fn json(&self) -> serde_json::Value {
        let mut j = serde_json::json!({
            "per_second": round(self.per_second),
            "per_cpu_second": round(self.per_cpu_second),
        });
        if let (Some(p50), Some(p99)) = (self.p50, self.p99) {
            j["latency_ms"] = serde_json::json!({ "p50": round3(p50), "p99": round3(p99) });
        }
        j
    }
}

/// One case's figures: per system, per concurrency.
type Figures = BTreeMap<System, BTreeMap<u32, Figure>>;

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
    let mut table: Vec<(Case, Figures)> = Vec::new();
    for case in cases {
        let systems = case.systems();
        let mut figs: Figures = BTreeMap::new();
        for conns in case.concurrencies() {
            // Warm up each system once, then interleave rounds.
            for s in &systems {
                measure(case, *s, 1, conns, &procs, d)?;
            }
            let mut samples: BTreeMap<System, Vec<Sample>> = BTreeMap::new();
            for _ in 0..args.rounds {
                for s in &systems {
                    samples.entry(*s).or_default().push(measure(
                        case,
                        *s,
                        args.seconds,
                        conns,
                        &procs,
                        d,
                    )?);
                }
            }
            for (s, v) in &samples {
                figs.entry(*s).or_default().insert(conns, Figure::of(v));
            }
        }
        println!("{}", case_json(case, &figs));
        table.push((case, figs));
    }
    println!();
    print_throughput_table(&table);
    println!();
    print_latency_table(&table);
    drop(procs);
    Ok(())
}

/// One JSON line per case: every system's figures, and the router's ratios to its peers.
fn case_json(case: Case, figs: &Figures) -> serde_json::Value {
    let n = case.connections();
    let mut json = serde_json::json!({
        "case": case.name(), "unit": case.unit(), "connections": n,
    });
    for (s, by_conns) in figs {
        let mut j = by_conns.get(&n).map_or(serde_json::json!({}), Figure::json);
        if let Some(one) = by_conns.get(&1).filter(|_| n != 1) {
            j["one_connection"] = one.json();
        }
        json[s.name()] = j;
    }
    let at = |s: System, c: u32| figs.get(&s).and_then(|m| m.get(&c)).copied();
    let Some(r) = at(System::Router, n) else {
        return json;
    };
    for peer in [System::Nginx, System::NginxDefault, System::Haproxy] {
        let Some(p) = at(peer, n) else { continue };
        json["ratios"][format!("vs_{}", peer.name())] = serde_json::json!({
            "per_second": round3(r.per_second / p.per_second),
            "per_cpu_second": round3(r.per_cpu_second / p.per_cpu_second),
        });
    }
    // The io_uring backend against the epoll one, same router otherwise.
    if let Some(e) = at(System::RouterEpoll, n) {
        json["ratios"]["uring_vs_epoll"] = serde_json::json!({
            "per_second": round3(r.per_second / e.per_second),
            "per_cpu_second": round3(r.per_cpu_second / e.per_cpu_second),
        });
    }
    // The router's CPU per request over the floor's: 1.0 would be no cost of its own.
    if let Some(f) = at(System::Floor, n) {
        json["ratios"]["router_cpu_per_request_vs_floor"] =
            serde_json::json!(round3(f.per_cpu_second / r.per_cpu_second));
    }
    // What each proxy adds to a lone client's request: its p50 over the direct path's.
    if let Some(direct) = at(System::Direct, 1).and_then(|f| f.p50) {
        for s in COLUMNS.iter().filter(|s| **s != System::Direct) {
            if let Some(p50) = at(*s, 1).and_then(|f| f.p50) {
                json["added_p50_ms_one_connection"][s.name()] =
                    serde_json::json!(round3(p50 - direct));
            }
        }
    }
    json
}

fn print_throughput_table(table: &[(Case, Figures)]) {
    let mut head = "| case | conns | unit |".to_string();
    for s in COLUMNS {
        head += &format!(" {} /s | {} /cpu-s |", s.name(), s.name());
    }
    head += " router vs nginx (cpu) | vs nginx_default | vs haproxy | uring vs epoll (/s, cpu) | router cpu/req vs floor |";
    println!("{head}");
    println!("{}", "|---".repeat(3 + 2 * COLUMNS.len() + 5) + "|");
    for (case, figs) in table {
        let n = case.connections();
        let at = |s: System| figs.get(&s).and_then(|m| m.get(&n)).copied();
        let mut row = format!("| {} | {n} | {} |", case.name(), case.unit());
        for s in COLUMNS {
            match at(s) {
                Some(f) if s == System::Direct => row += &format!(" {:.0} | - |", f.per_second),
                Some(f) => row += &format!(" {:.0} | {:.0} |", f.per_second, f.per_cpu_second),
                None => row += " - | - |",
            }
        }
        let Some(r) = at(System::Router) else {
            println!("{row}");
            continue;
        };
        let vs = |s: System| {
            at(s).map_or("-".into(), |p| {
                format!("{:.2}", r.per_cpu_second / p.per_cpu_second)
            })
        };
        let epoll = at(System::RouterEpoll).map_or("-".into(), |e| {
            format!(
                "{:.2}, {:.2}",
                r.per_second / e.per_second,
                r.per_cpu_second / e.per_cpu_second
            )
        });
        let floor = at(System::Floor).map_or("-".into(), |f| {
            format!("{:.2}", f.per_cpu_second / r.per_cpu_second)
        });
        row += &format!(
            " {} | {} | {} | {epoll} | {floor} |",
            vs(System::Nginx),
            vs(System::NginxDefault),
            vs(System::Haproxy),
        );
        println!("{row}");
    }
}

/// Requests/s and p50 / p99 (ms) per system, at one connection and at the case's own.
fn print_latency_table(table: &[(Case, Figures)]) {
    let systems = [
        System::Router,
        System::RouterEpoll,
        System::Nginx,
        System::Haproxy,
        System::Floor,
        System::Direct,
    ];
    let mut head = "| case | conns |".to_string();
    for s in systems {
        head += &format!(" {} req/s, p50 / p99 ms |", s.name());
    }
    println!("{head}");
    println!("{}", "|---".repeat(2 + systems.len()) + "|");
    for (case, figs) in table {
        let mut conns: Vec<u32> = figs.values().flat_map(|m| m.keys().copied()).collect();
        conns.sort();
        conns.dedup();
        for c in conns {
            let mut row = format!("| {} | {c} |", case.name());
            for s in systems {
                row += &match figs.get(&s).and_then(|m| m.get(&c)) {
                    Some(Figure {
                        per_second,
                        p50: Some(p50),
                        p99: Some(p99),
                        ..
                    }) => format!(" {per_second:.0}, {p50:.3} / {p99:.3} |"),
                    Some(f) => format!(" {:.0} |", f.per_second),
                    None => " - |".into(),
                };
            }
            println!("{row}");
        }
    }
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

fn measure(
    case: Case,
    s: System,
    seconds: u64,
    conns: u32,
    procs: &Procs,
    d: &Path,
) -> anyhow::Result<Sample> {
    let pids = &procs.pids[&s];
    let cpu0 = proc_cpu::cpu_seconds(pids);
    let t0 = Instant::now();
    let (work, p50, p99) = match case {
        Case::TcpThroughput => {
            let bytes = tcp_load(s.tcp(), seconds, conns)
                .with_context(|| format!("tcp load through {}", s.name()))?;
            (bytes / 1e6, None, None)
        }
        Case::H2Tls => {
            let log = d.join(format!("h2-{}-{conns}.tsv", s.name()));
            let _ = std::fs::remove_file(&log);
            // Ten streams in flight per connection, but a lone client sends one at a time.
            let streams = if conns == 1 { 1 } else { 10 };
            let out = run_pinned(
                "h2load",
                &[
                    "-t1".into(),
                    format!("-c{conns}"),
                    format!("-m{streams}"),
                    "-D".into(),
                    seconds.to_string(),
                    format!("--log-file={}", log.display()),
                    "-H".into(),
                    format!(":authority: {HOST}"),
                    format!("https://127.0.0.1:{}/0", s.https()),
                ],
            )?;
            let (p50, p99) = log_percentiles(&log)?;
            (h2load_done(&out)?, Some(p50), Some(p99))
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
                format!("-c{conns}"),
                format!("-d{seconds}s"),
                "--latency".into(),
                "-H".into(),
                format!("Host: {HOST}"),
            ];
            if matches!(case, Case::Http1NewConnection | Case::TlsHandshakes) {
                a.extend(["-H".into(), "Connection: close".into()]);
            }
            a.push(format!("{scheme}://127.0.0.1:{port}{path}"));
            let out = run_pinned("wrk", &a)?;
            let what = || format!("{} {} at {conns}: {out}", case.name(), s.name());
            let work = wrk_requests(&out).with_context(what)?;
            let p50 = wrk_percentile(&out, "50%").with_context(what)?;
            let p99 = wrk_percentile(&out, "99%").with_context(what)?;
            (work, Some(p50), Some(p99))
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu::cpu_seconds(pids) - cpu0;
    Ok(Sample {
        work,
        seconds,
        cpu,
        p50,
        p99,
    })
}

/// A percentile from wrk's `--latency` distribution (`    99%    1.23ms`), in ms.
fn wrk_percentile(out: &str, which: &str) -> anyhow::Result<f64> {
    let v = out
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(which))
        .with_context(|| format!("no {which} line in wrk's latency distribution"))?
        .trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("wrk latency {v:?} has no unit");
    };
    Ok(num.parse::<f64>()? * scale)
}

/// p50 and p99 (ms) of the successful requests in an h2load `--log-file`.
fn log_percentiles(log: &Path) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(log)?;
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

/// Bulk upload through a TCP port for `seconds` over `conns` connections; bytes moved.
fn tcp_load(port: u16, seconds: u64, conns: u32) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..conns)
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
