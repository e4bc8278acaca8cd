//! Which job addresses a host's subnets have given out: pure bookkeeping, kept apart from
//! the kernel work in `network.rs` so the rules are tested on their own.
//!
//! A host has its first subnet and the extra ones it claimed. An extra subnet given back
//! goes in two steps: first it is *leaving* (left out of the capacity the host tells the
//! scheduler, and used only when every other subnet is full, so a placement made before
//! the scheduler heard still gets an address), then, if still empty, it is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Job addresses in a subnet: `.2` to `.254` (`.1` is the gateway, `.0` the VTEP).
const FIRST_ADDRESS: u8 = 2;
const LAST_ADDRESS: u8 = 254;
/// How many jobs with addresses of their own one subnet holds.
pub const ADDRESSES: u64 = (LAST_ADDRESS - FIRST_ADDRESS + 1) as u64;

/// The subnet index of a job address, if it is one.
pub fn index_of(ip: Ipv4Addr) -> Option<u32> {
    match ip.octets() {
        [100, 100, n, _] => Some(u32::from(n)),
        _ => None,
    }
}

#[derive(Debug)]
pub struct JobAddresses {
    first: u32,
    /// Every subnet the host holds, with the last octets its jobs have.
    used: BTreeMap<u32, BTreeSet<u8>>,
    leaving: Option<u32>,
}

impl JobAddresses {
    pub fn new(first: u32, extra: &[u32]) -> Self {
        let used = std::iter::once(first)
            .chain(extra.iter().copied())
            .map(|i| (i, BTreeSet::new()))
            .collect();
        JobAddresses {
            first,
            used,
            leaving: None,
        }
    }

    pub fn holds(&self, index: u32) -> bool {
        self.used.contains_key(&index)
    }

    /// Every subnet held, lowest first (a leaving one too: its jobs are still here).
    pub fn indexes(&self) -> Vec<u32> {
        self.used.keys().copied().collect()
    }

    /// How many jobs the host says it holds: a leaving subnet does not count.
    pub fn capacity(&self) -> u64 {
        ADDRESSES * (self.used.len() - usize::from(self.leaving.is_some())) as u64
    }

    /// Notes an address in use (a job that outlived the previous daemon); false if it is
    /// on no subnet held.
    pub fn mark(&mut self, ip: Ipv4Addr) -> bool {
        match index_of(ip).and_then(|i| self.used.get_mut(&i)) {
            Some(used) => {
                used.insert(ip.octets()[3]);
                true
            }
            None => false,
        }
    }

    /// A free address: on the first subnet first, then the extra ones lowest first (so an
    /// extra one empties, to be given back, as jobs come and go), a leaving one last.
    pub fn take(&mut self) -> Option<Ipv4Addr> {
        let leaving = self.leaving;
        let order: Vec<u32> = std::iter::once(self.first)
            .chain(
                self.used
                    .keys()
                    .copied()
                    .filter(|i| *i != self.first && Some(*i) != leaving),
            )
            .chain(leaving)
            .collect();
        for index in order {
            let used = self.used.get_mut(&index)?;
            if let Some(k) = (FIRST_ADDRESS..=LAST_ADDRESS).find(|k| !used.contains(k)) {
                used.insert(k);
                return Some(Ipv4Addr::new(100, 100, index as u8, k));
            }
        }
        None
    }

    /// Frees an address (nothing if it is not held).
    pub fn give(&mut self, ip: Ipv4Addr) {
        if let Some(used) = index_of(ip).and_then(|i| self.used.get_mut(&i)) {
            used.remove(&ip.octets()[3]);
        }
    }

    /// Takes up a subnet claimed just now; whether it is new here.
    pub fn add(&mut self, index: u32) -> bool {
        if self.leaving == Some(index) {
            self.leaving = None;
        }
        if self.used.contains_key(&index) {
            return false;
        }
        self.used.insert(index, BTreeSet::new());
        true
    }

    /// Starts giving back the highest extra subnet no job has an address on: which one,
    /// if there is one (and none is leaving already).
    pub fn start_leaving(&mut self) -> Option<u32> {
        if self.leaving.is_some() {
            return None;
        }
        let index = self
            .used
            .iter()
            .rev()
            .find(|(i, used)| **i != self.first && used.is_empty())
            .map(|(i, _)| *i)?;
        self.leaving = Some(index);
        Some(index)
    }

    /// Ends giving back: the leaving subnet is dropped if still empty (and returned), or
    /// counted again if a job took an address on it meanwhile.
    pub fn finish_leaving(&mut self) -> Option<u32> {
        let index = self.leaving.take()?;
        if self.used.get(&index).is_some_and(BTreeSet::is_empty) {
            self.used.remove(&index);
            return Some(index);
        }
        None
    }

    /// Keeps the leaving subnet after all.
    pub fn stay(&mut self) {
        self.leaving = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 100, n, k)
    }

    #[test]
    fn addresses_fill_the_first_subnet_first_then_the_extra_ones() {
        let mut a = JobAddresses::new(7, &[9, 3]);
        assert_eq!(a.indexes(), [3, 7, 9]);
        assert_eq!(a.capacity(), 3 * ADDRESSES);
        assert!(a.mark(ip(7, 2)));
        assert!(!a.mark(ip(8, 2)), "not a subnet held");
        assert_eq!(a.take(), Some(ip(7, 3)));
        let mut taken = vec![];
        while let Some(next) = a.take() {
            taken.push(next);
        }
        assert_eq!(taken.len() as u64, 3 * ADDRESSES - 2);
        assert_eq!(
            taken[ADDRESSES as usize - 2],
            ip(3, 2),
            "then the lowest extra"
        );
        assert_eq!(*taken.last().unwrap(), ip(9, 254));
        a.give(ip(3, 100));
        a.give(ip(8, 100));
        assert_eq!(a.take(), Some(ip(3, 100)));
        assert_eq!(a.take(), None);
    }

    #[test]
    fn a_leaving_subnet_is_not_counted_used_last_and_dropped_only_if_empty() {
        let mut a = JobAddresses::new(1, &[2]);
        assert!(!a.add(2), "held already");
        a.take();
        assert_eq!(a.start_leaving(), Some(2));
        assert_eq!(a.start_leaving(), None, "one at a time");
        assert_eq!(a.capacity(), ADDRESSES);
        assert_eq!(a.indexes(), [1, 2]);
        // A placement made before the scheduler heard still gets an address, on the
        // leaving subnet only once the others are full; then it stays.
        while a.take().is_some_and(|ip| index_of(ip) == Some(1)) {}
        assert_eq!(a.finish_leaving(), None);
        assert_eq!(a.capacity(), 2 * ADDRESSES);
        // Emptied, it leaves.
        for k in FIRST_ADDRESS..=LAST_ADDRESS {
            a.give(ip(2, k));
        }
        assert_eq!(a.start_leaving(), Some(2));
        assert_eq!(a.finish_leaving(), Some(2));
        assert_eq!(a.indexes(), [1]);
        assert_eq!(a.start_leaving(), None, "the first subnet never leaves");
        // Claimed again while leaving: kept and counted.
        a.add(2);
        assert_eq!(a.start_leaving(), Some(2));
        assert!(!a.add(2));
        assert_eq!(a.capacity(), 2 * ADDRESSES);
        assert_eq!(a.finish_leaving(), None);
        assert_eq!(a.indexes(), [1, 2]);
        a.start_leaving();
        a.stay();
        assert_eq!(a.capacity(), 2 * ADDRESSES);
    }
}
