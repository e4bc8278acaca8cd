//! The tar archives of cluster backups and app exports, written and read as streams: an
//! archive is never held whole in memory or spooled to disk. Every entry's SHA-512 and size
//! go into `MANIFEST.json`, the last entry, so a reader can refuse a truncated or corrupted
//! archive (naming the entry) before it acts on any of it.
//!
//! Plain POSIX tar with GNU long names, so `tar tvf backup.tar` lists it and `tar xf`
//! unpacks it.

use std::collections::BTreeMap;
use std::io;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// The manifest's entry name; always last.
pub const MANIFEST: &str = "MANIFEST.json";
const BLOCK: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySum {
    pub name: String,
    pub size: u64,
    pub sha512: String,
}

/// What every archive's manifest holds, plus what its kind adds (`extra`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `cluster-backup` or `app-export`.
    pub kind: String,
    pub format: u32,
    /// The flynn-host version that wrote it.
    pub version: String,
    pub created_ms: u64,
    pub entries: Vec<EntrySum>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

pub const FORMAT: u32 = 1;

/// Writes an archive into a channel of byte chunks (an HTTP response body). A send fails
/// when the reader went away, which stops the writer.
pub struct TarWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    entries: Vec<EntrySum>,
    /// Bytes written so far.
    pub written: u64,
}

/// Bytes of a volume stream per archive entry: tar needs each entry's size up front and a
/// `zfs send` stream's is unknown, so it is cut into entries of at most this much, each
/// buffered once.
pub const CHUNK: usize = 16 * 1024 * 1024;

impl TarWriter {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        TarWriter {
            tx,
            entries: Vec::new(),
            written: 0,
        }
    }

    async fn send(&mut self, b: Bytes) -> io::Result<()> {
        self.written += b.len() as u64;
        self.tx
            .send(Ok(b))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }

    /// Ends the stream with an error, so the reader sees a broken transfer, never a short
    /// archive that looks whole.
    pub async fn fail(self, why: String) {
        let _ = self.tx.send(Err(io::Error::other(why))).await;
    }

    async fn header(&mut self, name: &str, size: u64) -> io::Result<()> {
        let mut out = BytesMut::new();
        if name.len() > 100 {
            // GNU long name: an `L` entry holding the name, then the real header.
            let mut long = name.as_bytes().to_vec();
            long.push(0);
            out.extend_from_slice(&raw_header("././@LongLink", long.len() as u64, b'L'));
            out.extend_from_slice(&long);
            out.extend_from_slice(&vec![0; padding(long.len() as u64)]);
        }
        out.extend_from_slice(&raw_header(name, size, b'0'));
        self.send(out.freeze()).await
    }

    /// One entry from bytes in hand.
    pub async fn bytes(&mut self, name: &str, data: Bytes) -> io::Result<()> {
        let size = data.len() as u64;
        let sha = hex_sha512(&data);
        self.header(name, size).await?;
        self.send(data).await?;
        self.pad(size).await?;
        self.entries.push(EntrySum {
            name: name.into(),
            size,
            sha512: sha,
        });
        Ok(())
    }

    /// One entry of exactly `size` bytes from a stream, hashed on the way; a stream that
    /// ends early or runs long fails the archive.
    pub async fn stream<S>(&mut self, name: &str, size: u64, mut data: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        self.header(name, size).await?;
        let mut hash = ring::digest::Context::new(&ring::digest::SHA512);
        let mut seen = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > size {
                return Err(io::Error::other(format!(
                    "{name}: more than the {size} bytes recorded"
                )));
            }
            hash.update(&chunk);
            self.send(chunk).await?;
        }
        if seen != size {
            return Err(io::Error::other(format!(
                "{name}: {seen} bytes, not the {size} recorded"
            )));
        }
        self.pad(size).await?;
        self.entries.push(EntrySum {
            name: name.into(),
            size,
            sha512: crate::blobstore::store::hex(hash.finish().as_ref()),
        });
        Ok(())
    }

    /// A stream of unknown length as entries `PREFIX/000000`, `PREFIX/000001`, ... of at
    /// most [`CHUNK`] bytes (at least one entry, maybe empty). Returns the bytes written.
    pub async fn chunked<S>(&mut self, prefix: &str, mut data: S) -> io::Result<u64>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        let mut total = 0u64;
        let mut seq = 0u32;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut done = false;
        loop {
            while !done && buf.len() < CHUNK {
                match data.next().await {
                    Some(chunk) => buf.extend_from_slice(&chunk?),
                    None => done = true,
                }
            }
            let take = buf.len().min(CHUNK);
            if take == 0 && seq > 0 {
                break;
            }
            let piece = buf.split_to(take).freeze();
            total += piece.len() as u64;
            self.bytes(&format!("{prefix}/{seq:06}"), piece).await?;
            seq += 1;
            if done && buf.is_empty() {
                break;
            }
        }
        Ok(total)
    }

    async fn pad(&mut self, size: u64) -> io::Result<()> {
        let n = padding(size);
        if n > 0 {
            self.send(Bytes::from(vec![0u8; n])).await?;
        }
        Ok(())
    }

    /// Writes the manifest (every entry so far) and the end-of-archive blocks.
    pub async fn finish(
        mut self,
        kind: &str,
        extra: BTreeMap<String, serde_json::Value>,
    ) -> io::Result<Manifest> {
        let manifest = Manifest {
            kind: kind.into(),
            format: FORMAT,
            version: crate::version().into(),
            created_ms: crate::now_ms(),
            entries: std::mem::take(&mut self.entries),
            extra,
        };
        let body = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        let size = body.len() as u64;
        self.header(MANIFEST, size).await?;
        self.send(Bytes::from(body)).await?;
        self.pad(size).await?;
        self.send(Bytes::from(vec![0u8; 2 * BLOCK])).await?;
        Ok(manifest)
    }
}

fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

fn raw_header(name: &str, size: u64, kind: u8) -> [u8; BLOCK] {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.as_bytes();
        let len = n.len().min(old.name.len());
        old.name[..len].copy_from_slice(&n[..len]);
    }
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(crate::now_ms() / 1000);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    let mut out = [0u8; BLOCK];
    out.copy_from_slice(h.as_bytes());
    out
}

pub fn hex_sha512(data: &[u8]) -> String {
    crate::blobstore::store::hex(ring::digest::digest(&ring::digest::SHA512, data).as_ref())
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the archive is truncated: {0}")]
    Truncated(String),
    #[error("the archive is corrupted: {0}")]
    Corrupted(String),
}

/// Reads an archive entry by entry: `next` gives an entry's name and size, then `read`
/// (or nothing: `next` skips what was not read).
pub struct TarReader<R> {
    r: R,
    /// Bytes of the current entry not yet read, then its padding.
    remaining: u64,
    pad: usize,
    /// The last entry's name, for errors.
    pub last: Option<String>,
}

impl<R: AsyncRead + Unpin> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            remaining: 0,
            pad: 0,
            last: None,
        }
    }

    async fn skip(&mut self, mut n: u64) -> Result<(), ArchiveError> {
        let mut buf = vec![0u8; 64 * 1024];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.r.read(&mut buf[..want]).await?;
            if got == 0 {
                return Err(self.truncated());
            }
            n -= got as u64;
        }
        Ok(())
    }

    fn truncated(&self) -> ArchiveError {
        ArchiveError::Truncated(match &self.last {
            Some(l) => format!("it ends inside or after entry {l:?}"),
            None => "it ends before its first entry".into(),
        })
    }

    async fn block(&mut self) -> Result<Option<[u8; BLOCK]>, ArchiveError> {
        let mut b = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            let n = self.r.read(&mut b[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(self.truncated())
                };
            }
            got += n;
        }
        Ok(Some(b))
    }

    /// The next entry's name and size; `None` at the end of the archive.
    pub async fn next(&mut self) -> Result<Option<(String, u64)>, ArchiveError> {
        let rest = self.remaining + self.pad as u64;
        self.skip(rest).await?;
        self.remaining = 0;
        self.pad = 0;
        let mut long_name: Option<String> = None;
        loop {
            let Some(b) = self.block().await? else {
                return Err(self.truncated());
            };
            if b.iter().all(|x| *x == 0) {
                return Ok(None);
            }
            let h = tar::Header::from_byte_slice(&b);
            let cksum_ok = h.cksum().ok() == Some(checksum(&b));
            if !cksum_ok {
                return Err(ArchiveError::Corrupted(match &self.last {
                    Some(entry) => format!("the header after entry {entry} fails its checksum"),
                    None => "its first header fails its checksum (it is no tar archive)".into(),
                }));
            }
            let size = h
                .entry_size()
                .map_err(|e| ArchiveError::Corrupted(e.to_string()))?;
            let kind = h.entry_type();
            if kind.is_gnu_longname() {
                if size > 4096 {
                    return Err(ArchiveError::Corrupted("a name longer than 4 KiB".into()));
                }
                let mut name = vec![0u8; size as usize];
                self.r
                    .read_exact(&mut name)
                    .await
                    .map_err(|_| self.truncated())?;
                self.skip(padding(size) as u64).await?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                long_name = Some(String::from_utf8_lossy(&name).into_owned());
                continue;
            }
            let name = long_name
                .take()
                .unwrap_or_else(|| String::from_utf8_lossy(&h.path_bytes()).into_owned());
            self.remaining = size;
            self.pad = padding(size);
            self.last = Some(name.clone());
            if !kind.is_file() {
                // Directories and the like carry nothing this reader wants.
                continue;
            }
            return Ok(Some((name, size)));
        }
    }

    /// Reads the rest of the archive and discards it: a refusal answered before the sender
    /// finished would otherwise reach it as a broken connection, not as the reason.
    pub async fn drain(&mut self) {
        while let Ok(Some(_)) = self.next().await {}
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(self.r.read(&mut buf).await, Ok(n) if n > 0) {}
    }

    /// Up to `buf.len()` bytes of the current entry; 0 at its end.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.remaining) as usize;
        let n = self.r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(self.truncated());
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// The rest of the current entry, whole (for small entries: the state, the manifest).
    pub async fn read_all(&mut self, limit: u64) -> Result<Vec<u8>, ArchiveError> {
        if self.remaining > limit {
            return Err(ArchiveError::Corrupted(format!(
                "entry {:?} is {} bytes, more than the {limit} allowed",
                self.last.as_deref().unwrap_or(""),
                self.remaining
            )));
        }
        let mut out = vec![0u8; self.remaining as usize];
        let mut at = 0;
        while at < out.len() {
            let n = self.read(&mut out[at..]).await?;
            at += n;
        }
        Ok(out)
    }

    /// The rest of the current entry as chunks, hashed: `(chunk, done)` pairs through
    /// `f`, then the entry's SHA-512.
    pub async fn for_each_chunk<F, Fut>(&mut self, mut f: F) -> Result<String, ArchiveError>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: std::future::Future<Output = Result<(), ArchiveError>>,
    {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA512);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = self.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            f(Bytes::copy_from_slice(&buf[..n])).await?;
        }
        Ok(crate::blobstore::store::hex(hash.finish().as_ref()))
    }
}

