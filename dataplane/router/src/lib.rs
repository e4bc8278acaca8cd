//! The router: Flynn's HTTP, HTTPS and TCP front door, one worker per core.
//!
//! Crate map: [`server`] binds and starts; [`worker`] is one core's runtime and accept
//! loops; [`h1`] and [`h2`] serve clients; [`body`] moves bodies in bounded pieces;
//! [`upstream`] holds backend pools and balancing; [`tls`] picks certificates by SNI;
//! [`tcp`] carries TCP routes; [`metrics`] counts; [`routes_file`] is the standalone route
//! source; [`standalone`] runs the router as its own process. The route table itself is
//! `flynn-router-table`.

pub mod body;
pub mod config;
pub mod h1;
pub mod h2;
pub mod metrics;
mod metrics_server;
pub mod proxy_protocol;
pub mod routes_file;
pub mod server;
pub mod standalone;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use config::{RouterConfig, Timeouts};
pub use server::{Router, RouterError};
