//! The embedded, durable [`MetadataStore`]: one redb database file per node.
//!
//! This is the single-node store the data plane uses until the replicated control-plane store
//! takes over behind the same trait. It must behave exactly like [`MemMetadataStore`] (the
//! reference model; the tests compare the two over random batches) and add one promise: a batch
//! whose [`MetadataStore::apply`] returned `Ok` survives a crash of the process or the machine.
//!
//! # Shape
//!
//! * Each `apply` is one redb write transaction: the conditions are checked against the state
//!   before the batch (through the shared [`check_batch`]), the operations applied, the global
//!   version counter advanced, and the transaction committed with [`Durability::Immediate`]
//!   (redb writes the new commit slot and fsyncs before `commit` returns). A failed condition
//!   aborts the transaction, so nothing of the batch and no version number is consumed.
//! * The data plane runs on glommio executors, where a blocking call stalls every vdisk of the
//!   core. redb blocks (fsync on commit, `pread` on a cache miss: redb does not mmap), so every
//!   call — reads included — runs on the executor's blocking thread pool through
//!   [`glommio::ExecutorProxy::spawn_blocking`], with the [`Database`] shared by an [`Arc`].
//!   Reads pay a thread hand-off (tens of microseconds) rather than run inline: they happen when
//!   a vdisk is opened, not per I/O, and a scan of a large vdisk's map is far too long to run on
//!   the reactor. The default pool has one thread per executor, which also keeps one executor's
//!   calls in the order they were issued.
//! * [`RedbMetadataStore::open`] is synchronous: it runs once at start-up and, after a crash,
//!   lets redb repair the file (walk every page checksum), which is blocking work by nature.
//!
//! # On-disk format
//!
//! Two tables. `kv` maps each key (its bytes, ordered as bytes, like the `BTreeMap` of the
//! in-memory store) to a record; `meta` holds two `u64`s: `format` ([`STORE_FORMAT`]; a file of
//! another format is refused at open) and `version` (the version of the last applied batch, `0`
//! in a new store; updated in the same transaction as the batch it numbers).
//!
//! A record, format [`RECORD_FORMAT`], little-endian:
//!
//! ```text
//!  offset  size  field
//!  0       1     format   = RECORD_FORMAT (1)
//!  1       8     version  u64, the batch that wrote the value
//!  9       4     crc32c   over key ‖ bytes [0, 9) ‖ value
//!  13      n     value    the caller's bytes, n ≥ 0
//! ```
//!
//! redb checksums its pages, but verifies them only when it repairs a file; the record checksum
//! is checked on every read, and covering the key catches a record returned for the wrong key.
//! A record that fails to decode is a [`MetaError::Storage`] carrying a [`StoreFormatError`],
//! never a panic.
//!
//! [`MemMetadataStore`]: crate::metadata::MemMetadataStore

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use crate::metadata::{MetaError, MetaOp, MetadataStore, Versioned, check_batch, printable_key};

/// Format of the whole store, kept under `meta/format`.
pub const STORE_FORMAT: u64 = 1;
/// Format byte at offset 0 of every record.
pub const RECORD_FORMAT: u8 = 1;

const RECORD_FORMAT_OFFSET: usize = 0;
const RECORD_VERSION_OFFSET: usize = 1;
const RECORD_CRC_OFFSET: usize = 9;
/// Bytes before the value in a record.
const RECORD_HEADER_LEN: usize = 13;
const _: () = assert!(RECORD_VERSION_OFFSET == RECORD_FORMAT_OFFSET + 1);
const _: () = assert!(RECORD_CRC_OFFSET == RECORD_VERSION_OFFSET + size_of::<u64>());
const _: () = assert!(RECORD_HEADER_LEN == RECORD_CRC_OFFSET + size_of::<u32>());

/// Key → record (see the module docs).
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// `format` and `version` (see the module docs).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_VERSION: &str = "version";

