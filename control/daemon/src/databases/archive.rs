//! Continuous WAL archiving for the replicated Postgres, and the point-in-time restore it
//! makes possible (`flynn pg backups capture|restore [--to TIME]`).
//!
//! Every server archives each WAL segment it has (`archive_mode = always`: the primary what
//! it writes, the standbys what they receive, so a segment the primary wrote just before it
//! died is archived by its sync) into `wal-archive/` on its own volume (`postgres.sh`). The
//! [`shipper`] on each host copies finished segments from there into the blobstore at
//! `/postgres/wal/NAME` and removes them; a segment already there (from another server) is
//! only removed. Base backups (`pg_basebackup` as a tar, without WAL: the archive has it)
//! go to `/postgres/base/MS.tar`.
//!
//! A restore runs in a one-off job of the postgres app with the resource's env: it gets one
//! tar on stdin (the latest base backup taken before the target, and every archived
//! segment), starts a private server that recovers to the target time and promotes, dumps
//! the resource's database from it, and restores that dump into the live database in one
//! transaction (`POSTGRES_PITR`). Nothing changes unless the whole of it succeeded.

use std::sync::Arc;
use std::time::Duration;

use flynn_state::resources::Resource;

use super::failover::{APP, PROC_TYPE};
use crate::blobstore::Blobstore;
use crate::component::LocalState;
use crate::components::volumes::VolumesComponent;
use crate::error::{ApiError, ApiResult};
use crate::host::Host;

/// Where segments and base backups live in the blobstore.
pub const WAL_DIR: &str = "/postgres/wal/";
pub const BASE_DIR: &str = "/postgres/base/";

const SHIP_EVERY: Duration = Duration::from_secs(2);

/// Copies this host's server's archived segments into the blobstore, for as long as the
/// daemon runs.
pub async fn shipper(
    local: LocalState,
    host: u64,
    volumes: Arc<VolumesComponent>,
    blobs: Arc<Blobstore>,
) {
    let mut tick = tokio::time::interval(SHIP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let volume = local.read(|s| {
            let job = s
                .jobs
                .jobs
                .values()
                .filter(|j| j.app == APP && j.proc_type == PROC_TYPE && j.host == host && !j.oneoff)
                .max_by_key(|j| j.created_ms)?;
            s.volumes
                .volumes
                .values()
                .find(|v| v.host == host && v.job.as_deref() == Some(job.id.as_str()))
                .map(|v| v.id.clone())
        });
        let Some(volume) = volume else { continue };
        let vols = volumes.clone();
        let dir = tokio::task::spawn_blocking(move || {
            vols.provider
                .inspect(&volume)
                .map(|i| i.path.join("wal-archive"))
        })
        .await;
        let Ok(Ok(dir)) = dir else { continue };
        if let Err(e) = ship_dir(&blobs, &dir).await {
            tracing::warn!(target: "resources", dir = %dir.display(), error = %e, "WAL segments not archived to the blobstore");
        }
    }
}

/// Ships every finished file in `dir` (the server writes `NAME.part`, then renames it).
async fn ship_dir(blobs: &Arc<Blobstore>, dir: &std::path::Path) -> Result<(), String> {
    let mut names = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    while let Some(e) = entries.next_entry().await.map_err(|e| e.to_string())? {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".part") && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let blob = format!("{WAL_DIR}{name}");
        if blobs.file(&blob).is_none() {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let body = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
            blobs
                .put(&blob, body, None)
                .await
                .map_err(|e| format!("{blob}: {e}"))?;
            tracing::debug!(target: "resources", segment = %name, "archived a WAL segment");
        }
        tokio::fs::remove_file(&path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// `flynn pg backups capture`: a base backup of the whole server (every resource's
/// database), stored in the blobstore. Answers its path and size.
pub async fn capture(host: &Host) -> ApiResult<flynn_state::blobs::BlobFile> {
    let node = host.node()?;
    let blobs = host
        .blobstore()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("this host runs no blobstore".into()))?;
    let (release, env) = node.state.read(|a| {
        let s = &a.state;
        let release = s
            .jobs
            .current_release(APP)
            .map(|r| r.id.clone())
            .ok_or_else(|| ApiError::Unavailable("the postgres server has no release".into()))?;
        let env = s
            .apps
            .get(APP)
            .map(|a| a.env.global.clone())
            .unwrap_or_default();
        Ok::<_, ApiError>((release, env))
    })?;
    // As the server's superuser, from the primary, as one tar on stdout; the WAL it needs
    // comes from the archive.
    let args = [
        "/bin/sh",
        "-c",
        "exec /usr/lib/postgresql/15/bin/pg_basebackup --host=\"$PGHOST\" --port=\"$PGPORT\" --username=postgres --pgdata=- --format=tar --wal-method=none --checkpoint=fast",
    ]
    .map(String::from)
    .to_vec();
    let mut out = super::dumps::run_client(host, APP, release, env, args, "a base backup").await?;
    // Named for when it ended (a restore to an earlier time cannot use it), so it is kept
    // on disk until then.
    let tmp = host.dir.root().join("tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", tmp.display())))?;
    let spool = tempfile::NamedTempFile::new_in(&tmp)
        .map_err(|e| ApiError::Internal(format!("a spool for the backup: {e}")))?;
    {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(spool.path())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        while let Some(chunk) = out.next().await {
            let chunk = chunk.map_err(|e| ApiError::Unavailable(e.to_string()))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::Internal(format!("spooling the backup: {e}")))?;
        }
        file.flush()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    let path = format!("{BASE_DIR}{}.tar", crate::now_ms());
    let file = tokio::fs::File::open(spool.path())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    blobs
        .put(
            &path,
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024),
            None,
        )
        .await
}

