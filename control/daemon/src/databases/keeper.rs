//! The keeper beside each Postgres server: a component on every host that runs jobs. It
//! follows the shape record for the server job on its host:
//! - it gives a starting server its role (`/data/flynn-role.JOB` on the job's volume);
//! - it reports the server's WAL position and whether it is in recovery;
//! - on the primary it renews the lease through the state, keeps `synchronous_standby_names`
//!   naming the shape's sync and says when that sync has caught up, and promotes a standby
//!   the shape has just made primary;
//! - on a standby it keeps `primary_conninfo` on the shape's primary.
//!
//! Fencing: a primary whose lease was last renewed more than [`FENCE_AFTER`] ago is killed
//! on the spot by a watchdog that needs nothing but this host (its clients are cut off and
//! nothing more is acknowledged), well before the leader counts the lease as lapsed
//! ([`super::failover::LEASE_TTL`]) and promotes the sync. A server that runs as a primary
//! without the shape naming it is killed too; it comes back as a standby and rewinds.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_state::resources::{DbMember, DbShape, ShapeCommand};
use flynn_state::{ClusterState, Job, JobState, ResourcesCommand};
use futures::future::BoxFuture;

use super::failover::{APP, PROC_TYPE};
use crate::component::{Component, LocalState};
use crate::components::volumes::VolumesComponent;
use crate::error::ApiError;
use crate::jobs::JobRunner;

/// How long a primary goes on taking writes without a renewed lease.
pub const FENCE_AFTER: Duration = Duration::from_secs(4);
const TICK: Duration = Duration::from_millis(500);
/// The longest a report may take before it counts as failed (a renewal may take up to
/// [`FENCE_AFTER`], as several are in flight at once).
const REPORT_TIMEOUT: Duration = Duration::from_millis(1500);
const SQL_TIMEOUT: Duration = Duration::from_secs(2);
/// A standby is ready to be promoted once it has flushed what the primary had written this
/// long after it began waiting for it.
const SYNC_SETTLE: Duration = Duration::from_secs(1);
/// How long a standby may go without streaming from a primary that answers before it is
/// restarted, which rewinds it (`postgres.sh`). A standby that received more of the old
/// primary's WAL than the promoted one had cannot follow the new timeline on its own; and
/// while it is the sync, the primary's commits wait for it.
const RESTREAM_AFTER: Duration = Duration::from_secs(12);

/// Parses an LSN (`16/B374D848`) into a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The name a server goes by in replication (`application_name`): its host.
pub fn server_name(host: u64) -> String {
    format!("h{host}")
}

pub struct Keeper {
    host: u64,
    /// Where the server's archived WAL goes (`archive.rs`); none: it stays on the volume.
    blobs: Option<Arc<crate::blobstore::Blobstore>>,
    runner: Arc<JobRunner>,
    volumes: Arc<VolumesComponent>,
    /// The primary job here and when its lease was last renewed (the renewal's send time).
    lease: Mutex<Option<(String, Instant)>>,
    /// What the primary here last read of its sync: (generation, confirmed position, caught
    /// up), carried by the next renewal.
    sync_progress: Mutex<(u64, u64, bool)>,
    /// The job last fenced: it gets no lease again (it is dead; its replacement is another
    /// job), however stale this host's view of the state is while it is cut off.
    fenced: Mutex<Option<String>>,
    inner: tokio::sync::Mutex<Inner>,
    status: Mutex<serde_json::Value>,
}

#[derive(Default)]
struct Inner {
    client: Option<(String, Arc<tokio_postgres::Client>)>,
    roles_written: Vec<String>,
    /// The sync the primary waits for, since when, and its own position a moment later.
    sync_watch: Option<(u64, Instant, Option<u64>)>,
    last_report: Option<(DbMember, Instant)>,
    /// The `synchronous_standby_names` last set, and on which job.
    standby_set: Option<(String, String)>,
    /// Since when the standby here (this job) has not been streaming.
    not_streaming: Option<(String, Instant)>,
}

/// What the keeper reads of the state in one pass.
struct View {
    shape: DbShape,
    job: Option<Job>,
    password: Option<String>,
    primary_addr: Option<String>,
    volume: Option<String>,
}

