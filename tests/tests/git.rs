//! `git push flynn main`: real `git` against a real cluster's git server
//! (`git.$CLUSTER_DOMAIN`, through the router with the pinned certificate), builds with the
//! shipped buildpacks in real build jobs on Debian's busybox, deploys through the router.
//! Needs root; run with `--test-threads=1` like the other cluster cases.

use std::path::Path;
use std::time::Duration;

use flynn_tests::router::get;
use flynn_tests::{eventually, ok, Cluster};

const DOMAIN: &str = "push.test";
const RC: &str = "rc-git";

/// A cluster of `n` with the domain, every host ready for jobs, the busybox base image,
/// and the test's own `flynn` set up for it through host 0's router (`cluster add -p`).
async fn cluster(n: usize) -> (Cluster, String) {
    let mut c = Cluster::start(n);
    let out = c.bootstrap_with(n, &["--domain", DOMAIN]);
    let pin = out["controller_pin"].as_str().expect("pin").to_string();
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
    let base = c.busybox_image("base", None);
    ok(&c.flynn(0, &["base-image", "push", base.to_str().unwrap()]));
    let ip = c.hosts[0].ip.clone();
    ok(&c.flynn_here(
        RC,
        &[
            "cluster", "add", "-p", &pin, "--ip", &ip, "default", DOMAIN, &c.key,
        ],
    ));
    (c, pin)
}

fn router(c: &Cluster, i: usize) -> std::net::SocketAddr {
    format!("{}:80", c.hosts[i].ip).parse().unwrap()
}

async fn text(c: &Cluster, app: &str) -> String {
    let r = get(router(c, 0), &format!("{app}.{DOMAIN}"), "/").await;
    r.text().trim().to_string()
}

/// A new checkout in `dir` with `files`, committed on `main`.
fn checkout(c: &Cluster, dir: &Path, files: &[(&str, &str)]) {
    ok(&c.git_here(dir, &["init", "--quiet", "--initial-branch=main"]));
    commit(c, dir, files, "first");
}

