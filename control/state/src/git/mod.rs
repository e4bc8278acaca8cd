//! Git repositories (`git push flynn main`): where each app's bare repository lives, the
//! branch that deploys, and the per-app push lock.
//!
//! The repository's bytes stay on one host (its home); the record says which. A push takes
//! the lock by compare-and-set and renews it while it builds; a second push meanwhile is
//! refused with "a push to APP is in progress". A lock whose holder stopped renewing it
//! lapses at its expiry, so a crashed push cannot hold an app forever. A repository belongs
//! to one incarnation of its app (`app_revision`): deleting the app drops the record, and an
//! app created later under the same name starts with an empty repository.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{ApplyResult, ClusterState, Response, StateError};

pub const TABLE: Table = Table("git/");

/// Longest a push lock may be taken or renewed for at once.
pub const MAX_LOCK_TTL_MS: u64 = 10 * 60 * 1000;

/// One app's repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    pub app: String,
    /// The app's `created_revision`: which incarnation of the name this repository is.
    pub app_revision: u64,
    /// Raft node id of the host holding the bare repository; 0 when none does (a cluster
    /// restored from a backup: the first host asked restores it from its copy).
    pub host: u64,
    /// The branch whose pushes deploy, fixed by the first deployed push (`main` or
    /// `master`); the app's `DEPLOY_BRANCH` env overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<PushLock>,
    /// Deployed pushes so far.
    #[serde(default)]
    pub pushes: u64,
}

impl Repo {
    /// A new, empty repository of `app`'s incarnation `app_revision`, at home on `host`.
    pub fn new(app: &str, app_revision: u64, host: u64) -> Repo {
        Repo {
            app: app.to_string(),
            app_revision,
            host,
            branch: None,
            lock: None,
            pushes: 0,
        }
    }

    /// The repository's directory name on its host: the app and its incarnation.
    pub fn dir_name(&self) -> String {
        format!("{}-{}.git", self.app, self.app_revision)
    }

    /// The lock, if one is held at `now_ms`.
    pub fn held_lock(&self, now_ms: u64) -> Option<&PushLock> {
        self.lock.as_ref().filter(|l| l.expires_ms > now_ms)
    }
}

/// A push in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushLock {
    /// The push's own id (random, chosen by the pushing host).
    pub push: String,
    pub host: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GitCommand {
    /// Takes (or renews, for the same `push`) the app's push lock. The first lock of an app
    /// makes its record, with `host` as the repository's home. Refused while another push
    /// holds the lock, or when the repository lives on another host.
    Lock {
        app: String,
        host: u64,
        push: String,
        ttl_ms: u64,
        now_ms: u64,
    },
    /// Releases the lock `push` holds; `deployed` names the branch a push deployed, which
    /// the first deployed push fixes as the app's deploy branch.
    Unlock {
        app: String,
        push: String,
        #[serde(default)]
        deployed: Option<String>,
    },
    /// Makes `host` the home of `app`'s repository unless it has one: the first host asked
    /// about a new repository claims it, and every later request goes there. Answers the
    /// record as it then is.
    Claim { app: String, host: u64 },
    /// Moves an app's repository to another host (restored there from its copy).
    MoveRepo { app: String, host: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Git {
    /// App name → its repository.
    #[serde(default)]
    pub repos: BTreeMap<String, Repo>,
}

impl Area for Git {
    type Command = GitCommand;

    fn apply(s: &mut ClusterState, cmd: GitCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            GitCommand::Lock {
                app,
                host,
                push,
                ttl_ms,
                now_ms,
            } => {
                let app_revision = s.app(&app)?.created_revision;
                if push.is_empty() || push.len() > 64 {
                    return Err(StateError::Invalid("a push id is 1-64 characters".into()));
                }
                if ttl_ms == 0 || ttl_ms > MAX_LOCK_TTL_MS {
                    return Err(StateError::Invalid(format!(
                        "a push lock lasts 1 to {MAX_LOCK_TTL_MS} ms"
                    )));
                }
                let mut repo = match s.git.repos.get(&app) {
                    Some(r) if r.app_revision == app_revision => r.clone(),
                    _ => Repo::new(&app, app_revision, host),
                };
                // A restored cluster's repositories have no home until one host restores
                // them from their copies.
                if repo.host == 0 {
                    repo.host = host;
                }
                if repo.host != host {
                    return Err(StateError::Conflict(format!(
                        "the repository of {app} is on host {}",
                        repo.host
                    )));
                }
                if let Some(held) = repo.held_lock(now_ms) {
                    if held.push != push {
                        return Err(StateError::Conflict(format!(
                            "a push to {app} is in progress"
                        )));
                    }
                }
                repo.lock = Some(PushLock {
                    push,
                    host,
                    expires_ms: now_ms.saturating_add(ttl_ms),
                });
                s.git.repos.insert(app.clone(), repo.clone());
                cx.touch(TABLE, &app);
                Ok(Response::GitRepo { repo })
            }
            GitCommand::Unlock {
                app,
                push,
                deployed,
            } => {
                let repo = s
                    .git
                    .repos
                    .get(&app)
                    .ok_or_else(|| StateError::NotFound(format!("repository of {app:?}")))?;
                if repo.lock.as_ref().map(|l| l.push.as_str()) != Some(push.as_str()) {
                    return Err(StateError::Conflict(format!(
                        "push {push} does not hold the lock of {app}"
                    )));
                }
                let mut repo = repo.clone();
                repo.lock = None;
                if let Some(branch) = deployed {
                    repo.branch.get_or_insert(branch);
                    repo.pushes += 1;
                }
                s.git.repos.insert(app.clone(), repo.clone());
                cx.touch(TABLE, &app);
                Ok(Response::GitRepo { repo })
            }
            GitCommand::Claim { app, host } => {
                let app_revision = s.app(&app)?.created_revision;
                if let Some(r) = s
                    .git
                    .repos
                    .get(&app)
                    .filter(|r| r.app_revision == app_revision)
                {
                    return Ok(Response::GitRepo { repo: r.clone() });
                }
                let repo = Repo::new(&app, app_revision, host);
                s.git.repos.insert(app.clone(), repo.clone());
                cx.touch(TABLE, &app);
                Ok(Response::GitRepo { repo })
            }
            GitCommand::MoveRepo { app, host } => {
                let repo = s
                    .git
                    .repos
                    .get_mut(&app)
                    .ok_or_else(|| StateError::NotFound(format!("repository of {app:?}")))?;
                repo.host = host;
                repo.lock = None;
                let repo = repo.clone();
                cx.touch(TABLE, &app);
                Ok(Response::GitRepo { repo })
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.repos)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.repos)]
    }
}

/// Drops a deleted app's repository record.
pub(crate) fn remove_app(s: &mut ClusterState, app: &str, cx: &mut Cx) {
    if s.git.repos.remove(app).is_some() {
        cx.touch(TABLE, app);
    }
}

#[cfg(test)]
mod tests;
