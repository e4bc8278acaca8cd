//! Blobstore metadata: every file's path, size, SHA-512, backend and where its bytes are.
//! The bytes stay in a backend; a file is visible from every host as soon as its PUT is
//! committed here.

pub mod config;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{ApplyResult, ClusterState, Response, StateError};

pub const TABLE: Table = Table("blob/");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobFile {
    /// `/a/b.tar`: absolute, no `.` or `..` segments, no trailing `/`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-512 of the content; the embedded backend stores objects under it.
    pub sha512: String,
    /// Which backend holds the bytes (`embedded`, ...).
    pub backend: String,
    /// Hosts (Raft node ids) holding a copy, for the embedded backend.
    #[serde(default)]
    pub holders: Vec<u64>,
    /// The object's key in an external backend (the embedded one names objects by
    /// `sha512`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    pub created_ms: u64,
    pub modified_ms: u64,
}

impl BlobFile {
    /// The object holding the file's bytes in its backend: its key, or (embedded) its
    /// SHA-512.
    pub fn object(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.sha512)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BlobsCommand {
    /// Creates or replaces a file (its bytes are already stored).
    PutFile { file: BlobFile },
    /// Removes `path` and everything under `path/`.
    DeleteFiles { path: String },
    /// Records more hosts holding the embedded object `sha512` (a copy made after the PUT
    /// was acknowledged), on every file with that content.
    AddHolders { sha512: String, hosts: Vec<u64> },
    /// Points a file at a verified copy of its bytes in another backend (migrate), only if
    /// it is still the content and backend the copy was made from: a file overwritten
    /// meanwhile is left as it is (`Conflict`).
    MoveFile {
        path: String,
        from_backend: String,
        sha512: String,
        backend: String,
        key: Option<String>,
        holders: Vec<u64>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blobs {
    #[serde(default)]
    pub blobs: BTreeMap<String, BlobFile>,
}

/// Checks a blob path (see [`BlobFile::path`]).
pub fn check_path(path: &str) -> Result<(), StateError> {
    let bad = |why: &str| Err(StateError::Invalid(format!("blob path {path:?} {why}")));
    if !path.starts_with('/') || path.len() < 2 {
        return bad("must start with / and name a file");
    }
    if path.len() > 1024 {
        return bad("is longer than 1024 bytes");
    }
    if path.ends_with('/') {
        return bad("ends with / (that is a directory)");
    }
    if path.contains(['\0', '\n', '\r', '?', '#']) {
        return bad("holds a character paths may not have");
    }
    if path[1..]
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("has an empty, . or .. segment");
    }
    Ok(())
}

impl Blobs {
    /// Whether any file's bytes are the object `object` of `backend`.
    pub fn references(&self, backend: &str, object: &str) -> bool {
        self.blobs
            .values()
            .any(|f| f.backend == backend && f.object() == object)
    }

    /// The entries directly under `dir` (`/` for the root): files, and directories with a
    /// trailing `/`, sorted.
    pub fn list(&self, dir: &str) -> Vec<String> {
        let prefix = if dir.ends_with('/') {
            dir.to_string()
        } else {
            format!("{dir}/")
        };
        let mut out: Vec<String> = self
            .blobs
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| match p[prefix.len()..].find('/') {
                Some(i) => p[..prefix.len() + i + 1].to_string(),
                None => p.clone(),
            })
            .collect();
        out.dedup();
        out
    }
}

impl Area for Blobs {
    type Command = BlobsCommand;

    fn apply(s: &mut ClusterState, cmd: BlobsCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            BlobsCommand::PutFile { file } => {
                check_path(&file.path)?;
                let hex =
                    file.sha512.len() == 128 && file.sha512.bytes().all(|b| b.is_ascii_hexdigit());
                if !hex {
                    return Err(StateError::Invalid("sha512 must be 128 hex digits".into()));
                }
                s.blobs.blobs.insert(file.path.clone(), file.clone());
                cx.touch(TABLE, &file.path);
                Ok(Response::Blob { file })
            }
            BlobsCommand::MoveFile {
                path,
                from_backend,
                sha512,
                backend,
                key,
                holders,
            } => {
                let file = s
                    .blobs
                    .blobs
                    .get_mut(&path)
                    .ok_or_else(|| StateError::NotFound(format!("blob {path:?}")))?;
                if file.sha512 != sha512 || file.backend != from_backend {
                    return Err(StateError::Conflict(format!(
                        "blob {path:?} changed while it was copied; it was left as it is"
                    )));
                }
                file.backend = backend;
                file.key = key;
                file.holders = holders;
                let file = file.clone();
                cx.touch(TABLE, &path);
                Ok(Response::Blob { file })
            }
            BlobsCommand::AddHolders { sha512, hosts } => {
                let mut touched = Vec::new();
                for f in s.blobs.blobs.values_mut() {
                    if f.key.is_some() || f.sha512 != sha512 {
                        continue;
                    }
                    for h in &hosts {
                        if !f.holders.contains(h) {
                            f.holders.push(*h);
                            touched.push(f.path.clone());
                        }
                    }
                }
                for p in touched {
                    cx.touch(TABLE, &p);
                }
                Ok(Response::Done)
            }
            BlobsCommand::DeleteFiles { path } => {
                let dir = format!("{}/", path.trim_end_matches('/'));
                let gone: Vec<String> = s
                    .blobs
                    .blobs
                    .keys()
                    .filter(|p| **p == path || p.starts_with(&dir))
                    .cloned()
                    .collect();
                if gone.is_empty() {
                    return Err(StateError::NotFound(format!("blob {path:?}")));
                }
                for p in gone {
                    s.blobs.blobs.remove(&p);
                    cx.touch(TABLE, &p);
                }
                Ok(Response::Done)
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.blobs)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.blobs)]
    }
}

#[cfg(test)]
mod tests;
