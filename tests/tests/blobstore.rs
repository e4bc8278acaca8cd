//! The blobstore on real daemons in namespaces: Flynn's HTTP API on every host (port 5001),
//! metadata in the Raft state, the embedded backend keeping each object on two hosts.
//! Needs root; `--test-threads=1`.

use std::time::Duration;

use base64::Engine;
use flynn_tests::{eventually, Cluster};

fn url(c: &Cluster, i: usize, path: &str) -> String {
    format!("http://{}:5001{path}", c.hosts[i].ip)
}

fn sha512(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA512, data)
        .as_ref()
        .to_vec()
}

fn etag(data: &[u8]) -> String {
    format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(sha512(data))
    )
}

/// A request with one header (and an optional body); its response.
async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    header: (&str, &str),
    body: &'static [u8],
) -> reqwest::Response {
    http.request(method, url)
        .header(header.0, header.1)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The body of a GET.
async fn body(http: &reqwest::Client, url: String) -> bytes::Bytes {
    http.get(url).send().await.unwrap().bytes().await.unwrap()
}

/// Waits until host `i`'s blobstore answers (it serves once the host is in a cluster).
async fn ready(c: &Cluster, i: usize) {
    let http = reqwest::Client::new();
    let u = url(c, i, "/");
    eventually(Duration::from_secs(20), "blobstore ready", || async {
        let r = http.get(&u).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_flynn_blobstore_api_semantics() {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    ready(&c, 0).await;
    let http = reqwest::Client::new();
    let put = |path: &str, body: &'static [u8]| http.put(url(&c, 0, path)).body(body).send();

    let r = put("/a/b.txt", b"hello").await.unwrap();
    assert_eq!(r.status(), 200);
    let rec: serde_json::Value = r.json().await.unwrap();
    assert_eq!(rec["size"], 5);
    let got = http.get(url(&c, 0, "/a/b.txt")).send().await.unwrap();
    assert_eq!(got.headers()["etag"].to_str().unwrap(), etag(b"hello"));
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"hello");
    // Conditional and range requests.
    let same = http
        .get(url(&c, 0, "/a/b.txt"))
        .header("if-none-match", etag(b"hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 304);
    let part = http
        .get(url(&c, 0, "/a/b.txt"))
        .header("range", "bytes=1-3")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 1-3/5");
    assert_eq!(part.bytes().await.unwrap().as_ref(), b"ell");
    let past = http
        .get(url(&c, 0, "/a/b.txt"))
        .header("range", "bytes=9-")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    let head = http.head(url(&c, 0, "/a/b.txt")).send().await.unwrap();
    assert_eq!(head.headers()["content-length"], "5");

    // Appends only at the exact end; a wrong offset writes nothing.
    let app = send(
        &http,
        reqwest::Method::PUT,
        url(&c, 0, "/a/b.txt"),
        ("blobstore-offset", "5"),
        b" world",
    )
    .await;
    assert_eq!(app.status(), 200);
    let wrong = send(
        &http,
        reqwest::Method::PUT,
        url(&c, 0, "/a/b.txt"),
        ("blobstore-offset", "3"),
        b"XX",
    )
    .await;
    assert_eq!(wrong.status(), 409);
    let now = body(&http, url(&c, 0, "/a/b.txt")).await;
    assert_eq!(now.as_ref(), b"hello world");
    // Copies; a missing source is a 404.
    let copy = send(
        &http,
        reqwest::Method::PUT,
        url(&c, 0, "/a/c.txt"),
        ("blobstore-copy-from", "/a/b.txt"),
        b"",
    )
    .await;
    assert_eq!(copy.status(), 200);
    let copied = body(&http, url(&c, 0, "/a/c.txt")).await;
    assert_eq!(copied.as_ref(), b"hello world");
    let missing = send(
        &http,
        reqwest::Method::PUT,
        url(&c, 0, "/x"),
        ("blobstore-copy-from", "/nope"),
        b"",
    )
    .await;
    assert_eq!(missing.status(), 404);
    // Listing, with a trailing / for directories.
    put("/top.txt", b"t").await.unwrap();
    let root: Vec<String> = http
        .get(url(&c, 0, "/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root, ["/a/", "/top.txt"]);
    let dir: Vec<String> = http
        .get(url(&c, 0, "/?dir=/a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dir, ["/a/b.txt", "/a/c.txt"]);
    // Delete takes the path and everything under it; then 404 with a JSON body.
    assert_eq!(
        http.delete(url(&c, 0, "/a")).send().await.unwrap().status(),
        200
    );
    let gone = http.get(url(&c, 0, "/a/b.txt")).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let body: serde_json::Value = gone.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    assert_eq!(
        http.delete(url(&c, 0, "/a")).send().await.unwrap().status(),
        404
    );
    // Bad paths are 400s, never 500s.
    let bad = http
        .put(url(&c, 0, "/a//b"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Configuration as Flynn's docs write it: a broken backend is refused at env set, naming
    // the backend and the cause, the env unchanged, and the blobstore's log says it too.
    let out = c.flynn(
        0,
        &[
            "-a",
            "blobstore",
            "env",
            "set",
            "BACKEND_S3MAIN=backend=s3 bucket=b",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"s3main\"") && err.contains("needs region") && err.lines().count() == 1,
        "{err}"
    );
    let unset = c.flynn(0, &["-a", "blobstore", "env", "get", "BACKEND_S3MAIN"]);
    assert!(!unset.status.success(), "the refused value was stored");
    assert!(c.hosts[0].log_text().contains("configuration refused"));
    let good = "BACKEND_S3MAIN=backend=s3 region=us-east-1 bucket=b";
    assert!(c
        .flynn(0, &["-a", "blobstore", "env", "set", good])
        .status
        .success());

    // A large blob streams through in bounded memory.
    let size: u64 = 256 << 20;
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let stream =
        futures::stream::iter((0..size >> 20).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = http
        .put(url(&c, 0, "/big"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = http.get(url(&c, 0, "/big")).send().await.unwrap();
    let mut n = 0u64;
    while let Some(piece) = got.chunk().await.unwrap() {
        n += piece.len() as u64;
    }
    assert_eq!(n, size);
    let pid = c.hosts[0].pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 200 * 1024,
        "daemon peak RSS {peak_kib} KiB for a 256 MiB blob"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_two_copies_survive_a_host_and_a_bad_copy() {
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    for i in 0..3 {
        ready(&c, i).await;
    }
    // Pooled no longer than the server keeps idle connections (10 s), as our clients do.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_idle_timeout(flynn_client::POOL_IDLE)
        .build()
        .unwrap();
    // Writes through host 0; host 2 dies halfway. Every acknowledged blob stays readable.
    let mut acked = Vec::new();
    for n in 0..16 {
        if n == 8 {
            c.kill(2);
        }
        let data = format!("blob number {n}").repeat(1000).into_bytes();
        let r = http
            .put(url(&c, 0, &format!("/k/{n}")))
            .body(data.clone())
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == 200 {
                let rec: serde_json::Value = r.json().await.unwrap();
                assert_eq!(rec["holders"].as_array().unwrap().len(), 2, "{rec}");
                acked.push((n, data));
            }
        }
    }
    assert!(
        acked.len() >= 12,
        "only {} of 16 writes acknowledged",
        acked.len()
    );
    for (n, data) in &acked {
        let got = http
            .get(url(&c, 1, &format!("/k/{n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200, "/k/{n}");
        let body = got.bytes().await.unwrap();
        assert_eq!(sha512(&body), sha512(data), "/k/{n}");
    }
    // A copy corrupted on disk is never served as good: the read fails, the bad copy is
    // dropped, the next read comes from the other holder, and host 0 gets a good copy back.
    // (A blob written after host 2 died: its two copies are on hosts 0 and 1.)
    let (n, data) = acked.last().unwrap();
    let objects = c.hosts[0].data_dir.join("blobstore/objects");
    let hex: String = sha512(data).iter().map(|b| format!("{b:02x}")).collect();
    let object = objects.join(&hex[..2]).join(&hex);
    let mut bad = std::fs::read(&object).unwrap();
    bad[10] ^= 0xff;
    std::fs::write(&object, bad).unwrap();
    // (A small object is one piece: the response may fail before its head is complete.)
    let failed = match http.get(url(&c, 0, &format!("/k/{n}"))).send().await {
        Err(_) => true,
        Ok(first) => first.bytes().await.is_err(),
    };
    assert!(failed, "a corrupt copy was served whole");
    assert!(!object.exists(), "the bad copy was kept");
    // (A new client: the failed response aborted its pooled connection.)
    let again = reqwest::get(url(&c, 0, &format!("/k/{n}"))).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(sha512(&again.bytes().await.unwrap()), sha512(data));
    eventually(Duration::from_secs(10), "copy repaired", || async {
        let on_disk = std::fs::read(&object).ok()?;
        (sha512(&on_disk) == sha512(data)).then_some(())
    })
    .await;
}
