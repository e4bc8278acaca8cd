//! Writes to Google Cloud Storage through the JSON API's resumable upload protocol: one
//! session, the body sent in 8 MiB pieces as it arrives, finalized with the total size.
//! (object_store writes through the XML API, which fake-gcs-server, the one GCS server that
//! runs here, does not serve; reads, lists and deletes go through object_store.)

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::client::CredentialProvider;
use object_store::gcp::GcpCredentialProvider;

use crate::{one_line, BackendError, ByteStream};

/// Pieces must be multiples of 256 KiB; 8 MiB keeps requests few and memory bounded.
const PIECE: usize = 8 << 20;

pub struct GcsUpload {
    pub name: String,
    pub base: String,
    pub bucket: String,
    pub credentials: GcpCredentialProvider,
    pub http: reqwest::Client,
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

impl GcsUpload {
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

    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, BackendError> {
        let token = self.bearer().await?;
        let start = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=resumable&name={}",
            self.base.trim_end_matches('/'),
            encode(&self.bucket),
            encode(key)
        );
        let mut req = self.http.post(&start).header("content-length", "0");
        if !token.bearer.is_empty() {
            req = req.bearer_auth(&token.bearer);
        }
        let resp = req
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
                    .http
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
