//! `flynn-host bootstrap`: turns a set of fresh hosts into a cluster.
//!
//! Waits until `min_hosts` of the given hosts answer, checks they all run this version,
//! makes the cluster secret and the first controller key, and hands both to each host. Up
//! to five of them become voting peers (an odd number: 1, 3 or 5); the rest join as proxies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flynn_client::{BootstrapRequest, ClusterStatus, HostClient, HostInfo};

use crate::version;

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Host API URLs (`http://IP:PORT`) of the hosts to bootstrap.
    pub hosts: Vec<String>,
    pub min_hosts: usize,
    pub timeout: Duration,
    /// The cluster domain: the controller is then served at `https://controller.$DOMAIN`
    /// through every host's router, with a certificate made here.
    pub domain: Option<String>,
    /// A cluster backup to start the new cluster from (`--from-backup`).
    pub from_backup: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BootstrapOutcome {
    pub controller_url: String,
    pub auth_key: String,
    pub secret: String,
    pub peers: Vec<HostInfo>,
    pub proxies: Vec<HostInfo>,
    pub status: ClusterStatus,
    pub domain: Option<String>,
    /// Pin of the controller's certificate (with a domain): `flynn cluster add -p PIN`.
    pub controller_pin: Option<String>,
    /// What a restore from a backup brought back (`PUT /host/restore`'s answer).
    pub restored: Option<serde_json::Value>,
}

/// What a checked backup says about the cluster it came from.
struct Backup {
    path: std::path::PathBuf,
    domain: Option<String>,
    auth_key: String,
    controller_pin: Option<String>,
}

/// Reads the whole backup once and checks it against its manifest, before any host is
/// touched: a truncated or corrupted backup is refused naming the broken entry.
async fn check_backup(path: &std::path::Path) -> anyhow::Result<Backup> {
    use crate::ops::STATE_ENTRY;
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "checking {} ({size} bytes) against its manifest...",
        path.display()
    );
    let (manifest, kept) = crate::archive::verify(
        tokio::io::BufReader::with_capacity(1 << 20, file),
        |n| n == STATE_ENTRY,
        |_| {},
    )
    .await
    .with_context(|| format!("{} is refused; nothing was written", path.display()))?;
    if manifest.kind != "cluster-backup" {
        bail!(
            "{} is a {:?} archive, not a cluster backup",
            path.display(),
            manifest.kind
        );
    }
    let state: flynn_state::ClusterState = serde_json::from_slice(
        kept.get(STATE_ENTRY)
            .with_context(|| format!("{} has no {STATE_ENTRY}", path.display()))?,
    )
    .with_context(|| format!("{}: {STATE_ENTRY}", path.display()))?;
    let auth_key = state
        .apps
        .get("controller")
        .and_then(|a| a.env.global.get("AUTH_KEY").cloned())
        .context("the backup's controller has no AUTH_KEY")?;
    let domain = state.cluster.domain.clone();
    let controller_pin = domain.as_ref().and_then(|d| {
        let cert_id = state.routes.routes.values().find_map(|r| match r {
            flynn_state::Route::Http(h) if h.domain == format!("controller.{d}") => {
                h.certificate.clone()
            }
            _ => None,
        })?;
        let cert = state.routes.certificates.get(&cert_id)?;
        crate::tls::pem_pin(&cert.cert_pem)
    });
    Ok(Backup {
        path: path.to_path_buf(),
        domain,
        auth_key,
        controller_pin,
    })
}

/// Streams the (checked) backup to a host of the new cluster, which restores it.
async fn restore(
    url: &str,
    secret: &str,
    path: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt;
    let file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    eprintln!("restoring {} into the new cluster...", path.display());
    let started = Instant::now();
    let mut sent = 0u64;
    let mut last = Instant::now();
    let chunks = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |c| {
        if let Ok(b) = &c {
            sent += b.len() as u64;
            if last.elapsed() >= Duration::from_secs(1) || sent == size {
                last = Instant::now();
                let rate = sent as f64 / started.elapsed().as_secs_f64().max(0.001) / 1e6;
                eprintln!(
                    "  sent {:.1} of {:.1} MB ({rate:.1} MB/s)",
                    sent as f64 / 1e6,
                    size as f64 / 1e6
                );
            }
        }
        c
    });
    let host = HostClient::new(url, Some(secret), Duration::from_secs(30));
    host.restore(reqwest::Body::wrap_stream(chunks))
        .await
        .with_context(|| format!("restoring {} through {url}", path.display()))
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn voters_for(n: usize) -> usize {
    match n {
        0 => 0,
        1 | 2 => 1,
        3 | 4 => 3,
        _ => 5,
    }
}

