//! `POST /_migrate`: copies every file not on the default backend to it, as
//! `flynn-blobstore migrate` asks. Each file is copied, its new copy checked against the
//! recorded SHA-512, and the file switched to it in one committed command that applies only
//! if the file did not change meanwhile. Progress streams back as NDJSON. Interrupting it
//! (the client goes away) stops it between commits: every file is on its old backend or
//! whole on the new one, and a re-run carries on with what is left.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use flynn_state::blobs::{BlobFile, BlobsCommand};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::backends;
use super::Blobstore;
use crate::error::{ApiError, ApiResult};

#[derive(Deserialize)]
pub struct MigrateOpts {
    /// Remove the old copy once a file is switched.
    #[serde(default)]
    delete: bool,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    /// Only files whose path starts with this.
    #[serde(default)]
    prefix: Option<String>,
}

fn default_concurrency() -> usize {
    4
}

#[derive(Default)]
struct Progress {
    files_done: AtomicU64,
    bytes_done: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

/// Stops the migration when the response (and so the client) goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn migrate(
    State(b): State<Arc<Blobstore>>,
    Query(opts): Query<MigrateOpts>,
) -> ApiResult<Response> {
    if !(1..=64).contains(&opts.concurrency) {
        return Err(ApiError::Invalid(format!(
            "concurrency {} is not between 1 and 64",
            opts.concurrency
        )));
    }
    let local = b.ready()?;
    local.node().read_barrier().await?;
    let (default, target) = b.backends.default_backend(local)?;
    // A default backend that does not work is a configuration error: nothing is copied.
    if let Some(t) = &target {
        t.probe()
            .await
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
    }
    let prefix = opts.prefix.clone().unwrap_or_else(|| "/".into());
    let files: Vec<BlobFile> = local.read(|s| {
        s.blobs
            .blobs
            .values()
            .filter(|f| f.backend != default && f.path.starts_with(&prefix))
            .cloned()
            .collect()
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let task = tokio::spawn(run(b.clone(), files, default, opts, tx));
    let guard = AbortOnDrop(task);
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |line| {
        let _keep = &guard;
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("{line}\n")))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

async fn run(
    b: Arc<Blobstore>,
    files: Vec<BlobFile>,
    to: String,
    opts: MigrateOpts,
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
) {
    let total_files = files.len() as u64;
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    tracing::info!(target: "flynn_daemon::blobstore", files = total_files, bytes = total_bytes, to = %to, "migration started");
    let _ = tx
        .send(json!({"event": "start", "to": to, "files": total_files, "bytes": total_bytes}))
        .await;
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let report = |p: &Progress| {
        let done = p.bytes_done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let remaining = if rate > 0.0 {
            (total_bytes.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        json!({
            "event": "progress",
            "files_done": p.files_done.load(Ordering::Relaxed),
            "files": total_files,
            "bytes_done": done,
            "bytes": total_bytes,
            "failed": p.failed.load(Ordering::Relaxed),
            "skipped": p.skipped.load(Ordering::Relaxed),
            "rate_bytes_per_s": rate.round(),
            "remaining_s": remaining.round(),
        })
    };
    let mut work = futures::stream::iter(files)
        .map(|f| {
            let (b, to, progress) = (b.clone(), to.clone(), progress.clone());
            async move {
                let r = move_one(&b, &f, &to, opts.delete).await;
                match &r {
                    Ok(Moved::Switched) => {
                        progress.files_done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Moved::Changed) => {
                        progress.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress.bytes_done.fetch_add(f.size, Ordering::Relaxed);
                (f.path, r)
            }
        })
        .buffer_unordered(opts.concurrency);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            next = work.next() => match next {
                Some((path, Err(e))) => {
                    tracing::warn!(target: "flynn_daemon::blobstore", path = %path, "migration of a file failed: {e}");
                    let _ = tx.send(json!({"event": "error", "path": path, "error": e.to_string()})).await;
                }
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => {
                let _ = tx.send(report(&progress)).await;
            }
        }
    }
    let mut last = report(&progress);
    last["event"] = json!("done");
    tracing::info!(target: "flynn_daemon::blobstore", "migration finished: {last}");
    let _ = tx.send(last).await;
}

enum Moved {
    Switched,
    /// The file was overwritten or moved by someone else meanwhile; left as it is.
    Changed,
}

async fn move_one(b: &Arc<Blobstore>, file: &BlobFile, to: &str, delete: bool) -> ApiResult<Moved> {
    let content = b.open(file, None).await?;
    // Hashed on the way in: a source whose bytes are not the recorded ones is refused.
    let stored = b.store_content(content, Some(&file.sha512)).await?;
    if let Some(key) = &stored.key {
        // Read the new copy back and check it, before the file points at it.
        if let Err(e) = check_copy(b, to, key, &file.sha512).await {
            let _ = b.release_key(to, key).await;
            return Err(e);
        }
    }
    let moved = BlobsCommand::MoveFile {
        path: file.path.clone(),
        from_backend: file.backend.clone(),
        sha512: file.sha512.clone(),
        backend: stored.backend.clone(),
        key: stored.key.clone(),
        holders: stored.holders.clone(),
    };
    match b.ready()?.node().propose(moved).await {
        Ok(_) => {
            if delete {
                b.release(file).await;
            }
            Ok(Moved::Switched)
        }
        Err(e) => {
            // The file does not point at the new copy: it goes.
            if let Some(key) = &stored.key {
                let _ = b.release_key(to, key).await;
            }
            match e {
                ApiError::Conflict(_) => Ok(Moved::Changed),
                e => Err(e),
            }
        }
    }
}

async fn check_copy(b: &Arc<Blobstore>, backend: &str, key: &str, want: &str) -> ApiResult<()> {
    let client = b
        .backends
        .get(b.ready()?, backend)?
        .ok_or_else(|| ApiError::Internal("no client for the target backend".into()))?;
    let mut stream = client
        .get(key, None)
        .await
        .map_err(backends::from_backend)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    while let Some(chunk) = stream.next().await {
        ctx.update(&chunk.map_err(backends::from_backend)?);
    }
    let got = super::store::hex(ctx.finish().as_ref());
    if got != want {
        return Err(ApiError::Internal(format!(
            "the copy in {backend:?} reads back with another digest ({}…)",
            &got[..16]
        )));
    }
    Ok(())
}
