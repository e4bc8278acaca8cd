//! The router: Flynn's HTTP, HTTPS and TCP front door, one worker per core.
//!
//! Crate map, dependencies pointing one way (down this list): [`server`] binds and
//! starts; `accept` is one core's runtime and accept loops, handing each connection to its
//! protocol; [`h1`] and [`h2`] serve clients and feed one request path, [`forward`] (route,
//! backend choice and connect, send and replay, sticky cookie, the access log), with the
//! backend side of HTTP/1 in [`backend_h1`], every failure one classified
//! [`error::ProxyError`] and the router's own answers in [`respond`]; [`body`] moves bodies
//! in bounded pieces; [`worker`] is a core's state ([`upstream`] pools and balancing,
//! counters, table view); [`conn`] is the client connection type and `listen` the shared
//! listening sockets; [`tls`] picks certificates by SNI; [`tcp`] carries TCP routes;
//! [`metrics`] counts; [`routes_file`] is the standalone route source; [`standalone`] runs
//! the router as its own process. The route table itself is `flynn-router-table`.

mod accept;
pub mod backend_h1;
pub mod body;
pub mod config;
pub mod conn;
pub mod error;
pub mod forward;
pub mod h1;
pub mod h2;
pub mod io;
mod listen;
pub mod metrics;
mod metrics_server;
pub mod proxy_protocol;
pub mod respond;
pub mod routes_file;
pub mod server;
pub mod splice;
pub mod standalone;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use config::{RouterConfig, Timeouts};
pub use server::{Router, RouterError};
