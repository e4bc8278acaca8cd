use super::*;
use flynn_model::Event;

fn http(id: &str, domain: &str, path: &str, service: &str, leader: bool) -> WatchLine {
    WatchLine::Event(Event {
        revision: 1,
        kind: EventKind::RouteSet {
            route: Route::Http(HttpRoute {
                id: id.into(),
                app: "a".into(),
                domain: domain.into(),
                path: path.into(),
                service: service.into(),
                sticky: false,
                leader,
                backend_keepalive: true,
                drain_backends: true,
                certificate: None,
                https_redirect: false,
                response_timeout_ms: None,
            }),
        },
    })
}

fn up(service: &str, id: &str, addr: &str) -> WatchLine {
    WatchLine::Event(Event {
        revision: 1,
        kind: EventKind::InstanceUp {
            service: service.into(),
            instance: Instance {
                id: id.into(),
                addr: addr.into(),
                meta: Default::default(),
                registered_revision: 1,
                ttl_ms: 10_000,
                expires_at_ms: 0,
            },
        },
    })
}

fn ev(kind: EventKind) -> WatchLine {
    WatchLine::Event(Event { revision: 2, kind })
}

fn table(lines: Vec<WatchLine>) -> RouteTable {
    let mut b = TableBuilder::default();
    for l in lines {
        b.apply(l);
    }
    b.build()
}

fn id(t: &RouteTable, host: &str, path: &str) -> Option<String> {
    t.http(host, path).map(|e| e.route.id.clone())
}

#[test]
fn t10_exact_then_wildcard_then_longest_prefix() {
    let t = table(vec![
        http("root", "example.com", "/", "web", false),
        http("api", "example.com", "/api", "api", false),
        http("apiv2", "example.com", "/api/v2/", "api2", false),
        http("wild", "*.example.com", "/", "wild", false),
        http("deep", "*.a.example.com", "/", "deep", false),
    ]);
    assert_eq!(id(&t, "example.com", "/"), Some("root".into()));
    assert_eq!(id(&t, "EXAMPLE.com:8080", "/api"), Some("api".into()));
    assert_eq!(id(&t, "example.com", "/api/users?x=1"), Some("api".into()));
    assert_eq!(id(&t, "example.com", "/api?x=1"), Some("api".into()));
    assert_eq!(
        id(&t, "example.com", "/apis"),
        Some("root".into()),
        "segment boundary"
    );
    assert_eq!(id(&t, "example.com", "/api/v2/x"), Some("apiv2".into()));
    assert_eq!(id(&t, "www.example.com", "/api"), Some("wild".into()));
    assert_eq!(
        id(&t, "x.a.example.com", "/"),
        Some("deep".into()),
        "most specific wildcard"
    );
    assert_eq!(id(&t, "a.example.com", "/"), Some("wild".into()));
    assert_eq!(id(&t, "example.org", "/"), None);
    assert_eq!(
        id(&t, "example.com.", "/"),
        Some("root".into()),
        "trailing dot"
    );
}

#[test]
fn t20_backends_follow_instances_and_leaders() {
    let mut b = TableBuilder::default();
    for l in [
        http("r", "x.com", "/", "svc", false),
        http("l", "leader.com", "/", "svc", true),
        up("svc", "i1", "10.0.0.1:80"),
        up("svc", "i2", "10.0.0.2:80"),
        ev(EventKind::ServiceLeader {
            service: "svc".into(),
            leader: Some("i2".into()),
        }),
    ] {
        b.apply(l);
    }
    let t = b.build();
    assert_eq!(t.http("x.com", "/").unwrap().backends.len(), 2);
    let leader = &t.http("leader.com", "/").unwrap().backends;
    assert_eq!(leader.len(), 1);
    assert_eq!(leader[0].addr, "10.0.0.2:80");
    b.apply(ev(EventKind::InstanceDown {
        service: "svc".into(),
        id: "i2".into(),
    }));
    b.apply(ev(EventKind::ServiceLeader {
        service: "svc".into(),
        leader: Some("i1".into()),
    }));
    let t = b.build();
    assert_eq!(t.http("x.com", "/").unwrap().backends.len(), 1);
    assert_eq!(t.http("leader.com", "/").unwrap().backends[0].id, "i1");
    // No instances: the route exists with no backends (the router answers 503, not 404).
    let t = table(vec![http("r", "x.com", "/", "nobody", false)]);
    assert!(t.http("x.com", "/").unwrap().backends.is_empty());
}

