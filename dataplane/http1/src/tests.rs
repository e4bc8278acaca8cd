use super::*;

fn parse(raw: &str) -> Result<Option<(RequestHead, usize)>, Http1Error> {
    parse_request(raw.as_bytes(), &Limits::default())
}

fn head(raw: &str) -> RequestHead {
    parse(raw).expect("parses").expect("complete").0
}

fn status(raw: &str) -> u16 {
    match parse(raw) {
        Err(e) => e.status(),
        Ok(Some((h, _))) => h.framing().err().map_or(200, |e| e.status()),
        Ok(None) => 0,
    }
}

#[test]
fn t10_a_plain_request_and_its_length() {
    let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x.com\r\nContent-Length: 5\r\n\r\nhello";
    let (h, n) = parse(raw).unwrap().unwrap();
    assert_eq!(
        (h.method.as_str(), h.target.as_str(), h.minor_version),
        ("GET", "/a?b=1", 1)
    );
    assert_eq!(&raw[n..], "hello");
    assert_eq!(h.framing(), Ok(BodyFraming::Length(5)));
    assert!(h.keep_alive());
    // Incomplete: ask for more.
    assert_eq!(parse("GET / HTTP/1.1\r\nHost: x"), Ok(None));
}

#[test]
fn t20_smuggling_shapes_are_refused() {
    let cases = [
        // both framings
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        // conflicting lengths, in two headers and in one list
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 5\r\n\r\n",
        // signs, spaces inside, hex, overflow
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4 4\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        // TE in HTTP/1.0
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        // obs-fold and bare CR
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\rX-A: a\r\n\r\n",
        // no or two Host headers
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        // broken request lines
        "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        "G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for raw in cases {
        assert_eq!(status(raw), 400, "{raw:?}");
    }
    // Codings other than a single chunked are not framed by: 501.
    for te in ["gzip", "chunked, chunked", "gzip, chunked", "chunked, gzip"] {
        let raw = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n");
        assert_eq!(status(&raw), 501, "{te}");
    }
    // Equal repeated lengths are one length.
    let h = head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n");
    assert_eq!(h.framing(), Ok(BodyFraming::Length(4)));
    let h = head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(h.framing(), Ok(BodyFraming::Chunked));
}

#[test]
fn t30_limits_give_414_and_431_even_before_the_head_ends() {
    let limits = Limits::default();
    let long_line = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(limits.max_request_line)
    );
    assert_eq!(status(&long_line), 414);
    // A request line still arriving but already too long.
    let partial = format!("GET /{}", "a".repeat(limits.max_request_line + 1));
    assert_eq!(parse(&partial).unwrap_err().status(), 414);
    let many = format!(
        "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    assert_eq!(status(&many), 431);
    // Headers still arriving but already over the head limit.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "v".repeat(limits.max_head)
    );
    assert_eq!(parse(&big).unwrap_err().status(), 431);
}

#[test]
fn t40_hop_by_hop_headers_are_stripped() {
    let mut h = head(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\nKeep-Alive: 5\r\nX-Private: s\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Keep: k\r\n\r\n",
    );
    assert!(!h.keep_alive());
    h.strip_hop_by_hop();
    let names: Vec<&str> = h.headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, vec!["Host", "X-Keep"]);
    // A WebSocket upgrade keeps Upgrade (the router splices it) but not Connection.
    let mut ws =
        head("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    ws.strip_hop_by_hop();
    assert!(ws.header("upgrade").is_some() && ws.header("connection").is_none());
    // HTTP/1.0 closes unless asked to keep alive.
    assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
    assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
    assert!(head("PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n").expects_continue());
}

fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), Http1Error> {
    let mut d = ChunkedDecoder::new();
    let mut out = Vec::new();
    let r = d.decode(input, &mut out)?;
    assert!(r.done, "message incomplete");
    Ok((out, r.consumed))
}

#[test]
fn t50_chunked_bodies_decode_at_any_split_and_stop_at_the_end() {
    let msg =
        b"5;ext=1\r\nhello\r\nB\r\n, chunked w\r\n4\r\norld\r\n0\r\nX-Trailer: t\r\n\r\nGET /next";
    let body_end = msg.len() - b"GET /next".len();
    let (body, consumed) = decode_all(msg).expect("decodes");
    assert_eq!(body, b"hello, chunked world".to_vec());
    assert_eq!(consumed, body_end, "the pipelined request is left alone");
    // Fed in two pieces split at every offset, the result is the same.
    for split in 0..body_end {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let a = d.decode(&msg[..split], &mut out).unwrap();
        assert_eq!(a.consumed, split);
        let b = d.decode(&msg[split..], &mut out).unwrap();
        assert!(b.done);
        assert_eq!(split + b.consumed, body_end, "split {split}");
        assert_eq!(out, body, "split {split}");
    }
}

#[test]
fn t60_bad_chunks_are_refused() {
    for bad in [
        &b"x\r\n"[..],               // not hex
        b" 5\r\nhello\r\n0\r\n\r\n", // leading space
        b"5 \r\nhello\r\n0\r\n\r\n", // junk after size
        b"5\nhello\r\n0\r\n\r\n",    // bare LF
        b"5\r\nhelloX\r\n0\r\n\r\n", // data longer than its size
        b"11111111111111111\r\n",    // 17 hex digits
        b"FFFFFFFFFFFFFFFF0\r\n",    // overflow
        b"0\r\nX: y\n\r\n",          // bare LF in trailers
        b"0\r\n\rX",                 // not ended by CRLF
    ] {
        let r = decode_all(bad);
        assert!(
            matches!(r, Err(Http1Error::BadChunk(_))),
            "{:?}: {r:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(5000));
    assert!(decode_all(long_ext.as_bytes()).is_err());
    let huge_trailers = format!("0\r\n{}\r\n\r\n", "X: y\r\n".repeat(5000));
    assert!(decode_all(huge_trailers.as_bytes()).is_err());
}
