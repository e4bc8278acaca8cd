use crate::blobs::{check_path, BlobFile, BlobsCommand};
use crate::testing::*;

fn file(path: &str) -> BlobFile {
    BlobFile {
        path: path.into(),
        size: 4,
        sha512: "a".repeat(128),
        backend: "embedded".into(),
        holders: vec![1, 2],
        key: None,
        content_type: None,
        created_ms: 1,
        modified_ms: 1,
    }
}

#[test]
fn t10_files_list_by_directory_and_delete_by_prefix() {
    let mut s = booted();
    for p in [
        "/foo.txt",
        "/dir1/foo.txt",
        "/dir1/sub/x",
        "/dir2/foo.txt",
        "/dir10/y",
    ] {
        ok(&mut s, BlobsCommand::PutFile { file: file(p) });
    }
    assert_eq!(
        s.blobs.list("/"),
        ["/dir1/", "/dir10/", "/dir2/", "/foo.txt"]
    );
    assert_eq!(s.blobs.list("/dir1"), ["/dir1/foo.txt", "/dir1/sub/"]);
    assert!(s.blobs.list("/nope").is_empty());
    // /dir1 and everything under it, not /dir10.
    ok(
        &mut s,
        BlobsCommand::DeleteFiles {
            path: "/dir1".into(),
        },
    );
    assert_eq!(s.blobs.list("/"), ["/dir10/", "/dir2/", "/foo.txt"]);
    assert!(apply(
        &mut s,
        BlobsCommand::DeleteFiles {
            path: "/dir1".into()
        }
    )
    .0
    .is_err());
}

#[test]
fn t11_bad_paths_and_digests_are_refused() {
    for bad in [
        "", "/", "x", "/a/", "/a//b", "/a/../b", "/./a", "/a?b", "/a\0",
    ] {
        assert!(check_path(bad).is_err(), "{bad:?}");
    }
    let mut s = booted();
    let before = s.clone();
    let mut short = file("/ok");
    short.sha512 = "abc".into();
    assert!(apply(&mut s, BlobsCommand::PutFile { file: short })
        .0
        .is_err());
    assert!(apply(
        &mut s,
        BlobsCommand::PutFile {
            file: file("/a/../b")
        }
    )
    .0
    .is_err());
    assert_eq!(s, before);
}

fn set(vars: &[(&str, &str)]) -> AppsCommand {
    AppsCommand::UpdateEnv {
        app: "blobstore".into(),
        proc_type: None,
        set: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        unset: vec![],
        now_ms: 0,
    }
}

