//! `flynn-host collect-debug-info`: what a person helping with a broken host asks for, in
//! one archive. Host and kernel facts, the daemon's log, the tail of every app's log on the
//! host, the host list, its jobs, `zpool status`, firewall counters, Raft status, versions,
//! component health and the cluster state.
//!
//! Secrets never leave the host: env values that hold keys, passwords, tokens, `BACKEND_*`
//! settings and `SSH_CLIENT_KEY`, certificate keys, and then every occurrence anywhere of
//! the cluster secret or of any value redacted that way (a log line that printed one) are
//! replaced with `[REDACTED]`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use flynn_client::HostClient;

pub const REDACTED: &str = "[REDACTED]";
/// Lines kept from the end of each app's log and of the daemon's log.
const TAIL_LINES: usize = 2000;

pub struct Options {
    pub tarball: bool,
    pub upload_url: Option<String>,
    pub output: Option<PathBuf>,
    pub log_file: PathBuf,
    pub log_dir: PathBuf,
}

/// Whether an env variable holds a secret by its name.
pub fn secret_name(key: &str) -> bool {
    let k = key.to_ascii_uppercase();
    k.starts_with("BACKEND_")
        || [
            "KEY",
            "SECRET",
            "PASSWORD",
            "TOKEN",
            "CREDENTIAL",
            "PRIVATE",
        ]
        .iter()
        .any(|w| k.contains(w))
        || k.ends_with("_URL") && k.contains("DATABASE")
}

/// Redacts the cluster state's secrets in place, collecting each value redacted.
pub fn redact_state(v: &mut serde_json::Value, found: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let secret_field = secret_name(k) || k == "key_pem";
                match val {
                    serde_json::Value::String(s) if !secret_field => {
                        // A URL's password is a secret whatever its variable is called
                        // (REDIS_URL=redis://:PASSWORD@host:6379).
                        if let Some(clean) = redact_url_passwords(s, found) {
                            *s = clean;
                        }
                    }
                    serde_json::Value::String(s) if !s.is_empty() => {
                        found.insert(s.clone());
                        // Comma-separated key lists: each key is a secret of its own.
                        for part in s.split(',') {
                            if part.trim().len() >= 8 {
                                found.insert(part.trim().to_string());
                            }
                        }
                        *val = serde_json::Value::String(REDACTED.into());
                    }
                    _ => redact_state(val, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                redact_state(item, found);
            }
        }
        _ => {}
    }
}

/// `text` with the password of every URL that carries one (`scheme://user:PASSWORD@host`)
/// replaced, each password collected into `found`; `None` when there was none.
pub fn redact_url_passwords(text: &str, found: &mut BTreeSet<String>) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority runs to the path, query, fragment, or anything a URL cannot hold.
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@').and_then(|a| {
            let userinfo = &authority[..a];
            userinfo.find(':').map(|c| (c, a))
        }) {
            Some((colon, a)) if colon + 1 < a => {
                found.insert(authority[colon + 1..a].to_string());
                out.push_str(&authority[..=colon]);
                out.push_str(REDACTED);
                out.push_str(&authority[a..]);
                changed = true;
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// Replaces every occurrence of each secret in `text`, and the password of any URL in it.
pub fn scrub(text: &str, secrets: &BTreeSet<String>) -> String {
    let mut out = text.to_string();
    if let Some(clean) = redact_url_passwords(&out, &mut BTreeSet::new()) {
        out = clean;
    }
    // Longest first, so a secret containing another is replaced whole.
    let mut list: Vec<&String> = secrets.iter().filter(|s| s.len() >= 6).collect();
    list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in list {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
        // A PEM or multi-line secret may appear line by line.
        for line in s.lines().map(str::trim).filter(|l| l.len() >= 16) {
            if out.contains(line) {
                out = out.replace(line, REDACTED);
            }
        }
    }
    out
}

/// Longest any one command may take: debug info is collected on sick hosts (a hung
/// `zpool` must not hang the collection).
const COMMAND_LIMIT: Duration = Duration::from_secs(10);

fn run(cmd: &str, args: &[&str]) -> String {
    let child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return format!("[{cmd} could not run: {e}]\n"),
    };
    let deadline = std::time::Instant::now() + COMMAND_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return format!(
                    "[{cmd} gave no answer within {} s; killed]\n",
                    COMMAND_LIMIT.as_secs()
                );
            }
        }
    }
    match child.wait_with_output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                s.push_str(&format!(
                    "\n[{cmd} exited with {}: {}]\n",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            s
        }
        Err(e) => format!("[{cmd} could not run: {e}]\n"),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n") + "\n"
        }
        Err(e) => format!("[{} not readable: {e}]\n", path.display()),
    }
}

