//! Replicated Postgres beside a plain one, same run, on three `flynn-host` daemons on
//! loopback:
//!
//! - **pgbench** (TPC-B-like, scale `--scale`) for `--seconds` at each of `--clients`,
//!   through the app's `DATABASE_URL` (the service address, forwarded to the primary) against
//!   the cluster's three servers (each commit waits for the sync's flush), and against a
//!   plain Postgres 15 started here with the same settings and no standby. TPS, and latency
//!   p50/p99 from pgbench's per-transaction log.
//! - **Failover** over `--rounds`, on three hosts in network namespaces of their own (as the
//!   multi-host tests run them: a killed host takes its job network with it, where hosts
//!   sharing loopback would leave it behind): a writer on a surviving host commits through
//!   the service address, the primary's host is SIGKILLed, and the time from the kill to the
//!   first commit made by the new primary is read from the rows themselves (each names the
//!   server that committed it). The host is then started again, and its server rejoins and
//!   the shape settles before the next round, so each round fails over a cluster that has
//!   failed over before.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[path = "local_cluster.rs"]
mod local_cluster;
use local_cluster::LocalCluster;

#[derive(Parser)]
struct Opts {
    /// The database image (`script/base-image OUT --databases`).
    #[arg(long)]
    image: PathBuf,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// pgbench client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<u32>,
    /// pgbench scale (10: a million account rows).
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Failover rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where flynn and flynn-host are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PLAIN_PORT: u16 = 15432;

#[derive(Debug, serde::Serialize)]
struct Row {
    target: &'static str,
    clients: u32,
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The postgres shape from `GET /providers`.
async fn shape(c: &LocalCluster) -> anyhow::Result<serde_json::Value> {
    let providers: serde_json::Value = c
        .http
        .get(format!("{}/providers", c.url))
        .bearer_auth(&c.key)
        .send()
        .await?
        .json()
        .await?;
    Ok(providers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "postgres"))
        .map(|p| p["shape"].clone())
        .unwrap_or_default())
}

/// Waits for a primary with a caught-up sync and an async, every server reporting.
async fn settled(c: &LocalCluster, within: Duration) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let sh = shape(c).await.unwrap_or_default();
        let members = sh["members"].as_array().map_or(0, |m| m.len());
        if sh["primary"].as_u64().unwrap_or(0) != 0
            && sh["sync_ready"] == true
            && sh["asyncs"].as_array().is_some_and(|a| a.len() == 1)
            && members == 3
        {
            return Ok(sh);
        }
        if Instant::now() > deadline {
            bail!("the postgres servers did not settle: {sh}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A plain Postgres 15 with the servers' own settings and no standby.
fn start_plain(dir: &Path) -> anyhow::Result<Child> {
    let data = dir.join("plain");
    let pw = dir.join("pw");
    std::fs::write(&pw, "bench\n")?;
    // Postgres refuses to run as root: as the system's postgres user.
    let chown = |p: &Path| {
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
    };
    std::fs::create_dir_all(&data)?;
    chown(dir)?;
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/initdb")])
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
        ])
        .arg(format!("--pwfile={}", pw.display()))
        .args(["--no-locale", "-E", "UTF8"])
        .output()?;
    if !out.status.success() {
        bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
    }
    let conf = format!(
        "listen_addresses = '127.0.0.1'\nport = {PLAIN_PORT}\nunix_socket_directories = '{}'\n\
         wal_level = replica\nsynchronous_commit = on\nfsync = on\nfull_page_writes = on\n\
         wal_log_hints = on\nmax_wal_senders = 10\nwal_keep_size = 512MB\n",
        dir.display()
    );
    std::fs::write(data.join("flynn.conf"), conf)?;
    let mut pgconf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))?;
    std::io::Write::write_all(&mut pgconf, b"include_if_exists = 'flynn.conf'\n")?;
    chown(dir)?;
    let log = std::fs::File::create(dir.join("plain.log"))?;
    let child = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/postgres")])
        .arg("-D")
        .arg(&data)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(child)
}