fn view(s: &ClusterState, host: u64) -> View {
    let shape = s.resources.shapes.get(APP).cloned().unwrap_or_default();
    let job = s
        .jobs
        .jobs
        .values()
        .filter(|j| {
            j.app == APP
                && j.proc_type == PROC_TYPE
                && j.host == host
                && !j.oneoff
                && j.state.is_active()
        })
        .max_by_key(|j| j.created_ms)
        .cloned();
    let volume = job.as_ref().and_then(|j| {
        s.volumes
            .volumes
            .values()
            .find(|v| v.host == host && v.job.as_deref() == Some(j.id.as_str()))
            .map(|v| v.id.clone())
    });
    // Where the service address points: the shape's primary, if it runs.
    let primary_addr = (shape.primary != 0)
        .then(|| flynn_state::resources::service_target(s, &format!("{APP}-{PROC_TYPE}")))
        .flatten();
    View {
        password: s
            .apps
            .get(APP)
            .and_then(|a| a.env.global.get("PGPASSWORD").cloned()),
        shape,
        job,
        primary_addr,
        volume,
    }
}

impl Keeper {
    pub fn new(
        host: u64,
        runner: Arc<JobRunner>,
        volumes: Arc<VolumesComponent>,
        blobs: Option<Arc<crate::blobstore::Blobstore>>,
    ) -> Self {
        Keeper {
            host,
            blobs,
            runner,
            volumes,
            lease: Mutex::new(None),
            sync_progress: Mutex::new((0, 0, false)),
            fenced: Mutex::new(None),
            inner: tokio::sync::Mutex::new(Inner::default()),
            status: Mutex::new(serde_json::json!({"server": null})),
        }
    }

