//! The leader's failover controller for replicated Postgres: it names the first primary,
//! keeps a synchronous standby, and when the primary's lease lapses (or its job is gone)
//! promotes the sync, but only a sync that is known to hold every acknowledged commit.
//! Every change is one compare-and-set of the shape's generation ([`plan`] is pure).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_state::resources::{DbShape, ShapeCommand};
use flynn_state::{ClusterState, JobState};

use futures::future::BoxFuture;

use crate::leader::LeaderController;
use crate::node::Node;

/// The replicated server app and its process type.
pub const APP: &str = "postgres";
pub const PROC_TYPE: &str = "postgres";

/// How long the leader waits, on its own clock, without seeing a renewal before it counts
/// the primary's lease as lapsed. The primary stops taking writes after
/// [`super::keeper::FENCE_AFTER`] without a renewal, well inside this.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// How recent a server's report must be for it to become the sync or be promoted.
const REPORT_FRESH_MS: u64 = 10_000;

/// The hosts running (or starting) a server job, oldest job first, and those running.
fn server_hosts(s: &ClusterState) -> (Vec<u64>, Vec<u64>) {
    let mut jobs: Vec<_> = s
        .jobs
        .jobs
        .values()
        .filter(|j| j.app == APP && j.proc_type == PROC_TYPE && !j.oneoff && j.state.is_active())
        .collect();
    jobs.sort_by_key(|j| (j.created_ms, j.id.clone()));
    let mut active = Vec::new();
    let mut running = Vec::new();
    for j in jobs {
        if !active.contains(&j.host) {
            active.push(j.host);
        }
        if j.state == JobState::Running && !running.contains(&j.host) {
            running.push(j.host);
        }
    }
    (active, running)
}

/// What the shape should become, if anything: `lease_lapsed` says whether the leader has
/// gone [`LEASE_TTL`] without seeing the primary renew.
pub fn plan(s: &ClusterState, lease_lapsed: bool, now_ms: u64) -> Option<ShapeCommand> {
    let (active, running) = server_hosts(s);
    let shape = s.resources.shapes.get(APP).cloned().unwrap_or_default();
    // Running, and heard from lately (a host cut off still looks running in the state).
    let running: Vec<u64> = running
        .into_iter()
        .filter(|h| {
            shape
                .members
                .get(h)
                .is_some_and(|m| now_ms.saturating_sub(m.reported_ms) <= REPORT_FRESH_MS)
        })
        .collect();
    let set = |primary: u64, sync: u64, asyncs: Vec<u64>| ShapeCommand::SetShape {
        app: APP.into(),
        expect_generation: shape.generation,
        primary,
        sync,
        asyncs,
    };
    if shape.primary == 0 {
        let first = *active.first()?;
        let rest: Vec<u64> = active[1..].to_vec();
        let sync = rest.first().copied().unwrap_or(0);
        return Some(set(first, sync, rest.into_iter().skip(1).collect()));
    }
    let primary_gone = !active.contains(&shape.primary) || lease_lapsed;
    if primary_gone {
        return promotion(&shape, &running).map(|(p, sync, asyncs)| set(p, sync, asyncs));
    }
    // The primary is fine: keep a sync, and every server in a role.
    let mut asyncs: Vec<u64> = shape
        .asyncs
        .iter()
        .copied()
        .filter(|h| active.contains(h))
        .collect();
    for h in &active {
        if *h != shape.primary && *h != shape.sync && !asyncs.contains(h) {
            asyncs.push(*h);
        }
    }
    let mut sync = shape.sync;
    if sync == 0 || !active.contains(&sync) {
        // The most advanced running async becomes the sync; it must catch up before it may
        // be promoted (the shape starts it not ready).
        let best = asyncs
            .iter()
            .copied()
            .filter(|h| running.contains(h))
            .max_by_key(|h| shape.members.get(h).map_or(0, |m| m.lsn));
        sync = best.unwrap_or(0);
        asyncs.retain(|h| *h != sync);
    }
    (sync != shape.sync || asyncs != shape.asyncs).then(|| set(shape.primary, sync, asyncs))
}

/// The sync, promoted, if it may be: it has caught up with the primary it followed, has
/// reached the last position that primary reported it confirmed, and is running. The new
/// roles (primary, sync, asyncs), or none: then the cluster waits without a primary rather
/// than lose a commit.
fn promotion(shape: &DbShape, running: &[u64]) -> Option<(u64, u64, Vec<u64>)> {
    let candidate = shape.sync;
    if candidate == 0 || !shape.sync_ready || !running.contains(&candidate) {
        return None;
    }
    let member = shape.members.get(&candidate)?;
    if member.lsn < shape.confirmed_lsn {
        return None;
    }
    let mut asyncs: Vec<u64> = shape
        .asyncs
        .iter()
        .copied()
        .filter(|h| running.contains(h))
        .collect();
    asyncs.sort_by_key(|h| std::cmp::Reverse(shape.members.get(h).map_or(0, |m| m.lsn)));
    let sync = if asyncs.is_empty() {
        0
    } else {
        asyncs.remove(0)
    };
    Some((candidate, sync, asyncs))
}

/// The controller: [`plan`] on every pass, with the lease timed on this host's clock.
#[derive(Default)]
pub struct Failover {
    /// The (generation, renewals) last seen, and when this host first saw it.
    seen: Mutex<Option<((u64, u64), Instant)>>,
    waiting_logged: Mutex<Option<Instant>>,
}

impl Failover {
    fn lease_lapsed(&self, shape: Option<&DbShape>) -> bool {
        let Some(shape) = shape.filter(|s| s.primary != 0) else {
            return false;
        };
        let key = (shape.generation, shape.lease_renewals);
        let mut seen = self.seen.lock().expect("lease lock");
        match *seen {
            Some((k, at)) if k == key => at.elapsed() > LEASE_TTL,
            _ => {
                *seen = Some((key, Instant::now()));
                false
            }
        }
    }
}

impl LeaderController for Failover {
    fn name(&self) -> &'static str {
        "postgres-failover"
    }

    fn run<'a>(&'a self, node: &'a Arc<Node>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let cmd = node.state.read(|a| {
                let shape = a.state.resources.shapes.get(APP);
                let lapsed = self.lease_lapsed(shape);
                let cmd = plan(&a.state, lapsed, crate::now_ms());
                // (A primary that has not renewed yet is still starting.)
                if cmd.is_none() && lapsed && shape.is_some_and(|s| s.lease_renewals > 0) {
                    let mut logged = self.waiting_logged.lock().expect("log lock");
                    if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        *logged = Some(Instant::now());
                        tracing::warn!(target: "resources", primary = shape.map_or(0, |s| s.primary),
                            "the postgres primary's lease lapsed and no standby may be promoted yet (none has every acknowledged commit)");
                    }
                }
                cmd
            });
            let Some(cmd) = cmd else { return };
            let describe = format!("{cmd:?}");
            match node
                .propose_as::<DbShape>(flynn_state::ResourcesCommand::Shape(cmd))
                .await
            {
                Ok(shape) => tracing::info!(target: "resources",
                    generation = shape.generation, primary = shape.primary, sync = shape.sync,
                    asyncs = ?shape.asyncs, "postgres shape changed"),
                Err(e) => {
                    tracing::debug!(error = %e, change = %describe, "shape change not applied")
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
