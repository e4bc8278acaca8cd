//! Operating a cluster, on real daemons in network namespaces: the status page with its key
//! rule, cluster backup and restore, app export and import.
//! Needs root; run with `--test-threads=1` like the other cluster cases.

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

    // A hung host: the page still answers within its bound, 500, naming that host.
    c.pause(2);
    let started = Instant::now();
    let r = get_from(admin, http(&c, 0), &status_host(), "/", "").await;
    let took = started.elapsed();
    c.resume(2);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let v = r.json();
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
