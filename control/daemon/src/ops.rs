//! Backups and app exports as data: what a backup carries ([`Plan`]), and moving archive
//! entries to and from their places (blobs through the blobstore's checked write, ZFS
//! volume streams from and to the hosts that hold them). The API's handlers in
//! `api/backup.rs` and `api/export.rs` only parse, call these and answer.

use std::collections::BTreeMap;
use std::io;

use axum::body::Body;
use bytes::Bytes;
use flynn_state::blobs::BlobFile;
use flynn_state::volumes::Volume;
use flynn_state::ClusterState;
use futures::TryStreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::archive::{ArchiveError, TarReader, TarWriter};
use crate::error::{ApiError, ApiResult};

/// A backup's first entry: the cluster state.
pub const STATE_ENTRY: &str = "state.json";
/// An app export's first entry.
pub const APP_ENTRY: &str = "app.json";
/// Backend kinds whose bytes a backup carries (the others are the cloud's to keep).
const CARRIED: [&str; 2] = ["embedded", "postgres"];

/// What a backup of `state` holds besides the state itself.
pub struct Plan {
    pub blobs: Vec<BlobFile>,
    /// Files referenced, not copied: path → backend.
    pub external: BTreeMap<String, String>,
    /// ZFS volumes, with the API address of the host holding each.
    pub volumes: Vec<(Volume, String)>,
    /// What cannot be carried, and why.
    pub skipped: Vec<String>,
    /// The databases (`flynn resource`), carried as dumps rather than as their servers'
    /// volumes: a dump is consistent and restores into any server, where three replicas'
    /// volumes, each sent at its own moment, would not agree.
    pub databases: Vec<flynn_state::resources::Resource>,
}

impl Plan {
    pub fn of(state: &ClusterState, members: &BTreeMap<u64, String>) -> Plan {
        let env = state
            .apps
            .get(crate::blobstore::SERVICE)
            .map(|a| a.env.global.clone())
            .unwrap_or_default();
        let kinds: BTreeMap<String, String> = flynn_state::blobs::config::backends(&env)
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.name, c.backend))
            .collect();
        let mut plan = Plan {
            blobs: Vec::new(),
            external: BTreeMap::new(),
            volumes: Vec::new(),
            skipped: Vec::new(),
            databases: state.resources.resources.values().cloned().collect(),
        };
        for f in state.blobs.blobs.values() {
            let kind = kinds
                .get(&f.backend)
                .map(String::as_str)
                .unwrap_or(f.backend.as_str());
            if CARRIED.contains(&kind) {
                plan.blobs.push(f.clone());
            } else {
                plan.external.insert(f.path.clone(), f.backend.clone());
            }
        }
        for v in state.volumes.volumes.values() {
            if v.app
                .as_deref()
                .is_some_and(|a| flynn_state::resources::serves_databases(state, a))
            {
                continue; // its databases are dumped instead
            }
            match (v.provider.as_str(), members.get(&v.host)) {
                ("zfs", Some(addr)) => plan.volumes.push((v.clone(), addr.clone())),
                ("zfs", None) => plan
                    .skipped
                    .push(format!("volume {}: its host is no longer a member", v.id)),
                (p, _) => plan.skipped.push(format!(
                    "volume {}: on a {p} provider, which has no send stream",
                    v.id
                )),
            }
        }
        plan
    }
}

/// What the archive is called in errors: the kind the user gave.
pub const BACKUP: &str = "backup archive";
pub const APP_EXPORT: &str = "app export archive";

pub fn broken(what: &str, e: ArchiveError) -> ApiError {
    ApiError::Invalid(format!("{what}: {e}"))
}

/// A volume stream being received on some host while its chunks are read from an archive.
pub struct Receiving {
    /// The volume's id in the archive.
    pub id: String,
    tx: mpsc::Sender<io::Result<Bytes>>,
    done: tokio::task::JoinHandle<Result<String, String>>,
}

impl Receiving {
    /// Starts receiving into volume `new_id` on the host at `target`, recorded as a data
    /// volume of `owner` (app, process type, mount path) when given.
    pub fn start(
        target: &str,
        secret: &str,
        id: &str,
        new_id: &str,
        owner: Option<(&str, &Volume)>,
    ) -> ApiResult<Receiving> {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let host = peer(target, secret);
        let owner: Option<(String, Option<(String, String)>)> = owner.map(|(app, v)| {
            let typed = v.proc_type.clone().zip(v.path.clone());
            (app.to_string(), typed)
        });
        let (target, vid) = (target.to_string(), new_id.to_string());
        let done = tokio::spawn(async move {
            let owner = owner.as_ref().map(|(app, t)| {
                (
                    app.as_str(),
                    t.as_ref().map(|(p, m)| (p.as_str(), m.as_str())),
                )
            });
            let stream = reqwest::Body::wrap_stream(ReceiverStream::new(rx));
            match host.receive_volume(&vid, owner, stream).await {
                Ok(_) => Ok(format!("{vid} on {target}")),
                Err(e) => Err(format!("{target} refused it: {e}")),
            }
        });
        Ok(Receiving {
            id: id.to_string(),
            tx,
            done,
        })
    }

    /// Sends the archive's current entry (one chunk of the stream); `what` names the archive.
    pub async fn feed<R: tokio::io::AsyncRead + Unpin>(
        &self,
        tar: &mut TarReader<R>,
        what: &str,
    ) -> ApiResult<()> {
        let tx = self.tx.clone();
        tar.for_each_chunk(|c| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(c)).await.map_err(|_| {
                    ArchiveError::Io(io::Error::other("the volume's host stopped reading"))
                })
            }
        })
        .await
        .map_err(|e| broken(what, e))?;
        Ok(())
    }

    /// Ends the stream and waits for the host to apply it.
    pub async fn finish(self) -> ApiResult<String> {
        drop(self.tx);
        self.done
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("volume {}: {e}", self.id)))
    }
}