/// Bytes in the store that do not decode: the source of a [`MetaError::Storage`].
#[derive(Debug, thiserror::Error)]
pub enum StoreFormatError {
    /// A record is shorter than its header.
    #[error("record of key {key} is {len} bytes, shorter than its {RECORD_HEADER_LEN}-byte header")]
    RecordTooShort {
        /// The key, printable.
        key: String,
        /// Bytes found.
        len: usize,
    },
    /// A record has a format byte this build does not read.
    #[error("record of key {key} has format {found}; this build reads format {RECORD_FORMAT}")]
    RecordFormat {
        /// The key, printable.
        key: String,
        /// Format byte found.
        found: u8,
    },
    /// A record fails its checksum.
    #[error(
        "record of key {key} fails its checksum: stored {stored:#010x}, computed {computed:#010x}"
    )]
    RecordChecksum {
        /// The key, printable.
        key: String,
        /// Checksum in the record.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The file holds a store of another format.
    #[error("store format {found}; this build reads store format {STORE_FORMAT}")]
    StoreFormat {
        /// Format found.
        found: u64,
    },
    /// `meta/format` is missing from a file that holds records: not a store this code wrote.
    #[error("store has records but no format marker")]
    FormatMissing,
    /// `meta/version` is missing from an initialized store.
    #[error("store has no version counter")]
    VersionMissing,
}

fn storage<E>(op: &'static str) -> impl FnOnce(E) -> MetaError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| MetaError::Storage {
        op,
        source: Box::new(e),
    }
}

fn record_crc(key: &[u8], header: &[u8], value: &[u8]) -> u32 {
    let crc = crc32c::crc32c(key);
    let crc = crc32c::crc32c_append(crc, header);
    crc32c::crc32c_append(crc, value)
}

/// The record that stores `value` written at `version` under `key`.
fn encode_record(key: &[u8], version: u64, value: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER_LEN + value.len());
    record.push(RECORD_FORMAT);
    record.extend_from_slice(&version.to_le_bytes());
    let crc = record_crc(key, &record[..RECORD_CRC_OFFSET], value);
    record.extend_from_slice(&crc.to_le_bytes());
    record.extend_from_slice(value);
    assert_eq!(record.len(), RECORD_HEADER_LEN + value.len());
    record
}

/// The version and value in `record`, stored under `key`.
fn decode_record<'r>(key: &[u8], record: &'r [u8]) -> Result<(u64, &'r [u8]), StoreFormatError> {
    if record.len() < RECORD_HEADER_LEN {
        return Err(StoreFormatError::RecordTooShort {
            key: printable_key(key),
            len: record.len(),
        });
    }
    let format = record[RECORD_FORMAT_OFFSET];
    if format != RECORD_FORMAT {
        return Err(StoreFormatError::RecordFormat {
            key: printable_key(key),
            found: format,
        });
    }
    let (header, value) = record.split_at(RECORD_HEADER_LEN);
    let stored = u32::from_le_bytes(header[RECORD_CRC_OFFSET..].try_into().expect("4 bytes"));
    let computed = record_crc(key, &header[..RECORD_CRC_OFFSET], value);
    if stored != computed {
        return Err(StoreFormatError::RecordChecksum {
            key: printable_key(key),
            stored,
            computed,
        });
    }
    let version = u64::from_le_bytes(
        header[RECORD_VERSION_OFFSET..RECORD_CRC_OFFSET]
            .try_into()
            .expect("8 bytes"),
    );
    Ok((version, value))
}

fn decode_versioned(key: &[u8], record: &[u8]) -> Result<Versioned, StoreFormatError> {
    let (version, value) = decode_record(key, record)?;
    Ok(Versioned {
        value: value.to_vec(),
        version,
    })
}

