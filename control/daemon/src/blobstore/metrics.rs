//! Prometheus metrics of the blobstore, per backend: requests by method, errors, bytes in
//! and out, and a latency histogram (time to the response head).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bounds in seconds.
const BOUNDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default, Clone)]
struct Histogram {
    /// Counts per bound, then +Inf.
    buckets: [u64; BOUNDS.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct PerBackend {
    /// (method, backend) → requests and their latency.
    latency: BTreeMap<(&'static str, String), Histogram>,
    errors: BTreeMap<String, u64>,
    bytes_in: BTreeMap<String, u64>,
    bytes_out: BTreeMap<String, u64>,
    /// Bytes of local objects the kernel sent from the page cache (`sendfile`).
    sent_uncopied: u64,
    /// Bytes of local objects the front read and wrote itself: windows the page cache did
    /// not hold whole, or held with a page the kernel would not read without waiting.
    copied_uncached: u64,
    /// GETs answered before the API (`direct.rs`).
    answered_directly: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<PerBackend>,
}

impl Metrics {
    pub fn request(&self, method: &'static str, backend: &str, took: Duration, error: bool) {
        let mut m = self.inner.lock().expect("metrics lock");
        let h = m.latency.entry((method, backend.to_string())).or_default();
        let secs = took.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        h.buckets[i] += 1;
        h.sum += secs;
        h.count += 1;
        if error {
            *m.errors.entry(backend.to_string()).or_default() += 1;
        }
    }

    pub fn bytes_in(&self, backend: &str, n: u64) {
        *self
            .inner
            .lock()
            .expect("metrics lock")
            .bytes_in
            .entry(backend.to_string())
            .or_default() += n;
    }

    pub fn bytes_out(&self, backend: &str, n: u64) {
        *self
            .inner
            .lock()
            .expect("metrics lock")
            .bytes_out
            .entry(backend.to_string())
            .or_default() += n;
    }

    pub fn answered_directly(&self) {
        self.inner.lock().expect("metrics lock").answered_directly += 1;
    }

    pub fn sent_uncopied(&self, n: u64) {
        self.inner.lock().expect("metrics lock").sent_uncopied += n;
    }

    pub fn copied_uncached(&self, n: u64) {
        self.inner.lock().expect("metrics lock").copied_uncached += n;
    }

    pub fn render(&self) -> String {
        let m = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        out.push_str("# HELP flynn_blobstore_requests_total Blobstore requests by method and backend.\n# TYPE flynn_blobstore_requests_total counter\n");
        for ((method, backend), h) in &m.latency {
            let _ = writeln!(
                out,
                "flynn_blobstore_requests_total{{method=\"{method}\",backend=\"{backend}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP flynn_blobstore_errors_total Blobstore requests answered with an error.\n# TYPE flynn_blobstore_errors_total counter\n");
        for (backend, n) in &m.errors {
            let _ = writeln!(
                out,
                "flynn_blobstore_errors_total{{backend=\"{backend}\"}} {n}"
            );
        }
        out.push_str("# HELP flynn_blobstore_bytes_total Bytes stored (in) and served (out).\n# TYPE flynn_blobstore_bytes_total counter\n");
        for (dir, map) in [("in", &m.bytes_in), ("out", &m.bytes_out)] {
            for (backend, n) in map {
                let _ = writeln!(
                    out,
                    "flynn_blobstore_bytes_total{{direction=\"{dir}\",backend=\"{backend}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP flynn_blobstore_sendfile_bytes_total Bytes of local objects sent from the page cache without a copy (sendfile).\n# TYPE flynn_blobstore_sendfile_bytes_total counter\nflynn_blobstore_sendfile_bytes_total {}",
            m.sent_uncopied
        );
        let _ = writeln!(
            out,
            "# HELP flynn_blobstore_uncached_bytes_total Bytes of local objects sent by a read and a write, not sendfile: the page cache did not hold them whole, or not readable without waiting.\n# TYPE flynn_blobstore_uncached_bytes_total counter\nflynn_blobstore_uncached_bytes_total {}",
            m.copied_uncached
        );
        let _ = writeln!(
            out,
            "# HELP flynn_blobstore_direct_gets_total GETs answered on the connection before the API (sendfile for local copies).\n# TYPE flynn_blobstore_direct_gets_total counter\nflynn_blobstore_direct_gets_total {}",
            m.answered_directly
        );
        out.push_str("# HELP flynn_blobstore_request_seconds Time from a request to its response head.\n# TYPE flynn_blobstore_request_seconds histogram\n");
        for ((method, backend), h) in &m.latency {
            let labels = format!("method=\"{method}\",backend=\"{backend}\"");
            let mut cumulative = 0;
            for (i, bound) in BOUNDS.iter().enumerate() {
                cumulative += h.buckets[i];
                let _ = writeln!(
                    out,
                    "flynn_blobstore_request_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += h.buckets[BOUNDS.len()];
            let _ = writeln!(
                out,
                "flynn_blobstore_request_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "flynn_blobstore_request_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "flynn_blobstore_request_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_histogram_buckets_are_cumulative_per_method_and_backend() {
        let m = Metrics::default();
        m.request("get", "embedded", Duration::from_millis(3), false);
        m.request("get", "embedded", Duration::from_millis(30), false);
        m.request("get", "embedded", Duration::from_secs(60), true);
        m.request("put", "s3main", Duration::from_millis(200), false);
        m.bytes_in("s3main", 10);
        let text = m.render();
        for line in [
            "flynn_blobstore_requests_total{method=\"get\",backend=\"embedded\"} 3",
            "flynn_blobstore_request_seconds_bucket{method=\"get\",backend=\"embedded\",le=\"0.005\"} 1",
            "flynn_blobstore_request_seconds_bucket{method=\"get\",backend=\"embedded\",le=\"0.05\"} 2",
            "flynn_blobstore_request_seconds_bucket{method=\"get\",backend=\"embedded\",le=\"10\"} 2",
            "flynn_blobstore_request_seconds_bucket{method=\"get\",backend=\"embedded\",le=\"+Inf\"} 3",
            "flynn_blobstore_request_seconds_count{method=\"put\",backend=\"s3main\"} 1",
            "flynn_blobstore_errors_total{backend=\"embedded\"} 1",
            "flynn_blobstore_bytes_total{direction=\"in\",backend=\"s3main\"} 10",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
