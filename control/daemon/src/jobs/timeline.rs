//! How long a service job took to come up, stage by stage, as its host saw it:
//! - `noticed`: from its placement (the scheduler's clock) to this host starting it;
//! - `prepare`: its root filesystem, cgroup, network and spec;
//! - `init`: the container's init (the shim) up;
//! - `listening`: from then until its port answered (its own start-up, and the poll);
//! - `running`: the report that it runs, and its registration, committed.
//!
//! Said once per job in the log (`job up`, with each stage in ms) and counted in
//! `flynn_job_start_stage_seconds{stage}`. `bench/jobs` reads the log lines for its
//! stage table; the router serving it comes after `running`.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use flynn_metrics::{HistogramVec, LATENCY};

static STAGES: LazyLock<HistogramVec> = LazyLock::new(|| HistogramVec::new(LATENCY));

pub(super) struct StartTimeline {
    /// Placement to this host starting it.
    noticed: Duration,
    marks: Mutex<Marks>,
}

struct Marks {
    last: Instant,
    stages: Vec<(&'static str, Duration)>,
    said: bool,
}

impl StartTimeline {
    /// Begins a job's timeline now, as this host takes it up from `placed_ms`.
    pub(super) fn begin(placed_ms: u64) -> Self {
        StartTimeline {
            noticed: Duration::from_millis(crate::now_ms().saturating_sub(placed_ms)),
            marks: Mutex::new(Marks {
                last: Instant::now(),
                stages: Vec::new(),
                said: false,
            }),
        }
    }

    /// `stage` ended now: it took the time since the last one ended.
    pub(super) fn mark(&self, stage: &'static str) {
        let mut m = self.marks.lock().expect("timeline lock");
        let now = Instant::now();
        let took = now - m.last;
        m.last = now;
        m.stages.push((stage, took));
    }

    /// The job is up: its stages are logged and counted (once).
    pub(super) fn up(&self, job: &str) {
        let m = {
            let mut m = self.marks.lock().expect("timeline lock");
            if std::mem::replace(&mut m.said, true) {
                return;
            }
            m.stages.clone()
        };
        let stage = |name: &str| {
            m.iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, d)| d.as_secs_f64() * 1000.0)
        };
        STAGES.with(&["noticed"]).observe_duration(self.noticed);
        for (name, took) in &m {
            STAGES.with(&[name]).observe_duration(*took);
        }
        tracing::info!(
            job,
            noticed_ms = self.noticed.as_millis() as u64,
            prepare_ms = %format!("{:.1}", stage("prepare")),
            init_ms = %format!("{:.1}", stage("init")),
            listening_ms = %format!("{:.1}", stage("listening")),
            running_ms = %format!("{:.1}", stage("running")),
            "job up"
        );
    }
}

/// The stage histograms, for the host's `/metrics`.
pub fn render(out: &mut String) {
    flynn_metrics::header(
        out,
        "flynn_job_start_stage_seconds",
        "histogram",
        "Time a service job spent in each stage of starting on this host (noticed, prepare, init, listening, running).",
    );
    STAGES.render(out, "flynn_job_start_stage_seconds", &["stage"]);
}