/// A [`MetadataStore`] in one redb database file, durable on every acknowledged batch.
///
/// The async methods must be called from a glommio executor: their blocking work runs on its
/// blocking thread pool. Dropping a future of [`MetadataStore::apply`] after its first poll does
/// not cancel the write; the batch may still be applied (and is durable if it is).
///
/// Clones share the database: a node opens the file once and gives each core a clone.
#[derive(Clone)]
pub struct RedbMetadataStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl fmt::Debug for RedbMetadataStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbMetadataStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbMetadataStore {
    /// Opens the store in the file at `path`, creating and initializing the file if it is
    /// missing or empty, and repairing it after a crash.
    ///
    /// Blocks (file I/O, fsync, and after a crash a walk of the whole file); call it at
    /// start-up. Only one `RedbMetadataStore` may have a file open at a time, in any process.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        const OP: &str = "open";
        let db = Database::create(path).map_err(storage(OP))?;
        let mut txn = db.begin_write().map_err(storage(OP))?;
        txn.set_durability(Durability::Immediate)
            .map_err(storage(OP))?;
        let created = {
            let kv = txn.open_table(KV).map_err(storage(OP))?;
            let mut meta = txn.open_table(META).map_err(storage(OP))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(storage(OP))?
                .map(|g| g.value());
            match format {
                Some(STORE_FORMAT) => {
                    if meta.get(META_VERSION).map_err(storage(OP))?.is_none() {
                        return Err(storage(OP)(StoreFormatError::VersionMissing));
                    }
                    false
                }
                Some(found) => return Err(storage(OP)(StoreFormatError::StoreFormat { found })),
                None => {
                    if kv.first().map_err(storage(OP))?.is_some() {
                        return Err(storage(OP)(StoreFormatError::FormatMissing));
                    }
                    meta.insert(META_FORMAT, STORE_FORMAT)
                        .map_err(storage(OP))?;
                    meta.insert(META_VERSION, 0).map_err(storage(OP))?;
                    true
                }
            }
        };
        if created {
            txn.commit().map_err(storage(OP))?;
        } else {
            txn.abort().map_err(storage(OP))?;
        }
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the database on the executor's blocking thread pool.
    async fn blocking<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&Database) -> R + Send + 'static,
        R: Send + 'static,
    {
        let db = Arc::clone(&self.db);
        glommio::executor().spawn_blocking(move || f(&db)).await
    }
}

fn get_blocking(db: &Database, key: &[u8]) -> Result<Option<Versioned>, MetaError> {
    const OP: &str = "get";
    let txn = db.begin_read().map_err(storage(OP))?;
    let kv = txn.open_table(KV).map_err(storage(OP))?;
    let Some(record) = kv.get(key).map_err(storage(OP))? else {
        return Ok(None);
    };
    let versioned = decode_versioned(key, record.value()).map_err(storage(OP))?;
    Ok(Some(versioned))
}

