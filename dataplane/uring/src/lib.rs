//! The router's io_uring backend: one ring per pinned worker thread, beside the epoll one.
//!
//! - The ring is set up with `SINGLE_ISSUER | COOP_TASKRUN`: completions are posted at the
//!   worker's next kernel entry, never by interrupting it, and a sleeping worker wakes at
//!   once (why not `DEFER_TASKRUN`: [`driver`]'s header).
//! - [`self_test`] times real round trips through a ring, so a router that may choose
//!   either backend only takes one that answers promptly here.
//! - Listeners take connections through a multishot accept; streams receive through a
//!   multishot receive into a provided buffer ring, so an idle connection holds no buffer.
//! - Sockets sit in registered-file slots (no per-operation descriptor lookup).
//! - Submissions queue up while tasks run and go to the kernel in one `io_uring_enter` per
//!   loop turn ([`driver`]).
//!
//! Streams implement tokio's `AsyncRead`/`AsyncWrite`, so the proxy logic (HTTP/1.1,
//! HTTP/2, TLS) is the same code on both backends. The unsafe code of the router lives here:
//! memory the kernel writes into (the buffer ring) or reads from (a send in flight) is owned
//! by the driver's operation slots, never by a future a task could drop.

mod bufring;
mod driver;
mod selftest;
mod send;
mod stream;

pub use driver::{probe, Config, Driver, Stats, TaskRun};
pub use selftest::{self_test, SelfTest};
pub use stream::{Direct, RecvBuf, Taken, UringListener, UringStream};

#[cfg(test)]
mod tests;
