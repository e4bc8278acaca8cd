//! Relaying a TCP route's connection: each direction copies through a small buffer first and
//! moves to `splice(2)` through a pipe once it has carried [`SPLICE_AFTER`] bytes, so bulk
//! flows cross the proxy without being copied into user space, while short ones never pay
//! for a pipe (two descriptors and two more syscalls per direction). Each direction's end is
//! passed on as a half-close; an error in either ends both, as a reset would.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a direction copies before it moves to splice.
pub const SPLICE_AFTER: u64 = 256 * 1024;
/// The copy phase's buffer, per direction.
const COPY_BUFFER: usize = 16 * 1024;
/// The pipe's capacity: one splice moves up to this much.
const PIPE_SIZE: usize = 256 * 1024;

/// What a relay moved: client to backend, backend to client, and whether either direction
/// went over to splice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub up: u64,
    pub down: u64,
    pub spliced: bool,
}

/// Relays `client` and `backend` both ways until both directions have ended.
pub async fn relay(client: &TcpStream, backend: &TcpStream) -> io::Result<Relayed> {
    relay_with(client, backend, SPLICE_AFTER).await
}

/// [`relay`] with the copy phase's length chosen (tests use 0 to splice from the start).
pub async fn relay_with(
    client: &TcpStream,
    backend: &TcpStream,
    splice_after: u64,
) -> io::Result<Relayed> {
    let ((up, a), (down, b)) = tokio::try_join!(
        one_way(client, backend, splice_after),
        one_way(backend, client, splice_after)
    )?;
    Ok(Relayed {
        up,
        down,
        spliced: a || b,
    })
}

/// One direction: bytes moved, and whether splice carried any.
async fn one_way(from: &TcpStream, to: &TcpStream, splice_after: u64) -> io::Result<(u64, bool)> {
    let (moved, ended) = copy(from, to, 0, splice_after).await?;
    if ended {
        return Ok((moved, false));
    }
    // A pipe that cannot be made (no descriptors left) leaves the flow on the copy loop.
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; copying");
            return copy(from, to, moved, u64::MAX)
                .await
                .map(|(m, _)| (m, false));
        }
    };
    let mut moved = moved;
    loop {
        let n = fill(from, &pipe).await?;
        if n == 0 {
            half_close(to);
            return Ok((moved, true));
        }
        drain(&pipe, to, n).await?;
        moved += n as u64;
    }
}

/// Copies through a buffer until `moved` reaches `until` or the peer ends its side (passed
/// on as a half-close): bytes moved, and whether the direction ended.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    mut moved: u64,
    until: u64,
) -> io::Result<(u64, bool)> {
    if moved >= until {
        return Ok((moved, false));
    }
    let mut buf = vec![0u8; COPY_BUFFER];
    while moved < until {
        let n = read(from, &mut buf).await?;
        if n == 0 {
            half_close(to);
            return Ok((moved, true));
        }
        write_all(to, &buf[..n]).await?;
        moved += n as u64;
    }
    Ok((moved, false))
}

