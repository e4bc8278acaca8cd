//! The `zfs` and `zpool` commands, behind a trait so the same code drives kernel ZFS and
//! `zfs-fuse` (and a test can see every command issued).

use std::process::{Child, Command, Stdio};

use crate::VolumeError;

pub trait Zfs: Send + Sync {
    /// Runs `program args...` (`program` is `zfs` or `zpool`) to completion; its stdout.
    fn run(&self, program: &str, args: &[&str]) -> Result<String, VolumeError>;

    /// Starts `program args...` with the given stdin and stdout (send and receive stream).
    fn spawn(
        &self,
        program: &str,
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Child, VolumeError>;
}

/// The real commands, from `PATH`.
#[derive(Debug, Default, Clone)]
pub struct ZfsCli;

impl Zfs for ZfsCli {
    fn run(&self, program: &str, args: &[&str]) -> Result<String, VolumeError> {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| VolumeError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(VolumeError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; "),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(
        &self,
        program: &str,
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Child, VolumeError> {
        Command::new(program)
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| VolumeError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: e.to_string(),
            })
    }
}
