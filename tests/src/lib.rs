//! Test fixture: a cluster of real `flynn-host daemon` processes, one per network namespace,
//! joined by a bridge that this fixture creates (root needed). Any host can be killed,
//! restarted, paused (SIGSTOP) and cut off (its link set down).
//!
//! The bridge lives in the test's own namespace with the address `.254`, so the test talks
//! to every host directly; hosts use `10.199.T.1..` where T is unique per fixture.

pub mod linearizability;
pub mod router;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flynn_client::{ControllerClient, HostClient, HostEntry};

pub const PORT: u16 = 1113;

/// Where the `flynn` and `flynn-host` binaries are: `FLYNN_BIN_DIR`, else next to the test
/// binary's `deps/` folder (`cargo build` puts them there).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLYNN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    assert!(
        dir.join("flynn-host").exists(),
        "{} has no flynn-host binary: run `cargo build --bins` first (or set FLYNN_BIN_DIR)",
        dir.display()
    );
    dir
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    out
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Brings up a link of the test's own (root) namespace without IPv6 addresses. The kernel
/// would give it a link-local address a second or two later, after duplicate address
/// detection; nothing here uses one, and a browser the test drives takes that late address
/// for a network change and aborts the page it is loading (chromium's
/// `ERR_NETWORK_CHANGED`, seen in dashboard t10).
fn up_without_ipv6(dev: &str) {
    must(&["ip", "link", "set", dev, "addrgenmode", "none"]);
    must(&["ip", "link", "set", dev, "up"]);
}

pub struct TestHost {
    pub ns: String,
    pub ip: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    link: String,
    child: Option<Child>,
    /// Extra environment for the daemon (e.g. a version override).
    pub env: Vec<(String, String)>,
    /// Extra `flynn-host daemon` arguments.
    pub args: Vec<String>,
    /// The host has a ZFS pool of its own (`Cluster::with_zfs`).
    pub zfs: bool,
    /// The daemon's binary, when not the build's (an in-place update replaces it).
    pub bin: Option<PathBuf>,
}

impl TestHost {
    pub fn url(&self) -> String {
        format!("http://{}:{PORT}", self.ip)
    }

