//! Durable storage of one raft group: its log, vote and state machine in one redb file.
//!
//! # Shape
//!
//! * One [`redb::Database`] per group (`<dir>/raft.redb`), shared by an [`Arc`] between the log
//!   store ([`RedbLogStore`], also its own log reader) and the state machine
//!   ([`RedbStateMachine`], also its own snapshot builder). redb serializes writers and gives
//!   readers a consistent MVCC view, so a snapshot is built from a read transaction while the
//!   state machine goes on applying.
//! * Every write is one redb transaction committed with [`Durability::Immediate`] (fsync before
//!   `commit` returns): an appended entry is reported flushed to openraft only after that, the
//!   vote is durable before it is answered, and an applied batch moves the applied log id, the
//!   map and the map's version in the same transaction, so after a crash the state machine is
//!   exactly some prefix of the log and openraft re-applies the rest.
//! * The control plane runs on a small tokio runtime (1-2 threads), where an fsync would stall
//!   every raft group of the node: writes run on tokio's blocking pool
//!   ([`tokio::task::spawn_blocking`]). Reads of the log and the map run inline: they hit redb's
//!   page cache in the common case and are short.
//! * Snapshots are the whole map, encoded and stored in the file itself (table `snapshot`), so
//!   a restarted node can serve the snapshot it last built. Fine for the config group and for
//!   metadata shards of moderate size; a streaming format is a later change (`SNAPSHOT_FORMAT`).
//! * Log compaction: openraft purges the log up to the last snapshot (the group's config sets
//!   how much log it keeps behind it); [`RedbLogStore`] deletes the entries and remembers the
//!   last purged log id.
//!
//! # On-disk format
//!
//! Tables: `log` (`u64` index → record of a postcard-encoded openraft entry), `meta` (name →
//! record: `format`, `vote`, `committed`, `last_purged`, `applied`, `membership`, `kv_version`),
//! `kv` (key → record of `version u64 LE ‖ value`), `snapshot` (`"current"` → record of the
//! postcard-encoded [`StoredSnapshot`]). Every value is a record:
//!
//! ```text
//!  offset  size  field
//!  0       1     format   = RECORD_FORMAT (1)
//!  1       4     crc32c   over key ‖ byte 0 ‖ body, u32 LE
//!  5       n     body
//! ```
//!
//! redb checksums its pages but verifies them only when repairing a file; the record checksum
//! is checked on every read, and covering the key catches a record returned for the wrong key.
//! A record that fails to decode is a [`StoreError::Corrupt`], never a panic. A file whose
//! `meta/format` is not [`STORE_FORMAT`] is refused at open.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::kv::{KvOp, KvResponse, Versioned, check_batch};
use crate::{NodeId, TypeConfig};

/// Format of the whole file, kept under `meta/format`.
pub const STORE_FORMAT: u64 = 1;
/// Format byte at offset 0 of every record.
pub const RECORD_FORMAT: u8 = 1;
/// Format of a snapshot's bytes ([`StoredSnapshot::data`]).
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Name of the database file inside a group's directory.
pub const DB_FILE_NAME: &str = "raft.redb";

const RECORD_CRC_OFFSET: usize = 1;
const RECORD_HEADER_LEN: usize = 5;
const _: () = assert!(RECORD_HEADER_LEN == RECORD_CRC_OFFSET + size_of::<u32>());

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const META_FORMAT: &str = "format";
const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_LAST_PURGED: &str = "last_purged";
const META_APPLIED: &str = "applied";
const META_MEMBERSHIP: &str = "membership";
const META_KV_VERSION: &str = "kv_version";
const SNAPSHOT_CURRENT: &str = "current";

