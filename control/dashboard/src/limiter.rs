//! Slows down an address that keeps getting the login wrong.
//!
//! After [`MAX_FAILURES`] wrong logins from one address within [`WINDOW`], every login from
//! it is refused (even a right one, or guessing would go on) until the oldest of those
//! failures is a window old. Each host counts on its own: through the router, an address
//! gets that many tries per host.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past it the quietest are forgotten.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<BTreeMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// How long `addr` must wait before it may try again, if it must.
    pub fn wait(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let times = map.get_mut(&addr)?;
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            times.pop_front();
        }
        if times.is_empty() {
            map.remove(&addr);
            return None;
        }
        (times.len() >= MAX_FAILURES).then(|| {
            let oldest = *times.front().expect("not empty");
            WINDOW.saturating_sub(now.duration_since(oldest))
        })
    }

    /// Counts a wrong login from `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&addr) {
            let stale: Vec<IpAddr> = map
                .iter()
                .filter(|(_, t)| {
                    t.back()
                        .is_none_or(|last| now.duration_since(*last) >= WINDOW)
                })
                .map(|(a, _)| *a)
                .collect();
            for a in stale {
                map.remove(&a);
            }
            if map.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let times = map.entry(addr).or_default();
        times.push_back(now);
        while times.len() > MAX_FAILURES {
            times.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t01_five_failures_in_a_minute_make_an_address_wait() {
        let l = LoginLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..4 {
            l.failed(a, t0 + Duration::from_secs(i));
            assert_eq!(l.wait(a, t0 + Duration::from_secs(i)), None, "{i}");
        }
        l.failed(a, t0 + Duration::from_secs(10));
        let w = l.wait(a, t0 + Duration::from_secs(10)).expect("waits");
        assert_eq!(
            w,
            Duration::from_secs(50),
            "until the first failure is a minute old"
        );
        assert_eq!(
            l.wait(b, t0 + Duration::from_secs(10)),
            None,
            "others are not slowed"
        );
        assert_eq!(
            l.wait(a, t0 + Duration::from_secs(60)),
            None,
            "a minute after the first"
        );
        l.failed(a, t0 + Duration::from_secs(60));
        assert!(
            l.wait(a, t0 + Duration::from_secs(60)).is_some(),
            "five within the window again"
        );
        assert_eq!(l.wait(a, t0 + Duration::from_secs(200)), None);
    }
}
