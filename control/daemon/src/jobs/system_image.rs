//! The image a system app's one-off jobs run from, for `flynn -a blobstore run
//! /bin/flynn-blobstore migrate --delete`: this host's own `flynn-blobstore` binary and the
//! shared libraries it links (as `ldd` lists them), as one deterministic layer. It is made
//! on the first `run` of an app that has no release yet and stored in the blobstore like
//! any layer, and its release names the commands there are (`migrate`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flynn_state::jobs::JobsCommand;
use flynn_state::{Image, ImageConfig, Layer, LayerCompression, NewRelease, ProcessType};

use crate::error::{ApiError, ApiResult};

/// System apps that can run one-off jobs, with the binary they run.
const SYSTEM_BINARIES: &[(&str, &str)] = &[("blobstore", "flynn-blobstore")];

/// Gives `app` a release from its system image if it is a system app without one. The image
/// is stored through `blobstore` (none: this host cannot), built in `tmp`.
pub async fn ensure_release(
    node: &crate::node::Node,
    blobstore: Option<&std::sync::Arc<crate::blobstore::Blobstore>>,
    tmp: &std::path::Path,
    app: &str,
) -> ApiResult<()> {
    let Some((_, binary)) = SYSTEM_BINARIES.iter().find(|(a, _)| *a == app) else {
        return Ok(());
    };
    let has = node.state.read(|a| {
        a.state
            .jobs
            .formations
            .get(app)
            .is_some_and(|f| !f.release.is_empty())
    });
    if has {
        return Ok(());
    }
    let blobstore = blobstore.ok_or_else(|| {
        ApiError::Unavailable("this host runs no blobstore to keep the system image in".into())
    })?;
    let exe = std::env::current_exe()
        .map_err(|e| ApiError::Internal(format!("where flynn-host is: {e}")))?;
    let bin = exe.with_file_name(binary);
    if !bin.is_file() {
        return Err(ApiError::Unavailable(format!(
            "{} is not installed beside flynn-host; {app} cannot run jobs",
            bin.display()
        )));
    }
    let dir = tmp.to_path_buf();
    let (layer_path, sha512, size) = tokio::task::spawn_blocking(move || build_layer(&bin, &dir))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("building the system image: {e}")))?;
    let blob = flynn_state::layer_path(&sha512);
    let exists = node.state.read(|a| a.state.blobs.blobs.contains_key(&blob));
    if !exists {
        let file = tokio::fs::File::open(&layer_path)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        blobstore
            .put_checked(&blob, tokio_util::io::ReaderStream::new(file), &sha512)
            .await?;
    }
    let _ = std::fs::remove_file(&layer_path);
    let run = format!("/bin/{binary}");
    let processes: BTreeMap<String, ProcessType> = [(
        "migrate".to_string(),
        ProcessType {
            args: vec![run.clone(), "migrate".into()],
            ..ProcessType::default()
        },
    )]
    .into();
    let release = NewRelease {
        image: Image {
            layers: vec![Layer {
                sha512,
                size,
                compression: LayerCompression::None,
            }],
            config: ImageConfig {
                cmd: vec![run],
                ..ImageConfig::default()
            },
        },
        processes: Some(processes),
    };
    node.propose(JobsCommand::CreateRelease {
        app: app.to_string(),
        release,
        now_ms: crate::now_ms(),
    })
    .await?;
    tracing::info!(app, "made the system image release");
    Ok(())
}

/// Stores a small layer of `files` (path in the image, contents, mode), each with its
/// parent directories, through `blobstore` unless it is stored already: the same files make
/// the same layer. The database servers' start scripts go into their images this way.
pub async fn store_files_layer(
    node: &crate::node::Node,
    blobstore: Option<&std::sync::Arc<crate::blobstore::Blobstore>>,
    files: &[(&str, &[u8], u32)],
) -> ApiResult<Layer> {
    let tar = files_tar(files).map_err(|e| ApiError::Internal(format!("a layer: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA512, &tar);
    let sha512: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let layer = Layer {
        sha512,
        size: tar.len() as u64,
        compression: LayerCompression::None,
    };
    let blob = flynn_state::layer_path(&layer.sha512);
    if !node.state.read(|a| a.state.blobs.blobs.contains_key(&blob)) {
        let blobstore = blobstore.ok_or_else(|| {
            ApiError::Unavailable("this host runs no blobstore to keep the image in".into())
        })?;
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(tar))]);
        blobstore.put_checked(&blob, body, &layer.sha512).await?;
    }
    Ok(layer)
}

fn files_tar(files: &[(&str, &[u8], u32)]) -> std::io::Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    for d in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, d, std::io::empty())?;
    }
    for (path, data, mode) in files {
        let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
        tar.append_data(&mut h, path, *data)?;
    }
    tar.into_inner()
}

/// The shared libraries `bin` links, as absolute paths (none for a static binary).
fn libraries(bin: &Path) -> std::io::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A tar header owned by root, with no time: the same files make the same layer.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes the layer tar under `dir`; its path, SHA-512 and size.
fn build_layer(bin: &Path, dir: &Path) -> std::io::Result<(PathBuf, String, u64)> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("system-layer-{}.tar", rand::random::<u64>()));
    let mut files: Vec<(PathBuf, String)> =
        vec![(bin.to_path_buf(), format!("bin/{}", file_name(bin)))];
    for lib in libraries(bin)? {
        let name = lib.to_string_lossy().trim_start_matches('/').to_string();
        files.push((lib, name));
    }
    {
        let mut tar = tar::Builder::new(std::fs::File::create(&out)?);
        for (d, mode) in [("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)] {
            let mut h = header(tar::EntryType::Directory, mode, 0);
            tar.append_data(&mut h, d, std::io::empty())?;
        }
        for (from, name) in &files {
            // Opening follows a library's symlink to the file itself.
            let f = std::fs::File::open(from)?;
            let mut h = header(tar::EntryType::Regular, 0o755, f.metadata()?.len());
            tar.append_data(&mut h, name, f)?;
        }
        tar.into_inner()?.sync_all()?;
    }
    let sha = flynn_job::layer::sha512_file(&out)?;
    let size = std::fs::metadata(&out)?.len();
    Ok((out, sha, size))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
