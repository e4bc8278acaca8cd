//! The `postgres` backend: an object is rows of 1 MiB chunks in one table, written in one
//! transaction (a cut upload commits nothing) and read back a few chunks per query, so
//! neither side holds a whole object in memory.
//!
//! Keys: `url=postgres://user:pass@host:port/db`, or `host`, `port`, `user`, `password` and
//! `dbname` one by one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::stream::StreamExt;
use tokio_postgres::{Client, NoTls};

use crate::{BackendError, ByteStream};

const CHUNK: usize = 1 << 20;
/// Chunks fetched per query when reading.
const BATCH: i32 = 4;
/// Idle connections kept for reuse.
const IDLE: usize = 8;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS flynn_blobstore_chunks (
    key text NOT NULL, seq integer NOT NULL, data bytea NOT NULL, PRIMARY KEY (key, seq))";

pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    schema_ready: tokio::sync::OnceCell<()>,
}

impl Postgres {
    pub fn new(name: &str, keys: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let bad = |why: String| BackendError::Config {
            backend: name.to_string(),
            why,
        };
        let mut config: tokio_postgres::Config = match keys.get("url") {
            Some(url) => url
                .parse()
                .map_err(|e| bad(format!("url is not a PostgreSQL URL: {e}")))?,
            None => tokio_postgres::Config::new(),
        };
        if let Some(h) = keys.get("host") {
            config.host(h);
        }
        if let Some(p) = keys.get("port") {
            config.port(
                p.parse()
                    .map_err(|_| bad(format!("port {p:?} is not a port")))?,
            );
        }
        if let Some(u) = keys.get("user") {
            config.user(u);
        }
        if let Some(p) = keys.get("password") {
            config.password(p);
        }
        if let Some(d) = keys.get("dbname").or(keys.get("database")) {
            config.dbname(d);
        }
        if config.get_hosts().is_empty() {
            return Err(bad("postgres needs url or host".into()));
        }
        if config.get_user().is_none() {
            config.user("postgres");
        }
        config.connect_timeout(std::time::Duration::from_secs(5));
        config.application_name("flynn-blobstore");
        Ok(Postgres {
            inner: Arc::new(Inner {
                name: name.to_string(),
                config,
                idle: Mutex::new(Vec::new()),
                schema_ready: tokio::sync::OnceCell::new(),
            }),
        })
    }

    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, BackendError> {
        let inner = &self.inner;
        let mut client = inner.client().await?;
        let fail = inner.failed("writing");
        let tx = client.transaction().await.map_err(&fail)?;
        tx.execute("DELETE FROM flynn_blobstore_chunks WHERE key = $1", &[&key])
            .await
            .map_err(&fail)?;
        let insert = tx
            .prepare("INSERT INTO flynn_blobstore_chunks (key, seq, data) VALUES ($1, $2, $3)")
            .await
            .map_err(&fail)?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut seq: i32 = 0;
        let mut size = 0u64;
        loop {
            let next = body.next().await.transpose()?;
            if let Some(chunk) = &next {
                size += chunk.len() as u64;
                buf.extend_from_slice(chunk);
            }
            // Full chunks go out as they fill; the last (possibly empty) one at the end, so
            // every object has a chunk 0 and an empty object is not a missing one.
            while buf.len() >= CHUNK || (next.is_none() && (!buf.is_empty() || seq == 0)) {
                let take = buf.len().min(CHUNK);
                let data = buf.split_to(take);
                tx.execute(&insert, &[&key, &seq, &data.as_ref()])
                    .await
                    .map_err(&fail)?;
                seq += 1;
            }
            if next.is_none() {
                break;
            }
        }
        tx.commit().await.map_err(&fail)?;
        inner.give_back(client);
        Ok(size)
    }

