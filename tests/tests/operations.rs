//! Operating a cluster, on real daemons in network namespaces: the status page with its key
//! rule, cluster backup and restore, app export and import.
//! Needs root; run with `--test-threads=1` like the other cluster cases.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use flynn_tests::router::{Client, Resp};
use flynn_tests::{eventually, ok, Cluster};

const DOMAIN: &str = "ops.flynn.test";

/// Adds `source` to the test's bridge and a route to it in every host, so a client on
/// "another network" (a public or shared address) can reach the hosts. Removed on drop.
struct ExtraSource<'a> {
    c: &'a Cluster,
    ip: IpAddr,
}

impl<'a> ExtraSource<'a> {
    fn add(c: &'a Cluster, ip: &str) -> Self {
        let bridge = bridge_of(c);
        run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", &bridge]);
        for h in &c.hosts {
            run(&[
                "ip",
                "-n",
                &h.ns,
                "route",
                "add",
                &format!("{ip}/32"),
                "via",
                &c.bridge_ip(),
            ]);
        }
        ExtraSource {
            c,
            ip: ip.parse().unwrap(),
        }
    }
}

impl Drop for ExtraSource<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev"])
            .arg(bridge_of(self.c))
            .status();
    }
}

fn bridge_of(c: &Cluster) -> String {
    // The bridge is the interface holding the test's own address.
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "to", &c.bridge_ip()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("the bridge holding the test's address")
        .to_string()
}

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
    assert!(st.success(), "{cmd:?} failed");
}

/// `GET path` for `host`, sent from `source` to `addr`, with extra header lines.
async fn get_from(source: IpAddr, addr: SocketAddr, host: &str, path: &str, extra: &str) -> Resp {
    let mut client = Client::connect_from(source, addr).await;
    client
        .send(format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
        ))
        .await;
    client.read(false).await.expect("a response")
}

fn http(c: &Cluster, i: usize) -> SocketAddr {
    format!("{}:80", c.hosts[i].ip).parse().unwrap()
}

