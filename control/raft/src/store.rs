//! RocksDB-backed Raft log and state machine, sharing one database (and so one WAL).
//!
//! Durability: a log append is readable as soon as `append` returns and is acknowledged to
//! openraft only after a WAL fsync. The leader's own appends are grouped: a flusher thread
//! syncs the WAL once for every append queued since its last sync (group commit), while
//! openraft replicates them. A follower's append (entries of another host's term) is
//! written with a synced write in `append` itself: it answers its leader only once that is
//! done anyway, and the hand-off to the flusher and back cost it a thread wake-up each way.
//! The last appended entries stay in memory too ([`RECENT_ENTRIES`]), so replication reads
//! them without a RocksDB iterator and a decode per follower. Votes are written with a
//! synced write. State machine writes are not synced themselves: the WAL is sequential, so the
//! next synced write (log append, vote, purge) persists them, and a lost tail is re-applied
//! from the log on restart. The committed index rides in the apply batch that follows it
//! (one write per commit, not two), and an apply batch is written before its state is
//! readable: a restart after a process crash never shows a reader less than it saw. (A power
//! loss can still take an unsynced tail of applied state, as it always could; the host
//! restarts behind and catches up. Reads through a read barrier never see that.)

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine, Snapshot,
};
use openraft::{BasicNode, EntryPayload, OptionalSend};
use openraft_legacy::network_v1::SnapshotReceiverFactory;
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use flynn_state::{ClusterState, Event};

use crate::{Entry, LogId, NodeId, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig, Vote};

type StorageResult<T> = Result<T, std::io::Error>;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const SM_APPLIED: &[u8] = b"~applied";
const SM_MEMBERSHIP: &[u8] = b"~membership";

/// How many recent events a watcher can resume from; older revisions get a full resync.
const EVENT_HISTORY: usize = 16_384;

/// A storage error that says what was being done (openraft 0.10 takes `io::Error`).
fn io_err(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StorageResult<T> {
    serde_json::from_slice(bytes).map_err(|e| io_err("decoding a stored record", e))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft records always serialize")
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Opens (or creates) the store under `dir`.
pub fn open(dir: &Path) -> StorageResult<(LogStore, StateMachine)> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = [CF_LOG, CF_META, CF_SM]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db =
        DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| io_err("opening the store", e))?;
    let db = Arc::new(db);
    let committed = CommittedCell::default();
    let log = LogStore::new(db.clone(), committed.clone());
    let sm = StateMachine::load(db, committed)?;
    Ok((log, sm))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column families are created at open")
}

fn synced() -> rocksdb::WriteOptions {
    let mut w = rocksdb::WriteOptions::default();
    w.set_sync(true);
    w
}

// ---------------------------------------------------------------- log store

/// The Raft log. Cloning shares the database; openraft uses clones as log readers.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
    committed: CommittedCell,
    /// This host's node id, once known ([`LogStore::for_node`]): entries of another host's
    /// term are synced inline.
    own_id: Option<NodeId>,
    recent: Arc<std::sync::Mutex<RecentEntries>>,
}

/// How many of the last appended entries are kept in memory, and their most bytes (as
/// stored): enough for replication to followers that keep up, small beside the state.
pub const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 8 << 20;

