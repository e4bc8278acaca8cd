//! Input checks shared by the state machine and the API (the API checks early for a clear
//! 400; the state machine checks again because the log is the last line of defence).

use crate::{NewCertificate, StateError};

fn invalid(msg: impl Into<String>) -> StateError {
    StateError::Invalid(msg.into())
}

/// App names: DNS-label shaped, as Flynn requires (they become hostnames).
pub fn app_name(name: &str) -> Result<(), StateError> {
    label(name, "app name")
}

pub fn service_name(name: &str) -> Result<(), StateError> {
    label(name, "service name")
}

pub fn proc_type(name: &str) -> Result<(), StateError> {
    label(name, "process type")
}

fn label(name: &str, what: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )))
    }
}

pub fn env_key(key: &str) -> Result<(), StateError> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "env name {key:?} must be 1-256 characters of A-Z, a-z, 0-9, '_', '.', '-'"
        )))
    }
}

pub fn env_pair(key: &str, value: &str) -> Result<(), StateError> {
    env_key(key)?;
    if value.contains('\0') {
        return Err(invalid(format!("env value of {key} contains a NUL byte")));
    }
    if value.len() > 64 * 1024 {
        return Err(invalid(format!("env value of {key} is over 64 KiB")));
    }
    Ok(())
}

/// A controller key list must hold at least one key, and keys must be long enough to resist
/// guessing.
pub fn auth_keys(keys: &str) -> Result<(), StateError> {
    let keys: Vec<&str> = keys
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    if keys.is_empty() {
        return Err(invalid("the controller AUTH_KEY list is empty"));
    }
    if let Some(short) = keys.iter().find(|k| k.len() < 16) {
        return Err(invalid(format!(
            "controller key {:?}... is shorter than 16 characters",
            &short[..short.len().min(4)]
        )));
    }
    Ok(())
}

/// Lower-cases and checks a route domain; `*.example.com` wildcards are allowed.
pub fn domain(domain: &str) -> Result<String, StateError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let bare = d.strip_prefix("*.").unwrap_or(&d);
    let ok = !bare.is_empty()
        && d.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(d)
    } else {
        Err(invalid(format!("{domain:?} is not a valid domain")))
    }
}

pub fn path(path: &str) -> Result<String, StateError> {
    if !path.starts_with('/') {
        return Err(invalid(format!("route path {path:?} must start with '/'")));
    }
    if path.len() > 1024 || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(format!("route path {path:?} is not a valid path")));
    }
    Ok(path.to_string())
}

pub fn certificate(c: &NewCertificate) -> Result<(), StateError> {
    if c.domains.is_empty() {
        return Err(invalid("a certificate needs at least one domain"));
    }
    for d in &c.domains {
        domain(d)?;
    }
    if !c.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid("cert_pem holds no PEM certificate"));
    }
    if !c.key_pem.contains("PRIVATE KEY-----") {
        return Err(invalid("key_pem holds no PEM private key"));
    }
    Ok(())
}

pub fn instance(id: &str, addr: &str, ttl_ms: u64) -> Result<(), StateError> {
    if id.is_empty() || id.len() > 128 || id.bytes().any(|b| b.is_ascii_control() || b == b'/') {
        return Err(invalid(format!("instance id {id:?} is not valid")));
    }
    if addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(invalid(format!("instance addr {addr:?} is not IP:PORT")));
    }
    if !(1_000..=3_600_000).contains(&ttl_ms) {
        return Err(invalid("ttl must be between 1s and 1h"));
    }
    Ok(())
}
