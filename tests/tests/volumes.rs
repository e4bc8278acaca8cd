//! Volumes on real ZFS (zfs-fuse, started by `script/test`) across hosts in network
//! namespaces: each host opens a pool of its own at start; volumes are made, snapshotted,
//! sent whole and then incrementally to another host, a cut stream changes nothing, and the
//! control plane records every host's volumes. Needs root; `--test-threads=1`.

use std::time::Duration;

use flynn_client::SECRET_HEADER;
use flynn_tests::{eventually, Cluster, PORT};

fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn snapshots(v: &serde_json::Value) -> Vec<String> {
    v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_volumes_snapshot_and_send_between_hosts() {
    let mut c = Cluster::create(2);
    let pools = [c.with_zfs(0), c.with_zfs(1)];
    for i in 0..2 {
        c.start_daemon(i);
        c.wait_up(i);
    }
    c.bootstrap(2);
    c.wait_leader(0, None).await;
    eventually(
        Duration::from_secs(20),
        "both hosts in the cluster",
        || async { (c.list(0).await.len() == 2).then_some(()) },
    )
    .await;
    // Each host made its pool on a sparse file under its data dir and reports it.
    for (i, pool) in pools.iter().enumerate() {
        let vdev = c.hosts[i]
            .data_dir
            .join(format!("volumes/zfs/vdev/{pool}-zpool.vdev"));
        assert!(vdev.exists(), "{}", vdev.display());
        let status = ok(&c.flynn_host(i, &["status"]));
        assert_eq!(status["volumes"]["provider"], "zfs");
        assert_eq!(status["volumes"]["health"], "ONLINE");
        // The status names the router's I/O backend: io_uring, auto's pick on this machine.
        let want = match std::env::var("FLYNN_ROUTER_IO").as_deref() {
            Ok("epoll") => "epoll",
            _ => "uring",
        };
        assert_eq!(status["router"]["io"], want, "{status}");
    }

    let made = ok(&c.flynn_host(0, &["volume", "create", "--id", "pgdata", "--size", "64M"]));
    assert_eq!(made["size"], 64 << 20);
    let v0 = ok(&c.flynn_host(0, &["volume", "inspect", "pgdata"]));
    let path0 = std::path::PathBuf::from(v0["path"].as_str().unwrap());
    std::fs::write(path0.join("first"), b"one").unwrap();
    ok(&c.flynn_host(0, &["volume", "snapshot", "pgdata", "--name", "s1"]));

    // Whole, then incremental from the newest snapshot both hosts have.
    let ip1 = c.hosts[1].ip.clone();
    let sent = ok(&c.flynn_host(0, &["volume", "send", "pgdata", "--to", &ip1]));
    assert_eq!(
        (sent["sent"].as_str(), sent["from"].as_str()),
        (Some("s1"), None)
    );
    let v1 = ok(&c.flynn_host(1, &["volume", "inspect", "pgdata"]));
    let path1 = std::path::PathBuf::from(v1["path"].as_str().unwrap());
    assert_eq!(std::fs::read(path1.join("first")).unwrap(), b"one");
    std::fs::write(path0.join("second"), vec![2u8; 200_000]).unwrap();
    ok(&c.flynn_host(0, &["volume", "snapshot", "pgdata", "--name", "s2"]));
    let sent = ok(&c.flynn_host(0, &["volume", "send", "pgdata", "--to", &ip1]));
    assert_eq!(
        (sent["sent"].as_str(), sent["from"].as_str()),
        (Some("s2"), Some("s1"))
    );
    let v1 = ok(&c.flynn_host(1, &["volume", "inspect", "pgdata"]));
    assert_eq!(snapshots(&v1), ["s1", "s2"]);
    assert_eq!(std::fs::read(path1.join("second")).unwrap().len(), 200_000);

    // A receive cut mid-stream is refused and leaves the volume at s2.
    std::fs::write(path0.join("third"), vec![3u8; 300_000]).unwrap();
    ok(&c.flynn_host(0, &["volume", "snapshot", "pgdata", "--name", "s3"]));
    let stream = std::process::Command::new("zfs")
        .args(["send", "-i", "@s2", &format!("{}/data/pgdata@s3", pools[0])])
        .output()
        .unwrap()
        .stdout;
    assert!(stream.len() > 8192);
    let cut = reqwest::Client::new()
        .put(format!("http://{ip1}:{PORT}/host/volumes/pgdata/receive"))
        .header(SECRET_HEADER, &c.secret)
        .body(stream[..4096].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), 400, "{:?}", cut.text().await);
    let v1 = ok(&c.flynn_host(1, &["volume", "inspect", "pgdata"]));
    assert_eq!(snapshots(&v1), ["s1", "s2"]);
    assert!(!path1.join("third").exists());
    assert_eq!(
        std::fs::read(path1.join("second")).unwrap().len(),
        200_000,
        "s2's files are still there"
    );

    // The control plane holds both hosts' records, snapshots included.
    let all = ok(&c.flynn_host(1, &["volume", "list", "--all", "--json"]));
    let records = all.as_array().unwrap();
    assert_eq!(records.len(), 2, "{all}");
    assert!(records.iter().any(|r| snapshots(r) == ["s1", "s2", "s3"]));
    assert!(records.iter().any(|r| snapshots(r) == ["s1", "s2"]));

    // Bad input gets clear refusals.
    let out = c.flynn_host(0, &["volume", "create", "--id", "../etc"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let out = c.flynn_host(
        0,
        &[
            "volume",
            "send",
            "pgdata",
            "--to",
            &ip1,
            "--snapshot",
            "nope",
        ],
    );
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_a_host_that_cannot_open_its_pool_says_why() {
    let mut c = Cluster::create(2);
    // Told to use ZFS with a pool too small to make: the daemon stops at start, naming it.
    c.hosts[1].args = [
        "--volume-provider",
        "zfs",
        "--zpool-name",
        "flvbad",
        "--zpool-size",
        "1M",
    ]
    .map(String::from)
    .to_vec();
    c.start_daemon(1);
    assert_eq!(c.wait_exit(1, Duration::from_secs(15)), Some(false));
    let log = c.hosts[1].log_text();
    assert!(log.contains("flvbad") && log.contains("64 MiB"), "{log}");
    assert!(!c.hosts[1]
        .data_dir
        .join("volumes/zfs/vdev/flvbad-zpool.vdev")
        .exists());
    // With `auto`, the same failure falls back to plain directories: the host runs, and says
    // so in its log and in flynn-host status; snapshots are refused clearly.
    c.hosts[0].args = [
        "--volume-provider",
        "auto",
        "--zpool-name",
        "flvauto",
        "--zpool-size",
        "1M",
    ]
    .map(String::from)
    .to_vec();
    c.start_daemon(0);
    c.wait_up(0);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    let status = c.host_client(0).components().await.unwrap();
    assert_eq!(status["volumes"]["provider"], "dir");
    // flynn-host status says it too, and the log says why.
    let status = ok(&c.flynn_host(0, &["status"]));
    assert_eq!(status["volumes"]["provider"], "dir");
    let why = status["volumes"]["fallback"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("flvauto") && why.contains("64 MiB"),
        "{status}"
    );
    assert!(
        c.hosts[0].log_text().contains("plain directories"),
        "{}",
        c.hosts[0].log_text()
    );
    ok(&c.flynn_host(0, &["volume", "create", "--id", "plain"]));
    let out = c.flynn_host(0, &["volume", "snapshot", "plain"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs ZFS"));
    // Delete removes the volume and its record.
    ok(&c.flynn_host(0, &["volume", "delete", "plain"]));
    assert!(!c
        .flynn_host(0, &["volume", "inspect", "plain"])
        .status
        .success());
    let all = ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"]));
    assert_eq!(all.as_array().unwrap().len(), 0, "{all}");
}
