//! `git push flynn main`, the CLI's side: the pre-receive hook the cluster's git server
//! runs (`flynn git-hook pre-receive`), the credential helper git asks for the controller
//! key (`flynn git-credentials`), the git settings `flynn cluster add` makes, the `flynn`
//! remote, and the app a checkout's remote names.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use flynn_client::ControllerClient;

use crate::flynnrc::{Cluster, FlynnRc};

/// The git server's base URL for a cluster: `https://git.DOMAIN` for a cluster added by
/// its domain, else the controller's own address (every host's API serves git too).
pub fn base_url(cluster: &Cluster) -> String {
    match cluster.url.strip_prefix("https://controller.") {
        Some(domain) => format!("https://git.{domain}"),
        None => cluster.url.clone(),
    }
}

/// The repository URL of `app` on `cluster`.
pub fn repo_url(cluster: &Cluster, app: &str) -> String {
    format!("{}/{app}.git", base_url(cluster))
}

fn git() -> Command {
    Command::new(std::env::var_os("FLYNN_GIT").unwrap_or_else(|| "git".into()))
}

fn git_out(args: &[&str]) -> Option<String> {
    let out = git().args(args).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn git_run(args: &[&str]) -> anyhow::Result<()> {
    let out = git()
        .args(args)
        .output()
        .context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether the current directory is inside a git checkout.
pub fn in_checkout() -> bool {
    git_out(&["rev-parse", "--is-inside-work-tree"]).as_deref() == Some("true")
}

/// The app named by this checkout's remotes that point at `cluster`: the `flynn` remote's
/// first, else the only one.
pub fn app_from_remote(cluster: &Cluster) -> anyhow::Result<Option<String>> {
    let Some(listed) = git_out(&["config", "--get-regexp", r"^remote\..*\.url$"]) else {
        return Ok(None);
    };
    let prefix = format!("{}/", base_url(cluster));
    let mut apps: Vec<(String, String)> = listed
        .lines()
        .filter_map(|line| {
            let (key, url) = line.split_once(' ')?;
            let remote = key.strip_prefix("remote.")?.strip_suffix(".url")?;
            let app = url.trim().strip_prefix(&prefix)?;
            let app = app.trim_end_matches('/').trim_end_matches(".git");
            Some((remote.to_string(), app.to_string()))
        })
        .collect();
    if let Some((_, app)) = apps.iter().find(|(r, _)| r == "flynn") {
        return Ok(Some(app.clone()));
    }
    apps.dedup_by(|a, b| a.1 == b.1);
    match apps.as_slice() {
        [] => Ok(None),
        [(_, app)] => Ok(Some(app.clone())),
        _ => bail!("this checkout has remotes for several apps: use -a APP"),
    }
}

/// Adds (or points) `remote` at `app`'s repository on `cluster`.
pub fn add_remote(cluster: &Cluster, app: &str, remote: &str) -> anyhow::Result<()> {
    let url = repo_url(cluster, app);
    if git_out(&["remote", "get-url", remote]).is_some() {
        git_run(&["remote", "set-url", remote, &url])?;
    } else {
        git_run(&["remote", "add", remote, &url])?;
    }
    println!("Remote {remote} is {url}");
    Ok(())
}

/// What `flynn cluster add` sets in git's global config for the cluster's git server: the
/// credential helper, trust in the cluster's certificate (written to `ca_file`), and, for a
/// cluster reached by `--ip`, where its name resolves.
pub fn configure(cluster: &Cluster, ca_pem: Option<&str>, ca_file: &Path) -> anyhow::Result<()> {
    if git_out(&["--version"]).is_none() {
        eprintln!("git is not installed: `git push` to this cluster needs it");
        return Ok(());
    }
    let base = base_url(cluster);
    let exe = std::env::current_exe().context("the flynn binary's path")?;
    let helper = format!("{} git-credentials", exe.display());
    git_run(&[
        "config",
        "--global",
        "--replace-all",
        &format!("credential.{base}.helper"),
        &helper,
    ])?;
    if let Some(pem) = ca_pem {
        if let Some(dir) = ca_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(ca_file, pem)?;
        git_run(&[
            "config",
            "--global",
            &format!("http.{base}/.sslCAInfo"),
            &ca_file.to_string_lossy(),
        ])?;
    }
    if let (Some(ip), Some(host)) = (cluster.ip, base.strip_prefix("https://")) {
        git_run(&[
            "config",
            "--global",
            "--replace-all",
            &format!("http.{base}/.curloptResolve"),
            &format!("{host}:443:{ip}"),
        ])?;
    }
    Ok(())
}

/// The certificate git must trust for the cluster's git server: the one serving its name.
pub async fn ca_pem(
    client: &ControllerClient,
    cluster: &Cluster,
) -> anyhow::Result<Option<String>> {
    let Some(host) = base_url(cluster)
        .strip_prefix("https://")
        .map(str::to_string)
    else {
        return Ok(None);
    };
    let certs = client.certificates().await?;
    Ok(certs
        .into_iter()
        .find(|c| c.domains.contains(&host))
        .map(|c| c.cert_pem))
}

/// `flynn git-credentials get|store|erase`: git's credential helper protocol. For a
/// cluster's git server it answers the controller key as the password; store and erase
/// have nothing to do (the key lives in flynnrc).
pub fn credentials(rc: &FlynnRc, action: &str) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    if action != "get" {
        return Ok(());
    }
    let field = |k: &str| {
        input
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    let asked = format!("{}://{}", field("protocol"), field("host"));
    if let Some(c) = rc.clusters.iter().find(|c| base_url(c) == asked) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "username=flynn")?;
        writeln!(out, "password={}", c.key)?;
    }
    Ok(())
}

