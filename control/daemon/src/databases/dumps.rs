//! A resource's data as a dump, and back: the provider's own client (`pg_dump`,
//! `mariadb-dump`, `redis-cli --rdb`; [`flynn_state::db_clients`]) in a one-off job of the
//! server's app with the resource's env, its stdout read from the job's host. This is what
//! `flynn export` and `flynn cluster backup` carry, and what import and `--from-backup`
//! restore (the same commands as `flynn pg dump|restore`).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use flynn_state::resources::{provider, Resource};
use flynn_state::ClusterState;
use futures::{Stream, StreamExt};

use crate::error::{ApiError, ApiResult};
use crate::host::Host;

/// Where a resource's dump sits in an archive (as chunks `databases/ID/NNNNNN`).
pub fn entry_prefix(id: &str) -> String {
    format!("databases/{id}")
}

/// The resource id an archive entry belongs to, if it is a dump's chunk.
pub fn entry_resource(entry: &str) -> Option<&str> {
    entry
        .strip_prefix("databases/")
        .and_then(|r| r.split_once('/'))
        .map(|(id, _)| id)
}

/// Where a client of `app`'s resource of `provider` runs: the server's app (its image has
/// the clients) and its current release, with the resource's env.
pub fn client_job(
    s: &ClusterState,
    r: &Resource,
) -> ApiResult<(String, String, BTreeMap<String, String>)> {
    let p = provider(&r.provider).map_err(ApiError::from)?;
    let server_app = if r.server.is_some() {
        r.name.clone()
    } else {
        p.app.to_string()
    };
    let release = s
        .jobs
        .current_release(&server_app)
        .map(|r| r.id.clone())
        .ok_or_else(|| ApiError::Unavailable(format!("the {server_app} server has no release")))?;
    Ok((server_app, release, r.env.clone()))
}

/// A one-off job of `app` placed on its way (this host if it runs jobs), and the API
/// address of the host it runs on.
async fn start(
    host: &Host,
    app: &str,
    release: String,
    env: BTreeMap<String, String>,
    args: Vec<String>,
    stdin: bool,
) -> ApiResult<(String, String)> {
    let node = host.node()?;
    let job = crate::jobs::oneoff::place(
        node,
        host.jobs().is_some().then_some(host.id),
        flynn_state::jobs::NewJob {
            stdin,
            env,
            ..flynn_state::jobs::NewJob::one_off(app, release, args)
        },
    )
    .await?;
    let addr = node
        .members()
        .into_iter()
        .find(|(id, _)| *id == job.host)
        .map(|(_, a)| a)
        .ok_or_else(|| ApiError::Unavailable(format!("job {}'s host is not a member", job.id)))?;
    Ok((job.id, addr))
}

/// Runs `args` in a one-off job of `app` and answers its stdout as a stream that fails
/// unless the job exits 0.
pub async fn run_client(
    host: &Host,
    app: &str,
    release: String,
    env: BTreeMap<String, String>,
    args: Vec<String>,
    what: &str,
) -> ApiResult<impl Stream<Item = io::Result<Bytes>> + Unpin + Send + 'static> {
    let (id, addr) = start(host, app, release, env, args, false).await?;
    let secret = host.node()?.secret().to_string();
    stdout_of(secret, addr, id, what.to_string()).await
}

/// Runs `args` in a one-off job of `app` with `input` as its stdin, until it exits 0 (else
/// the error, with the end of its stderr).
pub async fn run_with_input<S>(
    host: &Host,
    app: &str,
    release: String,
    env: BTreeMap<String, String>,
    args: Vec<String>,
    input: S,
    what: &str,
) -> ApiResult<()>
where
    S: Stream<Item = io::Result<Bytes>> + Send + Sync + 'static,
{
    let (id, addr) = start(host, app, release, env, args, true).await?;
    let secret = host.node()?.secret().to_string();
    let send = client()?
        .put(format!("http://{addr}/host/jobs/{id}/stdin"))
        .header(flynn_client::SECRET_HEADER, secret.clone())
        .body(reqwest::Body::wrap_stream(input))
        .send();
    let mut out = stdout_of(secret, addr, id, what.to_string()).await?;
    let (sent, read) = tokio::join!(send, async {
        while let Some(chunk) = out.next().await {
            chunk?;
        }
        Ok::<(), io::Error>(())
    });
    read.map_err(|e| ApiError::Invalid(e.to_string()))?;
    sent.map_err(|e| ApiError::Unavailable(format!("{what}: sending its input: {e}")))?;
    Ok(())
}

