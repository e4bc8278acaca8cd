//! The release channel `flynn-host update --version V` fetches from.
//!
//! A repository is a directory tree, served by any static HTTP server or read from a path:
//!
//! ```text
//! latest                  the newest version, one line
//! V/MANIFEST              "flynn-release 1", "version V", then "sha512 HEX NAME" per binary
//! V/MANIFEST.sig          base64 Ed25519 signature of MANIFEST by the release key
//! V/flynn-host, V/flynn, V/flynn-blobstore, V/flynn-init
//! ```
//!
//! Hosts trust a release public key given at install (`install-flynn --release-key`), kept
//! in the data directory's `release.json` beside the repository's address. A binary is used
//! only if the manifest's signature verifies under that key and the bytes' SHA-512 matches
//! the manifest's line, which is checked while it downloads; a half-fetched or mismatched
//! file is removed, never left where it could run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use ring::signature::{self, KeyPair};
use serde::{Deserialize, Serialize};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const MANIFEST_MAGIC: &str = "flynn-release 1";
/// The binaries a release carries (flynn-host is required; the others when built).
pub const BINARIES: [&str; 4] = ["flynn-host", "flynn", "flynn-blobstore", "flynn-init"];
/// A manifest larger than this is not one.
const MANIFEST_MAX: usize = 64 * 1024;

/// Where releases come from and whose signature they need: `DATA_DIR/release.json` (written
/// by install-flynn), overridden by the flags (or `FLYNN_RELEASE_REPOSITORY` /
/// `FLYNN_RELEASE_KEY`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Channel {
    pub repository: String,
    /// The release public key, base64 of the 32 raw Ed25519 bytes.
    pub key: String,
}

