//! A client connection as the request path sees it.

use std::net::SocketAddr;

/// What a client connection is, for the headers the router adds.
#[derive(Debug, Clone, Copy)]
pub struct ConnCtx {
    /// The client (from the PROXY line when one was sent).
    pub peer: SocketAddr,
    pub local_port: u16,
    pub tls: bool,
}
