//! `flynn docker push`, `release`, `scale`, `ps`, `log`, `kill` and `limit`.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use flynn_cli_util::{log_line, print_table, rfc3339_ms};
use flynn_client::{ControllerClient, ScaleRequest, SetLimits};
use flynn_model::{Image, JobState, Layer, Limits, LogQuery, NewRelease, ProcessType};

use crate::image::{hash_layer, Archive};

#[derive(Subcommand)]
pub enum DockerCmd {
    /// Deploy an image from a `docker save` or OCI image-layout archive (IMAGE.tar).
    Push {
        image: std::path::PathBuf,
        /// Make the release without waiting for it to run.
        #[arg(long, visible_alias = "detach")]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum BaseImageCmd {
    /// Upload an image archive (`docker save` or OCI layout) as the base image, or as
    /// another named image: `--name databases` is what `flynn resource add` runs
    /// (`script/base-image IMAGE.tar --databases` makes it).
    Push {
        #[arg(long, default_value = "base")]
        name: String,
        image: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ReleaseCmd {
    /// Show a release (default: the current one).
    Show {
        #[arg(long)]
        json: bool,
        id: Option<String>,
    },
    /// Deploy the current image with process types from a JSON file
    /// (`{"processes": {"web": {"args": [...], "ports": true, "volumes": [{"path": "/data"}]}}}`):
    /// the types it names replace the current release's, the others stay. Waits for it to
    /// run, printing progress (rolled back if it cannot), unless --detach.
    Update {
        file: std::path::PathBuf,
        /// Make the release without waiting for it to run.
        #[arg(short = 'd', long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
pub enum LimitCmd {
    /// Set limits of a process type, keeping the ones not named:
    /// `flynn limit set web memory=256MB cpu=500m max_fd=1024 procs=100`. `cpu` is reserved
    /// in millicores (`500m`, `1500`, `2cores`): the type runs only where that much is free.
    Set {
        proc_type: String,
        /// Make the release without waiting for it to run.
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(required = true)]
        limits: Vec<String>,
    },
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Uploads an image archive's layers the cluster lacks; the image.
async fn push_archive(client: &ControllerClient, path: &Path) -> anyhow::Result<Image> {
    let archive = std::sync::Arc::new(Archive::open(path)?);
    let parsed = archive.parse()?;
    let total = parsed.layers.len();
    let mut layers = Vec::new();
    for (i, src) in parsed.layers.iter().enumerate() {
        // Hash off the async threads: a layer can be gigabytes.
        let hashed = {
            let (a, src) = (archive.clone(), src.clone());
            tokio::task::spawn_blocking(move || hash_layer(&a, &src)).await??
        };
        let open = |_: &()| archive.reader(&src.name);
        let label = format!("layer {}/{total}", i + 1);
        layers.push(upload_layer(client, &label, hashed, src.size, open).await?);
    }
    Ok(Image {
        layers,
        config: parsed.config,
    })
}

/// Uploads one layer unless the cluster has it already.
async fn upload_layer(
    client: &ControllerClient,
    label: &str,
    hashed: crate::image::Hashed,
    size: u64,
    open: impl Fn(&()) -> anyhow::Result<std::io::Take<std::fs::File>>,
) -> anyhow::Result<Layer> {
    let short = &hashed.sha512[..12];
    if client.has_layer(&hashed.sha512).await? {
        eprintln!("{label} {short} ({}) already in the cluster", mb(size));
    } else {
        eprintln!("{label} {short} ({}) uploading", mb(size));
        let body = progress_body(open(&())?, size)?;
        client
            .put_layer(&hashed.sha512, body)
            .await
            .with_context(|| format!("uploading layer {short}"))?;
    }
    Ok(Layer {
        sha512: hashed.sha512,
        size,
        compression: hashed.compression,
    })
}

pub async fn docker_push(
    client: &ControllerClient,
    app: &str,
    path: &Path,
    no_wait: bool,
) -> anyhow::Result<()> {
    let image = push_archive(client, path).await?;
    let req = NewRelease {
        image,
        processes: None,
    };
    let release = crate::rollout::deploy(client, app, &req, no_wait).await?;
    println!("Created release {}", release.id);
    Ok(())
}

/// `flynn base-image push IMAGE.tar`: the image `flynn deploy DIR` builds on.
pub async fn base_image_push(
    client: &ControllerClient,
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let image = push_archive(client, path).await?;
    client.put_image(name, &image).await?;
    println!(
        "The cluster's {name} image is now {} ({} layers).",
        path.display(),
        image.layers.len()
    );
    Ok(())
}

pub async fn base_image_show(client: &ControllerClient, name: &str) -> anyhow::Result<()> {
    let image = client.image(name).await?;
    for l in &image.layers {
        println!(
            "layer {} {} {:?}",
            &l.sha512[..16],
            mb(l.size),
            l.compression
        );
    }
    Ok(())
}

/// The process types of a `Procfile` (`name: command`), each run by `/bin/sh -c`; `web`
/// serves on `$PORT`.
pub fn parse_procfile(text: &str) -> anyhow::Result<BTreeMap<String, ProcessType>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, cmd) = line
            .split_once(':')
            .with_context(|| format!("Procfile line {}: not NAME: COMMAND", n + 1))?;
        let (name, cmd) = (name.trim(), cmd.trim());
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid || cmd.is_empty() {
            bail!(
                "Procfile line {}: {line:?} is not NAME: COMMAND (lowercase names)",
                n + 1
            );
        }
        out.insert(
            name.to_string(),
            ProcessType {
                args: vec!["/bin/sh".into(), "-c".into(), cmd.to_string()],
                ports: name == "web",
                ..ProcessType::default()
            },
        );
    }
    if out.is_empty() {
        bail!("the Procfile names no process type");
    }
    Ok(out)
}

/// `flynn deploy DIR` (and `git push`, after checking out the pushed revision): DIR as one
/// layer at /app on the base image. A tree with its own `bin/compile`, buildpacks named in
/// `.buildpacks` or the app's `BUILDPACK_URL`, or one a shipped buildpack detects (other
/// than `procfile`) is built first; a tree with only a Procfile runs as it is.
pub async fn deploy_dir(
    client: &ControllerClient,
    app: &str,
    dir: &Path,
    no_wait: bool,
) -> anyhow::Result<DeployTimes> {
    let mut times = DeployTimes::default();
    let mut stage = Instant::now();
    let mut lap = |into: &mut u64| {
        *into = stage.elapsed().as_millis() as u64;
        stage = Instant::now();
    };
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let procfile = match std::fs::read_to_string(dir.join("Procfile")) {
        Ok(text) => Some(parse_procfile(&text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("{}: {e}", dir.join("Procfile").display()),
    };
    let compile = dir.join("bin/compile");
    if compile.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&compile)?.permissions().mode();
        if mode & 0o111 == 0 {
            bail!(
                "{} is not executable (chmod +x it): a build runs it",
                compile.display()
            );
        }
    }
    let env = client.env(app, None).await?;
    let builds = flynn_buildpacks::needs_build(dir)
        || env
            .get("BUILDPACK_URL")
            .is_some_and(|u| !u.trim().is_empty());
    let base = client.image("base").await?;
    // The directory as a deterministic gzip tar: the same tree is the same layer.
    let tmp = tempfile::NamedTempFile::new()?;
    let (src, dst) = (dir.to_path_buf(), tmp.path().to_path_buf());
    let (hashed, size) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let out = std::fs::File::create(&dst)?;
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.follow_symlinks(false);
        append_source(&mut tar, &src, Path::new("app"))
            .with_context(|| format!("reading {}", src.display()))?;
        tar.into_inner()?.finish()?.sync_all()?;
        let size = std::fs::metadata(&dst)?.len();
        Ok((crate::image::hash_file(&dst)?, size))
    })
    .await??;
    lap(&mut times.pack_ms);
    let path = tmp.path().to_path_buf();
    let open = |_: &()| -> anyhow::Result<std::io::Take<std::fs::File>> {
        Ok(std::io::Read::take(std::fs::File::open(&path)?, size))
    };
    let layer = upload_layer(client, "app layer", hashed, size, open).await?;
    lap(&mut times.upload_ms);
    // A built /app, not the source, is what runs; the build says which process types it
    // ended with (the app's Procfile, or its buildpack's defaults).
    let (layer, processes) = if builds {
        let built = build(client, app, layer).await?;
        lap(&mut times.build_ms);
        times.slug_ms = built.slug_ms;
        let mut processes = match procfile {
            Some(p) => p,
            None => parse_procfile(built.procfile.as_deref().unwrap_or_default())
                .context("the build left no process types")?,
        };
        if built.profile {
            for p in processes.values_mut() {
                source_profile(&mut p.args);
            }
        }
        (built.slug, processes)
    } else {
        let processes = procfile.context("the source has no Procfile")?;
        (layer, processes)
    };
    let mut image = base;
    image.layers.push(layer);
    image.config.working_dir = "/app".into();
    let req = NewRelease {
        image,
        processes: Some(processes),
    };
    let release = crate::rollout::deploy(client, app, &req, no_wait).await?;
    lap(&mut times.release_ms);
    println!("Created release {}", release.id);
    Ok(times)
}

