//! `script/install-flynn`: installs the binaries into a prefix, checks `--version`, and makes
//! the ZFS pool on a device (a sparse file standing in for the disk) with the daemon's own
//! code. Needs root and ZFS (zfs-fuse, started by `script/test`).

use std::path::Path;
use std::process::{Command, Output};

use flynn_tests::{bin_dir, destroy_pool};

fn install(args: &[&str]) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../script/install-flynn");
    Command::new("bash")
        .arg(script)
        .arg("--from")
        .arg(bin_dir())
        .args(args)
        .output()
        .expect("run install-flynn")
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
