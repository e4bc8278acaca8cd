//! `flynn-host update`: updates every host's daemon in place, one host at a time, keeping
//! quorum. For each host (the leader last): send it the new binary (it replaces itself, its
//! router's sockets held open across the swap, its service jobs running through it and
//! taken up by the new image), and wait until it answers on the new image, knows the
//! leader and has caught up. With `--move-jobs` its jobs are drained to other hosts first
//! and it is undrained after. A host that does not come back stops the rollout there.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flynn_client::{HostClient, HostEntry};

pub struct Options<'a> {
    pub file: Option<&'a Path>,
    pub version: Option<&'a str>,
    pub rollback: bool,
    pub timeout: Duration,
    /// Drain each host's jobs to others first, instead of keeping them through the restart.
    pub move_jobs: bool,
}

fn client(addr: &str, secret: &str) -> HostClient {
    HostClient::new(
        &format!("http://{addr}"),
        Some(secret),
        Duration::from_secs(30),
    )
}

async fn until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The version a binary reports.
pub(crate) fn version_of(binary: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary)
        .arg("version")
        .output()
        .with_context(|| format!("{} does not run here", binary.display()))?;
    if !out.status.success() {
        bail!("{} version failed", binary.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub async fn run(hosts: Vec<HostEntry>, secret: &str, opts: Options<'_>) -> anyhow::Result<()> {
    if let Some(h) = hosts.iter().find(|h| !h.reachable) {
        bail!(
            "host {} does not answer; bring it back (or `flynn-host demote --force` it) before updating",
            h.addr
        );
    }
    let target = match (opts.file, opts.rollback) {
        (Some(_), true) => bail!("--file and --rollback go separately"),
        (Some(f), false) => {
            let v = version_of(f)?;
            if let Some(want) = opts.version {
                if want != v {
                    bail!("asked for version {want}, but {} is version {v}", f.display());
                }
            }
            Some((f, v))
        }
        (None, true) => None,
        (None, false) => bail!(
            "give the release with --version V (from the release repository) or the binary with --file FLYNN-HOST"
        ),
    };
    // Followers first, the leader last: quorum holds throughout, and leadership moves once.
    let mut order = hosts.clone();
    order.sort_by_key(|h| (h.leader, h.role == flynn_client::Role::Peer));
    let alone = hosts.len() == 1;
    let drain = opts.move_jobs && !alone;
    for h in &order {
        let c = client(&h.addr, secret);
        let before = c
            .info()
            .await
            .context("asking the host before updating it")?;
        let from = before.version.clone();
        // Jobs move to other hosts first (new ones up before old ones stop), or run on
        // through the restart.
        if !drain {
            if opts.move_jobs {
                eprintln!("==> {}: a one-host cluster has nowhere to move its jobs; they run on through the restart", h.addr);
            }
        } else {
            eprintln!("==> {}: moving its jobs to other hosts", h.addr);
            c.drain(&h.addr, true).await?;
            let moved = until(opts.timeout, || async {
                let jobs = c.jobs(false).await.ok()?;
                jobs.is_empty().then_some(())
            })
            .await;
            if moved.is_none() {
                let _ = c.drain(&h.addr, false).await;
                bail!(
                    "{}: its jobs did not move to other hosts within {}s (is there room elsewhere?); the rollout stopped before this host",
                    h.addr,
                    opts.timeout.as_secs()
                );
            }
        }
        let revision = c.status().await.map(|s| s.revision).unwrap_or(0);
        let answer = match &target {
            Some((file, v)) => {
                eprintln!("==> {}: {from} → {v}", h.addr);
                let bytes = tokio::fs::read(file).await?;
                c.update(Some(reqwest::Body::from(bytes)), Some(v)).await
            }
            None => {
                eprintln!("==> {}: rolling back from {from}", h.addr);
                c.update(None, None).await
            }
        }
        .with_context(|| {
            format!(
                "{}: the update was refused; the rollout stopped here",
                h.addr
            )
        })?;
        let to = answer["to"].as_str().unwrap_or_default().to_string();
        // Back when it answers on the new image, knows the leader and has caught up.
        let back = until(opts.timeout, || async {
            let info = c.info().await.ok()?;
            if info.started_ms == before.started_ms || info.version != to {
                return None;
            }
            let s = c.status().await.ok()?;
            (s.bootstrapped && s.leader.is_some() && s.revision >= revision).then_some(s)
        })
        .await;
        let Some(status) = back else {
            bail!(
                "{} did not come back on {to} within {}s; the rollout stopped here. Once it answers, `flynn-host update --rollback` puts the previous binary back",
                h.addr,
                opts.timeout.as_secs()
            );
        };
        if drain {
            until(opts.timeout, || async {
                c.drain(&h.addr, false).await.ok()
            })
            .await
            .with_context(|| format!("{}: could not take it out of draining", h.addr))?;
        }
        eprintln!(
            "==> {}: back on {to}, caught up at revision {}",
            h.addr, status.revision
        );
    }
    println!(
        "{} {} host(s).",
        if opts.rollback {
            "Rolled back"
        } else {
            "Updated"
        },
        order.len()
    );
    Ok(())
}
