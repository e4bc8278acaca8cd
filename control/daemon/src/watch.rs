//! The data-plane change stream of this host's applied state: what `GET /watch` serves and
//! what the router inside the daemon follows, in process.

use std::sync::Arc;
use std::time::Duration;

use flynn_client::WatchLine;
use flynn_raft::store::WatchItem;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;

use crate::node::Node;

/// How long a quiet stream waits before sending a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Streams the changes after `since` (a reset and the full state when history does not
/// reach back that far), then live changes, `synced` marks and heartbeats, until the
/// receiver is dropped.
pub fn stream(node: Arc<Node>, since: u64) -> mpsc::Receiver<WatchLine> {
    let (tx, rx) = mpsc::channel::<WatchLine>(256);
    tokio::spawn(async move {
        // Subscribe before reading history so nothing falls between the two.
        let mut live = node.state.subscribe();
        let mut sent = since;
        let mut lines = catch_up(&node, since);
        // Inside a reset every event is current state, whatever revision it carries.
        let mut resyncing = false;
        loop {
            for line in lines.drain(..) {
                match &line {
                    WatchLine::Event(e) if e.revision <= sent && !resyncing => continue,
                    WatchLine::Reset { .. } => resyncing = true,
                    WatchLine::Synced { revision } => {
                        sent = sent.max(*revision);
                        resyncing = false;
                    }
                    _ => {}
                }
                if tx.send(line).await.is_err() {
                    return; // the follower went away
                }
            }
            match tokio::time::timeout(HEARTBEAT, live.recv()).await {
                Err(_) => {
                    let revision = node.state.read(|a| a.state.revision);
                    lines.push(WatchLine::Heartbeat { revision });
                }
                Ok(Ok(WatchItem::Event(e))) => {
                    if e.revision <= sent {
                        continue;
                    }
                    // Take what else is queued, then mark progress up to the last event taken
                    // (not the state's revision: later events may still be queued).
                    let mut revision = e.revision;
                    lines.push(WatchLine::Event(e));
                    loop {
                        match live.try_recv() {
                            Ok(WatchItem::Event(next)) => {
                                revision = revision.max(next.revision);
                                lines.push(WatchLine::Event(next));
                            }
                            Ok(WatchItem::Reset) | Err(TryRecvError::Lagged(_)) => {
                                lines = catch_up(&node, 0);
                                sent = 0;
                                revision = 0;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if revision > 0 {
                        lines.push(WatchLine::Synced { revision });
                    }
                }
                // A snapshot replaced history, or we fell behind: resync from scratch.
                Ok(Ok(WatchItem::Reset)) | Ok(Err(RecvError::Lagged(_))) => {
                    lines = catch_up(&node, 0);
                    sent = 0;
                }
                Ok(Err(RecvError::Closed)) => return,
            }
        }
    });
    rx
}

/// The lines that bring a watcher from `since` to now: the missed events if still in
/// memory, else a reset followed by the full current data-plane state.
fn catch_up(node: &Node, since: u64) -> Vec<WatchLine> {
    node.state.read(|a| {
        let revision = a.state.revision;
        let mut lines = Vec::new();
        match (since, a.events_since(since)) {
            (s, Some(events)) if s > 0 => lines.extend(events.into_iter().map(WatchLine::Event)),
            _ => {
                lines.push(WatchLine::Reset { revision });
                lines.extend(
                    a.state
                        .data_plane_snapshot()
                        .into_iter()
                        .map(WatchLine::Event),
                );
            }
        }
        lines.push(WatchLine::Synced { revision });
        lines
    })
}
