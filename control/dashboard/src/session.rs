//! Session ids, their cookie, CSRF tokens and credential fingerprints.
//!
//! A session id is 32 random bytes, sent to the browser once in an `HttpOnly`, `Secure`,
//! `SameSite=Strict` cookie. The cluster state keeps only its SHA-256. The CSRF token is
//! derived from the id (an HMAC-free hash with its own prefix), so it needs no record of its
//! own, and the page learns it from the login answer or `GET /session`: script on another
//! origin can read neither.

use std::time::Duration;

use ring::digest::{digest, SHA256};

/// The session cookie's name. `__Host-`: the browser takes it only with `Secure`,
/// `Path=/` and no `Domain`, so an app at `APP.$CLUSTER_DOMAIN` cannot set one the
/// dashboard would read.
pub const COOKIE: &str = "__Host-flynn_session";
/// The header state-changing requests carry the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts unless the dashboard app's `SESSION_TTL` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);
/// The dashboard app's env key for the session length (`30m`, `12h`, `7d`).
pub const TTL_ENV: &str = "SESSION_TTL";

fn sha256_hex(parts: &[&[u8]]) -> String {
    let joined: Vec<u8> = parts.concat();
    hex(digest(&SHA256, &joined).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new session id: 32 random bytes as hex.
pub fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// What the state stores for a session id.
pub fn id_hash(id: &str) -> String {
    sha256_hex(&[b"flynn-session:", id.as_bytes()])
}

/// The CSRF token of a session.
pub fn csrf_token(id: &str) -> String {
    sha256_hex(&[b"flynn-csrf:", id.as_bytes()])
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()))
}

/// Every well-formed session id in a `Cookie` header (a browser may send more than one
/// cookie of a name; the caller tries each, a few at most).
pub fn ids_from_cookies(header: &str) -> impl Iterator<Item = &str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that gives the browser a session for `ttl`.
pub fn set_cookie(id: &str, ttl: Duration) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        ttl.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// Parses a session length: a number with `s`, `m`, `h` or `d`, from 10 s to 7 days.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{TTL_ENV}={text:?}: expected a number with s, m, h or d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{TTL_ENV}={text:?}: the unit is s, m, h or d")),
    };
    if !(10..=7 * 86_400).contains(&secs) {
        return Err(format!("{TTL_ENV}={text:?}: a session lasts 10s to 7d"));
    }
    Ok(Duration::from_secs(secs))
}

/// Whether a request that came with these `Origin` and `Sec-Fetch-Site` headers comes from
/// the dashboard's own page at `host` (the request's `Host`). A request that names no
/// origin is a navigation or a client that is not a browser: allowed (it still needs the
/// cookie, and to change anything the CSRF token).
pub fn same_origin(host: &str, origin: Option<&str>, fetch_site: Option<&str>) -> bool {
    if let Some(site) = fetch_site {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    match origin {
        None => true,
        Some(o) => {
            let o = o.trim().to_ascii_lowercase();
            let host = host.trim().to_ascii_lowercase();
            // The dashboard is served over HTTPS only (the router redirects plain HTTP).
            o == format!("https://{host}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_ids_hash_and_tokens_differ_and_are_stable() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(id_hash(&a), id_hash(&a));
        assert_ne!(
            id_hash(&a),
            csrf_token(&a),
            "the token is not the stored hash"
        );
        assert_eq!(id_hash(&a).len(), 64);
    }

    #[test]
    fn t02_the_cookie_is_found_among_others_and_malformed_ones_are_not() {
        let id = new_id();
        let other = new_id();
        let header = format!(
            "theme=dark; {COOKIE}={id}; flynn_session={other}; {COOKIE}=short; {COOKIE}={other}"
        );
        let found: Vec<&str> = ids_from_cookies(&header).collect();
        assert_eq!(
            found,
            vec![id.as_str(), other.as_str()],
            "only well-formed ids of the cookie"
        );
        assert_eq!(ids_from_cookies("nothing=here").count(), 0);
        let set = set_cookie(&id, Duration::from_secs(60));
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Max-Age=60",
            "Path=/",
        ] {
            assert!(set.contains(attr), "{set} has {attr}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn t03_session_lengths_parse_within_bounds() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl(" 10s "), Ok(Duration::from_secs(10)));
        for bad in [
            "",
            "5s",
            "8d",
            "12",
            "h",
            "1.5h",
            "-1h",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn t04_only_the_dashboards_own_origin_passes() {
        let host = "dashboard.example.test";
        assert!(same_origin(host, None, None));
        assert!(same_origin(
            host,
            Some("https://dashboard.example.test"),
            Some("same-origin")
        ));
        assert!(same_origin(
            "dashboard.example.test:8443",
            Some("https://Dashboard.example.test:8443"),
            None
        ));
        assert!(
            !same_origin(host, Some("http://dashboard.example.test"), None),
            "https only"
        );
        assert!(!same_origin(host, Some("https://evil.test"), None));
        assert!(!same_origin(host, Some("null"), None));
        assert!(!same_origin(host, None, Some("cross-site")));
        assert!(!same_origin(host, None, Some("same-site")));
        assert!(!same_origin(
            "dashboard.example.test:8443",
            Some("https://dashboard.example.test"),
            None
        ));
    }

    #[test]
    fn t05_secrets_compare_equal_only_when_equal() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
