//! Job networks in process: what `ip` and `nft` did for each job, as netlink messages
//! from the daemon itself.
//!
//! A job's network took two `ip -batch` runs and an `nft` run, about 10 ms of a job's
//! start, nearly all of it spawning those programs. Here the same steps are a handful of
//! netlink requests (tens of microseconds each):
//! - [`Netns`]: a network namespace by path, as `ip netns add` makes one (a bind mount
//!   under `/run/netns`, so it outlives the thread that made it), and its removal;
//! - [`Rtnl`]: veth pairs, link state, IPv4 addresses and routes over rtnetlink;
//! - [`Nftables`]: elements added to and removed from an existing nftables set, in one
//!   nfnetlink batch (a transaction, as `nft -f` sends it).
//!
//! Every request asks for the kernel's acknowledgement, so a failure comes back as the
//! errno the kernel gave, with the step that failed.

mod message;
mod netns;
mod nftables;
mod rtnl;
mod socket;
mod sys;

pub use netns::{delete_netns, Netns};
pub use nftables::{concat_key, Nftables, NFPROTO_INET};
pub use rtnl::{Ipv4Route, Rtnl, VethEnd};

use std::io;

/// A netlink step that failed, with the kernel's errno (or the socket's error).
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct Error {
    step: String,
    #[source]
    source: io::Error,
}

impl Error {
    fn new(step: impl Into<String>, source: io::Error) -> Self {
        Error {
            step: step.into(),
            source,
        }
    }

    /// The thing the step named is not there (no such device, file, or element).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENODEV) | Some(libc::ENOENT)
        )
    }

    /// The thing the step would make is there already.
    pub fn is_exists(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EEXIST)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
