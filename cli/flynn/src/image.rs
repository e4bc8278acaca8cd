//! Image archives as users have them, without a Docker engine: `docker save` output
//! (`manifest.json`, `<id>/layer.tar` or `blobs/sha256/...`) and OCI image layouts
//! (`oci-layout`, `index.json`, `blobs/sha256/...`), tarred.
//!
//! The archive is indexed once (names → offsets); layers are then read straight from the
//! file, never held in memory. Each layer's SHA-256 is checked against the digest the
//! archive names for it, so a corrupt or truncated archive is refused before anything of it
//! is deployed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flynn_model::{ImageConfig, LayerCompression};
use serde::Deserialize;

/// Largest manifest or config file read whole.
const MAX_JSON: u64 = 16 << 20;

pub struct Archive {
    path: PathBuf,
    /// Entry name (without a leading `./`) → (offset of its data, size).
    entries: HashMap<String, (u64, u64)>,
    /// Symlinks (docker save links repeated layers): name → target name.
    links: HashMap<String, String>,
}

/// One layer in the archive, as it will be stored.
#[derive(Clone)]
pub struct LayerSource {
    pub name: String,
    pub size: u64,
    /// The SHA-256 (hex) the archive names the layer's bytes by, when it does.
    pub sha256: Option<String>,
}

pub struct ParsedImage {
    pub layers: Vec<LayerSource>,
    pub config: ImageConfig,
}

fn clean(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_end_matches('/')
        .to_string()
}

impl Archive {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut tar = tar::Archive::new(file);
        let mut entries = HashMap::new();
        let mut links = HashMap::new();
        // The tar reader's own errors quote the bytes it choked on (a text file's first
        // line, say): name the file and what was expected instead, never its content.
        let bad = |_| {
            anyhow::anyhow!(
                "{} is not a tar archive (expected a `docker save` or OCI image archive)",
                path.display()
            )
        };
        for entry in tar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = clean(&entry.path().map_err(bad)?.to_string_lossy());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Ok(Some(target)) = entry.link_name() {
                        let target = target.to_string_lossy().to_string();
                        // Relative symlinks resolve against the link's directory.
                        let resolved = if entry.header().entry_type() == tar::EntryType::Symlink {
                            let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
                            normalize(&dir.join(&target))
                        } else {
                            clean(&target)
                        };
                        links.insert(name, resolved);
                    }
                }
                _ => {}
            }
        }
        let len = std::fs::metadata(path)?.len();
        if entries.values().any(|(off, size)| off + size > len) {
            bail!("{} is truncated", path.display());
        }
        Ok(Archive {
            path: path.to_path_buf(),
            entries,
            links,
        })
    }

    fn find(&self, name: &str) -> Option<(u64, u64)> {
        let name = clean(name);
        let name = self.links.get(&name).cloned().unwrap_or(name);
        self.entries.get(&name).copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// A reader over one entry's bytes.
    pub fn reader(&self, name: &str) -> anyhow::Result<std::io::Take<File>> {
        let (off, size) = self
            .find(name)
            .with_context(|| format!("the archive has no {name:?}"))?;
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(off))?;
        Ok(f.take(size))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> anyhow::Result<T> {
        let (_, size) = self
            .find(name)
            .with_context(|| format!("the archive has no {name:?}"))?;
        if size > MAX_JSON {
            bail!("{name} is too large ({size} bytes) to be an image manifest");
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.reader(name)?.read_to_end(&mut buf)?;
        serde_json::from_slice(&buf).with_context(|| format!("{name} is not valid JSON"))
    }

    /// The image's layers (bottom first) and config.
    pub fn parse(&self) -> anyhow::Result<ParsedImage> {
        if self.has("manifest.json") {
            self.parse_docker()
        } else if self.has("index.json") {
            self.parse_oci()
        } else {
            bail!(
                "{} is not a `docker save` or OCI image archive (it has no manifest.json or index.json)",
                self.path.display()
            )
        }
    }

    fn parse_docker(&self) -> anyhow::Result<ParsedImage> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            layers: Vec<String>,
        }
        let manifest: Vec<Entry> = self.json("manifest.json")?;
        let entry = manifest
            .into_iter()
            .next()
            .context("manifest.json lists no image")?;
        let config: DockerConfig = self.json(&entry.config)?;
        let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        let mut layers = Vec::new();
        for (i, name) in entry.layers.iter().enumerate() {
            let (_, size) = self
                .find(name)
                .with_context(|| format!("layer {name} is missing from the archive"))?;
            // An OCI-style blob is named by its digest; a legacy layer.tar is uncompressed,
            // so its diff id is the digest of its bytes.
            let sha256 = digest_in_name(name).or_else(|| {
                diff_ids
                    .get(i)
                    .and_then(|d| d.strip_prefix("sha256:"))
                    .map(String::from)
            });
            layers.push(LayerSource {
                name: name.clone(),
                size,
                sha256,
            });
        }
        Ok(ParsedImage {
            layers,
            config: config.config.unwrap_or_default().into(),
        })
    }

    fn parse_oci(&self) -> anyhow::Result<ParsedImage> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Descriptor {
            #[serde(default)]
            media_type: String,
            digest: String,
        }
        #[derive(Deserialize)]
        struct Index {
            manifests: Vec<Descriptor>,
        }
        #[derive(Deserialize)]
        struct Manifest {
            config: Descriptor,
            layers: Vec<Descriptor>,
        }
        let blob = |d: &Descriptor| -> anyhow::Result<String> {
            let hex = d
                .digest
                .strip_prefix("sha256:")
                .with_context(|| format!("unsupported digest {:?}", d.digest))?;
            Ok(format!("blobs/sha256/{hex}"))
        };
        let index: Index = self.json("index.json")?;
        let mut desc = index
            .manifests
            .into_iter()
            .next()
            .context("index.json lists no manifest")?;
        // An index may point at another index (multi-platform): take its first manifest.
        for _ in 0..4 {
            if !desc.media_type.contains("index") {
                break;
            }
            let nested: Index = self.json(&blob(&desc)?)?;
            desc = nested
                .manifests
                .into_iter()
                .next()
                .context("nested index lists no manifest")?;
        }
        let manifest: Manifest = self.json(&blob(&desc)?)?;
        let config: DockerConfig = self.json(&blob(&manifest.config)?)?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let name = blob(l)?;
            let (_, size) = self
                .find(&name)
                .with_context(|| format!("layer {} is missing from the archive", l.digest))?;
            layers.push(LayerSource {
                sha256: digest_in_name(&name),
                name,
                size,
            });
        }
        Ok(ParsedImage {
            layers,
            config: config.config.unwrap_or_default().into(),
        })
    }
}

