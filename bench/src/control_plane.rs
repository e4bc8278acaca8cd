//! Control-plane benchmark: a 3-peer flynn cluster beside a 3-member etcd cluster on this
//! machine, doing the same work in the same run: durable (fsync-on-commit) writes of small
//! values to a fixed key space over HTTP/JSON, from 1 and from 64 concurrent clients.
//!
//! Both clusters stay up for the whole run and the cases interleave (flynn, etcd, flynn, ...)
//! over several rounds; medians are reported. Clients spread their requests over all three
//! members of each system, so both pay for forwarding to the leader.
//!
//! Beside what a client sees (writes/s, p50, p99), each case reports the CPU the three
//! servers spent per write (utime + stime of their processes over the case).
//!
//! Output: one JSON line per case, then a markdown table.

mod proc_cpu;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "flynn control plane vs etcd: durable writes per second and commit latency")]
struct Opts {
    /// Seconds each measured case runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Rounds of interleaved measurements (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Most requests one case may send (bounds the load in count as well as time).
    #[arg(long, default_value_t = 400_000)]
    max_requests: usize,
    /// Which members clients send to: `all` (spread, so most requests are forwarded to the
    /// leader) or `leader` (flynn's leader and etcd's leader only).
    #[arg(long, default_value = "all")]
    targets: String,
    /// Directory with flynn-host (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// Apps × keys of the key space both systems write.
const APPS: usize = 64;
const KEYS_PER_APP: usize = 16;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Clone, Copy)]
enum System {
    Flynn,
    Etcd,
}

