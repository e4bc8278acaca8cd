//! Router metrics. Each worker counts into its own plain struct and publishes a copy once a
//! second (and when it stops), so the request path never touches shared memory; a scrape
//! sums the published copies and is at most a second behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Maps looked up on every request: keys are route ids and backend addresses.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// Route id ("" for requests no route matched) → counts by status class 1xx..5xx and
    /// latency.
    pub requests: FastMap<String, RouteStats>,
    pub latency: [u64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum: f64,
    pub latency_count: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_errors: u64,
    /// Backends newly ejected by passive health checks.
    pub ejections: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub refused_connections: u64,
    /// TCP route connections that went over to splice (bulk flows).
    pub tcp_spliced: u64,
    pub uring_enters: u64,
    pub uring_submitted: u64,
    pub uring_completions: u64,
    pub uring_buffers_exhausted: u64,
}

/// One route's requests: by status class, and their latency (per app p99 on the dashboard).
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    pub classes: [u64; 5],
    pub latency: [u64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum: f64,
}

impl WorkerStats {
    pub fn request(&mut self, route: &str, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let r = match self.requests.get_mut(route) {
            Some(r) => r,
            None => self.requests.entry(route.to_string()).or_default(),
        };
        r.classes[class] += 1;
        // An upgraded connection (101: WebSocket) lasts as long as its client keeps it:
        // not a response time, so not in the route's latency.
        if status != 101 {
            r.latency[bucket] += 1;
            r.latency_sum += secs;
        }
        self.latency[bucket] += 1;
        self.latency_sum += secs;
        self.latency_count += 1;
    }

    fn add(&mut self, o: &WorkerStats) {
        for (route, c) in &o.requests {
            let mine = self.requests.entry(route.clone()).or_default();
            for i in 0..5 {
                mine.classes[i] += c.classes[i];
            }
            for i in 0..mine.latency.len() {
                mine.latency[i] += c.latency[i];
            }
            mine.latency_sum += c.latency_sum;
        }
        for i in 0..self.latency.len() {
            self.latency[i] += o.latency[i];
        }
        self.latency_sum += o.latency_sum;
        self.latency_count += o.latency_count;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.connect_errors += o.connect_errors;
        self.ejections += o.ejections;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_failures += o.tls_failures;
        self.refused_connections += o.refused_connections;
        self.tcp_spliced += o.tcp_spliced;
        self.uring_enters += o.uring_enters;
        self.uring_submitted += o.uring_submitted;
        self.uring_completions += o.uring_completions;
        self.uring_buffers_exhausted += o.uring_buffers_exhausted;
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    published: Mutex<Vec<WorkerStats>>,
    /// Client connections open now, across workers (also enforces the connection limit).
    pub open_connections: AtomicUsize,
    pub table_revision: AtomicU64,
    /// The I/O backend the router started on, and why (set once at start).
    pub io: std::sync::OnceLock<crate::io::IoChoice>,
    /// Workers whose ring could not be set up and that run epoll instead.
    pub io_fallbacks: AtomicUsize,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Metrics {
            published: Mutex::new(vec![WorkerStats::default(); workers]),
            ..Metrics::default()
        }
    }

    pub fn publish(&self, worker: usize, stats: &WorkerStats) {
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = p.get_mut(worker) {
            slot.clone_from(stats);
        }
    }

