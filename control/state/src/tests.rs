use super::*;

const KEY: &str = "0123456789abcdef0123";

fn booted() -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(Command::Bootstrap {
        auth_key: KEY.into(),
    })
    .0
    .unwrap();
    s.take_dirty();
    s
}

fn ok(s: &mut ClusterState, cmd: Command) -> (Response, Vec<Event>) {
    let (r, ev) = s.apply(cmd);
    (r.unwrap(), ev)
}

fn env_set(app: &str, t: Option<&str>, k: &str, v: &str) -> Command {
    Command::UpdateEnv {
        app: app.into(),
        proc_type: t.map(String::from),
        set: [(k.to_string(), v.to_string())].into(),
        unset: vec![],
    }
}

fn http(app: &str, domain: &str, path: Option<&str>) -> Command {
    Command::AddRoute {
        app: app.into(),
        route: RouteSpec::Http {
            domain: domain.into(),
            path: path.map(String::from),
            service: None,
            sticky: false,
            leader: false,
            disable_keepalive: false,
            no_drain_backends: false,
            certificate: None,
            https_redirect: false,
        },
    }
}

#[test]
fn t10_bootstrap_creates_system_apps_once() {
    let mut s = booted();
    for name in SYSTEM_APPS {
        assert!(s.apps[*name].system, "{name}");
    }
    assert_eq!(s.controller_keys(), vec![KEY.to_string()]);
    let (r, _) = s.apply(Command::Bootstrap {
        auth_key: KEY.into(),
    });
    assert!(matches!(r, Err(StateError::Conflict(_))));
}

#[test]
fn t11_refused_command_changes_nothing() {
    let mut s = booted();
    let before = s.clone();
    for cmd in [
        Command::CreateApp {
            name: "Bad Name".into(),
        },
        Command::DeleteApp {
            name: "nope".into(),
        },
        Command::DeleteApp {
            name: "controller".into(),
        },
        env_set("nope", None, "A", "1"),
        env_set("controller", None, "AUTH_KEY", "short"),
        http("nope", "a.example.com", None),
    ] {
        let (r, ev) = s.apply(cmd.clone());
        assert!(r.is_err(), "{cmd:?} should be refused");
        assert!(ev.is_empty());
        assert_eq!(s, before, "{cmd:?} changed state");
        assert!(s.take_dirty().is_empty());
    }
}

#[test]
fn t20_env_type_override_wins() {
    let mut s = booted();
    ok(&mut s, env_set("blobstore", None, "A", "global"));
    ok(&mut s, env_set("blobstore", Some("web"), "A", "web"));
    let env = &s.apps["blobstore"].env;
    assert_eq!(env.get(Some("web"), "A"), Some("web"));
    assert_eq!(env.get(Some("worker"), "A"), Some("global"));
    assert_eq!(env.get(None, "A"), Some("global"));
    ok(
        &mut s,
        Command::UpdateEnv {
            app: "blobstore".into(),
            proc_type: Some("web".into()),
            set: Default::default(),
            unset: vec!["A".into()],
        },
    );
    assert_eq!(
        s.apps["blobstore"].env.get(Some("web"), "A"),
        Some("global")
    );
    assert!(
        s.apps["blobstore"].env.types.is_empty(),
        "empty override is dropped"
    );
}

#[test]
fn t21_controller_key_rotation_as_in_flynn_docs() {
    let mut s = booted();
    let new = "fedcba9876543210fedc";
    ok(
        &mut s,
        env_set(
            "controller",
            Some("web"),
            "AUTH_KEY",
            &format!("{KEY},{new}"),
        ),
    );
    assert_eq!(s.controller_keys(), vec![KEY.to_string(), new.to_string()]);
    ok(&mut s, env_set("controller", None, "AUTH_KEY", new));
    assert_eq!(s.controller_keys().len(), 2, "web override still wins");
    ok(
        &mut s,
        Command::UpdateEnv {
            app: "controller".into(),
            proc_type: Some("web".into()),
            set: Default::default(),
            unset: vec!["AUTH_KEY".into()],
        },
    );
    assert_eq!(s.controller_keys(), vec![new.to_string()]);
}

#[test]
fn t22_controller_cannot_lose_its_key() {
    let mut s = booted();
    let (r, _) = s.apply(Command::UpdateEnv {
        app: "controller".into(),
        proc_type: None,
        set: Default::default(),
        unset: vec!["AUTH_KEY".into()],
    });
    assert!(matches!(r, Err(StateError::Invalid(_))));
    assert_eq!(s.controller_keys(), vec![KEY.to_string()]);
}

#[test]
fn t30_routes_get_ids_events_and_revisions() {
    let mut s = booted();
    ok(&mut s, Command::CreateApp { name: "web".into() });
    let rev = s.revision;
    let (r, ev) = ok(&mut s, http("web", "Web.Example.com", Some("/api")));
    let Response::Route {
        route: Route::Http(h),
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(h.domain, "web.example.com");
    assert_eq!(h.service, "web-web");
    assert_eq!(s.revision, rev + 1);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].revision, s.revision);
    let (dup, _) = s.apply(http("web", "web.example.com", Some("/api")));
    assert!(matches!(dup, Err(StateError::Conflict(_))));
    // Deleting the app removes its routes, with an event for each.
    let (_, ev) = ok(&mut s, Command::DeleteApp { name: "web".into() });
    assert_eq!(
        ev.iter().map(|e| &e.kind).collect::<Vec<_>>(),
        vec![&EventKind::RouteRemoved { id: h.id }]
    );
    assert!(s.routes.is_empty());
}