fn checksum(b: &[u8; BLOCK]) -> u32 {
    b.iter()
        .enumerate()
        .map(|(i, x)| {
            if (148..156).contains(&i) {
                32
            } else {
                *x as u32
            }
        })
        .sum()
}

/// Reads a whole archive once, checking every entry against the manifest at its end:
/// missing, extra, resized or changed entries and a missing manifest are refused, naming
/// the entry. Returns the manifest and the small entries `keep` asks for.
pub async fn verify<R: AsyncRead + Unpin>(
    r: R,
    keep: impl Fn(&str) -> bool,
    mut progress: impl FnMut(u64),
) -> Result<(Manifest, BTreeMap<String, Vec<u8>>), ArchiveError> {
    let mut reader = TarReader::new(r);
    let mut seen: Vec<EntrySum> = Vec::new();
    let mut kept = BTreeMap::new();
    let mut manifest: Option<Manifest> = None;
    let mut total = 0u64;
    while let Some((name, size)) = reader.next().await? {
        if manifest.is_some() {
            return Err(ArchiveError::Corrupted(format!(
                "entry {name:?} follows the manifest"
            )));
        }
        if name == MANIFEST {
            let body = reader.read_all(256 * 1024 * 1024).await?;
            manifest = Some(serde_json::from_slice(&body).map_err(|e| {
                ArchiveError::Corrupted(format!("{MANIFEST} is not a manifest: {e}"))
            })?);
            continue;
        }
        let sha = if keep(&name) {
            let body = reader.read_all(1024 * 1024 * 1024).await?;
            let sha = hex_sha512(&body);
            kept.insert(name.clone(), body);
            sha
        } else {
            reader
                .for_each_chunk(|c| {
                    total += c.len() as u64;
                    progress(total);
                    async { Ok(()) }
                })
                .await?
        };
        seen.push(EntrySum {
            name,
            size,
            sha512: sha,
        });
    }
    let manifest = manifest.ok_or_else(|| {
        ArchiveError::Truncated(format!(
            "it has no {MANIFEST} (the last entry is {:?})",
            reader.last.as_deref().unwrap_or("none")
        ))
    })?;
    let listed: BTreeMap<&str, &EntrySum> = manifest
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    for e in &seen {
        match listed.get(e.name.as_str()) {
            None => {
                return Err(ArchiveError::Corrupted(format!(
                    "entry {:?} is not in the manifest",
                    e.name
                )))
            }
            Some(l) if l.size != e.size || l.sha512 != e.sha512 => {
                return Err(ArchiveError::Corrupted(format!(
                    "entry {:?} does not match its manifest sum ({} bytes, sha512 {}…)",
                    e.name,
                    e.size,
                    &e.sha512[..16]
                )))
            }
            Some(_) => {}
        }
    }
    if seen.len() != manifest.entries.len() {
        let have: std::collections::BTreeSet<&str> = seen.iter().map(|e| e.name.as_str()).collect();
        let missing = manifest
            .entries
            .iter()
            .find(|e| !have.contains(e.name.as_str()))
            .map(|e| e.name.clone())
            .unwrap_or_default();
        return Err(ArchiveError::Corrupted(format!(
            "entry {missing:?} is in the manifest but not in the archive"
        )));
    }
    Ok((manifest, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(4);
        let owned: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect();
        let writer = tokio::spawn(async move {
            let mut w = TarWriter::new(tx);
            for (name, data) in owned {
                let len = data.len() as u64;
                let s = futures::stream::iter(
                    data.chunks(1000)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect::<Vec<_>>(),
                );
                w.stream(&name, len, s).await.unwrap();
            }
            w.finish("test", BTreeMap::new()).await.unwrap();
        });
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b.unwrap());
        }
        writer.await.unwrap();
        out
    }

    fn long_name() -> String {
        format!("blobs/layers/{}.tar", "ab".repeat(64))
    }

    #[tokio::test]
    async fn t01_an_archive_reads_back_entry_by_entry_and_verifies() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let tar = archive(&[
            ("state.json", b"{}".to_vec()),
            (&long_name(), big.clone()),
            ("empty", Vec::new()),
        ])
        .await;
        let (m, kept) = verify(&tar[..], |n| n == "state.json", |_| {})
            .await
            .unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(kept["state.json"], b"{}");
        let mut r = TarReader::new(&tar[..]);
        assert_eq!(r.next().await.unwrap(), Some(("state.json".into(), 2)));
        // Not reading an entry skips it.
        assert_eq!(
            r.next().await.unwrap(),
            Some((long_name(), big.len() as u64))
        );
        assert_eq!(r.read_all(u64::MAX).await.unwrap(), big);
        assert_eq!(r.next().await.unwrap(), Some(("empty".into(), 0)));
        assert_eq!(r.next().await.unwrap().unwrap().0, MANIFEST);
        assert_eq!(r.next().await.unwrap(), None);
        // Standard tar reads it too.
        let mut std_tar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = std_tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names[1], long_name());
    }

    #[tokio::test]
    async fn t02_truncated_and_corrupted_archives_are_refused_naming_the_entry() {
        let big: Vec<u8> = vec![7; 100_000];
        let tar = archive(&[("state.json", b"{}".to_vec()), ("blobs/a", big)]).await;
        // Cut inside an entry, and cut before the manifest.
        for cut in [3000, tar.len() - 2048] {
            let e = verify(&tar[..cut], |_| false, |_| {}).await.unwrap_err();
            assert!(matches!(e, ArchiveError::Truncated(_)), "{cut}: {e}");
        }
        // One byte of an entry changed.
        let mut bad = tar.clone();
        bad[BLOCK * 3 + 10] ^= 1;
        let e = verify(&bad[..], |_| false, |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("\"blobs/a\""), "{e}");
        // A header changed.
        let mut bad = tar.clone();
        bad[5] ^= 1;
        let e = verify(&bad[..], |_| false, |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[tokio::test]
    async fn t03_a_stream_of_unknown_length_is_cut_into_chunks() {
        let (tx, mut rx) = mpsc::channel(4);
        let data: Vec<u8> = (0..(CHUNK * 2 + 5)).map(|i| (i % 13) as u8).collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            let mut w = TarWriter::new(tx);
            let s = futures::stream::iter(
                d2.chunks(65536)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>(),
            );
            let n = w.chunked("volumes/v1", s).await.unwrap();
            w.finish("test", BTreeMap::new()).await.unwrap();
            n
        });
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b.unwrap());
        }
        assert_eq!(writer.await.unwrap(), data.len() as u64);
        let mut r = TarReader::new(&out[..]);
        let mut back = Vec::new();
        let mut names = Vec::new();
        while let Some((name, _)) = r.next().await.unwrap() {
            if name == MANIFEST {
                continue;
            }
            names.push(name);
            back.extend(r.read_all(u64::MAX).await.unwrap());
        }
        assert_eq!(
            names,
            [
                "volumes/v1/000000",
                "volumes/v1/000001",
                "volumes/v1/000002"
            ]
        );
        assert_eq!(back, data);
    }
}
