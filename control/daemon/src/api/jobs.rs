//! Images, releases, formations, jobs and logs.
//!
//! Controller API (behind a controller key): `/layers/{sha512}` (HEAD to ask, PUT to
//! upload, streamed and checked against its name), `/apps/{app}/releases` (POST deploys; with
//! `?wait=true` it answers once the new release runs, and rolls back if it cannot),
//! `/releases/{id}`, `/apps/{app}/formation`, `/apps/{app}/scale`, `/apps/{app}/limits`,
//! `/apps/{app}/jobs` (DELETE one to stop it), `/apps/{app}/log` (every host's lines, merged).
//!
//! Host API (behind the cluster secret): `/host/jobs` (this host's), `/host/jobs/{id}/stop`,
//! `/host/logs` (this host's log files).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use flynn_client::{HostClient, RunRequest, ScaleRequest, SetLimits};

use flynn_state::jobs::JobsCommand;
use flynn_state::{Formation, Job, LogLine, LogQuery, NewRelease, Release, MAX_LOG_LINES};
use serde::Deserialize;

use super::{read, AppState, JsonBody, ReadOpts};
use crate::error::{ApiError, ApiResult};

/// Longest `POST /apps/{app}/releases?wait=true` waits for the new release to run.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn controller_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/layers/{sha}",
            get(layer_exists)
                .head(layer_exists)
                .put(put_layer)
                // A layer is as large as it is; it streams through.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/apps/{app}/releases", get(releases).post(create_release))
        .route("/images/{name}", get(image).put(put_image))
        .route("/releases/{id}", get(release))
        .route("/apps/{app}/releases/{id}/rollout", get(rollout))
        .route("/apps/{app}/formation", get(formation))
        .route("/apps/{app}/scale", post(scale))
        .route("/apps/{app}/limits", post(set_limits))
        .route("/apps/{app}/jobs", get(app_jobs))
        .route("/apps/{app}/jobs/{id}", get(job).delete(kill))
        .route("/apps/{app}/log", get(app_log))
        .route("/apps/{app}/run", post(run))
        .route("/apps/{app}/builds", post(build))
        .merge(super::attach::controller_routes())
}

pub fn secret_routes() -> Router<AppState> {
    Router::new()
        .route("/host/jobs", get(host_jobs))
        .route("/host/jobs/{id}/stop", post(host_stop))
        .route("/host/logs", get(host_logs))
        .merge(super::attach::secret_routes())
}

fn check_sha(sha: &str) -> ApiResult<()> {
    if sha.len() == 128
        && sha
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{sha:?} is not a lowercase hex SHA-512"
        )))
    }
}

async fn layer_exists(
    State(host): State<AppState>,
    Path(sha): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    check_sha(&sha)?;
    let node = host.node()?;
    node.read_barrier().await?;
    let path = flynn_state::layer_path(&sha);
    match node.state.read(|a| a.state.blobs.blobs.get(&path).cloned()) {
        Some(f) => Ok(Json(serde_json::json!({"sha512": sha, "size": f.size}))),
        None => Err(ApiError::NotFound(format!(
            "layer {sha:.16}… is not stored"
        ))),
    }
}

async fn put_layer(
    State(host): State<AppState>,
    Path(sha): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    check_sha(&sha)?;
    let blobstore = host.blobstore().ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore to store layers in".into())
    })?;
    let file = blobstore
        .put_checked(
            &flynn_state::layer_path(&sha),
            body.into_data_stream(),
            &sha,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"sha512": sha, "size": file.size})),
    ))
}

async fn releases(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Release>>> {
    let list = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        let mut v: Vec<Release> = s
            .jobs
            .releases
            .values()
            .filter(|r| r.app == app)
            .cloned()
            .collect();
        v.sort_by_key(|r| r.version);
        Ok(v)
    })
    .await?;
    Ok(Json(list))
}

async fn release(
    State(host): State<AppState>,
    Path(id): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Release>> {
    let r = read(host.node()?, &opts, |s| {
        s.jobs
            .releases
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("release {id:?}")))
    })
    .await?;
    Ok(Json(r))
}

/// Where a release's rollout stands; while it deploys, also what keeps a type's jobs from
/// being placed (the scheduler's own plan over the same state says).
async fn rollout(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<flynn_state::Rollout>> {
    let r = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        let release = s
            .jobs
            .releases
            .get(&id)
            .filter(|r| r.app == app)
            .ok_or_else(|| ApiError::NotFound(format!("release {id:?} of app {app:?}")))?;
        let mut r = flynn_state::jobs::rollout(s, release);
        if r.state == flynn_state::RolloutState::Deploying {
            let mut no_room = Vec::new();
            crate::jobs::scheduler::plan_noting(s, crate::now_ms(), &mut no_room);
            let prefix = format!("{app}/");
            let mine: Vec<String> = no_room
                .into_iter()
                .filter(|w| w.starts_with(&prefix))
                .collect();
            if !mine.is_empty() {
                r.waiting = Some(format!("no live host has room: {}", mine.join("; ")));
            }
        }
        Ok(r)
    })
    .await?;
    Ok(Json(r))
}

