//! TCP routes: each route's port gets a listener in every worker (SO_REUSEPORT), opened and
//! closed as the route table changes; each connection is relayed both ways to a backend
//! (copied, then spliced once a direction is bulk: see [`crate::splice`]), each direction's
//! close passed on as a half-close. A removed route's listener closes
//! while its open connections run to their end (drain). Connections count against
//! `--max-connections`, and a SIGTERM drain waits for them up to its deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::worker::{Open, Worker};

/// Keeps this worker's TCP listeners equal to the table's TCP routes.
pub async fn manage(w: Rc<Worker>) {
    let mut open: HashMap<u16, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut failed: HashMap<u16, String> = HashMap::new();
    let mut shutdown = w.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // The router's own HTTP and HTTPS ports: SO_REUSEPORT would let a TCP route bind there
    // too and split the router's connections with it, so such a route is never opened.
    let config = &w.shared.config;
    let own: Vec<u16> = config
        .http
        .iter()
        .chain(&config.https)
        .map(|a| a.port())
        .collect();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        let table = w.table();
        let wanted: Vec<u16> = table.tcp_ports().collect();
        open.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                task.abort(); // drops the listener; accepted connections live on
            }
            keep
        });
        failed.retain(|port, _| wanted.contains(port));
        for port in wanted {
            if open.contains_key(&port) {
                continue;
            }
            if own.contains(&port) {
                if let std::collections::hash_map::Entry::Vacant(e) = failed.entry(port) {
                    tracing::error!(
                        port,
                        "a tcp route wants one of the router's own ports; not opened"
                    );
                    e.insert("router port".into());
                }
                continue;
            }
            let addr = SocketAddr::new(w.shared.config.tcp_ip, port);
            match crate::listen::reuseport_listener(addr) {
                Ok(l) => match TcpListener::from_std(l) {
                    Ok(l) => {
                        failed.remove(&port);
                        open.insert(port, tokio::task::spawn_local(accept(w.clone(), l, port)));
                    }
                    Err(e) => tracing::warn!(port, error = %e, "tcp route listener"),
                },
                Err(e) => {
                    let e = e.to_string();
                    if failed.get(&port) != Some(&e) {
                        tracing::warn!(port, error = %e, "cannot listen for tcp route");
                        failed.insert(port, e);
                    }
                }
            }
        }
    }
    for (_, task) in open {
        task.abort();
    }
}

async fn accept(w: Rc<Worker>, listener: TcpListener, port: u16) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(open) = Open::new(&w) else {
            drop(stream);
            continue;
        };
        let w = w.clone();
        tokio::task::spawn_local(async move {
            let _open = open;
            let _ = stream.set_nodelay(true);
            if let Some(upstream) = connect(&w, port).await {
                // An error (a reset on either side) ends both directions; what moved
                // before it is not counted, as with a copy loop's error.
                let moved = crate::splice::relay(&stream, &upstream)
                    .await
                    .unwrap_or_default();
                let mut s = w.stats.borrow_mut();
                s.bytes_in += moved.up;
                s.bytes_out += moved.down;
                s.tcp_spliced += moved.spliced as u64;
            }
        });
    }
}

/// A connection to one of the route's backends, trying others when a connect fails.
async fn connect(w: &Worker, port: u16) -> Option<TcpStream> {
    let table = w.table();
    let entry = table.tcp(port)?;
    let (_, conn) =
        crate::forward::connect_backend(w, &entry.backends, None, false, false, &mut Vec::new())
            .await?;
    // Splice needs the descriptor: a fresh backend socket leaves the worker's ring.
    conn.stream.into_epoll()
}