/// How long each stage of a deploy took, in milliseconds: packing the source, uploading
/// it, the build (with `slug_ms` of it storing the slug), and the release rolled out.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeployTimes {
    pub pack_ms: u64,
    pub upload_ms: u64,
    pub build_ms: u64,
    pub slug_ms: u64,
    pub release_ms: u64,
}

/// Makes a process of a built slug source its buildpacks' `/app/.profile.d/*.sh` first (as
/// Flynn's slugrunner did), so a virtualenv's or node_modules' commands are on its PATH.
fn source_profile(args: &mut [String]) {
    if let [sh, c, cmd] = args {
        if sh == "/bin/sh" && c == "-c" {
            *cmd =
                format!("for f in /app/.profile.d/*.sh; do [ -r \"$f\" ] && . \"$f\"; done; {cmd}");
        }
    }
}

/// Appends the tree at `dir` under `name`, entries in name order (the same tree is the same
/// layer, whatever order the filesystem lists it in), leaving out version control
/// directories: a deploy sends the app, not its history.
fn append_source<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
) -> std::io::Result<()> {
    tar.append_dir(name, dir)?;
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let file_name = e.file_name();
        if [".git", ".hg", ".svn"].iter().any(|vcs| file_name == *vcs) {
            continue;
        }
        let (path, inner) = (e.path(), name.join(&file_name));
        if e.file_type()?.is_dir() {
            append_source(tar, &path, &inner)?;
        } else {
            tar.append_path_with_name(&path, &inner)?;
        }
    }
    Ok(())
}

