//! The blobstore's HTTP API and the internal object transfer between hosts.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use base64::Engine;
use flynn_client::SECRET_HEADER;
use flynn_state::blobs::{check_path, BlobFile, BlobsCommand};
use futures::StreamExt;
use serde::Deserialize;

use super::backends::{self, IoStream};
use super::store::{self, valid_sha, WriteError};
use super::Blobstore;
use crate::error::{ApiError, ApiResult};

type Shared = Arc<Blobstore>;

pub fn router(b: Shared) -> Router {
    Router::new()
        .route(
            "/_objects/{sha}",
            get(object_get).put(object_put).delete(object_delete),
        )
        .route("/_migrate", axum::routing::post(super::migrate::migrate))
        .route("/", get(list))
        .route("/{*path}", any(file))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(b)
}

impl Blobstore {
    pub(crate) fn ready(&self) -> ApiResult<&crate::component::LocalState> {
        self.local
            .get()
            .ok_or_else(|| ApiError::Unavailable("this host is not in a cluster yet".into()))
    }

    fn secret_ok(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        match self.local.get() {
            Some(l) => l.node().secret_matches(given),
            None => false,
        }
    }

    /// The cluster secret peers authenticate internal object transfers with.
    fn secret(&self) -> String {
        self.local
            .get()
            .map(|l| l.node().secret().to_string())
            .unwrap_or_default()
    }

