//! Real sockets on loopback, a real ring: the lifetimes the unsafe code promises.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn run<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f());
}

fn small() -> Config {
    Config {
        entries: 64,
        buffers: 16,
        buffer_size: 1024,
        files: 64,
    }
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A loopback listener on `drv`'s ring, and its address.
fn ring_listener(drv: &Rc<Driver>) -> (UringListener, SocketAddr) {
    let (l, addr) = listener();
    (UringListener::from_std(drv, l).unwrap(), addr)
}

/// Waits (bounded) until the driver has settled: only `ops` slots left and every buffer
/// back in the ring.
async fn settles(drv: &Rc<Driver>, ops: usize) {
    for _ in 0..200 {
        if drv.live_ops() == ops && drv.free_buffers() == drv.config().buffers as usize {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "driver did not settle: {} ops (want {ops}), {} of {} buffers free",
        drv.live_ops(),
        drv.free_buffers(),
        drv.config().buffers
    );
}

#[test]
fn t01_probe_accept_echo_and_close() {
    // Kernel 6.18 here: the cooperative task-run mode must be the one in use.
    assert_eq!(probe(), Ok(TaskRun::Cooperative));
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        assert_eq!(drv.taskrun, TaskRun::Cooperative);
        let (l, addr) = ring_listener(&drv);
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"hello ring").unwrap();
            let mut back = [0u8; 10];
            c.read_exact(&mut back).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            (back, rest)
        });
        let (mut s, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), addr.ip());
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.flush().await.unwrap();
        // The client half-closes: EOF, and EOF again.
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        s.shutdown().await.unwrap();
        let (back, rest) = client.join().unwrap();
        assert_eq!(&back, b"hello ring");
        assert!(rest.is_empty());
        drop(s);
        settles(&drv, 1).await;
        drop(l);
        settles(&drv, 0).await;
    });
}

#[test]
fn t02_four_mebibytes_each_way_through_a_small_buffer_ring() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let data: Vec<u8> = (0..4 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let mut r = c.try_clone().unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                r.read_to_end(&mut got).unwrap();
                got
            });
            c.write_all(&sent).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            reader.join().unwrap()
        });
        let (mut s, _) = l.accept().await.unwrap();
        // Echo in odd-sized pieces: partial buffer reads, queued sends, the queue cap.
        let mut buf = vec![0u8; 3000];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
            total += n;
        }
        s.shutdown().await.unwrap();
        assert_eq!(total, data.len());
        let got = client.join().unwrap();
        assert!(got == data, "echoed bytes differ");
        drop(s);
        drop(l);
        settles(&drv, 0).await;
    });
}

#[test]
fn t03_a_dropped_read_future_loses_nothing_and_a_dropped_stream_frees_its_slots() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let mut c = TcpStream::connect(addr).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        // A read that times out is a dropped future with a receive armed in the kernel.
        let r = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
        assert!(r.is_err(), "nothing was sent yet");
        c.write_all(b"after the cancel").unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &b"after the cancel"[..n]);
        // Data arrives for a stream nobody reads, then the stream goes: its buffers come
        // back and its slots are freed once the kernel confirms the cancel.
        c.write_all(&[1u8; 8000]).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        settles(&drv, 1).await;
        // And the peer sees the close.
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(
            rest.len() <= 16,
            "only our echo-less close: got {} bytes",
            rest.len()
        );
    });
}

#[test]
fn t04_a_peer_reset_mid_receive_is_an_error_not_a_hang() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let c = TcpStream::connect(addr).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut c = c;
        c.write_all(&[7u8; 5000]).unwrap();
        // SO_LINGER 0: close sends RST instead of FIN.
        socket_linger_zero(&c);
        drop(c);
        let mut got = 0usize;
        let mut buf = [0u8; 700];
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Err(_) => panic!("read hung after the peer reset"),
                Ok(Ok(0)) => break None,
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => break Some(e),
            }
        };
        assert!(got <= 5000);
        match end {
            Some(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            None => assert_eq!(got, 5000, "EOF without a reset must follow all the data"),
        }
        // Writing to the reset socket fails (now or at the flush), never panics.
        let w = s.write_all(b"x").await;
        let f = s.flush().await;
        assert!(
            w.is_err() || f.is_err(),
            "a write to a reset peer must fail"
        );
        drop(s);
        drop(l);
        settles(&drv, 0).await;
    });
}

fn socket_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let lin = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid descriptor and a correctly sized linger value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(r, 0);
}

