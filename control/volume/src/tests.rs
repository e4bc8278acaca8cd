use super::*;

#[test]
fn t10_names_are_checked_before_any_command() {
    assert!(validate_name("volume id", "pg-data_1").is_ok());
    for bad in ["", "a/b", "../x", "a b", "x@y", &"v".repeat(65)] {
        assert!(validate_name("volume id", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn t11_plain_directories_work_without_snapshots_or_send() {
    let dir = tempfile::tempdir().unwrap();
    let p = Provider::Dir(dir.path().to_path_buf());
    let v = p.create("v1", None).unwrap();
    std::fs::write(v.path.join("f"), b"hello").unwrap();
    assert_eq!(p.inspect("v1").unwrap().used, 5);
    assert!(matches!(p.create("v1", None), Err(VolumeError::Exists(_))));
    assert_eq!(p.list().unwrap().len(), 1);
    assert!(matches!(
        p.snapshot("v1", "s1"),
        Err(VolumeError::Unsupported(_))
    ));
    assert!(p.zfs().is_err());
    p.delete("v1").unwrap();
    assert!(matches!(p.inspect("v1"), Err(VolumeError::NotFound(_))));
    assert!(matches!(p.delete("../etc"), Err(VolumeError::Invalid(_))));
}
