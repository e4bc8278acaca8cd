//! The embedded backend's bytes on one host: content-addressed objects under
//! `DATA_DIR/blobstore/objects/AB/SHA512HEX`. An object is written to a temporary file while
//! its SHA-512 is computed, synced, and renamed into place only whole, so a cut upload
//! leaves nothing; identical content is stored once, and a copy is metadata only.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// How long an unreferenced object is kept after it was written (see
/// [`ObjectStore::discard_unused`]).
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

pub struct ObjectStore {
    root: PathBuf,
}

/// What writing an object produced.
pub struct Written {
    pub sha512: String,
    pub size: u64,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ObjectStore {
    pub fn open(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(ObjectStore { root })
    }

    pub fn path(&self, sha512: &str) -> PathBuf {
        self.root.join(&sha512[..2.min(sha512.len())]).join(sha512)
    }

    pub fn has(&self, sha512: &str) -> bool {
        valid_sha(sha512) && self.path(sha512).is_file()
    }

    /// Writes the concatenation of `prefix` (an existing object, for appends) and `body`;
    /// returns its digest and size. With `expect`, a different digest is refused and nothing
    /// is kept.
    pub async fn write<S, E>(
        &self,
        prefix: Option<&Path>,
        mut body: S,
        expect: Option<&str>,
    ) -> Result<Written, String>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}-{}", std::process::id(), rand::random::<u64>()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
            let mut size = 0u64;
            if let Some(p) = prefix {
                let mut src = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| format!("reading {}: {e}", p.display()))?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut src, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                    f.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
                    size += n as u64;
                }
            }
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| format!("the upload broke off: {e}"))?;
                ctx.update(&chunk);
                f.write_all(&chunk).await.map_err(|e| e.to_string())?;
                size += chunk.len() as u64;
            }
            f.sync_all().await.map_err(|e| e.to_string())?;
            let sha512 = hex(ctx.finish().as_ref());
            if let Some(want) = expect {
                if want != sha512 {
                    return Err(format!(
                        "content digest {sha512} is not the expected {want}"
                    ));
                }
            }
            let dest = self.path(&sha512);
            if let Some(dir) = dest.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Written { sha512, size })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Drops an object no file refers to any more, unless it was written within
    /// [`GRACE`]: an upload of the same content may be about to commit a file naming it.
    pub fn discard_unused(&self, sha512: &str) {
        if !valid_sha(sha512) {
            return;
        }
        let path = self.path(sha512);
        let young = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < GRACE);
        if !young {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Drops a copy found to be bad, so reads go to another holder.
    pub fn discard(&self, sha512: &str) {
        if valid_sha(sha512) {
            let _ = std::fs::remove_file(self.path(sha512));
        }
    }
}

pub fn valid_sha(s: &str) -> bool {
    s.len() == 128
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}
