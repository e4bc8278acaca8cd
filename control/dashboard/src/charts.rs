//! What the dashboard's live charts show, read from the Prometheus text every host already
//! exports at `/metrics`: requests and their latency per route (the router), memory and CPU
//! per job (the job runner), and the host's load. One [`Sample`] per host; the page keeps
//! successive samples and draws rates from their differences.

use std::collections::BTreeMap;

use serde::Serialize;

/// One host's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Route id → requests answered so far.
    pub route_requests: BTreeMap<String, f64>,
    /// Route id → cumulative latency buckets, `(upper bound in seconds, count)`, the last
    /// one `+Inf` (as `f64::INFINITY`, sent as `null`).
    pub route_latency: BTreeMap<String, Vec<(f64, f64)>>,
    /// App → memory in use by its jobs on this host.
    pub app_memory_bytes: BTreeMap<String, f64>,
    /// App → job → CPU seconds that running job has used (per job, so a job that ends or
    /// starts between two samples does not read as a drop or a burst).
    pub app_cpu_seconds: BTreeMap<String, BTreeMap<String, f64>>,
    pub load1: Option<f64>,
    pub cpus: Option<f64>,
}

/// A sample line's labels, in order.
type Labels = Vec<(String, String)>;

/// One sample line: its name, labels and value.
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, Vec::new(), parse_value(value)?));
        }
    };
    let mut labels = Vec::new();
    let mut chars = rest.char_indices().peekable();
    let mut key = String::new();
    let end;
    loop {
        let (i, c) = chars.next()?;
        match c {
            '}' => {
                end = i;
                break;
            }
            ',' | ' ' => {}
            '=' => {
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.push((std::mem::take(&mut key), value));
            }
            c => key.push(c),
        }
    }
    let value = parse_value(&rest[end + 1..])?;
    Some((name, labels, value))
}

fn parse_value(text: &str) -> Option<f64> {
    match text.split_whitespace().next()? {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Sample {
    /// Reads one host's `/metrics` text; lines it does not need are skipped.
    pub fn from_metrics(text: &str) -> Sample {
        let mut s = Sample::default();
        for line in text.lines() {
            let Some((name, labels, value)) = parse_line(line) else {
                continue;
            };
            match name {
                "flynn_router_requests_total" => {
                    if let Some(route) = label(&labels, "route") {
                        *s.route_requests.entry(route.to_string()).or_default() += value;
                    }
                }
                "flynn_router_route_request_duration_seconds_bucket" => {
                    let (Some(route), Some(le)) = (label(&labels, "route"), label(&labels, "le"))
                    else {
                        continue;
                    };
                    if let Some(le) = parse_value(le) {
                        s.route_latency
                            .entry(route.to_string())
                            .or_default()
                            .push((le, value));
                    }
                }
                "flynn_job_memory_bytes" => {
                    if let Some(app) = label(&labels, "app") {
                        *s.app_memory_bytes.entry(app.to_string()).or_default() += value;
                    }
                }
                "flynn_job_cpu_seconds_total" => {
                    if let (Some(app), Some(job)) = (label(&labels, "app"), label(&labels, "job")) {
                        s.app_cpu_seconds
                            .entry(app.to_string())
                            .or_default()
                            .insert(job.to_string(), value);
                    }
                }
                "flynn_host_load1" => s.load1 = Some(value),
                "flynn_host_cpus" => s.cpus = Some(value),
                _ => {}
            }
        }
        for buckets in s.route_latency.values_mut() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP flynn_router_requests_total Requests answered
# TYPE flynn_router_requests_total counter
flynn_router_requests_total{route="http-1",class="2xx"} 10
flynn_router_requests_total{route="http-1",class="5xx"} 2
flynn_router_requests_total{route="",class="4xx"} 3
flynn_router_route_request_duration_seconds_bucket{route="http-1",le="+Inf"} 12
flynn_router_route_request_duration_seconds_bucket{route="http-1",le="0.001"} 4
flynn_router_route_request_duration_seconds_bucket{route="http-1",le="0.01"} 11
flynn_job_memory_bytes{app="web",type="web",job="web-web-1"} 1048576
flynn_job_memory_bytes{app="web",type="web",job="web-web-2"} 2097152
flynn_job_memory_bytes{app="we\"ird",type="x",job="j"} 5
flynn_job_cpu_seconds_total{app="web",type="web",job="web-web-1"} 1.5
flynn_host_load1 0.25
flynn_host_cpus 2
"#;

    #[test]
    fn t01_a_hosts_metrics_read_into_per_route_and_per_app_figures() {
        let s = Sample::from_metrics(TEXT);
        assert_eq!(s.route_requests["http-1"], 12.0);
        assert_eq!(s.route_requests[""], 3.0);
        assert_eq!(
            s.route_latency["http-1"],
            vec![(0.001, 4.0), (0.01, 11.0), (f64::INFINITY, 12.0)],
            "sorted by bound"
        );
        assert_eq!(s.app_memory_bytes["web"], 3.0 * 1048576.0);
        assert_eq!(s.app_memory_bytes["we\"ird"], 5.0, "escaped label values");
        assert_eq!(s.app_cpu_seconds["web"]["web-web-1"], 1.5);
        assert_eq!(s.load1, Some(0.25));
        assert_eq!(s.cpus, Some(2.0));
    }

    #[test]
    fn t02_garbage_is_skipped_not_fatal() {
        let s = Sample::from_metrics("flynn_host_load1\nflynn_job_memory_bytes{app=\"x} 3\n{}{}\n");
        assert_eq!(s, Sample::default());
    }
}
