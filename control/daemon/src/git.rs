//! The git server's host side (`git push flynn main`): where each app's bare repository
//! lives, the push lock, and the repository's copy in the blobstore.
//!
//! Every host answers `git.$CLUSTER_DOMAIN` (its API is in service `controller`), but an
//! app's repository lives on one host, its home, recorded in the state
//! (`flynn_state::git`). A host asked about a repository that lives elsewhere forwards the
//! request there. The first push makes the receiving host the home; a home that is gone (or
//! a cluster restored from a backup) is replaced by the next host asked, which restores the
//! repository from its copy in the blobstore (`/git/APP-REV.bundle`, a `git bundle` of
//! every ref, written after each deployed push). Pushes hold the app's push lock, taken
//! by compare-and-set and renewed while the push runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flynn_state::git::{GitCommand, Repo};

use crate::error::{ApiError, ApiResult};
use crate::host::Host;

/// How long one lock lasts unless renewed, and how often a running push renews it.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
pub const LOCK_RENEW: Duration = Duration::from_secs(10);

/// Where an app's repository is served from.
pub enum Home {
    /// Here, at this path.
    Local { path: PathBuf, record: Repo },
    /// On another host's API (`IP:PORT`).
    Remote { addr: String },
}

/// This host's repositories directory.
pub fn repos_dir(host: &Host) -> PathBuf {
    host.dir.root().join("git")
}

/// The `git` executable.
pub fn git_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("FLYNN_GIT").unwrap_or_else(|| "git".into()))
}

/// The program the pre-receive hook runs: the `flynn` CLI beside this binary (as installed
/// and as built), else `flynn` on PATH.
pub fn hook_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("flynn")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("flynn"))
}

/// Where the blobstore keeps a repository's copy.
pub fn bundle_path(repo_dir_name: &str) -> String {
    format!("/git/{}.bundle", repo_dir_name.trim_end_matches(".git"))
}

/// Finds where `app`'s repository is served: here (made or restored if needed), or the
/// live host that holds it.
pub async fn home(host: &Arc<Host>, app: &str) -> ApiResult<Home> {
    let node = host.node()?;
    let now = crate::now_ms();
    let (created, record, live) = node.state.read(|a| {
        let s = &a.state;
        let created = s.apps.get(app).map(|a| a.created_revision);
        let record = s.git.repos.get(app).cloned();
        let live = crate::jobs::scheduler::live_hosts(s, now);
        (created, record, live)
    });
    let created = created.ok_or_else(|| ApiError::NotFound(format!("app {app} not found")))?;
    let record = match record.filter(|r| r.app_revision == created) {
        Some(r) => r,
        // A new repository: the first host asked claims it, so every request for it goes
        // to one place from the first on.
        None => {
            node.propose_as::<Repo>(GitCommand::Claim {
                app: app.to_string(),
                host: host.id,
            })
            .await?
        }
    };
    let dir_name = record.dir_name();
    let path = repos_dir(host).join(&dir_name);
    if record.host != host.id && record.host != 0 && live.contains(&record.host) {
        let addr = node
            .metrics()
            .membership_config
            .membership()
            .get_node(&record.host)
            .map(|n| n.addr.clone());
        match addr {
            Some(addr) => return Ok(Home::Remote { addr }),
            // A live host that left the membership: as good as gone.
            None => tracing::warn!(app, host = record.host, "repository home is not a member"),
        }
    }
    let restored = if record.host != host.id {
        // Its home is gone (or this cluster was restored from a backup): take it over.
        tracing::info!(app, from = record.host, "taking over the repository");
        node.propose(GitCommand::MoveRepo {
            app: app.to_string(),
            host: host.id,
        })
        .await?;
        restore(host, &dir_name, &path).await?;
        true
    } else if !path.join("HEAD").is_file() && record.pushes > 0 {
        // Its home lost the directory: the copy is what is left.
        restore(host, &dir_name, &path).await?;
        true
    } else {
        false
    };
    if restored || !path.join("HEAD").is_file() {
        let (git, p) = (git_bin(), path.clone());
        tokio::task::spawn_blocking(move || flynn_git::init_bare(&git, &p))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(Home::Local { path, record })
}

/// Restores a repository from its copy in the blobstore, if there is one.
async fn restore(host: &Arc<Host>, dir_name: &str, path: &Path) -> ApiResult<()> {
    let Some(blobstore) = host.blobstore() else {
        return Ok(());
    };
    let bundle = bundle_path(dir_name);
    if blobstore.file(&bundle).is_none() {
        return Ok(());
    }
    let local = blobstore.local_copy(&bundle).await?;
    let (git, path) = (git_bin(), path.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let tmp = path.with_extension("git.restore");
        let _ = std::fs::remove_dir_all(&tmp);
        let out = flynn_git::git_command(&git)
            .args(["clone", "--quiet", "--mirror"])
            .arg(&local)
            .arg(&tmp)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        // A mirror of the bundle: its refs are the app's, its remote is no longer needed.
        let _ = flynn_git::git_command(&git)
            .arg("-C")
            .arg(&tmp)
            .args(["remote", "remove", "origin"])
            .output();
        let _ = std::fs::remove_dir_all(&path);
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("restoring the repository: {e}")))?;
    tracing::info!(repo = dir_name, "repository restored from its copy");
    Ok(())
}