fn normalize(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into()),
            _ => {}
        }
    }
    out.join("/")
}

fn digest_in_name(name: &str) -> Option<String> {
    let hex = name.strip_prefix("blobs/sha256/")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

impl From<RunConfig> for ImageConfig {
    fn from(c: RunConfig) -> Self {
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        }
    }
}

/// A layer's digests and compression, from one pass over its bytes.
pub struct Hashed {
    pub sha512: String,
    pub compression: LayerCompression,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes a whole file as a layer (its compression sniffed).
pub fn hash_file(path: &Path) -> anyhow::Result<Hashed> {
    let size = std::fs::metadata(path)?.len();
    let mut archive = Archive {
        path: path.to_path_buf(),
        entries: HashMap::new(),
        links: HashMap::new(),
    };
    archive.entries.insert("layer".into(), (0, size));
    let src = LayerSource {
        name: "layer".into(),
        size,
        sha256: None,
    };
    hash_layer(&archive, &src)
}

/// Hashes a layer, checking the SHA-256 the archive names it by.
pub fn hash_layer(archive: &Archive, layer: &LayerSource) -> anyhow::Result<Hashed> {
    let mut r = archive.reader(&layer.name)?;
    let mut sha512 = ring::digest::Context::new(&ring::digest::SHA512);
    let mut sha256 = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n.min(4)]);
        }
        sha512.update(&buf[..n]);
        sha256.update(&buf[..n]);
        total += n as u64;
    }
    if total != layer.size {
        bail!("layer {} is truncated", layer.name);
    }
    if let Some(expected) = &layer.sha256 {
        let got = hex(sha256.finish().as_ref());
        if &got != expected {
            bail!(
                "layer {} is corrupt: its sha256 is {got}, the image says {expected}",
                layer.name
            );
        }
    }
    let compression = match head.as_slice() {
        [0x1f, 0x8b, ..] => LayerCompression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => LayerCompression::Zstd,
        _ => LayerCompression::None,
    };
    Ok(Hashed {
        sha512: hex(sha512.finish().as_ref()),
        compression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_no_archive_is_named_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let long = "root:x:0:0:root:/root:/bin/bash\n".repeat(40);
        for (name, text) in [("short", "root:x:0:0:root\n"), ("long", long.as_str())] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", Archive::open(&path).err().expect("refused"));
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(!err.contains("root:"), "{err}");
        }
    }
}
