//! The blobstore on real daemons in namespaces: Flynn's HTTP API on every host (port 5001),
//! metadata in the Raft state, the embedded backend keeping each object on two hosts.
//! Needs root; `--test-threads=1`.

use std::time::Duration;

use base64::Engine;
use flynn_tests::{eventually, failed, ok, Cluster};

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
/// Every file under host `i`'s blobstore directory (objects and temporary ones).
fn stored_files(c: &Cluster, i: usize) -> usize {
    fn count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => count(&e.path()),
                        _ => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    count(&c.hosts[i].data_dir.join("blobstore"))
}

/// Starts a PUT of `declared` bytes to host `i`, sends `sent` of them, and hangs up.
async fn put_cut_short(c: &Cluster, i: usize, path: &str, declared: usize, sent: usize) {
    use tokio::io::AsyncWriteExt;
    let addr = url(c, i, "")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {declared}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let piece = vec![7u8; 64 << 10];
    let mut left = sent;
    while left > 0 {
        let n = left.min(piece.len());
        s.write_all(&piece[..n]).await.unwrap();
        left -= n;
    }
    // Long enough for the pieces to reach the peer's copy, then gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
}

/// A bootstrapped one-host cluster whose blobstore answers.
async fn one_host() -> Cluster {
    let mut c = Cluster::start(1);
    c.bootstrap(1);
    c.wait_leader(0, None).await;
    ready(&c, 0).await;
    c
}

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
    let c = one_host().await;
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
    // Complete, but nothing answers there: refused by the probe, with the cause.
    let nowhere = "BACKEND_S3MAIN=backend=s3 region=us-east-1 bucket=b endpoint=http://127.0.0.1:9";
    let err = failed(&c.flynn(0, &["-a", "blobstore", "env", "set", nowhere]));
    assert!(
        err.contains("\"s3main\"") && err.contains("listing the bucket"),
        "{err}"
    );
    assert!(!c
        .flynn(0, &["-a", "blobstore", "env", "get", "BACKEND_S3MAIN"])
        .status
        .success());

    // A 2 GiB blob streams through in bounded memory.
    let size: u64 = 2 << 30;
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
        "daemon peak RSS {peak_kib} KiB for a 2 GiB blob"
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
    // Acknowledged with two copies; a third follows on the third host.
    let three = b"three copies of this, please\n".repeat(100);
    let r = http
        .put(url(&c, 1, "/three"))
        .body(three.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hex: String = sha512(&three).iter().map(|b| format!("{b:02x}")).collect();
    eventually(Duration::from_secs(10), "a copy on every host", || async {
        c.hosts
            .iter()
            .all(|h| {
                h.data_dir
                    .join("blobstore/objects")
                    .join(&hex[..2])
                    .join(&hex)
                    .is_file()
            })
            .then_some(())
    })
    .await;
    // A PUT cut off mid-body stores nothing on any host: not on the writer, and not on the
    // peer its second copy was streaming to as it arrived.
    let files_before: Vec<usize> = (0..3).map(|i| stored_files(&c, i)).collect();
    put_cut_short(&c, 1, "/cut-short", 4 << 20, 1 << 20).await;
    let files_after = eventually(Duration::from_secs(10), "temporary files gone", || async {
        let now: Vec<usize> = (0..3).map(|i| stored_files(&c, i)).collect();
        (now == files_before).then_some(now)
    })
    .await;
    assert_eq!(files_after, files_before);
    let r = http.get(url(&c, 0, "/cut-short")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // A whole PUT is acknowledged with both copies already on disk.
    let whole = b"both at once\n".repeat(50_000);
    let r = http
        .put(url(&c, 1, "/whole"))
        .body(whole.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec: serde_json::Value = r.json().await.unwrap();
    let hex: String = sha512(&whole).iter().map(|b| format!("{b:02x}")).collect();
    let holders: Vec<u64> = rec["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect();
    assert_eq!(holders.len(), 2, "{rec}");
    let on_disk = c
        .hosts
        .iter()
        .filter(|h| {
            h.data_dir
                .join("blobstore/objects")
                .join(&hex[..2])
                .join(&hex)
                .is_file()
        })
        .count();
    assert!(on_disk >= 2, "acknowledged with {on_disk} copies on disk");
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

/// Deterministic bytes of any size.
fn pattern(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// Every blob reads back whole and byte-identical from every host, on `backend`.
async fn all_readable(c: &Cluster, blobs: &[(String, Vec<u8>)], backend: Option<&str>) {
    let http = reqwest::Client::new();
    for (path, data) in blobs {
        for i in 0..3 {
            let r = http.get(url(c, i, path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path} from host {i}");
            let on = r.headers()["blobstore-backend"]
                .to_str()
                .unwrap()
                .to_string();
            if let Some(b) = backend {
                assert_eq!(on, b, "{path}");
            }
            let got = r.bytes().await.unwrap();
            assert!(sha512(&got) == sha512(data), "{path} from host {i} differs");
        }
    }
}

fn psql_count() -> u64 {
    let out = std::process::Command::new("su")
        .args([
            "postgres",
            "-c",
            "psql -qtAc 'select count(*) from flynn_blobstore_chunks'",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// `flynn-blobstore migrate --delete` against host 0's blobstore.
fn migrate(c: &Cluster) -> std::process::Command {
    let mut cmd = std::process::Command::new(flynn_tests::bin_dir().join("flynn-blobstore"));
    cmd.args([
        "--url",
        &format!("http://{}:5001", c.hosts[0].ip),
        "migrate",
        "--delete",
        "--concurrency",
        "2",
    ]);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn t12_external_backends_env_set_and_migrate() {
    let env = flynn_tests::storage_servers();
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    for i in 0..3 {
        ready(&c, i).await;
    }
    // The servers listen on loopback; the hosts reach them through the test's bridge address.
    let via_bridge = |host: &str, port: &str| {
        let target = format!("{host}:{port}").parse().unwrap();
        flynn_tests::relay(&c.bridge_ip(), target).to_string()
    };
    let pg = via_bridge(&env["PG_HOST"], &env["PG_PORT"]);
    let s3 = via_bridge("127.0.0.1", env["S3_ENDPOINT"].rsplit(':').next().unwrap());
    let gcs = via_bridge("127.0.0.1", env["GCS_BASE_URL"].rsplit(':').next().unwrap());
    let az_port = env["AZURE_ENDPOINT"]
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap();
    let az = via_bridge("127.0.0.1", az_port);

    // Blobs on the embedded backend: sizes around the 1 MiB rows and 8 MiB parts, a copy,
    // an append, and one large enough that a migration can be interrupted in the middle.
    let http = reqwest::Client::new();
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, size) in [0usize, 1, 4096, (1 << 20) + 3, (9 << 20) + 17, 40 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(size, i as u8);
        let r = http
            .put(url(&c, i % 3, &format!("/m/b{i}")))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        blobs.push((format!("/m/b{i}"), data));
    }
    let r = send(
        &http,
        reqwest::Method::PUT,
        url(&c, 0, "/m/copy"),
        ("Blobstore-Copy-From", "/m/b3"),
        b"",
    )
    .await;
    assert_eq!(r.status(), 200);
    blobs.push(("/m/copy".into(), blobs[3].1.clone()));
    all_readable(&c, &blobs, Some("embedded")).await;

    let pg_cfg = |password: &str| {
        let (host, port) = pg.split_once(':').unwrap();
        format!("backend=postgres host={host} port={port} user=postgres password={password}")
    };
    let s3_cfg = |secret: &str| {
        format!(
            "backend=s3 endpoint=http://{s3} region=us-east-1 bucket=flynn access_key_id={} secret_access_key={secret}",
            env["S3_ACCESS_KEY_ID"]
        )
    };
    let gcs_key = serde_json::json!({
        "gcs_base_url": format!("http://{gcs}"),
        "disable_oauth": true,
        "client_email": "flynn@example.invalid",
        "private_key": "",
        "private_key_id": "",
    })
    .to_string();
    let az_cfg = |key: &str| {
        format!(
            "backend=azure endpoint=http://{az}/{} account_name={} account_key={key} container=flynn",
            env["AZURE_ACCOUNT"], env["AZURE_ACCOUNT"]
        )
    };
    let wrong_az = "d3JvbmcgYWNjb3VudCBrZXkgZm9yIGF6dXJpdGUgdGVzdHMgb2YgZmx5bm4gYmxvYnN0b3Jl";
    // (name, wrong settings and what the refusal says, right settings). fake-gcs-server
    // checks no credentials, so GCS's wrong setting is a bucket that does not exist.
    let steps: Vec<(&str, Vec<String>, &str, Vec<String>)> = vec![
        (
            "pgmain",
            vec![format!("BACKEND_PGMAIN={}", pg_cfg("wrong"))],
            "password",
            vec![format!("BACKEND_PGMAIN={}", pg_cfg(&env["PG_PASSWORD"]))],
        ),
        (
            "s3main",
            vec![format!("BACKEND_S3MAIN={}", s3_cfg("wrong"))],
            "signature",
            vec![format!(
                "BACKEND_S3MAIN={}",
                s3_cfg(&env["S3_SECRET_ACCESS_KEY"])
            )],
        ),
        (
            "gcsmain",
            vec![
                "BACKEND_GCSMAIN=backend=gcs bucket=no-such-bucket".to_string(),
                format!("BACKEND_GCSMAIN_KEY={gcs_key}"),
            ],
            "listing the bucket",
            vec![
                "BACKEND_GCSMAIN=backend=gcs bucket=flynn".to_string(),
                format!("BACKEND_GCSMAIN_KEY={gcs_key}"),
            ],
        ),
        (
            "azuremain",
            vec![format!("BACKEND_AZUREMAIN={}", az_cfg(wrong_az))],
            "authoriz",
            vec![format!("BACKEND_AZUREMAIN={}", az_cfg(&env["AZURE_KEY"]))],
        ),
    ];
    let pg_rows_before = psql_count();
    for (name, wrong, says, right) in steps {
        // Wrong settings: env set fails naming the backend and the cause; the env is as it was.
        let before = ok(&c.flynn(0, &["-a", "blobstore", "env"]));
        let mut args = vec!["-a", "blobstore", "env", "set"];
        args.extend(wrong.iter().map(String::as_str));
        let default = format!("DEFAULT_BACKEND={name}");
        args.push(&default);
        let err = failed(&c.flynn(0, &args));
        assert!(
            err.contains(name) && err.to_lowercase().contains(says),
            "{name}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(
            ok(&c.flynn(0, &["-a", "blobstore", "env"])),
            before,
            "{name}"
        );
        // Right settings: the default moves, live on every host; new writes land there.
        let mut args = vec!["-a", "blobstore", "env", "set"];
        args.extend(right.iter().map(String::as_str));
        args.push(&default);
        ok(&c.flynn(0, &args));
        let fresh = pattern(3 << 20, 99);
        let path = format!("/new/{name}");
        let r = http
            .put(url(&c, 1, &path))
            .body(fresh.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        blobs.push((path, fresh));

        if name == "s3main" {
            // Interrupted once (the big blob is still on its way), then run again.
            let mut child = migrate(&c)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            std::io::BufRead::read_line(&mut out, &mut first).unwrap();
            assert!(first.starts_with("migrating"), "{first}");
            child.kill().unwrap();
            child.wait().unwrap();
            let left = http.head(url(&c, 0, "/m/b5")).send().await.unwrap();
            assert_ne!(
                left.headers()["blobstore-backend"],
                "s3main",
                "not interrupted"
            );
            // Mid-way, every blob is whole on one backend or the other.
            all_readable(&c, &blobs, None).await;
        }
        let said = if name == "azuremain" {
            // The last one as Flynn's docs run it: a one-off job of the blobstore app, from
            // its system image, its progress streamed back.
            ok(&c.flynn(
                0,
                &[
                    "-a",
                    "blobstore",
                    "run",
                    "/bin/flynn-blobstore",
                    "migrate",
                    "--delete",
                ],
            ))
        } else {
            let out = migrate(&c).output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(
            said.contains("0 failed") && said.contains(&format!("to {name}")),
            "{said}"
        );
        all_readable(&c, &blobs, Some(name)).await;
        // Byte ranges come from the external backend too.
        let r = send(
            &http,
            reqwest::Method::GET,
            url(&c, 2, "/m/b4"),
            ("Range", "bytes=1048570-1048580"),
            b"",
        )
        .await;
        assert_eq!(r.status(), 206);
        assert_eq!(
            &r.bytes().await.unwrap()[..],
            &blobs[4].1[1048570..=1048580]
        );
        if name == "pgmain" {
            assert!(
                psql_count() > pg_rows_before,
                "nothing was written to PostgreSQL"
            );
        }
        if name == "s3main" {
            // --delete took the PostgreSQL copies away.
            assert_eq!(
                psql_count(),
                pg_rows_before,
                "old copies left in PostgreSQL"
            );
            // With redirect=true, a GET answers with a URL presigned for 10 minutes at the S3
            // endpoint. (moto, with signatures enforced, cannot serve presigned GETs: its
            // auth layer wants an Authorization header. So the URL's form is checked here,
            // not a client following it.)
            let redirecting = format!(
                "BACKEND_S3MAIN={} redirect=true",
                s3_cfg(&env["S3_SECRET_ACCESS_KEY"])
            );
            ok(&c.flynn(0, &["-a", "blobstore", "env", "set", &redirecting]));
            let plain = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let r = plain.get(url(&c, 0, "/m/b2")).send().await.unwrap();
            assert_eq!(r.status(), 302);
            let to = r.headers()["location"].to_str().unwrap();
            assert!(
                to.starts_with(&format!("http://{s3}/flynn/flynn/"))
                    && to.contains("X-Amz-Signature=")
                    && to.contains("X-Amz-Expires=600"),
                "{to}"
            );
            let plain_cfg = format!("BACKEND_S3MAIN={}", s3_cfg(&env["S3_SECRET_ACCESS_KEY"]));
            ok(&c.flynn(0, &["-a", "blobstore", "env", "set", &plain_cfg]));
        }
    }
    // Metrics per backend: requests, bytes and latency histograms, in valid Prometheus text.
    let metrics = c.hosts[1].metrics_text().await;
    for backend in ["embedded", "pgmain", "s3main", "gcsmain", "azuremain"] {
        let served =
            format!("flynn_blobstore_bytes_total{{direction=\"out\",backend=\"{backend}\"}}");
        let timed = format!(
            "flynn_blobstore_request_seconds_bucket{{method=\"get\",backend=\"{backend}\",le=\"+Inf\"}}"
        );
        assert!(
            metrics.contains(&served) && metrics.contains(&timed),
            "{backend}: {metrics}"
        );
    }
    // The refusals are in the blobstore's log too.
    let log = ok(&c.flynn(0, &["-a", "blobstore", "log"]));
    assert!(
        log.contains("configuration refused") && log.contains("azuremain"),
        "{log}"
    );
    // A blob deleted from an external backend is gone from it; its path 404s.
    let r = http.delete(url(&c, 0, "/new")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(url(&c, 1, "/new/pgmain")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// One HTTP/1.1 connection read by hand: responses in order, pipelined or not.
struct RawConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A response: status, headers (names lowercase) and body.
struct RawResponse {
    line: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header but `date` (which changes), sorted.
    fn stable_headers(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| n != "date")
            .cloned()
            .collect();
        h.sort();
        h
    }
}

impl RawConn {
    async fn open(c: &Cluster, i: usize) -> RawConn {
        let addr = format!("{}:5001", c.hosts[i].ip);
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, requests: &str) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(requests.as_bytes()).await.unwrap();
    }

    /// Reads more; false at the end of the connection.
    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut piece = vec![0u8; 256 << 10];
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut piece));
        let n = read.await.expect("a response within 10 s").unwrap();
        self.buf.extend_from_slice(&piece[..n]);
        n > 0
    }

    /// The next response (`head_only`: the answer to a HEAD, or a 304, has no body).
    async fn response(&mut self, head_only: bool) -> RawResponse {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1."), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let mut r = RawResponse {
            line: status_line.to_string(),
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = if head_only {
            0
        } else {
            r.header("content-length")
                .expect("a content-length")
                .parse()
                .unwrap()
        };
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed mid-body");
        }
        r.body = self.buf.drain(..len).collect();
        r
    }

    /// Whether the server closed the connection (after everything it sent was read).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

/// Bytes the blobstore on host `i` has sent with sendfile.
async fn sent_uncopied(c: &Cluster, i: usize) -> u64 {
    c.hosts[i]
        .counter("flynn_blobstore_sendfile_bytes_total")
        .await
}

/// Bytes of local copies host `i`'s front read and wrote, the page cache not holding them.
async fn copied_uncached(c: &Cluster, i: usize) -> u64 {
    c.hosts[i]
        .counter("flynn_blobstore_uncached_bytes_total")
        .await
}

/// Since `before` (sendfile bytes, copied bytes): every byte of `total` went one of the
/// two ways from the front, and sendfile carried some. The kernel may decline a window
/// now and then (a page it would not read without waiting), which the front then copies.
async fn sent_by_the_front(c: &Cluster, before: (u64, u64), total: u64, what: &str) {
    let sent = sent_uncopied(c, 0).await - before.0;
    let copied = copied_uncached(c, 0).await - before.1;
    assert_eq!(sent + copied, total, "{what}: every byte from the front");
    assert!(
        sent > 0,
        "{what}: nothing went with sendfile ({copied} copied)"
    );
}

/// GETs the blobstore on host `i` answered before its API.
async fn answered_directly(c: &Cluster, i: usize) -> u64 {
    c.hosts[i]
        .counter("flynn_blobstore_direct_gets_total")
        .await
}

/// GETs of objects this host holds are answered before hyper, their bodies sent from the
/// page cache with sendfile: byte for byte, pipelined, ranged, with the API's own errors
/// and headers, keep-alive, `Connection: close`. A piece the page cache does not hold is
/// read and written instead. The first request the fast path does not take (a PUT,
/// HTTP/1.0) hands the connection to the API, which answers it and what follows.
#[tokio::test(flavor = "multi_thread")]
async fn t13_local_gets_are_sent_from_the_page_cache() {
    let c = one_host().await;
    let http = reqwest::Client::new();
    let big: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i % 251) as u8).collect();
    let r = http
        .put(url(&c, 0, "/d/big"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(url(&c, 0, "/d/small"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hex: String = sha512(&big).iter().map(|b| format!("{b:02x}")).collect();
    let object = c.hosts[0]
        .data_dir
        .join("blobstore/objects")
        .join(&hex[..2])
        .join(&hex);
    // Where the kernel cannot say what the page cache holds (before Linux 6.5, a seccomp
    // filter, a filesystem without a page cache of its own), the daemon copies instead of
    // using sendfile: bodies are checked, counts of sendfile bytes are not.
    let can_tell = page_cache_holds(&object) == Some(true);
    if !can_tell {
        eprintln!("cachestat cannot see the fresh object here: sendfile counts not checked");
    }

    let before = (sent_uncopied(&c, 0).await, copied_uncached(&c, 0).await);
    let mut conn = RawConn::open(&c, 0).await;
    // Two requests in one write: answered in order.
    conn.send(
        "GET /d/big HTTP/1.1\r\nHost: b\r\n\r\nGET /d/big HTTP/1.1\r\nHost: b\r\nRange: bytes=1048570-2097160\r\n\r\n",
    )
    .await;
    let whole = conn.response(false).await;
    assert_eq!(whole.status, 200);
    assert!(whole.body == big, "the whole object, byte for byte");
    assert_eq!(whole.header("etag"), Some(etag(&big).as_str()));
    assert!(whole.header("date").is_some());
    let part = conn.response(false).await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 1048570-2097160/{}", big.len()).as_str())
    );
    assert!(
        part.body == big[1048570..=2097160],
        "the range, byte for byte"
    );
    if can_tell {
        let total = (big.len() + part.body.len()) as u64;
        sent_by_the_front(&c, before, total, "both bodies").await;
    }
    // Errors and conditional answers on the same connection, which stays open.
    conn.send("GET /d/missing HTTP/1.1\r\nHost: b\r\n\r\n")
        .await;
    let missing = conn.response(false).await;
    assert_eq!(missing.status, 404);
    let error: serde_json::Value = serde_json::from_slice(&missing.body).unwrap();
    assert_eq!(error["error"], "not_found", "{error}");
    let tag = etag(&big);
    conn.send(&format!(
        "GET /d/big HTTP/1.1\r\nHost: b\r\nIf-None-Match: {tag}\r\n\r\nGET /d/big HTTP/1.1\r\nHost: b\r\nRange: bytes=99999999-\r\n\r\n"
    ))
    .await;
    let same = conn.response(true).await;
    assert_eq!(same.status, 304);
    assert_eq!(same.header("content-length"), None);
    let past = conn.response(false).await;
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{}", big.len()).as_str())
    );
    still_direct(&c, &mut conn, "after the errors").await;

    // Not in the page cache: read and written, still whole, and not counted as sendfile.
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&object).unwrap();
        f.sync_all().unwrap();
        #[allow(unsafe_code)]
        // SAFETY: an open descriptor; advice only.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
    // (tmpfs keeps its pages whatever the advice.)
    let dropped = can_tell && page_cache_holds(&object) == Some(false);
    if can_tell && !dropped {
        eprintln!("the page cache kept the object: its read from disk is not checked here");
    }
    let before = (sent_uncopied(&c, 0).await, copied_uncached(&c, 0).await);
    conn.send("GET /d/big HTTP/1.1\r\nHost: b\r\n\r\n").await;
    let uncached = conn.response(false).await;
    assert!(uncached.body == big, "read from disk, byte for byte");
    if dropped {
        assert!(
            sent_uncopied(&c, 0).await - before.0 < big.len() as u64,
            "pieces the page cache did not hold were read, not sent with sendfile"
        );
        assert!(
            copied_uncached(&c, 0).await > before.1,
            "and counted as copied"
        );
    }
    still_direct(&c, &mut conn, "after a read from disk").await;

    // A copy changed on disk since it was checked is hashed on its way out, as through the
    // API; once it reads back good, it is sent from the page cache again.
    std::fs::File::options()
        .write(true)
        .open(&object)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let before = sent_uncopied(&c, 0).await;
    conn.send("GET /d/big HTTP/1.1\r\nHost: b\r\n\r\n").await;
    assert!(
        conn.response(false).await.body == big,
        "hashed, byte for byte"
    );
    assert_eq!(
        sent_uncopied(&c, 0).await,
        before,
        "hashed, so read and written"
    );
    let before = (sent_uncopied(&c, 0).await, copied_uncached(&c, 0).await);
    conn.send("GET /d/big HTTP/1.1\r\nHost: b\r\n\r\n").await;
    assert!(conn.response(false).await.body == big);
    if can_tell {
        let what = "checked again, so trusted again";
        sent_by_the_front(&c, before, big.len() as u64, what).await;
    }

    // A PUT hands the connection to the API, which answers it and the GET after it with
    // the same head as the fast path's.
    conn.send("PUT /d/other HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(conn.response(false).await.status, 200);
    let before = answered_directly(&c, 0).await;
    conn.send("GET /d/big HTTP/1.1\r\nHost: b\r\n\r\n").await;
    let through_api = conn.response(false).await;
    assert!(through_api.body == big);
    assert_eq!(
        answered_directly(&c, 0).await,
        before,
        "answered by the API"
    );
    assert_eq!(through_api.stable_headers(), whole.stable_headers());

    // `Connection: close` is honoured; HTTP/1.0 is the API's.
    let mut conn = RawConn::open(&c, 0).await;
    let before = answered_directly(&c, 0).await;
    conn.send("GET /d/small HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await;
    let small = conn.response(false).await;
    assert_eq!((small.status, small.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(small.header("connection"), Some("close"));
    assert!(conn.closed().await, "closed after the answer");
    assert_eq!(answered_directly(&c, 0).await - before, 1);
    let mut conn = RawConn::open(&c, 0).await;
    conn.send("GET /d/small HTTP/1.0\r\n\r\n").await;
    let old = conn.response(false).await;
    assert_eq!((old.status, old.body.as_slice()), (200, &b"hello"[..]));
    assert!(
        old.line.starts_with("HTTP/1.0 "),
        "hyper's answer: {}",
        old.line
    );
    assert_eq!(
        answered_directly(&c, 0).await - before,
        1,
        "HTTP/1.0 is the API's"
    );
}

/// Whether the page cache holds all of the file at `path` (`cachestat(2)`; `None` where the
/// kernel cannot say).
fn page_cache_holds(path: &std::path::Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    let pages = f.metadata().ok()?.len().div_ceil(4096);
    // struct cachestat_range { off, len } (len 0: to the end); struct cachestat's first
    // field is nr_cache, four more follow.
    let range = [0u64, 0u64];
    let mut stat = [0u64; 5];
    #[allow(unsafe_code)]
    // SAFETY: both arrays are laid out as the kernel's structs and outlive the call.
    let rc = unsafe { libc::syscall(451, f.as_raw_fd(), range.as_ptr(), stat.as_mut_ptr(), 0u32) };
    (rc == 0).then_some(stat[0] >= pages)
}

/// A GET of the 5-byte `/d/small` on `conn` (small: read and written with its head),
/// answered before the API, so the connection is still the fast path's.
async fn still_direct(c: &Cluster, conn: &mut RawConn, when: &str) {
    let (before, sent_before) = (answered_directly(c, 0).await, sent_uncopied(c, 0).await);
    conn.send("GET /d/small HTTP/1.1\r\nHost: b\r\n\r\n").await;
    let small = conn.response(false).await;
    assert_eq!((small.status, small.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(answered_directly(c, 0).await - before, 1, "{when}");
    assert_eq!(
        sent_uncopied(c, 0).await,
        sent_before,
        "small: not sent with sendfile"
    );
}