/// The log's tail, in memory: consecutive entries ending at the last one appended.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.log_id.index;
        // openraft truncates what an append replaces first; whatever comes, the tail stays
        // consecutive.
        self.keep_below(index);
        if self
            .entries
            .back()
            .is_some_and(|(last, _)| last.log_id.index + 1 != index)
        {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let (_, size) = self.entries.pop_front().expect("not empty");
            self.bytes -= size;
        }
    }

    /// Drops the entries at `index` and after.
    fn keep_below(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            let (_, size) = self.entries.pop_back().expect("not empty");
            self.bytes -= size;
        }
    }

    /// Drops the entries at `index` and before.
    fn keep_above(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            let (_, size) = self.entries.pop_front().expect("not empty");
            self.bytes -= size;
        }
    }

    /// `start..=end` (`None`: to the last), if all of it is here.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.0.log_id.index;
        let end = end.unwrap_or(last);
        if start < first || end > last {
            return None;
        }
        if start > end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let count = (end - start + 1) as usize;
        Some(
            self.entries
                .iter()
                .skip(from)
                .take(count)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// The last committed log id openraft reported, shared by the log store (which is told) and
/// the state machine (whose next apply batch writes it).
type CommittedCell = Arc<std::sync::Mutex<Option<LogId>>>;

/// The WAL-sync thread. When the last log store goes, the thread is stopped and joined,
/// so its handle on the database is released before the caller goes on: otherwise the
/// database could be closed on that thread while the process exits around it (a crash in
/// RocksDB's teardown at exit).
struct Flusher {
    tx: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take(); // the thread's receive loop ends once the queue is drained
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    fn new(db: Arc<DB>, committed: CommittedCell) -> Self {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let flush_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued by now rides on this one fsync.
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let started = std::time::Instant::now();
                    let result = flush_db.flush_wal(true).map_err(std::io::Error::other);
                    crate::metrics::WAL_FSYNC.observe_duration(started.elapsed());
                    for cb in batch {
                        cb.io_completed(
                            result
                                .as_ref()
                                .map(|_| ())
                                .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
                        );
                    }
                }
            })
            .expect("spawn wal sync thread");
        LogStore {
            db,
            flusher: Arc::new(Flusher {
                tx: Some(tx),
                thread: Some(thread),
            }),
            committed,
            own_id: None,
            recent: Arc::default(),
        }
    }

    /// Tells the store which node it belongs to, so a follower's appends are synced inline.
    pub fn for_node(mut self, id: NodeId) -> Self {
        self.own_id = Some(id);
        self
    }

    fn meta_get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        self.db
            .get_cf(cf(&self.db, CF_META), key)
            .map_err(|e| io_err("reading raft metadata", e))?
            .map(|b| decode(&b))
            .transpose()
    }

    fn last_entry_log_id(&self) -> StorageResult<Option<LogId>> {
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(Err(e)) => Err(io_err("reading the log", e)),
            Some(Ok((_, v))) => Ok(Some(decode::<Entry>(&v)?.log_id)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(i) => Some(i - 1),
            Bound::Unbounded => None,
        };
        if let Some(entries) = self
            .recent
            .lock()
            .expect("recent entries lock")
            .get(start, end)
        {
            return Ok(entries);
        }
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| io_err("reading the log", e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log keys"));
            if !range.contains(&index) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote>> {
        self.meta_get(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.meta_get(KEY_LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> StorageResult<()> {
        self.db
            .put_cf_opt(cf(&self.db, CF_META), KEY_VOTE, encode(vote), &synced())
            .map_err(|e| io_err("saving the vote", e))
    }

    /// Kept for the next apply batch, which follows every commit: a separate write here
    /// cost each host a WAL write per commit, on the way from a quorum's ack to the apply.
    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        *self.committed.lock().expect("committed lock") = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        if let Some(c) = *self.committed.lock().expect("committed lock") {
            return Ok(Some(c));
        }
        Ok(self.meta_get::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = encode(&entry);
            batch.put_cf(log, index_key(entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        let n = appended.len() as u64;
        crate::metrics::APPENDED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        // Entries of another host's term: this host follows, and answers its leader only
        // once they are durable, so they are synced here, with no thread to wake and wait on.
        // That holds this worker for the fsync; the runtime's other workers take its queued
        // tasks meanwhile. A runtime of one worker would stall whole, so it uses the sync
        // thread. (`block_in_place` would hand the worker's queue over instead, but measured
        // 0.04-0.07 ms per write more, nearly all that this saves.)
        let following = match (self.own_id, appended.last()) {
            (Some(me), Some((last, _))) => last.log_id.leader_id.node_id != me,
            _ => false,
        } && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.metrics().num_workers() >= 2);
        let started = std::time::Instant::now();
        let written = if following {
            self.db.write_opt(batch, &synced())
        } else {
            self.db.write(batch)
        };
        written.map_err(|e| io_err("appending to the log", e))?;
        if following {
            crate::metrics::WAL_FSYNC.observe_duration(started.elapsed());
        }
        {
            let mut recent = self.recent.lock().expect("recent entries lock");
            for (entry, size) in appended {
                recent.push(entry, size);
            }
        }
        if following {
            crate::metrics::WAL_FSYNC_INLINE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // Readable now; durable once the flusher's fsync completes.
        let sent = match &self.flusher.tx {
            Some(tx) => tx.send(callback).map_err(|mpsc::SendError(cb)| cb),
            None => Err(callback),
        };
        if let Err(cb) = sent {
            cb.io_completed(Err(std::io::Error::other("wal sync thread is gone")));
        }
        Ok(())
    }

    /// Removes every entry after `last_log_id` (all of them for `None`).
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> StorageResult<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.recent
            .lock()
            .expect("recent entries lock")
            .keep_below(from);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG), index_key(from), index_key(u64::MAX));
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| io_err("truncating the log", e))
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        self.recent
            .lock()
            .expect("recent entries lock")
            .keep_above(log_id.index);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), KEY_LAST_PURGED, encode(&log_id));
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            index_key(0),
            index_key(log_id.index + 1),
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| io_err("purging the log", e))
    }
}

