use crate::testing::*;

#[test]
fn t30_routes_get_ids_events_and_revisions() {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: "web".into() });
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
    let (dup, _) = apply(&mut s, http("web", "web.example.com", Some("/api")));
    assert!(matches!(dup, Err(StateError::Conflict(_))));
    // Deleting the app removes its routes, with an event for each.
    let (_, ev) = ok(&mut s, AppsCommand::DeleteApp { name: "web".into() });
    assert_eq!(
        ev.iter().map(|e| &e.kind).collect::<Vec<_>>(),
        vec![&EventKind::RouteRemoved { id: h.id }]
    );
    assert!(s.routes.routes.is_empty());
}

#[test]
fn t31_tcp_ports_are_allocated_from_the_range_and_unique() {
    let mut s = booted();
    let tcp = |port| RoutesCommand::AddRoute {
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
        apply(&mut s, tcp(Some(3001))).0,
        Err(StateError::Conflict(_))
    ));
}

#[test]
fn t32_tcp_routes_never_take_the_routers_own_ports() {
    let mut s = booted();
    let tcp = |port| RoutesCommand::AddRoute {
        app: "redis".into(),
        route: RouteSpec::Tcp {
            port: Some(port),
            service: None,
            leader: false,
        },
    };
    for port in [80, 443, 1113] {
        let (r, _) = apply(&mut s, tcp(port));
        let Err(StateError::Conflict(why)) = r else {
            panic!("port {port}: {r:?}")
        };
        assert!(why.contains("reserved"), "{why}");
    }
    // A router moved to another port reserves that one instead.
    ok(&mut s, env_set("router", None, "HTTP_PORT", "3005"));
    let (r, _) = apply(&mut s, tcp(3005));
    assert!(matches!(r, Err(StateError::Conflict(m)) if m.contains("HTTP_PORT")));
    ok(&mut s, tcp(3006));
}