/// Members whose volumes are on ZFS (a send stream can be received there).
pub async fn zfs_hosts(node: &crate::node::Node, secret: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, addr) in node.members() {
        let c = flynn_client::HostClient::new(
            &format!("http://{addr}"),
            Some(secret),
            std::time::Duration::from_secs(10),
        );
        if let Ok(v) = c.components().await {
            if v["volumes"]["provider"] == "zfs" {
                out.push(addr);
            }
        }
    }
    out
}

/// Stores the archive's current entry at blob `path` through the blobstore's checked
/// write: content whose SHA-512 is not `sha512` stores nothing.
pub async fn put_blob<R: tokio::io::AsyncRead + Unpin>(
    blobstore: &std::sync::Arc<crate::blobstore::Blobstore>,
    tar: &mut TarReader<R>,
    path: &str,
    sha512: &str,
    what: &str,
) -> ApiResult<()> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let (b, p, sha) = (blobstore.clone(), path.to_string(), sha512.to_string());
    let put = tokio::spawn(async move { b.put_checked(&p, ReceiverStream::new(rx), &sha).await });
    let fed = tar
        .for_each_chunk(|c| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(c)).await.map_err(|_| {
                    ArchiveError::Io(io::Error::other("the blobstore stopped reading"))
                })
            }
        })
        .await;
    drop(tx);
    let stored = put.await.map_err(|e| ApiError::Internal(e.to_string()))?;
    fed.map_err(|e| broken(what, e))?;
    stored.map_err(|e| ApiError::Internal(format!("blob {path}: {e}")))?;
    Ok(())
}

/// An archive arriving as a request body.
pub fn archive_body(body: Body) -> TarReader<impl tokio::io::AsyncRead + Unpin> {
    TarReader::new(tokio_util::io::StreamReader::new(
        body.into_data_stream().map_err(io::Error::other),
    ))
}

/// Reads the archive's first entry, which must be `first` (at most `limit` bytes, read
/// whole); `what` names the archive in errors, which say what was given instead.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    tar: &mut TarReader<R>,
    first: &str,
    limit: u64,
    what: &str,
) -> ApiResult<Vec<u8>> {
    match tar.next().await.map_err(|e| broken(what, e))? {
        Some((name, _)) if name == first => {}
        Some((name, _)) => {
            let hint = match name.as_str() {
                STATE_ENTRY => " (it is a cluster backup: restore it with `flynn-host bootstrap --from-backup`)",
                APP_ENTRY => " (it is an app export: import it with `flynn import`)",
                _ => "",
            };
            return Err(ApiError::Invalid(format!(
                "{what}: the first entry is {name}, not {first}{hint}"
            )));
        }
        None => return Err(ApiError::Invalid(format!("{what}: the archive is empty"))),
    }
    tar.read_all(limit).await.map_err(|e| broken(what, e))
}

/// Appends volume `id`'s full `zfs send` stream, asked of the host at `addr`, as chunk
/// entries `volumes/ID/NNNNNN`; the bytes written.
pub async fn write_volume(
    w: &mut TarWriter,
    addr: &str,
    secret: &str,
    id: &str,
) -> io::Result<u64> {
    let r = peer(addr, secret)
        .export_volume(id)
        .await
        .map_err(|e| io::Error::other(format!("volume {id} at {addr}: {e}")))?;
    w.chunked(
        &format!("volumes/{id}"),
        r.bytes_stream().map_err(io::Error::other),
    )
    .await
}

/// Another host's API, by its address, with the cluster secret: archive transfers take as
/// long as they take, so only the connect and idle limits apply.
pub fn peer(addr: &str, secret: &str) -> flynn_client::HostClient {
    flynn_client::HostClient::new(
        &format!("http://{addr}"),
        Some(secret),
        std::time::Duration::from_secs(30),
    )
}

/// Database dumps read from an archive, kept on disk until their databases exist (they
/// come before the state that makes them is applied). Removed when dropped.
pub struct DumpSpool {
    dir: tempfile::TempDir,
    files: BTreeMap<String, std::path::PathBuf>,
}

impl DumpSpool {
    pub fn new(host: &crate::host::Host) -> ApiResult<DumpSpool> {
        let tmp = host.dir.root().join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", tmp.display())))?;
        let dir = tempfile::tempdir_in(&tmp)
            .map_err(|e| ApiError::Internal(format!("a spool for the dumps: {e}")))?;
        Ok(DumpSpool {
            dir,
            files: BTreeMap::new(),
        })
    }

    /// The dump of resource `id`, if the archive held one.
    pub fn get(&self, id: &str) -> Option<&std::path::Path> {
        self.files.get(id).map(|p| p.as_path())
    }

    /// Appends the archive's current entry (a chunk of resource `id`'s dump) to its file.
    pub async fn take<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        tar: &mut TarReader<R>,
        id: &str,
        what: &str,
    ) -> ApiResult<()> {
        use tokio::io::AsyncWriteExt;
        let path = self.dir.path().join(id);
        self.files.insert(id.to_string(), path.clone());
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
        let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
        tar.for_each_chunk(|c| {
            let file = file.clone();
            async move {
                file.lock()
                    .await
                    .write_all(&c)
                    .await
                    .map_err(ArchiveError::Io)
            }
        })
        .await
        .map_err(|e| broken(what, e))?;
        file.lock()
            .await
            .flush()
            .await
            .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
        Ok(())
    }
}
