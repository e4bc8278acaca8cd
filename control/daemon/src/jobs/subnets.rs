//! How many job subnets this host holds: one more claimed as its jobs come near what its
//! subnets hold, an empty extra one given back when the rest leave plenty free (as
//! Calico's IPAM claims and frees address blocks per node). The host says its capacity
//! (`JOBS_META`) again at once after either, so the scheduler places by it without waiting
//! for the next heartbeat.
//!
//! The host never says it holds more than it has: a claimed subnet counts once it is set
//! up; one given back stops counting first, and is dropped only after the scheduler has
//! heard (placements made before then land within the headroom, or keep it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_state::jobs::{JobsCommand, MAX_SUBNETS_PER_HOST};
use flynn_state::Response;

use super::addresses::ADDRESSES;
use super::network::Peer;
use super::runner::propose_retrying;
use super::state::State;
use super::JobRunner;

/// Another subnet is claimed when the jobs placed here come within this many addresses of
/// what the host's subnets hold; an extra one is given back only when this many twice
/// over would still be free without it.
const HEADROOM: u64 = 64;
/// After a claim that failed, the next waits this long (refused: every subnet taken, or
/// the most a host holds), so a busy state does not retry on every change.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(60);
/// How long a subnet being given back waits, left out of the capacity the host says,
/// before it is dropped: longer than a scheduler pass computed before it heard takes to
/// land. Then the state must show the lower capacity, within `HEARD_WITHIN`.
const SETTLE: Duration = Duration::from_secs(2);
const HEARD_WITHIN: Duration = Duration::from_secs(3);

/// One change of the host's subnets at a time, and a pause after a failed claim.
#[derive(Default)]
pub(super) struct Fitting {
    busy: AtomicBool,
    not_before: Mutex<Option<Instant>>,
}

/// What to do with this host's subnets, for `placed` active jobs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Claim { have: u32 },
    GiveBack,
}

fn fit(placed: u64, held: usize) -> Option<Fit> {
    let capacity = ADDRESSES * held as u64;
    if placed + HEADROOM > capacity && held < MAX_SUBNETS_PER_HOST {
        return Some(Fit::Claim { have: held as u32 });
    }
    if held > 1 && placed + 2 * HEADROOM + ADDRESSES <= capacity {
        return Some(Fit::GiveBack);
    }
    None
}