fn status_host() -> String {
    format!("status.{DOMAIN}")
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_status_page_reports_every_component_and_keeps_its_key_rule() {
    let mut c = Cluster::start(3);
    c.bootstrap_with(3, &["--domain", DOMAIN]);
    let admin: IpAddr = c.bridge_ip().parse().unwrap();

    // From the admin network (private): no key, every core line healthy, Flynn's shape.
    let page = eventually(Duration::from_secs(30), "a healthy status page", || async {
        let r = get_from(admin, http(&c, 0), &status_host(), "/", "").await;
        (r.status == 200).then_some(r)
    })
    .await;
    let v = page.json();
    assert_eq!(v["data"]["status"], "healthy", "{v}");
    assert!(v["data"]["version"].is_string(), "{v}");
    let detail = v["data"]["detail"].as_object().unwrap();
    for line in ["raft", "scheduler"] {
        assert_eq!(detail[line]["status"], "healthy", "{line}: {v}");
    }
    for h in &c.hosts {
        for comp in [
            "daemon",
            "router",
            "firewall",
            "volumes",
            "blobstore",
            "jobs",
        ] {
            let key = format!("{comp}@{}", h.ip);
            assert_eq!(
                detail.get(&key).map(|l| &l["status"]),
                Some(&serde_json::json!("healthy")),
                "{key}: {v}"
            );
        }
    }
    assert!(detail[&format!("daemon@{}", c.hosts[1].ip)]["version"].is_string());

    // The key is the status app's, made at bootstrap.
    let key = ok(&c.flynn(0, &["-a", "status", "env", "get", "AUTH_KEY"]))
        .trim()
        .to_string();
    assert!(key.len() >= 20, "AUTH_KEY {key:?}");

    // From a public address: 401 without the key, even when the client claims a private
    // address in X-Forwarded-For; 200 with it, as ?key= or the basic password.
    let public = ExtraSource::add(&c, "198.51.100.254");
    let spoofed = "X-Forwarded-For: 10.0.0.1\r\n";
    let r = get_from(public.ip, http(&c, 1), &status_host(), "/", spoofed).await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "unauthorized");
    let r = get_from(public.ip, http(&c, 1), &status_host(), "/?key=wrong", "").await;
    assert_eq!(r.status, 401);
    let r = get_from(
        public.ip,
        http(&c, 1),
        &status_host(),
        &format!("/?key={key}"),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let basic = base64_encode(format!(":{key}").as_bytes());
    let r = get_from(
        public.ip,
        http(&c, 2),
        &status_host(),
        "/",
        &format!("Authorization: Basic {basic}\r\n"),
    )
    .await;
    assert_eq!(r.status, 200);
    // Straight to a host's API, a public client's own X-Forwarded-For is not believed either.
    let api: SocketAddr = c.hosts[0]
        .url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let r = get_from(public.ip, api, "x", "/", spoofed).await;
    assert_eq!(r.status, 401);

    // From a shared (100.64/10) address: no key needed.
    let shared = ExtraSource::add(&c, "100.64.7.254");
    let r = get_from(shared.ip, http(&c, 2), &status_host(), "/", "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    drop((public, shared));

    // A hung host (SIGSTOP: its kernel still accepts connections, and its instances stay
    // registered until their heartbeat expires): from the first second on, the page
    // answers within its bound through every router, 500, naming that host. A router whose
    // first pick is the hung host gives up on it after the status route's response
    // timeout and asks another; the page's own checks are bounded together.
    c.pause(2);
    let mut slowest = Duration::ZERO;
    let mut last = None;
    for i in 0..8 {
        let started = Instant::now();
        let r = get_from(admin, http(&c, i % 2), &status_host(), "/", "").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
        last = Some(r);
    }
    let started = Instant::now();
    let direct = get_from(admin, api, "x", "/", "").await;
    let direct_took = started.elapsed();
    c.resume(2);
    assert!(
        slowest < Duration::from_millis(3500),
        "a status request through a router took {slowest:?}"
    );
    assert_eq!(direct.status, 500);
    assert!(direct_took < Duration::from_secs(2), "took {direct_took:?}");
    let v = last.expect("a page").json();
    assert_eq!(v["data"]["status"], "unhealthy");
    let hung = format!("daemon@{}", c.hosts[2].ip);
    assert_eq!(v["data"]["detail"][&hung]["status"], "unhealthy", "{v}");
    assert_eq!(v["data"]["detail"]["raft"]["status"], "healthy", "{v}");
    // Back to healthy once it answers again.
    eventually(Duration::from_secs(30), "healthy again", || async {
        let r = get_from(admin, http(&c, 0), &status_host(), "/", "").await;
        (r.status == 200).then_some(())
    })
    .await;
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `n` hosts, each with a ZFS pool of its own, bootstrapped (optionally from a backup), with
/// every host in the cluster and ready for jobs.
async fn zfs_cluster(n: usize, extra: &[&str]) -> (Cluster, serde_json::Value) {
    let mut c = Cluster::create(n);
    for i in 0..n {
        c.with_zfs(i);
        c.start_daemon(i);
    }
    let args = if extra.is_empty() {
        vec!["--domain", DOMAIN]
    } else {
        extra.to_vec()
    };
    let out = bootstrap_all(&mut c, &args).await;
    (c, out)
}

/// Waits for every host, bootstraps them all with `args`, and waits until each runs jobs.
async fn bootstrap_all(c: &mut Cluster, args: &[&str]) -> serde_json::Value {
    let n = c.hosts.len();
    for i in 0..n {
        c.wait_up(i);
    }
    let out = c.bootstrap_with(n, args);
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
    out
}

/// Creates `app` and deploys the busybox image to it (its web process serves `/`).
fn deploy_busybox(c: &Cluster, app: &str, cmd: Option<&str>) {
    ok(&c.flynn(0, &["create", app]));
    let image = c.busybox_image(app, cmd);
    ok(&c.flynn(0, &["-a", app, "docker", "push", image.to_str().unwrap()]));
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn blob_url(c: &Cluster, i: usize, path: &str) -> String {
    format!("http://{}:5001{path}", c.hosts[i].ip)
}

async fn blob(c: &Cluster, i: usize, path: &str) -> Option<Vec<u8>> {
    let r = reqwest::get(blob_url(c, i, path)).await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(r.bytes().await.ok()?.to_vec())
}

/// The files of `app`'s volumes in cluster `c`: volume path → (file → bytes).
fn volume_files(c: &Cluster, app: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
    let all: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"])))
            .unwrap();
    let mut out = Vec::new();
    for v in all.as_array().unwrap() {
        if v["app"] != app {
            continue;
        }
        let id = v["id"].as_str().unwrap();
        // `volume inspect` asks the host it runs on: find the one holding it.
        let info: serde_json::Value = (0..c.hosts.len())
            .find_map(|i| {
                let out = c.flynn_host(i, &["volume", "inspect", id]);
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).unwrap())
            })
            .expect("a host holding the volume");
        let dir = std::path::PathBuf::from(info["path"].as_str().unwrap());
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        out.push(files);
    }
    out
}

/// Deploys app `web` with a data volume its job fills (a greeting and 1 MiB of random
/// bytes), and waits until it answers through the router.
async fn deploy_with_volume(c: &Cluster, app: &str) {
    ok(&c.flynn(0, &["create", app]));
    let image = c.busybox_image(app, None);
    ok(&c.flynn(0, &["-a", app, "docker", "push", image.to_str().unwrap()]));
    let update = c.root_path().join(format!("{app}-update.json"));
    std::fs::write(
        &update,
        r#"{"processes": {"web": {"ports": true,
            "args": ["sh", "-c", "[ -f /data/greeting ] || { echo kept > /data/greeting && dd if=/dev/urandom of=/data/rand bs=65536 count=16 2>/dev/null; }; exec httpd -f -p $PORT -h /www"],
            "volumes": [{"path": "/data"}]}}}"#,
    )
    .unwrap();
    ok(&c.flynn(
        0,
        &["-a", app, "release", "update", update.to_str().unwrap()],
    ));
    served(c, 0, app).await;
    eventually(Duration::from_secs(30), "the volume filled", || async {
        volume_files(c, app)
            .iter()
            .any(|f| f.get("rand").map(Vec::len) == Some(1 << 20))
            .then_some(())
    })
    .await;
}