/// `flynn git-hook pre-receive`: run by the app's repository on its git host for every
/// push. Checks which branch it deploys, checks out the pushed revision, then builds and
/// deploys it as `flynn deploy DIR` does; anything that fails rejects the push. Its output
/// is the pusher's `remote:` lines.
pub async fn pre_receive() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let refused = var("FLYNN_GIT_REFUSE");
    if !refused.is_empty() {
        bail!("{refused}");
    }
    let app = var("FLYNN_GIT_APP");
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let updates = flynn_git::deploy::parse_updates(&input)?;
    let fixed = var("FLYNN_GIT_BRANCH");
    let fixed = (!fixed.is_empty()).then_some(fixed.as_str());
    let Some(deploy) = flynn_git::decide(&updates, fixed)? else {
        return Ok(());
    };
    let short = &deploy.rev[..deploy.rev.len().min(12)];
    eprintln!("-----> Building {app} from {} at {short}", deploy.branch);
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir()?;
    checkout(&deploy.rev, dir.path())?;
    let checkout_ms = started.elapsed().as_millis();
    let client = ControllerClient::new(&var("FLYNN_GIT_URL"), &var("FLYNN_GIT_KEY"));
    let t = crate::jobs::deploy_dir(&client, &app, dir.path(), false).await?;
    std::fs::write(var("FLYNN_GIT_RESULT"), &deploy.branch)
        .context("recording the deployed branch")?;
    eprintln!("-----> {app} is deployed from {}", deploy.branch);
    eprintln!(
        "-----> stages (ms): checkout {checkout_ms}, pack {}, upload {}, build {} (slug {}), release {}",
        t.pack_ms, t.upload_ms, t.build_ms, t.slug_ms, t.release_ms
    );
    Ok(())
}

/// The tree of `rev` (from the push being received: its objects are visible to the hook)
/// unpacked into `dir`, streamed through `git archive`.
fn checkout(rev: &str, dir: &Path) -> anyhow::Result<()> {
    let mut child = git()
        .args(["archive", "--format=tar", rev])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run git archive")?;
    let stdout = child.stdout.take().context("git archive has no stdout")?;
    let mut tar = tar::Archive::new(stdout);
    tar.set_preserve_permissions(true);
    let unpacked = tar.unpack(dir);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "checking out {rev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    unpacked.with_context(|| format!("checking out {rev}"))?;
    if dir.join(".gitmodules").is_file() {
        submodules(rev, dir)?;
    }
    Ok(())
}
/// Checks out the pushed revision's submodules into `dir`, as Flynn's receiver did: each
/// cloned from the URL `.gitmodules` gives it (a URL this host can reach), at the commit
/// the revision records, with its own submodules in turn.
fn submodules(rev: &str, dir: &Path) -> anyhow::Result<()> {
    // Gitlinks (mode 160000): the submodules' paths and commits, from the pushed tree.
    let listed = git()
        .args(["ls-tree", "-r", "-z", rev])
        .output()
        .context("listing the revision's submodules")?;
    let gitlinks: Vec<(String, String)> = listed
        .stdout
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            let (meta, path) = entry.split_once('\t')?;
            let mut meta = meta.split(' ');
            match (meta.next(), meta.next(), meta.next()) {
                (Some("160000"), Some("commit"), Some(sha)) => {
                    Some((path.to_string(), sha.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    let config = outside_git()
        .arg("config")
        .arg("-f")
        .arg(dir.join(".gitmodules"))
        .args(["--get-regexp", r"^submodule\..*\.(path|url)$"])
        .output()
        .context("reading .gitmodules")?;
    let config = String::from_utf8_lossy(&config.stdout).to_string();
    let entries: Vec<(&str, &str)> = config.lines().filter_map(|l| l.split_once(' ')).collect();
    for (path, sha) in gitlinks {
        let name = entries
            .iter()
            .find_map(|(k, v)| {
                let name = k.strip_prefix("submodule.")?.strip_suffix(".path")?;
                (*v == path).then_some(name)
            })
            .with_context(|| format!("submodule {path} is not in .gitmodules"))?;
        let url = entries
            .iter()
            .find_map(|(k, v)| (*k == format!("submodule.{name}.url")).then_some(*v))
            .with_context(|| format!("submodule {path} has no url in .gitmodules"))?;
        if url.starts_with("./") || url.starts_with("../") {
            bail!(
                "submodule {path}: a relative URL ({url}) cannot be fetched by the build; give its full URL"
            );
        }
        eprintln!(
            "-----> Submodule {path} at {} from {url}",
            &sha[..sha.len().min(12)]
        );
        let target = dir.join(&path);
        let _ = std::fs::remove_dir(&target);
        let target = target.to_string_lossy().to_string();
        let steps: [(Vec<&str>, String); 3] = [
            (
                vec!["clone", "--quiet", "--no-checkout", url, &target],
                format!("cloning submodule {path} from {url}"),
            ),
            (
                vec!["-C", &target, "checkout", "--quiet", &sha],
                format!("submodule {path}: checking out {sha}"),
            ),
            (
                vec![
                    "-C",
                    &target,
                    "submodule",
                    "update",
                    "--quiet",
                    "--init",
                    "--recursive",
                ],
                format!("submodule {path}: its own submodules"),
            ),
        ];
        for (args, what) in steps {
            let out = outside_git().args(&args).output().context(what.clone())?;
            if !out.status.success() {
                bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    Ok(())
}

/// git for repositories other than the one being pushed to: without the hook's `GIT_*`
/// environment (its repository and the push's quarantined objects).
fn outside_git() -> Command {
    let mut cmd = git();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GIT_") {
            cmd.env_remove(k);
        }
    }
    cmd
}