async fn api<T: serde::Serialize, F>(what: &str, f: F) -> String
where
    F: std::future::Future<Output = Result<T, flynn_client::ClientError>>,
{
    match tokio::time::timeout(Duration::from_secs(20), f).await {
        Ok(Ok(v)) => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        Ok(Err(e)) => format!("[{what}: {e}]\n"),
        Err(_) => format!("[{what}: no answer within 20 s]\n"),
    }
}

/// Gathers everything, redacted, as (file name, contents).
pub async fn collect(
    host: Option<&HostClient>,
    cluster_secret: Option<&str>,
    opts: &Options,
) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    let mut secrets: BTreeSet<String> = cluster_secret.map(String::from).into_iter().collect();
    files.push((
        "host.txt".into(),
        [
            ("uname -a", run("uname", &["-a"])),
            ("/etc/os-release", tail(Path::new("/etc/os-release"), 100)),
            ("uptime", run("uptime", &[])),
            ("free -m", run("free", &["-m"])),
            ("df -h", run("df", &["-h"])),
            ("ip addr", run("ip", &["addr"])),
            ("ip route", run("ip", &["route"])),
            ("mounts", tail(Path::new("/proc/mounts"), 1000)),
            ("ulimit -n", run("sh", &["-c", "ulimit -n"])),
            (
                "flynn-host version",
                format!("{}\n", flynn_daemon::version()),
            ),
        ]
        .iter()
        .map(|(t, body)| format!("== {t}\n{body}\n"))
        .collect(),
    ));
    files.push(("zpool-status.txt".into(), run("zpool", &["status"])));
    files.push(("zfs-list.txt".into(), run("zfs", &["list", "-t", "all"])));
    let mut daemon_log = tail(&opts.log_file, TAIL_LINES * 5);
    if which("journalctl") {
        daemon_log.push_str("\n== journalctl -u flynn-host\n");
        daemon_log.push_str(&run(
            "journalctl",
            &["-u", "flynn-host", "-n", "10000", "--no-pager"],
        ));
    }
    files.push(("flynn-host.log".into(), daemon_log));
    if let Ok(entries) = std::fs::read_dir(&opts.log_dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() && p.extension().is_some_and(|x| x == "log") {
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                files.push((format!("app-logs/{name}"), tail(&p, TAIL_LINES)));
            }
        }
    }
    match host {
        Some(h) => {
            files.push(("status.json".into(), api("status", h.status()).await));
            files.push(("hosts.json".into(), api("list", h.list()).await));
            files.push(("jobs.json".into(), api("jobs", h.jobs(true)).await));
            files.push((
                "components.json".into(),
                api("components", h.components()).await,
            ));
            files.push(("firewall.json".into(), api("firewall", h.firewall()).await));
            files.push(("health.json".into(), api("health", h.health()).await));
            let state = match tokio::time::timeout(Duration::from_secs(20), h.state("")).await {
                Ok(Ok(mut v)) => {
                    redact_state(&mut v, &mut secrets);
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                }
                Ok(Err(e)) => format!("[state: {e}]\n"),
                Err(_) => "[state: no answer within 20 s]\n".into(),
            };
            files.push(("state.json".into(), state));
        }
        None => files.push((
            "cluster.txt".into(),
            "[this host is not in a cluster: no cluster secret in its data dir]\n".into(),
        )),
    }
    for (_, body) in files.iter_mut() {
        *body = scrub(body, &secrets);
    }
    files
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
}

/// Writes the files as a gzipped tar under one directory; returns its path.
pub fn write_tarball(files: &[(String, String)], output: Option<&Path>) -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let root = format!("flynn-host-debug-{stamp}");
    let path = match output {
        Some(p) => p.to_path_buf(),
        None => std::env::temp_dir().join(format!("{root}.tar.gz")),
    };
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(stamp);
        h.set_cksum();
        tar.append_data(&mut h, format!("{root}/{name}"), body.as_bytes())?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(path)
}