    /// Kills the primary here when its lease has not been renewed in time.
    async fn watchdog(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let overdue = {
                let lease = self.lease.lock().expect("lease lock");
                lease
                    .as_ref()
                    .filter(|(_, at)| at.elapsed() > FENCE_AFTER)
                    .map(|(job, _)| job.clone())
            };
            if let Some(job) = overdue {
                self.fence(&job, "its lease was not renewed in time");
            }
        }
    }

    /// Renews the lease of the primary here every [`TICK`], on its own: nothing the
    /// server does (a slow promotion, a hung query) holds it up. What it carries of the
    /// sync comes from the last pass.
    async fn renewer(self: Arc<Self>, local: LocalState) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (generation, job) = local.read(|s| {
                let v = view(s, self.host);
                let running = v.job.filter(|j| j.state == JobState::Running);
                (
                    v.shape.generation,
                    running.filter(|_| v.shape.primary == self.host),
                )
            });
            let Some(job) = job else { continue };
            if self.fenced.lock().expect("fenced lock").as_deref() == Some(job.id.as_str()) {
                continue;
            }
            {
                let mut lease = self.lease.lock().expect("lease lock");
                if lease.as_ref().is_none_or(|(j, _)| *j != job.id) {
                    // Newly primary here: the lease runs from now.
                    *lease = Some((job.id.clone(), Instant::now()));
                }
            }
            let (seen, confirmed, ready) = *self.sync_progress.lock().expect("progress lock");
            let (confirmed, ready) = if seen == generation {
                (confirmed, ready)
            } else {
                (0, false)
            };
            let sent = Instant::now();
            let renew = ResourcesCommand::Shape(ShapeCommand::Renew {
                app: APP.into(),
                generation,
                host: self.host,
                confirmed_lsn: confirmed,
                sync_ready: ready,
            });
            // Each renewal on its own: one slow commit does not hold up the next.
            let (me, local) = (self.clone(), local.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(FENCE_AFTER, local.node().propose(renew)).await {
                    Ok(Ok(_)) => {
                        let mut lease = me.lease.lock().expect("lease lock");
                        if lease
                            .as_ref()
                            .is_some_and(|(j, last)| *j == job.id && *last < sent)
                        {
                            *lease = Some((job.id.clone(), sent));
                        }
                    }
                    Ok(Err(ApiError::Conflict(why))) => me.fence(&job.id, &why),
                    Ok(Err(e)) => {
                        tracing::info!(target: "resources", error = %e, leader = ?local.node().leader(), "lease not renewed")
                    }
                    Err(_) => {
                        tracing::info!(target: "resources", leader = ?local.node().leader(), "lease renewal timed out")
                    }
                }
            });
        }
    }

    fn fence(&self, job: &str, why: &str) {
        *self.lease.lock().expect("lease lock") = None;
        *self.fenced.lock().expect("fenced lock") = Some(job.to_string());
        let killed = self.runner.fence(job);
        tracing::warn!(target: "resources", job, killed, why, "fenced the postgres server: it takes no more writes");
    }

    async fn pass(&self, local: &LocalState) {
        let v = local.read(|s| view(s, self.host));
        let mut inner = self.inner.lock().await;
        let Some(job) = v.job.clone() else {
            *self.lease.lock().expect("lease lock") = None;
            inner.client = None;
            *self.status.lock().expect("status") = serde_json::json!({"server": null});
            return;
        };
        if job.state == JobState::Pending || job.state == JobState::Starting {
            self.give_role(&mut inner, &v, &job).await;
        }
        let (Some(addr), Some(password), JobState::Running) =
            (job.addr.clone(), v.password.clone(), job.state)
        else {
            return;
        };
        let primary_here = v.shape.primary == self.host;
        if !primary_here {
            *self.lease.lock().expect("lease lock") = None;
        }
        let client = match self.client(&mut inner, &job.id, &addr, &password).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(job = %job.id, error = %e, "the postgres server does not answer yet");
                return;
            }
        };
        let row = match sql(client.query_one(
            "SELECT pg_is_in_recovery(), \
               (CASE WHEN pg_is_in_recovery() \
                  THEN COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
                  ELSE pg_current_wal_flush_lsn() END)::text, \
               current_setting('synchronous_standby_names'), \
               current_setting('primary_conninfo')",
            &[],
        ))
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(job = %job.id, error = %e, "reading the server's position");
                inner.client = None;
                return;
            }
        };
        let in_recovery: bool = row.get(0);
        let lsn = row
            .get::<_, Option<String>>(1)
            .and_then(|t| parse_lsn(&t))
            .unwrap_or(0);
        let standby_names: String = row.get(2);
        let conninfo: String = row.get(3);
        if primary_here {
            self.as_primary(
                &mut inner,
                &v,
                &job,
                &client,
                in_recovery,
                lsn,
                &standby_names,
            )
            .await;
        } else if v.shape.primary != 0 {
            if !in_recovery {
                // Writable without the shape's say: it may not take one more write.
                self.fence(&job.id, "it runs as a primary but the shape names another");
                return;
            }
            if let Some(primary) = &v.primary_addr {
                self.follow(&client, primary, &password, &conninfo).await;
                if self
                    .stalled(&mut inner, &job.id, &client, primary, &password)
                    .await
                {
                    tracing::warn!(target: "resources", job = %job.id, primary, "the standby has not streamed from the primary for {} s although the primary answers (its history has diverged): restarting it, which rewinds it", RESTREAM_AFTER.as_secs());
                    inner.not_streaming = None;
                    inner.client = None;
                    self.runner.fence(&job.id);
                    return;
                }
            }
        }
        let member = DbMember {
            job: job.id.clone(),
            addr: addr.clone(),
            lsn,
            in_recovery,
            reported_ms: crate::now_ms(),
        };
        let due = inner.last_report.as_ref().is_none_or(|(m, at)| {
            m.lsn != member.lsn
                || m.in_recovery != member.in_recovery
                || m.job != member.job
                || at.elapsed() > Duration::from_secs(3)
        });
        if due {
            let cmd = ResourcesCommand::Shape(ShapeCommand::Report {
                app: APP.into(),
                host: self.host,
                member: member.clone(),
            });
            if let Ok(Ok(_)) = tokio::time::timeout(REPORT_TIMEOUT, local.node().propose(cmd)).await
            {
                inner.last_report = Some((member, Instant::now()));
            }
        }
        *self.status.lock().expect("status") = serde_json::json!({
            "server": job.id,
            "role": if primary_here { "primary" } else if v.shape.sync == self.host { "sync" } else { "async" },
            "generation": v.shape.generation,
            "in_recovery": in_recovery,
            "lsn": fmt_lsn(lsn),
        });
    }

    /// The primary's turn (its lease is renewed apart, by [`Self::renewer`]): judge whether
    /// the shape's sync has caught up, promote the server if the shape has just made it
    /// primary, and keep `synchronous_standby_names` on the shape's sync.
    #[allow(clippy::too_many_arguments)]
    async fn as_primary(
        &self,
        inner: &mut Inner,
        v: &View,
        job: &Job,
        client: &tokio_postgres::Client,
        in_recovery: bool,
        lsn: u64,
        standby_names: &str,
    ) {
        let want = if v.shape.sync != 0 {
            server_name(v.shape.sync)
        } else {
            String::new()
        };
        // What the sync has flushed, and whether it has caught up: it has flushed what this
        // server had written a moment after it began waiting for it, so it holds every
        // commit acknowledged.
        let mut confirmed = 0;
        let mut ready = false;
        let waiting_for_it = !in_recovery && standby_names == want;
        if v.shape.sync != 0 && waiting_for_it {
            let row = sql(client.query_opt(
                "SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&want],
            ))
            .await;
            confirmed = match row {
                Ok(Some(r)) => r
                    .get::<_, Option<String>>(0)
                    .and_then(|t| parse_lsn(&t))
                    .unwrap_or(0),
                _ => 0,
            };
            match &mut inner.sync_watch {
                Some((sync, since, mark)) if *sync == v.shape.sync => {
                    if mark.is_none() && since.elapsed() >= SYNC_SETTLE {
                        *mark = Some(lsn);
                    }
                    ready = mark.is_some_and(|m| confirmed >= m);
                }
                _ => inner.sync_watch = Some((v.shape.sync, Instant::now(), None)),
            }
        }
        *self.sync_progress.lock().expect("progress lock") = (v.shape.generation, confirmed, ready);
        if in_recovery {
            tracing::info!(target: "resources", job = %job.id, generation = v.shape.generation, "promoting the standby the shape made primary");
            if let Err(e) = sql(client.execute("SELECT pg_promote(true, 60)", &[])).await {
                tracing::warn!(job = %job.id, error = %e, "promotion failed");
            }
            return;
        }
        // Set once per job and value: the session's own view of a reloaded setting may lag.
        let set = (job.id.clone(), want.clone());
        if standby_names != want && inner.standby_set.as_ref() != Some(&set) {
            let alter = format!("ALTER SYSTEM SET synchronous_standby_names = '{want}'");
            match reconfigure(client, &alter).await {
                Ok(()) => {
                    inner.standby_set = Some(set);
                    inner.sync_watch = None;
                }
                Err(e) => tracing::warn!(error = %e, "synchronous_standby_names not set"),
            }
        }
    }

    /// Points a standby at the primary (`primary_conninfo`, reloaded).
    async fn follow(
        &self,
        client: &tokio_postgres::Client,
        primary: &str,
        password: &str,
        current: &str,
    ) {
        let Some((ip, port)) = primary.rsplit_once(':') else {
            return;
        };
        let want = format!(
            "host={ip} port={port} user=postgres password={password} application_name={}",
            server_name(self.host)
        );
        if current == want {
            return;
        }
        tracing::info!(target: "resources", primary, "following the primary");
        let set = format!("ALTER SYSTEM SET primary_conninfo = '{want}'");
        if let Err(e) = reconfigure(client, &set).await {
            tracing::warn!(error = %e, "primary_conninfo not set");
        }
    }

    /// Whether the standby here has gone [`RESTREAM_AFTER`] without streaming while the
    /// primary answers as a primary (so the fault is the standby's, and a restart mends it).
    async fn stalled(
        &self,
        inner: &mut Inner,
        job: &str,
        client: &tokio_postgres::Client,
        primary: &str,
        password: &str,
    ) -> bool {
        let streaming = sql(client.query_opt("SELECT status FROM pg_stat_wal_receiver", &[]))
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, Option<String>>(0).as_deref() == Some("streaming"));
        if streaming {
            inner.not_streaming = None;
            return false;
        }
        let since = match &inner.not_streaming {
            Some((j, since)) if j == job => *since,
            _ => {
                inner.not_streaming = Some((job.to_string(), Instant::now()));
                return false;
            }
        };
        since.elapsed() >= RESTREAM_AFTER && primary_answers(primary, password).await
    }

    /// Writes a starting server's role on its volume, once the shape can say it.
    async fn give_role(&self, inner: &mut Inner, v: &View, job: &Job) {
        if inner.roles_written.contains(&job.id) || v.shape.primary == 0 {
            return;
        }
        let role = if v.shape.primary == self.host {
            "primary".to_string()
        } else {
            let Some((ip, port)) = v.primary_addr.as_deref().and_then(|a| a.rsplit_once(':'))
            else {
                return; // the primary is not serving yet
            };
            format!("standby {ip} {port}")
        };
        let Some(volume) = v.volume.clone() else {
            return;
        };
        let volumes = self.volumes.clone();
        let file = format!("flynn-role.{}", job.id);
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<Option<PathBuf>> {
            use std::os::unix::fs::MetadataExt;
            let info = volumes
                .provider
                .inspect(&volume)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let dir = PathBuf::from(&info.path);
            let meta = std::fs::metadata(&dir)?;
            if meta.uid() == 0 {
                // A new volume is given to the server's user by its init only while it is
                // empty: the role waits until then.
                return Ok(None);
            }
            let path = dir.join(&file);
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, format!("{role}\n"))?;
            std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
            std::fs::rename(&tmp, &path)?;
            Ok(Some(path))
        })
        .await;
        match written {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(path))) => {
                tracing::info!(target: "resources", job = %job.id, path = %path.display(), "gave the postgres server its role");
                inner.roles_written.push(job.id.clone());
                if inner.roles_written.len() > 16 {
                    inner.roles_written.remove(0);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(job = %job.id, error = %e, "the server's role not written")
            }
            Err(e) => tracing::warn!(error = %e, "role writer"),
        }
    }

    async fn client(
        &self,
        inner: &mut Inner,
        job: &str,
        addr: &str,
        password: &str,
    ) -> Result<Arc<tokio_postgres::Client>, String> {
        let fresh = inner
            .client
            .as_ref()
            .is_some_and(|(j, c)| j == job && !c.is_closed());
        if !fresh {
            let client = connect(addr, password).await?;
            inner.client = Some((job.to_string(), Arc::new(client)));
        }
        Ok(inner.client.as_ref().expect("just set").1.clone())
    }
}

