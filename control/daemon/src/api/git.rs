//! Git over smart HTTP at `git.$CLUSTER_DOMAIN` (routed to every host's API, as the
//! controller is): `GET /APP.git/info/refs?service=S`, `POST /APP.git/git-upload-pack` and
//! `POST /APP.git/git-receive-pack`, each running git's own service with
//! `--stateless-rpc` on the app's bare repository, streamed both ways (a push is never held
//! in memory). Basic auth takes any user name and a controller key as the password; a
//! missing or wrong key gets 401 with `WWW-Authenticate`, so git asks its credential helper
//! (`flynn git-credentials`) and reports "Authentication failed" itself.
//!
//! Answers that are not git's are `text/plain`: git shows them to the pusher as
//! `remote: ...` lines. A push runs the repository's pre-receive hook (`flynn git-hook`),
//! which builds and deploys the pushed revision and rejects the push if that fails.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use flynn_git::Service;
use futures::StreamExt;
use serde::Deserialize;

use super::AppState;
use crate::error::ApiError;
use crate::git::{git_bin, Home};
use crate::host::Host;

/// Set on a request one host forwards to the repository's home, so it is never forwarded
/// twice.
const FORWARDED: &str = "x-flynn-git-forwarded";
/// Largest compressed negotiation a fetch may send (git gzips only those, never a pack).
const MAX_GZIP_BODY: usize = 64 << 20;

pub fn routes(host: Arc<Host>) -> Router<AppState> {
    Router::new()
        .route("/{repo}/info/refs", get(info_refs))
        .route("/{repo}/git-upload-pack", post(upload_pack))
        .route("/{repo}/git-receive-pack", post(receive_pack))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(host, require_key))
}

/// The controller key, asked for the way git understands: 401 with a Basic challenge.
async fn require_key(state: State<Arc<Host>>, req: Request, next: Next) -> Response {
    let mut resp = super::auth::require_key(state, req, next).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp = plain(StatusCode::UNAUTHORIZED, "a controller key is required");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"flynn\""),
        );
    }
    resp
}

fn plain(status: StatusCode, text: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    plain(e.status(), e)
}

#[derive(Deserialize)]
struct RefsQuery {
    service: Option<String>,
}

async fn info_refs(
    State(host): State<AppState>,
    Path(repo): Path<String>,
    Query(q): Query<RefsQuery>,
    req: Request,
) -> Response {
    let Some(service) = q.service.as_deref().and_then(Service::parse) else {
        return plain(
            StatusCode::FORBIDDEN,
            "only git's smart HTTP protocol is served (git 1.6.6 or later)",
        );
    };
    let app = flynn_git::app_of(&repo);
    let path = match crate::git::home(&host, app).await {
        Ok(Home::Local { path, .. }) => path,
        Ok(Home::Remote { addr }) => return forward(&addr, req).await,
        Err(e) => return error(e),
    };
    let out = tokio::process::Command::from(service.command(&git_bin(), &path, true))
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => {
            let mut body = service.advertisement_prefix();
            body.extend_from_slice(&out.stdout);
            (
                [
                    (header::CONTENT_TYPE, service.advertisement_type()),
                    (header::CACHE_CONTROL, "no-cache".to_string()),
                ],
                body,
            )
                .into_response()
        }
        Ok(out) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "git {} failed: {}",
                service.subcommand(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot run git on this host ({e}): install git there"),
        ),
    }
}

async fn upload_pack(state: State<AppState>, Path(repo): Path<String>, req: Request) -> Response {
    rpc(state.0, repo, Service::UploadPack, req).await
}

async fn receive_pack(state: State<AppState>, Path(repo): Path<String>, req: Request) -> Response {
    rpc(state.0, repo, Service::ReceivePack, req).await
}

