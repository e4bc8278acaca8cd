//! The router against real backends and real clients: the `flynn-host router` process,
//! backend servers on real sockets, raw HTTP/1.1 clients (so hostile input can be sent as
//! is), rustls and h2 clients for HTTPS and HTTP/2.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flynn_tests::router::{get, request, routes, Backend, Client, NetHost, RouterProc};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_routing_and_added_headers() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let table = routes(
        &[
            ("app.test", &[a.addr]),
            ("*.wild.test", &[b.addr]),
            ("empty.test", &[]),
        ],
        &format!(
            "[[http]]\ndomain = \"app.test\"\npath = \"/api\"\nbackends = [\"{}\"]\n",
            c.addr
        ),
    );
    let page = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(page.path(), "<h1>down for maintenance</h1>").unwrap();
    let r = RouterProc::start(&table, &["--error-503-page", page.path().to_str().unwrap()]);

    // Exact host, any case and with a port; longest path prefix on a segment boundary.
    assert_eq!(get(r.http, "app.test", "/").await.json()["backend"], "a");
    assert_eq!(
        get(r.http, "APP.test:80", "/x").await.json()["backend"],
        "a"
    );
    assert_eq!(get(r.http, "app.test", "/api").await.json()["backend"], "c");
    // A header the response's Connection names is hop-by-hop: never passed on.
    let hop = get(r.http, "app.test", "/hop").await;
    assert_eq!((hop.status, hop.header("x-kept")), (200, Some("yes")));
    assert_eq!(hop.header("x-hop"), None);
    assert_eq!(
        get(r.http, "app.test", "/api/v1?q=1").await.json()["backend"],
        "c"
    );
    assert_eq!(
        get(r.http, "app.test", "/apis").await.json()["backend"],
        "a"
    );
    // Wildcard.
    assert_eq!(
        get(r.http, "x.y.wild.test", "/").await.json()["backend"],
        "b"
    );
    // No route: 404 with a JSON body. No backend: 503 with the operator's page.
    let resp = get(r.http, "nowhere.test", "/").await;
    assert_eq!(resp.status, 404);
    assert!(resp.json()["error"].as_str().unwrap().contains("no route"));
    let resp = get(r.http, "empty.test", "/").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.text(), "<h1>down for maintenance</h1>");
    // Absolute-form target: routed by its authority, sent upstream in origin form.
    let resp = request(
        r.http,
        "GET http://app.test/api/z HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.json()["backend"], "c");
    assert_eq!(resp.json()["path"], "/api/z");

    // The added headers, and hop-by-hop headers stripped.
    let before = now_ms();
    let resp = request(
        r.http,
        "GET /h HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 198.51.100.9\r\nX-Forwarded-Proto: gopher\r\n\
         Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n",
    )
    .await;
    let h = &resp.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "198.51.100.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-port"], r.http.port().to_string());
    let start: u128 = h["x-request-start"].as_str().unwrap().parse().unwrap();
    assert!(
        start >= before && start <= now_ms(),
        "X-Request-Start {start}"
    );
    let id = h["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "generated id {id}");
    assert_eq!(h["x-kept"], "yes");
    for gone in ["x-secret", "keep-alive", "te"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h}");
    }
    // A client's request id is kept.
    let resp = request(
        r.http,
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: abc-123\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.json()["headers"]["x-request-id"], "abc-123");
    // Two requests, two different ids.
    let i1 = get(r.http, "app.test", "/").await.json()["headers"]["x-request-id"].clone();
    let i2 = get(r.http, "app.test", "/").await.json()["headers"]["x-request-id"].clone();
    assert_ne!(i1, i2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t11_keepalive_both_sides_and_pipelining() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--http", "127.0.0.1:0"],
    );
    let mut c = Client::connect(r.http).await;
    for i in 0..20 {
        c.send(format!("GET /seq/{i} HTTP/1.1\r\nHost: app.test\r\n\r\n"))
            .await;
        let resp = c
            .read(false)
            .await
            .expect("response on the kept-alive connection");
        assert_eq!(resp.json()["path"], format!("/seq/{i}"));
        assert!(resp.header("connection").is_none());
    }
    // One client connection, one worker: one backend connection carried all 20.
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "backend connections were not reused"
    );

    // Pipelined: three requests in one write, answered in order; the last closes.
    let mut p = Client::connect(r.http).await;
    p.send(
        "GET /p/1 HTTP/1.1\r\nHost: app.test\r\n\r\nPOST /p/2 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello\
         GET /p/3 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    for (i, len) in [(1, 0), (2, 5), (3, 0)] {
        let resp = p.read(false).await.expect("pipelined response");
        assert_eq!(resp.json()["path"], format!("/p/{i}"));
        assert_eq!(resp.json()["body_len"], len);
    }
    assert_eq!(
        p.read(false).await.map(|r| r.status),
        None,
        "closed after Connection: close"
    );

    // A route with backend keep-alive off: a new backend connection per request, each
    // told to close; the client's own connection still stays open.
    let b = Backend::start("b").await;
    r.reload(&format!(
        "{}[[http]]\ndomain = \"nokeep.test\"\nbackend_keepalive = false\nbackends = [\"{}\"]\n",
        routes(&[("app.test", &[a.addr])], ""),
        b.addr
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut k = Client::connect(r.http).await;
    for _ in 0..5 {
        k.send("GET / HTTP/1.1\r\nHost: nokeep.test\r\n\r\n").await;
        let resp = k.read(false).await.expect("client connection kept");
        assert_eq!(resp.json()["headers"]["connection"], "close");
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 5);
    // An extra listener serves the same routes.
    let extra = r.http_all.get(1).copied().expect("second --http listener");
    assert_eq!(get(extra, "app.test", "/").await.json()["backend"], "a");

    // HTTP/1.0 keeps alive only when asked.
    let mut old = Client::connect(r.http).await;
    old.send("GET / HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let resp = old.read(false).await.unwrap();
    assert_eq!(resp.header("connection"), Some("keep-alive"));
    old.send("GET / HTTP/1.0\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(old.read(false).await.unwrap().status, 200);
    assert!(old.closed(Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t12_bodies_stream_in_bounded_memory() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &[]);
    const GIB: u64 = 1 << 30;
    // The router's footprint serving small requests: what streaming may add to is measured
    // from here (the debug binary's own pages are most of it, and grow with the code).
    for _ in 0..8 {
        assert_eq!(get(r.http, "app.test", "/").await.status, 200);
    }
    let idle = r.peak_rss_kib();

    // 1 GiB upload with Content-Length, sent in 1 MiB writes.
    let mut c = Client::connect(r.http).await;
    c.send(format!(
        "PUT /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: {GIB}\r\n\r\n"
    ))
    .await;
    let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let piece_sum: u64 = piece.iter().map(|b| *b as u64).sum();
    for _ in 0..1024 {
        c.send(&piece).await;
    }
    let resp = c.read(false).await.unwrap();
    assert_eq!(resp.json()["body_len"], GIB);
    assert_eq!(resp.json()["body_sum"], piece_sum * 1024);

    // Chunked upload in uneven chunks.
    let mut c = Client::connect(r.http).await;
    c.send("POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let mut total = 0u64;
    for size in [1usize, 7, 4096, 65536, 3, 1 << 20] {
        let mut framed = format!("{size:x}\r\n").into_bytes();
        framed.extend(std::iter::repeat_n(b'z', size));
        framed.extend_from_slice(b"\r\n");
        c.send(framed).await;
        total += size as u64;
    }
    c.send("0\r\n\r\n").await;
    let resp = c.read(false).await.unwrap();
    assert_eq!(resp.json()["body_len"], total);
    assert_eq!(resp.json()["body_sum"], total * b'z' as u64);

    // 1 GiB download with Content-Length, counted as it arrives.
    let mut c = Client::connect(r.http).await;
    c.send(format!(
        "GET /bytes/{GIB} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    ))
    .await;
    // Every byte is checked against the backend's pattern (byte i of each 64 KiB piece is
    // i % 251): on io_uring the body moves in the ring's own buffers, never copied.
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut got, mut body) = (0u64, 0u64);
    let mut head = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use tokio::io::AsyncReadExt;
        let n = c.stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
        let mut data = &buf[..n];
        if !head.ends_with(b"\r\n\r\n") {
            let end = (0..data.len())
                .find(|&i| {
                    head.push(data[i]);
                    head.ends_with(b"\r\n\r\n")
                })
                .map_or(data.len(), |i| i + 1);
            data = &data[end..];
        }
        while !data.is_empty() {
            let at = (body % pattern.len() as u64) as usize;
            let k = data.len().min(pattern.len() - at);
            assert!(
                data[..k] == pattern[at..at + k],
                "body differs at byte {body}"
            );
            body += k as u64;
            data = &data[k..];
        }
    }
    assert_eq!(body, GIB, "downloaded {got} bytes (head included)");

    // A chunked response passes through re-chunked, whole.
    let resp = get(r.http, "app.test", "/chunked/300000").await;
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.body.len(), 300_000);
    // And to an HTTP/1.0 client, delimited by close instead.
    let resp = request(
        r.http,
        "GET /chunked/70000 HTTP/1.0\r\nHost: app.test\r\n\r\n",
    )
    .await;
    assert_eq!(resp.body.len(), 70_000);
    assert!(resp.header("transfer-encoding").is_none());

    // Memory stayed bounded: 2 GiB moved through the router, its peak grew by a few MiB.
    let rss = r.peak_rss_kib();
    assert!(
        rss.saturating_sub(idle) < 32 * 1024,
        "router peak RSS {rss} KiB, {idle} KiB before streaming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_expect_head_interim_and_bodiless_statuses() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &[]);
    let mut c = Client::connect(r.http).await;
    // 100-continue: the router answers 100 before the client sends its body.
    c.send(
        "POST /e HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = c.read(false).await.unwrap();
    assert_eq!(interim.status, 100);
    c.send("body").await;
    let resp = c.read(false).await.unwrap();
    assert_eq!(resp.json()["body_len"], 4);
    assert!(resp.json()["headers"].get("expect").is_none());
    // ... but a 404 comes without asking for the body.
    c.send("POST /e HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").await;
    assert_eq!(c.read(false).await.unwrap().status, 404);

    // HEAD: the length header, no body, and the connection is still usable.
    let mut c = Client::connect(r.http).await;
    c.send("HEAD /bytes/5000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await;
    let resp = c.read(true).await.unwrap();
    assert_eq!(resp.header("content-length"), Some("5000"));
    for code in [204, 304] {
        c.send(format!(
            "GET /status/{code} HTTP/1.1\r\nHost: app.test\r\n\r\n"
        ))
        .await;
        assert_eq!(c.read(false).await.unwrap().status, code);
    }
    // A 103 is passed on before the final response.
    c.send("GET /interim HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await;
    let early = c.read(false).await.unwrap();
    assert_eq!(early.status, 103);
    assert_eq!(early.header("link"), Some("</x>"));
    assert_eq!(c.read(false).await.unwrap().status, 200);
    // A close-delimited response reaches the client whole, and the router closes.
    c.send("GET /close HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await;
    let resp = c.read(false).await.unwrap();
    assert_eq!(resp.text(), "closed-body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t14_websocket_upgrade_is_spliced() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &[]);
    let mut c = Client::connect(r.http).await;
    c.send(
        "GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let resp = c.read(true).await.unwrap();
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for word in ["hello", "frames", "both-ways"] {
        c.stream.write_all(word.as_bytes()).await.unwrap();
        let mut got = vec![0u8; word.len()];
        c.stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, word.to_ascii_uppercase().as_bytes());
    }
    // Half-close: the client's end of stream reaches the backend, whose reply still arrives.
    c.stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"BYE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t15_hostile_input_is_refused_cleanly() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &[
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--idle-timeout",
            "1",
        ],
    );
    let long = "a".repeat(9000);
    let many: String = (0..200)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(400)))
        .collect();
    let cases: Vec<(String, u16)> = vec![
        (format!("GET /{long} HTTP/1.1\r\nHost: app.test\r\n\r\n"), 414),
        (format!("GET / HTTP/1.1\r\nHost: app.test\r\n{many}\r\n"), 431),
        ("GARBAGE\r\n\r\n".into(), 400),
        ("GET / HTTP/1.1\r\n\r\n".into(), 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), 400),
        ("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400),
        ("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(), 400),
        ("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: -1\r\n\r\n".into(), 400),
        ("POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 501),
        ("GET / HTTP/1.1\r\nHost: app.test\r\nX-Folded: a\r\n b\r\n\r\n".into(), 400),
        ("GET / HTTP/1.1\r\nHost: app.test\rX: y\r\n\r\n".into(), 400),
        ("POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(), 400),
    ];
    for (raw, status) in &cases {
        let mut c = Client::connect(r.http).await;
        c.send(raw).await;
        let resp = c
            .read(false)
            .await
            .unwrap_or_else(|| panic!("no answer to {raw:?}"));
        assert_eq!(resp.status, *status, "for {:?}", &raw[..raw.len().min(80)]);
        assert!(resp.json()["error"].is_string());
        assert!(
            c.closed(Duration::from_secs(3)).await,
            "connection left open after {status}"
        );
    }
    // Slow clients: a head that never completes, and a body that stops.
    let mut c = Client::connect(r.http).await;
    c.send("GET / HTTP/1.1\r\nHost: app.te").await;
    assert_eq!(c.read(false).await.unwrap().status, 408);
    let mut c = Client::connect(r.http).await;
    c.send("POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\nonly-part")
        .await;
    assert_eq!(c.read(false).await.unwrap().status, 408);
    // A keep-alive connection left idle is closed silently at the idle timeout.
    let mut c = Client::connect(r.http).await;
    c.send("GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(c.read(false).await.unwrap().status, 200);
    let idle_since = Instant::now();
    assert!(
        c.closed(Duration::from_secs(5)).await,
        "idle connection not closed"
    );
    assert!(
        idle_since.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout"
    );
    // The router is unharmed.
    assert_eq!(get(r.http, "app.test", "/").await.status, 200);
    assert!(r.log().contains("http listener"), "router still running");

    // The connection limit.
    let limited = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--max-connections", "2"],
    );
    let mut held = vec![
        Client::connect(limited.http).await,
        Client::connect(limited.http).await,
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = Client::connect(limited.http).await;
    assert!(
        third.closed(Duration::from_secs(2)).await,
        "third connection not refused"
    );
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(limited.http, "app.test", "/").await.status, 200);
    flynn_tests::eventually(Duration::from_secs(5), "refusal counted", || async {
        (limited
            .metric("flynn_router_refused_connections_total", &[])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t16_connect_failure_and_backend_death() {
    let dead = flynn_tests::router::free_port();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dead_addr: std::net::SocketAddr = format!("127.0.0.1:{dead}").parse().unwrap();
    let r = RouterProc::start(
        &routes(
            &[
                ("app.test", &[dead_addr, a.addr]),
                ("two.test", &[a.addr, b.addr]),
            ],
            "",
        ),
        &[],
    );
    // A refused connect moves on to the other backend: every request succeeds.
    for _ in 0..30 {
        assert_eq!(get(r.http, "app.test", "/").await.json()["backend"], "a");
    }
    flynn_tests::eventually(Duration::from_secs(5), "connect errors counted", || async {
        (r.metric("flynn_router_backend_connect_errors_total", &[])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;

    // Backend death under load: 8 clients in keep-alive loops, half sending GETs (which
    // the router may replay), half POSTs (which it must not); b dies mid-run. GETs never
    // fail; a POST fails only if it was in flight on b at that moment (one per client).
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = r.http;
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let mut c = Client::connect(addr).await;
            while Instant::now() < stop_at {
                c.send(format!(
                    "{method} /slow/5 HTTP/1.1\r\nHost: two.test\r\nContent-Length: 0\r\n\r\n"
                ))
                .await;
                match c.read(false).await {
                    Some(r) if r.status == 200 => ok += 1,
                    Some(_) | None => {
                        failed += 1;
                        c = Client::connect(addr).await;
                    }
                }
            }
            (method, ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let b_before = b.requests.load(Ordering::SeqCst);
    b.kill(); // its listener and every open connection, mid-request or not
    let mut failed_posts = 0;
    let mut total_ok = 0;
    for t in tasks {
        let (method, ok, failed) = t.await.unwrap();
        total_ok += ok;
        match method {
            "GET" => assert_eq!(failed, 0, "a GET failed although it could be replayed"),
            _ => assert!(failed <= 1, "a POST client saw {failed} failures"),
        }
        failed_posts += failed;
    }
    assert!(b_before > 0, "b never got traffic");
    assert!(total_ok > 100, "only {total_ok} requests succeeded");
    eprintln!("backend death: {total_ok} ok, {failed_posts} POSTs failed (in flight on b)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t17_sticky_sessions_and_balance() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let table = format!(
        "[[http]]\ndomain = \"sticky.test\"\nsticky = true\nbackends = [\"{}\", \"{}\"]\n\n{}",
        a.addr,
        b.addr,
        routes(&[("plain.test", &[a.addr, b.addr])], "")
    );
    let r = RouterProc::start(&table, &[]);
    // Without a cookie, both backends get traffic.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(
            get(r.http, "plain.test", "/").await.json()["backend"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2, "balancing used one backend only");
    // The first sticky response sets the cookie; with it, every request hits that backend.
    let first = get(r.http, "sticky.test", "/").await;
    let cookie = first
        .header("set-cookie")
        .expect("sticky cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("_flynn_backend="));
    let pinned = first.json()["backend"].as_str().unwrap().to_string();
    for _ in 0..30 {
        let resp = request(
            r.http,
            &format!("GET / HTTP/1.1\r\nHost: sticky.test\r\nCookie: theme=dark; {cookie}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(resp.json()["backend"], pinned.as_str());
        assert!(
            resp.header("set-cookie").is_none(),
            "cookie re-set although it was honoured"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t18_route_changes_under_load_fail_nothing() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &[]);
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = r.http;
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            let mut c = Client::connect(addr).await;
            while Instant::now() < stop_at {
                c.send("GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
                let resp = c
                    .read(false)
                    .await
                    .expect("connection dropped during a reload");
                assert_eq!(resp.status, 200, "failed during a reload: {}", resp.text());
                n += 1;
            }
            n
        }));
    }
    let sets: [&[std::net::SocketAddr]; 4] =
        [&[a.addr, b.addr], &[b.addr], &[b.addr, c.addr], &[c.addr]];
    for (i, set) in sets.iter().cycle().take(12).enumerate() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let extra = if i % 2 == 0 {
            "[[http]]\ndomain = \"other.test\"\nbackends = []\n"
        } else {
            ""
        };
        r.reload(&routes(&[("app.test", set)], extra));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 100, "{total} requests");
    // The last table (only c) is the one in force.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(r.http, "app.test", "/").await.json()["backend"], "c");
    // A broken file keeps the routes that work.
    r.reload("[[http]]\ndomain = ");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(r.http, "app.test", "/").await.json()["backend"], "c");
    assert!(r.log().contains("routes not reloaded"));
    // Removing a route: its in-flight request finishes; new requests get 404.
    let slow = tokio::spawn({
        let addr = r.http;
        async move { get(addr, "app.test", "/slow/800").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.reload(&routes(&[("else.test", &[a.addr])], ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(r.http, "app.test", "/").await.status, 404);
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "in-flight request on a removed route was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t19_sigterm_drains() {
    let a = Backend::start("a").await;
    let mut r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--drain-timeout", "10"],
    );
    let mut idle = Client::connect(r.http).await;
    idle.send("GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(idle.read(false).await.unwrap().status, 200);
    let slow = tokio::spawn({
        let addr = r.http;
        async move {
            let mut c = Client::connect(addr).await;
            c.send("GET /slow/1500 HTTP/1.1\r\nHost: app.test\r\n\r\n")
                .await;
            c.read(false).await
        }
    });
    // A connection accepted before the drain whose request has not arrived yet (in
    // flight, or queued in the socket): it is answered, never reset.
    let mut fresh = Client::connect(r.http).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    fresh.send("GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    let resp = fresh
        .read(false)
        .await
        .expect("a connection accepted before the drain was cut");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    // Idle keep-alive connections are closed at once; new connections are refused.
    assert!(
        idle.closed(Duration::from_secs(2)).await,
        "idle connection kept open while draining"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(r.http).await.is_err(),
        "still accepting after SIGTERM"
    );
    // The in-flight request completes, marked as the connection's last.
    let resp = slow
        .await
        .unwrap()
        .expect("in-flight request cut by the drain");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(
        r.wait_exit(Duration::from_secs(10)),
        Some(true),
        "router did not exit cleanly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t21_tcp_routes_with_half_close() {
    let a = Backend::start("a").await;
    let port = flynn_tests::router::free_port();
    let tcp = format!("[[tcp]]\nport = {port}\nbackends = [\"{}\"]\n", a.addr);
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--tcp-ip", "127.0.0.1"],
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "port open before the route"
    );
    r.reload(&routes(&[("app.test", &[a.addr])], &tcp));
    let mut s = flynn_tests::eventually(Duration::from_secs(5), "tcp route listener", || async {
        tokio::net::TcpStream::connect(addr).await.ok()
    })
    .await;
    // The backend speaks HTTP; the TCP route carries bytes, so a WebSocket-style exchange
    // shows both directions and the half-close.
    // An open TCP-route connection counts (for the connection limit and the drain).
    // (The router accepts asynchronously: the count follows the client's connect.)
    flynn_tests::eventually(Duration::from_secs(5), "tcp connection counted", || async {
        (r.metric("flynn_router_open_connections", &[]).await == 1.0).then_some(())
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\nabc")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("ABCBYE"), "{text}");

    // A bulk flow (past the copy phase, so spliced) to an echo backend: 4 MiB there and
    // back while both directions run, every byte in order, and counted as spliced.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let bulk_port = flynn_tests::router::free_port();
    let both = format!("{tcp}[[tcp]]\nport = {bulk_port}\nbackends = [\"{echo_addr}\"]\n");
    r.reload(&routes(&[("app.test", &[a.addr])], &both));
    let bulk_addr: std::net::SocketAddr = format!("127.0.0.1:{bulk_port}").parse().unwrap();
    let bulk = flynn_tests::eventually(Duration::from_secs(5), "bulk tcp route", || async {
        tokio::net::TcpStream::connect(bulk_addr).await.ok()
    })
    .await;
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let (mut br, mut bw) = bulk.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        bw.write_all(&sent).await.unwrap();
        bw.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    br.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(
        back == data,
        "the echoed bytes differ ({} of {})",
        back.len(),
        data.len()
    );
    flynn_tests::eventually(
        Duration::from_secs(5),
        "spliced connection counted",
        || async {
            (r.metric("flynn_router_tcp_spliced_connections_total", &[])
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;

    // Removing the route closes the port.
    r.reload(&routes(&[("app.test", &[a.addr])], ""));
    flynn_tests::eventually(Duration::from_secs(5), "tcp route port closed", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t22_metrics() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &[]);
    for _ in 0..10 {
        assert_eq!(get(r.http, "app.test", "/").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(r.http, "none.test", "/").await.status, 404);
    }
    // Workers publish once a second.
    let ok = flynn_tests::eventually(Duration::from_secs(5), "metrics published", || async {
        let n = r
            .metric(
                "flynn_router_requests_total",
                &["route=\"http-0\"", "class=\"2xx\""],
            )
            .await;
        (n >= 10.0).then_some(n)
    })
    .await;
    assert_eq!(ok, 10.0);
    assert_eq!(
        r.metric(
            "flynn_router_requests_total",
            &["route=\"\"", "class=\"4xx\""]
        )
        .await,
        3.0
    );
    assert_eq!(
        r.metric("flynn_router_request_duration_seconds_count", &[])
            .await,
        13.0
    );
    assert!(r.metric("flynn_router_bytes_sent_total", &[]).await > 0.0);
    let text = r.metrics_text().await;
    assert!(text.contains("# TYPE flynn_router_open_connections gauge"));
    assert!(text.contains("flynn_router_request_duration_seconds_bucket{le=\"+Inf\"} 13"));
    // The backend in use: what FLYNN_ROUTER_IO asked for (CI runs this suite under both),
    // io_uring by default on this machine.
    let want = match std::env::var("FLYNN_ROUTER_IO").as_deref() {
        Ok("epoll") => "epoll",
        _ => "uring",
    };
    let other = if want == "uring" { "epoll" } else { "uring" };
    assert_eq!(
        r.metric("flynn_router_io_backend", &[&format!("backend=\"{want}\"")])
            .await,
        1.0
    );
    assert_eq!(
        r.metric(
            "flynn_router_io_backend",
            &[&format!("backend=\"{other}\"")]
        )
        .await,
        0.0
    );
    if want == "uring" {
        assert!(r.metric("flynn_router_uring_completions_total", &[]).await > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t23_proxy_protocol_v1() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--proxy-protocol"],
    );
    let resp = request(
        r.http,
        "PROXY TCP4 203.0.113.7 192.0.2.1 56324 80\r\nGET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.json()["headers"]["x-forwarded-for"], "203.0.113.7");
    // Without the PROXY line the connection is not from the load balancer: closed.
    let mut c = Client::connect(r.http).await;
    c.send("GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(c.read(false).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t24_io_auto_falls_back_to_epoll_where_io_uring_is_blocked() {
    let a = Backend::start("a").await;
    let routes = routes(&[("app.test", &[a.addr])], "");
    // A seccomp filter refuses io_uring_setup, as Docker's default profile does.
    let r = RouterProc::start_without_io_uring(&routes, &["--io", "auto"]);
    for _ in 0..5 {
        assert_eq!(get(r.http, "app.test", "/").await.status, 200);
    }
    let log = r.log();
    let line: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("io_uring not chosen"))
        .collect();
    assert_eq!(line.len(), 1, "one line names the fallback:\n{log}");
    assert!(
        line[0].contains("Operation not permitted"),
        "the line names the reason: {}",
        line[0]
    );
    assert_eq!(
        r.metric("flynn_router_io_backend", &["backend=\"epoll\""])
            .await,
        1.0
    );
    // Asked for io_uring outright, the router refuses to start, saying why in one line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, &routes).unwrap();
    let mut cmd = std::process::Command::new(flynn_tests::bin_dir().join("flynn-host"));
    cmd.args(["router", "--routes"]).arg(&file).args([
        "--http",
        "127.0.0.1:0",
        "--io",
        "uring",
        "--no-pin",
    ]);
    flynn_tests::router::deny_io_uring(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("--io uring") && last.contains("Operation not permitted"),
        "stderr: {err}"
    );
}

/// A backend whose host is wedged (its kernel accepts, nothing answers) costs each of the
/// two workers one timed-out request (504); then picks pass it over, and the requests after
/// go to the live backend. Without that, about half of them would wait out the timeout. The
/// ejection is counted, and a route whose only backend is ejected still tries it (a guess
/// never fails a route closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t25_a_silent_backend_is_passed_over_after_it_times_out() {
    let a = Backend::start("a").await;
    // Wedged hosts: their kernel accepts, nothing ever answers.
    let wedged = || {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in silent.incoming().flatten() {
                held.push(c);
            }
        });
        addr
    };
    let (silent_addr, other_silent) = (wedged(), wedged());
    // `quick.test` has a response timeout of its own, far below the router's.
    let quick = format!(
        "[[http]]\ndomain = \"quick.test\"\nbackends = [\"{a}\", \"{other_silent}\"]\nresponse_timeout_ms = 300\n",
        a = a.addr
    );
    let table = routes(
        &[
            ("app.test", &[a.addr, silent_addr]),
            ("only-silent.test", &[silent_addr]),
        ],
        &quick,
    );
    let r = RouterProc::start(&table, &["--upstream-timeout", "1"]);
    // A GET that meets the silence waits it out once, then goes to the other backend; the
    // silent one is passed over after that.
    let mut waited = 0;
    for _ in 0..40 {
        let t = Instant::now();
        assert_eq!(get(r.http, "app.test", "/").await.status, 200);
        if t.elapsed() > Duration::from_millis(900) {
            waited += 1;
        }
    }
    assert!(
        (1..=2).contains(&waited),
        "{waited} of 40 requests waited out the silent backend"
    );
    let ejections =
        flynn_tests::eventually(Duration::from_secs(5), "ejections counted", || async {
            let n = r.metric("flynn_router_backend_ejections_total", &[]).await;
            (n >= 1.0).then_some(n)
        })
        .await;
    assert!(ejections <= 2.0, "{ejections}");
    assert_eq!(
        get(r.http, "only-silent.test", "/").await.status,
        504,
        "an ejected only backend is still tried"
    );
    // The route's own timeout: 300 ms, not the router's second.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(r.http, "quick.test", "/").await.status, 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest > Duration::from_millis(250) && slowest < Duration::from_millis(800),
        "the slowest of 20 took {slowest:?}: it should have met the silence once"
    );
    // A request with a body is never sent twice: the silence is its answer.
    let post = "POST / HTTP/1.1\r\nHost: only-silent.test\r\nContent-Length: 2\r\n\r\nhi";
    assert_eq!(request(r.http, post).await.status, 504);
}

/// One client, one keep-alive connection, 200 requests one after another: each answer comes
/// when the backend's does, not when something else wakes the worker. The io_uring backend
/// once waited about 30 ms per request (its ring woke the worker late); at that rate this
/// takes 6 s. The bound is generous against a loaded machine and still catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t26_sequential_requests_on_one_connection_are_not_stalled() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--http", "127.0.0.1:0"],
    );
    let mut c = Client::connect(r.http).await;
    // One first, so the backend connection is open before the clock starts.
    c.send("GET /warm HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(c.read(false).await.expect("first response").status, 200);
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let t = Instant::now();
        c.send(format!("GET /seq/{i} HTTP/1.1\r\nHost: app.test\r\n\r\n"))
            .await;
        let resp = c
            .read(false)
            .await
            .expect("response on the kept-alive connection");
        assert_eq!(resp.json()["path"], format!("/seq/{i}"));
        worst = worst.max(t.elapsed());
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "200 sequential requests took {took:?} (worst {worst:?}) through the router"
    );
}

/// A backend host that vanishes (its packets dropped, nothing refused) costs no request:
/// connects to it time out in the router's short connect timeout and the request goes to
/// another backend; pooled connections to it fail once the kernel gives up on unacknowledged
/// data, and replay elsewhere. Three hosts in network namespaces, four clients in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t27_a_vanished_backend_host_fails_no_request() {
    let hosts: Vec<NetHost> = (0..3).map(NetHost::new).collect();
    let backends: Vec<Backend> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Backend::serve(&format!("b{i}"), h.listen()))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let r = RouterProc::start(
        &routes(&[("app.test", &addrs)], ""),
        &["--connect-timeout-ms", "300"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, http) = (stop.clone(), r.http);
            tokio::spawn(async move {
                let (mut ok, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
                let mut seen = std::collections::BTreeMap::<String, u32>::new();
                let mut c = Client::connect(http).await;
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    c.send("GET /who HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
                    match tokio::time::timeout(Duration::from_secs(3), c.read(false)).await {
                        Ok(Some(resp)) if resp.status == 200 => {
                            ok += 1;
                            *seen
                                .entry(resp.json()["backend"].as_str().unwrap_or("").to_string())
                                .or_default() += 1;
                        }
                        other => {
                            failed.push(format!("{:?}", other.map(|r| r.map(|r| r.status))));
                            c = Client::connect(http).await;
                        }
                    }
                    slowest = slowest.max(t.elapsed());
                }
                (ok, failed, slowest, seen)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let connect_errors_before = r
        .metric("flynn_router_backend_connect_errors_total", &[])
        .await;
    hosts[0].blackhole();
    let vanished = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut total, mut seen_all) = (0, std::collections::BTreeMap::<String, u32>::new());
    for c in clients {
        let (ok, failed, slowest, seen) = c.await.unwrap();
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        // At worst one connect timeout, or one kernel give-up on a pooled connection (1 s),
        // before the request went elsewhere.
        assert!(
            slowest < Duration::from_millis(2500),
            "a request took {slowest:?}"
        );
        total += ok;
        for (k, v) in seen {
            *seen_all.entry(k).or_default() += v;
        }
    }
    assert!(total > 200, "only {total} requests in 6.5 s");
    assert!(
        seen_all.len() == 3,
        "every backend answered before: {seen_all:?}"
    );
    // The vanished host was passed over after its first failures on each worker: connect
    // attempts to it stayed few, not one per request.
    let connect_errors = r
        .metric("flynn_router_backend_connect_errors_total", &[])
        .await
        - connect_errors_before;
    assert!(
        connect_errors <= 8.0,
        "{connect_errors} connects timed out in {:?}",
        vanished.elapsed()
    );
    assert!(r.metric("flynn_router_backend_ejections_total", &[]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_router_follows_the_cluster() {
    use flynn_client::{InstanceRegistration, RouteRequest};
    let mut c = flynn_tests::Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    let api = c.client(0);
    api.create_app("web").await.unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let r = RouterProc::follow(&c.hosts[0].url(), &c.key, &[]);
    let route = |domain: &str, leader: bool| RouteRequest::Http {
        domain: domain.into(),
        path: None,
        service: Some("web-svc".into()),
        sticky: false,
        leader,
        disable_keepalive: false,
        no_drain_backends: false,
        certificate: None,
        https_redirect: false,
        response_timeout_ms: None,
    };
    let register = |id: &'static str, addr: std::net::SocketAddr| {
        let api = api.clone();
        async move {
            let reg = InstanceRegistration {
                addr: addr.to_string(),
                ttl_ms: 60_000,
                meta: Default::default(),
            };
            api.register_instance("web-svc", id, &reg).await.unwrap();
        }
    };
    // A route without instances answers 503; with one, it serves.
    let web = api
        .add_route("web", &route("web.example.com", false))
        .await
        .unwrap();
    flynn_tests::eventually(
        Duration::from_secs(10),
        "503 before any instance",
        || async { (get(r.http, "web.example.com", "/").await.status == 503).then_some(()) },
    )
    .await;
    register("i1", a.addr).await;
    flynn_tests::eventually(
        Duration::from_secs(10),
        "route to the first instance",
        || async {
            let resp = get(r.http, "web.example.com", "/").await;
            (resp.status == 200 && resp.json()["backend"] == "a").then_some(())
        },
    )
    .await;
    // A second instance joins the rotation; a leader route keeps to the first (the leader).
    register("i2", b.addr).await;
    api.add_route("web", &route("leader.example.com", true))
        .await
        .unwrap();
    flynn_tests::eventually(
        Duration::from_secs(10),
        "both instances in rotation",
        || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..20 {
                seen.insert(
                    get(r.http, "web.example.com", "/").await.json()["backend"].to_string(),
                );
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;
    flynn_tests::eventually(Duration::from_secs(10), "leader route", || async {
        (get(r.http, "leader.example.com", "/").await.status == 200).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            get(r.http, "leader.example.com", "/").await.json()["backend"],
            "a"
        );
    }
    // Removing the route takes it out of the router.
    api.remove_route("web", web.id()).await.unwrap();
    flynn_tests::eventually(Duration::from_secs(10), "route removed", || async {
        (get(r.http, "web.example.com", "/").await.status == 404).then_some(())
    })
    .await;
}

/// Every request body is counted in its access line, even when the backend's response is
/// ready as soon as the body's last write completes (the two race in the router; on epoll
/// the write completes before the backend has read it, and the response could be taken
/// first, logging `bytes_in=0`: router_tls t21 caught it once).
#[tokio::test(flavor = "multi_thread")]
async fn t31_every_request_body_is_counted_however_fast_the_answer() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(&routes(&[("app.test", &[a.addr])], ""), &["--access-log"]);
    let mut c = Client::connect(r.http).await;
    let body = "b".repeat(3000);
    const N: usize = 300;
    for _ in 0..N {
        c.send(&format!(
            "POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        assert_eq!(c.read(false).await.expect("answered").status, 200);
    }
    let lines = flynn_tests::eventually(Duration::from_secs(5), "every access line", || async {
        let lines: Vec<String> = r
            .log()
            .lines()
            .filter(|l| l.contains("flynn_router::access"))
            .map(String::from)
            .collect();
        (lines.len() >= N).then_some(lines)
    })
    .await;
    let uncounted: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains(" bytes_in=3000 "))
        .collect();
    assert!(
        uncounted.is_empty(),
        "{} of {N}: {uncounted:?}",
        uncounted.len()
    );
}
