//! Apps and their env: create, delete, set and unset variables (globally or per process
//! type). The controller's `AUTH_KEY` lives here too, so a key list that would lock every
//! client out is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{validate, App, ApplyResult, ClusterState, Env, Response, StateError};

pub const TABLE: Table = Table("app/");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AppsCommand {
    CreateApp {
        name: String,
    },
    DeleteApp {
        name: String,
    },
    UpdateEnv {
        app: String,
        #[serde(default)]
        proc_type: Option<String>,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        unset: Vec<String>,
        /// When it was asked (stamps the release an env change deploys).
        #[serde(default)]
        now_ms: u64,
    },
}

/// Every app by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apps {
    pub apps: BTreeMap<String, App>,
}

impl std::ops::Deref for Apps {
    type Target = BTreeMap<String, App>;
    fn deref(&self) -> &Self::Target {
        &self.apps
    }
}

impl Area for Apps {
    type Command = AppsCommand;

    fn apply(s: &mut ClusterState, cmd: AppsCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            AppsCommand::CreateApp { name } => {
                validate::app_name(&name)?;
                if s.apps.contains_key(&name) {
                    return Err(StateError::Conflict(format!("app {name:?} already exists")));
                }
                let app = App {
                    name: name.clone(),
                    system: false,
                    created_revision: cx.revision,
                    env: Env::default(),
                };
                s.apps.insert(app.clone(), cx);
                // As in Flynn: the app's web processes answer at APP.$CLUSTER_DOMAIN.
                if let Some(domain) = s.cluster.domain.clone() {
                    let route = crate::RouteSpec::http(&format!("{name}.{domain}"));
                    if let Err(e) = crate::routes::add_route(s, name.clone(), route, cx) {
                        // Taken by a route someone added by hand: the app goes without.
                        let _ = e;
                    }
                }
                Ok(Response::App { app })
            }
            AppsCommand::DeleteApp { name } => {
                let app = s.app(&name)?;
                if app.system {
                    return Err(StateError::Invalid(format!(
                        "{name:?} is a system app and cannot be deleted"
                    )));
                }
                let held: Vec<&str> = s
                    .resources
                    .of_app(&name)
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect();
                if !held.is_empty() {
                    // Its databases would be orphaned with the data in them.
                    return Err(StateError::Conflict(format!(
                        "{name} has resources ({}): remove them first (flynn resource remove ID)",
                        held.join(", ")
                    )));
                }
                s.apps.apps.remove(&name);
                cx.touch(TABLE, &name);
                crate::routes::remove_app_routes(s, &name, cx);
                crate::jobs::remove_app(s, &name, cx);
                crate::git::remove_app(s, &name, cx);
                Ok(Response::Done)
            }
            AppsCommand::UpdateEnv {
                app,
                proc_type,
                set,
                unset,
                now_ms,
            } => update_env(s, &app, proc_type, set, unset, now_ms, cx),
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.apps)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.apps)]
    }
}

impl Apps {
    /// Inserts or replaces an app and marks it changed.
    pub(crate) fn insert(&mut self, app: App, cx: &mut Cx) {
        cx.touch(TABLE, &app.name);
        self.apps.insert(app.name.clone(), app);
    }

    /// Sets one global variable of an existing app; marks it only if the value changes.
    pub(crate) fn set_global(
        &mut self,
        app: &str,
        key: &str,
        value: String,
        cx: &mut Cx,
    ) -> Result<(), StateError> {
        let entry = self
            .apps
            .get_mut(app)
            .ok_or_else(|| StateError::NotFound(format!("app {app:?}")))?;
        if entry.env.global.get(key) != Some(&value) {
            entry.env.global.insert(key.into(), value);
            cx.touch(TABLE, app);
        }
        Ok(())
    }
}

pub(crate) fn update_env(
    s: &mut ClusterState,
    app: &str,
    proc_type: Option<String>,
    set: BTreeMap<String, String>,
    unset: Vec<String>,
    now_ms: u64,
    cx: &mut Cx,
) -> ApplyResult {
    if set.is_empty() && unset.is_empty() {
        return Err(StateError::Invalid("nothing to set or unset".into()));
    }
    if let Some(t) = &proc_type {
        validate::proc_type(t)?;
    }
    for (k, v) in &set {
        validate::env_pair(k, v)?;
    }
    for k in &unset {
        validate::env_key(k)?;
    }
    let mut env = s.app(app)?.env.clone();
    apply_env(&mut env, proc_type.as_deref(), &set, &unset);
    if app == "controller" {
        // A controller key list that would lock every client out is refused.
        match env.get(Some("web"), "AUTH_KEY") {
            Some(keys) => validate::auth_keys(keys)?,
            None => {
                return Err(StateError::Invalid(
                    "the controller must keep an AUTH_KEY".into(),
                ))
            }
        }
    }
    if app == "dashboard" {
        if let Some(token) = env.global.get(crate::sessions::TOKEN_ENV) {
            validate::login_token(token)?;
        }
    }
    if app == "blobstore" {
        // A blobstore configuration that cannot work is refused, the env left as it was.
        crate::blobs::config::backends(&env.global)?;
    }
    if app == "gitreceive" {
        // The SSH client identity builds fetch with: refused unless it can be used.
        if let Some(key) = set.get("SSH_CLIENT_KEY") {
            validate::ssh_private_key(key)?;
        }
        if let Some(hosts) = set.get("SSH_CLIENT_HOSTS") {
            validate::ssh_known_hosts(hosts)?;
        }
        if let Some(limit) = set.get(crate::BUILD_MEMORY_ENV) {
            crate::build_memory(Some(limit))?;
        }
    }
    let mut updated = s.app(app)?.clone();
    updated.env = env;
    s.apps.insert(updated.clone(), cx);
    if app == "controller" || app == "dashboard" {
        // A key rotated out or a new login token ends the sessions opened with the old.
        crate::sessions::drop_revoked(s, cx);
    }
    // As in Flynn, a changed env is a new release, deployed.
    crate::jobs::redeploy_with_env(s, app, now_ms, cx);
    Ok(Response::App { app: updated })
}

/// Sets and unsets variables of `env` (of one process type's overrides, if given), as
/// `UpdateEnv` does.
pub fn apply_env(
    env: &mut Env,
    proc_type: Option<&str>,
    set: &BTreeMap<String, String>,
    unset: &[String],
) {
    let vars = match proc_type {
        Some(t) => env.types.entry(t.to_string()).or_default(),
        None => &mut env.global,
    };
    vars.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    for k in unset {
        vars.remove(k);
    }
    if let Some(t) = proc_type {
        if env.types.get(t).is_some_and(BTreeMap::is_empty) {
            env.types.remove(t);
        }
    }
}

#[cfg(test)]
mod tests;
