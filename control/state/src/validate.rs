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
    flynn_model::check_dns_label(name, what).map_err(invalid)
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
/// The dashboard's login token: 16 to 256 characters a URL and JSON carry as they are, so
/// it is long enough to guess at no rate and is found (and hidden) wherever it appears.
pub fn login_token(token: &str) -> Result<(), StateError> {
    let ok = (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~+/=-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "LOGIN_TOKEN is 16 to 256 letters, digits and ._~+/=- (try: openssl rand -hex 20)",
        ))
    }
}

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

/// Standard base64 (padding optional), decoded; `None` if it is not.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

/// gitreceive's `SSH_CLIENT_KEY`: a private key, unencrypted (it is used without anyone
/// to type a passphrase), in OpenSSH or PEM form.
pub fn ssh_private_key(key: &str) -> Result<(), StateError> {
    let bad = |why: &str| invalid(format!("SSH_CLIENT_KEY is not a usable private key: {why}"));
    let lines: Vec<&str> = key.trim().lines().map(str::trim).collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return Err(bad("it is empty"));
    };
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|l| l.strip_suffix("-----"))
        .filter(|l| l.ends_with("PRIVATE KEY"))
        .ok_or_else(|| bad("it does not start with a -----BEGIN ... PRIVATE KEY----- line"))?;
    if *last != format!("-----END {label}-----") || lines.len() < 3 {
        return Err(bad(&format!("it does not end with -----END {label}-----")));
    }
    let body = &lines[1..lines.len() - 1];
    if body
        .iter()
        .any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
        || label.contains("ENCRYPTED")
    {
        return Err(bad("it is encrypted with a passphrase; give it decrypted"));
    }
    let b64: String = body.iter().filter(|l| !l.contains(':')).copied().collect();
    let der = base64_decode(&b64).ok_or_else(|| bad("its body is not base64"))?;
    if label == "OPENSSH PRIVATE KEY" {
        const MAGIC: &[u8] = b"openssh-key-v1\0";
        let rest = der
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("it is not in OpenSSH key format"))?;
        let len = rest
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("it is cut short"))?;
        let cipher = rest.get(4..4 + len).ok_or_else(|| bad("it is cut short"))?;
        if cipher != b"none" {
            return Err(bad("it is encrypted with a passphrase; give it decrypted"));
        }
    } else if der.first() != Some(&0x30) || der.len() < 64 {
        // PEM keys (PKCS#1, SEC1, PKCS#8) are DER sequences.
        return Err(bad("its body is not a DER key"));
    }
    Ok(())
}

/// gitreceive's `SSH_CLIENT_HOSTS`: known_hosts lines, `HOSTS KEYTYPE BASE64 [COMMENT]`.
pub fn ssh_known_hosts(text: &str) -> Result<(), StateError> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A leading marker (@cert-authority, @revoked) shifts the fields by one.
        let f = if fields[0].starts_with('@') {
            &fields[1..]
        } else {
            &fields[..]
        };
        let ok = f.len() >= 3
            && (f[1].starts_with("ssh-") || f[1].starts_with("ecdsa-") || f[1].starts_with("sk-"))
            && base64_decode(f[2]).is_some_and(|k| k.len() > 16);
        if !ok {
            return Err(invalid(format!(
                "SSH_CLIENT_HOSTS line {}: not a known_hosts line (HOSTS KEYTYPE BASE64-KEY)",
                n + 1
            )));
        }
    }
    Ok(())
}
