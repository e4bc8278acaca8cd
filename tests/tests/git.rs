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
    cluster_on(n, None).await
}

/// Like [`cluster`], on the base image at `base` instead of busybox.
async fn cluster_on(n: usize, base: Option<&Path>) -> (Cluster, String) {
    let mut c = Cluster::start(n);
    let out = c.bootstrap_with(n, &["--domain", DOMAIN]);
    let pin = out["controller_pin"].as_str().expect("pin").to_string();
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
    let base = match base {
        Some(b) => b.to_path_buf(),
        None => c.busybox_image("base", None),
    };
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

    // A second push with a change: the new text, rolled out with no failed request.
    let v2 = commit(&c, dir, &[("index.html", "hello from git v2\n")], "v2");
    let load = Load::start(router(&c, 0), &format!("web.{DOMAIN}"));
    ok(&c.git_here(dir, &["push", "flynn", "main"]));
    assert_eq!(text(&c, "web").await, "hello from git v2");
    let (served, failures) = load.stop().await;
    assert!(served >= 5, "only {served} requests during the push");
    assert!(failures.is_empty(), "failed during the push: {failures:?}");

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

    // A Procfile and its files, nothing to build: deployed as it is.
    let plain = tempfile::tempdir().unwrap();
    checkout(
        &c,
        plain.path(),
        &[
            ("Procfile", "web: exec httpd -f -p $PORT -h /app/www\n"),
            ("www/index.html", "plain procfile\n"),
        ],
    );
    ok(&c.flynn_here_in(RC, plain.path(), &["create", "plain"]));
    let push = c.git_here(plain.path(), &["push", "flynn", "main"]);
    assert!(push.status.success(), "{}", stderr(&push));
    assert!(!stderr(&push).contains("building"), "{}", stderr(&push));
    assert_eq!(text(&c, "plain").await, "plain procfile");

    // An export carries the repository; the imported app has it.
    let file = work.path().join("web.tar");
    let file = file.to_str().unwrap();
    ok(&c.flynn_here(RC, &["-a", "web", "export", "--file", file]));
    ok(&c.flynn_here(RC, &["import", "--file", file, "--name", "web2"]));
    let url = format!("https://git.{DOMAIN}/web2.git");
    ok(&c.git_here(other.path(), &["clone", "--quiet", &url, "copy2"]));
    let log = ok(&c.git_here(&other.path().join("copy2"), &["log", "--format=%s"]));
    assert_eq!(log.lines().collect::<Vec<_>>(), ["v2", "first"], "{log}");
}