async fn read(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The peer's end of this direction becomes our end towards the other side. Already gone
/// (the other side reset) is not an error here: the other direction will report it.
fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per call; the default (64 KiB) serves if the limit
        // (/proc/sys/fs/pipe-max-size) refuses.
        let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// Moves what the socket holds into the (empty) pipe: 0 at the peer's end of stream.
async fn fill(from: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    loop {
        from.readable().await?;
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing: the
        // readiness is cleared and the next readable() waits for more.
        match from.try_io(Interest::READABLE, || {
            nix::fcntl::splice(from, None, pipe.write.as_fd(), None, PIPE_SIZE, FLAGS)
                .map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Moves `n` bytes from the pipe to the socket.
async fn drain(pipe: &Pipe, to: &TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            nix::fcntl::splice(pipe.read.as_fd(), None, to, None, n, FLAGS).map_err(io::Error::from)
        }) {
            Ok(k) => n -= k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// (client, the proxy's client side, the proxy's backend side, backend): real loopback
    /// sockets, the middle two handed to the relay.
    async fn four_sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy_client, _) = front.accept().await.unwrap();
        let proxy_backend = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (backend, _) = back.accept().await.unwrap();
        (client, proxy_client, proxy_backend, backend)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// Both directions at once, each larger than the socket buffers, through the copy phase
    /// and then splice (and with splice from the first byte): every byte arrives in order.
    async fn both_ways(splice_after: u64, size: usize) -> Relayed {
        let (client, pc, pb, backend) = four_sockets().await;
        let relay = tokio::spawn(async move { relay_with(&pc, &pb, splice_after).await });
        let up = pattern(size, 1);
        let down = pattern(size, 2);
        let (u, d) = (up.clone(), down.clone());
        let client_side = tokio::spawn(send_and_receive(client, u));
        let backend_side = tokio::spawn(send_and_receive(backend, d));
        assert!(
            client_side.await.unwrap() == down,
            "backend → client bytes differ"
        );
        assert!(
            backend_side.await.unwrap() == up,
            "client → backend bytes differ"
        );
        let moved = relay.await.unwrap().unwrap();
        assert_eq!((moved.up, moved.down), (size as u64, size as u64));
        moved
    }

    /// Sends `data` and ends the sending side while receiving to the end: what arrived.
    async fn send_and_receive(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        got
    }

    #[tokio::test]
    async fn t01_bulk_flows_splice_and_arrive_whole() {
        let moved = both_ways(SPLICE_AFTER, 8 << 20).await;
        assert!(
            moved.spliced,
            "8 MiB each way should have gone over to splice"
        );
        assert!(both_ways(0, 3 << 20).await.spliced);
    }

    #[tokio::test]
    async fn t02_short_flows_stay_on_the_copy_loop() {
        let moved = both_ways(SPLICE_AFTER, 1000).await;
        assert!(!moved.spliced, "a 1000-byte flow made a pipe");
    }

    /// The client ends its side first; the backend still answers after seeing that end,
    /// and the answer reaches the client (splice from the first byte, so the half-close is
    /// passed on from the splice path).
    #[tokio::test]
    async fn t03_half_close_is_passed_on_and_the_other_direction_lives() {
        for splice_after in [0, SPLICE_AFTER] {
            let (mut client, pc, pb, mut backend) = four_sockets().await;
            let relay = tokio::spawn(async move { relay_with(&pc, &pb, splice_after).await });
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut req = Vec::new();
            backend.read_to_end(&mut req).await.unwrap();
            assert_eq!(req, b"request");
            let answer = pattern(1 << 20, 9);
            backend.write_all(&answer).await.unwrap();
            drop(backend);
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got == answer, "the answer after the half-close was cut");
            relay.await.unwrap().unwrap();
        }
    }

    /// The backend resets in the middle of a transfer: the relay ends with the error and
    /// the client's connection ends too, instead of hanging.
    #[tokio::test]
    async fn t04_a_reset_mid_transfer_ends_both_sides() {
        for splice_after in [0, SPLICE_AFTER] {
            let (mut client, pc, pb, backend) = four_sockets().await;
            let relay = tokio::spawn(async move { relay_with(&pc, &pb, splice_after).await });
            let (mut cr, mut cw) = client.split();
            let chunk = pattern(64 << 10, 4);
            // Send a while (the backend never reads, so buffers fill), then reset it.
            let sending = async {
                loop {
                    if cw.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            };
            let reset = async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                socket2::SockRef::from(&backend)
                    .set_linger(Some(std::time::Duration::ZERO))
                    .unwrap();
                drop(backend);
                let mut buf = [0u8; 1024];
                // The client sees its connection end (EOF or reset), in bounded time.
                tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await
                .expect("the client's connection did not end after the backend reset");
            };
            tokio::select! {
                _ = sending => {}
                _ = reset => {}
            }
            let result = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
                .await
                .expect("the relay did not end")
                .unwrap();
            assert!(result.is_err(), "a reset must end the relay with an error");
        }
    }
}