/// The base backups kept, oldest first.
pub fn backups(s: &flynn_state::ClusterState) -> Vec<flynn_state::blobs::BlobFile> {
    let mut v: Vec<_> = s
        .blobs
        .blobs
        .range(BASE_DIR.to_string()..)
        .take_while(|(p, _)| p.starts_with(BASE_DIR))
        .map(|(_, f)| f.clone())
        .collect();
    v.sort_by_key(|f| base_ms(&f.path));
    v
}

/// When a base backup was taken (its name).
pub fn base_ms(path: &str) -> u64 {
    path.trim_start_matches(BASE_DIR)
        .trim_end_matches(".tar")
        .parse()
        .unwrap_or(0)
}

/// Restores `r`'s database to `to` (a time Postgres reads: `2026-12-06 12:00:00+00`), or to
/// the last archived commit: from the latest base backup taken before it and the archive.
pub async fn restore(host: &Host, r: &Resource, to: Option<(String, u64)>) -> ApiResult<()> {
    use crate::archive::TarWriter;
    let node = host.node()?;
    let blobs = host
        .blobstore()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("this host runs no blobstore".into()))?;
    // What the server has written so far is archived first, so "now" is complete.
    switch_and_wait(host).await?;
    let (base, segments) = node.state.read(|a| {
        let s = &a.state;
        let base = backups(s)
            .into_iter()
            .rfind(|b| to.as_ref().is_none_or(|(_, ms)| base_ms(&b.path) < *ms));
        let segments: Vec<_> = s
            .blobs
            .blobs
            .range(WAL_DIR.to_string()..)
            .take_while(|(p, _)| p.starts_with(WAL_DIR))
            .map(|(_, f)| f.clone())
            .collect();
        (base, segments)
    });
    let base = base.ok_or_else(|| {
        ApiError::Invalid(match &to {
            Some((t, _)) => format!(
                "no base backup was taken before {t}: the earliest a database can be restored to is its first backup (flynn pg backups capture)"
            ),
            None => "no base backup yet: capture one first (flynn pg backups capture)".into(),
        })
    })?;
    let (mut client_env, release) = node
        .state
        .read(|a| super::dumps::client_job(&a.state, r).map(|(_, release, env)| (env, release)))?;
    if let Some((t, _)) = &to {
        client_env.insert("FLYNN_RECOVERY_TARGET_TIME".into(), t.clone());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let writer = {
        let blobs = blobs.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let mut w = TarWriter::new(tx);
            let written: std::io::Result<()> = async {
                let content = blobs
                    .open(&base, None)
                    .await
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", base.path)))?;
                w.stream("base.tar", base.size, content).await?;
                for f in &segments {
                    let content = blobs
                        .open(f, None)
                        .await
                        .map_err(|e| std::io::Error::other(format!("{}: {e}", f.path)))?;
                    let name = f.path.trim_start_matches(WAL_DIR);
                    w.stream(&format!("wal/{name}"), f.size, content).await?;
                }
                Ok(())
            }
            .await;
            match written {
                Ok(()) => {
                    let _ = w.finish("pitr", Default::default()).await;
                }
                Err(e) => w.fail(e.to_string()).await,
            }
        })
    };
    let args = ["/bin/sh", "-c", POSTGRES_PITR].map(String::from).to_vec();
    let what = format!("restoring postgres resource {}", r.id);
    let result = super::dumps::run_with_input(
        host,
        APP,
        release,
        client_env,
        args,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        &what,
    )
    .await;
    writer.abort();
    result
}

