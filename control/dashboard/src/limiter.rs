//! Slows down an address that keeps getting the login wrong.
//!
//! After [`MAX_FAILURES`] wrong logins from one address within [`WINDOW`], every login from
//! it is refused (even a right one, or guessing would go on) until the oldest of those
//! failures is a window old. Each host counts on its own: through the router, an address
//! gets that many tries per host. An IPv6 client counts by its /64 (one host's block). At
//! most [`MAX_ADDRESSES`] are tracked; past it the one whose last failure is oldest is
//! forgotten, never the new one.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once.
pub const MAX_ADDRESSES: usize = 10_000;

/// What failures are counted by: the address, or an IPv6 address's /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<BTreeMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// How long `addr` must wait before it may try again, if it must.
    pub fn wait(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let addr = key(addr);
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

    /// Takes back the failure counted at `at` for `addr` (a login counted as wrong before
    /// it was checked, then found right).
    pub fn forgive(&self, addr: IpAddr, at: Instant) {
        let addr = key(addr);
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(times) = map.get_mut(&addr) {
            if let Some(i) = times.iter().rposition(|t| *t == at) {
                times.remove(i);
            }
            if times.is_empty() {
                map.remove(&addr);
            }
        }
    }

    /// Counts a wrong login from `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        let addr = key(addr);
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&addr) {
            map.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) < WINDOW)
            });
            while map.len() >= MAX_ADDRESSES {
                let quietest = map
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(a, _)| *a)
                    .expect("a full map has an entry");
                map.remove(&quietest);
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
        let t1 = t0 + Duration::from_secs(300);
        for i in 0..5 {
            l.failed(a, t1 + Duration::from_millis(i));
            l.forgive(a, t1 + Duration::from_millis(i));
        }
        assert_eq!(l.wait(a, t1), None, "right logins forgiven leave nothing");
    }

    #[test]
    fn t02_ipv6_counts_by_64_and_a_full_table_still_counts_the_new_address() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..5u16 {
            let a = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i + 1));
            l.failed(a, t0);
        }
        let neighbour: IpAddr = "2001:db8:0:1::99".parse().unwrap();
        assert!(l.wait(neighbour, t0).is_some(), "one /64, one count");
        let elsewhere: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        assert_eq!(l.wait(elsewhere, t0), None);

        let full = LoginLimiter::default();
        for i in 0..MAX_ADDRESSES as u32 {
            full.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        let late: IpAddr = "203.0.113.9".parse().unwrap();
        for s in 0..5 {
            full.failed(late, t0 + Duration::from_secs(s));
        }
        assert!(
            full.wait(late, t0 + Duration::from_secs(5)).is_some(),
            "still counted"
        );
    }
}
