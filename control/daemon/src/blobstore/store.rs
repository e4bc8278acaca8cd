//! The embedded backend's bytes on one host: content-addressed objects under
//! `DATA_DIR/blobstore/objects/AB/SHA512HEX`. An object is written to a temporary file while
//! its SHA-512 is computed, synced, and renamed into place only whole, so a cut upload
//! leaves nothing; identical content is stored once, and a copy is metadata only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// How long an unreferenced object is kept after it was written (see
/// [`ObjectStore::discard_unused`]).
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Bytes read from disk at a time when serving or copying an object.
const READ_CHUNK: usize = 1 << 20;
const WRITE_BUFFER: usize = 1 << 20;

/// How long a local object that read back whole with its digest is trusted without
/// hashing it again (while its modification time stays the same).
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(600);

/// Deletes a temporary file when dropped (after a rename, there is nothing to delete).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Up to [`READ_CHUNK`] bytes of `file` from `at`, at most `left`; empty at its end.
///
/// With `cached_only`, only what the page cache holds right now is read (`RWF_NOWAIT`),
/// so the caller can read on an async worker without waiting on the disk: `None` when not
/// even the first byte is cached (or the filesystem cannot say, or the kernel answers 0),
/// and the caller goes to the blocking pool. A piece may come back short; the next one
/// starts where it ended. The buffer is not zeroed first: a 1 MiB memset costs as much as the
/// copy from the page cache.
fn read_piece(
    file: &std::fs::File,
    at: u64,
    left: u64,
    cached_only: bool,
) -> std::io::Result<Option<bytes::Bytes>> {
    use std::os::fd::AsRawFd;
    let want = left.min(READ_CHUNK as u64) as usize;
    let mut buf = Vec::<u8>::with_capacity(want);
    let flags = if cached_only { libc::RWF_NOWAIT } else { 0 };
    while buf.len() < want {
        let room = want - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..room];
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        let offset = libc::off_t::try_from(at + buf.len() as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        #[allow(unsafe_code)]
        // SAFETY: `iov` points into `buf`'s spare capacity, which outlives the call; the
        // kernel writes at most `iov_len` bytes there.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN | libc::EOPNOTSUPP) if cached_only => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    break;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            // With RWF_NOWAIT, Linux 5.9 and 5.10 may say 0 before the end of the file
            // (preadv2(2), BUGS): only a read that may wait says where the end is.
            if cached_only && buf.is_empty() {
                return Ok(None);
            }
            break;
        }
        #[allow(unsafe_code)]
        // SAFETY: the kernel initialized the `n` bytes after the current length (n is at
        // most the spare capacity handed to it).
        unsafe {
            buf.set_len(buf.len() + n as usize)
        };
    }
    Ok(Some(buf.into()))
}

/// A piece read on the async worker when the page cache has it, else on the blocking pool.
pub(super) async fn read_piece_soon(
    file: std::sync::Arc<std::fs::File>,
    at: u64,
    left: u64,
) -> std::io::Result<bytes::Bytes> {
    if let Some(piece) = read_piece(&file, at, left, true)? {
        return Ok(piece);
    }
    tokio::task::spawn_blocking(move || read_piece(&file, at, left, false))
        .await
        .map_err(std::io::Error::other)?
        .map(|piece| piece.unwrap_or_default())
}

pub struct ObjectStore {
    root: PathBuf,
    /// Objects whose digest was checked on a whole read: their mtime then, and when.
    checked: Mutex<HashMap<String, (SystemTime, Instant)>>,
}

/// Why an object was not written. Nothing of it is kept in any case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The sender's body broke off.
    #[error("the upload broke off: {0}")]
    Upload(String),
    /// The content is not what the caller said it would be.
    #[error("content digest {got} is not the expected {want}")]
    Digest { got: String, want: String },
    /// This host's disk refused it.
    #[error("{what}: {source}")]
    Disk {
        what: String,
        source: std::io::Error,
    },
}

// errno values of a full disk and an exhausted quota (the same on every Linux architecture).
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

impl WriteError {
    fn disk(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| WriteError::Disk { what, source }
    }

    /// The answer for the client: its own fault (400), a full disk (507), or ours (500).
    pub fn into_api(self) -> crate::error::ApiError {
        use crate::error::ApiError;
        match &self {
            WriteError::Upload(_) | WriteError::Digest { .. } => {
                ApiError::Invalid(self.to_string())
            }
            WriteError::Disk { source, .. }
                if matches!(source.raw_os_error(), Some(ENOSPC) | Some(EDQUOT)) =>
            {
                ApiError::InsufficientStorage(format!("this host's disk is full: {self}"))
            }
            WriteError::Disk { .. } => ApiError::Internal(self.to_string()),
        }
    }
}