/// What a successful build left: its slug, its process types, whether it has profile
/// scripts.
#[derive(serde::Deserialize)]
struct Built {
    slug: Layer,
    #[serde(default)]
    procfile: Option<String>,
    #[serde(default)]
    profile: bool,
    /// Of the build's time, how long packing and storing the slug took.
    #[serde(default)]
    slug_ms: u64,
}

/// Runs a build job of the uploaded source, its output on stderr; what it left.
async fn build(client: &ControllerClient, app: &str, source: Layer) -> anyhow::Result<Built> {
    let job = client
        .build(app, &flynn_client::BuildRequest { source })
        .await?;
    eprintln!("building {app} ({})...", job.id);
    let end = attach(client, app, &job.id, true, true).await?;
    if end["interrupted"] == true {
        bail!("interrupted: the build was stopped; nothing was deployed");
    }
    let code = end["exit"].as_i64().unwrap_or(1);
    if code != 0 {
        bail!("the build failed (bin/compile exited {code}); nothing was deployed");
    }
    serde_json::from_value(end["result"].clone())
        .context("the build ended without a slug; nothing was deployed")
}

/// The layer's bytes as a request body, with progress on stderr when it is a terminal.
fn progress_body(r: std::io::Take<std::fs::File>, size: u64) -> anyhow::Result<reqwest::Body> {
    // The reader is positioned at the layer's first byte.
    let file = tokio::fs::File::from_std(r.into_inner());
    let reader = tokio::io::AsyncReadExt::take(file, size);
    let tty = std::io::stderr().is_terminal();
    let mut sent = 0u64;
    let mut last = Instant::now();
    let chunks = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
    let stream = counted(chunks, move |n| {
        sent += n;
        if tty && (last.elapsed() > Duration::from_millis(250) || sent == size) {
            last = Instant::now();
            let pct = sent as f64 * 100.0 / size.max(1) as f64;
            eprint!("\r  {} / {} ({pct:.0}%)", mb(sent), mb(size));
            if sent == size {
                eprintln!();
            }
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// Calls `seen` with each chunk's length as it passes.
fn counted<S>(
    s: S,
    mut seen: impl FnMut(u64) + Send + 'static,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    use futures::StreamExt;
    s.map(move |chunk| {
        if let Ok(b) = &chunk {
            seen(b.len() as u64);
        }
        chunk
    })
}

pub async fn release_cmd(
    client: &ControllerClient,
    app: &str,
    cmd: Option<ReleaseCmd>,
) -> anyhow::Result<()> {
    match cmd {
        None => {
            let current = client.formation(app).await?.release;
            let rows: Vec<Vec<String>> = client
                .releases(app)
                .await?
                .iter()
                .rev()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        if r.id == current { "*" } else { "" }.to_string(),
                        r.processes.keys().cloned().collect::<Vec<_>>().join(","),
                        r.image.layers.len().to_string(),
                        rfc3339_ms(r.created_ms),
                    ]
                })
                .collect();
            print_table(&["ID", "CURRENT", "TYPES", "LAYERS", "CREATED"], &rows);
        }
        Some(ReleaseCmd::Update { file, detach }) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Update {
                processes: BTreeMap<String, ProcessType>,
            }
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let update: Update = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a process type update", file.display()))?;
            let f = client.formation(app).await?;
            if f.release.is_empty() {
                bail!("{app} has no release to update: deploy one first");
            }
            let current = client.release(&f.release).await?;
            let mut processes = current.processes.clone();
            processes.extend(update.processes);
            let req = NewRelease {
                image: current.image,
                processes: Some(processes),
            };
            let r = crate::rollout::deploy(client, app, &req, detach).await?;
            println!("deployed {}", r.id);
        }
        Some(ReleaseCmd::Show { json, id }) => {
            let id = match id {
                Some(id) => id,
                None => {
                    let f = client.formation(app).await?;
                    if f.release.is_empty() {
                        bail!("{app} has no release yet");
                    }
                    f.release
                }
            };
            let r = client.release(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!("ID:       {}", r.id);
            println!("Created:  {}", rfc3339_ms(r.created_ms));
            for l in &r.image.layers {
                println!(
                    "Layer:    {} {} {:?}",
                    &l.sha512[..16],
                    mb(l.size),
                    l.compression
                );
            }
            let c = &r.image.config;
            println!(
                "Command:  {}",
                [c.entrypoint.clone(), c.cmd.clone()].concat().join(" ")
            );
            for (name, p) in &r.processes {
                let args = if p.args.is_empty() {
                    "(image command)".to_string()
                } else {
                    p.args.join(" ")
                };
                let volumes: Vec<&str> = p.volumes.iter().map(|v| v.path.as_str()).collect();
                println!(
                    "Process:  {name}: {args}{}{}",
                    if p.ports { " [port]" } else { "" },
                    if volumes.is_empty() {
                        String::new()
                    } else {
                        format!(" [volumes {}]", volumes.join(" "))
                    }
                );
            }
            for (k, v) in &r.env {
                println!("Env:      {k}={v}");
            }
        }
    }
    Ok(())
}

fn parse_counts(counts: &[String]) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for c in counts {
        let (t, n) = c
            .split_once('=')
            .with_context(|| format!("{c:?} is not TYPE=COUNT"))?;
        let n: i64 = n
            .parse()
            .with_context(|| format!("{c:?}: {n:?} is not a number"))?;
        out.insert(t.to_string(), n);
    }
    Ok(out)
}

