//! `git push` to running, by stage, on three `flynn-host` daemons on loopback:
//!
//! - **Push to running.** A small static site (the `static` buildpack on the busybox base
//!   image, or `--base` a stack image) is pushed once, then `--rounds` times more with one
//!   line changed. Each push is timed from `git push` to its exit (the hook returns once
//!   the release runs), and split by the hook's own stage line: receive (the pack arriving
//!   and git's checks: the rest of the total), checkout, pack and upload of the source,
//!   build (of which: storing the slug), release (rolled out). The new text is then checked
//!   through the router.
//! - **A large repository** (`--large-mb N`): one push of a repository with an N MB blob
//!   and 2,000 small files; its time and the peak RSS of the git service's processes
//!   (`git receive-pack` and its children, sampled every 50 ms) beside the daemon's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[path = "local_cluster.rs"]
mod local_cluster;

#[derive(Parser)]
struct Opts {
    /// Pushes after the first.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Also push a repository holding a blob of this many MB (0: skip).
    #[arg(long, default_value_t = 0)]
    large_mb: u64,
    /// The base image to build on (default: busybox, made here).
    #[arg(long)]
    base: Option<PathBuf>,
    /// The app pushed: static (any base), python or node (the stack image as --base),
    /// each without dependencies, so a push measures the buildpack's own cost.
    #[arg(long, default_value = "static")]
    app: String,
    /// Where flynn and flynn-host are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// One push's stages, in milliseconds.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Stages {
    total: u64,
    receive: u64,
    checkout: u64,
    pack: u64,
    upload: u64,
    build: u64,
    slug: u64,
    release: u64,
}

fn git(dir: &Path, home: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", home.join("gitconfig"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@bench.test")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@bench.test")
        .env("FLYNNRC", home.join("flynnrc"))
        .stdin(Stdio::null())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Commits everything in `dir`, pushes it, and splits the push's time by the hook's
