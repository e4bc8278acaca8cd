//! Git over smart HTTP, as Flynn's gitreceive served it and as git's own
//! `http-backend` does: `GET /APP.git/info/refs?service=S` answers with the service's
//! advertisement, `POST /APP.git/S` with `S --stateless-rpc` fed the request body. This
//! crate has the protocol's pieces and the rule of which pushes deploy; the daemon's
//! `api/git.rs` serves them, and the `flynn` CLI's `git-hook` is the pre-receive hook.
//!
//! No I/O beyond making a repository and naming commands: the caller runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod deploy;

pub use deploy::{decide, Deploy, RefUpdate, Refusal};

/// The two services git clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// fetch and clone
    UploadPack,
    /// push
    ReceivePack,
}

impl Service {
    /// `git-upload-pack` or `git-receive-pack`, as in the URL and the `service` query.
    pub fn parse(name: &str) -> Option<Service> {
        match name {
            "git-upload-pack" => Some(Service::UploadPack),
            "git-receive-pack" => Some(Service::ReceivePack),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }

    /// git's subcommand: `upload-pack` or `receive-pack`.
    pub fn subcommand(self) -> &'static str {
        &self.name()[4..]
    }

    /// The content type of `info/refs`.
    pub fn advertisement_type(self) -> String {
        format!("application/x-{}-advertisement", self.name())
    }

    /// The content type a POST is sent with.
    pub fn request_type(self) -> String {
        format!("application/x-{}-request", self.name())
    }

    /// The content type of a POST's answer.
    pub fn result_type(self) -> String {
        format!("application/x-{}-result", self.name())
    }

    /// What `info/refs` starts with before git's own advertisement: the service line as
    /// one pkt-line, and a flush.
    pub fn advertisement_prefix(self) -> Vec<u8> {
        let mut out = pkt_line(&format!("# service={}\n", self.name()));
        out.extend_from_slice(b"0000");
        out
    }

    /// The git command serving this service on `repo`: the advertisement, or one
    /// stateless exchange (its request on stdin, its answer on stdout).
    pub fn command(self, git: &Path, repo: &Path, advertise: bool) -> Command {
        let mut cmd = git_command(git);
        cmd.arg(self.subcommand()).arg("--stateless-rpc");
        if advertise {
            cmd.arg("--advertise-refs");
        }
        cmd.arg(repo);
        cmd
    }
}

/// A git command that reads no user's or system's config: the server's repositories
/// behave the same on every host, whatever its root's `~/.gitconfig` says.
pub fn git_command(git: &Path) -> Command {
    let mut cmd = Command::new(git);
    cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1");
    cmd
}

/// One pkt-line: four hex digits of length (the four included), then the payload.
pub fn pkt_line(payload: &str) -> Vec<u8> {
    let mut out = format!("{:04x}", payload.len() + 4).into_bytes();
    out.extend_from_slice(payload.as_bytes());
    out
}

/// The repository name in a URL path segment: `APP.git` or `APP`.
pub fn app_of(segment: &str) -> &str {
    segment.strip_suffix(".git").unwrap_or(segment)
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("git {0} failed: {1}")]
    Git(String, String),
}

/// What the pre-receive hook of every repository runs: the program named by
/// `FLYNN_GIT_HOOK` in the environment receive-pack is started with. The repository keeps
/// no host's paths, so it may move between hosts.
pub const PRE_RECEIVE: &str = "#!/bin/sh\n\
# Installed by flynn-host: builds and deploys the pushed revision; a failure rejects the push.\n\
exec \"$FLYNN_GIT_HOOK\" git-hook pre-receive\n";

/// Makes `path` a bare repository, if it is not one already, and (re)applies the server's
/// settings and the pre-receive hook either way (a repository restored from a bundle has
/// neither).
pub fn init_bare(git: &Path, path: &Path) -> Result<(), RepoError> {
    if !path.join("HEAD").is_file() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| RepoError::Io(parent.into(), e))?;
        // Made aside and renamed, so a repository is never seen half made.
        let tmp = path.with_extension("git.new");
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            git_command(git)
                .args(["init", "--bare", "--quiet", "--initial-branch=main"])
                .arg(&tmp),
            "init",
        )?;
        std::fs::rename(&tmp, path).map_err(|e| RepoError::Io(path.into(), e))?;
    }
    for (k, v) in [
        // A force push redeploys (as on Heroku); deleting a branch is refused (the hook
        // says so first, in a clearer line).
        ("receive.denyNonFastForwards", "false"),
        ("receive.denyDeletes", "true"),
        // Objects of pushes arrive as packs and stay packs.
        ("receive.unpackLimit", "1"),
        // A large blob is streamed, never held whole in memory (git's default is 512 MB):
        // the service's memory stays flat whatever the repository holds.
        ("core.bigFileThreshold", "16m"),
        ("gc.auto", "0"),
        ("uploadpack.allowFilter", "true"),
    ] {
        run(
            git_command(git).arg("-C").arg(path).args(["config", k, v]),
            "config",
        )?;
    }
    install_hook(path)
}

fn install_hook(repo: &Path) -> Result<(), RepoError> {
    use std::os::unix::fs::PermissionsExt;
    let hooks = repo.join("hooks");
    std::fs::create_dir_all(&hooks).map_err(|e| RepoError::Io(hooks.clone(), e))?;
    let hook = hooks.join("pre-receive");
    let tmp = hooks.join(".pre-receive.new");
    std::fs::write(&tmp, PRE_RECEIVE).map_err(|e| RepoError::Io(tmp.clone(), e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| RepoError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, &hook).map_err(|e| RepoError::Io(hook, e))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), RepoError> {
    let out = cmd
        .output()
        .map_err(|e| RepoError::Git(what.into(), e.to_string()))?;
    if !out.status.success() {
        return Err(RepoError::Git(
            what.into(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_the_advertisement_starts_with_the_service_line() {
        let p = Service::ReceivePack.advertisement_prefix();
        assert_eq!(p, b"001f# service=git-receive-pack\n0000");
        assert_eq!(Service::parse("git-upload-pack"), Some(Service::UploadPack));
        assert_eq!(Service::parse("git-upload-archive"), None);
        assert_eq!(Service::UploadPack.subcommand(), "upload-pack");
        assert_eq!(app_of("web.git"), "web");
        assert_eq!(app_of("web"), "web");
    }

    #[test]
    fn t11_a_bare_repository_gets_the_hook_and_keeps_its_objects() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repos/web-3.git");
        let git = Path::new("git");
        init_bare(git, &repo).unwrap();
        let hook = std::fs::read_to_string(repo.join("hooks/pre-receive")).unwrap();
        assert_eq!(hook, PRE_RECEIVE);
        // Made again, it is left as it was, with the hook put back.
        std::fs::write(repo.join("marker"), "kept").unwrap();
        std::fs::remove_file(repo.join("hooks/pre-receive")).unwrap();
        init_bare(git, &repo).unwrap();
        assert!(repo.join("marker").is_file());
        assert!(repo.join("hooks/pre-receive").is_file());
        assert!(!repo.with_extension("git.new").exists());
    }
}