// ---------------------------------------------------------------- state machine

/// What watchers receive: an event, or word that history was replaced wholesale (a snapshot
/// was installed) and they must resync from the current state.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(Event),
    Reset,
}

/// The applied cluster state, shared between the state machine and the API's readers.
pub struct Applied {
    pub state: ClusterState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Recent events, oldest first, for watchers resuming from a revision.
    pub recent: VecDeque<Event>,
    /// `recent` holds every event after this revision.
    pub history_complete_since: u64,
}

impl Applied {
    /// Events after `revision`, or `None` when some of them are no longer in memory.
    pub fn events_since(&self, revision: u64) -> Option<Vec<Event>> {
        if revision < self.history_complete_since {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|e| e.revision > revision)
                .cloned()
                .collect(),
        )
    }
}

/// Handle the API uses to read applied state and subscribe to changes.
#[derive(Clone)]
pub struct StateHandle {
    inner: Arc<RwLock<Applied>>,
    events: broadcast::Sender<WatchItem>,
    /// The applied log index, bumped after every apply batch, snapshot install and
    /// membership change: the one subscription a host's components follow.
    applied: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateHandle {
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.inner.read().expect("state lock poisoned"))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WatchItem> {
        self.events.subscribe()
    }

    /// Wakes on every change of the applied state (new entries, a snapshot, membership).
    /// Components read what they need from [`StateHandle::read`] when it fires; a burst of
    /// changes wakes them once.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn notify_applied(&self) {
        let index = self.read(|a| a.last_applied.map_or(0, |l| l.index));
        self.applied.send_replace(index);
    }
}

pub struct StateMachine {
    db: Arc<DB>,
    handle: StateHandle,
    committed: CommittedCell,
}

#[derive(Serialize, Deserialize)]
struct SnapshotBlob {
    /// With an id, as 0.9 kept it: a host of an older build reads this blob unchanged.
    meta: openraft_legacy::network_v1::SnapshotMeta<TypeConfig>,
    state: ClusterState,
}