pub async fn scale(
    client: &ControllerClient,
    app: &str,
    counts: &[String],
    no_wait: bool,
) -> anyhow::Result<()> {
    if counts.is_empty() {
        let f = client.formation(app).await?;
        let parts: Vec<String> = f
            .processes
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        println!("{}", parts.join(" "));
        return Ok(());
    }
    let req = ScaleRequest {
        processes: parse_counts(counts)?,
    };
    let f = client.scale(app, &req).await?;
    if no_wait {
        return Ok(());
    }
    // Wait until exactly the asked counts run the formation's release.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = client.jobs(app).await?;
        let settled = req.processes.iter().all(|(t, n)| {
            let of_type = |ok: &dyn Fn(JobState) -> bool| {
                jobs.iter()
                    .filter(|j| j.proc_type == *t && !j.oneoff && ok(j.state))
                    .count() as i64
            };
            let running = jobs
                .iter()
                .filter(|j| {
                    j.proc_type == *t && j.release == f.release && j.state == JobState::Running
                })
                .count() as i64;
            running == *n && of_type(&|s| s.is_active()) == *n
        });
        if settled {
            break;
        }
        if Instant::now() > deadline {
            bail!("scaled, but the jobs did not all settle within 120s (see `flynn -a {app} ps`)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let parts: Vec<String> = req
        .processes
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    println!("scaled {app}: {}", parts.join(" "));
    Ok(())
}

pub async fn ps(client: &ControllerClient, app: &str, all: bool) -> anyhow::Result<()> {
    let mut jobs = client.jobs(app).await?;
    jobs.retain(|j| all || j.state.is_active());
    jobs.sort_by_key(|j| (j.proc_type.clone(), j.created_ms));
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.proc_type.clone(),
                format!("{:?}", j.state).to_lowercase(),
                j.host.to_string(),
                j.addr.clone().unwrap_or_default(),
                j.release.clone(),
                j.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["ID", "TYPE", "STATE", "HOST", "ADDR", "RELEASE", "ERROR"],
        &rows,
    );
    Ok(())
}

pub struct LogArgs {
    pub follow: bool,
    pub lines: Option<usize>,
    pub job: Option<String>,
    pub proc_type: Option<String>,
}

pub async fn log(client: &ControllerClient, app: &str, a: LogArgs) -> anyhow::Result<()> {
    let mut q = LogQuery {
        app: app.to_string(),
        job: a.job,
        proc_type: a.proc_type,
        lines: a.lines,
        after: None,
    };
    let mut seen: HashSet<(u64, u64, u64)> = HashSet::new();
    loop {
        let lines = client.app_log(&q).await?;
        for l in &lines {
            if seen.insert(l.key()) {
                println!("{}", log_line(l.ts, &l.app, &l.proc_type, &l.job, &l.msg));
            }
        }
        if !a.follow {
            return Ok(());
        }
        if let Some(last) = lines.last() {
            // Lines of another host may land a little later with an earlier time: re-ask
            // from a second back and skip what was printed.
            let back = last.ts.saturating_sub(1000);
            q.after = Some(format!("{back}-0-0"));
        }
        q.lines = None;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn parse_bytes(v: &str) -> anyhow::Result<u64> {
    flynn_model::parse_size(v).map_err(anyhow::Error::msg)
}

pub async fn limit(
    client: &ControllerClient,
    app: &str,
    cmd: Option<LimitCmd>,
) -> anyhow::Result<()> {
    match cmd {
        None => {
            let f = client.formation(app).await?;
            if f.release.is_empty() {
                bail!("{app} has no release yet");
            }
            let r = client.release(&f.release).await?;
            for (t, p) in &r.processes {
                let l = &p.limits;
                let mut parts = Vec::new();
                if let Some(m) = l.memory {
                    parts.push(format!("memory={}MB", m >> 20));
                }
                if let Some(c) = l.cpu_millis {
                    parts.push(format!("cpu={c}m"));
                }
                if let Some(c) = l.cpu_shares {
                    parts.push(format!("cpu_shares={c}"));
                }
                if let Some(n) = l.max_procs {
                    parts.push(format!("procs={n}"));
                }
                if let Some(n) = l.max_fd {
                    parts.push(format!("max_fd={n}"));
                }
                println!("{t}: {}", parts.join(" "));
            }
        }
        Some(LimitCmd::Set {
            proc_type,
            detach,
            limits,
        }) => {
            // The type's limits now, so the ones not named here stay as they are.
            let f = client.formation(app).await?;
            let mut l = if f.release.is_empty() {
                Limits::default()
            } else {
                let r = client.release(&f.release).await?;
                r.processes
                    .get(&proc_type)
                    .map(|p| p.limits.clone())
                    .unwrap_or_default()
            };
            for kv in &limits {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("{kv:?} is not NAME=VALUE"))?;
                let num = || -> anyhow::Result<u64> {
                    v.parse()
                        .with_context(|| format!("{kv:?}: {v:?} is not a number"))
                };
                match k {
                    "memory" => l.memory = Some(parse_bytes(v)?),
                    "cpu" => {
                        l.cpu_millis = Some(flynn_model::parse_cpu(v).map_err(anyhow::Error::msg)?)
                    }
                    "cpu_shares" => l.cpu_shares = Some(num()?),
                    "procs" | "max_procs" => l.max_procs = Some(num()?),
                    "max_fd" => l.max_fd = Some(num()?),
                    _ => bail!("unknown limit {k:?} (memory, cpu, cpu_shares, procs, max_fd)"),
                }
            }
            let r = client
                .set_limits(
                    app,
                    &SetLimits {
                        proc_type,
                        limits: l,
                    },
                )
                .await?;
            println!("Created release {}", r.id);
            if !detach {
                crate::rollout::follow(client, app, &r.id).await?;
            }
        }
    }
    Ok(())
}

/// `flynn run`: starts the job, passes piped stdin, copies its output; its exit status.
/// With `tty` the job runs on a pty: this terminal (if it is one) is put in raw mode so
/// every key goes to the job, and its size follows this one's.
/// With `provider`, the job runs on that provider's server image with the app's resource
/// env (`flynn pg psql`), as a job of the server's app.
pub async fn run(
    client: &ControllerClient,
    app: &str,
    args: Vec<String>,
    detached: bool,
    tty: bool,
    provider: Option<&str>,
) -> anyhow::Result<i32> {
    let stdin = !detached && (tty || !std::io::stdin().is_terminal());
    let size = tty.then(terminal::size);
    let job = client
        .run(
            app,
            &flynn_client::RunRequest {
                args,
                stdin,
                tty: size,
                provider: provider.map(str::to_string),
            },
        )
        .await?;
    if detached {
        println!("{}", job.id);
        return Ok(0);
    }
    let app = job.app.as_str();
    // Restored when this returns, whatever the way out.
    let _raw = if tty { terminal::Raw::enter() } else { None };
    if stdin {
        let (client, app, id) = (client.clone(), app.to_string(), job.id.clone());
        tokio::spawn(async move {
            let input = tokio_util::io::ReaderStream::with_capacity(tokio::io::stdin(), 4096);
            if let Err(e) = client
                .job_stdin(&app, &id, reqwest::Body::wrap_stream(input))
                .await
            {
                eprintln!("flynn: stdin not passed: {e}");
            }
        });
    }
    if tty {
        let (client, app, id) = (client.clone(), app.to_string(), job.id.clone());
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                let _ = client.job_resize(&app, &id, terminal::size()).await;
            }
        });
    }
    let end = attach(client, app, &job.id, false, !tty).await?;
    Ok(end["exit"].as_i64().unwrap_or(1) as i32)
}

