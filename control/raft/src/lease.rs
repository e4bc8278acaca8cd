//! The leader's read lease: when a quorum last accepted this host's leadership, so a read
//! on the leader can skip the heartbeat round that confirms it.
//!
//! A follower that accepts an AppendEntries from a leader refuses to vote for anyone else
//! for openraft's leader lease (`election_timeout_max`, 1.5 s here) from when it received
//! it. So if a quorum accepted requests this leader *sent* at or after `t`, no other leader
//! can be elected before `t + 1.5 s`, and until then every committed write went through
//! this one. [`LeaderLease::TERM`] is a third of that: it leaves room for clocks that run
//! at slightly different rates and for a follower that restarts (and so forgets what it
//! accepted) inside the lease, which would take a whole daemon start within 500 ms.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::vote::RaftLeaderId;

use crate::{NodeId, Vote};

/// Per peer: the vote of the newest AppendEntries it accepted, and when it was sent.
type Accepted = HashMap<NodeId, (Vote, Instant)>;

/// What this host's peers accepted of its leadership, shared by the network's connections.
#[derive(Clone, Default)]
pub struct LeaderLease(Arc<Mutex<Accepted>>);

impl LeaderLease {
    /// How long a quorum's acceptance lets the leader answer reads alone.
    pub const TERM: Duration = Duration::from_millis(500);

    /// `peer` accepted `vote`'s leadership in a request sent at `sent`.
    pub fn accepted(&self, peer: NodeId, vote: Vote, sent: Instant) {
        let mut acks = self.0.lock().expect("lease lock");
        let newer = acks
            .get(&peer)
            .is_none_or(|(v, at)| *v != vote || *at < sent);
        if newer {
            acks.insert(peer, (vote, sent));
        }
    }

    /// Whether `me`, leading with `vote`, holds the lease at `now`: in every voter set of the
    /// membership (two during a change), a majority, counting `me`, accepted `vote` in a
    /// request sent within [`Self::TERM`].
    pub fn held(
        &self,
        me: NodeId,
        vote: &Vote,
        voter_sets: &[BTreeSet<NodeId>],
        now: Instant,
    ) -> bool {
        if !vote.is_committed() || *vote.leader_id().node_id() != me {
            return false;
        }
        let acks = self.0.lock().expect("lease lock");
        let fresh = |id: &NodeId| {
            *id == me
                || acks.get(id).is_some_and(|(v, sent)| {
                    v == vote && now.saturating_duration_since(*sent) < Self::TERM
                })
        };
        !voter_sets.is_empty()
            && voter_sets
                .iter()
                .all(|set| set.iter().filter(|id| fresh(id)).count() * 2 > set.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(term: u64, id: NodeId) -> Vote {
        Vote::new_committed(term, id)
    }

    #[test]
    fn t01_a_quorum_s_recent_acceptance_holds_the_lease() {
        let lease = LeaderLease::default();
        let vote = leading(3, 1);
        let voters = [BTreeSet::from([1, 2, 3])];
        let t0 = Instant::now();
        assert!(
            !lease.held(1, &vote, &voters, t0),
            "no peer has accepted yet"
        );
        lease.accepted(2, vote, t0);
        assert!(lease.held(1, &vote, &voters, t0 + Duration::from_millis(100)));
        assert!(
            !lease.held(1, &vote, &voters, t0 + LeaderLease::TERM),
            "the lease runs out"
        );
        // An acceptance of an earlier term's leadership does not count for this one.
        let next = leading(4, 1);
        assert!(!lease.held(1, &next, &voters, t0));
        // A follower, or a leader whose vote is not committed, holds nothing.
        assert!(!lease.held(2, &vote, &voters, t0));
        assert!(!lease.held(1, &Vote::new(3, 1), &voters, t0));
    }

    #[test]
    fn t02_a_membership_change_needs_both_majorities() {
        let lease = LeaderLease::default();
        let vote = leading(2, 1);
        let t0 = Instant::now();
        lease.accepted(2, vote, t0);
        let joint = [BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 4, 5])];
        assert!(!lease.held(1, &vote, &joint, t0));
        lease.accepted(4, vote, t0);
        assert!(lease.held(1, &vote, &joint, t0));
        // An older send time never replaces a newer one.
        lease.accepted(4, vote, t0 - Duration::from_secs(5));
        assert!(lease.held(1, &vote, &joint, t0));
    }
}
