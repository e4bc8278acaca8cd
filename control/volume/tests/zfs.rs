//! Volumes on real ZFS: Debian's zfs-fuse (this kernel has no ZFS module), started by
//! `script/test`. Each case makes pools on sparse files of its own, with names of its own,
//! and destroys them.

use std::io::{Read, Write};
use std::path::Path;

use flynn_volume::pool::ZfsPool;
use flynn_volume::{PoolConfig, Provider, VolumeError, ZfsCli};

/// zfs-fuse can deadlock in its FUSE mounts when pools are created concurrently (seen with
/// two creations at once): the cases take turns.
static ZFS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn zfs_ready() -> std::sync::MutexGuard<'static, ()> {
    let turn = ZFS.lock().unwrap_or_else(|e| e.into_inner());
    let ok = std::process::Command::new("zpool")
        .arg("list")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "ZFS is not running: script/test starts zfs-fuse (or start it: zfs-fuse)"
    );
    turn
}

/// A pool config of its own under `dir`, 128 MiB.
fn config(dir: &Path, tag: &str) -> PoolConfig {
    let mut c = PoolConfig::under(dir, &format!("fltest{}{tag}", std::process::id()));
    c.size = Some(128 * 1024 * 1024);
    c
}

struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    /// zfs-fuse may call a pool busy for a moment after writes: retry for a few seconds.
    fn drop(&mut self) {
        for pool in &self.0 {
            for _ in 0..60 {
                let _ = std::process::Command::new("zpool")
                    .args(["destroy", "-f", pool])
                    .output();
                let still_there = std::process::Command::new("zpool")
                    .args(["list", pool])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !still_there {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}

fn open(c: &PoolConfig) -> ZfsPool {
    ZfsPool::open(c, Box::new(ZfsCli)).unwrap()
}

#[test]
fn t20_pool_on_a_sparse_file_is_created_once_then_imported() {
    let _turn = zfs_ready();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "a");
    let _cleanup = Cleanup(vec![c.name.clone()]);
    let pool = open(&c);
    assert_eq!(pool.opened, "created");
    let file = c.vdev_file();
    assert!(file.ends_with(format!("volumes/zfs/vdev/{}-zpool.vdev", c.name)));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 128 * 1024 * 1024);
    assert_eq!(pool.health().unwrap(), "ONLINE");
    let p = Provider::Zfs(pool);
    let v = p.create("keep", None).unwrap();
    std::fs::write(v.path.join("f"), b"survives").unwrap();
    // The next start finds the pool already imported; after an export it imports the file
    // (never recreating it), and the data is still there.
    assert_eq!(open(&c).opened, "open");
    std::process::Command::new("zpool")
        .args(["export", &c.name])
        .output()
        .unwrap();
    let again = open(&c);
    assert_eq!(again.opened, "imported");
    let v = again.inspect("keep").unwrap();
    assert_eq!(std::fs::read(v.path.join("f")).unwrap(), b"survives");
}

#[test]
fn t21_volumes_snapshots_and_deletes() {
    let _turn = zfs_ready();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "b");
    let _cleanup = Cleanup(vec![c.name.clone()]);
    let p = Provider::Zfs(open(&c));
    let v = p.create("pg", Some(32 * 1024 * 1024)).unwrap();
    assert_eq!(v.size, Some(32 * 1024 * 1024));
    assert!(matches!(p.create("pg", None), Err(VolumeError::Exists(_))));
    std::fs::write(v.path.join("db"), vec![7u8; 100_000]).unwrap();
    let v = p.snapshot("pg", "s1").unwrap();
    assert_eq!(v.snapshots, vec!["s1".to_string()]);
    assert!(p.snapshot("nope", "s1").is_err());
    assert!(matches!(
        p.snapshot("pg", "bad name"),
        Err(VolumeError::Invalid(_))
    ));
    assert_eq!(p.list().unwrap().len(), 1);
    p.delete("pg").unwrap();
    assert!(matches!(p.inspect("pg"), Err(VolumeError::NotFound(_))));
    assert!(matches!(p.delete("pg"), Err(VolumeError::NotFound(_))));
}

