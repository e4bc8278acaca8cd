//! Dashboard sessions: who logged in to `dashboard.$CLUSTER_DOMAIN`, with what, until when.
//!
//! A browser holds a random session id in a cookie; the state holds only its SHA-256 (so
//! reading the state or a backup gives no one a session), the credential it was opened
//! with (as a fingerprint), and its expiry. Every host checks a request against this record
//! and against the cluster's current credentials, so a session opened with a controller key
//! ends when that key is rotated out, and one opened with the login token when the token
//! changes. Logging out deletes the record on every host at once.
//!
//! Opening a session also drops the expired ones, so the table never grows past the
//! sessions alive plus one. A change of the controller's keys or the login token drops, in
//! the same step, every session whose credential is no longer accepted: putting an old key
//! back does not bring its sessions back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::{Area, Cx, Records, Table};
use crate::{ApplyResult, ClusterState, Response, StateError};

pub const TABLE: Table = Table("session/");

/// The dashboard app's env key of its login token.
pub const TOKEN_ENV: &str = "LOGIN_TOKEN";

/// Longest a session may last.
pub const MAX_SESSION_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most sessions alive at once; the oldest makes room for a new one.
pub const MAX_SESSIONS: usize = 1000;

/// What a session was opened with: a fingerprint (hex SHA-256) of the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// One of the controller keys.
    Key { fingerprint: String },
    /// The dashboard app's `LOGIN_TOKEN`.
    Token { fingerprint: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Hex SHA-256 of the cookie's session id; the record's key.
    pub id_hash: String,
    pub credential: Credential,
    pub created_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SessionsCommand {
    /// Records a new session; drops those expired at `now_ms` (and the oldest, past
    /// [`MAX_SESSIONS`]).
    Open { session: Session, now_ms: u64 },
    /// Ends a session (logout). Ending one that is gone already is no error.
    Close { id_hash: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    #[serde(default)]
    pub sessions: BTreeMap<String, Session>,
}

impl Sessions {
    /// The session with this id hash, if it is alive at `now_ms`.
    pub fn live(&self, id_hash: &str, now_ms: u64) -> Option<&Session> {
        self.sessions.get(id_hash).filter(|s| s.expires_ms > now_ms)
    }
}

/// A credential's fingerprint, as a session records it: hex SHA-256 with a prefix of its
/// own (so it is no other hash of the same secret).
pub fn fingerprint(credential: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"flynn-credential:".as_slice(), credential.as_bytes()].concat(),
    );
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Credential {
    /// Whether the cluster still accepts what this session was opened with.
    pub fn accepted(&self, s: &ClusterState) -> bool {
        match self {
            Credential::Key { fingerprint: f } => {
                s.controller_keys().iter().any(|k| fingerprint(k) == *f)
            }
            Credential::Token { fingerprint: f } => s
                .apps
                .get("dashboard")
                .and_then(|a| a.env.global.get(TOKEN_ENV))
                .is_some_and(|t| !t.is_empty() && fingerprint(t) == *f),
        }
    }
}

/// Drops every session whose credential the cluster no longer accepts.
pub(crate) fn drop_revoked(s: &mut ClusterState, cx: &mut Cx) {
    let revoked: Vec<String> = s
        .sessions
        .sessions
        .values()
        .filter(|x| !x.credential.accepted(s))
        .map(|x| x.id_hash.clone())
        .collect();
    for id in revoked {
        s.sessions.sessions.remove(&id);
        cx.touch(TABLE, &id);
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Area for Sessions {
    type Command = SessionsCommand;

    fn apply(s: &mut ClusterState, cmd: SessionsCommand, cx: &mut Cx) -> ApplyResult {
        match cmd {
            SessionsCommand::Open { session, now_ms } => {
                let fingerprint = match &session.credential {
                    Credential::Key { fingerprint } | Credential::Token { fingerprint } => {
                        fingerprint
                    }
                };
                if !is_sha256_hex(&session.id_hash) || !is_sha256_hex(fingerprint) {
                    return Err(StateError::Invalid(
                        "a session's id hash and credential fingerprint are hex SHA-256".into(),
                    ));
                }
                if session.expires_ms <= now_ms || session.expires_ms - now_ms > MAX_SESSION_TTL_MS
                {
                    return Err(StateError::Invalid(format!(
                        "a session lasts 1 ms to {} days",
                        MAX_SESSION_TTL_MS / 86_400_000
                    )));
                }
                if s.sessions.sessions.contains_key(&session.id_hash) {
                    return Err(StateError::Conflict("that session exists already".into()));
                }
                // Checked by the host against its own state, which may lag: the log decides.
                if !session.credential.accepted(s) {
                    return Err(StateError::Conflict(
                        "that credential is no longer accepted".into(),
                    ));
                }
                let expired: Vec<String> = s
                    .sessions
                    .sessions
                    .values()
                    .filter(|old| old.expires_ms <= now_ms)
                    .map(|old| old.id_hash.clone())
                    .collect();
                for id in expired {
                    s.sessions.sessions.remove(&id);
                    cx.touch(TABLE, &id);
                }
                while s.sessions.sessions.len() >= MAX_SESSIONS {
                    let oldest = s
                        .sessions
                        .sessions
                        .values()
                        .min_by_key(|old| (old.created_ms, old.id_hash.clone()))
                        .map(|old| old.id_hash.clone())
                        .expect("a full table has a first session");
                    s.sessions.sessions.remove(&oldest);
                    cx.touch(TABLE, &oldest);
                }
                cx.touch(TABLE, &session.id_hash);
                s.sessions.sessions.insert(session.id_hash.clone(), session);
                Ok(Response::Done)
            }
            SessionsCommand::Close { id_hash } => {
                if s.sessions.sessions.remove(&id_hash).is_some() {
                    cx.touch(TABLE, &id_hash);
                }
                Ok(Response::Done)
            }
        }
    }

    fn tables(&self) -> Vec<(Table, &dyn Records)> {
        vec![(TABLE, &self.sessions)]
    }

    fn tables_mut(&mut self) -> Vec<(Table, &mut dyn Records)> {
        vec![(TABLE, &mut self.sessions)]
    }
}

#[cfg(test)]
mod tests;