/// Runs pgbench against `url`; TPS and latency percentiles (ms).
fn pgbench(
    url: &str,
    clients: u32,
    seconds: u64,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let logs = dir.join(format!("log-{tag}-{clients}"));
    std::fs::create_dir_all(&logs)?;
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &seconds.to_string(), "-n", "-l", "--log-prefix"])
        .arg(logs.join("tx"))
        .arg(url)
        .output()?;
    if !out.status.success() {
        bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    let mut lat: Vec<f64> = Vec::new();
    for e in std::fs::read_dir(&logs)? {
        for line in std::fs::read_to_string(e?.path())?.lines() {
            // client_id transaction_no latency_us script_no time_epoch time_us
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                lat.push(us / 1000.0);
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok((tps, pct(0.50), pct(0.99)))
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .args([url, "-tAqc", sql])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let bin_dir = local_cluster::bin_dir(&opts.bin_dir)?;
    let cluster = LocalCluster::start(&bin_dir, true).await?;
    let run = async {
        let image = opts.image.to_str().context("image path")?;
        cluster.flynn(&["base-image", "push", "--name", "databases", image])?;
        cluster.flynn(&["create", "bench"])?;
        cluster.flynn(&["-a", "bench", "resource", "add", "postgres"])?;
        settled(&cluster, Duration::from_secs(180)).await?;
        let url = cluster
            .flynn(&["-a", "bench", "env", "get", "DATABASE_URL"])?
            .trim()
            .to_string();
        let dir = cluster.dir.path().join("pg");
        std::fs::create_dir_all(&dir)?;
        // The plain server runs as the system's postgres user, in a directory it can reach.
        let plain_dir = tempfile::tempdir()?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(plain_dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let mut plain = start_plain(plain_dir.path())?;
        let plain_url = format!("postgres://postgres:bench@127.0.0.1:{PLAIN_PORT}/postgres");
        let mut rows = Vec::new();
        let result = async {
            for (target, url) in [("replicated", url.as_str()), ("plain", plain_url.as_str())] {
                // The plain server may still be starting.
                let deadline = Instant::now() + Duration::from_secs(30);
                while psql(url, "SELECT 1").is_err() {
                    if Instant::now() > deadline {
                        bail!("{target} postgres does not answer");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let init = Command::new(format!("{PG_BIN}/pgbench"))
                    .args(["-i", "-q", "-s", &opts.scale.to_string(), url])
                    .output()?;
                if !init.status.success() {
                    bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
                }
                for &c in &opts.clients {
                    let (tps, p50, p99) = pgbench(url, c, opts.seconds, &dir, target)?;
                    let row = Row {
                        target,
                        clients: c,
                        tps,
                        p50_ms: p50,
                        p99_ms: p99,
                    };
                    println!("{}", serde_json::to_string(&row)?);
                    rows.push(row);
                }
            }
            Ok(())
        }
        .await;
        let _ = plain.kill();
        let _ = plain.wait();
        result?;
        println!("\n| target | clients | TPS | p50 ms | p99 ms |\n|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} |",
                r.target, r.clients, r.tps, r.p50_ms, r.p99_ms
            );
        }
        for &c in &opts.clients {
            let get = |t: &str| rows.iter().find(|r| r.target == t && r.clients == c);
            if let (Some(a), Some(b)) = (get("replicated"), get("plain")) {
                println!(
                    "clients {c}: replicated/plain TPS {:.2}x, p99 {:.2}x",
                    a.tps / b.tps,
                    a.p99_ms / b.p99_ms
                );
            }
        }

        anyhow::Ok(())
    }
    .await;
    if run.is_err() {
        cluster.print_log_tails();
    }
    run?;
    drop(cluster);
    if opts.rounds > 0 {
        failover_rounds(&opts, &bin_dir).await?;
    }
    Ok(())
}

/// The postgres shape as host `i` reports it.
async fn ns_shape(c: &flynn_tests::Cluster, i: usize) -> Option<flynn_model::DbShape> {
    let providers = c.client(i).providers().await.ok()?;
    providers.into_iter().find(|p| p.name == "postgres")?.shape
}

/// Waits for a primary with a caught-up sync and an async, all three reporting.
async fn ns_settled(c: &flynn_tests::Cluster, i: usize) -> anyhow::Result<flynn_model::DbShape> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(sh) = ns_shape(c, i).await {
            if sh.primary != 0
                && sh.sync != 0
                && sh.sync_ready
                && sh.asyncs.len() == 1
                && sh.servers().iter().all(|h| sh.members.contains_key(h))
            {
                return Ok(sh);
            }
            if Instant::now() > deadline {
                bail!("the shape did not settle within 180 s: {sh:?}");
            }
        } else if Instant::now() > deadline {
            bail!("no postgres shape within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The index of the host whose node id is `id`.
async fn ns_index(c: &flynn_tests::Cluster, id: u64) -> anyhow::Result<usize> {
    let addr = c
        .list(0)
        .await
        .into_iter()
        .find(|e| e.node_id == id)
        .map(|e| e.addr)
        .with_context(|| format!("no host {id}"))?;
    c.hosts
        .iter()
        .position(|h| addr.starts_with(&format!("{}:", h.ip)))
        .with_context(|| format!("no test host at {addr}"))
}

/// `psql -tAc SQL` on the app's database, from a job of host `i` (`flynn pg psql`).
fn ns_psql(c: &flynn_tests::Cluster, i: usize, sql: &str) -> anyhow::Result<String> {
    let out = c.flynn(i, &["-a", "bench", "pg", "psql", "--", "-tAc", sql]);
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A writer committing rows from jobs of host `i` (`flynn pg psql`, batches of inserts that
/// stop at the first error) until `stop`. Its sessions bound their connects and unanswered
/// sends, as a client that rides out a failover must.
fn ns_writer(
    c: &flynn_tests::Cluster,
    i: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let _ = c.flynn(i, &["apps"]); // makes the host's flynnrc once
    let ns = c.hosts[i].ns.clone();
    let rc = c.root_path().join(format!("flynnrc{i}"));
    let flynn = flynn_tests::bin_dir().join("flynn");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
            let script = "\\set ON_ERROR_STOP 1\n".to_string()
                + &"INSERT INTO f DEFAULT VALUES;\n".repeat(100);
            let mut child = match Command::new("ip")
                .args(["netns", "exec", &ns, "timeout", "60"])
                .arg(&flynn)
                .args(["-a", "bench", "pg", "psql", "--", "-q"])
                .arg("connect_timeout=2 tcp_user_timeout=2000")
                .env("FLYNNRC", &rc)
                .env_remove("FLYNN_APP")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(_) => return,
            };
            if let Some(mut stdin) = child.stdin.take() {
                let _ = std::io::Write::write_all(&mut stdin, script.as_bytes());
            }
            if !child.wait().is_ok_and(|s| s.success()) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
}

async fn failover_rounds(opts: &Opts, bin_dir: &Path) -> anyhow::Result<()> {
    std::env::set_var("FLYNN_BIN_DIR", bin_dir);
    let mut c = flynn_tests::Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(3).await;
    let image = opts.image.to_str().context("image path")?;
    let step = |out: std::process::Output| -> anyhow::Result<String> {
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    step(c.flynn(0, &["base-image", "push", "--name", "databases", image]))?;
    step(c.flynn(0, &["create", "bench"]))?;
    step(c.flynn(0, &["-a", "bench", "resource", "add", "postgres"]))?;
    let first = ns_settled(&c, 0).await?;
    let any = ns_index(&c, first.sync).await?;
    ns_psql(
        &c,
        any,
        "CREATE TABLE f (id bigserial PRIMARY KEY, \
        at timestamptz NOT NULL DEFAULT clock_timestamp(), \
        srv text NOT NULL DEFAULT current_setting('cluster_name'))",
    )?;
    let mut times = Vec::new();
    // Asked of a host that was not the last one killed (it may still be rejoining).
    let mut ask = 0;
    for round in 0..opts.rounds {
        let before = ns_settled(&c, ask).await?;
        let primary = ns_index(&c, before.primary).await?;
        let writer_host = ns_index(&c, before.asyncs[0]).await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = ns_writer(&c, writer_host, stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = now_s();
        c.kill(primary);
        let deadline = Instant::now() + Duration::from_secs(90);
        let (took, promoted) = loop {
            if let Some(sh) = ns_shape(&c, writer_host).await {
                if sh.generation > before.generation && sh.primary != before.primary {
                    let q = format!(
                        "SELECT extract(epoch FROM min(at)) FROM f WHERE srv = 'h{}' AND at > to_timestamp({killed})",
                        sh.primary
                    );
                    if let Ok(v) = ns_psql(&c, writer_host, &q) {
                        if let Ok(at) = v.parse::<f64>() {
                            break (at - killed, sh.primary);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                let now = ns_shape(&c, writer_host).await;
                bail!("no commit on a new primary within 90 s (round {round}); the shape: {now:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = w.join();
        println!(
            "{}",
            serde_json::json!({"round": round, "failover_s": took, "old_primary": before.primary, "new_primary": promoted, "was_sync": promoted == before.sync})
        );
        times.push(took);
        c.start_daemon(primary);
        c.wait_up(primary);
        ask = writer_host;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    if !times.is_empty() {
        println!(
            "failover (kill to first commit on the new primary), {} rounds: min {:.2} s, median {:.2} s, max {:.2} s",
            times.len(),
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    Ok(())
}
