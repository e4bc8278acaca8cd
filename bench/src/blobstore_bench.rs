//! Blobstore benchmark: GET and PUT throughput and p99 for 4 KiB, 1 MiB and 256 MiB blobs,
//! with 1 and 32 clients, on the embedded default backend of a 3-host cluster (a PUT is
//! acknowledged once stored on 2 hosts), beside nginx serving and accepting (WebDAV PUT)
//! the same sizes from local disk, in the same run.
//!
//! Every case is bounded in requests (and so in time). The 256 MiB PUTs use 1 and 4
//! clients, not 32: three hosts and nginx share one disk here, and 32 concurrent 256 MiB
//! uploads would need 16 GiB of it at once.
//! Output: JSON lines, then a markdown table.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;

#[path = "local_cluster.rs"]
mod local_cluster;
mod proc_cpu;
use local_cluster::{LocalCluster, BLOBSTORE_PORTS};

#[derive(Parser)]
#[command(about = "blobstore GET/PUT vs nginx (WebDAV) from local disk, same run")]
struct Opts {
    /// Scale the request counts (1.0: the default counts).
    #[arg(long, default_value_t = 1.0)]
    load: f64,
    /// Directory with flynn, flynn-host (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Times each case runs, the blobstore and nginx taking turns; the median is reported
    /// (nginx alone moves by up to 2x between runs here).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only these operations: get, put, or all.
    #[arg(long, default_value = "all")]
    only: String,
}

const NGINX_PORT: u16 = 18990;

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Get,
    Put,
}

struct Case {
    op: Op,
    size: usize,
    clients: usize,
    requests: usize,
}

struct Result {
    bytes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The servers' CPU time per GB moved, in seconds.
    cpu_s_per_gb: f64,
}

/// The round with the median throughput (its p99 with it).
fn median(mut rounds: Vec<Result>) -> Result {
    rounds.sort_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s));
    rounds.swap_remove(rounds.len() / 2)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `case.requests` requests from `case.clients` clients against `base` (GETs of
/// `/bench/SIZE`, PUTs to `/bench/put-SIZE-N`).
async fn measure(
    http: &reqwest::Client,
    base: &str,
    servers: &[u32],
    case: &Case,
    body: &Bytes,
) -> anyhow::Result<Result> {
    let cpu_before = proc_cpu::cpu_seconds(servers);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..case.clients {
        let (http, base, next, body) = (http.clone(), base.to_string(), next.clone(), body.clone());
        let (op, size, total) = (case.op, case.size, case.requests);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t0 = Instant::now();
                match op {
                    Op::Get => {
                        let mut r = http.get(format!("{base}/bench/{size}")).send().await?;
                        if !r.status().is_success() {
                            bail!("GET {}: {}", size, r.status());
                        }
                        let mut got = 0;
                        while let Some(c) = r.chunk().await? {
                            got += c.len();
                        }
                        if got != size {
                            bail!("GET {size}: {got} bytes");
                        }
                    }
                    Op::Put => {
                        let r = http
                            .put(format!("{base}/bench/put-{size}-{}", n % 64))
                            .body(body.clone())
                            .send()
                            .await?;
                        if !r.status().is_success() {
                            bail!("PUT {size}: {}", r.status());
                        }
                        r.bytes().await?;
                    }
                }
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = proc_cpu::cpu_seconds(servers) - cpu_before;
    all.sort_by(f64::total_cmp);
    let bytes = (case.requests * case.size) as f64;
    Ok(Result {
        bytes_per_s: bytes / secs,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        cpu_s_per_gb: cpu / (bytes / 1e9),
    })
}

fn human(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} GB/s", bps / 1e9)
    } else {
        format!("{:.1} MB/s", bps / 1e6)
    }
}

fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