/// Streams `from`'s send into `to`'s receive, cutting it after `limit` bytes if given.
fn pipe(
    from: &ZfsPool,
    to: &ZfsPool,
    id: &str,
    snap: &str,
    base: Option<&str>,
    limit: Option<usize>,
) -> Result<(), String> {
    let mut send = from.send(id, snap, base).map_err(|e| e.to_string())?;
    let mut recv = to.receive(id).map_err(|e| e.to_string())?;
    let mut stream = send.stdout.take().unwrap();
    let mut sink = recv.stdin.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut moved = 0;
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let n = match limit {
            Some(l) if moved + n > l => l - moved,
            _ => n,
        };
        sink.write_all(&buf[..n]).unwrap();
        moved += n;
        if limit.is_some_and(|l| moved >= l) {
            break;
        }
    }
    drop(sink);
    drop(stream);
    let _ = send.wait();
    let out = recv.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn t22_send_full_then_incremental_and_a_cut_receive_changes_nothing() {
    let _turn = zfs_ready();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cb) = (
        config(dir.path(), "src"),
        config(&dir.path().join("b"), "dst"),
    );
    let _cleanup = Cleanup(vec![ca.name.clone(), cb.name.clone()]);
    let (a, b) = (open(&ca), open(&cb));
    let v = a.create("web", None).unwrap();
    std::fs::write(v.path.join("one"), b"1").unwrap();
    a.snapshot("web", "s1").unwrap();
    pipe(&a, &b, "web", "s1", None, None).unwrap();
    let got = b.inspect("web").unwrap();
    assert_eq!(got.snapshots, vec!["s1".to_string()]);
    assert_eq!(std::fs::read(got.path.join("one")).unwrap(), b"1");

    // Incremental: only what changed since s1.
    std::fs::write(v.path.join("two"), vec![2u8; 300_000]).unwrap();
    a.snapshot("web", "s2").unwrap();
    std::fs::write(v.path.join("three"), vec![3u8; 300_000]).unwrap();
    a.snapshot("web", "s3").unwrap();
    pipe(&a, &b, "web", "s2", Some("s1"), None).unwrap();
    assert_eq!(b.inspect("web").unwrap().snapshots, vec!["s1", "s2"]);

    // A receive cut mid-stream fails and leaves the receiver at s2, its files intact.
    let cut = pipe(&a, &b, "web", "s3", Some("s2"), Some(4096));
    assert!(cut.is_err(), "a cut stream was accepted");
    let after = b.inspect("web").unwrap();
    assert_eq!(after.snapshots, vec!["s1", "s2"]);
    assert_eq!(
        std::fs::read(after.path.join("two")).unwrap().len(),
        300_000
    );
    assert!(!after.path.join("three").exists());
    // The whole stream still applies afterwards.
    pipe(&a, &b, "web", "s3", Some("s2"), None).unwrap();
    assert_eq!(b.inspect("web").unwrap().snapshots, vec!["s1", "s2", "s3"]);
    // A base the receiver does not have is refused by the sender's side first.
    assert!(a.send("web", "s3", Some("nope")).is_err());
}

#[test]
fn t23_pool_on_a_device_then_migrated_off_the_file_as_the_docs_write() {
    let _turn = zfs_ready();
    let dir = tempfile::tempdir().unwrap();
    // The "device" is a second sparse file standing in for a disk.
    let disk = dir.path().join("sdb");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 * 1024 * 1024)
        .unwrap();
    let mut c = config(dir.path(), "dev");
    c.device = Some(disk.to_string_lossy().into_owned());
    c.device_options = vec!["-f".into()];
    let _cleanup = Cleanup(vec![c.name.clone()]);
    let pool = open(&c);
    assert_eq!(pool.opened, "created");
    assert!(!c.vdev_file().exists(), "a device pool makes no file");
    drop(pool);

    // A file pool moves onto a disk: zpool attach, wait for the resilver, detach the file.
    let f = config(&dir.path().join("f"), "mig");
    let _cleanup2 = Cleanup(vec![f.name.clone()]);
    let p = Provider::Zfs(open(&f));
    let v = p.create("data", None).unwrap();
    std::fs::write(v.path.join("x"), vec![9u8; 200_000]).unwrap();
    let disk2 = dir.path().join("sdc");
    std::fs::File::create(&disk2)
        .unwrap()
        .set_len(128 * 1024 * 1024)
        .unwrap();
    let zpool = |args: &[&str]| {
        let o = std::process::Command::new("zpool")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "zpool {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let file = f.vdev_file().to_string_lossy().into_owned();
    zpool(&["attach", &f.name, &file, disk2.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while zpool(&["status", &f.name]).contains("resilver in progress") {
        assert!(
            std::time::Instant::now() < deadline,
            "resilver did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    zpool(&["detach", &f.name, &file]);
    let status = zpool(&["status", &f.name]);
    assert!(
        !status.contains(&file) && status.contains("sdc"),
        "{status}"
    );
    let v = p.inspect("data").unwrap();
    assert_eq!(std::fs::read(v.path.join("x")).unwrap().len(), 200_000);
}

#[test]
fn t24_a_pool_that_cannot_be_made_leaves_nothing_behind() {
    let _turn = zfs_ready();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "small");
    c.size = Some(1024 * 1024);
    assert!(matches!(
        ZfsPool::open(&c, Box::new(ZfsCli)),
        Err(VolumeError::Invalid(_))
    ));
    assert!(!c.vdev_file().exists());
    // A device that is not one: zpool refuses, and no file or pool is left.
    let mut d = config(dir.path(), "nodev");
    d.device = Some(
        dir.path()
            .join("missing-disk")
            .to_string_lossy()
            .into_owned(),
    );
    let err = ZfsPool::open(&d, Box::new(ZfsCli)).err().expect("refused");
    assert!(matches!(err, VolumeError::Command { .. }), "{err}");
    assert!(!d.vdev_file().exists());
    let listed = std::process::Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&d.name));
}
