//! What a TCP route's bulk flow costs the proxy, by mechanism: bytes relayed per CPU-second
//! of the relaying process, the same flow over loopback, in one run.
//!
//! - `splice`: `splice(2)` through a pipe on non-blocking sockets, waiting in `poll(2)`:
//!   the router's TCP route path on both backends.
//! - `uring_splice`: `IORING_OP_SPLICE` through a pipe on a ring. The kernel never issues a
//!   splice inline: it always hands it to an io-wq worker thread, which blocks in it.
//! - `uring_copy`: this crate's streams (multishot receive into the provided buffer ring,
//!   send from user space): the copy path HTTP takes under the io_uring backend.
//! - `epoll_copy`: tokio's sockets, the same 64 KiB copy loop: the copy path under epoll.
//! - `ring_send` / `ring_send_zc`: a plain ring loop, receive into a 256 KiB buffer and send
//!   it with `IORING_OP_SEND` or `IORING_OP_SEND_ZC`: what zero-copy sends would save on a
//!   large body. Over loopback (and veth) the kernel copies a zero-copy skb anyway when it
//!   reaches the local receiver, so this prices the mechanism's overhead, not its gain on a
//!   NIC.
//!
//! The source and sink are threads of this process; their own CPU time (per-thread clocks)
//! is taken off the process total, io-wq workers included. Loopback runs the receiver's
//! softirq in the sender's thread, so some of the kernel's work lands on whichever thread
//! sent: read the ratios as the relay's cost with that caveat, and compare within a run.
//! `bash bench/tcp-relay [MiB] [rounds] [modes,...]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 256 * 1024;

/// Relays one direction, client to backend, until the client ends.
type Relay = fn(TcpStream, TcpStream);

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let only: Option<String> = args.next();
    let total = mib << 20;
    let modes: [(&str, Relay); 6] = [
        ("splice", relay_splice),
        ("uring_splice", relay_uring_splice),
        ("uring_copy", relay_uring_copy),
        ("epoll_copy", relay_epoll_copy),
        ("ring_send", |c, b| relay_ring_send(c, b, false)),
        ("ring_send_zc", |c, b| relay_ring_send(c, b, true)),
    ];
    // A third argument picks modes by name (comma-separated).
    let modes: Vec<(&str, Relay)> = modes
        .into_iter()
        .filter(|(n, _)| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|m| m == *n))
        })
        .collect();
    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> =
        modes.iter().map(|(n, _)| (*n, vec![], vec![])).collect();
    for _ in 0..rounds {
        for (i, (name, relay)) in modes.iter().enumerate() {
            let (bps, cpu_frac) = measure(total, *relay);
            println!(
                "{{\"mode\":\"{name}\",\"mib\":{mib},\"gib_per_cpu_s\":{:.2},\"relay_cpu_per_wall\":{cpu_frac:.2}}}",
                bps / (1u64 << 30) as f64
            );
            results[i].1.push(bps);
            results[i].2.push(cpu_frac);
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = med(&results[0].1);
    println!();
    println!("| mode | GiB per relay CPU-second | relay CPU per wall second | vs splice |");
    println!("|---|---|---|---|");
    for (name, bps, cpu) in &results {
        let m = med(bps);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            m / (1u64 << 30) as f64,
            med(cpu),
            m / base
        );
    }
}

/// Runs one flow of `total` bytes source → relay → sink; returns bytes per relay CPU-second
/// and the relay's CPU per wall second.
fn measure(total: u64, relay: Relay) -> (f64, f64) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
    let sink = std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let (mut s, _) = back.accept().unwrap();
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n as u64,
                    Err(e) => panic!("sink: {e}"),
                }
            }
            (got, thread_cpu())
        })
        .unwrap();
    let source = std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut s = TcpStream::connect(front_addr).unwrap();
            let buf = vec![7u8; CHUNK];
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(CHUNK as u64) as usize;
                s.write_all(&buf[..n]).unwrap();
                sent += n as u64;
            }
            drop(s);
            thread_cpu()
        })
        .unwrap();
    let (client, _) = front.accept().unwrap();
    let backend = TcpStream::connect(back_addr).unwrap();
    let (cpu0, t0) = (process_cpu(), Instant::now());
    relay(client, backend);
    let source_cpu = source.join().unwrap();
    let (got, sink_cpu) = sink.join().unwrap();
    let (cpu, wall) = (process_cpu() - cpu0, t0.elapsed());
    assert_eq!(got, total, "the sink got every byte");
    let relay_cpu = (cpu - source_cpu - sink_cpu).max(Duration::from_micros(1));
    (
        total as f64 / relay_cpu.as_secs_f64(),
        relay_cpu.as_secs_f64() / wall.as_secs_f64(),
    )
}

fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the local.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Pipe {
    read: RawFd,
    write: RawFd,
}

impl Pipe {
    fn new() -> Pipe {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the local array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "pipe2");
        // SAFETY: a plain fcntl on the pipe just made.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Pipe {
            read: fds[0],
            write: fds[1],
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: the pipe's own descriptors, closed once.
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}

fn wait(fd: RawFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one local pollfd.
    unsafe { libc::poll(&mut p, 1, -1) };
}

fn splice(from: RawFd, to: RawFd, len: usize) -> isize {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: splice between two open descriptors, no offsets.
    unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    }
}