/// Uploads the tarball to `url` (HTTP PUT); the URL the endpoint answers with, or its status.
pub async fn upload(url: &str, tarball: &Path) -> anyhow::Result<String> {
    let body = tokio::fs::read(tarball).await?;
    let r = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .build()?
        .put(url)
        .header("content-type", "application/gzip")
        .body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {}", text.trim());
    }
    Ok(if text.trim().is_empty() {
        format!("{url} ({status})")
    } else {
        text.trim().to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_secrets_are_redacted_by_name_and_wherever_they_appear() {
        let mut state = serde_json::json!({"records": {
            "app/controller": {"env": {"global": {"AUTH_KEY": "k1k1k1k1k1,k2k2k2k2k2"}}},
            "app/blobstore": {"env": {"global": {"BACKEND_S3MAIN": "backend=s3 secret_access_key=abcdefgh", "DEFAULT_BACKEND": "s3main"}}},
            "app/gitreceive": {"env": {"global": {"SSH_CLIENT_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAABBBBCCCCDDDDEEEE\n-----END OPENSSH PRIVATE KEY-----"}}},
            "cert/c1": {"key_pem": "PEMPEMPEMPEM", "cert_pem": "public"},
            "app/web": {"env": {"global": {"PORT_NAME": "web"}}}
        }});
        let mut found = BTreeSet::new();
        redact_state(&mut state, &mut found);
        let text = state.to_string();
        for gone in [
            "k1k1k1k1k1",
            "abcdefgh",
            "AAAABBBBCCCCDDDDEEEE",
            "PEMPEMPEMPEM",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(text.contains("s3main") && text.contains("public") && text.contains("\"web\""));
        // Anywhere else they appear (a log line), they go too; each listed key on its own.
        let log = "auth with k2k2k2k2k2 ok\nkey line AAAABBBBCCCCDDDDEEEE\nnothing here\n";
        let scrubbed = scrub(log, &found);
        assert_eq!(
            scrubbed,
            "auth with [REDACTED] ok\nkey line [REDACTED]\nnothing here\n"
        );
    }

    #[test]
    fn t03_url_passwords_are_redacted_whatever_the_variable_is_called() {
        let mut state = serde_json::json!({"records": {"app/web": {"env": {"global": {
            "REDIS_URL": "redis://:r3d1sPass@10.0.0.5:6379",
            "MAIN_DB": "postgres://app:pgSecret99@db.internal:5432/app?sslmode=require",
            "MYSQL_CONN": "mysql://root:my%2Fsql@h/db",
            "QUEUE": "amqps://guest:rabbitPw@mq:5671/vhost,amqps://guest:rabbitPw2@mq2:5671",
            "MONGO": "mongodb+srv://u:m0ng0pw@cluster0.example.net/db",
            "UPSTREAM": "https://user@example.com/path",
            "HOMEPAGE": "https://example.com/a@b:c",
            "EMPTY_PW": "ftp://anon:@ftp.example.com/"
        }}}}});
        let mut found = BTreeSet::new();
        redact_state(&mut state, &mut found);
        let text = state.to_string();
        for gone in [
            "r3d1sPass",
            "pgSecret99",
            "my%2Fsql",
            "rabbitPw",
            "rabbitPw2",
            "m0ng0pw",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
            assert!(found.contains(gone), "{gone} collected");
        }
        // What is not a password stays: users, hosts, paths, and URLs without one.
        for kept in [
            "redis://:[REDACTED]@10.0.0.5:6379",
            "postgres://app:[REDACTED]@db.internal:5432/app?sslmode=require",
            "https://user@example.com/path",
            "https://example.com/a@b:c",
            "ftp://anon:@ftp.example.com/",
        ] {
            assert!(text.contains(kept), "{kept} in {text}");
        }
        // A log line with a URL the state never held is scrubbed too.
        let log = "connecting to postgres://svc:unlisted123@10.1.1.1/db failed\n";
        assert_eq!(
            scrub(log, &found),
            "connecting to postgres://svc:[REDACTED]@10.1.1.1/db failed\n"
        );
    }

    #[test]
    fn t02_secret_names() {
        for k in [
            "AUTH_KEY",
            "BACKEND_GCS_KEY",
            "SSH_CLIENT_KEY",
            "DB_PASSWORD",
            "api_token",
            "DATABASE_URL",
        ] {
            assert!(secret_name(k), "{k}");
        }
        for k in [
            "PORT",
            "DEFAULT_BACKEND",
            "TCP_PORT_RANGE",
            "DISCOVERD_PEERS",
        ] {
            assert!(!secret_name(k), "{k}");
        }
    }
}
