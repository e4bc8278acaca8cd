use crate::blobs::{check_path, BlobFile, BlobsCommand};
use crate::testing::*;

fn file(path: &str) -> BlobFile {
    BlobFile {
        path: path.into(),
        size: 4,
        sha512: "a".repeat(128),
        backend: "embedded".into(),
        holders: vec![1, 2],
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