    /// Blobstore addresses of the other hosts, by node id: as they registered in discovery
    /// (service `blobstore`), else a member's address with this host's blobstore port.
    fn peers(&self) -> Vec<(u64, String)> {
        let Some(local) = self.local.get() else {
            return Vec::new();
        };
        let registered: std::collections::BTreeMap<u64, String> = local.read(|s| {
            s.discovery
                .services
                .get(super::SERVICE)
                .map(|svc| {
                    svc.instances
                        .values()
                        .filter_map(|i| {
                            Some((flynn_state::host_of_instance(&i.id)?, i.addr.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        let guess = |addr: &str| {
            let ip = addr.rsplit_once(':').map(|(ip, _)| ip.to_string())?;
            Some(format!("{ip}:{}", self.addr.port()))
        };
        let members = local.members();
        let own = members
            .iter()
            .find(|(id, _)| *id == self.host)
            .and_then(|(_, a)| registered.get(&self.host).cloned().or_else(|| guess(a)));
        members
            .into_iter()
            .filter(|(id, _)| *id != self.host)
            .filter_map(|(id, addr)| match registered.get(&id) {
                Some(a) => Some((id, a.clone())),
                None => Some((id, guess(&addr)?)),
            })
            // A guess that lands on this host's own address (hosts sharing one, before they
            // registered) is no second copy.
            .filter(|(_, a)| Some(a) != own.as_ref())
            .collect()
    }

    /// Copies a local object to one other host not in `skip`: its id, or why each host
    /// asked did not take it.
    async fn replicate(&self, sha512: &str, skip: &[u64]) -> Result<u64, Vec<String>> {
        let mut refusals = Vec::new();
        for (id, addr) in self
            .peers()
            .into_iter()
            .filter(|(id, _)| !skip.contains(id))
        {
            // Content-addressed: a peer that has the object already is a copy.
            let has = self
                .peers
                .head(format!("http://{addr}/_objects/{sha512}"))
                .header(SECRET_HEADER, self.secret())
                .send()
                .await;
            if has.is_ok_and(|r| r.status().is_success()) {
                return Ok(id);
            }
            let object = match self.store.read(sha512, 0, u64::MAX).await {
                Ok(object) => object,
                Err(e) => return Err(vec![format!("reading the local copy: {e}")]),
            };
            let body = reqwest::Body::wrap_stream(object);
            let sent = self
                .peers
                .put(format!("http://{addr}/_objects/{sha512}"))
                .header(SECRET_HEADER, self.secret())
                .body(body)
                .send()
                .await;
            let why = match sent {
                Ok(r) if r.status().is_success() => return Ok(id),
                Ok(r) => {
                    let status = r.status();
                    let body = r.json::<flynn_client::ErrorBody>().await;
                    match body {
                        Ok(b) => format!("{addr}: {status}: {}", b.message),
                        Err(_) => format!("{addr}: {status}"),
                    }
                }
                Err(e) => format!("{addr}: {e}"),
            };
            tracing::warn!(reason = %why, "replica not stored");
            refusals.push(why);
        }
        Err(refusals)
    }
}

fn etag(sha512: &str) -> String {
    let bytes: Vec<u8> = (0..sha512.len() / 2)
        .filter_map(|i| u8::from_str_radix(&sha512[i * 2..i * 2 + 2], 16).ok())
        .collect();
    format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[derive(Deserialize)]
struct ListOpts {
    #[serde(default)]
    dir: Option<String>,
}

/// `GET /` and `GET /?dir=/x`: the entries directly under a directory.
async fn list(
    State(b): State<Shared>,
    Query(opts): Query<ListOpts>,
) -> ApiResult<Json<Vec<String>>> {
    let local = b.ready()?;
    local.node().read_barrier().await?;
    let dir = opts.dir.unwrap_or_else(|| "/".into());
    Ok(Json(local.read(|s| s.blobs.list(&dir))))
}

async fn file(State(b): State<Shared>, Path(path): Path<String>, req: Request) -> Response {
    let path = format!("/{path}");
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let (name, result) = match method {
        Method::GET | Method::HEAD => (
            "get",
            read(&b, &path, req.headers(), method == Method::HEAD).await,
        ),
        Method::PUT => ("put", write(&b, &path, req).await),
        Method::DELETE => (
            "delete",
            delete(&b, &path).await.map(IntoResponse::into_response),
        ),
        _ => (
            "other",
            Err(ApiError::Invalid(format!(
                "{method} is not a blobstore method"
            ))),
        ),
    };
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    let backend = resp
        .headers()
        .get("blobstore-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    let error = resp.status().is_client_error() || resp.status().is_server_error();
    b.metrics.request(name, &backend, started.elapsed(), error);
    resp
}

async fn delete(b: &Shared, path: &str) -> ApiResult<Json<serde_json::Value>> {
    let local = b.ready()?;
    let path = path.trim_end_matches('/').to_string();
    check_path(&path)?;
    let dir = format!("{path}/");
    let gone: Vec<BlobFile> = local.read(|s| {
        s.blobs
            .blobs
            .values()
            .filter(|f| f.path == path || f.path.starts_with(&dir))
            .cloned()
            .collect()
    });
    local
        .node()
        .propose(BlobsCommand::DeleteFiles { path })
        .await?;
    for f in &gone {
        b.release(f).await;
    }
    Ok(crate::api::deleted())
}

async fn write(b: &Shared, path: &str, req: Request) -> ApiResult<Response> {
    let local = b.ready()?;
    check_path(path)?;
    let headers = req.headers().clone();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let node = local.node().clone();
    node.read_barrier().await?;
    let existing = local.read(|s| s.blobs.blobs.get(path).cloned());
    let now = crate::now_ms();
    let content_type = text("content-type");

    // A copy is metadata only: the content, and so its object, is the same.
    if let Some(src) = text("blobstore-copy-from") {
        check_path(&src)?;
        let source = local
            .read(|s| s.blobs.blobs.get(&src).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("blob {src:?} not found")))?;
        let file = BlobFile {
            path: path.to_string(),
            created_ms: existing.as_ref().map_or(now, |e| e.created_ms),
            modified_ms: now,
            content_type: content_type.or(source.content_type.clone()),
            ..source
        };
        let file: BlobFile = node.propose_as(BlobsCommand::PutFile { file }).await?;
        return Ok(with_backend(&file.backend.clone(), Json(file)));
    }

    // An append extends the current content, only at its exact end.
    let prefix = match text("blobstore-offset") {
        Some(o) => {
            let offset: u64 = o.trim().parse().map_err(|_| {
                ApiError::Invalid(format!("Blobstore-Offset {o:?} is not a number"))
            })?;
            let current = existing.as_ref().map_or(0, |e| e.size);
            if offset != current {
                return Err(ApiError::Conflict(format!(
                    "Blobstore-Offset {offset} does not match the blob's size {current}; nothing was written"
                )));
            }
            match existing.as_ref().filter(|e| e.size > 0) {
                Some(e) => Some(open(b, e, None).await?),
                None => None,
            }
        }
        None => None,
    };
    let body: IoStream = req
        .into_body()
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other))
        .boxed();
    let content = match prefix {
        Some(p) => p.chain(body).boxed(),
        None => body,
    };
    let stored = b.store_content(content, None).await?;
    let file = b
        .commit(path, stored, content_type, existing.as_ref(), now)
        .await?;
    Ok(with_backend(&file.backend.clone(), Json(file)))
}

fn with_backend(backend: &str, r: impl IntoResponse) -> Response {
    let mut resp = r.into_response();
    if let Ok(v) = backend.parse() {
        resp.headers_mut().insert("blobstore-backend", v);
    }
    resp
}

/// Bytes stored in a backend, not yet committed to a file.
pub(crate) struct Stored {
    pub sha512: String,
    pub size: u64,
    pub backend: String,
    pub key: Option<String>,
    pub holders: Vec<u64>,
}

impl super::Blobstore {
    /// Stores content in the default backend: on the embedded backend, on two hosts (one,
    /// if it is the only host); on an external one, under a new key. With `expect`, content
    /// with another SHA-512 is refused and nothing is kept.
    pub(crate) async fn store_content(
        self: &Arc<Self>,
        content: IoStream,
        expect: Option<&str>,
    ) -> ApiResult<Stored> {
        let local = self.ready()?;
        let (default, backend) = self.backends.default_backend(local)?;
        let Some(backend) = backend else {
            let written = self
                .store
                .write(content, None)
                .await
                .map_err(WriteError::into_api)?;
            if let Some(want) = expect.filter(|w| **w != written.sha512) {
                if !local.read(|s| s.blobs.references(backends::EMBEDDED, &written.sha512)) {
                    self.store.discard(&written.sha512);
                }
                return Err(mismatch(&written.sha512, want));
            }
            let mut holders = vec![self.host];
            match self.replicate(&written.sha512, &[]).await {
                Ok(peer) => holders.push(peer),
                Err(_) if self.peers().is_empty() => {}
                Err(why) => {
                    return Err(ApiError::Unavailable(format!(
                        "the blob could not be stored on a second host ({}); nothing was written",
                        why.join("; ")
                    )))
                }
            }
            return Ok(Stored {
                sha512: written.sha512,
                size: written.size,
                backend: default,
                key: None,
                holders,
            });
        };
        let key = format!("flynn/{:032x}", rand::random::<u128>());
        let digest = Arc::new(std::sync::Mutex::new(Some(ring::digest::Context::new(
            &ring::digest::SHA512,
        ))));
        let hashing = {
            let digest = digest.clone();
            content.map(move |chunk| {
                if let Ok(c) = &chunk {
                    if let Some(ctx) = digest.lock().expect("digest lock").as_mut() {
                        ctx.update(c);
                    }
                }
                chunk
            })
        };
        let size = backend
            .put(&key, backends::backend_stream(hashing.boxed()))
            .await
            .map_err(backends::from_backend)?;
        let sha512 = store::hex(
            digest
                .lock()
                .expect("digest lock")
                .take()
                .expect("digest taken once")
                .finish()
                .as_ref(),
        );
        if let Some(want) = expect.filter(|w| **w != sha512) {
            let _ = backend.delete(&key).await;
            return Err(mismatch(&sha512, want));
        }
        Ok(Stored {
            sha512,
            size,
            backend: default,
            key: Some(key),
            holders: Vec::new(),
        })
    }

    /// Commits `stored` as the file at `path`. The object a replaced file leaves behind is
    /// deleted; a commit that fails deletes the new one.
    pub(crate) async fn commit(
        self: &Arc<Self>,
        path: &str,
        stored: Stored,
        content_type: Option<String>,
        existing: Option<&BlobFile>,
        now: u64,
    ) -> ApiResult<BlobFile> {
        let node = self.ready()?.node().clone();
        self.metrics.bytes_in(&stored.backend, stored.size);
        let file = BlobFile {
            path: path.to_string(),
            size: stored.size,
            sha512: stored.sha512,
            backend: stored.backend,
            key: stored.key,
            holders: stored.holders,
            content_type,
            created_ms: existing.map_or(now, |e| e.created_ms),
            modified_ms: now,
        };
        match node
            .propose_as(BlobsCommand::PutFile { file: file.clone() })
            .await
        {
            Ok(f) => {
                if file.key.is_none() && file.holders.len() == 2 {
                    let (me, sha, have) = (self.clone(), file.sha512.clone(), file.holders.clone());
                    tokio::spawn(async move { me.third_copy(sha, have).await });
                }
                if let Some(old) = existing {
                    self.release(old).await;
                }
                Ok(f)
            }
            Err(e) => {
                self.release(&file).await;
                Err(e)
            }
        }
    }

    /// Copies a committed embedded object to a third host, where there is one, and records
    /// it: the write was acknowledged with two copies already.
    async fn third_copy(self: Arc<Self>, sha512: String, have: Vec<u64>) {
        let Ok(third) = self.replicate(&sha512, &have).await else {
            return;
        };
        let add = BlobsCommand::AddHolders {
            sha512,
            hosts: vec![third],
        };
        if let Ok(local) = self.ready() {
            if let Err(e) = local.node().propose(add).await {
                tracing::warn!(error = %e, "a third copy was made but not recorded");
            }
        }
    }

    /// Deletes the object of a removed or replaced file once no file refers to it. Embedded
    /// objects are named by content, so an upload of the same bytes may be in flight: each
    /// holder keeps an object younger than [`store::GRACE`].
    pub(crate) async fn release(self: &Arc<Self>, file: &BlobFile) {
        let Ok(local) = self.ready() else { return };
        match &file.key {
            Some(key) => {
                if let Err(e) = self.release_key(&file.backend, key).await {
                    tracing::warn!(error = %e, "an unused object was not deleted");
                }
            }
            None if file.backend == backends::EMBEDDED => {
                if local.read(|s| s.blobs.references(backends::EMBEDDED, &file.sha512)) {
                    return;
                }
                let peers = self.peers();
                for holder in &file.holders {
                    if *holder == self.host {
                        self.store.discard_unused(&file.sha512);
                        continue;
                    }
                    let Some((_, addr)) = peers.iter().find(|(id, _)| id == holder) else {
                        continue;
                    };
                    let sent = self
                        .peers
                        .delete(format!("http://{addr}/_objects/{}", file.sha512))
                        .header(SECRET_HEADER, self.secret())
                        .send()
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(peer = %addr, error = %e, "an unused object was not deleted");
                    }
                }
            }
            None => {}
        }
    }

    /// Deletes the object `key` of an external backend unless a file refers to it.
    pub(crate) async fn release_key(self: &Arc<Self>, backend: &str, key: &str) -> ApiResult<()> {
        let local = self.ready()?;
        if local.read(|s| s.blobs.references(backend, key)) {
            return Ok(());
        }
        if let Some(client) = self.backends.get(local, backend)? {
            client.delete(key).await.map_err(backends::from_backend)?;
        }
        Ok(())
    }

    pub(crate) async fn open(
        self: &Arc<Self>,
        file: &BlobFile,
        range: Option<(u64, u64)>,
    ) -> ApiResult<IoStream> {
        open(self, file, range).await
    }
}

fn mismatch(got: &str, want: &str) -> ApiError {
    ApiError::Invalid(format!(
        "checksum mismatch: the data's sha512 is {}…, not {}…; nothing was stored",
        &got[..16.min(got.len())],
        &want[..16.min(want.len())]
    ))
}

impl super::Blobstore {
    /// Stores a stream at `path` whose content must have the SHA-512 `expect` (an image
    /// layer named by its digest); a mismatch stores nothing.
    pub async fn put_checked<S, E>(
        self: &Arc<Self>,
        path: &str,
        body: S,
        expect: &str,
    ) -> ApiResult<BlobFile>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin + Send + 'static,
        E: std::fmt::Display,
    {
        self.put(path, body, Some(expect)).await
    }

    /// Stores a stream at `path`, replacing what was there; with `expect`, content with
    /// another SHA-512 is refused and nothing is stored.
    pub async fn put<S, E>(
        self: &Arc<Self>,
        path: &str,
        body: S,
        expect: Option<&str>,
    ) -> ApiResult<BlobFile>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin + Send + 'static,
        E: std::fmt::Display,
    {
        let local = self.ready()?;
        check_path(path)?;
        let existing = local.read(|s| s.blobs.blobs.get(path).cloned());
        let content = body
            .map(|r| r.map_err(|e| std::io::Error::other(e.to_string())))
            .boxed();
        let stored = self.store_content(content, expect).await?;
        self.commit(path, stored, None, existing.as_ref(), crate::now_ms())
            .await
    }

    /// Deletes the file at `path` (and anything under it as a directory), releasing the
    /// objects that held its bytes.
    pub async fn delete_path(self: &Arc<Self>, path: &str) -> ApiResult<()> {
        delete(self, path).await.map(|_| ())
    }

    /// The file at `path`, if there is one.
    pub fn file(&self, path: &str) -> Option<BlobFile> {
        self.ready()
            .ok()?
            .read(|s| s.blobs.blobs.get(path).cloned())
    }

    /// A path on this host holding the blob at `path` (fetched if needed).
    pub async fn local_copy(self: &Arc<Self>, path: &str) -> ApiResult<std::path::PathBuf> {
        let file = self
            .ready()?
            .read(|s| s.blobs.blobs.get(path).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("blob {path:?} not found")))?;
        fetch_local(self, &file).await
    }
}

/// A local copy of `file`'s content, fetched from a holder or its backend if this host has
/// none; checked against the recorded digest.
async fn fetch_local(b: &Shared, file: &BlobFile) -> ApiResult<std::path::PathBuf> {
    if !b.store.has(&file.sha512) {
        let content = open(b, file, None).await?;
        b.store
            .write(content, Some(&file.sha512))
            .await
            .map_err(WriteError::into_api)?;
    }
    Ok(b.store.path(&file.sha512))
}

/// The content of `file` (or the inclusive byte range of it) from wherever it is: this
/// host's disk, another holder, or its external backend.
async fn open(b: &Shared, file: &BlobFile, range: Option<(u64, u64)>) -> ApiResult<IoStream> {
    let (start, len) = match range {
        Some((s, e)) => (s, e - s + 1),
        None => (0, file.size),
    };
    if file.backend != backends::EMBEDDED {
        let backend = b.backends.get(b.ready()?, &file.backend)?.ok_or_else(|| {
            ApiError::Internal(format!("{} has no external client", file.backend))
        })?;
        let stream = backend
            .get(file.object(), range)
            .await
            .map_err(backends::from_backend)?;
        return Ok(backends::io_stream(stream));
    }
    if b.store.has(&file.sha512) {
        let stream = b
            .store
            .read(&file.sha512, start, len)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok(stream.boxed());
    }
    let remote = from_holder(b, file, range).await?;
    Ok(remote
        .bytes_stream()
        .map(|r| r.map_err(std::io::Error::other))
        .boxed())
}

/// Asks the other holders of `file` for its object (a byte range of it, if given).
async fn from_holder(
    b: &Shared,
    file: &BlobFile,
    range: Option<(u64, u64)>,
) -> ApiResult<reqwest::Response> {
    let peers = b.peers();
    for holder in file.holders.iter().filter(|h| **h != b.host) {
        let Some((_, addr)) = peers.iter().find(|(id, _)| id == holder) else {
            continue;
        };
        let mut rb = b
            .peers
            .get(format!("http://{addr}/_objects/{}", file.sha512))
            .header(SECRET_HEADER, b.secret());
        if let Some((start, end)) = range {
            rb = rb.header(header::RANGE, format!("bytes={start}-{end}"));
        }
        match rb.send().await {
            Ok(r) if r.status().is_success() => return Ok(r),
            Ok(r) => tracing::warn!(holder = %addr, status = %r.status(), "object not served"),
            Err(e) => tracing::warn!(holder = %addr, error = %e, "holder unreachable"),
        }
    }
    Err(ApiError::Unavailable(format!(
        "no reachable host holds {:?} now",
        file.path
    )))
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` (one range) against `size`: `Ok(None)` without a
/// header, `Err` when it cannot be satisfied.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(h) = h else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') || size == 0 {
        return Err(());
    }
    let (a, z) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), z.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().map_err(|_| ())?, size - 1),
        (a, z) => (
            a.parse().map_err(|_| ())?,
            z.parse::<u64>().map_err(|_| ())?.min(size - 1),
        ),
    };
    if start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn read(b: &Shared, path: &str, headers: &HeaderMap, head: bool) -> ApiResult<Response> {
    let local = b.ready()?;
    check_path(path)?;
    local.node().read_barrier().await?;
    let file = local
        .read(|s| s.blobs.blobs.get(path).cloned())
        .ok_or_else(|| ApiError::NotFound(format!("blob {path:?} not found")))?;
    let tag = etag(&file.sha512);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut resp = Response::builder()
        .header(header::ETAG, &tag)
        .header("blobstore-backend", &file.backend)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::CONTENT_TYPE,
            file.content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        );
    if matches {
        return Ok(resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("static parts"));
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = match parse_range(range, file.size) {
        Ok(r) => r,
        Err(()) => {
            return Ok(Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{}", file.size))
                .body(Body::empty())
                .expect("static parts"))
        }
    };
    let len = match range {
        Some((s, e)) => {
            resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{e}/{}", file.size),
            );
            e - s + 1
        }
        None => file.size,
    };
    resp = resp.header(header::CONTENT_LENGTH, len);
    if head {
        return Ok(resp.body(Body::empty()).expect("static parts"));
    }
    b.metrics.bytes_out(&file.backend, len);
    if let Some(url) = redirect(b, &file).await {
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, url)
            .header(header::ETAG, &tag)
            .body(Body::empty())
            .expect("static parts"));
    }
    let here = b.store.has(&file.sha512);
    // A holder without its copy (dropped as bad, or lost) gets it back from another holder.
    if !here && file.backend == backends::EMBEDDED && file.holders.contains(&b.host) {
        let (b2, f2) = (b.clone(), file.clone());
        tokio::spawn(async move {
            match fetch_local(&b2, &f2).await {
                Ok(_) => tracing::info!(path = %f2.path, "local copy restored from another holder"),
                Err(e) => tracing::warn!(path = %f2.path, error = %e, "local copy not restored"),
            }
        });
    }
    let stream = open(b, &file, range).await?;
    let local = here && file.backend == backends::EMBEDDED;
    // A local copy checked recently (and unchanged since) is not hashed on every read.
    let body = if range.is_none() && !(local && b.store.recently_checked(&file.sha512)) {
        Body::from_stream(verified(b.clone(), stream, file.sha512.clone(), local))
    } else {
        Body::from_stream(stream)
    };
    Ok(resp.body(body).expect("static parts"))
}

/// Where a backend configured with `redirect=true` lets clients read an object directly: a
/// presigned URL valid for 10 minutes (S3).
async fn redirect(b: &Shared, file: &BlobFile) -> Option<String> {
    let key = file.key.as_deref()?;
    let local = b.ready().ok()?;
    let (all, _) = backends::configured(local).ok()?;
    let wanted = all
        .iter()
        .find(|c| c.name == file.backend)?
        .keys
        .get("redirect")
        .is_some_and(|v| v == "true");
    if !wanted {
        return None;
    }
    let backend = b.backends.get(local, &file.backend).ok()??;
    backend
        .signed_url(key, std::time::Duration::from_secs(600))
        .await
}

/// Passes a whole object's bytes through while hashing them. The last piece is held back
/// until the digest is known: if it does not match the record, the stream fails short of
/// its Content-Length (the client sees an aborted body, never bad bytes as good ones) and
/// the bad copy is dropped, so the next read comes from another holder.
fn verified<S>(
    b: Shared,
    inner: S,
    want: String,
    // The content is this host's copy: a mismatch drops it, a match is remembered.
    discard: bool,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>>
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin + Send + 'static,
{
    let ctx = ring::digest::Context::new(&ring::digest::SHA512);
    let held: Option<bytes::Bytes> = None;
    futures::stream::unfold(Some((inner, ctx, held)), move |state| {
        let (b, want) = (b.clone(), want.clone());
        async move {
            let (mut inner, mut ctx, mut held) = state?;
            loop {
                match inner.next().await {
                    Some(Ok(chunk)) => {
                        ctx.update(&chunk);
                        if let Some(prev) = held.replace(chunk) {
                            return Some((Ok(prev), Some((inner, ctx, held))));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        let got = super::store::hex(ctx.finish().as_ref());
                        if got == want {
                            if discard {
                                b.store.mark_checked(&want);
                            }
                            return held.map(|last| (Ok(last), None));
                        }
                        tracing::error!(object = %want, "content does not match its digest");
                        if discard {
                            b.store.discard(&want);
                        }
                        let bad = std::io::Error::other("blob content does not match its digest");
                        return Some((Err(bad), None));
                    }
                }
            }
        }
    })
}

/// `PUT /_objects/SHA`: another host stores a replica here (cluster secret).
async fn object_put(
    State(b): State<Shared>,
    Path(sha): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    if !b.secret_ok(&headers) {
        return Err(ApiError::Unauthorized(
            "missing or wrong cluster secret".into(),
        ));
    }
    if !valid_sha(&sha) {
        return Err(ApiError::Invalid("not a SHA-512".into()));
    }
    let mut body = body.into_data_stream();
    if b.store.has(&sha) {
        // Read to the end all the same: answering mid-body resets the sender's connection.
        while let Some(Ok(_)) = body.next().await {}
    } else {
        b.store
            .write(body, Some(&sha))
            .await
            .map_err(WriteError::into_api)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /_objects/SHA`: drops a local object no file refers to (cluster secret).
async fn object_delete(
    State(b): State<Shared>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    if !b.secret_ok(&headers) {
        return Err(ApiError::Unauthorized(
            "missing or wrong cluster secret".into(),
        ));
    }
    let local = b.ready()?;
    if !local.read(|s| s.blobs.references(backends::EMBEDDED, &sha)) {
        b.store.discard_unused(&sha);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /_objects/SHA`: the bytes of a local object, or a range of them (cluster secret).
async fn object_get(
    State(b): State<Shared>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !b.secret_ok(&headers) {
        return Err(ApiError::Unauthorized(
            "missing or wrong cluster secret".into(),
        ));
    }
    if !b.store.has(&sha) {
        return Err(ApiError::NotFound(format!("no object {sha} here")));
    }
    let size = tokio::fs::metadata(b.store.path(&sha))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, len) = match parse_range(range, size) {
        Ok(Some((s, e))) => (s, e - s + 1),
        Ok(None) => (0, size),
        Err(()) => return Err(ApiError::Invalid("bad range".into())),
    };
    let stream = b
        .store
        .read(&sha, start, len)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Body::from_stream(stream).into_response())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn t10_ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=-4"), 10), Ok(Some((6, 9))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        for bad in [
            "bytes=10-",
            "bytes=4-2",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=x-",
        ] {
            assert!(parse_range(Some(bad), 10).is_err(), "{bad}");
        }
    }
}