/// One stateless exchange: the request body into git's stdin, its stdout as the answer.
async fn rpc(host: AppState, repo: String, service: Service, req: Request) -> Response {
    let app = flynn_git::app_of(&repo).to_string();
    let (path, record) = match crate::git::home(&host, &app).await {
        Ok(Home::Local { path, record }) => (path, record),
        Ok(Home::Remote { addr }) => return forward(&addr, req).await,
        Err(e) => return error(e),
    };
    let mut cmd = tokio::process::Command::from(service.command(&git_bin(), &path, false));
    let mut push = None;
    if service == Service::ReceivePack {
        let p = match crate::git::lock(&host, &app, &record).await {
            Ok(p) => p,
            Err(e) => return error(e),
        };
        let key = host
            .node()
            .ok()
            .and_then(|n| {
                n.state
                    .read(|a| a.state.controller_keys().into_iter().next())
            })
            .unwrap_or_default();
        let result = crate::git::repos_dir(&host).join(format!(".push-{}.result", p.id));
        cmd.env("FLYNN_GIT_HOOK", crate::git::hook_program())
            .env("FLYNN_GIT_APP", &app)
            .env("FLYNN_GIT_URL", format!("http://{}", host.addr))
            .env("FLYNN_GIT_KEY", key)
            .env("FLYNN_GIT_BRANCH", p.branch.clone().unwrap_or_default())
            .env("FLYNN_GIT_RESULT", &result)
            .env("FLYNN_GIT_REFUSE", p.refused.clone().unwrap_or_default());
        push = Some((p, result));
    }
    let gzip = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let mut child = match cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot run git on this host ({e}): install git there"),
            )
        }
    };
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "git has no pipes");
    };
    let body = req.into_body();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let fed = if gzip {
            feed_gzip(body, &mut stdin).await
        } else {
            let mut chunks = body.into_data_stream();
            let mut r = Ok(());
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(b) => {
                        if let Err(e) = stdin.write_all(&b).await {
                            r = Err(e.to_string());
                            break;
                        }
                    }
                    Err(e) => {
                        r = Err(e.to_string());
                        break;
                    }
                }
            }
            r
        };
        if let Err(e) = fed {
            tracing::debug!(error = %e, "git request body not delivered whole");
        }
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let what = service.subcommand();
    let log_app = app.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut said = String::new();
        let _ = stderr.read_to_string(&mut said).await;
        let status = child.wait().await;
        match status {
            Ok(s) if s.success() => {}
            other => {
                tracing::info!(app = log_app, service = what, status = ?other, stderr = %said.trim(), "git service ended")
            }
        }
        let _ = done_tx.send(());
    });
    if let Some((p, result)) = push {
        if p.refused.is_none() {
            let done = async move {
                let _ = done_rx.await;
            };
            tokio::spawn(crate::git::hold_until(
                host.clone(),
                app,
                p.id,
                path,
                result,
                done,
            ));
        }
    }
    (
        [
            (header::CONTENT_TYPE, service.result_type()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            stdout,
            64 * 1024,
        )),
    )
        .into_response()
}

/// A gzip request body (a fetch's negotiation), inflated into git's stdin.
async fn feed_gzip(body: Body, stdin: &mut tokio::process::ChildStdin) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let bytes = axum::body::to_bytes(body, MAX_GZIP_BODY)
        .await
        .map_err(|e| e.to_string())?;
    let inflated = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
            .map(|_| out)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    stdin.write_all(&inflated).await.map_err(|e| e.to_string())
}

/// Sends a git request on to the repository's home host and streams its answer back.
async fn forward(addr: &str, req: Request) -> Response {
    if req.headers().contains_key(FORWARDED) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the repository is moving between hosts; try again",
        );
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut out = client
        .request(req.method().clone(), format!("http://{addr}{path}"))
        .header(FORWARDED, "1");
    for name in [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::ACCEPT,
    ] {
        if let Some(v) = req.headers().get(&name) {
            out = out.header(name, v.clone());
        }
    }
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let resp = match out.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("the repository's host {addr} did not answer: {e}"),
            )
        }
    };
    let mut answer = Response::builder().status(resp.status());
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::WWW_AUTHENTICATE,
    ] {
        if let Some(v) = resp.headers().get(&name) {
            answer = answer.header(name, v.clone());
        }
    }
    answer
        .body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, e))
}
