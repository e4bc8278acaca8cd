use std::collections::BTreeMap;

use crate::resources::{Resource, ResourcesCommand, ShapeCommand};
use crate::testing::*;

fn pg_env(db: &str) -> BTreeMap<String, String> {
    [
        (
            "DATABASE_URL",
            format!("postgres://{db}:pw@100.100.0.2:5432/{db}"),
        ),
        ("PGHOST", "100.100.0.2".into()),
        ("PGPORT", "5432".into()),
        ("PGUSER", db.into()),
        ("PGPASSWORD", "pw".into()),
        ("PGDATABASE", db.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn provision(id: &str, provider: &str, app: &str) -> ResourcesCommand {
    ResourcesCommand::Provision {
        resource: Resource {
            id: id.into(),
            provider: provider.into(),
            app: app.into(),
            env: pg_env(&format!("db{id}")),
            name: format!("db{id}"),
            server: None,
            created_ms: 0,
        },
        now_ms: 5,
    }
}

/// An app running a release, so env changes deploy.
fn running(app: &str) -> ClusterState {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: app.into() });
    ok(
        &mut s,
        JobsCommand::CreateRelease {
            app: app.into(),
            release: NewRelease {
                image: image(),
                processes: None,
            },
            now_ms: 1,
        },
    );
    s
}

fn current_env(s: &ClusterState, app: &str) -> BTreeMap<String, String> {
    s.jobs.current_release(app).unwrap().env.clone()
}

#[test]
fn t10_provisioning_records_the_resource_and_deploys_its_env_in_one_command() {
    let mut s = running("web");
    let before = s.jobs.current_release("web").unwrap().id.clone();
    let rev = s.revision;
    let (r, _) = ok(&mut s, provision("r1", "postgres", "web"));
    let resource = Resource::try_from(r).unwrap();
    assert_eq!(s.revision, rev + 1, "one command, one revision");
    assert_eq!(resource.created_ms, 5);
    assert_eq!(s.resources.resources["r1"], resource);
    assert_eq!(s.apps["web"].env.global["PGDATABASE"], "dbr1");
    let release = s.jobs.current_release("web").unwrap();
    assert_ne!(release.id, before, "the new env is a new release, deployed");
    assert_eq!(
        current_env(&s, "web")["DATABASE_URL"],
        resource.env["DATABASE_URL"]
    );
}

#[test]
fn t11_refusals_change_nothing() {
    let mut s = running("web");
    ok(&mut s, provision("r1", "postgres", "web"));
    let snapshot = s.clone();
    let cases: Vec<(ResourcesCommand, &str)> = vec![
        (provision("r2", "mongodb", "web"), "provider \"mongodb\""),
        (provision("r2", "postgres", "nope"), "app \"nope\""),
        (provision("r1", "redis", "web"), "resource r1 exists"),
        (provision("R 2", "postgres", "web"), "resource id"),
        (
            provision("r2", "postgres", "web"),
            "already has a postgres resource (r1)",
        ),
        (provision("r2", "postgres", "controller"), "system app"),
        (
            ResourcesCommand::Remove {
                id: "r9".into(),
                now_ms: 1,
            },
            "resource \"r9\"",
        ),
    ];
    for (cmd, want) in cases {
        let err = apply(&mut s, cmd).0.unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should say {want:?}");
        assert_eq!(s, snapshot, "a refusal changes nothing ({want})");
    }
    // A provider's env is exactly its keys: a Redis resource cannot set DATABASE_URL.
    let err = apply(&mut s, provision("r3", "redis", "web"))
        .0
        .unwrap_err();
    assert!(err.to_string().contains("sets exactly REDIS_URL"), "{err}");
    assert_eq!(s, snapshot);
}

#[test]
fn t12_removing_unsets_what_it_set_and_keeps_what_the_user_changed() {
    let mut s = running("web");
    ok(&mut s, provision("r1", "postgres", "web"));
    ok(&mut s, env_set("web", None, "PGHOST", "db.example"));
    ok(&mut s, env_set("web", None, "OTHER", "1"));
    let rev = s.revision;
    ok(
        &mut s,
        ResourcesCommand::Remove {
            id: "r1".into(),
            now_ms: 9,
        },
    );
    assert_eq!(s.revision, rev + 1);
    assert!(s.resources.resources.is_empty());
    let env = current_env(&s, "web");
    assert!(!env.contains_key("DATABASE_URL"), "{env:?}");
    assert_eq!(env["PGHOST"], "db.example", "the user's own value stays");
    assert_eq!(env["OTHER"], "1");
    // Removing twice is a clear not-found.
    let err = apply(
        &mut s,
        ResourcesCommand::Remove {
            id: "r1".into(),
            now_ms: 9,
        },
    )
    .0
    .unwrap_err();
    assert!(matches!(err, StateError::NotFound(_)), "{err}");
}

#[test]
fn t13_an_app_with_resources_is_not_deleted() {
    let mut s = running("web");
    ok(&mut s, provision("r1", "postgres", "web"));
    let err = apply(&mut s, AppsCommand::DeleteApp { name: "web".into() })
        .0
        .unwrap_err();
    assert!(err.to_string().contains("has resources (r1)"), "{err}");
    ok(
        &mut s,
        ResourcesCommand::Remove {
            id: "r1".into(),
            now_ms: 9,
        },
    );
    ok(&mut s, AppsCommand::DeleteApp { name: "web".into() });
}

#[test]
fn t14_an_app_without_a_release_gets_the_env_for_its_first() {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: "new".into() });
    ok(&mut s, provision("r1", "postgres", "new"));
    assert!(s.jobs.current_release("new").is_none());
    assert_eq!(s.apps["new"].env.global["PGUSER"], "dbr1");
}