    /// The daemon's `/metrics` (Prometheus text).
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// One sample of `/metrics`, named with its labels as written there
    /// (`flynn_raft_read_index_total{how="lease"}`).
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self.metrics_text().await;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct Cluster {
    /// ZFS pools the hosts made (destroyed with the cluster).
    pools: Vec<String>,
    tag: u32,
    bridge: String,
    /// A second subnet's bridge and the router namespace joining the two
    /// (`Cluster::split_subnets`).
    second_subnet: Option<(String, String)>,
    pub hosts: Vec<TestHost>,
    pub key: String,
    pub secret: String,
    root: tempfile::TempDir,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Creates `n` hosts and starts their daemons (not yet bootstrapped).
    pub fn start(n: usize) -> Cluster {
        let mut c = Cluster::create(n);
        for i in 0..n {
            c.start_daemon(i);
        }
        for i in 0..n {
            c.wait_up(i);
        }
        c
    }

    /// Creates `n` host namespaces without starting daemons.
    pub fn create(n: usize) -> Cluster {
        assert!(
            sh(&["id", "-u"]).stdout.starts_with(b"0"),
            "the cluster tests need root (network namespaces); run them as root"
        );
        let tag = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst) * 7) % 200 + 20;
        let bridge = format!("flb{tag}");
        let _ = sh(&["ip", "link", "del", &bridge]);
        must(&["ip", "link", "add", &bridge, "type", "bridge"]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("10.199.{tag}.254/24"),
            "dev",
            &bridge,
        ]);
        up_without_ipv6(&bridge);
        let mut c = Cluster {
            pools: Vec::new(),
            tag,
            bridge,
            second_subnet: None,
            hosts: Vec::new(),
            key: String::new(),
            secret: String::new(),
            root: tempfile::tempdir().expect("temp dir"),
        };
        for _ in 0..n {
            c.add_host();
        }
        c
    }

    /// Gives host `i` a ZFS pool of its own (128 MiB on a sparse file in its data dir) before
    /// its daemon starts; returns the pool's name.
    pub fn with_zfs(&mut self, i: usize) -> String {
        // A wedged zfs-fuse shows up later as hosts that never answer: find out here, once
        // per cluster, and restart it (no other cluster runs: tests run one at a time).
        if self.pools.is_empty() && !zfs_works() {
            eprintln!("zfs-fuse is wedged (a dataset could not be made in 20 s); restarting it");
            restart_zfs_fuse();
            assert!(
                zfs_works(),
                "zfs-fuse does not make a pool and a dataset within 20 s even after a restart"
            );
        }
        let pool = format!("flv{}t{}h{i}", std::process::id(), self.tag);
        self.hosts[i].args.extend(
            [
                "--volume-provider",
                "zfs",
                "--zpool-name",
                &pool,
                "--zpool-size",
                "128M",
            ]
            .map(String::from),
        );
        self.hosts[i].zfs = true;
        self.pools.push(pool.clone());
        pool
    }

    /// Puts hosts `moved` on a second subnet (`10.198.TAG.0/24`, its own bridge) joined to
    /// the first by a router namespace, as two availability zones or a routed data centre
    /// are: hosts of different subnets reach each other only through the router, never on
    /// one L2. Before their daemons start.
    pub fn split_subnets(&mut self, moved: &[usize]) {
        let tag = self.tag;
        let bridge2 = format!("flc{tag}");
        let router = format!("flr{tag}");
        let _ = sh(&["ip", "link", "del", &bridge2]);
        let _ = sh(&["ip", "netns", "del", &router]);
        must(&["ip", "link", "add", &bridge2, "type", "bridge"]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("10.198.{tag}.254/24"),
            "dev",
            &bridge2,
        ]);
        up_without_ipv6(&bridge2);
        must(&["ip", "netns", "add", &router]);
        for (leg, bridge, net) in [
            ("a", self.bridge.clone(), "10.199"),
            ("b", bridge2.clone(), "10.198"),
        ] {
            let outside = format!("flr{tag}{leg}");
            let _ = sh(&["ip", "link", "del", &outside]);
            must(&[
                "ip",
                "link",
                "add",
                &outside,
                "type",
                "veth",
                "peer",
                "name",
                &format!("flr{tag}{leg}i"),
            ]);
            must(&[
                "ip",
                "link",
                "set",
                &format!("flr{tag}{leg}i"),
                "netns",
                &router,
            ]);
            let inside = format!("eth{leg}");
            must(&[
                "ip",
                "-n",
                &router,
                "link",
                "set",
                &format!("flr{tag}{leg}i"),
                "name",
                &inside,
            ]);
            must(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{net}.{tag}.250/24"),
                "dev",
                &inside,
            ]);
            must(&["ip", "-n", &router, "link", "set", &inside, "up"]);
            must(&["ip", "link", "set", &outside, "master", &bridge]);
            up_without_ipv6(&outside);
        }
        must(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        for i in 0..self.hosts.len() {
            let h = &mut self.hosts[i];
            if moved.contains(&i) {
                let old = format!("{}/24", h.ip);
                h.ip = format!("10.198.{tag}.{}", i + 1);
                must(&["ip", "-n", &h.ns, "addr", "del", &old, "dev", "eth0"]);
                must(&[
                    "ip",
                    "-n",
                    &h.ns,
                    "addr",
                    "add",
                    &format!("{}/24", h.ip),
                    "dev",
                    "eth0",
                ]);
                must(&["ip", "link", "set", &h.link, "nomaster"]);
                must(&["ip", "link", "set", &h.link, "master", &bridge2]);
            }
            let gw = if moved.contains(&i) {
                "10.198"
            } else {
                "10.199"
            };
            must(&[
                "ip",
                "-n",
                &h.ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{gw}.{tag}.250"),
            ]);
        }
        self.second_subnet = Some((bridge2, router));
    }

    /// A directory for the test's own files, removed with the cluster.
    pub fn root_path(&self) -> &Path {
        self.root.path()
    }

    /// The test's own address on the bridge (the "admin network").
    pub fn bridge_ip(&self) -> String {
        format!("10.199.{}.254", self.tag)
    }

    /// Starts `cmd` inside host `i`'s namespace; it is killed when the handle drops.
    pub fn spawn_in(&self, i: usize, cmd: &[&str]) -> Background {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        Background(child)
    }

    /// Runs `cmd` inside host `i`'s namespace to completion.
    pub fn run_cmd_in(&self, i: usize, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("run in namespace")
    }

    /// Adds a host namespace wired to the bridge; its daemon is not started.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let ns = format!("flt{}h{i}", self.tag);
        let link = format!("flv{}h{i}", self.tag);
        let peer = format!("fle{}h{i}", self.tag);
        let ip = format!("10.199.{}.{}", self.tag, i + 1);
        let _ = sh(&["ip", "netns", "del", &ns]);
        let _ = sh(&["ip", "link", "del", &link]);
        must(&["ip", "netns", "add", &ns]);
        must(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", &peer,
        ]);
        must(&["ip", "link", "set", &peer, "netns", &ns]);
        must(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&["ip", "link", "set", &link, "master", &self.bridge]);
        up_without_ipv6(&link);
        let data_dir = self.root.path().join(format!("host{i}"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        self.hosts.push(TestHost {
            log: self.root.path().join(format!("host{i}.log")),
            ns,
            ip,
            data_dir,
            link,
            child: None,
            env: Vec::new(),
            args: Vec::new(),
            zfs: false,
            bin: None,
        });
        i
    }

    pub fn start_daemon(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        assert!(h.child.is_none(), "host {i} is running already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .expect("log file");
        // Daemons enter only the host's network namespace. `ip netns exec` would also give
        // them a mount namespace of their own with a fresh /sys: zfs-fuse cannot mount
        // datasets from one, and the cgroup hierarchies under /sys/fs/cgroup that jobs are
        // limited by would be gone. Real hosts have no such wrapper at all.
        let mut launcher = Command::new("nsenter");
        launcher.arg(format!("--net=/run/netns/{}", h.ns)).arg("--");
        let child = launcher
            .arg(
                h.bin
                    .clone()
                    .unwrap_or_else(|| bin_dir().join("flynn-host")),
            )
            .arg("--data-dir")
            .arg(&h.data_dir)
            .args([
                "daemon",
                "--external-ip",
                &h.ip,
                "--port",
                &PORT.to_string(),
            ])
            .args(&h.args)
            // Hosts share this machine's one ZFS (zfs-fuse): only a test that gives a host
            // a pool of its own (`Cluster::with_zfs`) uses it; the rest use directories.
            .args(
                (!h.args.iter().any(|a| a == "--volume-provider"))
                    .then_some(["--volume-provider", "dir"])
                    .into_iter()
                    .flatten(),
            )
            // Job output of each host in its own data dir (not the machine's /var/log).
            .arg("--log-dir")
            .arg(h.data_dir.join("logs"))
            .env("RUST_LOG", "info,openraft=error")
            .envs(h.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn flynn-host");
        h.child = Some(child);
    }

    /// Waits until host `i` answers its info endpoint.
    pub fn wait_up(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let addr: std::net::SocketAddr = format!("{}:{PORT}", self.hosts[i].ip)
                .parse()
                .expect("host addr");
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "host {i} did not come up: {}",
                self.hosts[i].log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs host `i`, its daemon and its jobs, as a machine that dies.
    pub fn kill(&mut self, i: usize) {
        self.kill_daemon(i);
        kill_jobs(&self.hosts[i].data_dir);
    }

    /// SIGKILLs host `i`'s daemon alone and reaps it: its service jobs run on.
    pub fn kill_daemon(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts host `i` again on the same data dir.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_daemon(i);
        self.wait_up(i);
    }

    /// Waits for host `i`'s daemon to exit by itself; returns its success.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let child = self.hosts[i].child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.hosts[i].child = None;
                return Some(status.success());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.hosts[i].pid() {
            must(&["kill", &format!("-{sig}"), &pid.to_string()]);
        }
    }

    pub fn pause(&self, i: usize) {
        self.signal(i, "STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "CONT");
    }

    /// Cuts host `i` off from every other host (and from the test).
    pub fn cut(&self, i: usize) {
        must(&["ip", "link", "set", &self.hosts[i].link, "down"]);
    }

    pub fn heal(&self, i: usize) {
        must(&["ip", "link", "set", &self.hosts[i].link, "up"]);
    }

    /// Runs `flynn-host bootstrap` over the first `n` hosts and records key and secret.
    pub fn bootstrap(&mut self, n: usize) {
        self.bootstrap_with(n, &[]);
    }

    /// `flynn-host bootstrap` with extra flags (e.g. `--domain`); returns its JSON outcome.
    pub fn bootstrap_with(&mut self, n: usize, extra: &[&str]) -> serde_json::Value {
        let ips: Vec<String> = self.hosts[..n]
            .iter()
            .map(|h| format!("{}:{PORT}", h.ip))
            .collect();
        let out = Command::new(bin_dir().join("flynn-host"))
            .args(["bootstrap", "--json", "--timeout", "30"])
            .args(["--min-hosts", &n.to_string(), "--peer-ips", &ips.join(",")])
            .args(extra)
            .output()
            .expect("run flynn-host bootstrap");
        assert!(
            out.status.success(),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bootstrap json");
        self.key = v["controller_key"].as_str().expect("key").to_string();
        self.secret = v["cluster_secret"].as_str().expect("secret").to_string();
        v
    }

    /// Builds a busybox app image (`script/busybox-image`) in the cluster's temp dir: a
    /// `docker save` archive whose web process runs `cmd` under `sh -c` (default: httpd on
    /// `$PORT`, saying so on stdout first).
    pub fn busybox_image(&self, version: &str, cmd: Option<&str>) -> PathBuf {
        let out = self.root.path().join(format!("busybox-{version}.tar"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../script/busybox-image");
        let mut c = Command::new("bash");
        c.arg(script).arg(&out).arg(version);
        if let Some(cmd) = cmd {
            c.arg(cmd);
        }
        let o = c.output().expect("run script/busybox-image");
        assert!(
            o.status.success(),
            "busybox-image: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// git's global config for every command a test runs (`flynn cluster add` writes the
    /// credential helper and the cluster's certificate there): the test's own file, never
    /// the user's `~/.gitconfig`.
    pub fn gitconfig(&self) -> PathBuf {
        self.root.path().join("gitconfig")
    }

    /// Runs `git` from the test's own namespace in `dir`, with the test's git config, a
    /// fixed identity and no prompts (at most 120 s).
    pub fn git_here(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", self.gitconfig())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            // An environment's own CA bundle would override the cluster's certificate
            // that `flynn cluster add` configured for git.
            .env_remove("GIT_SSL_CAINFO")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.test")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.test")
            .env("FLYNNRC", self.root.path().join("rc-git"))
            .stdin(Stdio::null())
            .output()
            .expect("run git")
    }

    /// Like [`Self::flynn_here`], run in `dir` (a checkout, whose remote may name the app).
    pub fn flynn_here_in(&self, rc: &str, dir: &Path, args: &[&str]) -> Output {
        self.flynn_here_cmd(rc, args)
            .current_dir(dir)
            .output()
            .expect("run flynn")
    }

    /// Runs the `flynn` CLI from the test's own namespace (the admin network) with the
    /// flynnrc named `rc` (made on first use by the caller's `cluster add`).
    pub fn flynn_here(&self, rc: &str, args: &[&str]) -> Output {
        self.flynn_here_cmd(rc, args).output().expect("run flynn")
    }

    fn flynn_here_cmd(&self, rc: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg(bin_dir().join("flynn"))
            .args(args)
            .env("FLYNNRC", self.root.path().join(rc))
            .env_remove("FLYNN_APP")
            .env("GIT_CONFIG_GLOBAL", self.gitconfig())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Waits until `n` hosts say they are ready for jobs (instances of service `flynn-host`).
    pub async fn wait_ready_for_jobs(&self, n: usize) {
        let client = self.client(0);
        eventually(
            Duration::from_secs(30),
            "every host ready for jobs",
            || async {
                let svc = client.service("flynn-host").await.ok()?;
                (svc.instances.len() == n).then_some(())
            },
        )
        .await;
    }

    pub fn client(&self, i: usize) -> ControllerClient {
        ControllerClient::with_timeout(&self.hosts[i].url(), &self.key, Duration::from_secs(15))
    }

    pub fn client_with_timeout(&self, i: usize, timeout: Duration) -> ControllerClient {
        ControllerClient::with_timeout(&self.hosts[i].url(), &self.key, timeout)
    }

    pub fn host_client(&self, i: usize) -> HostClient {
        HostClient::new(
            &self.hosts[i].url(),
            Some(&self.secret),
            Duration::from_secs(30),
        )
    }

    /// Runs the `flynn` CLI inside host `i`'s namespace against that host's API
    /// (`127.0.0.1`), with a flynnrc of its own.
    pub fn flynn(&self, i: usize, args: &[&str]) -> Output {
        let rc = self.root.path().join(format!("flynnrc{i}"));
        if !rc.exists() {
            let out = self.run_in(
                i,
                "flynn",
                &[
                    "cluster",
                    "add",
                    "default",
                    &format!("127.0.0.1:{PORT}"),
                    &self.key,
                ],
                &rc,
            );
            assert!(out.status.success(), "cluster add: {out:?}");
        }
        self.run_in(i, "flynn", args, &rc)
    }

    /// The controller key rotation from Flynn's docs, every step through the CLI on host
    /// `i`: both keys for the web process, the new one alone, the override dropped. The
    /// fixture's key is then `new`, and the CLI's cluster entries are made again with it.
    pub fn rotate_controller_key(&mut self, i: usize, new: &str) {
        let old = self.key.clone();
        let both = format!("AUTH_KEY={old},{new}");
        let alone = format!("AUTH_KEY={new}");
        for args in [
            &["-a", "controller", "env", "set", "-t", "web", &both][..],
            &["-a", "controller", "env", "set", &alone][..],
            &["-a", "controller", "env", "unset", "-t", "web", "AUTH_KEY"][..],
        ] {
            ok(&self.flynn(i, args));
        }
        self.key = new.to_string();
        for h in 0..self.hosts.len() {
            let _ = std::fs::remove_file(self.root.path().join(format!("flynnrc{h}")));
        }
    }

    /// Runs `flynn-host` inside host `i`'s namespace, on that host's data dir.
    pub fn flynn_host(&self, i: usize, args: &[&str]) -> Output {
        let mut full = vec![
            "--data-dir",
            self.hosts[i].data_dir.to_str().expect("utf-8 path"),
        ];
        full.extend_from_slice(args);
        self.run_in(i, "flynn-host", &full, &self.root.path().join("unused-rc"))
    }

    fn run_in(&self, i: usize, bin: &str, args: &[&str], rc: &Path) -> Output {
        self.run_in_with(i, bin, args, rc, None)
    }

    fn run_in_with(
        &self,
        i: usize,
        bin: &str,
        args: &[&str],
        rc: &Path,
        input: Option<&[u8]>,
    ) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns, "timeout", "60"])
            .arg(bin_dir().join(bin))
            .args(args)
            .env("FLYNNRC", rc)
            .env_remove("FLYNN_APP")
            .env("GIT_CONFIG_GLOBAL", self.gitconfig())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cli");
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut stdin, &data);
            });
        }
        child.wait_with_output().expect("run cli")
    }

    /// Starts `flynn` in host `i`'s namespace with its stdin and stdout piped, for a test
    /// that talks to it as it runs (at most 60 s).
    pub fn spawn_flynn_piped(&self, i: usize, args: &[&str]) -> std::process::Child {
        let _ = self.flynn(i, &["apps"]); // makes the host's flynnrc once
        let rc = self.root.path().join(format!("flynnrc{i}"));
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns, "timeout", "60"])
            .arg(bin_dir().join("flynn"))
            .args(args)
            .env("FLYNNRC", rc)
            .env_remove("FLYNN_APP")
            .env("GIT_CONFIG_GLOBAL", self.gitconfig())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cli")
    }

    /// Starts a long-running `flynn` (like `log -f`) in host `i`'s namespace; its stdout
    /// goes to a file read by [`Following::output_so_far`]. Killed on drop.
    pub fn spawn_flynn_output(&self, i: usize, args: &[&str]) -> Following {
        let _ = self.flynn(i, &["apps"]); // makes the host's flynnrc once
        let rc = self.root.path().join(format!("flynnrc{i}"));
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = self.root.path().join(format!("following-{n}.out"));
        let out = std::fs::File::create(&path).expect("output file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns, "timeout", "120"])
            .arg(bin_dir().join("flynn"))
            .args(args)
            .env("FLYNNRC", rc)
            .env_remove("FLYNN_APP")
            .env("GIT_CONFIG_GLOBAL", self.gitconfig())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flynn");
        Following {
            _child: Background(child),
            path,
        }
    }

    /// Like [`Self::flynn`], with `input` piped to its stdin.
    pub fn flynn_with_stdin(&self, i: usize, args: &[&str], input: &[u8]) -> Output {
        let _ = self.flynn(i, &["apps"]); // makes the host's flynnrc once
        let rc = self.root.path().join(format!("flynnrc{i}"));
        self.run_in_with(i, "flynn", args, &rc, Some(input))
    }

    /// `flynn-host list` as seen from host `i`.
    pub async fn list(&self, i: usize) -> Vec<HostEntry> {
        self.host_client(i).list().await.expect("host list")
    }

    /// Polls host `from` until it names a leader that is not `except`; returns its index.
    pub async fn wait_leader(&self, from: usize, except: Option<usize>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = self.host_client(from).status().await {
                if let Some(addr) = s.leader_addr {
                    let idx = self
                        .hosts
                        .iter()
                        .position(|h| addr == format!("{}:{PORT}", h.ip));
                    if let Some(idx) = idx.filter(|i| Some(*i) != except) {
                        return idx;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader seen from host {from}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn dump_logs(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("----- host {i} ({})\n{}", h.ip, h.log_text()))
            .collect()
    }
}

/// A helper process in a namespace, killed on drop.
pub struct Background(Child);

/// A background command whose stdout is kept in a file.
pub struct Following {
    _child: Background,
    path: PathBuf,
}

impl Following {
    pub fn output_so_far(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.resume(i);
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.dump_logs());
        }
        // The daemons' and jobs' logs and the volumes stay for a look, when asked for.
        if std::env::var_os("FLYNN_TEST_KEEP").is_some() {
            self.root.disable_cleanup(true);
            eprintln!("kept: {}", self.root.path().display());
        }
        for h in &self.hosts {
            let _ = sh(&["ip", "link", "del", &h.link]);
            let _ = sh(&["ip", "netns", "del", &h.ns]);
            remove_job_namespaces(&h.data_dir);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
        if let Some((bridge2, router)) = &self.second_subnet {
            let _ = sh(&["ip", "netns", "del", router]);
            let _ = sh(&["ip", "link", "del", bridge2]);
            for leg in ["a", "b"] {
                let _ = sh(&["ip", "link", "del", &format!("flr{}{leg}", self.tag)]);
            }
        }
        for pool in &self.pools {
            destroy_pool(pool);
        }
    }
}

/// The pids of the job shims a host's daemon started that are still alive (each shim's
/// `jobs/ID/shim.pid` holds its pid and start time, so a reused pid is not taken for it).
pub fn live_shims(data_dir: &Path) -> Vec<u32> {
    let start_time = |pid: u32| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split_whitespace().nth(19).map(String::from)
    };
    std::fs::read_dir(data_dir.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("shim.pid")).ok()?;
            let (pid, started) = text.trim().split_once(' ')?;
            let pid: u32 = pid.parse().ok()?;
            (start_time(pid)? == started).then_some(pid)
        })
        .collect()
}

