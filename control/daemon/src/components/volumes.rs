//! The volume manager component: opens the host's ZFS pool at start (importing or creating
//! it), falls back to plain directories where ZFS cannot run (and says so), and keeps the
//! control plane's records of this host's volumes equal to what is on disk.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flynn_state::volumes::{Volume, VolumesCommand};
use flynn_volume::pool::ZfsPool;
use flynn_volume::{PoolConfig, Provider, VolumeInfo, ZfsCli, DEFAULT_POOL};
use futures::future::BoxFuture;

use crate::component::{Component, LocalState};

/// Volume flags of `flynn-host daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct VolumeArgs {
    /// Where volumes live: `zfs`, `dir` (plain directories: no snapshots, no send) or
    /// `auto` (ZFS when it answers, else directories, said in the log and status).
    #[arg(long = "volume-provider", default_value = "auto", value_parser = ["auto", "zfs", "dir"])]
    pub provider: String,
    /// Name of the ZFS pool.
    #[arg(long = "zpool-name", default_value = DEFAULT_POOL)]
    pub pool: String,
    /// Size of a new pool file: bytes, or with a K, M, G or T suffix (default: 70% of the
    /// free space of the data dir's filesystem).
    #[arg(long = "zpool-size")]
    pub size: Option<String>,
    /// Create the pool on this device instead of a file (only when no pool exists yet).
    #[arg(long = "zpool-create-device")]
    pub device: Option<String>,
    /// Extra `zpool create` options for the device, e.g. "-f".
    #[arg(long = "zpool-create-options", allow_hyphen_values = true)]
    pub options: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub provider: String,
    pub pool: PoolConfig,
    pub dir_root: std::path::PathBuf,
}

/// `10G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    flynn_state::parse_size(s).map_err(anyhow::Error::msg)
}

impl VolumeArgs {
    pub fn validate(&self, data_dir: &Path) -> anyhow::Result<VolumeConfig> {
        let mut pool = PoolConfig::under(data_dir, &self.pool);
        flynn_volume::validate_name("--zpool-name", &self.pool)?;
        pool.size = self.size.as_deref().map(parse_size).transpose()?;
        pool.device = self.device.clone();
        pool.device_options = self
            .options
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect();
        Ok(VolumeConfig {
            provider: self.provider.clone(),
            pool,
            dir_root: data_dir.join("volumes").join("dir"),
        })
    }
}

pub struct VolumesComponent {
    pub provider: Provider,
    /// Why ZFS is not used, when `auto` fell back to directories.
    fallback: Option<String>,
    host: u64,
}

impl VolumesComponent {
    /// Opens the pool (or the directory root). With `zfs`, a pool that cannot be opened
    /// stops the daemon; with `auto`, the host falls back to directories and says so.
    pub fn start(cfg: &VolumeConfig, host: u64) -> anyhow::Result<Self> {
        let dir = || -> anyhow::Result<Provider> {
            std::fs::create_dir_all(&cfg.dir_root)
                .with_context(|| format!("creating {}", cfg.dir_root.display()))?;
            Ok(Provider::Dir(cfg.dir_root.clone()))
        };
        let (provider, fallback) = match cfg.provider.as_str() {
            "dir" => (dir()?, None),
            "zfs" => {
                let pool = ZfsPool::open(&cfg.pool, Box::new(ZfsCli))
                    .with_context(|| format!("opening the ZFS pool {}", cfg.pool.name))?;
                (Provider::Zfs(pool), None)
            }
            _ => match ZfsPool::open(&cfg.pool, Box::new(ZfsCli)) {
                Ok(pool) => (Provider::Zfs(pool), None),
                Err(e) => {
                    let why = format!("ZFS pool {} unavailable ({e})", cfg.pool.name);
                    tracing::warn!(
                        "{why}: volumes are plain directories under {} (no snapshots, no send)",
                        cfg.dir_root.display()
                    );
                    (dir()?, Some(why))
                }
            },
        };
        if let Provider::Zfs(p) = &provider {
            tracing::info!(pool = %p.name, opened = p.opened, "ZFS pool ready");
        }
        Ok(VolumesComponent {
            provider,
            fallback,
            host,
        })
    }

    /// The control plane's record of a volume here. What the disk does not know (owner,
    /// creation time) comes from `old`, the current record, unless given.
    pub fn record(
        &self,
        v: &VolumeInfo,
        old: Option<&Volume>,
        app: Option<String>,
        job: Option<String>,
    ) -> Volume {
        Volume {
            id: v.id.clone(),
            host: self.host,
            provider: self.provider.kind().into(),
            size: v.size,
            app: app.or_else(|| old.and_then(|o| o.app.clone())),
            job: job.or_else(|| old.and_then(|o| o.job.clone())),
            proc_type: old.and_then(|o| o.proc_type.clone()),
            path: old.and_then(|o| o.path.clone()),
            snapshots: v.snapshots.clone(),
            created_ms: old.map_or_else(crate::now_ms, |o| o.created_ms),
        }
    }

