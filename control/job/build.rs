//! Stamps the crate with a digest of its own sources (`FLYNN_JOB_BUILD`), so the daemon
//! uses a separate `flynn-init` binary only if it was built from the same container init
//! and shim code as itself.

use std::path::Path;

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    let mut all = Vec::new();
    files(Path::new("src"), &mut all);
    all.sort();
    // FNV-1a over each file's path and bytes: stable across runs and toolchains.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &all {
        let name = p.to_string_lossy().into_owned().into_bytes();
        for b in name.iter().chain(&std::fs::read(p).unwrap_or_default()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!(
        "cargo:rustc-env=FLYNN_JOB_BUILD={}-{h:016x}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}
