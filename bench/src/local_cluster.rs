//! Three `flynn-host` daemons on 127.0.0.1, ports apart, bootstrapped into one cluster: the
//! setup the jobs and blobstore benchmarks share.

// Each benchmark binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const DOMAIN: &str = "bench.test";

/// Controller API ports of the three hosts.
pub const API_PORTS: [u16; 3] = [13001, 13002, 13003];
/// Blobstore ports of the three hosts.
pub const BLOBSTORE_PORTS: [u16; 3] = [15001, 15002, 15003];

pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(bin: &Path, args: &[&str], home: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("FLYNNRC", home.join("flynnrc"))
        // `cluster add` sets git up for the cluster: in the bench's own config, not the
        // user's ~/.gitconfig.
        .env("GIT_CONFIG_GLOBAL", home.join("gitconfig"))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {}: {}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn bin_dir(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary dir")?
            .to_path_buf(),
    })
}

pub struct LocalCluster {
    /// Stopped before `dir` is removed.
    procs: Procs,
    flynn_host: PathBuf,
    jobs: bool,
    pub flynn: PathBuf,
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts and bootstraps the three hosts (`jobs`: with job runners) and waits until
    /// every host's blobstore (and job runner) registered in discovery.
    pub async fn start(bin_dir: &Path, jobs: bool) -> anyhow::Result<LocalCluster> {
        let flynn_host = bin_dir.join("flynn-host");
        let flynn = bin_dir.join("flynn");
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let mut procs = Procs(Vec::new());
        for i in 0..API_PORTS.len() {
            procs.0.push(spawn_host(&flynn_host, dir, i, jobs)?);
        }
        let peers: Vec<String> = API_PORTS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let boot = run(
            &flynn_host,
            &[
                "bootstrap",
                "--json",
                "--timeout",
                "60",
                "--min-hosts",
                "3",
                "--peer-ips",
                &peers.join(","),
                "--domain",
                DOMAIN,
            ],
            dir,
        )?;
        let boot: serde_json::Value = serde_json::from_str(&boot)?;
        let key = boot["controller_key"].as_str().context("key")?.to_string();
        let url = format!("http://{}", peers[0]);
        run(&flynn, &["cluster", "add", "-d", "bench", &url, &key], dir)?;
        let http = reqwest::Client::new();
        let services: &[&str] = if jobs {
            &["blobstore", "flynn-host"]
        } else {
            &["blobstore"]
        };
        for service in services {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let svc: serde_json::Value = http
                    .get(format!("{url}/services/{service}"))
                    .bearer_auth(&key)
                    .send()
                    .await?
                    .json()
                    .await
                    .unwrap_or_default();
                if svc["instances"].as_object().is_some_and(|i| i.len() == 3) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the hosts did not all register as {service}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(LocalCluster {
            procs,
            flynn_host,
            jobs,
            flynn,
            url,
            key,
            http,
            dir: tmp,
        })
    }

    /// The daemons' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.0.iter().map(Child::id).collect()
    }

    /// The last lines of every host's log, on stderr (a failed run's evidence).
    pub fn print_log_tails(&self) {
        for i in 0..API_PORTS.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("host{i}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("----- host {i}");
            for l in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Kills host `i`'s daemon at once (its jobs die with it), as a lost host.
    pub fn kill(&mut self, i: usize) {
        let _ = self.procs.0[i].kill();
        let _ = self.procs.0[i].wait();
    }

    /// Starts host `i`'s daemon again on its data dir.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs.0[i] = spawn_host(&self.flynn_host, self.dir.path(), i, self.jobs)?;
        Ok(())
    }

    pub fn flynn(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&self.flynn, args, self.dir.path())
    }
}

/// Starts host `i`'s daemon (`jobs`: with a job runner), its log appended to `hostI.log`.
fn spawn_host(flynn_host: &Path, dir: &Path, i: usize, jobs: bool) -> anyhow::Result<Child> {
    let port = API_PORTS[i];
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("host{i}.log")))?;
    let first = 40000 + i as u32 * 2000;
    let mut cmd = Command::new(flynn_host);
    cmd.arg("--data-dir")
        .arg(dir.join(format!("host{i}")))
        .args([
            "daemon",
            "--external-ip",
            "127.0.0.1",
            "--listen-ip",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string()])
        .args(["--router-http", &format!("127.0.0.1:{}", 18080 + i)])
        .args(["--router-https", &format!("127.0.0.1:{}", 18443 + i)])
        .args([
            "--blobstore-http",
            &format!("127.0.0.1:{}", BLOBSTORE_PORTS[i]),
        ])
        .args(["--volume-provider", "dir", "--log-dir"])
        .arg(dir.join(format!("logs{i}")))
        .args(["--job-ports", &format!("{first}-{}", first + 1999)])
        .env("RUST_LOG", "info,openraft=error")
        .stdout(log.try_clone()?)
        .stderr(log);
    if !jobs {
        cmd.arg("--no-jobs");
    }
    cmd.spawn().context("starting flynn-host")
}