/// A failure of a group's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, a damaged file, a lock held by another process).
    #[error("raft storage {path}: redb failed during {op}: {source}")]
    Redb {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// redb's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record or snapshot failed its checksum or did not decode.
    #[error("raft storage {path}: corrupt {what} at {key}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which kind of record.
        what: &'static str,
        /// Its key, printable.
        key: String,
    },
    /// The file was written by a format this build does not read.
    #[error("raft storage {path}: format {found}, this build reads {STORE_FORMAT}")]
    UnknownFormat {
        /// The database file.
        path: PathBuf,
        /// Format found in the file.
        found: u64,
    },
    /// A blocking storage task did not finish (runtime shutting down).
    #[error("raft storage {path}: background task failed during {op}")]
    TaskFailed {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
    },
}

/// A snapshot as kept in the file and sent to lagging followers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    /// openraft's description of it.
    pub meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// The encoded map (a checksummed record keyed by `"snapshot"` holding the postcard-encoded
    /// map, its version and [`SNAPSHOT_FORMAT`]).
    pub data: Vec<u8>,
}

/// The map as a snapshot carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotBody {
    format: u32,
    kv_version: u64,
    entries: Vec<(Vec<u8>, Versioned)>,
}

const SNAPSHOT_RECORD_KEY: &[u8] = b"snapshot";

fn encode_record(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
    out.push(RECORD_FORMAT);
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), &[RECORD_FORMAT]);
    let crc = crc32c::crc32c_append(crc, body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    debug_assert_eq!(decode_record(key, &out), Some(body));
    out
}

/// The body of a record, or `None` if it is not a valid record for `key`.
fn decode_record<'a>(key: &[u8], record: &'a [u8]) -> Option<&'a [u8]> {
    if record.len() < RECORD_HEADER_LEN || record[0] != RECORD_FORMAT {
        return None;
    }
    let stored = u32::from_le_bytes(
        record[RECORD_CRC_OFFSET..RECORD_HEADER_LEN]
            .try_into()
            .ok()?,
    );
    let body = &record[RECORD_HEADER_LEN..];
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), &record[..RECORD_CRC_OFFSET]);
    (crc32c::crc32c_append(crc, body) == stored).then_some(body)
}

fn encode_kv(key: &[u8], value: &Versioned) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + value.value.len());
    body.extend_from_slice(&value.version.to_le_bytes());
    body.extend_from_slice(&value.value);
    encode_record(key, &body)
}

fn decode_kv(key: &[u8], record: &[u8]) -> Option<Versioned> {
    let body = decode_record(key, record)?;
    let (version, value) = body.split_at_checked(8)?;
    Some(Versioned {
        value: value.to_vec(),
        version: u64::from_le_bytes(version.try_into().ok()?),
    })
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The shared core of a group's storage: the database and its path (for errors).
#[derive(Debug)]
struct Db {
    db: Database,
    path: PathBuf,
}

impl Db {
    fn redb(&self, op: &'static str) -> impl FnOnce(redb::Error) -> StoreError + '_ {
        move |e| StoreError::Redb {
            path: self.path.clone(),
            op,
            source: Box::new(e),
        }
    }

    fn corrupt(&self, what: &'static str, key: &[u8]) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
            key: crate::kv::printable_key(key),
        }
    }

    fn begin_write(&self, op: &'static str) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.redb(op)(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.redb(op)(e.into()))?;
        Ok(txn)
    }

    fn commit(&self, txn: WriteTransaction, op: &'static str) -> Result<(), StoreError> {
        txn.commit().map_err(|e| self.redb(op)(e.into()))
    }

    /// A postcard-encoded value of `meta`, checksummed.
    fn read_meta<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let op = "read meta";
        let txn = self.db.begin_read().map_err(|e| self.redb(op)(e.into()))?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.redb(op)(e.into())),
        };
        let Some(record) = table.get(name).map_err(|e| self.redb(op)(e.into()))? else {
            return Ok(None);
        };
        decode_meta(self, name, record.value()).map(Some)
    }
}