#[derive(Deserialize, Default)]
struct DeployOpts {
    #[serde(default)]
    wait: bool,
}

async fn create_release(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<DeployOpts>,
    JsonBody(req): JsonBody<NewRelease>,
) -> ApiResult<(StatusCode, Json<Release>)> {
    let node = host.node()?;
    layers_stored(node, &req.image.layers).await?;
    let previous = node
        .state
        .read(|a| a.state.jobs.formations.get(&app).map(|f| f.release.clone()));
    let release: Release = node
        .propose_as(JobsCommand::CreateRelease {
            app: app.clone(),
            release: req,
            now_ms: crate::now_ms(),
        })
        .await?;
    if opts.wait {
        if let Err(why) = wait_deployed(node, &release).await {
            // Back to what ran before, and the reason to the deployer.
            if let Some(prev) = previous.filter(|p| !p.is_empty()) {
                let _ = node
                    .propose(JobsCommand::Deploy {
                        app: app.clone(),
                        release: Some(prev.clone()),
                    })
                    .await;
                return Err(ApiError::Invalid(format!(
                    "deploy of {} failed, rolled back to {prev}: {why}",
                    release.id
                )));
            }
            let _ = node
                .propose(JobsCommand::Deploy {
                    app: app.clone(),
                    release: None,
                })
                .await;
            return Err(ApiError::Invalid(format!(
                "deploy of {} failed, and the app runs nothing: {why}",
                release.id
            )));
        }
    }
    Ok((StatusCode::CREATED, Json(release)))
}

/// Every layer of an image must be stored before a release or image may name it.
async fn layers_stored(node: &crate::node::Node, layers: &[flynn_state::Layer]) -> ApiResult<()> {
    node.read_barrier().await?;
    let missing: Vec<String> = node.state.read(|a| {
        layers
            .iter()
            .filter(|l| {
                !a.state
                    .blobs
                    .blobs
                    .contains_key(&flynn_state::layer_path(&l.sha512))
            })
            .map(|l| l.sha512.chars().take(16).collect())
            .collect()
    });
    if missing.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid(format!(
        "layers not uploaded: {}… (PUT /layers/SHA512 first)",
        missing.join("…, ")
    )))
}

async fn image(
    State(host): State<AppState>,
    Path(name): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<flynn_state::Image>> {
    let image = read(host.node()?, &opts, |s| {
        s.jobs.images.get(&name).cloned().ok_or_else(|| {
            ApiError::NotFound(format!(
                "the cluster has no {name:?} image (an operator sets it: flynn base-image push IMAGE.tar)"
            ))
        })
    })
    .await?;
    Ok(Json(image))
}

async fn put_image(
    State(host): State<AppState>,
    Path(name): Path<String>,
    JsonBody(image): JsonBody<flynn_state::Image>,
) -> ApiResult<Json<flynn_state::Image>> {
    let node = host.node()?;
    layers_stored(node, &image.layers).await?;
    node.propose(JobsCommand::PutImage {
        name,
        image: image.clone(),
    })
    .await?;
    Ok(Json(image))
}

/// Waits until the formation's count of every type runs the new release; the first job of
/// it that fails or crashes fails the deploy.
async fn wait_deployed(node: &crate::node::Node, release: &Release) -> Result<(), String> {
    let deadline = Instant::now() + DEPLOY_TIMEOUT;
    let mut changes = node.state.changes();
    // This host's state must include the release before it is judged.
    node.read_barrier().await.map_err(|e| e.to_string())?;
    loop {
        let verdict = node
            .state
            .read(|a| flynn_state::jobs::deploy_status(&a.state, release));
        match verdict {
            flynn_state::jobs::DeployStatus::Done => return Ok(()),
            flynn_state::jobs::DeployStatus::Failed(why) => return Err(why),
            flynn_state::jobs::DeployStatus::Deploying => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "its jobs were not all running within {}s",
                DEPLOY_TIMEOUT.as_secs()
            ));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), changes.changed()).await;
    }
}

async fn formation(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Formation>> {
    let f = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        Ok(s.jobs.formations.get(&app).cloned().unwrap_or(Formation {
            app: app.clone(),
            ..Formation::default()
        }))
    })
    .await?;
    Ok(Json(f))
}

