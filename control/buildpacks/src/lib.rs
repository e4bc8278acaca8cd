//! The buildpacks shipped with flynn-host, embedded from `buildpacks/` in the repository:
//! `build` (the build job's program: the source's own `bin/compile`, else `.buildpacks` or
//! `BUILDPACK_URL`, else detection), `order` (detection order), and one directory per
//! buildpack with `bin/detect`, `bin/compile` and `bin/release`. The host writes them into
//! each build job, read-only at [`MOUNT`]; they work offline: language runtimes come from
//! the stack image, and only dependencies from the language's own registry.
//!
//! Adding one: a directory under `buildpacks/` with the three scripts, its name in
//! `buildpacks/order`, its files in [`FILES`], and its marker files in [`MARKERS`] (the
//! tests check all four agree).

use std::path::Path;

/// Where a build job sees the buildpacks.
pub const MOUNT: &str = "/tmp/buildpacks";

/// What a build job runs.
pub const BUILD_ARGS: [&str; 2] = ["/bin/sh", "/tmp/buildpacks/build"];

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        /// Every shipped file: its path under `buildpacks/` and its text.
        pub const FILES: &[(&str, &str)] = &[
            $( ($path, include_str!(concat!("../../../buildpacks/", $path))), )*
        ];
    };
}

files! {
    "build",
    "order",
    "nodejs/bin/compile",
    "nodejs/bin/detect",
    "nodejs/bin/release",
    "procfile/bin/compile",
    "procfile/bin/detect",
    "procfile/bin/release",
    "python/bin/compile",
    "python/bin/detect",
    "python/bin/release",
    "rust/bin/compile",
    "rust/bin/detect",
    "rust/bin/release",
    "static/bin/compile",
    "static/bin/detect",
    "static/bin/release",
}

/// The files whose presence each buildpack detects (any one of them), in detection order.
/// `procfile` is last: an app with a Procfile and none of the others' markers has nothing
/// to build.
pub const MARKERS: &[(&str, &[&str])] = &[
    (
        "python",
        &["requirements.txt", "pyproject.toml", "setup.py"],
    ),
    ("nodejs", &["package.json"]),
    ("rust", &["Cargo.toml"]),
    ("static", &["index.html", "public/index.html"]),
    ("procfile", &["Procfile"]),
];

/// Writes the buildpacks into `dir` (made if missing), scripts executable, everything
/// read-only to the build.
pub fn write_to(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, text) in FILES {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, text)?;
        let mode = if *path == "order" { 0o444 } else { 0o555 };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The buildpack detection would pick for the source tree at `dir`, by its markers.
pub fn detect(dir: &Path) -> Option<&'static str> {
    MARKERS
        .iter()
        .find(|(_, markers)| markers.iter().any(|m| dir.join(m).is_file()))
        .map(|(name, _)| *name)
}

/// Whether deploying `dir` needs a build job: its own `bin/compile`, buildpacks it names in
/// `.buildpacks`, or a buildpack other than `procfile` that detects it. A tree that only
/// the `procfile` buildpack would take is deployed as it is (that buildpack builds nothing).
pub fn needs_build(dir: &Path) -> bool {
    dir.join("bin/compile").is_file()
        || dir.join(".buildpacks").is_file()
        || !matches!(detect(dir), Some("procfile"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `buildpacks/`, relative to it.
    fn shipped(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                shipped(&e.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }

    fn repo_buildpacks() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../buildpacks")
    }

    #[test]
    fn t10_every_shipped_file_is_embedded_and_every_buildpack_is_in_order() {
        let mut found = Vec::new();
        shipped(&repo_buildpacks(), "", &mut found);
        found.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(found, embedded, "buildpacks/ and FILES differ");
        let order: Vec<&str> = FILES
            .iter()
            .find(|(p, _)| *p == "order")
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let marked: Vec<&str> = MARKERS.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, marked, "order and MARKERS differ");
    }

    /// Runs each buildpack's own bin/detect on a tree holding each marker, as a build would.
    #[test]
    fn t11_each_detect_script_agrees_with_its_markers() {
        let packs = tempfile::tempdir().unwrap();
        write_to(packs.path()).unwrap();
        for (name, markers) in MARKERS {
            for marker in *markers {
                let app = tempfile::tempdir().unwrap();
                let file = app.path().join(marker);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, "x").unwrap();
                let run = |pack: &str| {
                    std::process::Command::new(packs.path().join(pack).join("bin/detect"))
                        .arg(app.path())
                        .output()
                        .unwrap()
                        .status
                        .success()
                };
                assert!(run(name), "{name} does not detect {marker}");
                assert_eq!(detect(app.path()), Some(*name), "{marker}");
                // No other buildpack earlier in the order takes it.
                for (other, _) in MARKERS.iter().take_while(|(n, _)| n != name) {
                    assert!(!run(other), "{other} detects {marker}, before {name}");
                }
            }
        }
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(detect(empty.path()), None);
        assert!(
            needs_build(empty.path()),
            "nothing detected: the build says why"
        );
    }

    #[test]
    fn t12_a_procfile_alone_deploys_without_a_build() {
        let app = tempfile::tempdir().unwrap();
        std::fs::write(app.path().join("Procfile"), "web: true\n").unwrap();
        assert!(!needs_build(app.path()));
        std::fs::write(app.path().join("requirements.txt"), "").unwrap();
        assert!(needs_build(app.path()));
    }
}
