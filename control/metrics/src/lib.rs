//! The part of the Prometheus text format the daemon writes: `# HELP`/`# TYPE` headers,
//! samples with escaped labels, and histograms (fixed bounds, one lock each; they are
//! observed per request or per batch, never per packet).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Bounds for latencies, in seconds: etcd's, 0.5 ms doubling to 8 s.
pub const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192,
];

/// Bounds for slower operations (snapshots, blob transfers), in seconds.
pub const SLOW: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Writes the `# HELP` and `# TYPE` lines of a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line; `labels` as pairs, escaped here.
pub fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "{name}{} {value}", label_set(labels, None));
}

/// A whole single-sample metric: header and value.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    sample(out, name, &[], value);
}

fn label_set(labels: &[(&str, &str)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut s = String::from("{");
    let mut first = true;
    let mut push = |k: &str, v: &str| {
        if !first {
            s.push(',');
        }
        first = false;
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    };
    for (k, v) in labels {
        push(k, v);
    }
    if let Some(le) = le {
        push("le", le);
    }
    s.push('}');
    s
}

#[derive(Clone)]
struct Data {
    /// Counts per bound (not cumulative), then +Inf.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram with fixed bounds.
pub struct Histogram {
    bounds: &'static [f64],
    data: Mutex<Data>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            data: Mutex::new(Data {
                buckets: vec![0; bounds.len() + 1],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        let mut d = self.data.lock().expect("histogram lock");
        d.buckets[i] += 1;
        d.sum += value;
        d.count += 1;
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.data.lock().expect("histogram lock").count
    }

    /// The `_bucket`, `_sum` and `_count` lines (the header is the caller's, once per name).
    pub fn render(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        let d = self.data.lock().expect("histogram lock").clone();
        let mut cumulative = 0;
        for (i, n) in d.buckets.iter().enumerate() {
            cumulative += n;
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{} {cumulative}",
                label_set(labels, Some(&le))
            );
        }
        let _ = writeln!(out, "{name}_sum{} {}", label_set(labels, None), d.sum);
        let _ = writeln!(out, "{name}_count{} {}", label_set(labels, None), d.count);
    }
}

/// Histograms by label values (route and method, backend, ...), with a counter of outcomes
/// beside them.
pub struct HistogramVec {
    bounds: &'static [f64],
    by: Mutex<BTreeMap<Vec<String>, std::sync::Arc<Histogram>>>,
}

impl HistogramVec {
    pub fn new(bounds: &'static [f64]) -> Self {
        HistogramVec {
            bounds,
            by: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn with(&self, values: &[&str]) -> std::sync::Arc<Histogram> {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.by
            .lock()
            .expect("histogram vec lock")
            .entry(key)
            .or_insert_with(|| std::sync::Arc::new(Histogram::new(self.bounds)))
            .clone()
    }

    /// Every histogram's lines, labelled `names[i]=values[i]`.
    pub fn render(&self, out: &mut String, name: &str, names: &[&str]) {
        let all: Vec<(Vec<String>, std::sync::Arc<Histogram>)> = self
            .by
            .lock()
            .expect("histogram vec lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (values, h) in all {
            let labels: Vec<(&str, &str)> = names
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            h.render(out, name, &labels);
        }
    }
}

/// Counters by label values.
#[derive(Default)]
pub struct CounterVec {
    by: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    pub fn add(&self, values: &[&str], n: u64) {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        *self
            .by
            .lock()
            .expect("counter vec lock")
            .entry(key)
            .or_default() += n;
    }

    pub fn render(&self, out: &mut String, name: &str, names: &[&str]) {
        let all = self.by.lock().expect("counter vec lock").clone();
        for (values, n) in all {
            let labels: Vec<(&str, &str)> = names
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            sample(out, name, &labels, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", &[("route", "/a\"b")]);
        assert_eq!(
            out,
            "x_seconds_bucket{route=\"/a\\\"b\",le=\"0.1\"} 1\n\
             x_seconds_bucket{route=\"/a\\\"b\",le=\"1\"} 3\n\
             x_seconds_bucket{route=\"/a\\\"b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{route=\"/a\\\"b\"} 4.25\n\
             x_seconds_count{route=\"/a\\\"b\"} 4\n"
        );
    }

    #[test]
    fn t02_vectors_render_each_label_set() {
        let c = CounterVec::default();
        c.add(&["GET", "200"], 2);
        c.add(&["GET", "404"], 1);
        c.add(&["GET", "200"], 1);
        let mut out = String::new();
        c.render(&mut out, "req_total", &["method", "status"]);
        assert_eq!(
            out,
            "req_total{method=\"GET\",status=\"200\"} 3\nreq_total{method=\"GET\",status=\"404\"} 1\n"
        );
    }
}
