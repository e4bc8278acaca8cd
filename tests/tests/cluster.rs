//! Multi-host cases: real `flynn-host daemon` processes in network namespaces.
//! Run as root, one at a time (`--test-threads=1`): each starts its own cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use flynn_client::{EnvUpdate, Role};
use flynn_tests::{eventually, Cluster, PORT};

fn set(k: &str, v: &str) -> EnvUpdate {
    EnvUpdate {
        proc_type: None,
        set: BTreeMap::from([(k.to_string(), v.to_string())]),
        unset: vec![],
    }
}

/// A bootstrapped 3-peer cluster, settled: the leader has also derived DISCOVERD_PEERS, so
/// no housekeeping write lands in the middle of a test.
async fn three_peers() -> Cluster {
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    eventually(Duration::from_secs(10), "DISCOVERD_PEERS set", || async {
        let env = c.client(0).env("discoverd", None).await.ok()?;
        (env.get("DISCOVERD_PEERS")?.split(',').count() == 3).then_some(())
    })
    .await;
    c
}

/// The revision host `i` has applied, after a linearizable read there (so it is current).
async fn revision(c: &Cluster, i: usize) -> u64 {
    c.client(i).apps().await.expect("barrier read");
    c.host_client(i).status().await.expect("status").revision
}

/// Writes `n` keys to `app` through `host`, returning what was acknowledged.
async fn write_keys(c: &Cluster, host: usize, app: &str, prefix: &str, n: usize) -> Vec<String> {
    let client = c.client(host);
    let mut acked = Vec::new();
    for i in 0..n {
        let k = format!("{prefix}{i}");
        client
            .update_env(app, &set(&k, &format!("v-{k}")))
            .await
            .unwrap_or_else(|e| panic!("write {k}: {e}"));
        acked.push(k);
    }
    acked
}

