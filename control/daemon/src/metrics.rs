//! The daemon's own series beside the Raft store's: proposals as etcd counts them
//! (committed, failed, pending, commit latency), leader changes, the API's requests by
//! route and status with latency, and the scheduler's placements.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use flynn_metrics::{header, single, CounterVec, Histogram, HistogramVec, LATENCY};

/// Proposals this host (as leader) committed: applied, whether the state machine took or
/// refused them.
pub static PROPOSALS_COMMITTED: AtomicU64 = AtomicU64::new(0);
/// Of those, refused by the state machine (a conflict, an invalid request).
pub static PROPOSALS_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Proposals that did not commit here: leadership moved, or the outcome is unknown.
pub static PROPOSALS_FAILED: AtomicU64 = AtomicU64::new(0);
pub static PROPOSALS_PENDING: AtomicI64 = AtomicI64::new(0);
pub static PROPOSAL_COMMIT: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(LATENCY));
pub static LEADER_CHANGES: AtomicU64 = AtomicU64::new(0);
/// Read indexes this host answered as leader under its lease, without a heartbeat round.
pub static READS_LEASED: AtomicU64 = AtomicU64::new(0);
/// Read indexes it answered after confirming its leadership with a heartbeat round.
pub static READS_CONFIRMED: AtomicU64 = AtomicU64::new(0);
/// Jobs the scheduler placed (on the leader).
pub static JOBS_PLACED: AtomicU64 = AtomicU64::new(0);
/// Process types with jobs wanted that no live host has room for, at the scheduler's last
/// pass.
pub static JOBS_UNPLACED: AtomicU64 = AtomicU64::new(0);

static API_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| HistogramVec::new(LATENCY));
static API_REQUESTS: LazyLock<CounterVec> = LazyLock::new(CounterVec::default);

/// Times a proposal from its arrival at the leader's proposer to its outcome.
pub struct PendingProposal(Instant);

impl PendingProposal {
    pub fn start() -> Self {
        PROPOSALS_PENDING.fetch_add(1, Ordering::Relaxed);
        PendingProposal(Instant::now())
    }

    pub fn committed(self, refused: bool) {
        PROPOSALS_COMMITTED.fetch_add(1, Ordering::Relaxed);
        if refused {
            PROPOSALS_REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        PROPOSAL_COMMIT.observe_duration(self.0.elapsed());
    }
}

impl Drop for PendingProposal {
    fn drop(&mut self) {
        PROPOSALS_PENDING.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn proposal_failed() {
    PROPOSALS_FAILED.fetch_add(1, Ordering::Relaxed);
}

/// Counts every API request by its route (the pattern, not the path: no label per app),
/// method and status, with its latency to the response head.
pub async fn api(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    API_LATENCY
        .with(&[&route, &method])
        .observe_duration(started.elapsed());
    API_REQUESTS.add(&[&route, &method, &status], 1);
    resp
}

pub fn render(out: &mut String) {
    single(
        out,
        "flynn_raft_proposals_committed_total",
        "counter",
        "Proposals committed by this host as leader (applied or refused by the state machine).",
        PROPOSALS_COMMITTED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_proposals_refused_total",
        "counter",
        "Committed proposals the state machine refused (conflicts, invalid requests).",
        PROPOSALS_REFUSED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_proposals_failed_total",
        "counter",
        "Proposals that did not commit here (leadership moved, or the outcome is unknown).",
        PROPOSALS_FAILED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_proposals_pending",
        "gauge",
        "Proposals waiting at this host's proposer or in flight.",
        PROPOSALS_PENDING.load(Ordering::Relaxed).max(0),
    );
    header(
        out,
        "flynn_raft_proposal_commit_duration_seconds",
        "histogram",
        "Time from a proposal reaching the leader to its outcome.",
    );
    PROPOSAL_COMMIT.render(out, "flynn_raft_proposal_commit_duration_seconds", &[]);
    single(
        out,
        "flynn_raft_leader_changes_seen_total",
        "counter",
        "Leader changes this host has seen.",
        LEADER_CHANGES.load(Ordering::Relaxed),
    );
    header(
        out,
        "flynn_raft_read_index_total",
        "counter",
        "Read indexes this host answered as leader: under its lease, or confirmed by a heartbeat round.",
    );
    for (how, n) in [("lease", &READS_LEASED), ("heartbeat", &READS_CONFIRMED)] {
        flynn_metrics::sample(
            out,
            "flynn_raft_read_index_total",
            &[("how", how)],
            n.load(Ordering::Relaxed),
        );
    }
    flynn_raft::metrics::render(out);
    crate::jobs::timeline::render(out);
    header(
        out,
        "flynn_api_requests_total",
        "counter",
        "Controller and host API requests by route, method and status.",
    );
    API_REQUESTS.render(
        out,
        "flynn_api_requests_total",
        &["route", "method", "status"],
    );
    header(
        out,
        "flynn_api_request_duration_seconds",
        "histogram",
        "Controller and host API latency to the response head, by route and method.",
    );
    API_LATENCY.render(
        out,
        "flynn_api_request_duration_seconds",
        &["route", "method"],
    );
    single(
        out,
        "flynn_scheduler_jobs_placed_total",
        "counter",
        "Jobs the scheduler placed while this host led.",
        JOBS_PLACED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_scheduler_types_without_room",
        "gauge",
        "Process types with jobs wanted that no live host had room for, at the scheduler's last pass here.",
        JOBS_UNPLACED.load(Ordering::Relaxed),
    );
}

/// Counts leader changes as this host sees them.
pub fn follow_leader(raft: flynn_raft::Raft) {
    use flynn_raft::openraft::async_runtime::WatchReceiver;
    tokio::spawn(async move {
        let mut rx = raft.metrics();
        let mut last = rx.borrow_watched().current_leader;
        while rx.changed().await.is_ok() {
            let now = rx.borrow_watched().current_leader;
            if now.is_some() && now != last {
                LEADER_CHANGES.fetch_add(1, Ordering::Relaxed);
            }
            if now.is_some() {
                last = now;
            }
        }
    });
}