#[test]
fn t30_removals_resets_and_synced_marks() {
    let mut b = TableBuilder::default();
    b.apply(http("r", "x.com", "/", "svc", false));
    assert!(!b.apply(WatchLine::Heartbeat { revision: 3 }));
    assert!(
        b.apply(WatchLine::Synced { revision: 3 }),
        "synced publishes"
    );
    assert_eq!(b.build().revision, 3);
    b.apply(ev(EventKind::RouteRemoved { id: "r".into() }));
    assert!(b.build().http("x.com", "/").is_none());
    b.apply(http("r", "x.com", "/", "svc", false));
    // A reset forgets everything known before it.
    b.apply(WatchLine::Reset { revision: 9 });
    assert!(b.build().http("x.com", "/").is_none());
    assert_eq!(b.revision(), 9);
}

#[test]
fn t40_tcp_routes_and_certificates() {
    let cert = Certificate {
        id: "c1".into(),
        domains: vec!["example.com".into(), "*.example.com".into()],
        cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        key_pem: "PRIVATE KEY-----".into(),
    };
    let t = table(vec![
        ev(EventKind::RouteSet {
            route: Route::Tcp(TcpRoute {
                id: "t".into(),
                app: "a".into(),
                port: 3001,
                service: "db".into(),
                leader: false,
            }),
        }),
        up("db", "d1", "10.0.0.5:5432"),
        ev(EventKind::CertificateSet { certificate: cert }),
    ]);
    assert_eq!(t.tcp(3001).unwrap().backends[0].addr, "10.0.0.5:5432");
    assert!(t.tcp(3002).is_none());
    assert_eq!(t.tcp_ports().collect::<Vec<_>>(), vec![3001]);
    assert_eq!(t.certificate("Example.com").unwrap().id, "c1");
    assert_eq!(t.certificate("www.example.com").unwrap().id, "c1");
    assert!(
        t.certificate("a.b.example.com").is_none(),
        "a wildcard covers one label"
    );
    assert!(t.certificate("example.org").is_none());
}

#[test]
fn t50_a_follower_publishes_whole_batches_and_resumes_from_the_last_one() {
    let mut f = Follower::default();
    f.reconnect();
    assert!(f.line(WatchLine::Reset { revision: 0 }).is_none());
    assert!(f.line(http("r1", "a.test", "/", "a-web", false)).is_none());
    assert!(f.line(up("a-web", "i1", "10.0.0.1:80")).is_none());
    let t = f
        .line(WatchLine::Synced { revision: 5 })
        .expect("a whole batch");
    assert_eq!(id(&t, "a.test", "/"), Some("r1".into()));
    assert_eq!(f.revision(), 5);
    // A connection that breaks mid-batch: half a batch is never published, and the next
    // connection starts again from revision 5, without it.
    assert!(f.line(http("r2", "b.test", "/", "b-web", false)).is_none());
    f.reconnect();
    assert_eq!(f.revision(), 5);
    let t = f
        .line(WatchLine::Synced { revision: 6 })
        .expect("the next batch");
    assert_eq!(id(&t, "b.test", "/"), None, "the broken half is gone");
    assert_eq!(id(&t, "a.test", "/"), Some("r1".into()));
    assert!(f.line(WatchLine::Heartbeat { revision: 6 }).is_none());
}
