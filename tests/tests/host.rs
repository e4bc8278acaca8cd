//! The daemon's own components and API edges, on real daemons in network namespaces: the
//! router inside `flynn-host daemon`, the controller served through it with a pinned
//! certificate, the API's slow-client limits, and ports the router keeps for itself.
//! Needs root; run with `--test-threads=1` like the other cluster cases.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flynn_client::{ErrorCode, InstanceRegistration};
use flynn_tests::router::{get, Backend};
use flynn_tests::{eventually, ok, Cluster, PORT};

fn http(c: &Cluster, i: usize) -> SocketAddr {
    format!("{}:80", c.hosts[i].ip).parse().unwrap()
}

/// Registers `backend` as an instance of `service`, the way a job will.
async fn register(c: &Cluster, service: &str, id: &str, backend: &Backend) {
    let reg = InstanceRegistration {
        addr: backend.addr.to_string(),
        ttl_ms: 120_000,
        meta: Default::default(),
    };
    c.client(0)
        .register_instance(service, id, &reg)
        .await
        .unwrap();
}

/// Waits until host `i`'s router answers `host` with 200 from `backend`.
async fn served_by(c: &Cluster, i: usize, host: &str, backend: &str) {
    let addr = http(c, i);
    eventually(
        Duration::from_secs(15),
        &format!("{host} served through host {i}'s router"),
        || async {
            let r = get(addr, host, "/").await;
            (r.status == 200 && r.json()["backend"] == backend).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_router_in_every_daemon_serves_a_route_added_through_flynn() {
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    ok(&c.flynn(1, &["create", "web"]));
    ok(&c.flynn(1, &["-a", "web", "route", "add", "http", "web.example.com"]));
    let backend = Backend::start_on("a", &c.bridge_ip()).await;
    // Before any instance the route exists on every host: 503, not 404.
    for i in 0..3 {
        let addr = http(&c, i);
        eventually(Duration::from_secs(15), "503 without instances", || async {
            (get(addr, "web.example.com", "/").await.status == 503).then_some(())
        })
        .await;
    }
    register(&c, "web-web", "i1", &backend).await;
    for i in 0..3 {
        served_by(&c, i, "web.example.com", "a").await;
    }
    // Each router reports what it serves, and its metrics join the daemon's.
    let components = c.host_client(2).components().await.unwrap();
    assert!(components["router"]["revision"].as_u64().unwrap() > 0);
    let listed = ok(&c.flynn_host(2, &["components"]));
    assert!(
        listed.contains("\"router\"") && listed.contains("controller-registration"),
        "{listed}"
    );
    let metrics = c.hosts[2].metrics_text().await;
    assert!(metrics.contains("flynn_router_requests_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_router_keeps_following_across_key_rotation_and_restart() {
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    ok(&c.flynn(0, &["create", "web"]));
    ok(&c.flynn(
        0,
        &["-a", "web", "route", "add", "http", "before.example.com"],
    ));
    let backend = Backend::start_on("a", &c.bridge_ip()).await;
    register(&c, "web-web", "i1", &backend).await;
    served_by(&c, 1, "before.example.com", "a").await;

    // The rotation from Flynn's docs, every step through the CLI.
    let old = c.key.clone();
    let new = "feedfacefeedfacefeedface0123456789abcdef".to_string();
    c.rotate_controller_key(0, &new);
    // As the docs go on: the CLI's cluster entry moves to the new key.
    ok(&c.flynn(0, &["cluster", "remove", "default"]));
    ok(&c.flynn(
        0,
        &[
            "cluster",
            "add",
            "default",
            &format!("127.0.0.1:{PORT}"),
            &new,
        ],
    ));
    let refused = flynn_client::ControllerClient::with_timeout(
        &c.hosts[0].url(),
        &old,
        Duration::from_secs(5),
    )
    .apps()
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(refused.status(), Some(401), "the old key still works");

    // A route added with the new key reaches every router; the old one still serves.
    c.client(0)
        .add_route(
            "web",
            &flynn_client::RouteRequest::http("after.example.com"),
        )
        .await
        .unwrap();
    for i in 0..3 {
        served_by(&c, i, "after.example.com", "a").await;
        served_by(&c, i, "before.example.com", "a").await;
    }

    // A restarted daemon's router comes back with the routes, and follows new ones.
    c.restart(2);
    served_by(&c, 2, "after.example.com", "a").await;
    ok(&c.flynn(
        0,
        &["-a", "web", "route", "add", "http", "restarted.example.com"],
    ));
    served_by(&c, 2, "restarted.example.com", "a").await;
}

/// Binds `0.0.0.0:port` inside host `i`'s namespace; true if the port was free.
fn port_free(c: &Cluster, i: usize, port: u16) -> bool {
    let script = format!(
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port}))"
    );
    c.run_cmd_in(i, &["python3", "-c", &script])
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn t12_no_router_leaves_the_ports_free() {
    let mut c = Cluster::create(2);
    c.hosts[1].args = vec!["--no-router".into()];
    for i in 0..2 {
        c.start_daemon(i);
        c.wait_up(i);
    }
    // The default daemon holds 80 and 443 from its start; --no-router holds neither.
    assert!(!port_free(&c, 0, 80) && !port_free(&c, 0, 443));
    assert!(port_free(&c, 1, 80) && port_free(&c, 1, 443));
    // A second daemon in a namespace whose port 80 is taken fails at start, naming it.
    c.hosts[1].args = vec![];
    let _holder = c.spawn_in(1, &["python3", "-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',80)); s.listen(); time.sleep(60)"]);
    std::thread::sleep(Duration::from_millis(500));
    c.kill(1);
    c.start_daemon(1);
    assert_eq!(c.wait_exit(1, Duration::from_secs(15)), Some(false));
    assert!(
        c.hosts[1].log_text().contains("0.0.0.0:80"),
        "{}",
        c.hosts[1].log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t13_tcp_routes_cannot_take_the_routers_ports() {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    ok(&c.flynn(0, &["create", "db"]));
    for port in ["80", "443", "1113"] {
        let out = c.flynn(0, &["-a", "db", "route", "add", "tcp", "--port", port]);
        assert!(!out.status.success(), "port {port} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("reserved") && err.lines().count() == 1,
            "{err}"
        );
    }
    let refused = c
        .client(0)
        .add_route(
            "db",
            &flynn_client::RouteRequest::Tcp {
                port: Some(443),
                service: None,
                leader: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(409));
    // Nothing was written: the app still has no routes.
    assert!(c.client(0).routes("db").await.unwrap().is_empty());
    ok(&c.flynn(0, &["-a", "db", "route", "add", "tcp", "--port", "3005"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn t14_controller_through_the_router_with_a_pinned_certificate() {
    let mut c = Cluster::start(3);
    let out = c.bootstrap_with(3, &["--domain", "dev.flynn.test"]);
    let pin = out["controller_pin"]
        .as_str()
        .expect("bootstrap prints the pin");
    // A one-host-per-request CLI on the admin network, through host 1's router on 443.
    let ip = c.hosts[1].ip.clone();
    ok(&c.flynn_here(
        "rc-pinned",
        &[
            "cluster",
            "add",
            "-p",
            pin,
            "--ip",
            &ip,
            "default",
            "dev.flynn.test",
            &c.key,
        ],
    ));
    // The line bootstrap prints works at once: it returns only once every host sees the
    // controller registered in discovery, which the routers follow.
    let apps = ok(&c.flynn_here("rc-pinned", &["apps"]));
    assert!(apps.contains("controller"), "{apps}");
    ok(&c.flynn_here("rc-pinned", &["create", "viarouter"]));
    assert!(c.client(0).app("viarouter").await.is_ok());
    // Every cluster reports its peers from the first revision on.
    let peers = ok(&c.flynn_here(
        "rc-pinned",
        &["-a", "discoverd", "env", "get", "DISCOVERD_PEERS"],
    ));
    assert_eq!(peers.trim().split(',').count(), 3, "{peers}");

    // Another certificate's pin is refused before any request is sent.
    let wrong = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    ok(&c.flynn_here(
        "rc-wrong",
        &[
            "cluster",
            "add",
            "-p",
            wrong,
            "--ip",
            &ip,
            "default",
            "dev.flynn.test",
            &c.key,
        ],
    ));
    let out = c.flynn_here("rc-wrong", &["create", "never"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pin") && err.lines().count() == 1, "{err}");
    assert!(c.client(0).app("never").await.is_err());
    // Plain HTTP to the controller's name is sent to HTTPS.
    let r = get(http(&c, 0), "controller.dev.flynn.test", "/apps").await;
    assert_eq!(r.status, 308);
}

#[tokio::test(flavor = "multi_thread")]
async fn t15_api_closes_connections_that_dribble_their_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(1);
    let addr = format!("{}:{PORT}", c.hosts[0].ip);
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /host/info HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut closed = false;
    // One header line a second, for up to 40 s (the bug kept this open for 75 s and more).
    while start.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                closed = true; // an error answer, then the close
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the API kept a dribbling connection open for 40 s");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    // An idle keep-alive connection is closed too, and a normal request still works.
    let info = flynn_client::HostClient::new(&c.hosts[0].url(), None, Duration::from_secs(5))
        .info()
        .await
        .unwrap();
    assert!(!info.initialized);
}

#[tokio::test(flavor = "multi_thread")]
async fn t16_one_host_cluster_reports_its_discoverd_peers() {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    let out = ok(&c.flynn(0, &["-a", "discoverd", "env", "get", "DISCOVERD_PEERS"]));
    assert_eq!(out.trim(), format!("{}:{PORT}", c.hosts[0].ip));
    // And the error codes the client reads are the server's.
    let missing = c.client(0).app("nope").await.unwrap_err();
    assert!(matches!(
        missing,
        flynn_client::ClientError::Api {
            code: ErrorCode::NotFound,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn t17_state_dump_and_get_read_the_cluster_state() {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    ok(&c.flynn(0, &["create", "web"]));
    ok(&c.flynn(0, &["-a", "web", "env", "set", "GREETING=hi"]));
    // One record, as the state stores it.
    let app: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(0, &["state", "get", "app/web"]))).unwrap();
    assert_eq!(app["env"]["global"]["GREETING"], "hi", "{app}");
    // Every record, one a line after the revision; or one JSON document.
    let dump = ok(&c.flynn_host(0, &["state", "dump"]));
    assert!(dump.starts_with("revision "), "{dump}");
    assert!(dump.lines().any(|l| l.starts_with("app/web\t")), "{dump}");
    let json: serde_json::Value = serde_json::from_str(&ok(
        &c.flynn_host(0, &["state", "dump", "--json", "--prefix", "app/"])
    ))
    .unwrap();
    assert!(json["revision"].as_u64().unwrap() > 0);
    let keys: Vec<&String> = json["records"].as_object().unwrap().keys().collect();
    assert!(keys.iter().all(|k| k.starts_with("app/")), "{keys:?}");
    assert!(keys.iter().any(|k| *k == "app/web"), "{keys:?}");
    // A missing key: one line on stderr, a non-zero exit, and what is near.
    let out = c.flynn_host(0, &["state", "get", "app/we"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no record") && err.contains("app/web"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