struct Target {
    system: System,
    urls: Vec<String>,
    key: String,
    /// The servers' processes, for CPU per write.
    pids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Figures {
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The three servers' CPU time per acknowledged write, in milliseconds.
    cpu_ms_per_write: f64,
    errors: usize,
}

async fn wait_http(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let c = reqwest::Client::new();
    loop {
        if let Ok(r) = c.get(url).timeout(Duration::from_secs(1)).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_flynn(bin: &Path, dir: &Path, procs: &mut Procs) -> anyhow::Result<Target> {
    let ports = [12001, 12002, 12003];
    let first = procs.0.len();
    for (i, port) in ports.iter().enumerate() {
        let data = dir.join(format!("flynn{i}"));
        let log = std::fs::File::create(dir.join(format!("flynn{i}.log")))?;
        procs.0.push(
            Command::new(bin.join("flynn-host"))
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "daemon",
                    "--external-ip",
                    "127.0.0.1",
                    "--listen-ip",
                    "127.0.0.1",
                    "--no-router",
                    "--no-blobstore",
                    "--no-jobs",
                ])
                .args(["--port", &port.to_string()])
                .env("RUST_LOG", "warn,openraft=error")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting flynn-host")?,
        );
    }
    for port in ports {
        wait_http(
            &format!("http://127.0.0.1:{port}/host/info"),
            Duration::from_secs(10),
        )
        .await?;
    }
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new(bin.join("flynn-host"))
        .args(["bootstrap", "--json", "--min-hosts", "3", "--timeout", "30"])
        .args(["--peer-ips", &peers.join(",")])
        .output()?;
    if !out.status.success() {
        bail!("bootstrap: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let key = v["controller_key"].as_str().context("key")?.to_string();
    let urls: Vec<String> = peers.iter().map(|p| format!("http://{p}")).collect();
    let c = reqwest::Client::new();
    for a in 0..APPS {
        let r = c
            .post(format!("{}/apps", urls[0]))
            .bearer_auth(&key)
            .json(&serde_json::json!({ "name": format!("bench-{a}") }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("creating app: {}", r.text().await?);
        }
    }
    Ok(Target {
        system: System::Flynn,
        urls,
        key,
        pids: procs.0[first..].iter().map(Child::id).collect(),
    })
}

async fn start_etcd(dir: &Path, procs: &mut Procs) -> anyhow::Result<Target> {
    let etcd = which("etcd").context("etcd not found: apt-get install etcd-server")?;
    let members: Vec<(String, u16, u16)> = (0..3)
        .map(|i| {
            (
                format!("e{i}"),
                22379 + 10 * i as u16,
                22380 + 10 * i as u16,
            )
        })
        .collect();
    let cluster: Vec<String> = members
        .iter()
        .map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}"))
        .collect();
    let first = procs.0.len();
    for (name, client, peer) in &members {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        procs.0.push(
            Command::new(&etcd)
                .args(["--name", name, "--data-dir"])
                .arg(dir.join(name))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &cluster.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "bench",
                ])
                .args(["--log-level", "warn"])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd")?,
        );
    }
    let urls: Vec<String> = members
        .iter()
        .map(|(_, c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    for u in &urls {
        wait_http(&format!("{u}/health"), Duration::from_secs(20)).await?;
    }
    Ok(Target {
        system: System::Etcd,
        urls,
        key: String::new(),
        pids: procs.0[first..].iter().map(Child::id).collect(),
    })
}

async fn flynn_leader(t: &Target) -> anyhow::Result<String> {
    let s: serde_json::Value = reqwest::get(format!("{}/host/status", t.urls[0]))
        .await?
        .json()
        .await?;
    let addr = s["leader_addr"].as_str().context("no flynn leader")?;
    Ok(format!("http://{addr}"))
}

async fn etcd_leader(t: &Target) -> anyhow::Result<String> {
    let c = reqwest::Client::new();
    for url in &t.urls {
        let s: serde_json::Value = c
            .post(format!("{url}/v3/maintenance/status"))
            .json(&serde_json::json!({}))
            .send()
            .await?
            .json()
            .await?;
        if s["leader"] == s["header"]["member_id"] {
            return Ok(url.clone());
        }
    }
    bail!("no etcd member says it leads")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// One durable write of `value` to key (app, key) on member `member`.
async fn write(
    http: &reqwest::Client,
    t: &Target,
    member: usize,
    app: usize,
    key: usize,
    value: &str,
) -> bool {
    let url = &t.urls[member % t.urls.len()];
    let req = match t.system {
        System::Flynn => http
            .post(format!("{url}/apps/bench-{app}/env"))
            .bearer_auth(&t.key)
            .json(&serde_json::json!({ "set": { format!("K{key}"): value } })),
        System::Etcd => {
            let b64 = base64::engine::general_purpose::STANDARD;
            http.post(format!("{url}/v3/kv/put"))
                .json(&serde_json::json!({
                    "key": b64.encode(format!("/bench/{app}/K{key}")),
                    "value": b64.encode(value),
                }))
        }
    };
    matches!(req.send().await, Ok(r) if r.status().is_success())
}

async fn run_case(t: &Arc<Target>, clients: usize, seconds: u64, max_requests: usize) -> Figures {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let value = "v".repeat(100);
    let cpu_before = proc_cpu::cpu_seconds(&t.pids);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let per_client = max_requests / clients;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (t, http, value) = (t.clone(), http.clone(), value.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                let mut i = 0usize;
                while Instant::now() < deadline && i < per_client {
                    let start = Instant::now();
                    let ok = write(&http, &t, c + i, c % APPS, i % KEYS_PER_APP, &value).await;
                    if ok {
                        lat.push(start.elapsed());
                    } else {
                        errors += 1;
                    }
                    i += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = proc_cpu::cpu_seconds(&t.pids) - cpu_before;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Figures {
        writes_per_sec: lat.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_ms_per_write: cpu * 1000.0 / lat.len().max(1) as f64,
        errors,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn median_figures(runs: &[Figures]) -> Figures {
    Figures {
        writes_per_sec: median(runs.iter().map(|f| f.writes_per_sec).collect()),
        p50_ms: median(runs.iter().map(|f| f.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|f| f.p99_ms).collect()),
        cpu_ms_per_write: median(runs.iter().map(|f| f.cpu_ms_per_write).collect()),
        errors: runs.iter().map(|f| f.errors).sum(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let bin = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary dir")?
            .to_path_buf(),
    };
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let mut procs = Procs(Vec::new());
    let mut flynn = start_flynn(&bin, dir.path(), &mut procs).await?;
    let mut etcd = start_etcd(dir.path(), &mut procs).await?;
    match opts.targets.as_str() {
        "all" => {}
        "leader" => {
            flynn.urls = vec![flynn_leader(&flynn).await?];
            etcd.urls = vec![etcd_leader(&etcd).await?];
        }
        other => bail!("--targets must be all or leader, not {other:?}"),
    }
    let (flynn, etcd) = (Arc::new(flynn), Arc::new(etcd));
    // Warm up both (connections, leader caches, RocksDB / bbolt files).
    for t in [&flynn, &etcd] {
        run_case(t, 8, 2, 20_000).await;
    }
    let mut rows = Vec::new();
    for &clients in &opts.clients {
        let mut runs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..opts.rounds {
            for (i, t) in [&flynn, &etcd].into_iter().enumerate() {
                runs[i].push(run_case(t, clients, opts.seconds, opts.max_requests).await);
            }
        }
        let f = median_figures(&runs[0]);
        let e = median_figures(&runs[1]);
        let line = serde_json::json!({
            "case": format!("durable_writes_{clients}_clients"),
            "clients": clients,
            "rounds": opts.rounds,
            "seconds": opts.seconds,
            "flynn": f,
            "etcd": e,
            "ratio_writes_per_sec": f.writes_per_sec / e.writes_per_sec,
            "ratio_p99": f.p99_ms / e.p99_ms,
        });
        println!("{line}");
        rows.push((clients, f, e));
    }
    println!();
    println!("| clients | flynn writes/s | etcd writes/s | ratio | flynn p50 ms | etcd p50 ms | flynn p99 ms | etcd p99 ms | p99 ratio | flynn CPU ms/write | etcd CPU ms/write |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (c, f, e) in rows {
        println!(
            "| {c} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            f.writes_per_sec,
            e.writes_per_sec,
            f.writes_per_sec / e.writes_per_sec,
            f.p50_ms,
            e.p50_ms,
            f.p99_ms,
            e.p99_ms,
            f.p99_ms / e.p99_ms,
            f.cpu_ms_per_write,
            e.cpu_ms_per_write
        );
    }
    Ok(())
}
