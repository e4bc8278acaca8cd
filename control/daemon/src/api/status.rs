//! The status page: `GET /` on every host's API, reached as `status.$CLUSTER_DOMAIN` through
//! any host's router (bootstrap routes it to service `status`, which every host registers).
//! It answers Flynn's shape, `{"data":{"status":..,"version":..,"detail":{..}}}`: 200 when
//! every core component is healthy, 500 otherwise. Optional lines (apps' formations) are
//! listed and never make it 500. The page answers within [`PAGE_LIMIT`] whatever is hung:
//! its checks run at once, each bounded; each host keeps its own components' lines fresh in
//! the background (each check bounded by [`CHECK_LIMIT`]), so asking a live host is quick,
//! and a hung one shows as unhealthy instead of hanging the page. Bootstrap gives the route
//! `status.$CLUSTER_DOMAIN` a response timeout just over that bound, so a router whose
//! first pick is a hung host asks another in time.
//!
//! **Who needs the key.** A client on a private (10/8, 172.16/12, 192.168/16, fc00::/7),
//! loopback or shared (100.64/10) address reads it freely; anyone else needs the status
//! app's `AUTH_KEY`, as `?key=` or the HTTP basic password. The client is the address the
//! router saw: the last `X-Forwarded-For` entry, trusted only when the connection comes from
//! a cluster host (a router) or loopback. Entries a client wrote itself come before it and
//! are never read.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flynn_client::{ComponentHealth, HostClient, HostHealth};
use flynn_state::JobState;
use serde_json::json;

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::host::Host;
use crate::version;

/// Longest any one component check may take (in the background).
pub const CHECK_LIMIT: Duration = Duration::from_secs(3);
/// Longest the page's checks (quorum read, every host's lines) may take, together.
pub const PAGE_LIMIT: Duration = Duration::from_millis(1000);
/// How often each host refreshes its own lines.
const REFRESH: Duration = Duration::from_secs(2);
/// Lines older than this are not served: they are measured again.
const STALE: Duration = Duration::from_secs(8);

/// Measures this host's lines every [`REFRESH`], for as long as the daemon runs.
pub async fn keep_health_fresh(host: std::sync::Arc<Host>) {
    loop {
        let lines = measure_local_health(&host).await;
        host.health.store(lines);
        tokio::time::sleep(REFRESH).await;
    }
}
/// The service `status.$CLUSTER_DOMAIN` routes to.
pub use crate::components::controller::STATUS_SERVICE as SERVICE;

pub fn open_routes() -> Router<AppState> {
    Router::new().route("/", get(page))
}

pub fn secret_routes() -> Router<AppState> {
    Router::new().route("/host/health", get(host_health))
}

/// Behind a controller key: the page's verdict as JSON (`GET /status/page`).
pub fn controller_routes() -> Router<AppState> {
    Router::new().route("/status/page", get(verdict))
}

async fn host_health(State(host): State<AppState>) -> Json<HostHealth> {
    Json(local_health(&host).await)
}

/// This host's own lines: the daemon itself and every component that lists one (from the
/// background measurement, or measured now when that is stale).
pub async fn local_health(host: &Host) -> HostHealth {
    match host.health.fresh(STALE) {
        Some(lines) => lines,
        None => {
            let lines = measure_local_health(host).await;
            host.health.store(lines.clone());
            lines
        }
    }
}

/// Measures this host's lines. A host without a router or firewall says so instead of
/// leaving the line out.
async fn measure_local_health(host: &Host) -> HostHealth {
    let mut lines = host.components().health(CHECK_LIMIT).await;
    lines.insert(
        "daemon".into(),
        ComponentHealth {
            version: Some(version().to_string()),
            ..ComponentHealth::healthy(json!(null))
        },
    );
    for name in ["router", "firewall"] {
        lines
            .entry(name.to_string())
            .or_insert_with(|| ComponentHealth::healthy(json!("not enabled on this host")));
    }
    lines
}

#[derive(serde::Deserialize, Default)]
struct KeyQuery {
    key: Option<String>,
}

async fn page(
    State(host): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Query(q): Query<KeyQuery>,
) -> Response {
    let node = match host.node() {
        Ok(n) => n.clone(),
        Err(e) => return e.into_response(),
    };
    let member_ips = member_ips(&node);
    let Some(axum::Extension(ConnectInfo(peer))) = peer else {
        return ApiError::Internal("the connection's peer address is unknown".into())
            .into_response();
    };
    let client = client_ip(peer.ip(), &headers, &member_ips);
    if !key_exempt(client) {
        let want = node.state.read(|a| {
            a.state
                .apps
                .get(SERVICE)
                .and_then(|app| app.env.global.get("AUTH_KEY").cloned())
        });
        let given = q.key.or_else(|| super::auth::presented_key(&headers));
        let ok = match (want, given) {
            (Some(w), Some(g)) => {
                bool::from(subtle::ConstantTimeEq::ct_eq(w.as_bytes(), g.as_bytes()))
            }
            _ => false,
        };
        if !ok {
            let mut r = ApiError::Unauthorized(format!(
                "the status page needs the status app's AUTH_KEY from {client}"
            ))
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"flynn status\""),
            );
            return r;
        }
    }

    let (healthy, body) = report(&host, &node).await;
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (code, Json(body)).into_response()
}

/// The status page's verdict behind a controller key (the dashboard's cluster page): the
/// same body, always with 200, so a client can tell an unhealthy cluster from an error.
async fn verdict(State(host): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let node = host.node()?.clone();
    Ok(Json(report(&host, &node).await.1))
}

