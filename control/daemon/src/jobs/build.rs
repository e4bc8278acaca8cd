//! Build jobs (`flynn deploy DIR` and `git push`), the host side: the directories a build
//! runs in, and the slug it leaves.
//!
//! A build follows Heroku's buildpack contract, as Flynn's slugbuilder does: the source is
//! copied to a writable `/app`, and the shipped buildpacks' `build` program
//! (`flynn-buildpacks`, read-only at `/tmp/buildpacks`) runs there as the image's user: the
//! source's own `bin/compile /app /tmp/cache /tmp/env`, else the buildpacks it names or
//! detection's pick. The app's env is one file per variable in `/tmp/env` (read-only).
//! gitreceive's `SSH_CLIENT_KEY` and `SSH_CLIENT_HOSTS` become `$HOME/.ssh/id_rsa` and
//! `known_hosts` on a read-only mount, so `git` and `ssh` in the build fetch private
//! dependencies with them; they are never in the build's environment, its output or its
//! slug. A build that exits 0 leaves `/app`, tarred deterministically, as the slug layer.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flynn_job::init::VolumeMount;

use super::JobError;

/// What a build job runs.
pub const ARGS: [&str; 2] = flynn_buildpacks::BUILD_ARGS;
/// The build's home; its `.ssh` holds the SSH client identity.
pub const HOME: &str = "/home/build";

/// The secrets and settings a build gets from the cluster state.
pub struct Inputs {
    /// The app's env, written to `/tmp/env`.
    pub env: BTreeMap<String, String>,
    /// gitreceive's `SSH_CLIENT_KEY`.
    pub ssh_key: Option<String>,
    /// gitreceive's `SSH_CLIENT_HOSTS`.
    pub ssh_hosts: Option<String>,
    /// The build's memory limit (gitreceive's `SLUGBUILDER_DEFAULT_MEMORY_LIMIT`, 1 GiB
    /// by default): a build cannot take its host's memory.
    pub memory: u64,
}

impl Inputs {
    pub fn from_state(s: &flynn_state::ClusterState, app: &str) -> Self {
        let global = |a: &str| s.apps.get(a).map(|a| a.env.global.clone());
        let gitreceive = global("gitreceive").unwrap_or_default();
        let nonempty = |k: &str| gitreceive.get(k).filter(|v| !v.trim().is_empty()).cloned();
        let setting = gitreceive
            .get(flynn_state::BUILD_MEMORY_ENV)
            .map(String::as_str);
        Inputs {
            env: global(app).unwrap_or_default(),
            ssh_key: nonempty("SSH_CLIENT_KEY"),
            ssh_hosts: nonempty("SSH_CLIENT_HOSTS"),
            // Checked when it was set; the default if it somehow is not usable.
            memory: flynn_state::build_memory(setting)
                .unwrap_or(flynn_state::jobs::BUILD_MEMORY_DEFAULT),
        }
    }
}

