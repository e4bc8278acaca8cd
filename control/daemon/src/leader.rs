//! Leader controllers: cluster-wide upkeep that only the Raft leader does. Here are the
//! trait, the loop that runs them, and the discovery ones (instance expiry,
//! `DISCOVERD_PEERS`); the scheduler (`jobs::scheduler`, formations to jobs, host failure)
//! is another. The host lists them all (`Host::leader_controllers`).
//!
//! Each controller looks at the applied state and proposes what is missing. They run on
//! every change of the state and on a timer (time passes without changes: TTLs lapse),
//! only while this host leads. Adding one: a type implementing [`LeaderController`], one line
//! in that list.

use std::sync::Arc;
use std::time::Duration;

use flynn_state::{ClusterCommand, DiscoveryCommand};
use futures::future::BoxFuture;

use crate::node::Node;

/// How often controllers run when nothing changes.
const INTERVAL: Duration = Duration::from_millis(500);

pub trait LeaderController: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// One pass on the leader: compare the state with what it should be and propose the
    /// difference. A failed proposal is retried on the next pass.
    fn run<'a>(&'a self, node: &'a Arc<Node>) -> BoxFuture<'a, ()>;
}

/// How long this host has led in its current Raft term. A new leader gives what it did
/// not watch one TTL before judging it lapsed: heartbeats may have gone unanswered only
/// because the cluster had no leader to take them (an old leader cut off holds forwarded
/// writes for seconds), and declaring every host down then would stop every job.
#[derive(Default)]
pub struct LeadershipClock(std::sync::Mutex<Option<(u64, std::time::Instant)>>);

impl LeadershipClock {
    /// Whether this host has led for at least `grace` in its current term.
    pub fn led_for(&self, node: &Node, grace: Duration) -> bool {
        let term = node.metrics().current_term;
        let now = std::time::Instant::now();
        let mut g = self.0.lock().expect("leadership clock");
        let since = match *g {
            Some((t, since)) if t == term => since,
            _ => now,
        };
        *g = Some((term, since));
        now.duration_since(since) >= grace
    }
}

/// The discovery controllers, in the order they run.
pub fn discovery_controllers() -> Vec<Box<dyn LeaderController>> {
    vec![
        Box::new(InstanceExpiry::default()),
        Box::new(DiscoverdPeers),
    ]
}

/// Runs the controllers while this host leads, until the daemon stops.
pub async fn run(node: Arc<Node>, controllers: Vec<Box<dyn LeaderController>>) {
    let mut changes = node.state.changes();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { return },
        }
        if !node.is_leader() {
            continue;
        }
        for c in &controllers {
            c.run(&node).await;
        }
    }
}

/// Drops service instances whose TTL lapsed.
#[derive(Default)]
struct InstanceExpiry {
    clock: LeadershipClock,
}

/// What a new leader waits before it expires instances: the longest TTL a host's own
/// registration has.
const EXPIRY_GRACE: Duration = Duration::from_secs(10);

impl LeaderController for InstanceExpiry {
    fn name(&self) -> &'static str {
        "instance-expiry"
    }

    fn run<'a>(&'a self, node: &'a Arc<Node>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !self.clock.led_for(node, EXPIRY_GRACE) {
                return;
            }
            let now = crate::now_ms();
            if !node.state.read(|a| a.state.discovery.any_lapsed(now)) {
                return;
            }
            if let Err(e) = node
                .propose(DiscoveryCommand::ExpireInstances { now_ms: now })
                .await
            {
                tracing::debug!(controller = self.name(), error = %e, "not applied");
            }
        })
    }
}

/// Keeps the discoverd app's `DISCOVERD_PEERS` equal to the Raft voters' addresses.
struct DiscoverdPeers;

impl LeaderController for DiscoverdPeers {
    fn name(&self) -> &'static str {
        "discoverd-peers"
    }

    fn run<'a>(&'a self, node: &'a Arc<Node>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (bootstrapped, current) = node.state.read(|a| {
                (
                    a.state.bootstrapped(),
                    a.state
                        .apps
                        .get("discoverd")
                        .and_then(|d| d.env.global.get("DISCOVERD_PEERS").cloned()),
                )
            });
            if !bootstrapped {
                return;
            }
            let peers = voter_addrs(node);
            if peers.is_empty() || current.as_deref() == Some(peers.join(",").as_str()) {
                return;
            }
            if let Err(e) = node
                .propose(ClusterCommand::SetDiscoverdPeers { peers })
                .await
            {
                tracing::debug!(controller = self.name(), error = %e, "not applied");
            }
        })
    }
}

/// Host API addresses of the voting peers, in node id order.
pub fn voter_addrs(node: &Node) -> Vec<String> {
    let m = node.metrics();
    let membership = m.membership_config.membership();
    membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|n| n.addr.clone()))
        .collect()
}