/// Waits until `app.DOMAIN` answers 200 through host `i`'s router.
async fn served(c: &Cluster, i: usize, app: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("{app} served through host {i}"),
        || async {
            let admin: IpAddr = c.bridge_ip().parse().unwrap();
            let r = get_from(admin, http(c, i), &format!("{app}.{DOMAIN}"), "/", "").await;
            (r.status == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t02_backup_restores_onto_fresh_one_and_three_host_clusters() {
    let (c, _) = zfs_cluster(3, &[]).await;
    deploy_with_volume(&c, "web").await;
    ok(&c.flynn(0, &["-a", "web", "env", "set", "GREETING=hello"]));
    ok(&c.flynn(
        0,
        &[
            "-a",
            "web",
            "route",
            "add",
            "http",
            &format!("extra.{DOMAIN}"),
        ],
    ));
    let http_client = reqwest::Client::new();
    let blobs: Vec<(String, Vec<u8>)> = vec![
        ("/files/big.bin".into(), random_bytes(3 << 20, 1)),
        ("/files/small.txt".into(), b"hello backup".to_vec()),
        ("/a/deeper/path/with/a/rather/long/name/that/goes/past/the/hundred/bytes/of/a/tar/header.bin".into(), random_bytes(70_000, 2)),
    ];
    for (path, data) in &blobs {
        let r = http_client
            .put(blob_url(&c, 1, path))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "put {path}: {}", r.status());
    }
    let mut source_volumes = volume_files(&c, "web");
    source_volumes.sort();
    assert!(!source_volumes.is_empty(), "a data volume");
    // An app deployed by git push: its repository is backed up with the blobstore.
    let repo_bundle = push_site(&c).await;

    // The backup, through the CLI, as the guide writes it.
    let file = c.root_path().join("backup.tar");
    let out = c.flynn(0, &["cluster", "backup", "--file", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("written to"), "{stderr}");
    // It holds every secret of the cluster: the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backup file mode {mode:o}");
    let listing = Command::new("tar").arg("tf").arg(&file).output().unwrap();
    let names = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(names.starts_with("state.json\n"), "{names}");
    assert!(names.trim_end().ends_with("MANIFEST.json"), "{names}");
    assert!(names.contains("blobs/files/big.bin"), "{names}");
    assert!(names.contains("volumes/"), "{names}");
    // Into a cluster that has apps already: refused.
    let body = reqwest::Body::from(std::fs::read(&file).unwrap());
    let e = c.host_client(0).restore(body).await.unwrap_err();
    assert!(e.to_string().contains("new cluster"), "{e}");

    // Truncated or corrupted: refused before anything is written, naming the entry.
    let bytes = std::fs::read(&file).unwrap();
    let cut = c.root_path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let corrupt = c.root_path().join("corrupt.tar");
    let mut bad = bytes.clone();
    let at = find(&bad, b"hello backup").expect("the small blob in the archive");
    bad[at] ^= 0x20;
    std::fs::write(&corrupt, &bad).unwrap();
    {
        let mut fresh = Cluster::start(1);
        for (f, want) in [(&cut, "truncated"), (&corrupt, "blobs/files/small.txt")] {
            let out = Command::new(flynn_tests::bin_dir().join("flynn-host"))
                .args(["bootstrap", "--timeout", "10", "--min-hosts", "1"])
                .args([
                    "--peer-ips",
                    &format!("{}:{}", fresh.hosts[0].ip, flynn_tests::PORT),
                ])
                .arg("--from-backup")
                .arg(f)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(err.contains(want), "{want}: {err}");
        }
        let info = fresh.host_client(0).info().await.unwrap();
        assert!(!info.initialized, "a refused backup touched the host");
        fresh.kill(0);
    }

    for n in [1usize, 3] {
        let path = file.to_str().unwrap().to_string();
        let (r, out) = zfs_cluster(n, &["--from-backup", &path]).await;
        // The old key and domain.
        assert_eq!(r.key, c.key, "the controller key carries over");
        assert_eq!(out["domain"], DOMAIN);
        assert_eq!(out["restored"]["apps"], serde_json::json!(["site", "web"]));
        let env = ok(&r.flynn(0, &["-a", "web", "env"]));
        assert!(env.contains("GREETING=hello"), "{env}");
        let routes = ok(&r.flynn(0, &["-a", "web", "route"]));
        assert!(routes.contains(&format!("extra.{DOMAIN}")), "{routes}");
        // Every blob byte for byte, from every host.
        for i in 0..n {
            for (p, data) in &blobs {
                let got = blob(&r, i, p).await;
                assert!(
                    got.as_deref() == Some(&data[..]),
                    "{n} hosts: {p} from host {i}"
                );
            }
        }
        // The volume byte for byte.
        let mut restored = volume_files(&r, "web");
        restored.retain(|files| !files.is_empty() || source_volumes.contains(files));
        restored.sort();
        // Every backed-up volume is back (a job of the restored app may add its own).
        for v in &source_volumes {
            assert!(restored.contains(v), "{n} hosts: a volume is missing");
        }
        // The restored app's job took a restored volume up instead of making a new one.
        let job = eventually(Duration::from_secs(30), "a running web job", || async {
            let jobs = r.client(0).jobs("web").await.ok()?;
            jobs.into_iter()
                .find(|j| j.state == flynn_model::JobState::Running)
        })
        .await;
        let all: serde_json::Value =
            serde_json::from_str(&ok(&r.flynn_host(0, &["volume", "list", "--all", "--json"])))
                .unwrap();
        let web: Vec<&serde_json::Value> = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["app"] == "web")
            .collect();
        assert_eq!(web.len(), source_volumes.len(), "{n} hosts: {all}");
        assert!(
            web.iter().any(|v| v["job"] == job.id.as_str()),
            "{n} hosts: {all}"
        );
        // And the app runs again, through every router.
        for i in 0..n {
            served(&r, i, "web").await;
        }
        // The pushed app's repository comes back from its copy on first use.
        assert!(blob(&r, 0, &repo_bundle).await.is_some(), "{n} hosts");
        assert_eq!(clone_site(&r), ["first"], "{n} hosts");
        // Hosts register the status page again within their heartbeat.
        let admin: IpAddr = r.bridge_ip().parse().unwrap();
        eventually(
            Duration::from_secs(30),
            "the restored status page",
            || async {
                let page = get_from(admin, http(&r, 0), &status_host(), "/", "").await;
                (page.status == 200).then_some(())
            },
        )
        .await;
    }
}

/// Pushes a one-commit static site as app `site` through host 0's API (the controller
/// address serves git too) and waits for its repository's copy in the blobstore; the
/// copy's path.
async fn push_site(c: &Cluster) -> String {
    let base = c.busybox_image("base", None);
    ok(&c.flynn(0, &["base-image", "push", base.to_str().unwrap()]));
    let api = format!("{}:{}", c.hosts[0].ip, flynn_tests::PORT);
    ok(&c.flynn_here("rc-git", &["cluster", "add", "default", &api, &c.key]));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    ok(&c.git_here(dir, &["init", "--quiet", "--initial-branch=main"]));
    std::fs::write(dir.join("index.html"), "from the repository\n").unwrap();
    ok(&c.git_here(dir, &["add", "-A"]));
    ok(&c.git_here(dir, &["commit", "--quiet", "-m", "first"]));
    ok(&c.flynn_here_in("rc-git", dir, &["create", "site"]));
    let push = c.git_here(dir, &["push", "flynn", "main"]);
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let created = c.client(0).app("site").await.unwrap().created_revision;
    let path = format!("/git/site-{created}.bundle");
    eventually(Duration::from_secs(20), "the repository's copy", || async {
        blob(c, 0, &path).await.map(|_| ())
    })
    .await;
    path
}

/// Clones app `site` from a (restored) cluster through host 0's API: its commit messages.
fn clone_site(r: &Cluster) -> Vec<String> {
    let api = format!("{}:{}", r.hosts[0].ip, flynn_tests::PORT);
    let _ = r.flynn_here("rc-git", &["cluster", "remove", "default"]);
    ok(&r.flynn_here("rc-git", &["cluster", "add", "default", &api, &r.key]));
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{api}/site.git");
    ok(&r.git_here(work.path(), &["clone", "--quiet", &url, "copy"]));
    ok(&r.git_here(&work.path().join("copy"), &["log", "--format=%s"]))
        .lines()
        .map(str::to_string)
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn t03_export_and_import_under_a_new_name_with_and_without_routes() {
    let (c, _) = zfs_cluster(1, &[]).await;
    deploy_with_volume(&c, "shop").await;
    ok(&c.flynn(0, &["-a", "shop", "env", "set", "COLOR=blue"]));
    ok(&c.flynn(
        0,
        &[
            "-a",
            "shop",
            "route",
            "add",
            "http",
            &format!("store.{DOMAIN}"),
        ],
    ));
    let file = c.root_path().join("shop.tar");
    let out = c.flynn(
        0,
        &["-a", "shop", "export", "--file", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = volume_files(&c, "shop");

    // A name that exists is refused, and nothing is made.
    let apps_before = ok(&c.flynn(0, &["apps"]));
    let err = flynn_tests::failed(&c.flynn(0, &["import", "--file", file.to_str().unwrap()]));
    assert!(err.contains("exists"), "{err}");
    assert_eq!(ok(&c.flynn(0, &["apps"])), apps_before);

    // Every refusal reaches the user whole, saying why, over a real connection with a large
    // upload behind it (answered early, the client saw a broken pipe instead).
    let garbage = c.root_path().join("garbage.tar");
    let noise: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &noise).unwrap();
    let backup = c.root_path().join("cluster-backup.tar");
    ok(&c.flynn(
        0,
        &["cluster", "backup", "--file", backup.to_str().unwrap()],
    ));
    let truncated = c.root_path().join("truncated.tar");
    let whole = std::fs::read(&file).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() * 2 / 3]).unwrap();
    for (what, path, name, want) in [
        ("garbage", &garbage, "shop9", "app export archive"),
        (
            "a cluster backup",
            &backup,
            "shop9",
            "it is a cluster backup",
        ),
        (
            "a truncated export",
            &truncated,
            "shop9",
            "app export archive",
        ),
    ] {
        let err = flynn_tests::failed(&c.flynn(
            0,
            &["import", "--file", path.to_str().unwrap(), "--name", name],
        ));
        // Progress lines come first; the reason is the one error line, last.
        let reason = err.trim().lines().last().unwrap_or_default();
        assert!(
            reason.starts_with("flynn: ") && reason.contains(want),
            "{what}: {err}"
        );
        for wrong in ["Broken pipe", "cannot reach", "backup archive", "Some("] {
            assert!(!err.contains(wrong), "{what}: {err}");
        }
        assert_eq!(err.matches("flynn: ").count(), 1, "{what}: {err}");
    }
    // A bad name never starts the upload (the CLI checks it)...
    let err = flynn_tests::failed(&c.flynn(
        0,
        &[
            "import",
            "--file",
            file.to_str().unwrap(),
            "--name",
            "Bad_Name!",
        ],
    ));
    assert!(
        err.contains("app name") && err.contains("Bad_Name!"),
        "{err}"
    );
    // ...and the API, given one anyway with 24 MiB behind it, answers why.
    for (name, status) in [("Bad_Name!", 400), ("shop", 409)] {
        let refused = c
            .client(0)
            .import_app(Some(name), false, reqwest::Body::from(noise.clone()))
            .await
            .unwrap_err();
        assert_eq!(refused.status(), Some(status), "{name}: {refused}");
    }
    assert_eq!(ok(&c.flynn(0, &["apps"])), apps_before, "nothing was made");

    // Without --routes: only NEW.$DOMAIN.
    let out = ok(&c.flynn(
        0,
        &[
            "import",
            "--file",
            file.to_str().unwrap(),
            "--name",
            "shop2",
        ],
    ));
    assert!(out.contains("shop2"), "{out}");
    let routes = ok(&c.flynn(0, &["-a", "shop2", "route"]));
    assert!(routes.contains(&format!("shop2.{DOMAIN}")), "{routes}");
    assert!(!routes.contains("store."), "{routes}");
    let env = ok(&c.flynn(0, &["-a", "shop2", "env"]));
    assert!(env.contains("COLOR=blue"), "{env}");
    served(&c, 0, "shop2").await;
    let imported = volume_files(&c, "shop2");
    for v in &source {
        assert!(imported.contains(v), "the volumes came along byte for byte");
    }
    assert_eq!(
        imported.len(),
        source.len(),
        "the job took an imported volume up"
    );

    // With --routes, after the original is gone: its routes come along too.
    ok(&c.flynn(0, &["-a", "shop", "delete", "-y"]));
    ok(&c.flynn(
        0,
        &[
            "import",
            "--file",
            file.to_str().unwrap(),
            "--name",
            "shop3",
            "--routes",
        ],
    ));
    let routes = ok(&c.flynn(0, &["-a", "shop3", "route"]));
    for want in [
        format!("shop3.{DOMAIN}"),
        format!("store.{DOMAIN}"),
        format!("shop.{DOMAIN}"),
    ] {
        assert!(routes.contains(&want), "{want}: {routes}");
    }
    served(&c, 0, "shop3").await;
    let admin: IpAddr = c.bridge_ip().parse().unwrap();
    eventually(
        Duration::from_secs(30),
        "store.DOMAIN served by shop3",
        || async {
            let r = get_from(admin, http(&c, 0), &format!("store.{DOMAIN}"), "/", "").await;
            (r.status == 200).then_some(())
        },
    )
    .await;
}

/// A one-shot upload endpoint on the test's bridge address: the body of the first PUT.
async fn upload_endpoint(ip: &str) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let url = format!("http://{}/debug", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 65536];
        let (head_end, len) = loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the head");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>().unwrap())
                    .expect("a content length");
                break (p + 4, len);
            }
        };
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let answer = "https://debug.example/report/1";
        s.write_all(
            format!(
                "HTTP/1.1 201 Created\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        buf[head_end..].to_vec()
    });
    (url, task)
}

