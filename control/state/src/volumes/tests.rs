use crate::testing::*;
use crate::volumes::{Volume, VolumesCommand};

fn vol(host: u64, id: &str) -> Volume {
    Volume {
        id: id.into(),
        host,
        provider: "zfs".into(),
        size: Some(1 << 20),
        app: None,
        job: None,
        proc_type: None,
        path: None,
        snapshots: vec![],
        created_ms: 1,
    }
}

#[test]
fn t10_volumes_are_recorded_per_host_and_id() {
    let mut s = booted();
    ok(
        &mut s,
        VolumesCommand::PutVolume {
            volume: vol(1, "pg"),
        },
    );
    // The same id received on another host is another record.
    ok(
        &mut s,
        VolumesCommand::PutVolume {
            volume: vol(2, "pg"),
        },
    );
    assert_eq!(s.volumes.volumes.len(), 2);
    let mut snap = vol(1, "pg");
    snap.snapshots = vec!["s1".into()];
    let rev = s.revision;
    ok(
        &mut s,
        VolumesCommand::PutVolume {
            volume: snap.clone(),
        },
    );
    assert_eq!(s.volumes.volumes["1/pg"].snapshots, vec!["s1".to_string()]);
    // Recording the same thing again changes nothing.
    ok(&mut s, VolumesCommand::PutVolume { volume: snap });
    assert_eq!(s.revision, rev + 1);
    ok(
        &mut s,
        VolumesCommand::RemoveVolume {
            host: 2,
            id: "pg".into(),
        },
    );
    assert!(apply(
        &mut s,
        VolumesCommand::RemoveVolume {
            host: 2,
            id: "pg".into()
        }
    )
    .0
    .is_err());
}

#[test]
fn t11_bad_names_and_unknown_owners_are_refused() {
    let mut s = booted();
    let before = s.clone();
    let mut owned = vol(1, "data");
    owned.app = Some("nope".into());
    let mut bad_snap = vol(1, "data");
    bad_snap.snapshots = vec!["a/b".into()];
    for v in [vol(1, "../x"), vol(1, ""), owned, bad_snap] {
        assert!(apply(&mut s, VolumesCommand::PutVolume { volume: v })
            .0
            .is_err());
    }
    assert_eq!(s, before);
}