#[test]
fn t05_an_exhausted_buffer_ring_stalls_nobody_for_good() {
    run(|| async {
        // 4 buffers of 256 bytes for two connections that both send 64 KiB.
        let drv = Driver::start(Config {
            entries: 32,
            buffers: 4,
            buffer_size: 256,
            files: 8,
        })
        .unwrap();
        let (l, addr) = ring_listener(&drv);
        let payload: Vec<u8> = (0..65536).map(|i| (i % 253) as u8).collect();
        let mut senders = Vec::new();
        for _ in 0..2 {
            let p = payload.clone();
            senders.push(std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&p).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut ack = [0u8; 1];
                c.read_exact(&mut ack).unwrap();
            }));
        }
        let (a, _) = l.accept().await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        // Let both fill the ring while nobody reads.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read_all = |mut s: UringStream| async move {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
                .await
                .expect("a reader stalled on the exhausted ring")
                .unwrap();
            s.write_all(b"k").await.unwrap();
            s.flush().await.unwrap();
            got
        };
        // Read one to the end before touching the other.
        let got_a = read_all(a).await;
        let got_b = read_all(b).await;
        assert!(
            got_a == payload && got_b == payload,
            "bytes lost or reordered"
        );
        assert!(
            drv.stats.buffers_exhausted.get() > 0,
            "the ring never ran dry"
        );
        for s in senders {
            s.join().unwrap();
        }
        drop(l);
        settles(&drv, 0).await;
    });
}

#[test]
fn t06_data_written_before_a_drop_still_arrives() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let reader = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            // Read slowly at first, so the sends queue up behind a full socket buffer.
            std::thread::sleep(Duration::from_millis(200));
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let (mut s, _) = l.accept().await.unwrap();
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 241) as u8).collect();
        for chunk in data.chunks(64 * 1024) {
            s.write_all(chunk).await.unwrap();
        }
        drop(s); // no flush: the driver finishes the sends, then closes
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        drop(l);
        settles(&drv, 0).await;
    });
}

#[test]
fn t07_connect_and_peek_without_consuming() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = listener();
        // The server speaks only once told to: `still_open` means "open and idle", so bytes
        // that arrived before the first check would rightly make it false.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            wait.recv().unwrap();
            c.write_all(b"PRI * HTTP/2.0").unwrap();
            std::thread::sleep(Duration::from_millis(30));
            c.write_all(b"\r\n").unwrap();
        });
        let mut s = UringStream::connect(&drv, addr).await.unwrap();
        assert!(s.still_open());
        go.send(()).unwrap();
        let mut peek = [0u8; 16];
        let mut n = 0;
        for _ in 0..100 {
            n = std::future::poll_fn(|cx| s.poll_peek(cx, &mut peek))
                .await
                .unwrap();
            if n == 16 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(&peek[..n], b"PRI * HTTP/2.0\r\n");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"PRI * HTTP/2.0\r\n", "peek consumed nothing");
        assert!(!s.still_open(), "the server closed");
        server.join().unwrap();
        drop(s);
        settles(&drv, 0).await;
    });
}

#[test]
fn t08_an_unread_stream_leaves_the_ring_for_splice_and_a_read_one_does_not() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = listener();
        let server = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = l.accept().unwrap();
                c.write_all(b"banner\n").unwrap();
                out.push(c);
            }
            out
        });
        let fresh = UringStream::connect(&drv, addr).await.unwrap();
        let mut std = fresh.into_std().expect("an unread stream leaves the ring");
        settles(&drv, 0).await;
        // Nothing was lost in the ring: the banner is still on the socket.
        std.set_nonblocking(false).unwrap();
        let mut b = [0u8; 7];
        std.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"banner\n");

        let mut used = UringStream::connect(&drv, addr).await.unwrap();
        let mut one = [0u8; 1];
        used.read_exact(&mut one).await.unwrap();
        let used = used.into_std().expect_err("a read stream holds ring state");
        drop(used);
        settles(&drv, 0).await;
        drop(server.join().unwrap());
    });
}

