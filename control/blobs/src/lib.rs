//! The blobstore's external backends behind one streaming API: PostgreSQL (chunked rows),
//! and S3, Google Cloud Storage and Azure Blob Storage through the `object_store` crate.
//!
//! Why `object_store` and not `aws-sdk-s3`: one API covers all three clouds (streaming
//! multipart writes, ranged streaming reads, presigned URLs), it is built on the same
//! reqwest 0.12 and ring the daemon already uses, and `aws-sdk-s3` would add the whole
//! smithy runtime for one of the three.
//!
//! Objects are named by an opaque key the caller chooses (the blobstore records it in the
//! file's metadata). Every call is bounded in time: a backend that does not answer fails the
//! request with an error naming it, it never hangs a `flynn env set` or a read.

mod gcs;
mod postgres;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig, WriteMultipart};

pub use flynn_model::BackendConfig;

/// A stream of bytes into or out of a backend.
pub type ByteStream = BoxStream<'static, Result<Bytes, BackendError>>;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The configuration cannot make a client (a bad endpoint, key or value).
    #[error("blobstore backend {backend:?}: {why}")]
    Config { backend: String, why: String },
    /// The backend answered with an error or could not be reached.
    #[error("blobstore backend {backend:?}: {op}: {why}")]
    Backend {
        backend: String,
        op: &'static str,
        why: String,
    },
    /// The object is not in the backend.
    #[error("blobstore backend {backend:?}: object {key:?} not found")]
    NotFound { backend: String, key: String },
    /// The bytes handed to `put` broke off.
    #[error("the upload broke off: {0}")]
    Body(String),
}

/// How long one request to an external backend may take before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Parts of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 << 20;

enum Kind {
    Postgres(postgres::Postgres),
    Gcs(gcs::Gcs),
    Object {
        store: Arc<dyn ObjectStore>,
        signer: Option<Arc<dyn Signer>>,
    },
}

/// One configured external backend, connected.
pub struct Backend {
    name: String,
    kind: Kind,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).finish()
    }
}

fn client_options(endpoint: Option<&String>) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(5))
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

/// Few retries: a backend that refuses credentials should say so now, not in three minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(15),
        ..RetryConfig::default()
    }
}