impl StateMachine {
    fn load(db: Arc<DB>, committed: CommittedCell) -> StorageResult<Self> {
        let mut state = ClusterState::default();
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        for item in db.iterator_cf(cf(&db, CF_SM), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| io_err("reading the state", e))?;
            match k.as_ref() {
                SM_APPLIED => last_applied = decode(&v)?,
                SM_MEMBERSHIP => membership = decode(&v)?,
                key => {
                    let key = std::str::from_utf8(key).unwrap_or_default();
                    state
                        .load_record(key, &v)
                        .map_err(|e| io_err(&format!("bad state record {key}"), e))?;
                }
            }
        }
        let (events, _) = broadcast::channel(4096);
        let applied = Applied {
            history_complete_since: state.revision,
            state,
            last_applied,
            membership,
            recent: VecDeque::new(),
        };
        Ok(StateMachine {
            db,
            handle: StateHandle {
                inner: Arc::new(RwLock::new(applied)),
                events,
                applied: Arc::new(tokio::sync::watch::channel(0).0),
            },
            committed,
        })
    }

    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    /// Writes every record of `state` in place of what the table holds now.
    fn rewrite(&self, applied: &Applied) -> StorageResult<()> {
        let sm = cf(&self.db, CF_SM);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(sm, [0u8].as_slice(), [0xffu8; 8].as_slice());
        for (key, value) in applied.state.records() {
            batch.put_cf(sm, key, value);
        }
        batch.put_cf(sm, SM_APPLIED, encode(&applied.last_applied));
        batch.put_cf(sm, SM_MEMBERSHIP, encode(&applied.membership));
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| io_err("writing the state", e))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId>, StoredMembership)> {
        Ok(self.handle.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> StorageResult<()>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        // The batch is applied under one lock and one write, made before the lock is let go
        // (so nothing is read that a restart could take back); each caller is answered once
        // all of it is applied and readable, as 0.9's returned results were.
        let entries: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let started = std::time::Instant::now();
        let mut results = Vec::new();
        let mut new_events = Vec::new();
        let mut replaced = false;
        {
            let mut guard = self.handle.inner.write().expect("state lock poisoned");
            let applied = &mut *guard;
            for (entry, responder) in entries {
                applied.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => Ok(flynn_state::Response::Done),
                    EntryPayload::Normal(cmd) => {
                        let replaces = flynn_state::ClusterState::replaces_all(&cmd);
                        let (result, events) = applied.state.apply(cmd);
                        replaced |= replaces && result.is_ok();
                        new_events.extend(events);
                        result
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        Ok(flynn_state::Response::Done)
                    }
                };
                if let Some(responder) = responder {
                    results.push((responder, result));
                }
            }
            let sm = cf(&self.db, CF_SM);
            let mut batch = WriteBatch::default();
            for (table, key) in applied.state.take_dirty() {
                let name = format!("{}{key}", table.0);
                match applied.state.record(table, &key) {
                    Some(v) => batch.put_cf(sm, name, v),
                    None => batch.delete_cf(sm, name),
                }
            }
            batch.put_cf(sm, SM_APPLIED, encode(&applied.last_applied));
            batch.put_cf(sm, SM_MEMBERSHIP, encode(&applied.membership));
            let committed = *self.committed.lock().expect("committed lock");
            if committed.is_some() {
                batch.put_cf(cf(&self.db, CF_META), KEY_COMMITTED, encode(&committed));
            }
            if replaced {
                // The events before it describe a state that is gone: watchers resync.
                applied.recent.clear();
                applied.history_complete_since = applied.state.revision;
                new_events.clear();
            }
            for e in &new_events {
                if applied.recent.len() == EVENT_HISTORY {
                    let dropped = applied.recent.pop_front().expect("full");
                    applied.history_complete_since = dropped.revision;
                }
                applied.recent.push_back(e.clone());
            }
            self.db
                .write(batch)
                .map_err(|e| io_err("writing the applied state", e))?;
        }
        for e in new_events {
            // No subscribers is fine: the history buffer above still has it.
            let _ = self.handle.events.send(WatchItem::Event(e));
        }
        if replaced {
            let _ = self.handle.events.send(WatchItem::Reset);
        }
        crate::metrics::APPLY.observe_duration(started.elapsed());
        self.handle.notify_applied();
        for (responder, result) in results {
            responder.send(result);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            handle: self.handle.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        crate::metrics::SNAPSHOT_BYTES
            .store(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let blob: SnapshotBlob = serde_json::from_slice(&data)
            .map_err(|e| io_err(&format!("reading snapshot {:?}", meta.signature()), e))?;
        {
            let mut guard = self.handle.inner.write().expect("state lock poisoned");
            guard.state = blob.state;
            guard.state.clear_dirty();
            guard.last_applied = meta.last_log_id;
            guard.membership = meta.last_membership.clone();
            guard.recent.clear();
            guard.history_complete_since = guard.state.revision;
            self.rewrite(&guard)?;
        }
        self.db
            .put_cf_opt(cf(&self.db, CF_META), KEY_SNAPSHOT, data, &synced())
            .map_err(|e| io_err(&format!("saving snapshot {:?}", meta.signature()), e))?;
        crate::metrics::SNAPSHOTS_INSTALLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.handle.events.send(WatchItem::Reset);
        self.handle.notify_applied();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<CurrentSnapshot>> {
        let Some(data) = self
            .db
            .get_cf(cf(&self.db, CF_META), KEY_SNAPSHOT)
            .map_err(|e| io_err("reading the snapshot", e))?
        else {
            return Ok(None);
        };
        let blob: SnapshotBlob = decode(&data)?;
        Ok(Some(Snapshot {
            meta: blob.meta.into_meta(),
            snapshot: Cursor::new(data),
        }))
    }
}

/// A snapshot as openraft hands it around: its meta and its bytes.
type CurrentSnapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// A host of an older build sends a snapshot in chunks (openraft 0.9's InstallSnapshot);
/// they are gathered here, then installed whole.
impl SnapshotReceiverFactory<TypeConfig> for StateMachine {
    type SnapshotReceiver = SnapshotData;

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<SnapshotData> {
        Ok(Cursor::new(Vec::new()))
    }
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    handle: StateHandle,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> StorageResult<CurrentSnapshot> {
        let started = std::time::Instant::now();
        let (state, last_applied, membership) = self
            .handle
            .read(|a| (a.state.clone(), a.last_applied, a.membership.clone()));
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
        };
        let revision = state.revision;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{revision}", l.leader_id, l.index),
            None => format!("none-{revision}"),
        };
        let data = encode(&SnapshotBlob {
            meta: openraft_legacy::network_v1::SnapshotMeta::new(meta.clone(), snapshot_id),
            state,
        });
        self.db
            .put_cf_opt(cf(&self.db, CF_META), KEY_SNAPSHOT, &data, &synced())
            .map_err(|e| io_err(&format!("saving snapshot {:?}", meta.signature()), e))?;
        crate::metrics::SNAPSHOT_SAVE.observe_duration(started.elapsed());
        crate::metrics::SNAPSHOT_BYTES
            .store(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

/// Reads the applied state of a stopped host's data dir (for recovery and backups).
pub fn read_applied_state(
    dir: &Path,
) -> StorageResult<(ClusterState, BTreeMap<NodeId, BasicNode>)> {
    let (_, sm) = open(dir)?;
    Ok(sm.handle.read(|a| {
        (
            a.state.clone(),
            a.membership
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect(),
        )
    }))
}

#[cfg(test)]
mod tests {
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::EntryPayload;

    use super::{RecentEntries, RECENT_BYTES, RECENT_ENTRIES};
    use crate::{Entry, LogId};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(LeaderId { term, node_id: 1 }, index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(got: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        got.map(|v| {
            v.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect()
        })
    }

    #[test]
    fn t01_the_tail_answers_only_what_it_holds_whole() {
        let mut r = RecentEntries::default();
        assert_eq!(indexes(r.get(1, None)), None, "empty: the database answers");
        for i in 5..=9 {
            r.push(entry(1, i), 10);
        }
        assert_eq!(
            indexes(r.get(6, Some(8))),
            Some(vec![(1, 6), (1, 7), (1, 8)])
        );
        assert_eq!(indexes(r.get(8, None)), Some(vec![(1, 8), (1, 9)]));
        assert_eq!(
            indexes(r.get(10, None)),
            Some(vec![]),
            "past the end: nothing"
        );
        assert_eq!(indexes(r.get(4, Some(6))), None, "starts before the tail");
        assert_eq!(indexes(r.get(8, Some(10))), None, "ends after the log");
    }

    #[test]
    fn t02_a_truncation_and_a_new_term_replace_the_end() {
        let mut r = RecentEntries::default();
        for i in 1..=5 {
            r.push(entry(1, i), 10);
        }
        r.keep_below(4);
        r.push(entry(2, 4), 10);
        assert_eq!(
            indexes(r.get(3, None)),
            Some(vec![(1, 3), (2, 4)]),
            "entry 5 of term 1 is gone"
        );
        // Without a truncation first, an append over the end still replaces it.
        r.push(entry(3, 2), 10);
        assert_eq!(indexes(r.get(1, None)), Some(vec![(1, 1), (3, 2)]));
        assert_eq!(r.bytes, 20);
        // A gap (a snapshot installed past the tail): the old tail goes.
        r.push(entry(3, 50), 10);
        assert_eq!(indexes(r.get(1, None)), None);
        assert_eq!(indexes(r.get(50, None)), Some(vec![(3, 50)]));
        assert_eq!(r.bytes, 10);
    }

    #[test]
    fn t03_a_purge_and_the_bounds_drop_the_oldest() {
        let mut r = RecentEntries::default();
        for i in 1..=10 {
            r.push(entry(1, i), 10);
        }
        r.keep_above(4);
        assert_eq!(r.first_index(), Some(5));
        assert_eq!(
            indexes(r.get(4, Some(5))),
            None,
            "purged entries are not served"
        );
        for i in 11..=(RECENT_ENTRIES as u64 + 20) {
            r.push(entry(1, i), 10);
        }
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
        assert_eq!(r.first_index(), Some(21));
        r.push(entry(1, RECENT_ENTRIES as u64 + 21), RECENT_BYTES);
        assert_eq!(
            r.entries.len(),
            1,
            "one entry at the byte bound pushes out the rest"
        );
        assert_eq!(r.bytes, RECENT_BYTES);
    }
}