/// stage line.
fn push(dir: &Path, home: &Path, message: &str) -> anyhow::Result<Stages> {
    git(dir, home, &["add", "-A"])?;
    git(dir, home, &["commit", "--quiet", "-m", message])?;
    let start = Instant::now();
    let out = git(dir, home, &["push", "flynn", "main"])?;
    let total = start.elapsed().as_millis() as u64;
    let said = String::from_utf8_lossy(&out.stderr);
    let line = said
        .lines()
        .find_map(|l| l.split_once("-----> stages (ms): ").map(|(_, s)| s))
        .context("the push printed no stage line")?;
    let num = |name: &str| -> u64 {
        line.split([',', '(', ')'])
            .find_map(|part| part.trim().strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut s = Stages {
        total,
        checkout: num("checkout"),
        pack: num("pack"),
        upload: num("upload"),
        build: num("build"),
        slug: num("slug"),
        release: num("release"),
        ..Stages::default()
    };
    s.receive = total.saturating_sub(s.checkout + s.pack + s.upload + s.build + s.release);
    Ok(s)
}

async fn served(router: &str, host: &str, want: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = client
            .get(router)
            .header("Host", host)
            .send()
            .await?
            .text()
            .await?;
        if body.trim() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router serves {body:?}, not {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pct(v: &[u64], p: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Peak resident KiB over the processes whose command line contains `needle`.
fn rss_of(needle: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let p = e.path();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(needle) {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let bin_dir = local_cluster::bin_dir(&opts.bin_dir)?;
    let cluster = local_cluster::LocalCluster::start(&bin_dir, true).await?;
    let result = run(&opts, &cluster).await;
    if result.is_err() {
        cluster.print_log_tails();
    }
    result
}

async fn run(opts: &Opts, cluster: &local_cluster::LocalCluster) -> anyhow::Result<()> {
    let home = cluster.dir.path();
    let base = match &opts.base {
        Some(b) => b.clone(),
        None => {
            let out = home.join("base.tar");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../script/busybox-image");
            let made = Command::new("bash")
                .arg(script)
                .arg(&out)
                .arg("base")
                .output()?;
            if !made.status.success() {
                bail!("busybox-image: {}", String::from_utf8_lossy(&made.stderr));
            }
            out
        }
    };
    cluster.flynn(&["base-image", "push", base.to_str().unwrap()])?;
    let work = new_app(cluster, home, "web")?;
    let dir = work.path();
    let router = format!("http://127.0.0.1:{}/", 18080);
    let host = format!("web.{}", local_cluster::DOMAIN);
    write_app(dir, &opts.app, "round 0")?;
    let first = push(dir, home, "round 0")?;
    served(&router, &host, "round 0").await?;
    println!(
        "{}",
        serde_json::json!({"case": "first_push", "stages_ms": first})
    );
    let mut rounds = Vec::new();
    for i in 1..=opts.rounds {
        write_app(dir, &opts.app, &format!("round {i}"))?;
        let s = push(dir, home, &format!("round {i}"))?;
        served(&router, &host, &format!("round {i}")).await?;
        println!(
            "{}",
            serde_json::json!({"case": "one_line_change", "round": i, "stages_ms": s})
        );
        rounds.push(s);
    }
    println!();
    println!("| push | total | receive | checkout | pack | upload | build (slug) | release |");
    println!("|---|---|---|---|---|---|---|---|");
    let row = |name: &str, s: &Stages| {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} ({}) | {} |",
            s.total, s.receive, s.checkout, s.pack, s.upload, s.build, s.slug, s.release
        )
    };
    row("first", &first);
    if !rounds.is_empty() {
        for (name, p) in [("one-line change, p50", 0.5), ("one-line change, max", 1.0)] {
            let pick = |f: fn(&Stages) -> u64| pct(&rounds.iter().map(f).collect::<Vec<_>>(), p);
            let s = Stages {
                total: pick(|s| s.total),
                receive: pick(|s| s.receive),
                checkout: pick(|s| s.checkout),
                pack: pick(|s| s.pack),
                upload: pick(|s| s.upload),
                build: pick(|s| s.build),
                slug: pick(|s| s.slug),
                release: pick(|s| s.release),
            };
            row(name, &s);
        }
    }
    if opts.large_mb > 0 {
        large(opts.large_mb, cluster, home).await?;
    }
    Ok(())
}

/// Writes the app of `kind` answering `text`: a one-line change from the last round.
fn write_app(dir: &Path, kind: &str, text: &str) -> anyhow::Result<()> {
    match kind {
        "static" => std::fs::write(dir.join("index.html"), format!("{text}\n"))?,
        "python" => {
            std::fs::write(dir.join("requirements.txt"), "")?;
            std::fs::write(
                dir.join("app.py"),
                format!(
                    "import os, http.server\n\
                     class H(http.server.BaseHTTPRequestHandler):\n\
                     \x20   def do_GET(self):\n\
                     \x20       body = b'{text}\\n'\n\
                     \x20       self.send_response(200)\n\
                     \x20       self.send_header('Content-Length', str(len(body)))\n\
                     \x20       self.end_headers()\n\
                     \x20       self.wfile.write(body)\n\
                     http.server.HTTPServer(('', int(os.environ['PORT'])), H).serve_forever()\n"
                ),
            )?
        }
        "node" => {
            std::fs::write(
                dir.join("package.json"),
                r#"{"name": "bench", "version": "1.0.0", "scripts": {"start": "node server.js"}}"#,
            )?;
            std::fs::write(
                dir.join("server.js"),
                format!(
                    "require('http').createServer((q, r) => r.end('{text}\\n'))\n\
                     \x20 .listen(Number(process.env.PORT));\n"
                ),
            )?
        }
        other => bail!("--app {other}: static, python or node"),
    }
    Ok(())
}

/// Creates `app` and a new checkout whose remote `flynn` is its repository.
fn new_app(
    cluster: &local_cluster::LocalCluster,
    home: &Path,
    app: &str,
) -> anyhow::Result<tempfile::TempDir> {
    cluster.flynn(&["create", app])?;
    let work = tempfile::tempdir()?;
    let dir = work.path();
    git(dir, home, &["init", "--quiet", "--initial-branch=main"])?;
    let url = format!("{}/{app}.git", cluster.url);
    git(dir, home, &["remote", "add", "flynn", &url])?;
    Ok(work)
}

/// One push of a repository with an `mb` MB blob and 2,000 small files.
async fn large(mb: u64, cluster: &local_cluster::LocalCluster, home: &Path) -> anyhow::Result<()> {
    let work = new_app(cluster, home, "big")?;
    let dir = work.path();
    // Random bytes do not compress: the pack is as large as the blob.
    let mut blob = std::fs::File::create(dir.join("large.bin"))?;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    std::io::copy(&mut std::io::Read::take(&mut urandom, mb << 20), &mut blob)?;
    for i in 0..2000 {
        let sub = dir.join(format!("files/{:02}", i % 50));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("{i}.txt")), format!("file {i}\n"))?;
    }
    std::fs::write(dir.join("index.html"), "big\n")?;
    let daemon_before = rss_of("flynn-host");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut git_peak, mut daemon_peak) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                git_peak = git_peak.max(rss_of("receive-pack") + rss_of("git-hook"));
                daemon_peak = daemon_peak.max(rss_of("flynn-host"));
                std::thread::sleep(Duration::from_millis(50));
            }
            (git_peak, daemon_peak)
        })
    };
    let s = push(dir, home, "large")?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (git_peak, daemon_peak) = sampler.join().expect("sampler");
    served(
        "http://127.0.0.1:18080/",
        &format!("big.{}", local_cluster::DOMAIN),
        "big",
    )
    .await?;
    println!(
        "{}",
        serde_json::json!({"case": "large_push", "mb": mb, "stages_ms": s,
            "git_service_peak_rss_kib": git_peak,
            "daemons_rss_kib_before": daemon_before, "daemons_peak_rss_kib": daemon_peak})
    );
    println!();
    println!(
        "large push ({mb} MB blob, 2,000 files): {} ms (receive {}, checkout {}, pack {}, upload {}, build {} of which slug {}, release {}); git service peak RSS {} MiB; the three daemons {} -> {} MiB",
        s.total, s.receive, s.checkout, s.pack, s.upload, s.build, s.slug, s.release,
        git_peak / 1024, daemon_before / 1024, daemon_peak / 1024
    );
    Ok(())
}
