//! Google Cloud Storage through its JSON API: resumable uploads (one session, the body
//! sent in 8 MiB pieces as it arrives), ranged media downloads, deletes and lists. Tokens
//! come from object_store's service-account credentials. (object_store's own GCS client
//! speaks the XML API, which fake-gcs-server, the one GCS server that runs here, serves
//! only under its configured host name; the JSON API is served whatever the host.)

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::gcp::GcpCredentialProvider;

use crate::{one_line, BackendError, ByteStream};

/// Pieces must be multiples of 256 KiB; 8 MiB keeps requests few and memory bounded.
const PIECE: usize = 8 << 20;

pub struct Gcs {
    pub name: String,
    pub base: String,
    pub bucket: String,
    pub credentials: GcpCredentialProvider,
    /// For requests with a bounded answer.
    pub http: reqwest::Client,
    /// For uploads and downloads, bounded in connecting and idling, not in total.
    pub stream_http: reqwest::Client,
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Gcs {
    fn failed(&self, op: &'static str, why: impl std::fmt::Display) -> BackendError {
        BackendError::Backend {
            backend: self.name.clone(),
            op,
            why: why.to_string(),
        }
    }

    async fn bearer(&self) -> Result<Arc<object_store::gcp::GcpCredential>, BackendError> {
        self.credentials
            .get_credential()
            .await
            .map_err(|e| self.failed("getting a token", one_line(&e)))
    }

    fn object_url(&self, key: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base.trim_end_matches('/'),
            encode(&self.bucket),
            encode(key)
        )
    }

    async fn authed(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, BackendError> {
        let token = self.bearer().await?;
        Ok(if token.bearer.is_empty() {
            req
        } else {
            req.bearer_auth(&token.bearer)
        })
    }

    /// An answer that is not a success, as an error (404: not found).
    async fn check(
        &self,
        op: &'static str,
        key: &str,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, BackendError> {
        let resp = resp.map_err(|e| self.failed(op, one_line(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == reqwest::StatusCode::NOT_FOUND && !key.is_empty() {
            return Err(BackendError::NotFound {
                backend: self.name.clone(),
                key: key.to_string(),
            });
        }
        let text = resp.text().await.unwrap_or_default();
        Err(self.failed(op, format!("{status}: {}", text.trim())))
    }

    pub async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, BackendError> {
        let url = format!(
            "{}/download/storage/v1/b/{}/o/{}?alt=media",
            self.base.trim_end_matches('/'),
            encode(&self.bucket),
            encode(key)
        );
        // No overall timeout on a download: it may be long; the connect is bounded.
        let mut req = self.stream_http.get(url);
        if let Some((a, z)) = range {
            req = req.header("range", format!("bytes={a}-{z}"));
        }
        let resp = self
            .check("get", key, self.authed(req).await?.send().await)
            .await?;
        Ok(crate::reading(&self.name, resp.bytes_stream()))
    }

    pub async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let req = self.http.delete(self.object_url(key));
        match self
            .check("delete", key, self.authed(req).await?.send().await)
            .await
        {
            Ok(_) | Err(BackendError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Lists one object under `prefix`: fails if the bucket is missing or not readable.
    pub async fn list_one(&self, prefix: &str) -> Result<(), BackendError> {
        let url = format!(
            "{}/storage/v1/b/{}/o?maxResults=1&prefix={}",
            self.base.trim_end_matches('/'),
            encode(&self.bucket),
            encode(prefix)
        );
        let req = self.http.get(url);
        self.check(
            "listing the bucket",
            "",
            self.authed(req).await?.send().await,
        )
        .await?;
        Ok(())
    }

    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, BackendError> {
        let start = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=resumable&name={}",
            self.base.trim_end_matches('/'),
            encode(&self.bucket),
            encode(key)
        );
        let req = self.http.post(&start).header("content-length", "0");
        let resp = self
            .authed(req)
            .await?
            .send()
            .await
            .map_err(|e| self.failed("starting an upload", one_line(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(self.failed("starting an upload", format!("{status}: {text}")));
        }
        let session = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.failed("starting an upload", "no session URL in the answer"))?
            .to_string();
        let result = self.send_pieces(&session, &mut body).await;
        if result.is_err() {
            // Cancels the session: nothing of it becomes an object.
            let _ = self.http.delete(&session).send().await;
        }
        result
    }

    async fn send_pieces(&self, session: &str, body: &mut ByteStream) -> Result<u64, BackendError> {
        let mut buf = BytesMut::new();
        let mut sent = 0u64;
        loop {
            let next = body.next().await.transpose()?;
            let last = next.is_none();
            if let Some(chunk) = next {
                buf.extend_from_slice(&chunk);
            }
            while buf.len() > PIECE || (last && (!buf.is_empty() || sent == 0)) {
                let take = if last { buf.len() } else { PIECE };
                let piece: Bytes = buf.split_to(take).freeze();
                let end_of_data = last && buf.is_empty();
                let range = match (piece.is_empty(), end_of_data) {
                    (true, _) => format!("bytes */{sent}"),
                    (false, true) => format!(
                        "bytes {sent}-{}/{}",
                        sent + piece.len() as u64 - 1,
                        sent + piece.len() as u64
                    ),
                    (false, false) => {
                        format!("bytes {sent}-{}/*", sent + piece.len() as u64 - 1)
                    }
                };
                let n = piece.len() as u64;
                let resp = self
                    .stream_http
                    .put(session)
                    .header("content-range", range)
                    .body(piece)
                    .send()
                    .await
                    .map_err(|e| self.failed("uploading", one_line(&e)))?;
                let status = resp.status().as_u16();
                let done = (200..300).contains(&status);
                if !(done || status == 308) {
                    let text = resp.text().await.unwrap_or_default();
                    return Err(self.failed("uploading", format!("{status}: {text}")));
                }
                sent += n;
                if end_of_data {
                    if !done {
                        return Err(self.failed("uploading", "the upload was not finalized"));
                    }
                    return Ok(sent);
                }
            }
            if last {
                return Ok(sent);
            }
        }
    }
}
