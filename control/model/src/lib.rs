//! The records the control plane serves and the data plane reads.
//!
//! This crate is the seam between the two: the router and the firewall depend on it, never on
//! the state machine (`flynn-state`). Everything here is part of the wire format (Raft log,
//! snapshots, controller API, watch stream), so field names are stable.

mod blob_backends;
mod jobs;
mod records;
mod resources;
mod watch;

pub use blob_backends::*;
pub use jobs::*;
pub use records::*;
pub use resources::*;
pub use watch::*;
