use crate::sessions::{Credential, Session, SessionsCommand, MAX_SESSIONS, MAX_SESSION_TTL_MS};
use crate::testing::*;

fn hex(n: u64) -> String {
    format!("{n:064x}")
}

fn session(n: u64, created_ms: u64, ttl_ms: u64) -> Session {
    Session {
        id_hash: hex(n),
        credential: Credential::Key {
            fingerprint: crate::sessions::fingerprint(KEY),
        },
        created_ms,
        expires_ms: created_ms + ttl_ms,
    }
}

fn open(n: u64, now_ms: u64, ttl_ms: u64) -> SessionsCommand {
    SessionsCommand::Open {
        session: session(n, now_ms, ttl_ms),
        now_ms,
    }
}

#[test]
fn t10_a_session_lives_until_its_expiry_and_logout_ends_it() {
    let mut s = booted();
    ok(&mut s, open(1, 1_000, 60_000));
    assert!(s.sessions.live(&hex(1), 60_999).is_some());
    assert!(s.sessions.live(&hex(1), 61_000).is_none(), "expired");
    assert!(s.sessions.live(&hex(2), 2_000).is_none(), "never opened");
    let dirty = s.take_dirty();
    assert!(dirty.iter().any(|(t, k)| t.0 == "session/" && *k == hex(1)));
    ok(&mut s, SessionsCommand::Close { id_hash: hex(1) });
    assert!(s.sessions.live(&hex(1), 2_000).is_none(), "logged out");
    let rev = s.revision;
    ok(&mut s, SessionsCommand::Close { id_hash: hex(1) });
    assert_eq!(s.revision, rev, "closing a closed session changes nothing");
}

#[test]
fn t11_opening_a_session_sweeps_expired_ones_and_bounds_the_table() {
    let mut s = booted();
    ok(&mut s, open(1, 1_000, 1_000));
    ok(&mut s, open(2, 1_500, 60_000));
    ok(&mut s, open(3, 5_000, 60_000));
    assert!(
        !s.sessions.sessions.contains_key(&hex(1)),
        "expired one swept"
    );
    assert!(s.sessions.sessions.contains_key(&hex(2)));
    for n in 10..(10 + MAX_SESSIONS as u64) {
        ok(&mut s, open(n, 6_000 + n, 60_000));
    }
    assert_eq!(s.sessions.sessions.len(), MAX_SESSIONS);
    assert!(
        !s.sessions.sessions.contains_key(&hex(2)),
        "the oldest made room"
    );
}

#[test]
fn t12_bad_sessions_are_refused_and_change_nothing() {
    let mut s = booted();
    let rev = s.revision;
    let mut bad = session(1, 1_000, 60_000);
    bad.id_hash = "not-a-hash".into();
    let cmd = SessionsCommand::Open {
        session: bad,
        now_ms: 1_000,
    };
    assert!(matches!(apply(&mut s, cmd).0, Err(StateError::Invalid(_))));
    let too_long = open(1, 1_000, MAX_SESSION_TTL_MS + 1);
    assert!(matches!(
        apply(&mut s, too_long).0,
        Err(StateError::Invalid(_))
    ));
    let expired = SessionsCommand::Open {
        session: session(1, 1_000, 10),
        now_ms: 2_000,
    };
    assert!(matches!(
        apply(&mut s, expired).0,
        Err(StateError::Invalid(_))
    ));
    assert_eq!(s.revision, rev);
    ok(&mut s, open(1, 1_000, 60_000));
    assert!(matches!(
        apply(&mut s, open(1, 1_000, 60_000)).0,
        Err(StateError::Conflict(_))
    ));
}

#[test]
fn t13_a_restored_backup_brings_no_session() {
    let mut old = booted();
    ok(&mut old, open(1, 1_000, 60_000));
    let fresh = booted();
    let restored = old.clone().restored_onto(&fresh);
    assert!(restored.sessions.sessions.is_empty());
}

#[test]
fn t14_rotating_a_key_or_the_token_drops_the_sessions_opened_with_it() {
    use crate::sessions::fingerprint;
    let mut s = booted();
    ok(
        &mut s,
        env_set("dashboard", None, "LOGIN_TOKEN", "token-one-0123456789"),
    );
    let mut by_key = session(1, 1_000, 60_000);
    by_key.credential = Credential::Key {
        fingerprint: fingerprint(KEY),
    };
    let mut by_token = session(2, 1_000, 60_000);
    by_token.credential = Credential::Token {
        fingerprint: fingerprint("token-one-0123456789"),
    };
    for session in [by_key, by_token] {
        ok(
            &mut s,
            SessionsCommand::Open {
                session,
                now_ms: 1_000,
            },
        );
    }
    let new = "feedfacefeedfacefeed";
    ok(
        &mut s,
        env_set("controller", None, "AUTH_KEY", &format!("{KEY},{new}")),
    );
    assert_eq!(
        s.sessions.sessions.len(),
        2,
        "both keys: the key's session lives"
    );
    ok(&mut s, env_set("controller", None, "AUTH_KEY", new));
    assert!(
        !s.sessions.sessions.contains_key(&hex(1)),
        "rotated out: ended"
    );
    assert!(
        s.sessions.sessions.contains_key(&hex(2)),
        "the token's is not the key's"
    );
    ok(
        &mut s,
        env_set("controller", None, "AUTH_KEY", &format!("{KEY},{new}")),
    );
    assert!(
        !s.sessions.sessions.contains_key(&hex(1)),
        "putting the old key back does not bring its session back"
    );
    ok(
        &mut s,
        env_set("dashboard", None, "LOGIN_TOKEN", "token-two-0123456789"),
    );
    assert!(
        s.sessions.sessions.is_empty(),
        "a new token ends the token's sessions"
    );
}

#[test]
fn t15_a_session_of_a_credential_no_longer_accepted_is_refused_and_tokens_are_checked() {
    let mut s = booted();
    let mut stale = session(1, 1_000, 60_000);
    stale.credential = Credential::Key {
        fingerprint: crate::sessions::fingerprint("an-old-key-rotated-out"),
    };
    let cmd = SessionsCommand::Open {
        session: stale,
        now_ms: 1_000,
    };
    assert!(matches!(apply(&mut s, cmd).0, Err(StateError::Conflict(_))));
    for bad in ["short", "has space in it 0123", "quote\"0123456789abcdef"] {
        let r = apply(&mut s, env_set("dashboard", None, "LOGIN_TOKEN", bad)).0;
        assert!(matches!(r, Err(StateError::Invalid(_))), "{bad:?}");
    }
}