fn decode_meta<T: for<'de> Deserialize<'de>>(
    db: &Db,
    name: &str,
    record: &[u8],
) -> Result<T, StoreError> {
    let body = decode_record(name.as_bytes(), record)
        .ok_or_else(|| db.corrupt("meta record", name.as_bytes()))?;
    postcard::from_bytes(body).map_err(|_| db.corrupt("meta value", name.as_bytes()))
}

fn put_meta<T: Serialize>(
    db: &Db,
    txn: &WriteTransaction,
    name: &str,
    value: &T,
) -> Result<(), StoreError> {
    let op = "write meta";
    let body = postcard::to_allocvec(value)
        .map_err(|_| db.corrupt("meta value to encode", name.as_bytes()))?;
    let mut table = txn.open_table(META).map_err(|e| db.redb(op)(e.into()))?;
    table
        .insert(name, encode_record(name.as_bytes(), &body).as_slice())
        .map_err(|e| db.redb(op)(e.into()))?;
    Ok(())
}

/// Opens (or creates) the storage of one raft group in `dir`, returning its log store and
/// state machine.
pub fn open(dir: &Path) -> Result<(RedbLogStore, RedbStateMachine), StoreError> {
    let path = dir.join(DB_FILE_NAME);
    let redb_err = |op: &'static str| {
        let path = path.clone();
        move |e: redb::Error| StoreError::Redb {
            path,
            op,
            source: Box::new(e),
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| redb_err("create directory")(e.into()))?;
    let db = Database::create(&path).map_err(|e| redb_err("open")(e.into()))?;
    let db = Arc::new(Db { db, path });
    let found: Option<u64> = db.read_meta(META_FORMAT)?;
    match found {
        Some(STORE_FORMAT) => {}
        Some(found) => {
            return Err(StoreError::UnknownFormat {
                path: db.path.clone(),
                found,
            });
        }
        None => {
            let txn = db.begin_write("initialize")?;
            put_meta(&db, &txn, META_FORMAT, &STORE_FORMAT)?;
            txn.open_table(LOG)
                .map_err(|e| db.redb("initialize")(e.into()))?;
            txn.open_table(KV)
                .map_err(|e| db.redb("initialize")(e.into()))?;
            txn.open_table(SNAPSHOT)
                .map_err(|e| db.redb("initialize")(e.into()))?;
            db.commit(txn, "initialize")?;
        }
    }
    Ok((
        RedbLogStore { db: db.clone() },
        RedbStateMachine {
            db,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        },
    ))
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(
    db: &Arc<Db>,
    op: &'static str,
    work: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || work(&db2))
        .await
        .map_err(|_| StoreError::TaskFailed {
            path: db.path.clone(),
            op,
        })?
}

fn io_err(e: StoreError) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

/// The raft log and vote of one group (also its own log reader).
#[derive(Debug, Clone)]
pub struct RedbLogStore {
    db: Arc<Db>,
}

impl RedbLogStore {
    fn read_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let op = "read log";
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let table = txn.open_table(LOG).map_err(|e| db.redb(op)(e.into()))?;
        let mut out = Vec::new();
        for item in table
            .range::<u64>((start, end))
            .map_err(|e| db.redb(op)(e.into()))?
        {
            let (k, v) = item.map_err(|e| db.redb(op)(e.into()))?;
            let key = log_key(k.value());
            let body =
                decode_record(&key, v.value()).ok_or_else(|| db.corrupt("log entry", &key))?;
            let entry: Entry<TypeConfig> =
                postcard::from_bytes(body).map_err(|_| db.corrupt("log entry", &key))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        let op = "read last log entry";
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let table = txn.open_table(LOG).map_err(|e| db.redb(op)(e.into()))?;
        let Some((k, v)) = table.last().map_err(|e| db.redb(op)(e.into()))? else {
            return Ok(None);
        };
        let key = log_key(k.value());
        let body = decode_record(&key, v.value()).ok_or_else(|| db.corrupt("log entry", &key))?;
        let entry: Entry<TypeConfig> =
            postcard::from_bytes(body).map_err(|_| db.corrupt("log entry", &key))?;
        Ok(Some(entry.log_id))
    }