/// Forces the primary onto a new WAL segment and waits until the one it left is archived.
async fn switch_and_wait(host: &Host) -> ApiResult<()> {
    let node = host.node()?;
    let server = super::leader(node, &format!("{APP}-{PROC_TYPE}"))
        .ok_or_else(|| ApiError::Unavailable("the postgres server is not running".into()))?;
    let su = super::server_env(host, APP, "PGPASSWORD")?;
    let segment = super::postgres::switch_wal(server, &su).await?;
    let blob = format!("{WAL_DIR}{segment}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if node.state.read(|a| a.state.blobs.blobs.contains_key(&blob)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(ApiError::Unavailable(format!(
                "WAL segment {segment} was not archived within 60 s (flynn-host components shows each host's archiving)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The restore job's script (stdin: `base.tar` and `wal/NAME` entries, then a manifest).
const POSTGRES_PITR: &str = r#"set -eu
bin=/usr/lib/postgresql/15/bin
r=$(mktemp -d)
cd "$r"
tar -xf - --exclude=MANIFEST.json
mkdir -m 700 data
tar --warning=no-alone-zero-block -xf base.tar -C data
rm -f base.tar data/postmaster.pid data/standby.signal
: >data/postgresql.auto.conf
touch data/recovery.signal
{
  echo "listen_addresses = ''"
  echo "port = 5499"
  echo "unix_socket_directories = '$r'"
  echo "archive_mode = off"
  echo "synchronous_standby_names = ''"
  echo "hot_standby = on"
  echo "restore_command = 'cp $r/wal/%f %p'"
  echo "recovery_target_timeline = 'latest'"
  echo "recovery_target_action = 'promote'"
  if [ -n "${FLYNN_RECOVERY_TARGET_TIME:-}" ]; then
    echo "recovery_target_time = '$FLYNN_RECOVERY_TARGET_TIME'"
  fi
} >data/flynn.conf
echo "local all all trust" >data/pg_hba.conf
"$bin/postgres" -D data >"$r/log" 2>&1 &
pid=$!
n=0
while :; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "flynn: the database could not be recovered to that point:" >&2
    tail -n 12 "$r/log" >&2
    exit 1
  fi
  state=$("$bin/psql" -h "$r" -p 5499 -U postgres -d postgres -tAc 'SELECT pg_is_in_recovery()' 2>/dev/null || true)
  [ "$state" = f ] && break
  n=$((n+1))
  if [ "$n" -ge 3000 ]; then echo "flynn: recovery did not finish in 10 minutes" >&2; exit 1; fi
  sleep 0.2
done
"$bin/pg_dump" -h "$r" -p 5499 -U postgres --format=custom --no-owner --no-acl "$PGDATABASE" >"$r/db.dump"
kill -INT "$pid"
wait "$pid" || true
"$bin/pg_restore" --clean --if-exists --no-owner --no-acl --single-transaction --exit-on-error --dbname="$PGDATABASE" "$r/db.dump"
rm -rf "$r"
echo "Restored $PGDATABASE to ${FLYNN_RECOVERY_TARGET_TIME:-its last archived commit}." >&2
"#;

/// Milliseconds since the epoch of an RFC 3339 time (`2026-12-06T12:00:00Z`,
/// `2026-12-06 12:00:00.5+01:00`); none if it is not one.
pub fn parse_rfc3339_ms(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() < 20 || !t.is_ascii() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &t[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let f = &frac[..digits];
        ms = format!("{:0<3}", &f[..digits.min(3)]).parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 60 + om)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339_ms;

    #[test]
    fn t10_rfc3339_times_parse_with_offsets_and_fractions_and_nothing_else_does() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-12-06T12:00:00Z"),
            Some(1_796_558_400_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-06 13:00:00.25+01:00"),
            Some(1_796_558_400_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.123456Z"),
            Some(951_782_400_123)
        );
        for bad in [
            "",
            "yesterday",
            "2026-12-06",
            "2026-12-06T12:00:00",
            "2026-13-01T00:00:00Z",
            "2026-12-06T12:00:00+1",
            "2026-12-06T12:00:00Z'; DROP",
            "2026-12-06T12:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