/// Makes the build's directories under `job_dir` from the unpacked source layer and
/// returns their mounts, in the order they must be made.
pub fn prepare(job_dir: &Path, source: &Path, inputs: &Inputs) -> Result<Vec<VolumeMount>, String> {
    let app = source.join("app");
    if !app.is_dir() {
        return Err("the source layer has no /app to build".into());
    }
    let dir = |name: &str| -> Result<PathBuf, String> {
        let p = job_dir.join(name);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    let mount = |host: PathBuf, path: &str, readonly: bool| VolumeMount {
        host,
        path: path.to_string(),
        readonly,
        chown: true,
    };
    let build = dir("build")?;
    // The source layer is shared by every job on the host and read-only: the build gets a
    // copy it may change.
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(app.join("."))
        .arg(&build)
        .output()
        .map_err(|e| format!("copying the source: {e}"))?;
    if !copied.status.success() {
        return Err(format!(
            "copying the source: {}",
            String::from_utf8_lossy(&copied.stderr).trim()
        ));
    }
    let env = dir("env")?;
    for (k, v) in &inputs.env {
        // Names are env names; anything that is not one cannot be a file name here.
        if k.is_empty() || k.contains('/') || k.starts_with('.') {
            continue;
        }
        write(&env.join(k), v, 0o444)?;
    }
    let packs = dir("buildpacks")?;
    flynn_buildpacks::write_to(&packs).map_err(|e| format!("writing the buildpacks: {e}"))?;
    let mut mounts = vec![
        mount(build, "/app", false),
        mount(packs, flynn_buildpacks::MOUNT, true),
        mount(dir("cache")?, "/tmp/cache", false),
        mount(env, "/tmp/env", true),
        mount(dir("home")?, HOME, false),
    ];
    if inputs.ssh_key.is_some() || inputs.ssh_hosts.is_some() {
        let ssh = dir("ssh")?;
        if let Some(key) = &inputs.ssh_key {
            // ssh refuses a key others may read, and one without its final newline.
            let key = format!("{}\n", key.trim_end());
            write(&ssh.join("id_rsa"), &key, 0o400)?;
        }
        if let Some(hosts) = &inputs.ssh_hosts {
            write(
                &ssh.join("known_hosts"),
                &format!("{}\n", hosts.trim_end()),
                0o444,
            )?;
        }
        mounts.push(mount(ssh, &format!("{HOME}/.ssh"), true));
    }
    Ok(mounts)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Packs a part of a finished build (its job directory) into a file: SHA-512 and size.
pub type Packer = fn(&Path, &Path) -> Result<(String, u64), String>;

/// A packed part of a build, ready to store.
pub struct Packed {
    pub file: PathBuf,
    pub sha512: String,
    pub size: u64,
}

/// What a successful build tells the deploy besides its slug: the process types it ended
/// with (`/app/Procfile`, the app's own or its buildpack's defaults), and whether the slug
/// has `.profile.d` scripts its processes must source first (as Flynn's slugrunner did).
pub fn built(job_dir: &Path) -> serde_json::Value {
    let app = job_dir.join("build");
    let procfile = std::fs::read_to_string(app.join("Procfile")).ok();
    let profile = std::fs::read_dir(app.join(".profile.d"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    serde_json::json!({ "procfile": procfile, "profile": profile })
}

/// Where an app's build cache is kept in the blobstore between builds.
pub fn cache_path(app: &str) -> String {
    format!("/build-cache/{app}.tar.gz")
}

/// The built `/app` as a deterministic gzip tar under `app/` (the same tree makes the same
/// layer), written to `out`; its SHA-512 and size.
pub fn pack_slug(job_dir: &Path, out: &Path) -> Result<(String, u64), String> {
    pack(&job_dir.join("build"), "app", out).map_err(|e| format!("packing the slug: {e}"))
}

/// The build's `/tmp/cache` as a gzip tar, for the app's next build; SHA-512 and size.
pub fn pack_cache(job_dir: &Path, out: &Path) -> Result<(String, u64), String> {
    pack(&job_dir.join("cache"), ".", out).map_err(|e| format!("packing the build cache: {e}"))
}

/// Unpacks the app's last build cache into the build's `/tmp/cache`.
pub fn restore_cache(job_dir: &Path, archive: &Path) -> Result<(), String> {
    let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    tar.set_preserve_ownerships(false);
    // `unpack` keeps every entry inside the directory (no `..`, no writes through links).
    tar.unpack(job_dir.join("cache")).map_err(|e| e.to_string())
}

fn pack(dir: &Path, prefix: &str, out: &Path) -> std::io::Result<(String, u64)> {
    let file = std::fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    tar.append_dir_all(prefix, dir)?;
    tar.into_inner()?.finish()?.sync_all()?;
    let sha = flynn_job::layer::sha512_file(out)?;
    Ok((sha, std::fs::metadata(out)?.len()))
}

impl super::JobRunner {
    /// Packs a finished build's `/app` and stores it in the blobstore as a layer.
    pub(super) async fn store_slug(&self, id: &str) -> Result<flynn_state::Layer, JobError> {
        let packed = self.pack_build(id, "slug.tar.gz", pack_slug).await?;
        let path = flynn_state::layer_path(&packed.sha512);
        self.store_packed(&path, &packed)
            .await
            .map_err(|e| JobError::StoreSlug(e.to_string()))?;
        Ok(flynn_state::Layer {
            sha512: packed.sha512,
            size: packed.size,
            compression: flynn_state::LayerCompression::Gzip,
        })
    }

    /// Packs part of a finished build into `name` in its job directory: the file, its
    /// SHA-512 and size.
    async fn pack_build(&self, id: &str, name: &str, pack: Packer) -> Result<Packed, JobError> {
        let job_dir = self.cfg.jobs_dir.join(id);
        let out = job_dir.join(name);
        let target = out.clone();
        let (sha512, size) = tokio::task::spawn_blocking(move || pack(&job_dir, &target))
            .await
            .map_err(|e| JobError::Build(e.to_string()))?
            .map_err(JobError::Build)?;
        Ok(Packed {
            file: out,
            sha512,
            size,
        })
    }

    /// Stores a packed file at `path` in the blobstore, checked against its digest.
    async fn store_packed(&self, path: &str, packed: &Packed) -> Result<(), JobError> {
        let blobstore = self.blobstore.as_ref().ok_or(JobError::NoBlobstore(""))?;
        let file = tokio::fs::File::open(&packed.file).await?;
        let body = tokio_util::io::ReaderStream::new(file);
        blobstore
            .put(path, body, Some(&packed.sha512))
            .await
            .map_err(|e| JobError::Store(e.to_string()))?;
        Ok(())
    }

    /// Unpacks the app's last build cache, if the blobstore holds one, into a build's
    /// `/tmp/cache`.
    pub(super) async fn restore_build_cache(
        &self,
        app: &str,
        job_dir: &std::path::Path,
    ) -> Result<(), JobError> {
        let Some(blobstore) = &self.blobstore else {
            return Ok(());
        };
        let path = cache_path(app);
        if blobstore.file(&path).is_none() {
            return Ok(());
        }
        let archive = blobstore
            .local_copy(&path)
            .await
            .map_err(|e| JobError::Store(e.to_string()))?;
        let job_dir = job_dir.to_path_buf();
        tokio::task::spawn_blocking(move || restore_cache(&job_dir, &archive))
            .await
            .map_err(|e| JobError::Build(e.to_string()))?
            .map_err(JobError::Build)
    }

    /// Keeps a finished build's `/tmp/cache` for the app's next build (unless unchanged).
    pub(super) async fn store_build_cache(&self, app: &str, id: &str) -> Result<(), JobError> {
        let Some(blobstore) = &self.blobstore else {
            return Ok(());
        };
        let packed = self.pack_build(id, "cache.tar.gz", pack_cache).await?;
        let path = cache_path(app);
        if blobstore
            .file(&path)
            .is_some_and(|f| f.sha512 == packed.sha512)
        {
            return Ok(());
        }
        self.store_packed(&path, &packed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(key: Option<&str>) -> Inputs {
        Inputs {
            env: BTreeMap::from([
                ("GREETING".to_string(), "hi".to_string()),
                ("../escape".to_string(), "no".to_string()),
            ]),
            ssh_key: key.map(str::to_string),
            ssh_hosts: None,
            memory: 1 << 30,
        }
    }

    #[test]
    fn t10_a_build_gets_a_copy_of_its_source_its_env_and_a_private_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("layer");
        std::fs::create_dir_all(source.join("app/bin")).unwrap();
        std::fs::write(source.join("app/bin/compile"), "#!/bin/sh\n").unwrap();
        let job = tmp.path().join("job");
        let mounts = prepare(&job, &source, &inputs(Some("KEY"))).unwrap();
        let paths: Vec<&str> = mounts.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/app",
                "/tmp/buildpacks",
                "/tmp/cache",
                "/tmp/env",
                HOME,
                "/home/build/.ssh"
            ]
        );
        let ro: Vec<bool> = mounts.iter().map(|m| m.readonly).collect();
        assert_eq!(ro, [false, true, false, true, false, true]);
        assert!(job.join("buildpacks/build").is_file());
        assert!(job.join("build/bin/compile").is_file());
        assert_eq!(
            std::fs::read_to_string(job.join("env/GREETING")).unwrap(),
            "hi"
        );
        assert!(!tmp.path().join("escape").exists());
        let key = job.join("ssh/id_rsa");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY\n");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        // No key configured: no .ssh mount at all.
        let job2 = tmp.path().join("job2");
        let mounts = prepare(&job2, &source, &inputs(None)).unwrap();
        assert!(mounts.iter().all(|m| !m.path.ends_with(".ssh")));
        // A layer that is no source tree is not a build.
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = prepare(&tmp.path().join("job3"), &empty, &inputs(None)).unwrap_err();
        assert!(err.contains("/app"), "{err}");
    }

    #[test]
    fn t12_a_build_cache_comes_back_as_it_was_packed() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(a.join("cache/deps")).unwrap();
        std::fs::write(a.join("cache/deps/lib"), "compiled").unwrap();
        std::fs::create_dir_all(b.join("cache")).unwrap();
        let archive = tmp.path().join("cache.tgz");
        pack_cache(&a, &archive).unwrap();
        restore_cache(&b, &archive).unwrap();
        assert_eq!(
            std::fs::read_to_string(b.join("cache/deps/lib")).unwrap(),
            "compiled"
        );
        // Not an archive: an error, not a panic, and nothing outside the cache touched.
        std::fs::write(&archive, "junk").unwrap();
        assert!(restore_cache(&b, &archive).is_err());
    }

    #[test]
    fn t11_the_same_built_tree_is_the_same_slug() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        std::fs::create_dir_all(job.join("build/bin")).unwrap();
        std::fs::write(job.join("build/bin/run"), "x").unwrap();
        let (a, size) = pack_slug(&job, &tmp.path().join("a.tgz")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(job.join("build/bin/run"), "x").unwrap();
        let (b, _) = pack_slug(&job, &tmp.path().join("b.tgz")).unwrap();
        assert_eq!(a, b);
        assert!(size > 0);
        std::fs::write(job.join("build/bin/run"), "y").unwrap();
        let (c, _) = pack_slug(&job, &tmp.path().join("c.tgz")).unwrap();
        assert_ne!(a, c);
    }
}