    pub fn total(&self) -> WorkerStats {
        let p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = WorkerStats::default();
        for s in p.iter() {
            t.add(s);
        }
        t
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        use flynn_metrics::{header, sample, single};
        let t = self.total();
        let mut o = String::new();
        header(
            &mut o,
            "flynn_router_requests_total",
            "counter",
            "Requests answered, by route and status class.",
        );
        let mut routes: Vec<_> = t.requests.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        for (route, c) in &routes {
            for (i, n) in c.classes.iter().enumerate() {
                let class = format!("{}xx", i + 1);
                sample(
                    &mut o,
                    "flynn_router_requests_total",
                    &[("route", route), ("class", &class)],
                    n,
                );
            }
        }
        header(
            &mut o,
            "flynn_router_request_duration_seconds",
            "histogram",
            "Time from a request's head to the end of its response.",
        );
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += t.latency[i];
            sample(
                &mut o,
                "flynn_router_request_duration_seconds_bucket",
                &[("le", &b.to_string())],
                cumulative,
            );
        }
        cumulative += t.latency[LATENCY_BUCKETS.len()];
        sample(
            &mut o,
            "flynn_router_request_duration_seconds_bucket",
            &[("le", "+Inf")],
            cumulative,
        );
        sample(
            &mut o,
            "flynn_router_request_duration_seconds_sum",
            &[],
            t.latency_sum,
        );
        sample(
            &mut o,
            "flynn_router_request_duration_seconds_count",
            &[],
            t.latency_count,
        );
        header(
            &mut o,
            "flynn_router_route_request_duration_seconds",
            "histogram",
            "Time from a request's head to the end of its response, by route.",
        );
        for (route, c) in &routes {
            let mut cumulative = 0;
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += c.latency[i];
                sample(
                    &mut o,
                    "flynn_router_route_request_duration_seconds_bucket",
                    &[("route", route), ("le", &b.to_string())],
                    cumulative,
                );
            }
            cumulative += c.latency[LATENCY_BUCKETS.len()];
            sample(
                &mut o,
                "flynn_router_route_request_duration_seconds_bucket",
                &[("route", route), ("le", "+Inf")],
                cumulative,
            );
            sample(
                &mut o,
                "flynn_router_route_request_duration_seconds_sum",
                &[("route", route)],
                c.latency_sum,
            );
            sample(
                &mut o,
                "flynn_router_route_request_duration_seconds_count",
                &[("route", route)],
                cumulative,
            );
        }
        let counters = [
            (
                "flynn_router_bytes_received_total",
                "Request body bytes read from clients, over HTTP/1 and HTTP/2 alike (heads are not counted: their encodings differ).",
                t.bytes_in,
            ),
            (
                "flynn_router_bytes_sent_total",
                "Response body bytes written to clients, over HTTP/1 and HTTP/2 alike (heads are not counted).",
                t.bytes_out,
            ),
            (
                "flynn_router_backend_connect_errors_total",
                "Failed connects to backends.",
                t.connect_errors,
            ),
            (
                "flynn_router_backend_ejections_total",
                "Backends passed over for a while after a refused connect or no response in time.",
                t.ejections,
            ),
            (
                "flynn_router_tls_handshakes_total",
                "Completed TLS handshakes.",
                t.tls_handshakes,
            ),
            (
                "flynn_router_tls_handshake_failures_total",
                "Failed TLS handshakes.",
                t.tls_failures,
            ),
            (
                "flynn_router_refused_connections_total",
                "Connections closed at once by the connection limit.",
                t.refused_connections,
            ),
            (
                "flynn_router_tcp_spliced_connections_total",
                "TCP route connections relayed by splice once past the copy phase.",
                t.tcp_spliced,
            ),
            (
                "flynn_router_uring_enters_total",
                "io_uring_enter calls (submission and completion batches) of the io_uring backend.",
                t.uring_enters,
            ),
            (
                "flynn_router_uring_submissions_total",
                "Operations submitted to the io_uring backend's rings.",
                t.uring_submitted,
            ),
            (
                "flynn_router_uring_completions_total",
                "Completions reaped from the io_uring backend's rings.",
                t.uring_completions,
            ),
            (
                "flynn_router_uring_buffers_exhausted_total",
                "Receives that found the provided buffer ring empty (they wait for a reader to return one).",
                t.uring_buffers_exhausted,
            ),
        ];
        for (name, help, v) in counters {
            single(&mut o, name, "counter", help, v);
        }
        let choice = self.io.get();
        let io = choice.map_or(crate::io::IoBackend::Epoll, |c| c.backend);
        header(
            &mut o,
            "flynn_router_io_backend",
            "gauge",
            "The I/O backend the router's workers started on (1 for the one in use).",
        );
        for b in [crate::io::IoBackend::Uring, crate::io::IoBackend::Epoll] {
            sample(
                &mut o,
                "flynn_router_io_backend",
                &[("backend", b.name())],
                u8::from(b == io),
            );
        }
        // Why `auto` passed io_uring over, and what the ring's self-test measured.
        if let Some(why) = choice.and_then(|c| c.fallback.as_deref()) {
            header(
                &mut o,
                "flynn_router_io_fallback_info",
                "gauge",
                "Why the router runs epoll although it may choose io_uring (--io auto).",
            );
            flynn_metrics::sample(
                &mut o,
                "flynn_router_io_fallback_info",
                &[("reason", why)],
                1,
            );
        }
        if let Some(rtt) = choice.and_then(|c| c.ring_round_trip) {
            flynn_metrics::single(
                &mut o,
                "flynn_router_io_self_test_round_trip_seconds",
                "gauge",
                "Median loopback round trip through an io_uring ring, timed at start (--io auto).",
                rtt.as_secs_f64(),
            );
        }
        single(
            &mut o,
            "flynn_router_io_fallback_workers",
            "gauge",
            "Workers whose io_uring ring failed to set up and that run epoll.",
            self.io_fallbacks.load(Ordering::Relaxed),
        );
        single(
            &mut o,
            "flynn_router_open_connections",
            "gauge",
            "Client connections open now.",
            self.open_connections.load(Ordering::Relaxed),
        );
        single(
            &mut o,
            "flynn_router_table_revision",
            "gauge",
            "Control-plane revision the route table reflects.",
            self.table_revision.load(Ordering::Relaxed),
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_each_route_has_its_own_latency_and_upgrades_stay_out_of_it() {
        let m = Metrics::new(2);
        let mut a = WorkerStats::default();
        a.request("r1", 200, Duration::from_micros(300));
        a.request("r1", 503, Duration::from_millis(30));
        a.request("r1", 101, Duration::from_secs(600));
        let mut b = WorkerStats::default();
        b.request("r1", 200, Duration::from_millis(2));
        b.request("r2", 404, Duration::from_millis(7));
        m.publish(0, &a);
        m.publish(1, &b);
        let text = m.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_string())
                .unwrap()
        };
        let bucket = "flynn_router_route_request_duration_seconds_bucket";
        assert_eq!(
            line(&format!("{bucket}{{route=\"r1\",le=\"0.0005\"}}")),
            "1"
        );
        assert_eq!(
            line(&format!("{bucket}{{route=\"r1\",le=\"0.0025\"}}")),
            "2"
        );
        assert_eq!(
            line(&format!("{bucket}{{route=\"r1\",le=\"+Inf\"}}")),
            "3",
            "not the 101"
        );
        assert_eq!(line(&format!("{bucket}{{route=\"r2\",le=\"0.01\"}}")), "1");
        assert_eq!(
            line("flynn_router_requests_total{route=\"r1\",class=\"1xx\"}"),
            "1",
            "the upgrade is still a request"
        );
        assert_eq!(line("flynn_router_request_duration_seconds_count"), "5");
    }
}