#[test]
fn t31_tcp_ports_are_allocated_from_the_range_and_unique() {
    let mut s = booted();
    let tcp = |port| Command::AddRoute {
        app: "redis".into(),
        route: RouteSpec::Tcp {
            port,
            service: None,
            leader: false,
        },
    };
    let (
        Response::Route {
            route: Route::Tcp(a),
        },
        _,
    ) = ok(&mut s, tcp(None))
    else {
        panic!()
    };
    assert_eq!(a.port, 3000);
    let (
        Response::Route {
            route: Route::Tcp(b),
        },
        _,
    ) = ok(&mut s, tcp(None))
    else {
        panic!()
    };
    assert_eq!(b.port, 3001);
    assert!(matches!(
        s.apply(tcp(Some(3001))).0,
        Err(StateError::Conflict(_))
    ));
}

#[test]
fn t40_instances_expire_and_leadership_moves() {
    let mut s = booted();
    let reg = |id: &str, now| Command::RegisterInstance {
        service: "pg".into(),
        id: id.into(),
        addr: format!("10.0.0.{}:5432", id.len()),
        meta: Default::default(),
        ttl_ms: 10_000,
        now_ms: now,
    };
    ok(&mut s, reg("a", 0));
    ok(&mut s, reg("bb", 1_000));
    assert_eq!(s.services["pg"].leader().unwrap().id, "a");
    // "a" keeps its leadership across re-registration; heartbeats keep "bb" alive.
    ok(&mut s, reg("a", 2_000));
    assert_eq!(s.services["pg"].leader().unwrap().id, "a");
    ok(
        &mut s,
        Command::Heartbeat {
            service: "pg".into(),
            id: "bb".into(),
            now_ms: 9_000,
        },
    );
    let (r, ev) = ok(&mut s, Command::ExpireInstances { now_ms: 15_000 });
    assert_eq!(r, Response::Expired { count: 1 });
    assert!(ev.contains(&Event {
        revision: s.revision,
        kind: EventKind::ServiceLeader {
            service: "pg".into(),
            leader: Some("bb".into())
        }
    }));
    ok(&mut s, Command::ExpireInstances { now_ms: 30_000 });
    assert!(!s.services.contains_key("pg"));
}

#[test]
fn t41_expiry_with_nothing_lapsed_does_not_bump_revision() {
    let mut s = booted();
    let rev = s.revision;
    ok(&mut s, Command::ExpireInstances { now_ms: 1 });
    assert_eq!(s.revision, rev);
}

#[test]
fn t50_records_round_trip() {
    let mut s = booted();
    ok(&mut s, Command::CreateApp { name: "web".into() });
    ok(&mut s, http("web", "*.example.com", None));
    let mut loaded = ClusterState::default();
    for (t, k, v) in s.records() {
        loaded.load_record(t, &k, &v).unwrap();
    }
    s.take_dirty();
    assert_eq!(loaded, s);
}

#[test]
fn t51_dirty_names_deleted_records() {
    let mut s = booted();
    ok(&mut s, Command::CreateApp { name: "web".into() });
    s.take_dirty();
    ok(&mut s, Command::DeleteApp { name: "web".into() });
    let dirty = s.take_dirty();
    assert!(dirty.contains(&(Table::App, "web".into())));
    assert_eq!(s.record(Table::App, "web"), None);
}

#[test]
fn t52_restore_replaces_everything() {
    let mut a = booted();
    ok(
        &mut a,
        Command::CreateApp {
            name: "keep".into(),
        },
    );
    let mut b = booted();
    ok(
        &mut b,
        Command::CreateApp {
            name: "gone".into(),
        },
    );
    b.take_dirty();
    ok(
        &mut b,
        Command::Restore {
            state: Box::new(a.clone()),
        },
    );
    assert!(b.apps.contains_key("keep") && !b.apps.contains_key("gone"));
    let dirty = b.take_dirty();
    assert!(dirty.contains(&(Table::App, "gone".into())));
    assert!(b.revision > a.revision);
}

#[test]
fn t60_validation() {
    assert!(validate::domain("*.example.com").is_ok());
    assert!(validate::domain("a..b").is_err());
    assert!(validate::domain("").is_err());
    assert!(validate::path("api").is_err());
    assert!(validate::app_name("-x").is_err());
    assert!(validate::app_name(&"a".repeat(64)).is_err());
    assert!(validate::env_key("A=B").is_err());
    assert!(validate::instance("i", "nope", 5_000).is_err());
    assert!(validate::instance("i", "127.0.0.1:80", 5_000).is_ok());
}

#[test]
fn t70_batch_applies_each_command_with_its_own_result_and_revision() {
    let mut s = booted();
    let rev = s.revision;
    let (r, ev) = ok(
        &mut s,
        Command::Batch {
            commands: vec![
                Command::CreateApp { name: "a".into() },
                Command::CreateApp { name: "a".into() },
                http("a", "a.example.com", None),
            ],
        },
    );
    let Response::Batch { results } = r else {
        panic!("{r:?}")
    };
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(StateError::Conflict(_))));
    assert!(results[2].is_ok());
    // Two commands changed state: two revisions; the refused one took none.
    assert_eq!(s.revision, rev + 2);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].revision, rev + 2);
    let nested = Command::Batch {
        commands: vec![Command::Batch { commands: vec![] }],
    };
    assert!(s.apply(nested).0.is_err());
}
