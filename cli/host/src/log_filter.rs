//! What the daemon's log leaves out: openraft's per-request errors about a peer that does
//! not answer. With one of three peers down the leader logged an ERROR about 4 times a
//! second (every read's leadership check) and on every replication retry; the Raft network
//! (`flynn_raft::network::Reachability`) says it once per change instead, as a warning.

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

pub struct QuietOpenraft;

/// The `message` of an event.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// openraft's per-request lines about an RPC to a peer that failed: 0.10's replication and
/// heartbeat errors, and `openraft-legacy`'s snapshot chunk sender. They are warnings, which
/// the daemon's default `openraft=error` drops already; this keeps them out when an operator
/// raises openraft's level to look at something else.
fn per_request_noise(target: &str, message: &str) -> bool {
    (target.starts_with("openraft::replication")
        && message.starts_with("ReplicationCore recv RPCError"))
        || (target.starts_with("openraft::core::heartbeat")
            && message.contains("failed to send a heartbeat"))
        || (target.starts_with("openraft_legacy")
            && (message.starts_with("failed to send InstallSnapshot RPC")
                || message.starts_with("timeout sending InstallSnapshot RPC")))
}

impl<S> Filter<S> for QuietOpenraft {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let target = event.metadata().target();
        if !target.starts_with("openraft") {
            return true;
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        !per_request_noise(target, &m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::per_request_noise;

    #[test]
    fn t01_only_per_request_rpc_failures_are_left_out() {
        assert!(per_request_noise(
            "openraft::replication",
            "ReplicationCore recv RPCError: Unreachable node 3: connection refused, when:(stream-replication); sending error to RaftCore"
        ));
        assert!(per_request_noise(
            "openraft_legacy::network_v1::sender",
            "failed to send InstallSnapshot RPC: timeout"
        ));
        assert!(per_request_noise(
            "openraft::core::heartbeat::worker",
            "HeartbeatWorker(id=1, target=3) failed to send a heartbeat: Err(Unreachable)"
        ));
        // A storage error while replicating is still said.
        assert!(!per_request_noise(
            "openraft::replication::stream_state",
            "error replication to target=3"
        ));
        assert!(!per_request_noise(
            "flynn_daemon::host",
            "ReplicationCore recv RPCError"
        ));
    }
}