/// nginx as a WebDAV file server on one directory: GET serves files, PUT writes them. Its
/// workers run as root, like the daemons, to write in the benchmark's private temp dir.
fn start_nginx(dir: &std::path::Path) -> anyhow::Result<local_cluster::Procs> {
    let root = dir.join("nginx-root");
    std::fs::create_dir_all(root.join("bench"))?;
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let p = |f: &str| dir.join(f).display().to_string();
    let conf = format!(
        "user root;\nworker_processes auto;\ndaemon off;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  client_body_temp_path {tmp};\n  client_max_body_size 0;\n  server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    root {root};\n    dav_methods PUT DELETE;\n    create_full_put_path on;\n  }}\n}}\n",
        pid = p("nginx.pid"),
        err = p("nginx.err"),
        tmp = p("nginx-tmp"),
        root = root.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("nginx")
        .args(["-c", &p("nginx.conf"), "-e", &p("nginx.err")])
        .stdin(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(local_cluster::Procs(vec![child]))
}

/// `pid` and its children (nginx's workers).
fn with_children(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let bin_dir = local_cluster::bin_dir(&opts.bin_dir)?;
    let cluster = LocalCluster::start(&bin_dir, false).await?;
    let result = bench(&opts, &cluster).await;
    if result.is_err() {
        cluster.print_log_tails();
    }
    result
}

async fn bench(opts: &Opts, cluster: &LocalCluster) -> anyhow::Result<()> {
    let nginx_procs = start_nginx(cluster.dir.path())?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    // Readers keep connections of their own, as hosts pulling layers do: the blobstore
    // sends local objects with sendfile on connections that start with a GET, and one that
    // starts with a PUT stays with its API (see ARCHITECTURE.md). nginx sees the same.
    let readers = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let blobstore = format!("http://127.0.0.1:{}", BLOBSTORE_PORTS[0]);
    let nginx = format!("http://127.0.0.1:{NGINX_PORT}");
    // nginx answers once up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(format!("{nginx}/")).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The servers whose CPU time is counted: the three daemons; nginx's master and workers.
    let daemons = cluster.pids();
    let nginx_pids = with_children(nginx_procs.0[0].id());
    let count = |n: usize| ((n as f64 * opts.load).ceil() as usize).max(1);
    let mut cases = Vec::new();
    for (size, get_n, put_n) in [
        (4 << 10, 4000, 2000),
        (1 << 20, 600, 300),
        (256 << 20, 32, 8),
    ] {
        for clients in [1usize, 32] {
            let big = size == 256 << 20;
            cases.push(Case {
                op: Op::Get,
                size,
                clients,
                requests: count(if big && clients == 1 { 4 } else { get_n }),
            });
            let put_clients = if big && clients == 32 { 4 } else { clients };
            cases.push(Case {
                op: Op::Put,
                size,
                clients: put_clients,
                requests: count(if big { put_clients * 2 } else { put_n }),
            });
        }
    }
    // The blobs GETs read, in both.
    for size in [4 << 10, 1 << 20, 256 << 20] {
        let body = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        for base in [&blobstore, &nginx] {
            let r = http
                .put(format!("{base}/bench/{size}"))
                .body(body.clone())
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("seeding {base}: {}", r.status());
            }
        }
    }
    let wanted = |op: Op| match opts.only.as_str() {
        "get" => op == Op::Get,
        "put" => op == Op::Put,
        _ => true,
    };
    anyhow::ensure!(opts.rounds > 0, "--rounds must be at least 1");
    let mut rows = Vec::new();
    for case in cases.iter().filter(|c| wanted(c.op)) {
        let body = Bytes::from((0..case.size).map(|i| (i % 241) as u8).collect::<Vec<u8>>());
        let (mut bs, mut ns) = (Vec::new(), Vec::new());
        for _ in 0..opts.rounds {
            let client = if case.op == Op::Get { &readers } else { &http };
            bs.push(measure(client, &blobstore, &daemons, case, &body).await?);
            ns.push(measure(client, &nginx, &nginx_pids, case, &body).await?);
        }
        let (b, n) = (median(bs), median(ns));
        let op = if case.op == Op::Get { "GET" } else { "PUT" };
        println!(
            "{}",
            serde_json::json!({"case": format!("{op} {}", size_name(case.size)), "clients": case.clients,
                "requests": case.requests, "blobstore_bytes_per_s": b.bytes_per_s, "nginx_bytes_per_s": n.bytes_per_s,
                "ratio": b.bytes_per_s / n.bytes_per_s, "blobstore_p50_ms": b.p50_ms, "nginx_p50_ms": n.p50_ms,
                "blobstore_p99_ms": b.p99_ms, "nginx_p99_ms": n.p99_ms,
                "blobstore_cpu_s_per_gb": b.cpu_s_per_gb, "nginx_cpu_s_per_gb": n.cpu_s_per_gb})
        );
        rows.push((op, case.size, case.clients, b, n));
    }
    println!();
    println!(
        "| case | clients | blobstore | nginx | blobstore / nginx | p50 ms blobstore / nginx | p99 ms blobstore / nginx | server CPU s/GB blobstore / nginx |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (op, size, clients, b, n) in rows {
        println!(
            "| {op} {} | {clients} | {} | {} | {:.2}x | {:.2} / {:.2} | {:.1} / {:.1} | {:.3} / {:.3} |",
            size_name(size),
            human(b.bytes_per_s),
            human(n.bytes_per_s),
            b.bytes_per_s / n.bytes_per_s,
            b.p50_ms,
            n.p50_ms,
            b.p99_ms,
            n.p99_ms,
            b.cpu_s_per_gb,
            n.cpu_s_per_gb
        );
    }
    Ok(())
}