#[test]
fn t09_closing_a_listener_hands_over_what_it_accepted_instead_of_resetting_it() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        // Arm the multishot accept, then let three clients connect without anyone accepting.
        let first = std::thread::spawn(move || TcpStream::connect(addr).unwrap());
        let (mut s0, _) = l.accept().await.unwrap();
        let mut clients = vec![first.join().unwrap()];
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let handed = l.close().await;
        assert_eq!(
            handed.len(),
            3,
            "the ring accepted three connections nobody took"
        );
        s0.write_all(b"0").await.unwrap();
        s0.flush().await.unwrap();
        let mut streams = vec![s0];
        for (mut s, _) in handed {
            s.write_all(b"1").await.unwrap();
            s.flush().await.unwrap();
            streams.push(s);
        }
        drop(streams);
        // Every client reads its byte and a clean EOF: none was reset.
        let results = tokio::task::spawn_blocking(move || {
            clients
                .into_iter()
                .map(|mut c| {
                    let mut got = Vec::new();
                    c.read_to_end(&mut got).map(|_| got)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for r in results {
            assert_eq!(r.expect("no reset").len(), 1);
        }
        settles(&drv, 0).await;
    });
}

/// 200 request/response round trips on one connection, the server on the ring and the client
/// a plain blocking socket on another thread: each answer must come back when its request
/// arrives, not when something else happens to wake the worker. A ring whose sleeping worker
/// is not woken by deferred completions waits for a timer per round trip (tens of ms each);
/// the bound is generous against a loaded machine and still fails at a few ms per trip.
#[test]
fn t10_round_trips_are_not_stalled_by_a_sleeping_worker() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_nodelay(true).unwrap();
            let start = std::time::Instant::now();
            let mut worst = Duration::ZERO;
            for i in 0..200u32 {
                let t = std::time::Instant::now();
                c.write_all(&i.to_le_bytes()).unwrap();
                let mut back = [0u8; 4];
                c.read_exact(&mut back).unwrap();
                assert_eq!(u32::from_le_bytes(back), i);
                worst = worst.max(t.elapsed());
            }
            (start.elapsed(), worst)
        });
        let (mut s, _) = l.accept().await.unwrap();
        for _ in 0..200 {
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.flush().await.unwrap();
        }
        let (total, worst) = client.join().unwrap();
        eprintln!("200 round trips: {total:?}, worst {worst:?}");
        assert!(
            total < Duration::from_secs(2),
            "200 round trips took {total:?} (worst {worst:?}): the worker sleeps through completions"
        );
    });
}

#[test]
fn t11_the_self_test_times_prompt_round_trips() {
    let t = self_test(50).unwrap();
    assert_eq!(t.round_trips, 50);
    assert!(t.median <= t.worst);
    // Generous: a stalled ring takes 16 ms and more per trip here.
    assert!(t.median < Duration::from_millis(5), "{t:?}");
}

/// A relay as the router's body pump does it on one ring: received buffers go out as they
/// came in, uncopied, interleaved with ordinary writes, with a body that ends inside a
/// buffer (the rest read the ordinary way and left for the next message).
#[test]
fn t12_received_buffers_are_sent_on_uncopied_and_all_come_back() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l_in, addr_in) = ring_listener(&drv);
        let (l_out, addr_out) = ring_listener(&drv);
        let body: Vec<u8> = (0..(3 << 20) + 777).map(|i| (i * 13 % 251) as u8).collect();
        let trailer = b"NEXT MESSAGE".to_vec();
        let (to_send, want) = (body.clone(), body.clone());
        let sender = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr_in).unwrap();
            c.write_all(&to_send).unwrap();
            c.write_all(&trailer).unwrap();
        });
        let receiver = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr_out).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let (src, _) = l_in.accept().await.unwrap();
        let (mut dst, _) = l_out.accept().await.unwrap();
        assert!(src.same_ring(&dst));
        dst.write_all(b"HEAD:").await.unwrap();
        let mut left = body.len();
        let mut bufs = Vec::new();
        let mut uncopied = 0;
        while left > 0 {
            match src.take_bufs(left, &mut bufs).await.unwrap() {
                Taken::Bytes(n) => {
                    assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), n);
                    dst.send_bufs(&mut bufs).await.unwrap();
                    assert!(bufs.is_empty());
                    left -= n;
                    uncopied += n;
                }
                Taken::Straddles => {
                    // The body's last bytes share a buffer with the next message.
                    let mut tail = vec![0u8; left];
                    (&src).read_exact(&mut tail).await.unwrap();
                    dst.write_all(&tail).await.unwrap();
                    left = 0;
                }
                Taken::Eof => panic!("early end with {left} bytes left"),
            }
        }
        dst.write_all(b":TAIL").await.unwrap();
        dst.shutdown().await.unwrap();
        assert!(
            uncopied > body.len() / 2,
            "only {uncopied} bytes went uncopied"
        );
        // What followed the body is still there for the next read.
        let mut next = [0u8; 12];
        (&src).read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT MESSAGE");
        let got = receiver.join().unwrap();
        assert_eq!(&got[..5], b"HEAD:");
        assert_eq!(&got[got.len() - 5..], b":TAIL");
        assert!(got[5..got.len() - 5] == want[..], "relayed bytes differ");
        drop(src);
        sender.join().unwrap();
        drop(dst);
        drop((l_in, l_out));
        settles(&drv, 0).await;
    });
}

