//! `script/install-flynn`: installs the binaries into a prefix, checks `--version`, writes the
//! systemd unit (whose command is run here), refuses to run as non-root, and makes the ZFS
//! pool on a device (a sparse file standing in for the disk) with the daemon's own code. Needs root and ZFS (zfs-fuse, started by `script/test`).

use std::path::Path;
use std::process::{Command, Output};

use flynn_tests::{bin_dir, destroy_pool};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../script/install-flynn");

/// Runs install-flynn with the test's binaries; the unit goes nowhere unless the test says
/// where (never into this machine's /etc/systemd).
fn install(args: &[&str]) -> Output {
    let from = bin_dir();
    let mut all = vec!["--from", from.to_str().unwrap()];
    all.extend_from_slice(args);
    install_as_given(&all)
}

/// install-flynn with exactly these arguments (and no systemd unless asked).
fn install_as_given(args: &[&str]) -> Output {
    let mut c = Command::new("bash");
    c.arg(SCRIPT).args(args);
    if !args.contains(&"--systemd-dir") {
        c.arg("--no-systemd");
    }
    c.output().expect("run install-flynn")
}

/// `flynn-host ARGS`, which must succeed; its stdout.
fn host_ok(args: &[&str]) -> String {
    let out = Command::new(bin_dir().join("flynn-host"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn version() -> String {
    let out = Command::new(bin_dir().join("flynn-host"))
        .arg("version")
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

struct Pool(String);

impl Drop for Pool {
    fn drop(&mut self) {
        destroy_pool(&self.0);
    }
}

#[test]
fn t10_installs_the_binaries_and_makes_the_pool_on_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, data) = (dir.path().join("usr"), dir.path().join("data"));
    let disk = dir.path().join("sdb");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let pool = Pool(format!("flvinst{}", std::process::id()));
    let v = version();
    let args = [
        "--version",
        &v,
        "--prefix",
        prefix.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--zpool-name",
        &pool.0,
        "--zpool-create-device",
        disk.to_str().unwrap(),
        "--zpool-create-options",
        "-f",
    ];
    let out = install(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{} created", pool.0)),
        "{}",
        text(&out.stdout)
    );
    for bin in ["flynn-host", "flynn", "flynn-blobstore"] {
        let ran = Command::new(prefix.join("bin").join(bin))
            .arg("--version")
            .output()
            .unwrap();
        assert!(ran.status.success(), "{bin}");
    }
    // The pool lives on the device, not on a file under the data dir.
    let status = Command::new("zpool")
        .args(["status", &pool.0])
        .output()
        .unwrap();
    assert!(
        text(&status.stdout).contains(disk.to_str().unwrap()),
        "{}",
        text(&status.stdout)
    );
    assert!(!data
        .join("volumes/zfs/vdev")
        .join(format!("{}-zpool.vdev", pool.0))
        .exists());
    // Installing again finds the pool and leaves it as it is.
    let again = install(&args);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains(&format!("{} open", pool.0)));
}

#[test]
fn t11_refusals_install_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    let p = prefix.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--version", "9.9.9", "--prefix", p], "9.9.9"),
        (
            &["--prefix", p, "--zpool-create-device", "/nonexistent/sdz"],
            "does not exist",
        ),
        (&["--prefix", p, "--bogus"], "unknown option"),
    ];
    for (args, says) in cases {
        let out = install(args);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
        assert!(
            !Path::new(&prefix).join("bin/flynn-host").exists(),
            "{args:?}"
        );
    }
    // A version mismatch names both versions.
    let out = install(&["--version", "9.9.9", "--prefix", p]);
    assert!(text(&out.stderr).contains(&version()));
}

