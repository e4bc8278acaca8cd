//! In-place update of a host's daemon (`flynn-host update`): the new binary is put where the
//! running one is (the old one kept beside it for a rollback), then the daemon stops as it
//! would for SIGTERM, except that the router's listening sockets stay open, and the process
//! image is replaced by the new binary with the same arguments. The new image takes the
//! sockets up (their numbers in [`INHERIT_ENV`]): connections that arrived in between waited
//! in the sockets' queues and are served, none refused. The PID stays, so systemd (or
//! whatever started the daemon) sees no exit.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use flynn_router::server::Inherited;

use crate::error::ApiError;

/// `ADDR=FD,FD;ADDR=FD`: listening sockets handed from one process image to the next.
pub const INHERIT_ENV: &str = "FLYNN_INHERIT_LISTENERS";

/// Where the previous binary is kept for `flynn-host update --rollback`.
pub fn old_binary(exe: &Path) -> PathBuf {
    exe.with_file_name(format!(
        "{}.old",
        exe.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// Runs `binary version`; its output, or why it does not run here.
pub async fn binary_version(binary: &Path) -> Result<String, ApiError> {
    // A binary just written may be "busy" for a moment: a process this daemon forks in
    // the meantime (a job, `ip`, `nft`) holds a copy of the descriptor it was written
    // through until its exec closes it, and the kernel refuses to run a file open for
    // writing (an update under load was refused so, once in 19 runs with a CPU hog).
    let mut busy = 0;
    let out = loop {
        let ran = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::process::Command::new(binary).arg("version").output(),
        )
        .await
        .map_err(|_| ApiError::Invalid("the new binary did not answer `version` in 10 s".into()))?;
        match ran {
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) && busy < 40 => {
                busy += 1;
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            other => {
                break other.map_err(|e| {
                    ApiError::Invalid(format!("the new binary does not run here: {e}"))
                })?
            }
        }
    };
    if !out.status.success() {
        return Err(ApiError::Invalid(format!(
            "the new binary's `version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Puts `staged` in place of the running binary `exe`, which is kept as [`old_binary`].
pub fn swap_in(staged: &Path, exe: &Path) -> std::io::Result<()> {
    std::fs::rename(exe, old_binary(exe))?;
    if let Err(e) = std::fs::rename(staged, exe) {
        // Put the running binary back: a failed update changes nothing.
        let _ = std::fs::rename(old_binary(exe), exe);
        return Err(e);
    }
    Ok(())
}

/// Swaps the kept previous binary back in place of `exe` (which becomes the kept one).
pub fn swap_back(exe: &Path) -> std::io::Result<()> {
    let old = old_binary(exe);
    if !old.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no previous binary at {}", old.display()),
        ));
    }
    let tmp = exe.with_file_name(".flynn-host.rollback");
    std::fs::rename(exe, &tmp)?;
    std::fs::rename(&old, exe)?;
    std::fs::rename(&tmp, &old)
}

/// Replaces this process image by `exe` with the same arguments, handing it `listeners`.
/// Returns only if the exec failed.
pub fn exec(exe: &Path, listeners: &[(SocketAddr, std::net::TcpListener)]) -> std::io::Error {
    use std::os::fd::AsRawFd;
    let mut spec: std::collections::BTreeMap<SocketAddr, Vec<String>> = Default::default();
    for (addr, l) in listeners {
        // Kept open across exec: clear close-on-exec on this handle only.
        if let Err(e) = nix::fcntl::fcntl(
            l.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        ) {
            return std::io::Error::other(format!("keeping a listener open: {e}"));
        }
        spec.entry(*addr)
            .or_default()
            .push(l.as_raw_fd().to_string());
    }
    let spec: Vec<String> = spec
        .iter()
        .map(|(a, fds)| format!("{a}={}", fds.join(",")))
        .collect();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    tracing::info!(binary = %exe.display(), listeners = listeners.len(), "replacing the daemon in place");
    std::process::Command::new(exe)
        .args(args)
        .env(INHERIT_ENV, spec.join(";"))
        .exec()
}

/// The listening sockets the previous process image handed over (none on a normal start).
/// The variable is removed, so nothing started later sees it.
pub fn inherited_listeners() -> Inherited {
    let mut out = Inherited::new();
    let Some(spec) = std::env::var_os(INHERIT_ENV) else {
        return out;
    };
    // Read once, at start, before the router's threads exist.
    std::env::remove_var(INHERIT_ENV);
    for part in spec.to_string_lossy().split(';').filter(|p| !p.is_empty()) {
        let Some((addr, fds)) = part.split_once('=') else {
            continue;
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            continue;
        };
        for fd in fds.split(',').filter_map(|f| f.parse::<i32>().ok()) {
            if let Some(l) = adopt(fd) {
                out.entry(addr).or_default().push(l);
            }
        }
    }
    out
}

/// Takes up an inherited listening socket, if `fd` is one.
#[allow(unsafe_code)]
fn adopt(fd: i32) -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return None;
    }
    // It must be an open socket before this process claims it.
    let kind = nix::sys::stat::fstat(fd).ok()?;
    if kind.st_mode & libc_s_ifmt() != libc_s_ifsock() {
        return None;
    }
    // SAFETY: the number came from this process's previous image through INHERIT_ENV,
    // which kept that listening socket open across exec for exactly this; it is checked to
    // be an open socket above, and nothing else in this image owns it (the variable is read
    // once and removed).
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // Close-on-exec again: only a later update hands it on, explicitly.
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(l)
}

const fn libc_s_ifmt() -> u32 {
    0o170000
}

const fn libc_s_ifsock() -> u32 {
    0o140000
}
