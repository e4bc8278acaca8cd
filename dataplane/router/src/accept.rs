//! One worker per core: its own single-threaded runtime, its own SO_REUSEPORT listeners
//! (the kernel spreads connections across workers), the accept loops, and each connection
//! handed to its protocol ([`crate::h1`], [`crate::h2`]) or to TCP routes ([`crate::tcp`]).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use flynn_uring::UringListener;
use tokio::net::TcpListener;

use crate::conn::ConnCtx;
use crate::h1;
use crate::io::Stream;
use crate::worker::{Open, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Https,
}

/// Runs one worker until it has drained after shutdown (or the drain deadline passed).
pub fn run(w: Worker, listeners: Vec<(std::net::TcpListener, Kind)>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let w = Rc::new(w);
    local.block_on(&rt, async move {
        w.start_ring();
        let mut accepting = Vec::new();
        for (l, kind) in listeners {
            let l = match w.ring() {
                Some(d) => UringListener::from_std(d, l).map(Listener::Uring),
                None => TcpListener::from_std(l).map(Listener::Epoll),
            };
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "listener");
                    continue;
                }
            };
            accepting.push(tokio::task::spawn_local(accept_loop(w.clone(), l, kind)));
        }
        tokio::task::spawn_local(crate::tcp::manage(w.clone()));
        let mut shutdown = w.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    w.publish();
                    housekeeping(&w);
                }
                _ = shutdown.changed() => break,
            }
        }
        // Drain: listeners are closing; in-flight requests finish until the deadline. The
        // accept loops finish first: a closing ring listener hands over the connections its
        // multishot accept already took, and until it has, they are counted nowhere. Ending
        // the worker before that dropped them, and an in-place update reset their clients
        // (operations t06 caught it, once in about 15 000 requests).
        let deadline = tokio::time::Instant::now() + w.shared.config.timeouts.drain;
        for a in accepting {
            let _ = tokio::time::timeout_at(deadline, a).await;
        }
        while w.open.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.publish();
        }
        w.publish();
    });
}

fn housekeeping(w: &Worker) {
    let table = w.table();
    w.shared
        .metrics
        .table_revision
        .store(table.revision, Ordering::Relaxed);
    let live = table.backend_addrs();
    w.upstreams.sweep(&live);
}

/// A worker's listening socket on its backend.
enum Listener {
    Epoll(TcpListener),
    Uring(UringListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Epoll(l) => l.accept().await.map(|(s, a)| (Stream::Epoll(s), a)),
            Listener::Uring(l) => l.accept().await.map(|(s, a)| (Stream::Uring(s), a)),
        }
    }
}

async fn accept_loop(w: Rc<Worker>, listener: Listener, kind: Kind) {
    let mut shutdown = w.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => serve(&w, stream, peer, kind),
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // A multishot accept takes connections off the shared socket before anyone asks: those
    // it took are this process's to answer (closing them would reset their clients while a
    // successor process takes over the socket).
    if let Listener::Uring(l) = listener {
        for (stream, peer) in l.close().await {
            serve(&w, Stream::Uring(stream), peer, kind);
        }
    }
}

/// Starts a task for an accepted connection (or closes it at once over the connection limit).
fn serve(w: &Rc<Worker>, stream: Stream, peer: SocketAddr, kind: Kind) {
    let Some(open) = Open::new(w) else {
        drop(stream);
        return;
    };
    tokio::task::spawn_local(async move {
        let w = open.0.clone();
        connection(w, stream, peer, kind).await;
        drop(open);
    });
}

async fn connection(w: Rc<Worker>, mut stream: Stream, peer: SocketAddr, kind: Kind) {
    let _ = stream.set_nodelay();
    let local_port = stream.local_addr().map_or(0, |a| a.port());
    let cfg = &w.shared.config;
    let mut ctx = ConnCtx {
        peer,
        local_port,
        tls: kind == Kind::Https,
    };
    if cfg.proxy_protocol {
        match tokio::time::timeout(
            cfg.timeouts.header,
            crate::proxy_protocol::read(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(addr))) => ctx.peer = addr,
            Ok(Ok(None)) => {}
            _ => return, // no valid PROXY line: the connection is not from the load balancer
        }
    }
    match kind {
        Kind::Http => {
            if cfg.h2c && starts_with_h2_preface(&mut stream, cfg.timeouts.header).await {
                crate::h2::serve(w, stream, ctx).await;
                return;
            }
            h1::serve(w, stream, BytesMut::with_capacity(16 * 1024), ctx).await;
        }
        Kind::Https => {
            let Some(acceptor) = w.shared.tls.clone() else {
                return;
            };
            let tls = match tokio::time::timeout(cfg.timeouts.header, acceptor.accept(stream)).await
            {
                Ok(Ok(s)) => {
                    w.stats.borrow_mut().tls_handshakes += 1;
                    s
                }
                _ => {
                    w.stats.borrow_mut().tls_failures += 1;
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                crate::h2::serve(w, tls, ctx).await;
            } else {
                h1::serve(w, tls, BytesMut::with_capacity(16 * 1024), ctx).await;
            }
        }
    }
}

/// Whether a plain connection opens with the HTTP/2 preface (h2c with prior knowledge).
async fn starts_with_h2_preface(stream: &mut Stream, timeout: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut peek = [0u8; 24];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut peek)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || !PREFACE.starts_with(&peek[..n]) {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        // A partial preface so far: wait for the rest without consuming it.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