/// GETs through a router in a loop until stopped: how many were served, and what failed.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, host: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, host) = (stop.clone(), host.to_string());
        let task = tokio::spawn(async move {
            let (mut served, mut failures) = (0, Vec::new());
            // Bounded: at most 10,000 requests, one every 5 ms.
            for _ in 0..10_000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = get(addr, &host, "/").await;
                if r.status == 200 {
                    served += 1;
                } else {
                    failures.push(format!("{} {}", r.status, r.text()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (served, failures)
        });
        Load { stop, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("load task")
    }
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

/// A package index on the test's own address holding one wheel, `greet` 1.0, as pip's
/// simple API serves it.
fn package_index(dir: &Path) {
    let script = r#"
import base64, hashlib, os, sys, zipfile
out = sys.argv[1]
os.makedirs(os.path.join(out, "simple", "greet"), exist_ok=True)
name = "greet-1.0-py3-none-any.whl"
files = {
    "greet/__init__.py": "def hello():\n    return 'hello from greet 1.0'\n",
    "greet-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: greet\nVersion: 1.0\n",
    "greet-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(os.path.join(out, name), "w") as z:
    for path, text in files.items():
        data = text.encode()
        z.writestr(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("greet-1.0.dist-info/RECORD,,")
    z.writestr("greet-1.0.dist-info/RECORD", "\n".join(record) + "\n")
with open(os.path.join(out, "simple", "greet", "index.html"), "w") as f:
    f.write(f'<html><body><a href="../../{name}">{name}</a></body></html>\n')
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python buildpack on the Debian stack image (`script/base-image OUT --stack`, made by
/// `script/test` and named by `FLYNN_TEST_STACK`): dependencies from a package index on the
/// test's own address, then a second push with the index gone, which must build from the
/// build cache alone.
#[tokio::test(flavor = "multi_thread")]
async fn t12_a_python_app_builds_on_the_stack_and_its_second_push_downloads_nothing() {
    let stack = std::env::var("FLYNN_TEST_STACK").expect(
        "FLYNN_TEST_STACK names the stack image (script/test makes it with script/base-image OUT --stack)",
    );
    let (c, _) = cluster_on(1, Some(Path::new(&stack))).await;
    let index = tempfile::tempdir().unwrap();
    package_index(index.path());
    let server = flynn_tests::serve_dir(&c.bridge_ip(), index.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let app = |text: &str| {
        format!(
            "import os, http.server, greet\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = ('{text} ' + greet.hello() + '\\n').encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(body)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             http.server.HTTPServer(('', int(os.environ['PORT'])), H).serve_forever()\n"
        )
    };
    checkout(
        &c,
        dir,
        &[
            ("requirements.txt", "greet==1.0\n"),
            ("app.py", &app("first:")),
        ],
    );
    ok(&c.flynn_here_in(RC, dir, &["create", "py"]));
    let index_url = format!("PIP_INDEX_URL=http://{server}/simple");
    ok(&c.flynn_here_in(RC, dir, &["env", "set", &index_url]));
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert!(said.contains("Python app detected"), "{said}");
    assert!(said.contains("Fetching dependencies"), "{said}");
    assert_eq!(text(&c, "py").await, "first: hello from greet 1.0");
    // The index loses its wheel: a build that tried to download it would fail.
    std::fs::remove_file(index.path().join("greet-1.0-py3-none-any.whl")).unwrap();
    commit(&c, dir, &[("app.py", &app("second:"))], "second");
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert!(said.contains("installed from the build cache"), "{said}");
    assert_eq!(text(&c, "py").await, "second: hello from greet 1.0");
}

/// The Node.js and Rust buildpacks on the stack image, each detected with no Procfile and
/// run by its own default process; each pushed twice, the second time from the build cache.
#[tokio::test(flavor = "multi_thread")]
async fn t13_node_and_rust_apps_build_on_the_stack_and_run_their_default_process() {
    let stack = std::env::var("FLYNN_TEST_STACK").expect(
        "FLYNN_TEST_STACK names the stack image (script/test makes it with script/base-image OUT --stack)",
    );
    let (c, _) = cluster_on(1, Some(Path::new(&stack))).await;
    let cases: [(&str, &str, Files, AppCode); 2] = [
        (
            "node",
            "Node.js app detected",
            vec![(
                "package.json",
                r#"{"name": "hello", "version": "1.0.0", "scripts": {"start": "node server.js"}}"#
                    .to_string(),
            )],
            node_app,
        ),
        (
            "rusty",
            "Rust app detected",
            vec![(
                "Cargo.toml",
                "[package]\nname = \"rusty\"\nversion = \"0.1.0\"\nedition = \"2021\"\n"
                    .to_string(),
            )],
            rust_app,
        ),
    ];
    for (app, detected, fixed, code) in cases {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path();
        let mut files: Vec<(&str, String)> = fixed.clone();
        files.extend(code(&format!("{app} one")));
        let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
        checkout(&c, dir, &files);
        ok(&c.flynn_here_in(RC, dir, &["create", app]));
        let push = c.git_here(dir, &["push", "flynn", "main"]);
        let said = stderr(&push);
        assert!(push.status.success(), "{said}");
        assert!(said.contains(detected), "{said}");
        assert_eq!(text(&c, app).await, format!("{app} one"), "{said}");
        let again = code(&format!("{app} two"));
        let again: Vec<(&str, &str)> = again.iter().map(|(n, t)| (*n, t.as_str())).collect();
        commit(&c, dir, &again, "two");
        let push = c.git_here(dir, &["push", "flynn", "main"]);
        let said = stderr(&push);
        assert!(push.status.success(), "{said}");
        assert!(said.contains("from the build cache"), "{said}");
        assert_eq!(text(&c, app).await, format!("{app} two"), "{said}");
    }
}

/// A push with a submodule builds with it checked out at the recorded commit (here the
/// site's pages live in the submodule), as Flynn's receiver did.
#[tokio::test(flavor = "multi_thread")]
async fn t14_submodules_are_checked_out_for_the_build() {
    let (c, _) = cluster(1).await;
    let work = tempfile::tempdir().unwrap();
    let pages = work.path().join("pages");
    std::fs::create_dir_all(&pages).unwrap();
    checkout(&c, &pages, &[("index.html", "from the submodule, first\n")]);
    let first = ok(&c.git_here(&pages, &["rev-parse", "HEAD"]))
        .trim()
        .to_string();
    let dir = work.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    checkout(&c, &dir, &[("README", "the app\n")]);
    let url = format!("file://{}", pages.display());
    ok(&c.git_here(
        &dir,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "--quiet",
            &url,
            "public",
        ],
    ));
    ok(&c.git_here(&dir, &["commit", "--quiet", "-m", "pages"]));
    // A later commit in the submodule's own repository is not what the app records.
    commit(
        &c,
        &pages,
        &[("index.html", "from the submodule, later\n")],
        "later",
    );
    ok(&c.flynn_here_in(RC, &dir, &["create", "subs"]));
    let push = c.git_here(&dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert!(
        said.contains(&format!("Submodule public at {}", &first[..12])),
        "{said}"
    );
    assert_eq!(text(&c, "subs").await, "from the submodule, first");
}

/// A buildpack of the app's own, fetched by the build from a git URL: by `BUILDPACK_URL`,
/// then named in `.buildpacks` (here served over git's dumb HTTP from the test's address;
/// the stack image has git).
#[tokio::test(flavor = "multi_thread")]
async fn t15_buildpack_url_and_dot_buildpacks_fetch_a_buildpack_by_git() {
    let stack = std::env::var("FLYNN_TEST_STACK").expect(
        "FLYNN_TEST_STACK names the stack image (script/test makes it with script/base-image OUT --stack)",
    );
    let (c, _) = cluster_on(1, Some(Path::new(&stack))).await;
    // The buildpack: its compile writes the page from the app's greeting.
    let work = tempfile::tempdir().unwrap();
    let bp = work.path().join("bp");
    std::fs::create_dir_all(&bp).unwrap();
    checkout(
        &c,
        &bp,
        &[
            ("bin/detect", "#!/bin/sh\nexit 1\n"),
            (
                "bin/compile",
                "#!/bin/sh\necho '-----> the custom buildpack'\necho \"custom: $(cat \"$1/greeting.txt\")\" >\"$1/index.html\"\n",
            ),
            (
                "bin/release",
                "#!/bin/sh\nprintf -- '---\\ndefault_process_types:\\n  web: exec busybox httpd -f -p $PORT -h /app\\n'\n",
            ),
        ],
    );
    // Served over git's dumb HTTP protocol: a bare copy with its info files.
    let served = work.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    ok(&c.git_here(
        &served,
        &["clone", "--quiet", "--bare", bp.to_str().unwrap(), "bp.git"],
    ));
    ok(&c.git_here(&served.join("bp.git"), &["update-server-info"]));
    let server = flynn_tests::serve_dir(&c.bridge_ip(), &served);
    let bp_url = format!("http://{server}/bp.git");

    let dir = work.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    checkout(&c, &dir, &[("greeting.txt", "hello")]);
    ok(&c.flynn_here_in(RC, &dir, &["create", "custom"]));
    ok(&c.flynn_here_in(
        RC,
        &dir,
        &["env", "set", &format!("BUILDPACK_URL={bp_url}")],
    ));
    let push = c.git_here(&dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert!(said.contains("the custom buildpack"), "{said}");
    assert_eq!(text(&c, "custom").await, "custom: hello");
    // Named in .buildpacks instead (which wins over BUILDPACK_URL, here unset).
    ok(&c.flynn_here_in(RC, &dir, &["env", "unset", "BUILDPACK_URL"]));
    commit(
        &c,
        &dir,
        &[
            (".buildpacks", &format!("{bp_url}\n")),
            ("greeting.txt", "again"),
        ],
        "buildpacks file",
    );
    let push = c.git_here(&dir, &["push", "flynn", "main"]);
    let said = stderr(&push);
    assert!(push.status.success(), "{said}");
    assert_eq!(text(&c, "custom").await, "custom: again");
}

/// Files of a test app: path and text.
type Files = Vec<(&'static str, String)>;

/// A test app's code saying `text`.
type AppCode = fn(&str) -> Files;

/// A Node.js server saying `text`.
fn node_app(text: &str) -> Files {
    let server = format!(
        "require('http').createServer((req, res) => res.end('{text}\\n'))\n\
             \x20 .listen(Number(process.env.PORT));\n"
    );
    vec![("server.js", server)]
}

/// A Rust server (std only: Debian's rustc 1.65) saying `text`.
fn rust_app(text: &str) -> Files {
    let main = format!(
            "use std::io::{{Read, Write}};\n\
             fn main() {{\n\
             \x20   let port: u16 = std::env::var(\"PORT\").unwrap().parse().unwrap();\n\
             \x20   let l = std::net::TcpListener::bind((\"0.0.0.0\", port)).unwrap();\n\
             \x20   for mut s in l.incoming().flatten() {{\n\
             \x20       let _ = s.read(&mut [0u8; 4096]);\n\
             \x20       let body = \"{text}\\n\";\n\
             \x20       let _ = write!(s, \"HTTP/1.1 200 OK\\r\\nContent-Length: {{}}\\r\\nConnection: close\\r\\n\\r\\n{{}}\", body.len(), body);\n\
             \x20   }}\n\
             }}\n"
    );
    vec![("src/main.rs", main)]
}
