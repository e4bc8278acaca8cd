//! Jobs benchmark: how fast the platform starts an app's process, beside the same process
//! started bare, in the same run.
//!
//! - **Start latency.** From the scale request (0 → 1) to the job's first HTTP 200 through
//!   the router, on a one-job app; beside a bare fork/exec of the same `busybox httpd`
//!   serving the same files, timed from spawn to its first 200. p50 and p99 over `--rounds`.
//! - **Stages.** Each host logs a `job up` line per service job with the time of each
//!   stage (noticed, prepare, init, listening, running; `jobs/timeline.rs`); with the
//!   placement (the job's creation against the scale request) and the rest (the router
//!   picking the instance up and serving it), they make the stage table, p50 and p99.
//! - **Scale-out.** From `scale web=N` (default 300) on 3 hosts to N jobs running (port
//!   answering, registered in discovery), with the Raft elections during it (the rise of
//!   `flynn_raft_term`).
//!
//! Three `flynn-host` daemons run on 127.0.0.1 (ports apart, each with its own job port
//! range). Needs root (containers). Output: JSON lines, then a markdown table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;

#[path = "local_cluster.rs"]
mod local_cluster;
use local_cluster::{LocalCluster, DOMAIN};

#[derive(Parser)]
#[command(about = "job start latency vs bare fork/exec, and time to scale out")]
struct Opts {
    /// Start-latency samples of each kind.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Jobs to scale to across the three hosts (repeat for several sizes).
    #[arg(long, default_values_t = [300])]
    scale: Vec<u32>,
    /// Scale-outs of each size (each from 0).
    #[arg(long, default_value_t = 1)]
    scale_runs: usize,
    /// Directory with flynn, flynn-host (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One raw HTTP/1.1 GET; the status, or `None` if nothing answered.
async fn status(addr: &str, host: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Polls until `addr` answers 200 (for at most `limit`); the time it took.
async fn until_200(addr: &str, host: &str, start: Instant, limit: Duration) -> anyhow::Result<f64> {
    loop {
        if status(addr, host).await == Some(200) {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > limit {
            bail!("{addr} ({host}) did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn scale(&self, n: u32) -> anyhow::Result<()> {
        let body = serde_json::json!({"processes": {"web": n}});
        let r = self
            .http
            .post(format!("{}/apps/bench/scale", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("scale: {}", r.text().await?);
        }
        Ok(())
    }

    /// The app's jobs, from host 0's own state: the poll must not load the leader it
    /// measures.
    async fn jobs(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(self
            .http
            .get(format!("{}/apps/bench/jobs?stale=true", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?
            .json()
            .await?)
    }

    /// (running, active) jobs of the app.
    async fn counts(&self) -> anyhow::Result<(usize, usize)> {
        let jobs = self.jobs().await?;
        let state = |j: &serde_json::Value| j["state"].as_str().unwrap_or_default().to_string();
        let running = jobs.iter().filter(|j| state(j) == "running").count();
        let active = jobs
            .iter()
            .filter(|j| {
                matches!(
                    state(j).as_str(),
                    "pending" | "starting" | "running" | "stopping"
                )
            })
            .count();
        Ok((running, active))
    }

    /// When the app's newest job was placed (the scheduler's clock, ms since the epoch).
    async fn newest_job_created_ms(&self) -> anyhow::Result<u64> {
        self.jobs()
            .await?
            .iter()
            .filter_map(|j| j["created_ms"].as_u64())
            .max()
            .ok_or_else(|| anyhow::anyhow!("the app has no jobs"))
    }

    /// The Raft term host 0 is in (`flynn_raft_term`).
    async fn term(&self) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix("flynn_raft_term "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no flynn_raft_term in host 0's metrics"))
    }

    async fn wait_for(&self, running: usize, active: usize, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let c = self.counts().await?;
            if c.0 == running && c.1 == active {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("jobs did not settle at {running} running within {limit:?} (now {c:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let bin_dir = local_cluster::bin_dir(&opts.bin_dir)?;
    let cluster = LocalCluster::start(&bin_dir, true).await?;
    let dir = cluster.dir.path();
    cluster.flynn(&["create", "bench"])?;
    let image = dir.join("image.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../script/busybox-image");
    let out = Command::new("bash")
        .arg(script)
        .arg(&image)
        .arg("bench")
        .arg("exec httpd -f -p $PORT -h /www")
        .output()?;
    if !out.status.success() {
        bail!("busybox-image: {}", String::from_utf8_lossy(&out.stderr));
    }
    cluster.flynn(&["-a", "bench", "docker", "push", image.to_str().unwrap()])?;
    let api = Api {
        http: cluster.http.clone(),
        url: cluster.url.clone(),
        key: cluster.key.clone(),
    };
    api.wait_for(1, 1, Duration::from_secs(30)).await?;
    let router = "127.0.0.1:18080";
    let vhost = format!("bench.{DOMAIN}");

    // Measured in one block, so the jobs are scaled away however it ends: a job outlives
    // its daemon by design, and one left behind would hold a port and its namespace.
    let measured = async {
    // Container start: 0 → 1, timed to the first 200 through the router.
    let mut container = Vec::new();
    let mut stages: Vec<Vec<(String, f64)>> = Vec::new();
    for _ in 0..opts.rounds {
        let logged = job_ups(dir).iter().map(Vec::len).collect::<Vec<_>>();
        api.scale(0).await?;
        api.wait_for(0, 0, Duration::from_secs(30)).await?;
        // The route must answer 503 (no backend) before the clock starts.
        while status(router, &vhost).await == Some(200) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        let t0_wall = now_ms();
        api.scale(1).await?;
        let total = until_200(router, &vhost, t0, Duration::from_secs(30)).await?;
        container.push(total);
        // This round's job: when it was placed, and its host's line of stages.
        let placed = api.newest_job_created_ms().await?.saturating_sub(t0_wall) as f64;
        let line = eventually_line(dir, &logged).await?;
        let mut row = vec![("placed".to_string(), placed)];
        row.extend(line);
        let known: f64 = row.iter().map(|(_, v)| v).sum();
        row.push(("router".to_string(), (total - known).max(0.0)));
        stages.push(row);
    }

    // Bare fork/exec of the same server on the same files (the unpacked image layer).
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "hello from busybox bench\n")?;
    let busybox = which_busybox()?;
    let mut bare = Vec::new();
    for _ in 0..opts.rounds {
        // A port nothing holds now (a fixed one may be some connection's ephemeral port).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        let mut child = Command::new(&busybox)
            .args(["httpd", "-f", "-p", &addr, "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let ms = until_200(&addr, "localhost", t0, Duration::from_secs(10)).await;
        let _ = child.kill();
        let _ = child.wait();
        bare.push(ms?);
    }

    // Scale-out: 0 → N across the three hosts, with the elections during it.
    let mut scale_outs: Vec<(u32, f64, u64)> = Vec::new();
    for &n in &opts.scale {
        for _ in 0..opts.scale_runs {
            api.scale(0).await?;
            api.wait_for(0, 0, Duration::from_secs(300)).await?;
            let term0 = api.term().await?;
            let t0 = Instant::now();
            api.scale(n).await?;
            api.wait_for(n as usize, n as usize, Duration::from_secs(600))
                .await?;
            let secs = t0.elapsed().as_secs_f64();
            let elections = api.term().await?.saturating_sub(term0);
            println!(
                "{}",
                serde_json::json!({"case": "scale_out", "jobs": n, "hosts": 3, "seconds": secs, "elections": elections})
            );
            scale_outs.push((n, secs, elections));
        }
    }
    anyhow::Ok((container, stages, bare, scale_outs))
    }
    .await;
    api.scale(0).await?;
    let _ = api.wait_for(0, 0, Duration::from_secs(300)).await;
    let (mut container, stages, mut bare, scale_outs) = measured?;

    container.sort_by(f64::total_cmp);
    bare.sort_by(f64::total_cmp);
    let (c50, c99) = (percentile(&container, 0.5), percentile(&container, 0.99));
    let (b50, b99) = (percentile(&bare, 0.5), percentile(&bare, 0.99));
    println!(
        "{}",
        serde_json::json!({"case": "start_latency", "container_p50_ms": c50, "container_p99_ms": c99,
            "bare_p50_ms": b50, "bare_p99_ms": b99, "overhead_p50_ms": c50 - b50, "rounds": opts.rounds})
    );
    println!();
    println!("| case | flynn job (container, via router) | bare fork/exec | difference |");
    println!("|---|---|---|---|");
    println!(
        "| start to first 200, p50 | {c50:.1} ms | {b50:.1} ms | {:+.1} ms |",
        c50 - b50
    );
    println!(
        "| start to first 200, p99 | {c99:.1} ms | {b99:.1} ms | {:+.1} ms |",
        c99 - b99
    );
    for (n, secs, elections) in &scale_outs {
        println!("| scale 0 → {n} jobs on 3 hosts | {secs:.1} s ({elections} elections) | | |");
    }
    // The stage table: each stage's p50 and p99 over the rounds.
    if let Some(first) = stages.first() {
        println!();
        println!("| stage (start latency rounds) | p50 | p99 |");
        println!("|---|---|---|");
        for (i, (name, _)) in first.iter().enumerate() {
            let mut v: Vec<f64> = stages
                .iter()
                .filter_map(|r| r.get(i).map(|x| x.1))
                .collect();
            v.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&v, 0.5), percentile(&v, 0.99));
            println!(
                "{}",
                serde_json::json!({"case": "start_stage", "stage": name, "p50_ms": p50, "p99_ms": p99})
            );
            println!("| {name} | {p50:.1} ms | {p99:.1} ms |");
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Each host's `job up` lines (see `jobs/timeline.rs`), in log order: the stages and
/// their milliseconds.
fn job_ups(dir: &Path) -> Vec<Vec<Vec<(String, f64)>>> {
    (0..3)
        .map(|i| {
            let log = std::fs::read_to_string(dir.join(format!("host{i}.log"))).unwrap_or_default();
            log.lines()
                .filter(|l| l.contains(" job up "))
                .map(|l| {
                    l.split_whitespace()
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            let stage = k.strip_suffix("_ms")?;
                            Some((stage.to_string(), v.trim_matches('"').parse().ok()?))
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The first `job up` line any host logged after it had `logged` of them.
async fn eventually_line(dir: &Path, logged: &[usize]) -> anyhow::Result<Vec<(String, f64)>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = job_ups(dir);
        for (host, lines) in now.into_iter().enumerate() {
            if let Some(line) = lines
                .into_iter()
                .nth(logged.get(host).copied().unwrap_or(0))
            {
                return Ok(line);
            }
        }
        if Instant::now() > deadline {
            bail!("no host logged the job's stages (a \"job up\" line)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn which_busybox() -> anyhow::Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("busybox is not installed (apt-get install busybox-static)")
}
