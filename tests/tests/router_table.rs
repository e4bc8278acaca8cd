//! t40: the router's route table follows a real host's watch stream, across a restart of
//! that host.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flynn_client::{InstanceRegistration, RouteRequest};
use flynn_router_table::{follow, RouteTable};
use flynn_tests::{eventually, Cluster};

fn http_route(domain: &str) -> RouteRequest {
    let mut route = RouteRequest::http(domain);
    if let RouteRequest::Http { service, .. } = &mut route {
        *service = Some("web-svc".into());
    }
    route
}

#[tokio::test(flavor = "multi_thread")]
async fn t40_route_table_follows_the_watch_stream_across_a_restart() {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    let api = c.client(0);
    api.create_app("web").await.unwrap();
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let follower = tokio::spawn(follow(c.client(0), table.clone()));

    let first = api
        .add_route("web", &http_route("web.example.com"))
        .await
        .unwrap();
    api.register_instance(
        "web-svc",
        "i1",
        &InstanceRegistration {
            addr: "10.1.2.3:8080".into(),
            ttl_ms: 60_000,
            meta: Default::default(),
        },
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "route with its backend",
        || async {
            let t = table.load();
            let e = t.http("web.example.com", "/")?;
            (e.route.id == first.id() && e.backends.len() == 1).then_some(())
        },
    )
    .await;

    // The host restarts: the follower keeps serving the last table, reconnects, resumes.
    let before = table.load().revision;
    c.restart(0);
    c.wait_leader(0, None).await;
    assert!(
        table.load().http("web.example.com", "/").is_some(),
        "kept while disconnected"
    );
    c.client(0).remove_route("web", first.id()).await.unwrap();
    c.client(0)
        .add_route("web", &http_route("new.example.com"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "changes after the restart",
        || async {
            let t = table.load();
            (t.http("web.example.com", "/").is_none()
                && t.http("new.example.com", "/").is_some()
                && t.revision > before)
                .then_some(())
        },
    )
    .await;
    follower.abort();
}