impl Backend {
    /// Makes a client for `cfg`. Nothing is sent yet: [`Backend::probe`] checks that it works.
    pub fn connect(cfg: &BackendConfig) -> Result<Backend, BackendError> {
        let name = cfg.name.clone();
        let bad = |why: String| BackendError::Config {
            backend: name.clone(),
            why,
        };
        let key = |k: &str| cfg.keys.get(k).cloned().unwrap_or_default();
        let endpoint = cfg.keys.get("endpoint");
        let kind = match cfg.backend.as_str() {
            "postgres" => Kind::Postgres(postgres::Postgres::new(&name, &cfg.keys)?),
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(key("bucket"))
                    .with_region(key("region"))
                    .with_access_key_id(key("access_key_id"))
                    .with_secret_access_key(key("secret_access_key"))
                    .with_client_options(client_options(endpoint))
                    .with_retry(retry());
                if let Some(token) = cfg.keys.get("session_token") {
                    b = b.with_token(token);
                }
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                let s3 = Arc::new(b.build().map_err(|e| bad(e.to_string()))?);
                Kind::Object {
                    store: s3.clone(),
                    signer: Some(s3),
                }
            }
            "gcs" => {
                let json = key("key");
                let base: Option<String> = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v.get("gcs_base_url")?.as_str().map(str::to_string));
                // Used for its service-account credentials (OAuth tokens) only.
                let creds = object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_bucket_name(key("bucket"))
                    .with_service_account_key(json)
                    .with_client_options(client_options(base.as_ref()))
                    .with_retry(retry())
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                let client = |timeout: Option<Duration>| {
                    let mut b = reqwest::Client::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .read_timeout(REQUEST_TIMEOUT);
                    if let Some(t) = timeout {
                        b = b.timeout(t);
                    }
                    b.build().map_err(|e| bad(e.to_string()))
                };
                Kind::Gcs(gcs::Gcs {
                    name: name.clone(),
                    base: base.unwrap_or_else(|| "https://storage.googleapis.com".into()),
                    bucket: key("bucket"),
                    credentials: creds.credentials().clone(),
                    http: client(Some(REQUEST_TIMEOUT))?,
                    stream_http: client(None)?,
                })
            }
            "azure" => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(key("account_name"))
                    .with_access_key(key("account_key"))
                    .with_container_name(key("container"))
                    .with_client_options(client_options(endpoint))
                    .with_retry(retry());
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e.clone());
                }
                let azure = b.build().map_err(|e| bad(e.to_string()))?;
                Kind::Object {
                    store: Arc::new(azure),
                    signer: None,
                }
            }
            other => return Err(bad(format!("{other:?} is not an external backend"))),
        };
        Ok(Backend { name, kind })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn failed(&self, op: &'static str) -> impl Fn(object_store::Error) -> BackendError + '_ {
        move |e| match e {
            object_store::Error::NotFound { path, .. } => BackendError::NotFound {
                backend: self.name.clone(),
                key: path,
            },
            e => BackendError::Backend {
                backend: self.name.clone(),
                op,
                why: one_line(&e),
            },
        }
    }

    /// Stores `body` under `key`, whole or not at all: a body that breaks off leaves nothing.
    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, BackendError> {
        match &self.kind {
            Kind::Postgres(pg) => pg.put(key, body).await,
            Kind::Gcs(g) => g.put(key, body).await,
            Kind::Object { store, .. } => {
                let path = ObjectPath::from(key);
                // Small objects go in one request; a multipart upload starts only once the
                // body is larger than one part.
                let mut first = Vec::new();
                let mut size = 0u64;
                let mut more = None;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    size += chunk.len() as u64;
                    if first.len() + chunk.len() > PART_SIZE {
                        more = Some(chunk);
                        break;
                    }
                    first.extend_from_slice(&chunk);
                }
                let Some(next) = more else {
                    store
                        .put(&path, Bytes::from(first).into())
                        .await
                        .map_err(self.failed("put"))?;
                    return Ok(size);
                };
                let upload = store
                    .put_multipart(&path)
                    .await
                    .map_err(self.failed("starting a multipart upload"))?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                w.write(&first);
                w.put(next);
                let result: Result<(), BackendError> = async {
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk?;
                        size += chunk.len() as u64;
                        w.wait_for_capacity(4)
                            .await
                            .map_err(self.failed("uploading a part"))?;
                        w.put(chunk);
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => {
                        w.finish()
                            .await
                            .map_err(self.failed("completing an upload"))?;
                        Ok(size)
                    }
                    Err(e) => {
                        let _ = w.abort().await;
                        Err(e)
                    }
                }
            }
        }
    }

    /// The object's bytes, or the inclusive byte range `(first, last)` of them.
    pub async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, BackendError> {
        match &self.kind {
            Kind::Postgres(pg) => pg.get(key, range).await,
            Kind::Gcs(g) => g.get(key, range).await,
            Kind::Object { store, .. } => {
                let opts = GetOptions {
                    range: range.map(|(a, z)| GetRange::Bounded(a..z + 1)),
                    ..GetOptions::default()
                };
                let got = store
                    .get_opts(&ObjectPath::from(key), opts)
                    .await
                    .map_err(self.failed("get"))?;
                Ok(reading(&self.name, got.into_stream()))
            }
        }
    }

    /// Removes the object; one that is already gone is no error.
    pub async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match &self.kind {
            Kind::Postgres(pg) => pg.delete(key).await,
            Kind::Gcs(g) => g.delete(key).await,
            Kind::Object { store, .. } => match store.delete(&ObjectPath::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.failed("delete")(e)),
            },
        }
    }

    /// A URL that reads the object without credentials for `ttl`, where the backend can
    /// sign one (S3).
    pub async fn signed_url(&self, key: &str, ttl: Duration) -> Option<String> {
        let Kind::Object {
            signer: Some(s), ..
        } = &self.kind
        else {
            return None;
        };
        match s
            .signed_url(reqwest::Method::GET, &ObjectPath::from(key), ttl)
            .await
        {
            Ok(u) => Some(u.to_string()),
            Err(e) => {
                tracing::warn!(backend = %self.name, error = %one_line(&e), "cannot sign a URL");
                None
            }
        }
    }

    /// Checks that the backend works with these credentials, before a configuration is
    /// committed: it lists the bucket, then writes, reads back and deletes a probe object.
    pub async fn probe(&self) -> Result<(), BackendError> {
        let key = format!("flynn-blobstore-probe/{:016x}", rand::random::<u64>());
        match &self.kind {
            Kind::Object { store, .. } => {
                let mut list = store.list(Some(&ObjectPath::from("flynn-blobstore-probe")));
                if let Some(Err(e)) = list.next().await {
                    return Err(self.failed("listing the bucket")(e));
                }
            }
            Kind::Gcs(g) => g.list_one("flynn-blobstore-probe/").await?,
            Kind::Postgres(_) => {}
        }
        let payload = Bytes::from_static(b"flynn blobstore probe\n");
        let body = futures::stream::iter([Ok(payload.clone())]).boxed();
        self.put(&key, body).await?;
        let mut back = Vec::new();
        let mut stream = self.get(&key, None).await?;
        while let Some(chunk) = stream.next().await {
            back.extend_from_slice(&chunk?);
        }
        self.delete(&key).await?;
        if back != payload {
            return Err(BackendError::Backend {
                backend: self.name.clone(),
                op: "probe",
                why: "the probe object read back differs from what was written".into(),
            });
        }
        Ok(())
    }
}

/// A response body as a [`ByteStream`], its errors named for the backend.
fn reading<S, E>(backend: &str, body: S) -> ByteStream
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error,
{
    let name = backend.to_string();
    body.map(move |r| {
        r.map_err(|e| BackendError::Backend {
            backend: name.clone(),
            op: "reading",
            why: one_line(&e),
        })
    })
    .boxed()
}

/// An error and its causes on one line (cloud errors nest several levels deep).
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s.replace('\n', " ")
}