#[test]
fn t12_blobstore_env_is_checked_as_flynn_writes_it() {
    let mut s = booted();
    let s3 = "backend=s3 region=us-east-1 bucket=flynn access_key_id=AK secret_access_key=SK";
    ok(
        &mut s,
        set(&[("BACKEND_S3MAIN", s3), ("DEFAULT_BACKEND", "S3Main")]),
    );
    // GCS takes its service-account JSON as an extra variable.
    ok(
        &mut s,
        set(&[
            ("BACKEND_GCSMAIN", "backend=gcs bucket=b"),
            ("BACKEND_GCSMAIN_KEY", r#"{"type":"service_account"}"#),
        ]),
    );
    let before = s.clone();
    let refused = [
        (vec![("BACKEND_X", "backend=ftp")], "unknown backend type"),
        (
            vec![("BACKEND_X", "backend=s3 bucket=b")],
            "s3 needs region",
        ),
        (vec![("BACKEND_X", "bucket=b")], "no backend=TYPE"),
        (vec![("BACKEND_X", "backend=s3 region")], "is not key=value"),
        (
            vec![("BACKEND_Y", "backend=azure account_name=a container=c")],
            "azure needs account_key",
        ),
        (
            vec![("BACKEND_G", "backend=gcs bucket=b key=notjson")],
            "service account JSON",
        ),
        (vec![("BACKEND_NOPE_KEY", "x")], "names no backend"),
        (
            vec![("BACKEND_PG", "backend=postgres user=u")],
            "postgres needs url or host",
        ),
        (
            vec![("DEFAULT_BACKEND", "missing")],
            "names no configured backend",
        ),
    ];
    for (vars, says) in refused {
        let (r, _) = apply(&mut s, set(&vars));
        match r {
            Err(StateError::Invalid(m)) => {
                assert!(
                    m.contains(says) && m.contains("blobstore backend"),
                    "{vars:?}: {m}"
                )
            }
            other => panic!("{vars:?} accepted: {other:?}"),
        }
        assert_eq!(s, before, "{vars:?} changed the env");
    }
    // Unsetting what DEFAULT_BACKEND names is refused too; the embedded backend always exists.
    assert!(apply(
        &mut s,
        AppsCommand::UpdateEnv {
            app: "blobstore".into(),
            proc_type: None,
            set: Default::default(),
            unset: vec!["BACKEND_S3MAIN".into()],
            now_ms: 0,
        }
    )
    .0
    .is_err());
    ok(&mut s, set(&[("DEFAULT_BACKEND", "embedded")]));
    // Other apps' env is not the blobstore's business.
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
    ok(
        &mut s,
        AppsCommand::UpdateEnv {
            app: "web".into(),
            proc_type: None,
            set: [("BACKEND_X".to_string(), "anything".to_string())].into(),
            unset: vec![],
            now_ms: 0,
        },
    );
}

#[test]
fn t13_a_migrated_file_moves_only_if_unchanged_since_its_copy() {
    let mut s = booted();
    ok(&mut s, BlobsCommand::PutFile { file: file("/a") });
    let moved = |sha: &str| BlobsCommand::MoveFile {
        path: "/a".into(),
        from_backend: "embedded".into(),
        sha512: sha.into(),
        backend: "pg".into(),
        key: Some("k1".into()),
        holders: vec![],
    };
    // Overwritten meanwhile (another digest): left as it is.
    let (r, _) = apply(&mut s, moved(&"b".repeat(128)));
    assert!(matches!(r, Err(StateError::Conflict(_))), "{r:?}");
    assert_eq!(s.blobs.blobs["/a"].backend, "embedded");
    assert!(s.blobs.references("embedded", &"a".repeat(128)));
    ok(&mut s, moved(&"a".repeat(128)));
    let f = &s.blobs.blobs["/a"];
    assert_eq!((f.backend.as_str(), f.key.as_deref()), ("pg", Some("k1")));
    // Its bytes are now object k1 of pg, and the embedded object is no one's.
    assert_eq!(f.object(), "k1");
    assert!(s.blobs.references("pg", "k1"));
    assert!(!s.blobs.references("embedded", &"a".repeat(128)));
    assert!(f.holders.is_empty());
    // A second run finds it on another backend than it copied from: no change.
    let (r, _) = apply(&mut s, moved(&"a".repeat(128)));
    assert!(matches!(r, Err(StateError::Conflict(_))), "{r:?}");
    let (r, _) = apply(
        &mut s,
        BlobsCommand::MoveFile {
            path: "/missing".into(),
            from_backend: "pg".into(),
            sha512: "a".repeat(128),
            backend: "embedded".into(),
            key: None,
            holders: vec![1],
        },
    );
    assert!(matches!(r, Err(StateError::NotFound(_))), "{r:?}");
}

#[test]
fn t14_a_later_copy_is_recorded_on_every_file_with_that_content() {
    let mut s = booted();
    ok(&mut s, BlobsCommand::PutFile { file: file("/a") });
    ok(&mut s, BlobsCommand::PutFile { file: file("/b") });
    let mut other = file("/c");
    other.sha512 = "c".repeat(128);
    ok(&mut s, BlobsCommand::PutFile { file: other });
    let add = BlobsCommand::AddHolders {
        sha512: "a".repeat(128),
        hosts: vec![3, 2],
    };
    ok(&mut s, add.clone());
    ok(&mut s, add);
    assert_eq!(s.blobs.blobs["/a"].holders, [1, 2, 3]);
    assert_eq!(s.blobs.blobs["/b"].holders, [1, 2, 3]);
    assert_eq!(s.blobs.blobs["/c"].holders, [1, 2]);
}