pub async fn bootstrap(opts: &BootstrapOptions) -> anyhow::Result<BootstrapOutcome> {
    if opts.min_hosts == 0 || opts.min_hosts > opts.hosts.len() {
        bail!(
            "--min-hosts must be between 1 and the number of hosts given ({})",
            opts.hosts.len()
        );
    }
    let backup = match &opts.from_backup {
        Some(path) => Some(check_backup(path).await?),
        None => None,
    };
    let mut opts = opts.clone();
    if let Some(b) = &backup {
        if opts.domain.is_some() && opts.domain != b.domain {
            bail!(
                "the backup is of the cluster {:?}; a restored cluster keeps its domain (drop --domain)",
                b.domain.as_deref().unwrap_or("without a domain")
            );
        }
        opts.domain = b.domain.clone();
    }
    let opts = &opts;
    let deadline = Instant::now() + opts.timeout;
    let found = loop {
        let probes = opts.hosts.iter().map(|url| async move {
            let c = HostClient::new(url, None, Duration::from_secs(2));
            (url.clone(), c.info().await)
        });
        let answers = futures::future::join_all(probes).await;
        let up: Vec<(String, HostInfo)> = answers
            .into_iter()
            .filter_map(|(url, r)| r.ok().map(|i| (url, i)))
            .collect();
        if let Some((url, _)) = up.iter().find(|(_, i)| i.initialized) {
            bail!("host {url} already belongs to a cluster");
        }
        if up.len() >= opts.min_hosts {
            break up;
        }
        if Instant::now() >= deadline {
            bail!(
                "only {} of the {} hosts needed answered within {}s",
                up.len(),
                opts.min_hosts,
                opts.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for (url, info) in &found {
        if info.version != version() {
            bail!(
                "host {url} runs version {}, but this flynn-host is version {}",
                info.version,
                version()
            );
        }
    }
    let secret = random_hex(32);
    // A restored cluster keeps its controller keys (and, with the state, its certificate).
    let auth_key = match &backup {
        Some(b) => b.auth_key.clone(),
        None => random_hex(20),
    };
    let domain = match &opts.domain {
        Some(d) => Some(
            flynn_state::validate::domain(d).map_err(|e| anyhow::anyhow!("--domain {d:?}: {e}"))?,
        ),
        None => None,
    };
    let controller_tls = match (&domain, &backup) {
        (Some(d), None) => Some(crate::tls::self_signed(&[
            format!("controller.{d}"),
            format!("git.{d}"),
            format!("dashboard.{d}"),
        ])?),
        _ => None,
    };
    let n_voters = voters_for(found.len());
    let (peers, proxies) = found.split_at(n_voters);
    let members: BTreeMap<u64, String> = peers
        .iter()
        .map(|(_, i)| (i.node_id, i.addr.clone()))
        .collect();
    let initializer = peers[0].1.node_id;
    // Derived env every cluster reports from its first revision on (the leader keeps
    // DISCOVERD_PEERS equal to the voters later).
    let system_env = BTreeMap::from([
        (
            "discoverd".to_string(),
            BTreeMap::from([(
                "DISCOVERD_PEERS".to_string(),
                members.values().cloned().collect::<Vec<_>>().join(","),
            )]),
        ),
        (
            "status".to_string(),
            BTreeMap::from([("AUTH_KEY".to_string(), random_hex(20))]),
        ),
        // Logs in to the dashboard (`flynn -a dashboard env get LOGIN_TOKEN`) without
        // handing the browser a controller key.
        (
            "dashboard".to_string(),
            BTreeMap::from([("LOGIN_TOKEN".to_string(), random_hex(20))]),
        ),
    ]);
    // The initializer goes last, so the others hold the secret before it asks for votes.
    let mut order: Vec<&(String, HostInfo)> = found.iter().collect();
    order.sort_by_key(|(_, i)| i.node_id == initializer);
    for (url, _) in order {
        let req = BootstrapRequest {
            secret: secret.clone(),
            members: members.clone(),
            initializer,
            auth_key: auth_key.clone(),
            version: version().to_string(),
            domain: domain.clone(),
            controller_certificate: controller_tls
                .as_ref()
                .map(|t| flynn_state::NewCertificate {
                    domains: ["controller", "git", "dashboard"]
                        .iter()
                        .map(|n| format!("{n}.{}", domain.as_deref().unwrap_or("")))
                        .collect(),
                    cert_pem: t.cert_pem.clone(),
                    key_pem: t.key_pem.clone(),
                }),
            system_env: system_env.clone(),
        };
        HostClient::new(url, None, Duration::from_secs(10))
            .bootstrap(&req)
            .await
            .with_context(|| format!("bootstrapping {url}"))?;
    }
    let first = HostClient::new(&peers[0].0, None, Duration::from_secs(2));
    let status = loop {
        match first.status().await {
            Ok(s) if s.bootstrapped && s.leader.is_some() => break s,
            _ if Instant::now() >= deadline => bail!("the cluster did not elect a leader in time"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // The line printed next reaches the controller through any host's router, which routes
    // to the hosts registered in service `controller`: wait until every host sees a
    // registration, so that line works at once.
    for (url, _) in &found {
        let host = flynn_client::ControllerClient::new(url, &auth_key);
        loop {
            match host
                .service(crate::components::controller::SERVICES[0])
                .await
            {
                Ok(s) if !s.instances.is_empty() => break,
                _ if Instant::now() >= deadline => {
                    bail!("{url} did not see the controller API registered in time")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let restored = match &backup {
        Some(b) => Some(restore(&peers[0].0, &secret, &b.path).await?),
        None => None,
    };
    Ok(BootstrapOutcome {
        controller_url: peers[0].0.clone(),
        auth_key,
        secret,
        peers: peers.iter().map(|(_, i)| i.clone()).collect(),
        proxies: proxies.iter().map(|(_, i)| i.clone()).collect(),
        status,
        domain,
        controller_pin: match &backup {
            Some(b) => b.controller_pin.clone(),
            None => controller_tls.map(|t| t.pin),
        },
        restored,
    })
}