fn commit(c: &Cluster, dir: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        if name.starts_with("bin/") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    ok(&c.git_here(dir, &["add", "-A"]));
    ok(&c.git_here(dir, &["commit", "--quiet", "-m", message]));
    ok(&c.git_here(dir, &["rev-parse", "HEAD"]))
        .trim()
        .to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_push_builds_deploys_redeploys_refuses_and_clones() {
    let (c, _) = cluster(1).await;
    // `cluster add` set git up: the credential helper and the pinned certificate.
    let config = std::fs::read_to_string(c.gitconfig()).unwrap();
    assert!(
        config.contains(&format!("[credential \"https://git.{DOMAIN}\"]"))
            && config.contains("git-credentials")
            && config.contains("sslCAInfo"),
        "{config}"
    );
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    checkout(&c, dir, &[("index.html", "hello from git v1\n")]);
    // `flynn create` inside a checkout adds the remote.
    let created = ok(&c.flynn_here_in(RC, dir, &["create", "web"]));
    assert!(
        created.contains(&format!("https://git.{DOMAIN}/web.git")),
        "{created}"
    );

    // A static site, no Procfile: detected, built, deployed, served.
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert!(
        said.contains("remote: -----> Static app detected"),
        "{said}"
    );
    assert!(said.contains("web is deployed from main"), "{said}");
    assert_eq!(text(&c, "web").await, "hello from git v1");
    // Inside the checkout the remote names the app: no -a.
    let show = ok(&c.flynn_here_in(RC, dir, &["release", "show"]));
    assert!(
        show.contains("web: /bin/sh -c exec /app/.static/serve"),
        "{show}"
    );

    // A second push with a change: the new text.
    let v2 = commit(&c, dir, &[("index.html", "hello from git v2\n")], "v2");
    ok(&c.git_here(dir, &["push", "flynn", "main"]));
    assert_eq!(text(&c, "web").await, "hello from git v2");

    // A failing build rejects the push: the ref stays, the old release keeps serving.
    commit(
        &c,
        dir,
        &[(
            "bin/compile",
            "#!/bin/sh\necho failing on purpose\nexit 3\n",
        )],
        "broken",
    );
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(!push.status.success(), "{said}");
    assert!(said.contains("failing on purpose"), "{said}");
    assert!(said.contains("pre-receive hook declined"), "{said}");
    let remote = ok(&c.git_here(dir, &["ls-remote", "flynn", "refs/heads/main"]));
    assert!(remote.starts_with(&v2), "{remote}");
    assert_eq!(text(&c, "web").await, "hello from git v2");
    ok(&c.git_here(dir, &["reset", "--quiet", "--hard", &v2]));

    // Pushes that would not deploy are refused with the branch to push.
    let push = c.git_here(dir, &["push", "flynn", "HEAD:feature"]);
    let said = stderr(&push);
    assert!(!push.status.success(), "{said}");
    assert!(
        said.contains("pushes to feature are not deployed: push to main"),
        "{said}"
    );
    let push = c.git_here(dir, &["push", "flynn", ":main"]);
    assert!(!push.status.success());
    assert!(
        stderr(&push).contains("deleting branch main is refused"),
        "{}",
        stderr(&push)
    );
    let refs = ok(&c.git_here(dir, &["ls-remote", "flynn"]));
    assert!(!refs.contains("feature") && refs.contains(&v2), "{refs}");

    // A wrong key is git's own authentication failure; an unknown app says so.
    let wrong = format!("https://flynn:wrong@git.{DOMAIN}/web.git");
    let push = c.git_here(dir, &["push", &wrong, "main"]);
    assert!(!push.status.success());
    assert!(
        stderr(&push).contains("Authentication failed"),
        "{}",
        stderr(&push)
    );
    let nope = format!("https://git.{DOMAIN}/nope.git");
    let push = c.git_here(dir, &["push", &nope, "main"]);
    assert!(!push.status.success());
    assert!(
        stderr(&push).contains("app nope not found"),
        "{}",
        stderr(&push)
    );

    // The pushed history comes back.
    let other = tempfile::tempdir().unwrap();
    let url = format!("https://git.{DOMAIN}/web.git");
    ok(&c.git_here(other.path(), &["clone", "--quiet", &url, "copy"]));
    let log = ok(&c.git_here(&other.path().join("copy"), &["log", "--format=%s"]));
    assert_eq!(log.lines().collect::<Vec<_>>(), ["v2", "first"], "{log}");
    // None of the refused pushes changed anything.
    assert_eq!(text(&c, "web").await, "hello from git v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_a_second_push_while_one_builds_is_refused() {
    let (c, _) = cluster(1).await;
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    // A build that takes a while, so the two pushes overlap.
    let compile = "#!/bin/sh\necho building slowly\nsleep 6\n";
    checkout(
        &c,
        &a,
        &[
            ("bin/compile", compile),
            ("Procfile", "web: exec httpd -f -p $PORT -h /app/public\n"),
            ("public/index.html", "from a\n"),
        ],
    );
    ok(&c.flynn_here_in(RC, &a, &["create", "slow"]));
    let url = format!("https://git.{DOMAIN}/slow.git");
    ok(&c.git_here(work.path(), &["clone", "--quiet", &url, "b"]));
    // b starts from a's history once a's first push is in; before it, an empty clone.
    ok(&c.git_here(&b, &["fetch", "--quiet", a.to_str().unwrap(), "main"]));
    ok(&c.git_here(&b, &["checkout", "--quiet", "-B", "main", "FETCH_HEAD"]));
    commit(&c, &b, &[("public/index.html", "from b\n")], "b");
    let pushes = std::thread::scope(|s| {
        let one = s.spawn(|| c.git_here(&a, &["push", "flynn", "main"]));
        std::thread::sleep(Duration::from_millis(1500));
        let two = s.spawn(|| c.git_here(&b, &["push", &url, "main"]));
        (one.join().unwrap(), two.join().unwrap())
    });
    let (one, two) = pushes;
    assert!(one.status.success(), "{}", stderr(&one));
    assert!(!two.status.success(), "{}", stderr(&two));
    assert!(
        stderr(&two).contains("a push to slow is in progress"),
        "{}",
        stderr(&two)
    );
    assert_eq!(text(&c, "slow").await, "from a");
    // Once the first is done, the second goes through.
    let again = c.git_here(&b, &["push", &url, "main"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(text(&c, "slow").await, "from b");
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_any_host_serves_the_repository_and_a_lost_home_is_restored() {
    let (mut c, pin) = cluster(3).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    checkout(&c, dir, &[("index.html", "kept\n")]);
    ok(&c.flynn_here_in(RC, dir, &["create", "kept"]));
    ok(&c.git_here(dir, &["push", "flynn", "main"]));
    // One host holds the repository.
    let holds = |i: usize| {
        std::fs::read_dir(c.hosts[i].data_dir.join("git"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("kept-"))
            })
            .unwrap_or(false)
    };
    let homes: Vec<usize> = (0..3).filter(|i| holds(*i)).collect();
    assert_eq!(homes.len(), 1, "{homes:?}");
    let home = homes[0];
    // Through every host's router, the same repository: the others forward to its home.
    let url = format!("https://git.{DOMAIN}/kept.git");
    for i in 0..3 {
        use_router(&c, &pin, i);
        let out = ok(&c.git_here(dir, &["ls-remote", &url, "refs/heads/main"]));
        assert!(out.contains("refs/heads/main"), "via host {i}: {out}");
    }
    // The home host is lost: another host restores the repository from its copy in the
    // blobstore and serves it from then on.
    c.kill(home);
    let survivor = (0..3).find(|i| *i != home).unwrap();
    use_router(&c, &pin, survivor);
    let other = tempfile::tempdir().unwrap();
    eventually(
        Duration::from_secs(40),
        "a clone from a survivor",
        || async {
            let _ = std::fs::remove_dir_all(other.path().join("copy"));
            let out = c.git_here(other.path(), &["clone", "--quiet", &url, "copy"]);
            out.status.success().then_some(())
        },
    )
    .await;
    let log = ok(&c.git_here(&other.path().join("copy"), &["log", "--format=%s"]));
    assert_eq!(log.trim(), "first");
    // And pushes go on there.
    commit(&c, dir, &[("index.html", "kept, pushed again\n")], "again");
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    assert!(push.status.success(), "{}", stderr(&push));
    let r = get(router(&c, survivor), &format!("kept.{DOMAIN}"), "/").await;
    assert_eq!(r.text().trim(), "kept, pushed again");
}

/// Points the test's git at host `i`'s router (`flynn cluster add --ip` again, which
/// replaces where the git server's name resolves).
fn use_router(c: &Cluster, pin: &str, i: usize) {
    let rc = format!("rc-git-{i}");
    let ip = c.hosts[i].ip.clone();
    let _ = c.flynn_here(&rc, &["cluster", "remove", "default"]);
    ok(&c.flynn_here(
        &rc,
        &[
            "cluster", "add", "-p", pin, "--ip", &ip, "default", DOMAIN, &c.key,
        ],
    ));
}