impl Channel {
    pub fn resolve(
        data_dir: &Path,
        repository: Option<&str>,
        key: Option<&str>,
    ) -> anyhow::Result<Channel> {
        let file = data_dir.join("release.json");
        let saved: Option<Channel> = match std::fs::read(&file) {
            Ok(b) => Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("{} is not a release channel", file.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let repository = repository
            .map(str::to_string)
            .or_else(|| saved.as_ref().map(|c| c.repository.clone()))
            .context("no release repository: give --repository URL, or install with install-flynn --repository")?;
        let key = key
            .map(str::to_string)
            .or_else(|| saved.as_ref().map(|c| c.key.clone()))
            .context("no release key to check releases with: give --release-key KEY, or install with install-flynn --release-key")?;
        let key = read_key_arg(&key)?;
        public_key(&key)?;
        Ok(Channel { repository, key })
    }
}

/// A key given as its base64 text or as a file holding it (base64 has '/' in it, so only
/// an existing file counts as one).
fn read_key_arg(arg: &str) -> anyhow::Result<String> {
    let p = Path::new(arg);
    if p.is_file() {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading key {arg}"))?;
        return Ok(text.trim().to_string());
    }
    Ok(arg.trim().to_string())
}

fn public_key(b64: &str) -> anyhow::Result<Vec<u8>> {
    let raw = B64
        .decode(b64.trim())
        .context("the release key is not base64")?;
    if raw.len() != 32 {
        bail!(
            "the release key is {} bytes; an Ed25519 public key is 32",
            raw.len()
        );
    }
    Ok(raw)
}

/// `flynn-host release keygen`: a new signing key (PKCS#8, mode 0600) and its public half.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("could not generate a key"))?;
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("the generated key does not parse"))?;
    let public = B64.encode(pair.public_key().as_ref());
    if out.exists() {
        bail!("{} exists; not overwriting a signing key", out.display());
    }
    write_new(out, pkcs8.as_ref(), 0o600)?;
    write_new(
        &out.with_extension("pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(public)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA512, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `flynn-host release publish`: puts the binaries of `from` into `repository/V/` with a
/// signed manifest, then points `latest` at V. Files go in under temporary names and are
/// renamed into place, the manifest last, so a reader never sees a manifest without its
/// binaries.
pub fn publish(repository: &Path, key_file: &Path, from: &Path) -> anyhow::Result<String> {
    let pkcs8 =
        std::fs::read(key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let pair = signature::Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 signing key", key_file.display()))?;
    let host = from.join("flynn-host");
    let version = crate::update::version_of(&host)?;
    check_version(&version)
        .with_context(|| format!("{} reports an unusable version", host.display()))?;
    let dir = repository.join(&version);
    if dir.join("MANIFEST").exists() {
        bail!(
            "{} already holds release {version}; a published release is never changed",
            repository.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut manifest = format!("{MANIFEST_MAGIC}\nversion {version}\n");
    for name in BINARIES {
        let src = from.join(name);
        if !src.exists() {
            if name == "flynn-host" {
                bail!("{} is missing", src.display());
            }
            continue;
        }
        let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        manifest.push_str(&format!("sha512 {} {name}\n", sha512_hex(&bytes)));
        place(&dir, name, &bytes)?;
    }
    let sig = pair.sign(manifest.as_bytes());
    place(
        &dir,
        "MANIFEST.sig",
        format!("{}\n", B64.encode(sig.as_ref())).as_bytes(),
    )?;
    place(&dir, "MANIFEST", manifest.as_bytes())?;
    place(repository, "latest", format!("{version}\n").as_bytes())?;
    Ok(version)
}

/// Writes `dir/name` through a temporary file and a rename.
fn place(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes, 0o644)?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("placing {name}"))?;
    Ok(())
}

/// A verified manifest: its version and the SHA-512 of each binary.
#[derive(Debug)]
pub struct Manifest {
    pub version: String,
    pub sums: Vec<(String, String)>,
}

/// Checks `text` against its signature under `key` (base64), then parses it.
pub fn verify_manifest(text: &[u8], sig_b64: &[u8], key: &str) -> anyhow::Result<Manifest> {
    let sig = B64
        .decode(String::from_utf8_lossy(sig_b64).trim())
        .context("MANIFEST.sig is not base64")?;
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key(key)?)
        .verify(text, &sig)
        .map_err(|_| {
            anyhow::anyhow!("the release's MANIFEST is not signed by the release key; refusing it")
        })?;
    let text = std::str::from_utf8(text).context("MANIFEST is not UTF-8")?;
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_MAGIC) {
        bail!("MANIFEST does not start with {MANIFEST_MAGIC:?}");
    }
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .context("MANIFEST has no version line")?
        .to_string();
    let mut sums = Vec::new();
    for l in lines {
        let mut f = l.split(' ');
        match (f.next(), f.next(), f.next(), f.next()) {
            (Some("sha512"), Some(sum), Some(name), None) if sum.len() == 128 => {
                sums.push((name.to_string(), sum.to_string()))
            }
            _ => bail!("MANIFEST has a malformed line {l:?}"),
        }
    }
    Ok(Manifest { version, sums })
}

/// A repository address joined with a path inside it.
fn location(repository: &str, rel: &str) -> String {
    format!("{}/{rel}", repository.trim_end_matches('/'))
}

fn is_http(repository: &str) -> bool {
    repository.starts_with("http://") || repository.starts_with("https://")
}

fn local_path(repository: &str) -> PathBuf {
    PathBuf::from(repository.strip_prefix("file://").unwrap_or(repository))
}

/// Streams one file of the repository (over HTTP, or from its directory) into `sink`,
/// piece by piece.
async fn fetch(
    http: &reqwest::Client,
    repository: &str,
    rel: &str,
    mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let at = location(repository, rel);
    if is_http(repository) {
        let mut resp = http
            .get(&at)
            .send()
            .await
            .with_context(|| format!("fetching {at}"))?;
        if !resp.status().is_success() {
            bail!("{at}: {}", resp.status());
        }
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("reading {at}"))?
        {
            sink(&chunk)?;
        }
    } else {
        let p = local_path(repository).join(rel);
        let mut src =
            std::fs::File::open(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut src, &mut buf)
                .with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            sink(&buf[..n])?;
        }
    }
    Ok(())
}

