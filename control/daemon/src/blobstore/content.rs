//! Where blob content lives, apart from the HTTP handlers: on the embedded backend, each
//! object on two hosts (a third copy made when a holder is gone), or in an external
//! backend; stored under a path as one state change, fetched from whichever holder has
//! it, released when the last file naming it goes. The store's own API for the rest of the
//! daemon (`put`, `put_checked`, `file`, `local_copy`, `delete_path`) is here too.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use axum::Json;
use flynn_client::SECRET_HEADER;
use flynn_state::blobs::{check_path, BlobFile, BlobsCommand};
use futures::StreamExt;

use super::backends::{self, IoStream};
use super::store::{self, WriteError};
use super::Blobstore;
use crate::error::{ApiError, ApiResult};

type Shared = Arc<Blobstore>;

impl Blobstore {
    pub(crate) fn ready(&self) -> ApiResult<&crate::component::LocalState> {
        self.local
            .get()
            .ok_or_else(|| ApiError::Unavailable("this host is not in a cluster yet".into()))
    }

    pub(super) fn secret_ok(&self, headers: &HeaderMap) -> bool {
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

    /// Whether the peer at `addr` holds the object `sha512`.
    async fn peer_has(&self, addr: &str, sha512: &str) -> bool {
        self.peers
            .head(format!("http://{addr}/_objects/{sha512}"))
            .header(SECRET_HEADER, self.secret())
            .timeout(PEER_STALL)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
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
            if self.peer_has(&addr, sha512).await {
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

/// One piece of an upload on its way to a peer; the peer's body ends only at `End`, so an
/// upload cut short here is cut short there (and the peer keeps nothing).
enum Piece {
    Data(bytes::Bytes),
    End,
}

impl Blobstore {
    /// Writes `content` here while the same bytes stream to one peer (`PUT /_objects`), so a
    /// PUT pays for its two copies at once, not one after the other. Returns the local
    /// write, and the peer's id with what it stored if it took the whole copy. A peer that
    /// fails or falls behind never fails the local write: the caller sends a copy after.
    async fn write_here_and_on_a_peer(
        self: &Arc<Self>,
        content: IoStream,
        expect: Option<&str>,
    ) -> (
        Result<store::Written, WriteError>,
        Option<(u64, store::Written)>,
    ) {
        let Some((peer, addr)) = self.peers().into_iter().next() else {
            return (self.store.write(content, None).await, None);
        };
        // Content named up front that the peer has already (a layer pushed again) is not
        // sent: its copy is there.
        if let Some(want) = expect {
            if self.peer_has(&addr, want).await {
                let written = self.store.write(content, None).await;
                let copy = match &written {
                    Ok(w) if w.sha512 == want => Some((
                        peer,
                        store::Written {
                            sha512: w.sha512.clone(),
                            size: w.size,
                        },
                    )),
                    _ => None,
                };
                return (written, copy);
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(4);
        let tee = futures::stream::unfold((content, Some(tx)), |(mut content, tx)| async move {
            match content.next().await {
                Some(Ok(chunk)) => {
                    // A peer that stopped reading (or fell this far behind) only loses its
                    // copy: the sender is dropped without `End`, which cuts its body short.
                    let tx = match tx {
                        Some(tx) => {
                            let sent = tx.send_timeout(Piece::Data(chunk.clone()), PEER_STALL);
                            sent.await.is_ok().then_some(tx)
                        }
                        None => None,
                    };
                    Some((Ok(chunk), (content, tx)))
                }
                // Dropping the sender without `End` cuts the peer's body short.
                Some(Err(e)) => Some((Err(e), (content, None))),
                None => {
                    if let Some(tx) = tx {
                        let _ = tx.send(Piece::End).await;
                    }
                    None
                }
            }
        });
        let body = futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(Piece::Data(chunk)) => Some((Ok(chunk), Some(rx))),
                Some(Piece::End) => None,
                None => Some((Err(std::io::Error::other("the upload was cut short")), None)),
            }
        });
        let mut upload = self
            .peers
            .put(format!("http://{addr}/_objects"))
            .header(SECRET_HEADER, self.secret())
            .body(reqwest::Body::wrap_stream(body));
        if let Some(want) = expect {
            // The peer refuses other content too, and keeps nothing of it.
            upload = upload.header(EXPECT_HEADER, want);
        }
        let copy = async move {
            let r = upload.send().await.ok()?;
            // (The answer comes after the peer's own sync; bounded below.)
            if !r.status().is_success() {
                tracing::debug!(peer = %addr, status = %r.status(), "streamed copy not taken");
                return None;
            }
            let got: super::http::StoredObject = r.json().await.ok()?;
            Some((
                peer,
                store::Written {
                    sha512: got.sha512,
                    size: got.size,
                },
            ))
        };
        // The peer's copy runs on its own; once the local write is done it has
        // `PEER_STALL` more to answer, else it is abandoned (and sent again after).
        let copy = tokio::spawn(copy);
        let written = self.store.write(tee.boxed(), None).await;
        let abort = copy.abort_handle();
        let copy = match tokio::time::timeout(PEER_STALL, copy).await {
            Ok(Ok(copy)) => copy,
            _ => {
                abort.abort();
                None
            }
        };
        (written, copy)
    }
}

/// How long a streamed copy may keep the upload waiting for one piece, or keep the PUT
/// waiting for its answer once the local copy is written.
const PEER_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// The SHA-512 a streamed copy must have (`PUT /_objects`).
pub(super) const EXPECT_HEADER: &str = "blobstore-expect";

/// Deletes the file at `path` and everything under it, releasing their objects.
pub(super) async fn delete(b: &Shared, path: &str) -> ApiResult<Json<serde_json::Value>> {
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
    Ok(crate::serve::deleted())
}

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
            let (written, streamed) = self.write_here_and_on_a_peer(content, expect).await;
            let written = written.map_err(WriteError::into_api)?;
            if let Some(want) = expect.filter(|w| **w != written.sha512) {
                if !local.read(|s| s.blobs.references(backends::EMBEDDED, &written.sha512)) {
                    self.store.discard(&written.sha512);
                }
                return Err(mismatch(&written.sha512, want));
            }
            let mut holders = vec![self.host];
            // The copy streamed alongside, if it arrived whole; else one sent now.
            let second = match streamed {
                Some((peer, copy)) if copy == written => Ok(peer),
                _ => self.replicate(&written.sha512, &[]).await,
            };
            match second {
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

pub(super) fn mismatch(got: &str, want: &str) -> ApiError {
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
pub(super) async fn fetch_local(b: &Shared, file: &BlobFile) -> ApiResult<std::path::PathBuf> {
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
pub(super) async fn open(
    b: &Shared,
    file: &BlobFile,
    range: Option<(u64, u64)>,
) -> ApiResult<IoStream> {
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
