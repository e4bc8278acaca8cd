//! Proof that a ring answers promptly here, before a router chooses it.
//!
//! A ring can set up and pass every feature probe and still wait tens of milliseconds to
//! wake its worker (as `DEFER_TASKRUN` did on 6.18: see [`crate::driver`]). So `auto` times
//! real round trips through a ring: a loopback server on a fresh ring, its client a plain
//! blocking socket on another thread, as a router's client and worker are.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Config, Driver, UringListener};

/// How long one round trip may take before the self-test gives up on the ring.
const TRIP_TIMEOUT: Duration = Duration::from_millis(500);

/// What the self-test measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfTest {
    pub round_trips: usize,
    pub median: Duration,
    pub worst: Duration,
}

/// Times `rounds` request/response round trips of 64 bytes through a new ring on loopback.
/// `Err` says why none could be timed (a trip that takes longer than half a second is one).
pub fn self_test(rounds: usize) -> Result<SelfTest, String> {
    let rounds = rounds.max(1);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("self-test: binding a loopback socket: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("self-test: {e}"))?;
    let server = std::thread::Builder::new()
        .name("uring-selftest".into())
        .spawn(move || serve(listener, rounds))
        .map_err(|e| format!("self-test: {e}"))?;
    let timed = client(addr, rounds);
    // The server ends by itself once the client is gone (EOF or a reset).
    let served = server
        .join()
        .unwrap_or_else(|_| Err("self-test: the ring's thread panicked".into()));
    // A ring that could not start explains a client's failure better than the client does.
    served?;
    let mut trips = timed?;
    trips.sort();
    Ok(SelfTest {
        round_trips: trips.len(),
        median: trips[trips.len() / 2],
        worst: trips[trips.len() - 1],
    })
}

fn client(addr: std::net::SocketAddr, rounds: usize) -> Result<Vec<Duration>, String> {
    let mut c = TcpStream::connect_timeout(&addr, TRIP_TIMEOUT)
        .map_err(|e| format!("self-test: connecting on loopback: {e}"))?;
    let _ = c.set_nodelay(true);
    c.set_read_timeout(Some(TRIP_TIMEOUT))
        .map_err(|e| format!("self-test: {e}"))?;
    let mut trips = Vec::with_capacity(rounds);
    let mut msg = [0u8; 64];
    for i in 0..rounds {
        msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        c.write_all(&msg)
            .map_err(|e| format!("self-test: sending through the ring: {e}"))?;
        let mut back = [0u8; 64];
        c.read_exact(&mut back).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "self-test: a round trip through the ring took over {} ms",
                TRIP_TIMEOUT.as_millis()
            ),
            _ => format!("self-test: reading through the ring: {e}"),
        })?;
        if back != msg {
            return Err("self-test: the ring echoed other bytes than it was sent".into());
        }
        trips.push(t.elapsed());
    }
    Ok(trips)
}

fn serve(listener: TcpListener, rounds: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("self-test: runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let drv = Driver::start(Config {
            entries: 32,
            buffers: 8,
            buffer_size: 4096,
            files: 8,
        })
        .map_err(|e| format!("self-test: io_uring setup: {e}"))?;
        let l = UringListener::from_std(&drv, listener)
            .map_err(|e| format!("self-test: listener on the ring: {e}"))?;
        // Bounded: a client that never connects must not keep this thread forever.
        let limit = TRIP_TIMEOUT * (rounds as u32 + 2);
        let echo = async {
            let (mut s, _) = l.accept().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            for _ in 0..rounds {
                if s.read_exact(&mut buf).await.is_err() {
                    break; // the client gave up; it says why
                }
                s.write_all(&buf).await.map_err(|e| e.to_string())?;
                s.flush().await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(limit, echo).await {
            Ok(r) => r.map_err(|e| format!("self-test: serving on the ring: {e}")),
            Err(_) => Err("self-test: the ring's server did not finish in time".into()),
        }
    })
}
