//! The pool: opened, imported or created at host start, and the datasets in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use crate::{VolumeError, VolumeInfo, Zfs};

pub const DEFAULT_POOL: &str = "flynn-default";

/// How a host finds or makes its pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Pool name (`flynn-default`).
    pub name: String,
    /// Where the pool's sparse file lives: `DATA_DIR/volumes/zfs/vdev`.
    pub vdev_dir: PathBuf,
    /// Where datasets are mounted: `DATA_DIR/volumes/zfs/mnt`.
    pub mount_root: PathBuf,
    /// Size of a new sparse file; default 70% of the free space of its filesystem.
    pub size: Option<u64>,
    /// Create the pool on this device instead of a file (`install-flynn
    /// --zpool-create-device`), with these extra `zpool create` options.
    pub device: Option<String>,
    pub device_options: Vec<String>,
}

impl PoolConfig {
    pub fn under(data_dir: &Path, name: &str) -> Self {
        let root = data_dir.join("volumes").join("zfs");
        PoolConfig {
            name: name.into(),
            vdev_dir: root.join("vdev"),
            mount_root: root.join("mnt"),
            size: None,
            device: None,
            device_options: Vec::new(),
        }
    }

    /// `vdev_dir/NAME-zpool.vdev`.
    pub fn vdev_file(&self) -> PathBuf {
        self.vdev_dir.join(format!("{}-zpool.vdev", self.name))
    }
}

pub struct ZfsPool {
    zfs: Box<dyn Zfs>,
    pub name: String,
    pub mount_root: PathBuf,
    /// How the pool came to be on this start: "imported", "created" or "open".
    pub opened: &'static str,
}

/// 70% of the free space of the filesystem holding `dir`.
fn default_size(dir: &Path) -> Result<u64, VolumeError> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| VolumeError::Io(format!("statvfs {}: {e}", dir.display())))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    Ok(free / 10 * 7)
}