async fn assert_all_present(c: &Cluster, host: usize, app: &str, keys: &[String]) {
    let env = c.client(host).env(app, None).await.expect("read env");
    let missing: Vec<&String> = keys.iter().filter(|k| !env.contains_key(*k)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    for k in keys {
        assert_eq!(env[k], format!("v-{k}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_bootstrap_three_peers() {
    let c = three_peers().await;
    let hosts = c.list(1).await;
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    assert!(hosts.iter().all(|h| h.role == Role::Peer && h.reachable));
    assert_eq!(hosts.iter().filter(|h| h.leader).count(), 1);
    // The CLI shows the same, from inside a host.
    let out = c.flynn_host(2, &["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.matches(" peer ").count(), 3, "{text}");
    assert_eq!(text.matches(" leader ").count(), 1, "one leader: {text}");
    // System apps exist and DISCOVERD_PEERS is derived from the membership.
    let apps = c.client(0).apps().await.unwrap();
    for name in flynn_model::SYSTEM_APPS {
        assert!(apps.iter().any(|a| &a.name == name), "{name} missing");
    }
    let mut want: Vec<String> = c.hosts.iter().map(|h| format!("{}:{PORT}", h.ip)).collect();
    want.sort();
    eventually(Duration::from_secs(10), "DISCOVERD_PEERS", || async {
        let env = c.client(1).env("discoverd", None).await.ok()?;
        let mut got: Vec<String> = env
            .get("DISCOVERD_PEERS")?
            .split(',')
            .map(String::from)
            .collect();
        got.sort();
        (got == want).then_some(())
    })
    .await;
    // Those reads (forwarded by the followers) were answered under the leader's lease, not
    // each after a heartbeat round of its own.
    let leader = c.wait_leader(0, None).await;
    let leased = c.hosts[leader]
        .counter("flynn_raft_read_index_total{how=\"lease\"}")
        .await;
    assert!(leased > 0, "no read used the lease");
    // Replication went over the peers' streams, none of it as HTTP requests.
    let host = &c.hosts[leader];
    let streamed = host
        .counter("flynn_raft_peer_rpcs_total{transport=\"stream\"}")
        .await;
    let requests = host
        .counter("flynn_raft_peer_rpcs_total{transport=\"http\"}")
        .await;
    assert!(streamed > 0, "nothing went over a stream");
    assert_eq!(requests, 0, "RPCs sent as HTTP requests");
    // The stream is a Raft route: without the secret it is refused before any upgrade, and
    // another protocol token is told the one spoken here.
    let status_of = |secret: String, token: &'static str| {
        let addr = format!("{}:{PORT}", c.hosts[0].ip);
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let ask = format!(
                "GET /raft/stream HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: {token}\r\nx-flynn-cluster-secret: {secret}\r\n\r\n"
            );
            s.write_all(ask.as_bytes()).await.unwrap();
            let mut head = vec![0u8; 512];
            let n = s.read(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[..n]).into_owned()
        }
    };
    let head = status_of("wrong".into(), "flynn-raft-1").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let head = status_of(c.secret.clone(), "flynn-raft-9").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(head.contains("upgrade: flynn-raft-1"), "{head}");
    // Followers synced their appends as they wrote them.
    for (i, h) in c.hosts.iter().enumerate() {
        if i != leader {
            let inline = h.counter("flynn_raft_wal_inline_syncs_total").await;
            assert!(inline > 0, "host {i} synced no append inline");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t20_leader_kill_keeps_every_acknowledged_write() {
    let mut c = three_peers().await;
    c.client(0).create_app("acked").await.unwrap();
    let leader = c.wait_leader(0, None).await;
    let other = (leader + 1) % 3;
    let mut acked = write_keys(&c, other, "acked", "before", 40).await;
    let logged_before: Vec<usize> = c.hosts.iter().map(|h| h.log_text().len()).collect();
    c.kill(leader);
    let new_leader = c.wait_leader(other, Some(leader)).await;
    assert_ne!(new_leader, leader);
    // Writes succeed again, through either survivor.
    acked.extend(write_keys(&c, other, "acked", "after", 10).await);
    let survivor = (0..3).find(|i| *i != leader && *i != other).unwrap();
    acked.extend(write_keys(&c, survivor, "acked", "after2-", 10).await);
    assert_all_present(&c, other, "acked", &acked).await;
    // Reads confirm leadership with every peer, the dead one too: the leader says once that
    // it does not answer, not an error per read and per replication retry.
    for _ in 0..8 {
        c.client(new_leader).env("acked", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let since_kill = |c: &Cluster, i: usize| c.hosts[i].log_text()[logged_before[i]..].to_string();
    let log = since_kill(&c, new_leader);
    assert!(
        !log.contains("confirming leadership") && !log.contains("RPCError"),
        "{log}"
    );
    assert_eq!(
        log.matches("a Raft peer does not answer").count(),
        1,
        "{log}"
    );
    // The killed host comes back and catches up with everything.
    c.restart(leader);
    eventually(
        Duration::from_secs(15),
        "restarted host caught up",
        || async {
            let env = c.client(leader).env_stale("acked").await.ok()?;
            acked.iter().all(|k| env.contains_key(k)).then_some(())
        },
    )
    .await;
    let back = since_kill(&c, new_leader);
    assert!(back.contains("a Raft peer answers again"), "{back}");
}

/// A peer that was down while the others compacted their logs past what it holds catches up
/// from a snapshot the leader sends in several chunks (0.9's InstallSnapshot RPC, through
/// `openraft-legacy`), then follows the log again.
#[tokio::test(flavor = "multi_thread")]
async fn t22_a_peer_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let mut c = Cluster::create(3);
    for h in &mut c.hosts {
        // A snapshot every 40 entries, 4 kept behind it, sent in 1 KiB chunks.
        h.env.push(("FLYNN_RAFT_SNAPSHOT_LOGS".into(), "40".into()));
        h.env
            .push(("FLYNN_RAFT_SNAPSHOT_CHUNK".into(), "1024".into()));
    }
    for i in 0..3 {
        c.start_daemon(i);
    }
    for i in 0..3 {
        c.wait_up(i);
    }
    c.bootstrap(3);
    let leader = c.wait_leader(0, None).await;
    let behind = (leader + 1) % 3;
    c.client(leader).create_app("snap").await.unwrap();
    c.kill(behind);
    // The stopped peer holds no entry the leader does not.
    let held = c.hosts[leader].counter("flynn_raft_last_log_index").await;
    let mut acked = write_keys(&c, leader, "snap", "k", 200).await;
    // The leader purges only while no replication holds the entries in flight, and the one
    // to the stopped peer holds them between its failed sends: the purge comes with the
    // next failure, maybe after the writes.
    eventually(
        Duration::from_secs(30),
        "the log purged past the stopped peer",
        || async {
            let purged = c.hosts[leader].counter("flynn_raft_purged_index").await;
            (purged > held).then_some(())
        },
    )
    .await;
    c.restart(behind);
    eventually(Duration::from_secs(30), "the peer caught up", || async {
        let env = c.client(behind).env_stale("snap").await.ok()?;
        acked.iter().all(|k| env.contains_key(k)).then_some(())
    })
    .await;
    assert!(
        c.hosts[behind]
            .counter("flynn_raft_snapshots_installed_total")
            .await
            >= 1,
        "caught up without a snapshot: the log was not compacted past it"
    );
    let size = c.hosts[behind]
        .counter("flynn_raft_snapshot_size_bytes")
        .await;
    assert!(
        size > 4 * 1024,
        "a snapshot of {size} bytes is not several chunks"
    );
    // Then it follows the log again, and counts in a quorum: with the third peer down,
    // writes still commit.
    let third = (leader + 2) % 3;
    c.kill(third);
    acked.extend(write_keys(&c, leader, "snap", "after", 5).await);
    assert_all_present(&c, behind, "snap", &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t30_full_restart_keeps_state() {
    let mut c = three_peers().await;
    c.client(0).create_app("durable").await.unwrap();
    let acked = write_keys(&c, 1, "durable", "k", 20).await;
    c.client(2)
        .add_route(
            "durable",
            &flynn_client::RouteRequest::Tcp {
                port: None,
                service: None,
                leader: false,
            },
        )
        .await
        .unwrap();
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_daemon(i);
    }
    for i in 0..3 {
        c.wait_up(i);
    }
    c.wait_leader(0, None).await;
    assert_all_present(&c, 2, "durable", &acked).await;
    let routes = c.client(0).routes("durable").await.unwrap();
    assert_eq!(routes.len(), 1);
    // And the cluster still takes writes.
    write_keys(&c, 0, "durable", "post", 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t40_partitioned_leader_cannot_commit_majority_can() {
    let c = three_peers().await;
    c.client(0).create_app("split").await.unwrap();
    let leader = c.wait_leader(0, None).await;
    let a = (leader + 1) % 3;
    let b = (leader + 2) % 3;
    c.cut(leader);
    // The cut-off side: a write through the old leader's own API must not succeed.
    let out = c.flynn(leader, &["-a", "split", "env", "set", "SIDE=minority"]);
    assert!(!out.status.success(), "minority write succeeded: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    // The majority elects a new leader and commits.
    let new_leader = c.wait_leader(a, Some(leader)).await;
    assert!(new_leader == a || new_leader == b);
    c.client(a)
        .update_env("split", &set("SIDE", "majority"))
        .await
        .expect("majority write");
    // A read through the cut-off old leader must not answer without that write: it cannot
    // confirm its leadership, and its read lease ran out long ago.
    // (The CLI runs in the host's namespace, so it reaches that host while the link is down.)
    let out = c.flynn(leader, &["-a", "split", "env"]);
    assert!(
        !out.status.success(),
        "the cut-off leader answered a read: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leader"), "{err}");
    c.heal(leader);
    // After healing every host converges on one history: the majority's.
    for i in 0..3 {
        eventually(Duration::from_secs(15), "hosts converge", || async {
            let env = c.client(i).env_stale("split").await.ok()?;
            (env.get("SIDE").map(String::as_str) == Some("majority")).then_some(())
        })
        .await;
    }
    let revs: Vec<u64> = futures_join(&c).await;
    assert!(
        revs.windows(2).all(|w| w[0] == w[1]),
        "revisions differ: {revs:?}"
    );
}

async fn futures_join(c: &Cluster) -> Vec<u64> {
    eventually(Duration::from_secs(10), "equal revisions", || async {
        let mut revs = Vec::new();
        for i in 0..c.hosts.len() {
            revs.push(c.host_client(i).status().await.ok()?.revision);
        }
        revs.windows(2).all(|w| w[0] == w[1]).then_some(revs)
    })
    .await
}

/// Adds a host that joins the running cluster as a proxy, the way an operator would:
/// `flynn-host init --peer-ips ... --secret ...` then the daemon (not waited for).
fn join_new_host(c: &mut Cluster, env: Vec<(String, String)>) -> usize {
    let i = c.add_host();
    c.hosts[i].env = env;
    let peers: Vec<String> = c.hosts[..i].iter().map(|h| h.ip.clone()).collect();
    let out = c.flynn_host(
        i,
        &[
            "init",
            "--peer-ips",
            &peers.join(","),
            "--secret",
            &c.secret.clone(),
        ],
    );
    assert!(out.status.success(), "init: {out:?}");
    c.start_daemon(i);
    i
}

#[tokio::test(flavor = "multi_thread")]
async fn t50_proxy_joins_is_promoted_and_dead_peer_is_forced_out() {
    let mut c = three_peers().await;
    c.client(0).create_app("grow").await.unwrap();
    write_keys(&c, 0, "grow", "k", 5).await;
    let d = join_new_host(&mut c, vec![]);
    c.wait_up(d);
    let d_addr = format!("{}:{PORT}", c.hosts[d].ip);
    eventually(
        Duration::from_secs(15),
        "4th host listed as proxy",
        || async {
            let hosts = c.host_client(0).list().await.ok()?;
            hosts
                .iter()
                .any(|h| h.addr == d_addr && h.role == Role::Proxy && h.reachable)
                .then_some(())
        },
    )
    .await;
    // The proxy serves reads from its own state and forwards writes.
    eventually(Duration::from_secs(10), "proxy caught up", || async {
        let env = c.client(d).env_stale("grow").await.ok()?;
        env.contains_key("k4").then_some(())
    })
    .await;
    c.client(d)
        .update_env("grow", &set("VIA", "proxy"))
        .await
        .expect("write via proxy");
    assert_eq!(c.client(0).env("grow", None).await.unwrap()["VIA"], "proxy");
    assert_eq!(c.client(d).status().await.unwrap().role, Role::Proxy);

    // Promote it with the CLI, run on the proxy itself.
    let out = c.flynn_host(d, &["promote", &c.hosts[d].ip.clone()]);
    assert!(out.status.success(), "promote: {out:?}");
    // The promoted host learns of it when the membership entry reaches it.
    eventually(
        Duration::from_secs(5),
        "promoted host sees itself a peer",
        || async { (c.client(d).status().await.ok()?.role == Role::Peer).then_some(()) },
    )
    .await;

    // A peer dies for good. A plain demote is refused; --force removes it.
    let leader = c.wait_leader(0, None).await;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    c.kill(victim);
    let victim_ip = c.hosts[victim].ip.clone();
    let out = c.flynn_host(d, &["demote", &victim_ip]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unreachable") && err.contains("--force"),
        "{err}"
    );
    let out = c.flynn_host(d, &["demote", "--force", &victim_ip]);
    assert!(out.status.success(), "demote --force: {out:?}");
    let hosts = c.list(d).await;
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    assert!(hosts.iter().all(|h| h.role == Role::Peer));
    assert!(!hosts
        .iter()
        .any(|h| h.addr.starts_with(&format!("{victim_ip}:"))));

    // The cluster (3 peers again) survives one more peer loss.
    let second = (0..3).find(|i| *i != victim && *i != leader).unwrap();
    c.kill(second);
    c.wait_leader(d, Some(second)).await;
    c.client(d)
        .update_env("grow", &set("AFTER", "loss"))
        .await
        .expect("write after loss");
    // A forced demote that would leave no quorum is refused: only 2 of 3 peers remain,
    // and removing the live leader would leave 1 reachable of 2.
    let leader = c.wait_leader(d, Some(second)).await;
    let out = c.flynn_host(d, &["demote", "--force", &c.hosts[leader].ip.clone()]);
    assert!(
        !out.status.success(),
        "quorum-breaking demote allowed: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("quorum"));
}

#[tokio::test(flavor = "multi_thread")]
async fn t60_version_mismatch_is_refused_at_join() {
    let mut c = three_peers().await;
    let i = join_new_host(&mut c, vec![("FLYNN_HOST_VERSION".into(), "9.9.9".into())]);
    let exited = c.wait_exit(i, Duration::from_secs(20));
    assert_eq!(
        exited,
        Some(false),
        "mismatched host should exit with an error"
    );
    let log = c.hosts[i].log_text();
    assert!(
        log.contains("9.9.9") && log.contains(env!("CARGO_PKG_VERSION")),
        "{log}"
    );
    let hosts = c.list(0).await;
    assert_eq!(
        hosts.len(),
        3,
        "mismatched host must not be a member: {hosts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t70_bad_input_gets_clear_errors_and_changes_nothing() {
    let c = three_peers().await;
    c.client(0).create_app("strict").await.unwrap();
    let before = revision(&c, 0).await;
    let url = c.hosts[1].url();
    let http = reqwest_lite(&url, &c.key);
    // Malformed JSON, unknown app, oversized body, bad key, no key.
    let cases = [
        (
            "POST",
            "/apps",
            "{not json".to_string(),
            Some(c.key.as_str()),
            400,
        ),
        (
            "POST",
            "/apps/nope/env",
            r#"{"set":{"A":"1"}}"#.to_string(),
            Some(c.key.as_str()),
            404,
        ),
        (
            "POST",
            "/apps",
            "x".repeat(10 * 1024 * 1024),
            Some(c.key.as_str()),
            413,
        ),
        (
            "POST",
            "/apps",
            r#"{"name":"sneaky"}"#.to_string(),
            Some("wrong-key-wrong-key"),
            401,
        ),
        (
            "POST",
            "/apps",
            r#"{"name":"sneaky"}"#.to_string(),
            None,
            401,
        ),
        (
            "POST",
            "/apps",
            r#"{"name":"Bad Name"}"#.to_string(),
            Some(c.key.as_str()),
            400,
        ),
        (
            "POST",
            "/apps/strict/env",
            r#"{"set":{"A=B":"1"}}"#.to_string(),
            Some(c.key.as_str()),
            400,
        ),
    ];
    for (method, path, body, key, want) in cases {
        let (status, json) = http(method, path, body, key);
        assert_eq!(status, want, "{method} {path}: {json}");
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|_| panic!("not JSON: {json}"));
        assert!(v["error"].is_string() && v["message"].is_string(), "{json}");
    }
    let after = revision(&c, 0).await;
    assert_eq!(before, after, "a refused request changed the cluster");
    assert!(c.client(0).app("sneaky").await.is_err());
    // The CLI: an unknown flag and an unknown app each give one error line and exit != 0.
    let out = c.flynn(0, &["-a", "strict", "env", "set", "--bogus", "A=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    let out = c.flynn(0, &["-a", "nope", "env"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
}

/// A tiny blocking HTTP client for raw requests (bodies the typed client would not send).
fn reqwest_lite(
    base: &str,
    _key: &str,
) -> impl Fn(&str, &str, String, Option<&str>) -> (u16, String) {
    let base = base.to_string();
    move |method, path, body, key| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                "@-",
            ]);
        if let Some(k) = key {
            cmd.args(["-H", &format!("authorization: Bearer {k}")]);
        }
        cmd.arg(format!("{base}{path}"));
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl");
        let _ = child.stdin.take().unwrap().write_all(body.as_bytes());
        let out = child.wait_with_output().expect("curl output");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (json, code) = text.rsplit_once('\n').expect("status line");
        (code.trim().parse().expect("status"), json.to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t80_controller_key_rotation_as_in_flynn_docs() {
    let c = three_peers().await;
    let old = c.key.clone();
    let new = "0123456789abcdef0123456789abcdef";
    let run = |args: &[&str]| {
        let out = c.flynn(1, args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(&[
        "-a",
        "controller",
        "env",
        "set",
        "-t",
        "web",
        &format!("AUTH_KEY={old},{new}"),
    ]);
    for app in [
        "dashboard",
        "status",
        "gitreceive",
        "taffy",
        "router",
        "blobstore",
    ] {
        run(&["-a", app, "env", "set", &format!("CONTROLLER_KEY={new}")]);
    }
    run(&["-a", "controller", "env", "set", &format!("AUTH_KEY={new}")]);
    run(&["-a", "controller", "env", "unset", "-t", "web", "AUTH_KEY"]);
    // Every host now refuses the old key and accepts the new one.
    for i in 0..3 {
        eventually(Duration::from_secs(5), "old key refused", || async {
            let r = flynn_client::ControllerClient::new(&c.hosts[i].url(), &old)
                .apps()
                .await;
            (r.err()?.status() == Some(401)).then_some(())
        })
        .await;
        flynn_client::ControllerClient::new(&c.hosts[i].url(), new)
            .apps()
            .await
            .expect("new key works");
    }
    let env = flynn_client::ControllerClient::new(&c.hosts[0].url(), new)
        .env("status", None)
        .await
        .unwrap();
    assert_eq!(env["CONTROLLER_KEY"], new);
}

#[tokio::test(flavor = "multi_thread")]
async fn t85_watch_streams_and_resumes_and_instances_expire() {
    let c = three_peers().await;
    let client = c.client(2);
    client.create_app("web").await.unwrap();
    let first = client
        .add_route("web", &flynn_client::RouteRequest::http("web.example.com"))
        .await
        .unwrap();
    // A fresh watcher gets a reset, the full state, and a synced mark.
    let mut lines = Vec::new();
    let mut synced_at = 0;
    client
        .watch(0, |l| {
            let done = matches!(l, flynn_client::WatchLine::Synced { .. });
            if let flynn_client::WatchLine::Synced { revision } = &l {
                synced_at = *revision;
            }
            lines.push(l);
            !done
        })
        .await
        .unwrap();
    assert!(matches!(lines[0], flynn_client::WatchLine::Reset { .. }));
    assert!(lines.iter().any(|l| matches!(l, flynn_client::WatchLine::Event(e)
        if matches!(&e.kind, flynn_model::EventKind::RouteSet { route } if route.id() == first.id()))));
    // An instance registers with a short TTL on another host; a watcher resuming from the
    // earlier revision sees it come up, and then expire without heartbeats.
    c.client(0)
        .register_instance(
            "web-web",
            "i1",
            &flynn_client::InstanceRegistration {
                addr: "10.0.0.9:8080".into(),
                ttl_ms: 1500,
                meta: Default::default(),
            },
        )
        .await
        .unwrap();
    let svc = c.client(1).service("web-web").await.unwrap();
    assert_eq!(svc.instances.len(), 1);
    let mut seen = Vec::new();
    let watch = client.watch(synced_at, |l| {
        if let flynn_client::WatchLine::Event(e) = &l {
            seen.push(e.kind.clone());
        }
        !seen
            .iter()
            .any(|k| matches!(k, flynn_model::EventKind::InstanceDown { id, .. } if id == "i1"))
    });
    tokio::time::timeout(Duration::from_secs(15), watch)
        .await
        .expect("instance expiry seen within 15s")
        .unwrap();
    assert!(
        matches!(seen[0], flynn_model::EventKind::InstanceUp { .. }),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|k| matches!(k, flynn_model::EventKind::RouteSet { .. })),
        "resume replays nothing old: {seen:?}"
    );
    assert_eq!(
        c.client(1).service("web-web").await.unwrap_err().status(),
        Some(404)
    );
    // A refused watch reports the server's error, like every other call.
    let refused = flynn_client::ControllerClient::new(&c.hosts[0].url(), "not-a-valid-key-at-all")
        .watch(0, |_| true)
        .await
        .unwrap_err();
    match &refused {
        flynn_client::ClientError::Api {
            status,
            code,
            message,
        } => assert_eq!(
            (*status, code, message.as_str()),
            (
                401,
                &flynn_client::ErrorCode::Unauthorized,
                "invalid controller key"
            )
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t95_recovery_after_quorum_loss() {
    let mut c = three_peers().await;
    c.client(0).create_app("precious").await.unwrap();
    let acked = write_keys(&c, 0, "precious", "k", 10).await;
    // Two of three peers are lost for good: no quorum, writes cannot commit.
    c.kill(1);
    c.kill(2);
    let r = c
        .client_with_timeout(0, Duration::from_secs(30))
        .update_env("precious", &set("X", "1"))
        .await;
    assert!(r.is_err(), "write without quorum succeeded");
    // Documented recovery: stop the survivor, `flynn-host recover`, start it again.
    c.kill(0);
    let out = c.flynn_host(0, &["recover"]);
    assert!(out.status.success(), "recover: {out:?}");
    c.start_daemon(0);
    c.wait_up(0);
    eventually(
        Duration::from_secs(20),
        "recovered single-peer cluster",
        || async {
            let hosts = c.host_client(0).list().await.ok()?;
            (hosts.len() == 1 && hosts[0].leader).then_some(())
        },
    )
    .await;
    // The controller API answers once the saved state is back (503 until then).
    eventually(Duration::from_secs(20), "state restored", || async {
        c.client(0).apps().await.ok()
    })
    .await;
    assert_all_present(&c, 0, "precious", &acked).await;
    c.client(0)
        .update_env("precious", &set("AFTER", "recovery"))
        .await
        .expect("write after recovery");
    // A replacement host joins the recovered cluster and is promoted.
    let fresh = join_new_host(&mut c, vec![]);
    c.wait_up(fresh);
    eventually(Duration::from_secs(15), "replacement joined", || async {
        let env = c.client(fresh).env_stale("precious").await.ok()?;
        (env.get("AFTER").map(String::as_str) == Some("recovery")).then_some(())
    })
    .await;
    let out = c.flynn_host(0, &["promote", &c.hosts[fresh].ip.clone()]);
    assert!(out.status.success(), "promote: {out:?}");
}