    pub fn host(&self) -> u64 {
        self.host
    }

    /// Makes the records of this host's volumes match the disk: new ones recorded, their
    /// snapshots updated, records of volumes gone removed.
    async fn reconcile(self: &Arc<Self>, local: &LocalState) -> anyhow::Result<()> {
        let me = self.clone();
        let on_disk = tokio::task::spawn_blocking(move || me.provider.list()).await??;
        let recorded: Vec<Volume> = local.read(|s| {
            s.volumes
                .volumes
                .values()
                .filter(|v| v.host == self.host)
                .cloned()
                .collect()
        });
        for v in &on_disk {
            let old = recorded.iter().find(|r| r.id == v.id);
            let want = self.record(v, old, None, None);
            if old == Some(&want) {
                continue;
            }
            local
                .node()
                .propose(VolumesCommand::PutVolume { volume: want })
                .await?;
        }
        for r in recorded
            .iter()
            .filter(|r| !on_disk.iter().any(|v| v.id == r.id))
        {
            let remove = VolumesCommand::RemoveVolume {
                host: self.host,
                id: r.id.clone(),
            };
            local.node().propose(remove).await?;
        }
        Ok(())
    }
}

impl Component for VolumesComponent {
    fn name(&self) -> &'static str {
        "volumes"
    }

    /// Records what is on disk once the cluster is bootstrapped (volumes made while the host
    /// was away, or received), retrying until it lands.
    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut changes = local.changes();
            loop {
                if local.read(|s| s.bootstrapped()) {
                    match self.reconcile(&local).await {
                        Ok(()) => return,
                        Err(e) => tracing::debug!(error = %e, "volume records not reconciled yet"),
                    }
                }
                let wait = tokio::time::sleep(std::time::Duration::from_secs(1));
                tokio::select! {
                    _ = wait => {}
                    r = changes.changed() => if r.is_err() { return },
                }
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        let (pool, health, opened) = match &self.provider {
            Provider::Zfs(p) => (
                Some(p.name.clone()),
                p.health().unwrap_or_else(|e| format!("unknown: {e}")),
                Some(p.opened),
            ),
            Provider::Dir(_) => (None, "n/a".into(), None),
        };
        serde_json::json!({
            "provider": self.provider.kind(),
            "pool": pool,
            "health": health,
            "opened": opened,
            "fallback": self.fallback,
        })
    }

    /// A ZFS pool is healthy when `zpool` says `ONLINE`; directories always are.
    fn health(self: Arc<Self>) -> BoxFuture<'static, Option<flynn_client::ComponentHealth>> {
        Box::pin(async move {
            let me = self.clone();
            let checked = tokio::task::spawn_blocking(move || match &me.provider {
                Provider::Zfs(p) => {
                    let health = p.health();
                    let ok = matches!(&health, Ok(h) if h == "ONLINE");
                    flynn_client::ComponentHealth::from_check(
                        ok,
                        serde_json::json!({
                            "provider": "zfs",
                            "pool": p.name,
                            "health": match health {
                                Ok(h) => h,
                                Err(e) => format!("unknown: {e}"),
                            },
                        }),
                    )
                }
                Provider::Dir(_) => flynn_client::ComponentHealth::healthy(
                    serde_json::json!({"provider": "dir", "fallback": me.fallback}),
                ),
            })
            .await;
            Some(checked.unwrap_or_else(|e| {
                flynn_client::ComponentHealth::unhealthy(serde_json::json!(e.to_string()))
            }))
        })
    }

    fn prometheus(&self) -> String {
        let zfs = u64::from(matches!(self.provider, Provider::Zfs(_)));
        let count = self.provider.list().map(|v| v.len()).unwrap_or(0);
        let mut out = String::new();
        flynn_metrics::single(
            &mut out,
            "flynn_volumes_zfs",
            "gauge",
            "1 if volumes are on ZFS, 0 for plain directories",
            zfs,
        );
        flynn_metrics::single(
            &mut out,
            "flynn_volumes",
            "gauge",
            "Volumes on this host",
            count,
        );
        if let Provider::Zfs(p) = &self.provider {
            let healthy = p.health().is_ok_and(|h| h == "ONLINE");
            flynn_metrics::single(
                &mut out,
                "flynn_volumes_pool_healthy",
                "gauge",
                "1 while zpool reports this host's pool ONLINE",
                u64::from(healthy),
            );
        }
        out
    }
}