/// Asks every host and Raft: whether the cluster is healthy, and the page's body.
async fn report(host: &AppState, node: &crate::node::Node) -> (bool, serde_json::Value) {
    let members = node.members();
    let mut detail: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut healthy = true;
    let mut core = |name: String, h: ComponentHealth| {
        healthy &= h.is_healthy();
        detail.insert(name, serde_json::to_value(h).unwrap_or_default());
    };

    // Raft (a linearizable read confirms a leader with a quorum behind it) and every host's
    // own lines, all at once, each bounded by the page's limit.
    let barrier = tokio::time::timeout(PAGE_LIMIT, node.read_barrier());
    let secret = node.secret().to_string();
    let asks = members.iter().map(|(id, addr)| {
        let own = *id == node.id;
        let (host, secret, addr) = (host.clone(), secret.clone(), addr.clone());
        async move {
            let ip = addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(ip, _)| ip)
                .to_string();
            let answer = if own {
                Ok(local_health(&host).await)
            } else {
                let client = HostClient::new(&format!("http://{addr}"), Some(&secret), PAGE_LIMIT);
                match tokio::time::timeout(PAGE_LIMIT, client.health()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", PAGE_LIMIT.as_millis())),
                }
            };
            (ip, answer)
        }
    });
    let (barrier, answers) = tokio::join!(barrier, futures::future::join_all(asks));
    let m = node.metrics();
    let raft = match barrier {
        Ok(Ok(())) => ComponentHealth::healthy(
            json!({"leader": m.current_leader, "term": m.current_term, "members": members.len()}),
        ),
        Ok(Err(e)) => ComponentHealth::unhealthy(json!({"error": e.to_string()})),
        Err(_) => ComponentHealth::unhealthy(json!({"error": format!(
            "no quorum read within {} ms", PAGE_LIMIT.as_millis()
        )})),
    };
    let quorum = raft.is_healthy();
    core("raft".into(), raft);
    // The scheduler runs on the leader: it works when the cluster has one.
    let pending = node.state.read(|a| {
        a.state
            .jobs
            .jobs
            .values()
            .filter(|j| j.state == JobState::Pending)
            .count()
    });
    core(
        "scheduler".into(),
        ComponentHealth::from_check(
            quorum,
            json!({"leader": m.current_leader, "pending_jobs": pending}),
        ),
    );
    for (ip, answer) in answers {
        match answer {
            Ok(lines) => {
                for (name, h) in lines {
                    core(format!("{name}@{ip}"), h);
                }
            }
            Err(e) => core(
                format!("daemon@{ip}"),
                ComponentHealth::unhealthy(json!({"error": e})),
            ),
        }
    }

    // Optional: each app's formation against the jobs running for it.
    let apps = node.state.read(|a| {
        let jobs = &a.state.jobs;
        jobs.formations
            .values()
            .filter(|f| f.processes.values().any(|n| *n > 0))
            .map(|f| {
                let desired: u32 = f.processes.values().sum();
                let running = jobs
                    .app_jobs(&f.app)
                    .filter(|j| !j.oneoff && j.state == JobState::Running)
                    .count() as u32;
                (f.app.clone(), desired, running)
            })
            .collect::<Vec<_>>()
    });
    for (app, desired, running) in apps {
        let h = ComponentHealth::from_check(
            running >= desired,
            json!({"optional": true, "desired": desired, "running": running}),
        );
        detail.insert(
            format!("app:{app}"),
            serde_json::to_value(h).unwrap_or_default(),
        );
    }

    let status = if healthy { "healthy" } else { "unhealthy" };
    let body = json!({"data": {"status": status, "version": version(), "detail": detail}});
    (healthy, body)
}

/// The cluster hosts' addresses: where a router may forward a request from.
pub fn member_ips(node: &crate::node::Node) -> Vec<IpAddr> {
    node.members()
        .iter()
        .filter_map(|(_, a)| a.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .collect()
}

/// The address a request came from, as far as a host can know it: the connection's peer,
/// unless that peer is a router (a cluster host or loopback), whose last `X-Forwarded-For`
/// entry is the address it accepted the request from.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, routers: &[IpAddr]) -> IpAddr {
    let peer = canonical(peer);
    let via_router = peer.is_loopback() || routers.iter().any(|r| canonical(*r) == peer);
    if !via_router {
        return peer;
    }
    let last = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .and_then(|s| s.trim().parse::<IpAddr>().ok());
    last.map(canonical).unwrap_or(peer)
}

/// Private, loopback and shared (carrier-grade NAT) addresses read the page without a key.
pub fn key_exempt(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback() || v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn t01_private_loopback_and_shared_addresses_need_no_key() {
        for free in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(key_exempt(ip(free)), "{free} should need no key");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "198.51.100.7",
            "2001:db8::1",
            "::ffff:203.0.113.9",
        ] {
            assert!(!key_exempt(ip(public)), "{public} should need the key");
        }
    }

    #[test]
    fn t02_the_client_is_what_the_router_saw_not_what_it_wrote() {
        let routers = [ip("10.0.0.1"), ip("10.0.0.2")];
        let mut h = HeaderMap::new();
        // The client wrote a private address; the router appended the real one.
        h.insert("x-forwarded-for", "10.9.9.9, 203.0.113.5".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &routers), ip("203.0.113.5"));
        // Not from a router: the header is the client's own word and is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &routers),
            ip("198.51.100.1")
        );
        // From a router with no header: the router itself asked.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &routers),
            ip("10.0.0.1")
        );
        // Split across header lines, the last entry of the last line counts.
        let mut two = HeaderMap::new();
        two.append("x-forwarded-for", "10.1.1.1".parse().unwrap());
        two.append("x-forwarded-for", "198.51.100.9".parse().unwrap());
        assert_eq!(
            client_ip(ip("127.0.0.1"), &two, &routers),
            ip("198.51.100.9")
        );
    }
}