/// A superuser session on the server at `addr` (`IP:PORT`), its connection driven in the
/// background.
async fn connect(addr: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let (ip, port) = addr.rsplit_once(':').ok_or("no port")?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(ip)
        .port(port.parse().map_err(|_| "bad port")?)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .application_name("flynn-keeper")
        .connect_timeout(SQL_TIMEOUT);
    let (client, conn) = tokio::time::timeout(SQL_TIMEOUT, cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Whether the server at `addr` takes a connection and is a primary.
async fn primary_answers(addr: &str, password: &str) -> bool {
    let Ok(client) = connect(addr, password).await else {
        return false;
    };
    sql(client.query_one("SELECT pg_is_in_recovery()", &[]))
        .await
        .is_ok_and(|r| !r.get::<_, bool>(0))
}

/// Runs one `ALTER SYSTEM` and reloads the configuration (two statements: ALTER SYSTEM
/// cannot run inside the transaction a multi-statement query makes).
async fn reconfigure(client: &tokio_postgres::Client, alter: &str) -> Result<(), String> {
    sql(client.batch_execute(alter)).await?;
    sql(client.batch_execute("SELECT pg_reload_conf()")).await
}

/// A query bounded in time (a server whose commits hang still answers these).
async fn sql<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(SQL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())),
        Err(_) => Err("timed out".into()),
    }
}

impl Component for Keeper {
    fn name(&self) -> &'static str {
        "postgres-keeper"
    }

    fn follow(self: Arc<Self>, local: LocalState) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            tokio::spawn(self.clone().watchdog());
            tokio::spawn(self.clone().renewer(local.clone()));
            if let Some(blobs) = self.blobs.clone() {
                tokio::spawn(super::archive::shipper(
                    local.clone(),
                    self.host,
                    self.volumes.clone(),
                    blobs,
                ));
            }
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.pass(&local).await;
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        self.status.lock().expect("status").clone()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn t10_lsns_parse_and_print_as_postgres_writes_them() {
        assert_eq!(super::parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(
            super::parse_lsn("16/B374D848"),
            Some((0x16 << 32) | 0xB374D848)
        );
        assert_eq!(super::parse_lsn("nope"), None);
        assert_eq!(super::fmt_lsn(0x16_B374_D848), "16/B374D848");
    }
}