async fn scale(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<ScaleRequest>,
) -> ApiResult<Json<Formation>> {
    let f = host
        .node()?
        .propose_as(JobsCommand::Scale {
            app,
            processes: req.processes,
        })
        .await?;
    Ok(Json(f))
}

async fn set_limits(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<SetLimits>,
) -> ApiResult<Json<Release>> {
    let r = host
        .node()?
        .propose_as(JobsCommand::SetLimits {
            app,
            proc_type: req.proc_type,
            limits: req.limits,
            now_ms: crate::now_ms(),
        })
        .await?;
    Ok(Json(r))
}

async fn app_jobs(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Vec<Job>>> {
    let jobs = read(host.node()?, &opts, |s| {
        s.app(&app)?;
        Ok(s.jobs.app_jobs(&app).cloned().collect())
    })
    .await?;
    Ok(Json(jobs))
}

async fn job(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(opts): Query<ReadOpts>,
) -> ApiResult<Json<Job>> {
    let job = read(host.node()?, &opts, |s| {
        s.jobs
            .jobs
            .get(&id)
            .filter(|j| j.app == app)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("job {id:?} of app {app:?}")))
    })
    .await?;
    Ok(Json(job))
}

async fn kill(
    State(host): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult<Json<Job>> {
    let node = host.node()?;
    node.read_barrier().await?;
    if node
        .state
        .read(|a| a.state.jobs.jobs.get(&id).map(|j| j.app != app))
        .unwrap_or(true)
    {
        return Err(ApiError::NotFound(format!("job {id:?} of app {app:?}")));
    }
    Ok(Json(node.propose_as(JobsCommand::StopJob { id }).await?))
}

#[derive(Deserialize, Default)]
struct LogParams {
    #[serde(default)]
    job: Option<String>,
    #[serde(default, rename = "type")]
    proc_type: Option<String>,
    #[serde(default)]
    lines: Option<usize>,
    #[serde(default)]
    after: Option<String>,
}

/// Every host's lines for the app, merged in order; the last `lines` of them.
async fn app_log(
    State(host): State<AppState>,
    Path(app): Path<String>,
    Query(p): Query<LogParams>,
) -> ApiResult<Json<Vec<LogLine>>> {
    let node = host.node()?;
    node.state.read(|a| a.state.app(&app).map(|_| ()))?;
    let q = LogQuery {
        app,
        job: p.job,
        proc_type: p.proc_type,
        lines: Some(p.lines.unwrap_or(MAX_LOG_LINES).min(MAX_LOG_LINES)),
        after: p.after,
    };
    let m = node.metrics();
    let members: Vec<(u64, String)> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    let asks = members.into_iter().map(|(id, addr)| {
        let q = q.clone();
        let secret = node.secret().to_string();
        let local = (id == host.id).then(|| host.jobs().cloned()).flatten();
        async move {
            if let Some(runner) = local {
                return Ok(runner.logs.read(&q));
            }
            let client = HostClient::new(
                &format!("http://{addr}"),
                Some(&secret),
                Duration::from_secs(10),
            );
            client.logs(&q).await.map_err(|e| (addr, e))
        }
    });
    let mut lines: Vec<LogLine> = Vec::new();
    for r in futures::future::join_all(asks).await {
        match r {
            Ok(v) => lines.extend(v),
            // A host that cannot answer leaves a gap, not an error: the rest still shows.
            Err((addr, e)) => tracing::warn!(host = %addr, error = %e, "host logs not read"),
        }
    }
    lines.sort_by_key(LogLine::key);
    let keep = q.lines.unwrap_or(MAX_LOG_LINES);
    if lines.len() > keep {
        lines.drain(..lines.len() - keep);
    }
    Ok(Json(lines))
}

#[derive(Deserialize, Default)]
struct HostJobsOpts {
    /// Also the stopped jobs this host keeps in its history.
    #[serde(default)]
    all: bool,
}

/// The jobs placed on this host (from the cluster state), with their init's pid if running.
async fn host_jobs(
    State(host): State<AppState>,
    Query(opts): Query<HostJobsOpts>,
) -> ApiResult<Json<Vec<serde_json::Value>>> {
    let node = host.node()?;
    let pids: BTreeMap<String, u64> = host
        .jobs()
        .map(|r| {
            r.local_jobs()
                .into_iter()
                .map(|(j, pid)| (j.id, pid))
                .collect()
        })
        .unwrap_or_default();
    let jobs: Vec<Job> = node.state.read(|a| {
        a.state
            .jobs
            .jobs
            .values()
            .filter(|j| j.host == host.id && (opts.all || j.state.is_active()))
            .cloned()
            .collect()
    });
    let out = jobs
        .into_iter()
        .map(|j| {
            let mut v = serde_json::to_value(&j).unwrap_or_default();
            v["pid"] = serde_json::json!(pids.get(&j.id));
            v
        })
        .collect();
    Ok(Json(out))
}

async fn host_stop(State(host): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let node = host.node()?;
    let here = node
        .state
        .read(|a| a.state.jobs.jobs.get(&id).map(|j| j.host == host.id));
    match here {
        None => Err(ApiError::NotFound(format!("job {id:?}"))),
        Some(false) => Err(ApiError::Invalid(format!(
            "job {id:?} runs on another host"
        ))),
        Some(true) => Ok(Json(node.propose_as(JobsCommand::StopJob { id }).await?)),
    }
}

async fn host_logs(
    State(host): State<AppState>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<Vec<LogLine>>> {
    let Some(runner) = host.jobs() else {
        return Ok(Json(Vec::new()));
    };
    let runner = runner.clone();
    let lines = tokio::task::spawn_blocking(move || runner.logs.read(&q))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(lines))
}

/// `POST /apps/{app}/run`: a one-off job of the app's current release.
async fn run(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<RunRequest>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    if req.args.is_empty() || req.args[0].is_empty() {
        return Err(ApiError::Invalid("nothing to run: give a command".into()));
    }
    let node = host.node()?;
    node.read_barrier().await?;
    let (job_app, release, env) = match &req.provider {
        Some(provider) => provider_run(node, &app, provider)?,
        None => {
            // A system app without a release runs from its system image (flynn-blobstore).
            let tmp = host.dir.root().join("tmp");
            crate::jobs::system_image::ensure_release(node, host.blobstore(), &tmp, &app).await?;
            let release = node.state.read(|a| {
                let s = &a.state;
                s.app(&app)?;
                s.jobs
                    .formations
                    .get(&app)
                    .map(|f| f.release.clone())
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        ApiError::Invalid(format!(
                            "app {app:?} has no release to run: deploy one first"
                        ))
                    })
            })?;
            (app, release, BTreeMap::new())
        }
    };
    let job = crate::jobs::oneoff::place(
        host.node()?,
        host.jobs().is_some().then_some(host.id),
        flynn_state::jobs::NewJob {
            // A terminal's input is the session's: it is always passed.
            stdin: req.stdin || req.tty.is_some(),
            tty: req.tty,
            env,
            ..flynn_state::jobs::NewJob::one_off(job_app, release, req.args)
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// Where `flynn pg psql` runs: a job of the provider's server app (its image has the
/// clients), with `app`'s resource env. The job's app, release and env.
fn provider_run(
    node: &crate::node::Node,
    app: &str,
    provider: &str,
) -> ApiResult<(String, String, BTreeMap<String, String>)> {
    node.state.read(|a| {
        let s = &a.state;
        s.app(app)?;
        let p = flynn_state::resources::provider(provider).map_err(ApiError::from)?;
        let r = s
            .resources
            .of_app(app)
            .into_iter()
            .find(|r| r.provider == p.name)
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{app} has no {} resource (flynn -a {app} resource add {})",
                    p.name, p.name
                ))
            })?;
        crate::databases::dumps::client_job(s, r)
    })
}

