//! Image layers unpacked once per host: `<layers>/<sha512>/` is a layer's tree, ready to be
//! an overlayfs lower directory. A layer is unpacked into a temporary directory and renamed
//! into place only once its SHA-512 matched, so a half-unpacked or corrupt layer is never
//! used. Docker/OCI whiteouts become overlayfs whiteouts (`.wh.NAME` a 0:0 character
//! device, `.wh..wh..opq` the `trusted.overlay.opaque` attribute).

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flynn_model::LayerCompression;

use crate::Error;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Where a host keeps its unpacked layers.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

impl LayerStore {
    pub fn open(root: PathBuf) -> Result<Self, Error> {
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        // Unpacks that a crash interrupted are never used; sweep them.
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(LayerStore { root })
    }

    pub fn path(&self, sha512: &str) -> PathBuf {
        self.root.join(sha512)
    }

    pub fn has(&self, sha512: &str) -> bool {
        self.path(sha512).is_dir()
    }

    /// Unpacks a layer read from `stored` (its bytes as stored, compressed or not) unless it
    /// is already here; checks the bytes against `sha512` first.
    pub fn ensure(
        &self,
        sha512: &str,
        compression: LayerCompression,
        stored: impl Read,
    ) -> Result<PathBuf, Error> {
        if !sha512.bytes().all(|b| b.is_ascii_hexdigit()) || sha512.len() != 128 {
            return Err(Error::Layer(format!("{sha512:?} is not a SHA-512")));
        }
        let dest = self.path(sha512);
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = self
            .root
            .join(format!(".tmp-{}-{}", &sha512[..16], std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let result = unpack_checked(&tmp, sha512, compression, stored);
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dest) {
            Ok(()) => Ok(dest),
            // Another job unpacked the same layer meanwhile: theirs is as good.
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(dest)
            }
            Err(e) => Err(Error::io(&dest, e)),
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    ctx: ring::digest::Context,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unpack_checked(
    dest: &Path,
    sha512: &str,
    compression: LayerCompression,
    stored: impl Read,
) -> Result<(), Error> {
    let mut hashing = Hashing {
        inner: BufReader::new(stored),
        ctx: ring::digest::Context::new(&ring::digest::SHA512),
    };
    {
        let tar_stream: Box<dyn Read + '_> = match compression {
            LayerCompression::None => Box::new(&mut hashing),
            LayerCompression::Gzip => Box::new(flate2::read::GzDecoder::new(&mut hashing)),
            LayerCompression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut hashing)
                    .map_err(|e| Error::Layer(format!("not a zstd stream: {e}")))?,
            ),
        };
        unpack_tar(tar_stream, dest)?;
    }
    // The tar reader stops at its end marker; the digest covers every stored byte.
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| Error::Layer(format!("reading the layer: {e}")))?;
    let got = hex(hashing.ctx.finish().as_ref());
    if got != sha512 {
        return Err(Error::Layer(format!(
            "layer checksum mismatch: expected sha512 {}…, got {}…",
            &sha512[..16],
            &got[..16]
        )));
    }
    Ok(())
}

fn unpack_tar(stream: impl Read, dest: &Path) -> Result<(), Error> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    let entries = archive
        .entries()
        .map_err(|e| Error::Layer(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Layer(format!("corrupt layer: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| Error::Layer(format!("bad path in layer: {e}")))?
            .into_owned();
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(Error::Layer(format!(
                "layer entry {} leaves the image",
                path.display()
            )));
        }
        // The image root itself (`./`) exists already.
        let Some(rel) = safe_relative(&path) else {
            continue;
        };
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if name == OPAQUE {
            fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
            xattr::set(&parent, "trusted.overlay.opaque", b"y")
                .map_err(|e| Error::io(&parent, e))?;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
            let target = parent.join(hidden);
            let _ = fs::remove_file(&target);
            nix::sys::stat::mknod(
                &target,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(|e| Error::io(&target, e.into()))?;
        } else {
            entry.unpack_in(dest).map_err(|e| {
                Error::Layer(format!("unpacking {}: {}", path.display(), chain(&e)))
            })?;
        }
    }
    Ok(())
}

/// An error with its causes (tar's own message hides the OS error).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// The entry's path relative to the image root, or `None` if it would leave it.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The SHA-512 (hex) of a file's bytes.
pub fn sha512_file(path: &Path) -> io::Result<String> {
    let mut r = Hashing {
        inner: BufReader::new(fs::File::open(path)?),
        ctx: ring::digest::Context::new(&ring::digest::SHA512),
    };
    io::copy(&mut r, &mut io::sink())?;
    Ok(hex(r.ctx.finish().as_ref()))
}

/// How a layer's bytes are compressed, from their first bytes.
pub fn sniff_compression(head: &[u8]) -> LayerCompression {
    match head {
        [0x1f, 0x8b, ..] => LayerCompression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => LayerCompression::Zstd,
        _ => LayerCompression::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        let raw = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA512, bytes).as_ref())
    }

    #[test]
    fn t10_layers_unpack_once_after_their_checksum_matches() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        let bytes = layer(&[("bin/app", b"#!/bin/sh\n"), ("etc/.wh.old", b"")]);
        assert_eq!(sniff_compression(&bytes), LayerCompression::Gzip);
        let digest = sha(&bytes);

        // A corrupt copy (one byte changed) is refused and leaves nothing behind.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = store
            .ensure(&digest, LayerCompression::Gzip, &bad[..])
            .unwrap_err();
        assert!(err.to_string().contains("layer"), "{err}");
        assert!(!store.has(&digest));
        assert_eq!(fs::read_dir(dir.path().join("layers")).unwrap().count(), 0);

        let path = store
            .ensure(&digest, LayerCompression::Gzip, &bytes[..])
            .unwrap();
        assert_eq!(fs::read(path.join("bin/app")).unwrap(), b"#!/bin/sh\n");
        // The whiteout became an overlayfs whiteout: a 0:0 character device.
        use std::os::unix::fs::FileTypeExt;
        let wh = fs::symlink_metadata(path.join("etc/old")).unwrap();
        assert!(wh.file_type().is_char_device());
        // Already there: the reader is not even consulted.
        store
            .ensure(&digest, LayerCompression::Gzip, io::empty())
            .unwrap();
    }

    #[test]
    fn t11_entries_leaving_the_image_are_refused() {
        assert_eq!(safe_relative(Path::new("../etc/passwd")), None);
        assert_eq!(
            safe_relative(Path::new("./a/b")),
            Some(PathBuf::from("a/b"))
        );
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path().to_path_buf()).unwrap();
        let junk = b"this is not a layer at all".repeat(40);
        let err = store
            .ensure(&sha(&junk), LayerCompression::Gzip, &junk[..])
            .unwrap_err();
        assert!(err.to_string().contains("layer"), "{err}");
    }
}