    /// Entries currently held in the log (after purges), for tests and diagnostics.
    pub fn entry_count(&self) -> Result<u64, StoreError> {
        let op = "count log";
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let table = txn.open_table(LOG).map_err(|e| db.redb(op)(e.into()))?;
        table.len().map_err(|e| db.redb(op)(e.into()))
    }
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.read_range(range.start_bound().cloned(), range.end_bound().cloned())
            .map_err(|e| StorageIOError::read_logs(io_err(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self
            .db
            .read_meta(META_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(io_err(e)))?;
        let last = self
            .last_entry_log_id()
            .map_err(|e| StorageIOError::read_logs(io_err(e)))?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        blocking(&self.db, "save vote", move |db| {
            let txn = db.begin_write("save vote")?;
            put_meta(db, &txn, META_VOTE, &vote)?;
            db.commit(txn, "save vote")
        })
        .await
        .map_err(|e| StorageIOError::write_vote(io_err(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.db
            .read_meta(META_VOTE)
            .map_err(|e| StorageIOError::read_vote(io_err(e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        blocking(&self.db, "save committed", move |db| {
            let txn = db.begin_write("save committed")?;
            put_meta(db, &txn, META_COMMITTED, &committed)?;
            db.commit(txn, "save committed")
        })
        .await
        .map_err(|e| StorageIOError::write(io_err(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let committed: Option<Option<LogId<NodeId>>> = self
            .db
            .read_meta(META_COMMITTED)
            .map_err(|e| StorageIOError::read(io_err(e)))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let result = blocking(&self.db, "append log", move |db| {
            let txn = db.begin_write("append log")?;
            {
                let mut table = txn
                    .open_table(LOG)
                    .map_err(|e| db.redb("append log")(e.into()))?;
                for entry in &entries {
                    let index = entry.log_id.index;
                    let key = log_key(index);
                    let body = postcard::to_allocvec(entry)
                        .map_err(|_| db.corrupt("log entry to encode", &key))?;
                    table
                        .insert(index, encode_record(&key, &body).as_slice())
                        .map_err(|e| db.redb("append log")(e.into()))?;
                }
            }
            db.commit(txn, "append log")
        })
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(io_err(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        blocking(&self.db, "truncate log", move |db| {
            let txn = db.begin_write("truncate log")?;
            {
                let mut table = txn
                    .open_table(LOG)
                    .map_err(|e| db.redb("truncate log")(e.into()))?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| db.redb("truncate log")(e.into()))?;
            }
            db.commit(txn, "truncate log")
        })
        .await
        .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        blocking(&self.db, "purge log", move |db| {
            let txn = db.begin_write("purge log")?;
            put_meta(db, &txn, META_LAST_PURGED, &log_id)?;
            {
                let mut table = txn
                    .open_table(LOG)
                    .map_err(|e| db.redb("purge log")(e.into()))?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(|e| db.redb("purge log")(e.into()))?;
            }
            db.commit(txn, "purge log")
        })
        .await
        .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }
}

/// The state machine of one group: the versioned key-value map (also its own snapshot builder).
#[derive(Debug, Clone)]
pub struct RedbStateMachine {
    db: Arc<Db>,
    snapshot_seq: Arc<AtomicU64>,
}

impl RedbStateMachine {
    /// A read-only handle on the map, for serving reads next to raft.
    pub fn reader(&self) -> KvReader {
        KvReader {
            db: self.db.clone(),
        }
    }

    fn build(&self) -> Result<StoredSnapshot, StoreError> {
        let op = "build snapshot";
        let db = &self.db;
        // One read transaction: the map, its version and the applied log id agree.
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let meta = txn.open_table(META).map_err(|e| db.redb(op)(e.into()))?;
        let read = |name: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta
                .get(name)
                .map_err(|e| db.redb(op)(e.into()))?
                .map(|v| v.value().to_vec()))
        };
        let applied: Option<LogId<NodeId>> = match read(META_APPLIED)? {
            Some(r) => decode_meta(db, META_APPLIED, &r)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, openraft::BasicNode> = match read(META_MEMBERSHIP)?
        {
            Some(r) => decode_meta(db, META_MEMBERSHIP, &r)?,
            None => StoredMembership::default(),
        };
        let kv_version: u64 = match read(META_KV_VERSION)? {
            Some(r) => decode_meta(db, META_KV_VERSION, &r)?,
            None => 0,
        };
        let table = txn.open_table(KV).map_err(|e| db.redb(op)(e.into()))?;
        let mut entries = Vec::new();
        for item in table.iter().map_err(|e| db.redb(op)(e.into()))? {
            let (k, v) = item.map_err(|e| db.redb(op)(e.into()))?;
            let value = decode_kv(k.value(), v.value())
                .ok_or_else(|| db.corrupt("kv record", k.value()))?;
            entries.push((k.value().to_vec(), value));
        }
        let body = SnapshotBody {
            format: SNAPSHOT_FORMAT,
            kv_version,
            entries,
        };
        let body = postcard::to_allocvec(&body)
            .map_err(|_| db.corrupt("snapshot to encode", SNAPSHOT_RECORD_KEY))?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, seq),
            None => format!("0-0-{seq}"),
        };
        Ok(StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            },
            data: encode_record(SNAPSHOT_RECORD_KEY, &body),
        })
    }
}

fn store_snapshot(
    db: &Db,
    txn: &WriteTransaction,
    snapshot: &StoredSnapshot,
) -> Result<(), StoreError> {
    let op = "store snapshot";
    let body = postcard::to_allocvec(snapshot)
        .map_err(|_| db.corrupt("snapshot to encode", SNAPSHOT_CURRENT.as_bytes()))?;
    let mut table = txn
        .open_table(SNAPSHOT)
        .map_err(|e| db.redb(op)(e.into()))?;
    table
        .insert(
            SNAPSHOT_CURRENT,
            encode_record(SNAPSHOT_CURRENT.as_bytes(), &body).as_slice(),
        )
        .map_err(|e| db.redb(op)(e.into()))?;
    Ok(())
}

fn to_snapshot(s: StoredSnapshot) -> Snapshot<TypeConfig> {
    Snapshot {
        meta: s.meta,
        snapshot: Box::new(Cursor::new(s.data)),
    }
}

/// Applies one batch inside `txn`: conditions against the state before the batch, then the
/// operations, then the map's version. Returns what the client is told.
fn apply_batch(
    db: &Db,
    txn: &WriteTransaction,
    kv_version: &mut u64,
    ops: &[KvOp],
) -> Result<KvResponse, StoreError> {
    let op = "apply batch";
    let mut table = txn.open_table(KV).map_err(|e| db.redb(op)(e.into()))?;
    let mut current: HashMap<&[u8], Option<u64>> = HashMap::with_capacity(ops.len());
    for kv_op in ops {
        let key = kv_op.key();
        if current.contains_key(key) {
            continue;
        }
        let found = match table.get(key).map_err(|e| db.redb(op)(e.into()))? {
            Some(v) => Some(
                decode_kv(key, v.value())
                    .ok_or_else(|| db.corrupt("kv record", key))?
                    .version,
            ),
            None => None,
        };
        current.insert(key, found);
    }
    if let Err(e) = check_batch(ops, |k| current.get(k).copied().flatten()) {
        return Ok(KvResponse::Rejected(e));
    }
    let version = *kv_version + 1;
    for kv_op in ops {
        match kv_op {
            KvOp::Put { key, value, .. } => {
                let record = encode_kv(
                    key,
                    &Versioned {
                        value: value.clone(),
                        version,
                    },
                );
                table
                    .insert(key.as_slice(), record.as_slice())
                    .map_err(|e| db.redb(op)(e.into()))?;
            }
            KvOp::Delete { key, .. } => {
                table
                    .remove(key.as_slice())
                    .map_err(|e| db.redb(op)(e.into()))?;
            }
        }
    }
    *kv_version = version;
    Ok(KvResponse::Applied { version })
}

impl RaftSnapshotBuilder<TypeConfig> for RedbStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let this = self.clone();
        let snapshot = blocking(&self.db, "build snapshot", move |db| {
            let snapshot = this.build()?;
            let txn = db.begin_write("store snapshot")?;
            store_snapshot(db, &txn, &snapshot)?;
            db.commit(txn, "store snapshot")?;
            Ok(snapshot)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        Ok(to_snapshot(snapshot))
    }
}

impl RaftStateMachine<TypeConfig> for RedbStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError<NodeId>,
    > {
        let read = || -> Result<_, StoreError> {
            let applied: Option<Option<LogId<NodeId>>> = self.db.read_meta(META_APPLIED)?;
            let membership = self.db.read_meta(META_MEMBERSHIP)?;
            Ok((applied.flatten(), membership.unwrap_or_default()))
        };
        read().map_err(|e| StorageIOError::read_state_machine(io_err(e)).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<KvResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        blocking(&self.db, "apply", move |db| {
            let txn = db.begin_write("apply")?;
            let mut kv_version: u64 = {
                let meta = txn
                    .open_table(META)
                    .map_err(|e| db.redb("apply")(e.into()))?;
                match meta
                    .get(META_KV_VERSION)
                    .map_err(|e| db.redb("apply")(e.into()))?
                {
                    Some(r) => decode_meta(db, META_KV_VERSION, r.value())?,
                    None => 0,
                }
            };
            let mut out = Vec::with_capacity(entries.len());
            let mut last = None;
            for entry in &entries {
                last = Some(entry.log_id);
                let response = match &entry.payload {
                    EntryPayload::Blank => KvResponse::NoBatch,
                    EntryPayload::Normal(batch) => {
                        apply_batch(db, &txn, &mut kv_version, &batch.ops)?
                    }
                    EntryPayload::Membership(m) => {
                        let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                        put_meta(db, &txn, META_MEMBERSHIP, &stored)?;
                        KvResponse::NoBatch
                    }
                };
                out.push(response);
            }
            if let Some(last) = last {
                put_meta(db, &txn, META_APPLIED, &Some(last))?;
                put_meta(db, &txn, META_KV_VERSION, &kv_version)?;
            }
            db.commit(txn, "apply")?;
            Ok(out)
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(io_err(e)).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let signature = meta.signature();
        blocking(&self.db, "install snapshot", move |db| {
            let body = decode_record(SNAPSHOT_RECORD_KEY, &stored.data)
                .ok_or_else(|| db.corrupt("received snapshot", SNAPSHOT_RECORD_KEY))?;
            let body: SnapshotBody = postcard::from_bytes(body)
                .map_err(|_| db.corrupt("received snapshot", SNAPSHOT_RECORD_KEY))?;
            if body.format != SNAPSHOT_FORMAT {
                return Err(db.corrupt("received snapshot format", SNAPSHOT_RECORD_KEY));
            }
            let op = "install snapshot";
            let txn = db.begin_write(op)?;
            {
                let mut table = txn.open_table(KV).map_err(|e| db.redb(op)(e.into()))?;
                table
                    .retain(|_, _| false)
                    .map_err(|e| db.redb(op)(e.into()))?;
                for (key, value) in &body.entries {
                    table
                        .insert(key.as_slice(), encode_kv(key, value).as_slice())
                        .map_err(|e| db.redb(op)(e.into()))?;
                }
            }
            put_meta(db, &txn, META_APPLIED, &stored.meta.last_log_id)?;
            put_meta(db, &txn, META_MEMBERSHIP, &stored.meta.last_membership)?;
            put_meta(db, &txn, META_KV_VERSION, &body.kv_version)?;
            store_snapshot(db, &txn, &stored)?;
            db.commit(txn, op)
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(Some(signature), io_err(e)).into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let read = || -> Result<Option<StoredSnapshot>, StoreError> {
            let op = "read snapshot";
            let db = &self.db;
            let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
            let table = txn
                .open_table(SNAPSHOT)
                .map_err(|e| db.redb(op)(e.into()))?;
            let Some(record) = table
                .get(SNAPSHOT_CURRENT)
                .map_err(|e| db.redb(op)(e.into()))?
            else {
                return Ok(None);
            };
            let body = decode_record(SNAPSHOT_CURRENT.as_bytes(), record.value())
                .ok_or_else(|| db.corrupt("snapshot", SNAPSHOT_CURRENT.as_bytes()))?;
            postcard::from_bytes(body)
                .map(Some)
                .map_err(|_| db.corrupt("snapshot", SNAPSHOT_CURRENT.as_bytes()))
        };
        Ok(read()
            .map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?
            .map(to_snapshot))
    }
}

/// Read-only access to a group's map on this node (no raft round trip; see
/// [`crate::RaftGroup::get`] for linearizable reads).
#[derive(Debug, Clone)]
pub struct KvReader {
    db: Arc<Db>,
}

impl KvReader {
    /// The value of `key` in this replica's map.
    pub fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let op = "get";
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let table = txn.open_table(KV).map_err(|e| db.redb(op)(e.into()))?;
        match table.get(key).map_err(|e| db.redb(op)(e.into()))? {
            Some(v) => decode_kv(key, v.value())
                .map(Some)
                .ok_or_else(|| db.corrupt("kv record", key)),
            None => Ok(None),
        }
    }

    /// Every key starting with `prefix`, in key order, from this replica's map.
    pub fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, StoreError> {
        let op = "scan";
        let db = &self.db;
        let txn = db.db.begin_read().map_err(|e| db.redb(op)(e.into()))?;
        let table = txn.open_table(KV).map_err(|e| db.redb(op)(e.into()))?;
        let mut out = Vec::new();
        for item in table
            .range::<&[u8]>(prefix..)
            .map_err(|e| db.redb(op)(e.into()))?
        {
            let (k, v) = item.map_err(|e| db.redb(op)(e.into()))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let value = decode_kv(key, v.value()).ok_or_else(|| db.corrupt("kv record", key))?;
            out.push((key.to_vec(), value));
        }
        Ok(out)
    }

    /// Version of the last applied batch (0: none yet).
    pub fn version(&self) -> Result<u64, StoreError> {
        Ok(self.db.read_meta(META_KV_VERSION)?.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_refuse_flipped_bits_and_the_wrong_key() {
        let rec = encode_record(b"k", b"body");
        assert_eq!(decode_record(b"k", &rec), Some(&b"body"[..]));
        assert_eq!(decode_record(b"j", &rec), None, "record of another key");
        for byte in 0..rec.len() {
            let mut bad = rec.clone();
            bad[byte] ^= 0x10;
            assert_eq!(decode_record(b"k", &bad), None, "flip in byte {byte}");
        }
        assert_eq!(decode_record(b"k", &rec[..3]), None, "truncated");
        assert_eq!(decode_kv(b"k", &encode_record(b"k", b"short")), None);
    }

    #[test]
    fn a_file_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _sm) = open(dir.path()).unwrap();
        {
            let txn = log.db.begin_write("test").unwrap();
            put_meta(&log.db, &txn, META_FORMAT, &(STORE_FORMAT + 1)).unwrap();
            log.db.commit(txn, "test").unwrap();
        }
        drop((log, _sm));
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownFormat { found: 2, .. }),
            "{err}"
        );
    }
}