    pub async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ByteStream, BackendError> {
        let inner = self.inner.clone();
        let client = inner.client().await?;
        let (first, last) = match range {
            Some((a, z)) => ((a / CHUNK as u64) as i32, Some((z / CHUNK as u64) as i32)),
            None => (0, None),
        };
        // Not found is told now, before any byte is promised.
        let present = client
            .query_opt(
                "SELECT 1 FROM flynn_blobstore_chunks WHERE key = $1 AND seq = 0",
                &[&key],
            )
            .await
            .map_err(inner.failed("reading"))?;
        if present.is_none() {
            inner.give_back(client);
            return Err(BackendError::NotFound {
                backend: inner.name.clone(),
                key: key.to_string(),
            });
        }
        let (skip, keep_to) = match range {
            Some((a, z)) => (
                (a % CHUNK as u64) as usize,
                Some((z - (z / CHUNK as u64) * CHUNK as u64) as usize + 1),
            ),
            None => (0, None),
        };
        struct Cursor {
            inner: Arc<Inner>,
            client: Option<Client>,
            key: String,
            next: i32,
            last: Option<i32>,
            first: i32,
            skip: usize,
            keep_to: Option<usize>,
        }
        let cursor = Cursor {
            inner,
            client: Some(client),
            key: key.to_string(),
            next: first,
            last,
            first,
            skip,
            keep_to,
        };
        let stream = futures::stream::unfold(cursor, |mut c| async move {
            let client = c.client.take()?;
            let upto = c
                .last
                .map_or(c.next + BATCH - 1, |l| l.min(c.next + BATCH - 1));
            if c.last.is_some_and(|l| c.next > l) {
                c.inner.give_back(client);
                return None;
            }
            let rows = client
                .query(
                    "SELECT seq, data FROM flynn_blobstore_chunks WHERE key = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
                    &[&c.key, &c.next, &upto],
                )
                .await;
            let rows = match rows {
                Ok(r) => r,
                Err(e) => {
                    // The stream ends with this error (the client is not put back).
                    let err = c.inner.failed("reading")(e);
                    return Some((Err(err), c));
                }
            };
            if rows.is_empty() {
                c.inner.give_back(client);
                return None;
            }
            let mut out = BytesMut::new();
            for row in &rows {
                let seq: i32 = row.get(0);
                let data: &[u8] = row.get(1);
                let mut piece = data;
                if c.last == Some(seq) {
                    if let Some(k) = c.keep_to {
                        piece = &piece[..k.min(piece.len())];
                    }
                }
                if seq == c.first {
                    piece = &piece[c.skip.min(piece.len())..];
                }
                out.extend_from_slice(piece);
            }
            let got = rows.len() as i32;
            c.next += got;
            let done = got < upto - (c.next - got) + 1;
            if done {
                c.inner.give_back(client);
            } else {
                c.client = Some(client);
            }
            Some((Ok::<Bytes, BackendError>(out.freeze()), c))
        });
        Ok(stream.boxed())
    }

    pub async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let client = self.inner.client().await?;
        client
            .execute("DELETE FROM flynn_blobstore_chunks WHERE key = $1", &[&key])
            .await
            .map_err(self.inner.failed("deleting"))?;
        self.inner.give_back(client);
        Ok(())
    }
}

impl Inner {
    fn failed(&self, op: &'static str) -> impl Fn(tokio_postgres::Error) -> BackendError + '_ {
        move |e| BackendError::Backend {
            backend: self.name.clone(),
            op,
            why: crate::one_line(&e),
        }
    }

    /// An idle connection, or a new one (the table is made on first use).
    async fn client(&self) -> Result<Client, BackendError> {
        loop {
            let idle = self.idle.lock().expect("pool lock").pop();
            match idle {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let (client, conn) = self
            .config
            .connect(NoTls)
            .await
            .map_err(self.failed("connecting"))?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %name, error = %e, "postgres connection closed");
            }
        });
        self.schema_ready
            .get_or_try_init(|| async {
                client
                    .batch_execute(SCHEMA)
                    .await
                    .map_err(self.failed("creating the chunk table"))
            })
            .await?;
        Ok(client)
    }

    fn give_back(&self, c: Client) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < IDLE && !c.is_closed() {
            idle.push(c);
        }
    }
}