/// Runs a one-off job (on `provider`'s server image with the app's resource env) with no
/// terminal: stdin from `input` (else none), stdout into `output` (else this stdout), stderr
/// here; its exit status. ^C stops it.
pub async fn run_piped(
    client: &ControllerClient,
    app: &str,
    args: Vec<String>,
    provider: Option<&str>,
    input: Option<std::fs::File>,
    output: Option<&mut std::fs::File>,
) -> anyhow::Result<i32> {
    let job = client
        .run(
            app,
            &flynn_client::RunRequest {
                args,
                stdin: input.is_some(),
                tty: None,
                provider: provider.map(str::to_string),
            },
        )
        .await?;
    let app = job.app.as_str();
    if let Some(file) = input {
        let (client, app, id) = (client.clone(), app.to_string(), job.id.clone());
        tokio::spawn(async move {
            let file = tokio::fs::File::from_std(file);
            let body = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
            if let Err(e) = client
                .job_stdin(&app, &id, reqwest::Body::wrap_stream(body))
                .await
            {
                eprintln!("flynn: input not passed: {e}");
            }
        });
    }
    let id = job.id.clone();
    let end = tokio::select! {
        end = copy_output(client, app, &id, false, output) => end?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nflynn: interrupted: stopping job {id}");
            let _ = client.kill_job(app, &id).await;
            serde_json::json!({"exit": 130})
        }
    };
    Ok(end["exit"].as_i64().unwrap_or(1) as i32)
}

