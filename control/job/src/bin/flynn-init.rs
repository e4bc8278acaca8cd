//! The container init on its own: what `flynn-host container-init` runs, without the rest
//! of flynn-host. Each job's init and shim start from this binary when it sits beside
//! flynn-host (and was built from the same code): flynn-host's executable links RocksDB's
//! C++ library, whose loading and relocation take about 7 ms per exec, paid twice per job
//! start, and whose pages each job's long-lived shim would keep.
//!
//! `flynn-init [container-init] [--stage2] SPEC`, or `flynn-init --build` to print the build
//! the daemon compares with its own.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1).peekable();
    // Stage 1 runs stage 2 as `/proc/self/exe container-init --stage2 SPEC`, as flynn-host's.
    if args.peek().is_some_and(|a| a == "container-init") {
        args.next();
    }
    let mut stage2 = false;
    let mut spec: Option<PathBuf> = None;
    for a in args {
        if a == "--build" {
            println!("{}", flynn_job::init::BUILD);
            return;
        } else if a == "--stage2" {
            stage2 = true;
        } else if spec.is_none() {
            spec = Some(PathBuf::from(a));
        } else {
            eprintln!("flynn-init: one spec path only");
            std::process::exit(2);
        }
    }
    let Some(spec) = spec else {
        eprintln!("usage: flynn-init [container-init] [--stage2] SPEC | --build");
        std::process::exit(2);
    };
    if stage2 {
        flynn_job::init::stage2(&spec)
    } else {
        flynn_job::init::stage1(&spec)
    }
}