fn client() -> ApiResult<reqwest::Client> {
    crate::api::attach::streaming_client(Duration::from_secs(5))
}

/// The job's output stream (`{"stream", "data"}` lines, then `{"exit"}`) as its stdout's
/// bytes; it fails, with the end of the job's stderr, unless the job exits 0.
async fn stdout_of(
    secret: String,
    addr: String,
    id: String,
    what: String,
) -> ApiResult<impl Stream<Item = io::Result<Bytes>> + Unpin + Send> {
    let resp = client()?
        .get(format!("http://{addr}/host/jobs/{id}/output"))
        .header(flynn_client::SECRET_HEADER, secret)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| ApiError::Unavailable(format!("{what}: the job's output: {e}")))?;
    struct Reading {
        body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        pending: Vec<u8>,
        stderr: Vec<u8>,
        done: bool,
        what: String,
        id: String,
    }
    let reading = Reading {
        body: resp.bytes_stream().boxed(),
        pending: Vec::new(),
        stderr: Vec::new(),
        done: false,
        what,
        id,
    };
    Ok(Box::pin(futures::stream::unfold(
        reading,
        |mut r| async move {
            use base64::Engine;
            loop {
                if r.done {
                    return None;
                }
                if let Some(nl) = r.pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = r.pending.drain(..=nl).collect();
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if let Some(code) = v["exit"].as_i64() {
                        r.done = true;
                        if code == 0 {
                            return None;
                        }
                        let tail = String::from_utf8_lossy(&r.stderr).trim().to_string();
                        let e = io::Error::other(format!(
                            "{}: job {} exited {code}: {tail}",
                            r.what, r.id
                        ));
                        return Some((Err(e), r));
                    }
                    let Some(data) = v["data"].as_str() else {
                        continue; // a heartbeat
                    };
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap_or_default();
                    if v["stream"] == "stderr" {
                        r.stderr.extend_from_slice(&bytes);
                        let over = r.stderr.len().saturating_sub(2048);
                        r.stderr.drain(..over);
                        continue;
                    }
                    return Some((Ok(Bytes::from(bytes)), r));
                }
                match r.body.next().await {
                    Some(Ok(chunk)) => r.pending.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        r.done = true;
                        let e = io::Error::other(format!("{}: the job's output: {e}", r.what));
                        return Some((Err(e), r));
                    }
                    None => {
                        r.done = true;
                        let e = io::Error::other(format!(
                            "{}: the connection to job {} ended before the job did",
                            r.what, r.id
                        ));
                        return Some((Err(e), r));
                    }
                }
            }
        },
    )))
}

/// `r`'s dump, as a stream: it fails (so an archive holding it fails) unless the dump
/// client exits 0.
pub async fn dump(
    host: &Host,
    r: &Resource,
) -> ApiResult<impl Stream<Item = io::Result<Bytes>> + Unpin + Send> {
    let args = flynn_state::db_clients::dump(&r.provider)
        .ok_or_else(|| ApiError::Invalid(format!("{} has no dump client", r.provider)))?;
    let (app, release, env) = host.node()?.state.read(|a| client_job(&a.state, r))?;
    let what = format!("the dump of {} resource {}", r.provider, r.id);
    run_client(host, &app, release, env, args, &what).await
}

/// Restores the dump in `file` into `r` with the provider's restore client.
pub async fn restore(host: &Host, r: &Resource, file: &Path) -> ApiResult<()> {
    let args = flynn_state::db_clients::restore(&r.provider)
        .ok_or_else(|| ApiError::Invalid(format!("{} has no restore client", r.provider)))?;
    let (app, release, env) = host.node()?.state.read(|a| client_job(&a.state, r))?;
    let input = tokio::fs::File::open(file)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", file.display())))?;
    let body = tokio_util::io::ReaderStream::with_capacity(input, 256 * 1024);
    let what = format!("restoring {} resource {}", r.provider, r.id);
    run_with_input(host, &app, release, env, args, body, &what).await
}