impl ZfsPool {
    /// Uses the pool if it is imported, imports it from its file if the file exists (the
    /// file is never overwritten), else creates it on the device or on a new sparse file.
    /// A failed creation leaves nothing behind.
    pub fn open(cfg: &PoolConfig, zfs: Box<dyn Zfs>) -> Result<ZfsPool, VolumeError> {
        crate::validate_name("pool name", &cfg.name)?;
        // One pool creation or import at a time on a machine: zfs-fuse (the user-space ZFS)
        // has wedged with several `zfs create` in flight at once from daemons sharing it.
        // One daemon per host never waits here. Unlocked when the file closes (on return).
        let _one_at_a_time = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("flynn-zpool-open.lock"))
            .ok()
            .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
        let mut pool = ZfsPool {
            zfs,
            name: cfg.name.clone(),
            mount_root: cfg.mount_root.clone(),
            opened: "open",
        };
        if pool
            .zfs
            .run("zpool", &["list", "-H", "-o", "name", &cfg.name])
            .is_ok()
        {
            pool.ensure_data()?;
            return Ok(pool);
        }
        let mount = cfg.mount_root.to_string_lossy().into_owned();
        let file = cfg.vdev_file();
        if let Some(device) = &cfg.device {
            let mut args = vec!["create"];
            args.extend(cfg.device_options.iter().map(String::as_str));
            args.extend(["-m", &mount, &cfg.name, device]);
            pool.zfs.run("zpool", &args)?;
            pool.opened = "created";
        } else if file.exists() {
            let dir = cfg.vdev_dir.to_string_lossy().into_owned();
            pool.zfs.run("zpool", &["import", "-d", &dir, &cfg.name])?;
            pool.opened = "imported";
        } else {
            std::fs::create_dir_all(&cfg.vdev_dir)?;
            let size = match cfg.size {
                Some(s) => s,
                None => default_size(&cfg.vdev_dir)?,
            };
            if size < 64 * 1024 * 1024 {
                return Err(VolumeError::Invalid(format!(
                    "a pool needs at least 64 MiB; {} has room for {size} bytes",
                    cfg.vdev_dir.display()
                )));
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)?;
            f.set_len(size)?;
            drop(f);
            let path = file.to_string_lossy().into_owned();
            if let Err(e) = pool
                .zfs
                .run("zpool", &["create", "-m", &mount, &cfg.name, &path])
            {
                let _ = std::fs::remove_file(&file);
                return Err(e);
            }
            pool.opened = "created";
        }
        pool.ensure_data()?;
        Ok(pool)
    }

    fn ensure_data(&self) -> Result<(), VolumeError> {
        let data = format!("{}/data", self.name);
        if self
            .zfs
            .run("zfs", &["list", "-H", "-o", "name", &data])
            .is_err()
        {
            self.zfs.run("zfs", &["create", "-p", &data])?;
        }
        Ok(())
    }

    fn dataset(&self, id: &str) -> String {
        format!("{}/data/{id}", self.name)
    }

    fn exists(&self, id: &str) -> bool {
        let ds = self.dataset(id);
        self.zfs
            .run("zfs", &["list", "-H", "-o", "name", &ds])
            .is_ok()
    }

    /// The pool's health as `zpool` reports it (`ONLINE`, `DEGRADED`, ...).
    pub fn health(&self) -> Result<String, VolumeError> {
        let out = self
            .zfs
            .run("zpool", &["list", "-H", "-o", "health", &self.name])?;
        Ok(out.trim().to_string())
    }

    pub fn create(&self, id: &str, size: Option<u64>) -> Result<VolumeInfo, VolumeError> {
        if self.exists(id) {
            return Err(VolumeError::Exists(id.into()));
        }
        let ds = self.dataset(id);
        let quota = size.map(|s| format!("refquota={s}"));
        let mut args = vec!["create"];
        if let Some(q) = &quota {
            args.extend(["-o", q.as_str()]);
        }
        args.push(&ds);
        self.zfs.run("zfs", &args)?;
        self.inspect(id)
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let data = format!("{}/data", self.name);
        // `zfs get -p` (exact numbers) is in every ZFS; `zfs list -p` is not in zfs-fuse's.
        let props = self.zfs.run(
            "zfs",
            &[
                "get",
                "-H",
                "-p",
                "-o",
                "name,property,value",
                "used,refquota,mountpoint",
                "-r",
                "-d",
                "1",
                &data,
            ],
        )?;
        let snaps = self.zfs.run(
            "zfs",
            &["list", "-H", "-t", "snapshot", "-o", "name", "-r", &data],
        )?;
        let mut vols: Vec<VolumeInfo> = Vec::new();
        for line in props.lines() {
            let mut f = line.split('\t');
            let (Some(name), Some(prop), Some(value)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Some(id) = name.strip_prefix(&data).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            if vols.last().is_none_or(|v| v.id != id) {
                vols.push(VolumeInfo {
                    id: id.into(),
                    path: PathBuf::new(),
                    used: 0,
                    size: None,
                    snapshots: Vec::new(),
                });
            }
            let v = vols.last_mut().expect("pushed above");
            match prop {
                "used" => v.used = value.parse().unwrap_or(0),
                "refquota" => v.size = value.parse().ok().filter(|q: &u64| *q > 0),
                "mountpoint" => v.path = PathBuf::from(value),
                _ => {}
            }
        }
        for v in &mut vols {
            let prefix = format!("{data}/{}@", v.id);
            v.snapshots = snaps
                .lines()
                .filter_map(|s| s.strip_prefix(&prefix).map(String::from))
                .collect();
        }
        Ok(vols)
    }

    pub fn inspect(&self, id: &str) -> Result<VolumeInfo, VolumeError> {
        self.list()?
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| VolumeError::NotFound(id.into()))
    }

    pub fn delete(&self, id: &str) -> Result<(), VolumeError> {
        if !self.exists(id) {
            return Err(VolumeError::NotFound(id.into()));
        }
        // Unmount first. zfs-fuse says "busy" for several seconds after writes or a receive
        // with nothing holding the dataset (its transaction sync): after the first refusal
        // the unmount is forced (deleting is the operator's explicit act; whatever used the
        // volume is stopped first), and busy is retried for up to twenty seconds.
        let ds = self.dataset(id);
        let mut tries = 0;
        loop {
            let unmount: &[&str] = if tries == 0 {
                &["unmount", &ds]
            } else {
                &["unmount", "-f", &ds]
            };
            let _ = self.zfs.run("zfs", unmount);
            match self.zfs.run("zfs", &["destroy", "-r", &ds]) {
                Ok(_) => return Ok(()),
                Err(VolumeError::Command { stderr, .. })
                    if stderr.contains("busy") && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn snapshot(&self, id: &str, name: &str) -> Result<VolumeInfo, VolumeError> {
        if !self.exists(id) {
            return Err(VolumeError::NotFound(id.into()));
        }
        let snap = format!("{}@{name}", self.dataset(id));
        self.zfs.run("zfs", &["snapshot", &snap])?;
        self.inspect(id)
    }

    /// Starts `zfs send` of `id@snapshot` (incremental from `from` when given); the stream is
    /// the child's stdout.
    pub fn send(&self, id: &str, snapshot: &str, from: Option<&str>) -> Result<Child, VolumeError> {
        let v = self.inspect(id)?;
        for s in std::iter::once(snapshot).chain(from) {
            crate::validate_name("snapshot", s)?;
            if !v.snapshots.iter().any(|have| have == s) {
                return Err(VolumeError::NotFound(format!("{id}@{s}")));
            }
        }
        let snap = format!("{}@{snapshot}", self.dataset(id));
        let from = from.map(|f| format!("@{f}"));
        let mut args = vec!["send"];
        if let Some(f) = &from {
            args.extend(["-i", f.as_str()]);
        }
        args.push(&snap);
        self.zfs.spawn("zfs", &args, Stdio::null(), Stdio::piped())
    }

    /// Mounts `id` again after a failed receive, which may leave it unmounted (the volume is
    /// to stay as it was).
    pub fn remount(&self, id: &str) {
        if self.exists(id) {
            let _ = self.zfs.run("zfs", &["mount", &self.dataset(id)]);
        }
    }

    /// Starts `zfs receive` into `id` (a full stream makes it; an incremental one needs the
    /// stream's base snapshot here). The stream goes to the child's stdin; ZFS applies it
    /// only if it arrives whole, so a cut stream leaves the volume as it was.
    pub fn receive(&self, id: &str) -> Result<Child, VolumeError> {
        crate::validate_name("volume id", id)?;
        let ds = self.dataset(id);
        let args: Vec<&str> = if self.exists(id) {
            vec!["receive", "-F", &ds]
        } else {
            vec!["receive", &ds]
        };
        self.zfs.spawn("zfs", &args, Stdio::piped(), Stdio::null())
    }
}