/// A push in progress: the lock it holds (or why it holds none).
pub struct Push {
    pub id: String,
    /// The refusal the hook reports instead of deploying (another push holds the lock).
    pub refused: Option<String>,
    /// The deploy branch fixed so far (`DEPLOY_BRANCH`, else the first deployed push's).
    pub branch: Option<String>,
}

/// Takes `app`'s push lock for a new push.
pub async fn lock(host: &Arc<Host>, app: &str, record: &Repo) -> ApiResult<Push> {
    let node = host.node()?;
    let id = crate::bootstrap::random_hex(8);
    let deploy_branch = node.state.read(|a| {
        a.state
            .apps
            .get(app)
            .and_then(|a| a.env.global.get("DEPLOY_BRANCH").cloned())
            .filter(|b| !b.trim().is_empty())
    });
    let branch = deploy_branch.or_else(|| record.branch.clone());
    let taken = node
        .propose_as::<Repo>(GitCommand::Lock {
            app: app.to_string(),
            host: host.id,
            push: id.clone(),
            ttl_ms: LOCK_TTL.as_millis() as u64,
            now_ms: crate::now_ms(),
        })
        .await;
    let refused = match taken {
        Ok(_) => None,
        Err(ApiError::Conflict(why)) if why.contains("in progress") => Some(why),
        Err(e) => return Err(e),
    };
    Ok(Push {
        id,
        refused,
        branch,
    })
}

/// Keeps the lock while `done` is pending, then releases it, recording the deployed branch
/// the hook left in `result`, and copies a deployed repository to the blobstore.
pub async fn hold_until(
    host: Arc<Host>,
    app: String,
    push: String,
    repo: PathBuf,
    result: PathBuf,
    done: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tokio::time::sleep(LOCK_RENEW) => {
                let Ok(node) = host.node() else { continue };
                let renewed = node.propose(GitCommand::Lock {
                    app: app.clone(),
                    host: host.id,
                    push: push.clone(),
                    ttl_ms: LOCK_TTL.as_millis() as u64,
                    now_ms: crate::now_ms(),
                }).await;
                if let Err(e) = renewed {
                    tracing::warn!(app, error = %e, "push lock not renewed");
                }
            }
        }
    }
    let deployed = std::fs::read_to_string(&result)
        .ok()
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty());
    let _ = std::fs::remove_file(&result);
    if let Ok(node) = host.node() {
        let released = node
            .propose(GitCommand::Unlock {
                app: app.clone(),
                push,
                deployed: deployed.clone(),
            })
            .await;
        if let Err(e) = released {
            tracing::warn!(app, error = %e, "push lock not released (it lapses)");
        }
    }
    if deployed.is_some() {
        if let Err(e) = copy_to_blobstore(&host, &repo).await {
            tracing::warn!(app, error = %e, "repository not copied to the blobstore");
        }
    }
}

/// Writes a bundle of every ref of `repo` to the blobstore, for recovery on another host.
async fn copy_to_blobstore(host: &Arc<Host>, repo: &Path) -> Result<(), String> {
    let Some(blobstore) = host.blobstore() else {
        return Ok(());
    };
    let name = repo
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let file = repo.with_extension("bundle");
    let out = tokio::process::Command::from(flynn_git::git_command(&git_bin()))
        .arg("-C")
        .arg(repo)
        .args(["bundle", "create", "--quiet"])
        .arg(&file)
        .arg("--all")
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let body = tokio_util::io::ReaderStream::new(
        tokio::fs::File::open(&file)
            .await
            .map_err(|e| e.to_string())?,
    );
    let stored = blobstore
        .put(&bundle_path(&name), body, None)
        .await
        .map_err(|e| e.to_string());
    let _ = tokio::fs::remove_file(&file).await;
    stored.map(|_| ())
}