/// SIGKILLs the jobs a host's daemon left running (its shims; each job's processes end
/// with its shim).
fn kill_jobs(data_dir: &Path) {
    for pid in live_shims(data_dir) {
        let _ = sh(&["kill", "-9", &pid.to_string()]);
    }
}

/// Removes the job namespaces a killed host's daemon left (`flynn-ID-*` under /run/netns,
/// named for its node id; a daemon sweeps its own only when it starts again).
fn remove_job_namespaces(data_dir: &Path) {
    let Ok(id) = std::fs::read_to_string(data_dir.join("node_id")) else {
        return;
    };
    let Ok(id) = id.trim().parse::<u64>() else {
        return;
    };
    let prefix = format!("flynn-{:08x}-", id & 0xffff_ffff);
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&prefix) {
            let _ = sh(&["ip", "netns", "del", &name]);
        }
    }
}

/// Destroys a ZFS pool; zfs-fuse may call it busy for a few seconds after writes.
pub fn destroy_pool(pool: &str) {
    for _ in 0..60 {
        let _ = sh(&["zpool", "destroy", "-f", pool]);
        if !sh(&["zpool", "list", pool]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Retries `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The command's stdout; panics with its stderr if it failed.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command's stderr; panics if it succeeded.
pub fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Forwards TCP connections from `listen_ip` (e.g. the test's bridge address, which every
/// test host reaches) to `target` on this namespace's loopback, for servers that listen on
/// loopback only. Lives as long as the test process.
pub fn relay(listen_ip: &str, target: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind((listen_ip, 0)).expect("relay bind");
    let addr = listener.local_addr().expect("relay addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(inbound) = conn else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(target) else {
                continue;
            };
            let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            if let (Ok(a), Ok(b)) = (inbound.try_clone(), outbound.try_clone()) {
                pipe(a, outbound);
                pipe(b, inbound);
            }
        }
    });
    addr
}

/// Serves the files under `root` read-only over HTTP/1.0 GET on `listen_ip` (a release
/// repository, a package index, a git repository over the dumb protocol): 200 with the
/// bytes (a directory's index.html, any query ignored), 404 for anything else. Lives as
/// long as the test process.
pub fn serve_dir(listen_ip: &str, root: &Path) -> std::net::SocketAddr {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind((listen_ip, 0)).expect("file server bind");
    let addr = listener.local_addr().expect("file server addr");
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let Ok(reader) = conn.try_clone() else { return };
                let mut reader = std::io::BufReader::new(reader);
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                // The rest of the head, unread otherwise.
                let mut h = String::new();
                while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let path = line
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('/');
                // A directory is served as its index.html (as a package index's pages are).
                let file = (!path.split('/').any(|p| p == ".."))
                    .then(|| {
                        let p = root.join(path);
                        let p = if p.is_dir() { p.join("index.html") } else { p };
                        let html = p.extension().is_some_and(|e| e == "html");
                        std::fs::read(p).ok().map(|b| (b, html))
                    })
                    .flatten();
                let _ = match file {
                    Some((body, html)) => conn
                        .write_all(
                            format!(
                                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n{}\r\n",
                                body.len(),
                                if html {
                                    "Content-Type: text/html\r\n"
                                } else {
                                    ""
                                }
                            )
                            .as_bytes(),
                        )
                        .and_then(|_| conn.write_all(&body)),
                    None => conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                };
            });
        }
    });
    addr
}

/// The storage servers the blobstore's external backends are tested against, started (or
/// found) by `script/storage-servers`: their addresses and credentials, on loopback.
pub fn storage_servers() -> std::collections::BTreeMap<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../script/storage-servers");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run script/storage-servers");
    assert!(
        out.status.success(),
        "script/storage-servers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::env::var("FLYNN_STORAGE_DIR").unwrap_or("/var/tmp/flynn-storage".into());
    std::fs::read_to_string(Path::new(&dir).join("env"))
        .expect("storage servers' env file")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs `cmd` under a 20 s bound; true when it succeeded.
fn bounded(cmd: &[&str]) -> bool {
    Command::new("timeout")
        .arg("20")
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Does zfs-fuse do what a host's volume manager needs: make a pool on a file and a dataset
/// in it? zfs-fuse (ZFS in user space, the only ZFS this kernel has) sometimes wedges with
/// `zpool list` still answering while `zfs create` hangs, so the probe makes both.
fn zfs_works() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let file = dir.path().join("probe.img");
    let sized = std::fs::File::create(&file).and_then(|f| f.set_len(128 << 20));
    if sized.is_err() {
        return false;
    }
    // A name of its own each time: a probe pool that zfs-fuse still called busy when it was
    // destroyed must not make the next probe fail, which would restart zfs-fuse under a
    // live cluster's pools (leaving their mounts stale).
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pool = format!("flprobe{}n{n}", std::process::id());
    let file = file.to_string_lossy().into_owned();
    let ok = bounded(&["zpool", "create", "-f", &pool, &file])
        && bounded(&["zfs", "create", "-p", &format!("{pool}/data")]);
    // zfs-fuse may call a pool busy for a moment after a dataset was made in it.
    for _ in 0..25 {
        if bounded(&["zpool", "destroy", "-f", &pool]) || !bounded(&["zpool", "list", &pool]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ok
}

/// Kills zfs-fuse (releasing whatever hung on it) and starts a fresh one, as
/// script/lib.sh's start_zfs does.
fn restart_zfs_fuse() {
    let _ = Command::new("pkill")
        .args(["-9", "-x", "zfs-fuse"])
        .status();
    for _ in 0..100 {
        let running = Command::new("pgrep")
            .args(["-x", "zfs-fuse"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file("/var/lib/zfs/zpool.cache");
    let _ = Command::new("bash")
        .args([
            "-c",
            "setsid nohup zfs-fuse --no-daemon >>/var/log/zfs-fuse.log 2>&1 </dev/null &",
        ])
        .status();
    for _ in 0..200 {
        if bounded(&["zpool", "list", "-H"]) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
