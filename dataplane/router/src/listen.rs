//! Listening sockets every worker shares (HTTP, HTTPS and TCP routes alike).

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// A listening socket that other workers can share (SO_REUSEPORT): the kernel hashes each
/// new connection to one of them.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
