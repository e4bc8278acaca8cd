//! `flynn-host`: runs a host and manages the cluster's hosts.

mod debug;
mod log_filter;
mod release;
mod update;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use flynn_cli_util::{print_table, run_main};
use flynn_client::{HostClient, HostEntry};
use flynn_daemon::bootstrap::{bootstrap, BootstrapOptions};
use flynn_daemon::config::DaemonArgs;
use flynn_daemon::hostdir::{HostDir, InitConfig};
use flynn_daemon::DEFAULT_PORT;

// The router allocates per request; mimalloc's thread-local free lists keep that off the
// shared glibc arenas (measured: see ARCHITECTURE.md, "Data plane").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "flynn-host", version, about = "Run and manage Flynn hosts")]
struct Cli {
    /// The host's data directory.
    #[arg(
        long,
        env = "FLYNN_DATA_DIR",
        default_value = "/var/lib/flynn",
        global = true
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Make a release signing key (PKCS#8, mode 0600) and FILE.pub, its public half, which
    /// hosts are installed with (`install-flynn --release-key`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Put the binaries of --from (flynn-host, and flynn and flynn-blobstore when there)
    /// into the repository directory as release V (V from `flynn-host version`), with a
    /// signed manifest, and make it the latest. A published release is never changed.
    Publish {
        #[arg(long)]
        repository: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run this host's daemon: its control-plane seat, the router and the firewall.
    Daemon(Box<DaemonArgs>),
    /// Run a standalone router (HTTP, HTTPS and TCP routes) from a routes file or a
    /// cluster; the daemon runs one of its own.
    Router(Box<flynn_router::standalone::RouterArgs>),
    /// The XDP firewall.
    Firewall {
        #[command(subcommand)]
        cmd: FirewallCmd,
    },
    /// The container init the job runner starts for each job (not for direct use).
    #[command(hide = true)]
    ContainerInit {
        #[arg(long)]
        stage2: bool,
        spec: std::path::PathBuf,
    },
    /// Record this host's cluster settings before its first start.
    Init {
        /// Addresses of the cluster's peers (IP or IP:PORT), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        peer_ips: Vec<String>,
        /// Cluster secret of an existing cluster: the daemon then joins it as a proxy.
        #[arg(long, env = "FLYNN_CLUSTER_SECRET")]
        secret: Option<String>,
        #[arg(long)]
        external_ip: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Form a new cluster from hosts whose daemons are running.
    Bootstrap {
        /// Wait until this many hosts answer.
        #[arg(long, default_value_t = 1)]
        min_hosts: usize,
        /// Host addresses (IP or IP:PORT), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        peer_ips: Vec<String>,
        /// Seconds to wait for the hosts.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
        /// The cluster domain: apps get APP.DOMAIN, and the controller is served at
        /// https://controller.DOMAIN through every host's router.
        #[arg(long)]
        domain: Option<String>,
        /// Start the new cluster from a `flynn cluster backup` archive: its domain, keys,
        /// apps, routes, blobs and volumes. The archive is checked whole first.
        #[arg(long)]
        from_backup: Option<PathBuf>,
    },
    /// List the cluster's hosts.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make a proxy host a voting peer.
    Promote {
        host: String,
        #[command(flatten)]
        target: Target,
    },
    /// Make a peer a proxy; with --force, remove a peer that is gone for good.
    Demote {
        #[arg(long)]
        force: bool,
        host: String,
        #[command(flatten)]
        target: Target,
    },
    /// Prepare a stopped host to restart as the only peer of a new cluster holding its
    /// state: the way out when a cluster has lost its quorum for good.
    Recover,
    /// Read the cluster state as stored, at one revision (read-only): `state dump` prints
    /// every record, `state get KEY` one (`app/web`, `release/web-v2`, `route/...`).
    State {
        #[command(subcommand)]
        cmd: StateCmd,
        #[command(flatten)]
        target: Target,
    },
    /// List the jobs on this host.
    Ps {
        /// Also the stopped jobs this host keeps (the last 25 per app).
        #[arg(short = 'a', long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show one job of this host.
    Inspect {
        job: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a job on this host.
    Stop {
        job: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print a job's output.
    Log {
        job: String,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Volumes: list, create, inspect, delete, snapshot, send to another host.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Open, import or create this host's ZFS pool now, as the daemon does at start
    /// (install-flynn runs it to put the pool on a device).
    ZpoolInit(flynn_daemon::components::volumes::VolumeArgs),
    /// The components this host runs (router, firewall, ...) and what each is doing.
    Components {
        #[command(flatten)]
        target: Target,
    },
    /// Show this host's view of the cluster.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Print the version; with --cluster, every host's.
    Version {
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Update every host's daemon in place to the binary given, one host at a time (the
    /// leader last): its jobs move to other hosts, it restarts on the new binary with its
    /// router's sockets held open, rejoins and catches up before the next host starts.
    Update {
        /// The new flynn-host binary.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The release to update to ("latest" for the newest), fetched from the release
        /// repository and checked against the release key; with --file, a binary of
        /// another version is refused.
        #[arg(long)]
        version: Option<String>,
        /// The release repository (an http(s) URL or a directory); default: the one given
        /// at install (DATA_DIR/release.json).
        #[arg(long, env = "FLYNN_RELEASE_REPOSITORY")]
        repository: Option<String>,
        /// The release public key (base64, or a file holding it); default: the one given at
        /// install.
        #[arg(long, env = "FLYNN_RELEASE_KEY")]
        release_key: Option<String>,
        /// Put back, on every host, the binary the last update replaced.
        #[arg(long)]
        rollback: bool,
        /// Seconds each step (jobs moving, a host coming back) may take.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Move each host's jobs to other hosts before it restarts, instead of keeping them
        /// running through its restart (they outlive the daemon and are taken up again).
        #[arg(long)]
        move_jobs: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make and publish releases for `flynn-host update --version`.
    Release {
        #[command(subcommand)]
        cmd: ReleaseCmd,
    },
    /// Gather this host's debug information (host facts, logs, jobs, zpool status, firewall
    /// counters, Raft status, versions, the cluster state) into one archive, secrets
    /// redacted, and upload it; with --tarball, or when no upload endpoint answers, write
    /// it here and print its path.
    CollectDebugInfo {
        /// Write a local tarball instead of uploading.
        #[arg(long)]
        tarball: bool,
        /// Where to upload (HTTP PUT of the .tar.gz).
        #[arg(long, env = "FLYNN_DEBUG_UPLOAD_URL")]
        upload_url: Option<String>,
        /// The tarball's path (default: the temp dir).
        #[arg(long)]
        output: Option<PathBuf>,
        /// The daemon's log file.
        #[arg(long, default_value = "/var/log/flynn/flynn-host.log")]
        log_file: PathBuf,
        /// Where the apps' logs are (the daemon's --log-dir).
        #[arg(long, default_value = "/var/log/flynn")]
        log_dir: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum StateCmd {
    /// Every record (or those whose key starts with --prefix), with the revision.
    Dump {
        #[arg(long, default_value = "")]
        prefix: String,
        /// One JSON document instead of a line per record.
        #[arg(long)]
        json: bool,
    },
    /// One record by its key, as JSON.
    Get { key: String },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// This host's volumes; with --all, every host's, from the cluster state.
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make a volume on this host.
    Create {
        /// Its id (default: a random one).
        #[arg(long)]
        id: Option<String>,
        /// Size limit: bytes, or with a K, M, G or T suffix.
        #[arg(long)]
        size: Option<String>,
        /// The app that owns it.
        #[arg(long)]
        app: Option<String>,
    },
    /// One volume, with its path, size and snapshots.
    Inspect { id: String },
    /// Delete a volume and its snapshots.
    Delete {
        id: String,
        /// Also a volume holding a database server's data (refused without).
        #[arg(long)]
        force: bool,
    },
    /// Snapshot a volume.
    Snapshot {
        id: String,
        /// Default: s<milliseconds>.
        #[arg(long)]
        name: Option<String>,
    },
    /// Send a snapshot to another host (incremental when it has an older one).
    Send {
        id: String,
        /// The receiving host (IP or IP:PORT).
        #[arg(long)]
        to: String,
        /// Default: the newest snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Base of an incremental stream (default: the newest snapshot both hosts have).
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum FirewallCmd {
    /// Interfaces, mode, policy and counters of this host's firewall.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args)]
struct Target {
    /// Host API of the host to ask (default: this host).
    #[arg(long, env = "FLYNN_HOST_URL")]
    host_url: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    // Before any thread exists: a process with threads cannot enter new mount namespaces.
    if let Cmd::ContainerInit { stage2, spec } = &cli.cmd {
        match stage2 {
            false => flynn_job::init::stage1(spec),
            true => flynn_job::init::stage2(spec),
        }
    }
    if matches!(cli.cmd, Cmd::Daemon(_) | Cmd::Router(_)) {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,openraft=error".into());
        let stderr = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let file = match &cli.cmd {
            Cmd::Daemon(args) => match &args.log_file {
                Some(path) => match open_log_file(path) {
                    Ok(f) => Some(
                        tracing_subscriber::fmt::layer()
                            .with_writer(std::sync::Arc::new(f))
                            .with_ansi(false),
                    ),
                    Err(e) => {
                        eprintln!("flynn-host: --log-file {}: {e}", path.display());
                        std::process::exit(1);
                    }
                },
                None => None,
            },
            _ => None,
        };
        use tracing_subscriber::Layer;
        tracing_subscriber::registry()
            .with(filter)
            .with(stderr.with_filter(log_filter::QuietOpenraft))
            .with(file.map(|f| f.with_filter(log_filter::QuietOpenraft)))
            // System apps' lines also go to the host's job log (`flynn -a blobstore log`).
            .with(flynn_daemon::jobs::logs::SystemAppLayer)
            .init();
    }
    run_main("flynn-host", run(cli))
}

/// The daemon's log file, appended to (its directory made if missing).
fn open_log_file(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn host_url(ip: &str, port: u16) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("http://{ip}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// Client for this host's daemon, authenticated with the secret in its data dir.
fn local_host(data_dir: &Path, target: &Target) -> anyhow::Result<HostClient> {
    let dir = HostDir::new(data_dir);
    let secret = match std::env::var("FLYNN_CLUSTER_SECRET") {
        Ok(s) if !s.is_empty() => Some(s),
        _ => dir.secret()?,
    };
    let secret = secret.with_context(|| {
        format!(
            "no cluster secret in {} (is this host part of a cluster?)",
            data_dir.display()
        )
    })?;
    let url = match &target.host_url {
        Some(u) => u.clone(),
        None => {
            let port = dir.init_config()?.port.unwrap_or(DEFAULT_PORT);
            format!("http://127.0.0.1:{port}")
        }
    };
    Ok(HostClient::new(
        &url,
        Some(&secret),
        Duration::from_secs(60),
    ))
}

fn print_hosts(hosts: &[HostEntry]) {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.node_id.to_string(),
                h.addr.clone(),
                h.role.to_string(),
                if h.leader { "leader" } else { "" }.to_string(),
                if h.reachable { "up" } else { "unreachable" }.to_string(),
                h.version.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["ID", "ADDR", "ROLE", "LEADER", "STATE", "VERSION"], &rows);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = HostDir::new(&cli.data_dir);
    match cli.cmd {
        Cmd::Daemon(args) => flynn_daemon::run(args.resolve(&cli.data_dir)?).await,
        Cmd::Init {
            peer_ips,
            secret,
            external_ip,
            port,
        } => {
            if dir.secret()?.is_some() {
                bail!(
                    "{} already belongs to a cluster; refusing to re-init",
                    cli.data_dir.display()
                );
            }
            for ip in &peer_ips {
                if ip.is_empty() {
                    bail!("--peer-ips has an empty entry");
                }
            }
            dir.write_init_config(&InitConfig {
                external_ip,
                port,
                peer_ips,
            })?;
            if let Some(s) = secret {
                if s.len() < 32 {
                    bail!("--secret is too short to be a cluster secret");
                }
                dir.write_secret(&s)?;
                println!(
                    "Initialized {}: the daemon will join the cluster as a proxy.",
                    cli.data_dir.display()
                );
            } else {
                println!(
                    "Initialized {}: start the daemon, then run flynn-host bootstrap.",
                    cli.data_dir.display()
                );
            }
            Ok(())
        }
        Cmd::Bootstrap {
            min_hosts,
            peer_ips,
            timeout,
            json,
            domain,
            from_backup,
        } => {
            let opts = BootstrapOptions {
                from_backup,
                hosts: peer_ips
                    .iter()
                    .map(|ip| host_url(ip, DEFAULT_PORT))
                    .collect(),
                min_hosts,
                timeout: Duration::from_secs(timeout),
                domain,
            };
            let out = bootstrap(&opts).await?;
            // A database whose dump could not be restored: the cluster is up, and says so
            // (the dump is in the backup; `flynn -a APP pg restore` takes it by hand).
            let unrestored: Vec<String> = out
                .restored
                .as_ref()
                .and_then(|r| r["databases"].as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter(|d| d["restored"] != true)
                .map(|d| {
                    format!(
                        "{} resource {} of {}: {}",
                        d["provider"].as_str().unwrap_or("?"),
                        d["id"].as_str().unwrap_or("?"),
                        d["app"].as_str().unwrap_or("?"),
                        d["error"].as_str().unwrap_or("not restored")
                    )
                })
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "controller_url": out.controller_url,
                        "controller_key": out.auth_key,
                        "cluster_secret": out.secret,
                        "peers": out.peers.iter().map(|p| &p.addr).collect::<Vec<_>>(),
                        "proxies": out.proxies.iter().map(|p| &p.addr).collect::<Vec<_>>(),
                        "domain": out.domain,
                        "controller_pin": out.controller_pin,
                        "restored": out.restored,
                    })
                );
            } else {
                println!(
                    "Cluster bootstrapped with {} peer(s) and {} proxy(ies).",
                    out.peers.len(),
                    out.proxies.len()
                );
                println!();
                println!("Controller URL: {}", out.controller_url);
                println!("Controller key: {}", out.auth_key);
                println!(
                    "Cluster secret: {}  (new hosts: flynn-host init --peer-ips ... --secret ...)",
                    out.secret
                );
                if let Some(r) = &out.restored {
                    println!(
                        "Restored from the backup: apps {}, {} blob(s), {} volume(s), {} database(s).",
                        r["apps"],
                        r["blobs"],
                        r["volumes"].as_array().map_or(0, Vec::len),
                        r["databases"].as_array().map_or(0, Vec::len)
                    );
                }
                println!();
                println!("Try it:");
                match (&out.domain, &out.controller_pin) {
                    (Some(domain), Some(pin)) => println!(
                        "  flynn cluster add -p {pin} default {domain} {}",
                        out.auth_key
                    ),
                    _ => println!(
                        "  flynn cluster add -d default {} {}",
                        out.controller_url, out.auth_key
                    ),
                }
                println!("  flynn create myapp && flynn -a myapp env set -t web GREETING=hello");
            }
            if !unrestored.is_empty() {
                for u in &unrestored {
                    eprintln!("flynn-host: not restored: {u}");
                }
                bail!(
                    "the cluster is up, but {} database(s) were not restored from the backup",
                    unrestored.len()
                );
            }
            Ok(())
        }
        Cmd::List { json, target } => {
            let hosts = local_host(&cli.data_dir, &target)?.list().await?;
            if json {
                println!("{}", serde_json::to_string(&hosts)?);
            } else {
                print_hosts(&hosts);
            }
            Ok(())
        }
        Cmd::Promote { host, target } => {
            let hosts = local_host(&cli.data_dir, &target)?.promote(&host).await?;
            println!("Promoted {host}.");
            print_hosts(&hosts);
            Ok(())
        }
        Cmd::Demote {
            force,
            host,
            target,
        } => {
            let hosts = local_host(&cli.data_dir, &target)?
                .demote(&host, force)
                .await?;
            println!("{} {host}.", if force { "Removed" } else { "Demoted" });
            print_hosts(&hosts);
            Ok(())
        }
        Cmd::Recover => {
            let (apps, revision) = flynn_daemon::prepare_recovery(&cli.data_dir)?;
            println!(
                "Prepared recovery of {apps} apps at revision {revision}. Start the daemon: it becomes the only peer of a new cluster with this state. Then wipe the other hosts' data dirs, init them with --peer-ips THIS_IP --secret (same secret), start them, and promote them."
            );
            Ok(())
        }
        Cmd::Volume { cmd, target } => volume_cmd(local_host(&cli.data_dir, &target)?, cmd).await,
        Cmd::State { cmd, target } => {
            let host = local_host(&cli.data_dir, &target)?;
            match cmd {
                StateCmd::Dump { prefix, json } => {
                    let state = host.state(&prefix).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&state)?);
                        return Ok(());
                    }
                    println!("revision {}", state["revision"]);
                    for (key, value) in state["records"].as_object().into_iter().flatten() {
                        println!("{key}\t{value}");
                    }
                }
                StateCmd::Get { key } => {
                    let state = host.state(&key).await?;
                    let record = state["records"].get(&key).ok_or_else(|| {
                        let near: Vec<&String> = state["records"]
                            .as_object()
                            .into_iter()
                            .flat_map(|m| m.keys())
                            .take(10)
                            .collect();
                        if near.is_empty() {
                            anyhow::anyhow!(
                                "no record {key:?} (keys look like app/NAME, release/ID; see state dump)"
                            )
                        } else {
                            let near: Vec<&str> = near.iter().map(|k| k.as_str()).collect();
                            anyhow::anyhow!("no record {key:?}; did you mean {}", near.join(", "))
                        }
                    })?;
                    println!("{}", serde_json::to_string_pretty(record)?);
                }
            }
            Ok(())
        }
        Cmd::CollectDebugInfo {
            tarball,
            upload_url,
            output,
            log_file,
            log_dir,
            target,
        } => {
            let host = local_host(&cli.data_dir, &target).ok();
            let secret = HostDir::new(&cli.data_dir).secret().ok().flatten();
            let opts = debug::Options {
                tarball,
                upload_url,
                output,
                log_file,
                log_dir,
            };
            let files = debug::collect(host.as_ref(), secret.as_deref(), &opts).await;
            let path = debug::write_tarball(&files, opts.output.as_deref())?;
            match (&opts.upload_url, opts.tarball) {
                (_, true) => println!("{}", path.display()),
                (None, false) => {
                    eprintln!("no upload endpoint is configured (--upload-url or FLYNN_DEBUG_UPLOAD_URL); wrote the tarball instead");
                    println!("{}", path.display());
                }
                (Some(url), false) => match debug::upload(url, &path).await {
                    Ok(at) => {
                        let _ = std::fs::remove_file(&path);
                        println!("Debug information uploaded: {at}");
                    }
                    Err(e) => {
                        eprintln!("upload to {url} failed ({e}); wrote the tarball instead");
                        println!("{}", path.display());
                    }
                },
            }
            Ok(())
        }
        Cmd::Ps { all, json, target } => {
            let jobs = local_host(&cli.data_dir, &target)?.jobs(all).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            let text = |v: &serde_json::Value, k: &str| match &v[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|j| {
                    ["id", "app", "type", "state", "addr", "pid", "error"]
                        .iter()
                        .map(|k| text(j, k))
                        .collect()
                })
                .collect();
            print_table(
                &["ID", "APP", "TYPE", "STATE", "ADDR", "PID", "ERROR"],
                &rows,
            );
            Ok(())
        }
        Cmd::Inspect { job, target } => {
            let jobs = local_host(&cli.data_dir, &target)?.jobs(true).await?;
            let j = jobs
                .iter()
                .find(|j| j["id"] == job.as_str())
                .with_context(|| format!("no job {job:?} on this host"))?;
            println!("{}", serde_json::to_string_pretty(j)?);
            Ok(())
        }
        Cmd::Stop { job, target } => {
            local_host(&cli.data_dir, &target)?.stop_job(&job).await?;
            println!("Job {job} stopping.");
            Ok(())
        }
        Cmd::Log {
            job,
            follow,
            target,
        } => {
            let host = local_host(&cli.data_dir, &target)?;
            let jobs = host.jobs(true).await?;
            let app = jobs
                .iter()
                .find(|j| j["id"] == job.as_str())
                .and_then(|j| j["app"].as_str().map(String::from))
                .with_context(|| format!("no job {job:?} on this host"))?;
            let mut q = flynn_client::LogQuery {
                app,
                job: Some(job),
                ..Default::default()
            };
            loop {
                let lines = host.logs(&q).await?;
                for l in &lines {
                    println!(
                        "{}",
                        flynn_cli_util::log_line(l.ts, &l.app, &l.proc_type, &l.job, &l.msg)
                    );
                }
                if !follow {
                    return Ok(());
                }
                if let Some(last) = lines.last() {
                    q.after = Some(last.cursor());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Cmd::ZpoolInit(args) => {
            let cfg = args.validate(&cli.data_dir)?;
            let pool =
                flynn_volume::pool::ZfsPool::open(&cfg.pool, Box::new(flynn_volume::ZfsCli))?;
            println!(
                "ZFS pool {} {} ({}).",
                pool.name,
                pool.opened,
                pool.health().unwrap_or_else(|e| e.to_string())
            );
            Ok(())
        }
        Cmd::Components { target } => {
            let all = local_host(&cli.data_dir, &target)?.components().await?;
            println!("{}", serde_json::to_string_pretty(&all)?);
            Ok(())
        }
        Cmd::Status { target } => {
            let host = local_host(&cli.data_dir, &target)?;
            let mut status = serde_json::to_value(host.status().await?)?;
            // Where volumes live: a host without ZFS says so here (and in its log).
            if let Ok(components) = host.components().await {
                status["volumes"] = components["volumes"].clone();
                // Which I/O backend the router runs on (io_uring or the epoll fallback).
                status["router"] = components["router"].clone();
            }
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Cmd::ContainerInit { .. } => unreachable!("handled in main before the runtime"),
        Cmd::Firewall {
            cmd: FirewallCmd::Status { json, target },
        } => {
            let status = local_host(&cli.data_dir, &target)?.firewall().await?;
            if json {
                println!("{status}");
                return Ok(());
            }
            if status["enabled"] != true {
                println!("Firewall: off (start the daemon with --firewall-iface IFACE)");
                return Ok(());
            }
            let ifaces: Vec<String> = status["interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| {
                    format!(
                        "{} ({})",
                        i["name"].as_str().unwrap_or("?"),
                        i["mode"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            println!("Interfaces: {}", ifaces.join(", "));
            println!("Policy:     {}", status["policy"]);
            println!();
            let rows: Vec<Vec<String>> = status["counters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    ["verdict", "reason", "port_class", "packets", "bytes"]
                        .iter()
                        .map(|k| match &r[*k] {
                            serde_json::Value::String(s) => s.clone(),
                            v => v.to_string(),
                        })
                        .collect()
                })
                .collect();
            print_table(&["VERDICT", "REASON", "PORTS", "PACKETS", "BYTES"], &rows);
            Ok(())
        }
        Cmd::Router(args) => {
            let (config, source) = args.validate()?;
            Ok(flynn_router::standalone::run(config, source).await?)
        }
        Cmd::Version { cluster, target } => {
            println!("{}", flynn_daemon::version());
            if cluster {
                let hosts = local_host(&cli.data_dir, &target)?.list().await?;
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.addr.clone(),
                            h.version.clone().unwrap_or_else(|| "(no answer)".into()),
                        ]
                    })
                    .collect();
                print_table(&["HOST", "VERSION"], &rows);
            }
            Ok(())
        }
        Cmd::Release { cmd } => match cmd {
            ReleaseCmd::Keygen { out } => {
                let public = release::keygen(&out)?;
                println!(
                    "Signing key written to {} (keep it off the cluster).",
                    out.display()
                );
                println!("Release key (for install-flynn --release-key): {public}");
                Ok(())
            }
            ReleaseCmd::Publish {
                repository,
                key,
                from,
            } => {
                let v = release::publish(&repository, &key, &from)?;
                println!("Published release {v} in {}.", repository.display());
                Ok(())
            }
        },
        Cmd::Update {
            file,
            version,
            repository,
            release_key,
            rollback,
            timeout,
            move_jobs,
            target,
        } => {
            let dir = HostDir::new(&cli.data_dir);
            let secret = match std::env::var("FLYNN_CLUSTER_SECRET") {
                Ok(s) if !s.is_empty() => Some(s),
                _ => dir.secret()?,
            }
            .context("no cluster secret here (is this host part of a cluster?)")?;
            let hosts = local_host(&cli.data_dir, &target)?.list().await?;
            // --version without --file: the release comes from the channel, verified,
            // before any host is touched.
            let mut file = file;
            let mut version = version;
            if let (None, Some(v), false) = (&file, &version, rollback) {
                let channel = release::Channel::resolve(
                    &cli.data_dir,
                    repository.as_deref(),
                    release_key.as_deref(),
                )?;
                eprintln!("==> fetching release {v} from {}", channel.repository);
                let (path, v) = release::fetch_host_binary(&channel, &cli.data_dir, v).await?;
                eprintln!("==> release {v}: signature and SHA-512 check out");
                file = Some(path);
                version = Some(v);
            }
            update::run(
                hosts,
                &secret,
                update::Options {
                    file: file.as_deref(),
                    version: version.as_deref(),
                    rollback,
                    timeout: Duration::from_secs(timeout),
                    move_jobs,
                },
            )
            .await
        }
    }
}

async fn volume_cmd(host: HostClient, cmd: VolumeCmd) -> anyhow::Result<()> {
    let show = |v: serde_json::Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    };
    match cmd {
        VolumeCmd::List { all, json } => {
            let list = host.volumes(all).await?;
            if json {
                println!("{list}");
                return Ok(());
            }
            let cell = |v: &serde_json::Value, k: &str| match &v[k] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a.len().to_string(),
                other => other.to_string(),
            };
            let rows: Vec<Vec<String>> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    let mut row = vec![cell(v, "id")];
                    if all {
                        row.extend([cell(v, "host"), cell(v, "provider"), cell(v, "app")]);
                    } else {
                        row.extend([cell(v, "used"), cell(v, "path")]);
                    }
                    row.extend([cell(v, "size"), cell(v, "snapshots")]);
                    row
                })
                .collect();
            if all {
                print_table(
                    &["ID", "HOST", "PROVIDER", "APP", "SIZE", "SNAPSHOTS"],
                    &rows,
                );
            } else {
                print_table(&["ID", "USED", "PATH", "SIZE", "SNAPSHOTS"], &rows);
            }
            Ok(())
        }
        VolumeCmd::Create { id, size, app } => {
            let size = size
                .as_deref()
                .map(flynn_daemon::components::volumes::parse_size)
                .transpose()?;
            let req = flynn_client::NewVolume {
                id,
                size,
                app,
                job: None,
            };
            show(host.create_volume(&req).await?)
        }
        VolumeCmd::Inspect { id } => show(host.volume(&id).await?),
        VolumeCmd::Delete { id, force } => {
            host.delete_volume(&id, force).await?;
            println!("Deleted volume {id}.");
            Ok(())
        }
        VolumeCmd::Snapshot { id, name } => show(host.snapshot_volume(&id, name.as_deref()).await?),
        VolumeCmd::Send {
            id,
            to,
            snapshot,
            from,
        } => {
            let req = flynn_client::SendVolume { to, snapshot, from };
            show(host.send_volume(&id, &req).await?)
        }
    }
}
