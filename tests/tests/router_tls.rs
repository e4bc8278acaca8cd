//! HTTPS and HTTP/2 through the router: certificates chosen by SNI (exact, wildcard,
//! default), TLS 1.2 and 1.3, session resumption, ALPN h2 with concurrent streams, h2c,
//! the redirect to HTTPS, and GOAWAY on drain. Clients are rustls and the h2 crate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flynn_tests::router::{get, routes, Backend, RouterProc};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Accepts any certificate and records the one presented, so the test can check which
/// certificate the router chose.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let p = rustls::crypto::ring::default_provider();
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &p.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let p = rustls::crypto::ring::default_provider();
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &p.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(
    recorder: Arc<Recorder>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(recorder)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

struct Cert {
    pem: String,
    key: String,
    der: Vec<u8>,
}

fn cert(names: &[&str]) -> Cert {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    Cert {
        pem: c.cert.pem(),
        key: c.signing_key.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

async fn tls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake for {sni}: {e}"))
}

/// One HTTP/1.1 request over any stream; the whole response as text.
async fn h1_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
) -> String {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn h2_get(
    send: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Vec<u8>) {
    let req = http::Request::builder()
        .method(if body.is_some() { "POST" } else { "GET" })
        .uri(format!("https://{authority}{path}"))
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (resp, mut stream) = send.send_request(req, body.is_none()).unwrap();
    if let Some(b) = body {
        stream.send_data(Bytes::from(b), true).unwrap();
    }
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_https_sni_resumption_h2_and_redirect() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let default = cert(&["default.test"]);
    let exact = cert(&["secure.test"]);
    let wild = cert(&["*.wild.test"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, c) in [("default", &default), ("exact", &exact), ("wild", &wild)] {
        std::fs::write(dir.path().join(format!("{name}.crt")), &c.pem).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), &c.key).unwrap();
    }
    let p = |f: &str| dir.path().join(f).display().to_string();
    let table = format!(
        "{}[[http]]\ndomain = \"app.test\"\nhttps_redirect = true\nbackends = [\"{}\"]\n\n\
         [[certificate]]\nid = \"exact\"\ndomains = [\"secure.test\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n\
         [[certificate]]\nid = \"wild\"\ndomains = [\"*.wild.test\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        routes(&[("secure.test", &[a.addr]), ("*.wild.test", &[b.addr])], ""),
        a.addr,
        p("exact.crt"),
        p("exact.key"),
        p("wild.crt"),
        p("wild.key"),
    );
    let mut r = RouterProc::start(
        &table,
        &[
            "--https",
            "127.0.0.1:0",
            "--tls-cert",
            &p("default.crt"),
            "--tls-key",
            &p("default.key"),
            "--h2c",
        ],
    );
    let https = r.https.expect("https listener");
    let all = [&rustls::version::TLS13, &rustls::version::TLS12];

    // SNI picks the certificate: exact, wildcard, else the default.
    for (sni, want, backend) in [
        ("secure.test", &exact, Some("a")),
        ("x.wild.test", &wild, Some("b")),
        ("other.test", &default, None),
    ] {
        let rec = Arc::new(Recorder::default());
        let mut s = tls(https, client_config(rec.clone(), &all, &[b"http/1.1"]), sni).await;
        assert_eq!(
            rec.seen.lock().unwrap().as_deref(),
            Some(want.der.as_slice()),
            "certificate for {sni}"
        );
        let text = h1_over(&mut s, sni, "/").await;
        match backend {
            Some(name) => {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                assert!(text.contains(&format!("\"backend\":\"{name}\"")), "{text}");
                assert!(text.contains("\"x-forwarded-proto\":\"https\""), "{text}");
                assert!(
                    text.contains(&format!("\"x-forwarded-port\":\"{}\"", https.port())),
                    "{text}"
                );
            }
            None => assert!(text.starts_with("HTTP/1.1 404"), "{text}"),
        }
    }

    // TLS 1.2 and 1.3 both work; resumption works on each.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let cfg = client_config(Arc::new(Recorder::default()), &[version], &[b"http/1.1"]);
        let mut first = tls(https, cfg.clone(), "secure.test").await;
        assert_eq!(first.get_ref().1.protocol_version(), Some(version.version));
        assert!(h1_over(&mut first, "secure.test", "/")
            .await
            .starts_with("HTTP/1.1 200"));
        let second = tls(https, cfg, "secure.test").await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{:?} session not resumed",
            version.version
        );
    }
    // HTTP/2 by ALPN: concurrent streams, a request body, to HTTP/1.1 backends.
    let s = tls(
        https,
        client_config(Arc::new(Recorder::default()), &all, &[b"h2"]),
        "secure.test",
    )
    .await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut send = send.clone();
        streams.push(tokio::spawn(async move {
            h2_get(&mut send, "secure.test", &format!("/s/{i}"), None).await
        }));
    }
    for (i, s) in streams.into_iter().enumerate() {
        let (status, body) = s.await.unwrap();
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["path"], format!("/s/{i}"));
        assert_eq!(v["headers"]["host"], "secure.test");
    }
    let mut send2 = send.clone();
    let (status, body) = h2_get(&mut send2, "secure.test", "/up", Some(vec![b'q'; 300_000])).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body_len"], 300_000);
    let (status, body) = h2_get(&mut send2, "secure.test", "/chunked/500000", None).await;
    assert_eq!((status, body.len()), (200, 500_000));
    let (status, _) = h2_get(&mut send2, "nowhere.test", "/", None).await;
    assert_eq!(status, 404);

    // h2c with prior knowledge on the plain listener.
    let plain = TcpStream::connect(r.http).await.unwrap();
    let (c_send, c_conn) = h2::client::handshake(plain).await.unwrap();
    tokio::spawn(async move {
        let _ = c_conn.await;
    });
    let mut c_send = c_send;
    let (status, body) = h2_get(&mut c_send, "x.wild.test", "/c", None).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"backend\":\"b\""));
    // Over HTTP/2 too, a header the backend's Connection names is not passed on.
    let req = http::Request::builder()
        .uri("http://x.wild.test/hop")
        .body(())
        .unwrap();
    let mut ready = c_send.clone().ready().await.unwrap();
    let (resp, _) = ready.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(
        resp.headers().get("x-kept").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert!(
        resp.headers().get("x-hop").is_none(),
        "{:?}",
        resp.headers()
    );

    // Plain HTTP on a redirecting route: 308 to the same URL over HTTPS.
    let resp = get(r.http, "app.test", "/path?q=1").await;
    assert_eq!(resp.status, 308);
    assert_eq!(resp.header("location"), Some("https://app.test/path?q=1"));

    // Handshakes are counted.
    flynn_tests::eventually(Duration::from_secs(5), "tls handshakes counted", || async {
        (r.metric("flynn_router_tls_handshakes_total", &[]).await >= 8.0).then_some(())
    })
    .await;

    // Drain: an open h2 connection gets GOAWAY, its in-flight stream still completes.
    let slow = tokio::spawn({
        let mut send = send.clone();
        async move { h2_get(&mut send, "secure.test", "/slow/1000", None).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.signal("TERM");
    let (status, _) = slow.await.unwrap();
    assert_eq!(status, 200, "in-flight h2 stream cut by the drain");
    assert_eq!(r.wait_exit(Duration::from_secs(10)), Some(true));
}

/// HTTP/1.1 and HTTP/2 clients are accounted for alike: one access-log line each, of the
/// same fields, and the byte counters count the same thing (body bytes) whichever
/// protocol carried them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t21_h1_and_h2_write_the_same_access_line_and_count_bytes_alike() {
    let a = Backend::start("a").await;
    let r = RouterProc::start(
        &routes(&[("app.test", &[a.addr])], ""),
        &["--h2c", "--access-log"],
    );
    let upload = vec![b'u'; 3000];
    let sent_before = r.metric("flynn_router_bytes_sent_total", &[]).await;
    let received_before = r.metric("flynn_router_bytes_received_total", &[]).await;

    // HTTP/1.1: a POST with a body, then a GET of exactly 5000 bytes.
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&upload).await.unwrap();
    let mut c = flynn_tests::router::Client::from_stream(s);
    let posted_h1 = c.read(false).await.expect("h1 POST answered");
    assert_eq!(posted_h1.status, 200);
    c.send("GET /bytes/5000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await;
    let got_h1 = c.read(false).await.expect("h1 GET answered");
    assert_eq!(got_h1.body.len(), 5000);

    // HTTP/2 (h2c): the same two requests.
    let plain = TcpStream::connect(r.http).await.unwrap();
    let (send, conn) = h2::client::handshake(plain).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send;
    let (status, posted_h2) = h2_get(&mut send, "app.test", "/up", Some(upload.clone())).await;
    assert_eq!(status, 200);
    let (status, got_h2) = h2_get(&mut send, "app.test", "/bytes/5000", None).await;
    assert_eq!((status, got_h2.len()), (200, 5000));

    // One line per request, the same fields whichever protocol, body bytes as the
    // client saw them.
    let lines = flynn_tests::eventually(Duration::from_secs(5), "four access lines", || async {
        let log = r.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("flynn_router::access"))
            .map(String::from)
            .collect();
        (lines.len() >= 4).then_some(lines)
    })
    .await;
    let field = |line: &str, name: &str| -> String {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name} in {line}"));
        line[at + name.len() + 2..]
            .split(' ')
            .next()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string()
    };
    let fields = |line: &str| -> Vec<String> {
        line.split(' ')
            .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_string()))
            .collect()
    };
    assert_eq!(fields(&lines[0]), fields(&lines[2]), "{lines:#?}");
    for (line, proto, method, path, body_in, body_out) in [
        (
            &lines[0],
            "HTTP/1.1",
            "POST",
            "/up",
            3000,
            posted_h1.body.len(),
        ),
        (&lines[1], "HTTP/1.1", "GET", "/bytes/5000", 0, 5000),
        (&lines[2], "HTTP/2", "POST", "/up", 3000, posted_h2.len()),
        (&lines[3], "HTTP/2", "GET", "/bytes/5000", 0, 5000),
    ] {
        assert_eq!(field(line, "proto"), proto, "{line}");
        assert_eq!(field(line, "method"), method, "{line}");
        assert_eq!(field(line, "path"), path, "{line}");
        assert_eq!(field(line, "host"), "app.test", "{line}");
        assert_eq!(field(line, "status"), "200", "{line}");
        assert_eq!(field(line, "backend"), a.addr.to_string(), "{line}");
        assert_eq!(field(line, "bytes_in"), body_in.to_string(), "{line}");
        assert_eq!(field(line, "bytes_out"), body_out.to_string(), "{line}");
    }
    // The counters: exactly the bodies, both ways, over both protocols.
    let want_sent = (posted_h1.body.len() + 5000 + posted_h2.len() + 5000) as f64;
    flynn_tests::eventually(Duration::from_secs(5), "bytes counted", || async {
        let sent = r.metric("flynn_router_bytes_sent_total", &[]).await - sent_before;
        let received = r.metric("flynn_router_bytes_received_total", &[]).await - received_before;
        (sent == want_sent && received == 6000.0).then_some(())
    })
    .await;
}