/// Buffers handed out and dropped unsent go back to the ring; a send that fails gives back
/// what it carried.
#[test]
fn t13_taken_buffers_return_whether_dropped_or_failed() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l, addr) = ring_listener(&drv);
        let writer = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&vec![1u8; 5000]).unwrap();
            c
        });
        let (src, _) = l.accept().await.unwrap();
        let _keep = writer.join().unwrap();
        let mut bufs = Vec::new();
        let mut got = 0;
        while got < 5000 {
            match src.take_bufs(usize::MAX, &mut bufs).await.unwrap() {
                Taken::Bytes(n) => got += n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            drv.free_buffers(),
            drv.config().buffers as usize - bufs.len()
        );
        let mut half = bufs.split_off(bufs.len() / 2);
        drop(bufs);
        // A peer that reset its connection: sends to it fail. It resets only once the
        // connection is accepted: a reset that raced ahead of the accept made the accept
        // itself fail (ENOTCONN), once in a CI run.
        let (accepted, wait_accept) = std::sync::mpsc::channel::<()>();
        let resetter = std::thread::spawn(move || {
            let c = TcpStream::connect(addr).unwrap();
            let _ = wait_accept.recv();
            socket_linger_zero(&c);
        });
        let (mut dst, _) = l.accept().await.unwrap();
        accepted.send(()).unwrap();
        resetter.join().unwrap();
        let mut probe = [0u8; 1];
        assert!(dst.read(&mut probe).await.is_err(), "the reset is seen");
        let sent = async {
            dst.send_bufs(&mut half).await?;
            (&dst).flush().await
        };
        assert!(sent.await.is_err(), "a send to a reset peer fails");
        drop(src);
        drop(dst);
        drop(l);
        settles(&drv, 0).await;
    });
}

/// A bulk relay by direct receives into owned buffers, sent on as they are: the body's end
/// is respected (what follows stays for the next read), bytes the multishot queued first
/// come first, and a stream dropped with a direct receive in flight frees everything.
#[test]
fn t14_direct_receives_relay_bulk_and_stop_at_the_body_s_end() {
    run(|| async {
        let drv = Driver::start(small()).unwrap();
        let (l_in, addr_in) = ring_listener(&drv);
        let (l_out, addr_out) = ring_listener(&drv);
        let body: Vec<u8> = (0..(2 << 20) + 333).map(|i| (i * 31 % 251) as u8).collect();
        let to_send = body.clone();
        let sender = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr_in).unwrap();
            c.write_all(&to_send).unwrap();
            c.write_all(b"AFTER").unwrap();
            c
        });
        let receiver = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr_out).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let (src, _) = l_in.accept().await.unwrap();
        let (mut dst, _) = l_out.accept().await.unwrap();
        // A first ordinary read starts the multishot receive, which queues some bytes.
        let mut first = [0u8; 100];
        (&src).read_exact(&mut first).await.unwrap();
        dst.write_all(&first).await.unwrap();
        let mut left = body.len() - 100;
        let (mut direct, mut queued) = (0, 0);
        while left > 0 {
            let mut buf = Some(Vec::with_capacity(64 << 10));
            match src.recv_direct(&mut buf, left).await.unwrap() {
                Direct::Filled(n) => {
                    assert!(n > 0 && n <= left);
                    let b = buf.take().unwrap();
                    assert_eq!(b.len(), n);
                    dst.send_owned(b).await.unwrap();
                    left -= n;
                    direct += n;
                }
                Direct::Queued => {
                    let mut bufs = Vec::new();
                    match src.take_bufs(left, &mut bufs).await.unwrap() {
                        Taken::Bytes(n) => {
                            dst.send_bufs(&mut bufs).await.unwrap();
                            left -= n;
                            queued += n;
                        }
                        Taken::Straddles => {
                            let mut tail = vec![0u8; left];
                            (&src).read_exact(&mut tail).await.unwrap();
                            dst.write_all(&tail).await.unwrap();
                            left = 0;
                        }
                        Taken::Eof => panic!("early end"),
                    }
                }
                Direct::Eof => panic!("early end with {left} left"),
            }
        }
        assert!(direct > body.len() / 2, "{direct} direct, {queued} queued");
        dst.shutdown().await.unwrap();
        let mut after = [0u8; 5];
        (&src).read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"AFTER");
        let got = receiver.join().unwrap();
        assert!(
            got == body,
            "relayed bytes differ ({} of {})",
            got.len(),
            body.len()
        );
        // A direct receive in flight when its stream goes.
        let _sender = sender.join().unwrap();
        let mut buf = Some(Vec::with_capacity(4096));
        let pending =
            tokio::time::timeout(Duration::from_millis(50), src.recv_direct(&mut buf, 4096)).await;
        assert!(pending.is_err(), "nothing more was sent: {pending:?}");
        drop(src);
        drop(dst);
        drop((l_in, l_out));
        settles(&drv, 0).await;
    });
}
