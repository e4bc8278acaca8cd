//! `GET /charts` on the dashboard: the live charts' figures, gathered from every host's
//! `/metrics` at once (each bounded by [`ASK_LIMIT`]), per app and per host. The page asks
//! every few seconds and draws rates from successive answers.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use flynn_dashboard::charts::Sample;
use serde::Serialize;

use crate::error::ApiResult;
use crate::host::Host;

/// Longest one host's metrics may take; a host slower than this is shown as silent.
const ASK_LIMIT: Duration = Duration::from_millis(1500);

#[derive(Serialize, Default)]
pub(super) struct AppFigures {
    /// Requests the host's router answered for the app's routes so far.
    requests: f64,
    /// Cumulative latency buckets over those routes: `[upper bound s (null: +Inf), count]`.
    latency: Vec<(f64, f64)>,
    /// Memory in use by the app's jobs on the host.
    memory_bytes: f64,
    /// Job → CPU seconds it has used.
    cpu: BTreeMap<String, f64>,
}

/// One host's figures: the page takes differences per host, so a host that misses a
/// sample or restarts never reads as a burst.
#[derive(Serialize)]
pub(super) struct HostFigures {
    addr: String,
    /// Whether it answered in time; the figures below are missing when not.
    answered: bool,
    load1: Option<f64>,
    cpus: Option<f64>,
    apps: BTreeMap<String, AppFigures>,
}

#[derive(Serialize)]
pub(super) struct Charts {
    time_ms: u64,
    hosts: Vec<HostFigures>,
}

fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(ASK_LIMIT)
            .build()
            .unwrap_or_default()
    })
}

/// One host's sample, per app.
fn per_app(s: &Sample, route_app: &BTreeMap<String, String>) -> BTreeMap<String, AppFigures> {
    let mut apps: BTreeMap<String, AppFigures> = BTreeMap::new();
    for (route, n) in &s.route_requests {
        if let Some(app) = route_app.get(route) {
            apps.entry(app.clone()).or_default().requests += n;
        }
    }
    for (route, buckets) in &s.route_latency {
        let Some(app) = route_app.get(route) else {
            continue;
        };
        let figures = apps.entry(app.clone()).or_default();
        for (le, n) in buckets {
            match figures.latency.iter_mut().find(|(b, _)| b == le) {
                Some((_, total)) => *total += n,
                None => figures.latency.push((*le, *n)),
            }
        }
        figures.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    for (app, m) in &s.app_memory_bytes {
        apps.entry(app.clone()).or_default().memory_bytes += m;
    }
    for (app, jobs) in &s.app_cpu_seconds {
        apps.entry(app.clone())
            .or_default()
            .cpu
            .extend(jobs.iter().map(|(j, c)| (j.clone(), *c)));
    }
    apps
}

pub(super) async fn charts(State(host): State<std::sync::Arc<Host>>) -> ApiResult<Json<Charts>> {
    let node = host.node()?;
    let own = node.id;
    let asks = node.members().into_iter().map(|(id, addr)| {
        let host = host.clone();
        async move {
            let text = if id == own {
                Some(host.prometheus())
            } else {
                let got = client().get(format!("http://{addr}/metrics")).send().await;
                match got {
                    Ok(r) if r.status().is_success() => r.text().await.ok(),
                    _ => None,
                }
            };
            (addr, text.map(|t| Sample::from_metrics(&t)))
        }
    });
    let samples = futures::future::join_all(asks).await;
    let route_app: BTreeMap<String, String> = node.state.read(|a| {
        a.state
            .routes
            .routes
            .values()
            .map(|r| (r.id().to_string(), r.app().to_string()))
            .collect()
    });
    let hosts = samples
        .into_iter()
        .map(|(addr, sample)| match sample {
            Some(s) => HostFigures {
                addr,
                answered: true,
                load1: s.load1,
                cpus: s.cpus,
                apps: per_app(&s, &route_app),
            },
            None => HostFigures {
                addr,
                answered: false,
                load1: None,
                cpus: None,
                apps: BTreeMap::new(),
            },
        })
        .collect();
    Ok(Json(Charts {
        time_ms: crate::now_ms(),
        hosts,
    }))
}
