//! Network namespaces by path, as `ip netns add` and `ip netns del` make and remove them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::rtnl::Rtnl;
use crate::{sys, Error, Result};

/// A new network namespace, held by a bind mount at its path (so it outlives every
/// process in it, until [`delete_netns`]), with rtnetlink inside it.
pub struct Netns {
    fd: OwnedFd,
    rtnl: Rtnl,
}

impl Netns {
    /// Makes a network namespace at `path` (e.g. `/run/netns/NAME`); fails if one is there.
    ///
    /// The namespace is made by a short-lived thread (`unshare` moves only the calling
    /// thread), which also opens the rtnetlink socket that configures it from outside.
    pub fn create(path: &Path) -> Result<Netns> {
        let step = |what: &str| format!("{what} {}", path.display());
        if let Some(dir) = path.parent() {
            share_mounts_under(dir).map_err(|e| Error::new(step("sharing mounts under"), e))?;
        }
        // The mount point: an empty file no one may open for writing.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(path)
            .map_err(|e| Error::new(step("making the namespace file"), e))?;
        let made = std::thread::scope(|s| {
            let thread = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || -> Result<(OwnedFd, Rtnl)> {
                    let own = Path::new("/proc/thread-self/ns/net");
                    sys::unshare_net().map_err(|e| Error::new("unsharing the network", e))?;
                    sys::mount(own, path, None, libc::MS_BIND)
                        .map_err(|e| Error::new(step("bind-mounting the namespace on"), e))?;
                    let fd = std::fs::File::open(own)
                        .map_err(|e| Error::new(step("opening the namespace"), e))?;
                    Ok((fd.into(), Rtnl::open()?))
                });
            match thread {
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(Error::new(
                        step("making the namespace"),
                        io::Error::other("its thread panicked"),
                    ))
                }),
                // A thread limit reached: an error for this job, not a panic.
                Err(e) => Err(Error::new(step("starting the thread that makes"), e)),
            }
        });
        match made {
            Ok((fd, rtnl)) => Ok(Netns { fd, rtnl }),
            Err(e) => {
                let _ = delete_netns(path);
                Err(e)
            }
        }
    }

    /// The namespace itself, as an open file (for a veth's peer, or `setns`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// rtnetlink inside the namespace.
    pub fn rtnl(&mut self) -> &mut Rtnl {
        &mut self.rtnl
    }
}

/// Removes the namespace at `path`: its bind mount, then its file. The namespace itself
/// goes once no process or open file holds it.
pub fn delete_netns(path: &Path) -> Result<()> {
    match sys::unmount_detach(path) {
        Ok(()) => {}
        // Not mounted (a file left half made): the file still goes.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(Error::new(format!("unmounting {}", path.display()), e)),
    }
    std::fs::remove_file(path).map_err(|e| Error::new(format!("removing {}", path.display()), e))
}

/// Makes `dir` a shared mount (a bind mount of itself first if it is no mount point), as
/// `ip netns add` does: a namespace mounted there later then shows in mount namespaces
/// copied before it was made.
///
/// Done once per directory and process, under a lock: with `MS_REC` it walks every
/// namespace mounted there, and two first calls at once could each bind-mount the
/// directory, hiding the namespaces mounted on the lower one.
fn share_mounts_under(dir: &Path) -> io::Result<()> {
    static SHARED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if shared.iter().any(|d| d == dir) {
        return Ok(());
    }
    make_shared(dir)?;
    shared.push(dir.to_path_buf());
    Ok(())
}

fn make_shared(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let shared = libc::MS_SHARED | libc::MS_REC;
    match sys::mount(Path::new("none"), dir, None, shared) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            sys::mount(dir, dir, None, libc::MS_BIND | libc::MS_REC)?;
            sys::mount(Path::new("none"), dir, None, shared)
        }
        done => done,
    }
}
