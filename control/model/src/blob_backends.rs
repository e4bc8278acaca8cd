//! The blobstore's backend configuration, as the `blobstore` app's env holds it (Flynn's form):
//!
//! - `BACKEND_<NAME>="backend=s3 region=us-east-1 bucket=b access_key_id=.. secret_access_key=.."`:
//!   a space-separated `k=v` list;
//! - `BACKEND_<NAME>_<KEY>=value` adds a key (GCS: `BACKEND_GCSMAIN_KEY` is the service
//!   account JSON);
//! - `DEFAULT_BACKEND=<name>`; names are case-insensitive.
//!
//! What can be decided from the text alone is checked here, deterministically, so a
//! malformed configuration is refused at `env set` and the env stays as it was. Whether the
//! credentials work is the blobstore's to check against the backend itself.

use std::collections::BTreeMap;

/// The backends there are, with the keys each needs.
const BACKENDS: &[(&str, &[&str])] = &[
    ("embedded", &[]),
    ("postgres", &[]),
    ("s3", &["bucket", "region"]),
    ("gcs", &["bucket", "key"]),
    ("azure", &["account_name", "account_key", "container"]),
];

/// One configured backend: its type and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub backend: String,
    pub keys: BTreeMap<String, String>,
}

fn refuse(name: &str, why: impl std::fmt::Display) -> String {
    format!("blobstore backend {name:?}: {why}")
}

/// Parses and checks every backend of a blobstore env. `Ok`: the configured backends (the
/// built-in `embedded` one is always there); `Err`: why the env is refused.
pub fn blob_backends(env: &BTreeMap<String, String>) -> Result<Vec<BackendConfig>, String> {
    let mut found: BTreeMap<String, BackendConfig> = BTreeMap::new();
    let mut extra: Vec<(String, String, &String)> = Vec::new();
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("BACKEND_") else {
            continue;
        };
        match rest.split_once('_') {
            Some((name, key)) => extra.push((name.to_lowercase(), key.to_lowercase(), value)),
            None => {
                let name = rest.to_lowercase();
                if name.is_empty() {
                    return Err(refuse("", "BACKEND_ needs a name"));
                }
                let mut keys = BTreeMap::new();
                for token in value.split_whitespace() {
                    let (k, v) = token
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| refuse(&name, format!("{token:?} is not key=value")))?;
                    keys.insert(k.to_lowercase(), v.to_string());
                }
                let backend = keys
                    .remove("backend")
                    .ok_or_else(|| refuse(&name, "no backend=TYPE"))?;
                found.insert(
                    name.clone(),
                    BackendConfig {
                        name,
                        backend,
                        keys,
                    },
                );
            }
        }
    }
    for (name, key, value) in extra {
        let b = found.get_mut(&name).ok_or_else(|| {
            refuse(
                &name,
                format!(
                    "BACKEND_{}_{} names no backend",
                    name.to_uppercase(),
                    key.to_uppercase()
                ),
            )
        })?;
        b.keys.insert(key, value.clone());
    }
    for b in found.values() {
        let Some((_, needs)) = BACKENDS.iter().find(|(t, _)| *t == b.backend) else {
            let known: Vec<&str> = BACKENDS.iter().map(|(t, _)| *t).collect();
            return Err(refuse(
                &b.name,
                format!(
                    "unknown backend type {:?} (one of {})",
                    b.backend,
                    known.join(", ")
                ),
            ));
        };
        for need in *needs {
            if b.keys.get(*need).is_none_or(|v| v.is_empty()) {
                return Err(refuse(&b.name, format!("{} needs {need}", b.backend)));
            }
        }
        if b.backend == "postgres" && !b.keys.contains_key("url") && !b.keys.contains_key("host") {
            return Err(refuse(&b.name, "postgres needs url or host"));
        }
        if b.backend == "gcs" {
            let key = &b.keys["key"];
            let json: Result<serde_json::Map<String, serde_json::Value>, _> =
                serde_json::from_str(key);
            if json.is_err() {
                return Err(refuse(
                    &b.name,
                    "the gcs key is not a service account JSON object",
                ));
            }
        }
    }
    let mut all: Vec<BackendConfig> = found.into_values().collect();
    if !all.iter().any(|b| b.name == "embedded") {
        all.push(BackendConfig {
            name: "embedded".into(),
            backend: "embedded".into(),
            keys: BTreeMap::new(),
        });
    }
    if let Some(default) = env.get("DEFAULT_BACKEND") {
        let default = default.to_lowercase();
        if !all.iter().any(|b| b.name == default) {
            let names: Vec<&str> = all.iter().map(|b| b.name.as_str()).collect();
            return Err(refuse(
                &default,
                format!(
                    "DEFAULT_BACKEND names no configured backend ({})",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(all)
}
