//! `flynn cluster backup`, `flynn export` and `flynn import`: archives streamed between a
//! file and the cluster, with progress on stderr. A download goes to a temporary file
//! beside the target and is renamed only when whole, so a failed backup never leaves a
//! file that looks like one.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flynn_client::ControllerClient;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// Prints `bytes, rate` at most every second (and once at the end).
struct Progress {
    what: &'static str,
    started: Instant,
    last: Instant,
    bytes: u64,
    tty: bool,
}

impl Progress {
    fn new(what: &'static str) -> Self {
        let now = Instant::now();
        Progress {
            what,
            started: now,
            last: now,
            bytes: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{} {}, {}/s",
            self.what,
            human(self.bytes),
            human((self.bytes as f64 / secs) as u64)
        )
    }

    fn add(&mut self, n: u64) {
        self.bytes += n;
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            if self.tty {
                eprint!("\r{}   ", self.line());
            } else {
                eprintln!("{}", self.line());
            }
        }
    }

    fn done(&self) {
        if self.tty {
            eprintln!("\r{}   ", self.line());
        } else {
            eprintln!("{}", self.line());
        }
    }
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Streams a response body into `file` (or stdout when not a terminal). The file is the
/// owner's alone (0600): a backup holds every secret of the cluster, an export its app's.
async fn save(resp: reqwest::Response, file: Option<&Path>) -> anyhow::Result<u64> {
    let mut progress = Progress::new("wrote");
    let mut body = resp.bytes_stream();
    match file {
        Some(path) => {
            let tmp = temp_beside(path);
            let written: anyhow::Result<()> = async {
                let mut out = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .await
                    .with_context(|| format!("creating {}", tmp.display()))?;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.context("the archive broke off; nothing was kept")?;
                    out.write_all(&chunk).await?;
                    progress.add(chunk.len() as u64);
                }
                out.sync_all().await?;
                Ok(())
            }
            .await;
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        }
        None => {
            if std::io::stdout().is_terminal() {
                bail!("refusing to write an archive to a terminal: pass --file FILE or redirect stdout");
            }
            let mut out = tokio::io::stdout();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("the archive broke off")?;
                out.write_all(&chunk).await?;
                progress.add(chunk.len() as u64);
            }
            out.flush().await?;
        }
    }
    progress.done();
    Ok(progress.bytes)
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    path.with_file_name(format!(".{name}.partial"))
}

fn header(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `flynn cluster backup [--file FILE]`.
pub async fn backup(client: &ControllerClient, file: Option<&Path>) -> anyhow::Result<()> {
    let resp = client.backup().await?;
    let blobs = header(&resp, "x-flynn-backup-blobs");
    let blob_bytes = header(&resp, "x-flynn-backup-blob-bytes");
    let external = header(&resp, "x-flynn-backup-external-blobs");
    let volumes = header(&resp, "x-flynn-backup-volumes");
    let revision = header(&resp, "x-flynn-backup-revision");
    let skipped = header(&resp, "x-flynn-backup-skipped");
    let databases = header(&resp, "x-flynn-backup-databases");
    eprintln!(
        "backing up the cluster at revision {revision}: state, {blobs} blob(s) ({}), {volumes} volume(s), {databases} database dump(s)",
        human(blob_bytes)
    );
    if external > 0 {
        eprintln!(
            "{external} blob(s) on S3, GCS or Azure are referenced, not copied: they stay in their buckets"
        );
    }
    if skipped > 0 {
        eprintln!("{skipped} item(s) cannot be carried; MANIFEST.json in the archive lists them");
    }
    let n = save(resp, file).await?;
    if let Some(f) = file {
        eprintln!("backup of {} written to {}", human(n), f.display());
    }
    Ok(())
}

/// `flynn -a APP export [--file FILE]`.
pub async fn export(
    client: &ControllerClient,
    app: &str,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let resp = client.export_app(app).await?;
    let n = save(resp, file).await?;
    if let Some(f) = file {
        eprintln!("exported {app} ({}) to {}", human(n), f.display());
    }
    Ok(())
}

/// `flynn import --file FILE [--name NAME] [--routes]` (stdin without `--file`).
pub async fn import(
    client: &ControllerClient,
    file: Option<&Path>,
    name: Option<&str>,
    routes: bool,
) -> anyhow::Result<()> {
    // A name that cannot be taken is refused before anything is uploaded.
    if let Some(name) = name {
        flynn_model::check_dns_label(name, "app name").map_err(|e| anyhow::anyhow!(e))?;
        if client.app(name).await.is_ok() {
            bail!("an app named {name:?} exists; import under another name with --name");
        }
    }
    let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match file {
        Some(f) => Box::new(
            tokio::fs::File::open(f)
                .await
                .with_context(|| format!("opening {}", f.display()))?,
        ),
        None => {
            if std::io::stdin().is_terminal() {
                bail!("give the export with --file FILE or on stdin");
            }
            Box::new(tokio::io::stdin())
        }
    };
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new("sent")));
    let counting = progress.clone();
    let chunks = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).map(move |c| {
        if let Ok(b) = &c {
            counting.lock().expect("progress").add(b.len() as u64);
        }
        c
    });
    let out = client
        .import_app(name, routes, reqwest::Body::wrap_stream(chunks))
        .await;
    progress.lock().expect("progress").done();
    let out = out?;
    println!(
        "Imported {} (release {}), routes: {}",
        out["app"].as_str().unwrap_or("?"),
        out["release"].as_str().unwrap_or("none"),
        out["routes"]
            .as_array()
            .map(|r| r
                .iter()
                .filter_map(|d| d.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    for d in out["databases"].as_array().into_iter().flatten() {
        println!(
            "Restored {} resource {} into a new one, {}",
            d["provider"].as_str().unwrap_or("?"),
            d["from"].as_str().unwrap_or("?"),
            d["id"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