/// The local terminal: its size, and raw mode while a job has it.
mod terminal {
    use flynn_model::TtySize;
    use nix::sys::termios::{self, SetArg, Termios};
    use std::io::IsTerminal;
    use std::os::fd::AsRawFd;

    /// This terminal's size (stdout's, else stdin's); 80x24 when neither is a terminal.
    pub fn size() -> TtySize {
        for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            #[allow(unsafe_code)]
            // SAFETY: TIOCGWINSZ writes a winsize through a pointer to a live local.
            let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
            if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
                return TtySize {
                    cols: ws.ws_col,
                    rows: ws.ws_row,
                };
            }
        }
        TtySize { cols: 80, rows: 24 }
    }

    /// Raw mode on stdin while it lives, so keys (^C too) go to the job's terminal, which
    /// does the echoing and line editing.
    pub struct Raw(Termios);

    impl Raw {
        pub fn enter() -> Option<Raw> {
            let stdin = std::io::stdin();
            if !stdin.is_terminal() {
                return None;
            }
            let saved = termios::tcgetattr(&stdin).ok()?;
            let mut raw = saved.clone();
            termios::cfmakeraw(&mut raw);
            termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
            Some(Raw(saved))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.0);
        }
    }
}

/// Copies a one-off job's output (to stdout and stderr, or all of it to stderr) until it
/// ends; its last line (`{"exit":N}`, with what the job left in `result`).
async fn attach(
    client: &ControllerClient,
    app: &str,
    id: &str,
    all_to_stderr: bool,
    stop_on_interrupt: bool,
) -> anyhow::Result<serde_json::Value> {
    let output = copy_output(client, app, id, all_to_stderr, None);
    if !stop_on_interrupt {
        return output.await;
    }
    // ^C here stops the job there too, as it would a local command (on a pty ^C is a key
    // for the job instead, and never gets here).
    tokio::select! {
        end = output => end,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nflynn: interrupted: stopping job {id}");
            if let Err(e) = client.kill_job(app, id).await {
                eprintln!("flynn: job {id} not stopped: {e}");
            }
            Ok(serde_json::json!({"exit": 130, "interrupted": true}))
        }
    }
}

