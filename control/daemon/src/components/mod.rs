//! The components a host runs (see [`crate::component`]).

pub mod controller;
pub mod firewall;
pub mod router;
pub mod volumes;