fn scan_blocking(db: &Database, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, MetaError> {
    const OP: &str = "scan";
    let txn = db.begin_read().map_err(storage(OP))?;
    let kv = txn.open_table(KV).map_err(storage(OP))?;
    let mut out = Vec::new();
    for entry in kv.range::<&[u8]>(prefix..).map_err(storage(OP))? {
        let (key, record) = entry.map_err(storage(OP))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        let versioned = decode_versioned(key, record.value()).map_err(storage(OP))?;
        out.push((key.to_vec(), versioned));
    }
    Ok(out)
}

const APPLY: &str = "apply";

fn apply_blocking(db: &Database, ops: Vec<MetaOp>) -> Result<u64, MetaError> {
    let mut txn = db.begin_write().map_err(storage(APPLY))?;
    txn.set_durability(Durability::Immediate)
        .map_err(storage(APPLY))?;
    match write_batch(&txn, ops) {
        Ok(version) => {
            txn.commit().map_err(storage(APPLY))?;
            Ok(version)
        }
        Err(e) => {
            // A failed abort is the graver news: the store's storage is failing.
            txn.abort().map_err(storage(APPLY))?;
            Err(e)
        }
    }
}

/// Checks and writes the batch in `txn`; returns its version. The caller commits or aborts.
fn write_batch(txn: &WriteTransaction, ops: Vec<MetaOp>) -> Result<u64, MetaError> {
    let mut kv = txn.open_table(KV).map_err(storage(APPLY))?;
    let mut meta = txn.open_table(META).map_err(storage(APPLY))?;

    // Every condition is checked against the state before the batch, as in the reference.
    let mut found: BTreeMap<&[u8], Option<u64>> = BTreeMap::new();
    for op in &ops {
        let key = op.key();
        if found.contains_key(key) {
            continue;
        }
        let version = match kv.get(key).map_err(storage(APPLY))? {
            Some(record) => Some(
                decode_record(key, record.value())
                    .map_err(storage(APPLY))?
                    .0,
            ),
            None => None,
        };
        found.insert(key, version);
    }
    check_batch(&ops, |key| found.get(key).copied().flatten())?;

    let last = meta
        .get(META_VERSION)
        .map_err(storage(APPLY))?
        .map(|g| g.value())
        .ok_or_else(|| storage(APPLY)(StoreFormatError::VersionMissing))?;
    let version = last.checked_add(1).expect("version counter overflow");
    for op in &ops {
        match op {
            MetaOp::Put { key, value, .. } => {
                let record = encode_record(key, version, value);
                kv.insert(key.as_slice(), record.as_slice())
                    .map_err(storage(APPLY))?;
            }
            MetaOp::Delete { key, .. } => {
                kv.remove(key.as_slice()).map_err(storage(APPLY))?;
            }
        }
    }
    meta.insert(META_VERSION, version).map_err(storage(APPLY))?;
    Ok(version)
}

impl MetadataStore for RedbMetadataStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Versioned>, MetaError> {
        let key = key.to_vec();
        self.blocking(move |db| get_blocking(db, &key)).await
    }

    async fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Versioned)>, MetaError> {
        let prefix = prefix.to_vec();
        self.blocking(move |db| scan_blocking(db, &prefix)).await
    }

    async fn apply(&self, ops: Vec<MetaOp>) -> Result<u64, MetaError> {
        if ops.is_empty() {
            // Refused without a hop to the blocking pool, with the reference's error.
            check_batch(&ops, |_| None)?;
        }
        self.blocking(move |db| apply_blocking(db, ops)).await
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use glommio::LocalExecutorBuilder;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::metadata::{Expect, MemMetadataStore};

    /// Registered-buffer memory per test executor: well under the default 8 MiB memlock limit.
    const TEST_IO_MEMORY: usize = 1 << 20;

    fn run<T>(fut: impl Future<Output = T>) -> T {
        LocalExecutorBuilder::default()
            .io_memory(TEST_IO_MEMORY)
            .make()
            .expect("glommio executor")
            .run(fut)
    }

    fn put(key: &[u8], value: &[u8], expect: Expect) -> MetaOp {
        MetaOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            expect,
        }
    }

    fn delete(key: &[u8], expect: Expect) -> MetaOp {
        MetaOp::Delete {
            key: key.to_vec(),
            expect,
        }
    }

    /// The outcome of an `apply`, comparable across stores (errors by their message).
    fn outcome(result: Result<u64, MetaError>) -> Result<u64, String> {
        result.map_err(|e| e.to_string())
    }

    #[test]
    fn cas_batches_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let s = RedbMetadataStore::open(&dir.path().join("meta.redb")).unwrap();
            let v1 = s
                .apply(vec![put(b"v/1/a", b"x", Expect::Absent)])
                .await
                .unwrap();
            let err = s
                .apply(vec![
                    put(b"v/1/b", b"y", Expect::Any),
                    put(b"v/1/a", b"z", Expect::Version(v1 + 5)),
                ])
                .await
                .unwrap_err();
            assert!(
                matches!(err, MetaError::Conflict { found: Some(v), .. } if v == v1),
                "{err}"
            );
            assert!(s.get(b"v/1/b").await.unwrap().is_none(), "nothing applied");
            let v2 = s
                .apply(vec![delete(b"v/1/a", Expect::Version(v1))])
                .await
                .unwrap();
            assert_eq!(v2, v1 + 1, "a refused batch consumes no version");
            assert!(s.scan(b"v/1/").await.unwrap().is_empty());
            let err = s.apply(vec![]).await.unwrap_err();
            assert!(matches!(err, MetaError::InvalidBatch { .. }), "{err}");
        });
    }

    #[test]
    fn reopen_keeps_every_batch_and_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let mem = MemMetadataStore::new();
        let last = run(async {
            let s = RedbMetadataStore::open(&path).unwrap();
            let batches = vec![
                vec![
                    put(b"v/1/a", b"a1", Expect::Absent),
                    put(b"v/1/b", b"b1", Expect::Absent),
                ],
                vec![put(b"v/2/a", &[0, 1, 2, 255], Expect::Any)],
                vec![put(b"v/1/a", b"a2", Expect::Version(1))],
                vec![delete(b"v/1/b", Expect::Version(1))],
                vec![put(b"v/1/c", b"", Expect::Absent)],
            ];
            let mut last = 0;
            for batch in batches {
                let got = s.apply(batch.clone()).await.unwrap();
                assert_eq!(got, mem.apply(batch).await.unwrap());
                last = got;
            }
            assert_eq!(last, 5);
            last
        });
        // The executor and the store are gone: only the file remains.
        run(async {
            let s = RedbMetadataStore::open(&path).unwrap();
            assert_eq!(s.scan(b"").await.unwrap(), mem.scan(b"").await.unwrap());
            assert_eq!(
                s.get(b"v/1/a").await.unwrap(),
                Some(Versioned {
                    value: b"a2".to_vec(),
                    version: 3
                })
            );
            assert_eq!(s.get(b"v/1/b").await.unwrap(), None);
            let next = s
                .apply(vec![put(b"v/1/a", b"a3", Expect::Version(3))])
                .await
                .unwrap();
            assert_eq!(next, last + 1, "the counter continues");
        });
    }

    /// A random batch over a small key space; about half the batches meet all their conditions.
    async fn random_batch(rng: &mut ChaCha8Rng, mem: &MemMetadataStore) -> Vec<MetaOp> {
        const KEYS: u8 = 12;
        let len = if rng.random_ratio(1, 50) {
            0
        } else {
            rng.random_range(1..=5)
        };
        let mut ops = Vec::with_capacity(len);
        for _ in 0..len {
            let key = format!(
                "v/{}/{}",
                rng.random_range(1..=2),
                rng.random_range(0..KEYS)
            );
            let key = key.into_bytes();
            let current = mem.get(&key).await.unwrap().map(|v| v.version);
            let expect = match rng.random_range(0..10) {
                0..5 => Expect::Any,
                // Holds unless an earlier batch wrote the key.
                5 => Expect::Absent,
                // Holds.
                6..9 => current.map_or(Expect::Absent, Expect::Version),
                // Mostly fails.
                _ => Expect::Version(rng.random_range(1..50)),
            };
            if rng.random_ratio(1, 3) {
                ops.push(MetaOp::Delete { key, expect });
            } else {
                let value_len = rng.random_range(0..64);
                let value = (0..value_len).map(|_| rng.random()).collect();
                ops.push(MetaOp::Put { key, value, expect });
            }
        }
        ops
    }

    #[test]
    fn matches_the_in_memory_store_on_random_batches() {
        const BATCHES: usize = 300;
        let seed = std::env::var("CAIRN_SEED")
            .ok()
            .map(|s| s.parse::<u64>().expect("CAIRN_SEED is a u64"))
            .unwrap_or(0x6361_6972_6e5f_6d64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        run(async {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let redb = RedbMetadataStore::open(&path).unwrap();
            let mem = MemMetadataStore::new();
            let (mut applied, mut refused) = (0, 0);
            for i in 0..BATCHES {
                let batch = random_batch(&mut rng, &mem).await;
                let want = outcome(mem.apply(batch.clone()).await);
                let got = outcome(redb.apply(batch.clone()).await);
                assert_eq!(got, want, "seed {seed}, batch {i}: {batch:?}");
                if want.is_ok() {
                    applied += 1;
                } else {
                    refused += 1;
                }
                if i % 10 == 0 {
                    let prefix: &[u8] =
                        [&b""[..], b"v/", b"v/1/", b"v/2/1"][rng.random_range(0..4)];
                    assert_eq!(
                        redb.scan(prefix).await.unwrap(),
                        mem.scan(prefix).await.unwrap(),
                        "seed {seed}, after batch {i}, prefix {prefix:?}"
                    );
                }
            }
            assert!(applied > BATCHES / 4, "seed {seed}: only {applied} applied");
            assert!(
                refused > BATCHES / 10,
                "seed {seed}: only {refused} refused"
            );
            for prefix in [&b""[..], b"v/1/", b"v/2/", b"v/3/"] {
                assert_eq!(
                    redb.scan(prefix).await.unwrap(),
                    mem.scan(prefix).await.unwrap(),
                    "seed {seed}, final, prefix {prefix:?}"
                );
            }
            for k in 0..12 {
                let key = format!("v/1/{k}").into_bytes();
                assert_eq!(redb.get(&key).await.unwrap(), mem.get(&key).await.unwrap());
            }
        });
    }

    #[test]
    fn record_round_trips_and_refuses_damage() {
        let key = b"v/7/m\x00\x01";
        let record = encode_record(key, 42, b"payload");
        assert_eq!(record.len(), RECORD_HEADER_LEN + 7);
        assert_eq!(decode_record(key, &record).unwrap(), (42, &b"payload"[..]));
        assert_eq!(
            decode_record(key, &encode_record(key, 1, b"")).unwrap(),
            (1, &b""[..])
        );

        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 0x10;
            let err = decode_record(key, &bad).unwrap_err();
            if i == RECORD_FORMAT_OFFSET {
                assert!(
                    matches!(err, StoreFormatError::RecordFormat { found: 0x11, .. }),
                    "{err}"
                );
            } else {
                assert!(
                    matches!(err, StoreFormatError::RecordChecksum { .. }),
                    "byte {i}: {err}"
                );
            }
        }
        let err = decode_record(b"v/7/n", &record).unwrap_err();
        assert!(
            matches!(err, StoreFormatError::RecordChecksum { .. }),
            "wrong key: {err}"
        );
        let err = decode_record(key, &record[..RECORD_HEADER_LEN - 1]).unwrap_err();
        assert!(
            matches!(err, StoreFormatError::RecordTooShort { len: 12, .. }),
            "{err}"
        );
    }

    /// Overwrites the raw bytes stored under `key` (or a meta entry) behind the store's back.
    fn tamper(path: &Path, f: impl FnOnce(&WriteTransaction)) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    }

    fn source_of(err: &MetaError) -> &StoreFormatError {
        match err {
            MetaError::Storage { source, .. } => source
                .downcast_ref::<StoreFormatError>()
                .unwrap_or_else(|| panic!("not a format error: {err}")),
            other => panic!("not a storage error: {other}"),
        }
    }

    #[test]
    fn damaged_record_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        run(async {
            let s = RedbMetadataStore::open(&path).unwrap();
            s.apply(vec![
                put(b"v/1/a", b"good", Expect::Absent),
                put(b"v/1/b", b"bad", Expect::Absent),
            ])
            .await
            .unwrap();
        });
        tamper(&path, |txn| {
            let mut kv = txn.open_table(KV).unwrap();
            let mut record = kv.get(&b"v/1/b"[..]).unwrap().unwrap().value().to_vec();
            *record.last_mut().unwrap() ^= 1;
            kv.insert(&b"v/1/b"[..], record.as_slice()).unwrap();
        });
        run(async {
            let s = RedbMetadataStore::open(&path).unwrap();
            assert_eq!(s.get(b"v/1/a").await.unwrap().unwrap().value, b"good");
            let err = s.get(b"v/1/b").await.unwrap_err();
            assert!(matches!(err, MetaError::Storage { op: "get", .. }), "{err}");
            assert!(
                matches!(source_of(&err), StoreFormatError::RecordChecksum { .. }),
                "{err}"
            );
            let err = s.scan(b"v/1/").await.unwrap_err();
            assert!(
                matches!(err, MetaError::Storage { op: "scan", .. }),
                "{err}"
            );
            let err = s
                .apply(vec![put(b"v/1/b", b"new", Expect::Any)])
                .await
                .unwrap_err();
            assert!(
                matches!(err, MetaError::Storage { op: "apply", .. }),
                "{err}"
            );
            // The refused batch consumed nothing: the next version is still 2.
            let v = s
                .apply(vec![put(b"v/1/c", b"c", Expect::Absent)])
                .await
                .unwrap();
            assert_eq!(v, 2);
        });
    }

    #[test]
    fn open_refuses_a_foreign_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        drop(RedbMetadataStore::open(&path).unwrap());
        tamper(&path, |txn| {
            txn.open_table(META)
                .unwrap()
                .insert(META_FORMAT, STORE_FORMAT + 1)
                .unwrap();
        });
        let err = RedbMetadataStore::open(&path).unwrap_err();
        assert!(
            matches!(source_of(&err), StoreFormatError::StoreFormat { found: 2 }),
            "{err}"
        );

        // A redb file with records but no marker was not written by this store.
        let other = dir.path().join("other.redb");
        tamper(&other, |txn| {
            txn.open_table(KV)
                .unwrap()
                .insert(&b"k"[..], &b"v"[..])
                .unwrap();
        });
        let err = RedbMetadataStore::open(&other).unwrap_err();
        assert!(
            matches!(source_of(&err), StoreFormatError::FormatMissing),
            "{err}"
        );

        // Not a redb file at all.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0xA5; 8192]).unwrap();
        let err = RedbMetadataStore::open(&junk).unwrap_err();
        assert!(
            matches!(err, MetaError::Storage { op: "open", .. }),
            "{err}"
        );
    }

    /// Set in the child process of [`kill_mid_write_keeps_every_acknowledged_batch`]: the
    /// database it writes to.
    const KILL_CHILD_ENV: &str = "CAIRN_METADATA_REDB_KILL_CHILD";
    const KILL_CHILD_TEST: &str = "metadata_redb::tests::kill_child_writer";
    const KILL_KEYS_PER_BATCH: usize = 4;
    /// The signal `Child::kill` sends on Linux (the crate does not depend on libc).
    const SIGKILL: i32 = 9;

    fn kill_key(batch: u64, j: usize) -> Vec<u8> {
        format!("v/9/{batch:08}/{j}").into_bytes()
    }

    fn kill_value(batch: u64, j: usize) -> Vec<u8> {
        (0..512)
            .map(|i| (batch as usize + j * 7 + i) as u8)
            .collect()
    }

    /// The writer half of the kill test: applies batches until killed, printing each version
    /// once `apply` has acknowledged it. Does nothing unless started by the parent.
    #[test]
    #[ignore = "run as a child process by kill_mid_write_keeps_every_acknowledged_batch"]
    fn kill_child_writer() {
        let Some(path) = std::env::var_os(KILL_CHILD_ENV) else {
            return;
        };
        run(async {
            let s = RedbMetadataStore::open(Path::new(&path)).unwrap();
            let mut out = std::io::stdout().lock();
            for batch in 1.. {
                let ops = (0..KILL_KEYS_PER_BATCH)
                    .map(|j| put(&kill_key(batch, j), &kill_value(batch, j), Expect::Absent))
                    .collect();
                let version = s.apply(ops).await.unwrap();
                writeln!(out, "acked {version} {batch}").unwrap();
                out.flush().unwrap();
            }
        });
    }

    #[test]
    fn kill_mid_write_keeps_every_acknowledged_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                KILL_CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL_CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        // Returns whether the line was an acknowledgement. The first one shares its line with
        // libtest's "test ... " (printed before the test runs, without a newline).
        let mut parse = |line: String| {
            let Some((_, rest)) = line.split_once("acked ") else {
                return false;
            };
            let (version, batch) = rest.split_once(' ').expect("acked VERSION BATCH");
            acked.push((
                version.parse::<u64>().unwrap(),
                batch.parse::<u64>().unwrap(),
            ));
            true
        };
        // Start the clock at the first acknowledgement, so start-up does not eat the window.
        for line in lines.by_ref() {
            if parse(line.unwrap()) {
                break;
            }
        }
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        child.kill().unwrap();
        let killed_after = started.elapsed();
        for line in lines {
            parse(line.unwrap());
        }
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            status.signal(),
            Some(SIGKILL),
            "child ended on its own: {stderr}"
        );
        assert!(!acked.is_empty(), "child acknowledged nothing: {stderr}");

        let last_acked = acked.last().unwrap().0;
        assert_eq!(acked[0].0, 1, "every acknowledgement was read");
        let found = run(async {
            let s = RedbMetadataStore::open(&path).unwrap();
            for &(version, batch) in &acked {
                assert_eq!(version, batch, "one version per batch, from 1");
                for j in 0..KILL_KEYS_PER_BATCH {
                    let got = s.get(&kill_key(batch, j)).await.unwrap();
                    assert_eq!(
                        got,
                        Some(Versioned {
                            value: kill_value(batch, j),
                            version
                        }),
                        "acknowledged batch {batch} lost"
                    );
                }
            }
            // At most one batch beyond the last acknowledged one was committed (killed between
            // its commit and its print), and it is whole.
            let all = s.scan(b"v/9/").await.unwrap();
            let batches = all.len() / KILL_KEYS_PER_BATCH;
            assert_eq!(all.len() % KILL_KEYS_PER_BATCH, 0, "a torn batch");
            assert!(
                batches as u64 == last_acked || batches as u64 == last_acked + 1,
                "{batches} batches on disk, {last_acked} acknowledged"
            );
            let next = s
                .apply(vec![put(b"v/9/next", b"", Expect::Absent)])
                .await
                .unwrap();
            assert_eq!(
                next,
                batches as u64 + 1,
                "the counter continues after the crash"
            );
            batches
        });
        eprintln!(
            "kill test: {} batches acknowledged in {killed_after:?}, {found} on disk",
            acked.len()
        );
    }
}