impl JobRunner {
    /// Claims or gives back a subnet if the `addressed` jobs placed here (counted as the
    /// scheduler counts them against the host's capacity) call for it; the change runs in
    /// a task of its own.
    pub(super) fn fit_subnets(self: &Arc<Self>, local: &State, addressed: u64) {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return;
        };
        let Some(want) = fit(addressed, hn.indexes().len()) else {
            return;
        };
        let paused = self
            .subnet_fit
            .not_before
            .lock()
            .expect("fitting lock")
            .is_some_and(|t| Instant::now() < t);
        if paused || self.subnet_fit.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let (me, local) = (self.clone(), local.clone());
        tokio::spawn(async move {
            let changed = match want {
                Fit::Claim { have } => me.claim_subnet(&local, have).await,
                Fit::GiveBack => me.give_back_subnet(&local).await,
            };
            if changed {
                me.announce_capacity(&local).await;
            }
            me.subnet_fit.busy.store(false, Ordering::SeqCst);
        });
    }

    /// Claims one more subnet and takes it up; whether the host has more now.
    async fn claim_subnet(&self, local: &State, have: u32) -> bool {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return false;
        };
        let claim = JobsCommand::ClaimExtraSubnet {
            host: self.host,
            have,
        };
        let pause = |after: Duration| {
            *self.subnet_fit.not_before.lock().expect("fitting lock") =
                Some(Instant::now() + after);
        };
        let indexes = match local.propose(claim.into()).await {
            Ok(Response::Subnets { indexes }) => indexes,
            Ok(other) => {
                tracing::error!(?other, "unexpected answer to a subnet claim");
                pause(RETRY_AFTER_REFUSAL);
                return false;
            }
            Err(e) if e.is_refusal() => {
                tracing::warn!(error = %e, "no more job subnets for this host");
                pause(RETRY_AFTER_REFUSAL);
                return false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "subnet claim not applied; retrying later");
                pause(RETRY_AFTER_ERROR);
                return false;
            }
        };
        match tokio::task::block_in_place(|| hn.add_subnets(&indexes)) {
            Ok(()) => true,
            Err(e) => {
                // Claimed in the state but not set up: the next claim (refused as already
                // made, with the same answer) tries again.
                tracing::warn!(error = %e, "a claimed job subnet is not set up");
                pause(RETRY_AFTER_ERROR);
                false
            }
        }
    }

    /// Gives back an extra subnet no job has an address on, if there is one: left out of
    /// the capacity the host says first, then dropped once the scheduler has heard, if the
    /// jobs placed here by then leave room; whether its capacity now differs from what it
    /// said last (the subnet stayed after all).
    async fn give_back_subnet(&self, local: &State) -> bool {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return false;
        };
        if hn.start_leaving().is_none() {
            // Every extra subnet has jobs: one is given back when it empties.
            return false;
        }
        // Dropped only once the state says the lower capacity (a heartbeat that timed out
        // may still land after the announcement, with the higher one).
        let heard = self.announce_capacity(local).await && {
            tokio::time::sleep(SETTLE).await;
            // This host's copy of the state may lag the commit a little.
            let deadline = tokio::time::Instant::now() + HEARD_WITHIN;
            loop {
                if self.said_capacity(local) == Some(hn.capacity()) {
                    break true;
                }
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if !heard || self.placed_here(local) + 2 * HEADROOM > hn.capacity() {
            hn.stay();
            return true;
        }
        // Dropped only if still empty: a job may have taken an address on it meanwhile.
        let Some(index) = tokio::task::block_in_place(|| hn.finish_leaving()) else {
            return true;
        };
        let cmd = JobsCommand::ReleaseExtraSubnet {
            host: self.host,
            index,
        };
        propose_retrying(local, cmd.into()).await;
        // The lower capacity is the one said already.
        false
    }

    /// The active jobs placed on this host that take an address here.
    fn placed_here(&self, local: &State) -> u64 {
        local.read(|s| super::scheduler::addressed_jobs(s, self.host))
    }

    /// Routes to the other hosts' job subnets, first and extra.
    pub(super) fn route_subnets(&self, local: &State) {
        let Some(hn) = self.net.get().and_then(Option::as_ref) else {
            return;
        };
        let members: BTreeMap<u64, String> = local
            .members()
            .into_iter()
            .filter_map(|(id, addr)| Some((id, addr.rsplit_once(':')?.0.to_string())))
            .collect();
        let peers: BTreeMap<u32, Peer> = local.read(|s| {
            let mut peers = BTreeMap::new();
            for (host, first) in &s.jobs.subnets {
                let Some(ip) = host.parse().ok().and_then(|h: u64| members.get(&h)) else {
                    continue;
                };
                let extra = s.jobs.extra_subnets.get(host).into_iter().flatten();
                for index in std::iter::once(first).chain(extra) {
                    let peer = Peer {
                        ip: ip.clone(),
                        vtep: *first,
                    };
                    peers.insert(*index, peer);
                }
            }
            peers
        });
        // `ip` runs here: off the async workers' hands.
        tokio::task::block_in_place(|| hn.route_peers(&peers, &self.ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_near_full_and_gives_back_with_room_to_spare() {
        let a = ADDRESSES;
        assert_eq!(fit(0, 1), None);
        assert_eq!(fit(a - HEADROOM, 1), None);
        assert_eq!(fit(a - HEADROOM + 1, 1), Some(Fit::Claim { have: 1 }));
        assert_eq!(fit(a, 1), Some(Fit::Claim { have: 1 }));
        assert_eq!(fit(2 * a - HEADROOM + 1, 2), Some(Fit::Claim { have: 2 }));
        // The most a host holds: no claim, whatever is placed.
        let most = MAX_SUBNETS_PER_HOST;
        assert_eq!(fit(a * most as u64, most), None);
        // Given back only with twice the headroom left over: no claim-give-back swing.
        assert_eq!(fit(a - 2 * HEADROOM + 1, 2), None);
        assert_eq!(fit(a - 2 * HEADROOM, 2), Some(Fit::GiveBack));
        assert_eq!(fit(0, 2), Some(Fit::GiveBack));
        assert_eq!(fit(0, 1), None, "the first subnet is kept");
        // Between the two bounds nothing changes.
        for placed in a - 2 * HEADROOM + 1..=a - HEADROOM {
            assert_eq!(fit(placed, 1), None);
            assert_eq!(fit(placed, 2), None);
        }
    }
}