async fn copy_output(
    client: &ControllerClient,
    app: &str,
    id: &str,
    all_to_stderr: bool,
    mut stdout_to: Option<&mut std::fs::File>,
) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    use futures::StreamExt;
    use std::io::Write;
    let resp = client.job_output(app, id).await?;
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut lost = false;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the job's output")?;
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let v: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v["exit"].is_i64() {
                if lost && stdout_to.is_some() {
                    bail!("job {id} wrote output faster than it was read before this command attached: the file is incomplete");
                }
                return Ok(v);
            }
            lost |= v["dropped"] == true;
            let Some(data) = v["data"].as_str() else {
                continue; // a heartbeat
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap_or_default();
            if let (Some(f), false) = (stdout_to.as_deref_mut(), v["stream"] == "stderr") {
                f.write_all(&bytes)
                    .context("writing the job's output to the file")?;
            } else if all_to_stderr || v["stream"] == "stderr" {
                let mut e = std::io::stderr();
                e.write_all(&bytes)?;
                e.flush()?;
            } else {
                let mut o = std::io::stdout();
                o.write_all(&bytes)?;
                o.flush()?;
            }
        }
    }
    bail!("the connection to job {id} ended before it did (see flynn -a {app} ps --all)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn t10_procfiles_and_counts_parse_or_say_why() {
        let p = super::parse_procfile("# app\nweb: exec httpd -p $PORT\nworker: ./work\n").unwrap();
        assert!(p["web"].ports && !p["worker"].ports);
        assert_eq!(p["worker"].args, ["/bin/sh", "-c", "./work"]);
        assert!(super::parse_procfile("Web: x").is_err());
        assert!(super::parse_procfile("\n# nothing\n").is_err());
        let c = super::parse_counts(&["web=3".into(), "worker=-1".into()]).unwrap();
        assert_eq!(
            c["worker"], -1,
            "negative counts reach the server, which says why"
        );
        assert!(super::parse_counts(&["web".into()]).is_err());
    }
}
