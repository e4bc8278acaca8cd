//! The XDP firewall on a real interface: a flynn-host daemon filters its veth inside its own
//! namespace; other namespaces on the bridge probe it from outside and inside the cluster's
//! prefixes. Needs root; run with `--test-threads=1` like the cluster cases.

use std::time::Duration;

use flynn_client::EnvUpdate;
use flynn_tests::{eventually, Cluster};

fn probe() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/netprobe.py").to_string()
}

fn ok(out: &std::process::Output) -> bool {
    out.status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn t30_firewall_filters_a_real_interface_and_follows_the_cluster() {
    let mut c = Cluster::create(1);
    let outsider = c.add_host();
    let flooder = c.add_host();
    let insider = c.add_host();
    // The test talks to the daemon's API from the bridge address: that is the admin network.
    let admin = format!("{}/32", c.bridge_ip());
    c.hosts[0].args = [
        "--firewall-iface",
        "eth0",
        "--firewall-internal",
        &admin,
        "--firewall-syn-rate",
        "5",
        "--firewall-syn-burst",
        "10",
    ]
    .map(String::from)
    .to_vec();
    c.start_daemon(0);
    c.wait_up(0);
    c.bootstrap(1);
    let host_ip = c.hosts[0].ip.clone();
    let py = probe();
    let _services = c.spawn_in(
        0,
        &[
            "python3", &py, "listen", "80", "443", "3000", "3500", "22", "5432", "8080",
        ],
    );
    let _echo = c.spawn_in(outsider, &["python3", &py, "udp-echo", "5353"]);
    let _outside_tcp = c.spawn_in(outsider, &["python3", &py, "listen", "9000"]);
    std::thread::sleep(Duration::from_millis(500));

    let connect = |from: usize, port: &str| {
        ok(&c.run_cmd_in(from, &["python3", &py, "connect", &host_ip, port, "1"]))
    };
    // From outside: 80, 443 and the TCP route range only.
    for port in ["80", "443", "3000", "3500"] {
        assert!(
            connect(outsider, port),
            "port {port} should be open from outside"
        );
    }
    for port in ["22", "5432", "8080"] {
        assert!(
            !connect(outsider, port),
            "port {port} should be closed from outside"
        );
    }

    // The host's own outbound TCP and a DNS-style UDP exchange still work.
    let outsider_ip = c.hosts[outsider].ip.clone();
    assert!(ok(&c.run_cmd_in(
        0,
        &["python3", &py, "connect", &outsider_ip, "9000", "2"]
    )));
    assert!(
        ok(&c.run_cmd_in(0, &["python3", &py, "udp-ask", &outsider_ip, "5353", "2"])),
        "reply to the host's own UDP query was dropped"
    );

    // The cluster config widens the internal set: the insider then reaches everything.
    assert!(!connect(insider, "22"));
    let insider_prefix = format!("{}/32", c.hosts[insider].ip);
    c.client(0)
        .update_env(
            "router",
            &EnvUpdate {
                set: [("FIREWALL_INTERNAL_PREFIXES".to_string(), insider_prefix)].into(),
                ..EnvUpdate::default()
            },
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "insider reaches port 22",
        || async { connect(insider, "22").then_some(()) },
    )
    .await;
    assert!(connect(insider, "5432"));
    assert!(!connect(outsider, "22"), "outsiders still may not");

    // A SYN flood from one source is cut while another source keeps connecting.
    let flood = c.spawn_in(
        flooder,
        &["python3", &py, "syn-flood", &host_ip, "80", "3000", "3"],
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        assert!(
            connect(outsider, "80"),
            "a second source connects during the flood"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    drop(flood);

    // Counters, through the CLI on the host itself, match the traffic.
    let out = c.flynn_host(0, &["firewall", "status", "--json"]);
    assert!(ok(&out), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["interfaces"][0]["name"], "eth0");
    let count = |verdict: &str, reason: &str| -> u64 {
        status["counters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["verdict"] == verdict && r["reason"] == reason)
            .map(|r| r["packets"].as_u64().unwrap())
            .sum()
    };
    assert!(
        count("drop", "tcp_port") >= 4,
        "22, 5432, 8080 and 22 again: {status}"
    );
    assert!(count("drop", "syn_flood") >= 2500, "flood drops: {status}");
    assert!(count("pass", "udp_reply") >= 1, "{status}");
    assert!(count("pass", "tcp_allowed") >= 7, "{status}");
    assert!(count("pass", "internal") >= 2, "{status}");
    // The same counters on the host's Prometheus endpoint.
    let metrics = c.run_cmd_in(0, &["python3", "-c", "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:1113/metrics').read().decode())"]);
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("flynn_firewall_packets_total{verdict=\"drop\",reason=\"syn_flood\",port_class=\"http\"}"),
        "{text}"
    );

    // SIGTERM: the daemon detaches on its way out, and the host is unfiltered again.
    drop(_services);
    let _services = c.spawn_in(0, &["python3", &py, "listen", "22"]);
    c.signal(0, "TERM");
    assert_eq!(
        c.wait_exit(0, Duration::from_secs(15)),
        Some(true),
        "clean exit"
    );
    std::thread::sleep(Duration::from_millis(300));
    let open = c.run_cmd_in(outsider, &["python3", &py, "connect", &host_ip, "22", "1"]);
    assert!(ok(&open), "still filtering after shutdown");
}