/// What writing an object produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    pub sha512: String,
    pub size: u64,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ObjectStore {
    pub fn open(root: PathBuf) -> std::io::Result<Self> {
        // Nothing is being written before the store opens: what a crash left is garbage.
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(ObjectStore {
            root,
            checked: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, sha512: &str) -> PathBuf {
        self.root.join(&sha512[..2.min(sha512.len())]).join(sha512)
    }

    pub fn has(&self, sha512: &str) -> bool {
        valid_sha(sha512) && self.path(sha512).is_file()
    }

    /// Writes `body` as an object; returns its digest and size. With `expect`, a different
    /// digest is refused and nothing is kept.
    pub async fn write<S, E>(
        &self,
        mut body: S,
        expect: Option<&str>,
    ) -> Result<Written, WriteError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}-{}", std::process::id(), rand::random::<u64>()));
        // Removed however this ends, also when the write is dropped midway (an upload whose
        // connection went away): only a renamed object stays.
        let _unless_renamed = RemoveOnDrop(tmp.clone());
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(WriteError::disk(format!("creating {}", tmp.display())))?;
            // Few large writes: each write of a tokio file is a trip to the blocking pool.
            let mut f = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| WriteError::Upload(e.to_string()))?;
                ctx.update(&chunk);
                f.write_all(&chunk)
                    .await
                    .map_err(WriteError::disk("writing the object"))?;
                size += chunk.len() as u64;
            }
            f.flush()
                .await
                .map_err(WriteError::disk("writing the object"))?;
            f.get_ref()
                .sync_all()
                .await
                .map_err(WriteError::disk("syncing the object"))?;
            let sha512 = hex(ctx.finish().as_ref());
            if let Some(want) = expect {
                if want != sha512 {
                    return Err(WriteError::Digest {
                        got: sha512,
                        want: want.to_string(),
                    });
                }
            }
            let dest = self.path(&sha512);
            if let Some(dir) = dest.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(WriteError::disk("making the object's directory"))?;
            }
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(WriteError::disk("moving the object into place"))?;
            // Hashed as it was written and synced: good as of now.
            self.mark_checked(&sha512);
            Ok(Written { sha512, size })
        }
        .await;
        result
    }

    /// `len` bytes of a local object from `start` (to its end, if shorter), read in
    /// [`READ_CHUNK`] pieces, each a `pread` from where the one before ended: `tokio::fs`
    /// would make open, seek and each read a trip to the blocking pool of their own, which
    /// was most of a small GET's time.
    pub async fn read(
        &self,
        sha512: &str,
        start: u64,
        len: u64,
    ) -> std::io::Result<super::backends::IoStream> {
        // Opening is a path walk in the dentry cache, cheap enough for the async worker; so
        // is reading what the page cache holds (as nginx reads in its event loop). Handing
        // a piece to the blocking pool and back costs two thread switches, so only a piece
        // that must wait on the disk goes there.
        let file = std::sync::Arc::new(std::fs::File::open(self.path(sha512))?);
        let piece = read_piece_soon(file.clone(), start, len).await?;
        // Each later piece starts where the one before ended, until `len` or the end.
        let state = Some((file, start + piece.len() as u64, len - piece.len() as u64));
        let rest = futures::stream::unfold(state, |state| async move {
            let (file, at, left) = state?;
            if left == 0 {
                return None;
            }
            match read_piece_soon(file.clone(), at, left).await {
                Ok(p) if p.is_empty() => None,
                Ok(p) => {
                    let next = (file, at + p.len() as u64, left - p.len() as u64);
                    Some((Ok(p), Some(next)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let first = futures::stream::iter((!piece.is_empty()).then_some(Ok(piece)));
        Ok(first.chain(rest).boxed())
    }

    fn mtime(&self, sha512: &str) -> Option<SystemTime> {
        std::fs::metadata(self.path(sha512)).ok()?.modified().ok()
    }

    /// Whether the object read back whole with its digest within [`RECHECK`], unchanged
    /// on disk since.
    /// Whether new objects can be written here now (a file is made and removed).
    pub fn writable(&self) -> std::io::Result<()> {
        let probe = self
            .root
            .join(format!(".health-{:016x}", rand::random::<u64>()));
        std::fs::write(&probe, b"ok")?;
        std::fs::remove_file(&probe)
    }

    pub fn recently_checked(&self, sha512: &str) -> bool {
        let Some(now) = self.mtime(sha512) else {
            return false;
        };
        let checked = self.checked.lock().expect("checked lock");
        checked
            .get(sha512)
            .is_some_and(|(mtime, at)| *mtime == now && at.elapsed() < RECHECK)
    }

    pub fn mark_checked(&self, sha512: &str) {
        if let Some(mtime) = self.mtime(sha512) {
            let mut checked = self.checked.lock().expect("checked lock");
            if checked.len() > 100_000 {
                checked.clear();
            }
            checked.insert(sha512.to_string(), (mtime, Instant::now()));
        }
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
        self.checked.lock().expect("checked lock").remove(sha512);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn body(size: usize) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin {
        let chunk = bytes::Bytes::from(vec![3u8; 64 << 10]);
        futures::stream::iter((0..size / chunk.len()).map(move |_| Ok(chunk.clone())))
    }

    /// A full disk is the host's trouble, not the client's: 507 naming it, and no part of
    /// the object left behind (a real 1 MiB tmpfs, so the kernel's own ENOSPC).
    #[tokio::test]
    async fn t01_full_disk_answers_507_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "mounting a tmpfs needs root (the tests run as root)"
        );
        let result = async {
            let store = ObjectStore::open(dir.path().join("objects")).unwrap();
            let small = store.write(body(256 << 10), None).await.unwrap();
            assert!(store.has(&small.sha512));
            let err = store.write(body(4 << 20), None).await.unwrap_err();
            assert!(matches!(err, WriteError::Disk { .. }), "{err}");
            let api = err.into_api();
            assert_eq!(api.status().as_u16(), 507, "{api}");
            assert!(api.to_string().contains("disk is full"), "{api}");
            let left = std::fs::read_dir(dir.path().join("objects/tmp"))
                .unwrap()
                .count();
            assert_eq!(left, 0, "a temporary file of the refused object was left");
            assert!(store.has(&small.sha512), "the earlier object was lost");
        }
        .await;
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        result
    }

    #[tokio::test]
    async fn t02_a_broken_upload_or_wrong_digest_is_the_clients_fault() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path().to_path_buf()).unwrap();
        let broken = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"abc")),
            Err(std::io::Error::other("reset")),
        ]);
        let err = store.write(broken, None).await.unwrap_err();
        assert_eq!(err.into_api().status().as_u16(), 400);
        let err = store
            .write(body(64 << 10), Some(&"0".repeat(128)))
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Digest { .. }));
        assert_eq!(err.into_api().status().as_u16(), 400);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
    async fn collect(stream: super::super::backends::IoStream) -> Vec<u8> {
        let pieces: Vec<_> = stream.collect().await;
        pieces
            .into_iter()
            .flat_map(|p| p.unwrap().to_vec())
            .collect()
    }

    /// Reads come back byte for byte whether the page cache holds the object (read on the
    /// async worker) or not (the blocking pool): whole, from an offset, across pieces.
    #[tokio::test]
    async fn t03_reads_are_whole_from_the_page_cache_or_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path().to_path_buf()).unwrap();
        let size = 2 * READ_CHUNK + 12_345;
        let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<_> = content
            .chunks(100_000)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let written = store
            .write(futures::stream::iter(chunks), None)
            .await
            .unwrap();
        let file = std::fs::File::open(store.path(&written.sha512)).unwrap();
        let cached = read_piece(&file, 10, 100, true).unwrap();
        assert_eq!(
            cached.as_deref(),
            Some(&content[10..110]),
            "just written: in the page cache"
        );
        // At the end, a cached-only read says nothing (kernels 5.9 and 5.10 may say 0 early):
        // the read that may wait says it is the end.
        assert_eq!(read_piece(&file, size as u64, 10, true).unwrap(), None);
        assert_eq!(
            read_piece(&file, size as u64, 10, false).unwrap(),
            Some(bytes::Bytes::new())
        );
        for round in ["cached", "dropped from the cache"] {
            if round != "cached" {
                file.sync_all().unwrap();
                use std::os::fd::AsRawFd;
                nix::fcntl::posix_fadvise(
                    file.as_raw_fd(),
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                )
                .unwrap();
                assert_eq!(
                    read_piece(&file, 0, 4096, true).unwrap(),
                    None,
                    "not cached: left to the blocking pool"
                );
            }
            let whole = collect(store.read(&written.sha512, 0, u64::MAX).await.unwrap()).await;
            assert!(whole == content, "whole read, {round}");
            let start = READ_CHUNK as u64 - 7;
            let part = collect(store.read(&written.sha512, start, 1_050_000).await.unwrap()).await;
            assert!(
                part == content[start as usize..start as usize + 1_050_000],
                "ranged read across pieces, {round}"
            );
            let tail = collect(
                store
                    .read(&written.sha512, size as u64 - 5, 100)
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(
                tail,
                content[size - 5..],
                "a range past the end stops at it"
            );
        }
    }
}