fn would_block() -> bool {
    std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

fn relay_splice(client: TcpStream, backend: TcpStream) {
    client.set_nonblocking(true).unwrap();
    backend.set_nonblocking(true).unwrap();
    let pipe = Pipe::new();
    let (from, to) = (client.as_raw_fd(), backend.as_raw_fd());
    loop {
        let n = splice(from, pipe.write, CHUNK);
        if n < 0 && would_block() {
            wait(from, libc::POLLIN);
            continue;
        }
        assert!(n >= 0, "splice in: {}", std::io::Error::last_os_error());
        if n == 0 {
            break;
        }
        let mut left = n as usize;
        while left > 0 {
            let m = splice(pipe.read, to, left);
            if m < 0 && would_block() {
                wait(to, libc::POLLOUT);
                continue;
            }
            assert!(m > 0, "splice out: {}", std::io::Error::last_os_error());
            left -= m as usize;
        }
    }
}

/// One splice on the ring, waited for; the result as splice(2) returns it.
fn ring_splice(ring: &mut IoUring, from: RawFd, to: RawFd, len: u32) -> i32 {
    let sqe = opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len)
        .flags(libc::SPLICE_F_MOVE)
        .build();
    // SAFETY: the splice reads and writes only descriptors, which outlive the wait below;
    // no memory of ours is handed to the kernel.
    unsafe { ring.submission().push(&sqe).expect("queue has room") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    ring.completion().next().expect("a completion").result()
}

fn relay_uring_splice(client: TcpStream, backend: TcpStream) {
    let mut ring = IoUring::new(8).expect("io_uring");
    // Blocking descriptors: io-wq workers wait in the splice, as the ring intends.
    let pipe = Pipe::new();
    // SAFETY: plain fcntls on the pipe made above.
    unsafe {
        libc::fcntl(pipe.read, libc::F_SETFL, 0);
        libc::fcntl(pipe.write, libc::F_SETFL, 0);
    }
    let (from, to) = (client.as_raw_fd(), backend.as_raw_fd());
    loop {
        let n = ring_splice(&mut ring, from, pipe.write, CHUNK as u32);
        assert!(n >= 0, "ring splice in: {}", -n);
        if n == 0 {
            break;
        }
        let mut left = n as u32;
        while left > 0 {
            let m = ring_splice(&mut ring, pipe.read, to, left);
            assert!(m > 0, "ring splice out: {}", -m);
            left -= m as u32;
        }
    }
    drop(backend);
}

fn relay_uring_copy(client: TcpStream, backend: TcpStream) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let drv = flynn_uring::Driver::start(flynn_uring::Config::default()).unwrap();
        let mut from = flynn_uring::UringStream::from_std(&drv, client).unwrap();
        let mut to = flynn_uring::UringStream::from_std(&drv, backend).unwrap();
        copy_all(&mut from, &mut to).await;
    });
}

/// The 64 KiB read/write loop both copy modes run, then the half-close.
async fn copy_all<R, W>(from: &mut R, to: &mut W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.unwrap();
    }
    to.shutdown().await.unwrap();
}

fn relay_epoll_copy(client: TcpStream, backend: TcpStream) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        client.set_nonblocking(true).unwrap();
        backend.set_nonblocking(true).unwrap();
        let mut from = tokio::net::TcpStream::from_std(client).unwrap();
        let mut to = tokio::net::TcpStream::from_std(backend).unwrap();
        copy_all(&mut from, &mut to).await;
    });
}

/// Receive into one buffer, send it on: with `zc`, by `SEND_ZC`, whose buffer stays the
/// kernel's until its notification arrives (waited for before the buffer is reused).
fn relay_ring_send(client: TcpStream, backend: TcpStream, zc: bool) {
    let mut ring = IoUring::new(8).expect("io_uring");
    let mut buf = vec![0u8; CHUNK];
    let (from, to) = (client.as_raw_fd(), backend.as_raw_fd());
    loop {
        let sqe = opcode::Recv::new(types::Fd(from), buf.as_mut_ptr(), CHUNK as u32).build();
        // SAFETY: `buf` outlives the wait for this receive's completion just below.
        unsafe { ring.submission().push(&sqe).expect("queue has room") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        let n = ring.completion().next().expect("a completion").result();
        assert!(n >= 0, "ring recv: {}", -n);
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            let (ptr, len) = (buf[off..].as_ptr(), (n as usize - off) as u32);
            let sqe = if zc {
                opcode::SendZc::new(types::Fd(to), ptr, len).build()
            } else {
                opcode::Send::new(types::Fd(to), ptr, len).build()
            };
            // SAFETY: `buf` is neither freed nor written until every completion of this send
            // (for SEND_ZC, its notification too) has been reaped below.
            unsafe { ring.submission().push(&sqe).expect("queue has room") };
            let mut sent = None;
            let mut notified = !zc;
            while sent.is_none() || !notified {
                ring.submit_and_wait(1).expect("io_uring_enter");
                for cqe in ring.completion() {
                    if io_uring::cqueue::notif(cqe.flags()) {
                        notified = true;
                    } else {
                        sent = Some(cqe.result());
                        if !io_uring::cqueue::more(cqe.flags()) {
                            notified = true;
                        }
                    }
                }
            }
            let m = sent.unwrap_or(-1);
            assert!(m > 0, "ring send: {}", -m);
            off += m as usize;
        }
    }
}
