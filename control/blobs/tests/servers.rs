//! Every external backend against its real server on loopback, as `script/storage-servers`
//! starts them: PostgreSQL, an S3 API server (moto, signatures enforced), fake-gcs-server
//! and Azurite. Each case writes, reads whole and by range, deletes and probes, and wrong
//! credentials or a missing bucket fail the probe.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use bytes::Bytes;
use flynn_blobs::{Backend, BackendConfig, BackendError};
use futures::StreamExt;

/// Starts (or finds) the servers once per test binary; their addresses and credentials.
fn servers() -> &'static BTreeMap<String, String> {
    static ENV: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new("bash")
            .arg(root.join("script/storage-servers"))
            .output()
            .expect("running script/storage-servers");
        assert!(
            out.status.success(),
            "script/storage-servers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = std::env::var("FLYNN_STORAGE_DIR").unwrap_or("/var/tmp/flynn-storage".into());
        std::fs::read_to_string(Path::new(&dir).join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn cfg(backend: &str, keys: &[(&str, String)]) -> BackendConfig {
    BackendConfig {
        name: format!("test{backend}"),
        backend: backend.into(),
        keys: keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

fn pg(password: &str) -> BackendConfig {
    let e = servers();
    cfg(
        "postgres",
        &[
            ("host", e["PG_HOST"].clone()),
            ("port", e["PG_PORT"].clone()),
            ("user", e["PG_USER"].clone()),
            ("password", password.into()),
        ],
    )
}

fn s3(secret: &str, bucket: &str) -> BackendConfig {
    let e = servers();
    cfg(
        "s3",
        &[
            ("endpoint", e["S3_ENDPOINT"].clone()),
            ("region", e["S3_REGION"].clone()),
            ("bucket", bucket.into()),
            ("access_key_id", e["S3_ACCESS_KEY_ID"].clone()),
            ("secret_access_key", secret.into()),
        ],
    )
}

fn gcs(bucket: &str) -> BackendConfig {
    let e = servers();
    let key = serde_json::json!({
        "gcs_base_url": e["GCS_BASE_URL"],
        "disable_oauth": true,
        "client_email": "flynn@example.invalid",
        "private_key": "",
        "private_key_id": "",
    });
    cfg(
        "gcs",
        &[("bucket", bucket.into()), ("key", key.to_string())],
    )
}

fn azure(key: &str) -> BackendConfig {
    let e = servers();
    cfg(
        "azure",
        &[
            ("endpoint", e["AZURE_ENDPOINT"].clone()),
            ("account_name", e["AZURE_ACCOUNT"].clone()),
            ("account_key", key.into()),
            ("container", e["AZURE_CONTAINER"].clone()),
        ],
    )
}

/// Deterministic bytes of any size.
fn data(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn body(bytes: &[u8]) -> flynn_blobs::ByteStream {
    // In uneven pieces, as a network would hand them over.
    let pieces: Vec<Result<Bytes, BackendError>> = bytes
        .chunks(700_001)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(pieces).boxed()
}

async fn read(b: &Backend, key: &str, range: Option<(u64, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = b.get(key, range).await.unwrap();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// Write, read whole and by ranges, overwrite, delete; sizes around the chunk and part
/// boundaries (1 MiB rows, 8 MiB parts).
async fn round_trip(cfg: BackendConfig) {
    let b = Backend::connect(&cfg).unwrap();
    b.probe().await.unwrap_or_else(|e| panic!("{e}"));
    let run = format!("{:x}", rand::random::<u64>());
    for (i, size) in [0usize, 1, (1 << 20) + 3, (9 << 20) + 17]
        .into_iter()
        .enumerate()
    {
        let key = format!("test/{run}/{i}");
        let bytes = data(size, i as u8);
        assert_eq!(
            b.put(&key, body(&bytes)).await.unwrap(),
            size as u64,
            "{key}"
        );
        assert!(
            read(&b, &key, None).await == bytes,
            "{key} read back differs"
        );
        if size > 2 {
            let last = size as u64 - 1;
            for (a, z) in [(0, 0), (1, last), (last / 2, last / 2 + 1), (last, last)] {
                let got = read(&b, &key, Some((a, z))).await;
                assert!(got == bytes[a as usize..=z as usize], "{key} range {a}-{z}");
            }
        }
        b.delete(&key).await.unwrap();
        match b.get(&key, None).await {
            Err(BackendError::NotFound { .. }) => {}
            Err(e) => panic!("{key} after delete: {e}"),
            Ok(_) => panic!("{key} still there after delete"),
        }
        // Deleting what is gone is no error.
        b.delete(&key).await.unwrap();
    }
    // A body that breaks off stores nothing.
    let key = format!("test/{run}/cut");
    let cut: flynn_blobs::ByteStream = futures::stream::iter([
        Ok(Bytes::from(data(9 << 20, 1))),
        Err(BackendError::Body("client went away".into())),
    ])
    .boxed();
    assert!(b.put(&key, cut).await.is_err());
    assert!(matches!(
        b.get(&key, None).await,
        Err(BackendError::NotFound { .. })
    ));
}

async fn refused(cfg: BackendConfig, says: &str) {
    let b = Backend::connect(&cfg).unwrap();
    let e = b
        .probe()
        .await
        .expect_err("a bad configuration passed the probe");
    let text = e.to_string();
    assert!(text.contains(&cfg.name), "{text}");
    assert!(text.to_lowercase().contains(says), "{text}");
}

#[tokio::test]
async fn t10_postgres() {
    round_trip(pg(&servers()["PG_PASSWORD"])).await;
    refused(pg("wrong"), "password").await;
}

#[tokio::test]
async fn t11_s3() {
    round_trip(s3(&servers()["S3_SECRET_ACCESS_KEY"], "flynn")).await;
    refused(s3("wrong", "flynn"), "signature").await;
    refused(
        s3(&servers()["S3_SECRET_ACCESS_KEY"], "no-such-bucket"),
        "bucket",
    )
    .await;
}

#[tokio::test]
async fn t12_gcs() {
    round_trip(gcs("flynn")).await;
    // fake-gcs-server checks no credentials (the only GCS server that runs here), so what
    // is refused is a missing bucket (it answers a list of one with a 500).
    refused(gcs("no-such-bucket"), "listing the bucket").await;
}

#[tokio::test]
async fn t13_azure() {
    round_trip(azure(&servers()["AZURE_KEY"])).await;
    let wrong = "d3JvbmcgYWNjb3VudCBrZXkgZm9yIGF6dXJpdGUgdGVzdHMgb2YgZmx5bm4gYmxvYnN0b3Jl";
    refused(azure(wrong), "authoriz").await;
}