/// A small file of the repository (the manifest, its signature, `latest`), size-capped.
async fn fetch_small(
    http: &reqwest::Client,
    repository: &str,
    rel: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    fetch(http, repository, rel, |piece| {
        body.extend_from_slice(piece);
        if body.len() > MANIFEST_MAX {
            bail!(
                "{} is larger than {MANIFEST_MAX} bytes",
                location(repository, rel)
            );
        }
        Ok(())
    })
    .await?;
    Ok(body)
}

/// A release version is one path component of the repository: not empty, no separators
/// or blanks, not hidden (nor `.` or `..`).
fn check_version(version: &str) -> anyhow::Result<()> {
    if version.is_empty() || version.contains(['/', '\\', '\n', ' ']) || version.starts_with('.') {
        bail!("{version:?} is not a release version");
    }
    Ok(())
}

/// Fetches release `version` ("latest" for the newest) of flynn-host from the channel into
/// `DATA_DIR/releases/V/flynn-host`, verified; returns its path and version.
pub async fn fetch_host_binary(
    channel: &Channel,
    data_dir: &Path,
    version: &str,
) -> anyhow::Result<(PathBuf, String)> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let repo = &channel.repository;
    let version = if version == "latest" {
        let v = fetch_small(&http, repo, "latest").await?;
        String::from_utf8_lossy(&v).trim().to_string()
    } else {
        version.to_string()
    };
    check_version(&version)?;
    let manifest = fetch_small(&http, repo, &format!("{version}/MANIFEST"))
        .await
        .with_context(|| format!("release {version} is not in {repo}"))?;
    let sig = fetch_small(&http, repo, &format!("{version}/MANIFEST.sig")).await?;
    let m = verify_manifest(&manifest, &sig, &channel.key)?;
    if m.version != version {
        bail!(
            "{repo}/{version}/MANIFEST is signed for version {}, not {version}; refusing it",
            m.version
        );
    }
    let want = m
        .sums
        .iter()
        .find(|(n, _)| n == "flynn-host")
        .map(|(_, s)| s.clone())
        .context("the release has no flynn-host")?;
    let dir = data_dir.join("releases").join(&version);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join("flynn-host");
    let partial = dir.join(".flynn-host.partial");
    let got = download(&http, repo, &format!("{version}/flynn-host"), &partial).await;
    let result = got.and_then(|sum| {
        if sum != want {
            bail!(
                "{version}/flynn-host does not match its signed SHA-512 (got {sum}); refusing it"
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&partial, &dest)?;
    Ok((dest, version))
}

/// Streams one binary into `to`, hashing as it goes; returns the SHA-512 in hex.
async fn download(
    http: &reqwest::Client,
    repository: &str,
    rel: &str,
    to: &Path,
) -> anyhow::Result<String> {
    let _ = std::fs::remove_file(to);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    fetch(http, repository, rel, |piece| {
        ctx.update(piece);
        out.write_all(piece)
            .with_context(|| format!("writing {}", to.display()))
    })
    .await?;
    out.sync_all()?;
    Ok(hex(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_verifies_only_under_its_key_and_unaltered() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let key = B64.encode(pair.public_key().as_ref());
        let text = format!(
            "{MANIFEST_MAGIC}\nversion 1.2.3\nsha512 {} flynn-host\n",
            "a".repeat(128)
        );
        let sig = B64.encode(pair.sign(text.as_bytes()).as_ref());
        let m = verify_manifest(text.as_bytes(), sig.as_bytes(), &key).unwrap();
        assert_eq!(m.version, "1.2.3");
        assert_eq!(m.sums, vec![("flynn-host".to_string(), "a".repeat(128))]);

        let altered = text.replace("1.2.3", "1.2.4");
        let e = verify_manifest(altered.as_bytes(), sig.as_bytes(), &key).unwrap_err();
        assert!(e.to_string().contains("not signed"), "{e}");

        let other = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let other = signature::Ed25519KeyPair::from_pkcs8(other.as_ref()).unwrap();
        let other_key = B64.encode(other.public_key().as_ref());
        assert!(verify_manifest(text.as_bytes(), sig.as_bytes(), &other_key).is_err());
        assert!(verify_manifest(text.as_bytes(), b"!!", &key).is_err());
        assert!(public_key("c2hvcnQ=")
            .unwrap_err()
            .to_string()
            .contains("32"));
    }
}