fn set_shape(expect: u64, primary: u64, sync: u64, asyncs: &[u64]) -> ResourcesCommand {
    ResourcesCommand::Shape(ShapeCommand::SetShape {
        app: "postgres".into(),
        expect_generation: expect,
        primary,
        sync,
        asyncs: asyncs.to_vec(),
    })
}

fn renew(generation: u64, host: u64, lsn: u64, ready: bool) -> ResourcesCommand {
    ResourcesCommand::Shape(ShapeCommand::Renew {
        app: "postgres".into(),
        generation,
        host,
        confirmed_lsn: lsn,
        sync_ready: ready,
    })
}

#[test]
fn t15_the_shape_changes_only_by_compare_and_set_and_only_its_primary_renews() {
    let mut s = booted();
    ok(&mut s, set_shape(0, 1, 2, &[3]));
    let snapshot = s.clone();
    for (cmd, want) in [
        (set_shape(0, 2, 3, &[]), "generation 1, not 0"),
        (set_shape(1, 2, 2, &[]), "each server once"),
        (set_shape(1, 0, 2, &[]), "names a primary"),
        (renew(1, 2, 10, true), "host 2 is not the primary"),
        (renew(7, 1, 10, true), "at generation 7"),
    ] {
        let err = apply(&mut s, cmd).0.unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should say {want:?}");
        assert_eq!(s, snapshot, "a refusal changes nothing");
    }
    ok(&mut s, renew(1, 1, 100, false));
    ok(&mut s, renew(1, 1, 50, true));
    let shape = &s.resources.shapes["postgres"];
    assert_eq!(
        shape.confirmed_lsn, 100,
        "the confirmed position never goes back"
    );
    assert!(shape.sync_ready);
    assert_eq!(shape.lease_renewals, 2);
    // A failover: the sync is promoted, the async becomes the sync and must catch up
    // before it may be promoted in turn. The deposed primary can no longer renew.
    ok(&mut s, set_shape(1, 2, 3, &[]));
    let shape = &s.resources.shapes["postgres"];
    assert_eq!((shape.generation, shape.primary, shape.sync), (2, 2, 3));
    assert!(!shape.sync_ready, "a new sync starts not ready");
    assert_eq!(shape.confirmed_lsn, 100);
    assert!(apply(&mut s, renew(2, 1, 200, true)).0.is_err());
    ok(&mut s, renew(2, 2, 200, true));
}

#[test]
fn t16_shape_commands_keep_their_wire_form() {
    let cmd: Command = renew(3, 1, 42, true).into();
    let json = serde_json::to_string(&cmd).unwrap();
    assert!(json.contains("\"area\":\"resources\""), "{json}");
    assert!(json.contains("\"op\":\"shape\""), "{json}");
    assert!(json.contains("\"shape_op\":\"renew\""), "{json}");
    let back: Command = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cmd);
}

#[test]
fn t17_a_shape_with_reports_reads_back_as_a_command_s_result() {
    // A renewal forwarded to the leader comes back as this JSON; it must read back (a map
    // keyed by host numbers did not, inside the tagged result).
    let mut s = booted();
    ok(&mut s, set_shape(0, 1, 2, &[]));
    let (r, _) = ok(
        &mut s,
        ResourcesCommand::Shape(ShapeCommand::Report {
            app: "postgres".into(),
            host: 2,
            member: crate::resources::DbMember {
                job: "j".into(),
                addr: "100.100.2.2:8080".into(),
                lsn: 7,
                in_recovery: true,
                reported_ms: 1,
            },
        }),
    );
    let json = serde_json::to_string(&Ok::<_, StateError>(r.clone())).unwrap();
    let back: ApplyResult = serde_json::from_str(&json).unwrap();
    assert_eq!(back.unwrap(), r);
}