/// `POST /apps/{app}/builds`: a build job of an uploaded source layer on the cluster's base
/// image; its output (and, at its end, the slug layer) is read like a one-off job's.
async fn build(
    State(host): State<AppState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<flynn_client::BuildRequest>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    check_sha(&req.source.sha512)?;
    let node = host.node()?;
    layers_stored(node, std::slice::from_ref(&req.source)).await?;
    let (image, release) = node.state.read(|a| {
        let s = &a.state;
        s.app(&app)?;
        let image = s.jobs.images.get("base").cloned().ok_or_else(|| {
            ApiError::Invalid(
                "the cluster has no base image to build on (an operator sets it: flynn base-image push IMAGE.tar)"
                    .into(),
            )
        })?;
        let release = s.jobs.formations.get(&app).map(|f| f.release.clone());
        Ok::<_, ApiError>((image, release.unwrap_or_default()))
    })?;
    let job = crate::jobs::oneoff::place(
        host.node()?,
        host.jobs().is_some().then_some(host.id),
        flynn_state::jobs::NewJob {
            proc_type: "build".into(),
            build: Some(flynn_state::Build {
                image,
                source: req.source,
            }),
            ..flynn_state::jobs::NewJob::one_off(
                app,
                release,
                crate::jobs::build::ARGS
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
            )
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(job)))
}
