//! Builds the kernel-side program (ebpf/xdp) with nightly and bpf-linker, and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`. Without the toolchain, fails with what to run.

use std::process::Command;

fn has(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../xdp/src");
    println!("cargo:rerun-if-changed=../common/src");
    let missing: Vec<&str> = [
        (!has("bpf-linker", &["--version"])).then_some("bpf-linker"),
        (!has("rustup", &["run", "nightly", "rustc", "--version"])).then_some("the nightly toolchain"),
        (!has("sh", &["-c", "ls \"$(rustup run nightly rustc --print sysroot)/lib/rustlib/src/rust/library/core\" >/dev/null"]))
            .then_some("nightly's rust-src"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "building the XDP firewall needs {}: run `script/setup-ebpf` (installs LLVM 22, nightly rust-src and bpf-linker)",
            missing.join(", ")
        );
    }
    let package = aya_build::Package {
        name: "flynn-xdp-ebpf",
        root_dir: "../xdp",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
