use crate::testing::*;

#[test]
fn t40_instances_expire_and_leadership_moves() {
    let mut s = booted();
    let reg = |id: &str, now| DiscoveryCommand::RegisterInstance {
        service: "pg".into(),
        id: id.into(),
        addr: format!("10.0.0.{}:5432", id.len()),
        meta: Default::default(),
        ttl_ms: 10_000,
        now_ms: now,
    };
    ok(&mut s, reg("a", 0));
    ok(&mut s, reg("bb", 1_000));
    assert_eq!(s.discovery.services["pg"].leader().unwrap().id, "a");
    // "a" keeps its leadership across re-registration; heartbeats keep "bb" alive.
    ok(&mut s, reg("a", 2_000));
    assert_eq!(s.discovery.services["pg"].leader().unwrap().id, "a");
    ok(
        &mut s,
        DiscoveryCommand::Heartbeat {
            service: "pg".into(),
            id: "bb".into(),
            now_ms: 9_000,
        },
    );
    let (r, ev) = ok(&mut s, DiscoveryCommand::ExpireInstances { now_ms: 15_000 });
    assert_eq!(r, Response::Expired { count: 1 });
    assert!(ev.contains(&Event {
        revision: s.revision,
        kind: EventKind::ServiceLeader {
            service: "pg".into(),
            leader: Some("bb".into())
        }
    }));
    ok(&mut s, DiscoveryCommand::ExpireInstances { now_ms: 30_000 });
    assert!(!s.discovery.services.contains_key("pg"));
}

#[test]
fn t41_expiry_with_nothing_lapsed_does_not_bump_revision() {
    let mut s = booted();
    let rev = s.revision;
    ok(&mut s, DiscoveryCommand::ExpireInstances { now_ms: 1 });
    assert_eq!(s.revision, rev);
}
