//! The web dashboard at `dashboard.$CLUSTER_DOMAIN`: the parts that need no daemon.
//!
//! - [`assets`]: the page, its script and its style, built into the binary (no CDN: the
//!   dashboard works on a cluster with no internet);
//! - [`session`]: session ids, their cookie, CSRF tokens, credential fingerprints and the
//!   session length setting;
//! - [`charts`]: the figures of the live charts, read from each host's `/metrics`;
//! - [`limiter`]: slows an address down after five wrong logins in a minute.
//!
//! The daemon serves it (`api/dashboard.rs`): it checks sessions against the cluster state
//! and hands the page's API calls to the same handlers the CLI calls.

pub mod assets;
pub mod charts;
pub mod limiter;
pub mod session;
