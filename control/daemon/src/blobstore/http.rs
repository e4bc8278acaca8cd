//! The blobstore's HTTP API and the internal object transfer between hosts.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use base64::Engine;
use flynn_state::blobs::{check_path, BlobFile, BlobsCommand};
use futures::StreamExt;
use serde::Deserialize;

use super::backends::{self, IoStream};
use super::content::{delete, fetch_local, open};
use super::store::{valid_sha, WriteError};
use super::Blobstore;
use crate::error::{ApiError, ApiResult};

type Shared = Arc<Blobstore>;

/// The API. Plain GETs of files on connections that start with one are answered before it
/// (`direct.rs`, with [`answer`] and [`source`]): a layer added here does not see them.
pub fn router(b: Shared) -> Router {
    Router::new()
        .route("/_objects", axum::routing::put(object_put_streamed))
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
    record(&b, name, resp.status(), resp.headers(), started);
    resp
}

/// Counts a request in the metrics, by the backend its answer names, as its head is sent.
pub(super) fn record(
    b: &Blobstore,
    method: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    started: std::time::Instant,
) {
    let backend = headers
        .get("blobstore-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    let error = status.is_client_error() || status.is_server_error();
    b.metrics.request(method, backend, started.elapsed(), error);
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

/// A GET's answer before its body is read.
pub(super) enum Answer {
    /// Complete as it is (304, 416).
    Complete(Response),
    /// The head of a 200 or 206, and the bytes its body holds.
    Content {
        head: axum::http::response::Builder,
        file: BlobFile,
        range: Option<(u64, u64)>,
        len: u64,
    },
}

/// What a GET of `path` with these headers answers: through the read barrier, with the
/// ETag, Range and If-None-Match handled.
pub(super) async fn answer(b: &Shared, path: &str, headers: &HeaderMap) -> ApiResult<Answer> {
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
        return Ok(Answer::Complete(
            resp.status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .expect("static parts"),
        ));
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = match parse_range(range, file.size) {
        Ok(r) => r,
        Err(()) => {
            return Ok(Answer::Complete(
                Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{}", file.size))
                    .body(Body::empty())
                    .expect("static parts"),
            ))
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
    Ok(Answer::Content {
        head: resp,
        file,
        range,
        len,
    })
}

async fn read(b: &Shared, path: &str, headers: &HeaderMap, head: bool) -> ApiResult<Response> {
    let (resp, file, range, len) = match answer(b, path, headers).await? {
        Answer::Complete(done) => return Ok(done),
        Answer::Content {
            head,
            file,
            range,
            len,
        } => (head, file, range, len),
    };
    if head {
        return Ok(resp.body(Body::empty()).expect("static parts"));
    }
    let body = match source(b, &file, range, len).await? {
        Source::Redirect(found) => return Ok(found),
        Source::Trusted => Body::from_stream(open(b, &file, range).await?),
        Source::Stream(stream) => Body::from_stream(stream),
    };
    Ok(resp.body(body).expect("static parts"))
}

/// Where the body of a GET's 200 or 206 comes from.
pub(super) enum Source {
    /// An external backend's presigned URL: the answer is this 302 instead.
    Redirect(Response),
    /// This host's copy, read without hashing: a range, or a copy checked lately.
    Trusted,
    /// The bytes as they come: from a holder, a backend, or this host's copy hashed on its
    /// way out.
    Stream(IoStream),
}

/// The body of `len` bytes of `file` (its `range`), counted as served.
pub(super) async fn source(
    b: &Shared,
    file: &BlobFile,
    range: Option<(u64, u64)>,
    len: u64,
) -> ApiResult<Source> {
    b.metrics.bytes_out(&file.backend, len);
    if let Some(url) = redirect(b, file).await {
        return Ok(Source::Redirect(
            Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, url)
                .header(header::ETAG, etag(&file.sha512))
                .body(Body::empty())
                .expect("static parts"),
        ));
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
    let local = here && file.backend == backends::EMBEDDED;
    // A local copy checked recently (and unchanged since) is not hashed on every read.
    if local && (range.is_some() || b.store.recently_checked(&file.sha512)) {
        return Ok(Source::Trusted);
    }
    let stream = open(b, file, range).await?;
    Ok(Source::Stream(if range.is_none() {
        verified(b.clone(), stream, file.sha512.clone(), local).boxed()
    } else {
        stream
    }))
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

/// What a peer stored of a streamed copy.
#[derive(serde::Serialize, Deserialize)]
pub(super) struct StoredObject {
    pub sha512: String,
    pub size: u64,
}

/// `PUT /_objects` (cluster secret): a copy streamed while the writer stores its own, so
/// its digest is known only at the end; `Blobstore-Expect: SHA` refuses other content.
/// Answers with what was stored. A body cut short stores nothing.
async fn object_put_streamed(
    State(b): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<StoredObject>> {
    if !b.secret_ok(&headers) {
        return Err(ApiError::Unauthorized(
            "missing or wrong cluster secret".into(),
        ));
    }
    let expect = match headers.get(super::content::EXPECT_HEADER) {
        Some(v) => match v.to_str().ok().filter(|s| valid_sha(s)) {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(ApiError::Invalid(
                    "Blobstore-Expect is not a SHA-512".into(),
                ))
            }
        },
        None => None,
    };
    let written = b
        .store
        .write(body.into_data_stream(), expect.as_deref())
        .await
        .map_err(WriteError::into_api)?;
    Ok(Json(StoredObject {
        sha512: written.sha512,
        size: written.size,
    }))
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
    method: Method,
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
    // "Do you have it?" (a HEAD) is answered without reading the object.
    if method == Method::HEAD {
        return Ok(Response::builder()
            .header(header::CONTENT_LENGTH, len)
            .body(Body::empty())
            .expect("static parts"));
    }
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