/// Every file of an extracted tarball, by path.
fn unpack(tarball: &std::path::Path, into: &std::path::Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(into).unwrap();
    run(&[
        "tar",
        "xzf",
        tarball.to_str().unwrap(),
        "-C",
        into.to_str().unwrap(),
    ]);
    let mut out = BTreeMap::new();
    let mut stack = vec![into.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(into).unwrap().to_string_lossy().into_owned();
                let rel = rel
                    .split_once('/')
                    .map(|(_, r)| r.to_string())
                    .unwrap_or(rel);
                out.insert(
                    rel,
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
                );
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn t04_collect_debug_info_redacts_secrets_and_uploads_or_falls_back() {
    let mut c = Cluster::start(1);
    c.bootstrap_with(1, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    let token = "tok-3f9a8b7c6d5e4f";
    ok(&c.flynn(0, &["create", "talker"]));
    ok(&c.flynn(
        0,
        &[
            "-a",
            "talker",
            "env",
            "set",
            &format!("API_TOKEN={token}"),
            "DB_PASSWORD=pw-0123456789",
        ],
    ));
    // The job prints its token: the log on the host holds it.
    let image = c.busybox_image(
        "talker",
        Some("echo token is $API_TOKEN; exec httpd -f -p $PORT -h /www"),
    );
    ok(&c.flynn(
        0,
        &["-a", "talker", "docker", "push", image.to_str().unwrap()],
    ));
    eventually(
        Duration::from_secs(30),
        "the token in the app's log",
        || async {
            let log = ok(&c.flynn(0, &["-a", "talker", "log"]));
            log.contains(token).then_some(())
        },
    )
    .await;

    let log_dir = c.hosts[0].data_dir.join("logs");
    let common = [
        "--log-file",
        c.hosts[0].log.to_str().unwrap(),
        "--log-dir",
        log_dir.to_str().unwrap(),
    ];
    let tarball = c.root_path().join("debug.tar.gz");
    let mut args = vec![
        "collect-debug-info",
        "--tarball",
        "--output",
        tarball.to_str().unwrap(),
    ];
    args.extend_from_slice(&common);
    let printed = ok(&c.flynn_host(0, &args));
    assert_eq!(printed.trim(), tarball.to_str().unwrap());
    let files = unpack(&tarball, &c.root_path().join("debug"));
    for want in [
        "host.txt",
        "flynn-host.log",
        "status.json",
        "hosts.json",
        "jobs.json",
        "components.json",
        "firewall.json",
        "health.json",
        "state.json",
        "zpool-status.txt",
    ] {
        assert!(
            files.contains_key(want),
            "{want} missing: {:?}",
            files.keys()
        );
    }
    assert!(files["host.txt"].contains("Linux"), "{}", files["host.txt"]);
    assert!(files["flynn-host.log"].contains("raft node started"));
    assert!(files["jobs.json"].contains("talker"));
    let app_log = files
        .iter()
        .find(|(k, _)| k.starts_with("app-logs/") && k.contains("talker"))
        .map(|(_, v)| v.clone())
        .expect("the app's log");
    assert!(app_log.contains("token is [REDACTED]"), "{app_log}");
    for (name, body) in &files {
        for secret in [token, "pw-0123456789", c.key.as_str(), c.secret.as_str()] {
            assert!(!body.contains(secret), "{name} holds a secret");
        }
    }

    // Uploaded where an endpoint answers; the tarball otherwise, saying why.
    let (url, received) = upload_endpoint(&c.bridge_ip()).await;
    let mut args = vec!["collect-debug-info", "--upload-url", url.as_str()];
    args.extend_from_slice(&common);
    let printed = ok(&c.flynn_host(0, &args));
    assert!(
        printed.contains("https://debug.example/report/1"),
        "{printed}"
    );
    let body = received.await.unwrap();
    let uploaded = c.root_path().join("uploaded.tar.gz");
    std::fs::write(&uploaded, body).unwrap();
    let files = unpack(&uploaded, &c.root_path().join("uploaded"));
    assert!(files.contains_key("state.json"));

    let dead = format!("http://{}:1/debug", c.bridge_ip());
    let mut args = vec!["collect-debug-info", "--upload-url", dead.as_str()];
    args.extend_from_slice(&common);
    let out = c.flynn_host(0, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("failed") && stderr.contains("tarball"),
        "{stderr}"
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(std::path::Path::new(&path).is_file(), "{path}");
    let _ = std::fs::remove_file(path);
}

/// A process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t05_metrics_pass_promtool_and_every_dashboard_query_returns_data() {
    let mut c = Cluster::create(3);
    // The hosts' own network is internal (Raft between hosts before they are members).
    let bridge = c.bridge_ip();
    let admin = format!("{}.0/24", bridge.rsplit_once('.').unwrap().0);
    for i in 0..3 {
        c.with_zfs(i);
        c.hosts[i]
            .args
            .extend(["--firewall-iface", "eth0", "--firewall-internal", &admin].map(String::from));
        c.start_daemon(i);
    }
    bootstrap_all(&mut c, &["--domain", DOMAIN]).await;
    deploy_busybox(&c, "metered", None);
    served(&c, 0, "metered").await;

    // A real Prometheus scraping every host each second.
    let port = flynn_tests::router::free_port();
    let dir = c.root_path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = c
        .hosts
        .iter()
        .map(|h| format!("\"{}\"", h.url().trim_start_matches("http://")))
        .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: flynn-host\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("run prometheus (script/test installs it)"),
    );

    // Traffic for every panel: routed requests, blob writes and reads, API calls, and
    // packets the firewall drops (SYNs to a closed port from a public address).
    let public = ExtraSource::add(&c, "198.51.100.253");
    let http_client = reqwest::Client::new();
    let admin_ip: IpAddr = c.bridge_ip().parse().unwrap();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(8) && round < 100 {
        round += 1;
        for i in 0..3 {
            let r = get_from(admin_ip, http(&c, i), &format!("metered.{DOMAIN}"), "/", "").await;
            assert_eq!(r.status, 200);
            let path = format!("/metrics-test/{round}-{i}");
            http_client
                .put(blob_url(&c, i, &path))
                .body(vec![round as u8; 4096])
                .send()
                .await
                .unwrap();
            assert_eq!(blob(&c, (i + 1) % 3, &path).await.unwrap().len(), 4096);
            let closed: SocketAddr = format!("{}:9999", c.hosts[i].ip).parse().unwrap();
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                Client::connect_from_checked(public.ip, closed),
            )
            .await;
        }
        ok(&c.flynn(
            0,
            &["-a", "metered", "env", "set", &format!("ROUND={round}")],
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every target's exposition passes promtool's checks.
    for h in &c.hosts {
        let text = h.metrics_text().await;
        for must in [
            "flynn_raft_wal_fsync_duration_seconds_bucket",
            "flynn_raft_proposal_commit_duration_seconds_count",
            "flynn_api_requests_total{",
            "flynn_router_requests_total{",
            "flynn_blobstore_bytes_total{",
            "flynn_volumes_pool_healthy 1",
            "flynn_cluster_jobs{state=\"running\"}",
        ] {
            assert!(text.contains(must), "{} lacks {must}", h.ip);
        }
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {}: {}{}",
            h.ip,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every query of the dashboard returns data.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../monitoring/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    for expr in &exprs {
        eventually(
            Duration::from_secs(60),
            &format!("data for {expr}"),
            || async {
                let r: serde_json::Value = http_client
                    .get(&api)
                    .query(&[("query", expr.as_str())])
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let result = r["data"]["result"].as_array()?;
                (r["status"] == "success" && !result.is_empty()).then_some(())
            },
        )
        .await;
    }
}

/// `n` hosts bootstrapped with the test domain, each running its own copy of flynn-host
/// (an update replaces the running binary, which must not be the build's).
async fn own_binaries_cluster(n: usize) -> Cluster {
    let mut c = Cluster::create(n);
    for i in 0..n {
        let bin = c.hosts[i].data_dir.join("bin/flynn-host");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(flynn_tests::bin_dir().join("flynn-host"), &bin).unwrap();
        c.hosts[i].bin = Some(bin);
        c.start_daemon(i);
    }
    bootstrap_all(&mut c, &["--domain", DOMAIN]).await;
    c
}

/// `flynn-host update ARGS` run on host 0 (no 60 s cap: a rollout takes a while).
fn host_update(c: &Cluster, args: &[&str]) -> std::process::Output {
    let bin = flynn_tests::bin_dir().join("flynn-host");
    let mut cmd = vec![
        "timeout",
        "600",
        bin.to_str().unwrap(),
        "--data-dir",
        c.hosts[0].data_dir.to_str().unwrap(),
        "update",
    ];
    cmd.extend_from_slice(args);
    c.run_cmd_in(0, &cmd)
}

/// One request on a fresh connection through a router; the status, or what went wrong.
async fn one_request(addr: SocketAddr, host: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
        head.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("no status line in {head:?}"))
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 20 s".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn t06_update_in_place_under_load_fails_no_request_and_loses_no_write() {
    let c = own_binaries_cluster(3).await;
    deploy_busybox(&c, "steady", None);
    ok(&c.flynn(0, &["-a", "steady", "scale", "web=2"]));
    for i in 0..3 {
        served(&c, i, "steady").await;
    }
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(c.host_client(i).info().await.unwrap().started_ms);
        }
        v
    };
    let running_ids = || async {
        let mut ids: Vec<String> = c
            .client(0)
            .jobs("steady")
            .await
            .unwrap()
            .into_iter()
            .filter(|j| j.state == flynn_model::JobState::Running)
            .map(|j| j.id)
            .collect();
        ids.sort();
        ids
    };
    let jobs_before = running_ids().await;

    // A binary of another version is refused before anything happens.
    let new_bin = c.root_path().join("flynn-host-new");
    std::fs::copy(flynn_tests::bin_dir().join("flynn-host"), &new_bin).unwrap();
    let out = host_update(
        &c,
        &["--file", new_bin.to_str().unwrap(), "--version", "9.9.9"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("9.9.9"));

    // Continuous load through every host's router, and writes through every host's API.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addrs: Vec<SocketAddr> = (0..3).map(|i| http(&c, i)).collect();
    let load = {
        let stop = stop.clone();
        let addrs = addrs.clone();
        tokio::spawn(async move {
            let (mut ok_n, mut failed) = (0u64, Vec::new());
            let started = Instant::now();
            let mut n = 0usize;
            // Bounded in count and time.
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && n < 200_000
                && started.elapsed() < Duration::from_secs(600)
            {
                let addr = addrs[n % addrs.len()];
                n += 1;
                match one_request(addr, &format!("steady.{DOMAIN}")).await {
                    Ok(200) => ok_n += 1,
                    Ok(code) => failed.push(format!("{addr}: {code}")),
                    Err(e) => failed.push(format!("{addr}: {e}")),
                }
            }
            (ok_n, failed)
        })
    };
    let writes = {
        let stop = stop.clone();
        let clients: Vec<_> = (0..3)
            .map(|i| c.client_with_timeout(i, Duration::from_secs(5)))
            .collect();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5_000 {
                let name = format!("ack{n}");
                if clients[n % 3].create_app(&name).await.is_ok() {
                    acked.push(name);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let out = host_update(
        &c,
        &["--file", new_bin.to_str().unwrap(), "--timeout", "120"],
    );
    let progress = String::from_utf8_lossy(&out.stderr).to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served_ok, failed) = load.await.unwrap();
    let acked = writes.await.unwrap();
    assert!(out.status.success(), "{progress}\n{}", c.dump_logs());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Updated 3 host(s)"),
        "{progress}"
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}\n{progress}",
        failed.len(),
        served_ok + failed.len() as u64,
        &failed[..failed.len().min(10)]
    );
    assert!(served_ok > 50, "only {served_ok} requests");
    // The jobs ran on through their hosts' restarts, taken up by the new images.
    assert_eq!(running_ids().await, jobs_before, "{progress}");
    // Every host restarted on the new image and took its router's sockets up.
    for (i, started) in before.iter().enumerate() {
        let info = c.host_client(i).info().await.unwrap();
        assert_ne!(info.started_ms, *started, "host {i} did not restart");
        assert!(
            c.hosts[i]
                .log_text()
                .contains("taking up the listening sockets"),
            "host {i}"
        );
    }
    // No acknowledged write is lost.
    let apps: BTreeMap<String, ()> = c
        .client(1)
        .apps()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, ()))
        .collect();
    assert!(acked.len() > 10, "{} writes acknowledged", acked.len());
    for name in &acked {
        assert!(apps.contains_key(name), "acknowledged app {name} is gone");
    }
    // Every host's version, and the way back.
    let versions = ok(&c.flynn_host(0, &["version", "--cluster"]));
    assert_eq!(versions.lines().count(), 5, "{versions}");
    // Back, moving each host's jobs to the others first this time.
    let out = host_update(&c, &["--rollback", "--move-jobs"]);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Rolled back 3 host(s)"),
        "{progress}"
    );
    assert!(progress.contains("moving its jobs"), "{progress}");
    for i in 0..3 {
        served(&c, i, "steady").await;
    }
    let moved = running_ids().await;
    assert!(
        moved.iter().all(|id| !jobs_before.contains(id)),
        "{moved:?} {jobs_before:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t07_a_host_that_does_not_come_back_stops_the_rollout() {
    let c = own_binaries_cluster(3).await;
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(c.host_client(i).info().await.unwrap().started_ms);
    }
    // A "binary" that reports the right version but cannot run a daemon.
    let version = ok(&c.flynn_host(0, &["version"])).trim().to_string();
    let broken = c.root_path().join("flynn-host-broken");
    std::fs::write(
        &broken,
        format!("#!/bin/sh\nif [ \"$1\" = version ]; then echo {version}; exit 0; fi\necho broken >&2\nexit 1\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = host_update(&c, &["--file", broken.to_str().unwrap(), "--timeout", "15"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("did not come back") && said.contains("stopped here"),
        "{said}"
    );
    // Exactly one host went down; the others were not touched.
    let mut untouched = 0;
    for (i, started) in before.iter().enumerate() {
        if let Ok(info) = c.host_client(i).info().await {
            assert_eq!(
                info.started_ms, *started,
                "host {i} was updated after the failure"
            );
            untouched += 1;
        }
    }
    assert_eq!(untouched, 2, "{said}");
}

/// `flynn-host update --version` fetches the release from the release repository, checks
/// its manifest's signature and the binary's SHA-512 before any host is touched, and rolls
/// it out. A release signed by another key, or whose binary was altered, is refused with
/// every host untouched and nothing left to run.
#[tokio::test(flavor = "multi_thread")]
async fn t08_update_to_a_signed_release_from_the_repository() {
    let c = own_binaries_cluster(1).await;
    let root = c.root_path();
    let local = |args: &[&str]| {
        let out = Command::new(flynn_tests::bin_dir().join("flynn-host"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let path = |p: &str| root.join(p).to_str().unwrap().to_string();
    local(&["release", "keygen", "--out", &path("release.key")]);
    local(&["release", "keygen", "--out", &path("other.key")]);
    let key = std::fs::read_to_string(path("release.pub"))
        .unwrap()
        .trim()
        .to_string();
    let other = std::fs::read_to_string(path("other.pub"))
        .unwrap()
        .trim()
        .to_string();
    let bins = flynn_tests::bin_dir();
    for repo in ["repo", "tampered"] {
        local(&[
            "release",
            "publish",
            "--repository",
            &path(repo),
            "--key",
            &path("release.key"),
            "--from",
            bins.to_str().unwrap(),
        ]);
    }
    let version = ok(&c.flynn_host(0, &["version"])).trim().to_string();
    let altered = root.join("tampered").join(&version).join("flynn-host");
    let mut bytes = std::fs::read(&altered).unwrap();
    bytes.extend_from_slice(b"\0tampered");
    std::fs::write(&altered, bytes).unwrap();
    let url = format!(
        "http://{}",
        flynn_tests::serve_dir(&c.bridge_ip(), &root.join("repo"))
    );
    let bad_url = format!(
        "http://{}",
        flynn_tests::serve_dir(&c.bridge_ip(), &root.join("tampered"))
    );
    let started = c.host_client(0).info().await.unwrap().started_ms;
    let fetched = c.hosts[0]
        .data_dir
        .join("releases")
        .join(&version)
        .join("flynn-host");

    let refusals: [(&[&str], &str); 2] = [
        (
            &["--repository", &url, "--release-key", &other],
            "not signed",
        ),
        (
            &["--repository", &bad_url, "--release-key", &key],
            "does not match",
        ),
    ];
    for (args, says) in refusals {
        let mut all = vec!["--version", "latest"];
        all.extend_from_slice(args);
        let out = host_update(&c, &all);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(
            !fetched.exists(),
            "{args:?}: a refused binary was left in place"
        );
        let info = c.host_client(0).info().await.unwrap();
        assert_eq!(info.started_ms, started, "{args:?}: the host was touched");
    }

    // The channel install-flynn records (DATA_DIR/release.json); no flags needed.
    std::fs::write(
        c.hosts[0].data_dir.join("release.json"),
        serde_json::json!({"repository": url, "key": key}).to_string(),
    )
    .unwrap();
    let out = host_update(&c, &["--version", &version, "--timeout", "120"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}\n{}", c.dump_logs());
    assert!(said.contains("signature and SHA-512 check out"), "{said}");
    let info = c.host_client(0).info().await.unwrap();
    assert_ne!(info.started_ms, started, "the host did not restart");
    assert_eq!(info.version, version);
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(bins.join("flynn-host")).unwrap(),
        "the fetched binary is the published one"
    );
}
