//! The Raft store's own measurements, as etcd reports its disk: WAL fsync latency, apply
//! latency per batch, snapshot save time and size. One store per process, so statics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use flynn_metrics::{header, sample, single, Histogram, LATENCY, SLOW};

pub static WAL_FSYNC: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(LATENCY));
pub static APPLY: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(LATENCY));
pub static SNAPSHOT_SAVE: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(SLOW));
pub static SNAPSHOT_BYTES: AtomicU64 = AtomicU64::new(0);
/// Log entries appended to this host's log.
pub static APPENDED: AtomicU64 = AtomicU64::new(0);
/// Snapshots installed into the state machine: from a leader, for a log behind what it kept
/// (or, at a start, this host's own when its state was behind it).
pub static SNAPSHOTS_INSTALLED: AtomicU64 = AtomicU64::new(0);
/// Appends synced inline, as a follower's are (the rest go to the WAL-sync thread).
pub static WAL_FSYNC_INLINE: AtomicU64 = AtomicU64::new(0);
/// RPCs sent to peers over their stream, and as HTTP requests.
pub static PEER_RPCS_STREAM: AtomicU64 = AtomicU64::new(0);
pub static PEER_RPCS_HTTP: AtomicU64 = AtomicU64::new(0);

pub fn render(out: &mut String) {
    header(
        out,
        "flynn_raft_wal_fsync_duration_seconds",
        "histogram",
        "Latency of the Raft WAL fsyncs: one per group of this host's own appends as leader, one per append (with its write) as follower.",
    );
    WAL_FSYNC.render(out, "flynn_raft_wal_fsync_duration_seconds", &[]);
    header(
        out,
        "flynn_raft_apply_duration_seconds",
        "histogram",
        "Time to apply one batch of committed entries to the state machine and store it.",
    );
    APPLY.render(out, "flynn_raft_apply_duration_seconds", &[]);
    header(
        out,
        "flynn_raft_snapshot_save_duration_seconds",
        "histogram",
        "Time to build and save a snapshot of the state.",
    );
    SNAPSHOT_SAVE.render(out, "flynn_raft_snapshot_save_duration_seconds", &[]);
    single(
        out,
        "flynn_raft_snapshot_size_bytes",
        "gauge",
        "Size of the last snapshot saved or installed.",
        SNAPSHOT_BYTES.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_log_entries_appended_total",
        "counter",
        "Log entries appended to this host's Raft log.",
        APPENDED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_snapshots_installed_total",
        "counter",
        "Snapshots installed into the state machine, mostly from a leader for a log behind what it kept.",
        SNAPSHOTS_INSTALLED.load(Ordering::Relaxed),
    );
    single(
        out,
        "flynn_raft_wal_inline_syncs_total",
        "counter",
        "Log appends synced as they were written (a follower's), not on the WAL-sync thread.",
        WAL_FSYNC_INLINE.load(Ordering::Relaxed),
    );
    let rpcs = "flynn_raft_peer_rpcs_total";
    header(
        out,
        rpcs,
        "counter",
        "Raft RPCs this host sent to peers, by transport: the lasting stream, or an HTTP request (snapshot chunks, peers without the stream).",
    );
    for (transport, n) in [("stream", &PEER_RPCS_STREAM), ("http", &PEER_RPCS_HTTP)] {
        sample(
            out,
            rpcs,
            &[("transport", transport)],
            n.load(Ordering::Relaxed),
        );
    }
}