#[test]
fn t12_writes_a_systemd_unit_whose_daemon_logs_to_the_journal_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    let units = dir.path().join("units");
    let log = dir.path().join("log/flynn-host.log");
    let data = dir.path().join("data");
    let port = flynn_tests::router::free_port();
    let daemon_args = format!(
        "--external-ip 127.0.0.1 --port {port} --no-router --no-blobstore --no-jobs --volume-provider dir"
    );
    let out = install(&[
        "--prefix",
        prefix.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--systemd-dir",
        units.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
        "--daemon-args",
        &daemon_args,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unit_path = units.join("flynn-host.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for want in [
        "[Service]",
        "Restart=on-failure",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(want), "{want}: {unit}");
    }
    // systemd itself finds nothing wrong with it.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_path)
        .output()
        .unwrap();
    let complaints = text(&verify.stderr);
    assert!(
        verify.status.success() && !complaints.contains("flynn-host.service:"),
        "{complaints}"
    );
    // Its ExecStart line starts a daemon that logs to stderr (the journal) and the file.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], prefix.join("bin/flynn-host").to_str().unwrap());
    let stderr_log = dir.path().join("stderr.log");
    let mut daemon = Command::new(words[0])
        .args(&words[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let started = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("flynn-host daemon starting") {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let on_stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
    assert!(
        started,
        "log file: {:?}; stderr: {on_stderr}",
        std::fs::read_to_string(&log)
    );
    assert!(
        on_stderr.contains("flynn-host daemon starting"),
        "{on_stderr}"
    );
}

#[test]
fn t13_refuses_to_run_as_another_user_than_root() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            SCRIPT,
        ])
        .arg("--from")
        .arg(bin_dir())
        .args(["--no-systemd", "--prefix", prefix.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("run as root") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!prefix.join("bin/flynn-host").exists());
}

/// The Vagrant cluster's provisioning (`vagrant/provision.sh`), run against three hosts in
/// network namespaces instead of VMs (none can boot here): each installs and starts its
/// daemon from the unit the install writes, and the last bootstraps the cluster and prints
/// a controller key that works.
#[tokio::test(flavor = "multi_thread")]
async fn t14_vagrant_provisioning_brings_up_a_three_host_cluster() {
    let c = flynn_tests::Cluster::create(3);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../vagrant/provision.sh");
    let run = |i: usize, args: &[&str]| -> Output {
        let h = &c.hosts[i];
        let root = c.root_path().join(format!("vm{i}"));
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .args(["--", "bash", script])
            .args(args)
            .env("FLYNN_FROM", bin_dir())
            .env("FLYNN_PREFIX", root.join("usr"))
            .env("FLYNN_DATA_DIR", &h.data_dir)
            .env("FLYNN_SYSTEMD_DIR", root.join("units"))
            .env("FLYNN_LOG_FILE", root.join("flynn-host.log"))
            .env(
                "FLYNN_DAEMON_ARGS",
                format!(
                    "--no-jobs --volume-provider dir --log-dir {}",
                    root.join("logs").display()
                ),
            )
            .output()
            .expect("run provision.sh")
    };
    // Daemons started by the script outlive it: stop them whatever happens.
    struct Stop(Vec<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = Command::new("pkill")
                    .args(["-f", "--", &format!("--data-dir {dir} daemon")])
                    .status();
            }
        }
    }
    let _stop = Stop(
        c.hosts
            .iter()
            .map(|h| h.data_dir.display().to_string())
            .collect(),
    );
    for i in 0..3 {
        let out = run(i, &["host", &c.hosts[i].ip]);
        assert!(
            out.status.success(),
            "host {i}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("flynn-host runs on"));
    }
    let peers: Vec<String> = c.hosts.iter().map(|h| h.ip.clone()).collect();
    let out = run(
        2,
        &[
            "bootstrap",
            &c.hosts[2].ip,
            &peers.join(","),
            "vagrant.test",
            "3",
        ],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    let key = said
        .split("the controller key is ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the controller key printed")
        .to_string();
    assert!(said.contains("flynn cluster add -p "), "{said}");
    // The key works against every host.
    for h in &c.hosts {
        let client = flynn_client::ControllerClient::with_timeout(
            &h.url(),
            &key,
            std::time::Duration::from_secs(10),
        );
        let apps = flynn_tests::eventually(
            std::time::Duration::from_secs(30),
            "the controller answering with the printed key",
            || async { client.apps().await.ok() },
        )
        .await;
        assert!(apps.iter().any(|a| a.name == "controller"));
    }
}

/// A release made with `flynn-host release keygen` and `publish`, served over HTTP, installs
/// once its manifest's signature and every binary's SHA-512 check out, and the channel is
/// kept for `flynn-host update --version`. Another key's release, a tampered binary and a
/// version the repository lacks install nothing, each with one line naming why.
#[test]
fn t15_installs_a_signed_release_from_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    host_ok(&["release", "keygen", "--out", &path("release.key")]);
    let key = std::fs::read_to_string(path("release.pub")).unwrap();
    let key = key.trim();
    let from = bin_dir();
    let published = host_ok(&[
        "release",
        "publish",
        "--repository",
        &path("repo"),
        "--key",
        &path("release.key"),
        "--from",
        from.to_str().unwrap(),
    ]);
    assert!(published.contains(&version()), "{published}");
    let url = format!(
        "http://{}",
        flynn_tests::serve_dir("127.0.0.1", Path::new(&path("repo")))
    );

    let out = install_as_given(&[
        "--repository",
        &url,
        "--release-key",
        key,
        "--prefix",
        &path("usr"),
        "--data-dir",
        &path("data"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for bin in ["flynn-host", "flynn", "flynn-blobstore"] {
        assert_eq!(
            std::fs::read(dir.path().join("usr/bin").join(bin)).unwrap(),
            std::fs::read(from.join(bin)).unwrap(),
            "{bin} is the published one"
        );
    }
    let channel: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/release.json")).unwrap())
            .unwrap();
    assert_eq!(channel["repository"], url.as_str());
    assert_eq!(channel["key"], key);

    // Another key, a tampered binary, a missing version: nothing installed.
    host_ok(&["release", "keygen", "--out", &path("other.key")]);
    let other = std::fs::read_to_string(path("other.pub")).unwrap();
    let tampered = dir.path().join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    let v = version();
    let copy = Command::new("cp")
        .args([
            "-r",
            &format!("{}/.", path("repo")),
            tampered.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(copy.success());
    let mut bytes = std::fs::read(tampered.join(&v).join("flynn")).unwrap();
    bytes.push(0);
    std::fs::write(tampered.join(&v).join("flynn"), bytes).unwrap();
    let tampered_url = format!("http://{}", flynn_tests::serve_dir("127.0.0.1", &tampered));
    let cases: [(&[&str], &str); 3] = [
        (
            &["--repository", &url, "--release-key", other.trim()],
            "not signed",
        ),
        (
            &["--repository", &tampered_url, "--release-key", key],
            "does not match",
        ),
        (
            &[
                "--repository",
                &url,
                "--release-key",
                key,
                "--version",
                "9.9.9",
            ],
            "not in",
        ),
    ];
    for (args, says) in cases {
        let mut all = args.to_vec();
        let (usr, data) = (path("usr2"), path("data2"));
        all.extend_from_slice(&["--prefix", &usr, "--data-dir", &data]);
        let out = install_as_given(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
        assert!(!dir.path().join("usr2/bin/flynn-host").exists(), "{args:?}");
        assert!(!dir.path().join("data2/release.json").exists(), "{args:?}");
    }
}
